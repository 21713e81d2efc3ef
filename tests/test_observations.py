"""Observations recorded by a real `eir serve`: every check lands in SQLite, one row per
(date, imei, imsi) per day, with the MSISDN from the msisdn file; a crash (kill -9) loses
nothing that was flushed, and flushes come every flush_seconds; a write error (file size
limit: the disk is full for this process) is counted while the server keeps answering."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import yaml

from helpers_wire import open_peer, ecr, parse_answer, read_message
from helpers_wire import check_all

BLACKLISTED_IMEI = "35209900176148"  # config/lists/example.csv
GREYLISTED_IMEI = "35332106470089"
UNKNOWN_IMEI = "35123400000017"
IMSI_A, IMSI_B = "001010000000001", "001010000000002"
MSISDN_A = "6281100000001"


# -- helpers --------------------------------------------------------------------------------

def write_config(directory: Path, **observations) -> Path:
    """A config whose observations go to directory/obs.sqlite (plus `observations`)."""
    settings = {"database": str(directory / "obs.sqlite"), **observations}
    path = directory / "eir.yaml"
    path.write_text(yaml.safe_dump({"observations": settings}), encoding="utf-8")
    return path



def check_many(address, imeis: list[str], imsi: str) -> list[bytes]:
    """One ECR per IMEI, pipelined on one connection: a scapy-encoded ECR with the IMEI
    substituted (same length), so thousands take well under a second. The raw answers."""
    template = ecr(UNKNOWN_IMEI, imsi)
    sock = open_peer(address)
    try:
        sock.sendall(b"".join(template.replace(UNKNOWN_IMEI.encode(), imei.encode())
                              for imei in imeis))
        return [read_message(sock) for _ in imeis]
    finally:
        sock.close()


def stored_rows(database: Path) -> set[tuple]:
    """Every row of the observations table; empty while the database or table is missing."""
    if not database.exists():
        return set()
    connection = sqlite3.connect(database, timeout=5)
    try:
        return set(connection.execute("SELECT date, imei, imsi, msisdn FROM observations"))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return set()
        raise
    finally:
        connection.close()


def wait_for_rows(database: Path, count: int, timeout: float = 10.0) -> tuple[set, float]:
    """Poll (bounded) until the table holds `count` rows; (rows, seconds waited)."""
    started = time.monotonic()
    while True:
        rows = stored_rows(database)
        waited = time.monotonic() - started
        if len(rows) >= count:
            return rows, waited
        assert waited < timeout, f"{len(rows)} of {count} rows after {timeout}s: {rows}"
        time.sleep(0.02)  # polling interval of a bounded loop, not a synchronisation


def today_number() -> int:
    now = time.localtime()
    return now.tm_year * 10000 + now.tm_mon * 100 + now.tm_mday


def distinct_imeis(count: int) -> list[str]:
    return [f"3512340{n:07d}" for n in range(count)]


# -- tests ----------------------------------------------------------------------------------

def test_each_check_is_stored_once_per_day_and_pair_with_its_msisdn(eir_server, tmp_path):
    msisdns = tmp_path / "msisdn.csv"
    msisdns.write_text(f"imsi,msisdn\n{IMSI_A},{MSISDN_A}\n", encoding="utf-8")
    config = write_config(tmp_path, flush_seconds=0.2, msisdn_file=str(msisdns))
    server = eir_server("--config", str(config))
    answers = check_all(server.address, [
        (BLACKLISTED_IMEI, IMSI_A), (BLACKLISTED_IMEI, IMSI_A), (BLACKLISTED_IMEI, IMSI_B),
        (GREYLISTED_IMEI, None), (UNKNOWN_IMEI, IMSI_B), (BLACKLISTED_IMEI, IMSI_A)])
    assert [a.equipment_status for a in answers] == [1, 1, 1, 2, None, 1]
    assert answers[4].experimental_result_code == 5422
    day = today_number()
    expected = {(day, BLACKLISTED_IMEI, IMSI_A, MSISDN_A), (day, BLACKLISTED_IMEI, IMSI_B, ""),
                (day, GREYLISTED_IMEI, "", ""), (day, UNKNOWN_IMEI, IMSI_B, "")}
    rows, _ = wait_for_rows(tmp_path / "obs.sqlite", len(expected))
    assert rows == expected
    check_all(server.address, [(BLACKLISTED_IMEI, IMSI_A)])  # seen again: still one row
    assert server.stop() == 0
    assert stored_rows(tmp_path / "obs.sqlite") == expected


def test_shutdown_flushes_what_is_pending(eir_server, tmp_path):
    config = write_config(tmp_path, flush_seconds=3600)
    server = eir_server("--config", str(config))
    server.wait_for_log(r"observations: recording to .*obs\.sqlite")
    check_all(server.address, [(UNKNOWN_IMEI, IMSI_A)])
    assert stored_rows(tmp_path / "obs.sqlite") == set()  # not flushed yet
    assert server.stop(signal.SIGTERM) == 0
    assert stored_rows(tmp_path / "obs.sqlite") == {(today_number(), UNKNOWN_IMEI, IMSI_A, "")}
    server.wait_for_log(r"final flush done: 1 written, 0 dropped, 0 failed flush\(es\), "
                        r"0 pending")


def test_kill_9_loses_nothing_once_flush_seconds_have_passed(eir_server, tmp_path):
    """The documented bound: a check is in the database within flush_seconds (0.2 here, plus
    one write), and what is there survives kill -9."""
    config = write_config(tmp_path, flush_seconds=0.2)
    server = eir_server("--config", str(config))
    imeis = distinct_imeis(300)
    check_many(server.address, imeis, IMSI_A)
    _, waited = wait_for_rows(tmp_path / "obs.sqlite", len(imeis))
    assert waited < 5.0
    server.process.send_signal(signal.SIGKILL)
    assert server.process.wait(10) == -signal.SIGKILL
    rows = stored_rows(tmp_path / "obs.sqlite")
    assert {imei for _, imei, _, _ in rows} == set(imeis)


def test_database_defaults_to_the_current_directory(eir_server, tmp_path):
    server = eir_server(cwd=tmp_path)  # no config file there: every default
    check_all(server.address, [(UNKNOWN_IMEI, IMSI_B)])
    rows, _ = wait_for_rows(tmp_path / "observations.sqlite", 1)
    assert rows == {(today_number(), UNKNOWN_IMEI, IMSI_B, "")}


def test_write_error_is_counted_and_the_server_keeps_answering(eir_server, tmp_path):
    """The server runs under a 64 KiB file size limit (RLIMIT_FSIZE: writes past it fail
    with EFBIG as on a full disk; Python ignores SIGXFSZ). The database is created within
    the limit; a flush of thousands of rows cannot fit, nor can any retry of them."""
    config = write_config(tmp_path, flush_seconds=1.0)
    server = eir_server("--config", str(config), prefix=("prlimit", "--fsize=65536"))
    server.wait_for_log(r"observations: recording to")
    imeis = distinct_imeis(3000)
    answers = check_many(server.address, imeis, IMSI_A)
    assert parse_answer(answers[-1]).experimental_result_code == 5422
    server.wait_for_log(r"observations: cannot write \d+ record\(s\) to .*obs\.sqlite: .*"
                        r"\(1 failed flush\(es\) so far, \d+ pending, 0 dropped\); kept")
    [answer] = check_all(server.address, [(BLACKLISTED_IMEI, IMSI_A)])
    assert answer.equipment_status == 1
    assert server.stop(signal.SIGTERM) == 0
    final = server.wait_for_log(r"final flush done: (\d+) written, 0 dropped, (\d+) failed "
                                r"flush\(es\), (\d+) pending")
    written, failed, pending = (int(n) for n in final.groups())
    assert failed >= 2  # the periodic flushes after the first failure, and the final one
    assert pending > 0 and written + pending == len(imeis) + 1  # kept, none lost or dropped
    assert len(stored_rows(tmp_path / "obs.sqlite")) == written
