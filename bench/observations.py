"""Cost of recording an observation on the hot path, and of flushing them to SQLite.

    python3 bench/observations.py [--count N]      # last line of output: JSON figures

`ObservationLog.record(day, imei, imsi)` is what the S13 application calls for every
decided check. Timed (CPU time of the calling thread, steady on a shared machine) over N
calls in rounds of --per-flush calls (30,000: one second at 30k ECR/s), with a flush into a
fresh SQLite database between rounds as the writer thread does every flush_seconds; the
loop's own cost is measured separately and subtracted. The mix: 20% new (IMEI, IMSI) pairs,
80% pairs seen before (a phone attaches many times a day); IMEI and IMSI strings freshly
decoded for each call, as the server decodes them from the AVPs (decoding not counted).
The flushes give rows/s for the writer thread.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's eir/, installed or not

from eir.check.observations import ObservationLog  # noqa: E402

DAY = 20240501


def workload(count: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """(IMEI, IMSI) as the bytes of the AVPs: decoded inside the timed loop (and inside the
    empty loop subtracted from it), so each call gets fresh strings, as in the server."""
    rng = random.Random(seed)
    fresh = [(f"{35000000 + rng.randrange(5000):08d}{rng.randrange(1_000_000):06d}".encode(),
              f"51010{rng.randrange(10**10):010d}".encode()) for _ in range(count // 5 + 1)]
    return [fresh[i // 5] if i % 5 == 0 else fresh[rng.randrange(max(1, i // 5))]
            for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--per-flush", type=int, default=30_000,
                        help="checks between two flushes (30,000: one second at 30k ECR/s)")
    args = parser.parse_args()
    calls = workload(args.count)
    clock = time.thread_time_ns  # CPU time of this thread: steady on a shared machine
    record_ns = empty_ns = flush_ns = 0
    written = 0
    with tempfile.TemporaryDirectory() as directory:
        observations = ObservationLog(Path(directory) / "observations.sqlite")
        record = observations.record
        for first in range(0, len(calls), args.per_flush):
            chunk = calls[first:first + args.per_flush]
            started = clock()
            for imei, imsi in chunk:
                imei.decode(), imsi.decode()
            empty_ns += clock() - started
            started = clock()
            for imei, imsi in chunk:
                record(DAY, imei.decode(), imsi.decode())
            record_ns += clock() - started
            started = time.perf_counter_ns()
            written += observations.flush()
            flush_ns += time.perf_counter_ns() - started
        observations.close()
    per_record = (record_ns - empty_ns) / len(calls)
    rows_per_s = written / (flush_ns / 1e9) if flush_ns else 0.0
    print(f"record(): {per_record:.0f} ns per call (CPU time) over {len(calls):,} calls, "
          f"flushed every {args.per_flush:,} calls")
    print(f"flush(): {written:,} rows in {flush_ns / 1e9:.2f} s ({rows_per_s:,.0f} rows/s, "
          "in the writer thread)")
    print(json.dumps({"observation_record_ns": round(per_record, 1),
                      "observation_flush_rows_per_s": round(rows_per_s),
                      "target_met": per_record < 1000}))


if __name__ == "__main__":
    main()
