"""The native list format: CSV with the header `imei,status,imsi,reason`.

    imei    a 14-16 digit IMEI (normalised to 14), an 8-digit TAC, or START-END, two IMEIs
    status  whitelist | blacklist | greylist
    imsi    optional: the rule then applies only to that subscriber
    reason  optional free text, shown to whoever asks why (at most MAX_TEXT_CELL characters)

`imsi` and `reason` columns may be left out; blank lines and lines whose first cell starts
with `#` are skipped. A file with any bad row is refused whole, every problem reported as
`file:line: field: problem`, so the lists in force stay in force.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator

from eir.core.decision import EquipmentStatus, Rule, RuleSet, UnknownPolicy
from eir.core.imei import ImeiError, is_imsi, is_tac, normalise_imei
from eir.lists.snapshot import build_rule_set, entries_from_rules

COLUMNS = ("imei", "status", "imsi", "reason")
REQUIRED_COLUMNS = ("imei", "status")
STATUSES = {"whitelist": EquipmentStatus.WHITELISTED,
            "blacklist": EquipmentStatus.BLACKLISTED,
            "greylist": EquipmentStatus.GREYLISTED}
MAX_REPORTED_ERRORS = 50


class ListError(Exception):
    """One or more list files were refused; `problems` holds `file:line: field: problem`."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_REPORTED_ERRORS]
        more = len(problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
        super().__init__(text)
        self.problems = problems


# The longest valid key cell is an IMEI range of two 16-digit IMEISVs with spaces around
# the dash (35 characters); 64 leaves room for spacing while bounding what an error echoes.
# Registry formats (eir.lists.formats) hold every identifier, date, status and MSISDN
# cell to it too.
MAX_KEY_CELL = 64
# Free text (a reason, a device name) goes out with every verdict of its IMEIs: in each API
# answer, `eir check`, and each audit record. 1,024 characters hold any real reason (DIRBS
# joins a few words per reason with `|`) and keep a hostile list from making every answer
# about an IMEI megabytes long. A format rule, not a setting: a list valid on one EIR is
# valid on every EIR.
MAX_TEXT_CELL = 1024


def parse_imsi(text: str) -> str:
    if not is_imsi(text):
        raise ValueError(f"{text!r} is not an IMSI (5 to 15 digits)")
    return text


def _subject(text: str) -> dict:
    """The rule's key fields from the `imei` cell."""
    if "-" in text:
        start_text, _, end_text = text.partition("-")
        try:
            start = int(normalise_imei(start_text.strip()))
            end = int(normalise_imei(end_text.strip()))
        except ImeiError as exc:
            raise ValueError(f"range {text!r}: {exc}") from None
        if start > end:
            raise ValueError(f"range {text!r} ends before it starts")
        return {"imei_range": (start, end)}
    if is_tac(text):
        return {"tac": text}
    try:
        return {"imei": normalise_imei(text)}
    except ImeiError as exc:
        raise ValueError(f"{exc} (expected an IMEI, an 8-digit TAC or START-END)") from None


def _rule(cells: dict[str, str], where: str) -> tuple[Rule | None, list[str]]:
    """The rule of one row, or the problems with it (`where: field: problem`)."""
    # A key cell longer than any valid one is named by its length, not echoed: a list with a
    # 100 KiB "IMEI" would otherwise fill the error (and the log) with it.
    problems = [f"{where}: {column}: {len(cells[column])} characters (at most "
                f"{MAX_KEY_CELL} in this column)"
                for column in ("imei", "status", "imsi")
                if len(cells.get(column, "")) > MAX_KEY_CELL]
    if len(cells.get("reason", "")) > MAX_TEXT_CELL:
        problems.append(f"{where}: reason: {len(cells['reason'])} characters (at most "
                        f"{MAX_TEXT_CELL} in this column)")
    if problems:
        return None, problems
    fields: dict = {"source": where, "reason": cells.get("reason", "")}
    try:
        fields.update(_subject(cells.get("imei", "")))
    except ValueError as exc:
        problems.append(f"{where}: imei: {exc}")
    status = cells.get("status", "")
    if status.lower() in STATUSES:
        fields["status"] = STATUSES[status.lower()]
    else:
        problems.append(f"{where}: status: {status!r} is not one of {', '.join(STATUSES)}")
    if cells.get("imsi"):
        try:
            fields["imsi"] = parse_imsi(cells["imsi"])
        except ValueError as exc:
            problems.append(f"{where}: imsi: {exc}")
    return (None, problems) if problems else (Rule(**fields), [])


def _header(row: list[str], where: str) -> list[str]:
    header = [cell.strip().lower() for cell in row]
    unknown = [column for column in header if column not in COLUMNS]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    what = []
    if missing:
        what.append(f"missing column(s) {', '.join(missing)}")
    if unknown:
        what.append(f"unknown column(s) {', '.join(unknown)}")
    if what:
        raise ListError([f"{where}: header: {'; '.join(what)} (expected {','.join(COLUMNS)})"])
    return header


class CsvRowError(ValueError):
    """A row the csv module cannot read; the message is `file:line: row: problem`."""


def csv_rows(text: str, name: str) -> Iterator[tuple[str, list[str]]]:
    """(`file:line`, cells) for every row of a CSV text, skipping blank lines and lines that
    start with `#` (lists and request mixes carry comments). Raises CsvRowError."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            yield f"{name}:{reader.line_num}", row
    except csv.Error as exc:
        raise CsvRowError(f"{name}:{reader.line_num}: row: {exc}") from None


def read_text(path: Path, name: str, digest=None) -> str:
    """A CSV file's text (UTF-8; a leading BOM, as spreadsheets export, skipped), or ListError
    saying why not, named `name`. `digest` (a hashlib object), when given, is updated with
    the file's bytes."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ListError([f"{name}: cannot open: {exc.strerror or exc}"]) from None
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        raise ListError([f"{name}:{line}: encoding: not UTF-8 ({exc.reason} at byte "
                         f"{exc.start})"]) from None
    if digest is not None:
        digest.update(content)
    return text


def read_imei_table(path: Path, columns: str) -> tuple[list[str], list[tuple[str,
                                                                           dict[str, str]]]]:
    """A CSV of rows keyed by IMEI, other than a list (`eir replay`'s request mixes, `eir
    conformance`'s expected verdicts): (its header in lower case, (`file:line`, {column: cell,
    stripped}) of every row after it). Blank lines and `#` lines are skipped; `columns` names
    the header expected, for messages. ListError when the file cannot be read, is not UTF-8,
    has no header, or rows with more cells than the header (each named)."""
    name = str(path)
    text = read_text(path, name)
    try:
        rows = list(csv_rows(text, name))
    except CsvRowError as exc:
        raise ListError([str(exc)]) from None
    if not rows:
        raise ListError([f"{name}:1: header: file is empty (expected {columns})"])
    header = [cell.strip().lower() for cell in rows[0][1]]
    problems = [f"{where}: row: {len(row)} cells, header has {len(header)}"
                for where, row in rows[1:] if len(row) > len(header)]
    if problems:
        raise ListError(problems)
    return header, [(where, dict(zip(header, (cell.strip() for cell in row))))
                    for where, row in rows[1:]]


def imei_and_imsi(where: str, cells: dict[str, str]) -> tuple[str, str | None, list[str]]:
    """A read_imei_table row's `imei` (14 to 16 digits, as sent) and optional `imsi`, and
    what is wrong with them (`file:line: field: problem`; none when the row is good)."""
    imei, imsi = cells.get("imei", ""), cells.get("imsi", "")
    problems = []
    if not (imei.isascii() and imei.isdigit() and 14 <= len(imei) <= 16):
        problems.append(f"{where}: imei: {imei!r} is not an IMEI (14 to 16 digits)")
    if imsi and not is_imsi(imsi):
        problems.append(f"{where}: imsi: {imsi!r} is not an IMSI (5 to 15 digits)")
    return imei, imsi or None, problems


def read_native_csv(path: Path | str, display_name: str | None = None,
                    digest=None) -> list[Rule]:
    """All rules of one file, or ListError naming every bad row. `digest` (a hashlib
    object), when given, is updated with the file's bytes."""
    path = Path(path)
    name = display_name or str(path)
    text = read_text(path, name, digest)
    problems: list[str] = []
    rules: list[Rule] = []
    # The first row of each subject (IMEI, range or TAC, with its IMSI): a later row of the
    # same subject with another status is a conflict the author must settle; across files
    # the most severe status wins by design (blacklist files beside a whitelist).
    first_of: dict[tuple, Rule] = {}
    header = None
    try:
        for where, row in csv_rows(text, name):
            if header is None:
                header = _header(row, where)
            elif len(row) > len(header):
                problems.append(f"{where}: row: {len(row)} cells, header has {len(header)}")
            else:
                rule, row_problems = _rule(dict(zip(header, map(str.strip, row))), where)
                if rule is not None:
                    key = (rule.imei, rule.imei_range, rule.tac, rule.imsi)
                    first = first_of.setdefault(key, rule)
                    if first.status is not rule.status:
                        problems.append(
                            f"{where}: status: {rule.status.name.lower()} conflicts with "
                            f"{first.status.name.lower()} for {rule.subject} at "
                            f"{first.source} (one status per subject in a file)")
                    rules.append(rule)
                problems.extend(row_problems)
    except CsvRowError as exc:
        problems.append(str(exc))
    if header is None and not problems:
        problems.append(f"{name}:1: header: file is empty (expected {','.join(COLUMNS)})")
    if problems:
        raise ListError(problems)
    return rules


def load_rule_set(paths: Iterable[Path | str], unknown_policy: UnknownPolicy,
                  grandfathering=None) -> RuleSet:
    """Read every list file and build one snapshot; any bad file refuses them all.
    `grandfathering`: see RuleSet."""
    rules: list[Rule] = []
    problems: list[str] = []
    digest = hashlib.sha256()
    for path in paths:
        try:
            rules.extend(read_native_csv(path, digest=digest))
        except ListError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ListError(problems)
    return build_rule_set(rules, unknown_policy, version=digest.hexdigest()[:12],
                          grandfathering=grandfathering)


def read_native_entries(path: Path | str, display_name: str | None = None):
    """The native CSV in the neutral form of eir.lists.entries (ListEntries), validated
    exactly as read_native_csv does: one NATIVE attribute per row (source `file:line`)."""
    return entries_from_rules(read_native_csv(path, display_name), display_name or str(path))
