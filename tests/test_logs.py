"""Logs and audit (eir.core.logs): JSON logs from a live server, no API token and no full IMSI in
its log or audit file unless logging.show_imsi, audit records with reason and source, sampled
or all, and an audit file rotated under a running writer."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers_ops import API_LINE, TOKEN, authorised, endpoint, wait_until
from helpers_process import EXAMPLE_LIST, ROOT, LoggedProcess, run_eir
from helpers_wire import (ConnectionClosed, cer, ecr, open_peer, parse_answer,
                          read_message)
from scapy.all import raw
from scapy.contrib.diameter import AVP, DiamG

from eir.core.decision import EquipmentStatus, Match, Verdict
from eir.core.logs import (AuditLog, JsonFormatter, LogRateLimit, TextFormatter, mask_imsi, redact,
                      untrusted)

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


# -- strings a peer chose, and how much a peer can make us write ------------------------------

FORGED = "2026-01-01 00:00:00,000 CRITICAL eir.server: FORGED"
# A forged line, then what a terminal or a viewer would obey: escape sequences, a carriage
# return, C1 NEL, the Unicode line separator, a right-to-left override.
HOSTILE = "\n" + FORGED + "\x1b[2J\r\x85\u2028\u202e"
UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
TEXT_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ eir[.\w]*: ")
# 4 labels of 63 characters: the longest FQDN (RFC 1035), so a valid DiameterIdentity.
LONGEST_HOST = ".".join(["a" * 62 + str(n) for n in range(4)])


def _application_unsupported(number: int) -> bytes:
    """A bare 20-byte request of an application we do not serve: answered 3007 and logged."""
    return bytes([1, 0, 0, 20, 0x80, 0, 1, 0x44]) + (999).to_bytes(4, "big") + \
        number.to_bytes(4, "big") * 2


def _cer_without_realm(host: str) -> bytes:
    return raw(DiamG(drFlags=0x80, drCode=257, drAppId=0, drHbHId=1, drEtEId=1,
                     avpList=[AVP("Origin-Host", val=host)]))


def _send_hostile_strings(address: tuple[str, int]) -> None:
    """A CER whose Origin-Host and Origin-Realm hold HOSTILE (answered whatever way), then,
    on an open connection, an ECR whose Session-Id and IMEI hold it (answered 5004)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(cer(host="mme.test" + HOSTILE, realm="test" + HOSTILE)
                     + _application_unsupported(1))
        try:  # 2001 then 3007 where the Origin-Host passes, a refusal and a close where not
            read_message(sock), read_message(sock)
        except ConnectionClosed:
            pass
    with open_peer(address) as sock:
        sock.sendall(ecr("3520990017614" + HOSTILE, None, session_id="mme.test;1" + HOSTILE))
        assert parse_answer(read_message(sock)).result_code == 5004


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_peer_strings_cannot_forge_log_lines(eir_server, tmp_path, log_format):
    """Whatever a peer puts in Origin-Host, Origin-Realm, Session-Id or IMEI, every line the
    server writes is one record of its own, with no control character in it: the peer's
    newline, escape sequences and bidirectional overrides are shown escaped."""
    if log_format == "json":
        server, port = start_json_server(tmp_path)
        address = ("127.0.0.1", port)
    else:
        server = eir_server()
        address = server.address
    try:
        _send_hostile_strings(address)
        server.wait_for_line(r"5004")
        assert server.stop() == 0
    finally:
        server.kill()
    log = server.log()
    if log_format == "json":
        texts = [json.loads(line)["message"] for line in server.lines]
    else:
        assert all(TEXT_RECORD.match(line) for line in server.lines), log
        texts = server.lines
    assert not any(UNSHOWABLE.search(text) for text in texts), log
    shown = [text for text in texts if "FORGED" in text]  # shown escaped, not dropped
    assert shown and all("\\n2026-01-01" in text and "\\x1b[2J" in text and "\\u202e" in text
                         for text in shown), shown


def _log_flood(address: tuple[str, int], host: str, requests: int) -> int:
    """What a hostile peer sends to make the server log: connection churn (connections that
    say nothing, CERs, CERs refused), ECRs with long bad IMEIs (their error quotes the value),
    and `requests` bare requests that are each answered 3007, on a connection opened with a
    long Origin-Host that each of their log lines would repeat. The bytes sent."""
    sent = 0
    for number in range(50):
        socket.create_connection(address, timeout=5).close()
        with socket.create_connection(address, timeout=5) as sock:
            request = cer(host=host) if number % 2 else _cer_without_realm(host)  # 5005
            sock.sendall(request)
            sent += len(request)
            read_message(sock)
    with socket.create_connection(address, timeout=5) as sock:
        request = cer(host=host)
        sock.sendall(request)
        sent += len(request)
        assert parse_answer(read_message(sock)).result_code == 2001
        for number in range(50):
            request = ecr("1" * 2000, None, hop_by_hop=number, end_to_end=number)
            sock.sendall(request)
            sent += len(request)
            assert parse_answer(read_message(sock)).result_code == 5004
        batch = 250
        for start in range(0, requests, batch):
            data = b"".join(_application_unsupported(start + n) for n in range(batch))
            sock.sendall(data)
            sent += len(data)
            for _ in range(batch):
                read_message(sock)
    return sent


def test_log_bytes_per_request_byte_stay_below_one_under_a_flood(eir_server, tmp_path):
    """A peer that sends what makes the server log (see _log_flood) gets its lines
    rate-limited (logging.rate_limit) and its values cut (logging.max_value_chars): the
    server writes less than one log byte per byte received, and says how many lines it
    suppressed. Before, it wrote ~10 (each 20-byte request logged with the 255-character
    Origin-Host). To measure a checkout without logging.rate_limit, copy this file there
    and run with EIR_LOG_FLOOD_BEFORE=1 (the figure only, printed with -s);
    EIR_LOG_FLOOD_HOST_CHARS=60000 floods with a 60 KB Origin-Host instead."""
    host_chars = int(os.environ.get("EIR_LOG_FLOOD_HOST_CHARS", len(LONGEST_HOST)))
    host = LONGEST_HOST if host_chars == len(LONGEST_HOST) else "h" * host_chars
    if os.environ.get("EIR_LOG_FLOOD_BEFORE") == "1":
        server = eir_server()
        start = len(server.lines)
        sent = _log_flood(server.address, host, requests=5000)
        assert server.stop() == 0
        written = sum(len(line.encode()) + 1 for line in server.lines[start:])
        print(f"log bytes per request byte: {written / sent:.3f} ({written} / {sent})")
        return
    config = tmp_path / "eir.yaml"
    config.write_text("logging:\n  rate_limit:\n    lines: 20\n    interval_seconds: 1\n")
    server = eir_server("--config", str(config))
    start = len(server.lines)
    sent = _log_flood(server.address, host, requests=5000)

    def suppressed():  # each window's count comes at its end (within two intervals)
        counts = [int(m.group(1)) for m in re.finditer(r"(\d+) similar line\(s\) suppressed",
                                                        "\n".join(server.lines[start:]))]
        return sum(counts) >= 4500  # of the 5,000 lines answering 3007
    wait_until(suppressed, "lines counting the suppressed lines")
    assert server.stop() == 0
    written = sum(len(line.encode()) + 1 for line in server.lines[start:])
    print(f"log bytes per request byte: {written / sent:.3f} ({written} / {sent})")
    assert written <= sent, f"{written} log bytes for {sent} bytes received"
    assert not any(len(line) > 1000 for line in server.lines), "a value was not cut"


def test_untrusted_escapes_and_cuts_and_masking_still_works():
    assert untrusted("mme.test") == "mme.test"
    assert untrusted(HOSTILE) == ("\\n" + FORGED + "\\x1b[2J\\r\\x85\\u2028\\u202e")
    assert untrusted(b"mme\xff\x00") == "mme\\xff\\x00"  # bytes that are not UTF-8: shown
    assert untrusted("h" * 300, 256) == "h" * 256 + "...[44 more chars]"
    # Escapes count towards the limit; an escape is never cut in two.
    assert untrusted("\x1b" * 100, 18) == "\\x1b" * 4 + "...[96 more chars]"
    assert redact(untrusted(f"imsi=\x1b{PAIRED_IMSI}")) == "imsi=\\x1b00101******6789"
    # The formatters do the same to whole messages, whoever wrote them.
    record = logging.LogRecord("eir.test", logging.INFO, __file__, 1, "%s", ("m" * 10_000,),
                               None)
    assert TextFormatter(max_message_chars=300).format(record).endswith(
        "m" * 300 + "...[9700 more chars]")
    assert redact(untrusted(f"User-Name: '\u2028{PAIRED_IMSI}'")) == (
        "User-Name: '\\u202800101******6789'")


def test_the_audit_shows_peer_values_escaped_and_cut(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.record(("mme.test" + HOSTILE).encode() * 100, "35209900176148", PAIRED_IMSI,
                 _verdict(), "000001")
    audit.close()
    [line] = path.read_text().splitlines()
    record = json.loads(line)
    assert not UNSHOWABLE.search(record["origin_host"])
    assert record["origin_host"].startswith("mme.test\\n2026-01-01")
    assert re.search(r"\.\.\.\[\d+ more chars\]$", record["origin_host"])
    assert len(record["origin_host"]) < 300


def test_the_rate_limit_counts_what_it_suppresses_and_tracks_few_keys():
    limit = LogRateLimit(lines=3, interval=10.0, max_keys=4)
    kind = ("eir.server", "%s: %s", logging.INFO)
    admitted = [limit.admit(("10.0.0.1", *kind), 0.0, lambda: "first") for _ in range(10)]
    assert admitted == [True] * 3 + [False] * 7 and not limit.reports
    assert limit.admit(("10.0.0.1", *kind), 10.0)  # a new window: the count is reported
    assert limit.reports == [(("10.0.0.1", *kind), 7, "first")]
    # A peer changing addresses: past max_keys, the new ones share one key and one limit.
    admitted = sum(limit.admit((f"10.1.{n // 256}.{n % 256}", *kind), 11.0)
                   for n in range(10_000))
    assert len(limit._windows) == 5  # 4, and the one the others share
    assert admitted == 3 + 3  # one line each from the 3 that fit, 3 from all the others
    limit.sweep(21.0)
    assert (LogRateLimit.OTHER_PEERS, 10_000 - 3 - 3, "") in limit.reports
    assert not limit._windows and not limit.suppressing


def test_json_logs_carry_the_worker_and_the_peer_as_fields(tmp_path):
    """A worker's line about a peer: `worker` and `peer` are fields of their own, and the
    message no longer starts with "worker N: " (the text format keeps that prefix)."""
    server, port = start_json_server(tmp_path, "--workers", "2")
    try:
        sock = open_peer(("127.0.0.1", port))
        sock.close()
        server.wait_for_line(r"peer closed the connection")
        assert server.stop() == 0
    finally:
        server.kill()
    records = [json.loads(line) for line in server.lines]
    connection = next(record for record in records
                      if "connection from 127.0.0.1" in record["message"])
    assert connection["peer"] == "127.0.0.1"
    assert isinstance(connection["worker"], int)
    assert not any(re.match(r"worker \d+: ", record["message"]) for record in records)
    stopped = [record for record in records if record["message"] == "stopped"]
    assert {record.get("worker") for record in stopped[:-1]} == {0, 1}
    assert "worker" not in stopped[-1]  # the supervisor's, which waits for its workers


def test_text_logs_start_a_workers_lines_with_its_number():
    record = logging.LogRecord("eir.server", logging.INFO, __file__, 1, "connection from %s",
                               ("127.0.0.1",), None)
    record.worker = 2
    assert TextFormatter().format(record).endswith(
        "INFO eir.server: worker 2: connection from 127.0.0.1")


def test_start_up_names_the_configuration_file_once(eir_server, tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text("logging:\n  level: info\n")
    server = eir_server("--config", str(config), "--workers", "2")
    server.wait_for_log(rf"eir\.cli: configuration: {re.escape(str(config))}$")
    server.wait_for_log(r"open EIR .* serving as")  # after every worker is ready
    assert len(re.findall(r"eir\.cli: configuration: ", server.log())) == 1
