"""Latency histograms, per-interval figures and the merge of what every worker reports.

Latencies are recorded in microseconds in HdrHistogram (the `hdrhistogram` package: the
reference algorithm, 3 significant digits from 1 µs to an hour, mergeable, and encodable in a
few kB so that worker processes can send theirs to the parent).

Each worker sends one `IntervalReport` per INTERVAL_S of the run (the answers completed in it)
and one `WorkerResult` at the end. The parent's `Aggregator` merges interval k once every
worker still running has sent it, keeps a small summary of it (for progress and plots) and
adds its histogram to the run's.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from hdrh.histogram import HdrHistogram

INTERVAL_S = 0.25
LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS = 1, 3_600_000_000, 3
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def clear_histogram(histogram: HdrHistogram) -> None:
    """histogram.reset(), its counters zeroed by numpy: reset() zeroes the 23,552 one by one in
    Python (~10 ms; a new histogram costs ~0.4 ms). tests/test_replay_bulk.py checks that the
    result is what reset() leaves."""
    np.ctypeslib.as_array(histogram.counts)[:] = 0
    histogram.total_count = 0
    histogram.min_value = sys.maxsize
    histogram.max_value = 0
    histogram.start_time_stamp_msec = sys.maxsize
    histogram.end_time_stamp_msec = 0


def record_latencies(histogram: HdrHistogram, latencies_s: list[float]) -> None:
    """Record latencies given in seconds, each truncated to whole µs and clamped to the
    histogram's range, as histogram.record_value would one by one, but in one numpy pass.

    The package records in Python (~1.5 µs a value: as much as all the rest a request costs
    the load generator), so the counter index of each value is computed here with its own
    formula (HdrHistogram._counts_index_for), vectorised, and the counts added to its counts
    array; total, min and max are kept as record_value keeps them. tests/test_replay_bulk.py
    checks the result against record_value, value by value."""
    if not latencies_s:
        return
    values = np.clip((np.array(latencies_s) * 1_000_000).astype(np.int64), LOWEST_US, HIGHEST_US)
    # bucket: where the value's highest bit is, above the sub-bucket range (bit length from
    # frexp: exact, the values are below 2**53)
    bit_length = np.frexp((values | histogram.sub_bucket_mask).astype(np.float64))[1]
    bucket = bit_length - histogram.unit_magnitude - (histogram.sub_bucket_half_count_magnitude
                                                      + 1)
    sub_bucket = values >> (bucket + histogram.unit_magnitude)
    indexes = ((bucket + 1) << histogram.sub_bucket_half_count_magnitude) + sub_bucket \
        - histogram.sub_bucket_half_count
    distinct, counts = np.unique(indexes, return_counts=True)
    np.ctypeslib.as_array(histogram.counts)[distinct] += counts.astype(np.uint64)
    histogram.total_count += len(values)
    histogram.min_value = min(histogram.min_value, int(values.min()))
    histogram.max_value = max(histogram.max_value, int(values.max()))


def latency_ms(histogram: HdrHistogram) -> dict[str, float | None]:
    """p50, p90, p99, p999 and max in milliseconds (None for all when nothing was recorded)."""
    if histogram.get_total_count() == 0:
        return dict.fromkeys([*(name for name, _ in PERCENTILES), "max"])
    values = values_at_percentiles(histogram, [q for _, q in PERCENTILES])
    figures = {name: value / 1000 for (name, _), value in zip(PERCENTILES, values)}
    figures["max"] = histogram.get_max_value() / 1000
    return figures


def values_at_percentiles(histogram: HdrHistogram, percentiles: list[float]) -> list[int]:
    """histogram.get_value_at_percentile(q) for each q, from one cumulative sum of the counts:
    the package's own walks its 23,552 counters in Python, ~20 ms a call, which made the
    per-interval figures cost more CPU than the requests of a 5k/s run."""
    cumulative = np.cumsum(np.ctypeslib.as_array(histogram.counts))
    values = []
    for q in percentiles:
        # The first counter at which the cumulative count reaches the target, as the walk does.
        index = int(np.searchsorted(cumulative, histogram.get_target_count_at_percentile(q)))
        if index == len(cumulative):
            values.append(0)
            continue
        value = histogram.get_value_from_index(index)
        values.append(histogram.get_highest_equivalent_value(value) if q
                      else histogram.get_lowest_equivalent_value(value))
    return values


@dataclass
class IntervalReport:
    """What one worker saw in interval `index` ([start + index·INTERVAL_S, +INTERVAL_S))."""

    worker: int
    index: int
    sent: int
    answered: int
    errors: int
    timeouts: int
    histogram: bytes  # HdrHistogram.encode() of the answers' latencies (µs)


@dataclass
class IntervalSummary:
    """One interval of the whole run, for the progress line and the plots."""

    start_s: float  # from the start of the run
    sent: int
    answered: int
    errors: int
    timeouts: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass
class WorkerResult:
    """The totals of one worker at its end."""

    worker: int
    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    late_answers: int = 0  # answers to requests already counted as timed out
    lost: int = 0  # requests outstanding when their connection broke
    unsent: int = 0  # requests a broken connection never sent
    by_verdict: Counter = field(default_factory=Counter)  # Verdict → answers
    expected_errors: int = 0  # error answers the workload meant to provoke (not errors)
    compared: int = 0  # pcap replay: answers compared with the captured one
    diffs: Counter = field(default_factory=Counter)  # (imei, imsi, before, after) → count
    connection_errors: list[str] = field(default_factory=list)
    first_send: float | None = None  # time.monotonic()
    last_answer: float | None = None
    max_send_lag_s: float = 0.0  # paced runs: latest send after its scheduled time


class Aggregator:
    """Merges what the workers report; calls `on_interval` for each interval merged."""

    def __init__(self, workers: int, on_interval=None):
        self.running = set(range(workers))
        self.reported = dict.fromkeys(range(workers), -1)  # last interval index each sent
        self.pending: dict[int, tuple[HdrHistogram, list[int]]] = {}
        self.next_index = 0
        self.total = new_histogram()
        self.intervals: list[IntervalSummary] = []
        self.results: list[WorkerResult] = []
        self.on_interval = on_interval

    def add_interval(self, report: IntervalReport) -> None:
        entry = self.pending.get(report.index)
        if entry is None:  # the first report of the interval: its histogram, decoded
            entry = self.pending[report.index] = (HdrHistogram.decode(report.histogram),
                                                  [0, 0, 0, 0])
        else:
            entry[0].decode_and_add(report.histogram)
        counts = entry[1]
        counts[0] += report.sent
        counts[1] += report.answered
        counts[2] += report.errors
        counts[3] += report.timeouts
        self.reported[report.worker] = report.index
        self._merge_ready()

    def add_result(self, result: WorkerResult) -> None:
        self.results.append(result)
        self.running.discard(result.worker)
        self._merge_ready()

    def finish(self) -> None:
        self.running.clear()
        self._merge_ready()

    def _merge_ready(self) -> None:
        ready = min((self.reported[w] for w in self.running), default=None)
        while self.pending and (ready is None or self.next_index <= ready):
            index = self.next_index
            self.next_index += 1
            entry = self.pending.pop(index, None)
            if entry is None:
                continue
            histogram, (sent, answered, errors, timeouts) = entry
            self.total.add(histogram)
            figures = latency_ms(histogram)
            summary = IntervalSummary(index * INTERVAL_S, sent, answered, errors, timeouts,
                                      figures["p50"], figures["p99"], figures["max"])
            self.intervals.append(summary)
            if self.on_interval is not None:
                self.on_interval(summary, histogram)
