"""Helpers for the fault tests (tests/test_faults_wire.py, tests/test_faults_data.py) and the
soak run (bench/soak.py): the file descriptors and memory of a running `eir serve` and its
workers, read from /proc, and an MME that times pre-built ECRs on one connection.

Nothing here imports `eir`.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
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


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` and its descendants (/proc/PID/stat)."""
    ticks = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


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


# -- heavy requests (issue 13, item 3) ---------------------------------------------------------

PROXY_INFO, PROXY_HOST, PROXY_STATE = 284, 280, 33


def raw_avp(code: int, data: bytes, flags: int = 0x40) -> bytes:
    """One AVP without vendor (M flag by default), padded: appended to a scapy-built ECR."""
    length = 8 + len(data)
    return struct.pack("!II", code, flags << 24 | length) + data + bytes(-length % 4)


def proxy_info(state: bytes = b"", host: bytes = b"a") -> bytes:
    """A Proxy-Info AVP (RFC 6733 §6.7.2): 28 bytes and three AVPs at its smallest."""
    return raw_avp(PROXY_INFO, raw_avp(PROXY_HOST, host) + raw_avp(PROXY_STATE, state))


def with_avps(message: bytes, extra: bytes) -> bytes:
    """`message` with `extra` AVPs appended and its length word fixed."""
    body = bytearray(message + extra)
    struct.pack_into("!I", body, 0, 0x01000000 | len(body))
    return bytes(body)


def heavy_ecrs(size: int, proxy_infos: int) -> tuple[bytes, bytes, bytes]:
    """Three valid ECRs, the heaviest to answer we know of: one of `size` bytes packed with
    the smallest Proxy-Info AVPs (every 28 bytes three AVPs to decode, validate and echo),
    one with `proxy_infos` of them (as many as an AVP budget of ~3 a Proxy-Info lets
    through), and that one with its last Proxy-State filled up to `size` bytes."""
    base = ecr(session_id="mme.test;heavy", hop_by_hop=0)
    packed = with_avps(base, proxy_info() * ((size - len(base)) // 28))
    some = proxy_info() * (proxy_infos - 1)
    room = size - len(base) - len(some) - len(proxy_info())
    filled = with_avps(base, some + proxy_info(b"s" * (room - room % 4)))
    return packed, with_avps(base, some + proxy_info()), filled


class HeavyFlood:
    """`connections` peers, each writing the given requests in turn as fast as its socket
    takes them for `seconds`, and reading every answer (counted by Result-Code), in a
    process of its own pinned to `cpu` at nice 19: the flooding MMEs would be other
    machines. `report()` after the flood: sent, answered, by Result-Code, missing."""

    def __init__(self, address: tuple[str, int], requests: list[bytes], connections: int,
                 seconds: float, cpu: int = 1):
        context = multiprocessing.get_context("fork")
        receiving, sending = context.Pipe(duplex=False)
        self._receiving = receiving
        self._started = context.Event()
        self._process = context.Process(
            target=self._run, args=(address, requests, connections, seconds, cpu, sending),
            daemon=True)

    def start(self) -> None:
        self._process.start()
        assert self._started.wait(30), "the flooders did not connect"

    def report(self, timeout: float = 60) -> dict:
        assert self._receiving.poll(timeout), "the flood did not report"
        report = self._receiving.recv()
        self._process.join(10)
        return report

    def _run(self, address, requests, connections, seconds, cpu, sending) -> None:
        os.sched_setaffinity(0, {cpu})
        os.nice(19)
        peers = [open_peer(address, timeout=30) for _ in range(connections)]
        self._started.set()
        totals = {"sent": 0, "answered": 0, "by_result_code": {}, "error": None}
        lock = threading.Lock()
        threads = []
        for sock in peers:
            done = threading.Event()
            sent = [0]
            threads.append(threading.Thread(target=self._send, daemon=True,
                                            args=(sock, requests, seconds, sent, done)))
            threads.append(threading.Thread(target=self._receive, daemon=True,
                                            args=(sock, sent, done, totals, lock)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 60)
        for sock in peers:
            sock.close()
        sending.send(totals)

    @staticmethod
    def _send(sock, requests, seconds, sent, done) -> None:
        templates = [bytearray(request) for request in requests]
        deadline = time.monotonic() + seconds
        number = 0
        try:
            while time.monotonic() < deadline:
                template = templates[number % len(templates)]
                number += 1
                struct.pack_into("!II", template, 12, number, number)
                sock.sendall(template)
                sent[0] = number
        finally:
            done.set()

    @staticmethod
    def _receive(sock, sent, done, totals, lock) -> None:
        """Read answers until every request the sender wrote is answered. The socket
        times out every 0.5 s to look again: the last answer may come before the sender
        has counted its request, and nothing more after it."""
        received = 0
        codes: dict[int | None, int] = {}
        buffer = b""
        sock.settimeout(0.5)
        quiet_since = time.monotonic()
        try:
            while not (done.is_set() and received >= sent[0]):
                try:
                    data = sock.recv(1 << 20)
                except socket.timeout:
                    if time.monotonic() - quiet_since > 30:
                        raise
                    continue
                if not data:
                    raise ConnectionError("the server closed the connection")
                quiet_since = time.monotonic()
                buffer += data
                pos = 0
                while len(buffer) - pos >= 20:
                    length = int.from_bytes(buffer[pos + 1:pos + 4], "big")
                    if len(buffer) - pos < length:
                        break
                    code = result_code(buffer[pos:pos + length])
                    codes[code] = codes.get(code, 0) + 1
                    received += 1
                    pos += length
                buffer = buffer[pos:]
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            totals["error"] = repr(exc)
        with lock:
            totals["sent"] += sent[0]
            totals["answered"] += received
            for code, count in codes.items():
                totals["by_result_code"][code] = totals["by_result_code"].get(code, 0) + count


def result_code(answer: bytes) -> int | None:
    """The Result-Code (268) among an answer's top-level AVPs, without scapy (fast)."""
    pos = 20
    while pos + 8 <= len(answer):
        code, word = struct.unpack_from("!II", answer, pos)
        if code == 268 and not word >> 24 & 0x80:
            return int.from_bytes(answer[pos + 8:pos + 12], "big")
        pos += ((word & 0xFFFFFF) + 3) & ~3
    return None
