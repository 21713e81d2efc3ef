"""Soak run (issue 7, item 4; docs/RELIABILITY.md): `eir serve --store` (default workers) under
`eir replay` at a share of its measured maximum for N minutes, with a list swap every minute
(`eir sync` of a changed list into the store, which the server follows). Per minute: answers,
errors, timeouts, p50/p99, the swap's version, and the RSS of the supervisor and each worker.

    python3 bench/soak.py --minutes 30          # the issue's run
    python3 bench/soak.py --minutes 3           # what docs/RELIABILITY.md reports

The maximum is measured first (`eir replay` flat out for --max-seconds on the same
connections); the load is then `--rate` = --load (0.5) times it. The generated mix has no
invalid requests, so every error counted is a real one. The last line is one JSON object.
Exits 1 if any minute had an error, a timeout or a lost request, or a swap was not followed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers_faults import process_tree, rss_kib  # noqa: E402
from helpers_process import EXAMPLE_LIST, start_eir  # noqa: E402

MIX = "white=60,black=20,grey=10,unknown=10"  # no invalid requests: errors are real ones
MARKER = "35999999000016"  # blacklisted in even versions, whitelisted in odd ones


def write_list(drop: Path, swap: int) -> None:
    """The example list plus one marker row whose status changes with every swap."""
    drop.mkdir(parents=True, exist_ok=True)
    status = "blacklist" if swap % 2 == 0 else "whitelist"
    text = EXAMPLE_LIST.read_text(encoding="utf-8").rstrip("\n")
    (drop / "lists.csv").write_text(f"{text}\n{MARKER},{status},,soak swap {swap}\n",
                                    encoding="utf-8")


def eir(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eir", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def replay(address: tuple[str, int], seconds: float, connections: int,
           rate: float | None) -> dict:
    args = ["replay", "--target", f"{address[0]}:{address[1]}", "--duration", str(seconds),
            "--connections", str(connections), "--generate", MIX, "--list", str(EXAMPLE_LIST),
            "--json"]
    if rate:
        args += ["--rate", str(int(rate))]
    result = eir(*args, timeout=seconds + 60)
    if not result.stdout.strip():
        raise SystemExit(f"eir replay failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory(pid: int) -> dict[str, int]:
    """RSS in KiB of the supervisor and each worker (by pid)."""
    found = {}
    for member in process_tree(pid):
        try:
            found["supervisor" if member == pid else f"worker {member}"] = rss_kib(member)
        except (OSError, AssertionError):
            continue
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--load", type=float, default=0.5, help="share of the maximum")
    parser.add_argument("--max-seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="0: the default (one per core)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="eir-soak-"))
    drop, store = work / "drop", work / "store"
    write_list(drop, 0)
    synced = eir("sync", "--source", str(drop), "--store", str(store), timeout=60)
    assert synced.returncode == 0, synced.stderr
    config = work / "eir.yaml"
    config.write_text(f"workers: {args.workers}\nstore:\n  poll_seconds: 1\n")
    server = start_eir("--config", str(config), "--store", str(store), lists=[], cwd=work,
                       timeout=60)
    try:
        maximum = replay(server.address, args.max_seconds, args.connections, None)
        rate = maximum["rate_per_s"] * args.load
        print(f"maximum: {maximum['rate_per_s']:.0f} ECR/s flat out on {args.connections} "
              f"connection(s) (p99 {maximum['latency_ms']['p99']} ms); soak at {rate:.0f} "
              f"ECR/s for {args.minutes} min, a swap every minute", flush=True)
        start_memory = memory(server.process.pid)
        minutes = []
        for minute in range(1, args.minutes + 1):
            # The swap half-way through the minute's load.
            swap = {}
            timer = threading.Timer(30, lambda m=minute: swap.update(do_swap(drop, store, m)))
            timer.start()
            report = replay(server.address, 60, args.connections, rate)
            timer.join()
            mark = swap.get("version")
            followed = bool(mark) and any(f"lists reloaded: version {mark}" in line
                                          for line in server.lines)
            row = {"minute": minute, "sent": report["sent"], "answered": report["answered"],
                   "errors": report["errors"], "timeouts": report["timeouts"],
                   "lost": report["lost"], "rate_per_s": report["rate_per_s"],
                   "p50_ms": report["latency_ms"]["p50"], "p99_ms": report["latency_ms"]["p99"],
                   "max_ms": report["latency_ms"]["max"], "by_result": report["by_result"],
                   "swap_version": mark, "swap_followed": followed,
                   "sync_seconds": swap.get("seconds"), "rss_kib": memory(server.process.pid)}
            minutes.append(row)
            print(f"minute {minute}: {row['answered']}/{row['sent']} answered, "
                  f"{row['errors']} errors, {row['timeouts']} timeouts, p50 {row['p50_ms']} ms, "
                  f"p99 {row['p99_ms']} ms, swap to {mark} "
                  f"({'followed' if followed else 'NOT followed'}), RSS KiB {row['rss_kib']}",
                  flush=True)
    finally:
        code = server.stop()
    growth = {name: minutes[-1]["rss_kib"].get(name, 0) - kib
              for name, kib in start_memory.items()} if minutes else {}
    summary = {"maximum_per_s": maximum["rate_per_s"], "rate_per_s": rate,
               "minutes": minutes, "rss_start_kib": start_memory, "rss_growth_kib": growth,
               "answered": sum(m["answered"] for m in minutes),
               "errors": sum(m["errors"] + m["timeouts"] + m["lost"] for m in minutes),
               "swaps_followed": sum(m["swap_followed"] for m in minutes),
               "server_exit": code}
    print(json.dumps(summary), flush=True)
    ok = summary["errors"] == 0 and summary["swaps_followed"] == len(minutes) and code == 0
    return 0 if ok else 1


def do_swap(drop: Path, store: Path, swap: int) -> dict:
    write_list(drop, swap)
    started = time.monotonic()
    result = eir("sync", "--source", str(drop), "--store", str(store), timeout=120)
    seconds = round(time.monotonic() - started, 2)
    if result.returncode != 0:
        return {"version": None, "seconds": seconds, "error": result.stderr}
    return {"version": result.stdout.split("published version ")[1].split(":")[0],
            "seconds": seconds}


if __name__ == "__main__":
    sys.exit(main())
