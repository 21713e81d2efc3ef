"""Logs and audit (eir.logs): JSON logs from a live server, no API token and no full IMSI in
its log or audit file unless logging.show_imsi, audit records with reason and source, sampled
or all, and an audit file rotated under a running writer."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import httpx
from helpers_ops import API_LINE, TOKEN, authorised, endpoint, wait_until
from helpers_process import EXAMPLE_LIST, ROOT, LoggedProcess, run_eir
from helpers_wire import ecr, open_peer, parse_answer, read_message

from eir.decision import EquipmentStatus, Match, Verdict
from eir.logs import AuditLog, JsonFormatter, TextFormatter, mask_imsi, redact

PAIRED_IMEI, PAIRED_IMSI = "49015420323751", "001010123456789"  # example.csv's pair rule
OTHER_IMSI = "001019876543210"
TOO_LONG_IMSI = "0010101234567890"  # 16 digits: answered 5004, the value in the error text


def start_json_server(cwd: Path, *args: str) -> tuple[LoggedProcess, int]:
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment.pop("EIR_CONFIG", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "eir", "serve", "--listen", "127.0.0.1:0", "--list",
         str(EXAMPLE_LIST), "--log-format", "json", *args], cwd=cwd, env=environment,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    server = LoggedProcess(process, process.stderr, "eir serve --log-format json")
    try:
        _, match = server.wait_for_line(r'"message": "listening on tcp 127\.0\.0\.1:(\d+)"',
                                        timeout=15)
    except BaseException:
        server.kill()
        raise
    return server, int(match.group(1))


def test_json_logs_are_one_object_per_line(tmp_path):
    server, port = start_json_server(tmp_path)
    try:
        sock = open_peer(("127.0.0.1", port))
        sock.sendall(ecr("3520990017614X", None))  # a 5004, logged with its reason
        assert parse_answer(read_message(sock)).result_code == 5004
        sock.close()
        server.wait_for_line(r"peer closed the connection")
        assert server.stop() == 0
    finally:
        server.kill()
    records = [json.loads(line) for line in server.lines]  # every line is one JSON object
    assert all(set(record) >= {"time", "level", "logger", "message"} for record in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
               for record in records)
    messages = [record["message"] for record in records]
    assert any("answering 5004" in message and "IMEI" in message for message in messages)
    assert records[-1] == records[-1] | {"logger": "eir.server", "message": "stopped",
                                          "level": "INFO"}


def _traffic_and_api_calls(server, url: str) -> None:
    sock = open_peer(server.address)
    try:
        for number, (imei, imsi) in enumerate([(PAIRED_IMEI, PAIRED_IMSI),
                                               (PAIRED_IMEI, OTHER_IMSI),
                                               ("35209900176148", OTHER_IMSI),
                                               ("35209900176148", TOO_LONG_IMSI)], 10):
            sock.sendall(ecr(imei, imsi, hop_by_hop=number, end_to_end=number))
            parse_answer(read_message(sock))
    finally:
        sock.close()
    for token in (TOKEN, "a-wrong-token-0123456789"):
        httpx.get(f"{url}/v1/equipment/{PAIRED_IMEI}", params={"imsi": PAIRED_IMSI},
                  headers=authorised(token), timeout=10)
    httpx.get(f"{url}/v1/equipment/{PAIRED_IMEI}", params={"imsi": TOO_LONG_IMSI},
              headers=authorised(), timeout=10)  # 400: the bad value in the access log


def _audit_server(eir_server, monkeypatch, tmp_path, show_imsi: bool, sample: float = 1):
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "eir.yaml"
    config.write_text(f"logging:\n  level: debug\n  show_imsi: {str(show_imsi).lower()}\n"
                      f"audit:\n  enabled: true\n  sample: {sample}\n  path: {audit}\n"
                      "  flush_seconds: 0.1\n")
    server = eir_server("--config", str(config), "--api", "127.0.0.1:0")
    return server, endpoint(server, API_LINE), audit


def _audit_records(audit: Path, count: int) -> list[dict]:
    def written():
        lines = audit.read_text().splitlines() if audit.exists() else []
        return lines if len(lines) >= count else None
    return [json.loads(line) for line in wait_until(written, f"{count} audit records")]


def test_no_token_and_no_full_imsi_in_the_log_or_the_audit(eir_server, monkeypatch,
                                                             tmp_path):
    server, url, audit = _audit_server(eir_server, monkeypatch, tmp_path, show_imsi=False)
    _traffic_and_api_calls(server, url)
    records = _audit_records(audit, 3)  # the 16-digit IMSI got 5004: no verdict
    assert server.stop() == 0
    log, audit_text = server.log(), audit.read_text()
    for secret in (TOKEN, PAIRED_IMSI, OTHER_IMSI, TOO_LONG_IMSI):
        assert secret not in log, f"{secret} in the log"
        assert secret not in audit_text, f"{secret} in the audit"
    assert "imsi=00101******6789" in log  # the API access log, masked
    assert "User-Name: '00101*******7890'" in log  # the 5004's reason, masked

    paired = records[0]
    assert paired == paired | {
        "origin_host": "mme.test", "imei": PAIRED_IMEI, "imsi": "00101******6789",
        "status": "WHITELISTED", "result_code": 2001, "match": "imei+imsi"}
    assert "00101******6789" in paired["reason"] and paired["source"].endswith(
        "example.csv:8")
    assert [(r["imsi"], r["status"]) for r in records[1:]] == [
        ("00101******3210", "BLACKLISTED"), ("00101******3210", "BLACKLISTED")]
    assert all(len(r["list_version"]) == 12 and r["reason"] for r in records)


def test_show_imsi_lets_full_imsis_through(eir_server, monkeypatch, tmp_path):
    server, url, audit = _audit_server(eir_server, monkeypatch, tmp_path, show_imsi=True)
    _traffic_and_api_calls(server, url)
    records = _audit_records(audit, 3)
    assert server.stop() == 0
    assert records[0]["imsi"] == PAIRED_IMSI and PAIRED_IMSI in records[0]["reason"]
    assert f"imsi={PAIRED_IMSI}" in server.log()
    assert TOKEN not in server.log()  # the token never, whatever show_imsi says


def test_audit_sample_zero_writes_nothing(eir_server, monkeypatch, tmp_path):
    server, url, audit = _audit_server(eir_server, monkeypatch, tmp_path, show_imsi=False,
                                       sample=0)
    _traffic_and_api_calls(server, url)
    assert server.stop() == 0  # the final flush is done by then
    assert audit.exists() and audit.read_text() == ""


def _verdict() -> Verdict:
    return Verdict(EquipmentStatus.BLACKLISTED, Match.IMEI_IMSI,
                   f"IMEI 35209900176148 with IMSI {PAIRED_IMSI} is blacklisted", "x.csv:2")


def test_audit_sampling_and_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, sample=0.25)
    audit._random = random.Random(7).random  # a fixed draw sequence
    draws = random.Random(7)
    expected = sum(draws.random() < 0.25 for _ in range(1000))
    for _ in range(1000):
        audit.record(b"mme.test", "35209900176148", PAIRED_IMSI, _verdict(), "000001")
    assert audit.flush() == expected and 200 < expected < 300
    assert audit.written == expected

    audit.sample = 1.0
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate's move
    audit.record(b"mme.test", "35209900176148", None, _verdict(), "000001")
    assert audit.flush() == 1
    audit.close()
    record = json.loads(path.read_text())
    assert record["imsi"] is None and record["status"] == "BLACKLISTED"
    assert len((tmp_path / "audit.jsonl.1").read_text().splitlines()) == expected


def test_audit_drops_and_counts_beyond_its_bound(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", max_pending=10)
    for _ in range(25):
        audit.record(b"mme.test", "35209900176148", PAIRED_IMSI, _verdict(), "000001")
    assert audit.dropped == 15 and audit.flush() == 10
    audit.close()


def test_masking_and_redaction():
    assert mask_imsi("001010123456789") == "00101******6789"
    assert mask_imsi("00101012345") == "00101**2345"
    assert mask_imsi("001012") == "001***"
    assert redact(f"IMEI 1 with IMSI {PAIRED_IMSI} is blacklisted") == (
        "IMEI 1 with IMSI 00101******6789 is blacklisted")
    assert redact(f"GET /v1/equipment/3520?imsi={PAIRED_IMSI} 200") == (
        "GET /v1/equipment/3520?imsi=00101******6789 200")
    assert redact(f"User-Name: '{TOO_LONG_IMSI}' is not an IMSI") == (
        "User-Name: '00101*******7890' is not an IMSI")
    assert redact(f'{{"imsi": "{PAIRED_IMSI}"}}') == '{"imsi": "00101******6789"}'
    assert redact("IMSI 00101******6789") == "IMSI 00101******6789"  # masked once only
    # IMEIs, versions and counts stay readable.
    assert redact("IMEI 35209900176148 version 000001, 3 IMSIs") == (
        "IMEI 35209900176148 version 000001, 3 IMSIs")


def test_formatters_mask_whatever_the_message_and_keep_exceptions():
    try:
        raise ValueError(f"imsi {PAIRED_IMSI} broke it")
    except ValueError:
        record = logging.LogRecord("eir.test", logging.ERROR, __file__, 1,
                                   "with IMSI %s", (PAIRED_IMSI,), sys.exc_info())
    document = json.loads(JsonFormatter().format(record))
    assert document["message"] == "with IMSI 00101******6789"
    assert "ValueError: imsi 00101******6789 broke it" in document["exception"]
    text = TextFormatter().format(record)
    assert PAIRED_IMSI not in text and "eir.test: with IMSI 00101******6789" in text
    assert PAIRED_IMSI in TextFormatter(show_imsi=True).format(record)


def test_an_unwritable_audit_path_stops_the_start_up(tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text(f"audit:\n  enabled: true\n  path: {tmp_path / 'missing' / 'a.jsonl'}\n")
    result = run_eir("serve", "--config", str(config), "--listen", "127.0.0.1:0", "--list",
                     str(EXAMPLE_LIST), cwd=tmp_path)
    assert result.returncode == 2
    assert "audit.path" in result.stderr and "No such file or directory" in result.stderr


def test_repository_config_documents_the_operations_keys():
    text = (ROOT / "config" / "eir.yaml").read_text()
    for key in ("metrics:", "api:", "audit:", "format: text", "show_imsi: false",
                "clone_threshold: 2"):
        assert key in text, key
