"""Helpers for the fault tests (tests/test_faults_wire.py, tests/test_faults_data.py) and the
soak run (bench/soak.py): the file descriptors and memory of a running `eir serve` and its
workers, read from /proc, and an MME that times pre-built ECRs on one connection.

Nothing here imports `eir`.
"""

from __future__ import annotations

import multiprocessing
import os
import struct
import threading
import time
from pathlib import Path

from helpers_wire import ecr, open_peer, parse_answer, read_message


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the supervisor and its workers), from /proc."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pending += [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
    return found


def open_fds(pid: int) -> dict[int, int]:
    """{pid: open file descriptors} for `pid` and each of its descendants."""
    counts = {}
    for member in process_tree(pid):
        try:
            counts[member] = len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            continue
    return counts


def open_sockets(pid: int) -> int:
    """Socket fds of `pid` and its descendants: what a leaked connection would add to.
    (The other fds come and go: the observations database's files are opened per flush.)"""
    return sum(target.split("->", 1)[1].startswith("socket:") for target in fd_targets(pid))


def fd_targets(pid: int) -> list[str]:
    """What each open fd of `pid` and its descendants points at (for failure messages)."""
    targets = []
    for member in process_tree(pid):
        for fd in Path(f"/proc/{member}/fd").glob("*"):
            try:
                targets.append(f"{member}:{fd.name}->{os.readlink(fd)}")
            except OSError:
                continue
    return sorted(targets)


def rss_kib(pid: int) -> int:
    """Resident set size of one process, KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class TimedMme(threading.Thread):
    """An MME on one connection sending one ECR every `interval` s until stopped, timing each
    from write to answer. The ECR is built once by scapy (building one costs ~2 ms, more
    than what is measured); only its ids change."""

    what = "ECRs"  # in the summary

    def __init__(self, address: tuple[str, int], interval: float = 0.004):
        super().__init__(daemon=True)
        self.sock = open_peer(address)
        self.interval = interval
        self.latencies: list[float] = []
        self.result_codes: dict[int | None, int] = {}
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._template = bytearray(ecr(session_id="mme.test;timed", hop_by_hop=0))

    def run(self) -> None:
        number = 1_000_000
        try:
            while not self._stopping.is_set():
                number += 1
                struct.pack_into("!II", self._template, 12, number, number)
                request = bytes(self._template)
                started = time.monotonic()
                self.sock.sendall(request)
                message = read_message(self.sock, timeout=10)
                self.latencies.append(time.monotonic() - started)
                answer = parse_answer(message)
                assert answer.hop_by_hop == number, (answer.hop_by_hop, number)
                self.result_codes[answer.result_code] = \
                    self.result_codes.get(answer.result_code, 0) + 1
                self._stopping.wait(max(0.0, started + self.interval - time.monotonic()))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        """Stop, close, and fail if any request went wrong."""
        self._stopping.set()
        self.join(15)
        self.sock.close()
        assert self.error is None, repr(self.error)

    def summary(self) -> str:
        if not self.latencies:
            return f"no {self.what} timed"
        return (f"{len(self.latencies)} {self.what}, p50 "
                f"{percentile(self.latencies, 0.5) * 1e3:.2f} ms, p99 "
                f"{percentile(self.latencies, 0.99) * 1e3:.2f} ms, max "
                f"{max(self.latencies) * 1e3:.2f} ms, Result-Codes {self.result_codes}")


class MmeProcess:
    """A TimedMme in a process of its own (fork): timed beside a test that keeps its own
    process busy (thousands of connects and selects), whose GIL would otherwise stall the
    MME's thread and show up as the server's latency. Same `latencies`, `result_codes` and
    `summary()` after `stop()`. `timed`: the class timed (TimedMme, or one like it)."""

    def __init__(self, address, interval: float = 0.004, timed=TimedMme):
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        receiving, self._sending = context.Pipe(duplex=False)
        self._receiving = receiving
        self._process = context.Process(target=self._run, args=(address, interval, timed),
                                        daemon=True)
        self.latencies: list[float] = []
        self.result_codes: dict[int | None, int] = {}
        self._summary = ""

    def _run(self, address, interval, timed) -> None:
        mme = timed(address, interval)
        mme.start()
        self._stop.wait()
        try:
            mme.stop()
            self._sending.send((mme.latencies, mme.result_codes, mme.summary(), None))
        except BaseException as exc:  # noqa: BLE001 - reported in the test's process
            self._sending.send(([], {}, "", repr(exc)))

    def start(self) -> None:
        self._process.start()

    def stop(self) -> None:
        self._stop.set()
        assert self._receiving.poll(30), "the MME process did not report"
        self.latencies, self.result_codes, self._summary, error = self._receiving.recv()
        self._process.join(10)
        assert error is None, error

    def summary(self) -> str:
        return self._summary
