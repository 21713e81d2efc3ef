"""Memory under duplicate-cache abuse: RSS of a live `eir serve --workers 1` before and after
ECRs whose ~60 KB Session-Id every answer echoes (half of them with the T flag), each with its
own End-to-End id, so that each answer is a new entry of the duplicate cache.

    python3 bench/duplicate_flood.py [--requests N] [--session-bytes B] [-- EIR SERVE ARGS]

e.g. `-- --config budget.yaml` with `diameter: {duplicates: {max_bytes: 4194304}}`. Run from
any checkout (it starts that checkout's `eir serve`), to compare one before and one after.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers_process import start_eir  # noqa: E402
from helpers_wire import (FLAG_PROXIABLE, FLAG_REQUEST, ecr, open_peer,  # noqa: E402
                          parse_answer, read_message)

FLAG_RETRANSMIT = 0x10


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise SystemExit("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--session-bytes", type=int, default=60_000)
    parser.add_argument("eir_args", nargs="*", help="more `eir serve` arguments (after --)")
    options = parser.parse_args()
    server = start_eir("--workers", "1", *options.eir_args)  # one process: its RSS is it
    try:
        with open_peer(server.address) as sock:
            sock.sendall(ecr(hop_by_hop=1, end_to_end=1))
            read_message(sock)
            before = rss_mib(server.process.pid)
            started = time.monotonic()
            for number in range(options.requests):
                flags = FLAG_REQUEST | FLAG_PROXIABLE | (FLAG_RETRANSMIT if number % 2 else 0)
                session = f"mme.test;{number:06d};".ljust(options.session_bytes, "x")
                sock.sendall(ecr(session_id=session, hop_by_hop=number + 2,
                                 end_to_end=number + 2, flags=flags))
                answer = parse_answer(read_message(sock))
                if answer.result_code != 2001:
                    raise SystemExit(f"request {number}: Result-Code {answer.result_code}")
            after = rss_mib(server.process.pid)
        print(f"{options.requests} ECRs with a {options.session_bytes}-byte Session-Id in "
              f"{time.monotonic() - started:.1f} s: RSS {before:.1f} -> {after:.1f} MiB "
              f"(+{after - before:.1f})")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
