"""Attacks on the Diameter surface, tried against a live `eir serve` (issue 13): a request
reusing another's ids under the T flag, a flood of large answers into the duplicate cache, a
second connection under an Origin-Host that is open already (one process and workers),
another Diameter version, and DiameterIdentity AVPs that are not FQDNs.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
from helpers_ops import METRICS_LINE, endpoint, scrape, value
from helpers_wire import (AVP, FLAG_PROXIABLE, FLAG_REQUEST, assert_closed_by_server, cer,
                          ecr, ecr_avps, open_peer, parse_answer, read_message)

FLAG_RETRANSMIT = 0x10
BLACKLISTED_IMEI = "35209900176148"  # config/lists/example.csv
GREYLISTED_IMEI = "35332106470089"
BLACKLISTED, GREYLISTED = 1, 2
ORIGIN_HOST, DESTINATION_REALM, FAILED_AVP = 264, 283, 279


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "eir.yaml"
    path.write_text(text)
    return str(path)


def exchange(sock: socket.socket, message: bytes):
    sock.sendall(message)
    return parse_answer(read_message(sock))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- duplicates (item 1) ---------------------------------------------------------------------

def test_a_different_request_under_the_ids_of_an_answered_one_gets_its_own_verdict(
        eir_server):
    server = eir_server("--workers", "1")  # one cache (each worker has its own)
    with open_peer(server.address) as first:
        original = exchange(first, ecr(BLACKLISTED_IMEI, session_id="mme.test;victim",
                                       hop_by_hop=1, end_to_end=0x7000))
    assert original.equipment_status == BLACKLISTED
    # Another connection, the same Origin-Host and End-to-End id, the T flag, another IMEI.
    with open_peer(server.address) as second:
        forged = exchange(second, ecr(GREYLISTED_IMEI, session_id="mme.test;attacker",
                                      hop_by_hop=2, end_to_end=0x7000,
                                      flags=FLAG_REQUEST | FLAG_PROXIABLE | FLAG_RETRANSMIT))
    assert (forged.result_code, forged.equipment_status) == (2001, GREYLISTED)
    assert forged.session_id == "mme.test;attacker"
    server.wait_for_log(r"T-flag request with end-to-end id 0x00007000 differs from the "
                        r"request answered under that id: answered anew")


def test_a_flood_of_large_answers_stays_within_the_duplicate_byte_budget(eir_server,
                                                                         tmp_path):
    budget = 4 << 20
    # One process, so that its RSS is the server's (with workers it would be theirs).
    config = write_config(tmp_path, f"diameter:\n  duplicates:\n    max_bytes: {budget}\n")
    server = eir_server("--workers", "1", "--metrics", "127.0.0.1:0", "--config", config)
    url = endpoint(server, METRICS_LINE)
    requests, session_bytes = 800, 60_000  # each answer echoes its ~60 KB Session-Id
    with open_peer(server.address) as sock:
        exchange(sock, ecr(session_id="mme.test;warm-up", hop_by_hop=1, end_to_end=1))
        before = rss_bytes(server.process.pid)
        for number in range(requests):
            session = f"mme.test;{number:06d};".ljust(session_bytes, "x")
            flags = FLAG_REQUEST | FLAG_PROXIABLE | (FLAG_RETRANSMIT if number % 2 else 0)
            answer = exchange(sock, ecr(session_id=session, hop_by_hop=number + 2,
                                        end_to_end=number + 2, flags=flags))
            assert answer.result_code == 2001
        after = rss_bytes(server.process.pid)
    print(f"\nduplicate flood: RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    samples = scrape(url)
    kept = value(samples, "eir_duplicate_cache_bytes")
    entries = value(samples, "eir_duplicate_cache_entries")
    print(f"duplicate flood: {requests} answers of ~{session_bytes // 1000} KB: cache "
          f"{kept / 2**20:.1f} MiB in {entries:.0f} entries (budget {budget / 2**20:.0f} MiB)")
    assert 0 < kept <= budget
    assert entries < budget / session_bytes
    # Without the budget the cache alone would hold ~48 MB (the process grew by 46 MiB);
    # allocator slack aside, the process grows by about the budget.
    assert after - before < budget + (16 << 20)


# -- peer identity (item 4) ------------------------------------------------------------------

def second_cer(address) -> tuple[socket.socket, object]:
    sock = socket.create_connection(address, timeout=5)
    sock.sendall(cer(hop_by_hop=9, end_to_end=9))
    return sock, parse_answer(read_message(sock))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_connection_from_an_open_origin_host_is_refused(eir_server, tmp_path,
                                                                 workers):
    server = eir_server("--metrics", "127.0.0.1:0", "--workers", str(workers), "--config",
                        write_config(tmp_path, "diameter:\n  duplicate_peers: refuse\n"))
    url = endpoint(server, METRICS_LINE)
    with open_peer(server.address) as first:
        second, answer = second_cer(server.address)
        with second:
            assert (answer.code, answer.result_code) == (257, 5012)
            assert_closed_by_server(second)
        server.wait_for_log(r"CER refused with 5012 DIAMETER_UNABLE_TO_COMPLY: Origin-Host "
                            r"mme\.test has an open connection already")
        # The first connection still serves.
        assert exchange(first, ecr(hop_by_hop=3, end_to_end=3)).result_code == 2001
    assert value(scrape(url), "eir_duplicate_peer_connections_total", action="refused") == 1
    # Once the first has gone, the Origin-Host may connect again.
    server.wait_for_log(r"peer closed the connection")
    with open_peer(server.address) as again:
        assert exchange(again, ecr(hop_by_hop=4, end_to_end=4)).result_code == 2001


def test_the_origin_hosts_of_a_killed_worker_may_connect_again(eir_server, tmp_path):
    server = eir_server("--workers", "2", "--config",
                        write_config(tmp_path, "diameter:\n  duplicate_peers: refuse\n"))
    with open_peer(server.address):
        match = server.wait_for_log(r"worker (\d): \S+: peer mme\.test \(realm test\) is open")
        pid = int(server.wait_for_log(rf"worker {match.group(1)} \(pid (\d+)\) started"
                                      ).group(1))
        mark = len(server.lines)
        os.kill(pid, signal.SIGKILL)
        server.wait_for_log(r"exited unexpectedly", start=mark)
        # Its connection went with it, and so did its claim on mme.test.
        with open_peer(server.address) as again:
            assert exchange(again, ecr(hop_by_hop=5, end_to_end=5)).result_code == 2001


def test_by_default_a_second_connection_is_served_and_noticed(eir_server):
    server = eir_server()
    with open_peer(server.address), open_peer(server.address):
        server.wait_for_log(r"Origin-Host mme\.test now has 2 open connections "
                            r"\(diameter\.duplicate_peers: allow\)")


# -- version (item 4) ------------------------------------------------------------------------

def test_another_diameter_version_is_answered_5011_before_closing(eir_server):
    server = eir_server()
    with open_peer(server.address) as sock:
        request = bytearray(ecr(hop_by_hop=0x51, end_to_end=0x5011))
        request[0] = 2
        sock.sendall(bytes(request))
        answer = parse_answer(read_message(sock))
        assert (answer.hop_by_hop, answer.end_to_end, answer.result_code) == (
            0x51, 0x5011, 5011)
        assert not answer.is_request and not answer.error_bit  # 5xxx: no E bit (§7.1.5)
        assert_closed_by_server(sock)
    server.wait_for_log(r"unsupported Diameter version 2")


# -- DiameterIdentity (item 2) ---------------------------------------------------------------

FORGED_HOST = "mme.test\n2026-01-01 00:00:00 INFO \x1b[31mforged"


def test_a_cer_whose_origin_host_is_not_an_fqdn_gets_5004_with_failed_avp(eir_server):
    server = eir_server()
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(cer(host=FORGED_HOST))
        answer = parse_answer(read_message(sock))
        assert (answer.code, answer.result_code) == (257, 5004)
        [failed] = answer.failed_avps
        assert (failed.code, failed.value) == (ORIGIN_HOST, FORGED_HOST.encode())
        assert_closed_by_server(sock)
    assert "forged" not in server.log()


def test_a_request_with_a_bad_destination_realm_gets_5004_with_failed_avp(eir_server):
    server = eir_server()
    bad = "realm with spaces"
    avps = ecr_avps(replace={"Destination-Realm": [AVP("Destination-Realm", val=bad)]})
    with open_peer(server.address) as sock:
        answer = exchange(sock, ecr(avps=avps, hop_by_hop=5, end_to_end=5))
        assert answer.result_code == 5004
        [failed] = answer.failed_avps
        assert (failed.code, failed.value) == (DESTINATION_REALM, bad.encode())
        # The connection stays: the next request is answered.
        assert exchange(sock, ecr(hop_by_hop=6, end_to_end=6)).result_code == 2001
