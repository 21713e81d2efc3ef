"""The messages the harness sends and reads: CER, ECR templates, DWA, DPR/DPA, and the verdict
an answer carries.

Requests are encoded once, with our data dictionary, into templates; each request on the wire
is a template copy with its hop-by-hop id, end-to-end id and Session-Id counter patched in
place, so sending costs a copy and three small writes, not an encode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache

from eir.core.decision import EquipmentStatus
from eir.diameter.codec import AvpLengthError, decode_avps, encode_message, parse_header
from eir.diameter.constants import (
    APPLICATION_COMMON,
    APPLICATION_S13,
    COMMAND_CAPABILITIES_EXCHANGE,
    COMMAND_DISCONNECT_PEER,
    COMMAND_ME_IDENTITY_CHECK,
    FLAG_PROXIABLE,
    FLAG_REQUEST,
    HEADER_LENGTH,
    VENDOR_3GPP,
    DisconnectCause,
    ResultCode,
)
from eir.diameter.dictionary import Dictionary

SESSION_COUNTER_DIGITS = 12
COUNTER_MODULO = 10 ** SESSION_COUNTER_DIGITS
COUNTER_FORMAT = b"%%0%dd" % SESSION_COUNTER_DIGITS  # %012d
_IDS = struct.Struct("!II")
_U32 = struct.Struct("!I")

RESULT_CODE, EXPERIMENTAL_RESULT, EXPERIMENTAL_RESULT_CODE = 268, 297, 298
EQUIPMENT_STATUS, SESSION_ID = 1445, 263
TERMINAL_INFORMATION, IMEI, USER_NAME = 1401, 1402, 1


@lru_cache(maxsize=1)
def dictionary() -> Dictionary:
    return Dictionary.load()


@dataclass(frozen=True)
class Identity:
    """Who the harness says it is: an MME's Origin-Host/Realm, and the EIR's realm."""

    origin_host: str = "replay.localdomain"
    origin_realm: str = "localdomain"
    destination_realm: str = "localdomain"


def encode_cer(identity: Identity, host_ip: str, hop_by_hop: int = 0) -> bytes:
    encode = dictionary().encode
    body = b"".join([
        encode("Origin-Host", identity.origin_host),
        encode("Origin-Realm", identity.origin_realm),
        encode("Host-IP-Address", host_ip),
        encode("Vendor-Id", 0),
        encode("Product-Name", "open EIR replay"),
        encode("Supported-Vendor-Id", VENDOR_3GPP),
        encode("Auth-Application-Id", APPLICATION_S13),
        encode("Vendor-Specific-Application-Id", [
            encode("Vendor-Id", VENDOR_3GPP), encode("Auth-Application-Id", APPLICATION_S13)]),
    ])
    return encode_message(FLAG_REQUEST, COMMAND_CAPABILITIES_EXCHANGE, APPLICATION_COMMON,
                          hop_by_hop, hop_by_hop, body)


def encode_dpr(identity: Identity, hop_by_hop: int) -> bytes:
    encode = dictionary().encode
    body = (encode("Origin-Host", identity.origin_host)
            + encode("Origin-Realm", identity.origin_realm)
            + encode("Disconnect-Cause", int(DisconnectCause.REBOOTING)))
    return encode_message(FLAG_REQUEST, COMMAND_DISCONNECT_PEER, APPLICATION_COMMON,
                          hop_by_hop, hop_by_hop, body)


def encode_answer_to(request: bytes, identity: Identity) -> bytes:
    """DWA or DPA (2001) to a request from the server: ids echoed, as RFC 6733 asks."""
    header = parse_header(request)
    encode = dictionary().encode
    body = (encode("Result-Code", int(ResultCode.SUCCESS))
            + encode("Origin-Host", identity.origin_host)
            + encode("Origin-Realm", identity.origin_realm))
    return encode_message(0, header.code, header.application, header.hop_by_hop,
                          header.end_to_end, body)


@dataclass(frozen=True)
class EcrTemplate:
    """One pre-encoded ECR; `counter_at` is where the Session-Id's counter digits start
    (None when the Session-Id is to be sent as it is, as in a replayed capture).

    `format` is the ECR as a bytes %-format taking (hop-by-hop and end-to-end ids packed,
    counter): one `%` builds a request, the cheapest way CPython has to patch three fields
    (the load generator builds every request this way)."""

    raw: bytes
    counter_at: int | None
    format: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw, at = self.raw, self.counter_at
        head = raw[:12].replace(b"%", b"%%") + b"%b"
        if at is None:
            # "%.0a" consumes the counter and writes nothing (ascii() cut to 0 characters).
            text = head + raw[20:].replace(b"%", b"%%") + b"%.0a"
        else:
            text = (head + raw[20:at].replace(b"%", b"%%") + COUNTER_FORMAT
                    + raw[at + SESSION_COUNTER_DIGITS:].replace(b"%", b"%%"))
        object.__setattr__(self, "format", text)

    def instance(self, hop_by_hop: int, end_to_end: int, counter: int) -> bytes:
        return self.format % (_IDS.pack(hop_by_hop, end_to_end), counter % COUNTER_MODULO)


def ecr_template(identity: Identity, imei: str, imsi: str | None,
                 software_version: str | None = None) -> EcrTemplate:
    """An ECR in the grammar's order, with a Session-Id `HOST;replay;000000000000`."""
    encode = dictionary().encode
    prefix = f"{identity.origin_host};replay;"
    session_id = prefix + "0" * SESSION_COUNTER_DIGITS
    terminal = [encode("IMEI", imei)]
    if software_version:
        terminal.append(encode("Software-Version", software_version))
    parts = [encode("Session-Id", session_id),
             encode("Vendor-Specific-Application-Id", [
                 encode("Vendor-Id", VENDOR_3GPP), encode("Auth-Application-Id",
                                                          APPLICATION_S13)]),
             encode("Auth-Session-State", 1),
             encode("Origin-Host", identity.origin_host),
             encode("Origin-Realm", identity.origin_realm),
             encode("Destination-Realm", identity.destination_realm),
             encode("Terminal-Information", terminal)]
    if imsi:
        parts.append(encode("User-Name", imsi))
    raw = encode_message(FLAG_REQUEST | FLAG_PROXIABLE, COMMAND_ME_IDENTITY_CHECK,
                         APPLICATION_S13, 0, 0, b"".join(parts))
    return EcrTemplate(raw, raw.index(session_id.encode()) + len(prefix))


# -- what an answer says ---------------------------------------------------------------------

# (result code, Equipment-Status): the result code is the Result-Code or, failing that, the
# Experimental-Result-Code (5422 equipment unknown); None where the answer has neither.
Verdict = tuple[int | None, int | None]


def verdict_of(message: bytes) -> Verdict:
    """The verdict an ECA carries, read with our codec (no dictionary: only 4 AVPs matter)."""
    return verdict_of_avps(message[HEADER_LENGTH:])


def verdict_of_avps(data: bytes) -> Verdict:
    """The verdict carried by a run of AVPs (an answer's, after its header)."""
    try:
        avps = decode_avps(data, 0, len(data))
    except AvpLengthError:
        return None, None
    result = status = experimental = None
    for avp in avps:
        if avp.vendor == 0:
            if avp.code == RESULT_CODE and len(avp.data) == 4:
                result = _U32.unpack(avp.data)[0]
            elif avp.code == EXPERIMENTAL_RESULT:
                try:
                    children = decode_avps(avp.data, 0, len(avp.data))
                except AvpLengthError:
                    continue
                for child in children:
                    if child.code == EXPERIMENTAL_RESULT_CODE and len(child.data) == 4:
                        experimental = _U32.unpack(child.data)[0]
        elif avp.vendor == VENDOR_3GPP and avp.code == EQUIPMENT_STATUS and len(avp.data) == 4:
            status = _U32.unpack(avp.data)[0]
    return (result if result is not None else experimental), status


class VerdictClasses:
    """Numbers the verdicts of a run's answers (0, 1, 2, ... in order of first sight) and
    remembers which number the AVPs of each answer shape have.

    An EIR's answers differ from one another only in their ids and Session-Id (and their
    verdict), so the bytes after the Session-Id are the key of a memo: after the first answer
    of each shape, classifying one costs a dict lookup. The verdict depends on those bytes
    alone (the Session-Id is none of the AVPs verdict_of_avps reads), so the memo cannot
    answer differently from a full decode, whatever the server's AVP order, Experimental-Result
    or Failed-AVP. It is bounded: answers that all differ (error texts naming the request)
    are decoded each time past MAX_SHAPES shapes instead of growing it without end."""

    MAX_SHAPES = 4096

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []  # class number → verdict
        self.errors: set[int] = set()  # the class numbers whose verdict is_error
        self.memo: dict[bytes, int] = {}  # an answer's AVPs after its Session-Id → class
        self._numbers: dict[Verdict, int] = {}

    def classify(self, avps: bytes) -> int:
        number = self.memo.get(avps)
        if number is None:
            number = self.number(verdict_of_avps(avps))
            if len(self.memo) < self.MAX_SHAPES:
                self.memo[avps] = number
        return number

    def number(self, verdict: Verdict) -> int:
        number = self._numbers.get(verdict)
        if number is None:
            number = self._numbers[verdict] = len(self.verdicts)
            self.verdicts.append(verdict)
            if is_error(verdict):
                self.errors.add(number)
        return number


_HEADER = struct.Struct("!5I")
_HEADER_AND_AVP = struct.Struct("!7I")  # the header, then the first AVP's code, flags|length
_REQUEST_BIT = FLAG_REQUEST << 24
_AVP_VENDOR_BIT = 0x80 << 24


class AnswerReader:
    """Frames one connection's stream and classifies the answers to our requests, in one pass
    over each read with no object per answer but its memo key (sans-IO: bytes in, lists out).

    `feed` pops each answer's hop-by-hop id from `outstanding` and appends the entry found to
    `entries` and its verdict class (VerdictClasses, shared by a worker's connections) to
    `classes`; every other message (a request from the server, CEA, DPA, an answer to nothing
    outstanding) goes to `others`, whole and in order."""

    def __init__(self, verdict_classes: VerdictClasses) -> None:
        self.verdict_classes = verdict_classes
        self.buffer = b""

    def feed(self, data: bytes, outstanding: dict, entries: list, classes: list,
             others: list[bytes]) -> str | None:
        """Consume `data`; None, or what is wrong with the stream (it cannot be framed on)."""
        buffer = self.buffer + data if self.buffer else data
        end = len(buffer)
        pos = 0
        unpack_long, unpack_short = _HEADER_AND_AVP.unpack_from, _HEADER.unpack_from
        memo = self.verdict_classes.memo
        classify = self.verdict_classes.classify
        pop = outstanding.pop
        add_entry, add_class = entries.append, classes.append
        while end - pos >= HEADER_LENGTH:
            if end - pos >= 28:
                word, flags_code, _, hop_by_hop, _, avp_code, avp_word = unpack_long(buffer, pos)
            else:
                word, flags_code, _, hop_by_hop, _ = unpack_short(buffer, pos)
                avp_code = 0
            length = word & 0xFFFFFF
            if length < HEADER_LENGTH:
                self.buffer = b""
                return f"the server sent a message of length {length}"
            stop = pos + length
            if stop > end:
                break
            entry = None if flags_code & _REQUEST_BIT else pop(hop_by_hop, None)
            if entry is None:
                others.append(buffer[pos:stop])
                pos = stop
                continue
            after = pos + HEADER_LENGTH
            if avp_code == SESSION_ID and not avp_word & _AVP_VENDOR_BIT and length >= 28:
                avp_length = avp_word & 0xFFFFFF
                if avp_length >= 8:  # shorter, a full decode fails where a cut one might not
                    after += (avp_length + 3) & ~3  # past the end: b"", no verdict, as decoded
            key = buffer[after:stop]
            number = memo.get(key)
            add_entry(entry)
            add_class(classify(key) if number is None else number)
            pos = stop
        self.buffer = buffer[pos:]
        return None


def describe(verdict: Verdict) -> str:
    """`2001 BLACKLISTED`, `5422 EQUIPMENT_UNKNOWN`, `5004`, `no result code`."""
    code, status = verdict
    if code is None:
        return "no result code"
    if status is not None:
        try:
            return f"{code} {EquipmentStatus(status).name}"
        except ValueError:
            return f"{code} Equipment-Status {status}"
    if code == 5422:
        return "5422 EQUIPMENT_UNKNOWN"
    try:
        return f"{code} {ResultCode(code).name}"
    except ValueError:
        return str(code)


def status_name(status: int) -> str:
    try:
        return EquipmentStatus(status).name
    except ValueError:
        return str(status)


def is_error(verdict: Verdict) -> bool:
    """Not a verdict: neither 2001 nor Experimental-Result 5422 (equipment unknown)."""
    return verdict[0] not in (int(ResultCode.SUCCESS), 5422)


@dataclass(frozen=True)
class EcrFields:
    session_id: str | None
    imei: str | None
    imsi: str | None


def ecr_fields(message: bytes) -> EcrFields:
    """Session-Id, IMEI and IMSI (User-Name) of an ECR, for matching and reporting."""
    try:
        avps = decode_avps(message, 20, len(message))
    except AvpLengthError:
        return EcrFields(None, None, None)
    session = imei = imsi = None
    for avp in avps:
        if avp.code == SESSION_ID and avp.vendor == 0:
            session = avp.data.decode(errors="replace")
        elif avp.code == USER_NAME and avp.vendor == 0:
            imsi = avp.data.decode(errors="replace")
        elif avp.code == TERMINAL_INFORMATION and avp.vendor == VENDOR_3GPP:
            try:
                children = decode_avps(avp.data, 0, len(avp.data))
            except AvpLengthError:
                continue
            for child in children:
                if child.code == IMEI and child.vendor == VENDOR_3GPP:
                    imei = child.data.decode(errors="replace")
    return EcrFields(session, imei, imsi)


def session_id_of(message: bytes) -> str | None:
    if len(message) < 28:
        return None
    code, word = _IDS.unpack_from(message, 20)
    if code != SESSION_ID or word >> 24 & 0x80:
        return ecr_fields(message).session_id
    return message[28:20 + (word & 0xFFFFFF)].decode(errors="replace")
