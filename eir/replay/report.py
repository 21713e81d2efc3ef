"""The final report of a run: merged from the workers' results, printed as text or JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from eir.replay.messages import describe, is_error, status_name
from eir.replay.stats import Aggregator, IntervalSummary, latency_ms

MAX_DIFFS_SHOWN = 50


@dataclass
class Report:
    mode: str
    description: str
    target: str
    connections: int
    processes: int
    window: int
    target_rate: float | None
    pace: str  # how requests were sent, in words
    latency_from: str  # what latency is measured from, in words
    sent: int
    answered: int
    errors: int
    expected_errors: int  # answers the workload meant to provoke (a mix's invalid IMEIs)
    timeouts: int
    late_answers: int
    lost: int
    unsent: int
    elapsed_s: float
    rate_per_s: float
    latency_ms: dict
    by_verdict: Counter
    max_send_lag_ms: float | None
    connection_errors: list[str]
    intervals: list[IntervalSummary]
    histogram: object
    diff: dict | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, aggregator: Aggregator, paced: bool, **fields) -> "Report":
        results = aggregator.results
        by_verdict: Counter = Counter()
        diffs: Counter = Counter()
        for result in results:
            by_verdict.update(result.by_verdict)
            diffs.update(result.diffs)
        starts = [r.first_send for r in results if r.first_send is not None]
        ends = [r.last_answer for r in results if r.last_answer is not None]
        elapsed = max(ends) - min(starts) if starts and ends else 0.0
        answered = sum(r.answered for r in results)
        lost = sum(r.lost for r in results)
        error_answers = sum(n for verdict, n in by_verdict.items() if is_error(verdict))
        expected = sum(r.expected_errors for r in results)
        report = cls(
            sent=sum(r.sent for r in results), answered=answered,
            errors=error_answers - expected + lost, expected_errors=expected,
            timeouts=sum(r.timeouts for r in results),
            late_answers=sum(r.late_answers for r in results), lost=lost,
            unsent=sum(r.unsent for r in results), elapsed_s=elapsed,
            rate_per_s=answered / elapsed if elapsed > 0 else 0.0,
            latency_ms=latency_ms(aggregator.total), by_verdict=by_verdict,
            max_send_lag_ms=max((r.max_send_lag_s for r in results), default=0.0) * 1000
            if paced else None,
            connection_errors=[e for r in results for e in r.connection_errors],
            intervals=aggregator.intervals, histogram=aggregator.total, **fields)
        if fields["mode"] == "pcap":
            report.diff = _diff(results, diffs)
        return report

    # -- figures ------------------------------------------------------------------------------

    @property
    def by_result(self) -> dict[str, int]:
        counts: Counter = Counter()
        for (code, _), n in self.by_verdict.items():
            counts["none" if code is None else str(code)] += n
        return dict(sorted(counts.items()))

    @property
    def by_equipment_status(self) -> dict[str, int]:
        counts: Counter = Counter()
        for (_, status), n in self.by_verdict.items():
            if status is not None:
                counts[status_name(status)] += n
        return dict(sorted(counts.items()))

    def recorded_latencies_us(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, counts) of the run's histogram, for plotting."""
        values, counts = [], []
        for step in self.histogram.get_recorded_iterator():
            values.append(step.value_iterated_to)
            counts.append(step.count_added_in_this_iter_step)
        return np.array(values, dtype=float), np.array(counts, dtype=float)

    def to_json(self) -> dict:
        document = {
            "mode": self.mode, "target": self.target, "description": self.description,
            "connections": self.connections, "processes": self.processes,
            "window": self.window, "target_rate_per_s": self.target_rate,
            "sent": self.sent, "answered": self.answered, "errors": self.errors,
            "expected_errors": self.expected_errors,
            "timeouts": self.timeouts, "late_answers": self.late_answers, "lost": self.lost,
            "unsent": self.unsent, "elapsed_s": round(self.elapsed_s, 4),
            "rate_per_s": round(self.rate_per_s, 1),
            "latency_ms": {k: None if v is None else round(v, 3)
                           for k, v in self.latency_ms.items()},
            "latency_from": self.latency_from,
            "max_send_lag_ms": None if self.max_send_lag_ms is None else round(
                self.max_send_lag_ms, 3),
            "by_result": self.by_result, "by_equipment_status": self.by_equipment_status,
            "connection_errors": self.connection_errors, "notes": self.notes,
        }
        if self.diff is not None:
            document["diff"] = self.diff
        return document

    def text(self) -> str:
        lines = [f"eir replay → {self.target}: {self.description}",
                 f"  {self.connections} connection(s) in {self.processes} process(es), "
                 f"window {self.window}, {self.pace}"]
        expected = (f" (and {self.expected_errors:,} expected error answers to the mix's "
                    "invalid IMEIs)" if self.expected_errors else "")
        lines.append(f"  sent {self.sent:,}  answered {self.answered:,}  errors {self.errors:,}"
                     f"{expected}  timeouts {self.timeouts:,}  in {self.elapsed_s:.2f} s: "
                     f"{self.rate_per_s:,.0f} answers/s"
                     + (f" (target {self.target_rate:,.0f}/s)" if self.target_rate else ""))
        if self.lost or self.unsent or self.late_answers:
            lines.append(f"  lost with their connection {self.lost:,}, never sent "
                         f"{self.unsent:,}, answered after their timeout {self.late_answers:,}")
        figures = "  ".join(f"{name.replace('p999', 'p99.9')} {_ms(value)}"
                            for name, value in self.latency_ms.items())
        lines.append(f"  latency (from {self.latency_from}): {figures}")
        if self.max_send_lag_ms is not None:
            lines.append(f"  latest send behind its schedule: {self.max_send_lag_ms:.2f} ms")
        by_answer = sorted(self.by_verdict.items(), key=lambda item: -item[1])
        lines.append("  answers: " + ("  ".join(f"{describe(v)} {n:,}" for v, n in by_answer)
                                      or "none"))
        lines.append("  by Result-Code: " + ("  ".join(
            f"{code} {n:,}" for code, n in self.by_result.items()) or "none"))
        lines.append("  by Equipment-Status: " + ("  ".join(
            f"{name} {n:,}" for name, n in self.by_equipment_status.items()) or "none"))
        for error in self.connection_errors:
            lines.append(f"  connection error: {error}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.diff is not None:
            diff = self.diff
            lines.append(f"  compared with the capture: {diff['compared']:,} answers, "
                         f"{diff['changed']:,} changed, {diff['unchanged']:,} unchanged, "
                         f"{diff['no_captured_answer']:,} without an answer in the capture")
            for change in diff["changes"][:MAX_DIFFS_SHOWN]:
                imsi = f" IMSI {change['imsi']}" if change["imsi"] else ""
                times = f" (x{change['count']})" if change["count"] > 1 else ""
                lines.append(f"    IMEI {change['imei']}{imsi}: {change['before']['text']} → "
                             f"{change['after']['text']}{times}")
            if len(diff["changes"]) > MAX_DIFFS_SHOWN:
                lines.append(f"    ... and {len(diff['changes']) - MAX_DIFFS_SHOWN} more "
                             "(all of them in --json)")
        return "\n".join(lines)


def _verdict_json(verdict) -> dict:
    code, status = verdict
    return {"result_code": code,
            "equipment_status": None if status is None else status_name(status),
            "text": describe(verdict)}


def _diff(results, diffs: Counter) -> dict:
    compared = sum(r.compared for r in results)
    changed = sum(diffs.values())
    answered = sum(r.answered for r in results)
    changes = [{"imei": imei, "imsi": imsi, "before": _verdict_json(before),
                "after": _verdict_json(after), "count": count}
               for (imei, imsi, before, after), count in sorted(
                   diffs.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))]
    return {"compared": compared, "changed": changed, "unchanged": compared - changed,
            "no_captured_answer": answered - compared,
            "changed_imeis": sorted({change["imei"] or "" for change in changes}),
            "changes": changes}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"
