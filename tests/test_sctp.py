"""SCTP transport (RFC 6733 §2.1): CER/CEA and an ECR over SCTP where the kernel has it, and a
clear refusal where it does not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from diameter.message import Message
from diameter.message.avp.grouped import TerminalInformation, VendorSpecificApplicationId
from diameter.message.commands import CapabilitiesExchangeRequest, MeIdentityCheckRequest

from eir.server import sctp_unavailable_reason

S13 = 16777252
TGPP = 10415
TIMEOUT = 10.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCTP_MISSING = sctp_unavailable_reason()
BLACKLISTED_IMEI = "35209900176148"  # config/lists/example.csv: reported stolen


def build_cer() -> bytes:
    cer = CapabilitiesExchangeRequest()
    cer.header.hop_by_hop_identifier = cer.header.end_to_end_identifier = 1
    cer.origin_host = b"mme.localdomain"
    cer.origin_realm = b"localdomain"
    cer.host_ip_address = "127.0.0.1"
    cer.vendor_id = 0
    cer.product_name = "sctp-test"
    cer.auth_application_id = S13
    cer.vendor_specific_application_id = VendorSpecificApplicationId(
        vendor_id=TGPP, auth_application_id=S13)
    cer.supported_vendor_id = TGPP
    return cer.as_bytes()


def build_ecr(imei: str) -> bytes:
    ecr = MeIdentityCheckRequest()
    ecr.header.application_id = S13
    ecr.header.hop_by_hop_identifier = ecr.header.end_to_end_identifier = 2
    ecr.session_id = "mme.localdomain;sctp;1"
    ecr.auth_session_state = 1  # NO_STATE_MAINTAINED
    ecr.origin_host = b"mme.localdomain"
    ecr.origin_realm = b"localdomain"
    ecr.destination_realm = b"localdomain"
    ecr.terminal_information = TerminalInformation(imei=imei, software_version="23")
    ecr.user_name = "001010123456789"
    return ecr.as_bytes()


def read_message(sock: socket.socket) -> Message:
    """One Diameter message: its 4-byte start gives the length of the rest."""
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            assert chunk, "connection closed mid-message"
            data += chunk
        return data
    start = exactly(4)
    return Message.from_bytes(start + exactly(int.from_bytes(start[1:4], "big") - 4))


@pytest.mark.skipif(SCTP_MISSING is not None, reason=str(SCTP_MISSING))
def test_cer_and_ecr_over_sctp(eir_server):
    server = eir_server("--transport", "sctp")
    server.wait_for_log(r"listening on sctp 127\.0\.0\.1:\d+$")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                       getattr(socket, "IPPROTO_SCTP", 132)) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(server.address)
        sock.sendall(build_cer())
        cea = read_message(sock)
        assert (cea.header.command_code, cea.header.is_request) == (257, False)
        assert cea.result_code == 2001
        server.wait_for_log(r"peer mme\.localdomain \(realm localdomain\) is open")
        sock.sendall(build_ecr(BLACKLISTED_IMEI))
        eca = read_message(sock)
    assert (eca.header.command_code, eca.header.application_id) == (324, S13)
    assert eca.header.hop_by_hop_identifier == 2
    assert eca.session_id == "mme.localdomain;sctp;1"
    assert eca.result_code == 2001
    assert eca.equipment_status == 1  # BLACKLISTED
    assert server.stop() == 0, server.log()


@pytest.mark.skipif(SCTP_MISSING is None,
                    reason="this kernel has SCTP, so the refusal cannot be observed")
def test_serve_over_sctp_without_kernel_sctp_exits_with_clear_message():
    result = subprocess.run(
        [sys.executable, "-m", "eir", "serve", "--listen", "127.0.0.1:0", "--transport", "sctp"],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
        env={key: value for key, value in os.environ.items() if key != "EIR_CONFIG"})
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "listening on" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("eir: ") and "SCTP" in last, result.stderr
    assert SCTP_MISSING in last, result.stderr
