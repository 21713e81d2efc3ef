"""5G: the N5g-eir_EquipmentIdentityCheck service (3GPP TS 29.511) over HTTP/2.

    GET /n5g-eir-eic/v1/equipment-status?pei=imei-…|imeisv-…[&supi=imsi-…][&gpsi=…]

answered from the rule set S13 answers from (read through the server at each request, so a
reload is seen at once): 200 `{"status": "WHITELISTED"|"BLACKLISTED"|"GREYLISTED"}`; 404
ProblemDetails (application/problem+json) with cause ERROR_EQUIPMENT_UNKNOWN when the verdict
is unknown; 400 ProblemDetails for a missing PEI (MANDATORY_QUERY_PARAM_MISSING), a PEI that
is not `imei-` + 15 digits or `imeisv-` + 16 digits (MANDATORY_QUERY_PARAM_INCORRECT; other
PEI forms, MAC or EUI-64, identify no IMEI the lists could hold), or an `imsi-` SUPI that is
not 5 to 15 digits (OPTIONAL_QUERY_PARAM_INCORRECT); causes as TS 29.500 §5.2.7.2 names them.
A SUPI `imsi-…` pairs like User-Name on S13; other SUPI forms (nai-, gci-, gli-) are decided
without an IMSI. The GPSI is accepted and not used. Every decided request is observed,
audited (interface "n5g-eir") and counted like an S13 check.

Transport: HTTP/2 with prior knowledge on cleartext (h2c, as Open5GS's SBI speaks), and over
TLS with ALPN h2, on listeners of their own (`sbi.listen`, `sbi.tls`).

Library: the `h2` package (python-hyper), sans-IO, inside our own sans-IO `SbiSession`
(frames cut and counted before h2 sees them: turns, flood budgets, stream and connection
errors; docs/5G.md "Limits") under an asyncio.BufferedProtocol: bytes in, events out, bytes
back, in the same callback, as the Diameter peer state machine works. One request
costs one HEADERS frame decoded and one encoded, no task, no ASGI scope, no framework
routing: it shares the event loop with Diameter, so it has to stay that cheap. The common
request (a plain GET in one HEADERS frame) does not even go through h2: it is decoded and
answered with the verdict's pre-encoded frames beside it (eir.interfaces.h2wire,
`sbi.fast_path`; ~5x less CPU, docs/5G.md "The fast path, and what h2 costs"). (hypercorn,
an ASGI server on top of the same h2, would add a task and an ASGI round trip per request,
and its own serving loop and signal handling beside ours, for one fixed GET.) The same
module holds a small h2 client (`H2Client`), for the NRF (NFRegister, heartbeat,
NFDeregister, TS 29.510) and bench/sbi.py.

Processes: with workers (eir.serve.workers), the supervisor binds the N5g-eir listeners,
accepts, counts each connection against the `sbi` connection limits and hands the accepted
socket to a worker, as it does S13's; the worker serves it (`N5gEir.adopt`: over TLS the
worker does the handshake). The NRF registration stays in the supervisor (`N5gEir.start`
with the supervisor's bound sockets); the counters are summed over the workers by /metrics.
Alone (`--workers 1`), the process listens itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from h2.utilities import HeaderValidationFlags, validate_headers
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame

from eir.check.observations import RAT_NR
from eir.check.service import EquipmentCheck
from eir.core.config import SbiSettings, parse_host_port
from eir.core.decision import EquipmentStatus
from eir.core.imei import IMEI_KEY_LENGTH, is_imsi
from eir.core.untrusted import untrusted
from eir.diameter.overload import ConnectionLimits
from eir.interfaces.h2wire import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    FRAME_HEADER_BYTES,
    HEADERS,
    PADDED,
    PING,
    PRIORITY,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    decode_request,
    encode_block,
    frame_header,
)
from eir.interfaces.metrics import UNKNOWN_EQUIPMENT_STATUS
from eir.interfaces.ports import ServerView
from eir.net.flow import ReadGate
from eir.net.security import TlsAcceptor, format_address, server_tls_context

log = logging.getLogger("eir.sbi")

SERVICE_NAME = "n5g-eir-eic"
API_VERSION = "v1"
API_FULL_VERSION = "1.4.0"  # TS 29.511 N5g-eir_EquipmentIdentityCheck as of Rel-18
EQUIPMENT_STATUS_PATH = f"/{SERVICE_NAME}/{API_VERSION}/equipment-status".encode()
INTERFACE = "n5g-eir"  # the audit records' `interface`
NF_TYPE = "5G_EIR"
JSON = b"application/json"
PROBLEM_JSON = b"application/problem+json"
NRF_TIMEOUT_SECONDS = 5.0
DEREGISTER_TIMEOUT_SECONDS = 2.0
UNKNOWN_CLIENT = b"?"
# No answer body is longer (a 400's detail quotes at most 40 characters of the parameter):
# the fast path answers while both flow control windows hold at least this much.
MAX_BODY_BYTES = 1024


# -- the request: query parameters --------------------------------------------------------

class QueryError(ValueError):
    """A query parameter the request cannot be answered with: a 400 with this cause."""

    def __init__(self, cause: str, param: str, reason: str):
        super().__init__(f"{param}: {reason}")
        self.cause = cause
        self.param = param
        self.reason = reason


def parse_pei(pei: str | None) -> tuple[str, str | None]:
    """(the 14-digit TAC+SNR, the 2-digit SVN or None) of a PEI `imei-<15 digits>` or
    `imeisv-<16 digits>` (TS 29.571 Pei)."""
    if not pei:
        raise QueryError("MANDATORY_QUERY_PARAM_MISSING", "pei", "the PEI is missing")
    kind, _, digits = pei.partition("-")
    if digits.isascii() and digits.isdigit():
        if kind == "imei" and len(digits) == 15:
            return digits[:IMEI_KEY_LENGTH], None
        if kind == "imeisv" and len(digits) == 16:
            return digits[:IMEI_KEY_LENGTH], digits[IMEI_KEY_LENGTH:]
    raise QueryError("MANDATORY_QUERY_PARAM_INCORRECT", "pei",
                     f"{pei[:40]!r} is not imei-<15 digits> or imeisv-<16 digits>")


def parse_supi(supi: str | None) -> str | None:
    """The IMSI of a SUPI `imsi-<5 to 15 digits>`; None for no SUPI or another SUPI form."""
    if not supi or not supi.startswith("imsi-"):
        return None
    imsi = supi[5:]
    if is_imsi(imsi):
        return imsi
    raise QueryError("OPTIONAL_QUERY_PARAM_INCORRECT", "supi",
                     f"{supi[:40]!r} is not imsi-<5 to 15 digits>")


def query_parameters(query: bytes) -> dict[str, str]:
    """The query's parameters, percent-decoded; the first of a repeated name counts."""
    found: dict[str, str] = {}
    text = query.decode("latin-1")
    if b"%" in query or b"+" in query:
        pairs = parse_qsl(text, keep_blank_values=True)
    else:  # nothing to decode (the usual query): parse_qsl's split, without its decoding
        pairs = [field.partition("=")[::2] for field in text.split("&") if field]
    for name, value in pairs:
        found.setdefault(name, value)
    return found


# -- answers ------------------------------------------------------------------------------

def problem(status: int, title: str, detail: str, cause: str | None = None,
            invalid: tuple[str, str] | None = None) -> bytes:
    """A ProblemDetails body (TS 29.571 §5.2.4.1)."""
    document = {"title": title, "status": status, "detail": detail}
    if cause is not None:
        document["cause"] = cause
    if invalid is not None:
        document["invalidParams"] = [{"param": invalid[0], "reason": invalid[1]}]
    return json.dumps(document).encode()


def _headers(status: int, content_type: bytes, body: bytes,
             extra: tuple = ()) -> list[tuple[bytes, bytes]]:
    return [(b":status", str(status).encode()), (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()), *extra]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: list  # for h2
    body: bytes
    # For the fast path (eir.interfaces.h2wire): the HEADERS frame's first 5 bytes; its
    # block (pre-encoded, literals without indexing) and the DATA frame's first 5 bytes;
    # each frame's stream id goes after its first 5 bytes.
    headers_frame: bytes
    block_and_data_frame: bytes

    @classmethod
    def of(cls, status: int, content_type: bytes, body: bytes, extra: tuple = ()) -> "Answer":
        if len(body) > MAX_BODY_BYTES:
            raise ValueError(f"an answer body of {len(body)} bytes (at most {MAX_BODY_BYTES})")
        headers = _headers(status, content_type, body, extra)
        block = encode_block(headers)
        return cls(status, headers, body,
                   frame_header(len(block), HEADERS, END_HEADERS),
                   block + frame_header(len(body), DATA, END_STREAM))

    def frames(self, stream_id: bytes) -> bytes:
        """The answer on stream `stream_id` (4 bytes): a HEADERS frame and a DATA frame
        that ends the stream."""
        return b"".join((self.headers_frame, stream_id, self.block_and_data_frame, stream_id,
                         self.body))


# The answers that do not depend on the request, built once.
VERDICT_ANSWERS = {status: Answer.of(200, JSON, json.dumps({"status": status.name}).encode())
                   for status in EquipmentStatus}
VERDICT_ANSWERS[None] = Answer.of(404, PROBLEM_JSON, problem(
    404, "Not Found", "no list entry matches this PEI and the unknown policy is 'unknown'",
    "ERROR_EQUIPMENT_UNKNOWN"))
NO_SUCH_RESOURCE = Answer.of(404, PROBLEM_JSON, problem(
    404, "Not Found", "this server serves GET /n5g-eir-eic/v1/equipment-status only",
    "RESOURCE_URI_STRUCTURE_NOT_FOUND"))
METHOD_NOT_ALLOWED = Answer.of(405, PROBLEM_JSON, problem(
    405, "Method Not Allowed", "equipment-status is read with GET"), ((b"allow", b"GET"),))


class SbiCounters:
    """What the N5g-eir hot path counts (plain ints, read by eir.interfaces.metrics at scrape
    time)."""

    def __init__(self):
        self.requests: dict[int, int] = {}  # HTTP status code → answers
        self.verdicts: dict[EquipmentStatus | None, int] = dict.fromkeys(
            [*EquipmentStatus, None], 0)
        self.connections = 0
        self.nrf_registered = False

    def fill(self, snapshot) -> None:
        """Copy into an eir.interfaces.metrics.MetricsSnapshot."""
        snapshot.sbi_requests = {str(code): count for code, count in self.requests.items()}
        snapshot.sbi_verdicts = {
            status.name if status is not None else UNKNOWN_EQUIPMENT_STATUS: count
            for status, count in self.verdicts.items()}
        snapshot.sbi_connections = self.connections
        snapshot.nrf_registered = int(self.nrf_registered)


class EquipmentIdentityCheck:
    """The service itself, free of HTTP/2: (method, path, client) → Answer. The check is the
    server's (eir.check.service: the rule set in force, observations), shared with S13."""

    def __init__(self, check: EquipmentCheck, counters: SbiCounters, audit=None):
        self.check = check
        self.counters = counters
        self.audit = audit

    def answer(self, method: bytes | None, path: bytes | None, client: bytes) -> Answer:
        target, _, query = (path or b"").partition(b"?")
        if target != EQUIPMENT_STATUS_PATH:
            return NO_SUCH_RESOURCE
        if method != b"GET":
            return METHOD_NOT_ALLOWED
        parameters = query_parameters(query)
        try:
            imei, _software_version = parse_pei(parameters.get("pei"))
            imsi = parse_supi(parameters.get("supi"))
        except QueryError as exc:
            # Rate-limited by the client as we know it here: User-Agent, else its address.
            log.info("%s: answering 400 %s: %s", untrusted(client), exc.cause, untrusted(exc),
                     extra={"peer": client})
            return Answer.of(400, PROBLEM_JSON, problem(400, "Bad Request", str(exc),
                                                        exc.cause, (exc.param, exc.reason)))
        verdict = self.check.run(imei, imsi, client, self.counters.verdicts, self.audit,
                                 INTERFACE, RAT_NR)
        return VERDICT_ANSWERS[verdict.status]


# -- the HTTP/2 server side: the sans-IO session ------------------------------------------

CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Ours is never raised above the initial value (RFC 9113 §6.5.2): no frame the client may
# send is longer.
MAX_FRAME_BYTES = 16384
# The frame flags of a request the fast path may take (one HEADERS frame, no padding, no
# priority: a GET): eir.interfaces.h2wire.
FAST_FLAGS = END_STREAM | END_HEADERS
FAST_FLAGS_MASK = END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG
# Frames that carry no request, counted against sbi.max_control_frames_per_second (with
# empty DATA frames that do not end their stream, and unknown frame types).
CONTROL_FRAMES = frozenset((PRIORITY, SETTINGS, PING, WINDOW_UPDATE))
# h2's own concurrency check makes a stream beyond it a connection error (GOAWAY); ours
# refuses the stream alone, so h2's is set where it never fires.
H2_UNCHECKED_STREAMS = 2**31 - 1
# A request's headers are checked here (RFC 9113 §8.2-8.3, h2's own checks), not by h2 as it
# receives them: h2 makes a malformed request a connection error, RFC 9113 §8.1.1 a stream
# error (RST_STREAM PROTOCOL_ERROR), which leaves the client's other streams alone.
REQUEST_HEADERS = HeaderValidationFlags(is_client=False, is_trailer=False,
                                        is_response_header=False, is_push_promise=False)


class FloodBudget:
    """A token bucket: `rate` events per second, `rate * burst_seconds` of them at once."""

    __slots__ = ("rate", "capacity", "tokens", "at")

    def __init__(self, rate: float, burst_seconds: float, now: float):
        self.rate = rate
        self.capacity = rate * burst_seconds
        self.tokens = self.capacity
        self.at = now

    def spend(self, now: float) -> bool:
        """Count one event; False once the budget is spent."""
        tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


class SbiConnectionError(Exception):
    """A connection error we found ourselves (before h2 saw the frame): the GOAWAY code."""

    def __init__(self, code: ErrorCodes, reason: str):
        super().__init__(reason)
        self.code = code


def malformed(headers: list) -> str | None:
    """What makes a request's headers malformed (RFC 9113 §8.1.1-8.3, as h2 checks them),
    quoted and cut short; None when they are not."""
    try:
        for _ in validate_headers(headers, REQUEST_HEADERS):
            pass
    except ProtocolError as exc:
        return repr(str(exc)[:200])
    return None


def goaway_code(exc: H2Error) -> ErrorCodes:
    """The GOAWAY error code of an h2 exception raised on received data: h2's own, except a
    header block HPACK cannot decode, a COMPRESSION_ERROR (RFC 9113 §4.3), which h2 calls a
    PROTOCOL_ERROR."""
    if isinstance(exc.__cause__, HPACKError) and not isinstance(exc, DenialOfServiceError):
        return ErrorCodes.COMPRESSION_ERROR
    return ErrorCodes(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR))


class SbiSession:
    """One HTTP/2 connection of the N5g-eir listener, sans-IO: `start()`, `receive(data,
    now)`, `resume(now)` and `on_timer(now)` return the bytes to send; the caller owns the
    socket and the clock. After each call it drains `events` (log records); when `closed`,
    it writes what was returned and closes the transport; while `waiting`, it calls
    `resume(now)` on the next turn of its event loop (and reads nothing meanwhile).

    The frames are cut here (9-byte headers) before h2 parses them, so that:
    * one call hands h2 at most `frames_per_turn` frames and `bytes_per_turn` bytes (the rest
      waits for the next turn: one connection's flood cannot hold the event loop);
    * floods are counted per frame kind (resets, control frames: `FloodBudget`), and a
      header block longer than `max_header_list_bytes` is refused before it is decoded
      (CONTINUATION floods, HPACK bombs), a frame longer than 16 KiB before it is buffered;
      each with GOAWAY ENHANCE_YOUR_CALM or FRAME_SIZE_ERROR.
    With `fast_path`, the common request is answered here without h2 (`_answer_fast`,
    eir.interfaces.h2wire), in frame order with what h2 receives.
    Stream errors stay stream errors: a stream beyond `max_concurrent_streams` gets
    RST_STREAM REFUSED_STREAM, a malformed request RST_STREAM PROTOCOL_ERROR (both counted
    as resets), one the client reset is not answered. Every h2 exception ends here, as a
    GOAWAY with its code; `last_stream_id` is the highest stream answered, so the client
    may retry the others.
    """

    def __init__(self, check: EquipmentIdentityCheck, settings: SbiSettings,
                 h2_config: H2Configuration, remote: bytes, now: float):
        self.check = check
        self.settings = settings
        self.remote = remote
        self.h2 = H2Connection(h2_config)
        self.events: list[tuple[int, str]] = []
        self.closed_reason: str | None = None
        self.closed_on_error = False  # closed by our GOAWAY with an error code
        self.waiting = False  # whole frames wait for the next turn
        self._blocked: dict[int, bytes] = {}  # stream → body waiting for flow-control window
        self._pending: dict[int, list] = {}  # stream → request headers, until its end
        self._buffer = bytearray()  # read, not yet handed to h2
        self._preface_left = len(CLIENT_PREFACE)  # preface bytes not yet handed to h2
        self._header_block = 0  # bytes of the header block being received (0: none)
        self._resets = FloodBudget(settings.max_resets_per_second,
                                   settings.flood_burst_seconds, now)
        self._control = FloodBudget(settings.max_control_frames_per_second,
                                    settings.flood_burst_seconds, now)
        self._settled = False  # the client's SETTINGS came: its preface is complete
        self._started = now
        self._last_request = now
        self._last_stream = 0  # the highest stream answered or refused
        self.fast_path = settings.fast_path  # eir.interfaces.h2wire

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def start(self) -> bytes:
        """Our SETTINGS, the first frame the client reads."""
        h2 = self.h2
        settings = self.settings
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_bytes})
        h2.initiate_connection()  # announces the settings above, in force from the start
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: H2_UNCHECKED_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_bytes})
        h2.decoder.max_header_list_size = settings.max_header_list_bytes
        return h2.data_to_send()

    def receive(self, data: bytes, now: float) -> bytes:
        if self.closed:
            return b""
        self._buffer += data
        if self.waiting:  # frames wait for this connection's next turn: that one comes first
            return b""
        return self._turn(now)

    def resume(self, now: float) -> bytes:
        """The next turn of the frames waiting."""
        if self.closed or not self.waiting:
            return b""
        return self._turn(now)

    def next_deadline(self) -> float | None:
        settings = self.settings
        if not self._settled:
            return self._started + settings.preface_timeout_seconds
        if settings.idle_timeout_seconds:
            return self._last_request + settings.idle_timeout_seconds
        return None

    def on_timer(self, now: float) -> bytes:
        deadline = self.next_deadline()
        if self.closed or deadline is None or now < deadline:
            return b""
        if not self._settled:
            return self._close(ErrorCodes.NO_ERROR, f"no HTTP/2 preface within "
                               f"{self.settings.preface_timeout_seconds:g} s", logging.INFO)
        return self._close(ErrorCodes.NO_ERROR, f"no request for "
                           f"{self.settings.idle_timeout_seconds:g} s", logging.INFO)

    def shutdown(self) -> bytes:
        """GOAWAY NO_ERROR: we are stopping."""
        if self.closed:
            return b""
        return self._close(ErrorCodes.NO_ERROR, "shutting down", logging.DEBUG)

    # -- one turn --------------------------------------------------------------------------

    def _turn(self, now: float) -> bytes:
        """The frames of this turn, in order: h2 receives them, except the requests the fast
        path answers (`_answer_fast`); h2 first receives what came before each of those, so
        that both see the connection as it is at that frame."""
        end, fast, error = self._cut(now)
        buffer = self._buffer
        h2 = self.h2
        out = bytearray()  # what earlier parts of the turn answered
        start = 0
        try:
            for position, length in fast:
                if start < position:
                    self._handle(h2.receive_data(bytes(buffer[start:position])), now)
                    out += h2.data_to_send()
                    if self.closed:
                        break
                    start = position
                if buffer[position + 3] == RST_STREAM:
                    if self._closed_unknown_to_h2(buffer, position):
                        start = position + FRAME_HEADER_BYTES + length
                    continue
                answer = self._answer_fast(buffer, position, length, now)
                if answer is not None:
                    out += answer
                    start = position + FRAME_HEADER_BYTES + length
            else:
                if start < end:
                    self._handle(h2.receive_data(bytes(buffer[start:end])), now)
                    out += h2.data_to_send()
                if error is not None:
                    raise error
        except SbiConnectionError as exc:
            out += self._close(exc.code, str(exc), logging.WARNING)
        except H2Error as exc:
            out += self._close(goaway_code(exc), f"HTTP/2 protocol error: "
                               f"{exc or type(exc).__name__}", logging.INFO)
        except Exception as exc:  # noqa: BLE001 - a defect: this connection only, logged
            where = traceback.extract_tb(exc.__traceback__)[-1]
            out += self._close(ErrorCodes.INTERNAL_ERROR, f"internal error: {exc!r} at "
                               f"{where.filename}:{where.lineno}", logging.ERROR)
        else:
            del buffer[:end]
        return bytes(out)

    def _closed_unknown_to_h2(self, buffer: bytearray, position: int) -> bool:
        """Whether the frame at `position` is on a stream h2 has seen opened and holds no
        state of: one the fast path answered (or one h2 closed and has since forgotten). A
        RST_STREAM on it is dropped (RFC 9113 §5.1: it may come shortly after our
        END_STREAM), where h2 would take it for a frame on a stream it forgot, a connection
        error. (Counted against max_resets_per_second all the same, in `_cut`.)"""
        h2 = self.h2
        stream_id = int.from_bytes(buffer[position + 5:position + 9], "big") & 0x7FFFFFFF
        return (stream_id not in h2.streams and stream_id & 1 == 1
                and 0 < stream_id <= h2.highest_inbound_stream_id)

    def _answer_fast(self, buffer: bytearray, position: int, length: int,
                     now: float) -> bytes | None:
        """The answer to the HEADERS frame at `position` (END_STREAM, END_HEADERS) if it is
        a new stream's plain request (eir.interfaces.h2wire) and its answer fits the flow
        control windows; else None, and h2 receives the frame."""
        h2 = self.h2
        stream_id = int.from_bytes(buffer[position + 5:position + 9], "big") & 0x7FFFFFFF
        # h2 answers the first request (its connection state opens with it) and any after
        # it stopped serving (GOAWAY).
        if (h2.state_machine.state is not ConnectionState.SERVER_OPEN
                or not stream_id & 1 or stream_id <= h2.highest_inbound_stream_id
                or len(self._pending) + len(self._blocked)
                >= self.settings.max_concurrent_streams
                or h2.encoder.table_size_changes  # for h2's next block to signal
                or min(h2.outbound_flow_control_window,
                       h2.remote_settings.initial_window_size) < MAX_BODY_BYTES):
            return None
        start = position + FRAME_HEADER_BYTES
        request = decode_request(bytes(buffer[start:start + length]),
                                 h2.decoder.header_table, self.settings.max_header_list_bytes)
        if request is None:
            return None
        method, path, agent = request
        check = self.check
        answer = check.answer(method, path, agent or self.remote)
        # The stream was opened and closed: h2 takes a later frame on it as on a closed
        # stream; the DATA frame took its bytes from the connection's send window.
        h2.highest_inbound_stream_id = stream_id
        h2.outbound_flow_control_window -= len(answer.body)
        requests = check.counters.requests
        requests[answer.status] = requests.get(answer.status, 0) + 1
        self._last_request = now
        self._last_stream = stream_id
        return answer.frames(stream_id.to_bytes(4, "big"))

    def _cut(self, now: float) -> tuple[int, list[tuple[int, int]], SbiConnectionError | None]:
        """How many buffered bytes this turn takes (whole frames, within the turn's
        budget), the (position, length) of the frames among them the fast path may take
        (requests, and resets of streams it answered), and the connection error found in the
        frame after them, if any."""
        buffer = self._buffer
        size = len(buffer)
        settings = self.settings
        fast: list[tuple[int, int]] = []
        position = min(self._preface_left, size)  # h2 checks the preface itself
        self._preface_left -= position
        if self._preface_left:
            return position, fast, None
        byte_budget = position + settings.bytes_per_turn
        frames = 0
        self.waiting = False
        while size - position >= FRAME_HEADER_BYTES:
            if frames == settings.frames_per_turn or frames and position >= byte_budget:
                self.waiting = True
                break
            length = int.from_bytes(buffer[position:position + 3], "big")
            kind, flags = buffer[position + 3], buffer[position + 4]
            if length > MAX_FRAME_BYTES:
                return position, fast, SbiConnectionError(
                    ErrorCodes.FRAME_SIZE_ERROR,
                    f"a frame of {length} bytes, above SETTINGS_MAX_FRAME_SIZE")
            if kind == HEADERS or kind == CONTINUATION:
                self._header_block += length
                if self._header_block > settings.max_header_list_bytes:
                    return position, fast, SbiConnectionError(
                        ErrorCodes.ENHANCE_YOUR_CALM,
                        f"a header block of more than {settings.max_header_list_bytes} "
                        "bytes (sbi.max_header_list_bytes)")
            if size - position - FRAME_HEADER_BYTES < length:
                if kind == HEADERS or kind == CONTINUATION:
                    self._header_block -= length  # counted again when whole
                break
            if kind == HEADERS or kind == CONTINUATION:
                if flags & END_HEADERS:
                    if (kind == HEADERS and self._header_block == length and self.fast_path
                            and flags & FAST_FLAGS_MASK == FAST_FLAGS):
                        fast.append((position, length))  # a whole block in one frame
                    self._header_block = 0
            elif kind == RST_STREAM:
                if not self._resets.spend(now):
                    return position, fast, self._flood("streams reset", "max_resets_per_second")
                if self.fast_path and length == 4:
                    fast.append((position, length))  # on a stream answered fast?
            elif (kind in CONTROL_FRAMES or kind > CONTINUATION
                  or kind == DATA and not length and not flags & END_STREAM):
                if not self._control.spend(now):
                    return position, fast, self._flood("frames without a request",
                                                 "max_control_frames_per_second")
            position += FRAME_HEADER_BYTES + length
            frames += 1
        return position, fast, None

    def _flood(self, what: str, setting: str) -> SbiConnectionError:
        settings = self.settings
        return SbiConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, (
            f"flood: more than {getattr(settings, setting):g} {what} per second "
            f"(sbi.{setting}, {settings.flood_burst_seconds:g} s of burst)"))

    def _handle(self, events: list, now: float) -> None:
        # Frames are all parsed before their events are seen: a stream reset, or a GOAWAY,
        # later in the same turn already holds in h2. Such a stream gets no answer; after a
        # GOAWAY h2 sends nothing, so nothing more is answered.
        kinds = {type(event) for event in events}
        if ConnectionTerminated in kinds:
            self._closed_by_client(events)
            return
        reset = ({event.stream_id for event in events if type(event) is StreamReset}
                 if StreamReset in kinds else ())
        h2 = self.h2
        for event in events:
            kind = type(event)
            if kind is RequestReceived:
                stream_id = event.stream_id
                self._last_request = now
                if stream_id in reset:
                    continue
                open_streams = len(self._pending) + len(self._blocked)
                if open_streams >= self.settings.max_concurrent_streams:
                    self._reset(stream_id, ErrorCodes.REFUSED_STREAM, now)
                elif (problem := malformed(event.headers)) is not None:
                    self.events.append((logging.INFO, f"stream {stream_id}: malformed request: "
                                        f"{problem} (RST_STREAM PROTOCOL_ERROR)"))
                    self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR, now)
                elif event.stream_ended is not None:  # a GET: HEADERS with END_STREAM
                    self._answer(stream_id, event.headers)
                else:
                    self._pending[stream_id] = event.headers
            elif kind is StreamEnded:
                headers = self._pending.pop(event.stream_id, None)
                if headers is not None:
                    self._answer(event.stream_id, headers)
            elif kind is DataReceived:  # no request body is used: only given back as window
                if event.flow_controlled_length:
                    h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is WindowUpdated:
                if self._blocked:
                    self._unblock()
            elif kind is StreamReset:
                self._pending.pop(event.stream_id, None)
                self._blocked.pop(event.stream_id, None)
            elif kind is RemoteSettingsChanged:
                self._settled = True
                encoder = h2.encoder
                if encoder.table_size_changes:
                    # hpack forgets a pending SETTINGS_HEADER_TABLE_SIZE change when the
                    # same size comes again before our next block (its `resized` flag is
                    # set anew, to False): that block would lack the update the client
                    # waits for, a COMPRESSION_ERROR there (tests/test_sbi_fast.py found it).
                    encoder.header_table.resized = True

    def _closed_by_client(self, events: list) -> None:
        for event in events:
            if type(event) is ConnectionTerminated:
                self._end(f"the client closed the connection (GOAWAY "
                          f"{_code_name(event.error_code)})", logging.DEBUG)

    def _reset(self, stream_id: int, code: ErrorCodes, now: float) -> None:
        """A stream error: RST_STREAM, counted with the streams the client resets."""
        self._last_stream = max(self._last_stream, stream_id)
        self.h2.reset_stream(stream_id, code)
        if not self._resets.spend(now):
            raise self._flood("streams reset", "max_resets_per_second")

    def _answer(self, stream_id: int, headers: list) -> None:
        method = path = agent = None
        for name, value in headers:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b"user-agent":
                agent = value
        check = self.check
        answer = check.answer(method, path, agent or self.remote)
        requests = check.counters.requests
        requests[answer.status] = requests.get(answer.status, 0) + 1
        self._last_stream = max(self._last_stream, stream_id)
        h2 = self.h2
        h2.send_headers(stream_id, answer.headers)
        if len(answer.body) <= h2.local_flow_control_window(stream_id):
            h2.send_data(stream_id, answer.body, end_stream=True)
        else:  # the client has not given back enough window yet
            self._blocked[stream_id] = answer.body

    def _unblock(self) -> None:
        h2 = self.h2
        for stream_id, body in list(self._blocked.items()):
            if len(body) <= h2.local_flow_control_window(stream_id):
                h2.send_data(stream_id, body, end_stream=True)
                del self._blocked[stream_id]

    def _close(self, code: ErrorCodes, reason: str, level: int) -> bytes:
        """GOAWAY with `code`, in place of whatever h2 queued in the failed turn."""
        self.h2.data_to_send()  # what h2 queued (its own GOAWAY, if it raised) is dropped
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_stream
        frame.error_code = code
        self._end(f"closing the N5g-eir connection: {reason} (GOAWAY {code.name})", level)
        self.closed_on_error = code is not ErrorCodes.NO_ERROR
        return frame.serialize()

    def _end(self, reason: str, level: int) -> None:
        self.closed_reason = reason
        self.events.append((level, reason))
        self.waiting = False  # what is left unread is dropped with the connection
        self._buffer.clear()


def _code_name(code) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


# -- the HTTP/2 server side: the asyncio shell ---------------------------------------------

class SbiConnection(ReadGate, asyncio.BufferedProtocol):
    """One transport connection (h2c or TLS) of the N5g-eir listener: counted against the
    connection limits, then feeds its SbiSession and writes what it returns. Reads go into
    the listener's one read buffer (at most `sbi.read_bytes`), copied out at once."""

    def __init__(self, service: "N5gEir", admitted: str | None = None):
        self.service = service
        self.loop = service.loop
        self.session: SbiSession | None = None
        self.transport: asyncio.Transport | None = None
        self.remote = UNKNOWN_CLIENT.decode()
        # The source address counted against the limits (a TLS connection is counted
        # before its handshake, by eir.net.security.TlsAcceptor); None: not counted yet.
        self._address = admitted
        self._timer: asyncio.TimerHandle | None = None
        self._resume_handle: asyncio.Handle | None = None
        self._linger: asyncio.TimerHandle | None = None  # set once our GOAWAY is written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        service = self.service
        peer = transport.get_extra_info("peername")
        self.remote = format_address(peer)
        if self._address is None:
            address = peer[0] if peer else ""
            refusal = service.limits.admit(address)
            if refusal is not None:
                log.warning("%s: N5g-eir connection refused: %s", self.remote, refusal,
                            extra={"peer": address})  # rate-limited by address (eir.core.logs)
                transport.abort()
                return
            self._address = address
        # Which process holds which AMF's connection (a worker's lines start "worker N: ").
        log.info("N5g-eir connection from %s", self.remote, extra={"peer": self._address})
        service.counters.connections += 1
        self.transport = transport  # type: ignore[assignment]
        service.connections.add(self)
        self.session = SbiSession(service.check, service.settings, service.h2_config,
                                  self.remote.encode(), self.loop.time())
        transport.write(self.session.start())
        self._schedule()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.service.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.service.read_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        """Bytes read from the client (from buffer_updated, or early TLS data)."""
        self._after(self.session.receive(data, self.loop.time()))

    def _resume(self) -> None:
        """This connection's next turn: after the other connections ready now had theirs."""
        self._resume_handle = None
        self._after(self.session.resume(self.loop.time()))

    def _after(self, out: bytes) -> None:
        session = self.session
        if out:
            self.transport.write(out)
        if session.events:
            self._log_events()
        if session.closed:
            if self._linger is None and not self.transport.is_closing():
                self._close()
            return
        if session.waiting and self._resume_handle is None:
            self._resume_handle = self.loop.call_soon(self._resume)
        self._set_reading()

    def _close(self) -> None:
        """Close once what was written is sent. After a connection error on cleartext:
        FIN after the GOAWAY, then what the client still sends read and dropped until its
        own FIN or sbi.close_linger_seconds: a close with unread data would answer it with a
        TCP reset, which can overtake the GOAWAY (a client still sending is likely then)."""
        transport = self.transport
        linger = self.service.settings.close_linger_seconds
        if not (linger and self.session.closed_on_error and transport.can_write_eof()):
            transport.close()  # flushes what was written first
            return
        transport.write_eof()
        self._linger = self.loop.call_later(linger, transport.close)
        transport.resume_reading()  # the session drops what comes

    def _may_read(self) -> bool:
        """Unless frames already wait for a turn."""
        return not self.session.waiting

    def _on_timer(self) -> None:
        self._timer = None
        self._after(self.session.on_timer(self.loop.time()))
        self._schedule()

    def _schedule(self) -> None:
        deadline = self.session.next_deadline()
        if deadline is not None and not self.session.closed:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _log_events(self) -> None:
        extra = {"peer": self._address or self.remote}  # rate-limited by address (eir.core.logs)
        for level, message in self.session.events:
            log.log(level, "%s: %s", self.remote, message, extra=extra)
        self.session.events.clear()

    def close(self) -> None:
        """Shutdown: GOAWAY, then close once written."""
        if self.transport is not None and not self.transport.is_closing():
            self._after(self.session.shutdown())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._address is None:
            return  # refused in connection_made: never counted
        service = self.service
        service.limits.release(self._address)
        self._address = None
        service.counters.connections -= 1
        service.connections.discard(self)
        for handle in (self._timer, self._resume_handle, self._linger):
            if handle is not None:
                handle.cancel()
        self._log_events()




def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class N5gEir:
    """The N5g-eir listeners of an EirServer (`sbi` settings) and its NRF registration."""

    def __init__(self, server: ServerView):

        self.server = server
        settings = server.settings.sbi
        self.settings = settings
        self.counters = SbiCounters()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.limits = ConnectionLimits(settings.max_connections,
                                       settings.max_connections_per_address, section="sbi")
        # One read buffer for every connection: each read is copied out before the next.
        self.read_buffer = memoryview(bytearray(settings.read_bytes))
        self.h2_config = self.h2_configuration()
        self.check = EquipmentIdentityCheck(server.check, self.counters, server.audit)
        self.tls_context = None
        if settings.tls is not None:
            tls = settings.tls
            self.tls_context = server_tls_context(tls.certificate, tls.key, tls.ca,
                                                  tls.require_client_cert, section="sbi.tls")
            self.tls_context.set_alpn_protocols(["h2"])
        self.listeners: list[asyncio.AbstractServer] = []
        self.urls: list[str] = []
        self.connections: set[SbiConnection] = set()
        self.nrf = NrfRegistration(self, settings.nrf) if settings.nrf is not None else None

    @staticmethod
    def h2_configuration() -> H2Configuration:
        # Our answers' headers are ours: not validated again on every send.
        return H2Configuration(client_side=False, header_encoding=None,
                               validate_outbound_headers=False,
                               normalize_outbound_headers=False,
                               validate_inbound_headers=False)  # SbiSession checks them

    def wanted(self) -> list[tuple[str, bool]]:
        """(HOST:PORT, TLS) of each listener the settings ask for."""
        wanted = []
        if self.settings.listen:
            wanted.append((self.settings.listen, False))
        if self.settings.tls is not None:
            wanted.append((self.settings.tls.listen, True))
        return wanted

    async def start(self, bound: list[tuple[socket.socket, bool]] | None = None) -> None:
        """Listen on the `sbi` addresses, or, in a supervisor, name the listening sockets
        it `bound` (it accepts on them and hands each connection to a worker); then register
        with the NRF."""
        loop = self.loop = asyncio.get_running_loop()
        if bound is None:
            bound = []
            for listen, tls in self.wanted():
                host, port = parse_host_port(listen)
                try:
                    listener = await loop.create_server(
                        self._tls_acceptor if tls else lambda: SbiConnection(self),
                        host, port, reuse_address=True)
                except OSError as exc:
                    raise OSError(f"sbi {listen}: {exc.strerror or exc}") from None
                self.listeners.append(listener)
                bound += [(sock, tls) for sock in listener.sockets]
        for sock, tls in bound:
            host, port = sock.getsockname()[:2]
            url = _url("https" if tls else "http", host, port)
            self.urls.append(url)
            log.info("N5g-eir served on %s/%s/%s/ (%s)", url, SERVICE_NAME, API_VERSION,
                     "TLS, ALPN h2" if tls else "h2c")
        if self.nrf is not None:
            self.nrf.start()

    def serve_handed_over(self, limits) -> None:
        """A worker: connections come from the supervisor (`adopt`), admitted there;
        `limits` (eir.serve.workers.ForwardedLimits) reports each one's end back."""
        self.loop = asyncio.get_running_loop()
        self.limits = limits

    def adopt(self, address: str, tls: bool) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for a connection the supervisor accepted from `address`
        (and counted): over TLS the handshake is done here, then an SbiConnection."""
        if tls:
            return self._tls_acceptor
        return lambda: SbiConnection(self, admitted=address)

    def _tls_acceptor(self) -> TlsAcceptor:
        """A TLS connection, counted against the limits from accept (its handshake within
        the preface timeout), then an SbiConnection."""
        limits = self.limits
        return TlsAcceptor(self.tls_context, self.settings.preface_timeout_seconds,
                           limits.admit, limits.release,
                           lambda address: SbiConnection(self, admitted=address),
                           self.server.spawn)

    async def stop(self) -> None:
        """Deregister from the NRF (bounded), stop listening, close the connections."""
        if self.nrf is not None:
            await self.nrf.stop()
        for listener in self.listeners:
            listener.close()
        for connection in list(self.connections):
            connection.close()
        for listener in self.listeners:
            await listener.wait_closed()


# -- a small HTTP/2 client (the NRF, bench/sbi.py) ----------------------------------------

@dataclass(frozen=True)
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body) if self.body else None


class _ClientConnection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, list] = {}  # stream → [future, status, headers, chunks]
        self.waiting: deque[asyncio.Future] = deque()  # requests waiting for a free stream
        self.settled = loop.create_future()  # the server's first SETTINGS arrived
        self.error: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        try:
            events = h2.receive_data(data)
        except ProtocolError as exc:
            self._fail(ConnectionError(f"HTTP/2 protocol error: {exc}"))
            self.transport.close()
            return
        for event in events:
            kind = type(event)
            if kind is ResponseReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream[2] = {name.decode(): value.decode("latin-1")
                                 for name, value in event.headers}
                    stream[1] = int(stream[2].get(":status", "0"))
            elif kind is DataReceived:
                h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream[3].append(event.data)
            elif kind is StreamEnded:
                self._settle(event.stream_id, None)
            elif kind is StreamReset:
                self._settle(event.stream_id, ConnectionError(
                    f"stream reset by the server ({event.error_code!r})"))
            elif kind is RemoteSettingsChanged:
                if not self.settled.done():
                    self.settled.set_result(None)
                self._wake()
            elif kind is ConnectionTerminated:
                self._fail(ConnectionError(f"the server closed the connection "
                                           f"({event.error_code!r})"))
        out = h2.data_to_send()
        if out:
            self.transport.write(out)

    def _settle(self, stream_id: int, error: Exception | None) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        future, status, headers, chunks = stream
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(H2Response(status, headers, b"".join(chunks)))
        self._wake()

    def _wake(self) -> None:
        while self.waiting and self._has_room():
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _has_room(self) -> bool:
        h2 = self.h2
        return h2.open_outbound_streams < h2.remote_settings.max_concurrent_streams

    def _fail(self, error: Exception) -> None:
        self.error = error
        for stream_id in list(self.streams):
            self._settle(stream_id, error)
        for waiter in self.waiting:
            if not waiter.done():
                waiter.set_exception(error)
        self.waiting.clear()
        if not self.settled.done():
            self.settled.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost ({exc})" if exc else "connection closed"))

    async def request(self, headers: list, body: bytes) -> H2Response:
        while self.error is None and (self.waiting or not self._has_room()):
            waiter = self.loop.create_future()
            self.waiting.append(waiter)
            await waiter
        if self.error is not None:
            raise self.error
        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        h2.send_headers(stream_id, headers, end_stream=not body)
        if body:  # small JSON documents: within the initial window
            h2.send_data(stream_id, body, end_stream=True)
        self.transport.write(h2.data_to_send())
        future = self.loop.create_future()
        self.streams[stream_id] = [future, 0, {}, []]
        return await future


class H2Client:
    """An HTTP/2 client on one connection: http:// with prior knowledge (h2c), https://
    with ALPN h2. Requests run concurrently, at most as many as the server's
    SETTINGS_MAX_CONCURRENT_STREAMS at once (the rest wait their turn)."""

    def __init__(self, connection: _ClientConnection, scheme: str, authority: str,
                 user_agent: str):
        self._connection = connection
        self._scheme = scheme.encode()
        self._authority = authority.encode()
        self._user_agent = user_agent.encode()

    @classmethod
    async def connect(cls, url: str, ssl_context: ssl.SSLContext | None = None,
                      timeout: float = NRF_TIMEOUT_SECONDS,
                      user_agent: str = "open-eir") -> "H2Client":
        parts = urlsplit(url)
        https = parts.scheme == "https"
        if https:
            ssl_context = ssl_context or ssl.create_default_context()
            ssl_context.set_alpn_protocols(["h2"])
        else:
            ssl_context = None
        loop = asyncio.get_running_loop()
        port = parts.port or (443 if https else 80)
        transport, connection = await asyncio.wait_for(loop.create_connection(
            lambda: _ClientConnection(loop), parts.hostname, port, ssl=ssl_context), timeout)
        try:
            await asyncio.wait_for(asyncio.shield(connection.settled), timeout)
        except BaseException:
            transport.abort()
            raise
        return cls(connection, parts.scheme, parts.netloc, user_agent)

    @property
    def closed(self) -> bool:
        return self._connection.error is not None

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str | None = None) -> H2Response:
        headers = [(b":method", method.encode()), (b":scheme", self._scheme),
                   (b":authority", self._authority), (b":path", path.encode()),
                   (b"user-agent", self._user_agent)]
        if body:
            headers += [(b"content-type", (content_type or "application/json").encode()),
                        (b"content-length", str(len(body)).encode())]
        return await self._connection.request(headers, body)

    def close(self) -> None:
        connection = self._connection
        if connection.transport is not None and not connection.transport.is_closing():
            try:
                connection.h2.close_connection()
                connection.transport.write(connection.h2.data_to_send())
            except ProtocolError:
                pass
            connection.transport.close()


# -- NRF registration (TS 29.510 NFManagement) ---------------------------------------------

class NrfError(Exception):
    """The NRF refused or did not answer as TS 29.510 says."""


def default_nf_instance_id(origin_host: str) -> str:
    """A UUID stable across restarts: derived from our Diameter identity."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, origin_host))


def nf_profile(nf_instance_id: str, scheme: str, host: str, port: int,
               heartbeat_seconds: int, selection: dict | None = None) -> dict:
    """Our NFProfile: a 5G_EIR with the n5g-eir-eic service at scheme://host:port, and the
    `selection` attributes AMFs choose instances by (priority, capacity, locality)."""
    service = {"serviceInstanceId": SERVICE_NAME, "serviceName": SERVICE_NAME,
               "versions": [{"apiVersionInUri": API_VERSION,
                             "apiFullVersion": API_FULL_VERSION}],
               "scheme": scheme, "nfServiceStatus": "REGISTERED"}
    profile = {"nfInstanceId": nf_instance_id, "nfType": NF_TYPE, "nfStatus": "REGISTERED",
               "heartBeatTimer": heartbeat_seconds, "nfServices": [service],
               **(selection or {})}
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:  # a name
        profile["fqdn"] = service["fqdn"] = host
        service["ipEndPoints"] = [{"transport": "TCP", "port": port}]
    else:
        profile[f"ipv{version}Addresses"] = [host]
        service["ipEndPoints"] = [{f"ipv{version}Address": host, "transport": "TCP",
                                   "port": port}]
    return profile


class NrfRegistration:
    """NFRegister at start, a heartbeat (NFUpdate, PATCH nfStatus) every heartBeatTimer the
    NRF answered, a new NFRegister when a heartbeat is refused (404: the NRF forgot us) or
    failed, NFDeregister at shutdown."""

    def __init__(self, service: N5gEir, settings):
        self.service = service
        self.settings = settings
        self.nf_instance_id = settings.nf_instance_id or default_nf_instance_id(
            service.server.settings.diameter.origin_host)
        self.path = f"/nnrf-nfm/v1/nf-instances/{self.nf_instance_id}"
        self.heartbeat_seconds = settings.heartbeat_seconds
        self.ssl_context = None
        if settings.url.startswith("https://"):
            self.ssl_context = ssl.create_default_context(
                cafile=str(settings.ca) if settings.ca else None)
        self.client: H2Client | None = None
        self.registered = False
        self._task: asyncio.Task | None = None

    def advertised(self) -> tuple[str, str, int]:
        """(scheme, host, port) the AMFs are told to use."""
        sbi = self.service.settings
        if self.settings.advertise:
            host, port = parse_host_port(self.settings.advertise)
            return ("http" if sbi.listen else "https"), host, port
        if sbi.listen:
            scheme, listen = "http", sbi.listen
        else:
            scheme, listen = "https", sbi.tls.listen
        host, port = parse_host_port(listen)
        if port == 0:  # an ephemeral port: the one bound
            port = int(self.service.urls[0].rsplit(":", 1)[1])
        if host in ("0.0.0.0", "::"):
            raise NrfError(f"sbi.nrf.advertise is needed: {listen} is a wildcard address, "
                           "not one an AMF can reach")
        return scheme, host, port

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _request(self, method: str, body: bytes = b"",
                       content_type: str | None = None) -> H2Response:
        if self.client is None or self.client.closed:
            self.client = await H2Client.connect(self.settings.url, self.ssl_context,
                                                 user_agent=f"{NF_TYPE}-{self.nf_instance_id}")
        return await asyncio.wait_for(self.client.request(
            method, self.path, body, content_type), NRF_TIMEOUT_SECONDS)

    async def register(self) -> None:
        scheme, host, port = self.advertised()
        profile = nf_profile(self.nf_instance_id, scheme, host, port,
                             self.settings.heartbeat_seconds, self.settings.model_dump(
                                 include={"priority", "capacity", "locality"},
                                 exclude_none=True))
        response = await self._request("PUT", json.dumps(profile).encode())
        if response.status not in (200, 201):
            raise NrfError(f"NFRegister answered {response.status}: "
                           f"{response.body[:200].decode('utf-8', 'replace')}")
        answered = (response.json() or {}).get("heartBeatTimer")
        if isinstance(answered, int) and answered > 0:
            self.heartbeat_seconds = answered
        self._set_registered(True)
        log.info("NRF %s: registered as 5G_EIR %s (%s://%s:%d), heartbeat every %d s",
                 self.settings.url, self.nf_instance_id, scheme, host, port,
                 self.heartbeat_seconds)

    async def heartbeat(self) -> None:
        patch = [{"op": "replace", "path": "/nfStatus", "value": "REGISTERED"}]
        response = await self._request("PATCH", json.dumps(patch).encode(),
                                       "application/json-patch+json")
        if response.status == 404:
            log.warning("NRF %s: heartbeat answered 404 (it no longer knows us): registering "
                        "again", self.settings.url)
            self._set_registered(False)
            await self.register()
        elif response.status not in (200, 204):
            raise NrfError(f"heartbeat answered {response.status}")

    async def _run(self) -> None:
        while True:
            try:
                if self.registered:
                    await self.heartbeat()
                else:
                    await self.register()
            except (OSError, asyncio.TimeoutError, NrfError, ValueError) as exc:
                log.warning("NRF %s: %s; retrying in %d s", self.settings.url,
                            exc or type(exc).__name__, self.heartbeat_seconds)
                if self.client is not None and not isinstance(exc, NrfError):
                    self.client.close()
                    self.client = None
                if not isinstance(exc, NrfError) or not self.registered:
                    self._set_registered(False)
            await asyncio.sleep(self.heartbeat_seconds)

    def _set_registered(self, registered: bool) -> None:
        self.registered = registered
        self.service.counters.nrf_registered = registered

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.registered:
            try:
                response = await asyncio.wait_for(self._request("DELETE"),
                                                  DEREGISTER_TIMEOUT_SECONDS)
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("NRF %s: deregistering failed: %s", self.settings.url,
                            exc or type(exc).__name__)
            else:
                log.info("NRF %s: deregistered (%d)", self.settings.url, response.status)
            self._set_registered(False)
        if self.client is not None:
            self.client.close()
            self.client = None
