"""The state of one list between syncs, so that deltas can be applied to it.

A snapshot merges every list; a delta changes one list, relative to the run that generated
it. So the store keeps each list's entries as of the run in force (`ListState`), saves them
next to the snapshots, and a sync rebuilds a list from its state plus the deltas whose base
is that run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eir.lists.entries import ListDelta, ListEntries, RangeRule, TacRule
from eir.lists.snapshot import attribute_from_json, attribute_to_json
from eir.lists.table import (
    BLOCK_ROWS,
    Block,
    TableError,
    collect,
    entries_block,
    merge,
    open_table,
    write_table,
)

PAIRED_LISTS = ("exceptions", "pairing")  # keyed by IMEI and IMSI
NOTIFIED_LISTS = ("notifications",)  # keyed by IMEI and the notified subscriber
# every other list is keyed by IMEI alone


class DeltaError(Exception):
    """A delta cannot be applied; the message says which and why."""


@dataclass
class ListState:
    """One list as of one run: its entries (or device names, for a TAC file)."""

    name: str  # list name: "blacklist", "notifications_op1", or a file name
    run: str  # run that generated it ("" when its files named none)
    entries: ListEntries | None = None
    tac_names: dict[int, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # files it was built from, in order

    @property
    def key_kind(self) -> str:
        if self.name.startswith(PAIRED_LISTS):
            return "imsi"
        return "subscriber" if self.name.startswith(NOTIFIED_LISTS) else "imei"

    def apply(self, deltas: list[ListDelta], files: list[str],
              scratch: Path | None = None) -> "ListState":
        """This list with `deltas` (the files of one run, or import-side deltas) applied:
        removals, then additions (which replace entries with the same key). A list larger
        than a sort run is written to a table file in `scratch` when given."""
        if self.entries is None:
            raise DeltaError(f"{self.name}: deltas apply to lists, not to a TAC file")
        runs = {(d.base, d.run) for d in deltas}
        if len(runs) != 1:
            raise DeltaError(f"{self.name}: deltas of different runs given together: "
                             f"{sorted(runs)}")
        base, run = runs.pop()
        if base and base != self.run:
            names = ", ".join(f.rpartition("@")[0] or f for f in files)
            raise DeltaError(
                f"{names}: delta applies on top of run {base}, but the "
                f"{self.name} list in force is from " +
                (f"run {self.run}" if self.run else
                 "a file that names no run (a DIRBS full list is from the run of the deltas "
                 "published with it: the same date, `_delta_<base>_<run>_` in their names, "
                 "in its zip or beside it; put them, or the whole zip, in the source)"))
        # Fold the run's deltas among themselves first (they are small): which keys go, and
        # what is added in the end; then one pass over the (possibly national-size) list.
        kind = self.key_kind
        added = ListEntries(self.name)
        dropped = []
        for delta in deltas:
            added = _remove(added, delta.removed, kind)
            added = _remove(added, delta.added, kind)
            added = _concatenate(added, delta.added)
            dropped += [delta.removed, delta.added]
        entries = _merge_into(self.entries, added, dropped, kind, scratch)
        return ListState(self.name, run or self.run, entries, files=self.files + files)

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write this state as a table file (eir.lists.table), entries in key order."""
        meta = {"name": self.name, "run": self.run, "files": self.files,
                "tac_names": {str(k): v for k, v in self.tac_names.items()}}
        block = Block.empty()
        if self.entries is not None:
            e = self.entries
            meta["entries"] = {
                "name": e.name, "rows": e.rows,
                "attributes": [attribute_to_json(a) for a in e.attributes],
                "ranges": [[r.start, r.end, r.imsi, attribute_to_json(r.attribute)]
                           for r in e.ranges],
                "tacs": [[t.tac, t.imsi, attribute_to_json(t.attribute)] for t in e.tacs]}
            block = entries_block(e)
        write_table(path, (block.slice(i, i + BLOCK_ROWS)
                           for i in range(0, len(block), BLOCK_ROWS)), meta)

    @classmethod
    def open(cls, path: Path) -> "ListState":
        """A saved state; its entries are memory-mapped from the file, not read."""
        try:
            meta, block = open_table(path)
        except TableError as exc:
            raise ValueError(str(exc)) from None
        entries = None
        if "entries" in meta:
            m = meta["entries"]
            entries = ListEntries(
                m["name"], block.imei, block.imsi, block.attribute,
                [attribute_from_json(a) for a in m["attributes"]],
                [RangeRule(s, e, i, attribute_from_json(a)) for s, e, i, a in m["ranges"]],
                [TacRule(t, i, attribute_from_json(a)) for t, i, a in m["tacs"]],
                m["rows"], _subscribers(block.subscriber), ordered=True)
        return cls(meta["name"], meta["run"], entries,
                   {int(k): v for k, v in meta["tac_names"].items()}, meta["files"])

def _subscribers(column: np.ndarray) -> np.ndarray:
    """ListEntries' convention: no subscriber column is an empty array."""
    return np.zeros(0, np.uint64) if column.strides == (0,) else column


def _merge_into(entries: ListEntries, added: ListEntries, dropped: list[ListEntries],
                key_kind: str, scratch: Path | None) -> ListEntries:
    """`entries` without the keys of `dropped`, plus `added`, in key order, block by block."""
    drop = _sorted_keys([d for d in dropped if len(d.imei)], key_kind)
    offset = len(entries.attributes)
    base = entries_block(entries)
    extra = Block.of(added.imei.astype(np.uint64), added.imsi.astype(np.uint64),
                     added.subscriber, added.attribute.astype(np.uint32) + np.uint32(offset)
                     ).sorted()

    def blocks():
        for old, new in merge([base, extra]):
            if len(old) and drop is not None:
                old = old.select(~_dropped(old, drop, key_kind))
            yield new if not len(old) else old if not len(new) else \
                Block.concatenate([old, new]).sorted(runs=True)

    block = collect(blocks(), scratch)
    return ListEntries(entries.name, block.imei, block.imsi, block.attribute,
                       entries.attributes + added.attributes, entries.ranges, entries.tacs,
                       len(block), _subscribers(block.subscriber), ordered=True)


def _dropped(block: Block, drop: tuple[np.ndarray, np.ndarray], key_kind: str) -> np.ndarray:
    """Which entries of `block` have a key among the dropped ones."""
    drop_imei, drop_keys = drop
    # Only the dropped keys within this block's IMEIs; found by binary search on the IMEI (a
    # sort-based np.isin of every block's keys would cost more than the rest of the pass).
    low = int(np.searchsorted(drop_imei, block.imei[0], side="left"))
    high = int(np.searchsorted(drop_imei, block.imei[-1], side="right"))
    if low == high:
        return np.zeros(len(block), bool)
    imeis = drop_imei[low:high]
    at = np.minimum(np.searchsorted(imeis, block.imei), len(imeis) - 1)
    hit = imeis[at] == block.imei
    if key_kind == "imei" or not hit.any():
        return hit
    # keyed by IMEI and IMSI (or subscriber): compare whole keys, for the few IMEI hits only
    rows = np.flatnonzero(hit)
    hit[rows] = np.isin(_block_keys(block.select(rows), key_kind), drop_keys[low:high])
    return hit


def _second(block: Block, key_kind: str) -> np.ndarray:
    if key_kind == "imei":
        return np.zeros(len(block), np.uint64)
    column = block.imsi if key_kind == "imsi" else block.subscriber
    return np.ascontiguousarray(column, dtype=np.uint64)


def _block_keys(block: Block, key_kind: str) -> np.ndarray:
    pairs = np.stack([np.ascontiguousarray(block.imei, dtype=np.uint64),
                      _second(block, key_kind)], axis=1)
    return np.ascontiguousarray(pairs).view(np.dtype((np.void, 16))).ravel()


def _sorted_keys(lists: list[ListEntries], key_kind: str):
    """(IMEIs, keys) of `lists`, sorted by IMEI: the keys a block may drop are found by IMEI."""
    if not lists:
        return None
    block = Block.concatenate([Block.of(e.imei.astype(np.uint64), e.imsi.astype(np.uint64),
                                        e.subscriber, e.attribute) for e in lists])
    order = np.argsort(block.imei, kind="stable")
    block = Block.of(block.imei[order], np.asarray(block.imsi)[order],
                     np.asarray(block.subscriber)[order], block.attribute[order])
    return block.imei, _block_keys(block, key_kind)


def _keys(entries: ListEntries, key_kind: str) -> np.ndarray:
    return _block_keys(Block.of(entries.imei, entries.imsi, entries.subscriber,
                                entries.attribute), key_kind)


def _remove(entries: ListEntries, keys_of: ListEntries, key_kind: str) -> ListEntries:
    if not len(keys_of.imei) or not len(entries.imei):
        return entries
    keep = ~np.isin(_keys(entries, key_kind), _keys(keys_of, key_kind))
    if keep.all():
        return entries
    return ListEntries(entries.name, entries.imei[keep], entries.imsi[keep],
                       entries.attribute[keep], entries.attributes, entries.ranges,
                       entries.tacs, int(keep.sum()),
                       entries.subscriber[keep] if len(entries.subscriber) else
                       entries.subscriber)


def _concatenate(entries: ListEntries, added: ListEntries) -> ListEntries:
    if not len(added.imei):
        return entries
    offset = len(entries.attributes)
    subscriber = entries.subscriber
    if len(entries.subscriber) or len(added.subscriber):
        subscriber = np.concatenate([_filled(entries.subscriber, len(entries.imei)),
                                     _filled(added.subscriber, len(added.imei))])
    return ListEntries(
        entries.name, np.concatenate([entries.imei, added.imei]),
        np.concatenate([entries.imsi, added.imsi]),
        np.concatenate([entries.attribute, added.attribute.astype(np.uint32) + offset]),
        entries.attributes + added.attributes, entries.ranges, entries.tacs,
        entries.rows + len(added.imei), subscriber)


def _filled(array: np.ndarray, length: int) -> np.ndarray:
    return array if len(array) == length else np.zeros(length, np.uint64)
