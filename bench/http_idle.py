"""Idle and slowloris connections against an HTTP endpoint of `eir serve` (the admin API or
/metrics, issue 13), then probe latency: what docs/SECURITY.md's HTTP/1.1 figures come from.

    EIR_API_TOKEN=test-token-0123456789abcdef taskset -c 0 python -m eir serve \\
        --listen 127.0.0.1:0 --workers 1 --api 127.0.0.1:8080 --metrics 127.0.0.1:9464 &
    taskset -c 1 python bench/http_idle.py http://127.0.0.1:8080/healthz --idle 1000

With `--body MIB --server-pid PID`, instead: one unauthenticated POST declaring a body of
MIB MiB and sending it (all but its last byte), then the server's RSS before and after.

Otherwise: opens `--idle` connections that send nothing and `--slow` that send a request head a byte
every `--slow-interval` seconds, all held open (from this side) for the whole run; then
times `--probes` GET requests, each on a new connection, and prints the status codes seen
and the latency percentiles; after `--hold` seconds (0: not checked) how many of the idle
and slow connections the server still keeps open, and the status of one more probe.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import time
from urllib.parse import urlsplit

HEAD = b"GET /healthz HTTP/1.1\r\nHost: eir\r\n"


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def probe(host: str, port: int, path: str) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        connection.close()
        status = str(response.status)
    except OSError as exc:
        status = type(exc).__name__
    return status, (time.perf_counter() - started) * 1e3


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status
                    if line.startswith("VmRSS"))


def body_attack(host: str, port: int, path: str, mib: int, pid: int) -> dict:
    size = mib << 20
    before = rss_mib(pid)
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: eir\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (path.encode(), size))
    chunk, sent = b"x" * (1 << 20), 0
    try:
        while sent < size - 1:
            count = min(len(chunk), size - 1 - sent)
            sock.sendall(chunk[:count])
            sent += count
    except OSError:
        pass  # the server closed: refused
    time.sleep(1)  # let the server take in what it was sent
    report = {"url": f"http://{host}:{port}{path}", "declared_mib": mib,
              "sent_mib": sent >> 20, "rss_mib_before": before, "rss_mib_after": rss_mib(pid)}
    sock.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="http://HOST:PORT/PATH to probe")
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=10)
    parser.add_argument("--slow-interval", type=float, default=0.5)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--body", type=int, default=0, metavar="MIB")
    parser.add_argument("--server-pid", type=int)
    args = parser.parse_args()
    parts = urlsplit(args.url)
    host, port, path = parts.hostname, parts.port, parts.path or "/"
    if args.body:
        print(json.dumps(body_attack(host, port, path, args.body, args.server_pid)))
        return

    idle = [socket.create_connection((host, port)) for _ in range(args.idle)]
    slow = []
    for _ in range(args.slow):
        sock = socket.create_connection((host, port))
        sock.sendall(HEAD)
        slow.append(sock)
    results = [probe(host, port, path) for _ in range(args.probes)]
    times = sorted(ms for _, ms in results)
    report = {
        "url": args.url, "idle": args.idle, "slow": args.slow,
        "statuses": {status: sum(1 for s, _ in results if s == status)
                     for status in sorted({s for s, _ in results})},
        "p50_ms": round(times[len(times) // 2], 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        "max_ms": round(times[-1], 2)}
    if args.hold:
        started = time.monotonic()
        while time.monotonic() - started < args.hold:  # the slowloris' pace
            for sock in slow:
                try:
                    sock.send(b"X")
                except OSError:
                    pass
            time.sleep(args.slow_interval)
        report["after_seconds"] = args.hold
        report["idle_open"] = sum(map(still_open, idle))
        report["slow_open"] = sum(map(still_open, slow))
        report["status_after"] = probe(host, port, path)[0]
    for sock in idle + slow:
        sock.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
