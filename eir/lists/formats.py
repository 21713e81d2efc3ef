"""Parsers for the list files a national registry (DIRBS-style CEIR) publishes, into the neutral
form of `eir.lists.entries`.

Accepted file names (`<date>` is `YYYYMMDD` or DIRBS's `YYYYMMDD_HHMMSS`; each `.csv` may also
come as a `.zip` holding it):

    <date>_blacklist.csv                      full blacklist   imei,block_date,reasons
    <date>_notifications_<op>.csv             full notifications list of operator <op>
                                              imei,imsi,msisdn,block_date,reasons[,amnesty_granted]
    <date>_exceptions_<op>.csv                full exceptions (pairing) list   imei,imsi,msisdn
    <date>_whitelist.csv                      full whitelist (registered IMEIs)
                                              imei[,registration_date]
    <date>_blacklist_delta_<base>_<run>_<reason>.csv
    <date>_notifications_<op>_delta_<base>_<run>_<reason>.csv
    <date>_exceptions_<op>_delta_<base>_<run>_<reason>.csv
    <date>_whitelist_delta_<base>_<run>_<reason>.csv
                                              per-reason delta files (the full list's columns)

Any other name is recognised by its header line:

    imei,status[,imsi][,reason]               the native list (eir.lists.native)
    tac,<device-name columns>...              a GSMA-style TAC file (`,` or `|` separated)
    imei,reporting_date,status,change_type    import-side stolen list delta
    imei,imsi[,msisdn],change_type            import-side pairing list delta
    imei,block_date,reasons                   a blacklist
    imei,imsi,msisdn,block_date,reasons[,...] a notifications list
    imei,imsi[,msisdn]                        an exceptions list
    imei[,registration_date]                  a whitelist

What each becomes:

* blacklist → `Kind.BLACKLIST` entries (imsi 0); notifications → `Kind.NOTIFICATION` entries
  keyed by the IMEI alone (imsi 0: the notified IMSI/MSISDN is who gets told, not a condition;
  an IMEI notified to several subscribers appears once per row, so keys may repeat);
  exceptions → `Kind.EXCEPTION` entries paired with their IMSI. One `Attribute` per distinct
  (kind, block_date, reasons), its source the CSV's file name; reasons `a|b` read "a, b"; a
  notification with `amnesty_granted` true gets " (amnesty granted)" after its reasons.
  `msisdn` is not used (only its length is checked).
* whitelist → `Kind.WHITELIST` entries (imsi 0), WHITELISTED whatever the date: the registered
  IMEIs of a whitelist scheme (Indonesia's CEIR), to be used with unknown_policy blacklisted.
  DIRBS publishes no such file to operators; the name and columns follow its conventions.
  `registration_date` (YYYYMMDD, may be empty) only appears in the reason.
* Delta reasons: a row in an *added/replaced* file is added, replacing any entry with its key
  (IMEI, or IMEI+IMSI for exceptions); a row in a *removed* file removes its key:
      blacklist      blocked, changed → added;   unblocked → removed
      notifications  new, changed → added;       resolved, no_longer_seen, blacklisted → removed
                     (blacklisted: the IMEI moved to the blacklist, whose own delta adds it)
      exceptions     added → added;              removed → removed
      whitelist      added, changed → added;     removed → removed
  `base` and `run` come from the name (DIRBS writes -1 as base when there was none).
* Stolen list delta: `add`/`update` rows whose status is empty or `blacklist` are added as
  `Kind.BLACKLIST` with block_date = reporting_date (empty: 0, blocked whatever the date), reason
  "reported stolen"; `remove` rows, and `add`/`update` rows with any other status (DIRBS only
  blocks status blacklist), are removed. Pairing list delta: `add` → EXCEPTION added, `remove` →
  removed. Both have base and run "".
* A zip normally holds one CSV, named by the archive's name when its own name says nothing.
  DIRBS's listgen zips a full list together with its delta files: `parse_path` then takes the
  member named like the archive (`x.zip` → `x.csv`) and `parse_all` returns every member.
* TAC file: returns {TAC (int): display name}; the name is the brand (`brand_name`, else
  `manufacturer`) and the model (`marketing_name`, else `model_name`) joined by a space, each
  optional; other columns are ignored, rows with no name are left out, a later row for the same
  TAC wins.

IMEIs are normalised as DIRBS does: the first 14 characters of a value of at most 16 that starts
with 14 digits. DIRBS keeps other values as invalid IMEIs, but they cannot be keyed: they are an
error. Columns other than the ones named above are ignored. IMSIs are 5 to 15 digits.

Cell limits, as in the native format (eir.lists.native): reasons and device names at most
MAX_TEXT_CELL (1,024) characters, since they go out with every verdict (API answers, audit
records); MSISDN and status cells at most MAX_KEY_CELL (64); every other cell read is held to
its exact format. Columns not read are not kept (a row is bounded by BLOCK_SIZE).

Errors: every problem is reported as `file:line: field: problem` (line is the 1-based physical
line of the CSV, the header is line 1; for a zip, file is `archive.zip!member.csv`) and raised
together as `eir.lists.native.ListError`; a file with any problem returns nothing. Only the first
problems (by line) are spelled out, the rest counted. Parsing is vectorised (pyarrow.csv
streaming + pyarrow.compute / numpy) and streams a zip member without extracting it.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime
import io
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from eir.lists.entries import Attribute, Kind, ListDelta, ListEntries
from eir.lists.native import MAX_KEY_CELL, MAX_REPORTED_ERRORS, MAX_TEXT_CELL, ListError
from eir.lists.table import EntrySorter

Parsed = Union[ListEntries, ListDelta, dict]

BLOCK_SIZE = 16 << 20  # bytes of CSV per batch
MAX_MEMBER_BYTES = 256 << 30  # a 1.2-billion-row blacklist is ~50 GB of CSV
MAX_COMPRESSION_RATIO = 200  # CSV of digits compresses ~5-15:1; far beyond is a zip bomb
MAX_HEADER = 1 << 16
from eir.lists.names import DELTA_NAME, FULL_NAME  # noqa: E402 - light, no pyarrow

ADDING, REMOVING = "add", "remove"
DELTA_REASONS = {
    "blacklist": {"blocked": ADDING, "changed": ADDING, "unblocked": REMOVING},
    "notifications": {"new": ADDING, "changed": ADDING, "resolved": REMOVING,
                      "no_longer_seen": REMOVING, "blacklisted": REMOVING},
    "exceptions": {"added": ADDING, "removed": REMOVING},
    "whitelist": {"added": ADDING, "changed": ADDING, "removed": REMOVING},
}
COLUMNS = {  # required columns of each registry format, optional ones after "|"
    "blacklist": (("imei", "block_date", "reasons"), ()),
    "notifications": (("imei", "imsi", "msisdn", "block_date", "reasons"), ("amnesty_granted",)),
    "exceptions": (("imei", "imsi"), ("msisdn",)),
    "whitelist": (("imei",), ("registration_date",)),
    "stolen": (("imei", "reporting_date", "status", "change_type"), ()),
    "pairing": (("imei", "imsi", "change_type"), ("msisdn",)),
}
BRAND_COLUMNS = ("brand_name", "manufacturer")
MODEL_COLUMNS = ("marketing_name", "model_name")
# Per-cell maxima of the columns whose content is kept or echoed as it is (see _check_lengths);
# the same as the native format's (eir.lists.native).
CELL_LIMITS = {"reasons": MAX_TEXT_CELL, "msisdn": MAX_KEY_CELL, "status": MAX_KEY_CELL,
               **{column: MAX_TEXT_CELL for column in BRAND_COLUMNS + MODEL_COLUMNS}}
TRUE_WORDS = {"true", "t", "1", "yes", "y"}
FALSE_WORDS = {"false", "f", "0", "no", "n", ""}


# --- sources and problems -------------------------------------------------------------------

@dataclass
class _Source:
    label: str  # how problems name it: "dir/x.csv" or "dir/x.zip!x.csv"
    filename: str  # the CSV's own file name, for Attribute.source
    open: Callable[[], BinaryIO]
    path: Path | None = None  # a plain file (not a zip member)


class _Problems:
    """Row problems by 0-based data-row index, keeping only the first few in detail."""

    def __init__(self, limit: int = MAX_REPORTED_ERRORS - 1):
        self.limit = limit
        self.rows: list[tuple[int, int, str, str]] = []  # (row, order, field, text)
        self.total = 0
        self.invalid_rows = 0  # rows with the wrong number of cells (lines found later)

    def add(self, mask: np.ndarray, offset: int, field: str, values: pa.Array,
            describe: Callable[[str], str], order: int = 0) -> None:
        bad = np.flatnonzero(mask)
        if not len(bad):
            return
        self.total += len(bad)
        if len(self.rows) >= self.limit and bad[0] + offset > self.rows[-1][0]:
            return
        keep = bad[:self.limit]
        texts = values.take(pa.array(keep)).to_pylist()
        self.rows.extend((int(i) + offset, order, field, describe(t)) for i, t in zip(keep, texts))
        self.rows.sort()
        del self.rows[self.limit:]

    def __bool__(self) -> bool:
        return bool(self.total or self.invalid_rows)


def _fail(label: str, field: str, text: str, line: int | None = None) -> ListError:
    where = f"{label}:{line}" if line is not None else label
    return ListError([f"{where}: {field}: {text}"])


# --- reading CSV ------------------------------------------------------------------------------

@dataclass
class _Header:
    names: list[str]
    delimiter: str
    has_rows: bool


def _read_header(src: _Source, expected: str = "") -> _Header:
    with src.open() as stream:
        raw = stream.readline(MAX_HEADER)
        has_rows = bool(stream.read(1))
    hint = f" (expected {expected})" if expected else ""
    if not raw:
        raise _fail(src.label, "header", f"file is empty{hint}", 1)
    try:
        text = raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise _fail(src.label, "encoding", f"not UTF-8 ({exc.reason} at byte {exc.start})",
                    1) from None
    if not text.strip():
        raise _fail(src.label, "header", f"line 1 is blank{hint}", 1)
    delimiter = "|" if "|" in text and "," not in text else ","
    names = [cell.strip().lower() for cell in next(csv.reader([text], delimiter=delimiter))]
    return _Header(names, delimiter, has_rows)


def _check_columns(src: _Source, header: _Header, required, optional=()) -> None:
    missing = [name for name in required if name not in header.names]
    duplicated = sorted({name for name in header.names if header.names.count(name) > 1})
    what = []
    if missing:
        what.append(f"missing column(s) {', '.join(missing)}")
    if duplicated:
        what.append(f"repeated column(s) {', '.join(duplicated)}")
    if what:
        expected = ",".join(required) + "".join(f"[,{name}]" for name in optional)
        raise _fail(src.label, "header", f"{'; '.join(what)} (expected {expected})", 1)


def _batches(src: _Source, header: _Header, columns: list[str],
             problems: _Problems) -> Iterator[tuple[int, dict[str, pa.Array]]]:
    """(offset of the batch's first data row, {column: string array}) for every batch."""
    if not header.has_rows:
        return

    def invalid_row(row) -> str:
        problems.invalid_rows += 1
        return "skip"

    names = [name or f"_column{index}" for index, name in enumerate(header.names)]
    with src.open() as stream:
        try:
            reader = pv.open_csv(
                stream,
                read_options=pv.ReadOptions(column_names=names, skip_rows=1,
                                            block_size=BLOCK_SIZE, use_threads=True),
                parse_options=pv.ParseOptions(delimiter=header.delimiter,
                                              invalid_row_handler=invalid_row),
                convert_options=pv.ConvertOptions(
                    include_columns=columns, column_types={c: pa.string() for c in columns},
                    strings_can_be_null=False, quoted_strings_can_be_null=False))
            offset = 0
            for batch in reader:
                yield offset, {name: batch.column(name) for name in columns}
                offset += batch.num_rows
        except pa.ArrowInvalid as exc:
            if "UTF8" in str(exc) or "UTF-8" in str(exc):
                raise _NotUtf8() from None
            raise _fail(src.label, "csv", str(exc)) from None


class _NotUtf8(Exception):
    """pyarrow met bytes that are not UTF-8 (it does not say where)."""


def _first_bad_utf8(src: _Source) -> tuple[int, str]:
    """(line, problem) of the first byte that is not UTF-8, found by a plain scan."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, position = 1, 0
    with src.open() as stream:
        while chunk := stream.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # the decoder may hold back up to 3 bytes of the previous chunk
                start = max(exc.start - (len(exc.object) - len(chunk)), 0)
                line += chunk.count(b"\n", 0, start)
                return line, (f"{src.label}:{line}: encoding: not UTF-8 ({exc.reason} at byte "
                              f"{position + start})")
            line += chunk.count(b"\n")
            position += len(chunk)
    return line, f"{src.label}: encoding: not UTF-8"


class _LossyUtf8(io.RawIOBase):
    """A byte stream with every byte that is not UTF-8 replaced by U+FFFD."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(1 << 20)
            self.pending = self.decoder.decode(chunk, final=not chunk).encode("utf-8")
            if not chunk:
                break
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size

    def close(self) -> None:
        self.raw.close()
        super().close()


def _guarded(src: _Source, parse: Callable[[_Source], object]):
    """parse(src), adding the file-level checks: a plain file cut short mid-row, and bytes
    that are not UTF-8 (reported with their line together with every row problem, found by
    parsing again with the bad bytes replaced)."""
    cut = _cut_short(src)
    try:
        result = parse(src)
    except _NotUtf8:
        pass
    except ListError as exc:
        raise ListError(exc.problems + cut) from None
    else:
        if cut:
            raise ListError(cut)
        return result
    line, found = _first_bad_utf8(src)
    lossy = _Source(src.label, src.filename, lambda: io.BufferedReader(_LossyUtf8(src.open())))
    try:
        parse(lossy)
        problems = []
    except ListError as exc:
        problems = exc.problems
    placed = [problem for problem in problems if _line_of(problem, src.label) <= line]
    raise ListError(placed + [found] + problems[len(placed):] + cut)


def _line_of(problem: str, label: str) -> float:
    match = re.match(r"(\d+):", problem[len(label) + 1:])
    return int(match[1]) if match else float("inf")


def _cut_short(src: _Source) -> list[str]:
    """A plain file must end with a line end: DIRBS ends every row with one, and a file cut
    short mid-row could otherwise pass as valid. (A zip member is covered by its CRC; a file
    of one line, the header alone, has no rows to cut.)"""
    if src.path is None:
        return []
    try:
        with open(src.path, "rb") as stream:
            if stream.seek(0, 2) == 0:
                return []
            stream.seek(-1, 2)
            if stream.read(1) in b"\r\n":
                return []
            stream.seek(0)
            line = sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 20), b""))
            line += 1
    except OSError:
        return []  # the parse says why it cannot be read
    if line == 1:
        return []
    return [f"{src.label}:{line}: row: the last line has no line end (file cut short?)"]


def _problem_lines(src: _Source, problems: _Problems, ncells: int = 0,
                   delimiter: str = ",") -> list[str]:
    """`file:line: field: problem` for every collected problem. The physical line of a data
    row is found by re-reading the file with Python's csv module, the way pyarrow split it
    (blank lines skipped, rows with the wrong number of cells skipped and reported), stopping
    as soon as every wanted row is placed."""
    wanted = {row for row, _, _, _ in problems.rows}
    last_wanted = max(wanted, default=-1)
    lines: dict[int, int] = {}
    cell_problems: list[tuple[int, str]] = []
    cell_total = 0
    # pyarrow took cells as large as a block; csv's default limit (128 KiB) would stop the
    # re-read at the first such cell, whose line is wanted (a 4 MB reasons cell).
    field_limit = csv.field_size_limit(max(csv.field_size_limit(), BLOCK_SIZE))
    with src.open() as stream, _restored_field_limit(field_limit):
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        previous_end, index = 0, -1
        try:
            for record in reader:
                start, previous_end = previous_end + 1, reader.line_num
                if index == -1:  # the header
                    ncells = ncells or len(record)
                    index = 0
                    continue
                if not record:
                    continue
                if len(record) != ncells:
                    cell_total += 1
                    if len(cell_problems) < problems.limit:
                        cell_problems.append(
                            (start, f"{src.label}:{start}: row: {len(record)} cells, header "
                                    f"has {ncells}"))
                else:
                    if index in wanted:
                        lines[index] = start
                    index += 1
                if index > last_wanted and cell_total >= problems.invalid_rows:
                    break
        except csv.Error as exc:
            cell_problems.append((reader.line_num, f"{src.label}:{reader.line_num}: row: {exc}"))
    placed = cell_problems + [
        (lines.get(row, 0), f"{src.label}:{lines.get(row, '?')}: {field}: {text}")
        for row, _, field, text in problems.rows]
    placed.sort(key=lambda item: item[0])
    shown = [text for _, text in placed[:problems.limit]]
    more = problems.total + max(cell_total, problems.invalid_rows) - len(shown)
    if more > 0:
        shown.append(f"{src.label}: ... and {more} more problems in this file")
    return shown


@contextlib.contextmanager
def _restored_field_limit(limit: int):
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def _raise_if_problems(src: _Source, header: _Header, problems: _Problems) -> None:
    if problems:
        raise ListError(_problem_lines(src, problems, len(header.names), header.delimiter))


# --- vectorised cell checks -------------------------------------------------------------------

def _numbers(values: pa.Array, lengths_ok: pa.Array, digits: pa.Array,
             pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """(`digits` as uint64, mask of values that are bad). Fast path: every value passes
    `lengths_ok` and `digits` casts in one go (Arrow's parse takes digits only); otherwise
    a per-cell regex finds the bad ones, which come out as 0."""
    if pc.all(lengths_ok).as_py() is not False:
        try:
            numbers = pc.cast(digits, pa.uint64()).to_numpy(zero_copy_only=False)
            return numbers, np.zeros(len(values), bool)
        except pa.ArrowInvalid:
            pass
    ok = pc.and_(pc.match_substring_regex(values, pattern), lengths_ok)
    numbers = pc.cast(pc.if_else(ok, digits, "0"), pa.uint64()).to_numpy(zero_copy_only=False)
    return numbers, ~ok.to_numpy(zero_copy_only=False)


def _imei_keys(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(14-digit keys as uint64, mask of values that are not IMEIs): 14 to 16 characters
    starting with 14 digits."""
    lengths = pc.binary_length(values)
    return _numbers(values, pc.and_(pc.greater_equal(lengths, 14), pc.less_equal(lengths, 16)),
                    pc.utf8_slice_codeunits(values, 0, 14), r"^[0-9]{14}")


def _shown(text: str) -> str:
    """A cell as a problem quotes it: in full when it could be valid somewhere, else by its
    length (a 4 MB cell is not copied into the error, the log and the sync's result)."""
    return repr(text) if len(text) <= MAX_KEY_CELL else f"a cell of {len(text)} characters"


def _check_lengths(cells: dict[str, pa.Array], offset: int, problems: _Problems) -> None:
    """Every free-text cell (reasons, device names) within MAX_TEXT_CELL characters, and the
    MSISDN and status cells, which no other check reads in full, within MAX_KEY_CELL. Other
    cells are held to their exact format (IMEI, IMSI, TAC, date, change type, true/false)."""
    for column, values in cells.items():
        limit = CELL_LIMITS.get(column)
        if limit is None:
            continue
        too_long = pc.greater(pc.utf8_length(values), limit).to_numpy(zero_copy_only=False)
        problems.add(too_long, offset, column, values,
                     lambda text, limit=limit: f"{len(text)} characters (at most {limit} in "
                                               "this column)", 5)


def _describe_imei(text: str) -> str:
    if len(text) > 16:
        return f"{_shown(text)} has {len(text)} characters, an IMEI has at most 16"
    return f"{text!r} is not an IMEI (it must start with 14 digits)"


def _imsi_numbers(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    lengths = pc.binary_length(values)
    return _numbers(values, pc.and_(pc.greater_equal(lengths, 5), pc.less_equal(lengths, 15)),
                    values, r"^[0-9]{5,15}$")


def _describe_imsi(text: str) -> str:
    return f"{_shown(text)} is not an IMSI (5 to 15 digits)"


def _parse_date(text: str, allow_empty: bool = False) -> int | None:
    """YYYYMMDD as an int, 0 for an allowed empty cell, None when not a date."""
    if not text and allow_empty:
        return 0
    if len(text) != 8 or not text.isascii() or not text.isdigit():
        return None
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
    return int(text)


def _describe_date(text: str) -> str:
    return f"{_shown(text)} is not a date (YYYYMMDD)"


def _reason_text(reasons: str) -> str:
    return ", ".join(part.strip() for part in reasons.split("|") if part.strip())


def _codes(values: pa.Array) -> tuple[np.ndarray, list[str]]:
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            encoded.dictionary.to_pylist())


class _Attributes:
    """Shared attributes: one per distinct (kind, block_date, reason)."""

    def __init__(self, source: str):
        self.source = source
        self.list: list[Attribute] = []
        self.index: dict[tuple, int] = {}

    def get(self, kind: Kind, block_date: int = 0, reason: str = "") -> int:
        key = (kind, block_date, reason)
        found = self.index.get(key)
        if found is None:
            found = self.index[key] = len(self.list)
            self.list.append(Attribute(kind=kind, source=self.source, block_date=block_date,
                                       reason=reason))
        return found

    def for_rows(self, columns: list[pa.Array],
                 attribute_of: Callable[..., int | None]) -> np.ndarray:
        """The attribute index of every row: the distinct combinations of `columns` are
        found vectorised, `attribute_of(*cells)` is called once per combination and returns
        an index, or None for a bad combination (the row gets -1)."""
        code = np.zeros(len(columns[0]), np.int64)
        dictionaries = []
        for values in columns:
            indices, dictionary = _codes(values)
            code = code * max(len(dictionary), 1) + indices
            dictionaries.append(dictionary)
        space = 1
        for dictionary in dictionaries:
            space *= max(len(dictionary), 1)
        if space <= 1 << 22:  # few combinations: a direct table, no sort
            present = np.zeros(space, bool)
            present[code] = True
            unique = np.flatnonzero(present)
            slot_of = np.zeros(space, np.int64)
            slot_of[unique] = np.arange(len(unique))
            inverse = slot_of[code]
        else:
            unique, inverse = np.unique(code, return_inverse=True)
        table = np.empty(len(unique), np.int64)
        for slot, combined in enumerate(unique.tolist()):
            cells = []
            for dictionary in reversed(dictionaries):
                combined, at = divmod(combined, max(len(dictionary), 1))
                cells.append(dictionary[at])
            found = attribute_of(*reversed(cells))
            table[slot] = -1 if found is None else found
        return table[inverse.reshape(-1)]


# --- registry lists ---------------------------------------------------------------------------

@dataclass
class _Rows:
    """What one registry file holds: keys, attribute per row, and for deltas which rows add."""

    imei: np.ndarray
    imsi: np.ndarray
    attribute: np.ndarray
    adds: np.ndarray  # bool
    attributes: list[Attribute]
    rows: int
    subscriber: np.ndarray  # notified IMSIs (notifications only; else empty)
    ordered: bool = False  # in key order (eir.lists.table)


def _read_rows(src: _Source, fmt: str, sort: bool = False,
               scratch: Path | None = None) -> _Rows:
    return _guarded(src, lambda source: _read_rows_unguarded(source, fmt, sort, scratch))


def _read_rows_unguarded(src: _Source, fmt: str, sort: bool, scratch: Path | None) -> _Rows:
    """Parse a DIRBS list (blacklist, notifications, exceptions) or an import-side delta
    (stolen, pairing): every row validated, everything refused on any problem.

    With `sort` (full lists), rows come back in key order (eir.lists.table), sorted in
    runs spilled to `scratch` when given: memory stays bounded for a national-size list."""
    required, optional = COLUMNS[fmt]
    header = _read_header(src, ",".join(required))
    _check_columns(src, header, required, optional)
    wanted = [c for c in ("imei", "imsi", "msisdn", "block_date", "reasons",
                          "amnesty_granted", "reporting_date", "registration_date", "status",
                          "change_type")
              if c in header.names]
    problems = _Problems()
    attributes = _Attributes(src.filename)
    parts: dict[str, list[np.ndarray]] = {"imei": [], "imsi": [], "attribute": [], "adds": [],
                                          "subscriber": []}
    sorter = EntrySorter(scratch) if sort else None
    rows = 0
    for offset, cells in _batches(src, header, wanted, problems):
        count = len(cells["imei"])
        rows += count
        _check_lengths(cells, offset, problems)
        imei, bad = _imei_keys(cells["imei"])
        problems.add(bad, offset, "imei", cells["imei"], _describe_imei, 0)
        imsi = subscriber = None  # None: zero throughout
        if "imsi" in cells:
            numbers, bad = _imsi_numbers(cells["imsi"])
            problems.add(bad, offset, "imsi", cells["imsi"], _describe_imsi, 1)
            if fmt in ("exceptions", "pairing"):
                imsi = numbers
            elif fmt == "notifications":
                subscriber = numbers
        adds = np.ones(count, bool)
        attribute = _batch_attributes(fmt, cells, offset, attributes, problems, adds)
        if sorter is not None:
            if not problems:  # a refused file is not sorted
                sorter.add(imei, imsi, subscriber, attribute.astype(np.uint32))
            continue
        for name, value in (("imei", imei), ("imsi", imsi), ("attribute", attribute),
                            ("adds", adds), ("subscriber", subscriber)):
            if name == "imsi" and value is None:
                value = np.zeros(count, np.uint64)
            if value is not None:
                parts[name].append(value)
    _raise_if_problems(src, header, problems)
    if sorter is not None:
        block = sorter.finish()
        return _Rows(block.imei, block.imsi, block.attribute, np.ones(0, bool),
                     attributes.list, rows,
                     block.subscriber if fmt == "notifications" else np.zeros(0, np.uint64),
                     ordered=True)

    def joined(name, dtype):
        return np.concatenate(parts[name]).astype(dtype, copy=False) if parts[name] else \
            np.zeros(0, dtype)

    return _Rows(joined("imei", np.uint64), joined("imsi", np.uint64),
                 joined("attribute", np.uint32), joined("adds", bool), attributes.list, rows,
                 joined("subscriber", np.uint64))


def _batch_attributes(fmt: str, cells: dict[str, pa.Array], offset: int,
                      attributes: _Attributes, problems: _Problems,
                      adds: np.ndarray) -> np.ndarray:
    """Attribute index per row of one batch (and, for change_type deltas, which rows add)."""
    count = len(cells["imei"])
    if fmt in ("exceptions", "pairing"):
        if fmt == "pairing":
            _change_types(cells, offset, problems, adds, ("add", "remove"))
        return np.full(count, attributes.get(Kind.EXCEPTION), np.int64)
    if fmt == "stolen":
        blocking = _change_types(cells, offset, problems, adds, ("add", "remove", "update"))
        status = pc.utf8_lower(pc.utf8_trim_whitespace(cells["status"]))
        blocking &= pc.is_in(status, pa.array(["", "blacklist"])).to_numpy(zero_copy_only=False)
        adds &= blocking

        def stolen(date_text: str) -> int | None:
            day = _parse_date(date_text, allow_empty=True)
            return None if day is None else attributes.get(Kind.BLACKLIST, day, "reported stolen")

        index = attributes.for_rows([cells["reporting_date"]], stolen)
        problems.add(index < 0, offset, "reporting_date", cells["reporting_date"],
                     _describe_date, 2)
        return index
    if fmt == "whitelist":
        if "registration_date" not in cells:
            return np.full(count, attributes.get(Kind.WHITELIST), np.int64)

        def registered(date_text: str) -> int | None:
            day = _parse_date(date_text, allow_empty=True)
            return None if day is None else attributes.get(Kind.WHITELIST, day)

        index = attributes.for_rows([cells["registration_date"]], registered)
        problems.add(index < 0, offset, "registration_date", cells["registration_date"],
                     _describe_date, 2)
        return index
    kind = Kind.BLACKLIST if fmt == "blacklist" else Kind.NOTIFICATION
    columns = [cells["block_date"], cells["reasons"]]
    if "amnesty_granted" in cells:
        columns.append(cells["amnesty_granted"])
    bad_dates: set[str] = set()
    bad_amnesty: set[str] = set()

    def attribute_of(date_text: str, reasons: str, amnesty: str = "") -> int | None:
        day = _parse_date(date_text)
        granted = amnesty.strip().lower()
        if day is None:
            bad_dates.add(date_text)
        if granted not in TRUE_WORDS | FALSE_WORDS:
            bad_amnesty.add(amnesty)
        if day is None or granted not in TRUE_WORDS | FALSE_WORDS:
            return None
        reason = _reason_text(reasons) + (" (amnesty granted)" if granted in TRUE_WORDS else "")
        return attributes.get(kind, day, reason)

    index = attributes.for_rows(columns, attribute_of)
    if bad_dates:
        mask = pc.is_in(cells["block_date"], pa.array(sorted(bad_dates))).to_numpy(
            zero_copy_only=False)
        problems.add(mask, offset, "block_date", cells["block_date"], _describe_date, 2)
    if bad_amnesty:
        mask = pc.is_in(cells["amnesty_granted"], pa.array(sorted(bad_amnesty))).to_numpy(
            zero_copy_only=False)
        problems.add(mask, offset, "amnesty_granted", cells["amnesty_granted"],
                     lambda text: f"{_shown(text)} is not true or false", 3)
    return index


def _change_types(cells, offset, problems: _Problems, adds: np.ndarray,
                  allowed: tuple[str, ...]) -> np.ndarray:
    """Sets `adds` from change_type (add/update add, remove removes); returns the mask of
    rows that add."""
    change = pc.utf8_lower(pc.utf8_trim_whitespace(cells["change_type"]))
    known = pc.is_in(change, pa.array(list(allowed))).to_numpy(zero_copy_only=False)
    problems.add(~known, offset, "change_type", cells["change_type"],
                 lambda text: f"{_shown(text)} is not one of {', '.join(allowed)}", 4)
    adds[:] = pc.not_equal(change, "remove").to_numpy(zero_copy_only=False)
    return adds.copy()


def _entries(name: str, rows: _Rows, mask: np.ndarray | None = None) -> ListEntries:
    if mask is None:
        return ListEntries(name=name, imei=rows.imei, imsi=rows.imsi, attribute=rows.attribute,
                           attributes=rows.attributes, rows=rows.rows,
                           subscriber=rows.subscriber, ordered=rows.ordered)
    return ListEntries(name=name, imei=rows.imei[mask], imsi=rows.imsi[mask],
                       attribute=rows.attribute[mask], attributes=rows.attributes,
                       rows=int(mask.sum()),
                       subscriber=rows.subscriber[mask] if len(rows.subscriber) else
                       rows.subscriber)


def _list_family(list_name: str) -> str:
    return list_name.split("_", 1)[0].lower()


def read_full_list(src: _Source, list_name: str, scratch: Path | None = None) -> ListEntries:
    return _entries(src.label, _read_rows(src, _list_family(list_name), True, scratch))


def read_delta_list(src: _Source, list_name: str, base: str, run: str,
                    reason: str) -> ListDelta:
    family = _list_family(list_name)
    effect = DELTA_REASONS[family].get(reason.lower())
    if effect is None:
        raise _fail(src.label, "name", f"delta reason {reason!r} is not one of "
                    f"{', '.join(DELTA_REASONS[family])} for a {family} delta")
    rows = _read_rows(src, family)
    empty = ListEntries(name=src.label, attributes=rows.attributes)
    full = _entries(src.label, rows)
    added, removed = (full, empty) if effect == ADDING else (empty, full)
    return ListDelta(list_name=list_name, base=base, run=run, added=added, removed=removed)


def read_change_delta(src: _Source, fmt: str) -> ListDelta:
    """An import-side delta with a change_type column (stolen or pairing list)."""
    rows = _read_rows(src, fmt)
    return ListDelta(list_name=fmt, base="", run="",
                     added=_entries(src.label, rows, rows.adds),
                     removed=_entries(src.label, rows, ~rows.adds))


# --- TAC file ---------------------------------------------------------------------------------

def read_tac_names(src: _Source) -> dict[int, str]:
    return _guarded(src, _read_tac_names)


def _read_tac_names(src: _Source) -> dict[int, str]:
    header = _read_header(src, "tac,manufacturer,model_name,...")
    if not header.names or header.names[0] != "tac":
        raise _fail(src.label, "header", "the first column must be tac", 1)
    brands = [c for c in BRAND_COLUMNS if c in header.names]
    models = [c for c in MODEL_COLUMNS if c in header.names]
    _check_columns(src, header, ["tac"])
    if not brands and not models:
        raise _fail(src.label, "header", "no device-name column (expected any of "
                    f"{', '.join(BRAND_COLUMNS + MODEL_COLUMNS)})", 1)
    problems = _Problems()
    tacs: list[np.ndarray] = []
    names: list[pa.Array] = []
    for offset, cells in _batches(src, header, ["tac", *brands, *models], problems):
        _check_lengths(cells, offset, problems)
        tac = cells["tac"]
        ok = pc.match_substring_regex(tac, r"^[0-9]{8}$")
        problems.add(~ok.to_numpy(zero_copy_only=False), offset, "tac", tac,
                     lambda text: f"{_shown(text)} is not a TAC (8 digits)")
        brand = _first_filled([cells[c] for c in brands])
        model = _first_filled([cells[c] for c in models])
        name = pc.binary_join_element_wise(brand, model, " ")
        name = pc.if_else(pc.equal(brand, ""), model, pc.if_else(pc.equal(model, ""), brand, name))
        keep = pc.and_(ok, pc.not_equal(name, ""))
        tacs.append(pc.cast(pc.filter(tac, keep), pa.uint32()).to_numpy(zero_copy_only=False))
        names.append(pc.filter(name, keep))
    _raise_if_problems(src, header, problems)
    result: dict[int, str] = {}
    for tac_numbers, name_array in zip(tacs, names):
        result.update(zip(tac_numbers.tolist(), name_array.to_pylist()))
    return result


def _first_filled(columns: list[pa.Array]) -> pa.Array:
    if not columns:
        return pa.scalar("")
    trimmed = [pc.utf8_trim_whitespace(column) for column in columns]
    result = trimmed[-1]
    for column in reversed(trimmed[:-1]):
        result = pc.if_else(pc.equal(column, ""), result, column)
    return result


# --- dispatch ---------------------------------------------------------------------------------

def _sniff(header: _Header) -> str | None:
    names = header.names
    if names and names[0] == "tac":
        return "tac"
    if "imei" not in names:
        return None
    if "status" in names and "change_type" not in names:
        return "native"
    if "change_type" in names:
        return "stolen" if "reporting_date" in names else "pairing"
    if "block_date" in names:
        return "notifications" if "imsi" in names else "blacklist"
    if "imsi" in names:
        return "exceptions"
    if set(names) <= {"imei", "registration_date"}:
        return "whitelist"
    return None


def _parse_source(src: _Source, native: Callable[[], ListEntries],
                  scratch: Path | None = None) -> Parsed:
    name = src.filename
    match = DELTA_NAME.match(name)
    if match:
        return read_delta_list(src, match["list"], match["base"], match["run"], match["reason"])
    match = FULL_NAME.match(name)
    if match:
        return read_full_list(src, match["list"], scratch)
    if _is_native(src):
        return native()
    header = _read_header(src)
    fmt = _sniff(header)
    if fmt == "tac":
        return read_tac_names(src)
    if fmt in ("stolen", "pairing"):
        return read_change_delta(src, fmt)
    if fmt in ("blacklist", "notifications", "exceptions", "whitelist"):
        return read_full_list(src, fmt, scratch)
    raise _fail(src.label, "header", f"not a known list format: {','.join(header.names)!r} "
                "(see eir.lists.formats for the accepted files)", 1)


def _is_native(src: _Source) -> bool:
    """The native format allows comment and blank lines before its header: look past them."""
    with src.open() as stream:
        for _ in range(1000):
            raw = stream.readline(MAX_HEADER)
            if not raw:
                return False
            text = raw.decode("utf-8-sig", errors="replace").strip()
            if text and not text.startswith("#"):
                cells = [cell.strip().lower() for cell in text.split(",")]
                return "imei" in cells and "status" in cells and "change_type" not in cells
    return False


def _zip_error(label: str, exc: Exception) -> ListError:
    return _fail(label, "zip", f"corrupt or truncated archive ({exc})")


def parse_path(path: Path | str, display_name: str | None = None) -> Parsed:
    """Parse one list file by its name (DIRBS patterns) or, failing that, its header:
    ListEntries (a full list), ListDelta (a delta) or {TAC: display name} (a TAC file).
    Raises ListError naming file, line and field of every problem."""
    results = parse_all(path, display_name, only_main=True)
    return results[0]


def parse_all(path: Path | str, display_name: str | None = None,
              only_main: bool = False, scratch: Path | None = None) -> list[Parsed]:
    """Like parse_path, but a zip holding several CSVs (DIRBS zips a full list together with
    its delta files) gives one result per CSV, in member order. With only_main, a zip with
    several CSVs gives only the one named like the archive (`x.zip` → `x.csv`). With
    `scratch`, full lists are sorted in runs spilled there (see eir.lists.table) and come
    back memory-mapped from it: the directory must outlive the results."""
    from eir.lists.native import read_native_entries

    path = Path(path)
    label = display_name or str(path)
    if path.suffix.lower() != ".zip":
        src = _Source(label, path.name, lambda: _open_file(path, label), path)
        return [_parse_source(src, lambda: read_native_entries(path, display_name), scratch)]
    try:
        archive = zipfile.ZipFile(path)
    except OSError as exc:
        raise _fail(label, "open", str(exc.strerror or exc)) from None
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise _zip_error(label, exc) from None
    with archive:
        members = [info for info in archive.infolist()
                   if not info.is_dir() and info.filename.lower().endswith(".csv")]
        if not members:
            raise _fail(label, "zip", "holds no .csv file")
        for info in members:
            # zipfile never returns more than a member's declared size, so refusing absurd
            # declarations bounds what a hostile archive (a zip bomb) can make us parse.
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > MAX_MEMBER_BYTES or (
                    ratio > MAX_COMPRESSION_RATIO and info.file_size > 1 << 30):
                raise _fail(f"{label}!{info.filename}", "zip",
                            f"member of {info.file_size} bytes compressed {ratio:.0f}:1: "
                            "refused as a possible zip bomb")
        if len(members) > 1 and only_main:
            main = [info for info in members if Path(info.filename).name.lower()
                    == path.with_suffix(".csv").name.lower()]
            if len(main) != 1:
                raise _fail(label, "zip", f"holds {len(members)} CSV files and none named "
                            f"{path.with_suffix('.csv').name}")
            members = main
        results = []
        for info in members:
            member_name = Path(info.filename).name
            if not (FULL_NAME.match(member_name) or DELTA_NAME.match(member_name)) \
                    and len(members) == 1 and (FULL_NAME.match(path.name)
                                               or DELTA_NAME.match(path.name)):
                member_name = path.with_suffix(".csv").name  # the archive's name says what it is
            src = _Source(f"{label}!{info.filename}", member_name,
                          lambda info=info: archive.open(info))
            try:
                results.append(_parse_source(src, lambda src=src: _native_from_zip(src),
                                             scratch))
            except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                raise _zip_error(src.label, exc) from None
        return results


def _open_file(path: Path, label: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise _fail(label, "open", f"cannot open: {exc.strerror or exc}") from None


def _native_from_zip(src: _Source) -> ListEntries:
    raise _fail(src.label, "zip", "a native list (imei,status,...) is read from a plain .csv "
                "file, not from a zip")
