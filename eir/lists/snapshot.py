"""Compiled list snapshots: immutable, memory-mappable, a few bytes per IMEI.

A snapshot is one file (or one bytes object) holding every list entry in sorted arrays that
are searched in place: opening it parses a small JSON header (attributes, sources, section
table), never the entries, so start-up time does not grow with the list. The server swaps
whole snapshots by reference; a request sees one snapshot from start to end.

Layout (little-endian; every section 8-byte aligned):

    b"EIRSNAP1", uint32 header length, uint32 0, header JSON, sections

Sections (N exact IMEIs, T TACs among them, P paired entries, S range segments, R TAC rules):

    tac          uint32[T]    sorted TACs that have exact-IMEI entries
    tac_start    uint64[T+1]  where each TAC's entries start in imei_key
    imei_key     uint32[N]    (SNR << 12) | low 12 bits of the entry's attribute set,
                              sorted by SNR within each TAC: 4 bytes per IMEI
    imei_fence   uint32[ceil(N/64)]  imei_key[::64], searched first so that a lookup reads
                              one 256-byte block of imei_key instead of ~20 scattered probes
                              (format 2; a format-1 file has none and is still read)
    imei_set_hi  uint8[N]     high 8 bits of the attribute set, only when there are more
                              than 4,096 sets (registry lists rarely have: one set per
                              distinct block date × reasons)
    pair_imei, pair_imsi  uint64[P], pair_set uint32[P]     IMEI+IMSI entries, sorted
    range_start  uint64[S], range_first uint32[S+1]         elementary range segments
    range_imsi   uint64[C], range_set uint32[C]             rules covering each segment
    tacrule_tac  uint32[R], tacrule_imsi uint64[R], tacrule_set uint32[R]
    tacname_tac  uint32[M], tacname_end uint32[M], tacname_text bytes   device names

An attribute set is a sorted tuple of attribute indexes: the meanings of every list entry for
that key (an IMEI on both the blacklist and a notification list has a set of two). Set i for
i < len(attributes) is the single attribute i; combinations follow.
"""

from __future__ import annotations

import bisect
import io
import json
import mmap
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from eir.core.decision import (
    EquipmentStatus,
    Match,
    Rule,
    RuleSet,
    UnknownPolicy,
    Verdict,
    format_day,
)
from eir.lists.entries import Attribute, Kind, ListEntries, RangeRule, TacRule
from eir.lists.sections import SectionWriter
from eir.lists.table import Block, entries_block, merge

# The exact-IMEI search in C (eir/lists/_lookup.c), when it was built; EIR_PURE_PYTHON=1 turns it
# off (benchmarks, and a check that the fallback still works).
try:
    from eir.lists._lookup import ExactIndex as _ExactIndex
except ImportError:  # no compiler at install time: the pure-Python search below
    _ExactIndex = None
if os.environ.get("EIR_PURE_PYTHON"):
    _ExactIndex = None

MAGIC = b"EIRSNAP1"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: no imei_fence
FENCE_STRIDE = 64  # imei_fence holds every 64th imei_key
SNR_DIGITS = 1_000_000  # 6-digit serial number: the low digits of a 14-digit IMEI
SET_LOW_BITS = 12
SET_LOW_MASK = (1 << SET_LOW_BITS) - 1
MAX_SETS = 1 << (SET_LOW_BITS + 8)

_SECTION_TYPES = {
    "tac": "I", "tac_start": "Q", "imei_key": "I", "imei_fence": "I", "imei_set_hi": "B",
    "pair_imei": "Q", "pair_imsi": "Q", "pair_set": "I",
    "range_start": "Q", "range_first": "I", "range_imsi": "Q", "range_set": "I",
    "tacrule_tac": "I", "tacrule_imsi": "Q", "tacrule_set": "I",
    "tacname_tac": "I", "tacname_end": "I", "tacname_text": "B",
}
_NUMPY_TYPES = {"I": "<u4", "Q": "<u8", "B": "u1"}


# Precedence levels as ints (hashing an Enum member runs Python code: not on the hot path).
_MATCHES = (Match.IMEI_IMSI, Match.IMEI, Match.RANGE_IMSI, Match.RANGE, Match.TAC_IMSI,
            Match.TAC)
IMEI_IMSI, IMEI, RANGE_IMSI, RANGE, TAC_IMSI, TAC = range(6)


class SnapshotError(Exception):
    """A snapshot file cannot be used; the message says which and why."""


# -- compiling ------------------------------------------------------------------------------


class _SetTable:
    """Interns attribute combinations; set i < len(attributes) is attribute i alone."""

    def __init__(self, attribute_count: int):
        self.base = attribute_count
        self.combinations: list[tuple[int, ...]] = []
        self._index: dict[tuple[int, ...], int] = {}

    def intern(self, members: Iterable[int]) -> int:
        key = tuple(sorted(set(int(m) for m in members)))
        if len(key) == 1:
            return key[0]
        found = self._index.get(key)
        if found is None:
            found = self._index[key] = self.base + len(self.combinations)
            self.combinations.append(key)
        return found


def _fold(keys: np.ndarray, sets: np.ndarray, combined: list,
          secondary: np.ndarray | None = None):
    """Entries sorted by key (then secondary): equal keys folded into one combined set. The
    sets of several entries are left to intern: `combined` gets (key, secondary or -1, the
    returned set array, its index, the members) for each (see _intern_in_key_order)."""
    same = keys[1:] == keys[:-1]
    if secondary is not None:
        same &= secondary[1:] == secondary[:-1]
    if not same.any():
        return keys, sets, secondary
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    bounds = np.append(starts, len(keys))
    merged = sets[starts].copy()
    # Python only over the groups that really have several entries (rare in real lists).
    for group in np.flatnonzero(np.diff(bounds) > 1):
        start = bounds[group]
        combined.append((int(keys[start]), -1 if secondary is None else int(secondary[start]),
                         merged, group, sets[start:bounds[group + 1]].tolist()))
    return keys[starts], merged, secondary[starts] if secondary is not None else None


def _intern_in_key_order(combined: list, table: _SetTable) -> None:
    """Intern the combined sets _fold left, in key order (plain before pairs of one IMEI):
    the order the whole list would give, so that the set numbers, and the snapshot's bytes,
    do not depend on where the merge cut its blocks."""
    combined.sort(key=lambda group: group[:2])
    for _, _, merged, index, members in combined:
        merged[index] = table.intern(members)


def _range_segments(ranges, attribute_ids):
    """Elementary segments of overlapping ranges, each with every rule covering it."""
    points = sorted({r.start for r in ranges} | {r.end + 1 for r in ranges})
    by_start = sorted(range(len(ranges)), key=lambda i: ranges[i].start)
    starts, first, imsis, sets = [], [0], [], []
    active: list[int] = []
    next_rule = 0
    for point in points:
        while next_rule < len(by_start) and ranges[by_start[next_rule]].start <= point:
            active.append(by_start[next_rule])
            next_rule += 1
        active = [i for i in active if ranges[i].end >= point]
        starts.append(point)
        for i in active:
            imsis.append(ranges[i].imsi)
            sets.append(attribute_ids[i])
        first.append(len(imsis))
    return starts, first, imsis, sets


def entries_from_rules(rules: Iterable[Rule], name: str = "rules") -> ListEntries:
    """Native list rows (eir.core.decision.Rule) as ListEntries: one attribute per row, since
    each row has its own source line and reason."""
    imeis, imsis, ids = [], [], []
    entries = ListEntries(name)
    for rule in rules:
        entries.rows += 1
        attribute = Attribute(Kind.NATIVE, rule.source, rule.status, 0, rule.reason,
                              rule.subject)
        imsi = int(rule.imsi) if rule.imsi else 0
        if rule.imei is not None:
            imeis.append(int(rule.imei))
            imsis.append(imsi)
            ids.append(len(entries.attributes))
            entries.attributes.append(attribute)
        elif rule.imei_range is not None:
            entries.ranges.append(RangeRule(*rule.imei_range, imsi, attribute))
        elif rule.tac is not None:
            entries.tacs.append(TacRule(int(rule.tac), imsi, attribute))
        else:
            raise ValueError(f"{rule.source}: rule has no IMEI, range or TAC")
    entries.imei = np.array(imeis, dtype=np.uint64)
    entries.imsi = np.array(imsis, dtype=np.uint64)
    entries.attribute = np.array(ids, dtype=np.uint32)
    return entries


def compile_snapshot(lists: Iterable[ListEntries], version: str,
                     tac_names: dict[int, str] | None = None,
                     sources: list[dict] | None = None, created: float | None = None,
                     states: dict[str, str] | None = None) -> bytes:
    """Compile parsed lists into the bytes of one snapshot (see the module docstring)."""
    out = io.BytesIO()
    write_snapshot(out, lists, version, tac_names, sources, created, states)
    return out.getvalue()


def build_rule_set(rules: Iterable[Rule], unknown_policy: UnknownPolicy = UnknownPolicy.UNKNOWN,
                   version: str = "0", name: str = "rules", grandfathering=None) -> RuleSet:
    """A RuleSet over rules (the native list's rows) compiled into an in-memory snapshot."""
    snapshot = compile_snapshot([entries_from_rules(rules, name)], version)
    return RuleSet(Snapshot.from_bytes(snapshot), unknown_policy, grandfathering)


def write_snapshot(out: BinaryIO, lists: Iterable[ListEntries], version: str,
                   tac_names: dict[int, str] | None = None,
                   sources: list[dict] | None = None, created: float | None = None,
                   states: dict[str, str] | None = None, scratch: Path | None = None,
                   manifest: dict | None = None) -> dict:
    """Compile parsed lists into a snapshot written to `out`; returns its counts.

    The lists are walked together in key order, a block at a time (eir.lists.table), and
    the large sections are spilled to `scratch` as they grow: memory stays bounded whatever
    the size of the lists. Lists whose entries are not in key order (native lists, tests)
    are sorted first, in memory.
    """
    lists = list(lists)
    attributes: list[Attribute] = []
    attribute_index: dict[Attribute, int] = {}

    def intern(attribute: Attribute) -> int:
        found = attribute_index.get(attribute)
        if found is None:
            found = attribute_index[attribute] = len(attributes)
            attributes.append(attribute)
        return found

    blocks, remaps = [], []
    range_rules, range_ids, tac_rules = [], [], []
    for entries in lists:
        remaps.append(np.array([intern(a) for a in entries.attributes] or [0], np.uint32))
        blocks.append(entries_block(entries))
        for rule in entries.ranges:
            range_rules.append(rule)
            range_ids.append(intern(rule.attribute))
        for rule in entries.tacs:
            tac_rules.append((rule.tac, rule.imsi, intern(rule.attribute)))
    table = _SetTable(len(attributes))
    writer = SectionWriter(MAGIC, {name: _NUMPY_TYPES[code]
                                   for name, code in _SECTION_TYPES.items()}, scratch)
    with writer:
        writer.declare("tac", "tac_start", "imei_key", "imei_fence", "pair_imei", "pair_imsi",
                       "pair_set")
        keys_written, pairs_written = _write_exact(writer, blocks, remaps, table)

        set_count = len(attributes) + len(table.combinations)
        if set_count > MAX_SETS:
            raise SnapshotError(f"{set_count} distinct list meanings (reason, date, source); "
                                f"at most {MAX_SETS} fit in a snapshot")
        _write_ranges(writer, range_rules, range_ids)
        _write_tac_rules(writer, tac_rules)
        named = _write_tac_names(writer, tac_names or {})

        counts = {"imei": keys_written, "pairs": pairs_written,
                  "ranges": len(range_rules), "tacs": len(tac_rules), "tac_names": named}
        header = {
            "format": FORMAT_VERSION, "version": version,
            "created": created if created is not None else time.time(),
            "counts": counts, "sources": sources or [
                {"name": entries.name, "rows": entries.rows} for entries in lists],
            "attributes": [attribute_to_json(a) for a in attributes],
            "combinations": [list(c) for c in table.combinations],
            "states": states or {},
            "manifest": manifest,  # the registry manifest it came from (eir.lists.manifest)
        }
        writer.finish(out, header)
    return counts


def _write_exact(writer: SectionWriter, blocks: list, remaps: list,
                 table: _SetTable) -> tuple[int, int]:
    """The exact-IMEI sections (tac, tac_start, imei_key, imei_fence, imei_set_hi) and the
    IMEI+IMSI pair sections, from the lists' blocks merged in key order; returns how many
    keys and pairs were written."""
    tac_values, tac_first = [], []
    keys_written = pairs_written = 0
    last_tac, set_hi = -1, False
    for pieces in merge(blocks):
        parts = [Block(p.imei, p.imsi, p.subscriber, remaps[i][p.attribute])
                 for i, p in enumerate(pieces) if len(p)]
        block = parts[0] if len(parts) == 1 else Block.concatenate(parts).sorted(runs=True)
        imei = block.imei.astype(np.uint64, copy=False)
        plain = None if block.imsi.strides == (0,) else block.imsi == 0
        combined: list = []
        if plain is None or plain.all():
            keys, sets, _ = _fold(imei, block.attribute, combined)
            _intern_in_key_order(combined, table)
        else:
            keys, sets, _ = _fold(imei[plain], block.attribute[plain], combined)
            pair_imei, pair_set, pair_imsi = _fold(
                imei[~plain], block.attribute[~plain], combined,
                secondary=np.asarray(block.imsi)[~plain])
            _intern_in_key_order(combined, table)
            writer.append("pair_imei", pair_imei)
            writer.append("pair_imsi", pair_imsi)
            writer.append("pair_set", pair_set)
            pairs_written += len(pair_imei)
        if not len(keys):
            continue
        tac = keys // SNR_DIGITS
        snr = keys - tac * SNR_DIGITS
        # keys are sorted: each TAC starts where the TAC changes (np.unique would sort)
        starts = np.flatnonzero(np.concatenate(([int(tac[0]) != last_tac],
                                                tac[1:] != tac[:-1])))
        tac_values.append(tac[starts])
        tac_first.append(starts + keys_written)
        last_tac = int(tac[-1])
        key = ((snr << SET_LOW_BITS) | (sets & SET_LOW_MASK)).astype(np.uint32)
        writer.append("imei_key", key)
        # the fence holds every FENCE_STRIDE-th key of the whole section
        writer.append("imei_fence", key[(-keys_written) % FENCE_STRIDE::FENCE_STRIDE])
        high = sets >> SET_LOW_BITS
        if not set_hi and high.any():
            set_hi = True  # the first set beyond the low bits: zeros for the keys before
            for start in range(0, keys_written, 1 << 24):
                writer.append("imei_set_hi", np.zeros(
                    min(1 << 24, keys_written - start), np.uint8))
        if set_hi:
            writer.append("imei_set_hi", high.astype(np.uint8))
        keys_written += len(keys)

    writer.append("tac", np.concatenate(tac_values) if tac_values else np.zeros(0))
    writer.append("tac_start", np.append(
        np.concatenate(tac_first) if tac_first else np.zeros(0, np.int64), keys_written))
    return keys_written, pairs_written


def _write_ranges(writer: SectionWriter, range_rules: list, range_ids: list) -> None:
    """The IMEI range sections: the ranges cut into segments (_range_segments)."""
    if range_rules:
        starts, first, range_imsi, range_set = _range_segments(range_rules, range_ids)
    else:
        starts, first, range_imsi, range_set = [], [0], [], []
    for name, values in (("range_start", starts), ("range_first", first),
                         ("range_imsi", range_imsi), ("range_set", range_set)):
        writer.declare(name)
        writer.append(name, np.array(values, dtype=np.uint64))


def _write_tac_rules(writer: SectionWriter, tac_rules: list) -> None:
    """The TAC rule sections, sorted by (TAC, IMSI)."""
    tac_rules.sort()
    for column, name in enumerate(("tacrule_tac", "tacrule_imsi", "tacrule_set")):
        writer.declare(name)
        writer.append(name, np.array([r[column] for r in tac_rules], dtype=np.uint64))


def _write_tac_names(writer: SectionWriter, tac_names: dict[int, str]) -> int:
    """The device-name sections (from TAC files); returns how many names."""
    names = sorted(tac_names.items())
    texts = [name.encode("utf-8") for _, name in names]
    writer.declare("tacname_tac", "tacname_end", "tacname_text")
    writer.append("tacname_tac", np.array([t for t, _ in names], dtype=np.uint32))
    writer.append("tacname_end", np.cumsum([len(t) for t in texts], dtype=np.uint64))
    writer.append("tacname_text", np.frombuffer(b"".join(texts), dtype=np.uint8))
    return len(names)


def attribute_to_json(attribute: Attribute) -> list:
    return [int(attribute.kind), attribute.source,
            -1 if attribute.status is None else int(attribute.status), attribute.block_date,
            attribute.reason, attribute.subject]


def attribute_from_json(item: list) -> Attribute:
    kind, source, status, block_date, reason, subject = item
    return Attribute(Kind(kind), source, None if status < 0 else EquipmentStatus(status),
                     block_date, reason, subject)


# -- reading --------------------------------------------------------------------------------


def _describe(attribute: Attribute, status: EquipmentStatus) -> str:
    """The reason a call centre reads out."""
    text = attribute.reason
    kind = attribute.kind
    if kind is Kind.NATIVE:
        why = f"{attribute.subject} is {status.name.lower()}"
        return f"{why}: {text}" if text else why
    date = format_day(attribute.block_date) if attribute.block_date else "always"
    if kind is Kind.WHITELIST:
        why = "registered on the registry whitelist" + (
            f" on {date}" if attribute.block_date else "")
    elif kind is Kind.BLACKLIST:
        why = f"on the registry blacklist since {date}"
    elif kind is Kind.NOTIFICATION:
        why = (f"notified by the registry, blocked since {date}"
               if status is EquipmentStatus.BLACKLISTED else
               f"notified by the registry: will be blocked on {date} unless resolved")
    else:
        why = "paired with this IMSI by the registry's exception list"
    return f"{why}: {text}" if text else why




@dataclass(frozen=True)
class SnapshotInfo:
    version: str
    created: float
    counts: dict
    sources: list  # one dict per file: name, sha256, rows, list, run
    states: dict  # list name → stored state file (eir.lists.state), for deltas
    # The registry manifest it was compiled from: sequence, published, sha256, signer
    # (eir.lists.manifest.Manifest.provenance); None for a source without a manifest.
    manifest: dict | None = None


class Snapshot:
    """A compiled snapshot, searched in place (from a memory map or a bytes object)."""

    def __init__(self, buffer, path: Path | None = None, _keep=None):
        self.path = path
        self._keep = _keep  # the mmap/bytes the views point into
        view = memoryview(buffer)
        where = str(path) if path else "snapshot"
        if bytes(view[:8]) != MAGIC:
            raise SnapshotError(f"{where}: not an open EIR snapshot (bad magic)")
        if sys.byteorder != "little":
            raise SnapshotError(f"{where}: snapshots are little-endian; this host is not")
        header_length = int.from_bytes(view[8:12], "little")
        try:
            header = json.loads(bytes(view[16:16 + header_length]))
        except ValueError as exc:
            raise SnapshotError(f"{where}: header unreadable: {exc}") from None
        if header.get("format") not in READABLE_FORMATS:
            raise SnapshotError(f"{where}: format {header.get('format')} is not one of "
                                f"{', '.join(map(str, READABLE_FORMATS))}")
        # A damaged or foreign file must say so, not raise whatever it trips on first.
        try:
            body = (16 + header_length + 7) & ~7
            self.info = SnapshotInfo(header["version"], header["created"], header["counts"],
                                     header["sources"], header.get("states", {}),
                                     header.get("manifest"))
            self.attributes = [attribute_from_json(item) for item in header["attributes"]]
            self.sets: list[tuple[int, ...]] = [(i,) for i in range(len(self.attributes))]
            self.sets += [tuple(c) for c in header["combinations"]]
            arrays = {}
            for name, (offset, length) in header["sections"].items():
                start = body + offset
                if start + length > len(view):
                    raise SnapshotError(f"{where}: section {name} runs past the end (truncated?)")
                arrays[name] = view[start:start + length].cast(_SECTION_TYPES[name])
            self._tac = arrays["tac"]
            self._tac_start = arrays["tac_start"]
            self._imei_key = arrays["imei_key"]
            self._imei_set_hi = arrays.get("imei_set_hi")
            self._imei_fence = arrays.get("imei_fence")
            if self._imei_fence is not None and len(self._imei_fence) != -(
                    -len(self._imei_key) // FENCE_STRIDE):
                raise ValueError("imei_fence does not hold every 64th imei_key")
            self._pair_imei, self._pair_imsi = arrays["pair_imei"], arrays["pair_imsi"]
            self._pair_set = arrays["pair_set"]
            self._range_start, self._range_first = arrays["range_start"], arrays["range_first"]
            self._range_imsi, self._range_set = arrays["range_imsi"], arrays["range_set"]
            self._tacrule_tac, self._tacrule_imsi = arrays["tacrule_tac"], arrays["tacrule_imsi"]
            self._tacrule_set = arrays["tacrule_set"]
            self._tacname_tac, self._tacname_end = arrays["tacname_tac"], arrays["tacname_end"]
            self._tacname_text = arrays["tacname_text"]
            # The C search when built (it checks tac_start once, here), else None: the Python
            # path. Called with an int: IMEI → attribute set index or -1. Its lookup() does
            # the first two levels and keeps their verdicts (see hot_lookup). Nothing it
            # holds refers back to this snapshot (lookup is the index's bound method; resolve
            # closes over the attribute tables only): such a cycle would keep a replaced
            # snapshot's mapping until the next gc run.
            sets, attributes = self.sets, self.attributes

            def resolve(member: int, level: int, day: int) -> Verdict | None:
                return _set_verdict(sets, attributes, member, level, day)

            self._exact = None if _ExactIndex is None else _ExactIndex(
                self._tac, self._tac_start, self._imei_key, self._imei_set_hi,
                self._imei_fence, pair_imei=self._pair_imei, pair_imsi=self._pair_imsi,
                pair_set=self._pair_set, resolve=resolve, set_count=len(self.sets),
                wider=bool(len(self._range_start) or len(self._tacrule_tac)))
            self._c_lookup = None if self._exact is None else self._exact.lookup
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(f"{where}: malformed header or section: "
                                f"{type(exc).__name__}: {exc}") from None
        # TAC → position for the pure-Python search: at most a few hundred thousand TACs
        # (the world has about that many), built on its first use, so that start-up does not
        # pay for it when the C search serves.
        self._tac_index: dict[int, int] | None = None
        self._uses_imsi = bool(len(self._pair_imei) or len(self._range_start)
                               or len(self._tacrule_tac))
        # (set << 3 | level) → (day, verdict): keyed by int, since hashing an Enum member
        # runs Python code and this is the hot path.
        self._verdicts: dict[int, tuple[int, Verdict | None]] = {}

    @classmethod
    def open(cls, path: Path | str) -> "Snapshot":
        path = Path(path)
        try:
            with path.open("rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{path}: cannot map: {exc}") from None
        return cls(mapped, path, _keep=mapped)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Snapshot":
        return cls(data, None, _keep=data)

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def entry_count(self) -> int:
        counts = self.info.counts
        return counts["imei"] + counts["pairs"] + counts["ranges"] + counts["tacs"]

    def lookup(self, imei: str, imsi: str | None, day: int) -> Verdict | None:
        """The verdict of the most specific level with an entry in force on `day`, or None.
        Levels: IMEI+IMSI, IMEI, range+IMSI, range, TAC+IMSI, TAC (see eir.core.decision)."""
        c_lookup = self._c_lookup
        if c_lookup is not None:
            verdict = c_lookup(imei, imsi, day)
            if verdict is not NotImplemented:
                return verdict
        return self._lookup_python(imei, imsi, day)

    @property
    def hot_lookup(self):
        """lookup() for the hot path (RuleSet.decide keeps it): eir.lists._lookup's lookup() when
        built, else lookup() itself. The C one answers from the request's strings without
        int(), a bisection over memoryviews, a dict or lookup()'s own Python frame; it
        returns NotImplemented when lookup() must answer instead (ranges or TAC rules to
        search, an IMEI that is not plain digits, several IMEI+IMSI entries for one pair)."""
        return self.lookup if self._c_lookup is None else self._c_lookup

    def _lookup_python(self, imei: str, imsi: str | None, day: int) -> Verdict | None:
        """lookup() without eir.lists._lookup's lookup(): not built, or it handed over."""
        number = int(imei)
        # The IMSI matters only to paired entries, ranges and TAC rules: a registry blacklist
        # has none of them, and parsing it would be most of the remaining cost.
        imsi_number = int(imsi) if (self._uses_imsi and imsi and imsi.isascii()
                                    and imsi.isdigit()) else 0
        if imsi_number and self._pair_imei:
            verdict = self._pair_lookup(number, imsi_number, day)
            if verdict is not None:
                return verdict
        exact = self._exact
        member = exact(number) if exact is not None else self._exact_python(number)
        if member >= 0:
            # The verdict cache, inline: this is the hit nearly every request takes.
            cached = self._verdicts.get((member << 3) | IMEI)
            verdict = cached[1] if cached is not None and cached[0] == day else \
                self._verdict(member, IMEI, day)
            if verdict is not None:
                return verdict
        if self._range_start:
            segment = bisect.bisect_right(self._range_start, number) - 1
            if segment >= 0:
                first, last = self._range_first[segment], self._range_first[segment + 1]
                if first < last:
                    verdict = self._best(self._range_imsi, self._range_set, first, last,
                                         imsi_number, day, RANGE_IMSI, RANGE)
                    if verdict is not None:
                        return verdict
        if self._tacrule_tac:
            tac = number // SNR_DIGITS
            first = bisect.bisect_left(self._tacrule_tac, tac)
            last = bisect.bisect_right(self._tacrule_tac, tac, first)
            if first < last:
                return self._best(self._tacrule_imsi, self._tacrule_set, first, last,
                                  imsi_number, day, TAC_IMSI, TAC)
        return None

    def _exact_python(self, number: int) -> int:
        """The attribute set of IMEI `number`'s exact entry, or -1 (eir.lists._lookup in
        Python)."""
        tac = number // SNR_DIGITS
        index = self._tac_index
        if index is None:
            index = self._tac_index = {tac: i for i, tac in enumerate(self._tac)}
        position = index.get(tac)
        if position is None:
            return -1
        snr = number - tac * SNR_DIGITS
        keys = self._imei_key
        low, high = self._tac_start[position], self._tac_start[position + 1]
        wanted = snr << SET_LOW_BITS
        fence = self._imei_fence
        if fence is not None and low < high:
            # fence[k] = keys[64k]: the first fence >= wanted among this TAC's bounds the
            # block of keys to search
            first_fence, end_fence = -(-low // FENCE_STRIDE), -(-high // FENCE_STRIDE)
            k = bisect.bisect_left(fence, wanted, first_fence, end_fence)
            index = bisect.bisect_left(
                keys, wanted, (k - 1) * FENCE_STRIDE if k > first_fence else low,
                k * FENCE_STRIDE if k < end_fence else high)
        else:
            index = bisect.bisect_left(keys, wanted, low, high)
        if index == high or keys[index] >> SET_LOW_BITS != snr:
            return -1
        member = keys[index] & SET_LOW_MASK
        if self._imei_set_hi is not None:
            member |= self._imei_set_hi[index] << SET_LOW_BITS
        return member

    def sample_subjects(self, rng, count: int) -> list[tuple[str, str | None]]:
        """About `count` (14-digit IMEI, IMSI or None) drawn from the entries (exact IMEIs,
        pairs, range segments, TACs), for a load generator to send; their verdicts are the
        caller's to find out."""
        drawn: list[tuple[str, str | None]] = []
        keys, tacs, starts = self._imei_key, self._tac, self._tac_start
        for position in rng.sample(range(len(keys)), min(count, len(keys))):
            tac = tacs[bisect.bisect_right(starts, position) - 1]
            drawn.append((f"{tac * SNR_DIGITS + (keys[position] >> SET_LOW_BITS):014d}", None))
        imeis, imsis = self._pair_imei, self._pair_imsi
        for index in rng.sample(range(len(imeis)), min(count, len(imeis))):
            drawn.append((f"{imeis[index]:014d}", f"{imsis[index]}"))
        starts, first = self._range_start, self._range_first
        segments = [s for s in range(len(starts)) if first[s] < first[s + 1]]
        for segment in rng.sample(segments, min(count, len(segments))):
            low = starts[segment]
            high = starts[segment + 1] - 1 if segment + 1 < len(starts) else low
            imsi = self._range_imsi[first[segment]]
            drawn.append((f"{rng.randint(low, high):014d}", f"{imsi}" if imsi else None))
        rules = range(len(self._tacrule_tac))
        for index in rng.sample(rules, min(count, len(rules))):
            imsi = self._tacrule_imsi[index]
            imei = self._tacrule_tac[index] * SNR_DIGITS + rng.randrange(SNR_DIGITS)
            drawn.append((f"{imei:014d}", f"{imsi}" if imsi else None))
        return drawn

    def device_name(self, tac: int) -> str | None:
        index = bisect.bisect_left(self._tacname_tac, tac)
        if index < len(self._tacname_tac) and self._tacname_tac[index] == tac:
            start = self._tacname_end[index - 1] if index else 0
            return bytes(self._tacname_text[start:self._tacname_end[index]]).decode("utf-8")
        return None

    def _pair_lookup(self, number: int, imsi_number: int, day: int) -> Verdict | None:
        imeis, imsis = self._pair_imei, self._pair_imsi
        index = bisect.bisect_left(imeis, number)
        if index == len(imeis) or imeis[index] != number:
            return None
        members = []
        while index < len(imeis) and imeis[index] == number:
            if imsis[index] == imsi_number:
                members.append(self._pair_set[index])
            index += 1
        return self._combined(members, day, IMEI_IMSI)

    def _best(self, imsis, sets, first, last, imsi_number, day, paired_level, plain_level):
        """Among candidates [first, last): paired ones for this IMSI first, then plain ones."""
        if imsi_number:
            paired = [sets[i] for i in range(first, last) if imsis[i] == imsi_number]
            verdict = self._combined(paired, day, paired_level)
            if verdict is not None:
                return verdict
        plain = [sets[i] for i in range(first, last) if imsis[i] == 0]
        return self._combined(plain, day, plain_level)

    def _combined(self, members: list[int], day: int, level: int) -> Verdict | None:
        if not members:
            return None
        if len(members) == 1:
            return self._verdict(members[0], level, day)
        best = None
        for member in members:
            verdict = self._verdict(member, level, day)
            if verdict is not None and (best is None or verdict.status.severity >
                                        best.status.severity):
                best = verdict
        return best

    def _verdict(self, member: int, level: int, day: int) -> Verdict | None:
        """The verdict of attribute set `member` on `day` (cached per set and day: a hot-path
        hit allocates nothing)."""
        key = (member << 3) | level
        cached = self._verdicts.get(key)
        if cached is not None and cached[0] == day:
            return cached[1]
        verdict = _set_verdict(self.sets, self.attributes, member, level, day)
        self._verdicts[key] = (day, verdict)
        return verdict


def _set_verdict(sets: list[tuple[int, ...]], attributes: list[Attribute], member: int,
                 level: int, day: int) -> Verdict | None:
    """The verdict of attribute set `member` at precedence `level` on `day`: the most severe
    status among its attributes, or None when none gives one yet. Uncached: Snapshot._verdict
    and eir.lists._lookup's lookup() keep what it returns."""
    best_status, best_attribute = None, None
    for attribute_id in sets[member]:
        attribute = attributes[attribute_id]
        status = attribute.status_on(day)
        if status is not None and (best_status is None or
                                   status.severity > best_status.severity):
            best_status, best_attribute = status, attribute
    if best_status is None:
        return None
    return Verdict(best_status, _MATCHES[level], _describe(best_attribute, best_status),
                   best_attribute.source)
