"""Interoperability with a real Diameter peer: Debian's freeDiameterd as the MME side.

freeDiameterd connects to a real `eir serve`, exchanges CER/CEA, answers our watchdogs, and
both sides' orderly shutdowns (DPR/DPA) are checked from both logs. freeDiameterd runs with
-dd so that it logs every message it sends and receives (`SENT to` / `RCV from` lines).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess

import pytest

from helpers_process import LoggedProcess

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(shutil.which("freeDiameterd") is None,
                       reason="freeDiameterd is not installed (Debian package freediameterd)"),
]

TIMEOUT = 15.0  # freeDiameterd waits a random 0-4 s before its first connection attempt
OUR_WATCHDOG = "1"  # Tw of `eir serve`: we send a DWR after 1 s without traffic

OPEN = r"'STATE_WAITCEA'\t-> 'STATE_OPEN'\t'eir.localdomain'"
OUR_DWR_RECEIVED = r"RCV from 'eir.localdomain': .*0/280 f:R"
DWA_SENT = r"SENT to 'eir.localdomain': 'Device-Watchdog-Answer'0/280 "
PEER_OPEN_IN_OUR_LOG = r"peer mme\.localdomain \(realm localdomain\) is open"


def free_port() -> int:
    """A TCP port nobody listens on now (freeDiameterd binds its Port on 0.0.0.0)."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


def write_config(directory, eir_port: int) -> str:
    path = directory / "freediameter.conf"
    path.write_text(
        'Identity = "mme.localdomain";\n'
        'Realm = "localdomain";\n'
        f"Port = {free_port()};\n"
        "SecPort = 0;\n"
        "No_SCTP;\n"
        "No_IPv6;\n"
        # Tc: no reconnection within a test after our DPR. Tw: its minimum; our
        # 1 s watchdog keeps traffic flowing, so freeDiameterd has no reason to send DWRs.
        "TcTimer = 30;\n"
        "TwTimer = 6;\n"
        f'ConnectPeer = "eir.localdomain" {{ ConnectTo = "127.0.0.1"; Port = {eir_port}; '
        "No_TLS; No_SCTP; };\n")
    return str(path)


class FreeDiameter(LoggedProcess):
    """A freeDiameterd process; its stdout (and stderr) log is collected line by line."""

    def __init__(self, config: str):
        process = subprocess.Popen(
            ["freeDiameterd", "-dd", "-c", config], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
        super().__init__(process, process.stdout, "freeDiameterd")

    def wait_for(self, pattern: str, start: int = 0, timeout: float = TIMEOUT) -> int:
        """Index of the first log line from `start` on matching `pattern`; fail after timeout."""
        return self.wait_for_line(pattern, start, timeout)[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        return super().stop(sig, timeout)


@pytest.fixture
def open_pair(eir_server, tmp_path):
    """`eir serve` (1 s watchdog, debug log) and freeDiameterd connected to it, both open."""
    server = eir_server("--watchdog", OUR_WATCHDOG, "--log-level", "debug")
    peer = FreeDiameter(write_config(tmp_path, server.port))
    try:
        peer.wait_for(OPEN)
        server.wait_for_log(PEER_OPEN_IN_OUR_LOG)
        yield server, peer
    finally:
        peer.kill()


def test_freediameter_reaches_open_with_eir(open_pair):
    server, peer = open_pair
    # Its dump of our CEA: success, our identity, S13 as the common application.
    connected = peer.wait_for(r"Connected to 'eir\.localdomain' \(TCP")
    cea = peer.line(peer.wait_for(r"Capabilities-Exchange-Answer\(257\)", connected))
    for part in ("Result-Code(268)[-M]='DIAMETER_SUCCESS'",
                 'Origin-Host(264)[-M]="eir.localdomain"',
                 "Auth-Application-Id(258)[-M]=16777252"):
        assert part in cea, cea
    assert peer.wait_for(OPEN, connected) > connected


def test_freediameter_answers_our_watchdogs_and_peer_stays_open(open_pair):
    server, peer = open_pair
    opened = index = peer.wait_for(OPEN)
    for _ in range(2):  # two full watchdog cycles: our DWR in, its DWA out
        index = peer.wait_for(OUR_DWR_RECEIVED, index + 1)
        index = peer.wait_for(DWA_SENT, index + 1)
    server.wait_for_log(r"mme\.localdomain: DWA received")
    left_open = [line for line in peer.log().split("\n")[opened:] if "-> 'STATE_" in line
                 and "-> 'STATE_OPEN'" not in line]
    assert not left_open, peer.log()
    assert not re.search(r"watchdog: no answer|connection lost|closed the connection",
                         server.log()), server.log()
    assert peer.process.poll() is None and server.process.poll() is None


def test_eir_sigterm_sends_dpr_rebooting_to_freediameter(open_pair):
    server, peer = open_pair
    assert server.stop(signal.SIGTERM) == 0, server.log()
    index = peer.wait_for(r"Peer 'eir\.localdomain' sent a DPR with cause: REBOOTING")
    peer.wait_for(r"'STATE_OPEN'\t-> 'STATE_CLOSING'\t'eir\.localdomain'", index)
    peer.wait_for(r"SENT to 'eir\.localdomain': 'Disconnect-Peer-Answer'0/282 ", index)
    log = server.log()
    assert re.search(r"sending DPR \(REBOOTING\) to mme\.localdomain", log), log
    assert re.search(r"mme\.localdomain: DPA received", log), log


def test_freediameter_shutdown_sends_dpr_and_eir_answers_dpa(open_pair):
    server, peer = open_pair
    assert peer.stop(signal.SIGTERM) == 0, peer.log()
    sent = peer.wait_for(r"SENT to 'eir\.localdomain': 'Disconnect-Peer-Request'0/282 f:R")
    peer.wait_for(r"RCV from 'eir\.localdomain': .*0/282 f:---- ", sent)  # our DPA
    server.wait_for_log(
        r"mme\.localdomain: peer sent DPR \(Disconnect-Cause REBOOTING \(0\)\); DPA sent")
    # The peer leaving does not take us down; we still stop cleanly afterwards.
    assert server.process.poll() is None
    assert server.stop(signal.SIGTERM) == 0, server.log()
