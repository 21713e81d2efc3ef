"""Observations: which IMEI was used with which IMSI on which day.

They feed the registry's operator data dump (`eir dump --date D`: `date,imei,imsi,msisdn`),
the clone report (`eir report clones`) and grandfathering (an IMEI+IMSI pair seen before the
cut-off date keeps working, see `GrandfatherIndex`).

Recording is on the hot path, so `ObservationLog.record` only adds a string to a set: no
I/O, no lock (a few hundred nanoseconds; `python3 bench/observations.py` prints the figure). A
writer thread flushes the set every `flush_seconds` in one transaction, one row per distinct
(date, imei, imsi) per day (INSERT ... ON CONFLICT DO NOTHING on that primary key); the
MSISDN is looked up at flush time in the optional `imsi,msisdn` file.

Storage (`Backend`): SQLite in WAL mode, synchronous=NORMAL (embedded default, one node), or
PostgreSQL (`observations.url: postgresql://...`) for several `eir serve` nodes writing to
one database: same table, same statements (only the placeholder style differs), a flush
COPYs into a temporary table and inserts from it in key order, so concurrent flushes of the
same record by two nodes store it once and cannot deadlock (see `PostgresBackend`).

Crash bound: a check is in the database at most `flush_seconds` (plus the time one write
takes) after it was answered, so a crash of the process (kill -9) loses at most the last
`flush_seconds` of observations; a committed flush survives it (WAL). A power loss may also
lose the last commits before the next WAL checkpoint (synchronous=NORMAL does not fsync
every commit). With PostgreSQL a committed flush is as durable as the server makes it.

Memory is bounded: past `max_pending` distinct pending records, new ones are dropped and
counted, never waited for. A write error (disk full, database unwritable) is logged and
counted; the records stay pending for the next flush (up to the same bound) and the server
keeps answering.

Pseudonymised dumps replace IMSIs and MSISDNs with HMAC-SHA256(key, value) as hex,
truncated to 32 hex digits (128 bits): stable for one key, so the same subscriber keeps the
same pseudonym across days, and not reversible without the key.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import hmac
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from eir.core.decision import day_number

log = logging.getLogger("eir.observations")

DEFAULT_DATABASE_NAME = "observations.sqlite"
MAX_PENDING = 1_000_000
PSEUDONYM_HEX_DIGITS = 32
# Pairs first seen since the index was built are kept in a dict until there are this many,
# then merged into the sorted arrays.
RECENT_PAIRS_MERGE = 100_000
ERROR_LOG_INTERVAL_SECONDS = 60.0

# One table, the same in both dialects: {text} is the text type (PostgreSQL's in the "C"
# collation, so ORDER BY imei, imsi sorts bytewise as SQLite does), {extra} a table option.
SCHEMA = """
CREATE TABLE IF NOT EXISTS observations (
    date INTEGER NOT NULL,   -- YYYYMMDD, the EIR's local date
    imei {text} NOT NULL,      -- 14 digits
    imsi {text} NOT NULL,      -- '' when the request carried no (valid) IMSI
    msisdn {text} NOT NULL,    -- '' when the msisdn file does not know the IMSI
    rats INTEGER NOT NULL DEFAULT 0,  -- where it was seen: RAT_BITS or-ed; 0 before v2 dumps
    PRIMARY KEY (date, imei, imsi)
){extra}
"""
# Added to a table made before the column existed (its rows keep 0: RAT unknown).
ADD_RATS = "ALTER TABLE observations ADD COLUMN rats INTEGER NOT NULL DEFAULT 0"
# The statements both backends run; {p} is the driver's placeholder, {rows} where a flush's
# rows come from (VALUES for SQLite's executemany, a COPY-filled table for PostgreSQL).
# A key seen again on another interface gains that RAT's bit; nothing else changes.
INSERT = ("INSERT INTO observations (date, imei, imsi, msisdn, rats) {rows} "
          "ON CONFLICT (date, imei, imsi) DO UPDATE SET rats = observations.rats | excluded.rats "
          "WHERE observations.rats | excluded.rats <> observations.rats")
SELECT_DAY = ("SELECT date, imei, imsi, msisdn, rats FROM observations WHERE date = {p} "
              "ORDER BY imei, imsi")
# The IMSIs of the clone report's IMEIs (one seek per IMEI, as SELECT_IMEIS_OVER).
SELECT_IMSIS_OF = ("SELECT DISTINCT imei, imsi FROM observations WHERE date >= {p} "
                   "AND imei IN ({imeis}) AND imsi != '' ORDER BY imei, imsi")
SELECT_CLONES = ("SELECT imei, COUNT(DISTINCT imsi), MIN(date), MAX(date) FROM observations "
                 "WHERE date >= {p} AND imsi != '' GROUP BY imei "
                 "HAVING COUNT(DISTINCT imsi) >= {p} ORDER BY 2 DESC, imei")
SELECT_FIRST_SEEN = ("SELECT imei, imsi, MIN(date) FROM observations "
                     "WHERE date < {p} AND imsi != '' GROUP BY imei, imsi")
# Clone detection at flush time: which of the IMEIs just written have more than {p} distinct
# IMSIs on that day. A seek per IMEI on the primary key's (date, imei) prefix.
SELECT_IMEIS_OVER = ("SELECT imei FROM observations WHERE date = {p} AND imei IN ({imeis}) "
                     "AND imsi != '' GROUP BY imei HAVING COUNT(*) > {p}")
CLONE_QUERY_IMEIS = 500  # IMEIs per query (SQLite allows 32,766 parameters)
# One IMEI's history (the lookup API): the key starts with the date, so instead of a scan
# the days are walked one index seek each ("loose index scan"), then (day, imei) is sought.
SELECT_HISTORY = """
WITH RECURSIVE days(day) AS (
    SELECT MIN(date) FROM observations
    UNION ALL
    SELECT (SELECT MIN(date) FROM observations WHERE date > days.day) FROM days
    WHERE days.day IS NOT NULL
)
SELECT MIN(o.date), MAX(o.date), COUNT(DISTINCT NULLIF(o.imsi, ''))
FROM days JOIN observations o ON o.date = days.day AND o.imei = {p}
"""
# One IMEI's sightings (the console's lookup), newest first: the same walk over the days.
SELECT_SIGHTINGS = """
WITH RECURSIVE days(day) AS (
    SELECT MAX(date) FROM observations
    UNION ALL
    SELECT (SELECT MAX(date) FROM observations WHERE date < days.day) FROM days
    WHERE days.day IS NOT NULL
)
SELECT o.date, o.imsi FROM days JOIN observations o ON o.date = days.day AND o.imei = {p}
ORDER BY o.date DESC, o.imsi LIMIT {p}
"""
FETCH_ROWS = 100_000
# Where a check came from, as one letter ending its pending key (cheap on the hot path), and
# as a bit of the `rats` column: S13 serves the MME of an LTE network (E-UTRAN), N5g-eir the
# AMF of a 5G core (NR).
RAT_EUTRAN, RAT_NR = "e", "n"
RAT_BITS = {RAT_EUTRAN: 1, RAT_NR: 2}
# DIRBS-Core's RAT codes (its radio_access_technology_map; operator data schema v2 accepts
# 001-007 and 101-105, pipe-separated). E-UTRAN is 006; DIRBS-Core has no code for NR, so a
# key seen on N5g-eir alone gets an empty `rat` (the column is optional; the importer counts
# empty ones against its null_rat_threshold).
DIRBS_RAT_CODES = {RAT_BITS[RAT_EUTRAN]: "006"}
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
POSTGRES_CONNECT_TIMEOUT_SECONDS = 10
# pg_advisory_xact_lock key serialising schema creation between nodes starting together
# (concurrent CREATE TABLE IF NOT EXISTS can fail on PostgreSQL's catalogue constraints).
POSTGRES_SCHEMA_LOCK = 0x6569725F6F6273  # "eir_obs"


class ObservationError(Exception):
    """Observations cannot be read (or the msisdn file is bad); the message says why."""


def database_path(settings) -> Path:
    """observations.database, else observations.sqlite in the store directory if one is
    set, else in the current directory."""
    observations = settings.observations
    if observations.database is not None:
        return Path(observations.database)
    if settings.store.directory is not None:
        return Path(settings.store.directory) / DEFAULT_DATABASE_NAME
    return Path(DEFAULT_DATABASE_NAME)


def database_location(settings) -> Path | str:
    """Where the observations are: observations.url (PostgreSQL) when set, else the SQLite
    file of `database_path`. What `ObservationLog`, `write_dump`, `clone_suspects` and
    `GrandfatherIndex.load` take."""
    return settings.observations.url or database_path(settings)




def _valid_imsi(imsi: str | None) -> str:
    return imsi if imsi and imsi.isascii() and imsi.isdigit() and 5 <= len(imsi) <= 15 else ""


def load_msisdns(path: Path) -> dict[str, str]:
    """CSV `imsi,msisdn` (a header line is allowed) → {imsi: msisdn}."""
    msisdns: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for line_number, row in enumerate(csv.reader(handle), 1):
                if not row or not "".join(row).strip():
                    continue
                if line_number == 1 and row[0].strip().lower() == "imsi":
                    continue
                if len(row) != 2:
                    raise ObservationError(f"{path}:{line_number}: expected 2 columns "
                                           f"imsi,msisdn, got {len(row)}")
                imsi, msisdn = row[0].strip(), row[1].strip()
                if not _valid_imsi(imsi):
                    raise ObservationError(f"{path}:{line_number}: imsi: {imsi!r} is not "
                                           "5 to 15 digits")
                if not (msisdn.isdigit() and len(msisdn) <= 15):
                    raise ObservationError(f"{path}:{line_number}: msisdn: {msisdn!r} is "
                                           "not up to 15 digits")
                msisdns[imsi] = msisdn
    except OSError as exc:
        raise ObservationError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return msisdns


# -- storage: SQLite (embedded default) or PostgreSQL (several nodes) ----------------------


class Backend:
    """An observations database: the shared SQL above, in one dialect, through DB-API.

    `location` names it in messages (a path, or a URL without its password); `errors` are
    the driver's exceptions."""

    placeholder = "?"
    text_type = "TEXT"
    table_extra = ""
    insert_rows = "VALUES ({p}, {p}, {p}, {p}, {p})"
    errors: tuple[type[Exception], ...] = ()
    location: Path | str

    def __init__(self):
        p = self.placeholder
        self.schema = SCHEMA.format(text=self.text_type, extra=self.table_extra)
        self.insert_sql = INSERT.format(rows=self.insert_rows.format(p=p))
        self.select_day = SELECT_DAY.format(p=p)
        self.select_clones = SELECT_CLONES.format(p=p)
        self.select_first_seen = SELECT_FIRST_SEEN.format(p=p)
        self.select_history = SELECT_HISTORY.format(p=p)
        self.select_sightings = SELECT_SIGHTINGS.format(p=p)

    def imsis_of(self, connection, since: int, imeis: list[str]) -> dict[str, list[str]]:
        """The distinct IMSIs each of `imeis` was seen with from day `since` on."""
        p = self.placeholder
        found: dict[str, list[str]] = {}
        for start in range(0, len(imeis), CLONE_QUERY_IMEIS):
            chunk = imeis[start:start + CLONE_QUERY_IMEIS]
            sql = SELECT_IMSIS_OF.format(p=p, imeis=", ".join([p] * len(chunk)))
            for imei, imsi in self.rows(connection, sql, (since, *chunk)):
                found.setdefault(imei, []).append(imsi)
        return found

    def __str__(self) -> str:
        return str(self.location)

    def connect(self):
        """A connection for writing, the table created if needed."""
        raise NotImplementedError

    def open_for_reading(self):
        """A connection for the queries; ObservationError when there is no database."""
        raise NotImplementedError

    def insert(self, connection, rows: list[tuple]) -> None:
        """The rows (date, imei, imsi, msisdn, rats) in one transaction; a key already
        stored gains the rows' RAT bits."""
        try:
            cursor = connection.cursor()
            try:
                self._insert(cursor, rows)
            finally:
                cursor.close()
            connection.commit()
        except BaseException:
            try:
                connection.rollback()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise

    def _insert(self, cursor, rows: list[tuple]) -> None:
        cursor.executemany(self.insert_sql, rows)

    def imeis_over(self, connection, day: int, imeis: list[str], more_than: int) -> set[str]:
        """Which of `imeis` were seen with more than `more_than` distinct IMSIs on `day`."""
        p = self.placeholder
        found: set[str] = set()
        cursor = connection.cursor()
        try:
            for start in range(0, len(imeis), CLONE_QUERY_IMEIS):
                chunk = imeis[start:start + CLONE_QUERY_IMEIS]
                cursor.execute(SELECT_IMEIS_OVER.format(p=p, imeis=", ".join([p] * len(chunk))),
                               (day, *chunk, more_than))
                found.update(row[0] for row in cursor.fetchall())
        finally:
            cursor.close()
        connection.commit()  # ends the read transaction PostgreSQL opened
        return found

    def rows(self, connection, sql: str, parameters: tuple) -> Iterator[tuple]:
        """The result rows, fetched FETCH_ROWS at a time (a national dump does not fit in
        memory twice)."""
        cursor = self._reading_cursor(connection)
        try:
            cursor.execute(sql, parameters)
            while chunk := cursor.fetchmany(FETCH_ROWS):
                yield from chunk
        finally:
            cursor.close()

    def _reading_cursor(self, connection):
        return connection.cursor()


class SqliteBackend(Backend):
    """A local file in WAL mode, synchronous=NORMAL (see the module docstring)."""

    table_extra = " WITHOUT ROWID"
    errors = (sqlite3.Error,)

    def __init__(self, path: Path):
        super().__init__()
        self.location = Path(path)

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.location, timeout=10.0, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(self.schema)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(observations)")}
            if "rats" not in columns:
                connection.execute(ADD_RATS)
            connection.commit()
        except BaseException:
            connection.close()
            raise
        return connection

    def open_for_reading(self) -> sqlite3.Connection:
        if not self.location.is_file():
            raise ObservationError(f"{self}: no observations database (has `eir serve` run "
                                   "with observations enabled?)")
        try:
            return self.connect()
        except sqlite3.Error as exc:
            raise ObservationError(f"{self}: {exc}") from None


class PostgresBackend(Backend):
    """A PostgreSQL database shared by several `eir serve` nodes (psycopg 3).

    A flush COPYs its rows into a per-connection temporary table, then inserts them into
    `observations` sorted by key with ON CONFLICT DO NOTHING, in one transaction: a key two
    nodes flush at once is stored once (the second insert waits for the first to commit,
    then skips it), and since every node takes the key locks in the same order, concurrent
    flushes cannot deadlock. Text columns use the "C" collation, so queries sort as SQLite
    does. Credentials: in the URL, or libpq's PGPASSWORD / ~/.pgpass."""

    placeholder = "%s"
    text_type = 'TEXT COLLATE "C"'
    insert_rows = ("SELECT date, imei, imsi, msisdn, rats FROM observations_batch "
                   "ORDER BY date, imei, imsi")  # the key order: see the docstring

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise ObservationError(
                f"{_without_password(url)}: PostgreSQL needs the psycopg driver: "
                "pip install 'open-eir[postgres]'") from None
        super().__init__()
        self.psycopg = psycopg
        self.url = url
        self.location = _without_password(url)
        self.errors = (psycopg.Error,)

    def _open(self):
        return self.psycopg.connect(
            self.url, connect_timeout=POSTGRES_CONNECT_TIMEOUT_SECONDS, application_name="eir")

    def connect(self):
        connection = self._open()
        try:
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (POSTGRES_SCHEMA_LOCK,))
            connection.execute(self.schema)
            connection.execute(ADD_RATS.replace("ADD COLUMN", "ADD COLUMN IF NOT EXISTS"))
            connection.execute("CREATE TEMPORARY TABLE IF NOT EXISTS observations_batch "
                               "(LIKE observations) ON COMMIT DELETE ROWS")
            connection.commit()
        except BaseException:
            connection.close()
            raise
        return connection

    def open_for_reading(self):
        """Creates nothing: `eir dump` may run as a user allowed only to read."""
        try:
            connection = self._open()
            try:
                exists = connection.execute(
                    "SELECT to_regclass('observations') IS NOT NULL").fetchone()[0]
            except BaseException:
                connection.close()
                raise
        except self.errors as exc:
            raise ObservationError(f"{self}: {_one_line(exc)}") from None
        if not exists:
            connection.close()
            raise ObservationError(f"{self}: no observations table (has `eir serve` run "
                                   "with observations enabled?)")
        return connection

    def _insert(self, cursor, rows: list[tuple]) -> None:
        with cursor.copy("COPY observations_batch (date, imei, imsi, msisdn, rats) FROM STDIN") \
                as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(self.insert_sql)

    def _reading_cursor(self, connection):
        return connection.cursor(name="eir_observations")  # server-side: streamed


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())  # libpq's messages span several lines


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def backend(location: Path | str | Backend) -> Backend:
    """The backend of a `database_location`: a postgresql:// URL, else an SQLite path."""
    if isinstance(location, Backend):
        return location
    if isinstance(location, str) and location.startswith(POSTGRES_SCHEMES):
        return PostgresBackend(location)
    return SqliteBackend(Path(location))


@contextmanager
def _reading(location: Path | str | Backend):
    """(backend, connection) for the queries; driver errors become ObservationError."""
    store = backend(location)
    connection = store.open_for_reading()
    try:
        yield store, connection
    except store.errors as exc:
        raise ObservationError(f"{store}: {_one_line(exc)}") from None
    finally:
        connection.close()


class ObservationLog:
    """Observations of the checks a server answers, written in batches by a thread.

    Pending records are kept per day as a set of strings IMEI+IMSI+RAT letter (the IMEI is
    always 14 digits and the letter one character, so the split is unambiguous): strings are
    not tracked by the cyclic garbage collector, tuples would be. Only the event-loop thread
    adds to the sets and the dict of days; the writer thread copies and trims them with single
    C calls (atomic under the GIL).

    Counters (plain attributes, read by whoever reports metrics): `written` records
    committed, `dropped` records refused because `max_pending` distinct records were
    pending, `flush_errors` failed flushes; `pending` is the backlog and `queued` (written +
    pending) every distinct record accepted.
    """

    def __init__(self, path: Path | str | Backend, flush_seconds: float = 1.0,
                 msisdns: dict[str, str] | None = None, max_pending: int = MAX_PENDING,
                 on_written=None, clone_threshold: int | None = None):
        self.backend = backend(path)  # an SQLite path or a postgresql:// URL
        self.path = self.backend.location  # for messages
        self.flush_seconds = flush_seconds
        self.msisdns = msisdns or {}
        self.max_pending = max_pending
        # Called by the writer thread with the (day, imei, imsi, msisdn, rats) rows of each
        # committed flush (the grandfathering index learns new pairs from it).
        self.on_written = on_written
        # Clone detection (eir_clone_hits_total): after each flush, the IMEIs it wrote that
        # now have more than `clone_threshold` distinct IMSIs that day are counted, each
        # once per day (None: off). Done by the writer thread, off the hot path.
        self.clone_threshold = clone_threshold
        self.clone_hits = 0
        self._clones_counted: dict[int, set[str]] = {}  # day → IMEIs counted (last 2 days)
        self.written = 0
        self.dropped = 0
        self.flush_errors = 0
        self.last_error: str | None = None
        self._days: dict[int, set[str]] = {}
        self._day = -1
        self._pending: set[str] = set()  # the current day's
        self._room = max_pending  # how many distinct records the current day may hold
        self._connection = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_logged = float("-inf")

    @property
    def pending(self) -> int:
        return sum(len(keys) for keys in list(self._days.values()))

    @property
    def queued(self) -> int:
        return self.written + self.pending

    def record(self, day: int, imei: str, imsi: str | None, rat: str = RAT_EUTRAN) -> None:
        """Hot path (event-loop thread only): `imei` (14 digits) was used with `imsi` on
        `day` (YYYYMMDD), through the interface of `rat` (RAT_EUTRAN: S13, RAT_NR:
        N5g-eir)."""
        if day != self._day:
            self._start_day(day)
        key = f"{imei}{imsi}{rat}" if imsi else imei + rat  # one BUILD_STRING, no temporary
        pending = self._pending
        if len(pending) < self._room or key in pending:
            pending.add(key)
        else:
            self.dropped += 1

    def record_checks(self, day: int, checks: list, rat: str = RAT_EUTRAN) -> None:
        """`record(day, imei, imsi, rat)` for each check (imei, imsi, ...) of a run decided
        on `day` (the S13 fast path's records, eir.check.service.record_all): the keys
        built as `record` builds them, added by one `record_keys`."""
        self.record_keys(day, [f"{check[0]}{check[1]}{rat}" if check[1] else check[0] + rat
                               for check in checks])

    def record_keys(self, day: int, keys: list[str]) -> None:
        """Records another process collected (eir.serve.workers: a worker's flush), as keys
        IMEI+IMSI+RAT letter (event-loop thread only, like `record`)."""
        if day != self._day:
            self._start_day(day)
        pending = self._pending
        for key in keys:
            if len(pending) < self._room or key in pending:
                pending.add(key)
            else:
                self.dropped += 1

    def _start_day(self, day: int) -> None:
        days = self._days
        for old in [d for d, keys in days.items() if not keys and d != day]:
            del days[old]  # flushed; only this thread adds or removes days
        self._pending = days.setdefault(day, set())
        self._day = day
        others = sum(len(keys) for d, keys in days.items() if d != day)
        self._room = max(0, self.max_pending - others)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="observations", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the writer thread after a final flush (or flush here if it never ran)."""
        if self._thread is None:
            self.flush()
            self._disconnect()
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("observations: the final flush did not finish within %.0f s", timeout)

    def flush(self) -> int:
        """Write what is pending in one transaction; the number of records committed.

        Lock-free with the hot path: copying a day's set and removing the copied records
        from it are single C calls; a record added meanwhile stays for the next flush. On
        error nothing is removed, so the batch is retried next time.
        """
        batches = [(day, keys, keys.copy()) for day, keys in list(self._days.items())]
        msisdns = self.msisdns
        rats: dict[tuple[int, str, str], int] = {}  # one row per key, its RATs or-ed
        for day, _, batch in batches:
            for key in batch:
                row = (day, key[:14], _valid_imsi(key[14:-1]))
                rats[row] = rats.get(row, 0) | RAT_BITS.get(key[-1], 0)
        rows = [(day, imei, imsi, msisdns.get(imsi, "") if imsi else "", bits)
                for (day, imei, imsi), bits in rats.items()]
        if not rows:
            return 0
        try:
            self.backend.insert(self._connect(), rows)
        except self.backend.errors as exc:
            self._failed(exc, len(rows))
            return 0
        for _day, keys, batch in batches:
            keys.difference_update(batch)
        self._room = max(0, self.max_pending - sum(
            len(keys) for day, keys in list(self._days.items()) if day != self._day))
        if self.clone_threshold is not None:
            self._count_clones(rows)  # before `written` moves: a reader of both sees it done
        self.written += len(rows)
        if self.last_error is not None:
            log.info("observations: writing to %s again after %d failed flush(es)",
                     self.path, self.flush_errors)
            self.last_error = None
            self._last_error_logged = float("-inf")
        if self.on_written is not None:
            try:
                self.on_written(rows)
            except Exception:  # noqa: BLE001 - a bug there must not stop the writer
                log.exception("observations: after-write hook failed")
        return len(rows)

    def _count_clones(self, rows: list[tuple]) -> None:
        """Count the IMEIs of just-written rows that crossed the clone threshold."""
        written: dict[int, set[str]] = {}
        for day, imei, imsi, _, _ in rows:
            if imsi:
                written.setdefault(day, set()).add(imei)
        for day, imeis in written.items():
            try:
                over = self.backend.imeis_over(self._connect(), day, sorted(imeis),
                                               self.clone_threshold)
            except self.backend.errors as exc:
                log.warning("observations: clone detection skipped for %d IMEI(s): %s",
                            len(imeis), _one_line(exc))
                continue
            counted = self._clones_counted.setdefault(day, set())
            new = over - counted
            self.clone_hits += len(new)
            counted |= new
        for day in sorted(self._clones_counted)[:-2]:
            del self._clones_counted[day]  # a flush carries today and, past midnight, yesterday

    def _failed(self, exc: Exception, count: int) -> None:
        self.flush_errors += 1
        self.last_error = _one_line(exc)
        self._disconnect()  # reopen next time (the file may have been replaced)
        now = time.monotonic()
        if now - self._last_error_logged >= ERROR_LOG_INTERVAL_SECONDS:
            self._last_error_logged = now
            log.error("observations: cannot write %d record(s) to %s: %s (%d failed "
                      "flush(es) so far, %d pending, %d dropped); kept for the next flush",
                      count, self.path, self.last_error, self.flush_errors, len(self._pending),
                      self.dropped)

    def _connect(self):
        if self._connection is None:
            self._connection = self.backend.connect()
        return self._connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001 - a broken connection is dropped anyway
                pass
            self._connection = None

    def _run(self) -> None:
        try:
            self._connect()  # create the database now, not at the first check
        except self.backend.errors as exc:
            self._failed(exc, 0)
        while not self._stop.wait(self.flush_seconds):
            self.flush()
        self.flush()
        self._disconnect()


def observation_log(settings, on_written=None) -> ObservationLog | None:
    """The ObservationLog the settings ask for (None when disabled); raises
    ObservationError on a bad msisdn file."""
    observations = settings.observations
    if not observations.enabled:
        return None
    msisdns = load_msisdns(observations.msisdn_file) if observations.msisdn_file else {}
    return ObservationLog(database_location(settings), observations.flush_seconds, msisdns,
                          on_written=on_written, clone_threshold=observations.clone_threshold)


# -- reading: the operator data dump and the clone report ---------------------------------


def pseudonym(key: str, value: str) -> str:
    """HMAC-SHA256(key, value) as hex, truncated to 32 hex digits; '' stays ''."""
    if not value:
        return ""
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()[
        :PSEUDONYM_HEX_DIGITS]


DUMP_COLUMNS = ("date", "imei", "imsi", "msisdn", "rat")  # DIRBS operator data schema v2


def write_dump(path: Path | str, day: int, out: IO[str], key: str | None = None) -> int:
    """The DIRBS operator data dump of `day` from the observations at `path` (see
    `database_location`), as DIRBS-Core imports it by default (OperatorImportSchema_v2):
    header `date,imei,imsi,msisdn,rat`, one row per distinct (imei, imsi), sorted by IMEI then
    IMSI, `rat` the DIRBS codes of where it was seen (DIRBS_RAT_CODES). IMSIs and MSISDNs
    pseudonymised when `key` is given. Returns the row count."""
    with _reading(path) as (store, connection):
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(DUMP_COLUMNS)
        count = 0
        for row_day, imei, imsi, msisdn, rats in store.rows(connection, store.select_day,
                                                            (day,)):
            if key is not None:
                imsi, msisdn = pseudonym(key, imsi), pseudonym(key, msisdn)
            writer.writerow((row_day, imei, imsi, msisdn, dirbs_rat(rats)))
            count += 1
        return count


def observation_keys(imei: str, imsi: str, rats: int) -> list[str]:
    """The pending keys of a row (one per RAT it carries), as `ObservationLog.record` makes
    them: how a worker hands its flushed rows to the supervisor."""
    return [imei + imsi + letter for letter, bit in RAT_BITS.items() if rats & bit]


def dirbs_rat(rats: int) -> str:
    """The `rat` cell of a dump row: DIRBS codes joined with `|`, '' when none applies."""
    return "|".join(code for bit, code in sorted(DIRBS_RAT_CODES.items()) if rats & bit)


def dump_file_name(operator: str, start: int, end: int) -> str:
    """The name DIRBS-Core's operator import checks: `<operator>_<YYYYMMDD>_<YYYYMMDD>.zip`
    (importer_utils.perform_operator_filename_checks), its one member the same name in
    `.csv` (extract_csv_from_zip)."""
    return f"{operator}_{start:08d}_{end:08d}.zip"


# The clone report's default (`eir report clones --min-imsis`), and what makes the console
# mark an IMEI "clone suspected".
CLONE_MIN_IMSIS = 2


@dataclass(frozen=True)
class CloneSuspect:
    imei: str
    imsis: int
    first_day: int
    last_day: int
    imsi_list: tuple[str, ...] = ()  # the distinct IMSIs, as stored


def clone_suspects(path: Path | str, since: int,
                   min_imsis: int = CLONE_MIN_IMSIS) -> list[CloneSuspect]:
    """IMEIs seen with at least `min_imsis` distinct IMSIs from day `since` on, most IMSIs
    first (then by IMEI)."""
    with _reading(path) as (store, connection):
        suspects = [CloneSuspect(*row) for row in
                    store.rows(connection, store.select_clones, (since, min_imsis))]
        imsis = store.imsis_of(connection, since, [s.imei for s in suspects])
    return [CloneSuspect(s.imei, s.imsis, s.first_day, s.last_day, tuple(imsis.get(s.imei, ())))
            for s in suspects]


@dataclass(frozen=True)
class EquipmentHistory:
    """What the observations know of one IMEI (as of the last flush)."""

    first_day: int | None  # YYYYMMDD; None: never seen
    last_day: int | None
    imsis: int  # distinct IMSIs it was seen with


def equipment_history(path: Path | str, imei: str) -> EquipmentHistory:
    """When the 14-digit `imei` was first and last seen, and with how many distinct IMSIs;
    one index seek per stored day, not a scan (see SELECT_HISTORY)."""
    with _reading(path) as (store, connection):
        for first, last, imsis in store.rows(connection, store.select_history, (imei,)):
            return EquipmentHistory(first, last, imsis or 0)
    return EquipmentHistory(None, None, 0)


def equipment_sightings(path: Path | str, imei: str, limit: int) -> list[tuple[int, str]]:
    """(day YYYYMMDD, IMSI or '') of the 14-digit `imei`, newest first, at most `limit`."""
    with _reading(path) as (store, connection):
        return [(day, imsi) for day, imsi in
                store.rows(connection, store.select_sightings, (imei, limit))]


# -- grandfathering -------------------------------------------------------------------------


def _empty_arrays():
    return (memoryview(np.zeros(0, "<u8")).cast("B").cast("Q"),
            memoryview(np.zeros(0, "<u8")).cast("B").cast("Q"),
            memoryview(np.zeros(0, "<u4")).cast("B").cast("I"))


def _views(imeis: np.ndarray, imsis: np.ndarray, days: np.ndarray):
    """Memoryviews of sorted arrays: bisect on them runs in C without numpy scalars."""
    return (memoryview(np.ascontiguousarray(imeis, "<u8")).cast("B").cast("Q"),
            memoryview(np.ascontiguousarray(imsis, "<u8")).cast("B").cast("Q"),
            memoryview(np.ascontiguousarray(days, "<u4")).cast("B").cast("I"))


def _sorted_first_seen(imeis: np.ndarray, imsis: np.ndarray, days: np.ndarray):
    """Sort by (imei, imsi, day) and keep each pair's earliest day."""
    if len(imeis) == 0:
        return imeis, imsis, days
    order = np.lexsort((days, imsis, imeis))
    imeis, imsis, days = imeis[order], imsis[order], days[order]
    first = np.concatenate(([True], (imeis[1:] != imeis[:-1]) | (imsis[1:] != imsis[:-1])))
    return imeis[first], imsis[first], days[first]


class GrandfatherIndex:
    """IMEI+IMSI pairs observed on a day before the cut-off, with the first such day.

    Sorted uint64 arrays of IMEIs and IMSIs (16 bytes a pair, plus 4 for the day) searched
    by bisection on memoryviews, plus a small dict of pairs learnt since the last build. The
    whole tuple of arrays is swapped by one assignment, so a lookup sees one build. Built
    from the observations database in a background thread (`load`); until then it knows
    only what the writer reports (`learn`). Once the cut-off is past, no new pair can
    qualify, so the set stops growing.
    """

    def __init__(self, cutoff: date):
        self.cutoff = day_number(cutoff)
        self.cutoff_text = cutoff.isoformat()
        self._arrays = _empty_arrays()
        self._recent: dict[tuple[int, int], int] = {}
        self._merge_lock = threading.Lock()  # writers only (load, learn); lookups take none
        self.loaded_from: Path | str | None = None

    def __len__(self) -> int:
        return len(self._arrays[0]) + len(self._recent)

    def first_seen_before_cutoff(self, imei: str, imsi: str | None) -> int | None:
        """The first day (YYYYMMDD) the pair was seen, if before the cut-off; else None."""
        if not imsi or not imsi.isascii() or not imsi.isdigit() or len(imsi) > 15:
            return None
        imei_number, imsi_number = int(imei), int(imsi)
        imeis, imsis, days = self._arrays
        index = bisect.bisect_left(imeis, imei_number)
        end = len(imeis)
        while index < end and imeis[index] == imei_number:
            if imsis[index] == imsi_number:
                return days[index]
            index += 1
        recent = self._recent
        return recent.get((imei_number, imsi_number)) if recent else None

    def load(self, path: Path | str) -> int:
        """(Re)build from the observations database (see `database_location`); the number
        of pairs."""
        # Converted to arrays a chunk at a time: Python lists of tens of millions of pairs
        # would take ~120 B each before the arrays (8 + 8 + 4 B) were built.
        chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        batch: list[tuple] = []

        def convert() -> None:
            chunks.append((np.array([int(row[0]) for row in batch], "<u8"),
                           np.array([int(row[1]) for row in batch], "<u8"),
                           np.array([row[2] for row in batch], "<u4")))
            batch.clear()

        with _reading(path) as (store, connection):
            for row in store.rows(connection, store.select_first_seen, (self.cutoff,)):
                batch.append(row)
                if len(batch) >= FETCH_ROWS:
                    convert()
        if batch:
            convert()
        columns = [np.concatenate(parts) if parts else np.zeros(0, dtype)
                   for parts, dtype in zip(zip(*chunks) if chunks else ((), (), ()),
                                           ("<u8", "<u8", "<u4"))]
        with self._merge_lock:
            self._rebuild(*columns)
        self.loaded_from = store.location
        return len(self)

    def learn(self, rows: Iterable[tuple]) -> None:
        """Rows (day, imei, imsi, ...) just written by the ObservationLog."""
        cutoff = self.cutoff
        with self._merge_lock:
            for row in rows:
                day, imei, imsi = row[0], row[1], row[2]
                if day >= cutoff or not imsi:
                    continue
                known = self.first_seen_before_cutoff(imei, imsi)
                if known is None or day < known:
                    self._recent[(int(imei), int(imsi))] = day
            if len(self._recent) >= RECENT_PAIRS_MERGE:
                self._rebuild(np.zeros(0, "<u8"), np.zeros(0, "<u8"), np.zeros(0, "<u4"))

    def _rebuild(self, imeis: np.ndarray, imsis: np.ndarray, days: np.ndarray) -> None:
        """New arrays = old arrays + recent pairs + the given ones (caller holds the lock)."""
        old_imeis, old_imsis, old_days = (np.frombuffer(view, dtype)
                                          for view, dtype in zip(self._arrays,
                                                                 ("<u8", "<u8", "<u4")))
        recent = self._recent
        recent_keys = np.array(list(recent), "<u8").reshape(-1, 2)
        merged = _sorted_first_seen(
            np.concatenate((old_imeis, recent_keys[:, 0], imeis)),
            np.concatenate((old_imsis, recent_keys[:, 1], imsis)),
            np.concatenate((old_days, np.array(list(recent.values()), "<u4"), days)))
        self._arrays = _views(*merged)
        self._recent = {}
