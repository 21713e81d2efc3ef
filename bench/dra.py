"""The DRA's own cost: ECRs through freeDiameter's relay against ECRs sent to an EIR directly.

    python3 bench/dra.py [--count 20000] [--rate 5000] [--repeat 2]

The list and request mix are bench/run.py's (hotpath.py's workload: 105,000 rules, 4,096
requests). The MME is mme_sim (testbed/mme-sim, freeDiameterd), window 128. Runs:

1. direct: mme_sim → one `eir serve --workers 1`;
2. via the DRA: mme_sim → freeDiameterd running testbed/dra/freediameter.conf (moved to
   loopback as tests/test_dra.py does) → two `eir serve --workers 1` nodes;

each flat out (`--count` ECRs) and at a fixed `--rate` (`--count` ECRs, or 3 s worth if
fewer). For each: ECR/s, latency p50/p99 (mme_sim's per-answer latencies) and the CPU time
each process used (/proc/PID/stat; the MME's from its rusage), as µs of CPU per ECR. The
DRA's cost is its own CPU per ECR, and what it adds to the MME's latency. Nothing is pinned:
four processes share the machine's cores (docs/SCALE-OUT.md says how to read that).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import hotpath  # first: it puts the checkout and tests/ on sys.path
from e2e import cpu_seconds
from helpers_process import LoggedProcess, start_eir
from hotpath import build_workload
from load_table import _free_port, build_mme_sim, mme_sim_config, percentile, write_inputs
from test_dra import NODE_A, NODE_B, loopback_dra_conf

DRA_IDENTITY = "dra.localdomain"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_mme(extension: Path, work: Path, port: int, peer: str, mix: Path, count: int,
            rate: float) -> dict:
    """One mme_sim run to `peer` at 127.0.0.1:`port`, no Destination-Host (a DRA chooses)."""
    work.mkdir(parents=True, exist_ok=True)
    answers = work / "answers.log"
    config = mme_sim_config(extension, work, port, peer, mix, count, rate, answers,
                            destination_host=None)
    before = children_cpu()
    process = subprocess.Popen(["freeDiameterd", "-c", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                               errors="replace")
    sim = LoggedProcess(process, process.stdout, "freeDiameterd with mme_sim")
    try:
        sim.wait_for_line(r"mme_sim: summary", 0, 120.0)
        process.wait(30)
    finally:
        sim.kill()
    mme_cpu = children_cpu() - before
    lines = answers.read_text().splitlines()
    summary = dict(item.split("=", 1) for item in lines[-1].split()[1:])
    if summary["outcome"] != "complete":
        print(f"  mme_sim: outcome={summary['outcome']}, sent {summary['sent']}; its log ends:\n"
              + "\n".join(sim.lines[-8:]), flush=True)
    latencies = [int(line.rsplit("latency_us=", 1)[1]) / 1000 for line in lines[:-1]
                 if line.startswith("answer ")]
    return {"rate": float(summary["rate_per_s"]), "answered": int(summary["answered"]),
            "errors": int(summary["errors"]), "timeouts": int(summary["timeouts"]),
            "p50_ms": percentile(latencies, .5), "p99_ms": percentile(latencies, .99),
            "mme_cpu_s": mme_cpu}


def measured(label: str, run, processes: dict[str, int]) -> dict:
    """`run()` (an mme_sim run), with the CPU seconds each of `processes` used meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    result = run()
    if not result["answered"]:
        print(f"  {label:<22} no answer: left out", flush=True)
        return result
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in processes.items()}
    cpu["mme"] = result.pop("mme_cpu_s")
    answered = max(result["answered"], 1)
    result["cpu_us_per_ecr"] = {name: round(seconds / answered * 1e6, 1)
                                for name, seconds in cpu.items()}
    per_ecr = result["cpu_us_per_ecr"]
    print(f"  {label:<22} {result['rate']:>8,.0f} ECR/s  p50 {result['p50_ms']:6.2f} ms  "
          f"p99 {result['p99_ms']:7.2f} ms  errors {result['errors']}  CPU µs/ECR: "
          + ", ".join(f"{name} {value}" for name, value in per_ecr.items()), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="ECRs per run")
    parser.add_argument("--rate", type=float, default=5_000, help="the fixed-rate runs' ECR/s")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each kind")
    args = parser.parse_args()
    workload = build_workload()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv_path, mix = write_inputs(workload, work)
        extension = build_mme_sim(work / "mme-sim")
        fixed_count = max(args.count, int(3 * args.rate))
        print(f"{len(workload.rows):,} list rows, {len(workload.probes):,}-request mix; "
              f"{args.count:,} ECRs flat out, {fixed_count:,} at {args.rate:,.0f}/s; "
              f"{os.cpu_count()} cores, nothing pinned", flush=True)

        def node(identity: str, port: int | None = None):
            listen = ["--listen", f"127.0.0.1:{port}"] if port else []
            return start_eir("--unknown", "unknown", "--workers", "1", "--origin-host",
                             identity, "--log-level", "info", *listen, lists=[csv_path],
                             timeout=60.0, cwd=work)

        direct = node("eir.localdomain")
        try:
            processes = {"eir": direct.process.pid}
            for index in range(args.repeat):
                for kind, rate, count in (("flat out", 0, args.count),
                                          (f"{args.rate:,.0f}/s", args.rate, fixed_count)):
                    results.setdefault(f"direct {kind}", []).append(measured(
                        f"direct, {kind}", lambda: run_mme(
                            extension, work / f"direct-{index}-{rate}", direct.port,
                            "eir.localdomain", mix, count, rate), processes))
        finally:
            direct.stop()

        ports = {NODE_A: _free_port(), NODE_B: _free_port()}
        nodes = [node(identity, port) for identity, port in ports.items()]
        dra_port = _free_port()
        config = work / "dra.conf"
        config.write_text(loopback_dra_conf(ports, dra_port))
        dra_process = subprocess.Popen(["freeDiameterd", "-c", str(config)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, text=True, errors="replace")
        dra = LoggedProcess(dra_process, dra_process.stdout, "freeDiameterd (DRA)")
        try:
            for identity in ports:
                dra.wait_for_line(rf"-> 'STATE_OPEN'\t'{identity}'", 0, 30.0)
            processes = {"dra": dra_process.pid, "eir-a": nodes[0].process.pid,
                         "eir-b": nodes[1].process.pid}
            for index in range(args.repeat):
                for kind, rate, count in (("flat out", 0, args.count),
                                          (f"{args.rate:,.0f}/s", args.rate, fixed_count)):
                    results.setdefault(f"via DRA {kind}", []).append(measured(
                        f"via the DRA, {kind}", lambda: run_mme(
                            extension, work / f"dra-{index}-{rate}", dra_port, DRA_IDENTITY,
                            mix, count, rate), processes))
        finally:
            dra.kill()
            for running in nodes:
                running.stop()
    print(json.dumps({"count": args.count, "rate": args.rate, "runs": results,
                      "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
