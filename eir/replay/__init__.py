"""`eir replay`: load and replay harness for an S13 EIR (ours or anyone's).

    eir replay --target HOST:PORT [--connections N] [--processes P] [--window W]
               [--count N | --duration S] [--rate R]
               [--mix FILE.csv | --generate MIX [--list FILE]... | --pcap FILE [--speed F]]
               [--write-pcap FILE] [--json] [--plot FILE.png] [--progress]

Modules: `messages` (pre-encoded requests, verdicts of answers), `workload` (what to send),
`client` (one process's pipelining connections), `stats` (HDR histograms, merge of the
workers' reports), `report` (text and JSON), `pcap` (write and read captures), `plot`.
See docs/REPLAY.md.
"""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import queue as queue_module
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from eir.core.config import parse_host_port
from eir.replay.client import Plan, ReplayError, run_worker
from eir.replay.messages import Identity
from eir.replay.workload import DEFAULT_MIX, Workload, WorkloadError

EXIT_FAILED = 1
EXIT_USAGE = 2
START_DELAY_S = 0.05  # between "every worker is connected" and the common start
WORKER_START_TIMEOUT_S = 60.0
DEFAULT_LIST = Path("config/lists/example.csv")


class UsageError(Exception):
    """The command line cannot be run as given (exit 2)."""


@dataclass
class Options:
    target: str
    connections: int | None = None  # default: one per process
    processes: int = 1
    window: int = 128
    count: int | None = None  # default (and no duration): one pass of the workload
    duration: float | None = None
    rate: float | None = None  # requests per second, whole run; None: flat out
    mix: Path | None = None
    generate: str | None = None
    lists: list[Path] = field(default_factory=list)
    pcap: Path | None = None
    speed: float = 1.0  # capture pace factor; 0: flat out
    write_pcap: Path | None = None
    plot: Path | None = None
    progress: bool | None = None  # None: when standard error is a terminal
    timeout: float = 5.0
    allow_remote: bool = False
    identity: Identity = field(default_factory=Identity)
    seed: int = 1


def options_from(args) -> Options:
    """Options from the `eir replay` argparse namespace (eir/cli.py)."""
    return Options(
        target=args.target, connections=args.connections, processes=args.processes,
        window=args.window, count=args.count, duration=args.duration, rate=args.rate,
        mix=args.mix, generate=args.generate, lists=args.lists or [], pcap=args.pcap,
        speed=args.speed, write_pcap=args.write_pcap, plot=args.plot,
        progress=True if args.progress else None, timeout=args.timeout,
        allow_remote=args.allow_remote, seed=args.seed,
        identity=Identity(args.origin_host, args.origin_realm, args.destination_realm))


def main(args) -> int:
    """The `eir replay` command: run, print the report (JSON last with --json)."""
    options = options_from(args)
    try:
        report = replay(options)
    except (UsageError, WorkloadError) as exc:
        print(f"eir replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReplayError as exc:
        print(f"eir replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(report.text(), file=sys.stderr)
        print(json.dumps(report.to_json()), flush=True)
    else:
        print(report.text(), flush=True)
    return 0


# -- the run ----------------------------------------------------------------------------------

def replay(options: Options):
    """Build the workload, run the workers, merge, write the extras; the Report."""
    from eir.replay.report import Report
    from eir.replay.stats import Aggregator

    host, port = _target(options)
    _check_numbers(options)
    workload = _workload(options)
    processes = options.processes
    connections = options.connections or processes
    count = options.count
    if count is None and options.duration is None:
        count = workload.natural_count
    if not workload.cyclic and count is not None:
        count = min(count, workload.natural_count)
    speed = options.speed if options.pcap is not None and options.rate is None else None
    pcap_parts = _pcap_parts(options.write_pcap, processes)
    plans = [Plan(worker=w, host=host, port=port,
                  connections=[j for j in range(connections) if j % processes == w],
                  total_connections=connections, workload=workload,
                  identity=options.identity, count=count, duration_s=options.duration,
                  rate=options.rate, speed=speed, window=options.window,
                  timeout_s=options.timeout,
                  pcap_part=str(pcap_parts[w]) if pcap_parts else None)
             for w in range(processes)]
    progress = Progress(options.progress if options.progress is not None
                        else sys.stderr.isatty(), count, options.duration)
    aggregator = Aggregator(processes, progress.interval)
    try:
        if processes == 1:
            _run_here(plans[0], aggregator)
        else:
            _run_processes(plans, aggregator)
    finally:
        progress.finish()
    aggregator.finish()
    paced = plans[0].offset(0) is not None
    report = Report.build(
        aggregator, paced, mode=workload.mode, description=workload.description,
        target=options.target, connections=connections, processes=processes,
        window=options.window, target_rate=options.rate, pace=_pace(options, speed),
        latency_from="the scheduled send time" if paced else "the write of the request",
        notes=list(workload.notes))
    if pcap_parts:
        if len(pcap_parts) > 1:
            from eir.replay.pcap import merge_pcaps

            merge_pcaps(pcap_parts, options.write_pcap)
            for part in pcap_parts:
                part.unlink(missing_ok=True)
        report.notes.append(f"traffic written to {options.write_pcap} (the EIR's port as 3868)")
    if options.plot is not None:
        from eir.replay.plot import write_plot

        write_plot(report, options.plot)
        report.notes.append(f"plot written to {options.plot}")
    return report


def _target(options: Options) -> tuple[str, int]:
    try:
        host, port = parse_host_port(options.target)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ReplayError(f"--target: cannot resolve {host!r}: {exc.strerror}") from None
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    remote = sorted(str(a) for a in addresses if not a.is_loopback)
    if remote and not options.allow_remote:
        raise UsageError(f"--target {options.target} is not a loopback address "
                         f"({', '.join(remote)}): load against another host must be asked "
                         "for with --allow-remote")
    return host, port


def _check_numbers(options: Options) -> None:
    if options.processes < 1:
        raise UsageError("--processes must be at least 1")
    if options.connections is not None and options.connections < options.processes:
        raise UsageError(f"--connections {options.connections} is fewer than --processes "
                         f"{options.processes}: each process needs a connection")
    if options.window < 1:
        raise UsageError("--window must be at least 1")
    if options.count is not None and options.count < 1:
        raise UsageError("--count must be at least 1")
    if options.count is not None and options.duration is not None:
        raise UsageError("give --count or --duration, not both")
    if options.duration is not None and not options.duration > 0:
        raise UsageError("--duration must be more than 0 seconds")
    if options.rate is not None and not options.rate > 0:
        raise UsageError("--rate must be more than 0 requests per second")
    if not options.speed >= 0:
        raise UsageError("--speed must be 0 (flat out) or more")
    if not options.timeout > 0:
        raise UsageError("--timeout must be more than 0 seconds")
    if sum(x is not None for x in (options.mix, options.generate, options.pcap)) > 1:
        raise UsageError("give one of --mix, --generate and --pcap")


def _workload(options: Options) -> Workload:
    from eir.replay import workload

    if options.mix is not None:
        return workload.read_mix(options.mix, options.identity)
    if options.pcap is not None:
        return _capture_workload(options.pcap)
    lists = options.lists or ([DEFAULT_LIST] if DEFAULT_LIST.is_file() else [])
    return workload.generate_mix(options.generate or DEFAULT_MIX, lists, options.identity,
                                 options.seed)


def _capture_workload(path: Path) -> Workload:
    from eir.replay.messages import EcrTemplate
    from eir.replay.pcap import CaptureError, read_capture

    try:
        capture = read_capture(path)
    except CaptureError as exc:
        raise UsageError(str(exc)) from None
    if not capture.ecrs:
        raise UsageError(f"{path}: no ECR in the capture ({capture.packets:,} packets, "
                         f"{capture.messages:,} Diameter messages)")
    first = capture.ecrs[0].time
    answered = sum(ecr.answer is not None for ecr in capture.ecrs)
    workload = Workload(
        "pcap", f"{len(capture.ecrs):,} ECRs ({answered:,} with their ECA) from {path}",
        [EcrTemplate(ecr.raw, None) for ecr in capture.ecrs],
        [(ecr.imei, ecr.imsi) for ecr in capture.ecrs], list(range(len(capture.ecrs))),
        cyclic=False, captured=[ecr.answer for ecr in capture.ecrs],
        offsets=[max(0.0, ecr.time - first) for ecr in capture.ecrs], notes=capture.notes)
    if capture.unpaired_answers:
        workload.notes.append(f"{capture.unpaired_answers:,} ECAs in the capture answer no ECR "
                              "in it")
    return workload


def _pace(options: Options, speed: float | None) -> str:
    if options.rate:
        return f"paced at {options.rate:,.0f} requests/s"
    if speed:
        return f"at the capture's pace x{speed:g}"
    return "flat out (as fast as the window allows)"


def _pcap_parts(path: Path | None, processes: int) -> list[Path]:
    if path is None:
        return []
    if processes == 1:
        return [path]
    return [path.with_name(f"{path.name}.part{w}") for w in range(processes)]


def _run_here(plan: Plan, aggregator) -> None:
    async def start_now():
        import asyncio

        return asyncio.get_running_loop().time()

    result = run_worker(plan, aggregator.add_interval, start_now)
    aggregator.add_result(result)


def _worker_process(plan: Plan, messages, start_time, start_event, stop_event) -> None:
    """A worker process: reports ("ready"|"interval"|"result"|"failed", ...) to the parent."""
    # Ctrl-C is the parent's to handle: it sets stop_event, and this worker stops sending.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def wait_for_start():
        import asyncio

        messages.put(("ready", plan.worker))
        loop = asyncio.get_running_loop()
        started = await loop.run_in_executor(None, start_event.wait, WORKER_START_TIMEOUT_S)
        value = start_time.value
        return value if started and value > 0 else None

    try:
        result = run_worker(plan, lambda report: messages.put(("interval", report)),
                            wait_for_start, stop_event.is_set)
    except ReplayError as exc:
        messages.put(("failed", plan.worker, str(exc)))
        return
    messages.put(("result", result))


def _run_processes(plans: list[Plan], aggregator) -> None:
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    start_time = context.Value("d", 0.0)
    start_event, stop_event = context.Event(), context.Event()
    workers = [context.Process(target=_worker_process, name=f"eir-replay-{plan.worker}",
                               args=(plan, messages, start_time, start_event, stop_event),
                               daemon=True) for plan in plans]
    for worker in workers:
        worker.start()
    ready, results = 0, 0
    failure: str | None = None
    # Ctrl-C: the workers stop sending, wait for their outstanding answers and report.
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop_event.set())
    try:
        while results < len(workers) and failure is None:
            try:
                message = messages.get(timeout=0.5)
            except queue_module.Empty:
                dead = [w.name for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    failure = f"worker process {', '.join(dead)} died"
                continue
            kind = message[0]
            if kind == "ready":
                ready += 1
                if ready == len(workers):
                    start_time.value = time.monotonic() + START_DELAY_S
                    start_event.set()
            elif kind == "interval":
                aggregator.add_interval(message[1])
            elif kind == "result":
                aggregator.add_result(message[1])
                results += 1
            elif kind == "failed":
                failure = message[2]
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if failure is not None or results < len(workers):
            start_time.value = -1.0  # workers still waiting for the start give up
            start_event.set()
            stop_event.set()
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    if failure is not None:
        raise ReplayError(failure)


# -- progress ---------------------------------------------------------------------------------

class Progress:
    """A line on standard error, about once a second: done so far, current rate and p99."""

    EVERY_S = 1.0

    def __init__(self, enabled: bool, count: int | None, duration: float | None):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.count = count
        self.duration = duration
        self.window = None  # histogram of the intervals since the last line
        self.answered = self.sent = self.failures = 0
        self.since_line = 0.0
        self.answered_since = 0
        self.elapsed = 0.0
        self.shown = False

    def interval(self, summary, histogram) -> None:
        if not self.enabled:
            return
        from eir.replay.stats import INTERVAL_S, new_histogram

        if self.window is None:
            self.window = new_histogram()
        self.window.add(histogram)
        self.sent += summary.sent
        self.answered += summary.answered
        self.answered_since += summary.answered
        self.failures += summary.errors + summary.timeouts
        self.since_line += INTERVAL_S
        self.elapsed = summary.start_s + INTERVAL_S
        if self.since_line >= self.EVERY_S - 1e-9:
            self._line()

    def _line(self) -> None:
        from eir.replay.stats import clear_histogram, values_at_percentiles

        rate = self.answered_since / self.since_line
        p99 = (values_at_percentiles(self.window, [99.0])[0] / 1000
               if self.window.get_total_count() else None)
        if self.count:
            done = min(1.0, self.answered / self.count)
        elif self.duration:
            done = min(1.0, self.elapsed / self.duration)
        else:
            done = None
        bar = ""
        if done is not None:
            filled = int(done * 20)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {done:4.0%} "
        p99_text = f"{p99:.2f} ms" if p99 is not None else "-"
        text = (f"{bar}{self.elapsed:6.1f} s  sent {self.sent:,}  answered {self.answered:,}"
                f"  {rate:,.0f}/s  p99 {p99_text}  errors+timeouts {self.failures:,}")
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self.shown = True
        clear_histogram(self.window)
        self.since_line = 0.0
        self.answered_since = 0

    def finish(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


__all__ = ["Options", "ReplayError", "UsageError", "main", "replay"]
