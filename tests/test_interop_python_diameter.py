"""python-diameter (PyPI `diameter`, message objects only) plays the MME against a real
`eir serve` over TCP: CER/CEA, ECR/ECA for every verdict of config/lists/example.csv, DWR/DWA,
DPR/DPA, pipelining and IPv6. Requests are encoded and answers decoded by python-diameter."""

from __future__ import annotations

import socket

import pytest
from diameter.message import Message
from diameter.message.commands import (CapabilitiesExchangeAnswer, DeviceWatchdogAnswer,
                                       DeviceWatchdogRequest, DisconnectPeerAnswer,
                                       DisconnectPeerRequest, MeIdentityCheckAnswer,
                                       MeIdentityCheckRequest)

from helpers_pydiameter import (S13, S13_VSAI, TGPP, build_cer, build_ecr, exchange,
                                read_answer)
from helpers_wire import assert_closed_by_server

WHITELISTED, BLACKLISTED, GREYLISTED = 0, 1, 2
EXPERIMENTAL_EQUIPMENT_UNKNOWN = 5422
REGISTERED_IMSI = "001010123456789"  # paired with 49015420323751 in example.csv
OTHER_IMSI = "001019999999999"
MME_HOST, MME_REALM = b"mme.test", b"test"

# Verdicts from config/lists/example.csv: (14-digit IMEI, IMSI, expected Equipment-Status or
# None for Experimental-Result 5422).
VERDICTS = {
    "blacklisted": ("35209900176148", REGISTERED_IMSI, BLACKLISTED),
    "greylisted": ("35332106470089", REGISTERED_IMSI, GREYLISTED),
    "whitelisted_by_range": ("35000000001234", REGISTERED_IMSI, WHITELISTED),
    "whitelisted_by_imei_imsi_pair": ("49015420323751", REGISTERED_IMSI, WHITELISTED),
    "blacklisted_same_imei_other_imsi": ("49015420323751", OTHER_IMSI, BLACKLISTED),
    "tac_blacklist": ("86000000123456", REGISTERED_IMSI, BLACKLISTED),
    "unknown": ("99000000000017", REGISTERED_IMSI, None),
}


def luhn_digit(imei14: str) -> str:
    total = 0
    for index, char in enumerate(imei14):
        digit = int(char) * (2 if index % 2 else 1)
        total += digit - 9 if digit > 9 else digit
    return str((10 - total % 10) % 10)


def imei_forms(imei14: str) -> dict[str, str]:
    """The ways an MME may send one IMEI: every form must get the 14-digit key's verdict."""
    right = luhn_digit(imei14)
    wrong = next(d for d in "123456789" if d != right)
    return {"14 digits": imei14, "15 digits, spare 0": imei14 + "0",
            "15 digits, wrong Luhn digit": imei14 + wrong, "16 digits (IMEISV)": imei14 + "23"}


# -- python-diameter message builders --------------------------------------------------------

def mme_cer(host_ip: str = "127.0.0.1") -> bytes:
    return build_cer(MME_HOST, MME_REALM, host_ip=host_ip)


def numbered_ecr(imei: str, imsi: str, number: int) -> MeIdentityCheckRequest:
    """Request `number` of a connection: its own Session-Id, hop-by-hop and end-to-end ids."""
    return build_ecr(imei, imsi, f"mme.test;1234;{number}", hop_by_hop=0x10000 + number,
                     end_to_end=0x7000000 + number, origin_host=MME_HOST,
                     origin_realm=MME_REALM)


def build_base_request(request_class, **avps) -> bytes:
    request = request_class()
    request.header.hop_by_hop_identifier = request.header.end_to_end_identifier = 77
    request.origin_host, request.origin_realm = MME_HOST, MME_REALM
    for name, value in avps.items():
        setattr(request, name, value)
    return request.as_bytes()


def open_mme(address: tuple[str, int], host_ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(address, timeout=5)
    cea = exchange(sock, mme_cer(host_ip))
    assert isinstance(cea, CapabilitiesExchangeAnswer)
    assert cea.result_code == 2001
    return sock


def assert_eca_for(request: MeIdentityCheckRequest, answer: Message,
                   status: int | None) -> None:
    """The ECA envelope TS 29.272 §5.2.4.1 asks for, and the verdict."""
    assert isinstance(answer, MeIdentityCheckAnswer)
    assert not answer.header.is_request and not answer.header.is_error
    assert answer.header.application_id == S13
    assert answer.header.hop_by_hop_identifier == request.header.hop_by_hop_identifier
    assert answer.header.end_to_end_identifier == request.header.end_to_end_identifier
    assert answer.session_id == request.session_id
    assert answer.auth_session_state == 1
    assert (answer.origin_host, answer.origin_realm) == (b"eir.localdomain", b"localdomain")
    assert answer.vendor_specific_application_id == S13_VSAI
    if status is None:
        assert answer.result_code is None
        assert answer.equipment_status is None
        assert answer.experimental_result.vendor_id == TGPP
        assert (answer.experimental_result.experimental_result_code
                == EXPERIMENTAL_EQUIPMENT_UNKNOWN)
    else:
        assert answer.experimental_result is None
        assert answer.result_code == 2001
        assert answer.equipment_status == status


# -- tests ---------------------------------------------------------------------------------

def test_cea_carries_every_capability(eir_server):
    server = eir_server()
    with socket.create_connection(server.address, timeout=5) as sock:
        cea = exchange(sock, mme_cer())
    assert isinstance(cea, CapabilitiesExchangeAnswer)
    assert not cea.header.is_request and not cea.header.is_error
    assert cea.header.hop_by_hop_identifier == cea.header.end_to_end_identifier == 1
    assert cea.result_code == 2001
    assert (cea.origin_host, cea.origin_realm) == (b"eir.localdomain", b"localdomain")
    assert cea.host_ip_address == [(1, "127.0.0.1")]
    assert cea.vendor_id == 0
    assert cea.product_name == "open EIR"
    assert isinstance(cea.firmware_revision, int)
    assert isinstance(cea.origin_state_id, int) and cea.origin_state_id > 0
    assert TGPP in cea.supported_vendor_id
    assert S13_VSAI in cea.vendor_specific_application_id
    assert S13 in cea.auth_application_id


@pytest.mark.parametrize("verdict", VERDICTS)
def test_eca_verdict_for_every_imei_form(eir_server, verdict):
    imei14, imsi, status = VERDICTS[verdict]
    server = eir_server()
    with open_mme(server.address) as sock:
        for number, (form, imei) in enumerate(imei_forms(imei14).items()):
            request = numbered_ecr(imei, imsi, number)
            answer = exchange(sock, request.as_bytes())
            try:
                assert_eca_for(request, answer, status)
            except AssertionError as exc:
                raise AssertionError(f"{verdict}, IMEI {imei} ({form}): {exc}") from exc


@pytest.mark.parametrize("policy, status", [
    ("whitelisted", WHITELISTED), ("greylisted", GREYLISTED), ("blacklisted", BLACKLISTED)])
def test_unknown_policy_flag_changes_the_unknown_answer(eir_server, policy, status):
    server = eir_server("--unknown", policy)
    imei14, imsi, _ = VERDICTS["unknown"]
    with open_mme(server.address) as sock:
        request = numbered_ecr(imei14, imsi, 1)
        assert_eca_for(request, exchange(sock, request.as_bytes()), status)
        # A listed IMEI keeps its own verdict.
        request = numbered_ecr(VERDICTS["greylisted"][0], imsi, 2)
        assert_eca_for(request, exchange(sock, request.as_bytes()), GREYLISTED)


def test_dwr_gets_dwa(eir_server):
    server = eir_server()
    with open_mme(server.address) as sock:
        dwa = exchange(sock, build_base_request(DeviceWatchdogRequest))
    assert isinstance(dwa, DeviceWatchdogAnswer)
    assert not dwa.header.is_request
    assert dwa.header.hop_by_hop_identifier == dwa.header.end_to_end_identifier == 77
    assert dwa.result_code == 2001
    assert dwa.origin_host == b"eir.localdomain"


def test_dpr_gets_dpa_then_server_closes(eir_server):
    server = eir_server()
    with open_mme(server.address) as sock:
        dpa = exchange(sock, build_base_request(DisconnectPeerRequest, disconnect_cause=0))
        assert isinstance(dpa, DisconnectPeerAnswer)
        assert not dpa.header.is_request
        assert dpa.header.hop_by_hop_identifier == 77
        assert dpa.result_code == 2001
        assert assert_closed_by_server(sock) == b""
    server.wait_for_log(r"mme\.test: peer sent DPR")


def test_500_pipelined_ecrs_in_one_write_are_answered_in_order(eir_server):
    server = eir_server()
    rows = list(VERDICTS.values())
    requests = [numbered_ecr(*rows[n % len(rows)][:2], n) for n in range(500)]
    with open_mme(server.address) as sock:
        sock.sendall(b"".join(request.as_bytes() for request in requests))
        for number, request in enumerate(requests):
            answer = read_answer(sock, timeout=10)
            assert_eca_for(request, answer, rows[number % len(rows)][2])


def test_cer_and_ecr_over_ipv6_loopback(eir_server):
    server = eir_server(host="::1")
    assert server.host == "::1"
    with socket.create_connection(server.address, timeout=5) as sock:
        assert sock.family == socket.AF_INET6
        cea = exchange(sock, mme_cer(host_ip="::1"))
        assert cea.result_code == 2001
        assert cea.host_ip_address == [(2, "::1")]
        imei14, imsi, status = VERDICTS["blacklisted"]
        request = numbered_ecr(imei14 + "0", imsi, 1)
        assert_eca_for(request, exchange(sock, request.as_bytes()), status)
