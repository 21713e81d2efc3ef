"""N5g-eir over HTTP/2 (eir.interfaces.sbi): `eir serve --sbi` asked by real HTTP/2 clients (httpx with
h2, prior knowledge on cleartext and ALPN h2 over TLS; curl --http2-prior-knowledge), for every
list kind, both PEI forms, bad requests, a reload, the audit and the metrics; and the NRF
registration (register, heartbeat, re-register after a 404, deregister) against a stand-in
NRF served by hypercorn, a third-party HTTP/2 server, in the test process."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from collections import deque

import httpx
import pytest
from helpers_ops import METRICS_LINE, endpoint, scrape_until, value, wait_until
from helpers_process import EXAMPLE_LIST, start_eir

from eir.core.imei import luhn_check_digit

H2C_LINE = r"N5g-eir served on (http://\S+)/n5g-eir-eic/v1/ \(h2c\)"
TLS_LINE = r"N5g-eir served on (https://\S+)/n5g-eir-eic/v1/ \(TLS"
STATUS_PATH = "/n5g-eir-eic/v1/equipment-status"
PAIRED_IMSI = "001010123456789"  # example.csv pairs 49015420323751 with it
LAB_IMSI = "001010000000042"
# Beside config/lists/example.csv: the kinds it lacks (a TAC and a range paired with an IMSI,
# a greylisted TAC).
MORE_RULES = f"""imei,status,imsi,reason
86000000,whitelist,{LAB_IMSI},counterfeit TAC but our lab SIM
35000000000000-35000000009999,greylist,{LAB_IMSI},lab handsets with the lab SIM
35111111,greylist,,TAC under watch
"""


def imei(key: str) -> str:
    """`imei-` + the 14-digit key and its check digit."""
    return f"imei-{key}{luhn_check_digit(key)}"


def start_sbi(eir_server, *args: str, lists=None, workers: str = "1"):
    server = eir_server("--sbi", "127.0.0.1:0", "--workers", workers, *args,
                        **({"lists": lists} if lists is not None else {}))
    return server, endpoint(server, H2C_LINE)


def h2c_client(**kwargs) -> httpx.Client:
    """HTTP/2 with prior knowledge on http:// URLs (no HTTP/1.1 upgrade), as an AMF does."""
    return httpx.Client(http1=False, http2=True, timeout=10, **kwargs)


def status_of(client: httpx.Client, url: str, **params: str) -> tuple[int, dict]:
    response = client.get(url + STATUS_PATH, params=params)
    assert response.http_version == "HTTP/2"
    return response.status_code, response.json()


# -- verdicts --------------------------------------------------------------------------------

def test_every_list_kind_over_h2c(eir_server, tmp_path):
    more = tmp_path / "more.csv"
    more.write_text(MORE_RULES)
    server, url = start_sbi(eir_server, lists=[EXAMPLE_LIST, more])
    cases = [
        # (pei, supi, expected status) — example.csv, then more.csv
        (imei("35209900176148"), None, "BLACKLISTED"),  # exact IMEI
        ("imeisv-3520990017614812", None, "BLACKLISTED"),  # the same, as an IMEISV
        (imei("35332106470089"), None, "GREYLISTED"),
        (imei("49015420323751"), f"imsi-{PAIRED_IMSI}", "WHITELISTED"),  # IMEI+IMSI pair
        (imei("49015420323751"), "imsi-001019999999999", "BLACKLISTED"),  # another SIM
        (imei("49015420323751"), None, "BLACKLISTED"),  # no SUPI: the unpaired rule
        (imei("49015420323751"), "nai-someone@example.org", "BLACKLISTED"),  # not an IMSI
        ("imeisv-3500000000123401", None, "WHITELISTED"),  # range
        (imei("35000000001234"), f"imsi-{LAB_IMSI}", "GREYLISTED"),  # range+IMSI
        (imei("86000000123456"), None, "BLACKLISTED"),  # TAC
        (imei("86000000123456"), f"imsi-{LAB_IMSI}", "WHITELISTED"),  # TAC+IMSI
        (imei("35111111000001"), None, "GREYLISTED"),
    ]
    with h2c_client() as client:
        for pei, supi, expected in cases:
            params = {"pei": pei} | ({"supi": supi} if supi else {})
            response = client.get(url + STATUS_PATH, params=params)
            assert response.http_version == "HTTP/2"
            assert (response.status_code, response.json()) == (200, {"status": expected}), \
                params
            assert response.headers["content-type"] == "application/json"
        # The GPSI is accepted and changes nothing.
        assert status_of(client, url, pei=imei("35209900176148"),
                         gpsi="msisdn-491711234567") == (200, {"status": "BLACKLISTED"})
        # No rule: 404 ProblemDetails, cause ERROR_EQUIPMENT_UNKNOWN (unknown policy).
        response = client.get(url + STATUS_PATH, params={"pei": imei("99999999000001")})
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["cause"] == "ERROR_EQUIPMENT_UNKNOWN"
    assert server.stop() == 0


def test_unknown_policy_applies_to_n5g_eir(eir_server):
    server, url = start_sbi(eir_server, "--unknown", "greylisted")
    with h2c_client() as client:
        assert status_of(client, url, pei=imei("99999999000001")) == (
            200, {"status": "GREYLISTED"})
    assert server.stop() == 0


@pytest.mark.parametrize("params, cause, param", [
    ({}, "MANDATORY_QUERY_PARAM_MISSING", "pei"),
    ({"pei": ""}, "MANDATORY_QUERY_PARAM_MISSING", "pei"),
    ({"pei": "imei-35209900176148"}, "MANDATORY_QUERY_PARAM_INCORRECT", "pei"),  # 14 digits
    ({"pei": "imei-3520990017614X1"}, "MANDATORY_QUERY_PARAM_INCORRECT", "pei"),
    ({"pei": "imeisv-352099001761481"}, "MANDATORY_QUERY_PARAM_INCORRECT", "pei"),  # 15
    ({"pei": "352099001761481"}, "MANDATORY_QUERY_PARAM_INCORRECT", "pei"),  # no prefix
    ({"pei": "mac-00-11-22-33-44-55"}, "MANDATORY_QUERY_PARAM_INCORRECT", "pei"),
    ({"pei": "imei-352099001761481", "supi": "imsi-12"}, "OPTIONAL_QUERY_PARAM_INCORRECT",
     "supi"),
])
def test_bad_queries_get_400_problem_details(eir_server_module, params, cause, param):
    url = eir_server_module
    with h2c_client() as client:
        response = client.get(url + STATUS_PATH, params=params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["status"], problem["cause"]) == (400, cause)
    assert [item["param"] for item in problem["invalidParams"]] == [param]


def test_other_paths_and_methods(eir_server_module):
    url = eir_server_module
    with h2c_client() as client:
        response = client.get(url + "/n5g-eir-eic/v2/equipment-status",
                              params={"pei": imei("35209900176148")})
        assert (response.status_code, response.json()["cause"]) == (
            404, "RESOURCE_URI_STRUCTURE_NOT_FOUND")
        response = client.post(url + STATUS_PATH, params={"pei": imei("35209900176148")},
                               content=b"{}")
        assert response.status_code == 405 and response.headers["allow"] == "GET"
        # The connection is still good after both.
        assert status_of(client, url, pei=imei("35209900176148"))[0] == 200


@pytest.fixture(scope="module")
def eir_server_module(tmp_path_factory):
    """One `eir serve --sbi` for the tests that only ask it questions; its h2c base URL."""
    server = start_eir("--sbi", "127.0.0.1:0", "--workers", "1",
                       cwd=tmp_path_factory.mktemp("eir-sbi"))
    try:
        yield endpoint(server, H2C_LINE)
    finally:
        server.kill()


def test_not_http2_closes_only_that_connection(eir_server_module):
    host, port = eir_server_module.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /n5g-eir-eic/v1/equipment-status HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):  # our SETTINGS, then a GOAWAY, then the close
            received += chunk
        assert received  # closed by the server, not hung
    with h2c_client() as client:
        assert status_of(client, eir_server_module, pei=imei("35209900176148"))[0] == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_prior_knowledge(eir_server_module):
    result = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version} %{http_code}",
         f"{eir_server_module}{STATUS_PATH}?pei={imei('35332106470089')}"],
        capture_output=True, text=True, timeout=20)
    body, _, status = result.stdout.rpartition("\n")
    assert (json.loads(body), status) == ({"status": "GREYLISTED"}, "2 200"), result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_reload_is_seen_at_once(eir_server, tmp_path, workers):
    lists = tmp_path / "lists.csv"
    lists.write_text("imei,status,imsi,reason\n35209900176148,whitelist,,\n")
    server, url = start_sbi(eir_server, lists=[lists], workers=workers)
    pei = imei("35209900176148")
    with h2c_client() as client:
        assert status_of(client, url, pei=pei) == (200, {"status": "WHITELISTED"})
        lists.write_text("imei,status,imsi,reason\n35209900176148,blacklist,,stolen\n")
        mark = len(server.lines)
        server.process.send_signal(signal.SIGHUP)
        for worker in range(int(workers)) if workers != "1" else ():
            server.wait_for_log(rf"worker {worker}: lists reloaded", start=mark)
        server.wait_for_log(r"lists reloaded", start=mark)
        assert status_of(client, url, pei=pei) == (200, {"status": "BLACKLISTED"})
    assert server.stop() == 0


# -- TLS -------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", ["1", "2"])
def test_tls_with_alpn_h2(eir_server, tmp_path, workers):
    """With workers, the socket is handed over before the handshake: the worker does it."""
    from test_tls import Authority

    ca = Authority(tmp_path, "Test Operator CA")
    ca.issue("eir.test", "eir")
    config = tmp_path / "eir.yaml"
    config.write_text("sbi:\n  tls:\n    listen: 127.0.0.1:0\n    certificate: eir.pem\n"
                      "    key: eir.key\n")
    server = eir_server("--config", str(config), "--workers", workers)
    url = endpoint(server, TLS_LINE)
    trusting = ssl.create_default_context(cafile=str(ca.path))
    with httpx.Client(http2=True, verify=trusting, timeout=10) as client:
        response = client.get(url + STATUS_PATH, params={"pei": imei("35209900176148")})
    assert response.http_version == "HTTP/2"  # negotiated by ALPN
    assert (response.status_code, response.json()) == (200, {"status": "BLACKLISTED"})
    mark = len(server.lines)
    with pytest.raises(httpx.ConnectError):  # and it is TLS: an unknown CA is refused
        httpx.get(url + STATUS_PATH, params={"pei": imei("35209900176148")}, timeout=10)
    by = r"worker \d+: " if workers != "1" else ""
    server.wait_for_log(by + r".*TLS handshake refused", start=mark)
    assert server.stop() == 0
    served_by = re.findall(r"^.*N5g-eir connection from", server.log(), re.MULTILINE)
    assert served_by and all(re.search(by, line) for line in served_by), served_by


# -- audit, metrics, observations (a supervisor with workers: the default) -----------------

def test_audit_metrics_and_observations_by_interface(eir_server, tmp_path):
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "eir.yaml"
    config.write_text(f"audit:\n  enabled: true\n  path: {audit}\n  flush_seconds: 0.1\n"
                      "observations:\n  flush_seconds: 0.1\n")
    server, url = start_sbi(eir_server, "--config", str(config), "--metrics", "127.0.0.1:0",
                            workers="2")
    metrics = endpoint(server, METRICS_LINE)
    asks = [(imei("49015420323751"), f"imsi-{PAIRED_IMSI}"), (imei("35209900176148"), None),
            (imei("99999999000001"), None), ("imei-1", None)]
    with h2c_client(headers={"user-agent": "AMF-amf1"}) as client:
        codes = [client.get(url + STATUS_PATH, params={"pei": pei} | (
            {"supi": supi} if supi else {})).status_code for pei, supi in asks]
    assert codes == [200, 200, 404, 400]
    samples = scrape_until(metrics, lambda s: value(s, "eir_observations_written_total") == 3,
                           "three observations written")
    assert value(samples, "eir_sbi_requests_total", status_code="200") == 2
    assert value(samples, "eir_sbi_requests_total", status_code="404") == 1
    assert value(samples, "eir_sbi_requests_total", status_code="400") == 1
    assert value(samples, "eir_sbi_verdicts_total", equipment_status="WHITELISTED") == 1
    assert value(samples, "eir_sbi_verdicts_total", equipment_status="UNKNOWN") == 1
    assert value(samples, "eir_sbi_connections") == 0
    # S13's counters are S13's only.
    assert value(samples, "eir_requests_total", command="ME-Identity-Check") == 0

    def records():
        lines = audit.read_text().splitlines() if audit.exists() else []
        return [json.loads(line) for line in lines] if len(lines) >= 3 else None
    found = wait_until(records, "three audit records")
    assert [(r["interface"], r["origin_host"], r["status"], r["result_code"])
            for r in found] == [("n5g-eir", "AMF-amf1", "WHITELISTED", 2001),
                                ("n5g-eir", "AMF-amf1", "BLACKLISTED", 2001),
                                ("n5g-eir", "AMF-amf1", "UNKNOWN", 5422)]
    assert found[0]["imsi"] == "00101******6789" and found[0]["match"] == "imei+imsi"
    assert server.stop() == 0


# -- NRF registration ------------------------------------------------------------------------

class NrfStandIn:
    """An NRF's NFManagement as far as an NF uses it, served by hypercorn (HTTP/2 prior
    knowledge on cleartext) in a thread: records every request; answers NFRegister with
    heartBeatTimer 1, heartbeats with `patch_answers` (then 204), NFDeregister with 204."""

    def __init__(self, heartbeat_seconds: int = 1):
        self.heartbeat_seconds = heartbeat_seconds
        self.requests: list[tuple[str, str, str, bytes]] = []  # method, path, version, body
        self.patch_answers: deque[int] = deque()
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._fd = sock.detach()  # hypercorn's from here on (it closes it)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def app(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method = scope["method"]
        self.requests.append((method, scope["path"], scope["http_version"], body))
        status, answer = 204, b""
        if method == "PUT":
            status = 201
            answer = json.dumps(json.loads(body) | {
                "heartBeatTimer": self.heartbeat_seconds}).encode()
        elif method == "PATCH" and self.patch_answers:
            status = self.patch_answers.popleft()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")] if answer else []})
        await send({"type": "http.response.body", "body": answer})

    def _run(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"fd://{self._fd}"]
        config.accesslog = config.errorlog = None

        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await serve(self.app, config, shutdown_trigger=self._stop.wait)
        asyncio.run(main())

    def __enter__(self) -> "NrfStandIn":
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def methods(self) -> list[str]:
        return [request[0] for request in list(self.requests)]


def test_nrf_register_heartbeat_reregister_deregister(eir_server, tmp_path):
    with NrfStandIn() as nrf:
        nrf.patch_answers.append(404)  # the first heartbeat: "who are you?"
        config = tmp_path / "eir.yaml"
        config.write_text(f"sbi:\n  nrf:\n    url: {nrf.url}\n    heartbeat_seconds: 30\n")
        server, url = start_sbi(eir_server, "--config", str(config))
        # register, heartbeat answered 404, register again, heartbeat answered 204
        wait_until(lambda: nrf.methods()[:4] == ["PUT", "PATCH", "PUT", "PATCH"],
                   "register, 404 heartbeat, register again, heartbeat", timeout=15)
        server.wait_for_log(r"NRF .*: heartbeat answered 404")
        assert server.stop() == 0
        assert nrf.methods()[-1] == "DELETE"
    method, path, version, body = nrf.requests[0]
    instance = path.rsplit("/", 1)[1]
    assert path == f"/nnrf-nfm/v1/nf-instances/{instance}" and version == "2"
    assert {request[1] for request in nrf.requests} == {path}  # one instance throughout
    profile = json.loads(body)
    port = int(url.rsplit(":", 1)[1])
    assert profile == profile | {"nfInstanceId": instance, "nfType": "5G_EIR",
                                 "nfStatus": "REGISTERED", "ipv4Addresses": ["127.0.0.1"],
                                 "heartBeatTimer": 30}
    service, = profile["nfServices"]
    assert service == service | {"serviceName": "n5g-eir-eic", "scheme": "http",
                                 "ipEndPoints": [{"ipv4Address": "127.0.0.1",
                                                  "transport": "TCP", "port": port}]}
    assert service["versions"][0]["apiVersionInUri"] == "v1"
    assert json.loads(nrf.requests[1][3]) == [
        {"op": "replace", "path": "/nfStatus", "value": "REGISTERED"}]
