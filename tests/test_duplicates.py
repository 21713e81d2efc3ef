"""Duplicate detection (RFC 6733 §3, §5.5.4): a request with the T flag that is the same
request (bytes but for the T flag and the hop-by-hop id) as one answered recently, from a peer
with the same CER Origin-Host, gets the same answer again, with its own hop-by-hop id, and the
application is not asked again; any other request is answered anew. The cache's memory is
bounded by entries and by bytes. Without sockets, then end to end: a retransmission after a
reconnect and a list reload still gets the answer given before the reload.
"""

from __future__ import annotations

import signal
import struct

from eir.check.service import EquipmentCheck
from eir.core.decision import UnknownPolicy
from eir.diameter.codec import encode_message
from eir.diameter.constants import (APPLICATION_S13, FLAG_PROXIABLE, FLAG_REQUEST,
                                    FLAG_RETRANSMIT)
from eir.diameter.duplicates import (ENTRY_OVERHEAD_BYTES, EXPIRY_BATCH, DuplicateCache,
                                     request_keys)
from eir.diameter.peer import PeerConnection, PeerState, Timers
from eir.lists.native import load_rule_set
from eir.interfaces.s13 import S13Application
from helpers_wire import ecr as wire_ecr
from helpers_wire import open_peer, parse_answer, read_message
from test_peer_state import (CER, D, E, LOCAL, RULE_SET, Message, cer, event_text,
                             one_message, request)

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


def cache(window: float = 60.0, entries: int = 1000, max_bytes: int = 1 << 30
          ) -> DuplicateCache:
    return DuplicateCache(window, entries, max_bytes)


def open_with(cache: DuplicateCache | None, now: float = 0.0,
              peer_host: str = "mme.test") -> PeerConnection:
    """An open connection; `peer_host` the Origin-Host of its CER."""
    application = S13Application(D, LOCAL, EquipmentCheck(RULE_SET))
    peer = PeerConnection(D, LOCAL, {APPLICATION_S13: application}, now=now,
                          timers=Timers(watchdog_jitter=0), duplicates=cache)
    if peer_host == "mme.test":
        one_message(peer.receive(cer(APPLICATION_S13), now))
    else:
        one_message(peer.receive(request(CER, E("Origin-Host", peer_host)
                                         + E("Origin-Realm", "test")
                                         + E("Host-IP-Address", "192.0.2.1")
                                         + E("Vendor-Id", 0) + E("Product-Name", "relay")
                                         + E("Auth-Application-Id", APPLICATION_S13)), now))
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
    peer = open_with(cache())
    first = peer.receive(ecr(1, 100), 1.0)
    assert status(first) == BLACKLISTED
    peer.applications[APPLICATION_S13].check.rule_set = BrokenRules()
    again = peer.receive(ecr(2, 100, retransmitted=True), 5.0)
    assert again == with_hop_by_hop(first, 2)
    assert "duplicate request (T flag, end-to-end id 0x00000064): answered as before" in \
        event_text(peer)
    assert {k: n for k, n in peer.answered.items() if n} == {"BLACKLISTED": 1, "DUPLICATE": 1}


def test_the_stored_answer_stands_after_the_lists_change():
    peer = open_with(cache())
    first = peer.receive(ecr(1, 100), 1.0)
    # New lists in force: none, and every IMEI whitelisted.
    peer.applications[APPLICATION_S13].check.rule_set = load_rule_set([], UnknownPolicy.WHITELISTED)
    assert status(peer.receive(ecr(2, 101), 2.0)) == WHITELISTED  # a new request: new lists
    assert peer.receive(ecr(3, 100, retransmitted=True), 3.0) == with_hop_by_hop(first, 3)


def test_without_the_t_flag_a_repeated_id_is_answered_anew():
    peer = open_with(cache())
    peer.receive(ecr(1, 100), 1.0)
    peer.applications[APPLICATION_S13].check.rule_set = BrokenRules()
    assert Message(peer.receive(ecr(2, 100), 2.0)).value("Result-Code") == 5012


def test_same_end_to_end_id_from_another_origin_host_is_not_a_duplicate():
    peer = open_with(cache())
    peer.receive(ecr(1, 100, origin_host="mme.test"), 1.0)
    peer.applications[APPLICATION_S13].check.rule_set = BrokenRules()
    other = peer.receive(ecr(2, 100, retransmitted=True, origin_host="mme2.test"), 2.0)
    assert Message(other).value("Result-Code") == 5012


def test_a_t_flag_request_never_seen_is_answered_normally():
    peer = open_with(cache())
    assert status(peer.receive(ecr(1, 100, retransmitted=True), 1.0)) == BLACKLISTED


def test_the_retransmission_may_arrive_on_another_connection():
    shared = cache()
    lost, reconnected = open_with(shared), open_with(shared)
    first = lost.receive(ecr(1, 100), 1.0)
    lost.connection_lost()
    reconnected.applications[APPLICATION_S13].check.rule_set = BrokenRules()
    assert reconnected.receive(ecr(7, 100, retransmitted=True), 2.0) == with_hop_by_hop(
        first, 7)


def test_answers_expire_after_the_window():
    peer = open_with(cache(10.0))
    peer.receive(ecr(1, 100), 1.0)
    peer.applications[APPLICATION_S13].check.rule_set = BrokenRules()
    assert status(peer.receive(ecr(2, 100, retransmitted=True), 10.9)) == BLACKLISTED
    assert Message(peer.receive(ecr(3, 100, retransmitted=True), 11.1)).value(
        "Result-Code") == 5012


def test_at_most_max_entries_answers_are_kept_the_oldest_go_first():
    kept = cache(entries=3)
    peer = open_with(kept)
    for end_to_end in range(100, 105):
        peer.receive(ecr(end_to_end, end_to_end), 1.0)
    peer.applications[APPLICATION_S13].check.rule_set = BrokenRules()
    assert status(peer.receive(ecr(9, 104, retransmitted=True), 2.0)) == BLACKLISTED
    assert len(kept) == 3
    assert Message(peer.receive(ecr(9, 101, retransmitted=True), 2.0)).value(
        "Result-Code") == 5012


def keys(number: int) -> tuple[bytes, bytes]:
    return request_keys(b"mme\0", b"mme", ecr(1, number))


def test_entries_stay_within_both_budgets_whatever_the_answer_sizes():
    bounded = cache(entries=1000, max_bytes=200_000)
    for n in range(20 * EXPIRY_BATCH + 7):
        answer = bytes(160 if n % 3 else 60_000)  # small verdicts, and large echoes
        bounded.store(*keys(n), answer, n / 1000)
        assert len(bounded) <= 1000 and bounded.bytes <= 200_000
    # What is counted is what is kept: each entry's answer, identity and digest, and a
    # fixed overhead.
    assert bounded.bytes == sum(ENTRY_OVERHEAD_BYTES + len(identity) + len(entry)
                                for identity, entry in bounded._entries.items())
    by_time = cache(window=1.0, entries=10**6)  # a window of 1 s, one store per 0.01 s
    for n in range(20 * EXPIRY_BATCH):
        by_time.store(*keys(n), bytes(160), n / 100)
        assert len(by_time) <= 100 + EXPIRY_BATCH


def test_the_byte_count_matches_what_the_process_allocates():
    import tracemalloc

    answers = [bytes([n]) * 300 for n in range(256)]  # kept elsewhere: not the cache's
    measured = cache(window=1e9, entries=10**6)
    stores = [keys(n) for n in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, (identity, digest) in enumerate(stores):
            measured.store(identity, digest, answers[n % 256], float(n))
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The identities were allocated before (by request_keys): counted, but not traced.
    # The count is an upper bound, and a close one.
    print(f"\n{measured.bytes / 20_000:.0f} bytes counted, {allocated / 20_000:.0f} "
          "allocated per entry of a 300-byte answer (beside its identity)")
    assert allocated <= measured.bytes <= 1.3 * allocated


def test_an_answer_larger_than_the_whole_budget_is_not_stored():
    small = cache(max_bytes=10_000)
    small.store(*keys(1), bytes(20_000), 0.0)
    assert len(small) == 0 and small.bytes == 0


def test_a_different_request_under_the_same_ids_is_answered_anew_and_counted():
    kept = cache()
    peer = open_with(kept)
    assert status(peer.receive(ecr(1, 100, imei=IMEI), 1.0)) == BLACKLISTED
    other = peer.receive(ecr(2, 100, retransmitted=True, imei="35332106470089"), 2.0)
    assert status(other) == 2  # greylisted: its own verdict, not the blacklisted one
    assert (kept.hits, kept.misses, kept.mismatches) == (0, 0, 1)
    assert "T-flag request with end-to-end id 0x00000064 differs from the request " \
        "answered under that id: answered anew" in event_text(peer)
    # The original's own retransmission still gets the first answer.
    assert status(peer.receive(ecr(3, 100, retransmitted=True), 3.0)) == BLACKLISTED
    assert kept.hits == 1


def test_the_same_request_from_a_peer_with_another_cer_identity_is_answered_anew():
    shared = cache()
    mme, relay = open_with(shared), open_with(shared, peer_host="dra.test")
    mme.receive(ecr(1, 100), 1.0)
    relay.applications[APPLICATION_S13].check.rule_set = BrokenRules()
    again = relay.receive(ecr(2, 100, retransmitted=True), 2.0)
    assert Message(again).value("Result-Code") == 5012  # asked anew
    assert (shared.hits, shared.misses) == (0, 1)


def test_only_the_t_flag_and_the_hop_by_hop_id_may_differ():
    def keys_of(message: bytes, peer: bytes = b"mme.test\0") -> tuple[bytes, bytes]:
        return request_keys(peer, b"mme.test", message)

    identity, digest = keys_of(ecr(1, 100))
    assert keys_of(ecr(7, 100, retransmitted=True)) == (identity, digest)
    other_imei = keys_of(ecr(1, 100, imei="35332106470089"))
    assert other_imei[0] == identity and other_imei[1] != digest
    assert keys_of(ecr(1, 101))[0] != identity  # another End-to-End id
    assert keys_of(ecr(1, 100), peer=b"dra.test\0")[0] != identity  # another CER peer
    command = bytearray(ecr(1, 100))
    command[7] ^= 1  # another command code, the same AVPs
    assert keys_of(bytes(command))[0] != identity


def test_error_answers_are_not_stored_they_are_recomputed():
    kept = cache()
    peer = open_with(kept)
    first = peer.receive(ecr(1, 100, imei="3520990017614A"), 1.0)
    assert Message(first).value("Result-Code") == 5004
    assert len(kept) == 0
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
