"""Observations in PostgreSQL (`observations.url`), for several `eir serve` nodes sharing one
database: against a real server from Debian's `postgresql` package, started here in a
temporary directory (initdb + pg_ctl, as an unprivileged user when run as root, listening on
127.0.0.1 only, trust authentication) and stopped at the end of the module.

Two nodes flushing the same records store each distinct (date, imei, imsi) once; flushes of
the same keys in opposite orders do not deadlock; the dump, the clone report and the
grandfathering index read from PostgreSQL exactly what they read from SQLite for the same
records; real `eir serve` nodes record their checks there; an unreachable server is a
counted write error, not an outage."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from itertools import count
from pathlib import Path

import psycopg
import pytest
import yaml

from eir.check.observations import GrandfatherIndex, ObservationLog, backend
from helpers_process import ROOT
from helpers_process import eir_ok as run_eir
from helpers_wire import check_all

DAY, NEXT_DAY = 20240501, 20240502
PHONE_A, PHONE_B, PHONE_C = "35123400000017", "35123400000025", "35123400000033"
IMSI_1, IMSI_2, IMSI_3 = "510100000000001", "510100000000002", "510100000000003"
MSISDN_1 = "6281100000001"
KEY = "lab-share-2024"
# (day, imei, imsi): A with two IMSIs (one seen twice) and B without IMSI on DAY; on NEXT_DAY
# A with a third IMSI, B with two, C with one; C with another the day before DAY.
RECORDS = [(DAY, PHONE_A, IMSI_2), (DAY, PHONE_A, IMSI_1), (DAY, PHONE_B, None),
           (DAY, PHONE_A, IMSI_1), (NEXT_DAY, PHONE_A, IMSI_3), (NEXT_DAY, PHONE_B, IMSI_1),
           (NEXT_DAY, PHONE_B, IMSI_2), (NEXT_DAY, PHONE_C, IMSI_1), (DAY - 1, PHONE_C, IMSI_2)]
BLACKLISTED_IMEI = "35209900176148"  # config/lists/example.csv
UNKNOWN_IMEI = "35123400000017"
SERVER_START_SECONDS = 30


# -- a throw-away PostgreSQL server ---------------------------------------------------------

def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/VERSION/bin holding initdb and pg_ctl."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


def unprivileged_prefix(directory: Path) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user
    (else `nobody`) through runuser, owning `directory`; otherwise as ourselves."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = pwd.getpwnam("nobody")
    os.chown(directory, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", user.pw_name, "--"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list, timeout: float = SERVER_START_SECONDS) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout}" \
                                   f"{result.stderr}"


@pytest.fixture(scope="module")
def postgres():
    """A running PostgreSQL server: the URL of its `postgres` database (superuser `eir`)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package `postgresql`, "
                    "which scripts/test.sh installs): no /usr/lib/postgresql/*/bin/initdb")
    directory = Path(tempfile.mkdtemp(prefix="eir-postgres-"))  # 0700, not under root's tmp
    prefix = unprivileged_prefix(directory)
    data, port = directory / "data", free_port()
    run(prefix + [bindir / "initdb", "-D", data, "-U", "eir", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync"])
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off")
    try:
        # -w: pg_ctl returns once the server accepts connections (bounded by -t).
        run(prefix + [bindir / "pg_ctl", "-D", data, "-l", directory / "server.log",
                      "-o", options, "-w", "-t", str(SERVER_START_SECONDS), "start"])
        run([bindir / "pg_isready", "-h", "127.0.0.1", "-p", str(port), "-t", "10"])
        yield f"postgresql://eir@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=SERVER_START_SECONDS)
        shutil.rmtree(directory, ignore_errors=True)


_databases = count(1)


@pytest.fixture
def database_url(postgres) -> str:
    """A fresh, empty database on the server, for one test."""
    name = f"eir_test_{next(_databases)}"
    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres.rpartition("/")[0] + "/" + name


# -- helpers --------------------------------------------------------------------------------

def stored_rows(url: str) -> list[tuple]:
    """Every row of the observations table, duplicates kept; [] while it does not exist."""
    with psycopg.connect(url) as connection:
        if connection.execute("SELECT to_regclass('observations')").fetchone()[0] is None:
            return []
        return connection.execute(
            "SELECT date, imei, imsi, msisdn FROM observations").fetchall()


def wait_for_rows(url: str, expected: int, timeout: float = 10.0) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while len(rows := stored_rows(url)) < expected:
        assert time.monotonic() < deadline, f"{len(rows)} of {expected} rows: {rows}"
        time.sleep(0.05)  # polling interval of a bounded loop, not a synchronisation
    return rows


def record_all(location, records, msisdns=None) -> ObservationLog:
    """An ObservationLog (one node) on `location` with `records` recorded, not flushed."""
    log = ObservationLog(location, msisdns=msisdns)
    for day, imei, imsi in records:
        log.record(day, imei, imsi)
    return log


def flush_together(*logs: ObservationLog) -> None:
    """Flush every log from its own thread, all released at once."""
    barrier = threading.Barrier(len(logs))
    errors = []

    def flush(log):
        barrier.wait(10)
        try:
            log.flush()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=flush, args=(log,)) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and not any(thread.is_alive() for thread in threads)


def expected_rows(records, msisdns) -> set[tuple]:
    return {(day, imei, imsi or "", msisdns.get(imsi, "") if imsi else "")
            for day, imei, imsi in records}


def write_config(directory: Path, **observations) -> Path:
    path = directory / "eir.yaml"
    path.write_text(yaml.safe_dump({"observations": observations}), encoding="utf-8")
    return path


def same_records_in_both(tmp_path: Path, url: str, **settings) -> tuple[Path, Path]:
    """RECORDS stored in an SQLite file and (by two nodes, half each) in PostgreSQL; the
    configs of the two."""
    msisdns = {IMSI_1: MSISDN_1}
    record_all(tmp_path / "obs.sqlite", RECORDS, msisdns).close()
    for half in (RECORDS[::2], RECORDS[1::2]):
        record_all(url, half, msisdns).close()
    (tmp_path / "sqlite").mkdir()
    (tmp_path / "postgres").mkdir()
    return (write_config(tmp_path / "sqlite", database=str(tmp_path / "obs.sqlite"),
                         **settings),
            write_config(tmp_path / "postgres", url=url, **settings))




def today_number() -> int:
    today = date.today()
    return today.year * 10000 + today.month * 100 + today.day


# -- several nodes, one database ------------------------------------------------------------

def test_two_nodes_flushing_at_once_store_one_row_per_distinct_combination(database_url):
    msisdns = {IMSI_1: MSISDN_1}
    shared = [(DAY, f"3512340{n:07d}", IMSI_1) for n in range(2000)]
    node_a = shared + [(DAY, PHONE_A, IMSI_2), (NEXT_DAY, PHONE_A, IMSI_2), (DAY, PHONE_B, None)]
    node_b = shared + [(DAY, PHONE_A, IMSI_3), (NEXT_DAY, PHONE_A, IMSI_2), (DAY, PHONE_B, None)]
    logs = [record_all(database_url, node_a, msisdns), record_all(database_url, node_b, msisdns)]
    flush_together(*logs)
    assert [(log.written, log.flush_errors, log.pending) for log in logs] == [
        (len(node_a), 0, 0), (len(node_b), 0, 0)]
    rows = stored_rows(database_url)
    assert len(rows) == len(set(rows))
    assert set(rows) == expected_rows(node_a + node_b, msisdns)


def test_flushes_of_the_same_keys_in_opposite_orders_do_not_deadlock(database_url):
    """Each node's set iterates in its own order; rows are inserted in key order, so two
    transactions never wait on each other's keys in a cycle (PostgreSQL would abort one
    with "deadlock detected")."""
    rows = [(DAY, f"3512340{n:07d}", IMSI_1, "", 1) for n in range(20000)]
    store = backend(database_url)
    connections = [store.connect(), store.connect()]
    try:
        for _ in range(3):
            barrier, errors = threading.Barrier(2), []

            def insert(connection, batch):
                barrier.wait(10)
                try:
                    store.insert(connection, batch)
                except psycopg.Error as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=insert, args=(connections[0], rows)),
                       threading.Thread(target=insert, args=(connections[1], rows[::-1]))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert errors == []
            rows = [(day + 1, *rest) for day, *rest in rows]
    finally:
        for connection in connections:
            connection.close()
    assert len(stored_rows(database_url)) == 3 * 20000


# -- the same answers as SQLite -------------------------------------------------------------

@pytest.mark.parametrize("day", [DAY, NEXT_DAY, 20240601])
def test_dump_from_postgres_matches_the_dump_from_sqlite(tmp_path, database_url, day):
    sqlite_config, postgres_config = same_records_in_both(tmp_path, database_url)
    from_postgres = run_eir("dump", "--date", str(day), "--config", str(postgres_config))
    assert from_postgres == run_eir("dump", "--date", str(day), "--config", str(sqlite_config))
    assert from_postgres.startswith("date,imei,imsi,msisdn,rat\n")


def test_pseudonymised_dump_from_postgres_matches_sqlite(tmp_path, database_url):
    sqlite_config, postgres_config = same_records_in_both(
        tmp_path, database_url, pseudonymise_key=KEY)
    from_postgres = run_eir("dump", "--date", str(DAY), "--config", str(postgres_config))
    assert from_postgres == run_eir("dump", "--date", str(DAY), "--config", str(sqlite_config))
    assert len(from_postgres.splitlines()) == 4 and IMSI_1 not in from_postgres


def test_clones_report_from_postgres_matches_sqlite(tmp_path, database_url):
    sqlite_config, postgres_config = same_records_in_both(tmp_path, database_url)
    for since in ("2024-04-30", "2024-05-01"):
        arguments = ("report", "clones", "--since", since, "--json", "--config")
        from_postgres = json.loads(run_eir(*arguments, str(postgres_config)))
        assert from_postgres == json.loads(run_eir(*arguments, str(sqlite_config)))
        assert from_postgres[0] == {"imei": PHONE_A, "imsis": 3, "first_seen": "2024-05-01",
                                    "last_seen": "2024-05-02",
                                    "imsi_list": ["51010******0001", "51010******0002",
                                                  "51010******0003"]}


def test_grandfathering_index_builds_from_postgres(tmp_path, database_url):
    same_records_in_both(tmp_path, database_url)
    from_sqlite, from_postgres = GrandfatherIndex(date(2024, 5, 2)), \
        GrandfatherIndex(date(2024, 5, 2))
    assert from_sqlite.load(tmp_path / "obs.sqlite") == from_postgres.load(database_url) == 3
    for _, imei, imsi in RECORDS:
        assert from_postgres.first_seen_before_cutoff(imei, imsi) == \
            from_sqlite.first_seen_before_cutoff(imei, imsi)
    assert from_postgres.first_seen_before_cutoff(PHONE_C, IMSI_2) == DAY - 1
    assert from_postgres.first_seen_before_cutoff(PHONE_B, IMSI_1) is None  # on NEXT_DAY
    assert from_postgres.loaded_from == database_url


# -- eir serve ------------------------------------------------------------------------------

def test_two_serve_nodes_record_their_checks_in_one_database(eir_server, tmp_path,
                                                             database_url):
    config = write_config(tmp_path, url=database_url, flush_seconds=0.2)
    nodes = [eir_server("--config", str(config)), eir_server("--config", str(config))]
    for node in nodes:
        node.wait_for_log(r"observations: recording to postgresql://eir@127\.0\.0\.1:\d+/"
                          r"eir_test_\d+, flushed every 0\.2 s")
    pairs = [(BLACKLISTED_IMEI, IMSI_1), (BLACKLISTED_IMEI, IMSI_2), (UNKNOWN_IMEI, None),
             (BLACKLISTED_IMEI, IMSI_1)]
    for node in nodes:
        answers = check_all(node.address, pairs)
        assert [a.equipment_status for a in answers] == [1, 1, None, 1]
    day = today_number()
    expected = {(day, BLACKLISTED_IMEI, IMSI_1, ""), (day, BLACKLISTED_IMEI, IMSI_2, ""),
                (day, UNKNOWN_IMEI, "", "")}
    assert set(wait_for_rows(database_url, len(expected))) == expected
    for node in nodes:
        assert node.stop(signal.SIGTERM) == 0
        # 3 distinct records; the repeated check folds into the first when both fall in one
        # flush interval, else it is written again and ignored by the database (INSERT … ON
        # CONFLICT DO NOTHING): 4. The rows stored are checked below either way.
        node.wait_for_log(r"final flush done: [34] written, 0 dropped, 0 failed "
                          r"flush\(es\), 0 pending")
    assert sorted(stored_rows(database_url)) == sorted(expected)


def test_unreachable_server_is_a_counted_write_error_and_checks_go_on(eir_server, tmp_path):
    url = f"postgresql://eir:secret@127.0.0.1:{free_port()}/eir"  # nothing listens there
    config = write_config(tmp_path, url=url, flush_seconds=0.2)
    server = eir_server("--config", str(config))
    failure = server.wait_for_log(r"observations: cannot write 0 record\(s\) to "
                                  r"(postgresql://\S+): connection failed: .*; kept for the "
                                  r"next flush$")
    assert failure.group(1).startswith("postgresql://eir:***@127.0.0.1:")
    [answer] = check_all(server.address, [(BLACKLISTED_IMEI, IMSI_1)])
    assert answer.equipment_status == 1
    assert server.stop(signal.SIGTERM) == 0
    final = server.wait_for_log(r"final flush done: 0 written, 0 dropped, (\d+) failed "
                                r"flush\(es\), 1 pending")
    assert int(final.group(1)) >= 2  # the connection at start-up and the final flush
    assert "secret" not in server.log()


def test_dump_from_a_database_without_observations_is_refused(tmp_path, database_url):
    environment = dict(os.environ)
    environment.pop("EIR_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "eir", "dump", "--date", str(DAY),
         "--config", str(write_config(tmp_path, url=database_url))],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert f"{database_url}: no observations table" in result.stderr
    assert stored_rows(database_url) == []  # reading created nothing
