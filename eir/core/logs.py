"""Logs and the verdict audit log.

Logs: `logging.format: text` (the default: a person reads stderr, and `eir serve` in a
terminal should look like one line per event) or `json` (one JSON object per line, for a
log shipper: time, level, logger, message, and exception when there is one). Either way no
full IMSI reaches a log unless `logging.show_imsi: true`: the formatter masks the digits
that follow "IMSI", "imsi=", "imsi:" or "User-Name" (00101******6789), whoever wrote the
message. The API token is never logged: the API's access log has no headers, and the
settings keep the token as a SecretStr.

Strings a peer chose (Origin-Host, Session-Id, IMEI, Error-Message texts, HTTP paths,
User-Agent...) reach a log or audit line only through `untrusted()`: control characters
(C0, DEL, C1, the Unicode line and paragraph separators, the bidirectional overrides) are
shown escaped (\x1b, \n, \u202e) and the value is cut at `logging.max_value_chars` with a
marker saying how many characters were cut, so a peer can neither forge a line nor colour
a terminal, nor make one line long. Both formatters escape and cut (at
`logging.max_message_chars`) every whole message too, whoever wrote it, but keep its
newlines (a list of errors; tracebacks are escaped, not cut); the text formatter indents
the lines after the first, so that no text can start a line of its own. Lines about a peer
(logged with `extra={"peer": address}`) are rate-limited:
`logging.rate_limit.lines` of one kind (logger, message template, level) from one address
per `interval_seconds`, then one line saying how many were suppressed (`LogRateLimit`).

Audit: with `audit.enabled`, a share (`audit.sample`, 1 = all) of the verdicts is written
as JSON lines to `audit.path`: time, interface (s13, or n5g-eir: eir.interfaces.sbi), the MME's
Origin-Host (on n5g-eir: the AMF's User-Agent, else its address), IMEI, the IMSI (masked unless
show_imsi), status, Result-Code, match, reason, source and list version. The hot path only
appends a tuple to a deque (atomic under the GIL); a writer thread formats and writes every
`flush_seconds`. Past `max_pending` waiting records new ones are dropped and counted, never
waited for. When the file is rotated (renamed or removed), the writer reopens the path.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from eir.core.config import ConfigError, LoggingSettings
from eir.core.decision import Verdict
from eir.core.untrusted import (
    ESCAPES_BUT_NEWLINE,
    one_event,
    set_value_limit,
    shown_message,
    untrusted,
)

log = logging.getLogger("eir.audit")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
AUDIT_DEFAULT_NAME = "audit.jsonl"
AUDIT_MAX_PENDING = 100_000
ERROR_LOG_INTERVAL_SECONDS = 60.0
SUCCESS, EQUIPMENT_UNKNOWN = 2001, 5422

# Digits that follow a word naming an IMSI: "IMSI 001010123456789", "imsi=0010...",
# "imsi: '0010...'", "User-Name: '0010...'", '"imsi": "0010..."'.
# A run already masked (digits then '*') is left alone, so that redacting twice is harmless.
# Between the word and the digits, an escaped control character (untrusted(): \x1b, \n,
# \u2028) counts as one non-word character, as it did before it was escaped.
_IMSI_IN_TEXT = re.compile(
    r"(?i)((?:\bimsi|\buser-name)(?:\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|[ntr])|\W){0,5})"
    r"(\d{5,})(?![\d*])")


def mask_imsi(imsi: str) -> str:
    """00101******6789: the first 5 digits (MCC+MNC) and the last 4 kept."""
    if len(imsi) >= 10:
        return imsi[:5] + "*" * (len(imsi) - 9) + imsi[-4:]
    return imsi[:3] + "*" * max(0, len(imsi) - 3)


def redact(text: str) -> str:
    """`text` with every IMSI that follows a word naming one masked."""
    folded = text.lower()  # "iMsI=..." too: the pattern ignores case, so must this test
    if "msi" not in folded and "ser-" not in folded:
        return text  # the common case: nothing to look for
    return _IMSI_IN_TEXT.sub(lambda m: m.group(1) + mask_imsi(m.group(2)), text)


class TextFormatter(logging.Formatter):
    def __init__(self, show_imsi: bool = False,
                 max_message_chars: int = LoggingSettings().max_message_chars):
        super().__init__(TEXT_FORMAT)
        self.show_imsi = show_imsi
        self.max_message_chars = max_message_chars

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = worker_prefix(record) + shown_message(record.message,
                                                               self.max_message_chars)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = one_event(super().format(record))
        return text if self.show_imsi else redact(text)


def worker_prefix(record: logging.LogRecord) -> str:
    """"worker N: " for a record a worker logged (eir.workers.WorkerLogPrefix), else ""."""
    worker = getattr(record, "worker", None)
    return f"worker {worker}: " if worker is not None else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601, ms), level, logger, message, the
    `worker` that logged it (its index; absent in the supervisor or a single process), the
    `peer` it is about (the address logged with `extra={"peer": ...}`), and exception (the
    formatted traceback) when there is one. The message is escaped and cut as in the text
    format: JSON would escape C0 controls itself, but a reader that prints the message would
    get them back, and C1 and bidirectional characters as well."""

    def __init__(self, show_imsi: bool = False,
                 max_message_chars: int = LoggingSettings().max_message_chars):
        super().__init__()
        self.show_imsi = show_imsi
        self.max_message_chars = max_message_chars

    def format(self, record: logging.LogRecord) -> str:
        document = {"time": _iso_time(record.created), "level": record.levelname,
                    "logger": record.name,
                    "message": shown_message(record.getMessage(), self.max_message_chars)}
        worker = getattr(record, "worker", None)
        if worker is not None:
            document["worker"] = worker
        peer = getattr(record, "peer", None)
        if peer is not None:
            document["peer"] = untrusted(peer)
        exception = record.exc_text
        if record.exc_info:
            exception = self.formatException(record.exc_info)
        if exception:
            document["exception"] = exception.translate(ESCAPES_BUT_NEWLINE)
        text = json.dumps(document, ensure_ascii=False)
        return text if self.show_imsi else redact(text)


class LogRateLimit:
    """Sans-IO: at most `lines` log lines per `interval` seconds for each key (what kind of
    line, from which peer address); what is beyond is suppressed and counted. At most
    `max_keys` keys are tracked: the lines of a key that does not fit share one key
    (`OTHER_PEERS`), so that a peer changing addresses cannot grow the table.

    `admit(key, now)` says whether to write the line. Each window that ended with lines
    suppressed adds (key, suppressed, first suppressed line) to `reports`, for the caller to
    write: at the key's next line, or at a `sweep(now)` (one at least every interval while
    `suppressing`)."""

    OTHER_PEERS = ("other peers",)

    def __init__(self, lines: int, interval: float, max_keys: int):
        self.lines = lines
        self.interval = interval
        self.max_keys = max_keys
        self.reports: list[tuple[tuple, int, str]] = []
        # key → [window start, lines written, lines suppressed, first suppressed line]
        self._windows: dict[tuple, list] = {}
        self._next_sweep = float("-inf")

    def admit(self, key: tuple, now: float, line=None) -> bool:
        """Whether a line of `key` may be written now. `line()` gives the text a report
        quotes; called only for the first line suppressed in a window."""
        if now >= self._next_sweep:
            self.sweep(now)
        windows = self._windows
        window = windows.get(key)
        if window is None:
            if len(windows) >= self.max_keys:
                key = self.OTHER_PEERS
                window = windows.get(key)
            if window is None:
                window = windows[key] = [now, 0, 0, ""]
        elif now - window[0] >= self.interval:
            self._report(key, window)
            window[:] = [now, 0, 0, ""]
        if window[1] < self.lines:
            window[1] += 1
            return True
        if not window[2] and line is not None:
            window[3] = line()
        window[2] += 1
        return False

    @property
    def suppressing(self) -> bool:
        """Some window has suppressed lines not reported yet."""
        return any(window[2] for window in self._windows.values())

    def sweep(self, now: float) -> None:
        """Report and forget the windows that ended."""
        self._next_sweep = now + self.interval
        ended = [key for key, window in self._windows.items()
                 if now - window[0] >= self.interval]
        for key in ended:
            self._report(key, self._windows.pop(key))

    def _report(self, key: tuple, window: list) -> None:
        if window[2]:
            self.reports.append((key, window[2], window[3]))


class RateLimitFilter(logging.Filter):
    """The handler's filter that applies LogRateLimit to lines about a peer (those logged
    with `extra={"peer": address}`), keyed by (address, logger, message template, level).
    Lines without a peer pass. While lines are suppressed, a thread sweeps every interval,
    so that the count of a flood that stopped is written without waiting for a next line."""

    def __init__(self, handler: logging.Handler, limit: LogRateLimit):
        super().__init__()
        self.handler = handler
        self.limit = limit
        self._lock = threading.Lock()  # lines come from the event loop and from threads
        self._sweeper: threading.Thread | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        peer = getattr(record, "peer", None)
        if peer is None:
            return True
        limit = self.limit
        with self._lock:
            admitted = limit.admit((peer, record.name, str(record.msg), record.levelno),
                                   time.monotonic(), record.getMessage)
            reports, limit.reports = limit.reports, []
            if not admitted and self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep_while_suppressing,
                                                 name="log-rate-limit", daemon=True)
                self._sweeper.start()
        self._write(reports)
        return admitted

    def _sweep_while_suppressing(self) -> None:
        limit = self.limit
        while True:
            time.sleep(limit.interval)
            with self._lock:
                limit.sweep(time.monotonic())
                reports, limit.reports = limit.reports, []
                if not limit.suppressing:
                    self._sweeper = None
            self._write(reports)
            if self._sweeper is None:
                return

    def _write(self, reports: list[tuple[tuple, int, str]]) -> None:
        for key, suppressed, first in reports:
            if key == LogRateLimit.OTHER_PEERS:
                peer, name, level = "other peers", "eir.logs", logging.WARNING
            else:
                peer, name, _, level = key
            self.handler.handle(logging.LogRecord(
                name, level, __file__, 0, "%s: %d similar line(s) suppressed in %g s "
                "(logging.rate_limit), the first: %s",
                (untrusted(peer), suppressed, self.limit.interval, untrusted(first)), None))


def _iso_time(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def configure_logging(settings, stream: IO[str] | None = None) -> None:
    """Root logging as `settings` (eir.core.config.LoggingSettings) says: level, text or JSON,
    IMSIs masked unless show_imsi, peer values and messages cut, lines about a peer
    rate-limited. Replaces handlers set before (uvicorn's loggers propagate to it:
    eir.interfaces.api starts uvicorn without a log config of its own)."""
    set_value_limit(settings.max_value_chars)
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter_class = JsonFormatter if settings.format == "json" else TextFormatter
    handler.setFormatter(formatter_class(settings.show_imsi, settings.max_message_chars))
    rate = settings.rate_limit
    if rate.lines > 0:
        handler.addFilter(RateLimitFilter(handler, LogRateLimit(
            rate.lines, rate.interval_seconds, rate.max_keys)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())


def audit_path(settings) -> Path:
    """audit.path, else audit.jsonl in the store directory if one is set, else here."""
    if settings.audit.path is not None:
        return Path(settings.audit.path)
    if settings.store.directory is not None:
        return Path(settings.store.directory) / AUDIT_DEFAULT_NAME
    return Path(AUDIT_DEFAULT_NAME)


class AuditLog:
    """The verdict audit log (see the module docstring). `written` and `dropped` are read
    by the metrics."""

    def __init__(self, path: Path | str, sample: float = 1.0, flush_seconds: float = 1.0,
                 show_imsi: bool = False, max_pending: int = AUDIT_MAX_PENDING):
        self.path = Path(path)
        self.sample = sample
        self.flush_seconds = flush_seconds
        self.show_imsi = show_imsi
        self.max_pending = max_pending
        self.written = 0
        self.dropped = 0
        self._pending: collections.deque = collections.deque()
        self._random = random.random
        self._file: IO[str] | None = None
        self._inode: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_logged = float("-inf")

    def record(self, origin_host: bytes, imei: str, imsi: str | None, verdict: Verdict,
               version: str, interface: str = "s13") -> None:
        """Hot path (event-loop thread): one verdict, audited if sampled. `interface`: s13,
        or n5g-eir (eir.interfaces.sbi, where `origin_host` is the client's User-Agent or
        address)."""
        if self.sample < 1.0 and self._random() >= self.sample:
            return
        pending = self._pending
        if len(pending) < self.max_pending:
            pending.append((time.time(), origin_host, imei, imsi, verdict, version,
                            interface))
        else:
            self.dropped += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is pending and stop the writer thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def flush(self) -> int:
        """Write the records pending now; the number written."""
        pending = self._pending
        lines = []
        while pending:
            lines.append(self._line(*pending.popleft()))
        if not lines:
            return 0
        try:
            handle = self.open()
            handle.write("".join(lines))
            handle.flush()
        except OSError as exc:
            self.dropped += len(lines)
            self._failed(exc)
            return 0
        self.written += len(lines)
        return len(lines)

    def _line(self, when: float, origin_host: bytes, imei: str, imsi: str | None,
              verdict: Verdict, version: str, interface: str) -> str:
        status = verdict.status
        reason = verdict.reason
        shown_imsi = imsi
        if imsi and not self.show_imsi:
            shown_imsi = mask_imsi(imsi)
            reason = redact(reason).replace(imsi, shown_imsi)
        return json.dumps({
            "time": _iso_time(when), "interface": interface,
            "origin_host": untrusted(origin_host), "imei": untrusted(imei), "imsi": shown_imsi,
            "status": verdict.status_name,
            "result_code": SUCCESS if status is not None else EQUIPMENT_UNKNOWN,
            "match": verdict.match.value, "reason": reason, "source": verdict.source,
            "list_version": version}, ensure_ascii=False) + "\n"

    def open(self) -> IO[str]:
        """The audit file, reopened when it was rotated away (renamed or removed)."""
        try:
            status = os.stat(self.path)
            on_disk = (status.st_dev, status.st_ino)
        except FileNotFoundError:
            on_disk = None
        if self._file is not None and on_disk == self._inode:
            return self._file
        if self._file is not None:
            self._file.close()
            self._file = None
        self._file = open(self.path, "a", encoding="utf-8")
        status = os.fstat(self._file.fileno())
        self._inode = (status.st_dev, status.st_ino)
        return self._file

    def _failed(self, exc: OSError) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        now = time.monotonic()
        if now - self._last_error_logged >= ERROR_LOG_INTERVAL_SECONDS:
            self._last_error_logged = now
            log.error("audit: cannot write to %s: %s (%d record(s) dropped so far)",
                      self.path, exc.strerror or exc, self.dropped)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()
        self.flush()


def audit_log(settings) -> AuditLog | None:
    """The AuditLog the settings ask for (None when audit.enabled is false)."""
    audit = settings.audit
    if not audit.enabled:
        return None
    writer = AuditLog(audit_path(settings), audit.sample, audit.flush_seconds,
                      settings.logging.show_imsi)
    try:
        writer.open()  # an unwritable path is a configuration error, found at start-up
    except OSError as exc:
        raise ConfigError(f"audit.path: {writer.path}: cannot open for appending: "
                          f"{exc.strerror or exc}") from None
    return writer
