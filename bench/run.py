"""The issue-18 benchmark: every figure of the issue, each beside its baseline, from one
command, in one run, on one machine.

    python3 bench/run.py            # full run, about 5 minutes (+ ~1 min the first time: the
                                    # 10,000,000-entry snapshot is built once and cached)
    python3 bench/run.py --quick    # small variant for CI, under a minute, 1,000,000 entries,
                                    # no generic-path baseline (--baseline adds it)

Every figure is measured for `eir serve` as it runs by default (the C ECR fast path) and, in
the same run, for its baselines: the generic path (`eir serve --config` with
`diameter.fast_path: false`; on by default in the full run, `--baseline`/`--no-baseline`) and
the python-diameter S13 server (bench/pydiameter_eir.py). On a tree whose configuration has
no `diameter.fast_path` the default is the generic path: it is measured once, as the baseline.

Parts, in order (the list and request mix are hotpath.py's: 105,000 rules, 4,096 requests):

1. hotpath.py (in-process: ECR bytes in, ECA bytes out) and, in the full run, e2e.py (its own
   pipelining client, eir against python-diameter); their output is shown as it comes.
2. One connection, one core, for each path: `eir serve --workers 1` pinned to core 0, the load
   generator pinned to core 1: `eir replay` flat out on one connection (window 128), and the
   mme-sim (freeDiameter, testbed/mme-sim) flat out when it is installed (full run): the
   maximum is the faster of the two. Then `eir replay --rate` at 50% and 80% of that path's
   maximum: p99 from each request's scheduled send time.
3. The python-diameter S13 server on the same core with the same load generators.
4. The whole machine, for each path: `eir serve --workers N` (N = cores) unpinned, `eir
   replay` with several connections beside it (at a lower priority, `nice`, so that the
   server's workers get the cores first).
5. Resident memory per worker with a snapshot of 10,000,000 entries (1,000,000 with --quick):
   built once by bench/scale.py's generator and `eir sync`, cached under --cache; `eir serve
   --store --workers N` answers a short replay run on N connections, then each process's RSS
   and Pss (/proc/PID/smaps_rollup) and the snapshot mapping's resident share are read.
6. N5g-eir: bench/sbi.py with one worker, then with --workers N; each with its baseline
   (sbi.fast_path off, --baseline) when the generic path runs; their JSON read.
7. In the full run, when it is there, bench/replay_cpu.py: `eir replay`'s CPU per request
   beside e2e.py's minimal pipelining client (a baseline for the load generator's own cost).

CPU figures come from /proc. Before each flat-out run the server is left to go idle (its
start-up or the previous run must not count), and after it until it is idle again (1.2 s
without CPU: its last flush of observations counts); meanwhile, every 0.1 s, run.py reads
the CPU time of the server (with its workers), of the load generator (eir replay with its
processes, or freeDiameterd), of each core and of the machine. Server CPU per ECR = all the
CPU the server used over that time (it serves nothing else) / the requests answered. The
load's interval is the longest stretch in which the server worked at half its median rate or
more, less 0.2 s at each end: over it, the load generator's CPU per request = the CPUs it
used / the run's rate (its start-up and report left out), and each run says which side
saturated its core (the load generator may be the bound) and how much CPU other processes
used meanwhile (the machine is shared).

The summary is a table (figure | fast path | baseline(s) | gain | target | met?), and the last
line printed is one JSON object with every figure (`server_cpu_us_per_ecr`,
`ecr_per_s_one_conn`, `ecr_per_s_machine`, `p99_ms_at_50pct`, `p99_ms_at_80pct`,
`replay_cpu_us_per_request`, `sbi_server_us_per_request`, ..., the baselines as `generic_*`
and `python_diameter_*`). A missed target is printed, never an exit status (unless
--require-target is given).
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import hotpath  # first: it puts the checkout and tests/ on sys.path
from e2e import cpu_seconds, pinning
from helpers_process import start_eir, start_server  # from tests/
from hotpath import build_workload
from load_table import build_mme_sim, mme_sim, replay, write_inputs

from eir.core.config import DiameterSettings

BENCH = Path(__file__).resolve().parent
TARGETS = {  # issue 18: figure → (target, at least or at most)
    "server_cpu_us_per_ecr": (5.0, "<="),
    "ecr_per_s_one_conn": (150_000, ">="),
    "ecr_per_s_machine": (150_000, ">="),
    "p99_ms_at_50pct": (1.0, "<="),
    "p99_ms_at_80pct": (5.0, "<="),
    "replay_cpu_us_per_request": (5.0, "<="),
    "sbi_server_us_per_request": (30.0, "<="),
    "sbi_req_per_s_machine": (30_000, ">="),
}
PAIR_IMSI = "510101234567890"
# The baseline: the same server with its C ECR fast path off (eir/core/config.py).
GENERIC_CONFIG = "diameter:\n  fast_path: false\n"
FULL = 0.9  # a core (or process) this busy over the measured interval is saturated


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


def fast_path_in_tree() -> bool:
    """Whether this checkout's configuration knows `diameter.fast_path` (so that the generic
    path can be asked for); before the fast path, the default is the generic path."""
    return "fast_path" in DiameterSettings.model_fields


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


def process_tree(pid: int) -> Callable[[], list[int]]:
    return lambda: [pid, *descendants(pid)]


def our_children_named(command: str) -> Callable[[], list[int]]:
    """Processes below run.py whose command name is `command` (e.g. freeDiameterd)."""
    def find() -> list[int]:
        found = []
        for pid in descendants(os.getpid()):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == command:
                    found.append(pid)
            except OSError:
                continue
        return found
    return find


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


def busy_seconds() -> dict[str, float]:
    """CPU seconds spent busy so far by the machine ("cpu") and by each core ("cpu0", ...),
    from /proc/stat (idle and iowait left out)."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        name, *fields = line.split()
        ticks = [int(value) for value in fields[:8]]
        busy[name] = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return busy


@dataclass
class Sample:
    at: float  # time.monotonic()
    cpu: dict[str, dict[int, float]]  # name → pid → CPU seconds so far
    busy: dict[str, float]  # busy_seconds()


@dataclass
class CpuWindow:
    """What each named process, each core and the machine used over the measured interval,
    in CPUs (CPU seconds per second); and each named process's CPU seconds over the whole
    sampling (`total`)."""

    seconds: float
    cpus: dict[str, float]
    cores: dict[str, float]  # "cpu" (the machine: up to the number of cores), "cpu0", ...
    other: float  # the machine's CPUs not used by the named processes
    total: dict[str, float]

    def per_request_us(self, name: str, rate: float) -> float:
        """CPU per request over the load's interval, at the run's average rate."""
        return self.cpus[name] / rate * 1e6 if rate > 0 else float("nan")

    def all_per_request_us(self, name: str, requests: int) -> float:
        """CPU per request over the whole sampling (a server idle before and after: all it
        did for the run, its last flush of observations included)."""
        return self.total[name] / requests * 1e6 if requests > 0 else float("nan")


def tree_cpu(pid: int) -> float:
    return sum(seconds for p in [pid, *descendants(pid)]
               if (seconds := cpu_seconds(p)) == seconds)  # nan: a process that has ended


QUIET = 1.2  # seconds: longer than the server's flush of observations (1 s by default)


def wait_until_idle(pid: int, timeout: float) -> None:
    """Until `pid` (with its descendants) used no CPU for QUIET seconds, at most `timeout`:
    before a run, so that a server's start-up or the previous run do not count as serving
    it; after, so that its last flush of observations does."""
    deadline = time.monotonic() + timeout
    last, quiet_since = tree_cpu(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = tree_cpu(pid)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET:
            return


class Sampler:
    """Reads the CPU time of named processes (found by a function giving their pids), of each
    core and of the machine every PERIOD seconds, on a thread, while a load runs.

    stop() gives the load's interval: the longest stretch of samples in which the `busy`
    process (the server) worked at least half its median working rate, gaps of up to GAP
    samples allowed (a shared core stalls it), less TRIM samples at each end (the first and
    last answers) when it is long enough. What came before (the load generator's start-up)
    and after (its report; the server's last flush of observations) is left out."""

    PERIOD = 0.1
    REFRESH = 10  # samples between two searches of each name's processes
    ACTIVE = 0.05  # CPUs: below, the busy process is idle
    GAP = 3
    TRIM = 2

    def __init__(self, named: dict[str, Callable[[], list[int]]], busy: str):
        self.named, self.busy = named, busy
        self.pids = {name: find() for name, find in named.items()}
        self.samples: list[Sample] = []
        self._stopped = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        if self.samples and len(self.samples) % self.REFRESH == 0:
            self.pids = {name: find() for name, find in self.named.items()}
        cpu = {name: {pid: seconds for pid in pids
                      if (seconds := cpu_seconds(pid)) == seconds}  # nan: it has ended
               for name, pids in self.pids.items()}
        self.samples.append(Sample(time.monotonic(), cpu, busy_seconds()))

    def _run(self) -> None:
        while not self._stopped.wait(self.PERIOD):
            self._sample()

    @staticmethod
    def _used(first: Sample, last: Sample, name: str) -> float:
        before = first.cpu[name]
        return sum(seconds - before.get(pid, 0.0) for pid, seconds in last.cpu[name].items())

    def _load(self) -> tuple[int, int]:
        """(first, last) sample of the load's interval."""
        samples = self.samples
        rates = [self._used(samples[i - 1], samples[i], self.busy)
                 / max(samples[i].at - samples[i - 1].at, 1e-9) for i in range(1, len(samples))]
        working = sorted(rate for rate in rates if rate >= self.ACTIVE)
        if not working:
            return 0, len(samples) - 1
        floor = max(self.ACTIVE, working[len(working) // 2] / 2)
        best, start, last_working = (0, 0), 0, -self.GAP - 2
        for index, rate in enumerate(rates, 1):  # interval `index`: samples index-1 → index
            if rate < floor:
                continue
            if index - last_working > self.GAP + 1:
                start = index
            last_working = index
            if last_working - start > best[1] - best[0] or best == (0, 0):
                best = (start, last_working)
        first, last = best[0] - 1, best[1]
        if last - first > 2 * self.TRIM + 3:
            first, last = first + self.TRIM, last - self.TRIM
        return first, last

    def stop(self) -> CpuWindow:
        self._stopped.set()
        self._thread.join()
        self._sample()
        first, last = self._load()
        start, end = self.samples[first], self.samples[last]
        wall = max(end.at - start.at, 1e-9)
        cpus = {name: self._used(start, end, name) / wall for name in self.named}
        cores = {core: (end.busy[core] - start.busy.get(core, 0.0)) / wall for core in end.busy}
        total = {name: self._used(self.samples[0], self.samples[-1], name)
                 for name in self.named}
        return CpuWindow(wall, cpus, cores, max(0.0, cores["cpu"] - sum(cpus.values())), total)


def saturation(window: CpuWindow, client: str, cores: tuple[int, int] | None) -> tuple[str, str]:
    """(which side saturated its core: "server", "load generator", "both", "neither", or
    "shared core" when a core was full but mostly of other processes; the figures that say
    so). Pinned, each side's core is shown too, whoever used it."""
    server_cpu, client_cpu = window.cpus["server"], window.cpus["client"]
    if cores is not None:
        server_core = window.cores.get(f"cpu{cores[0]}", server_cpu)
        client_core = window.cores.get(f"cpu{cores[1]}", client_cpu)
        text = (f"server {server_cpu:.2f} CPU (core {cores[0]} {min(1.0, server_core):.0%} "
                f"busy), {client} {client_cpu:.2f} CPU (core {cores[1]} "
                f"{min(1.0, client_core):.0%} busy)")
    else:
        server_core, client_core = server_cpu, client_cpu
        text = f"server {server_cpu:.2f} CPU, {client} {client_cpu:.2f} CPU (not pinned)"
    side = {(True, True): "both", (True, False): "server", (False, True): "load generator",
            (False, False): "neither"}[server_cpu >= FULL, client_cpu >= FULL]
    if side == "neither" and max(server_core, client_core) >= FULL:
        side = "shared core"
    return side, text


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
            "sent": report["sent"], "answered": report["answered"]}


def measured_replay(server_pid: int, port: int, mix: Path, seconds: float, prefix: list[str],
                    connections: int = 1, processes: int = 1) -> tuple[dict, CpuWindow]:
    """`eir replay` flat out, the server's and its CPU sampled meanwhile (and until the
    server is idle again)."""
    wait_until_idle(server_pid, timeout=5.0)
    load = replay_process(port, mix, seconds, prefix, connections, processes)
    sampler = Sampler({"server": process_tree(server_pid), "client": process_tree(load.pid)},
                      busy="server")
    try:
        result = replay_result(load, seconds)
        wait_until_idle(server_pid, timeout=3.0)
    finally:
        window = sampler.stop()
    return result, window


# -- the parts -----------------------------------------------------------------------------

def flat_out(name: str, server, peer: str, mix: Path, extension: Path | None, work: Path,
             seconds: float, client_prefix: list[str], cores: tuple[int, int] | None) -> dict:
    """A server's maximum on one connection: eir replay, and the mme-sim when there; for each
    run the server's and the load generator's CPU per request, and which one was the bound."""
    runs = {}
    result, window = measured_replay(server.process.pid, server.port, mix, seconds,
                                     client_prefix)
    runs["replay"] = dict(result, window=window, client="eir replay")
    if extension is not None:
        count = max(2_000, int(result["rate"] * seconds * 1.2))
        wait_until_idle(server.process.pid, timeout=5.0)
        sampler = Sampler({"server": process_tree(server.process.pid),
                           "client": our_children_named("freeDiameterd")}, busy="server")
        try:
            sim = mme_sim(extension, work / f"{name.replace(' ', '-')}-sim", server.port, peer,
                          mix, count, 0, client_prefix)
            wait_until_idle(server.process.pid, timeout=3.0)
        finally:
            window = sampler.stop()
        if sim["sent"] and sim["rate"] > 0:
            runs["mme-sim"] = dict(sim, answered=sim["sent"], window=window,
                                   client="freeDiameterd")
        else:  # seen on a loaded machine: freeDiameterd did not get the peer up in time
            print(f"  {name:<22} mme-sim flat out: no answer ({sim['sent']} sent), left out",
                  flush=True)
    for driver, run in runs.items():
        window = run["window"]
        run["server_us"] = window.all_per_request_us("server", run["answered"])
        run["client_us"] = window.per_request_us("client", run["rate"])
        run["saturated"], how = saturation(window, run["client"], cores)
        print(f"  {name:<22} {driver:<10} flat out: {run['rate']:>9,.0f} ECR/s, p99 "
              f"{run['p99_ms']:.2f} ms, errors {run['errors']}; CPU per ECR: server "
              f"{run['server_us']:.1f} µs, {run['client']} {run['client_us']:.1f} µs\n"
              f"  {'':<22} {'':<10} saturated: {run['saturated']} — {how}; other processes "
              f"{window.other:.2f} CPU", flush=True)
    driver = max(runs, key=lambda key: runs[key]["rate"])
    return {"rate": runs[driver]["rate"], "driver": driver, "runs": runs,
            "other_cpus": runs["replay"]["window"].other}


def one_connection(label: str, extra: list[str], csv_path: Path, mix: Path,
                   extension: Path | None, work: Path, seconds: float, server_prefix: list[str],
                   client_prefix: list[str], cores: tuple[int, int] | None,
                   profile: Path | None, perf: Path | None) -> dict:
    # py-spy writes its profile on SIGINT; SIGTERM would lose it.
    profiler = (["py-spy", "record", "-r", "250", "--nonblocking", "-f", "raw", "-o",
                 str(profile), "--"] if profile else [])
    eir = start_eir("--unknown", "unknown", "--log-level", "info", "--workers", "1", *extra,
                    lists=[csv_path], prefix=server_prefix + profiler, timeout=60.0, cwd=work)
    try:
        recorder = PerfRecord(eir.process.pid, perf) if perf else None
        try:
            best = flat_out(label, eir, "eir.localdomain", mix, extension, work, seconds,
                            client_prefix, cores)
        finally:
            if recorder is not None:
                recorder.stop()
        paced = {}
        for share in (50, 80):
            paced[share] = replay(eir.port, mix, seconds, best["rate"] * share / 100,
                                  client_prefix)
            row = paced[share]
            print(f"  {label:<22} eir replay at {share}% ({best['rate'] * share / 100:,.0f}/s):"
                  f" {row['rate']:,.0f} ECR/s, p50 {row['p50_ms']:.2f} ms, p99 "
                  f"{row['p99_ms']:.2f} ms, errors {row['errors']}", flush=True)
    finally:
        eir.stop(signal.SIGINT if profile else signal.SIGTERM, timeout=30.0)
    return {"best": best, "paced": paced}


class PerfRecord:
    """`perf record` attached to a running server while its flat-out runs go on: where its
    CPU goes, the C of the fast path and the kernel included (py-spy sees Python only)."""

    def __init__(self, pid: int, output: Path):
        self.process = subprocess.Popen(
            ["perf", "record", "-F", "499", "-o", str(output), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # perf writes its data on SIGINT
        _, err = self.process.communicate(timeout=60)
        if self.process.returncode not in (0, -signal.SIGINT):
            print(f"  perf record failed ({self.process.returncode}): {err[-500:]}")


def perf_top(path: Path, sort: str, count: int) -> list[tuple[float, str]]:
    """(share of the samples, what) of `perf report --sort SORT`, largest first."""
    report = subprocess.run(["perf", "report", "-i", str(path), "--stdio", "--no-children",
                             "--sort", sort, "--percent-limit", "0.5"],
                            capture_output=True, text=True, timeout=120).stdout
    rows = []
    for line in report.splitlines():
        share, percent, what = line.strip().partition("%")
        if percent and not share.startswith("#"):
            try:
                rows.append((float(share), " ".join(what.split())))
            except ValueError:
                continue
    return rows[:count]


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
                    seconds: float, server_prefix: list[str], client_prefix: list[str],
                    cores: tuple[int, int] | None) -> dict:
    server = start_server(server_prefix + [sys.executable, str(BENCH / "pydiameter_eir.py"),
                                           "--listen", "127.0.0.1:0", "--list", str(csv_path)],
                          timeout=60.0)
    try:
        return flat_out("python-diameter", server, "eir-pd.localdomain", mix, extension, work,
                        seconds, client_prefix, cores)
    finally:
        server.stop()


def whole_machine(label: str, extra: list[str], csv_path: Path, mix: Path, work: Path,
                  seconds: float, workers: int, connections: int, processes: int,
                  nice: int) -> dict:
    eir = start_eir("--unknown", "unknown", "--log-level", "info", "--workers", str(workers),
                    *extra, lists=[csv_path], timeout=60.0, cwd=work)
    prefix = ["nice", "-n", str(nice)] if nice else []
    try:
        result, window = measured_replay(eir.process.pid, eir.port, mix, seconds, prefix,
                                         connections, processes)
    finally:
        eir.stop()
    cores = os.cpu_count() or 1
    machine = window.cores["cpu"]
    how = (f"eir serve --workers {workers} (supervisor + {workers} workers, unpinned) "
           f"{window.cpus['server']:.2f} CPU, eir replay --connections {connections} "
           f"--processes {processes}{f' at nice {nice}' if nice else ''} (unpinned) "
           f"{window.cpus['client']:.2f} CPU, other processes {window.other:.2f} CPU: the "
           f"machine {machine:.2f} of {cores} CPUs busy"
           + (" (full)" if machine >= FULL * cores else " (not full)"))
    server_us = window.all_per_request_us("server", result["answered"])
    client_us = window.per_request_us("client", result["rate"])
    print(f"  {label:<22} whole machine: {result['rate']:,.0f} ECR/s, p50 "
          f"{result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, errors "
          f"{result['errors']}; CPU per ECR: server {server_us:.1f} µs, eir replay "
          f"{client_us:.1f} µs\n  {'':<22} {how}", flush=True)
    return {"result": result, "split": how, "server_us": server_us, "client_us": client_us,
            "cpus": {"eir serve": window.cpus["server"], "eir replay": window.cpus["client"],
                     "other": window.other}}


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


# -- the summary ---------------------------------------------------------------------------

# (figure, JSON key, unit, whether it depends on the Diameter path, baselines: (name, key))
ROWS = [
    ("server CPU per ECR (one connection, pipelined)", "server_cpu_us_per_ecr", "µs", True,
     [("generic", "generic_server_cpu_us_per_ecr"),
      ("python-diameter", "python_diameter_server_cpu_us_per_ecr")]),
    ("one connection, server on one core", "ecr_per_s_one_conn", "ECR/s", True,
     [("generic", "generic_ecr_per_s_one_conn"),
      ("python-diameter", "python_diameter_ecr_per_s")]),
    ("whole machine", "ecr_per_s_machine", "ECR/s", True,
     [("generic", "generic_ecr_per_s_machine")]),
    ("p99 at 50% of the one-connection maximum", "p99_ms_at_50pct", "ms", True,
     [("generic", "generic_p99_ms_at_50pct")]),
    ("p99 at 80% of the one-connection maximum", "p99_ms_at_80pct", "ms", True,
     [("generic", "generic_p99_ms_at_80pct")]),
    ("eir replay CPU per request", "replay_cpu_us_per_request", "µs", False,
     [("mme-sim", "mme_sim_cpu_us_per_request"),
      ("e2e.py's minimal client", "minimal_client_cpu_us_per_request")]),
    ("N5g-eir server CPU per request", "sbi_server_us_per_request", "µs", False,
     [("h2 generic", "sbi_generic_server_us_per_request")]),
    ("N5g-eir whole machine", "sbi_req_per_s_machine", "req/s", False,
     [("h2 generic", "sbi_generic_req_per_s_machine")]),
]


def shown(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "—"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "µs":
        return f"{value:.1f} µs"
    return f"{value:,.0f} {unit}"


def summary_table(figures: dict) -> str:
    fast = figures["fast_path_in_tree"]
    lines = ["| figure | eir serve (fast path) | baseline(s), same run | gain | target | met? |",
             "|---|---:|---|---:|---:|---|"]
    for title, key, unit, by_path, baselines in ROWS:
        value = figures.get(key)
        target, sense = TARGETS[key]
        known = [(name, figures[k]) for name, k in baselines if figures.get(k) is not None]
        ours = shown(value, unit) if fast or not by_path else "— (not in this tree)"
        gains = []
        if value and (fast or not by_path):
            for name, base in known:
                if base:
                    gain = value / base if sense == ">=" else base / value
                    gains.append(f"{gain:.1f}× vs {name}")
        goal = f"{'≥' if sense == '>=' else '≤'} {shown(target, unit)}"
        verdict = figures["targets_met"].get(key)
        lines.append(f"| {title} | {ours} | "
                     + ("; ".join(f"{name} {shown(base, unit)}" for name, base in known) or "—")
                     + f" | {', '.join(gains) or '—'} | {goal} | "
                     + ("not measured" if verdict is None else "met" if verdict else "NOT met")
                     + " |")
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------

def path_figures(prefix: str, one: dict, machine: dict) -> dict:
    """The figures of one Diameter path (JSON keys with `prefix`)."""
    best, replayed = one["best"], one["best"]["runs"]["replay"]
    return {
        f"{prefix}server_cpu_us_per_ecr": round(replayed["server_us"], 2),
        f"{prefix}ecr_per_s_one_conn": round(best["rate"]),
        f"{prefix}ecr_per_s_machine": round(machine["result"]["rate"]),
        f"{prefix}p99_ms_at_50pct": one["paced"][50]["p99_ms"],
        f"{prefix}p99_ms_at_80pct": one["paced"][80]["p99_ms"],
        f"{prefix}one_conn_driver": best["driver"],
        f"{prefix}one_conn_saturated": {driver: run["saturated"]
                                        for driver, run in best["runs"].items()},
        f"{prefix}one_conn_p99_ms_flat_out": best["runs"][best["driver"]]["p99_ms"],
        f"{prefix}machine_server_cpu_us_per_ecr": round(machine["server_us"], 2),
        f"{prefix}machine_cpus": {k: round(v, 2) for k, v in machine["cpus"].items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small variant for CI (under a minute, 1,000,000 entries, no "
                        "generic-path baseline unless --baseline)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction,
                        help="also run the generic path (diameter.fast_path: false) as the "
                        "baseline (default: on, off with --quick)")
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
                        help="record the one-connection server (default path) with py-spy "
                        "(raw format) into FILE and print its top entries")
    parser.add_argument("--perf", type=Path, metavar="PREFIX",
                        help="record each path's one-connection server with `perf record` "
                        "(499 Hz) during its flat-out runs into PREFIX.PATH.data and print "
                        "where its CPU went: by library (kernel, libpython, the C extension) "
                        "and by function")
    parser.add_argument("--require-target", action="store_true",
                        help="exit 1 when a target is missed (never the default)")
    args = parser.parse_args()
    seconds = args.seconds or (1.5 if args.quick else 5.0)
    entries = args.entries if args.entries is not None else (
        1_000_000 if args.quick else 10_000_000)
    baseline = args.baseline if args.baseline is not None else not args.quick
    fast = fast_path_in_tree()
    started = time.monotonic()

    hot = run_part("hotpath.py", ["--quick"] if args.quick else [])
    e2e = None if args.quick else run_part("e2e.py", [])
    print()

    server_prefix, client_core, pinned = pinning()
    client_prefix = ["taskset", "-c", str(client_core)] if client_core is not None else []
    cores = (0, client_core) if client_core is not None else None
    use_sim = (not args.quick and not args.no_mme_sim and shutil.which("freeDiameterd")
               and shutil.which("make"))
    workload = build_workload()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv_path, mix = write_inputs(workload, work)
        generic_config = work / "generic.yaml"
        generic_config.write_text(GENERIC_CONFIG)
        # path → (label, extra `eir serve` arguments); the default path first
        paths = {"fast": ("fast path", [])} if fast else {"generic": ("generic path", [])}
        if fast and baseline:
            paths["generic"] = ("generic path", ["--config", str(generic_config)])
        perf_files = ({key: Path(f"{args.perf}.{key}.data") for key in paths}
                      if args.perf and shutil.which("perf") else {})
        extension = build_mme_sim(work / "mme-sim") if use_sim else None
        print(f"issue-18 benchmark ({'quick' if args.quick else 'full'}): {len(workload.rows):,} "
              f"list rows, {len(workload.probes):,}-request mix, {seconds:g} s per load run; "
              f"{os.cpu_count()} cores; load generators: eir replay"
              f"{' and the mme-sim (freeDiameter)' if extension else ''}; paths: "
              + ", ".join(label for label, _ in paths.values())
              + ("" if fast else " (this tree's configuration has no diameter.fast_path: its "
                 "default is the generic path, measured as the baseline)"), flush=True)
        print(f"one connection, one core ({pinned}):", flush=True)
        one = {}
        for index, (key, (label, extra)) in enumerate(paths.items()):
            one[key] = one_connection(label, extra, csv_path, mix, extension, work, seconds,
                                      server_prefix, client_prefix, cores,
                                      args.profile if index == 0 else None,
                                      perf_files.get(key))
        print(f"python-diameter S13 server, same harness ({pinned}):", flush=True)
        theirs = python_diameter(csv_path, mix, extension, work, seconds, server_prefix,
                                 client_prefix, cores)
        print(f"whole machine ({os.cpu_count()} cores, {args.machine_connections} "
              "connections):", flush=True)
        machine = {key: whole_machine(label, extra, csv_path, mix, work, seconds, args.workers,
                                      args.machine_connections, args.machine_processes,
                                      args.nice)
                   for key, (label, extra) in paths.items()}
    memory = None
    if entries:
        print(f"resident memory, eir serve --store --workers {args.workers}:", flush=True)
        memory = resident_memory(args.cache, entries, args.workers, min(seconds, 3.0))
    # N5g-eir beside S13: the same lists over HTTP/2 (bench/sbi.py), one worker on one core,
    # then the whole machine; each with sbi.fast_path off too when the baseline runs.
    sbi_options = (["--quick"] if args.quick else []) + (["--baseline"] if baseline else [])
    sbi = run_part("sbi.py", sbi_options)
    sbi_machine = run_part("sbi.py", sbi_options + ["--workers", str(args.workers)])
    # The load generator beside a minimal pipelining client (bench/replay_cpu.py, full run).
    replay_cpu = (run_part("replay_cpu.py", [])
                  if not args.quick and (BENCH / "replay_cpu.py").is_file() else None)

    default = next(iter(paths))
    ours = one[default]
    replayed = ours["best"]["runs"]["replay"]
    figures: dict = {"fast_path_in_tree": fast,
                     "baseline_paths": [label for key, (label, _) in paths.items()
                                        if key == "generic"] + ["python-diameter"]}
    figures.update(path_figures("", ours, machine[default]))
    if "generic" in paths:
        figures.update(path_figures("generic_", one["generic"], machine["generic"]))
    sim = ours["best"]["runs"].get("mme-sim")
    figures.update(
        replay_cpu_us_per_request=round(replayed["client_us"], 2),
        replay_ecr_per_s_one_conn=round(replayed["rate"]),
        mme_sim_cpu_us_per_request=round(sim["client_us"], 2) if sim else None,
        mme_sim_ecr_per_s_one_conn=round(sim["rate"]) if sim else None,
        machine_replay_cpu_us_per_request=round(machine[default]["client_us"], 2),
        python_diameter_ecr_per_s=round(theirs["rate"]),
        python_diameter_server_cpu_us_per_ecr=round(
            theirs["runs"]["replay"]["server_us"], 2),
        ratio_vs_python_diameter=round(ours["best"]["rate"] / theirs["rate"], 2)
        if theirs["rate"] else None,
        other_cpu_load_one_conn=round(ours["best"]["other_cpus"], 2),
        machine_workers=args.workers,
        hotpath_ecr_per_s=hot["hotpath_ecr_per_s"],
        hotpath_p99_us=hot["hotpath_p99_us"],
    )
    if e2e is not None:
        figures.update(e2e_ecr_per_s_one_conn=e2e["e2e_ecr_per_s_one_conn"],
                       e2e_server_cpu_us_per_ecr=e2e["e2e_server_cpu_us_per_ecr"],
                       e2e_ratio_vs_python_diameter=e2e["ratio_vs_python_diameter_server"])
    figures.update({key if key.startswith("sbi_") else f"sbi_{key}": value
                    for key, value in sbi.items()})
    figures.update({f"sbi_machine_{key.removeprefix('sbi_')}": value
                    for key, value in sbi_machine.items()})
    figures.update(sbi_req_per_s_machine=sbi_machine.get("sbi_req_per_s"),
                   sbi_generic_req_per_s_machine=sbi_machine.get("sbi_generic_req_per_s"))
    if replay_cpu is not None:
        figures.update(
            minimal_client_cpu_us_per_request=replay_cpu.get("baseline_cpu_us_per_request"),
            replay_cpu_py_us_per_request=replay_cpu.get("replay_cpu_us_per_request"),
            replay_in_process_us_per_request=replay_cpu.get(
                "replay_in_process_us_per_request"))
    if memory is not None:
        figures.update(snapshot_entries=memory["entries"], snapshot_mb=memory["snapshot_mb"],
                       rss_mb_per_worker=memory["rss_mb_per_worker"],
                       pss_mb_per_worker=memory["pss_mb_per_worker"])
    figures["targets_met"] = {name: met(name, figures[name]) for name in TARGETS
                              if figures.get(name) is not None}
    figures["quick"] = args.quick
    figures["seconds"] = round(time.monotonic() - started)

    print(f"\nsummary ({'quick' if args.quick else 'full'} run, {figures['seconds']} s; "
          f"{pinned}):\n")
    print(summary_table(figures))
    print()
    for key, (label, _) in paths.items():
        for driver, run in one[key]["best"]["runs"].items():
            print(f"  one connection, {label}, {driver}: {run['rate']:,.0f} ECR/s, saturated: "
                  f"{run['saturated']} ({saturation(run['window'], run['client'], cores)[1]}; "
                  f"other processes {run['window'].other:.2f} CPU)")
    for driver, row in theirs["runs"].items():
        if driver in ours["best"]["runs"]:
            print(f"  python-diameter, {driver}: {row['rate']:,.0f} ECR/s, server "
                  f"{row['server_us']:.1f} µs/ECR; {paths[default][0]} / python-diameter "
                  f"{ours['best']['runs'][driver]['rate'] / max(row['rate'], 1e-9):.1f}×")
    for key, (label, _) in paths.items():
        print(f"  whole machine, {label}: {machine[key]['split']}")
    print(f"  N5g-eir (HTTP/2, bench/sbi.py, client {figures.get('sbi_client', 'python')}): "
          f"one worker {figures['sbi_req_per_s']:,} req/s, p99 {figures['sbi_p99_ms']} ms, "
          f"{figures['sbi_server_us_per_request']} µs of server CPU per request; "
          f"--workers {args.workers}: {figures['sbi_req_per_s_machine']:,} req/s, "
          f"{figures['sbi_machine_server_us_per_request']} µs per request")
    if figures.get("replay_in_process_us_per_request") is not None:
        print(f"  eir replay's own work per request in process (replay_cpu.py): "
              f"{figures['replay_in_process_us_per_request']} µs; its socket run "
              f"{figures['replay_cpu_py_us_per_request']} µs")
    print(f"  hot path in-process (hotpath.py): {figures['hotpath_ecr_per_s']:,} ECR/s, p99 "
          f"{figures['hotpath_p99_us']} µs" + (
              f"; e2e.py: {figures['e2e_ecr_per_s_one_conn']:,} ECR/s, server "
              f"{figures['e2e_server_cpu_us_per_ecr']} µs/ECR" if e2e is not None else ""))
    print(f"  {hotpath.load_note(ours['best']['other_cpus'])} (one-connection maximum): a "
          "shared machine makes every figure here low and p99 high")
    if memory is not None:
        pss = memory["pss_mb_per_worker"]
        print(f"  memory: {memory['entries']:,}-entry snapshot ({memory['snapshot_mb']:,} MB): "
              f"VmRSS {memory['rss_mb_per_worker']} MB per worker"
              + (f", Pss {pss} MB" if pss is not None else ""))
    else:
        print("  memory: skipped (--entries 0)")
    for key, path in perf_files.items():
        if path.is_file():
            print(f"  perf profile of the one-connection server, {paths[key][0]} ({path}):")
            for share, what in perf_top(path, "dso", 6):
                print(f"    {share:5.1f}%  {what}")
            print("    top symbols:")
            for share, what in perf_top(path, "dso,sym", 15):
                print(f"    {share:5.1f}%  {what}")
    if args.profile:
        print(f"  profile {args.profile}, self time while serving:")
        for function, share in profile_top(args.profile):
            print(f"    {share:6.1%}  {function}")
    print(json.dumps(figures))
    return 1 if args.require_target and not all(figures["targets_met"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
