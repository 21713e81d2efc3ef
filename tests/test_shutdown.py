"""SIGTERM to `eir serve`: DPR to every open peer (RFC 6733 §5.4), then a clean exit, whether
or not the peer answers. The peer is a plain socket speaking scapy-encoded Diameter."""

from __future__ import annotations

import signal
import time

from scapy.all import raw
from scapy.contrib.diameter import AVP, DiamG

from helpers_wire import (FLAG_REQUEST, assert_closed_by_server, open_peer, origin_avps,
                          parse_answer, read_message)

DISCONNECT_PEER = 282
DISCONNECT_CAUSE = 273
DISCONNECT_TIMEOUT = 1.0
EXIT_MARGIN = 3.0  # process start-up of the asyncio shutdown, log flushing, interpreter exit


def start_with_short_disconnect_timeout(eir_server, tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text(f"diameter:\n  disconnect_timeout_seconds: {DISCONNECT_TIMEOUT}\n")
    return eir_server("--config", str(config))


def receive_dpr(sock):
    """Read the server's DPR and check it is one, with a Disconnect-Cause."""
    dpr = parse_answer(read_message(sock))
    assert dpr.is_request, dpr
    assert (dpr.code, dpr.application) == (DISCONNECT_PEER, 0)
    assert len(dpr.all(DISCONNECT_CAUSE)) == 1, dpr
    return dpr


def dpa(dpr) -> bytes:
    return raw(DiamG(drFlags=dpr.flags & ~FLAG_REQUEST, drCode=DISCONNECT_PEER, drAppId=0,
                     drHbHId=dpr.hop_by_hop, drEtEId=dpr.end_to_end,
                     avpList=[AVP("Result-Code", val=2001)] + origin_avps()))


def wait_exit(server, timeout: float) -> int:
    return server.process.wait(timeout)


def test_sigterm_sends_dpr_and_exits_0_after_dpa(eir_server, tmp_path):
    server = start_with_short_disconnect_timeout(eir_server, tmp_path)
    with open_peer(server.address) as sock:
        server.process.send_signal(signal.SIGTERM)
        dpr = receive_dpr(sock)
        sock.sendall(dpa(dpr))
        assert assert_closed_by_server(sock) == b""
    assert wait_exit(server, DISCONNECT_TIMEOUT + EXIT_MARGIN) == 0
    server.wait_for_log(r"sending DPR \(\w+\) to mme\.test")
    server.wait_for_log(r"mme\.test: DPA received")
    server.wait_for_log(r"eir\.server: stopped$")


def test_sigterm_exits_0_within_disconnect_timeout_when_peer_never_answers(
        eir_server, tmp_path):
    server = start_with_short_disconnect_timeout(eir_server, tmp_path)
    with open_peer(server.address) as sock:
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        receive_dpr(sock)  # and never answer it
        assert wait_exit(server, DISCONNECT_TIMEOUT + EXIT_MARGIN) == 0
        elapsed = time.monotonic() - signalled
        assert assert_closed_by_server(sock) == b""
    assert elapsed >= DISCONNECT_TIMEOUT * 0.9, f"exited after {elapsed:.2f}s without waiting"
    server.wait_for_log(r"mme\.test: no DPA within the disconnect timeout")
    server.wait_for_log(r"eir\.server: stopped$")


def test_sigterm_without_peers_exits_0(eir_server):
    """SIGTERM as soon as the server says it listens. The window between that log line and
    the signal handlers being installed is a race, so the start is repeated (bounded)."""
    for attempt in range(10):
        server = eir_server()
        server.process.send_signal(signal.SIGTERM)
        code = wait_exit(server, EXIT_MARGIN)
        assert code == 0, f"attempt {attempt}: exit code {code}; log:\n{server.log()}"
        server.wait_for_log(r"shutting down: 0 connection")
        server.wait_for_log(r"eir\.server: stopped$")


def test_sigterm_is_named_and_the_supervisor_counts_its_workers_connections(eir_server,
                                                                             tmp_path):
    """With workers, the connections are the workers': the supervisor's shutdown line
    reports them (not its own 0), and says which signal it got."""
    config = tmp_path / "eir.yaml"
    config.write_text(f"diameter:\n  disconnect_timeout_seconds: {DISCONNECT_TIMEOUT}\n")
    server = eir_server("--config", str(config), "--workers", "2")
    with open_peer(server.address) as first, open_peer(server.address) as second:
        server.process.send_signal(signal.SIGTERM)
        for sock in (first, second):
            sock.sendall(dpa(receive_dpr(sock)))
    assert wait_exit(server, DISCONNECT_TIMEOUT + EXIT_MARGIN) == 0
    server.wait_for_log(r"eir\.server: SIGTERM received: stopping$")
    server.wait_for_log(r"eir\.server: shutting down: 2 connection\(s\) held by the workers$")
