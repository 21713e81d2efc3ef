"""HTTP/1.1 hardening of the admin API and /metrics (eir.net.http1) on a live `eir serve --api
--metrics`: probes and scrapes answer while the ports are full of idle and slow connections,
idle and slowloris connections are closed after their timeouts, the connection caps close
idle connections to make room and refuse only when every connection is busy, and the access
log shows no token and no unmasked IMSI however the request encodes them."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time

import httpx
import pytest
from helpers_ops import API_LINE, METRICS_LINE, TOKEN, authorised, endpoint, wait_until

from eir.net.http1 import HttpConnectionPool, loggable_target

IMSI = "001010123456789"
MASKED_IMSI = "00101******6789"
SECRET = "query-secret-0123456789"
PROBE_BOUND_SECONDS = 2.0  # each probe, on a loaded 2-core machine (measured: ~1-10 ms)
HEAD = b"GET /healthz HTTP/1.1\r\nHost: eir\r\n"  # a request head, not yet finished


@pytest.fixture
def http_server(eir_server, monkeypatch, tmp_path):
    """Factory: `eir serve --api --metrics` with `config` (YAML text) → (server, API URL,
    metrics URL)."""
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)

    def start(config: str = ""):
        path = tmp_path / "eir.yaml"
        path.write_text(config)
        server = eir_server("--config", str(path), "--api", "127.0.0.1:0", "--metrics",
                            "127.0.0.1:0")
        return server, endpoint(server, API_LINE), endpoint(server, METRICS_LINE)
    return start


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(url: str) -> socket.socket:
    sock = socket.create_connection(address(url), timeout=5)
    sock.settimeout(5)
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closes `sock` (EOF or reset) within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def answered_request(url: str) -> socket.socket:
    """A connection that was admitted and served GET /healthz, kept alive (then idle)."""
    sock = connect(url)
    sock.sendall(HEAD + b"\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    return sock


def body_never_sent(url: str) -> socket.socket:
    """A connection whose request is still arriving: an unauthenticated POST whose body the
    app waits for and never gets (the 100 Continue tells that the app asked for it)."""
    sock = connect(url)
    sock.sendall(b"POST /v1/lists/rollback HTTP/1.1\r\nHost: eir\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 100 ")
    return sock


def test_probes_and_scrapes_answer_while_the_ports_are_full_of_idle_and_slow_connections(
        http_server):
    """Before: 31 idle connections made /healthz, /readyz and /metrics answer 503 for as long
    as they stayed open (uvicorn's limit_concurrency, 32, counted them)."""
    server, api, metrics = http_server()
    held = []
    try:
        for url in (api, metrics):
            for _ in range(200):
                held.append(connect(url))
            for _ in range(10):
                slow = connect(url)
                slow.sendall(HEAD[:20])
                held.append(slow)
        # More than max_connections_per_address (16) of these; each used to count as a
        # request in progress (FastAPI reads the body before it checks the token).
        held += [body_never_sent(api) for _ in range(20)]
        for _ in range(5):
            for url, path in ((api, "/healthz"), (api, "/readyz"), (metrics, "/metrics")):
                started = time.monotonic()
                response = httpx.get(url + path, timeout=10)
                elapsed = time.monotonic() - started
                assert response.status_code == 200, (path, response.text)
                assert elapsed < PROBE_BOUND_SECONDS, (path, elapsed)
    finally:
        for sock in held:
            sock.close()


def test_idle_slowloris_and_slow_body_connections_are_closed(http_server):
    server, api, metrics = http_server(
        "api:\n  idle_timeout_seconds: 0.5\n  request_read_timeout_seconds: 1.5\n")
    idle = connect(api)  # sends nothing
    kept_alive = answered_request(api)
    slow_body = connect(api)
    slow_body.sendall(b"POST /v1/lists/rollback HTTP/1.1\r\nHost: eir\r\nContent-Length: "
                      b"100\r\n\r\n{")
    slowloris = connect(api)
    slowloris.sendall(HEAD)
    started = time.monotonic()
    with idle, kept_alive, slow_body, slowloris:
        assert closed_by_server(idle, 3), "an idle new connection stayed open"
        assert closed_by_server(kept_alive, 3), "an idle kept-alive connection stayed open"
        # The attack's pace, not a synchronisation: a header byte every 0.1 s.
        while time.monotonic() - started < 5:
            try:
                slowloris.sendall(b"X")
            except ConnectionError:
                break
            if closed_by_server(slowloris, 0.1):
                break
        else:
            raise AssertionError("the slowloris stayed open")
        assert 1.4 < time.monotonic() - started < 4.0
        assert closed_by_server(slow_body, 3), "a request body that never ends stayed open"
    server.wait_for_log(r"admin API: 127\.0\.0\.1:\d+: closed: no whole request within "
                        r"1\.5 s of its first byte \(request_read_timeout_seconds\)")


def test_a_request_head_still_incomplete_past_its_limit_is_refused(http_server):
    server, api, metrics = http_server("metrics:\n  max_incomplete_head_bytes: 2048\n")
    filler = b"GET /metrics HTTP/1.1\r\nHost: eir\r\nX-Filler: " + b"x" * 1500
    with connect(metrics) as sock:  # under the limit, then finished: served
        sock.sendall(filler)
        sock.sendall(b"\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    with connect(metrics) as sock:
        sock.sendall(filler)
        sock.sendall(b"x" * 1500)  # past 2048 bytes, still no end of the head
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
        assert closed_by_server(sock, 3)


def test_a_request_body_needs_a_length_within_max_body_bytes(http_server):
    """Before: FastAPI read whatever body came, whole, before it checked the token."""
    server, api, metrics = http_server("api:\n  max_body_bytes: 1024\n")
    post = b"POST /v1/lists/rollback HTTP/1.1\r\nHost: eir\r\nContent-Type: application/json\r\n"
    for headers, status in ((b"Content-Length: 100000000\r\n", b"413"),
                            (b"Transfer-Encoding: chunked\r\n", b"411")):
        with connect(api) as sock:  # no token, and not a byte of the body sent
            sock.sendall(post + headers + b"\r\n")
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
            assert b"application/problem+json" in answer
            assert closed_by_server(sock, 3)
    response = httpx.post(api + "/v1/lists/rollback", json={"version": "000009"},
                          headers=authorised(), timeout=5)
    assert response.status_code == 409  # within the limit: served (no store to roll back)


@pytest.mark.parametrize("setting", ["max_connections", "max_connections_per_address"])
def test_idle_and_slow_connections_make_room_for_new_ones(http_server, setting):
    server, api, metrics = http_server(f"api:\n  {setting}: 3\n")
    slow = body_never_sent(api)
    idle = [answered_request(api) for _ in range(2)]  # idle since their answer: after slow
    try:
        newcomer = answered_request(api)  # the 4th: the longest idle one (slow) is closed
        assert closed_by_server(slow, 3), "a connection whose body never came stayed open"
        newcomer.close()
        newcomers = [answered_request(api) for _ in range(2)]  # both served
        assert closed_by_server(idle[0], 3), "the longest idle connection stayed open"
        for sock in newcomers:
            sock.close()
    finally:
        for sock in [slow, *idle]:
            sock.close()


def test_the_access_log_shows_no_token_and_no_imsi_however_encoded(http_server):
    server, api, metrics = http_server()
    equipment = "/v1/equipment/35209900176148"
    encoded_imsi = "".join(f"%{ord(digit):02X}" for digit in IMSI)
    targets = [
        f"{equipment}?imsi={encoded_imsi}",  # percent-encoded
        f"{equipment}?imsi={encoded_imsi.replace('%', '%25')}",  # twice
        f"{equipment}?%69MsI={IMSI}",  # the name encoded, mixed case
        f"{equipment}?subscriber={IMSI}",  # under another name
        f"{equipment}%3Fimsi%3D{IMSI}",  # in the path
        f"/v1/imsi/{IMSI.replace('0', '%30')}",
        f"/v1/lists?token={SECRET}",
        f"/v1/lists?access_token={TOKEN}",
        f"/v1/lists?%74oKEN={SECRET.replace('-', '%2D')}",
        f"/v1/lists?token={SECRET.replace('-', '+')}",
        f"/v1/lists?x=1&Token=%25{ord(SECRET[0]):02x}{SECRET[1:]}",
        f"/v1/lists/token={SECRET}",
        f"/v1/lists/access_token%3D{SECRET}",
        f"/v1/lists/Bearer%20{SECRET}",
        f"/v1/lists/{TOKEN}",
    ]
    host, port = address(api)
    for target in targets:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.request("GET", target, headers=authorised())  # the target verbatim
        connection.getresponse().read()
        connection.close()
    # The last line logged, then everything before it is there too.
    server.wait_for_log(r"eir\.api: GET /v1/lists/\*\*\* 404 ")
    log = server.log()
    lines = [line for line in log.splitlines() if "eir.api: GET " in line]
    assert len(lines) == len(targets), lines
    assert f"GET {equipment}?imsi={MASKED_IMSI} 200 " in log
    for shown in (IMSI, encoded_imsi[:9], "%2530", SECRET, SECRET.replace("-", " "),
                  SECRET.replace("-", "%2D"), SECRET[1:], TOKEN):
        assert shown not in log, shown
    assert "?token=*** " in log and "?access_token=*** " in log


def test_the_pool_closes_the_longest_idle_connection_in_the_way():
    pool = HttpConnectionPool(max_connections=4, max_per_address=2)
    assert pool.admit("a1", "A") == ([], None)
    assert pool.admit("a2", "A") == ([], None)
    pool.busy("a1")
    assert pool.admit("a3", "A") == (["a2"], None)  # its address is full: its idle one goes
    pool.busy("a3")
    closing, refusal = pool.admit("a4", "A")  # both of A's connections are busy
    assert closing == [] and "(max_connections_per_address)" in refusal
    assert pool.admit("b1", "B") == ([], None)
    assert pool.admit("c1", "C") == ([], None)
    pool.busy("b1")
    pool.idle("a1")  # idle since now: after c1
    assert pool.admit("d1", "D") == (["c1"], None)  # the endpoint is full: the longest idle
    pool.busy("d1")
    assert pool.admit("e1", "E") == (["a1"], None)
    pool.busy("e1")
    closing, refusal = pool.admit("f1", "F")
    assert closing == [] and "all 4 connections are answering a request" in refusal
    pool.release("b1")
    assert pool.admit("f1", "F") == ([], None) and len(pool) == 4


def test_loggable_target_decodes_then_masks():
    assert loggable_target(b"/v1/x%250a%3Fimsi%3D1", b"token=%2561&imsi=%30%31&n") == (
        "/v1/x\\n?imsi=1?token=***&imsi=01&n=")
    deep = b"/%" + b"25" * 5 + b"30"  # "0" encoded 6 times
    assert loggable_target(deep, b"").startswith("(path percent-encoded more than 4 times")
    assert loggable_target(b"/a/sekret-token-value", b"", ("sekret-token-value",)) == "/a/***"
