"""The load generator's own cost: `eir replay`'s CPU time per request, flat out on one connection.

`eir serve` (one worker, pinned to core 0) answers the default generated mix (white, black,
grey, unknown and invalid IMEIs of config/lists/example.csv, so error answers with Failed-AVP
are in it too). Against it, pinned to core 1 and one after the other:

1. the baseline: the minimal pipelining asyncio client of bench/e2e.py (requests encoded
   before the measured phase, one hop-by-hop lookup and one latency list append per answer,
   no verdict read, no histogram, no report), window 128, chunks of 16;
2. `eir replay --connections 1 --window 128 --duration S --progress --json`.

On a busy machine the server answers a few thousand ECRs a second and both clients then spend
most of their CPU waking up for each read (the kernel's and the event loop's work, not
theirs). So a third figure isolates the harness's own work per request, as it would be at any
rate: its real Worker and Connection in this process, their writes going to the real
S13 application (hotpath.open_peer: the list, counters and duplicate cache of `eir serve`)
instead of a socket, and its answers handed back IN_PROCESS_READ to a read; only the
harness's calls are timed (time.process_time).

CPU time is the client process's user + system time from /proc/PID/stat. For eir replay it
is sampled at each progress line (once a second) and divided by the answers between the
second and the last line, so start-up (imports, building the mix) and the end are left out;
the baseline samples its own /proc/self/stat around its measured phase. The server's CPU per
request during the eir replay run is shown too.

    python3 bench/replay_cpu.py [--seconds S] [--json]

The last line is one JSON object: replay_cpu_us_per_request, replay_requests_per_s,
replay_errors, baseline_cpu_us_per_request, baseline_requests_per_s, server_cpu_us_per_request,
replay_in_process_us_per_request, seconds, pinned (with --json only that line is printed on
standard output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import hotpath  # noqa: F401  (first: it puts the checkout and tests/ on sys.path)
from e2e import Phase, PipelineClient, cpu_seconds, pinning
from helpers_process import start_eir  # from tests/

from eir.core.decision import UnknownPolicy
from eir.lists.native import load_rule_set
from eir.replay.client import Connection, Plan, Worker
from eir.replay.messages import Identity, encode_cer
from eir.replay.workload import DEFAULT_MIX, generate_mix

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LIST = ROOT / "config" / "lists" / "example.csv"
WINDOW, CHUNK = 128, 16
BASELINE_ROUND = 100_000  # requests encoded before each measured round of the baseline
ANSWERED = re.compile(r"answered ([\d,]+)")
IN_PROCESS_REQUESTS, IN_PROCESS_READ = 50_000, 32


# -- the baseline client (run as a subprocess of this script, pinned like eir replay) ---------

async def baseline_client(host: str, port: int, seconds: float) -> dict:
    """Rounds of BASELINE_ROUND pre-encoded requests until `seconds` of measured sending;
    CPU (from /proc/self/stat) and wall time counted over the rounds only, not their
    encoding."""
    identity = Identity()
    workload = generate_mix(DEFAULT_MIX, [EXAMPLE_LIST], identity)
    templates = workload.templates
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(PipelineClient, host, port)
    transport.write(encode_cer(identity, "127.0.0.1", 0))
    await asyncio.wait_for(client.cea, 10)
    own = cpu_seconds_self
    next_id, cpu, wall, answered = 1, 0.0, 0.0, 0
    warm_up = True
    while warm_up or wall < seconds:
        count = 20_000 if warm_up else BASELINE_ROUND
        requests = [templates[(next_id + n) % len(templates)].instance(
            next_id + n, next_id + n, next_id + n) for n in range(count)]
        cpu_before, wall_before = own(), time.monotonic()
        phase = await client.run(Phase(requests, next_id, WINDOW, CHUNK,
                                       wall_before + seconds - wall), 120)
        if not warm_up:
            cpu += own() - cpu_before
            wall += time.monotonic() - wall_before
            answered += phase.answered
        next_id += count
        warm_up = False
    transport.close()
    return {"answered": answered, "cpu_s": cpu, "elapsed_s": wall}


def cpu_seconds_self() -> float:
    return cpu_seconds(int(Path("/proc/self/stat").read_text().split()[0]))


def run_baseline(port: int, seconds: float, prefix: list[str]) -> dict:
    command = prefix + [sys.executable, str(Path(__file__).resolve()), "--baseline-client",
                        str(port), "--seconds", str(seconds)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    if result.returncode != 0:
        raise SystemExit(f"baseline client failed ({result.returncode}): "
                         f"{result.stderr[-2000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {"cpu_us": figures["cpu_s"] * 1e6 / max(1, figures["answered"]),
            "rate": figures["answered"] / figures["elapsed_s"]}


# -- eir replay -----------------------------------------------------------------------------

def run_replay(port: int, seconds: float, prefix: list[str], server_pid: int,
               rate: float | None = None) -> dict:
    """eir replay (flat out unless a rate is given); its CPU (and the server's) sampled at each
    progress line."""
    command = prefix + [sys.executable, "-m", "eir", "replay", "--target", f"127.0.0.1:{port}",
                        "--connections", "1", "--window", str(WINDOW), "--duration",
                        str(seconds), "--progress", "--json"]
    if rate is not None:
        command += ["--rate", f"{rate:.0f}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    samples: list[tuple[int, float, float]] = []  # answered, replay CPU, server CPU
    tail: list[str] = []
    for line in process.stderr:
        match = ANSWERED.search(line)
        if match:
            samples.append((int(match.group(1).replace(",", "")), cpu_seconds(process.pid),
                            cpu_seconds(server_pid)))
        else:
            tail.append(line)
    out = process.stdout.read()
    if process.wait() != 0:
        raise SystemExit(f"eir replay failed ({process.returncode}): {''.join(tail)[-2000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    if len(samples) < 3:
        raise SystemExit(f"eir replay printed {len(samples)} progress lines: give more --seconds")
    (a0, c0, s0), (a1, c1, s1) = samples[1], samples[-1]
    answered = max(1, a1 - a0)
    return {"cpu_us": (c1 - c0) * 1e6 / answered, "server_cpu_us": (s1 - s0) * 1e6 / answered,
            "rate": report["rate_per_s"], "errors": report["errors"],
            "expected_errors": report["expected_errors"], "timeouts": report["timeouts"]}


# -- the harness's own work, in process ----------------------------------------------------

class CollectingTransport:
    """Where the Connection's writes go instead of a socket: kept for the in-process server."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str):
        return None

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


async def in_process(count: int, per_read: int) -> dict:
    """The harness's CPU per request (its calls only) against the S13 application in process."""
    identity = Identity()
    workload = generate_mix(DEFAULT_MIX, [EXAMPLE_LIST], identity)
    server = hotpath.open_peer(load_rule_set([EXAMPLE_LIST], UnknownPolicy.UNKNOWN))
    plan = Plan(worker=0, host="127.0.0.1", port=0, connections=[0], total_connections=1,
                workload=workload, identity=identity, count=count, duration_s=None, rate=None,
                speed=None, window=WINDOW, timeout_s=60.0)
    loop = asyncio.get_running_loop()
    worker = Worker(plan, lambda report: None)
    worker.all_finished = loop.create_future()
    worker.start = loop.time()
    connection = Connection(worker, 0)
    transport = connection.transport = CollectingTransport()
    worker.connections.append(connection)
    connection.sending = True
    clock = time.process_time
    spent = 0.0
    started = clock()
    connection.pump()
    spent += clock() - started
    while not connection.finished:
        answers = server.receive(b"".join(transport.written), time.monotonic())
        transport.written.clear()
        if not answers:
            raise SystemExit("the in-process server answered nothing")
        for read in reads_of(answers, per_read):
            started = clock()
            connection.data_received(read)
            spent += clock() - started
    started = clock()
    worker._flush_intervals(final=True)
    spent += clock() - started
    result = worker.result
    if result.answered != count or result.expected_errors == 0:
        raise SystemExit(f"in process: {result.answered} of {count} answered")
    return {"cpu_us": spent * 1e6 / count}


def reads_of(stream: bytes, per_read: int) -> list[bytes]:
    """The answers in `stream`, `per_read` to a read."""
    reads, start, position, count = [], 0, 0, 0
    while position < len(stream):
        position += int.from_bytes(stream[position + 1:position + 4], "big")
        count += 1
        if count == per_read:
            reads.append(stream[start:position])
            start, count = position, 0
    if start < len(stream):
        reads.append(stream[start:])
    return reads


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="print only the JSON line on standard output")
    parser.add_argument("--baseline-client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_client is not None:
        figures = asyncio.run(baseline_client("127.0.0.1", args.baseline_client, args.seconds))
        print(json.dumps(figures), flush=True)
        return None
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if args.json else print
    server_prefix, client_core, pinned = pinning()
    client_prefix = ["taskset", "-c", str(client_core)] if client_core is not None else []
    say(f"replay CPU: one connection, window {WINDOW}, {args.seconds:g} s per run; {pinned}",
        flush=True)
    server = start_eir("--workers", "1", "--unknown", "unknown", prefix=server_prefix,
                       timeout=60.0)
    try:
        baseline = run_baseline(server.port, args.seconds, client_prefix)
        replay = run_replay(server.port, args.seconds, client_prefix, server.process.pid)
    finally:
        server.stop()
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})
    own = asyncio.run(in_process(IN_PROCESS_REQUESTS, IN_PROCESS_READ))
    say(f"  baseline (bench/e2e.py's minimal client): {baseline['cpu_us']:6.2f} µs CPU/request"
        f"  {baseline['rate']:>9,.0f} requests/s")
    say(f"  eir replay:                                {replay['cpu_us']:6.2f} µs CPU/request"
        f"  {replay['rate']:>9,.0f} requests/s  (server {replay['server_cpu_us']:.2f} µs/ECR; "
        f"errors {replay['errors']}, expected errors {replay['expected_errors']}, timeouts "
        f"{replay['timeouts']})")
    say(f"  eir replay / baseline CPU: {replay['cpu_us'] / baseline['cpu_us']:.2f}x")
    say(f"  eir replay's own work, in process ({IN_PROCESS_READ} answers a read, no sockets): "
        f"{own['cpu_us']:.2f} µs CPU/request")
    figures = {"replay_cpu_us_per_request": round(replay["cpu_us"], 3),
               "replay_requests_per_s": round(replay["rate"], 1),
               "replay_errors": replay["errors"],
               "baseline_cpu_us_per_request": round(baseline["cpu_us"], 3),
               "baseline_requests_per_s": round(baseline["rate"], 1),
               "server_cpu_us_per_request": round(replay["server_cpu_us"], 3),
               "replay_in_process_us_per_request": round(own["cpu_us"], 3),
               "seconds": args.seconds, "pinned": pinned}
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
