"""End to end over loopback TCP, one connection: `eir serve` against a python-diameter EIR.

Each server runs as a subprocess on 127.0.0.1:0 (the port is read from its "listening on tcp
HOST:PORT" log line) with the same 105,000-rule list as hotpath.py. One asyncio client does
CER/CEA, then pipelines pre-encoded ECRs (distinct hop-by-hop ids and Session-Ids) keeping a
window of N requests outstanding (default 128, written in chunks of at most 16 so the server
always has the next requests queued, as with an MME's steady stream; --chunk 128 gives the
lock-step pattern), matches answers by hop-by-hop id and records each request's latency from
the write of its request to the read of its answer. After a warm-up, the measured requests
are sent in 5 rounds on the same connection; ECR/s is the median round, p50/p99 are over all
of them. The first answers are decoded with python-diameter and checked against the verdicts
the list gives. Then unloaded latency (window 1). Also shown: the server's CPU time per ECR
(from /proc) and the CPU other processes used meanwhile (a busy machine makes figures low).

With taskset and two or more cores, the server is pinned to core 0 and the client to core 1.

    python3 bench/e2e.py [--quick] [--count N] [--window N]     # last line: JSON figures
    python3 bench/e2e.py --server-prefix "py-spy record -o eir.svg --"   # profile eir serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import hotpath  # first: it puts the checkout and tests/ on sys.path
from hotpath import (OtherLoad, Workload, build_workload, ecr_stream, encode_cer,
                     expected_from_rule_set, load_note, percentile, probe_of, verdict_of_answer)
from helpers_process import RunningServer, start_eir, start_server  # from tests/
from pydiameter_eir import load_table, lookup

from eir.core.decision import UnknownPolicy
from eir.diameter.codec import encode_avp, encode_message, parse_header
from eir.lists.native import load_rule_set

BENCH = Path(__file__).resolve().parent
_WORD = struct.Struct("!I")
VERIFY_SAMPLES = 2_000
IDLE_REQUESTS = 2_000


# -- the server under test -----------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinning() -> tuple[list[str], int | None, str]:
    """(server command prefix, client core, description)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 and hasattr(
            os, "sched_setaffinity"):
        return ["taskset", "-c", "0"], 1, "server pinned to core 0, client to core 1 (taskset)"
    return [], None, "not pinned (needs taskset and 2 cores)"


# -- the pipelining client -----------------------------------------------------------------

@dataclass
class Phase:
    """Send `requests` keeping `window` outstanding; requests[i] has hop-by-hop base + i."""

    requests: list[bytes]
    base: int
    window: int
    chunk: int  # at most this many ECRs per write
    deadline: float  # time.monotonic(): stop sending after this
    keep: int = 0  # how many first answers to keep for verification
    sent: int = 0
    answered: int = 0
    stopped: bool = False
    latencies: list[int] = field(default_factory=list)
    kept: dict[int, bytes] = field(default_factory=dict)
    reads: int = 0  # data_received calls that carried answers
    writes: int = 0
    started_ns: int = 0
    ended_ns: int = 0
    done: asyncio.Future | None = None

    def __post_init__(self) -> None:
        self.sent_at = [0] * len(self.requests)


class PipelineClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.phase: Phase | None = None
        self.cea: asyncio.Future = asyncio.get_running_loop().create_future()
        self.lost: str | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.lost = f"connection lost ({exc})" if exc else "server closed the connection"
        for future in (self.cea, self.phase.done if self.phase else None):
            if future is not None and not future.done():
                future.set_exception(ConnectionError(self.lost))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buffer = self.buffer + data if self.buffer else data
        end = len(buffer)
        pos = 0
        phase = self.phase
        unpack = _WORD.unpack_from
        while end - pos >= 20:
            length = unpack(buffer, pos)[0] & 0xFFFFFF
            if end - pos < length:
                break
            flags_code = unpack(buffer, pos + 4)[0]
            if flags_code >> 31:  # a request from the server (DWR): answer it
                self._answer_request(buffer[pos:pos + length])
            elif flags_code & 0xFFFFFF == 257:
                self.cea.set_result(buffer[pos:pos + length])
            elif phase is not None:
                index = unpack(buffer, pos + 12)[0] - phase.base
                phase.latencies.append(now - phase.sent_at[index])
                phase.answered += 1
                if index < phase.keep:
                    phase.kept[index] = buffer[pos:pos + length]
            pos += length
        self.buffer = buffer[pos:]
        if phase is not None:
            phase.reads += 1
            self._fill(phase)

    def _answer_request(self, raw: bytes) -> None:
        # DWR → DWA: Result-Code 2001, Origin-Host, Origin-Realm (hop-by-hop ids echoed).
        header = parse_header(raw)
        body = (encode_avp(268, 0x40, 0, _WORD.pack(2001)) +
                encode_avp(264, 0x40, 0, hotpath.MME_HOST) +
                encode_avp(296, 0x40, 0, hotpath.MME_REALM))
        self.transport.write(encode_message(0, header.code, header.application,
                                            header.hop_by_hop, header.end_to_end, body))

    def _fill(self, phase: Phase) -> None:
        if not phase.stopped:
            room = phase.window - (phase.sent - phase.answered)
            if room > 0:
                if phase.sent >= len(phase.requests) or time.monotonic() >= phase.deadline:
                    phase.stopped = True
                else:
                    first = phase.sent
                    last = min(first + room, len(phase.requests))
                    write = self.transport.write
                    requests, sent_at, chunk = phase.requests, phase.sent_at, phase.chunk
                    for start in range(first, last, chunk):
                        end = min(start + chunk, last)
                        sent_at[start:end] = [time.perf_counter_ns()] * (end - start)
                        write(b"".join(requests[start:end]))
                        phase.writes += 1
                    phase.sent = last
        if phase.stopped and phase.answered == phase.sent and not phase.done.done():
            phase.ended_ns = time.perf_counter_ns()
            phase.done.set_result(None)

    async def run(self, phase: Phase, timeout: float) -> Phase:
        phase.done = asyncio.get_running_loop().create_future()
        self.phase = phase
        phase.started_ns = time.perf_counter_ns()
        self._fill(phase)
        try:
            await asyncio.wait_for(phase.done, timeout)
        except asyncio.TimeoutError:
            raise SystemExit(f"timeout: {phase.answered} of {phase.sent} requests "
                             f"answered after {timeout:.0f} s") from None
        self.phase = None
        return phase


@dataclass
class Result:
    per_s: float  # median of the rounds
    rounds: list[float]  # ECR/s of each round
    p50_ms: float  # over every measured request
    p99_ms: float
    max_ms: float
    count: int
    idle_p50_ms: float  # window 1
    idle_p99_ms: float
    verified: int
    per_write: float  # ECRs per client write
    per_read: float  # ECAs per client read: how much the server batches its answers
    server_cpu_us: float  # server CPU time (user + system) per ECR
    server_busy: float  # server CPU time / wall time of the measured rounds
    other_cpus: float  # CPUs used by other processes meanwhile


async def drive(host: str, port: int, requests: list[bytes], base: int,
                args: argparse.Namespace, expected, server_cpu) -> Result:
    """CER, warm-up, `args.rounds` measured rounds, then window-1 latency; verify answers."""
    loop = asyncio.get_running_loop()
    transport, client = await asyncio.wait_for(
        loop.create_connection(PipelineClient, host, port), 10)
    cursor = 0

    def phase(n: int, window: int, chunk: int, seconds: float, keep: int = 0) -> Phase:
        nonlocal cursor
        batch, first = requests[cursor:cursor + n], base + cursor
        cursor += n
        return Phase(batch, first, window, chunk, time.monotonic() + seconds, keep)

    per_round = args.count // args.rounds
    rounds: list[Phase] = []
    try:
        transport.write(encode_cer(hop_by_hop=base - 1))
        cea = await asyncio.wait_for(client.cea, 10)
        if verdict_of_answer(cea)[0] != 2001:
            raise SystemExit(f"CER refused: {verdict_of_answer(cea)}")
        await client.run(phase(args.warmup, args.window, args.chunk, 3600), 120)
        load = OtherLoad()
        cpu_before, client_before = server_cpu(), time.process_time()
        for index in range(args.rounds):
            seconds = args.seconds / args.rounds
            rounds.append(await client.run(
                phase(per_round, args.window, args.chunk, seconds,
                      VERIFY_SAMPLES if index == 0 else 0), seconds + 60))
        cpu_used = server_cpu() - cpu_before
        other = load.cpus(cpu_used + time.process_time() - client_before)
        idle = await client.run(phase(IDLE_REQUESTS, 1, 1, 5), 60)
    finally:
        transport.close()
    first = rounds[0]
    for index, raw in first.kept.items():
        position = first.base - base + index  # in `requests`, which cycle through the probes
        got, want = verdict_of_answer(raw), expected(position)
        if got != want:
            raise SystemExit(f"answer to request {position}: got {got}, want {want}")
    rates = [r.answered * 1e9 / (r.ended_ns - r.started_ns) for r in rounds]
    latencies = sorted(x for r in rounds for x in r.latencies)
    idle_latencies = sorted(idle.latencies)
    answered = sum(r.answered for r in rounds)
    elapsed_s = sum(r.ended_ns - r.started_ns for r in rounds) / 1e9
    return Result(
        statistics.median(rates), rates, percentile(latencies, 0.5) / 1e6,
        percentile(latencies, 0.99) / 1e6, latencies[-1] / 1e6, answered,
        percentile(idle_latencies, 0.5) / 1e6, percentile(idle_latencies, 0.99) / 1e6,
        len(first.kept), sum(r.sent for r in rounds) / max(1, sum(r.writes for r in rounds)),
        answered / max(1, sum(r.reads for r in rounds)), cpu_used * 1e6 / answered,
        cpu_used / elapsed_s, other)


def bench_server(name: str, server: RunningServer, requests: list[bytes], base: int,
                 args: argparse.Namespace, expected,
                 stop_signal: int = signal.SIGTERM) -> Result:
    try:
        result = asyncio.run(drive(server.host, server.port, requests, base, args, expected,
                                   lambda: cpu_seconds(server.process.pid)))
    finally:
        code = server.stop(stop_signal, timeout=20.0)
    if args.server_log:
        print("\n".join(f"    | {line}" for line in server.lines))
    problems = [line for line in server.lines if " ERROR " in line or "Traceback" in line]
    if problems:
        raise SystemExit(f"{name} logged errors:\n" + "\n".join(server.lines[-30:]))
    rounds = " ".join(f"{rate / 1000:.1f}k" for rate in result.rounds)
    print(f"  {name:<20}{result.per_s:>8,.0f} ECR/s  p50 {result.p50_ms:5.2f} ms  "
          f"p99 {result.p99_ms:5.2f} ms  max {result.max_ms:5.1f} ms  |  "
          f"window 1: p50 {result.idle_p50_ms:5.2f} ms p99 {result.idle_p99_ms:5.2f} ms\n"
          f"  {'':<20}rounds {rounds} ECR/s (median shown); {result.count:,} ECRs, first "
          f"{result.verified:,} verified; exit {code}\n"
          f"  {'':<20}server CPU {result.server_cpu_us:.1f} µs/ECR, busy "
          f"{result.server_busy:.0%}; {result.per_write:.1f} ECRs per client write, "
          f"{result.per_read:.1f} ECAs per client read; {load_note(result.other_cpus)}",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI)")
    parser.add_argument("--count", type=int, help="measured ECRs per server")
    parser.add_argument("--seconds", type=float, help="stop sending after this long")
    parser.add_argument("--window", type=int, default=128, help="outstanding requests")
    parser.add_argument("--chunk", type=int, default=16,
                        help="at most this many ECRs per client write")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measured rounds; ECR/s is their median")
    parser.add_argument("--warmup", type=int, help="ECRs sent before measuring")
    parser.add_argument("--only", choices=["eir", "python-diameter"])
    parser.add_argument("--server-prefix", default="",
                        help="command prefix for `eir serve`, e.g. a profiler")
    parser.add_argument("--server-log", action="store_true", help="print the servers' logs")
    args = parser.parse_args(argv)
    args.count = args.count or (40_000 if args.quick else 200_000)
    args.seconds = args.seconds or (2.5 if args.quick else 12.0)
    args.warmup = args.warmup if args.warmup is not None else (2_000 if args.quick else 10_000)

    prefix, client_core, pinned = pinning()
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})
    t = time.perf_counter()
    workload: Workload = build_workload()
    base = 1_000_000
    total = args.warmup + args.count + IDLE_REQUESTS
    requests = ecr_stream(workload, total, first_hop_by_hop=base)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = workload.write_csv(Path(tmp) / "bench.csv")
        rule_set = load_rule_set([csv_path], UnknownPolicy.UNKNOWN)
        table = load_table(str(csv_path))
        print(f"end to end: one TCP connection over loopback, window {args.window}, "
              f"{len(workload.rows):,} list rows, {total:,} ECRs pre-encoded in "
              f"{time.perf_counter() - t:.1f} s; {pinned}", flush=True)

        def expect_eir(index: int):
            return expected_from_rule_set(rule_set, *probe_of(index, workload))

        def expect_pd(index: int):
            status = lookup(table, probe_of(index, workload)[0])
            return (2001, status, None) if status is not None else (None, None, 5422)

        figures: dict = {}
        if args.only in (None, "eir"):
            server_prefix = shlex.split(args.server_prefix)
            # Run in the temporary directory: what the server writes there (its observations
            # database) must not land in the repository.
            eir = start_eir("--unknown", "unknown", "--log-level", "info", lists=[csv_path],
                            prefix=prefix + server_prefix, timeout=60.0, cwd=Path(tmp))
            # py-spy writes its profile on SIGINT; SIGTERM would lose it.
            ours = bench_server("eir serve", eir, requests, base, args, expect_eir,
                                signal.SIGINT if "py-spy" in server_prefix else signal.SIGTERM)
            figures.update(e2e_ecr_per_s_one_conn=round(ours.per_s),
                           e2e_p50_ms=round(ours.p50_ms, 2), e2e_p99_ms=round(ours.p99_ms, 2),
                           e2e_max_ms=round(ours.max_ms, 1),
                           e2e_idle_p50_ms=round(ours.idle_p50_ms, 3),
                           e2e_server_cpu_us_per_ecr=round(ours.server_cpu_us, 1),
                           e2e_other_cpu_load=round(ours.other_cpus, 2),
                           e2e_window=args.window)
        if args.only in (None, "python-diameter"):
            pd = start_server(prefix + [sys.executable, str(BENCH / "pydiameter_eir.py"),
                                        "--listen", "127.0.0.1:0", "--list", str(csv_path)],
                              timeout=60.0)
            theirs = bench_server("python-diameter EIR", pd, requests, base, args, expect_pd)
            figures.update(python_diameter_server_ecr_per_s=round(theirs.per_s),
                           python_diameter_server_p50_ms=round(theirs.p50_ms, 2),
                           python_diameter_server_p99_ms=round(theirs.p99_ms, 2))
        if args.only is None:
            ratio = ours.per_s / theirs.per_s
            print(f"  ratio eir / python-diameter server: {ratio:.1f}x")
            figures["ratio_vs_python_diameter_server"] = round(ratio, 2)
    figures["e2e_pinned"] = client_core is not None
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
