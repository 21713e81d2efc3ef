"""Every error answer of RFC 6733 §7 the EIR gives, provoked by requests scapy encodes, over
a real TCP connection to `eir serve`; and message lengths that close only their connection."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from scapy.all import raw
from scapy.contrib.diameter import AVP, AVP_Unknown

from helpers_wire import (FLAG_ERROR, FLAG_PROXIABLE, FLAG_REQUEST, PEER_HOST, VENDOR_3GPP,
                          assert_closed_by_server, ecr, ecr_avps, open_peer, parse_answer,
                          read_message, terminal_information)

SESSION_ID = "mme.test;1;1"
UNKNOWN_MANDATORY_AVP = AVP_Unknown(avpCode=999999, avpFlags=0x40, val=b"\x00\x00\x00\x01\x02")
SHORT_AUTH_SESSION_STATE = AVP_Unknown(avpCode=277, avpFlags=0x40, val=b"\x00\x01")
SECOND_ORIGIN_HOST = AVP("Origin-Host", val="mme2.test")


def empty_instance(code: int, vendor: int = 0) -> bytes:
    """An AVP with a zero-length value: what §7.5 asks Failed-AVP to hold for 5005."""
    if vendor:
        return raw(AVP_Unknown(avpCode=code, avpFlags=0xC0, avpVnd=vendor, val=b""))
    return raw(AVP_Unknown(avpCode=code, avpFlags=0x40, val=b""))


def terminal_information_holding(child: bytes) -> bytes:
    """Terminal-Information (1401, V M, 3GPP) around the already encoded `child`."""
    return raw(AVP_Unknown(avpCode=1401, avpFlags=0xC0, avpVnd=VENDOR_3GPP, val=child))


@dataclass(frozen=True)
class ErrorCase:
    request: bytes
    result_code: int
    error_bit: bool
    failed_avp: bytes | None = None  # the Failed-AVP's contents, byte for byte; None: unchecked


CASES = {
    "3001 unknown command in S13": ErrorCase(ecr(code=8388600), 3001, True),
    "3007 unknown application": ErrorCase(ecr(application=4242), 3007, True),
    "3008 E bit set in a request": ErrorCase(
        ecr(flags=FLAG_REQUEST | FLAG_PROXIABLE | FLAG_ERROR), 3008, True),
    "3008 P bit missing on ECR": ErrorCase(ecr(flags=FLAG_REQUEST), 3008, True),
    "5001 unknown AVP with M bit": ErrorCase(
        ecr(avps=ecr_avps(extra=[UNKNOWN_MANDATORY_AVP])), 5001, False,
        raw(UNKNOWN_MANDATORY_AVP)),
    "5004 non-digit IMEI": ErrorCase(
        ecr(imei="3520990017614A"), 5004, False,
        raw(terminal_information("3520990017614A", None))),
    "5004 13-digit IMEI": ErrorCase(
        ecr(imei="3520990017614"), 5004, False,
        raw(terminal_information("3520990017614", None))),
    # User-Name carries the IMSI on S13: "²³" passes str.isdigit() but is no IMSI.
    "5004 IMSI of superscript digits": ErrorCase(
        ecr(imsi="\u00b2\u00b3\u00b2\u00b3\u00b2"), 5004, False,
        raw(AVP("User-Name", val="\u00b2\u00b3\u00b2\u00b3\u00b2"))),
    "5004 IMSI of 16 digits": ErrorCase(
        ecr(imsi="0010101234567890"), 5004, False, raw(AVP("User-Name", val="0010101234567890"))),
    "5005 missing Origin-Host": ErrorCase(
        ecr(avps=ecr_avps(replace={"Origin-Host": []})), 5005, False, empty_instance(264)),
    "5005 missing Terminal-Information": ErrorCase(
        ecr(avps=ecr_avps(replace={"Terminal-Information": []})), 5005, False,
        empty_instance(1401, VENDOR_3GPP)),
    "5005 Terminal-Information without IMEI": ErrorCase(
        ecr(imei=None), 5005, False,
        terminal_information_holding(empty_instance(1402, VENDOR_3GPP))),
    "5009 two Origin-Host": ErrorCase(
        ecr(avps=ecr_avps(replace={"Origin-Host": [AVP("Origin-Host", val=PEER_HOST),
                                                   SECOND_ORIGIN_HOST]})),
        5009, False, raw(SECOND_ORIGIN_HOST)),
    "5014 Auth-Session-State of 2 bytes": ErrorCase(
        ecr(avps=ecr_avps(replace={"Auth-Session-State": [SHORT_AUTH_SESSION_STATE]})),
        5014, False, raw(SHORT_AUTH_SESSION_STATE)),
    # §7.1.5: the offending AVP header with a zero-filled payload of minimum length (0 for
    # UTF8String): the 8-byte header of User-Name.
    "5014 AVP length overruns the message": ErrorCase(
        ecr(avps=ecr_avps(replace={"User-Name": [AVP_Unknown(
            avpCode=1, avpFlags=0x40, avpLen=200, val=b"001010123456789")]})),
        5014, False, empty_instance(1)),
}


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "eir.yaml"
    path.write_text(text)
    return str(path)


def assert_valid_ecr_still_answered(sock, hop_by_hop: int = 900) -> None:
    sock.sendall(ecr(hop_by_hop=hop_by_hop, end_to_end=hop_by_hop))
    answer = parse_answer(read_message(sock))
    assert answer.hop_by_hop == hop_by_hop
    assert (answer.result_code, answer.equipment_status) == (2001, 1)  # example.csv: stolen


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_error_answer_then_connection_still_works(eir_server, case: ErrorCase):
    server = eir_server()
    request = parse_answer(case.request)  # what scapy encoded, read back for the echo checks
    with open_peer(server.address) as sock:
        sock.sendall(case.request)
        answer = parse_answer(read_message(sock))
        assert not answer.is_request
        assert (answer.code, answer.application) == (request.code, request.application)
        assert (answer.hop_by_hop, answer.end_to_end) == (request.hop_by_hop,
                                                          request.end_to_end)
        assert answer.result_code == case.result_code
        assert answer.error_bit is case.error_bit
        assert answer.session_id == SESSION_ID
        assert answer.equipment_status is None
        if case.failed_avp is not None:
            assert [avp.raw for avp in answer.failed_avps] == [case.failed_avp]
        assert_valid_ecr_still_answered(sock)


def test_unknown_avp_without_m_bit_is_ignored(eir_server):
    server = eir_server()
    optional = AVP_Unknown(avpCode=999999, avpFlags=0x00, val=b"\x00\x00\x00\x01")
    with open_peer(server.address) as sock:
        sock.sendall(ecr(avps=ecr_avps(extra=[optional])))
        answer = parse_answer(read_message(sock))
    assert not answer.error_bit
    assert (answer.result_code, answer.equipment_status) == (2001, 1)
    assert answer.failed_avps == []


@pytest.mark.parametrize("declared", [12, 100000], ids=["shorter than a header",
                                                        "above max_message_bytes"])
def test_impossible_length_closes_only_that_connection(eir_server, tmp_path, declared):
    config = write_config(tmp_path, "diameter:\n  max_message_bytes: 4096\n")
    server = eir_server("--config", config)
    with open_peer(server.address) as bystander, open_peer(server.address) as offender:
        offender_port = offender.getsockname()[1]
        broken = bytearray(ecr())
        broken[1:4] = declared.to_bytes(3, "big")
        offender.sendall(bytes(broken))
        assert assert_closed_by_server(offender) == b""
        server.wait_for_log(rf":{offender_port}: .*closing connection.*\b{declared}\b")
        assert_valid_ecr_still_answered(bystander)


def test_proxy_info_is_echoed_in_order(eir_server):
    """RFC 6733 §6.7.2: an answer carries the request's Proxy-Info AVPs unchanged, in order,
    so relays between the MME and us can route it back."""
    proxies = [AVP("Proxy-Info", val=[AVP("Proxy-Host", val=f"dra{n}.test"),
                                      AVP("Proxy-State", val=f"state-{n}")]) for n in (1, 2)]
    request = ecr(avps=ecr_avps(extra=tuple(proxies)))
    server = eir_server()
    with open_peer(server.address) as sock:
        sock.sendall(request)
        answer = parse_answer(read_message(sock))
    assert answer.result_code == 2001
    assert [avp.raw for avp in answer.all(284)] == [raw(p) for p in proxies]
