"""README's load table: `eir serve` at 25/50/80/100% of its maximum on one connection,
driven by `eir replay` and by the mme-sim (freeDiameter), beside a python-diameter S13 server
driven the same way.

For each server (`eir serve`, then bench/pydiameter_eir.py), on the same list (hotpath.py's
105,000 rules) and the same request mix:

1. `eir replay` flat out on one connection (window 128) for S seconds: the maximum.
2. `eir replay --rate` at 25, 50 and 80% of that maximum: achieved rate, p50, p99 (from each
   request's scheduled send time, so queueing behind a stall is counted).
3. The mme-sim (testbed/mme-sim, built here with make) in freeDiameterd, flat out (window 128),
   then paced at 25, 50 and 80% of its own maximum: achieved rate, p50, p99 from its answer log.

Servers run on core 0 and the load generators on core 1 (taskset), one at a time. Ratios are
eir / python-diameter at the same share of each one's own maximum. Every run's errors (answers
that are not a verdict, timeouts) are counted and shown.

    python3 bench/load_table.py [--quick] [--seconds S] [--update-readme]

The last line printed is one JSON object with every figure. --update-readme rewrites the table
between the `load-table` markers in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hotpath  # first: it puts the checkout and tests/ on sys.path
from e2e import pinning
from helpers_process import LoggedProcess, start_eir, start_server  # from tests/
from hotpath import build_workload

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MME_SIM = ROOT / "testbed" / "mme-sim"
SHARES = (25, 50, 80)
DICTIONARIES = ("dict_nasreq", "dict_eap", "dict_dcca", "dict_dcca_3gpp")
README_START, README_END = "<!-- load-table:start -->", "<!-- load-table:end -->"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- drivers -------------------------------------------------------------------------------

def replay(port: int, mix: Path, seconds: float, rate: float | None, core_prefix,
           connections: int = 1, processes: int = 1) -> dict:
    """One `eir replay` run (one connection unless told); its JSON report, trimmed to what
    we show."""
    command = core_prefix + [sys.executable, "-m", "eir", "replay", "--target",
                             f"127.0.0.1:{port}", "--connections", str(connections),
                             "--processes", str(processes), "--mix", str(mix),
                             "--duration", str(seconds), "--json"]
    if rate:
        command += ["--rate", f"{rate:.0f}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if result.returncode != 0:
        raise SystemExit(f"eir replay failed ({result.returncode}): {result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    latency = report["latency_ms"]
    return {"rate": report["rate_per_s"], "p50_ms": latency["p50"], "p99_ms": latency["p99"],
            "errors": report["errors"], "sent": report["sent"]}


def build_mme_sim(directory: Path) -> Path:
    subprocess.run(["make", "-s", "-C", str(MME_SIM), f"BUILD_DIR={directory}"], check=True,
                   capture_output=True, timeout=300)
    return directory / "mme_sim.fdx"


def mme_sim_config(extension: Path, work: Path, port: int, peer: str, mix: Path, count: int,
                   rate: float, answers: Path, destination_host: str | None) -> Path:
    """freeDiameterd's configuration for one mme_sim run towards `peer` at
    127.0.0.1:`port` (with `destination_host`, or none: a DRA chooses); its path."""
    settings = work / "mme_sim.conf"
    host = f"destination_host = {destination_host}\n" if destination_host else ""
    settings.write_text(f"csv = {mix}\noutput = {answers}\ndestination_realm = localdomain\n"
                        f"{host}rate = {rate:.0f}\nwindow = 128\ncount = {count}\n"
                        "answer_timeout_ms = 5000\npeer_wait_s = 30\n")
    config = work / "freediameter.conf"
    config.write_text(
        'Identity = "mme.localdomain";\nRealm = "localdomain";\n'
        f"Port = {_free_port()};\nSecPort = 0;\nNo_SCTP;\nNo_IPv6;\n"
        'ListenOn = "127.0.0.1";\nTcTimer = 30;\nTwTimer = 30;\nAppServThreads = 2;\n'
        + "".join(f'LoadExtension = "/usr/lib/freeDiameter/{name}.fdx";\n'
                  for name in DICTIONARIES)
        + f'LoadExtension = "{extension}" : "{settings}";\n'
        f'ConnectPeer = "{peer}" {{ ConnectTo = "127.0.0.1"; Port = {port}; No_TLS; '
        "No_SCTP; };\n")
    return config


def mme_sim(extension: Path, work: Path, port: int, peer: str, mix: Path, count: int,
            rate: float, core_prefix) -> dict:
    """One freeDiameterd + mme_sim run: `count` ECRs at `rate` (0: flat out, window 128)."""
    work.mkdir(parents=True, exist_ok=True)
    answers = work / "answers.log"
    config = mme_sim_config(extension, work, port, peer, mix, count, rate, answers,
                            destination_host=peer)
    process = subprocess.Popen(core_prefix + ["freeDiameterd", "-c", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, errors="replace")
    sim = LoggedProcess(process, process.stdout, "freeDiameterd with mme_sim")
    try:
        sim.wait_for_line(r"mme_sim: summary", 0, 120.0)
        process.wait(30)
    finally:
        sim.kill()
    lines = answers.read_text().splitlines()
    summary = dict(item.split("=", 1) for item in lines[-1].split()[1:])
    latencies = [int(line.rsplit("latency_us=", 1)[1]) / 1000 for line in lines[:-1]
                 if line.startswith("answer ")]
    return {"rate": float(summary["rate_per_s"]), "p50_ms": percentile(latencies, .5),
            "p99_ms": percentile(latencies, .99), "errors": int(summary["errors"]),
            "sent": int(summary["sent"])}


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the run -------------------------------------------------------------------------------

def measure(name: str, server, peer: str, mix: Path, extension: Path | None, work: Path,
            seconds: float, client_prefix) -> dict:
    port = server.address[1]
    rows: dict = {}
    best = replay(port, mix, seconds, None, client_prefix)
    rows["replay", 100] = best
    print(f"  {name}, eir replay flat out: {best['rate']:,.0f} ECR/s, p99 {best['p99_ms']:.2f} ms",
          flush=True)
    for share in SHARES:
        rows["replay", share] = replay(port, mix, seconds, best["rate"] * share / 100,
                                       client_prefix)
        print(f"  {name}, eir replay at {share}%: {rows['replay', share]}", flush=True)
    if extension is not None:
        count = max(2_000, int(best["rate"] * seconds))
        top = mme_sim(extension, work / f"{name}-sim-100", port, peer, mix, count, 0,
                      client_prefix)
        rows["mme-sim", 100] = top
        print(f"  {name}, mme-sim flat out: {top['rate']:,.0f} ECR/s", flush=True)
        for share in SHARES:
            rate = top["rate"] * share / 100
            rows["mme-sim", share] = mme_sim(
                extension, work / f"{name}-sim-{share}", port, peer, mix,
                max(500, int(rate * seconds)), rate, client_prefix)
            print(f"  {name}, mme-sim at {share}%: {rows['mme-sim', share]}", flush=True)
    return rows


def table(ours: dict, theirs: dict) -> str:
    lines = ["| driver | load | open EIR ECR/s | p50 ms | p99 ms | errors "
             "| python-diameter ECR/s | p50 ms | p99 ms | errors | throughput ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for driver in ("replay", "mme-sim"):
        for share in (*SHARES, 100):
            a, b = ours.get((driver, share)), theirs.get((driver, share))
            if a is None or b is None:
                continue
            load = "max" if share == 100 else f"{share}%"
            lines.append(
                f"| {'eir replay' if driver == 'replay' else 'mme-sim (freeDiameter)'} | {load} "
                f"| {a['rate']:,.0f} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['errors']} "
                f"| {b['rate']:,.0f} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {b['errors']} "
                f"| {a['rate'] / b['rate']:.1f}× |")
    return "\n".join(lines)


def update_readme(text: str, note: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = content.find(README_START), content.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme}: no {README_START} … {README_END} markers")
    content = (content[:start + len(README_START)] + "\n" + note + "\n\n" + text + "\n"
               + content[end:])
    readme.write_text(content)


def write_inputs(workload, work: Path) -> tuple[Path, Path]:
    """The workload's list (bench.csv) and request mix (mix.csv, imei,imsi) in `work`."""
    csv_path = workload.write_csv(work / "bench.csv")
    mix = work / "mix.csv"
    mix.write_text("imei,imsi\n" + "".join(f"{imei},{imsi}\n"
                                           for imei, imsi in workload.probes))
    return csv_path, mix


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1.5 s per run (CI smoke)")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 5)")
    parser.add_argument("--no-mme-sim", action="store_true", help="eir replay only")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args(argv)
    seconds = args.seconds or (1.5 if args.quick else 5.0)
    server_prefix, client_core, pinned = pinning()
    client_prefix = ["taskset", "-c", str(client_core)] if client_core is not None else []
    use_sim = not args.no_mme_sim and shutil.which("freeDiameterd") and shutil.which("make")
    started = time.time()
    workload = build_workload()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv_path, mix = write_inputs(workload, work)
        extension = build_mme_sim(work / "mme-sim") if use_sim else None
        print(f"load table: {len(workload.rows):,} list rows, {len(workload.probes):,}-request "
              f"mix, {seconds} s per run, one connection; {pinned}", flush=True)
        eir = start_eir("--unknown", "unknown", "--log-level", "info", lists=[csv_path],
                        prefix=server_prefix, timeout=60.0, cwd=work)
        try:
            ours = measure("eir", eir, "eir.localdomain", mix, extension, work, seconds,
                           client_prefix)
        finally:
            eir.stop()
        pd = start_server(server_prefix + [sys.executable, str(BENCH / "pydiameter_eir.py"),
                                           "--listen", "127.0.0.1:0", "--list", str(csv_path)],
                          timeout=60.0)
        try:
            theirs = measure("python-diameter", pd, "eir-pd.localdomain", mix, extension,
                             work, seconds, client_prefix)
        finally:
            pd.stop()
    text = table(ours, theirs)
    print()
    print(text)
    note = (f"`python3 bench/load_table.py` on {time.strftime('%Y-%m-%d', time.gmtime(started))}"
            f" ({seconds:g} s per run; {pinned}; {os.cpu_count()} cores, shared VM):")
    if args.update_readme:
        update_readme(text, note)
    figures = {f"{server}_{driver}_{share}": row for server, rows in
               (("eir", ours), ("python_diameter", theirs))
               for (driver, share), row in rows.items()}
    figures["seconds_per_run"] = seconds
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
