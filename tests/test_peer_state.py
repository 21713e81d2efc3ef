"""The PeerConnection state machine, without sockets: bytes and a fake clock (floats) in,
bytes and state out. Timers(watchdog_jitter=0) makes every deadline exact."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from eir.check.service import EquipmentCheck
from eir.core.decision import UnknownPolicy
from eir.diameter.codec import Avp, Framer, decode_avps, encode_message, parse_header
from eir.diameter.constants import (APPLICATION_COMMON, APPLICATION_RELAY, APPLICATION_S13,
                                    FLAG_ERROR, FLAG_PROXIABLE, FLAG_REQUEST, VENDOR_3GPP)
from eir.diameter.dictionary import Dictionary
from eir.diameter.peer import (ANSWERED_DUPLICATE, ANSWERED_ERROR, LocalIdentity,
                               PeerConnection, PeerState, Timers)
from eir.lists.native import load_rule_set
from eir.interfaces.s13 import S13Application

ROOT = Path(__file__).resolve().parent.parent
D = Dictionary.load()
E = D.encode
LOCAL = LocalIdentity("eir.test", "test.realm", product_name="open EIR test",
                      firmware_revision=7, origin_state_id=42)
RULE_SET = load_rule_set([ROOT / "config" / "lists" / "example.csv"], UnknownPolicy.UNKNOWN)
TW = 30.0
CER_TIMEOUT = 10.0
DPA_TIMEOUT = 3.0
CER, DWR, DPR, ECR = 257, 280, 282, 324


class Message:
    """A decoded message: header, and AVPs by name (top level) for asserting on."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.header = parse_header(raw)
        assert self.header.length == len(raw)
        self.avps = decode_avps(raw, 20, len(raw))

    def all(self, name: str) -> list[Avp]:
        definition = D[name]
        return [a for a in self.avps if (a.code, a.vendor) == (definition.code,
                                                                definition.vendor)]

    def value(self, name: str):
        [avp] = self.all(name)
        return D[name].decode(avp.data)

    def validate(self) -> None:
        """Check against the command's grammar in the dictionary (answer or request)."""
        command = D.command(self.header.application, self.header.code)
        grammar = command.request if self.header.is_request else command.answer
        D.validate(self.avps, grammar)


def one_message(raw: bytes) -> Message:
    framer = Framer()
    [message] = framer.feed(raw)
    assert framer.buffered == 0
    return Message(message)


def request(code: int, body: bytes, application: int = APPLICATION_COMMON,
            flags: int = FLAG_REQUEST, hop_by_hop: int = 0x1234) -> bytes:
    return encode_message(flags, code, application, hop_by_hop, 0x5678, body)


def answer_to(raw: bytes, result: int = 2001) -> bytes:
    """The peer's answer to one of our requests (DWA, DPA)."""
    header = parse_header(raw)
    body = E("Result-Code", result) + E("Origin-Host", "mme.test") + E("Origin-Realm", "test")
    return encode_message(0, header.code, header.application, header.hop_by_hop,
                          header.end_to_end, body)


PEER_ORIGIN = E("Origin-Host", "mme.test") + E("Origin-Realm", "test")


def cer(*auth_apps: int, extra: bytes = b"") -> bytes:
    body = (PEER_ORIGIN + E("Host-IP-Address", "192.0.2.1") + E("Vendor-Id", 0)
            + E("Product-Name", "test MME")
            + b"".join(E("Auth-Application-Id", app) for app in auth_apps) + extra)
    return request(CER, body)


def dwr() -> bytes:
    return request(DWR, PEER_ORIGIN)


def dpr() -> bytes:
    return request(DPR, PEER_ORIGIN + E("Disconnect-Cause", "DO_NOT_WANT_TO_TALK_TO_YOU"))


def ecr(imei: str = "35209900176148") -> bytes:
    body = (E("Session-Id", "mme.test;1") + E("Auth-Session-State", 1) + PEER_ORIGIN
            + E("Destination-Realm", "test.realm")
            + E("Terminal-Information", [E("IMEI", imei)]))
    return request(ECR, body, APPLICATION_S13, FLAG_REQUEST | FLAG_PROXIABLE)


def new_peer(now: float = 0.0) -> PeerConnection:
    application = S13Application(D, LOCAL, EquipmentCheck(RULE_SET))
    timers = Timers(watchdog=TW, watchdog_jitter=0, cer_timeout=CER_TIMEOUT,
                    disconnect_timeout=DPA_TIMEOUT)
    return PeerConnection(D, LOCAL, {APPLICATION_S13: application}, now=now,
                          local_addresses=("127.0.0.1",), timers=timers)


def open_peer(now: float = 0.0) -> PeerConnection:
    peer = new_peer(now)
    cea = one_message(peer.receive(cer(APPLICATION_S13), now))
    assert cea.value("Result-Code") == 2001
    assert peer.state is PeerState.OPEN
    return peer


def event_text(peer: PeerConnection) -> str:
    return "\n".join(text for _, text in peer.events)


# -- capabilities exchange -----------------------------------------------------------------

def test_cer_gets_cea_2001_with_every_capability():
    peer = new_peer()
    cea = one_message(peer.receive(cer(APPLICATION_S13), 0.0))
    assert (cea.header.code, cea.header.application, cea.header.flags) == (CER, 0, 0)
    assert (cea.header.hop_by_hop, cea.header.end_to_end) == (0x1234, 0x5678)
    assert cea.value("Result-Code") == 2001
    assert cea.value("Origin-Host") == "eir.test"
    assert cea.value("Origin-Realm") == "test.realm"
    assert cea.value("Host-IP-Address") == ipaddress.ip_address("127.0.0.1")
    assert cea.value("Vendor-Id") == 0
    assert cea.value("Product-Name") == "open EIR test"
    assert cea.value("Firmware-Revision") == 7
    assert cea.value("Origin-State-Id") == 42
    assert cea.value("Supported-Vendor-Id") == VENDOR_3GPP
    assert cea.value("Auth-Application-Id") == APPLICATION_S13
    [group] = cea.all("Vendor-Specific-Application-Id")
    children = {(a.code, a.vendor): a.data for a in decode_avps(group.data, 0, len(group.data))}
    assert children == {(266, 0): VENDOR_3GPP.to_bytes(4, "big"),
                        (258, 0): APPLICATION_S13.to_bytes(4, "big")}
    cea.validate()
    assert peer.state is PeerState.OPEN and peer.peer_host == "mme.test"
    assert "peer mme.test (realm test) is open" in event_text(peer)


def test_cea_host_ip_addresses_come_from_local_identity_when_configured():
    local = LocalIdentity("eir.test", "test.realm", host_ip_addresses=("192.0.2.7", "::1"))
    peer = PeerConnection(D, local, {APPLICATION_S13: S13Application(D, local, EquipmentCheck(RULE_SET))},
                          now=0.0, local_addresses=("127.0.0.1",))
    cea = one_message(peer.receive(cer(APPLICATION_S13), 0.0))
    assert [D["Host-IP-Address"].decode(a.data) for a in cea.all("Host-IP-Address")] == [
        ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("::1")]


def test_cer_offering_s13_only_inside_vendor_specific_application_id_is_accepted():
    group = E("Vendor-Specific-Application-Id", [E("Vendor-Id", VENDOR_3GPP),
                                                 E("Auth-Application-Id", APPLICATION_S13)])
    peer = new_peer()
    assert one_message(peer.receive(cer(extra=group), 0.0)).value("Result-Code") == 2001
    assert peer.state is PeerState.OPEN


def test_cer_offering_only_another_application_gets_5010_and_closes():
    peer = new_peer()
    cea = one_message(peer.receive(cer(4), 0.0))  # 4: Diameter Credit Control
    assert cea.value("Result-Code") == 5010
    assert not cea.header.flags & FLAG_ERROR
    cea.validate()
    assert peer.closed
    assert "5010" in event_text(peer)


def test_cer_offering_relay_shares_every_application():
    peer = new_peer()
    assert one_message(peer.receive(cer(APPLICATION_RELAY), 0.0)).value("Result-Code") == 2001
    assert peer.state is PeerState.OPEN


def test_cer_missing_a_required_avp_gets_5005_cea_and_closes():
    body = PEER_ORIGIN + E("Vendor-Id", 0) + E("Product-Name", "x") + E(
        "Auth-Application-Id", APPLICATION_S13)  # no Host-IP-Address
    peer = new_peer()
    cea = one_message(peer.receive(request(CER, body), 0.0))
    assert cea.value("Result-Code") == 5005
    [failed] = cea.all("Failed-AVP")
    assert decode_avps(failed.data, 0, len(failed.data))[0].code == 257
    assert peer.closed


@pytest.mark.parametrize("first", [dwr, ecr, dpr], ids=["DWR", "ECR", "DPR"])
def test_request_before_cer_closes_without_answer(first):
    peer = new_peer()
    assert peer.receive(first(), 0.0) == b""
    assert peer.closed
    assert "before CER" in peer.closed_reason


def test_answer_before_cer_closes():
    peer = new_peer()
    assert peer.receive(answer_to(dwr()), 0.0) == b""
    assert peer.closed


def test_ecr_after_cer_is_answered_by_the_application():
    peer = open_peer()
    eca = one_message(peer.receive(ecr(), 1.0))
    assert (eca.header.code, eca.header.application) == (ECR, APPLICATION_S13)
    assert eca.value("Equipment-Status") == 1  # blacklisted in the example list


# -- watchdog and disconnect from the peer -------------------------------------------------

def test_dwr_gets_dwa():
    peer = open_peer()
    dwa = one_message(peer.receive(dwr(), 5.0))
    assert (dwa.header.code, dwa.header.flags, dwa.header.hop_by_hop) == (DWR, 0, 0x1234)
    assert dwa.value("Result-Code") == 2001
    assert dwa.value("Origin-Host") == "eir.test"
    assert dwa.value("Origin-State-Id") == 42
    dwa.validate()
    assert peer.state is PeerState.OPEN


def test_peer_dpr_gets_dpa_and_closes():
    peer = open_peer()
    dpa = one_message(peer.receive(dpr(), 5.0))
    assert (dpa.header.code, dpa.header.flags, dpa.header.hop_by_hop) == (DPR, 0, 0x1234)
    assert dpa.value("Result-Code") == 2001
    dpa.validate()
    assert peer.closed
    assert "DPR" in peer.closed_reason
    assert "Disconnect-Cause DO_NOT_WANT_TO_TALK_TO_YOU (2)" in peer.closed_reason


def test_closed_connection_ignores_further_input():
    peer = open_peer()
    peer.receive(dpr(), 1.0)
    assert peer.receive(dwr(), 2.0) == b""
    assert peer.on_timer(1000.0) == b""
    assert peer.next_deadline() is None


def test_cer_dwr_and_ecr_pipelined_in_one_read_are_all_answered_in_order():
    peer = new_peer()
    out = peer.receive(cer(APPLICATION_S13) + dwr() + ecr(), 0.0)
    framer = Framer()
    assert [parse_header(m).code for m in framer.feed(out)] == [CER, DWR, ECR]


# -- our watchdog (RFC 3539) ---------------------------------------------------------------

def send_our_dwr(peer: PeerConnection, at: float) -> Message:
    assert peer.on_timer(at - 0.001) == b""
    message = one_message(peer.on_timer(at))
    assert (message.header.code, message.header.application) == (DWR, 0)
    assert message.header.is_request and not message.header.flags & FLAG_PROXIABLE
    message.validate()
    return message


def test_idle_for_tw_sends_dwr():
    peer = open_peer()
    assert peer.next_deadline() == TW
    dwr_sent = send_our_dwr(peer, TW)
    assert dwr_sent.value("Origin-Host") == "eir.test"
    assert peer.state is PeerState.OPEN


def test_unanswered_dwr_closes_after_another_tw():
    peer = open_peer()
    send_our_dwr(peer, TW)
    assert peer.next_deadline() == 2 * TW
    assert peer.on_timer(2 * TW - 0.001) == b""
    assert peer.state is PeerState.OPEN
    assert peer.on_timer(2 * TW) == b""
    assert peer.closed and "watchdog" in peer.closed_reason


def test_dwa_in_time_keeps_the_connection_open_and_rearms_the_watchdog():
    peer = open_peer()
    our_dwr = send_our_dwr(peer, TW)
    assert peer.receive(answer_to(our_dwr.raw), TW + 5) == b""
    peer.on_timer(2 * TW)
    assert peer.state is PeerState.OPEN
    assert peer.next_deadline() == TW + 5 + TW
    send_our_dwr(peer, TW + 5 + TW)  # idle again for Tw after the DWA: the next DWR


@pytest.mark.parametrize("message", [dwr, ecr], ids=["DWR", "ECR"])
def test_any_message_in_time_answers_for_the_dwa(message):
    peer = open_peer()
    send_our_dwr(peer, TW)
    assert peer.receive(message(), TW + 10) != b""
    peer.on_timer(2 * TW)
    assert peer.state is PeerState.OPEN


def test_traffic_postpones_the_watchdog():
    peer = open_peer()
    peer.receive(ecr(), 20.0)
    assert peer.on_timer(TW) == b""
    assert peer.next_deadline() == 20.0 + TW
    send_our_dwr(peer, 20.0 + TW)


def test_watchdog_interval_is_jittered_by_at_most_two_seconds():
    peer = PeerConnection(D, LOCAL, {}, now=0.0, timers=Timers(watchdog=TW))
    peer.receive(cer(APPLICATION_RELAY), 0.0)
    assert TW - 2 <= peer.next_deadline() <= TW + 2


# -- CER timeout ---------------------------------------------------------------------------

def test_no_cer_within_the_timeout_closes():
    peer = new_peer(now=100.0)
    assert peer.next_deadline() == 100.0 + CER_TIMEOUT
    assert peer.on_timer(100.0 + CER_TIMEOUT - 0.001) == b""
    assert peer.state is PeerState.WAIT_CER
    assert peer.on_timer(100.0 + CER_TIMEOUT) == b""
    assert peer.closed and "CER" in peer.closed_reason


def test_cer_in_time_stops_the_cer_timeout():
    peer = new_peer()
    peer.receive(cer(APPLICATION_S13), CER_TIMEOUT - 1)
    peer.on_timer(CER_TIMEOUT)
    assert peer.state is PeerState.OPEN


# -- our disconnect ------------------------------------------------------------------------

def start_disconnect(peer: PeerConnection, at: float) -> Message:
    message = one_message(peer.disconnect(at))
    assert (message.header.code, message.header.application) == (DPR, 0)
    assert message.header.is_request
    message.validate()
    assert message.value("Disconnect-Cause") == 0  # REBOOTING
    assert peer.state is PeerState.CLOSING
    return message


def test_disconnect_sends_dpr_and_dpa_closes():
    peer = open_peer()
    our_dpr = start_disconnect(peer, 50.0)
    assert "sending DPR (REBOOTING) to mme.test" in event_text(peer)
    assert peer.receive(answer_to(our_dpr.raw), 50.5) == b""
    assert peer.closed and peer.closed_reason == "DPA received"


def test_disconnect_closes_after_the_timeout_without_dpa():
    peer = open_peer()
    start_disconnect(peer, 50.0)
    assert peer.next_deadline() == 50.0 + DPA_TIMEOUT
    assert peer.on_timer(50.0 + DPA_TIMEOUT - 0.001) == b""
    assert peer.state is PeerState.CLOSING
    peer.on_timer(50.0 + DPA_TIMEOUT)
    assert peer.closed and "DPA" in peer.closed_reason


def test_while_closing_a_dwr_is_answered_but_an_ecr_is_not_taken():
    peer = open_peer()
    start_disconnect(peer, 50.0)
    assert one_message(peer.receive(dwr(), 50.1)).value("Result-Code") == 2001
    assert peer.receive(ecr(), 50.2) == b""
    assert peer.state is PeerState.CLOSING


def test_cer_while_closing_does_not_cancel_the_disconnect():
    peer = open_peer()
    our_dpr = start_disconnect(peer, 50.0)
    peer.receive(cer(APPLICATION_S13), 50.1)
    assert peer.state is PeerState.CLOSING
    peer.receive(answer_to(our_dpr.raw), 50.2)
    assert peer.closed


def test_disconnect_before_cer_just_closes():
    peer = new_peer()
    assert peer.disconnect(1.0) == b""
    assert peer.closed


def test_our_requests_use_distinct_hop_by_hop_ids():
    peer = open_peer()
    first = send_our_dwr(peer, TW)
    peer.receive(answer_to(first.raw), TW + 1)
    second = send_our_dwr(peer, 2 * TW + 1)
    dpr_sent = start_disconnect(peer, 2 * TW + 2)
    ids = {m.header.hop_by_hop for m in (first, second, dpr_sent)}
    assert len(ids) == 3
    assert len({m.header.end_to_end for m in (first, second, dpr_sent)}) == 3


def test_a_bug_in_the_application_answers_5012_and_keeps_the_connection():
    """A defect must cost one request, not the MME's link and everything in flight on it."""

    class BrokenRules:  # stands in for a defect anywhere below handle_request
        def decide(self, *args, **kwargs):
            raise RuntimeError("boom")

    peer = open_peer()
    application = peer.applications[APPLICATION_S13]
    working = application.check.rule_set
    application.check.rule_set = BrokenRules()
    answer = one_message(peer.receive(ecr(), 1.0))
    assert answer.value("Result-Code") == 5012
    assert peer.state is PeerState.OPEN
    assert "RuntimeError: boom" in event_text(peer)
    assert peer.answered[ANSWERED_ERROR] == 1 and sum(peer.answered.values()) == 1
    application.check.rule_set = working
    assert one_message(peer.receive(ecr(), 2.0)).value("Result-Code") == 2001


def test_answers_are_counted_per_connection_by_outcome():
    """PeerConnection.answered: what GET /v1/peers and the console show per MME."""
    peer, other = open_peer(), open_peer()
    assert one_message(peer.receive(ecr(), 1.0)).value("Equipment-Status") == 1
    assert one_message(peer.receive(ecr(), 1.1)).value("Equipment-Status") == 1
    # Whitelisted for the lab's range; in no list (5422); not an IMEI (5004).
    peer.receive(ecr("35000000000042"), 1.2)
    peer.receive(ecr("35123456789012"), 1.3)
    assert one_message(peer.receive(ecr("3512345678901x"), 1.4)).value("Result-Code") == 5004
    # An S13 request with the E bit set: a protocol error (3008), an error all the same.
    peer.receive(request(ECR, PEER_ORIGIN, APPLICATION_S13,
                         FLAG_REQUEST | FLAG_PROXIABLE | FLAG_ERROR), 1.5)
    peer.receive(dwr(), 1.6)  # base protocol: not an application answer
    assert peer.answered == {"BLACKLISTED": 2, "WHITELISTED": 1, "GREYLISTED": 0,
                             "UNKNOWN": 1, ANSWERED_ERROR: 2, ANSWERED_DUPLICATE: 0}
    assert not any(other.answered.values())
