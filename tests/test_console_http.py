"""The web console (eir.interfaces.console) of a live `eir serve --api`, over HTTP with httpx: the
session cookie and its flags, login failures limited per address, CSRF and the read-only
role on every change, escaping of hostile text, IMSI masking, observations and clones, and
the journal of changes. The browser tests are in test_console_browser.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import httpx
from helpers_console import READ_TOKEN, csrf_of, logged_in, start_console
from helpers_ops import API_LINE, TOKEN, endpoint, wait_until
from helpers_process import eir_ok
from helpers_wire import check_all

STOLEN = "35209900176148"  # blacklisted in config/lists/example.csv
FRESH = "35123456789012"  # in no list
OTHER, THIRD = "35876543210987", "35111111111111"  # in no list
IMSI_A, IMSI_B = "001010123456789", "001019876543210"
ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_shipped_config_blocks_a_phone_out_of_the_box(eir_server, monkeypatch, tmp_path):
    """README's console, as a new user runs it: `eir serve --api` in the repository (here a
    copy of its config/, so that the repository's local list stays empty), log in, look up,
    block a phone, and the next ECR is answered BLACKLISTED."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    server = eir_server("--api", "127.0.0.1:0", lists=[], cwd=tmp_path)  # ./config/eir.yaml
    admin = logged_in(endpoint(server, API_LINE))
    assert "UNKNOWN" in admin.get("/lookup", params={"imei": FRESH + "0"}).text
    assert check_all(server.address, [(FRESH + "0", IMSI_A)])[0].experimental_result_code == 5422
    response = admin.post("/rules/add", data={"imei": FRESH, "status": "blacklist",
                                              "reason": "stolen", "csrf": csrf_of(admin)})
    assert response.status_code == 303, response.text
    assert check_all(server.address, [(FRESH + "0", IMSI_A)])[0].equipment_status == 1
    assert f"{FRESH},blacklist,,stolen" in (
        tmp_path / "config" / "lists" / "local.csv").read_text()
    assert "BLACKLISTED" in admin.get("/lookup", params={"imei": FRESH + "0"}).text


def test_with_a_store_local_rules_are_published_into_it(eir_server, monkeypatch, tmp_path):
    """`eir serve --store DIR` with the shipped config: a change publishes the local list
    into the store beside the registry's lists (a new version, journaled); the most
    specific rule wins whichever list holds it; a sync keeps the local rules; after a
    rollback the page says the file is not what is in force, and puts it back once
    unpinned."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    local = tmp_path / "config" / "lists" / "local.csv"
    drop, store = tmp_path / "drop", tmp_path / "store"
    drop.mkdir()
    registry = f"imei,status\n{STOLEN},blacklist\n35123456,blacklist\n"  # FRESH's TAC
    (drop / "lists.csv").write_text(registry)
    eir_ok("sync", "--source", str(drop), "--store", str(store))
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    server = eir_server("--api", "127.0.0.1:0", "--store", str(store), lists=[],
                        cwd=tmp_path)
    admin = logged_in(endpoint(server, API_LINE))
    page = admin.get("/rules").text
    assert "published into the snapshot store" in page and 'id="differs"' not in page
    csrf = csrf_of(admin)
    for imei, status in ((FRESH, "whitelist"), (STOLEN, "whitelist"), (OTHER, "blacklist")):
        response = admin.post("/rules/add", data={"imei": imei, "status": status,
                                                  "reason": "local", "csrf": csrf})
        assert response.status_code == 303, response.text
    fresh, stolen, other = check_all(server.address, [(FRESH + "0", None), (STOLEN + "0", None),
                                                      (OTHER + "0", None)])
    # The local exact IMEI beats the registry's TAC; at equal specificity (the registry's
    # exact IMEI) blacklist beats whitelist, as between any two list files.
    assert (fresh.equipment_status, stolen.equipment_status, other.equipment_status) == (
        0, 1, 1)
    assert "000004" in admin.get("/lists").text  # one version per change
    journal = json.loads((store / "journal.jsonl").read_text().splitlines()[-1])
    assert journal["act"] == "publish" and "web console, role admin" in journal["by"]
    assert {"name": "local.csv", "sha256": sha256(local)} in journal["files"]
    # The registry publishes again: its lists change, the local rules stay.
    (drop / "lists.csv").write_text(registry + f"{THIRD},blacklist\n")
    eir_ok("sync", "--source", str(drop), "--store", str(store))
    server.wait_for_log(r"lists reloaded: version 000005")
    fresh, third = check_all(server.address, [(FRESH + "0", None), (THIRD + "0", None)])
    assert (fresh.equipment_status, third.equipment_status) == (0, 1)
    # Rolled back to before the local rules: the page says so; pinned, nothing published.
    assert admin.post("/lists/rollback", data={"version": "000001", "csrf": csrf}
                      ).status_code == 303
    assert check_all(server.address, [(FRESH + "0", None)])[0].equipment_status == 1
    assert 'id="differs"' in admin.get("/rules").text
    refused = admin.post("/rules/publish", data={"csrf": csrf})
    assert refused.status_code == 409 and "pinned at version 000001" in refused.text
    assert admin.post("/lists/unpin", data={"csrf": csrf}).status_code == 303
    assert admin.post("/rules/publish", data={"csrf": csrf}).status_code == 303
    assert check_all(server.address, [(FRESH + "0", None)])[0].equipment_status == 0
    assert 'id="differs"' not in admin.get("/rules").text

def test_login_gives_a_signed_httponly_strict_cookie(eir_server, monkeypatch, tmp_path):
    _, url = start_console(eir_server, monkeypatch, tmp_path)
    console = url + "/console"
    response = httpx.get(console + "/lookup?imei=" + STOLEN)
    assert response.status_code == 303
    assert response.headers["location"] == "/console/login?next=%2Fconsole%2Flookup%3Fimei%3D" + STOLEN
    refused = httpx.post(console + "/login", data={"token": "wrong-token-0123456789"})
    assert refused.status_code == 401 and "Wrong token." in refused.text
    assert "set-cookie" not in refused.headers
    response = httpx.post(console + "/login", data={
        "token": TOKEN, "next": f"/console/lookup?imei={STOLEN}"})
    assert response.status_code == 303
    assert response.headers["location"] == f"/console/lookup?imei={STOLEN}"
    cookie = response.headers["set-cookie"]
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path", "max-age"} <= flags and "secure" not in flags  # plain HTTP
    assert "SameSite=strict" in cookie and "Path=/console" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    page = httpx.get(console + f"/lookup?imei={STOLEN}", cookies={"eir_console": value})
    assert page.status_code == 200 and "BLACKLISTED" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY"
    # A forged or altered cookie is no session; nor is a redirect to another site honoured.
    for forged in (value[:-2] + "xx", '{"role": "admin"}'):
        assert httpx.get(console + "/lookup", cookies={"eir_console": forged}).status_code == 303
    response = httpx.post(console + "/login", data={"token": TOKEN,
                                                    "next": "//evil.example/console/"})
    assert response.headers["location"] == "/console/lookup"


def test_secure_cookie_behind_a_tls_proxy(eir_server, monkeypatch, tmp_path):
    _, url = start_console(eir_server, monkeypatch, tmp_path, console="  secure_cookie: true\n")
    response = httpx.post(url + "/console/login", data={"token": TOKEN})
    assert response.status_code == 303 and "; secure" in response.headers["set-cookie"].lower()


def test_failed_logins_are_limited_per_address(eir_server, monkeypatch, tmp_path):
    _, url = start_console(eir_server, monkeypatch, tmp_path,
                           console="  max_login_failures: 3\n")
    attacker = httpx.Client(base_url=url + "/console", timeout=10)
    for _ in range(3):
        response = attacker.post("/login", data={"token": "guess-0123456789abcdef"})
        assert response.status_code == 401
    # Beyond the limit every login from that address is refused, the right token too...
    response = attacker.post("/login", data={"token": TOKEN})
    assert response.status_code == 429 and "Too many failed logins" in response.text
    assert "set-cookie" not in response.headers
    # ...while another address logs in.
    other = httpx.Client(base_url=url + "/console", timeout=10,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    assert other.post("/login", data={"token": TOKEN}).status_code == 303


def test_changes_need_the_csrf_token_and_the_admin_role(eir_server, monkeypatch, tmp_path):
    server, url = start_console(eir_server, monkeypatch, tmp_path)
    local = tmp_path / "local.csv"
    original = local.read_bytes()
    rule = {"imei": FRESH, "status": "blacklist", "imsi": "", "reason": "stolen, ticket 7"}
    admin = logged_in(url)
    for csrf in (None, "forged"):
        form = dict(rule, **({"csrf": csrf} if csrf else {}))
        response = admin.post("/rules/add", data=form)
        assert response.status_code == 403 and "CSRF" in response.text
    reader = logged_in(url, READ_TOKEN)
    reader_csrf = csrf_of(reader)
    for path, form in (("/rules/add", rule), ("/lists/rollback", {}), ("/lists/unpin", {}),
                       ("/lists/sync", {}), ("/rules/0/delete", {"tag": "x"})):
        response = reader.post(path, data=dict(form, csrf=reader_csrf))
        assert response.status_code == 403 and "read-only role" in response.text, path
    for path in ("/rules/new", "/lists/confirm?action=rollback&version=000001"):
        assert reader.get(path).status_code == 403
    assert "Add a rule" not in reader.get("/rules").text
    assert local.read_bytes() == original
    # A rule the CLI would refuse is refused with the CLI's words; the file is untouched.
    bad = admin.post("/rules/add", data=dict(rule, imei="3512345", csrf=csrf_of(admin)))
    assert bad.status_code == 400 and "local.csv:3: imei:" in bad.text
    assert local.read_bytes() == original
    response = admin.post("/rules/add", data=dict(rule, csrf=csrf_of(admin)))
    assert response.status_code == 303 and response.headers["location"] == "/console/rules?done=added"
    assert local.read_text() == ("imei,status,imsi,reason\n# the console's rules\n"
                                 f"{FRESH},blacklist,,\"stolen, ticket 7\"\n")
    answer, = check_all(server.address, [(FRESH + "0", IMSI_A)])
    assert answer.equipment_status == 1  # BLACKLISTED, from the live server
    journal = [json.loads(line) for line in (tmp_path / "console.jsonl").read_text().splitlines()]
    acts = [(entry["act"], entry["role"]) for entry in journal]
    assert acts == [("login", "admin"), ("login", "read"), ("rule-add", "admin")]
    added = journal[-1]
    assert added["address"] == "127.0.0.1" and added["before"] is None
    assert added["after"] == {"imei": FRESH, "status": "blacklist", "imsi": "",
                              "reason": "stolen, ticket 7"}


def test_hostile_text_is_escaped_and_imsis_masked(eir_server, monkeypatch, tmp_path):
    server, url = start_console(eir_server, monkeypatch, tmp_path)
    admin = logged_in(url)
    hostile = "<script>alert(1)</script>\" onmouseover=\"x"
    response = admin.post("/rules/add", data={"imei": FRESH, "status": "greylist",
                                              "reason": hostile, "csrf": csrf_of(admin)})
    assert response.status_code == 303
    for page in (admin.get("/rules"), admin.get(f"/lookup?imei={FRESH}")):
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&#34; onmouseover=&#34;x" in page.text
        assert "<script>alert" not in page.text
    page = admin.get("/lookup", params={"imei": "<script>alert(2)</script>"})
    assert page.status_code == 400 and "&lt;script&gt;alert(2)" in page.text
    assert "<script>alert" not in page.text
    # Observations: the IMEI with two subscribers, shown masked, and marked as a clone.
    check_all(server.address, [(FRESH + "0", IMSI_A), (FRESH + "0", IMSI_B)])
    page = wait_until(lambda: (p := admin.get(f"/lookup?imei={FRESH}")).text.count(
        "Clone suspected") and p, "the observations flushed")
    assert "00101******6789" in page.text and "00101******3210" in page.text
    assert IMSI_A not in page.text and IMSI_B not in page.text


def test_edit_and_delete_a_rule_applied_to_the_live_server(eir_server, monkeypatch, tmp_path):
    # Two workers: each change reaches every worker's lists (the supervisor's reload).
    server, url = start_console(eir_server, monkeypatch, tmp_path, workers=2)
    admin = logged_in(url)
    csrf = csrf_of(admin)
    admin.post("/rules/add", data={"imei": FRESH, "status": "blacklist", "csrf": csrf})
    edit = re.search(r'href="/console/rules/(\d+)/edit\?tag=(\w+)"', admin.get("/rules").text)
    index, tag = edit.groups()
    assert admin.get(f"/rules/{index}/edit", params={"tag": tag}).status_code == 200
    changed = {"imei": FRESH, "status": "whitelist", "imsi": IMSI_A, "reason": "cleared",
               "csrf": csrf, "tag": tag}
    assert admin.post(f"/rules/{index}/edit", data=changed).status_code == 303
    white, unpaired = check_all(server.address, [(FRESH + "0", IMSI_A), (FRESH + "0", IMSI_B)])
    assert white.equipment_status == 0 and unpaired.experimental_result_code == 5422
    # The old tag names what was there before: a second edit from a stale page is refused.
    stale = admin.post(f"/rules/{index}/edit", data=dict(changed, status="greylist"))
    assert stale.status_code == 409 and "changed or removed meanwhile" in stale.text
    tag = re.search(r'\?tag=(\w+)"', admin.get("/rules").text).group(1)
    response = admin.post(f"/rules/{index}/delete", data={"csrf": csrf, "tag": tag})
    assert response.status_code == 303
    assert (tmp_path / "local.csv").read_text() == ("imei,status,imsi,reason\n"
                                                    "# the console's rules\n")
    assert check_all(server.address, [(FRESH + "0", IMSI_A)])[0].experimental_result_code == 5422
    journal = [json.loads(line) for line in (tmp_path / "console.jsonl").read_text().splitlines()]
    edited, deleted = journal[-2:]
    assert (edited["act"], edited["before"]["status"], edited["after"]["status"]) == (
        "rule-edit", "blacklist", "whitelist")
    assert edited["after"]["imsi"] == "00101******6789"  # masked, as in the audit log
    assert (deleted["act"], deleted["after"]) == ("rule-delete", None)


def test_sync_now_rollback_and_unpin_are_confirmed_and_journaled(eir_server, monkeypatch,
                                                                 tmp_path):
    drop, store = tmp_path / "drop", tmp_path / "store"
    drop.mkdir()
    (drop / "lists.csv").write_text(f"imei,status\n{FRESH},greylist\n")
    (drop / "gsma_tac.csv").write_text(f"tac,manufacturer,model_name\n{FRESH[:8]},Acme,"
                                       "<b>Phone</b> 3\n")
    config = tmp_path / "eir.yaml"
    config.write_text(f"store:\n  directory: {store}\nsync:\n  source: {drop}\n"
                      "  interval_seconds: 3600\nconsole:\n  journal: console.jsonl\n")
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    server = eir_server("--config", str(config), "--api", "127.0.0.1:0", "--workers", "1",
                        lists=[])
    url = endpoint(server, API_LINE)
    admin = logged_in(url)
    csrf = csrf_of(admin, "/lists")
    page = admin.get("/lists/confirm", params={"action": "sync"})
    assert page.status_code == 200 and 'action="/console/lists/sync"' in page.text
    (drop / "lists.csv").write_text(f"imei,status\n{FRESH},blacklist\n")
    synced = admin.post("/lists/sync", data={"csrf": csrf})
    assert synced.status_code == 200 and "published version 000002" in synced.text
    assert check_all(server.address, [(FRESH + "0", IMSI_A)])[0].equipment_status == 1
    lookup = admin.get(f"/lookup?imei={FRESH}")  # the device name from the TAC file
    assert "<dd>Acme &lt;b&gt;Phone&lt;/b&gt; 3</dd>" in lookup.text
    assert "<dt>Source</dt><dd>lists.csv" in lookup.text
    assert admin.post("/lists/rollback", data={"csrf": csrf, "version": "000001"}
                      ).headers["location"] == "/console/lists?done=rollback"
    assert check_all(server.address, [(FRESH + "0", IMSI_A)])[0].equipment_status == 2
    assert 'id="pinned">000001<' in admin.get("/lists").text
    refused = admin.post("/lists/rollback", data={"csrf": csrf, "version": "000009"})
    assert refused.status_code == 404 and "version 000009 is not kept" in refused.text
    assert admin.post("/lists/unpin", data={"csrf": csrf}).status_code == 303
    assert 'id="pinned">no<' in admin.get("/lists").text
    journal = [json.loads(line) for line in (tmp_path / "console.jsonl").read_text().splitlines()]
    assert [(e["act"], e.get("before"), e.get("after")) for e in journal[1:]] == [
        ("sync", "000001", "000002"), ("rollback", "000002", "000001"),
        ("unpin", "000001", None)]
    acts = [json.loads(line)["act"] for line in (store / "journal.jsonl").read_text().splitlines()]
    assert acts == ["publish", "publish", "rollback", "unpin"]
