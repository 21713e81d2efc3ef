"""Prometheus metrics: plain counters on the hot path, read by a collector at scrape time.

Counting a request must cost far less than the ~18 µs of CPU a request costs, so the hot
path never calls prometheus-client (`.labels(...).inc()` takes locks and looks the label
tuple up: 1.3 µs measured here, per metric). Instead:

  * `DiameterCounters` holds plain ints in dicts keyed by what the hot path already has in
    hand (the command code, the Result-Code, the Equipment-Status), bounded in size: command
    codes the dictionary does not define are all counted as `OTHER_COMMAND`;
  * the request-duration histogram is a preallocated list of bucket counts: every request is
    counted (no sampling). The duration is measured per read, not per message: from the
    moment the event loop hands the connection's bytes to the peer state machine to the
    moment the answers are written, and the N requests of that read each count it once (all
    of them waited that long before their answer was written); requests the overload limits
    queue for a later turn are timed from their own read (`QueuedLatency`). Cost measured:
    ~0.35 µs per ECR with one ECR per read (request count, verdict count, one observation),
    less when reads carry several;
  * `EirCollector` turns a `MetricsSnapshot` (plain numbers, taken from the server's objects
    at scrape time) into metric families.

Several worker processes: a snapshot is plain data (`as_dict`/`from_dict`, JSON-safe), and
`MetricsSnapshot.merge` adds counters, histograms and peer gauges up across processes and
keeps the per-process list and sync facts of the newest snapshot. A server with workers
(eir.serve.workers) asks each worker for its snapshot at every scrape (`metrics_app`, over
the supervisor's channel) and serves the merge of its own and theirs (`merged_snapshot`),
instead of prometheus-client's multiprocess mode, which writes a memory-mapped file on every
`.inc()` and does not support custom collectors. The `process_*` metrics are per process
(`ProcessesCollector`: one series per worker, read from /proc by the supervisor).
"""

from __future__ import annotations

import bisect
import calendar
import collections
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from eir import __version__
from eir.core.decision import EquipmentStatus
from eir.diameter.constants import COMMAND_ME_IDENTITY_CHECK, ExperimentalResultCode, ResultCode
from eir.interfaces.ports import ServerView

# Bucket upper bounds of eir_request_duration_seconds: one ECR takes ~20 µs of CPU, a read
# of 128 pipelined ECRs ~2.5 ms; beyond 1 s something is badly wrong (all land in +Inf).
LATENCY_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3,
                   100e-3, 200e-3, 500e-3, 1.0)
OTHER_COMMAND = -1  # any command code the dictionary does not define
OTHER_COMMAND_NAME = "other"
SUCCESS = int(ResultCode.SUCCESS)
EQUIPMENT_UNKNOWN = int(ExperimentalResultCode.ERROR_EQUIPMENT_UNKNOWN)
NO_EQUIPMENT_STATUS = "none"  # equipment_status label of answers without Equipment-Status
# equipment_status label of "equipment unknown": S13's 5422 and N5g-eir's 404
# ERROR_EQUIPMENT_UNKNOWN alike, so that one query counts both interfaces' unknowns.
UNKNOWN_EQUIPMENT_STATUS = "UNKNOWN"
PEER_STATES = ("wait-cer", "open", "closing")
SYNC_OUTCOMES = ("published", "up_to_date", "refused")
RETRANSMISSION_OUTCOMES = ("answered_from_cache", "not_cached", "different_request")
DUPLICATE_PEER_ACTIONS = ("refused", "allowed")
SUPERVISOR_LABEL = "supervisor"  # the `worker` label of the supervisor's process_* series


class DiameterCounters:
    """What the hot path counts, per process. Only the event-loop thread writes it.

    `requests[code]` requests received; `answers[(code, result_code)]` answers sent other
    than the S13 verdicts; `verdicts[status]` ME-Identity-Check answers with a verdict
    (status None: Experimental-Result 5422); `latency_buckets` per-bucket (not cumulative)
    request counts, the last one +Inf."""

    def __init__(self, command_names: dict[int, str]):
        self.command_names = {**command_names, OTHER_COMMAND: OTHER_COMMAND_NAME}
        self.requests = dict.fromkeys(self.command_names, 0)
        self.received = 0  # all requests: the weight of each latency observation
        self.answers: dict[tuple[int, int], int] = {}
        self.verdicts: dict[EquipmentStatus | None, int] = dict.fromkeys(
            [*EquipmentStatus, None], 0)
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    @classmethod
    def for_dictionary(cls, dictionary) -> "DiameterCounters":
        """Counters labelled with the command names of an eir.diameter Dictionary."""
        return cls({command.code: command.name for command in dictionary.commands.values()})

    def request(self, command_code: int) -> None:
        """Hot path: a request arrived (any command)."""
        self.received += 1
        try:
            self.requests[command_code] += 1
        except KeyError:  # a code the dictionary does not define: bounded to one key
            self.requests[OTHER_COMMAND] += 1

    def answer(self, command_code: int, result_code: int) -> None:
        """An answer other than an ME-Identity-Check verdict: CEA, DWA, DPA, any error."""
        if command_code not in self.requests:
            command_code = OTHER_COMMAND
        key = (command_code, int(result_code))
        self.answers[key] = self.answers.get(key, 0) + 1

    def observe(self, seconds: float, requests: int) -> None:
        """Hot path, once per read: `requests` requests were answered `seconds` after their
        bytes were read."""
        if requests:
            self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += requests
            self.latency_sum += seconds * requests


class QueuedLatency:
    """eir_request_duration_seconds for one connection whose requests may wait in its peer
    state machine's queue (eir.diameter.overload: a read of more requests than one turn answers).

    The queue is FIFO, so each read's requests are answered in order: this keeps, per read
    still queued, its time and how many of its messages wait, and charges every request
    answered from the queue with the time since its own read. Requests refused at once
    (3004) count from the read that brought them. Used only while a queue exists; the
    common case (a read answered whole) calls DiameterCounters.observe directly."""

    def __init__(self, counters: DiameterCounters):
        self.counters = counters
        self.reads: collections.deque[list] = collections.deque()  # [read time, waiting]

    def read(self, read_at: float, now: float, handled: int, refused: int,
             backlog_growth: int, backlog: int) -> None:
        """After a read at `read_at`: `handled` requests answered (`refused` of them with
        3004, at once), and the queue grew by `backlog_growth` to `backlog`."""
        self.counters.observe(now - read_at, refused)
        served = handled - refused  # from the front of the queue
        appended = backlog_growth + served  # what this read put in the queue
        if appended > 0:
            self.reads.append([read_at, appended])
        self.served(now, served, backlog)

    def served(self, now: float, served: int, backlog: int) -> None:
        """`served` requests were answered from the front of the queue, `backlog` wait."""
        reads = self.reads
        while served > 0 and reads:
            oldest = reads[0]
            taken = min(oldest[1], served)
            self.counters.observe(now - oldest[0], taken)
            served -= taken
            oldest[1] -= taken
            if not oldest[1]:
                reads.popleft()
        if not backlog:
            reads.clear()  # answers from peers also pass the queue: start afresh when empty


@dataclass
class MetricsSnapshot:
    """Every metric's value at one moment, as plain numbers (see the module docstring).

    Label values are strings; `answers` and `requests` are keyed by label tuples turned
    into "|"-joined strings so that the snapshot is JSON-safe."""

    requests: dict[str, int] = field(default_factory=dict)  # command → count
    answers: dict[str, int] = field(default_factory=dict)  # "command|code|status" → count
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS)
                                                                      + 1))
    latency_sum: float = 0.0
    peers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PEER_STATES, 0))
    list_version: str = ""
    list_entries: dict[str, int] = field(default_factory=dict)  # kind → count
    list_created: float = 0.0  # time.time() the snapshot in force was compiled
    # When the registry published the manifest of the lists in force (0: no manifest time),
    # and sync.max_age_seconds (None: no alert).
    list_published: float = 0.0
    sync_max_age: float | None = None
    list_reloads: dict[str, int] = field(default_factory=lambda: {"ok": 0, "refused": 0})
    sync: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SYNC_OUTCOMES, 0))
    sync_last_success: float | None = None
    observations_queued: int = 0
    observations_written: int = 0
    observations_dropped: int = 0
    observations_flush_errors: int = 0
    clone_hits: int = 0
    audit_written: int = 0
    audit_dropped: int = 0
    # N5g-eir (eir.interfaces.sbi): requests by HTTP status code, verdicts by Equipment status
    # (UNKNOWN: 404 ERROR_EQUIPMENT_UNKNOWN), open connections, NRF registration (1/0).
    sbi_requests: dict[str, int] = field(default_factory=dict)
    sbi_verdicts: dict[str, int] = field(default_factory=dict)
    sbi_connections: int = 0
    nrf_registered: int = 0
    # Requests with the T flag, by outcome (eir.diameter.duplicates): answered from the
    # cache, not found there, or naming a different request (answered anew, all but the
    # first); and what the cache holds.
    retransmissions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        RETRANSMISSION_OUTCOMES, 0))
    duplicate_cache_entries: int = 0
    duplicate_cache_bytes: int = 0
    # CERs from an Origin-Host that had an open connection already, by what was done
    # (diameter.duplicate_peers: refused, or allowed).
    duplicate_peers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        DUPLICATE_PEER_ACTIONS, 0))
    taken: float = 0.0  # time.time() of the snapshot

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MetricsSnapshot":
        return cls(**data)

    @classmethod
    def merge(cls, snapshots: Iterable["MetricsSnapshot"]) -> "MetricsSnapshot":
        """Several processes' snapshots as one: counts, histograms and peers are summed;
        the list, sync and clone facts (the same store seen by every worker) are those of
        the newest snapshot, sync outcomes summed."""
        merged = cls()
        newest = None
        for snapshot in snapshots:
            _add_into(merged.requests, snapshot.requests)
            _add_into(merged.answers, snapshot.answers)
            merged.latency_buckets = [a + b for a, b in zip(merged.latency_buckets,
                                                            snapshot.latency_buckets)]
            merged.latency_sum += snapshot.latency_sum
            _add_into(merged.peers, snapshot.peers)
            _add_into(merged.list_reloads, snapshot.list_reloads)
            _add_into(merged.sync, snapshot.sync)
            _add_into(merged.sbi_requests, snapshot.sbi_requests)
            _add_into(merged.sbi_verdicts, snapshot.sbi_verdicts)
            _add_into(merged.retransmissions, snapshot.retransmissions)
            _add_into(merged.duplicate_peers, snapshot.duplicate_peers)
            for name in ("observations_queued", "observations_written",
                         "observations_dropped", "observations_flush_errors", "clone_hits",
                         "audit_written", "audit_dropped", "sbi_connections",
                         "nrf_registered", "duplicate_cache_entries",
                         "duplicate_cache_bytes"):
                setattr(merged, name, getattr(merged, name) + getattr(snapshot, name))
            if newest is None or snapshot.taken >= newest.taken:
                newest = snapshot
        if newest is not None:
            merged.list_version = newest.list_version
            merged.list_entries = dict(newest.list_entries)
            merged.list_created = newest.list_created
            merged.list_published = newest.list_published
            merged.sync_max_age = newest.sync_max_age
            merged.sync_last_success = newest.sync_last_success
            merged.taken = newest.taken
        return merged


def _published(manifest: dict | None) -> float:
    """The manifest's `published` (eir.lists.manifest: "YYYY-MM-DDTHH:MM:SSZ") as Unix time."""
    text = (manifest or {}).get("published")
    if not text:
        return 0.0
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def _add_into(total: dict, more: dict) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value


def _answer_key(command: str, result_code: int, status: str) -> str:
    return f"{command}|{result_code}|{status}"


def snapshot_of(server: ServerView) -> MetricsSnapshot:
    """The metrics of a running eir.serve.server.EirServer (event-loop thread, at scrape time)."""
    counters: DiameterCounters = server.counters
    names = counters.command_names
    snapshot = MetricsSnapshot(taken=time.time())
    snapshot.requests = {names[code]: count for code, count in counters.requests.items()}
    answers: dict[str, int] = {}
    for (code, result_code), count in list(counters.answers.items()):
        key = _answer_key(names[code], result_code, NO_EQUIPMENT_STATUS)
        answers[key] = answers.get(key, 0) + count
    verdict_command = names.get(COMMAND_ME_IDENTITY_CHECK, OTHER_COMMAND_NAME)
    for status, count in counters.verdicts.items():
        if status is None:
            key = _answer_key(verdict_command, EQUIPMENT_UNKNOWN, UNKNOWN_EQUIPMENT_STATUS)
        else:
            key = _answer_key(verdict_command, SUCCESS, status.name)
        answers[key] = answers.get(key, 0) + count
    snapshot.answers = answers
    snapshot.latency_buckets = list(counters.latency_buckets)
    snapshot.latency_sum = counters.latency_sum
    for connection in list(server.connections):
        state = connection.peer.state.value if connection.peer is not None else "wait-cer"
        if state in snapshot.peers:
            snapshot.peers[state] += 1
    info = server.rule_set.snapshot.info
    snapshot.list_version = info.version
    snapshot.list_entries = {kind: int(info.counts.get(kind, 0))
                             for kind in ("imei", "pairs", "ranges", "tacs")}
    snapshot.list_created = float(info.created)
    snapshot.list_published = _published(info.manifest)
    snapshot.sync_max_age = server.settings.sync.max_age_seconds
    snapshot.list_reloads = dict(server.reload_counts)
    sync = server.sync_counters
    snapshot.sync = {"published": sync.published, "up_to_date": sync.up_to_date,
                     "refused": sync.refused}
    snapshot.sync_last_success = sync.last_success
    observations = server.observations
    if observations is not None:
        snapshot.observations_queued = observations.pending
        # A worker's "written" were handed to the supervisor, which counts them when it
        # writes them (eir.serve.workers).
        if server.worker_socket is None:
            snapshot.observations_written = observations.written
        snapshot.observations_dropped = observations.dropped
        snapshot.observations_flush_errors = observations.flush_errors
        snapshot.clone_hits = observations.clone_hits
    audit = server.audit
    if audit is not None:
        snapshot.audit_written = audit.written
        snapshot.audit_dropped = audit.dropped
    sbi = server.sbi
    if sbi is not None:
        sbi.counters.fill(snapshot)
    duplicates = server.duplicates
    if duplicates is not None:
        snapshot.retransmissions = {"answered_from_cache": duplicates.hits,
                                    "not_cached": duplicates.misses,
                                    "different_request": duplicates.mismatches}
        snapshot.duplicate_cache_entries = len(duplicates)
        snapshot.duplicate_cache_bytes = duplicates.bytes
    identities = server.peer_identities
    if identities is not None:  # the process that keeps the registry (the supervisor's)
        snapshot.duplicate_peers = dict(identities.duplicates)
    return snapshot


class EirCollector:
    """A prometheus-client collector of open EIR's metrics, from `snapshot()` at each
    scrape (one process's `snapshot_of(server)`, or several merged)."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]):
        self.snapshot = snapshot

    def describe(self):
        return []  # no up-front collect at registration: the server may not be running yet

    def collect(self):
        from prometheus_client.core import InfoMetricFamily

        s = self.snapshot()
        yield from _diameter_families(s)
        yield from _list_families(s)
        yield from _sync_families(s)
        yield from _observation_and_audit_families(s)
        yield from _duplicate_families(s)
        if s.sbi_requests or s.sbi_connections or s.nrf_registered:
            yield from _sbi_families(s)
        build = InfoMetricFamily("eir_build", "open EIR version")
        build.add_metric([], {"version": __version__})
        yield build


def _diameter_families(s: MetricsSnapshot):
    """Diameter requests, answers, request latency, peers by state."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    family = CounterMetricFamily("eir_requests", "Diameter requests received, by command",
                                 labels=["command"])
    for command, count in sorted(s.requests.items()):
        family.add_metric([command], count)
    yield family

    family = CounterMetricFamily(
        "eir_answers", "Diameter answers sent, by command, Result-Code (or "
        "Experimental-Result-Code) and Equipment-Status ('UNKNOWN' for 5422, 'none' when "
        "absent)",
        labels=["command", "result_code", "equipment_status"])
    for key, count in sorted(s.answers.items()):
        family.add_metric(key.split("|"), count)
    yield family

    cumulative, running = [], 0
    for bound, count in zip([*LATENCY_BUCKETS, float("inf")], s.latency_buckets):
        running += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
    yield HistogramMetricFamily(
        "eir_request_duration_seconds", "Time from reading a request's bytes to writing "
        "its answer, per request (a read of N pipelined requests counts N times)",
        buckets=cumulative, sum_value=s.latency_sum)

    peers = GaugeMetricFamily("eir_peers", "Diameter connections by peer state",
                              labels=["state"])
    for state, count in s.peers.items():
        peers.add_metric([state], count)
    yield peers


def _list_families(s: MetricsSnapshot):
    """The lists in force: entries, version, age, staleness, reloads."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    family = GaugeMetricFamily("eir_list_entries", "Entries of the lists in force, by kind",
                               labels=["kind"])
    for kind, count in s.list_entries.items():
        family.add_metric([kind], count)
    yield family
    info = InfoMetricFamily("eir_list_version", "Version of the lists in force")
    info.add_metric([], {"version": s.list_version})
    yield info
    yield GaugeMetricFamily("eir_list_age_seconds",
                            "Age of the lists in force (since they were compiled)",
                            value=max(0.0, s.taken - s.list_created) if s.list_created
                            else 0.0)
    yield GaugeMetricFamily("eir_list_created_timestamp_seconds",
                            "When the lists in force were compiled (Unix time)",
                            value=s.list_created)
    if s.list_published:
        yield GaugeMetricFamily("eir_list_published_timestamp_seconds",
                                "When the registry published the manifest of the lists "
                                "in force (its `published`, Unix time)",
                                value=s.list_published)
    if s.sync_max_age is not None:
        # Stale: the registry's lists in force are older than sync.max_age_seconds (since
        # their manifest's publication, else since they were compiled): a registry that
        # stopped publishing, or an attacker holding the EIR on old lists.
        age = s.taken - (s.list_published or s.list_created)
        yield GaugeMetricFamily("eir_list_stale", "1 when the lists in force are older "
                                "than sync.max_age_seconds, else 0",
                                value=int(age > s.sync_max_age))
    reloads = CounterMetricFamily("eir_list_reloads", "List reloads by outcome",
                                  labels=["outcome"])
    for outcome, count in s.list_reloads.items():
        reloads.add_metric([outcome], count)
    yield reloads


def _sync_families(s: MetricsSnapshot):
    """Registry syncs run by this process."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    family = CounterMetricFamily("eir_sync", "Registry syncs run by this server, by "
                                 "outcome", labels=["outcome"])
    for outcome, count in s.sync.items():
        family.add_metric([outcome], count)
    yield family
    if s.sync_last_success is not None:
        yield GaugeMetricFamily("eir_sync_last_success_timestamp_seconds",
                                "When the last sync that was not refused ended",
                                value=s.sync_last_success)


def _observation_and_audit_families(s: MetricsSnapshot):
    """Observations, clone hits, audit records."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield GaugeMetricFamily("eir_observations_queued",
                            "Distinct observations waiting for the next flush",
                            value=s.observations_queued)
    yield CounterMetricFamily("eir_observations_written", "Observations committed",
                              value=s.observations_written)
    yield CounterMetricFamily("eir_observations_dropped",
                              "Observations refused because too many were pending",
                              value=s.observations_dropped)
    yield CounterMetricFamily("eir_observations_flush_errors",
                              "Observation flushes that failed (kept for the next)",
                              value=s.observations_flush_errors)
    yield CounterMetricFamily(
        "eir_clone_hits", "IMEIs that reached more than observations.clone_threshold "
        "distinct IMSIs on one day (counted once per IMEI and day by this process)",
        value=s.clone_hits)
    yield CounterMetricFamily("eir_audit_records", "Audit records written",
                              value=s.audit_written)
    yield CounterMetricFamily("eir_audit_dropped",
                              "Audit records dropped because the writer fell behind",
                              value=s.audit_dropped)


def _duplicate_families(s: MetricsSnapshot):
    """Retransmissions, the duplicate-answer cache, duplicate peers."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    family = CounterMetricFamily(
        "eir_retransmissions", "Requests with the T flag, by outcome: answered_from_cache "
        "(the same request from the same peer), not_cached, different_request (its "
        "Origin-Host and End-to-End id name another request: answered anew)",
        labels=["outcome"])
    for outcome, count in s.retransmissions.items():
        family.add_metric([outcome], count)
    yield family
    yield GaugeMetricFamily("eir_duplicate_cache_entries",
                            "Answers kept for retransmissions",
                            value=s.duplicate_cache_entries)
    yield GaugeMetricFamily("eir_duplicate_cache_bytes", "Bytes the answers kept for "
                            "retransmissions count for (bounded by "
                            "diameter.duplicates.max_bytes)",
                            value=s.duplicate_cache_bytes)
    family = CounterMetricFamily(
        "eir_duplicate_peer_connections", "CERs from an Origin-Host that had an open "
        "connection already, by what diameter.duplicate_peers did with them",
        labels=["action"])
    for action, count in s.duplicate_peers.items():
        family.add_metric([action], count)
    yield family


def _sbi_families(s: MetricsSnapshot):
    """The N5g-eir metrics: families of their own beside S13's (whose names and labels the
    dashboards use), yielded once the listener has served or is serving."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    family = CounterMetricFamily("eir_sbi_requests", "N5g-eir requests answered, by HTTP "
                                 "status code", labels=["status_code"])
    for code, count in sorted(s.sbi_requests.items()):
        family.add_metric([code], count)
    yield family
    family = CounterMetricFamily("eir_sbi_verdicts", "N5g-eir equipment-status verdicts, by "
                                 "status (UNKNOWN: 404 ERROR_EQUIPMENT_UNKNOWN)",
                                 labels=["equipment_status"])
    for status, count in sorted(s.sbi_verdicts.items()):
        family.add_metric([status], count)
    yield family
    yield GaugeMetricFamily("eir_sbi_connections", "Open N5g-eir HTTP/2 connections",
                            value=s.sbi_connections)
    yield GaugeMetricFamily("eir_nrf_registered", "1 while registered with the NRF as a "
                            "5G_EIR NF instance", value=s.nrf_registered)


class ProcessesCollector:
    """prometheus-client's process metrics (`process_cpu_seconds_total`,
    `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
    `process_max_fds`, `process_start_time_seconds`) of this process and of its workers.

    Without workers (`worker_pids()` is None): this process's, unlabelled, as
    prometheus-client's ProcessCollector gives them. With workers: one series per process,
    labelled `worker` (the worker's index, or "supervisor"), each read from /proc/PID at
    the scrape, as a process reads its own. Per process rather than summed, because what
    these metrics are watched for is a process's own: its file descriptors against its own
    limit, its restart (a new start time), its memory; `sum by (instance)` gives the EIR's
    CPU and memory (the page cache of a memory-mapped snapshot is shared: resident memory
    summed over the workers counts it once per worker)."""

    def __init__(self, worker_pids: Callable[[], dict[int, int] | None]):
        self.worker_pids = worker_pids

    def describe(self):
        return []

    def collect(self):
        from prometheus_client import ProcessCollector
        from prometheus_client.core import Metric

        pids = self.worker_pids()
        if pids is None:
            return ProcessCollector(registry=None).collect()
        families: dict[str, Metric] = {}
        processes = [(SUPERVISOR_LABEL, "self"),
                     *((str(index), pid) for index, pid in sorted(pids.items()))]
        for label, pid in processes:
            # A process gone since (a worker restarting) is left out: the reader ignores
            # the OSError of its /proc directory.
            reader = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for family in reader.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation,
                                                            family.type)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": label},
                                      sample.value)
        return families.values()


def registry_for(snapshot: Callable[[], MetricsSnapshot],
                 worker_pids: Callable[[], dict[int, int] | None] = lambda: None):
    """A prometheus-client registry with open EIR's collector and the process metrics (CPU,
    memory, file descriptors) of this process and its workers (`worker_pids()`: {index: pid},
    None without workers)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(EirCollector(snapshot))
    registry.register(ProcessesCollector(worker_pids))
    return registry


def metrics_app(server: ServerView):
    """The ASGI app answering GET /metrics with the server's metrics (prometheus-client's
    exposition: text format, OpenMetrics when asked, gzip when accepted)."""
    from prometheus_client import make_asgi_app

    workers: list[MetricsSnapshot] = []  # the workers' metrics, gathered at each scrape

    def worker_pids() -> dict[int, int] | None:
        return None if server.supervisor is None else server.supervisor.worker_pids()

    app = make_asgi_app(registry_for(lambda: merged_snapshot(server, workers), worker_pids))

    async def gathering(scope, receive, send):
        # Several workers (eir.serve.workers): their counters are asked for at each scrape, so
        # that a scrape sees every process at (nearly) one instant.
        if scope["type"] == "http" and server.supervisor is not None:
            workers[:] = await worker_snapshots(server)
        await app(scope, receive, send)

    return gathering


async def worker_snapshots(server: ServerView) -> list[MetricsSnapshot]:
    """The metrics of this process's workers, asked for now (none without workers)."""
    if server.supervisor is None:
        return []
    return [MetricsSnapshot.from_dict(data)
            for data in await server.supervisor.ask_all("snapshot")]


def merged_snapshot(server: ServerView, workers: list[MetricsSnapshot]) -> MetricsSnapshot:
    """This process's metrics, merged with its workers' (as last gathered) if it has any."""
    own = snapshot_of(server)
    if server.supervisor is None:
        return own
    return MetricsSnapshot.merge([own, *workers])
