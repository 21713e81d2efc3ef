"""The messages the harness sends and reads: CER, ECR templates, DWA, DPR/DPA, and the verdict
an answer carries.

Requests are encoded once, with our data dictionary, into templates; each request on the wire
is a template copy with its hop-by-hop id, end-to-end id and Session-Id counter patched in
place, so sending costs a copy and three small writes, not an encode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
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
    VENDOR_3GPP,
    DisconnectCause,
    ResultCode,
)
from eir.diameter.dictionary import Dictionary

SESSION_COUNTER_DIGITS = 12
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
    (None when the Session-Id is to be sent as it is, as in a replayed capture)."""

    raw: bytes
    counter_at: int | None

    def instance(self, hop_by_hop: int, end_to_end: int, counter: int) -> bytes:
        buffer = bytearray(self.raw)
        _IDS.pack_into(buffer, 12, hop_by_hop, end_to_end)
        at = self.counter_at
        if at is not None:
            buffer[at:at + SESSION_COUNTER_DIGITS] = b"%012d" % (
                counter % 10 ** SESSION_COUNTER_DIGITS)
        return bytes(buffer)


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
    try:
        avps = decode_avps(message, 20, len(message))
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


class VerdictReader:
    """verdict_of, memoised on the answer's bytes after its Session-Id.

    An EIR's answers differ from one another only in their Session-Id and ids (and the
    verdict), so a few distinct tails cover a whole run; a bounded memo keeps answers that
    all differ (error texts) from growing it without end."""

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._memo: dict[bytes, Verdict] = {}

    def __call__(self, message: bytes) -> Verdict:
        tail = _after_session_id(message)
        if tail is None:
            return verdict_of(message)
        verdict = self._memo.get(tail)
        if verdict is None:
            verdict = verdict_of(message)
            if len(self._memo) < self.MAX_ENTRIES:
                self._memo[tail] = verdict
        return verdict


def _after_session_id(message: bytes) -> bytes | None:
    if len(message) < 28:
        return None
    code, word = _IDS.unpack_from(message, 20)
    if code != SESSION_ID or word >> 24 & 0x80:
        return None
    length = word & 0xFFFFFF
    return message[20 + ((length + 3) & ~3):]


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
