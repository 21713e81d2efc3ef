"""open EIR beside other EIRs: the same harness, mix and rates against each, in one run,
alternating, with the conformance table beside the figures.

Targets: `eir serve` (started here), and any of
  --pydiameter                 bench/pydiameter_eir.py started here on the same list;
  --peer NAME=HOST:PORT        an EIR already running (a vendor's, Open5GS's, PyHSS...);
  --pid NAME=PID[,PID...]      its processes, for CPU per ECR (PyHSS: diameterService.py and
                               hssService.py, and redis-server if you want it counted; for
                               a target started here, added to its own);
  --pyhss PATH                 a PyHSS checkout: its diameterService and hssService are
                               started here from PATH (with PATH/config.yaml, which must
                               listen on --pyhss-port; Redis must be running), and their PIDs
                               taken for CPU per ECR. See bench/RESULTS.md for its set-up.

For every rate (`--rates`, requests per second, `max` = flat out) and every round, each target
gets one `eir replay --json` run of `--seconds` on one connection, target after target (so a
machine's slow minute is spread over all of them). Shown per target and rate: ECR/s (median
over rounds), p50/p99 (median over rounds; from each request's scheduled send time when
paced), errors (answers that are not a verdict, lost requests), timeouts, and the server's
CPU per ECR (from /proc, when its PIDs are known). Then `eir conformance` against each target,
check by check, side by side.

Servers started here run on core 0 and `eir replay` on core 1 (taskset, when there are two
cores); a --peer is wherever it is: pin it yourself (`taskset -c 0 ...`) for fair figures.

    python3 bench/peers.py --pydiameter [--peer NAME=HOST:PORT --pid NAME=PID]...
                           [--rates 100,1000,max] [--seconds 5] [--rounds 2]
                           [--list FILE --mix FILE] [--expect LIST] [--unknown [NAME=]VERDICT]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import hotpath  # first: it puts the checkout and tests/ on sys.path
from e2e import cpu_seconds, pinning
from hotpath import OtherLoad
from helpers_process import LoggedProcess, start_eir, start_server  # from tests/
from load_table import write_inputs

from eir.conformance import (CHECKS, Expected, Identity, Probe, read_expectations,
                             run_checks)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TIMEOUT_S = 5.0  # eir replay --timeout: an answer later than this is a timeout


@dataclass
class Target:
    name: str
    host: str
    port: int
    pids: list[int] = field(default_factory=list)
    stop: callable = None  # stops what this script started


def replay_run(target: Target, mix: Path, seconds: float, rate: float | None,
               client_prefix: list[str]) -> dict:
    """One `eir replay` run on one connection; what it says, with the server's CPU."""
    command = client_prefix + [sys.executable, "-m", "eir", "replay", "--target",
                               f"{target.host}:{target.port}", "--mix", str(mix),
                               "--duration", str(seconds), "--timeout", str(TIMEOUT_S),
                               "--json", "--allow-remote"]
    if rate:
        command += ["--rate", f"{rate:g}"]
    cpu_before = sum(cpu_seconds(pid) for pid in target.pids)
    client_before = _children_cpu()
    other = OtherLoad()
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=seconds + TIMEOUT_S + 60)
    cpu = sum(cpu_seconds(pid) for pid in target.pids) - cpu_before
    other_cpus = other.cpus(cpu + _children_cpu() - client_before)
    if result.returncode != 0:
        return {"failed": result.stderr.strip().splitlines()[-1:] or [
            f"exit {result.returncode}"]}
    report = json.loads(result.stdout.strip().splitlines()[-1])
    latency = report["latency_ms"] or {}
    answered = report["answered"]
    return {"rate": report["rate_per_s"], "p50_ms": latency.get("p50"),
            "p99_ms": latency.get("p99"), "sent": report["sent"], "answered": answered,
            "errors": report["errors"] + report["lost"], "timeouts": report["timeouts"],
            "cpu_us_per_ecr": (cpu / answered * 1e6 if target.pids and answered else None),
            "other_cpus": round(other_cpus, 2)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def combine(runs: list[dict]) -> dict:
    """The rounds of one target at one rate: medians of the figures, sums of the counts."""
    good = [run for run in runs if "failed" not in run]
    if not good:
        return {"failed": runs[0]["failed"][0] if runs[0]["failed"] else "failed"}

    def median(key: str):
        values = [run[key] for run in good if run[key] is not None]
        return statistics.median(values) if values else None

    return {"rate": median("rate"), "p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"),
            "cpu_us_per_ecr": median("cpu_us_per_ecr"), "rounds": len(good),
            "other_cpus_max": max(run["other_cpus"] for run in good),
            "failed_rounds": len(runs) - len(good),
            **{key: sum(run[key] for run in good) for key in
               ("sent", "answered", "errors", "timeouts")}}


def conformance(target: Target, expectations, unknown: Expected) -> dict[str, str]:
    probe = Probe(target.host, target.port, Identity(), expectations=expectations,
                  unknown=unknown)
    try:
        results = asyncio.run(run_checks(probe))
    except Exception as exc:  # noqa: BLE001 -- whatever it is, it goes in the table
        return {c.name: f"error: {exc}" for c in CHECKS}
    return {r.name: r.outcome.status + (f" ({r.outcome.detail})"
                                        if r.outcome.status == "fail" else "")
            for r in results}


def _cell(row: dict) -> list[str]:
    if "failed" in row:
        return [f"failed: {row['failed']}"[:40], "", "", "", "", ""]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    return [fmt(row["rate"], ",.0f"), fmt(row["p50_ms"], ".2f"), fmt(row["p99_ms"], ".2f"),
            f"{row['errors']:,}", f"{row['timeouts']:,}", fmt(row["cpu_us_per_ecr"], ",.1f")]


def figures_table(targets: list[Target], rates: list[float | None], rows: dict) -> str:
    header = "| rate | " + " | ".join(
        f"{t.name} ECR/s | p50 ms | p99 ms | errors | timeouts | CPU µs/ECR" for t in targets)
    lines = [header + " |", "|---" + "|---:" * (6 * len(targets)) + "|"]
    for rate in rates:
        cells = [c for t in targets for c in _cell(rows[t.name, rate])]
        lines.append(f"| {'max' if rate is None else f'{rate:,.0f}/s'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def conformance_table(targets: list[Target], verdicts: dict) -> str:
    lines = ["| check | clause | " + " | ".join(t.name for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for check in CHECKS:
        lines.append(f"| {check.name} | {check.clause} | "
                     + " | ".join(verdicts[t.name][check.name].replace("|", "/")
                                  for t in targets) + " |")
    return "\n".join(lines)


def with_rows_of(list_path: Path, extra: Path, combined: Path) -> Path:
    """`list_path` and the data rows of `extra` (both native lists) in one file."""
    rows = [line for line in extra.read_text().splitlines()[1:] if line.strip()]
    combined.write_text(list_path.read_text().rstrip("\n") + "\n" + "\n".join(rows) + "\n")
    return combined


def parse_rates(text: str) -> list[float | None]:
    rates = []
    for item in text.split(","):
        item = item.strip()
        rates.append(None if item == "max" else float(item))
    return rates


def start_pyhss(path: Path, config: Path | None, port: int, prefix: list[str]) -> Target:
    """PyHSS's hssService and diameterService from a checkout, with `config` (else the
    checkout's config.yaml; its hss.bind_port must be `port`, its Redis running). Its Python
    is PATH/.venv/bin/python when there is one."""
    python = path / ".venv" / "bin" / "python"
    python = str(python) if python.exists() else sys.executable
    environment = dict(os.environ)
    if config is not None:
        environment["PYHSS_CONFIG"] = str(config.resolve())
    processes = []
    for service in ("hssService.py", "diameterService.py"):
        # stdout: its banner and log lines, kept for the error message if it does not start
        process = subprocess.Popen(prefix + [python, f"services/{service}"], cwd=path,
                                   env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True, errors="replace")
        processes.append(LoggedProcess(process, process.stdout, f"PyHSS {service}"))
    # Ready when it accepts a connection (its log lines vary between versions).
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            if time.monotonic() > deadline or any(p.process.poll() is not None
                                                  for p in processes):
                for p in processes:
                    p.kill()
                raise SystemExit(f"PyHSS in {path} did not listen on 127.0.0.1:{port}: "
                                 + "".join(p.log()[-2000:] for p in processes))
            time.sleep(0.2)

    def stop():
        for p in processes:
            p.kill()

    return Target("PyHSS", "127.0.0.1", port, [p.process.pid for p in processes], stop)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pydiameter", action="store_true",
                        help="also run bench/pydiameter_eir.py on the same list")
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT")
    parser.add_argument("--pid", action="append", default=[], metavar="NAME=PID[,PID]")
    parser.add_argument("--pyhss", type=Path, metavar="PATH", help="a PyHSS checkout")
    parser.add_argument("--pyhss-config", type=Path, metavar="FILE",
                        help="PyHSS's config.yaml (PYHSS_CONFIG; default: the checkout's)")
    parser.add_argument("--pyhss-port", type=int, default=3868,
                        help="the hss.bind_port of that config (default 3868)")
    parser.add_argument("--rates", default="100,1000,max",
                        help="requests per second, comma-separated; max = flat out")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per target and rate")
    parser.add_argument("--list", type=Path, help="the list eir serve and python-diameter "
                        "serve (default: hotpath.py's 105,000 rules)")
    parser.add_argument("--mix", type=Path, help="imei,imsi requests (default: hotpath.py's)")
    parser.add_argument("--expect", type=Path, default=ROOT / "config/lists/example.csv",
                        help="a native list: added to the list of the servers started here, "
                             "and the conformance run expects its verdicts from every target "
                             "(provision it in the others); default config/lists/example.csv")
    parser.add_argument("--unknown", action="append", default=[], metavar="[NAME=]VERDICT",
                        help="eir conformance --unknown for every target, or for NAME "
                             "(PyHSS answers its no_match_response, 2 = GREYLISTED, by "
                             "default); default 5422")
    args = parser.parse_args(argv)
    rates = parse_rates(args.rates)
    server_prefix, client_core, pinned = pinning()
    client_prefix = ["taskset", "-c", str(client_core)] if client_core is not None else []
    pids = {}
    for item in args.pid:
        name, _, numbers = item.partition("=")
        pids[name] = [int(n) for n in numbers.split(",")]
    expectations = read_expectations(args.expect)
    unknown = {"": Expected.parse("5422")}
    for item in args.unknown:
        name, _, verdict = item.rpartition("=")
        unknown[name] = Expected.parse(verdict)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.list is None or args.mix is None:
            list_path, mix = write_inputs(hotpath.build_workload(), work)
        list_path, mix = args.list or list_path, args.mix or mix
        list_path = with_rows_of(list_path, args.expect, work / "served.csv")
        targets: list[Target] = []
        try:
            eir = start_eir("--workers", "1", "--unknown", "unknown", lists=[list_path],
                            prefix=server_prefix,
                            timeout=60.0, cwd=work)
            targets.append(Target("open EIR", eir.host, eir.port, [eir.process.pid],
                                  eir.kill))
            if args.pydiameter:
                pd = start_server(server_prefix + [
                    sys.executable, str(BENCH / "pydiameter_eir.py"), "--listen",
                    "127.0.0.1:0", "--list", str(list_path)], timeout=60.0)
                targets.append(Target("python-diameter", pd.host, pd.port,
                                      [pd.process.pid], pd.kill))
            if args.pyhss is not None:
                targets.append(start_pyhss(args.pyhss, args.pyhss_config, args.pyhss_port,
                                           server_prefix))
            for item in args.peer:
                name, _, address = item.partition("=")
                host, _, port = address.rpartition(":")
                targets.append(Target(name, host.strip("[]"), int(port)))
            for target in targets:  # --pid adds to those started here too (PyHSS's Redis)
                target.pids += pids.get(target.name, [])
            print(f"peers: {', '.join(t.name for t in targets)}; mix {mix}; "
                  f"{args.seconds:g} s per run, {args.rounds} round(s); {pinned}", flush=True)
            runs: dict = {(t.name, rate): [] for t in targets for rate in rates}
            for rate in rates:
                for round_number in range(args.rounds):
                    order = targets if round_number % 2 == 0 else targets[::-1]
                    for target in order:
                        run = replay_run(target, mix, args.seconds, rate, client_prefix)
                        runs[target.name, rate].append(run)
                        print(f"  {target.name} at {rate or 'max'}: {run}", flush=True)
            verdicts = {t.name: conformance(t, expectations, unknown.get(t.name, unknown[""]))
                        for t in targets}
        finally:
            for target in targets:
                if target.stop is not None:
                    target.stop()
    rows = {key: combine(value) for key, value in runs.items()}
    print()
    print(figures_table(targets, rates, rows))
    others = [row["other_cpus_max"] for row in rows.values() if "other_cpus_max" in row]
    if others:
        print(f"\nother processes used up to {max(others):.2f} CPU (of {os.cpu_count()}) "
              "during a run" + (": the machine was not quiet, figures are low"
                                if max(others) > 0.10 else ""))
    print()
    print(conformance_table(targets, verdicts))
    result = {"pinning": pinned, "cores": os.cpu_count(), "seconds": args.seconds,
              "rounds": args.rounds,
              "figures": {f"{name}@{rate or 'max'}": row for (name, rate), row in rows.items()},
              "conformance": verdicts}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
