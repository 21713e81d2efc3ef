"""Wireshark's Diameter dissector (tshark, Debian) reads our ECAs as we meant them.

A live loopback capture of a real `eir serve` answering CER and four ECRs (blacklisted,
greylisted, whitelisted, unknown IMEI) built with python-diameter — an encoder independent of
ours — is dissected by tshark; each ECA must carry the Result-Code / Equipment-Status (or the
Experimental-Result-Code 5422) we meant, with no malformed-packet or expert complaint.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time

import pytest

from helpers_pydiameter import build_cer, build_ecr, exchange

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed"),
]

TIMEOUT = 10.0

# (IMEI, IMSI) → what the ECA must say; verdicts from config/lists/example.csv.
CASES = {
    "blacklisted": ("35209900176148", "001010000000001", {"Result-Code": "2001",
                                                          "Equipment-Status": "1"}),
    "greylisted": ("35332106470089", "001010000000002", {"Result-Code": "2001",
                                                         "Equipment-Status": "2"}),
    "whitelisted": ("35000000000001", "001010000000003", {"Result-Code": "2001",
                                                          "Equipment-Status": "0"}),
    "unknown": ("12345678901234", "001010000000004", {"Experimental-Result-Code": "5422"}),
}
FIELDS = ["frame.number", "diameter.cmd.code", "diameter.flags.request",
          "diameter.hopbyhopid", "diameter.Result-Code", "diameter.Experimental-Result-Code",
          "diameter.Equipment-Status", "diameter.Session-Id", "_ws.malformed",
          "_ws.expert.message"]


class PipeLines:
    """Lines of a subprocess pipe, read with select() so every wait is bounded."""

    def __init__(self, pipe):
        self.fd = pipe.fileno()
        self.buffer = b""
        self.seen: list[str] = []

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """Consume lines until one matches `pattern`; fail after `timeout` or at EOF."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                self.seen.append(line.decode(errors="replace"))
                if regex.search(self.seen[-1]):
                    return self.seen[-1]
            remaining = deadline - time.monotonic()
            ready = select.select([self.fd], [], [], max(remaining, 0))[0]
            chunk = os.read(self.fd, 65536) if ready else b""
            if not chunk:
                why = "end of output" if ready else f"{timeout}s passed"
                raise AssertionError(f"no line matching {pattern!r} ({why}):\n"
                                     + "\n".join(self.seen))
            self.buffer += chunk


def dissect(pcap, port: int) -> list[dict[str, str]]:
    """Every Diameter frame of the capture as {field: value} (first occurrence only)."""
    command = ["tshark", "-r", str(pcap), "-d", f"tcp.port=={port},diameter", "-Y", "diameter",
               "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"]
    for name in FIELDS:
        command += ["-e", name]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    rows = []
    for line in result.stdout.splitlines():
        values = line.split("|")
        assert len(values) == len(FIELDS), line
        rows.append(dict(zip(FIELDS, values)))
    return rows


@pytest.fixture
def captured_exchange(eir_server, tmp_path):
    """Capture CER/CEA + one ECR/ECA per case on loopback; return (rows, sessions, answers).

    tshark prints a summary line per packet it has written (-P, flushed with -l): waiting
    for the last ECA's line there, rather than sleeping, tells that the capture holds it.
    """
    server = eir_server("--unknown", "unknown")
    pcap = tmp_path / "eca.pcap"
    tshark = subprocess.Popen(
        ["tshark", "-i", "lo", "-f", f"tcp port {server.port}", "-w", str(pcap), "-P", "-l",
         "-d", f"tcp.port=={server.port},diameter"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        PipeLines(tshark.stderr).wait_for(r"Capture started")
        summaries = PipeLines(tshark.stdout)
        sessions, answers = {}, {}
        with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
            cea = exchange(sock, build_cer(product_name="tshark-test"), TIMEOUT)
            assert cea.result_code == 2001
            for number, (name, (imei, imsi, _)) in enumerate(CASES.items(), start=100):
                sessions[name] = f"mme.localdomain;tshark;{name}"
                ecr = build_ecr(imei, imsi, sessions[name], hop_by_hop=number)
                answers[name] = exchange(sock, ecr.as_bytes(), TIMEOUT)
        for _ in CASES:
            summaries.wait_for(r"ME-Identity-Check Answer")
    finally:
        if tshark.poll() is None:
            tshark.send_signal(signal.SIGINT)
        _, errors = tshark.communicate(timeout=TIMEOUT)
    assert tshark.returncode == 0, errors.decode(errors="replace")
    return dissect(pcap, server.port), sessions, answers


def test_tshark_reads_result_and_equipment_status_of_each_eca(captured_exchange):
    rows, sessions, answers = captured_exchange
    ecas = {row["diameter.Session-Id"]: row for row in rows
            if row["diameter.cmd.code"] == "324" and row["diameter.flags.request"] == "0"}
    for name, (_, _, expected) in CASES.items():
        row = ecas.get(sessions[name])
        assert row is not None, f"no ECA for {name} in the capture: {rows}"
        wanted = {"Result-Code": "", "Experimental-Result-Code": "", "Equipment-Status": ""}
        wanted.update(expected)
        got = {key: row[f"diameter.{key}"] for key in wanted}
        assert got == wanted, f"{name}: {row}"
    # The independent decoder on the client side agrees with Wireshark.
    assert answers["blacklisted"].equipment_status == 1
    assert answers["unknown"].experimental_result.experimental_result_code == 5422


def test_tshark_sees_cea_and_every_ecr_answered(captured_exchange):
    rows, _, _ = captured_exchange
    commands = [(row["diameter.cmd.code"], row["diameter.flags.request"]) for row in rows]
    assert commands == [("257", "1"), ("257", "0")] + [("324", "1"), ("324", "0")] * len(
        CASES), rows
    cea = rows[1]
    assert cea["diameter.Result-Code"] == "2001", cea


def test_tshark_finds_nothing_malformed_in_our_answers(captured_exchange):
    rows, _, _ = captured_exchange
    answers = [row for row in rows if row["diameter.flags.request"] == "0"]
    assert len(answers) == 1 + len(CASES)
    for row in answers:
        assert row["_ws.malformed"] == "", f"malformed: {row}"
        assert row["_ws.expert.message"] == "", f"expert info: {row}"
