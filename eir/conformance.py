"""`eir conformance`: S13 and Diameter base checks run against any EIR, each citing its clause.

    eir conformance --target HOST:PORT [--expect FILE.csv]... [--unknown 5422|WHITELISTED|...]
                    [--check NAME]... [--timeout S] [--deadline S] [--json]

Each check opens its own connection (CER/CEA first, with a valid FQDN as Origin-Host), sends
what it tests and judges the answer: pass, fail (with what was wrong and the bytes, in hex) or
n/a (nothing to test it with, e.g. no expected verdicts given). One broken connection or a
hung server fails that check only. Requests are built with our dictionary
(eir.diameter.dictionary) and answers cut with our codec (eir.diameter.codec); nothing here
knows the target is open EIR.

The user's expectations (`--expect`, repeatable) are a CSV `imei,imsi,expected`, with
`expected` one of WHITELISTED, BLACKLISTED, GREYLISTED, 5422 (equipment unknown) or another
Result-Code such as 5004, or list files in open EIR's native format (`imei,status,imsi,
reason`): each exact IMEI in them is expected to get the verdict open EIR's decision engine
gives it from those lists. `--unknown` says what an IMEI on no list gets (5422 by default,
TS 29.272 §6.2.1.3; an EIR configured to answer, say, GREYLISTED instead is declared so).

Exit status: 0 every check passed (n/a allowed), 1 a check failed or the target cannot be
reached, 2 the command line or an expectation file cannot be used.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from eir.core.config import parse_host_port
from eir.core.decision import EquipmentStatus, UnknownPolicy
from eir.diameter.codec import (
    Avp,
    AvpLengthError,
    decode_avps,
    encode_avp,
    encode_message,
    parse_header,
)
from eir.diameter.constants import (
    APPLICATION_COMMON,
    APPLICATION_S13,
    AVP_FLAG_MANDATORY,
    AVP_FLAG_VENDOR,
    COMMAND_CAPABILITIES_EXCHANGE,
    COMMAND_DEVICE_WATCHDOG,
    COMMAND_DISCONNECT_PEER,
    COMMAND_ME_IDENTITY_CHECK,
    FLAG_ERROR,
    FLAG_PROXIABLE,
    FLAG_REQUEST,
    HEADER_LENGTH,
    VENDOR_3GPP,
    DisconnectCause,
)
from eir.diameter.dictionary import Dictionary
from eir.lists.native import (
    ListError,
    imei_and_imsi,
    load_rule_set,
    read_imei_table,
    read_native_csv,
)

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "n/a"
UNKNOWN_RESULT = 5422  # Experimental-Result-Code DIAMETER_ERROR_EQUIPMENT_UNKNOWN
APPLICATION_S6A = 16777251  # a real 3GPP application an EIR does not serve
UNKNOWN_MANDATORY_AVP = 0x7EEE_0001  # no dictionary defines it
MAX_MESSAGE_BYTES = 1 << 20
PIPELINED = 64
DPA_WAIT_S = 0.5  # at the end of each check's connection
# An IMEI no sane list holds (TAC 99999999 is unallocated): its verdict is the EIR's default.
UNLISTED_IMEI = "99999999012345"
UNLISTED_IMSI = "001010000000001"  # the IMSI of requests about no subscriber in particular
_U32 = struct.Struct("!I")

# AVP codes read in answers (vendor 0 unless said).
SESSION_ID, ORIGIN_HOST, ORIGIN_REALM, RESULT_CODE = 263, 264, 296, 268
HOST_IP_ADDRESS, VENDOR_ID, PRODUCT_NAME = 257, 266, 269
AUTH_APPLICATION_ID, VENDOR_SPECIFIC_APPLICATION_ID = 258, 260
AUTH_SESSION_STATE, FAILED_AVP, PROXY_INFO = 277, 279, 284
EXPERIMENTAL_RESULT, EXPERIMENTAL_RESULT_CODE = 297, 298
EQUIPMENT_STATUS = 1445  # vendor 10415


class UsageError(Exception):
    """The command line or an expectation file cannot be used (exit 2)."""


class Unreachable(Exception):
    """The target cannot be connected to, or refuses our CER: the check fails."""


@functools.lru_cache(maxsize=1)
def dictionary() -> Dictionary:
    return Dictionary.load()


@dataclass(frozen=True)
class Identity:
    """Who the checks say they are: an MME's Origin-Host/Realm (valid FQDNs: an EIR may
    answer 5004 to any other), and the EIR's realm."""

    origin_host: str = "conformance.localdomain"
    origin_realm: str = "localdomain"
    destination_realm: str = "localdomain"


# -- results ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str  # PASS, FAIL, NOT_APPLICABLE
    detail: str = ""
    data: bytes | None = None  # the bytes that failed (an answer, an AVP), shown in hex


def passed(detail: str = "") -> Outcome:
    return Outcome(PASS, detail)


def failed(detail: str, data: bytes | None = None) -> Outcome:
    return Outcome(FAIL, detail, data)


class CheckFailed(Exception):
    """Raised inside a check to fail it: `detail`, and the bytes that show it."""

    def __init__(self, detail: str, data: bytes | None = None):
        super().__init__(detail)
        self.outcome = failed(detail, data)


@dataclass
class Result:
    name: str
    title: str
    clause: str
    outcome: Outcome
    elapsed_ms: float

    def to_json(self) -> dict:
        return {"check": self.name, "title": self.title, "clause": self.clause,
                "status": self.outcome.status, "detail": self.outcome.detail,
                "bytes": self.outcome.data.hex() if self.outcome.data is not None else None,
                "elapsed_ms": round(self.elapsed_ms, 3)}


# -- expectations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """What an ECR should get: 2001 with `status`, or `result` (5422, 5004...) alone."""

    status: EquipmentStatus | None = None
    result: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Expected":
        word = text.strip().upper()
        aliases = {"WHITELIST": "WHITELISTED", "BLACKLIST": "BLACKLISTED",
                   "GREYLIST": "GREYLISTED", "UNKNOWN": "5422"}
        word = aliases.get(word, word)
        if word in EquipmentStatus.__members__:
            return cls(status=EquipmentStatus[word])
        if word.isdigit() and len(word) == 4:
            return cls(result=int(word))
        raise ValueError(f"{text!r} is not WHITELISTED, BLACKLISTED, GREYLISTED, 5422 or a "
                         "4-digit Result-Code")

    def describe(self) -> str:
        return f"2001 {self.status.name}" if self.status is not None else str(self.result)

    def matches(self, answer: "Answer") -> bool:
        if self.status is not None:
            return answer.result_code == 2001 and answer.equipment_status == self.status
        if self.result == UNKNOWN_RESULT:
            return answer.is_equipment_unknown
        return answer.result_code == self.result


@dataclass(frozen=True)
class Expectation:
    imei: str
    imsi: str | None  # None: the ECR is sent without User-Name
    expected: Expected
    source: str  # file:line
    # What the EIR should answer for this IMEI in an ECR without User-Name, when known.
    without_imsi: Expected | None = None


def read_expectations(path: Path) -> list[Expectation]:
    """`imei,imsi,expected` rows, or the exact IMEIs of a native list (`imei,status,...`),
    whose verdicts open EIR's decision engine computes from that list."""
    try:
        header, rows = read_imei_table(path, "imei,imsi,expected")
    except ListError as exc:
        raise UsageError(str(exc)) from None
    if "status" in header and "expected" not in header:
        return _list_expectations(path)
    if "imei" not in header or "expected" not in header:
        raise UsageError(f"{path}: header: expected imei,imsi,expected (or a list file "
                         "imei,status,imsi,reason)")
    expectations, problems = [], []
    for where, cells in rows:
        imei, imsi, row_problems = imei_and_imsi(where, cells)
        if row_problems:
            problems += row_problems
            continue
        try:
            expected = Expected.parse(cells.get("expected", ""))
        except ValueError as exc:
            problems.append(f"{where}: expected: {exc}")
            continue
        expectations.append(Expectation(imei, imsi, expected, where,
                                        None if imsi else expected))
    if problems:
        raise UsageError("\n".join(problems))
    return expectations


def _list_expectations(path: Path) -> list[Expectation]:
    try:
        rules = read_native_csv(path)
        rule_set = load_rule_set([path], UnknownPolicy.UNKNOWN)
    except ListError as exc:
        raise UsageError(str(exc)) from None
    def expected(imsi: str | None) -> Expected:
        verdict = rule_set.decide(rule.imei, imsi)
        return (Expected(status=verdict.status) if verdict.status is not None
                else Expected(result=UNKNOWN_RESULT))

    expectations = []
    for rule in rules:
        if rule.imei is None:
            continue  # ranges and TACs: the user names the IMEIs to try in imei,imsi,expected
        # An MME sends User-Name: a rule for any subscriber is tried with one on no list.
        imsi = rule.imsi or UNLISTED_IMSI
        expectations.append(Expectation(rule.imei, imsi, expected(imsi), rule.source,
                                        expected(None)))
    return expectations


# -- answers -----------------------------------------------------------------------------------

class Answer:
    """A received message: header fields and top-level AVPs, cut with our codec."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.version = raw[0]
        self.header = parse_header(raw)
        try:
            self.avps = decode_avps(raw, HEADER_LENGTH, len(raw))
        except AvpLengthError as exc:
            raise CheckFailed(f"an AVP of the answer is cut wrong: {exc}", raw) from None

    def all(self, code: int, vendor: int = 0) -> list[Avp]:
        return [avp for avp in self.avps if avp.code == code and avp.vendor == vendor]

    def first(self, code: int, vendor: int = 0) -> Avp | None:
        found = self.all(code, vendor)
        return found[0] if found else None

    def u32(self, code: int, vendor: int = 0) -> int | None:
        avp = self.first(code, vendor)
        return _U32.unpack(avp.data)[0] if avp is not None and len(avp.data) == 4 else None

    @property
    def result_code(self) -> int | None:
        return self.u32(RESULT_CODE)

    @property
    def equipment_status(self) -> int | None:
        return self.u32(EQUIPMENT_STATUS, VENDOR_3GPP)

    @property
    def experimental_result(self) -> tuple[int | None, int | None] | None:
        """(Vendor-Id, Experimental-Result-Code) of the Experimental-Result AVP, if any."""
        avp = self.first(EXPERIMENTAL_RESULT)
        if avp is None:
            return None
        children = _children(avp)
        vendor = code = None
        for child in children:
            if child.code == VENDOR_ID and len(child.data) == 4:
                vendor = _U32.unpack(child.data)[0]
            elif child.code == EXPERIMENTAL_RESULT_CODE and len(child.data) == 4:
                code = _U32.unpack(child.data)[0]
        return vendor, code

    @property
    def is_equipment_unknown(self) -> bool:
        return (self.result_code is None
                and self.experimental_result == (VENDOR_3GPP, UNKNOWN_RESULT))

    def verdict(self) -> str:
        """`2001 BLACKLISTED`, `Experimental-Result 5422`, `5004`, `no result`."""
        code, status = self.result_code, self.equipment_status
        if code is None:
            experimental = self.experimental_result
            if experimental is not None:
                return f"Experimental-Result {experimental[1]} (vendor {experimental[0]})"
            return "no Result-Code nor Experimental-Result"
        if status is not None:
            try:
                return f"{code} {EquipmentStatus(status).name}"
            except ValueError:
                return f"{code} Equipment-Status {status}"
        return str(code)


def _children(avp: Avp) -> list[Avp]:
    try:
        return decode_avps(avp.data, 0, len(avp.data))
    except AvpLengthError as exc:
        raise CheckFailed(f"Grouped AVP {avp.code} is cut wrong: {exc}", avp.encode()) from None


# -- requests ----------------------------------------------------------------------------------

@dataclass
class Probe:
    """What every check needs: where, who we are, how long to wait, what to expect."""

    host: str
    port: int
    identity: Identity
    timeout: float = 2.0
    deadline: float = 1.0  # pipelined answers must all be in within this
    expectations: list[Expectation] = field(default_factory=list)
    unknown: Expected = field(default_factory=lambda: Expected(result=UNKNOWN_RESULT))
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return next(self._ids)

    def session_id(self) -> str:
        return f"{self.identity.origin_host};conformance;{self.next_id()}"


def ecr(probe: Probe, imei: str | None, imsi: str | None = None, *,
        software_version: str | None = None, hop_by_hop: int | None = None,
        flags: int = FLAG_REQUEST | FLAG_PROXIABLE, application: int = APPLICATION_S13,
        omit: tuple[str, ...] = (), extra: bytes = b"", session_id: str | None = None
        ) -> tuple[bytes, str]:
    """An ECR in the grammar's order (TS 29.272 §7.2.19) and its Session-Id. `omit` names
    AVPs to leave out; `extra` is appended (AVPs already encoded)."""
    encode = dictionary().encode
    identity = probe.identity
    session_id = session_id or probe.session_id()
    terminal = [encode("IMEI", imei)] if imei is not None else []
    if software_version is not None:
        terminal.append(encode("Software-Version", software_version))
    parts = [("Session-Id", encode("Session-Id", session_id)),
             ("Vendor-Specific-Application-Id", encode("Vendor-Specific-Application-Id", [
                 encode("Vendor-Id", VENDOR_3GPP),
                 encode("Auth-Application-Id", APPLICATION_S13)])),
             ("Auth-Session-State", encode("Auth-Session-State", 1)),
             ("Origin-Host", encode("Origin-Host", identity.origin_host)),
             ("Origin-Realm", encode("Origin-Realm", identity.origin_realm)),
             ("Destination-Realm", encode("Destination-Realm", identity.destination_realm)),
             ("Terminal-Information", encode("Terminal-Information", terminal))]
    if imsi is not None:
        parts.append(("User-Name", encode("User-Name", imsi)))
    body = b"".join(data for name, data in parts if name not in omit) + extra
    hop_by_hop = probe.next_id() if hop_by_hop is None else hop_by_hop
    return encode_message(flags, COMMAND_ME_IDENTITY_CHECK, application, hop_by_hop,
                          hop_by_hop ^ 0x5A5A0000, body), session_id


def base_request(probe: Probe, code: int, extra: bytes = b"") -> bytes:
    """A DWR, DPR or CER of ours: Origin-Host and Origin-Realm, then `extra`."""
    encode = dictionary().encode
    body = (encode("Origin-Host", probe.identity.origin_host)
            + encode("Origin-Realm", probe.identity.origin_realm) + extra)
    hop_by_hop = probe.next_id()
    return encode_message(FLAG_REQUEST, code, APPLICATION_COMMON, hop_by_hop,
                          hop_by_hop ^ 0x5A5A0000, body)


def cer(probe: Probe, local_ip: str) -> bytes:
    encode = dictionary().encode
    return base_request(probe, COMMAND_CAPABILITIES_EXCHANGE, b"".join([
        encode("Host-IP-Address", local_ip),
        encode("Vendor-Id", 0),
        encode("Product-Name", "open EIR conformance"),
        encode("Supported-Vendor-Id", VENDOR_3GPP),
        encode("Auth-Application-Id", APPLICATION_S13),
        encode("Vendor-Specific-Application-Id", [
            encode("Vendor-Id", VENDOR_3GPP), encode("Auth-Application-Id", APPLICATION_S13)]),
    ]))


# -- one connection ------------------------------------------------------------------------------

class Closed(Exception):
    """The target closed the connection."""


class Link:
    """One TCP connection to the target: write bytes, read whole messages (answering the
    target's own DWRs, which RFC 3539 lets it send at any time)."""

    def __init__(self, probe: Probe, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.probe = probe
        self.reader = reader
        self.writer = writer
        self.cea: Answer | None = None
        self.disconnected = False  # DPR/DPA exchanged: nothing more to say

    @classmethod
    async def open(cls, probe: Probe, capabilities: bool = True) -> "Link":
        where = f"{probe.host}:{probe.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(probe.host, probe.port), probe.timeout)
        except asyncio.TimeoutError:
            raise Unreachable(f"cannot connect to {where} within {probe.timeout:g} s") from None
        except OSError as exc:
            raise Unreachable(f"cannot connect to {where}: {exc.strerror or exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = cls(probe, reader, writer)
        if capabilities:
            local_ip = writer.get_extra_info("sockname")[0]
            try:
                link.cea = await link.exchange(cer(probe, local_ip))
            except (Closed, CheckFailed) as exc:
                link.close()
                raise Unreachable(f"{where}: no CEA to our CER: {exc}") from None
            if link.cea.result_code != 2001:
                link.close()
                raise Unreachable(f"{where}: CER refused with Result-Code "
                                  f"{link.cea.result_code}")
        return link

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, timeout: float | None = None) -> Answer:
        """The next message that is not a DWR from the target (those are answered)."""
        timeout = self.probe.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                head = await asyncio.wait_for(self.reader.readexactly(4), max(remaining, 0))
                length = _U32.unpack(head)[0] & 0xFFFFFF
                if length < HEADER_LENGTH or length > MAX_MESSAGE_BYTES or length & 3:
                    raise CheckFailed(f"the target sent a message of length {length}", head)
                rest = await asyncio.wait_for(self.reader.readexactly(length - 4),
                                              max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise CheckFailed(f"no answer within {timeout:g} s") from None
            except asyncio.IncompleteReadError as exc:
                raise Closed("the target closed the connection"
                             + (f" in the middle of a message ({len(exc.partial)} bytes)"
                                if exc.partial else "")) from None
            except ConnectionError as exc:
                raise Closed(f"connection lost ({exc})") from None
            answer = Answer(head + rest)
            header = answer.header
            if header.is_request and header.code == COMMAND_DEVICE_WATCHDOG:
                await self.write(_dwa_to(self.probe, answer))
                continue
            return answer

    async def exchange(self, request: bytes, timeout: float | None = None) -> Answer:
        """Send one request and read its answer (matched by hop-by-hop id)."""
        await self.write(request)
        hop_by_hop = parse_header(request).hop_by_hop
        while True:
            answer = await self.read(timeout)
            if not answer.header.is_request and answer.header.hop_by_hop == hop_by_hop:
                return answer
            if not answer.header.is_request:
                raise CheckFailed(f"an answer with hop-by-hop id {answer.header.hop_by_hop:#x}"
                                  f" to a request with {hop_by_hop:#x}", answer.raw)

    async def finish(self) -> None:
        """Disconnect as RFC 6733 §5.4 asks (DPR, wait a little for DPA), then close: a
        target that elects one connection per peer (§5.6.4) has let this one go before the
        next check connects. A target that has closed, or does not answer, is just closed."""
        try:
            if not self.disconnected and not self.reader.at_eof():
                encode = dictionary().encode
                request = base_request(self.probe, COMMAND_DISCONNECT_PEER,
                                       encode("Disconnect-Cause",
                                              int(DisconnectCause.REBOOTING)))
                await self.exchange(request, min(self.probe.timeout, DPA_WAIT_S))
        except (CheckFailed, Closed, ConnectionError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()


def _dwa_to(probe: Probe, request: Answer) -> bytes:
    encode = dictionary().encode
    body = (encode("Result-Code", 2001) + encode("Origin-Host", probe.identity.origin_host)
            + encode("Origin-Realm", probe.identity.origin_realm))
    header = request.header
    return encode_message(0, header.code, header.application, header.hop_by_hop,
                          header.end_to_end, body)


# -- judging helpers ---------------------------------------------------------------------------

def require(condition: bool, detail: str, data: bytes | None = None) -> None:
    if not condition:
        raise CheckFailed(detail, data)


def require_answer_to(answer: Answer, request: bytes, command: int, application: int) -> None:
    """The header of an answer (RFC 6733 §3, §6.2): R clear, command, application and ids as
    in the request, P as in the request."""
    header, asked = answer.header, parse_header(request)
    require(not header.is_request, "the R bit is set in the answer", answer.raw[:20])
    require(header.code == command, f"command code {header.code}, expected {command}",
            answer.raw[:20])
    require(header.application == application,
            f"application id {header.application}, expected {application}", answer.raw[:20])
    require(header.hop_by_hop == asked.hop_by_hop and header.end_to_end == asked.end_to_end,
            f"hop-by-hop/end-to-end ids {header.hop_by_hop:#x}/{header.end_to_end:#x}, "
            f"the request's were {asked.hop_by_hop:#x}/{asked.end_to_end:#x}", answer.raw[:20])
    require(header.flags & FLAG_PROXIABLE == asked.flags & FLAG_PROXIABLE,
            "the P bit of the answer differs from the request's", answer.raw[:20])


def require_result(answer: Answer, code: int, *, error_bit: bool = False,
                   failed_avp: bool = False) -> None:
    """Result-Code `code`; the E bit set exactly for 3xxx (RFC 6733 §7.2, §3); Failed-AVP
    present when the clause asks for it (RFC 6733 §7.5, §7.1.5)."""
    got = answer.result_code
    require(got == code, f"Result-Code {got} ({answer.verdict()}), expected {code}",
            answer.raw)
    require(bool(answer.header.flags & FLAG_ERROR) == error_bit,
            f"the E bit is {'clear' if error_bit else 'set'} in a {code} answer",
            answer.raw[:20])
    if failed_avp:
        require(answer.first(FAILED_AVP) is not None, f"no Failed-AVP in the {code} answer",
                answer.raw)


def require_verdict(answer: Answer, expected: Expected, what: str) -> None:
    require(expected.matches(answer),
            f"{what}: {answer.verdict()}, expected {expected.describe()}", answer.raw)


def flags_of(avp: Avp) -> str:
    return "".join(name for bit, name in ((AVP_FLAG_VENDOR, "V"), (AVP_FLAG_MANDATORY, "M"))
                   if avp.flags & bit) or "none"


async def ecr_exchange(probe: Probe, imei: str | None, imsi: str | None = None,
                       **kwargs) -> tuple[Answer, bytes, str]:
    """Open a connection, send one ECR, return (answer, request, Session-Id)."""
    link = await Link.open(probe)
    try:
        request, session_id = ecr(probe, imei, imsi, **kwargs)
        answer = await link.exchange(request)
        return answer, request, session_id
    finally:
        await link.finish()


# -- the checks --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str
    title: str
    clause: str
    run: Callable[[Probe], Awaitable[Outcome]]


CHECKS: list[Check] = []


def check(name: str, title: str, clause: str):
    def register(function):
        CHECKS.append(Check(name, title, clause, function))
        return function
    return register


@check("cer-cea", "CEA: 2001, identity, capabilities, S13 advertised",
       "RFC 6733 §5.3.2, §3; TS 29.272 §7.1.7, §7.1.8")
async def _cer_cea(probe: Probe) -> Outcome:
    link = await Link.open(probe, capabilities=False)
    try:
        request = cer(probe, link.writer.get_extra_info("sockname")[0])
        cea = await link.exchange(request)
    finally:
        await link.finish()
    require_answer_to(cea, request, COMMAND_CAPABILITIES_EXCHANGE, APPLICATION_COMMON)
    require_result(cea, 2001)
    for code, name in ((ORIGIN_HOST, "Origin-Host"), (ORIGIN_REALM, "Origin-Realm"),
                       (HOST_IP_ADDRESS, "Host-IP-Address"), (VENDOR_ID, "Vendor-Id"),
                       (PRODUCT_NAME, "Product-Name")):
        require(cea.first(code) is not None, f"no {name} in the CEA", cea.raw)
    applications = {_U32.unpack(avp.data)[0] for avp in cea.all(AUTH_APPLICATION_ID)
                    if len(avp.data) == 4}
    for group in cea.all(VENDOR_SPECIFIC_APPLICATION_ID):
        applications |= {_U32.unpack(child.data)[0] for child in _children(group)
                         if child.code == AUTH_APPLICATION_ID and len(child.data) == 4}
    require(APPLICATION_S13 in applications or 0xFFFFFFFF in applications,
            f"the CEA does not advertise S13 ({APPLICATION_S13}): applications "
            f"{sorted(applications)}", cea.raw)
    return passed(f"applications {sorted(applications)}")


@check("eca-header", "ECA header: R clear, P as in the ECR, E clear, ids echoed",
       "RFC 6733 §3, §6.2; TS 29.272 §7.2.20")
async def _eca_header(probe: Probe) -> Outcome:
    answer, request, _ = await ecr_exchange(probe, UNLISTED_IMEI, UNLISTED_IMSI)
    require_answer_to(answer, request, COMMAND_ME_IDENTITY_CHECK, APPLICATION_S13)
    require(not answer.header.flags & FLAG_ERROR, "the E bit is set in the ECA",
            answer.raw[:20])
    return passed()


@check("eca-avps", "ECA mandatory AVPs and their flags",
       "RFC 6733 §4.5, §8.8; TS 29.272 §7.2.20, §7.3.1")
async def _eca_avps(probe: Probe) -> Outcome:
    imei14, imsi, _ = _reference_imei(probe)  # a listed IMEI: its ECA has Equipment-Status
    answer, _, _ = await ecr_exchange(probe, imei14, imsi)
    require(answer.avps and answer.avps[0].code == SESSION_ID,
            "Session-Id is not the first AVP (< Session-Id > in the grammar)", answer.raw)
    for code, name in ((SESSION_ID, "Session-Id"), (AUTH_SESSION_STATE, "Auth-Session-State"),
                       (ORIGIN_HOST, "Origin-Host"), (ORIGIN_REALM, "Origin-Realm")):
        found = answer.all(code)
        require(len(found) == 1, f"{len(found)} {name} AVPs in the ECA, expected 1",
                answer.raw)
        require(found[0].flags & AVP_FLAG_MANDATORY and not found[0].flags & AVP_FLAG_VENDOR,
                f"{name} flags {flags_of(found[0])}, expected M", found[0].encode())
    state = answer.u32(AUTH_SESSION_STATE)
    require(state == 1, f"Auth-Session-State {state}, expected 1 (NO_STATE_MAINTAINED)",
            answer.first(AUTH_SESSION_STATE).encode())
    results = answer.all(RESULT_CODE) + answer.all(EXPERIMENTAL_RESULT)
    require(len(results) == 1, f"{len(results)} Result-Code/Experimental-Result AVPs, "
            "expected exactly one", answer.raw)
    require(results[0].flags & AVP_FLAG_MANDATORY, f"{results[0].code} without the M bit",
            results[0].encode())
    statuses = answer.all(EQUIPMENT_STATUS, VENDOR_3GPP)
    for status in statuses:
        require(status.flags & AVP_FLAG_MANDATORY and status.flags & AVP_FLAG_VENDOR,
                f"Equipment-Status flags {flags_of(status)}, expected V and M",
                status.encode())
    return passed("" if statuses else "no Equipment-Status in this answer (IMEI on no list): "
                  "its flags unchecked; give --expect")


@check("echo", "Session-Id, hop-by-hop and end-to-end ids echoed (two ECRs, one connection)",
       "RFC 6733 §3, §6.2, §8.8")
async def _echo(probe: Probe) -> Outcome:
    link = await Link.open(probe)
    try:
        for imei in (UNLISTED_IMEI, "99999999012346"):
            request, session_id = ecr(probe, imei, UNLISTED_IMSI)
            answer = await link.exchange(request)
            require_answer_to(answer, request, COMMAND_ME_IDENTITY_CHECK, APPLICATION_S13)
            echoed = answer.first(SESSION_ID)
            require(echoed is not None and echoed.data == session_id.encode(),
                    f"Session-Id {echoed.data if echoed else None!r}, sent "
                    f"{session_id!r}", echoed.encode() if echoed else answer.raw)
    finally:
        await link.finish()
    return passed()


@check("proxy-info", "Proxy-Info echoed unchanged, in order",
       "RFC 6733 §6.2, §6.7.2")
async def _proxy_info(probe: Probe) -> Outcome:
    encode = dictionary().encode
    infos = [encode("Proxy-Info", [encode("Proxy-Host", f"dra{n}.localdomain"),
                                   encode("Proxy-State", bytes([n]) * 6)]) for n in (1, 2)]
    answer, _, _ = await ecr_exchange(probe, UNLISTED_IMEI, UNLISTED_IMSI,
                                      extra=b"".join(infos))
    echoed = [avp.encode() for avp in answer.all(PROXY_INFO)]
    require(echoed == infos, f"{len(echoed)} Proxy-Info AVPs echoed (sent 2)"
            + (", changed or reordered" if len(echoed) == 2 else ""), answer.raw)
    return passed()


@check("unknown-imei", "IMEI on no list: the declared default (--unknown: 5422 in "
       "Experimental-Result unless told)",
       "TS 29.272 §6.2.1.3, §7.4.3; RFC 6733 §7.6")
async def _unknown_imei(probe: Probe) -> Outcome:
    answer, _, _ = await ecr_exchange(probe, UNLISTED_IMEI, UNLISTED_IMSI)
    if probe.unknown.result == UNKNOWN_RESULT:
        require(answer.result_code is None,
                f"Result-Code {answer.result_code} beside or instead of Experimental-Result "
                "5422 (5422 is a 3GPP Experimental-Result-Code, vendor 10415)", answer.raw)
    require_verdict(answer, probe.unknown, f"IMEI {UNLISTED_IMEI} on no list")
    return passed(answer.verdict())


@check("verdicts", "the user's expected verdicts (--expect)", "TS 29.272 §6.2.1.3, §7.3.51")
async def _verdicts(probe: Probe) -> Outcome:
    if not probe.expectations:
        return Outcome(NOT_APPLICABLE, "no --expect file given")
    link = await Link.open(probe)
    wrong = []
    try:
        for expectation in probe.expectations:
            request, _ = ecr(probe, expectation.imei, expectation.imsi)
            answer = await link.exchange(request)
            if not expectation.expected.matches(answer):
                wrong.append((expectation, answer))
    finally:
        await link.finish()
    if wrong:
        expectation, answer = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckFailed(f"{len(wrong)} of {len(probe.expectations)} wrong; first: "
                          f"{expectation.source}: IMEI {expectation.imei} IMSI "
                          f"{expectation.imsi or '-'}: {answer.verdict()}, expected "
                          f"{expectation.expected.describe()}{more}", answer.raw)
    return passed(f"{len(probe.expectations)} verdicts as expected")


def _reference_imei(probe: Probe) -> tuple[str, str | None, Expected]:
    """A 14-digit IMEI with a known answer: the first listed one expected, else unknown."""
    for expectation in probe.expectations:
        if expectation.expected.status is not None:
            return expectation.imei[:14], expectation.imsi, expectation.expected
    return UNLISTED_IMEI, UNLISTED_IMSI, probe.unknown


@check("imei-lengths", "14, 15 and 16 digits of one IMEI: one verdict (keyed on TAC+SNR)",
       "TS 23.003 §6.2.1-6.2.2; TS 29.272 §7.3.4")
async def _imei_lengths(probe: Probe) -> Outcome:
    imei14, imsi, expected = _reference_imei(probe)
    link = await Link.open(probe)
    try:
        # The 15th digit as a handset sends it (a spare 0, not the Luhn digit), and as 16
        # digits (an IMEISV sent whole).
        for imei in (imei14, imei14 + "0", imei14 + "23"):
            request, _ = ecr(probe, imei, imsi)
            answer = await link.exchange(request)
            require_verdict(answer, expected, f"IMEI {imei} ({len(imei)} digits)")
    finally:
        await link.finish()
    return passed(f"{expected.describe()} for {imei14}")


@check("software-version", "IMEISV: IMEI + Software-Version answered as the IMEI",
       "TS 29.272 §7.3.3, §7.3.5; TS 23.003 §6.2.2")
async def _software_version(probe: Probe) -> Outcome:
    imei14, imsi, expected = _reference_imei(probe)
    answer, _, _ = await ecr_exchange(probe, imei14, imsi, software_version="23")
    require_verdict(answer, expected, f"IMEI {imei14} with Software-Version 23")
    return passed()


@check("no-user-name", "ECR without User-Name (optional) gets a verdict",
       "TS 29.272 §7.2.19; RFC 6733 §7.1.5 (no 5005)")
async def _no_user_name(probe: Probe) -> Outcome:
    # An IMEI whose verdict without User-Name is known, else the unlisted one.
    imei14, expected = UNLISTED_IMEI, probe.unknown
    for expectation in probe.expectations:
        if expectation.without_imsi is not None and expectation.without_imsi.status is not None:
            imei14, expected = expectation.imei[:14], expectation.without_imsi
            break
    answer, _, _ = await ecr_exchange(probe, imei14, None)
    require_verdict(answer, expected, f"IMEI {imei14} without User-Name")
    return passed(answer.verdict())


@check("malformed-imei", "IMEI that is not digits: 5004 with Failed-AVP",
       "RFC 6733 §7.1.5 (5004), §7.5; TS 29.272 §7.3.4")
async def _malformed_imei(probe: Probe) -> Outcome:
    answer, _, _ = await ecr_exchange(probe, "3520990017614X", UNLISTED_IMSI)
    require_result(answer, 5004, failed_avp=True)
    return passed()


@check("missing-avp", "ECR without Terminal-Information: 5005 with Failed-AVP",
       "RFC 6733 §7.1.5 (5005), §7.5; TS 29.272 §7.2.19")
async def _missing_avp(probe: Probe) -> Outcome:
    answer, _, _ = await ecr_exchange(probe, None, UNLISTED_IMSI,
                                      omit=("Terminal-Information",))
    require_result(answer, 5005, failed_avp=True)
    return passed()


@check("unknown-m-avp", "unknown AVP with the M bit: 5001 with that AVP in Failed-AVP",
       "RFC 6733 §4.1, §7.1.5 (5001), §7.5")
async def _unknown_m_avp(probe: Probe) -> Outcome:
    unknown = encode_avp(UNKNOWN_MANDATORY_AVP, AVP_FLAG_MANDATORY, 0, b"conformance!")
    answer, _, _ = await ecr_exchange(probe, UNLISTED_IMEI, UNLISTED_IMSI, extra=unknown)
    require_result(answer, 5001, failed_avp=True)
    failed_avp = answer.first(FAILED_AVP)
    require(unknown in failed_avp.data, "Failed-AVP does not hold the unknown AVP",
            failed_avp.encode())
    return passed()


@check("wrong-application", "ECR under another application (S6a): 3007 with the E bit",
       "RFC 6733 §7.1.3 (3007), §7.2")
async def _wrong_application(probe: Probe) -> Outcome:
    answer, _, _ = await ecr_exchange(probe, UNLISTED_IMEI, UNLISTED_IMSI,
                                      application=APPLICATION_S6A)
    require_result(answer, 3007, error_bit=True)
    return passed()


@check("e-bit-request", "request with the E bit set: 3008 with the E bit",
       "RFC 6733 §3 (E bit), §7.1.3 (3008), §7.2")
async def _e_bit_request(probe: Probe) -> Outcome:
    answer, _, _ = await ecr_exchange(probe, UNLISTED_IMEI, UNLISTED_IMSI,
                                      flags=FLAG_REQUEST | FLAG_PROXIABLE | FLAG_ERROR)
    require_result(answer, 3008, error_bit=True)
    return passed()


@check("version", "version 2 header: 5011 answer (then a close is fine); the EIR lives on",
       "RFC 6733 §3 (Version), §7.1.5 (5011)")
async def _version(probe: Probe) -> Outcome:
    link = await Link.open(probe)
    try:
        request = bytearray(ecr(probe, UNLISTED_IMEI, UNLISTED_IMSI)[0])
        request[0] = 2
        await link.write(bytes(request))
        try:
            answer = await link.read()
        except Closed:
            raise CheckFailed("the connection was closed without a 5011 "
                              "DIAMETER_UNSUPPORTED_VERSION answer",
                              bytes(request[:20])) from None
        require_result(answer, 5011)
    finally:
        await link.finish()
    # A crash or a wedged accept loop shows here.
    alive, _, _ = await ecr_exchange(probe, UNLISTED_IMEI, UNLISTED_IMSI)
    require(alive.result_code is not None or alive.experimental_result is not None,
            "after the version 2 message, a new connection's ECR got no result", alive.raw)
    return passed()


@check("dwr-dwa", "DWR answered by DWA 2001 with Origin-Host/Realm",
       "RFC 6733 §5.5.1, §5.5.2; RFC 3539 §3.4")
async def _dwr(probe: Probe) -> Outcome:
    link = await Link.open(probe)
    try:
        request = base_request(probe, COMMAND_DEVICE_WATCHDOG)
        answer = await link.exchange(request)
    finally:
        await link.finish()
    require_answer_to(answer, request, COMMAND_DEVICE_WATCHDOG, APPLICATION_COMMON)
    require_result(answer, 2001)
    require(answer.first(ORIGIN_HOST) is not None and answer.first(ORIGIN_REALM) is not None,
            "no Origin-Host/Origin-Realm in the DWA", answer.raw)
    return passed()


@check("dpr-dpa", "DPR answered by DPA 2001", "RFC 6733 §5.4.1, §5.4.2")
async def _dpr(probe: Probe) -> Outcome:
    encode = dictionary().encode
    link = await Link.open(probe)
    try:
        request = base_request(probe, COMMAND_DISCONNECT_PEER,
                               encode("Disconnect-Cause", int(DisconnectCause.REBOOTING)))
        answer = await link.exchange(request)
        link.disconnected = True
    finally:
        await link.finish()
    require_answer_to(answer, request, COMMAND_DISCONNECT_PEER, APPLICATION_COMMON)
    require_result(answer, 2001)
    require(answer.first(ORIGIN_HOST) is not None and answer.first(ORIGIN_REALM) is not None,
            "no Origin-Host/Origin-Realm in the DPA", answer.raw)
    return passed()


@check("pipelining", f"{PIPELINED} ECRs in flight: every one answered within the deadline",
       "RFC 6733 §3 (Hop-by-Hop Identifier), §2.1")
async def _pipelining(probe: Probe) -> Outcome:
    link = await Link.open(probe)
    try:
        burst, requests = [], {}
        for n in range(PIPELINED):
            request, session_id = ecr(probe, f"{99999999012000 + n:014d}", UNLISTED_IMSI)
            burst.append(request)
            requests[parse_header(request).hop_by_hop] = session_id.encode()
        started = time.monotonic()
        await link.write(b"".join(burst))
        slowest = 0.0
        while requests:
            remaining = probe.deadline - (time.monotonic() - started)
            try:
                answer = await link.read(max(remaining, 0.001))
            except CheckFailed:
                raise CheckFailed(f"{len(requests)} of {PIPELINED} pipelined ECRs unanswered "
                                  f"after {probe.deadline:g} s") from None
            session = requests.pop(answer.header.hop_by_hop, None)
            require(session is not None, f"an answer with hop-by-hop id "
                    f"{answer.header.hop_by_hop:#x}, sent by none of ours", answer.raw)
            echoed = answer.first(SESSION_ID)
            require(echoed is not None and echoed.data == session,
                    "an answer carries another request's Session-Id", answer.raw)
            slowest = time.monotonic() - started
    finally:
        await link.finish()
    return passed(f"all in {slowest * 1000:.1f} ms")


@check("framing-split", "one ECR split across TCP segments (inside header and AVP)",
       "RFC 6733 §2.1, §3 (Message Length)")
async def _framing_split(probe: Probe) -> Outcome:
    link = await Link.open(probe)
    try:
        request, session_id = ecr(probe, UNLISTED_IMEI, UNLISTED_IMSI)
        for piece in (request[:3], request[3:30], request[30:-5], request[-5:]):
            await link.write(piece)
            await asyncio.sleep(0.02)  # let each piece leave as its own segment (TCP_NODELAY)
        answer = await link.read()
    finally:
        await link.finish()
    require(answer.header.hop_by_hop == parse_header(request).hop_by_hop,
            "the answer is not to the split ECR", answer.raw)
    require_verdict(answer, probe.unknown, "the split ECR")
    return passed()


@check("framing-many", "several messages in one segment: each answered",
       "RFC 6733 §2.1, §3 (Message Length)")
async def _framing_many(probe: Probe) -> Outcome:
    link = await Link.open(probe)
    try:
        messages = [ecr(probe, UNLISTED_IMEI, UNLISTED_IMSI)[0],
                    base_request(probe, COMMAND_DEVICE_WATCHDOG),
                    ecr(probe, "3520990017614X", UNLISTED_IMSI)[0],
                    ecr(probe, "99999999012346", None)[0]]
        await link.write(b"".join(messages))
        waiting = {parse_header(message).hop_by_hop: message for message in messages}
        while waiting:
            try:
                answer = await link.read()
            except CheckFailed:
                raise CheckFailed(f"{len(waiting)} of {len(messages)} messages sent in one "
                                  "segment unanswered") from None
            require(waiting.pop(answer.header.hop_by_hop, None) is not None,
                    "an answer to none of the messages sent", answer.raw)
    finally:
        await link.finish()
    return passed()


# -- running -----------------------------------------------------------------------------------

async def run_checks(probe: Probe, names: list[str] | None = None) -> list[Result]:
    """Run the checks (all, or those named) one after the other; a check that raises
    fails, with what it raised."""
    chosen = [c for c in CHECKS if names is None or c.name in names]
    # Every read is bounded by probe.timeout; this bounds a check as a whole (a target that
    # dribbles bytes), with room for one exchange per expectation.
    limit = probe.timeout * (10 + 2 * len(probe.expectations))
    results = []
    for item in chosen:
        started = time.monotonic()
        try:
            outcome = await asyncio.wait_for(item.run(probe), limit)
        except CheckFailed as exc:
            outcome = exc.outcome
        except (Closed, Unreachable) as exc:
            outcome = failed(str(exc))
        except asyncio.TimeoutError:
            outcome = failed(f"the check did not end within {limit:g} s")
        except (ValueError, IndexError, UnicodeError, struct.error) as exc:
            # An answer so far from Diameter that judging it broke: that is its verdict.
            outcome = failed(f"the answer could not be read: {type(exc).__name__}: {exc}")
        results.append(Result(item.name, item.title, item.clause, outcome,
                              (time.monotonic() - started) * 1000))
    return results


def table(results: list[Result], target: str, hex_bytes: int = 48) -> str:
    """The results as a text table; failing bytes shown in hex (the first `hex_bytes`)."""
    name_width = max(len(r.name) for r in results)
    clause_width = max(len(r.clause) for r in results)
    lines = [f"eir conformance → {target}",
             f"  {'check':<{name_width}}  {'result':<6}  {'clause':<{clause_width}}  detail"]
    for r in results:
        lines.append(f"  {r.name:<{name_width}}  {r.outcome.status:<6}  "
                     f"{r.clause:<{clause_width}}  {r.title}"
                     + (f": {r.outcome.detail}" if r.outcome.detail else ""))
        if r.outcome.data is not None:
            data = r.outcome.data
            shown = data[:hex_bytes].hex(" ", 4)
            more = f" ... ({len(data)} bytes)" if len(data) > hex_bytes else ""
            lines.append(f"  {'':<{name_width}}  {'':<6}  bytes: {shown}{more}")
    counts = {status: sum(r.outcome.status == status for r in results)
              for status in (PASS, FAIL, NOT_APPLICABLE)}
    lines.append(f"  {counts[PASS]} passed, {counts[FAIL]} failed, "
                 f"{counts[NOT_APPLICABLE]} not applicable")
    return "\n".join(lines)


def summary_json(results: list[Result], target: str) -> dict:
    return {"target": target,
            "passed": sum(r.outcome.status == PASS for r in results),
            "failed": sum(r.outcome.status == FAIL for r in results),
            "not_applicable": sum(r.outcome.status == NOT_APPLICABLE for r in results),
            "checks": [r.to_json() for r in results]}


def exit_status(results: list[Result]) -> int:
    return EXIT_FAILED if any(r.outcome.status == FAIL for r in results) else EXIT_PASSED


def probe_from(args) -> Probe:
    """The Probe of an `eir conformance` command line (UsageError when it cannot be)."""
    try:
        host, port = parse_host_port(args.target)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from None
    names = [c.name for c in CHECKS]
    for name in args.checks or []:
        if name not in names:
            raise UsageError(f"--check {name}: no such check (one of {', '.join(names)})")
    if not args.timeout > 0 or not args.deadline > 0:
        raise UsageError("--timeout and --deadline must be more than 0 seconds")
    try:
        unknown = Expected.parse(args.unknown)
    except ValueError as exc:
        raise UsageError(f"--unknown: {exc}") from None
    expectations = [e for path in args.expect or [] for e in read_expectations(path)]
    return Probe(host, port, Identity(args.origin_host, args.origin_realm,
                                      args.destination_realm),
                 timeout=args.timeout, deadline=args.deadline, expectations=expectations,
                 unknown=unknown)


def main(args) -> int:
    """The `eir conformance` command."""
    try:
        probe = probe_from(args)
    except UsageError as exc:
        print(f"eir conformance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    results = asyncio.run(run_checks(probe, args.checks))  # an unreachable target fails each
    if args.json:
        print(table(results, args.target), file=sys.stderr)
        print(json.dumps(summary_json(results, args.target)), flush=True)
    else:
        print(table(results, args.target), flush=True)
    return exit_status(results)


def add_arguments(parser) -> None:
    """The options of `eir conformance` (registered by eir/cli.py, which adds the Diameter
    identity and --timeout options it shares with `eir replay`)."""
    parser.add_argument("--target", required=True, metavar="HOST:PORT",
                        help="the EIR to check (a few hundred requests: no load)")
    parser.add_argument("--expect", action="append", type=Path, metavar="FILE.csv",
                        help="expected verdicts: imei,imsi,expected (WHITELISTED, "
                             "BLACKLISTED, GREYLISTED, 5422, 5004...) or a native list "
                             "file; repeat for several")
    parser.add_argument("--unknown", default="5422", metavar="VERDICT",
                        help="what the EIR answers for an IMEI on no list: 5422 (the "
                             "default, Experimental-Result) or WHITELISTED, GREYLISTED, "
                             "BLACKLISTED")
    parser.add_argument("--check", dest="checks", action="append", metavar="NAME",
                        help="run only this check; repeat for several (default: all)")
    parser.add_argument("--deadline", type=float, default=1.0, metavar="S",
                        help=f"the {PIPELINED} pipelined ECRs must all be answered within "
                             "this (default 1)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object (last line of stdout)")
