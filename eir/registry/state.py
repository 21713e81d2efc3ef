"""The state of one list between syncs, so that deltas can be applied to it.

A snapshot merges every list; a delta changes one list, relative to the run that generated
it. So the store keeps each list's entries as of the run in force (`ListState`), saves them
next to the snapshots, and a sync rebuilds a list from its state plus the deltas whose base
is that run.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from eir.registry.entries import ListDelta, ListEntries, RangeRule, TacRule
from eir.snapshot import attribute_from_json, attribute_to_json

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

    def apply(self, deltas: list[ListDelta], files: list[str]) -> "ListState":
        """This list with `deltas` (the files of one run, or import-side deltas) applied:
        removals, then additions (which replace entries with the same key)."""
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
                (f"run {self.run}" if self.run else "a file that names no run"))
        entries = self.entries
        for delta in deltas:
            entries = _remove(entries, delta.removed, self.key_kind)
            entries = _remove(entries, delta.added, self.key_kind)
            entries = _concatenate(entries, delta.added)
        return ListState(self.name, run or self.run, entries, files=self.files + files)

    # -- persistence ----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        meta = {"name": self.name, "run": self.run, "files": self.files,
                "tac_names": {str(k): v for k, v in self.tac_names.items()}}
        arrays = {}
        if self.entries is not None:
            e = self.entries
            meta["entries"] = {
                "name": e.name, "rows": e.rows,
                "attributes": [attribute_to_json(a) for a in e.attributes],
                "ranges": [[r.start, r.end, r.imsi, attribute_to_json(r.attribute)]
                           for r in e.ranges],
                "tacs": [[t.tac, t.imsi, attribute_to_json(t.attribute)] for t in e.tacs]}
            arrays = {"imei": e.imei, "imsi": e.imsi, "attribute": e.attribute,
                      "subscriber": e.subscriber}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8),
                 **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ListState":
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes())
            entries = None
            if "entries" in meta:
                m = meta["entries"]
                entries = ListEntries(
                    m["name"], archive["imei"], archive["imsi"], archive["attribute"],
                    [attribute_from_json(a) for a in m["attributes"]],
                    [RangeRule(s, e, i, attribute_from_json(a)) for s, e, i, a in m["ranges"]],
                    [TacRule(t, i, attribute_from_json(a)) for t, i, a in m["tacs"]],
                    m["rows"], archive["subscriber"])
        return cls(meta["name"], meta["run"], entries,
                   {int(k): v for k, v in meta["tac_names"].items()}, meta["files"])


def _keys(entries: ListEntries, key_kind: str) -> np.ndarray:
    if key_kind == "imei":
        return entries.imei.astype(np.uint64, copy=False)
    second = entries.imsi if key_kind == "imsi" else entries.subscriber
    if len(second) != len(entries.imei):  # an old state without subscribers
        second = np.zeros(len(entries.imei), np.uint64)
    pairs = np.ascontiguousarray(np.stack([entries.imei.astype(np.uint64),
                                           second.astype(np.uint64)], axis=1))
    return pairs.view(np.dtype((np.void, 16))).ravel()


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
