"""Run the whole benchmark: hotpath.py, then e2e.py, then a summary.

Each part runs in its own process (own CPU pinning, own heap); their output is shown as it
comes, and the last line printed here is one JSON object with the headline figures.

    python3 bench/run.py            # full run, under 3 minutes
    python3 bench/run.py --quick    # small counts, about 15 s (CI)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TARGET_ECR_PER_S = 30_000


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, ~15 s (CI)")
    parser.add_argument("--require-target", action="store_true",
                        help=f"exit 1 when end to end is below {TARGET_ECR_PER_S:,} ECR/s")
    args = parser.parse_args()
    extra = ["--quick"] if args.quick else []

    hot = run_part("hotpath.py", extra)
    print()
    e2e = run_part("e2e.py", extra)

    met = e2e["e2e_ecr_per_s_one_conn"] >= TARGET_ECR_PER_S
    rows = [
        ("end to end, eir serve, 1 connection", f"{e2e['e2e_ecr_per_s_one_conn']:,} ECR/s",
         f"p50 {e2e['e2e_p50_ms']:.2f} ms", f"p99 {e2e['e2e_p99_ms']:.2f} ms"),
        ("end to end, python-diameter EIR", f"{e2e['python_diameter_server_ecr_per_s']:,} ECR/s",
         f"p50 {e2e['python_diameter_server_p50_ms']:.2f} ms",
         f"p99 {e2e['python_diameter_server_p99_ms']:.2f} ms"),
        ("hot path, eir receive(), 1 ECR/call", f"{hot['hotpath_ecr_per_s']:,} ECR/s",
         f"p50 {hot['hotpath_p50_us']:.1f} µs", f"p99 {hot['hotpath_p99_us']:.1f} µs"),
        ("hot path, eir receive(), 64 ECRs/call", f"{hot['hotpath_batched_ecr_per_s']:,} ECR/s",
         "", ""),
        ("hot path, python-diameter codec", f"{hot['python_diameter_codec_per_s']:,} msg/s",
         f"p50 {hot['python_diameter_codec_p50_us']:.1f} µs",
         f"p99 {hot['python_diameter_codec_p99_us']:.1f} µs"),
    ]
    pinned = "server core 0, client core 1" if e2e["e2e_pinned"] else "not pinned"
    print(f"\nsummary ({'quick' if args.quick else 'full'} run; end-to-end window "
          f"{e2e['e2e_window']}, {pinned}; other load: hot path "
          f"{hot['hotpath_other_cpu_load']:.2f} CPU, "
          f"end to end {e2e['e2e_other_cpu_load']:.2f} CPU)")
    for name, rate, p50, p99 in rows:
        print(f"  {name:<40}{rate:>16}  {p50:>14}  {p99:>14}".rstrip())
    print(f"  ratio eir / python-diameter: codec {hot['ratio_vs_python_diameter_codec']:.1f}x, "
          f"server {e2e['ratio_vs_python_diameter_server']:.1f}x")
    print(f"  target {TARGET_ECR_PER_S:,} ECR/s end to end on one connection and one core: "
          f"{'met' if met else 'NOT met'}")
    print(json.dumps({
        "e2e_ecr_per_s_one_conn": e2e["e2e_ecr_per_s_one_conn"],
        "e2e_p50_ms": e2e["e2e_p50_ms"],
        "e2e_p99_ms": e2e["e2e_p99_ms"],
        "hotpath_ecr_per_s": hot["hotpath_ecr_per_s"],
        "hotpath_p99_us": hot["hotpath_p99_us"],
        "ratio_vs_python_diameter_codec": hot["ratio_vs_python_diameter_codec"],
        "ratio_vs_python_diameter_server": e2e["ratio_vs_python_diameter_server"],
        "target_met": met,
        "quick": args.quick,
    }))
    return 1 if args.require_target and not met else 0


if __name__ == "__main__":
    sys.exit(main())
