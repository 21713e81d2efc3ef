"""Wire format of Diameter messages and AVPs (RFC 6733 §3, §4), without any dictionary.

Decoding is split in two steps so that each is cheap and fuzzable on its own:
`Framer` cuts a byte stream into whole messages, `decode_avps` cuts a message body into AVPs.
Values are interpreted later, by the dictionary, only for the AVPs that are looked at.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from eir.diameter.constants import AVP_FLAG_VENDOR, FLAG_REQUEST, HEADER_LENGTH, VERSION

_WORDS5 = struct.Struct("!IIIII")
_WORDS2 = struct.Struct("!II")
_WORDS3 = struct.Struct("!III")
_WORD = struct.Struct("!I")
_VENDOR_BIT = AVP_FLAG_VENDOR << 24  # in the AVP's flags-and-length word


class Header(NamedTuple):
    length: int
    flags: int
    code: int
    application: int
    hop_by_hop: int
    end_to_end: int

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_REQUEST)


class Avp(NamedTuple):
    """One AVP as received. `data` excludes header and padding."""

    code: int
    flags: int
    vendor: int
    data: bytes

    def encode(self) -> bytes:
        return encode_avp(self.code, self.flags, self.vendor, self.data)


class AvpLengthError(Exception):
    """An AVP whose length field is too small or runs past its container (→ 5014).

    `header` is the offending AVP's header, zero-padded to a full header when it was cut
    short, as RFC 6733 §7.1.5 asks for in Failed-AVP.
    """

    def __init__(self, code: int, flags: int, vendor: int, reported_length: int,
                 decoded: list[Avp] | None = None):
        super().__init__(f"AVP {code} (vendor {vendor}) has invalid length {reported_length}")
        self.code = code
        self.flags = flags
        self.vendor = vendor
        self.reported_length = reported_length
        # The AVPs before the broken one: an error answer still echoes their Session-Id.
        self.decoded = decoded or []


class AvpCountError(Exception):
    """More AVPs than the caller's budget (→ 5009): `failed` is the first one beyond it,
    `decoded` those before it (an error answer still echoes their Session-Id)."""

    def __init__(self, failed: Avp, decoded: list[Avp]):
        super().__init__(f"more AVPs than the {len(decoded)} accepted")
        self.failed = failed
        self.decoded = decoded


def parse_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    w0, w1, app, hbh, e2e = _WORDS5.unpack_from(buf, offset)
    return Header(w0 & 0xFFFFFF, w1 >> 24, w1 & 0xFFFFFF, app, hbh, e2e)


def encode_header(flags: int, code: int, application: int, hop_by_hop: int,
                  end_to_end: int, body_length: int) -> bytes:
    return _WORDS5.pack((VERSION << 24) | (HEADER_LENGTH + body_length),
                        (flags << 24) | code, application, hop_by_hop, end_to_end)


def encode_message(flags: int, code: int, application: int, hop_by_hop: int,
                   end_to_end: int, body: bytes) -> bytes:
    return encode_header(flags, code, application, hop_by_hop, end_to_end, len(body)) + body


_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")


def encode_avp(code: int, flags: int, vendor: int, data: bytes) -> bytes:
    """Header + data + padding to a 4-byte boundary. The V flag follows `vendor`."""
    if vendor:
        length = 12 + len(data)
        head = _WORDS3.pack(code, ((flags | AVP_FLAG_VENDOR) << 24) | length, vendor)
    else:
        length = 8 + len(data)
        head = _WORDS2.pack(code, ((flags & ~AVP_FLAG_VENDOR) << 24) | length)
    return head + data + _PADDING[length & 3]


def decode_avps(buf: bytes, start: int, end: int, limit: int = 1 << 24) -> list[Avp]:
    """Cut buf[start:end] into AVPs. Raises AvpLengthError on a length that cannot be right,
    AvpCountError on an AVP beyond the first `limit` (decoding stops there: a message
    packed with 8-byte AVPs costs what its first `limit` cost, not thousands)."""
    avps = []
    left = limit
    append = avps.append
    unpack2 = _WORDS2.unpack_from
    unpack1 = _WORD.unpack_from
    new = tuple.__new__  # Avp(...) without NamedTuple's Python-level __new__: hot path
    pos = start
    while pos < end:
        if end - pos < 8:
            raise AvpLengthError(*_partial_header(buf, pos, end), end - pos, avps)
        code, word = unpack2(buf, pos)
        length = word & 0xFFFFFF
        next_pos = pos + length
        if word & _VENDOR_BIT:
            if end - pos < 12:
                raise AvpLengthError(code, word >> 24, 0, length, avps)
            vendor = unpack1(buf, pos + 8)[0]
            if length < 12 or next_pos > end:
                raise AvpLengthError(code, word >> 24, vendor, length, avps)
            append(new(Avp, (code, word >> 24, vendor, buf[pos + 12:next_pos])))
        else:
            if length < 8 or next_pos > end:
                raise AvpLengthError(code, word >> 24, 0, length, avps)
            append(new(Avp, (code, word >> 24, 0, buf[pos + 8:next_pos])))
        pos += (length + 3) & ~3
        left -= 1
        if left < 0:
            raise AvpCountError(avps[-1], avps[:-1])
    return avps


def _partial_header(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    head = bytes(buf[pos:end]).ljust(8, b"\0")
    code, word = _WORDS2.unpack(head)
    return code, word >> 24, 0


class Framer:
    """Reassembles whole messages from a byte stream cut anywhere.

    `feed` returns every complete message now available, in order. A length that cannot be
    right (shorter than a header, not a multiple of 4, above `max_length`) or a version other
    than 1 makes the rest of the stream meaningless: the messages before it are still
    returned, `error` says what was wrong, and the caller closes the connection. A version
    other than 1 is reported once its whole 20-byte header is in, kept in
    `unsupported_version_header` (so that a request can be answered 5011 first).
    """

    __slots__ = ("_buffer", "max_length", "error", "unsupported_version_header")

    def __init__(self, max_length: int = 65536):
        self._buffer = bytearray()
        self.max_length = max_length
        self.error: str | None = None
        self.unsupported_version_header: bytes | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            return []
        buffer = self._buffer
        if buffer:
            buffer += data
            source = bytes(buffer)
        else:
            source = data
        messages = []
        pos = 0
        available = len(source)
        while available - pos >= 4:
            word = _WORD.unpack_from(source, pos)[0]
            version = word >> 24
            length = word & 0xFFFFFF
            if version != VERSION:
                if available - pos < HEADER_LENGTH:
                    break  # the rest of its header is still to come
                self.error = f"unsupported Diameter version {version}"
                self.unsupported_version_header = bytes(source[pos:pos + HEADER_LENGTH])
                break
            if length < HEADER_LENGTH or length & 3 or length > self.max_length:
                self.error = (f"message length {length} is invalid (must be "
                              f"{HEADER_LENGTH}..{self.max_length}, a multiple of 4)")
                break
            if available - pos < length:
                break
            messages.append(source[pos:pos + length])
            pos += length
        if self.error is not None:
            self._buffer = bytearray()
        elif pos < available:
            self._buffer = bytearray(source[pos:])
        else:
            self._buffer = bytearray()
        return messages

    @property
    def buffered(self) -> int:
        return len(self._buffer)
