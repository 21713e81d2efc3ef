"""Duplicate detection (RFC 6733 §3, §5.5.4): a request with the T flag whose (Origin-Host,
End-to-End id) was answered recently gets the same answer again, with its own hop-by-hop id,
and the application is not asked again. Without sockets, then end to end: a retransmission
after a reconnect and a list reload still gets the answer given before the reload.
"""

from __future__ import annotations

import signal
import struct

from eir.decision import UnknownPolicy
from eir.diameter.codec import encode_message
from eir.diameter.constants import (APPLICATION_S13, FLAG_PROXIABLE, FLAG_REQUEST,
                                    FLAG_RETRANSMIT)
from eir.diameter.duplicates import EXPIRY_BATCH, DuplicateCache
from eir.diameter.peer import PeerConnection, PeerState, Timers
from eir.lists import load_rule_set
from eir.s13 import S13Application
from helpers_wire import ecr as wire_ecr
from helpers_wire import open_peer, parse_answer, read_message
from test_peer_state import D, E, LOCAL, RULE_SET, Message, cer, event_text, one_message

ECR_CODE = 324
BLACKLISTED, WHITELISTED = 1, 0
IMEI = "35209900176148"  # blacklisted in config/lists/example.csv


class BrokenRules:
    """Stands in for the rules when the application must not be asked: any call is a 5012."""

    def decide(self, *args, **kwargs):
        raise RuntimeError("the application was asked again")


def ecr(hop_by_hop: int, end_to_end: int, retransmitted: bool = False,
        origin_host: str = "mme.test", imei: str = IMEI) -> bytes:
    body = (E("Session-Id", f"{origin_host};{end_to_end}") + E("Auth-Session-State", 1)
            + E("Origin-Host", origin_host) + E("Origin-Realm", "test")
            + E("Destination-Realm", "test.realm")
            + E("Terminal-Information", [E("IMEI", imei)]))
    flags = FLAG_REQUEST | FLAG_PROXIABLE | (FLAG_RETRANSMIT if retransmitted else 0)
    return encode_message(flags, ECR_CODE, APPLICATION_S13, hop_by_hop, end_to_end, body)


def open_with(cache: DuplicateCache | None, now: float = 0.0) -> PeerConnection:
    application = S13Application(D, LOCAL, RULE_SET)
    peer = PeerConnection(D, LOCAL, {APPLICATION_S13: application}, now=now,
                          timers=Timers(watchdog_jitter=0), duplicates=cache)
    one_message(peer.receive(cer(APPLICATION_S13), now))
    assert peer.state is PeerState.OPEN
    return peer


def status(answer: bytes) -> int | None:
    message = Message(answer)
    return message.value("Equipment-Status") if message.all("Equipment-Status") else None


def with_hop_by_hop(answer: bytes, hop_by_hop: int) -> bytes:
    patched = bytearray(answer)
    struct.pack_into("!I", patched, 12, hop_by_hop)
    return bytes(patched)


def test_retransmission_gets_the_same_answer_without_asking_the_application_again():
    peer = open_with(DuplicateCache(60.0, 1000))
    first = peer.receive(ecr(1, 100), 1.0)
    assert status(first) == BLACKLISTED
    peer.applications[APPLICATION_S13].rule_set = BrokenRules()
    again = peer.receive(ecr(2, 100, retransmitted=True), 5.0)
    assert again == with_hop_by_hop(first, 2)
    assert "duplicate request (T flag, end-to-end id 0x00000064): answered as before" in \
        event_text(peer)


def test_the_stored_answer_stands_after_the_lists_change():
    peer = open_with(DuplicateCache(60.0, 1000))
    first = peer.receive(ecr(1, 100), 1.0)
    # New lists in force: none, and every IMEI whitelisted.
    peer.applications[APPLICATION_S13].rule_set = load_rule_set([], UnknownPolicy.WHITELISTED)
    assert status(peer.receive(ecr(2, 101), 2.0)) == WHITELISTED  # a new request: new lists
    assert peer.receive(ecr(3, 100, retransmitted=True), 3.0) == with_hop_by_hop(first, 3)


def test_without_the_t_flag_a_repeated_id_is_answered_anew():
    peer = open_with(DuplicateCache(60.0, 1000))
    peer.receive(ecr(1, 100), 1.0)
    peer.applications[APPLICATION_S13].rule_set = BrokenRules()
    assert Message(peer.receive(ecr(2, 100), 2.0)).value("Result-Code") == 5012


def test_same_end_to_end_id_from_another_origin_host_is_not_a_duplicate():
    peer = open_with(DuplicateCache(60.0, 1000))
    peer.receive(ecr(1, 100, origin_host="mme.test"), 1.0)
    peer.applications[APPLICATION_S13].rule_set = BrokenRules()
    other = peer.receive(ecr(2, 100, retransmitted=True, origin_host="mme2.test"), 2.0)
    assert Message(other).value("Result-Code") == 5012


def test_a_t_flag_request_never_seen_is_answered_normally():
    peer = open_with(DuplicateCache(60.0, 1000))
    assert status(peer.receive(ecr(1, 100, retransmitted=True), 1.0)) == BLACKLISTED


def test_the_retransmission_may_arrive_on_another_connection():
    cache = DuplicateCache(60.0, 1000)
    lost, reconnected = open_with(cache), open_with(cache)
    first = lost.receive(ecr(1, 100), 1.0)
    lost.connection_lost()
    reconnected.applications[APPLICATION_S13].rule_set = BrokenRules()
    assert reconnected.receive(ecr(7, 100, retransmitted=True), 2.0) == with_hop_by_hop(
        first, 7)


def test_answers_expire_after_the_window():
    peer = open_with(DuplicateCache(10.0, 1000))
    peer.receive(ecr(1, 100), 1.0)
    peer.applications[APPLICATION_S13].rule_set = BrokenRules()
    assert status(peer.receive(ecr(2, 100, retransmitted=True), 10.9)) == BLACKLISTED
    assert Message(peer.receive(ecr(3, 100, retransmitted=True), 11.1)).value(
        "Result-Code") == 5012


def test_at_most_max_entries_answers_are_kept_the_oldest_go_first():
    cache = DuplicateCache(60.0, 3)
    peer = open_with(cache)
    for end_to_end in range(100, 105):
        peer.receive(ecr(end_to_end, end_to_end), 1.0)
    peer.applications[APPLICATION_S13].rule_set = BrokenRules()
    assert status(peer.receive(ecr(9, 104, retransmitted=True), 2.0)) == BLACKLISTED
    assert len(cache) == 3
    assert Message(peer.receive(ecr(9, 101, retransmitted=True), 2.0)).value(
        "Result-Code") == 5012


def test_memory_stays_bounded_under_a_stream_of_requests():
    cache = DuplicateCache(60.0, 1000)
    answer = bytes(160)
    for n in range(20 * EXPIRY_BATCH + 7):
        cache.store(n.to_bytes(4, "big") + b"mme", answer, n)
        assert len(cache) <= 1000 + EXPIRY_BATCH
    cache = DuplicateCache(1.0, 10**6)  # by time: a window of 1 s, one store per 0.01 s
    for n in range(20 * EXPIRY_BATCH):
        cache.store(n.to_bytes(4, "big") + b"mme", answer, n / 100)
        assert len(cache) <= 100 + EXPIRY_BATCH


def test_error_answers_are_not_stored_they_are_recomputed():
    cache = DuplicateCache(60.0, 1000)
    peer = open_with(cache)
    first = peer.receive(ecr(1, 100, imei="3520990017614A"), 1.0)
    assert Message(first).value("Result-Code") == 5004
    assert len(cache) == 0
    assert peer.receive(ecr(2, 100, imei="3520990017614A", retransmitted=True), 2.0) == \
        with_hop_by_hop(first, 2)


# -- end to end ----------------------------------------------------------------------------

def test_retransmission_after_reconnect_and_reload_gets_the_answer_given_before(eir_server,
                                                                               tmp_path):
    lists = tmp_path / "lists.csv"
    lists.write_text(f"imei,status,imsi,reason\n{IMEI},blacklist,,stolen\n")
    server = eir_server(lists=[lists])
    with open_peer(server.address) as sock:
        sock.sendall(wire_ecr(hop_by_hop=11, end_to_end=0x5000))
        original = parse_answer(read_message(sock))
    assert (original.result_code, original.equipment_status) == (2001, BLACKLISTED)

    lists.write_text(f"imei,status,imsi,reason\n{IMEI},whitelist,,recovered\n")
    mark = len(server.lines)
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"lists reloaded", start=mark)

    retransmitted = FLAG_REQUEST | FLAG_PROXIABLE | FLAG_RETRANSMIT
    with open_peer(server.address) as sock:  # a new connection, as after a failover
        sock.sendall(wire_ecr(hop_by_hop=12, end_to_end=0x5001))
        fresh = parse_answer(read_message(sock))
        sock.sendall(wire_ecr(hop_by_hop=13, end_to_end=0x5000, flags=retransmitted))
        again = parse_answer(read_message(sock))
    assert fresh.equipment_status == WHITELISTED  # the lists in force now
    assert (again.hop_by_hop, again.end_to_end) == (13, 0x5000)
    assert (again.result_code, again.equipment_status) == (2001, BLACKLISTED)
    assert again.avps == original.avps
    server.wait_for_log(r"mme\.test: duplicate request \(T flag, end-to-end id 0x00005000\)")
