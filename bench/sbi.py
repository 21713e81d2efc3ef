"""N5g-eir beside S13: `eir serve --sbi` answering GET equipment-status over one HTTP/2 (h2c)
connection, many concurrent streams.

The server runs as a subprocess (`--workers 1`, on 127.0.0.1:0, the port read from its
"N5g-eir served on" log line) with hotpath.py's 105,000-rule list; the client is eir.interfaces.sbi's
H2Client (the h2 package on asyncio) keeping N requests in flight on one connection (default
64; the server allows 128 per connection), each request's PEI/SUPI from hotpath.py's request
mix. After a warm-up, the measured requests run in 5 rounds; requests/s is the median round,
p50/p99 over all of them (from sending a request to its whole answer). A sample of answers is
checked against the verdicts the list gives. Also shown: the server's CPU time per request
(from /proc), and the CPU the rest of the machine used meanwhile. The client is Python too:
when it is the slower side, req/s measures it, and server µs/request is the server's figure.

With taskset and two or more cores, the server is pinned to core 0 and the client to core 1.

    python3 bench/sbi.py [--quick] [--count N] [--concurrency N]   # last line: JSON figures
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hotpath  # first: it puts the checkout and tests/ on sys.path
from e2e import cpu_seconds, pinning
from helpers_process import start_eir
from hotpath import OtherLoad, build_workload, load_note, percentile, pin_to

from eir.core.decision import UnknownPolicy
from eir.lists.native import load_rule_set
from eir.interfaces.sbi import H2Client

ROUNDS = 5
SERVED = r"N5g-eir served on (http://\S+)/n5g-eir-eic/v1/ \(h2c\)"
PATH = "/n5g-eir-eic/v1/equipment-status"


def request_paths(workload) -> list[str]:
    """The request mix as query paths: half IMEIs (with the check digit), half IMEISVs."""
    paths = []
    for index, (imei, imsi) in enumerate(workload.probes):
        pei = f"imei-{imei}" if index % 2 else f"imeisv-{imei[:14]}23"
        paths.append(f"{PATH}?pei={pei}&supi=imsi-{imsi}")
    return paths


async def measure(url: str, paths: list[str], count: int, concurrency: int,
                  expected: list[str]) -> dict:
    client = await H2Client.connect(url, user_agent="AMF-bench")
    latencies: list[int] = []
    checked = 0

    async def run(first: int, total: int, record: bool) -> float:
        nonlocal checked
        next_index = first

        async def worker() -> None:
            nonlocal next_index, checked
            while next_index < first + total:
                index = next_index
                next_index += 1
                path = paths[index % len(paths)]
                sent = time.perf_counter_ns()
                response = await client.request("GET", path)
                if record:
                    latencies.append(time.perf_counter_ns() - sent)
                if index < len(paths):  # the first pass over the mix: check every verdict
                    got = response.json()["status"] if response.status == 200 else (
                        "UNKNOWN" if response.status == 404 else str(response.status))
                    if got != expected[index]:
                        raise SystemExit(f"{path}: got {got}, want {expected[index]}")
                    checked += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - started)

    await run(0, max(len(paths), count // 10), record=False)  # warm-up (and verification)
    rates = []
    per_round = count // ROUNDS
    for round_number in range(ROUNDS):
        rates.append(await run(round_number * per_round, per_round, record=True))
    client.close()
    latencies.sort()
    return {"per_s": statistics.median(rates), "p50_us": percentile(latencies, 0.5) / 1e3,
            "p99_us": percentile(latencies, 0.99) / 1e3, "checked": checked}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI)")
    parser.add_argument("--count", type=int, help="measured requests (default 50,000; "
                        "10,000 with --quick)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="requests in flight on the connection (default 64)")
    args = parser.parse_args(argv)
    count = args.count or (10_000 if args.quick else 50_000)
    workload = build_workload()
    prefix, client_core, pinned = pinning()
    with tempfile.TemporaryDirectory() as scratch:
        lists = workload.write_csv(Path(scratch) / "bench.csv")
        rule_set = load_rule_set([lists], UnknownPolicy.UNKNOWN)
        paths = request_paths(workload)
        expected = []
        for imei, imsi in workload.probes:
            status = rule_set.decide(imei[:14], imsi).status
            expected.append(status.name if status is not None else "UNKNOWN")
        server = start_eir("--sbi", "127.0.0.1:0", "--workers", "1", lists=[lists],
                           cwd=Path(scratch), prefix=prefix, timeout=120)
        try:
            url = server.wait_for_log(SERVED, timeout=30).group(1)
            if client_core is not None:
                pin_to(client_core)
            other = OtherLoad()
            cpu_before, own_before = cpu_seconds(server.process.pid), time.process_time()
            figures = asyncio.run(measure(url, paths, count, args.concurrency, expected))
            server_cpu = cpu_seconds(server.process.pid) - cpu_before
            own_cpu = time.process_time() - own_before
            busy = other.cpus(server_cpu + own_cpu)
        finally:
            server.stop()
    total = max(len(paths), count // 10) + (count // ROUNDS) * ROUNDS
    result = {
        "sbi_req_per_s_one_conn": round(figures["per_s"]),
        "sbi_p50_ms": round(figures["p50_us"] / 1e3, 3),
        "sbi_p99_ms": round(figures["p99_us"] / 1e3, 3),
        "sbi_server_us_per_request": round(server_cpu / total * 1e6, 1),
        "sbi_client_us_per_request": round(own_cpu / total * 1e6, 1),
        "sbi_concurrency": args.concurrency,
        "sbi_verdicts_checked": figures["checked"],
        "other_cpus": round(busy, 2),
    }
    print(f"N5g-eir over one h2c connection, {args.concurrency} streams in flight, "
          f"{count} requests in {ROUNDS} rounds ({pinned}):")
    print(f"  {result['sbi_req_per_s_one_conn']:,} req/s (median round), p50 "
          f"{result['sbi_p50_ms']} ms, p99 {result['sbi_p99_ms']} ms")
    print(f"  server CPU {result['sbi_server_us_per_request']} µs/request, client CPU "
          f"{result['sbi_client_us_per_request']} µs/request; {figures['checked']} verdicts "
          f"checked against the list")
    note = load_note(busy)
    if note:
        print("  " + note)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
