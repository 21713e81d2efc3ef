"""The admin and lookup API (eir.interfaces.api) of a live `eir serve --api`, over HTTP with httpx: bearer
auth, verdicts with what the observations know, problem details, list status, reload and
rollback, peers, health and readiness; and schemathesis against the served OpenAPI document."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import httpx
import pytest
from helpers_ops import API_LINE, TOKEN, authorised, endpoint, wait_until
from helpers_process import EXAMPLE_LIST, eir_ok, run_eir
from helpers_wire import ecr, open_peer, parse_answer, read_message

from eir.interfaces.api import create_app
from eir.core.config import Settings
from eir.serve.server import build_server

PROBLEM = "application/problem+json"
SCHEMATHESIS_TIMEOUT = 120


@pytest.fixture
def api_server(eir_server, monkeypatch):
    """Factory: `eir serve --api 127.0.0.1:0 ARGS` with EIR_API_TOKEN set → (server, URL)."""
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)

    def start(*args: str, api: str = "127.0.0.1:0", **kwargs):
        server = eir_server("--api", api, *args, **kwargs)
        return server, endpoint(server, API_LINE)
    return start


def get(url: str, path: str, token: str | None = TOKEN, **params) -> httpx.Response:
    headers = authorised(token) if token else {}
    return httpx.get(url + path, params=params, headers=headers, timeout=10)


def post(url: str, path: str, json=None, token: str | None = TOKEN) -> httpx.Response:
    headers = authorised(token) if token else {}
    return httpx.post(url + path, json=json, headers=headers, timeout=30)


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    assert problem.get("field") == field
    return problem


def test_bearer_token_is_required_except_for_health_and_the_document(api_server):
    server, url = api_server(api="0")  # a bare port: loopback
    assert url.startswith("http://127.0.0.1:")
    for token in (None, "wrong-token-0123456789"):
        response = get(url, "/v1/lists", token=token)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    response = httpx.get(url + "/v1/lists", headers={"Authorization": f"Basic {TOKEN}"})
    assert_problem(response, 401)
    assert get(url, "/v1/lists").status_code == 200
    assert get(url, "/healthz", token=None).json()["status"] == "ok"
    assert get(url, "/readyz", token=None).json() == {
        "ready": True, "checks": {"lists_loaded": True, "diameter_listening": True,
                                  "not_stopping": True}}
    document = get(url, "/openapi.json", token=None).json()
    assert {"/v1/equipment/{imei}", "/v1/lists", "/v1/lists/reload", "/v1/lists/rollback",
            "/v1/peers", "/healthz", "/readyz"} <= set(document["paths"])
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_equipment_verdicts_and_what_the_observations_know(api_server, tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text("observations:\n  flush_seconds: 0.1\n")
    server, url = api_server("--config", str(config))
    verdict = get(url, "/v1/equipment/352099001761481").json()
    assert verdict["status"] == "BLACKLISTED" and verdict["result_code"] == 2001
    assert verdict["imei"] == "35209900176148" and verdict["match"] == "imei"
    assert "reported stolen (ticket 1042)" in verdict["reason"]
    assert verdict["source"].endswith("example.csv:4")
    assert verdict["observed"] == {"first_seen": None, "last_seen": None, "imsis": 0}
    lists = get(url, "/v1/lists").json()
    assert verdict["list_version"] == lists["version"]

    paired = get(url, "/v1/equipment/4901542032375100", imsi="001010123456789").json()
    assert (paired["status"], paired["match"]) == ("WHITELISTED", "imei+imsi")
    unpaired = get(url, "/v1/equipment/49015420323751").json()
    assert unpaired["status"] == "BLACKLISTED"
    unknown = get(url, "/v1/equipment/12345678901234").json()
    assert (unknown["status"], unknown["result_code"]) == ("UNKNOWN", 5422)

    sock = open_peer(server.address)
    try:
        for number, imsi in enumerate(["001010000000001", "001010000000002"], 10):
            sock.sendall(ecr("35209900176148", imsi, hop_by_hop=number, end_to_end=number))
            assert parse_answer(read_message(sock)).equipment_status == 1
    finally:
        sock.close()
    today = date.today().isoformat()

    def both_imsis_observed():
        found = get(url, "/v1/equipment/35209900176148").json()["observed"]
        return found if found["imsis"] == 2 else None

    observed = wait_until(both_imsis_observed, "the two IMSIs observed")
    assert observed == {"first_seen": today, "last_seen": today, "imsis": 2}


def test_bad_input_gets_problem_details_naming_the_field(api_server):
    server, url = api_server()
    problem = assert_problem(get(url, "/v1/equipment/35209900x"), 400, field="imei")
    assert problem["detail"].startswith("imei: ")
    assert_problem(get(url, "/v1/equipment/3520990017614812345"), 400, field="imei")
    problem = assert_problem(get(url, "/v1/equipment/35209900176148", imsi="0010A"), 400,
                             field="imsi")
    assert "5 to 15 digits" in problem["detail"]
    assert_problem(post(url, "/v1/lists/rollback", json={"version": "../x"}), 400,
                   field="version")
    assert_problem(get(url, "/v1/nothing"), 404)
    assert_problem(httpx.delete(url + "/v1/lists", headers=authorised()), 405)


def test_list_status_reload_and_a_refused_reload(api_server, tmp_path):
    lists = tmp_path / "lists.csv"
    shutil.copy(EXAMPLE_LIST, lists)
    server, url = api_server(lists=[lists])
    status = get(url, "/v1/lists").json()
    assert status["source"] == "files" and status["files"] == [str(lists)]
    assert status["rules"] == 6 and status["counts"]["imei"] == 3
    assert status["store"] is None and status["versions"] == []
    assert status["unknown_policy"] == "unknown" and status["age_seconds"] >= 0

    with lists.open("a") as handle:
        handle.write("35999999000001,blacklist,,added\n")
    reloaded = post(url, "/v1/lists/reload").json()
    assert reloaded["rules"] == 7 and reloaded["version"] != status["version"]
    assert get(url, "/v1/equipment/35999999000001").json()["status"] == "BLACKLISTED"

    with lists.open("a") as handle:
        handle.write("35999999000002,purple,,bad status\n")
    problem = assert_problem(post(url, "/v1/lists/reload"), 409)
    assert f"{lists}:" in problem["detail"] and "status" in problem["detail"]
    assert get(url, "/v1/lists").json()["version"] == reloaded["version"]  # still in force
    assert_problem(post(url, "/v1/lists/rollback"), 409)  # no store to roll back in


def test_rollback_in_a_store(api_server, tmp_path):
    store = tmp_path / "store"
    for number, status in enumerate(["blacklist", "greylist"], 1):
        source = tmp_path / f"drop{number}"
        source.mkdir()
        (source / "lists.csv").write_text(f"imei,status,imsi,reason\n"
                                          f"35209900176148,{status},,v{number}\n")
        eir_ok("sync", "--source", str(source), "--store", str(store))
    server, url = api_server("--store", str(store), lists=[])
    status = get(url, "/v1/lists").json()
    assert status["source"] == "store" and status["version"] == "000002"
    assert [(v["version"], v["in_force"]) for v in status["versions"]] == [
        ("000002", True), ("000001", False)]
    assert get(url, "/v1/equipment/35209900176148").json()["status"] == "GREYLISTED"

    assert_problem(post(url, "/v1/lists/rollback", json={"version": "000009"}), 404,
                   field="version")
    assert post(url, "/v1/lists/rollback").json() == {"version": "000001",
                                                      "pinned": "000001"}
    status = get(url, "/v1/lists").json()
    assert (status["version"], status["pinned"]) == ("000001", "000001")
    assert get(url, "/v1/equipment/35209900176148").json()["status"] == "BLACKLISTED"
    problem = assert_problem(post(url, "/v1/lists/rollback"), 409)
    assert "no version older than 000001" in problem["detail"]
    assert post(url, "/v1/lists/rollback", json={"version": "000002"}).json()[
        "version"] == "000002"


def test_peers(api_server):
    server, url = api_server()
    assert get(url, "/v1/peers").json() == []
    sock = open_peer(server.address)
    try:
        peers = get(url, "/v1/peers").json()
        assert len(peers) == 1
        peer = peers[0]
        assert (peer["state"], peer["origin_host"], peer["origin_realm"]) == (
            "open", "mme.test", "test")
        assert peer["remote"] == "{}:{}".format(*sock.getsockname())
        assert 0 <= peer["connected_seconds"] < 60
        assert not any(peer["answered"].values())  # a CER is no application answer
        sock.sendall(ecr("352099001761480", None))
        assert parse_answer(read_message(sock)).equipment_status == 1
        answered = get(url, "/v1/peers").json()[0]["answered"]
        assert answered == {"WHITELISTED": 0, "BLACKLISTED": 1, "GREYLISTED": 0, "UNKNOWN": 0,
                            "ERROR": 0, "DUPLICATE": 0}
    finally:
        sock.close()


def test_readiness_follows_the_diameter_listener(tmp_path):
    """In-process, on a real EirServer: not ready before its listener is up, ready while it
    is, not ready once stopping."""
    settings = Settings.model_validate({
        "diameter": {"listen": ["127.0.0.1:0"]}, "lists": {"files": [str(EXAMPLE_LIST)]},
        "observations": {"enabled": False}})

    async def scenario() -> list[tuple[int, dict]]:
        server = build_server(settings)
        app = create_app(server, TOKEN)
        seen = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://eir") as client:
            async def probe():
                response = await client.get("/readyz")
                seen.append((response.status_code, response.json()["checks"]))
            await probe()
            await server.start()
            await probe()
            server.stop()
            await probe()
            for listener in server.listeners:
                listener.close()
                await listener.wait_closed()
        return seen

    before, serving, stopping = asyncio.run(scenario())
    assert before == (503, {"lists_loaded": True, "diameter_listening": False,
                            "not_stopping": True})
    assert serving == (200, {"lists_loaded": True, "diameter_listening": True,
                             "not_stopping": True})
    assert stopping[0] == 503 and stopping[1]["not_stopping"] is False


def test_no_token_no_api(tmp_path, monkeypatch):
    monkeypatch.delenv("EIR_API_TOKEN", raising=False)
    args = ("serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--list",
            str(EXAMPLE_LIST))
    result = run_eir(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "no API token" in result.stderr and "EIR_API_TOKEN" in result.stderr
    monkeypatch.setenv("EIR_API_TOKEN", "short")
    result = run_eir(*args, cwd=tmp_path)
    assert result.returncode == 2 and "at least 16 characters" in result.stderr


def test_schemathesis_against_the_served_openapi_document(api_server, tmp_path):
    """Property-based calls of every operation from the served document (bounded: 20
    examples an operation, one seed), every check on; a store with two versions, so that
    rollback succeeds once and is then refused."""
    store = tmp_path / "store"
    for number in (1, 2):
        source = tmp_path / f"drop{number}"
        source.mkdir()
        (source / "lists.csv").write_text(f"imei,status,imsi,reason\n"
                                          f"3520990017614{number},blacklist,,v{number}\n")
        eir_ok("sync", "--source", str(source), "--store", str(store))
    server, url = api_server("--store", str(store), lists=[])
    command = [str(Path(sys.executable).parent / "st"), "run", f"{url}/openapi.json",
               "--header", f"Authorization: Bearer {TOKEN}", "--checks", "all",
               "--max-examples", "20", "--seed", "1", "--no-shrink", "--workers", "1",
               "--request-timeout", "10"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                            timeout=SCHEMATHESIS_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "No issues found" in output and "9 selected / 9 total" in output, output
    server.stop()
    assert " 500 " not in server.log()  # no request ended in an internal error
