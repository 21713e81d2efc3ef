"""The Diameter peer state machine of one connection, responder side (RFC 6733 §5, RFC 3539).

Sans-IO: `receive(data, now)` and `on_timer(now)` return the bytes to send; the caller owns
the socket and the clock. After each call the caller drains `events` (log records) and, when
`closed` is set, writes what was returned and closes the transport. With `admission` limits,
a read of more requests than one turn may answer leaves the rest queued (`backlog`), and so
does a read that follows a full turn: the caller calls `resume(now)` on a later turn of its
event loop until the backlog is empty.

Policy comes in as data: the peer allowlist and the names of a verified TLS certificate
(checked on CER: 3010 DIAMETER_UNKNOWN_PEER), the duplicate-answer cache (T flag), and the
admission limits (3004 DIAMETER_TOO_BUSY beyond them); see eir.net.security,
eir.diameter.overload and eir.diameter.duplicates. With `claims_identity`, a CER that passes
opens only once the caller
has checked that its Origin-Host may have one more connection (eir.diameter.identities): the
peer sets `claiming`, the caller calls `claim_decided`.

An application may also answer runs of requests itself, in C (`answer_run`: the S13 fast
path, eir.interfaces.s13 and eir/lists/_ecr.c). It is asked wherever a request would be
handled, inside the same turns (so admission, queueing and 3004 are the generic path's), for
the messages from there on; it answers those it takes up to the first it does not, which is
handled here as any other, in order. What the peer does per handled request (counters, idle
time, the duplicate cache) is done for its answers in `_fast_answered`.

States: WAIT_CER (connected, nothing else allowed) → OPEN → CLOSING (our DPR sent) → CLOSED.
"""

from __future__ import annotations

import enum
import logging
import random
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Protocol

from eir.core.untrusted import untrusted
from eir.diameter.codec import (
    Avp,
    AvpCountError,
    AvpLengthError,
    Framer,
    Header,
    decode_avps,
    encode_avp,
    encode_message,
    parse_header,
)
from eir.diameter.constants import (
    APPLICATION_COMMON,
    APPLICATION_RELAY,
    AVP_FLAG_MANDATORY,
    COMMAND_CAPABILITIES_EXCHANGE,
    COMMAND_DEVICE_WATCHDOG,
    COMMAND_DISCONNECT_PEER,
    FLAG_ERROR,
    FLAG_PROXIABLE,
    FLAG_REQUEST,
    FLAG_RETRANSMIT,
    DisconnectCause,
    ResultCode,
)
from eir.diameter.dictionary import TOO_MANY_AVPS, AvpError, AvpIndex, CommandDef, Dictionary
from eir.diameter.duplicates import request_keys

if TYPE_CHECKING:
    from eir.diameter.duplicates import DuplicateCache
    from eir.diameter.overload import Admission


class PeerAllowlist(Protocol):
    """What the peer asks of its allowlist (eir.net.security.PeerAllowlist): empty means any
    peer may open; otherwise why this peer may not (None: it may)."""

    def __len__(self) -> int: ...

    def refusal(self, host: str, realm: str, address: str | None) -> str | None: ...


SESSION_ID_CODE = 263
_SESSION_ID_HEADER = SESSION_ID_CODE.to_bytes(4, "big")
_LENGTH_WORD = struct.Struct("!I")  # version and message length
TOO_BUSY = AvpError(ResultCode.TOO_BUSY, None, "too busy: try another server")
# Messages read while a CER's Origin-Host is being claimed (a peer should send nothing
# before the CEA): beyond this, the connection is closed.
MAX_HELD_MESSAGES = 64
# Keys of PeerConnection.answered besides the verdicts' names (WHITELISTED, BLACKLISTED,
# GREYLISTED, UNKNOWN): an application request answered with an error Result-Code (a bad
# AVP, 3004 too busy, 5012...), or answered again from the duplicate cache (T flag).
# The parts of a fast-path run that _fast_answered adds up: a record's verdict status,
# Origin-Host and answer (see AnswerRun), a request's command code (header bytes 5 to 8).
_STATUS = attrgetter("status")
_VERDICT, _ORIGIN_HOST, _ANSWER = itemgetter(2), itemgetter(3), itemgetter(4)
_COMMAND_CODE = itemgetter(slice(5, 8))
ANSWERED_ERROR = "ERROR"
ANSWERED_DUPLICATE = "DUPLICATE"
ANSWERED_OUTCOMES = ("WHITELISTED", "BLACKLISTED", "GREYLISTED", "UNKNOWN", ANSWERED_ERROR,
                     ANSWERED_DUPLICATE)


@dataclass(frozen=True)
class LocalIdentity:
    """Who we are, as CEA, DWA, DPR and every answer tell the peer."""

    origin_host: str
    origin_realm: str
    product_name: str = "open EIR"
    vendor_id: int = 0
    firmware_revision: int = 1
    origin_state_id: int = 0
    host_ip_addresses: tuple[str, ...] = ()  # empty: the connection's local address


class Application(Protocol):
    """A Diameter application served over the connection (S13 is one)."""

    application_id: int
    vendor_id: int

    def handle_request(self, header: Header, command: CommandDef,
                       avps: AvpIndex) -> tuple[bytes, str]:
        """The answer to a validated request and its outcome (the verdict's name, counted
        in PeerConnection.answered); raises AvpError when a value the application checks
        itself is wrong (the peer then logs and calls error_answer)."""
        ...

    def error_answer(self, header: Header, session_id: Avp | None, error: AvpError) -> bytes: ...


class AnswerRun(Protocol):
    """An application's fast path (optional `answer_run` attribute, None when off): answers
    messages[start:stop] (`stop` the first it does not take, or `end`), as `handle_request`
    would have, but for the header checks and AVP decoding and validation that it does
    itself; returns (answers, stop, records), a record per answer whose third item is the
    verdict (its `status` a key of the application's `answer_outcomes`, which names the
    outcome as `handle_request` does), fourth the request's Origin-Host payload and fifth the
    answer (when `answers`, else None). Only requests without the T flag; at most
    `max_avps` AVPs each."""

    def __call__(self, messages: list[bytes], start: int, end: int, max_avps: int,
                 answers: bool) -> tuple[bytes, int, list]: ...


class PeerState(enum.Enum):
    WAIT_CER = "wait-cer"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class Timers:
    watchdog: float = 30.0  # Tw, RFC 3539
    watchdog_jitter: float = 2.0  # RFC 3539 §3.4.1: ±2 s so peers do not synchronise
    cer_timeout: float = 10.0
    disconnect_timeout: float = 3.0
    # Disconnect (DPR, DO_NOT_WANT_TO_TALK_TO_YOU) an open connection that carried no
    # application request for this long; None: never. Watchdogs do not count: they keep
    # every link alive, the idle ones included.
    idle_timeout: float | None = None


class AnswerBuilder:
    """Encodes the answers the base protocol needs, with our identity filled in."""

    def __init__(self, dictionary: Dictionary, local: LocalIdentity, counters=None):
        self.dictionary = dictionary
        self.local = local
        # None, or eir.interfaces.metrics.DiameterCounters: errors counted
        self.counters = counters
        encode = dictionary.encode
        self.origin = encode("Origin-Host", local.origin_host) + encode(
            "Origin-Realm", local.origin_realm)
        self.origin_state = encode("Origin-State-Id", local.origin_state_id)

    def result_code(self, code: int) -> bytes:
        return self.dictionary.encode("Result-Code", int(code))

    def error(self, header: Header, session_id: Avp | None, code: ResultCode,
              failed_avp: bytes | None = None, text: str | None = None,
              extra: bytes = b"") -> bytes:
        """An answer carrying an error: RFC 6733 §7.2 answer-message, plus `extra` AVPs
        the command's own answer grammar requires. 3xxx codes set the E bit."""
        encode = self.dictionary.encode
        parts = []
        if session_id is not None:
            parts.append(encode_avp(session_id.code, AVP_FLAG_MANDATORY, 0, session_id.data))
        parts.append(extra)
        parts.append(self.result_code(code))
        parts.append(self.origin)
        if text:
            parts.append(encode("Error-Message", text[:200]))
        if failed_avp is not None:
            parts.append(encode("Failed-AVP", [failed_avp]))
        flags = header.flags & FLAG_PROXIABLE
        if ResultCode(code).is_protocol_error:
            flags |= FLAG_ERROR
        if self.counters is not None:
            self.counters.answer(header.code, code)
        return encode_message(flags, header.code, header.application, header.hop_by_hop,
                              header.end_to_end, b"".join(parts))


@dataclass
class PeerConnection:
    dictionary: Dictionary
    local: LocalIdentity
    applications: dict[int, Application]
    now: float
    local_addresses: tuple[str, ...] = ()
    timers: Timers = field(default_factory=Timers)
    max_message_bytes: int = 65536
    # AVPs a request may hold, at every depth of grouping; beyond, 5009 at the cost of
    # decoding that many (diameter.max_avps_per_message, eir.diameter.overload).
    max_avps_per_message: int = 128
    rng: random.Random = field(default_factory=random.Random)
    remote_address: str | None = None  # the peer's IP address, for the allowlist
    allowlist: PeerAllowlist | None = None  # None or empty: any peer may open
    # DNS names of the peer's verified TLS certificate: the CER's Origin-Host must be one.
    # None: not checked (plain TCP, no client certificate, or the check is turned off).
    certificate_names: tuple[str, ...] | None = None
    duplicates: DuplicateCache | None = None  # None: no duplicate detection
    admission: Admission | None = None  # None: every read answered whole, at once
    counters: object = None  # None, or eir.interfaces.metrics.DiameterCounters (requests, answers)
    # True: a CER that passes every check opens the connection only once the caller has
    # claimed its Origin-Host (`claiming`, then `claim_decided`): a second connection from
    # an Origin-Host that has one open is refused or allowed server-wide (the registry may
    # be in another process: eir.serve.workers). False: opened at once.
    claims_identity: bool = False

    def __post_init__(self) -> None:
        self.state = PeerState.WAIT_CER
        self.peer_host: str | None = None
        self.peer_realm: str | None = None
        self.events: list[tuple[int, str]] = []
        self.closed_reason: str | None = None
        self.answers = AnswerBuilder(self.dictionary, self.local, self.counters)
        self._framer = Framer(self.max_message_bytes)
        self._connected_at = self.now
        self._last_received = self.now
        self._watchdog_sent_at: float | None = None
        self._disconnect_sent_at: float | None = None
        self._next_hop_by_hop = self.rng.getrandbits(32)
        self._next_end_to_end = self.rng.getrandbits(20)
        self._interval = self._watchdog_interval()
        self._last_request = self.now
        # Messages read but not yet handled (only with admission limits).
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0  # their length
        admission = self.admission
        self._per_turn = admission.requests_per_turn if admission else sys.maxsize
        self._bytes_per_turn = admission.bytes_per_turn if admission else sys.maxsize
        # The last turn answered requests_per_turn requests or bytes_per_turn bytes: the
        # next read only queues, so that a connection whose reads each bring a turn's worth
        # (a few large requests) gets one turn per turn of the event loop, not two.
        self._full_turn = False
        self.refused_busy = 0  # requests answered 3004 on this connection
        # Application requests answered on this connection, by outcome: the verdict's name
        # (WHITELISTED, BLACKLISTED, GREYLISTED, UNKNOWN = 5422), ANSWERED_ERROR (3004
        # included) or ANSWERED_DUPLICATE. For GET /v1/peers and the console's peers page;
        # whatever answers a request (this class, a fast path) bumps it, one key per answer.
        # A plain dict with every key present: a bump is a specialised dict store (a
        # Counter, a dict subclass, is not specialised: ~1.5x the cost).
        self.answered: dict[str, int] = dict.fromkeys(ANSWERED_OUTCOMES, 0)
        self._busy_templates: dict[bytes, tuple[bytes, bytes]] = {}
        self._application_ids = {a.to_bytes(4, "big") for a in self.applications}
        # False while the queue is full, until it is half empty: the caller should not read
        # meanwhile (the peer's further requests wait in its socket buffer, and TCP slows
        # it down), so that turns go to answering rather than to refusing.
        self.reading = True
        self._refused_in_episode = 0
        # The Origin-Host of a CER waiting for `claim_decided` (the caller asks once), the
        # CER's header, and the messages read meanwhile (handled once it is decided).
        self.claiming: str | None = None
        self._claimed_cer: Header | None = None
        self._held: list[bytes] | None = None
        self._peer_key = b""  # the CER's Origin-Host, lower-cased, once open (duplicates)
        # An application's fast path (see the module docstring), or None.
        fast = next((a for a in self.applications.values()
                     if getattr(a, "answer_run", None) is not None), None)
        self._answer_run: AnswerRun | None = fast.answer_run if fast is not None else None
        # The outcome name (a key of `answered`) of each status a fast-path record's verdict
        # may have: the application's `answer_outcomes`, as it names them for handle_request.
        self._answer_outcomes: dict = fast.answer_outcomes if fast is not None else {}

    # -- inputs --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is PeerState.CLOSED

    def receive(self, data: bytes, now: float) -> bytes:
        """Bytes from the peer in, bytes to send back out."""
        if self.closed:
            return b""
        self._last_received = now
        framer = self._framer
        messages = framer.feed(data)
        if self._queue or self._full_turn:
            # A turn is pending already, or this connection has just had a full one: this
            # read waits for its next turn (`resume`, on the next turn of the event loop).
            return self._receive_queued(messages, now, serve=False)
        count = len(messages)
        size = len(messages[0]) if count == 1 else sum(map(len, messages))
        if count > self._per_turn or count > 1 and size > self._bytes_per_turn:
            return self._receive_queued(messages, now, serve=True)
        # Answered now, as this connection's turn.
        self._full_turn = count >= self._per_turn or size >= self._bytes_per_turn
        if count == 1 and framer.error is None and self._answer_run is None:
            return self._handle(messages[0], now)
        out = self._handle_all(messages, now)
        if framer.error is not None and not self.closed:
            out += self._close_unframeable()
        return out

    @property
    def backlog(self) -> int:
        """Requests read but not answered yet: call `resume` on a later turn."""
        return len(self._queue)

    def resume(self, now: float) -> bytes:
        """Answer the next turn's worth of queued requests."""
        if self.closed:
            return b""
        out = self._serve_turn(now)
        if self.closed or self._framer.error is None:
            return out
        return out + self._serve_all_then_close(now)

    def on_timer(self, now: float) -> bytes:
        """Called at (or after) `next_deadline()`: watchdog, CER, DPA and idle timeouts."""
        if self.state is PeerState.WAIT_CER:
            if now >= self._connected_at + self.timers.cer_timeout:
                self._close("no CER within the CER timeout", logging.WARNING)
        elif self.state is PeerState.CLOSING:
            if now >= self._disconnect_sent_at + self.timers.disconnect_timeout:
                self._close("no DPA within the disconnect timeout", logging.INFO)
        elif self.state is PeerState.OPEN:
            idle = self.timers.idle_timeout
            if idle is not None and now >= self._last_request + idle and not self._queue:
                self.events.append((logging.INFO, f"{untrusted(self.peer_host)}: no request for "
                                    f"{idle:g} s: disconnecting an idle connection"))
                return self.disconnect(now, DisconnectCause.DO_NOT_WANT_TO_TALK_TO_YOU)
            sent = self._watchdog_sent_at
            if sent is not None and self._last_received < sent:
                if now >= sent + self._interval:
                    self._close("watchdog: no answer to our DWR within Tw", logging.WARNING)
            elif now >= self._last_received + self._interval:
                self._watchdog_sent_at = now
                self._interval = self._watchdog_interval()
                return self._request(COMMAND_DEVICE_WATCHDOG, self.answers.origin_state)
        return b""

    def next_deadline(self) -> float | None:
        if self.state is PeerState.WAIT_CER:
            return self._connected_at + self.timers.cer_timeout
        if self.state is PeerState.CLOSING:
            return self._disconnect_sent_at + self.timers.disconnect_timeout
        if self.state is PeerState.OPEN:
            sent = self._watchdog_sent_at
            if sent is not None and self._last_received < sent:
                deadline = sent + self._interval
            else:
                deadline = self._last_received + self._interval
            idle = self.timers.idle_timeout
            if idle is not None:
                return min(deadline, self._last_request + idle)
            return deadline
        return None

    def disconnect(self, now: float,
                   cause: DisconnectCause = DisconnectCause.REBOOTING) -> bytes:
        """Start an orderly close: DPR now, close on DPA or after the disconnect timeout."""
        if self.state is not PeerState.OPEN:
            self._close("closing connection (shutting down)", logging.INFO)
            return b""
        answers = []
        while self._queue and self.state is PeerState.OPEN:  # read before our DPR: answered
            answers.append(self._serve_turn(now))
        if self.state is not PeerState.OPEN:  # the queue held the peer's own DPR
            return b"".join(answers)
        self.state = PeerState.CLOSING
        self._disconnect_sent_at = now
        self.events.append((logging.INFO, f"sending DPR ({cause.name}) to "
                                          f"{untrusted(self.peer_host)}"))
        answers.append(self._request(COMMAND_DISCONNECT_PEER,
                                     self.dictionary.encode("Disconnect-Cause", int(cause))))
        return b"".join(answers)

    def connection_lost(self, reason: str = "peer closed the connection") -> None:
        if not self.closed:
            self._close(reason, logging.INFO)

    # -- internals -----------------------------------------------------------------------

    def _watchdog_interval(self) -> float:
        jitter = min(self.timers.watchdog_jitter, self.timers.watchdog / 4)
        return self.timers.watchdog + self.rng.uniform(-jitter, jitter)

    def _close(self, reason: str, level: int) -> None:
        self.state = PeerState.CLOSED
        self.closed_reason = reason
        who = untrusted(self.peer_host) if self.peer_host else "peer (before CER)"
        self.events.append((level, f"{who}: {reason}"))
        if self._queue:  # never to be answered: the connection is going away
            self.admission.queued_total -= len(self._queue)
            self.admission.queued_bytes_total -= self._queued_bytes
            self._queue.clear()
            self._queued_bytes = 0

    # -- turns and the queue (admission limits) ------------------------------------------

    def _receive_queued(self, messages: list[bytes], now: float, serve: bool) -> bytes:
        """Queue what was read, answering 3004 to application requests beyond the queue
        bounds; then, if `serve`, answer one turn's worth from the front of the queue.

        A read that finds requests queued already does not serve: the connection's next
        turn (`resume`) is pending, and one connection gets one turn per turn of the event
        loop however often it is read, so that a flooding peer cannot take two."""
        admission = self.admission
        queue = self._queue
        # What this turn answers is never refused; beyond it, up to the bounds wait.
        limit = self._per_turn + admission.max_queued_per_connection
        # Bytes are bounded whole (this turn's included): a turn ends at either bound.
        byte_limit = admission.max_queued_bytes_per_connection
        out = []
        size = sum(map(len, messages))
        if messages and not self._beyond_bounds(
                len(queue) + len(messages) - 1, self._queued_bytes + size - len(messages[-1]),
                admission.queued_total + len(messages) - 1,
                admission.queued_bytes_total + size - len(messages[-1])):
            # The bounds only grow as messages are queued: if the last of the read is within
            # them, all are, and the read is queued whole (the loop below would queue each).
            queue.extend(messages)
            self._queued_bytes += size
            admission.queued_total += len(messages)
            admission.queued_bytes_total += size
            messages = []
        for message in messages:
            if self._beyond_bounds(len(queue), self._queued_bytes, admission.queued_total,
                                   admission.queued_bytes_total):
                if self._refusable(message):
                    out.append(self._too_busy(message, now))
                    continue
                if len(queue) >= 2 * limit or self._queued_bytes >= 2 * byte_limit:
                    # Only a peer flooding base protocol messages (which are never refused)
                    # gets here: its queue must stay bounded all the same.
                    self._close(f"closing connection: {len(queue)} messages queued "
                                f"({self._queued_bytes} bytes), twice the most allowed",
                                logging.WARNING)
                    return b"".join(out)
            queue.append(message)
            self._queued_bytes += len(message)
            admission.queued_total += 1
            admission.queued_bytes_total += len(message)
        if len(queue) >= limit or self._queued_bytes >= byte_limit:
            self.reading = False
        if self._framer.error is not None:
            out.append(self._serve_all_then_close(now))
        elif serve:
            out.append(self._serve_turn(now))
        return b"".join(out)

    def _beyond_bounds(self, queued: int, queued_bytes: int, queued_total: int,
                       queued_bytes_total: int) -> bool:
        """Whether a message read when this connection has `queued` messages of
        `queued_bytes` bytes waiting (and all connections `queued_total`, of
        `queued_bytes_total`) is beyond this turn and beyond the queue bounds: one to refuse
        (3004) if it may be."""
        admission = self.admission
        per_turn = self._per_turn
        return (queued >= per_turn or queued_bytes >= self._bytes_per_turn) and (
            queued >= per_turn + admission.max_queued_per_connection
            or queued_bytes >= admission.max_queued_bytes_per_connection
            or queued_total >= admission.max_queued_total
            or queued_bytes_total >= admission.max_queued_bytes_total)

    def _serve_turn(self, now: float) -> bytes:
        """Answer queued requests until `requests_per_turn` of them or `bytes_per_turn`
        bytes of them are answered (whichever comes first; one at least)."""
        queue = self._queue
        admission = self.admission
        turn = []
        served_bytes, bytes_per_turn = 0, self._bytes_per_turn
        for message in islice(queue, self._per_turn):
            if served_bytes >= bytes_per_turn:
                break
            turn.append(message)
            served_bytes += len(message)
        served = len(turn)
        if served:  # (nothing queued: no admission, maybe)
            for _ in turn:
                queue.popleft()
            self._queued_bytes -= served_bytes
            admission.queued_total -= served
            admission.queued_bytes_total -= served_bytes
        # Taken off the queue first, then handled: should one close the connection, the rest
        # of the turn is dropped with the queue (_close), as if it had stayed queued.
        out = self._handle_all(turn, now)
        self._full_turn = served >= self._per_turn or served_bytes >= self._bytes_per_turn
        if not self.reading and (
                len(queue) <= admission.max_queued_per_connection // 2
                and self._queued_bytes <= admission.max_queued_bytes_per_connection // 2):
            self.reading = True
        if not queue and self._refused_in_episode:
            self.events.append((logging.INFO, f"{untrusted(self.peer_host)}: no longer "
                                f"overloaded; {self._refused_in_episode} request(s) were "
                                "answered 3004 DIAMETER_TOO_BUSY"))
            self._refused_in_episode = 0
        return out

    def _serve_all_then_close(self, now: float) -> bytes:
        """The stream cannot be framed any further: answer what came before, then close."""
        out = []
        while self._queue and not self.closed:
            out.append(self._serve_turn(now))
        if not self.closed:
            out.append(self._close_unframeable())
        return b"".join(out)

    def _close_unframeable(self) -> bytes:
        """Close a stream that cannot be framed further; a request of another Diameter
        version is answered 5011 DIAMETER_UNSUPPORTED_VERSION first (RFC 6733 §7.1.5), with
        the ids of its header (its AVPs may not be ours to read)."""
        framer = self._framer
        self._close(f"closing connection: {framer.error}", logging.WARNING)
        head = framer.unsupported_version_header
        if head is None or not head[4] & FLAG_REQUEST:
            return b""
        return self.answers.error(parse_header(head), None, ResultCode.UNSUPPORTED_VERSION,
                                  text=f"Diameter version {head[0]} is not supported: 1 is")

    def _refusable(self, raw: bytes) -> bool:
        """An application request on an open connection: one that may be answered 3004."""
        return (raw[4] & FLAG_REQUEST and raw[8:12] in self._application_ids
                and self.state is PeerState.OPEN)

    def _too_busy(self, raw: bytes, now: float) -> bytes:
        """A 3004 answer, as cheap as it can be: refusing must cost far less than answering
        (a flood is refused at ~1 µs a request, answered at ~18)."""
        self._last_request = now
        self.refused_busy += 1
        self.answered[ANSWERED_ERROR] += 1
        self.admission.refused_total += 1
        if self.counters is not None:  # a request received, though never handled
            self.counters.request(int.from_bytes(raw[5:8], "big"))
        if not self._refused_in_episode:
            self.events.append((logging.WARNING, f"{untrusted(self.peer_host)}: overloaded: "
                                f"{len(self._queue)} request(s) ({self._queued_bytes} bytes) "
                                "queued on this connection, "
                                f"{self.admission.queued_total} "
                                f"({self.admission.queued_bytes_total} bytes) on all: "
                                "answering 3004 DIAMETER_TOO_BUSY to more"))
        self._refused_in_episode += 1
        # The answer is the same for every request of a command but for the Session-Id and
        # the header's ids: the application builds the first one, the rest are assembled
        # from it (header words and Session-Id copied from the request).
        session_avp = _leading_session_avp(raw)
        key = raw[5:12] + (b"P" if raw[4] & FLAG_PROXIABLE else b"")  # command, application
        template = self._busy_templates.get(key)
        if template is None or session_avp is None:
            header = parse_header(raw)
            answer = self.applications[header.application].error_answer(
                header, _leading_session_id(raw, self.max_avps_per_message), TOO_BUSY)
            if session_avp is not None and answer[20:20 + len(session_avp)] == session_avp:
                self._busy_templates[key] = (answer[4:8], answer[20 + len(session_avp):])
            return answer
        if self.counters is not None:
            self.counters.answer(int.from_bytes(raw[5:8], "big"), ResultCode.TOO_BUSY)
        flags_and_code, rest = template
        length = 20 + len(session_avp) + len(rest)
        return _LENGTH_WORD.pack(0x01000000 | length) + flags_and_code + raw[8:20] + \
            session_avp + rest

    def _request(self, code: int, extra: bytes) -> bytes:
        hop_by_hop = self._next_hop_by_hop
        self._next_hop_by_hop = (hop_by_hop + 1) & 0xFFFFFFFF
        end_to_end = ((int(self.now) & 0xFFF) << 20) | self._next_end_to_end
        self._next_end_to_end = (self._next_end_to_end + 1) & 0xFFFFF
        return encode_message(FLAG_REQUEST, code, APPLICATION_COMMON, hop_by_hop, end_to_end,
                              self.answers.origin + extra)

    def _handle_all(self, messages: list[bytes], now: float) -> bytes:
        """Handle messages in order until the connection closes: runs of them by the fast
        path while the connection is open, the others one by one (`_handle`)."""
        answer_run = self._answer_run
        out = []
        index, count = 0, len(messages)
        while index < count:
            if answer_run is not None and self.state is PeerState.OPEN and self._held is None:
                answers, index = self._fast_answered(answer_run, messages, index, count, now)
                out.append(answers)
                if index == count:
                    break
            out.append(self._handle(messages[index], now))
            index += 1
            if self.closed:
                break
        return b"".join(out)

    def _fast_answered(self, answer_run: AnswerRun, messages: list[bytes], start: int,
                       end: int, now: float) -> tuple[bytes, int]:
        """The fast path's answers from messages[start], and where it stopped; and what
        `_handle` does per request it answers with the application (the request counted,
        the idle time restarted, the answer counted by outcome on this connection, the answer
        kept for retransmissions): in one place, for the whole run."""
        duplicates = self.duplicates
        out, stop, records = answer_run(messages, start, end, self.max_avps_per_message,
                                        duplicates is not None)
        if stop == start:
            return out, stop
        self._last_request = now
        run = messages[start:stop]
        # Counted per distinct value by list.count (C), then added once: not a dict bump
        # through Python per request.
        answered = self.answered
        statuses = list(map(_STATUS, map(_VERDICT, records)))
        for status, outcome in self._answer_outcomes.items():
            count = statuses.count(status)
            if count:
                answered[outcome] += count
        counters = self.counters
        if counters is not None:
            codes = list(map(_COMMAND_CODE, run))
            for code in set(codes):
                counters.request(int.from_bytes(code, "big"), codes.count(code))
        if duplicates is not None:
            duplicates.store_all(self._peer_key, run, list(map(_ORIGIN_HOST, records)),
                                 list(map(_ANSWER, records)), now)
        return out, stop

    def _handle(self, raw: bytes, now: float) -> bytes:
        held = self._held
        if held is not None:  # the CER's Origin-Host is being claimed: wait for it
            if len(held) < MAX_HELD_MESSAGES:
                held.append(raw)
            else:
                self._close(f"more than {MAX_HELD_MESSAGES} messages sent before the CEA",
                            logging.WARNING)
            return b""
        header = parse_header(raw)
        if not header.flags & FLAG_REQUEST:
            self._handle_answer(header, raw)
            return b""
        if self.counters is not None:
            self.counters.request(header.code)
        state = self.state
        if state is PeerState.WAIT_CER:
            if (header.application, header.code) != (APPLICATION_COMMON,
                                                     COMMAND_CAPABILITIES_EXCHANGE):
                self._close(f"request (command {header.code}, application "
                            f"{header.application}) before CER", logging.WARNING)
                return b""
        elif state is PeerState.CLOSED:
            return b""
        application = header.application
        if application == APPLICATION_COMMON:
            handler = None
        else:
            handler = self.applications.get(application)
            if handler is None:
                return self._protocol_error(header, raw, ResultCode.APPLICATION_UNSUPPORTED,
                                            f"application {application} is not supported")
        command = self.dictionary.command(application, header.code)
        if command is None:
            return self._protocol_error(header, raw, ResultCode.COMMAND_UNSUPPORTED,
                                        f"command {header.code} is not supported")
        if header.flags & FLAG_ERROR:
            return self._protocol_error(header, raw, ResultCode.INVALID_HDR_BITS,
                                        "E bit set in a request")
        if bool(header.flags & FLAG_PROXIABLE) != command.proxiable:
            return self._protocol_error(
                header, raw, ResultCode.INVALID_HDR_BITS,
                f"P bit must be {'set' if command.proxiable else 'clear'} in {command.name}")
        max_avps = self.max_avps_per_message
        try:
            avps = decode_avps(raw, 20, len(raw), max_avps)
        except AvpLengthError as exc:
            error = AvpError(ResultCode.INVALID_AVP_LENGTH,
                             self.dictionary.failed_for_length_error(exc), str(exc))
            return self._avp_error(header, handler, _session_id(exc.decoded), error)
        except AvpCountError as exc:
            error = AvpError(ResultCode.AVP_OCCURS_TOO_MANY_TIMES, exc.failed.encode(),
                             TOO_MANY_AVPS)
            return self._avp_error(header, handler, _session_id(exc.decoded), error)
        try:
            found = self.dictionary.validate(avps, command.request, budget=max_avps - len(avps))
        except AvpError as error:
            return self._avp_error(header, handler, _session_id(avps), error)
        if handler is not None:
            if state is not PeerState.OPEN:
                return b""  # CLOSING: we asked to disconnect, new work is not taken
            self._last_request = now
            duplicates = self.duplicates
            if duplicates is not None:
                # The same request from the same peer (eir.diameter.duplicates).
                origin = found.get("Origin-Host")
                identity, digest = request_keys(self._peer_key,
                                                origin[0].data if origin else b"", raw)
                if header.flags & FLAG_RETRANSMIT:
                    mismatches = duplicates.mismatches
                    answer = duplicates.answer_for(identity, digest, raw, now)
                    if answer is not None:
                        self.answered[ANSWERED_DUPLICATE] += 1
                        self.events.append((logging.INFO, f"{untrusted(self.peer_host)}: "
                                            "duplicate request (T flag, end-to-end id "
                                            f"{header.end_to_end:#010x}): answered as before"))
                        return answer
                    if duplicates.mismatches != mismatches:
                        self.events.append((logging.WARNING,
                                            f"{untrusted(self.peer_host)}: T-flag request "
                                            "with end-to-end id "
                                            f"{header.end_to_end:#010x} differs from the "
                                            "request answered under that id: answered anew"))
            session_id = found["Session-Id"][0] if "Session-Id" in found else None
            try:
                answer, outcome = handler.handle_request(header, command, found)
            except AvpError as error:  # the application's own checks of AVP values
                return self._avp_error(header, handler, session_id, error)
            except Exception as exc:  # noqa: BLE001 - one request must not cost the link
                self.events.append((logging.ERROR, f"{untrusted(self.peer_host)}: answering 5012 "
                                    f"UNABLE_TO_COMPLY: {type(exc).__name__}: {untrusted(exc)}"))
                self.answered[ANSWERED_ERROR] += 1
                return handler.error_answer(header, session_id, AvpError(
                    ResultCode.UNABLE_TO_COMPLY, None, "internal error"))
            self.answered[outcome] += 1
            if duplicates is not None:
                duplicates.store(identity, digest, answer, now)
            return answer
        if header.code == COMMAND_DEVICE_WATCHDOG:
            return self._answer(header, ResultCode.SUCCESS, self.answers.origin_state)
        if header.code == COMMAND_DISCONNECT_PEER:
            answer = self._answer(header, ResultCode.SUCCESS)
            cause = int.from_bytes(found["Disconnect-Cause"][0].data, "big")
            self._close(f"peer sent DPR (Disconnect-Cause {_disconnect_cause_name(cause)}); "
                        "DPA sent", logging.INFO)
            return answer
        return self._handle_cer(header, found)

    def _handle_answer(self, header: Header, raw: bytes) -> None:
        if self.state is PeerState.WAIT_CER:
            self._close("answer received before CER", logging.WARNING)
        elif header.application == APPLICATION_COMMON:
            if header.code == COMMAND_DISCONNECT_PEER and self.state is PeerState.CLOSING:
                self._close("DPA received", logging.INFO)
            elif header.code == COMMAND_DEVICE_WATCHDOG:
                self.events.append((logging.DEBUG, f"{untrusted(self.peer_host)}: DWA received"))

    def _answer(self, header: Header, code: ResultCode, extra: bytes = b"") -> bytes:
        if self.counters is not None:
            self.counters.answer(header.code, code)
        body = self.answers.result_code(code) + self.answers.origin + extra
        return encode_message(header.flags & FLAG_PROXIABLE, header.code, header.application,
                              header.hop_by_hop, header.end_to_end, body)

    def _protocol_error(self, header: Header, raw: bytes, code: ResultCode,
                        text: str) -> bytes:
        session_id = _leading_session_id(raw, self.max_avps_per_message)
        if header.application in self.applications:
            self.answered[ANSWERED_ERROR] += 1
        self.events.append((logging.INFO, f"{untrusted(self.peer_host)}: answering "
                            f"{code.value} "
                            f"{code.name}: {text}"))
        return self.answers.error(header, session_id, code, text=text)

    def _avp_error(self, header: Header, handler: Application | None, session_id: Avp | None,
                   error: AvpError) -> bytes:
        self.events.append((logging.INFO, f"{untrusted(self.peer_host)}: answering "
                            f"{error.result_code.value} {error.result_code.name}: "
                            f"{untrusted(error.text)}"))
        if handler is not None:
            self.answered[ANSWERED_ERROR] += 1
            return handler.error_answer(header, session_id, error)
        if header.code == COMMAND_CAPABILITIES_EXCHANGE:
            answer = self._capabilities_answer(header, error.result_code, error.failed_avp,
                                               error.text)
            self._close(f"CER refused with {error.result_code.value}: {untrusted(error.text)}",
                        logging.WARNING)
            return answer
        return self.answers.error(header, session_id, error.result_code, error.failed_avp,
                                  error.text)

    def _handle_cer(self, header: Header, found: AvpIndex) -> bytes:
        host = found["Origin-Host"][0].data.decode()
        realm = found["Origin-Realm"][0].data.decode()
        refusal = self._identity_refusal(host, realm)
        if refusal is not None:
            # The peer learns only that it is unknown; the log says what did not match.
            answer = self._capabilities_answer(header, ResultCode.UNKNOWN_PEER,
                                               text="unknown peer")
            self.peer_host = host
            self._close(f"CER refused with 3010 DIAMETER_UNKNOWN_PEER: {untrusted(refusal)}",
                        logging.WARNING)
            return answer
        advertised = set()
        for name in ("Auth-Application-Id", "Acct-Application-Id"):
            advertised.update(int.from_bytes(a.data, "big") for a in found.get(name, ()))
        for group in found.groups.get("Vendor-Specific-Application-Id", ()):
            for name in ("Auth-Application-Id", "Acct-Application-Id"):
                advertised.update(int.from_bytes(a.data, "big") for a in group.get(name, ()))
        ours = set(self.applications)
        if not (advertised & ours or APPLICATION_RELAY in advertised):
            answer = self._capabilities_answer(
                header, ResultCode.NO_COMMON_APPLICATION,
                text=f"no common application: peer offers {sorted(advertised)}, "
                     f"we serve {sorted(ours)}")
            self.peer_host = host
            self._close("CER refused with 5010 DIAMETER_NO_COMMON_APPLICATION "
                        f"(peer offers {sorted(advertised)})", logging.WARNING)
            return answer
        if self.state is PeerState.CLOSING:
            # Our DPR is out: reopening now would forget the disconnect we asked for.
            self.events.append((logging.INFO,
                                f"{untrusted(host)}: CER while we are disconnecting"))
            return self._capabilities_answer(header, ResultCode.UNABLE_TO_COMPLY,
                                             text="disconnecting")
        if self.state is PeerState.OPEN:
            if host.lower() != self.peer_host.lower():
                # The identity was claimed (and the duplicate cache keyed) under the first.
                self.events.append((logging.WARNING,
                                    f"{untrusted(self.peer_host)}: CER repeated on an open "
                                    f"connection with another Origin-Host, {untrusted(host)}: "
                                    "refused with 5012, the connection stays as it was"))
                return self._capabilities_answer(
                    header, ResultCode.UNABLE_TO_COMPLY,
                    text="Origin-Host cannot change on an open connection")
            self.events.append((logging.INFO,
                                f"{untrusted(host)}: CER repeated on an open connection"))
        elif self.claims_identity:
            self.peer_host, self.peer_realm = host, realm
            self.claiming = host
            self._claimed_cer = header
            self._held = []
            self.reading = False  # until it is decided: what is held stays one read at most
            self.events.append((logging.DEBUG, f"{untrusted(host)}: CER accepted, claiming its "
                                "Origin-Host"))
            return b""
        self.peer_host, self.peer_realm = host, realm
        return self._open(header)

    def claim_decided(self, refusal: str | None, now: float) -> bytes:
        """The caller's answer to `claiming`: None, open (CEA 2001, then the messages read
        meanwhile); else refuse with CEA 5012 DIAMETER_UNABLE_TO_COMPLY (RFC 6733 §5.6:
        R-Conn-CER in R-Open is R-Reject) and close, `refusal` saying why in the log."""
        header, held = self._claimed_cer, self._held
        self.claiming = self._claimed_cer = self._held = None
        self.reading = True
        if self.closed:
            return b""
        if refusal is not None:
            answer = self._capabilities_answer(header, ResultCode.UNABLE_TO_COMPLY,
                                               text="Origin-Host already connected")
            self._close(f"CER refused with 5012 DIAMETER_UNABLE_TO_COMPLY: {refusal}",
                        logging.WARNING)
            return answer
        return self._open(header) + self._handle_all(held, now)

    def _open(self, header: Header) -> bytes:
        self.state = PeerState.OPEN
        # Its requests' identity in the duplicate cache starts with this.
        self._peer_key = self.peer_host.lower().encode() + b"\0"
        self._last_request = self._last_received  # the idle time counts from here
        self.events.append((logging.INFO, f"peer {untrusted(self.peer_host)} (realm "
                            f"{untrusted(self.peer_realm)}) is open"))
        return self._capabilities_answer(header, ResultCode.SUCCESS)

    def _identity_refusal(self, host: str, realm: str) -> str | None:
        """Why this Origin-Host/Realm may not open a connection here; None if it may."""
        allowlist = self.allowlist
        if allowlist:
            refusal = allowlist.refusal(host, realm, self.remote_address)
            if refusal is not None:
                return refusal
        names = self.certificate_names
        if names is not None and host.lower() not in names:
            return (f"Origin-Host {host} is not a name its TLS certificate was issued to "
                    f"({', '.join(names) or 'none'})")
        return None

    def _capabilities_answer(self, header: Header, code: ResultCode,
                             failed_avp: bytes | None = None, text: str | None = None) -> bytes:
        encode = self.dictionary.encode
        parts = [self.answers.result_code(code), self.answers.origin]
        for address in self.local.host_ip_addresses or self.local_addresses:
            parts.append(encode("Host-IP-Address", address))
        parts.append(encode("Vendor-Id", self.local.vendor_id))
        parts.append(encode("Product-Name", self.local.product_name))
        parts.append(self.answers.origin_state)
        if text:
            parts.append(encode("Error-Message", text[:200]))
        if failed_avp is not None:
            parts.append(encode("Failed-AVP", [failed_avp]))
        vendors = sorted({app.vendor_id for app in self.applications.values()} - {0})
        for vendor in vendors:
            parts.append(encode("Supported-Vendor-Id", vendor))
        for application in self.applications.values():
            parts.append(encode("Auth-Application-Id", application.application_id))
            if application.vendor_id:
                parts.append(encode("Vendor-Specific-Application-Id", [
                    encode("Vendor-Id", application.vendor_id),
                    encode("Auth-Application-Id", application.application_id)]))
        parts.append(encode("Firmware-Revision", self.local.firmware_revision))
        flags = FLAG_ERROR if ResultCode(code).is_protocol_error else 0
        if self.counters is not None:
            self.counters.answer(header.code, code)
        return encode_message(flags, header.code, header.application, header.hop_by_hop,
                              header.end_to_end, b"".join(parts))


def _session_id(avps: list[Avp]) -> Avp | None:
    for avp in avps:
        if avp.code == SESSION_ID_CODE and not avp.vendor:
            return avp
    return None


def _leading_session_avp(raw: bytes) -> bytes | None:
    """The request's first AVP when it is a Session-Id encoded as we would encode it in an
    answer (M flag only, zero padding): copied into a 3004 answer as it is. Else None."""
    if raw[20:24] != _SESSION_ID_HEADER or len(raw) < 28 or raw[24] != AVP_FLAG_MANDATORY:
        return None
    length = int.from_bytes(raw[25:28], "big")
    end = 20 + ((length + 3) & ~3)
    if length < 8 or end > len(raw) or raw[20 + length:end].strip(b"\0"):
        return None
    return raw[20:end]


def _leading_session_id(raw: bytes, max_avps: int) -> Avp | None:
    """The Session-Id of a request without decoding the rest: RFC 6733 §8.8 puts it first.
    A request that does not is decoded, up to its first `max_avps` AVPs."""
    if raw[20:24] == _SESSION_ID_HEADER and len(raw) >= 28 and not raw[24] & 0x80:
        length = int.from_bytes(raw[25:28], "big")
        if 8 <= length <= len(raw) - 20:
            return Avp(SESSION_ID_CODE, raw[24], 0, raw[28:20 + length])
    try:
        return _session_id(decode_avps(raw, 20, len(raw), max_avps))
    except (AvpLengthError, AvpCountError) as exc:
        return _session_id(exc.decoded)


def _disconnect_cause_name(value: int) -> str:
    """REBOOTING, BUSY, DO_NOT_WANT_TO_TALK_TO_YOU (RFC 6733 §5.4.3), or the number of a
    value RFC 6733 does not define (the Enumerated may be extended)."""
    try:
        return f"{DisconnectCause(value).name} ({value})"
    except ValueError:
        return str(value)
