"""N5g-eir beside S13: `eir serve --sbi` answering GET equipment-status over HTTP/2 (h2c).

The server runs as a subprocess (on 127.0.0.1:0, the port read from its "N5g-eir served on"
log line) with hotpath.py's 105,000-rule list, `--workers N` (default 1), with the fast path
(eir.interfaces.h2wire; `--generic`: h2 does every frame, the baseline) -- `--baseline` runs
both in turn and prints the ratio. The client is h2load (nghttp2, C: Debian's
nghttp2-client) when installed, else eir.interfaces.sbi's H2Client (Python, one
connection, which is then often the bound); `--client` chooses. h2load: `--connections C`
(default 1 per worker) with `--concurrency N` streams in flight on each (default 64; the
server allows 128), the request mix's URLs in turn, p50/p99 from its per-request log. The Python client: one connection, N
requests in flight, 5 rounds after a warm-up (req/s the median round), every verdict of
the mix checked against the list. Shown: requests/s, the server's CPU time per request
(the supervisor and its workers, from /proc), and the CPU the rest of the machine used.

With taskset, two or more cores and one worker, the server is pinned to core 0 and the
client to core 1; with more workers nothing is pinned (the whole machine).

    python3 bench/sbi.py [--quick] [--count N] [--workers N] [--generic | --baseline]
                         [--client auto|h2load|python] [--connections C] [--concurrency N]
    # last line: JSON figures (keys: see `figures` below)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
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


def server_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its children (a supervisor's workers)."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(server_cpu_seconds(int(child)) for child in children)


def run_h2load(urls: list[str], count: int, connections: int, concurrency: int,
               scratch: Path, core: int | None) -> dict:
    """h2load over `connections` connections, `concurrency` streams each: req/s, the
    count of requests that got no answer, and p50/p99 (from a request's start to its whole
    answer)."""
    listing = scratch / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    timings = scratch / "h2load.log"  # per request: start, status, µs to the whole answer
    command = ["h2load", "-n", str(count), "-c", str(connections), "-m", str(concurrency),
               "-t", str(min(connections, 2)), "-i", str(listing), f"--log-file={timings}"]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", done.stdout)
    # h2load counts 4xx answers (the mix's unknown IMEIs: 404) as "failed"; errors are
    # requests without an answer.
    errored = re.search(r"requests: .* (\d+) errored, (\d+) timeout", done.stdout)
    if rate is None or errored is None:
        raise SystemExit(f"h2load: {done.stdout}\n{done.stderr}")
    latencies = sorted(int(line.split("\t")[2]) for line in
                       timings.read_text().splitlines() if line.count("\t") == 2)
    return {"per_s": float(rate.group(1)),
            "failed": int(errored.group(1)) + int(errored.group(2)),
            "p50_us": percentile(latencies, 0.5), "p99_us": percentile(latencies, 0.99)}


def measure_server(args, workload, lists: Path, paths: list[str], expected: list[str],
                   scratch: Path, fast: bool) -> dict:
    count = args.count or (20_000 if args.quick else 200_000)
    config = scratch / f"sbi-{fast}.yaml"
    config.write_text(f"sbi:\n  fast_path: {str(fast).lower()}\n")
    whole_machine = args.workers > 1
    prefix, client_core, pinned = ([], None, "not pinned: the whole machine") \
        if whole_machine else pinning()
    server = start_eir("--sbi", "127.0.0.1:0", "--workers", str(args.workers), "--config",
                       str(config), lists=[lists], cwd=scratch, prefix=prefix, timeout=120)
    try:
        url = server.wait_for_log(SERVED, timeout=30).group(1)
        other = OtherLoad()
        cpu_before, own_before = server_cpu_seconds(server.process.pid), time.process_time()
        if args.client == "h2load":
            connections = args.connections or args.workers
            figures = run_h2load([url + path for path in paths], count, connections,
                                 args.concurrency, scratch, client_core)
            total = count
            if figures["failed"]:
                raise SystemExit(f"h2load: {figures['failed']} requests not answered")
        else:
            connections = 1
            if client_core is not None:
                pin_to(client_core)
            figures = asyncio.run(measure(url, paths, count, args.concurrency, expected))
            total = max(len(paths), count // 10) + (count // ROUNDS) * ROUNDS
        server_cpu = server_cpu_seconds(server.process.pid) - cpu_before
        own_cpu = time.process_time() - own_before
        busy = other.cpus(server_cpu + own_cpu)
    finally:
        server.stop()
    return {"per_s": figures["per_s"], "server_us": server_cpu / total * 1e6,
            "p50_us": figures["p50_us"], "p99_us": figures["p99_us"],
            "checked": figures.get("checked", 0), "busy": busy, "pinned": pinned,
            "connections": connections, "count": total}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI)")
    parser.add_argument("--count", type=int, help="measured requests (default 200,000; "
                        "20,000 with --quick)")
    parser.add_argument("--workers", type=int, default=1, help="eir serve --workers")
    parser.add_argument("--generic", action="store_true",
                        help="sbi.fast_path false: h2 does every frame")
    parser.add_argument("--baseline", action="store_true",
                        help="run with the fast path, then without, and show the ratio")
    parser.add_argument("--client", choices=("auto", "h2load", "python"), default="auto")
    parser.add_argument("--connections", type=int, help="h2load connections (default: one "
                        "per worker)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="requests in flight per connection (default 64)")
    args = parser.parse_args(argv)
    if args.client == "auto":
        args.client = "h2load" if shutil.which("h2load") else "python"
    workload = build_workload()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        lists = workload.write_csv(scratch / "bench.csv")
        rule_set = load_rule_set([lists], UnknownPolicy.UNKNOWN)
        paths = request_paths(workload)
        expected = []
        for imei, imsi in workload.probes:
            status = rule_set.decide(imei[:14], imsi).status
            expected.append(status.name if status is not None else "UNKNOWN")
        runs = [not args.generic] + ([False] if args.baseline and not args.generic else [])
        measured = {fast: measure_server(args, workload, lists, paths, expected, scratch,
                                         fast) for fast in runs}
    first = measured[runs[0]]
    result = {
        "sbi_client": args.client,
        "sbi_workers": args.workers,
        "sbi_connections": first["connections"],
        "sbi_concurrency": args.concurrency,
        "sbi_fast_path": runs[0],
        "sbi_req_per_s": round(first["per_s"]),
        "sbi_server_us_per_request": round(first["server_us"], 1),
        "other_cpus": round(first["busy"], 2),
    }
    result["sbi_p50_ms"] = round(first["p50_us"] / 1e3, 3)
    result["sbi_p99_ms"] = round(first["p99_us"] / 1e3, 3)
    if first["connections"] == 1:  # the key bench/run.py has read so far
        result["sbi_req_per_s_one_conn"] = result["sbi_req_per_s"]
    if args.client == "python":
        result["sbi_verdicts_checked"] = first["checked"]
    if len(runs) == 2:
        generic = measured[False]
        result["sbi_generic_req_per_s"] = round(generic["per_s"])
        result["sbi_generic_server_us_per_request"] = round(generic["server_us"], 1)
        result["sbi_speedup_cpu"] = round(generic["server_us"] / first["server_us"], 2)
    for fast, figures in measured.items():
        print(f"N5g-eir, {'fast path' if fast else 'h2 generic path'}, {args.workers} "
              f"worker(s), client {args.client}: {figures['connections']} connection(s) x "
              f"{args.concurrency} streams, {figures['count']:,} requests "
              f"({figures['pinned']}):")
        print(f"  {figures['per_s']:,.0f} req/s, server CPU {figures['server_us']:.1f} "
              f"µs/request, p50 {figures['p50_us'] / 1e3:.3f} ms, p99 "
              f"{figures['p99_us'] / 1e3:.3f} ms" + (
                  f", {figures['checked']} verdicts checked" if figures["checked"] else ""))
        note = load_note(figures["busy"])
        if note:
            print("  " + note)
    if len(runs) == 2:
        print(f"  fast path: {result['sbi_speedup_cpu']}x less server CPU per request")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
