"""Sectioned files: a small JSON header, then 8-byte aligned arrays, mapped and read in place.

Snapshots (eir.lists.snapshot) and list tables (eir.lists.table) share this layout:

    MAGIC (8 bytes), uint32 header length, uint32 0, header JSON, sections

The header's "sections" maps each section to (offset from the end of the header, bytes).
Writing streams: a section is appended to in pieces, in any order, and pieces beyond a memory
budget go to a temporary file beside the output; `finish` lays the sections out, punching what
it has copied out of the temporary files. So a file of billions of rows is written with memory
bounded by the pieces, never the whole, and with disk space little above its own size.
"""

from __future__ import annotations

import ctypes
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

SPILL_BYTES = 64 << 20  # per section, held in memory before spilling to a temporary file
_COPY_CHUNK = 16 << 20


class SectionFileError(ValueError):
    """The buffer is not a readable sectioned file; the message says why."""


class _Section:
    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.pieces: list[bytes] = []
        self.held = 0
        self.spill = None  # a temporary file, once the pieces outgrow SPILL_BYTES
        self.nbytes = 0


class SectionWriter:
    """Collects sections (`append`), then writes the file (`finish`)."""

    def __init__(self, magic: bytes, types: dict[str, str], scratch: Path | None = None):
        self.magic = magic
        self.types = types  # section name → numpy dtype string ("<u4", "<u8", "u1")
        self.scratch = scratch  # where spills go (None: the system's temporary directory)
        self.sections: dict[str, _Section] = {}

    def declare(self, *names: str) -> None:
        """Sections that must appear even when nothing is appended to them."""
        for name in names:
            self._section(name)

    def _section(self, name: str) -> _Section:
        section = self.sections.get(name)
        if section is None:
            section = self.sections[name] = _Section(np.dtype(self.types[name]))
        return section

    def append(self, name: str, array: np.ndarray) -> None:
        section = self._section(name)
        data = np.ascontiguousarray(array, dtype=section.dtype).tobytes()
        if not data:
            return
        section.nbytes += len(data)
        if section.spill is None and section.held + len(data) > SPILL_BYTES:
            section.spill = tempfile.TemporaryFile(dir=self.scratch, prefix=".section-")
            for piece in section.pieces:
                section.spill.write(piece)
            section.pieces, section.held = [], 0
        if section.spill is not None:
            section.spill.write(data)
        else:
            section.pieces.append(data)
            section.held += len(data)

    def rows(self, name: str) -> int:
        section = self.sections.get(name)
        return 0 if section is None else section.nbytes // section.dtype.itemsize

    def finish(self, out: BinaryIO, header: dict) -> None:
        """Write magic, `header` (with "sections" added) and every section to `out`."""
        relative, position = {}, 0
        for name, section in self.sections.items():
            relative[name] = (position, section.nbytes)
            position += (section.nbytes + 7) & ~7
        header["sections"] = relative
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
        body_start = (16 + len(header_bytes) + 7) & ~7
        header_bytes = header_bytes.ljust(body_start - 16)
        out.write(self.magic + len(header_bytes).to_bytes(4, "little") + bytes(4))
        out.write(header_bytes)
        for section in self.sections.values():
            if section.spill is not None:
                _copy_releasing(section.spill, out)
            for piece in section.pieces:
                out.write(piece)
            out.write(bytes(((section.nbytes + 7) & ~7) - section.nbytes))
        self.close()

    def close(self) -> None:
        for section in self.sections.values():
            if section.spill is not None:
                section.spill.close()
                section.spill = None
            section.pieces = []

    def __enter__(self) -> "SectionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _copy_releasing(spill, out: BinaryIO) -> None:
    """Copy a spilled section into `out`, punching each copied piece out of the spill file:
    the spill and the output would otherwise both hold the section until the end (14 GB
    each for the keys of a 1.2-billion-row list)."""
    spill.seek(0)
    copied, releasing = 0, True
    while chunk := spill.read(_COPY_CHUNK):
        out.write(chunk)
        if releasing:  # where holes cannot be punched, the spill stays whole until closed
            releasing = punch_hole(spill.fileno(), copied, len(chunk))
        copied += len(chunk)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(descriptor: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset + length) of a file (reads give zeros); False where the
    OS or filesystem does not support it."""
    fallocate = _libc_fallocate()
    if fallocate is None:
        return False
    return fallocate(descriptor, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                     offset, length) == 0


@functools.cache
def _libc_fallocate():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


def read_sections(buffer, magic: bytes, types: dict[str, str], where: str
                  ) -> tuple[dict, dict[str, memoryview]]:
    """The header and {section: memoryview cast to its item type} of a sectioned file."""
    view = memoryview(buffer)
    if bytes(view[:8]) != magic:
        raise SectionFileError(f"{where}: not an open EIR {_kind(magic)} (bad magic)")
    if sys.byteorder != "little":
        raise SectionFileError(f"{where}: {_kind(magic)} files are little-endian; "
                               "this host is not")
    header_length = int.from_bytes(view[8:12], "little")
    try:
        header = json.loads(bytes(view[16:16 + header_length]))
        body = (16 + header_length + 7) & ~7
        arrays = {}
        for name, (offset, length) in header["sections"].items():
            start = body + offset
            if start + length > len(view):
                raise SectionFileError(f"{where}: section {name} runs past the end "
                                       "(truncated?)")
            arrays[name] = view[start:start + length].cast(_STRUCT_CODES[types[name]])
    except SectionFileError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise SectionFileError(f"{where}: header unreadable: {type(exc).__name__}: {exc}") \
            from None
    return header, arrays


_STRUCT_CODES = {"<u4": "I", "<u8": "Q", "u1": "B"}


def _kind(magic: bytes) -> str:
    return "snapshot" if magic.startswith(b"EIRSNAP") else "list table"
