"""The N5g-eir fast path's HTTP/2 pieces (eir.interfaces.sbi `SbiSession`): a request's
header block decoded, a response's header block encoded, frames framed, without h2.

Why: through h2 a GET costs ~130 µs of CPU (bench/sbi.py; docs/5G.md "What h2 costs"):
hyperframe objects per frame, h2's stream state machines, header validation generators, and
HPACK in pure Python, where the Huffman decoding of the `:path` alone is ~35 µs (hpack
walks it a nibble at a time). The common request, one HEADERS frame with END_STREAM and
END_HEADERS on a new stream, needs none of the machinery around it; everything else stays
h2's.

Sharing one connection with h2 stays exact because:
* HPACK: the request blocks decoded here use h2's own decoder table (`hpack.table.
  HeaderTable`: its lookups and its `add`, so eviction is hpack's), and a block that is not
  answered here leaves that table as it found it (`decode_block` undoes its additions), so
  h2 decodes it afresh. Blocks with a dynamic table size update are left to h2.
* Our response blocks use only static-table names and literals *without indexing*: they
  change no decoder table, so h2's encoder and the client's decoder stay in step whatever
  either sent before (a pending table size change is h2's to signal: then h2 answers).
* Streams and flow control: the caller tells h2 the stream was opened (its highest inbound
  stream id) and takes the DATA bytes from h2's connection send window (eir.interfaces.
  sbi `SbiSession._answer_fast`).
"""

from __future__ import annotations

import re

from h2.utilities import CONNECTION_HEADERS
from hpack.huffman_table import (
    HUFFMAN_COMPLETE,
    HUFFMAN_EMIT_SYMBOL,
    HUFFMAN_FAIL,
    HUFFMAN_TABLE,
)
from hpack.table import HeaderTable

FRAME_HEADER_BYTES = 9
(DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE,
 CONTINUATION) = range(10)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
# HPACK's per-entry overhead in SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 §6.5.2).
ENTRY_OVERHEAD = 32


# -- Huffman: a byte at a time ---------------------------------------------------------------

def _byte_table() -> tuple[tuple[tuple[bytes | None, int], ...], int]:
    """hpack's nibble state machine (nghttp2's) composed into one of bytes: for state s and
    input byte b, entry s * 256 + b is (the bytes emitted, or None for an invalid code; the
    next state times 256). Also the states a string may end in, as a bit mask."""
    entries: list[tuple[bytes | None, int]] = []
    complete = 0
    for state in range(256):
        for byte in range(256):
            middle, flags, symbol = HUFFMAN_TABLE[state * 16 + (byte >> 4)]
            out = bytes([symbol]) if flags & HUFFMAN_EMIT_SYMBOL else b""
            if flags & HUFFMAN_FAIL:
                entries.append((None, 0))
                continue
            final, flags, symbol = HUFFMAN_TABLE[middle * 16 + (byte & 0x0F)]
            if flags & HUFFMAN_FAIL:
                entries.append((None, 0))
                continue
            if flags & HUFFMAN_EMIT_SYMBOL:
                out += bytes([symbol])
            entries.append((out, final * 256))
            if flags & HUFFMAN_COMPLETE:
                complete |= 1 << final
    return tuple(entries), complete


_HUFFMAN, _COMPLETE_STATES = _byte_table()
# The decoding of the first HUFFMAN_PREFIX_BYTES of a string, by those bytes: every request
# path starts alike ("/n5g-eir-eic/v1/equipment-status?pei=imei-" is ~30 bytes coded). At
# most HUFFMAN_PREFIXES kept (then emptied: a client varying them costs only itself).
HUFFMAN_PREFIX_BYTES = 24
HUFFMAN_PREFIXES = 64
_prefixes: dict[bytes, tuple[bytes | None, int]] = {}


def _walk(data: bytes, state: int, parts: list) -> int:
    for byte in data:
        part, state = _HUFFMAN[state + byte]
        parts.append(part)
    return state


def decode_huffman(data: bytes) -> bytes | None:
    """The string Huffman-coded in `data` (RFC 7541 §5.2); None if it is not a valid one
    (hpack's decoder then says why)."""
    head = data[:HUFFMAN_PREFIX_BYTES]
    known = _prefixes.get(head)
    if known is None:
        parts: list = []
        state = _walk(head, 0, parts)
        known = (None if None in parts else b"".join(parts), state)
        if len(_prefixes) >= HUFFMAN_PREFIXES:
            _prefixes.clear()
        _prefixes[head] = known
    first, state = known
    if first is None:
        return None
    parts = [first]
    state = _walk(data[HUFFMAN_PREFIX_BYTES:], state, parts)
    if not _COMPLETE_STATES >> (state >> 8) & 1 or None in parts:
        return None
    return b"".join(parts)


# -- HPACK: a request's header block ---------------------------------------------------------

# The static table by HPACK index (1-61); index 0 is no entry.
_STATIC: tuple = (None, *HeaderTable.STATIC_TABLE)
_STATIC_LENGTH = len(HeaderTable.STATIC_TABLE)


class _Undecodable(Exception):
    """Not decoded here (invalid, or a representation left to hpack)."""


def _integer(block: bytes, position: int, prefix_bits: int) -> tuple[int, int]:
    """(value, next position) of an HPACK integer (RFC 7541 §5.1) at `position`."""
    limit = (1 << prefix_bits) - 1
    value = block[position] & limit
    position += 1
    if value < limit:
        return value, position
    shift = 0
    while True:
        if position >= len(block) or shift > 28:
            raise _Undecodable
        byte = block[position]
        position += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _string(block: bytes, position: int) -> tuple[bytes, int]:
    if position >= len(block):
        raise _Undecodable
    huffman = block[position] & 0x80
    length, position = _integer(block, position, 7)
    end = position + length
    if end > len(block):
        raise _Undecodable
    data = block[position:end]
    if huffman:
        data = decode_huffman(data)
        if data is None:
            raise _Undecodable
    return data, end


def decode_request(block: bytes, table: HeaderTable, max_list_bytes: int
                   ) -> tuple[bytes, bytes, bytes | None] | None:
    """(method, path, user-agent) of a plain request's HPACK block (`plain_request`),
    decoded against `table` (h2's decoder table), with the block's additions made there;
    None, with `table` as it was, for any other block (invalid, with a table size update,
    above `max_list_bytes`, not a plain request): h2 decodes that one."""
    headers = []
    saved = None  # the table before the block's first addition
    size = 0
    position = 0
    end = len(block)
    dynamic = table.dynamic_entries
    try:
        while position < end:
            first = block[position]
            if first & 0x80:  # indexed field
                if first == 0xFF:
                    index, position = _integer(block, position, 7)
                else:
                    index = first & 0x7F
                    position += 1
                header = _STATIC[index] if index <= _STATIC_LENGTH else dynamic[
                    index - _STATIC_LENGTH - 1]
            elif first & 0xE0 == 0x20:  # dynamic table size update: h2's
                raise _Undecodable
            else:  # literal: with incremental indexing (01), without (0000), never (0001)
                indexing = first & 0x40
                index, position = _integer(block, position, 6 if indexing else 4)
                if index:
                    name = (_STATIC[index] if index <= _STATIC_LENGTH else dynamic[
                        index - _STATIC_LENGTH - 1])[0]
                else:
                    name, position = _string(block, position)
                value, position = _string(block, position)
                header = (name, value)
                if indexing:
                    if saved is None:
                        saved = (table.dynamic_entries.copy(), table._current_size)
                    table.add(name, value)
            headers.append(header)
            size += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
            if size > max_list_bytes:
                raise _Undecodable
        request = plain_request(headers)
        if request is None:
            raise _Undecodable
    except (_Undecodable, IndexError, TypeError):  # TypeError: index 0, _STATIC's None
        if saved is not None:
            table.dynamic_entries, table._current_size = saved
        return None
    return request


# -- the common request's shape --------------------------------------------------------------

_NAME = re.compile(rb"[a-z0-9!#$%&'*+.^_`|~-]+\Z")
# No NUL, CR or LF; no space or tab at either end (RFC 9113 §8.2.1).
_VALUE = re.compile(rb"(?:[^\x00\r\n\t ](?:[^\x00\r\n]*[^\x00\r\n\t ])?)?\Z")
_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))
_LEFT_TO_H2 = CONNECTION_HEADERS | {b"te", b"host"}
# Names and values found well-formed, remembered (most come from the HPACK tables, the same
# on every request); emptied when full (a client varying them costs only itself).
CHECKED_FIELDS = 512
_checked_names: dict[bytes, bool] = {}
_checked_values: dict[bytes, bool] = {}


def _matches(text: bytes, pattern: re.Pattern, checked: dict[bytes, bool]) -> bool:
    known = checked.get(text)
    if known is None:
        if len(checked) >= CHECKED_FIELDS:
            checked.clear()
        known = checked[text] = pattern.match(text) is not None
    return known


def plain_request(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bytes | None] | None:
    """(method, path, last user-agent) of a request whose headers are well-formed in the
    simplest way (a subset of what RFC 9113 §8.2-8.3 and h2's checks accept: the four
    pseudo-headers once each and first, a non-empty :path, lower-case token names, clean
    values, no connection-specific field, no TE, no Host, not CONNECT); None for any other,
    which h2 then receives and checks."""
    method = path = agent = None
    seen = set()
    regular = False
    for name, value in headers:
        if not _matches(value, _VALUE, _checked_values):
            return None
        if name in _PSEUDO:
            if regular or name in seen:
                return None
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
        elif name in _LEFT_TO_H2 or not _matches(name, _NAME, _checked_names):
            return None
        else:
            regular = True
            if name == b"user-agent":
                agent = value
    if len(seen) != 4 or not path or method == b"CONNECT":
        return None
    return method, path, agent


# -- HPACK and frames: our answers -----------------------------------------------------------

_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_NAMES.setdefault(_name, _index)


def _encode_integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HPACK block of literals without indexing (RFC 7541 §6.2.2), each name from the
    static table when it is there: valid whatever the decoder's dynamic table holds, and
    leaving it as it is."""
    out = bytearray()
    for name, value in headers:
        index = _STATIC_NAMES.get(name)
        if index is not None:
            out += _encode_integer(index, 4, 0)
        else:
            out += b"\x00" + _encode_integer(len(name), 7, 0) + name
        out += _encode_integer(len(value), 7, 0) + value
    return bytes(out)


def frame_header(length: int, kind: int, flags: int) -> bytes:
    """The first 5 bytes of a frame's header: the stream id (4 bytes) follows."""
    return length.to_bytes(3, "big") + bytes((kind, flags))

