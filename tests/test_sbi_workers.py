"""N5g-eir with several workers (eir.serve.workers, eir.interfaces.sbi): the supervisor accepts
and hands each HTTP/2 connection to a worker, as it does S13's; the workers answer (over TLS
too: test_sbi.py's test_tls_with_alpn_h2), their counters are summed by /metrics, and a
worker that dies takes its connections with it and gives their places in the `sbi`
connection limits back."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import yaml
from helpers_ops import METRICS_LINE, endpoint, scrape_until, value
from test_sbi import H2C_LINE, STATUS_PATH, h2c_client, imei, status_of
from test_workers import worker_pids

BLACKLISTED_PEI = imei("35209900176148")  # config/lists/example.csv
HANDED_OVER = r"worker (\d+): N5g-eir connection from"


def worker_of_next_connection(server, mark: int) -> int:
    """The worker that logged the first N5g-eir connection after log line `mark`."""
    return int(server.wait_for_log(HANDED_OVER, start=mark).group(1))


def test_connections_are_answered_by_the_workers_and_counted_as_one_server(eir_server,
                                                                           tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text(yaml.safe_dump({"sbi": {"max_connections": 2}}))
    server = eir_server("--workers", "2", "--sbi", "127.0.0.1:0", "--config", str(config),
                        "--metrics", "127.0.0.1:0")
    url, metrics = endpoint(server, H2C_LINE), endpoint(server, METRICS_LINE)
    with h2c_client() as first, h2c_client() as second:
        mark = len(server.lines)
        assert status_of(first, url, pei=BLACKLISTED_PEI) == (200, {"status": "BLACKLISTED"})
        one = worker_of_next_connection(server, mark)
        mark = len(server.lines)
        assert status_of(second, url, pei=BLACKLISTED_PEI)[0] == 200
        # The least-loaded worker takes the new connection: not the first one's.
        assert worker_of_next_connection(server, mark) == 1 - one
        for _ in range(3):
            assert status_of(first, url, pei=imei("99999999000001"))[0] == 404
        # One metrics view: both workers' requests and connections, summed.
        samples = scrape_until(metrics, lambda s: value(
            s, "eir_sbi_requests_total", status_code="404") == 3, "3 404s counted")
        assert value(samples, "eir_sbi_requests_total", status_code="200") == 2
        assert value(samples, "eir_sbi_verdicts_total", equipment_status="BLACKLISTED") == 2
        assert value(samples, "eir_sbi_connections") == 2
        # sbi.max_connections (2), counted by the supervisor as it accepts: a third is refused.
        mark = len(server.lines)
        with pytest.raises(httpx.TransportError), h2c_client() as third:
            third.get(url + STATUS_PATH, params={"pei": BLACKLISTED_PEI})
        server.wait_for_log(r"N5g-eir connection refused: .*max_connections", start=mark)
        # The worker of the first connection dies: that connection with it, not the other.
        mark = len(server.lines)
        os.kill(worker_pids(server)[one], signal.SIGKILL)
        server.wait_for_log(rf"worker {one} \(pid \d+\) ready", start=mark, timeout=60)
        with pytest.raises(httpx.TransportError):
            first.get(url + STATUS_PATH, params={"pei": BLACKLISTED_PEI})
        assert status_of(second, url, pei=BLACKLISTED_PEI)[0] == 200
        # Its place in sbi.max_connections was given back: a new connection is served.
        with h2c_client() as fourth:
            assert status_of(fourth, url, pei=BLACKLISTED_PEI)[0] == 200
    assert server.stop() == 0

