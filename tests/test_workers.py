"""Several worker processes behind one port (eir.serve.workers): connections spread over the
workers, one metrics view and one peers list, one observations database, lists swapped in
every worker, and a worker that dies replaced without losing the port or its places in the
connection limits."""

from __future__ import annotations

import os
import re
import signal
import sqlite3

import httpx
import yaml

from helpers_ops import API_LINE, METRICS_LINE, TOKEN, authorised, endpoint, scrape_until, \
    value, wait_until
from helpers_wire import ecr, open_peer, parse_answer, read_message

WHITELISTED, BLACKLISTED = 0, 1
IMEI = "35404509123456"
IMSI = "001010123456789"


def verdict(sock, hop_by_hop: int, imei: str = IMEI) -> tuple[int | None, int | None]:
    sock.sendall(ecr(imei=imei, imsi=IMSI, hop_by_hop=hop_by_hop))
    answer = parse_answer(read_message(sock))
    assert answer.hop_by_hop == hop_by_hop
    return answer.result_code, answer.equipment_status


def worker_of_connection(server, mark: int) -> int:
    """The worker that logged the first "connection from" after line `mark`."""
    match = server.wait_for_log(r"worker (\d+): connection from", start=mark)
    return int(match.group(1))


def worker_pids(server) -> dict[int, int]:
    """{worker index: pid} of the workers started so far (the latest per index)."""
    pids = {}
    for line in server.lines:
        match = re.search(r"worker (\d+) \(pid (\d+)\) started", line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def test_two_connections_go_to_two_workers_and_are_seen_as_one_server(eir_server, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    lists = tmp_path / "lists.csv"
    lists.write_text(f"imei,status\n{IMEI},blacklist\n")
    database = tmp_path / "obs.sqlite"
    config = tmp_path / "eir.yaml"
    config.write_text(yaml.safe_dump({"observations": {"database": str(database),
                                                       "flush_seconds": 0.2}}))
    server = eir_server("--workers", "2", "--config", str(config), "--metrics",
                        "127.0.0.1:0", "--api", "127.0.0.1:0", "--unknown", "whitelisted",
                        lists=[lists])
    metrics, api = endpoint(server, METRICS_LINE), endpoint(server, API_LINE)
    mark = len(server.lines)
    with open_peer(server.address) as first:
        one = worker_of_connection(server, mark)
        mark = len(server.lines)
        with open_peer(server.address) as second:
            # The least-loaded worker takes a new connection: not the first one's.
            assert worker_of_connection(server, mark) == 1 - one
            for n in range(3):
                assert verdict(first, n) == (2001, BLACKLISTED)
            for n in range(5):  # not on the list: the unknown policy, whitelisted
                assert verdict(second, n, imei=f"3540450912{n:04d}") == (2001, WHITELISTED)
            # One metrics view: both workers' requests and peers, summed by the supervisor.
            samples = scrape_until(metrics, lambda s: value(
                s, "eir_requests_total", command="ME-Identity-Check") == 8,
                "8 ECRs counted over both workers")
            assert value(samples, "eir_peers", state="open") == 2
            assert value(samples, "eir_answers_total", command="ME-Identity-Check",
                         result_code="2001", equipment_status="BLACKLISTED") == 3
            # One peers list over both workers.
            peers = httpx.get(f"{api}/v1/peers", headers=authorised(), timeout=10).json()
            assert [peer["origin_host"] for peer in peers] == ["mme.test", "mme.test"]
            assert all(peer["state"] == "open" for peer in peers)
            # Each connection's own answers, counted by the worker that holds it.
            assert sorted(({k: n for k, n in peer["answered"].items() if n}
                           for peer in peers), key=str) == [{"BLACKLISTED": 3},
                                                            {"WHITELISTED": 5}]
    # One observations database, written by the supervisor: both workers' checks in it.
    expected = {IMEI, *(f"3540450912{n:04d}" for n in range(5))}

    def stored() -> set[str]:
        if not database.exists():
            return set()
        with sqlite3.connect(database) as connection:
            return {row[0] for row in connection.execute("SELECT imei FROM observations")}
    wait_until(lambda: stored() >= expected, "both workers' observations in the database")
    assert server.stop() == 0
    assert "final flush done: 6 written, 0 dropped" in server.log()


def test_sighup_swaps_the_lists_of_every_worker(eir_server, tmp_path):
    lists = tmp_path / "lists.csv"
    lists.write_text(f"imei,status\n{IMEI},whitelist\n")
    server = eir_server("--workers", "2", lists=[lists])
    with open_peer(server.address) as first, open_peer(server.address) as second:
        wait_until(lambda: re.search(r"worker 0: connection from", server.log()) and
                   re.search(r"worker 1: connection from", server.log()),
                   "a connection on each worker")
        assert verdict(first, 1) == verdict(second, 1) == (2001, WHITELISTED)
        lists.write_text(f"imei,status,reason\n{IMEI},blacklist,reported stolen\n")
        mark = len(server.lines)
        server.process.send_signal(signal.SIGHUP)
        for worker in (0, 1):
            server.wait_for_log(rf"worker {worker}: lists reloaded: version \w+, 1 rules",
                                start=mark)
        assert verdict(first, 2) == verdict(second, 2) == (2001, BLACKLISTED)
        # A bad file is refused by the supervisor before any worker swaps.
        lists.write_text(f"imei,status\n{IMEI},whitelist\n1234,blacklist\n")
        mark = len(server.lines)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(r"list reload refused", start=mark)
        assert verdict(first, 3) == verdict(second, 3) == (2001, BLACKLISTED)
        assert "worker 0: lists reloaded" not in "\n".join(server.lines[mark:])
    assert server.stop() == 0


def test_a_worker_killed_is_replaced_and_its_connections_places_are_freed(eir_server,
                                                                          tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text(yaml.safe_dump({"diameter": {"overload": {"max_connections": 2}}}))
    server = eir_server("--workers", "2", "--config", str(config))
    with open_peer(server.address) as first, open_peer(server.address) as second:
        wait_until(lambda: len(re.findall(r"worker \d: connection from", server.log())) == 2,
                   "both connections handed over")
        victim = worker_pids(server)[0]
        mark = len(server.lines)
        os.kill(victim, signal.SIGKILL)
        server.wait_for_log(r"worker 0 \(pid \d+\) exited unexpectedly \(exit -9\): starting "
                            r"another", start=mark)
        server.wait_for_log(r"worker 0 \(pid \d+\) ready", start=mark)
        assert worker_pids(server)[0] != victim
        # The killed worker's connection is gone; the other worker's still answers.
        survivors = [sock for sock in (first, second) if _answers(sock)]
        assert len(survivors) == 1
        # Its place in max_connections (2) was given back: a new connection is served.
        with open_peer(server.address) as third:
            assert verdict(third, 7) == verdict(survivors[0], 8)
    assert server.stop() == 0
    assert "connection refused" not in server.log()


def _answers(sock) -> bool:
    try:
        verdict(sock, 99)
    except (OSError, AssertionError):
        return False
    return True


def test_uvloop_workers_answer_and_stop_in_order(eir_server, tmp_path):
    """event_loop: uvloop (the read buffer, handed-over sockets and signals under libuv)."""
    lists = tmp_path / "lists.csv"
    lists.write_text(f"imei,status\n{IMEI},blacklist\n")
    server = eir_server("--workers", "2", "--event-loop", "uvloop", lists=[lists])
    with open_peer(server.address) as first, open_peer(server.address) as second:
        for n in range(3):
            assert verdict(first, n) == verdict(second, n) == (2001, BLACKLISTED)
        # Many requests in one write: answered in turns, all of them.
        first.sendall(b"".join(ecr(imei=IMEI, imsi=IMSI, hop_by_hop=100 + n)
                               for n in range(200)))
        hops = sorted(parse_answer(read_message(first)).hop_by_hop for _ in range(200))
        assert hops == list(range(100, 300))
    assert server.stop() == 0
    assert re.search(r"worker 0 \(pid \d+\) stopped \(exit 0\)", server.log())
    assert re.search(r"worker 1 \(pid \d+\) stopped \(exit 0\)", server.log())
