"""`--plot FILE.png`: throughput and latency over time, and the latency distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eir.replay.stats import INTERVAL_S


def write_plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    intervals = report.intervals
    # Interval edges; the last interval ends with the run, not a whole interval later.
    edges = np.array([i.start_s for i in intervals] + [
        intervals[-1].start_s + INTERVAL_S if intervals else INTERVAL_S], dtype=float)
    if intervals:
        edges[-1] = max(min(edges[-1], report.elapsed_s), edges[-2] + 0.001)
    widths = np.diff(edges)
    figure, (rate_axes, time_axes, histogram_axes) = plt.subplots(
        3, 1, figsize=(11, 12), gridspec_kw={"height_ratios": [2, 3, 3]},
        constrained_layout=True)
    latency = report.latency_ms
    figure.suptitle(f"eir replay → {report.target}: {report.answered:,} answers, "
                    f"{report.rate_per_s:,.0f}/s, p50 {_ms(latency['p50'])}, "
                    f"p99 {_ms(latency['p99'])}, max {_ms(latency['max'])}\n"
                    f"{report.description}", fontsize=11)

    # Throughput: answers per second in each interval, and the target rate.
    answered = np.array([i.answered for i in intervals], dtype=float) / widths
    rate_axes.stairs(answered, edges, color="tab:blue", linewidth=1.5, label="answers/s",
                     baseline=None)
    failures = np.array([i.errors + i.timeouts for i in intervals], dtype=float) / widths
    if failures.any():
        rate_axes.stairs(failures, edges, color="tab:red", linewidth=1.5,
                         label="errors + timeouts/s", baseline=None)
    if report.target_rate:
        rate_axes.axhline(report.target_rate, color="grey", linestyle="--", linewidth=1,
                          label=f"target {report.target_rate:,.0f}/s")
    rate_axes.set_ylabel("requests per second")
    rate_axes.set_xlabel(f"time since start (s), in {INTERVAL_S * 1000:.0f} ms intervals")
    rate_axes.set_xlim(0, edges[-1])
    rate_axes.set_ylim(bottom=0, top=max(answered.max(initial=0),
                                         report.target_rate or 0) * 1.15 or 1)
    rate_axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    rate_axes.grid(True, alpha=0.3)
    rate_axes.legend(loc="lower right", fontsize=9)
    rate_axes.set_title("Throughput", fontsize=10, loc="left")

    # Latency over time: p50, p99 and max of each interval, on a log scale. The max is drawn
    # dotted on top: answers read together often share it with the p99.
    for name, color, style, values in (
            ("p50", "tab:blue", "-", [i.p50_ms for i in intervals]),
            ("p99", "tab:orange", "-", [i.p99_ms for i in intervals]),
            ("max", "tab:red", ":", [i.max_ms for i in intervals])):
        series = np.array([np.nan if v is None else v for v in values], dtype=float)
        time_axes.stairs(series, edges, color=color, linestyle=style, linewidth=1.5,
                         label=name, baseline=None)
    time_axes.set_yscale("log")
    time_axes.set_xlim(0, edges[-1])
    time_axes.set_ylabel(f"latency (ms, log scale)\nfrom {report.latency_from}")
    time_axes.set_xlabel("time since start (s)")
    _log_ticks(time_axes.yaxis)
    time_axes.grid(True, which="both", alpha=0.3)
    time_axes.legend(loc="upper right", fontsize=9)
    time_axes.set_title("Latency over time (per interval)", fontsize=10, loc="left")

    # Distribution: requests per latency bin (log-spaced bins), percentiles marked.
    values, counts = report.recorded_latencies_us()
    if len(values):
        low, high = max(values.min(), 1), max(values.max(), 2)
        edges = np.logspace(np.log10(low) - 0.02, np.log10(high) + 0.02, 80)
        binned, _ = np.histogram(values, bins=edges, weights=counts)
        histogram_axes.stairs(binned, edges / 1000, fill=True, color="tab:blue", alpha=0.6)
        for name, style in (("p50", ":"), ("p99", "--"), ("p999", "-.")):
            value = latency[name]
            if value is not None:
                histogram_axes.axvline(value, color="black", linestyle=style, linewidth=1,
                                       label=f"{name.replace('p999', 'p99.9')} {_ms(value)}")
        histogram_axes.set_xscale("log")
        histogram_axes.set_yscale("log")
        histogram_axes.set_ylim(bottom=0.8)
        histogram_axes.legend(loc="upper right", fontsize=9)
    histogram_axes.set_xlabel("latency (ms, log scale)")
    histogram_axes.set_ylabel("requests per bin (log scale)")
    _log_ticks(histogram_axes.xaxis)
    histogram_axes.grid(True, which="both", alpha=0.3)
    histogram_axes.set_title("Latency histogram (all answers)", fontsize=10, loc="left")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _log_ticks(axis) -> None:
    """Ticks at 1, 2, 5 × 10^n, labelled as plain numbers (seconds from 1000 ms on)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(_ms_tick))
    axis.set_minor_formatter(NullFormatter())


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} ms" if value < 1000 else f"{value / 1000:.3g} s"


def _ms_tick(value: float, _position) -> str:
    if value >= 1000:
        return f"{value / 1000:g} s"
    return f"{value:g}"
