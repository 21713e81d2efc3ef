"""The issue-6 benchmark: every figure of the issue from one command, in one run, on one machine.

    python3 bench/run.py            # full run, about 3 minutes (+ ~1 min the first time: the
                                    # 10,000,000-entry snapshot is built once and cached)
    python3 bench/run.py --quick    # small variant for CI, under a minute, 1,000,000 entries

Parts, in order (the list and request mix are hotpath.py's: 105,000 rules, 4,096 requests):

1. hotpath.py (in-process: ECR bytes in, ECA bytes out) and, in the full run, e2e.py (its own
   pipelining client, eir against python-diameter); their output is shown as it comes.
2. One connection, one core: `eir serve --workers 1` pinned to core 0, the load generator
   pinned to core 1: `eir replay` flat out on one connection (window 128), and the mme-sim
   (freeDiameter, testbed/mme-sim) flat out when it is installed (full run): the maximum is
   the faster of the two. Then `eir replay --rate` at 50% and 80% of that maximum: p99 from
   each request's scheduled send time.
3. The python-diameter S13 server (pydiameter_eir.py) on the same core with the same load
   generators: its maximum, and the ratio.
4. The whole machine: `eir serve --workers N` (N = cores) unpinned, `eir replay` with
   several connections beside it (at a lower priority, `nice`, so that the server's workers
   get the cores first); the CPU each process used is printed: how the cores were split.
5. Resident memory per worker with a snapshot of 10,000,000 entries (1,000,000 with --quick):
   built once by bench/scale.py's generator and `eir sync`, cached under --cache; `eir serve
   --store --workers N` answers a short replay run on N connections, then each process's RSS
   and Pss (/proc/PID/smaps_rollup) and the snapshot mapping's resident share are read.

The last line printed is one JSON object: `ecr_per_s_one_conn`, `ecr_per_s_machine`,
`p99_ms_at_50pct`, `p99_ms_at_80pct`, `ratio_vs_python_diameter`, and the rest. A missed target
is printed, never an exit status (unless --require-target is given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hotpath  # first: it puts the checkout and tests/ on sys.path
from e2e import cpu_seconds, pinning
from helpers_process import start_eir, start_server  # from tests/
from hotpath import OtherLoad, build_workload
from load_table import build_mme_sim, mme_sim, replay, write_inputs

BENCH = Path(__file__).resolve().parent
TARGETS = {  # issue 6; (figure, at least or at most)
    "ecr_per_s_one_conn": (50_000, ">="),
    "ecr_per_s_machine": (90_000, ">="),
    "p99_ms_at_50pct": (1.0, "<="),
    "p99_ms_at_80pct": (5.0, "<="),
    "ratio_vs_python_diameter": (40.0, ">="),
}
PAIR_IMSI = "510101234567890"


def run_part(script: str, extra: list[str]) -> dict:
    """Run bench/SCRIPT, echo its output, return the JSON object on its last line."""
    command = [sys.executable, str(BENCH / script), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    last = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.strip():
            last = line
    if process.wait() != 0:
        raise SystemExit(f"{script} failed (exit {process.returncode})")
    return json.loads(last)


def met(name: str, value: float) -> bool:
    target, sense = TARGETS[name]
    return value >= target if sense == ">=" else value <= target


# -- processes and their CPU ---------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS from /proc/PID/status; Pss, Pss_Anon, Pss_File from smaps_rollup when there."""
    figures = {}
    for name, keys in (("status", ("VmRSS", "RssAnon", "RssFile")),
                       ("smaps_rollup", ("Pss", "Pss_Anon", "Pss_File"))):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                key = line.split(":", 1)[0]
                if key in keys:
                    figures[key] = int(line.split()[1])
        except OSError:
            pass
    return figures


class CpuSplit:
    """CPU seconds each named process (and its descendants) used between start and stop."""

    def __init__(self, named: dict[str, int]):
        self.named = named
        self.before = {name: self._cpu(pid) for name, pid in named.items()}
        self.started = time.monotonic()

    @staticmethod
    def _cpu(pid: int) -> float:
        seconds = [cpu_seconds(p) for p in [pid, *descendants(pid)]]
        return sum(s for s in seconds if s == s)  # nan: a process that has just ended

    def stop(self) -> dict[str, float]:
        """CPUs (CPU seconds per second of wall time) of each named process."""
        wall = time.monotonic() - self.started
        return {name: (self._cpu(pid) - self.before[name]) / wall
                for name, pid in self.named.items()}


def replay_process(port: int, mix: Path, seconds: float, prefix: list[str],
                   connections: int, processes: int) -> subprocess.Popen:
    """`eir replay` flat out, started and not waited for (its CPU is watched meanwhile)."""
    command = prefix + [sys.executable, "-m", "eir", "replay", "--target", f"127.0.0.1:{port}",
                        "--connections", str(connections), "--processes", str(processes),
                        "--mix", str(mix), "--duration", str(seconds), "--json"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def replay_result(process: subprocess.Popen, seconds: float) -> dict:
    out, err = process.communicate(timeout=seconds + 60)
    if process.returncode != 0:
        raise SystemExit(f"eir replay failed ({process.returncode}): {err[-2000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    return {"rate": report["rate_per_s"], "p50_ms": report["latency_ms"]["p50"],
            "p99_ms": report["latency_ms"]["p99"], "errors": report["errors"],
            "sent": report["sent"]}


# -- the parts -----------------------------------------------------------------------------

def flat_out(name: str, server, peer: str, mix: Path, extension: Path | None, work: Path,
             seconds: float, client_prefix: list[str]) -> dict:
    """A server's maximum on one connection: eir replay, and the mme-sim when there."""
    load = OtherLoad()
    cpu_before = cpu_seconds(server.process.pid)
    runs = {"replay": replay(server.port, mix, seconds, None, client_prefix)}
    cpu = cpu_seconds(server.process.pid) - cpu_before
    other = load.cpus(cpu)
    print(f"  {name:<18} eir replay flat out: {runs['replay']['rate']:>8,.0f} ECR/s, "
          f"p99 {runs['replay']['p99_ms']:.2f} ms, errors {runs['replay']['errors']}; server "
          f"CPU {cpu * 1e6 / max(1, runs['replay']['sent']):.1f} µs/ECR; "
          f"{hotpath.load_note(other)}", flush=True)
    if extension is not None:
        count = max(2_000, int(runs["replay"]["rate"] * seconds * 1.2))
        sim = mme_sim(extension, work / f"{name.replace(' ', '-')}-sim", server.port, peer,
                      mix, count, 0, client_prefix)
        if sim["sent"] and sim["rate"] > 0:
            runs["mme-sim"] = sim
            print(f"  {name:<18} mme-sim flat out:    {sim['rate']:>8,.0f} ECR/s, "
                  f"p99 {sim['p99_ms']:.2f} ms, errors {sim['errors']}", flush=True)
        else:  # seen on a loaded machine: freeDiameterd did not get the peer up in time
            print(f"  {name:<18} mme-sim flat out: no answer ({sim['sent']} sent), left out",
                  flush=True)
    driver = max(runs, key=lambda key: runs[key]["rate"])
    return {"rate": runs[driver]["rate"], "driver": driver, "runs": runs, "other_cpus": other}


def one_connection(csv_path: Path, mix: Path, extension: Path | None, work: Path,
                   seconds: float, server_prefix: list[str], client_prefix: list[str],
                   profile: Path | None) -> dict:
    # py-spy writes its profile on SIGINT; SIGTERM would lose it.
    profiler = (["py-spy", "record", "-r", "250", "--nonblocking", "-f", "raw", "-o",
                 str(profile), "--"] if profile else [])
    eir = start_eir("--unknown", "unknown", "--log-level", "info", "--workers", "1",
                    lists=[csv_path], prefix=server_prefix + profiler, timeout=60.0, cwd=work)
    try:
        best = flat_out("eir serve", eir, "eir.localdomain", mix, extension, work, seconds,
                        client_prefix)
        paced = {}
        for share in (50, 80):
            paced[share] = replay(eir.port, mix, seconds, best["rate"] * share / 100,
                                  client_prefix)
            row = paced[share]
            print(f"  {'eir serve':<18} eir replay at {share}% ({best['rate'] * share / 100:,.0f}"
                  f"/s): {row['rate']:,.0f} ECR/s, p50 {row['p50_ms']:.2f} ms, p99 "
                  f"{row['p99_ms']:.2f} ms, errors {row['errors']}", flush=True)
    finally:
        eir.stop(signal.SIGINT if profile else signal.SIGTERM, timeout=30.0)
    return {"best": best, "paced": paced}


def profile_top(path: Path, count: int = 15) -> list[tuple[str, float]]:
    """Self time per function of a py-spy raw profile, as a share of the samples taken
    while the server was serving (under the event loop: start-up left out)."""
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if "run_forever" not in stack:
            continue
        name, _, where = stack.rsplit(";", 1)[-1].partition(" (")
        function = f"{name} ({Path(where.split(':')[0]).name})"
        own[function] = own.get(function, 0) + int(samples)
        total += int(samples)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:count]
    return [(function, samples / total) for function, samples in ranked]


def python_diameter(csv_path: Path, mix: Path, extension: Path | None, work: Path,
                    seconds: float, server_prefix: list[str], client_prefix: list[str]) -> dict:
    server = start_server(server_prefix + [sys.executable, str(BENCH / "pydiameter_eir.py"),
                                           "--listen", "127.0.0.1:0", "--list", str(csv_path)],
                          timeout=60.0)
    try:
        return flat_out("python-diameter", server, "eir-pd.localdomain", mix, extension, work,
                        seconds, client_prefix)
    finally:
        server.stop()


def whole_machine(csv_path: Path, mix: Path, work: Path, seconds: float, workers: int,
                  connections: int, processes: int, nice: int) -> dict:
    eir = start_eir("--unknown", "unknown", "--log-level", "info", "--workers", str(workers),
                    lists=[csv_path], timeout=60.0, cwd=work)
    prefix = ["nice", "-n", str(nice)] if nice else []
    try:
        load = replay_process(eir.port, mix, seconds, prefix, connections, processes)
        # The split is read while the load runs: from after its start-up (imports, workload,
        # CER) to before its end.
        time.sleep(1.0)
        split = CpuSplit({"eir serve": eir.process.pid, "eir replay": load.pid})
        time.sleep(seconds / 2)
        cpus = split.stop()
        result = replay_result(load, seconds)
    finally:
        eir.stop()
    how = (f"eir serve --workers {workers} (supervisor + {workers} workers, unpinned), "
           f"eir replay --connections {connections} --processes {processes}"
           f"{f' at nice {nice}' if nice else ''} (unpinned); CPUs used: "
           + ", ".join(f"{name} {value:.2f}" for name, value in cpus.items()))
    print(f"  whole machine: {result['rate']:,.0f} ECR/s, p50 {result['p50_ms']:.2f} ms, p99 "
          f"{result['p99_ms']:.2f} ms, errors {result['errors']}\n    {how}", flush=True)
    return {"result": result, "split": how, "cpus": cpus}


def cached_snapshot(cache: Path, entries: int) -> tuple[Path, Path, float]:
    """(store, mix of listed IMEIs, seconds spent building): built once per size, reused."""
    import scale  # numpy: only this part needs it

    directory = cache / f"{entries}"
    store, mix = directory / "store", directory / "mix.csv"
    if mix.is_file() and any((store / "snapshots").glob("*.eirsnap")):
        return store, mix, 0.0
    shutil.rmtree(directory, ignore_errors=True)
    source = directory / "source"
    source.mkdir(parents=True)
    started = time.perf_counter()
    data = scale.generate(source, entries, 20_000, 1.0, 0.9, 0.1, 20_200_915, 4_096, 0.05)
    scale.run_sync(source, store, directory)
    shutil.rmtree(source)  # the CSV lists are not needed again; the store is
    mix.write_text("imei,imsi\n" + "".join(f"{int(key):014d},{PAIR_IMSI}\n"
                                           for key in data.sample))
    return store, mix, time.perf_counter() - started


def resident_memory(cache: Path, entries: int, workers: int, seconds: float) -> dict:
    from scale import _mapping_rss

    store, mix, built = cached_snapshot(cache, entries)
    snapshot = sorted((store / "snapshots").glob("*.eirsnap"))[-1]
    note = f"built in {built:.0f} s" if built else "cached"
    print(f"  snapshot {snapshot.name}: {entries:,} entries, "
          f"{snapshot.stat().st_size / 2**20:,.0f} MB ({note}, {store})", flush=True)
    with tempfile.TemporaryDirectory() as run_dir:
        eir = start_eir("--store", str(store), "--workers", str(workers), "--log-level", "info",
                        lists=[], timeout=120.0, cwd=Path(run_dir))
        try:
            answered = replay(eir.port, mix, seconds, None, [], connections=workers)
            pids = {"supervisor" if workers > 1 else "eir serve": eir.process.pid}
            for index, pid in enumerate(sorted(descendants(eir.process.pid))):
                pids[f"worker {index}"] = pid
            figures = {}
            for name, pid in pids.items():
                kb = memory_kb(pid)
                kb["snapshot_rss"] = _mapping_rss(pid, snapshot) // 1024
                figures[name] = kb
                pss = f", Pss {kb['Pss'] / 1024:,.1f} MB" if "Pss" in kb else ""
                print(f"  {name:<12} VmRSS {kb.get('VmRSS', 0) / 1024:7,.1f} MB (anon "
                      f"{kb.get('RssAnon', 0) / 1024:,.1f}, file "
                      f"{kb.get('RssFile', 0) / 1024:,.1f}){pss}; snapshot mapping resident "
                      f"{kb['snapshot_rss'] / 1024:,.1f} MB", flush=True)
        finally:
            eir.stop()
    print(f"  (after answering {answered['sent']:,} ECRs of listed IMEIs on {workers} "
          f"connection(s), {answered['errors']} errors)", flush=True)
    workers_only = [kb for name, kb in figures.items() if name.startswith("worker")] or \
        list(figures.values())
    return {"entries": entries, "snapshot_mb": round(snapshot.stat().st_size / 2**20, 1),
            "processes": figures,
            "rss_mb_per_worker": round(max(kb.get("VmRSS", 0) for kb in workers_only) / 1024, 1),
            "pss_mb_per_worker": round(max(kb.get("Pss", 0) for kb in workers_only) / 1024, 1)
            if all("Pss" in kb for kb in workers_only) else None}


# -- the run -------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small variant for CI (under a minute, 1,000,000 entries)")
    parser.add_argument("--seconds", type=float, help="seconds per load run (default 5; 1.5 "
                        "with --quick)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="workers for the whole-machine and memory parts (default: cores)")
    parser.add_argument("--machine-connections", type=int, default=2,
                        help="eir replay connections in the whole-machine part")
    parser.add_argument("--machine-processes", type=int, default=1,
                        help="eir replay processes in the whole-machine part")
    parser.add_argument("--nice", type=int, default=5,
                        help="niceness of the load generator in the whole-machine part")
    parser.add_argument("--entries", type=int,
                        help="snapshot entries for the memory part (default 10,000,000; "
                        "1,000,000 with --quick; 0: skip the part)")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "eir-bench-cache",
                        help="where the snapshots of the memory part are kept between runs")
    parser.add_argument("--no-mme-sim", action="store_true", help="eir replay only")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="record the one-connection server with py-spy (raw format) into "
                        "FILE and print its top entries")
    parser.add_argument("--require-target", action="store_true",
                        help="exit 1 when a target is missed (never the default)")
    args = parser.parse_args()
    seconds = args.seconds or (1.5 if args.quick else 5.0)
    entries = args.entries if args.entries is not None else (
        1_000_000 if args.quick else 10_000_000)
    started = time.monotonic()

    hot = run_part("hotpath.py", ["--quick"] if args.quick else [])
    e2e = None if args.quick else run_part("e2e.py", [])
    print()

    server_prefix, client_core, pinned = pinning()
    client_prefix = ["taskset", "-c", str(client_core)] if client_core is not None else []
    use_sim = (not args.quick and not args.no_mme_sim and shutil.which("freeDiameterd")
               and shutil.which("make"))
    workload = build_workload()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv_path, mix = write_inputs(workload, work)
        extension = build_mme_sim(work / "mme-sim") if use_sim else None
        print(f"issue-6 benchmark ({'quick' if args.quick else 'full'}): {len(workload.rows):,} "
              f"list rows, {len(workload.probes):,}-request mix, {seconds:g} s per load run; "
              f"{os.cpu_count()} cores; load generators: eir replay"
              f"{' and the mme-sim (freeDiameter)' if extension else ''}", flush=True)
        print(f"one connection, one core ({pinned}):", flush=True)
        ours = one_connection(csv_path, mix, extension, work, seconds, server_prefix,
                              client_prefix, args.profile)
        print(f"python-diameter S13 server, same harness ({pinned}):", flush=True)
        theirs = python_diameter(csv_path, mix, extension, work, seconds, server_prefix,
                                 client_prefix)
        print(f"whole machine ({os.cpu_count()} cores, {args.machine_connections} "
              "connections):", flush=True)
        machine = whole_machine(csv_path, mix, work, seconds, args.workers,
                                args.machine_connections, args.machine_processes, args.nice)
    memory = None
    if entries:
        print(f"resident memory, eir serve --store --workers {args.workers}:", flush=True)
        memory = resident_memory(args.cache, entries, args.workers, min(seconds, 3.0))

    figures = {
        "ecr_per_s_one_conn": round(ours["best"]["rate"]),
        "ecr_per_s_machine": round(machine["result"]["rate"]),
        "p99_ms_at_50pct": ours["paced"][50]["p99_ms"],
        "p99_ms_at_80pct": ours["paced"][80]["p99_ms"],
        "ratio_vs_python_diameter": round(ours["best"]["rate"] / theirs["rate"], 2),
        "python_diameter_ecr_per_s": round(theirs["rate"]),
        "one_conn_driver": ours["best"]["driver"],
        "one_conn_replay_ecr_per_s": round(ours["best"]["runs"]["replay"]["rate"]),
        "one_conn_p99_ms_flat_out": ours["best"]["runs"][ours["best"]["driver"]]["p99_ms"],
        "other_cpu_load_one_conn": round(ours["best"]["other_cpus"], 2),
        "machine_workers": args.workers,
        "machine_cpus": {k: round(v, 2) for k, v in machine["cpus"].items()},
        "hotpath_ecr_per_s": hot["hotpath_ecr_per_s"],
        "hotpath_p99_us": hot["hotpath_p99_us"],
    }
    if e2e is not None:
        figures.update(e2e_ecr_per_s_one_conn=e2e["e2e_ecr_per_s_one_conn"],
                       e2e_server_cpu_us_per_ecr=e2e["e2e_server_cpu_us_per_ecr"],
                       e2e_ratio_vs_python_diameter=e2e["ratio_vs_python_diameter_server"])
    # N5g-eir beside S13: the same lists over one h2c connection (bench/sbi.py).
    sbi = run_part("sbi.py", ["--quick"] if args.quick else [])
    figures.update(sbi_req_per_s_one_conn=sbi["sbi_req_per_s_one_conn"],
                   sbi_p99_ms=sbi["sbi_p99_ms"],
                   sbi_server_us_per_request=sbi["sbi_server_us_per_request"])
    if memory is not None:
        figures.update(snapshot_entries=memory["entries"], snapshot_mb=memory["snapshot_mb"],
                       rss_mb_per_worker=memory["rss_mb_per_worker"],
                       pss_mb_per_worker=memory["pss_mb_per_worker"])
    figures["targets_met"] = {name: met(name, figures[name]) for name in TARGETS}
    figures["quick"] = args.quick
    figures["seconds"] = round(time.monotonic() - started)

    print(f"\nsummary ({'quick' if args.quick else 'full'} run, {figures['seconds']} s):")
    for name, (target, sense) in TARGETS.items():
        value = figures[name]
        shown = f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"
        print(f"  {name:<28}{shown:>12}   target {sense} {target:,}   "
              f"{'met' if figures['targets_met'][name] else 'NOT met'}")
    for driver, row in theirs["runs"].items():
        if driver in ours["best"]["runs"]:
            print(f"  ratio with {driver} on both: "
                  f"{ours['best']['runs'][driver]['rate'] / row['rate']:.1f}x")
    print(f"  one connection: maximum by {figures['one_conn_driver']}; python-diameter "
          f"{figures['python_diameter_ecr_per_s']:,} ECR/s; hot path in-process "
          f"{figures['hotpath_ecr_per_s']:,} ECR/s")
    print(f"  whole machine: {machine['split']}")
    print(f"  N5g-eir (HTTP/2, one connection): {figures['sbi_req_per_s_one_conn']:,} req/s, "
          f"p99 {figures['sbi_p99_ms']} ms, {figures['sbi_server_us_per_request']} µs of "
          f"server CPU per request (S13: see above)")
    print(f"  {hotpath.load_note(ours['best']['other_cpus'])} (one-connection maximum): a "
          "shared machine makes every figure here low and p99 high")
    if memory is not None:
        pss = memory["pss_mb_per_worker"]
        print(f"  memory: {memory['entries']:,}-entry snapshot ({memory['snapshot_mb']:,} MB): "
              f"VmRSS {memory['rss_mb_per_worker']} MB per worker"
              + (f", Pss {pss} MB" if pss is not None else ""))
    else:
        print("  memory: skipped (--entries 0)")
    if args.profile:
        print(f"  profile {args.profile}, self time while serving:")
        for function, share in profile_top(args.profile):
            print(f"    {share:6.1%}  {function}")
    print(json.dumps(figures))
    return 1 if args.require_target and not all(figures["targets_met"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
