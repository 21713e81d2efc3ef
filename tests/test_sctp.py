"""SCTP transport (RFC 6733 §2.1): CER/CEA and an ECR over SCTP where the kernel has it, and a
clear refusal where it does not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from eir.serve.server import sctp_unavailable_reason
from helpers_pydiameter import S13, build_cer, build_ecr, exchange

TIMEOUT = 10.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCTP_MISSING = sctp_unavailable_reason()
BLACKLISTED_IMEI = "35209900176148"  # config/lists/example.csv: reported stolen


@pytest.mark.skipif(SCTP_MISSING is not None, reason=str(SCTP_MISSING))
def test_cer_and_ecr_over_sctp(eir_server):
    server = eir_server("--transport", "sctp")
    server.wait_for_log(r"listening on sctp 127\.0\.0\.1:\d+$")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                       getattr(socket, "IPPROTO_SCTP", 132)) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(server.address)
        cea = exchange(sock, build_cer(product_name="sctp-test"), TIMEOUT)
        assert (cea.header.command_code, cea.header.is_request) == (257, False)
        assert cea.result_code == 2001
        server.wait_for_log(r"peer mme\.localdomain \(realm localdomain\) is open")
        ecr = build_ecr(BLACKLISTED_IMEI, "001010123456789", "mme.localdomain;sctp;1", 2)
        eca = exchange(sock, ecr.as_bytes(), TIMEOUT)
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
