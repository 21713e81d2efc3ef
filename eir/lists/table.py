"""List entries sorted by key, built, merged and stored in bounded memory.

A national blacklist holds over a billion IMEIs. Parsing it, applying deltas to it and
compiling it with every entry in memory at once would need ~90 bytes per row: a hundred
gigabytes. Instead every stage works on entries sorted by (IMEI, IMSI, subscriber, attribute):

- a parsed file is sorted in runs of at most RUN_ROWS rows, each run spilled to a scratch
  directory and the runs merged (`EntrySorter`);
- list states are stored sorted, as table files that are memory-mapped, not read
  (`write_table`, `open_table`);
- deltas and the snapshot compile walk sorted sources together block by block (`merge`),
  cutting blocks at an IMEI so that all entries of one IMEI meet in one block.

Memory is bounded by RUN_ROWS and BLOCK_ROWS, not by the size of the list. Lists smaller than
a run never touch the disk.

Columns: imei (uint64, the 14-digit TAC+SNR), imsi (uint64, the IMSI a paired entry applies
to, 0 = any), subscriber (uint64, the notified IMSI of a notification entry, 0 = none) and
attribute (uint32, index into the list's attributes). A column that is zero throughout (imsi
and subscriber of a blacklist) is not stored: it reads as a zero-stride view that costs no
memory.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from eir.lists.entries import ListEntries
from eir.lists.sections import SectionFileError, SectionWriter, punch_hole, read_sections

TABLE_MAGIC = b"EIRLIST1"
COLUMN_TYPES = {"imei": "<u8", "imsi": "<u8", "subscriber": "<u8", "attribute": "<u4"}
OPTIONAL_COLUMNS = ("imsi", "subscriber")
RUN_ROWS = 16_000_000  # rows sorted in memory at once (~0.7 GB with sort temporaries)
BLOCK_ROWS = 4_000_000  # rows per merge block, shared among the merged sources
IMEI_BITS = 47  # 14-digit IMEI keys are below 10**14 < 2**47


class TableError(Exception):
    """A table file cannot be used; the message says which and why."""


def zeros(length: int) -> np.ndarray:
    """`length` uint64 zeros that take no memory (a read-only, zero-stride view)."""
    return np.broadcast_to(np.uint64(0), (length,))


def _any(array: np.ndarray) -> bool:
    return bool(len(array)) and array.strides != (0,) and bool(array.any())


@dataclass
class Block:
    """Some entries, column by column (a whole table, a run, or one merge block)."""

    imei: np.ndarray
    imsi: np.ndarray
    subscriber: np.ndarray
    attribute: np.ndarray

    def __len__(self) -> int:
        return len(self.imei)

    @classmethod
    def of(cls, imei, imsi=None, subscriber=None, attribute=None) -> "Block":
        """Columns as given; None or empty imsi/subscriber are zero throughout."""
        n = len(imei)
        imsi = zeros(n) if imsi is None or len(imsi) == 0 else imsi
        subscriber = zeros(n) if subscriber is None or len(subscriber) == 0 else subscriber
        attribute = np.zeros(n, np.uint32) if attribute is None else attribute
        if not (len(imsi) == len(subscriber) == len(attribute) == n):
            raise ValueError("columns differ in length")
        return cls(imei, imsi, subscriber, attribute)

    @classmethod
    def empty(cls) -> "Block":
        return cls.of(np.zeros(0, np.uint64))

    def slice(self, start: int, stop: int) -> "Block":
        return Block(self.imei[start:stop], self.imsi[start:stop],
                     self.subscriber[start:stop], self.attribute[start:stop])

    def select(self, mask: np.ndarray) -> "Block":
        return Block.of(self.imei[mask], _pick(self.imsi, mask),
                        _pick(self.subscriber, mask), self.attribute[mask])

    @staticmethod
    def concatenate(blocks: list["Block"]) -> "Block":
        blocks = [b for b in blocks if len(b)]
        if not blocks:
            return Block.empty()
        if len(blocks) == 1:
            return blocks[0]

        def column(name):
            parts = [getattr(b, name) for b in blocks]
            if name in OPTIONAL_COLUMNS and not any(p.strides != (0,) for p in parts):
                return zeros(sum(len(p) for p in parts))
            return np.concatenate(parts)

        return Block(column("imei").astype(np.uint64, copy=False), column("imsi"),
                     column("subscriber"), column("attribute").astype(np.uint32, copy=False))

    def sorted(self, runs: bool = False) -> "Block":
        """These entries in key order: (imei, imsi, subscriber, attribute). With `runs`, they
        are a few sorted runs one after the other (a merge block): a stable sort (timsort)
        merges those in linear time, where quicksort would start over."""
        n = len(self)
        if n < 2:
            return self
        attribute = self.attribute.astype(np.uint64, copy=False)
        bits = max(int(attribute.max()).bit_length(), 1)
        imei = self.imei.astype(np.uint64, copy=False)
        if not _any(self.imsi) and not _any(self.subscriber) and \
                bits <= 64 - IMEI_BITS and int(imei.max()) < 1 << IMEI_BITS:
            # One in-place sort of (imei << bits | attribute): several times faster than an
            # indirect lexsort and its gathers, and no int64 permutation array.
            composite = imei << np.uint64(bits)
            composite |= attribute
            composite.sort(kind="stable" if runs else "quicksort")
            return Block(composite >> np.uint64(bits), zeros(n), zeros(n),
                         (composite & np.uint64((1 << bits) - 1)).astype(np.uint32))
        order = np.lexsort((self.attribute, self.subscriber, self.imsi, imei))
        return Block(imei[order], _pick(self.imsi, order), _pick(self.subscriber, order),
                     self.attribute[order].astype(np.uint32, copy=False))


def _pick(column: np.ndarray, index: np.ndarray) -> np.ndarray:
    if column.strides == (0,):
        return zeros(int(index.sum()) if index.dtype == bool else len(index))
    return column[index]


def entries_block(entries: ListEntries) -> Block:
    """The entries of a list as a Block in key order (sorted here unless they already are)."""
    block = Block.of(entries.imei, entries.imsi, entries.subscriber, entries.attribute)
    return block if entries.ordered else block.sorted()


# -- merging ---------------------------------------------------------------------------------


def merge(sources: list[Block], block_rows: int | None = None) -> Iterator[list[Block]]:
    """Walk sorted `sources` together: for each block, every source's slice of it.

    Blocks are cut after an IMEI, so all entries of one IMEI, from every source, are in the
    same block, and blocks come in IMEI order. Each source contributes at most about
    block_rows / len(sources) rows to a block.
    """
    positions = [0] * len(sources)
    lengths = [len(s) for s in sources]
    share = max(1, (block_rows or BLOCK_ROWS) // max(1, len(sources)))
    while True:
        live = [i for i in range(len(sources)) if positions[i] < lengths[i]]
        if not live:
            return
        # The smallest IMEI among each source's share-th next entry: no source has more than
        # `share` entries up to it (plus the entries of that one IMEI).
        cutoff = min(int(sources[i].imei[min(positions[i] + share, lengths[i]) - 1])
                     for i in live)
        pieces = []
        for i, source in enumerate(sources):
            start = positions[i]
            if start >= lengths[i]:
                pieces.append(Block.empty())
                continue
            window = source.imei[start:min(lengths[i], start + 2 * share + 1)]
            end = start + int(np.searchsorted(window, np.uint64(cutoff), side="right"))
            if end == start + len(window) and end < lengths[i]:  # a long run of one IMEI
                end = start + int(np.searchsorted(source.imei[start:], np.uint64(cutoff),
                                                  side="right"))
            pieces.append(source.slice(start, end))
            positions[i] = end
        yield pieces


def merged(sources: list[Block], block_rows: int | None = None,
           taken: Callable[[list[Block]], None] | None = None) -> Iterator[Block]:
    """The entries of sorted `sources`, in key order, block by block. With `taken`, it is
    called with every block's pieces (each source's slice) once the consumer asks for the
    next block: a consumer that copies each block (write_table) is done with them then."""
    for pieces in merge(sources, block_rows):
        live = [p for p in pieces if len(p)]
        yield live[0] if len(live) == 1 else Block.concatenate(live).sorted(runs=True)
        if taken is not None:
            taken(pieces)


def collect(blocks: Iterable[Block], scratch: Path | None) -> Block:
    """Sorted `blocks` as one Block: in memory while they fit in a sort run (or when there is
    no scratch directory), else written to a table file in `scratch` and mapped."""
    held: list[Block] = []
    rows = 0
    blocks = iter(blocks)
    for block in blocks:
        held.append(block)
        rows += len(block)
        if scratch is not None and rows > RUN_ROWS:
            path = scratch / f"table-{os.getpid()}-{next(_names)}.table"
            write_table(path, itertools.chain(held, blocks), {}, scratch)
            return _mapped_and_unlinked(path)
    return Block.concatenate(held)


_names = itertools.count()


def _mapped_and_unlinked(path: Path) -> Block:
    """The entries of a scratch table, mapped, with the file unlinked at once: its disk space
    comes back as soon as the last array of the mapping is dropped (a sync drops a list
    it has saved as a state before it compiles the snapshot: eir.lists.sync), not when the
    scratch directory is removed at the end."""
    block = open_table(path)[1]
    path.unlink()
    return block


# -- table files -----------------------------------------------------------------------------


def write_table(path: Path, blocks, meta: dict, scratch: Path | None = None) -> int:
    """Write sorted `blocks` (an iterable, consumed once) as a table file; returns rows."""
    writer = SectionWriter(TABLE_MAGIC, COLUMN_TYPES, scratch or path.parent)
    rows = 0
    present = {name: False for name in OPTIONAL_COLUMNS}
    with writer:
        writer.declare("imei", "attribute")
        for block in blocks:
            for name in OPTIONAL_COLUMNS:
                column = getattr(block, name)
                if not present[name] and _any(column):
                    present[name] = True
                    for start in range(0, rows, BLOCK_ROWS):  # zeros for the rows before
                        writer.append(name, np.zeros(min(BLOCK_ROWS, rows - start), np.uint64))
                if present[name]:
                    writer.append(name, column)
            writer.append("imei", block.imei)
            writer.append("attribute", block.attribute)
            rows += len(block)
        with open(path, "wb") as out:
            writer.finish(out, {"format": 1, "rows": rows, "meta": meta})
    return rows


def open_table(path: Path) -> tuple[dict, Block]:
    """The meta and the (memory-mapped) entries of a table file."""
    try:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) \
                if handle.seek(0, 2) else b""
    except (OSError, ValueError) as exc:
        raise TableError(f"{path}: cannot map: {exc}") from None
    try:
        header, sections = read_sections(mapped, TABLE_MAGIC, COLUMN_TYPES, str(path))
        rows = int(header["rows"])

        def column(name, dtype):
            if name not in sections:
                if name in OPTIONAL_COLUMNS:
                    return zeros(rows)
                raise KeyError(name)
            array = np.frombuffer(sections[name], dtype)
            if len(array) != rows:
                raise ValueError(f"column {name} has {len(array)} rows, not {rows}")
            return array

        block = Block(column("imei", np.uint64), column("imsi", np.uint64),
                      column("subscriber", np.uint64), column("attribute", np.uint32))
        return header["meta"], block
    except SectionFileError as exc:
        raise TableError(str(exc)) from None
    except (KeyError, ValueError, TypeError) as exc:
        raise TableError(f"{path}: malformed table: {type(exc).__name__}: {exc}") from None


# -- sorting what a parser produces -----------------------------------------------------------


class EntrySorter:
    """Entries in any order in (batch by batch), sorted entries out (`finish`).

    With a scratch directory, every RUN_ROWS rows are sorted and spilled to a table file in
    it, and `finish` merges the runs into one memory-mapped table there: memory stays bounded
    whatever the list's size. Without one (small lists, tests), everything stays in memory.
    """

    def __init__(self, scratch: Path | None = None, run_rows: int | None = None):
        self.scratch = scratch
        self.run_rows = run_rows or RUN_ROWS
        self.pending: list[Block] = []
        self.pending_rows = 0
        self.runs: list[Path] = []

    def add(self, imei, imsi=None, subscriber=None, attribute=None) -> None:
        block = Block.of(imei, imsi, subscriber, attribute)
        self.pending.append(block)
        self.pending_rows += len(block)
        if self.scratch is not None and self.pending_rows >= self.run_rows:
            self._spill()

    def _spill(self) -> None:
        run = Block.concatenate(self.pending).sorted()
        self.pending, self.pending_rows = [], 0
        path = self.scratch / f"run-{os.getpid()}-{next(_names)}.table"
        write_table(path, [run], {}, self.scratch)
        self.runs.append(path)

    def finish(self) -> Block:
        if not self.runs:
            block = Block.concatenate(self.pending).sorted()
            self.pending, self.pending_rows = [], 0
            return block
        if self.pending_rows:
            self._spill()
        runs = [open_table(path)[1] for path in self.runs]
        released = _Release(self.runs)
        path = self.scratch / f"sorted-{os.getpid()}-{next(_names)}.table"
        try:
            write_table(path, merged(runs, taken=released.taken), {}, self.scratch)
        finally:
            released.close()
        del runs
        for run in self.runs:
            run.unlink(missing_ok=True)  # mapped pages stay valid until dropped
        self.runs = []
        return _mapped_and_unlinked(path)


class _Release:
    """Gives the disk space of the sort runs back as the merge consumes them, so that the
    runs and the merged table do not both take the list's size (12 B a row each: 14 GB
    apiece for a 1.2-billion-row blacklist): the pages of each run already merged are
    punched out of its file (fallocate PUNCH_HOLE; whole pages only, behind the merge's
    position). Where the filesystem or the OS cannot, nothing is released until the runs
    are removed after the merge, as before."""

    def __init__(self, paths: list[Path]):
        self.files = []  # per run: (descriptor, [(column offset, item size, punched to)])
        self.consumed = [0] * len(paths)
        for path in paths:
            columns = [[offset, size, offset] for offset, size in _column_offsets(path)]
            self.files.append((os.open(path, os.O_WRONLY), columns))

    def taken(self, pieces: list[Block]) -> None:
        if not self.files:
            return
        for index, piece in enumerate(pieces):
            self.consumed[index] += len(piece)
            descriptor, columns = self.files[index]
            for column in columns:
                offset, size, punched = column
                end = (offset + self.consumed[index] * size) // _PAGE * _PAGE
                start = -(-punched // _PAGE) * _PAGE
                if end > start and not punch_hole(descriptor, start, end - start):
                    self.close()  # not supported here: keep the runs whole
                    return
                column[2] = max(punched, end)

    def close(self) -> None:
        for descriptor, _ in self.files:
            os.close(descriptor)
        self.files = []


_PAGE = mmap.PAGESIZE


def _column_offsets(path: Path) -> list[tuple[int, int]]:
    """(file offset, item size) of each stored column of a table file."""
    with open(path, "rb") as handle:
        start = handle.read(16)
        length = int.from_bytes(start[8:12], "little")
        header = json.loads(handle.read(length))
    body = (16 + length + 7) & ~7
    return [(body + offset, np.dtype(COLUMN_TYPES[name]).itemsize)
            for name, (offset, _) in header["sections"].items()]
