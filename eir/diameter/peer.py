"""The Diameter peer state machine of one connection, responder side (RFC 6733 §5, RFC 3539).

Sans-IO: `receive(data, now)` and `on_timer(now)` return the bytes to send; the caller owns
the socket and the clock. After each call the caller drains `events` (log records) and, when
`closed` is set, writes what was returned and closes the transport.

States: WAIT_CER (connected, nothing else allowed) → OPEN → CLOSING (our DPR sent) → CLOSED.
"""

from __future__ import annotations

import enum
import logging
import random
from dataclasses import dataclass, field
from typing import Protocol

from eir.diameter.codec import (Avp, AvpLengthError, Framer, Header,
                                decode_avps, encode_avp, encode_message, parse_header)
from eir.diameter.constants import (APPLICATION_COMMON, APPLICATION_RELAY,
                                    AVP_FLAG_MANDATORY, COMMAND_CAPABILITIES_EXCHANGE,
                                    COMMAND_DEVICE_WATCHDOG, COMMAND_DISCONNECT_PEER,
                                    FLAG_ERROR, FLAG_PROXIABLE, FLAG_REQUEST, DisconnectCause,
                                    ResultCode)
from eir.diameter.dictionary import AvpError, AvpIndex, CommandDef, Dictionary

SESSION_ID_CODE = 263


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

    def handle_request(self, header: Header, command: CommandDef, avps: AvpIndex) -> bytes:
        """The answer to a validated request; raises AvpError when a value the
        application checks itself is wrong (the peer then logs and calls error_answer)."""
        ...

    def error_answer(self, header: Header, session_id: Avp | None, error: AvpError) -> bytes: ...


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


class AnswerBuilder:
    """Encodes the answers the base protocol needs, with our identity filled in."""

    def __init__(self, dictionary: Dictionary, local: LocalIdentity):
        self.dictionary = dictionary
        self.local = local
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
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.state = PeerState.WAIT_CER
        self.peer_host: str | None = None
        self.peer_realm: str | None = None
        self.events: list[tuple[int, str]] = []
        self.closed_reason: str | None = None
        self.answers = AnswerBuilder(self.dictionary, self.local)
        self._framer = Framer(self.max_message_bytes)
        self._connected_at = self.now
        self._last_received = self.now
        self._watchdog_sent_at: float | None = None
        self._disconnect_sent_at: float | None = None
        self._next_hop_by_hop = self.rng.getrandbits(32)
        self._next_end_to_end = self.rng.getrandbits(20)
        self._interval = self._watchdog_interval()

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
        if len(messages) == 1 and framer.error is None:
            return self._handle(messages[0], now)
        out = []
        for message in messages:
            out.append(self._handle(message, now))
            if self.closed:
                break
        if framer.error is not None and not self.closed:
            self._close(f"closing connection: {framer.error}", logging.WARNING)
        return b"".join(out)

    def on_timer(self, now: float) -> bytes:
        """Called at (or after) `next_deadline()`: watchdog, CER and DPA timeouts."""
        if self.state is PeerState.WAIT_CER:
            if now >= self._connected_at + self.timers.cer_timeout:
                self._close("no CER within the CER timeout", logging.WARNING)
        elif self.state is PeerState.CLOSING:
            if now >= self._disconnect_sent_at + self.timers.disconnect_timeout:
                self._close("no DPA within the disconnect timeout", logging.INFO)
        elif self.state is PeerState.OPEN:
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
                return sent + self._interval
            return self._last_received + self._interval
        return None

    def disconnect(self, now: float,
                   cause: DisconnectCause = DisconnectCause.REBOOTING) -> bytes:
        """Start an orderly close: DPR now, close on DPA or after the disconnect timeout."""
        if self.state is not PeerState.OPEN:
            self._close("closing connection (shutting down)", logging.INFO)
            return b""
        self.state = PeerState.CLOSING
        self._disconnect_sent_at = now
        self.events.append((logging.INFO, f"sending DPR ({cause.name}) to {self.peer_host}"))
        return self._request(COMMAND_DISCONNECT_PEER,
                             self.dictionary.encode("Disconnect-Cause", int(cause)))

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
        who = self.peer_host or "peer (before CER)"
        self.events.append((level, f"{who}: {reason}"))

    def _request(self, code: int, extra: bytes) -> bytes:
        hop_by_hop = self._next_hop_by_hop
        self._next_hop_by_hop = (hop_by_hop + 1) & 0xFFFFFFFF
        end_to_end = ((int(self.now) & 0xFFF) << 20) | self._next_end_to_end
        self._next_end_to_end = (self._next_end_to_end + 1) & 0xFFFFF
        return encode_message(FLAG_REQUEST, code, APPLICATION_COMMON, hop_by_hop, end_to_end,
                              self.answers.origin + extra)

    def _handle(self, raw: bytes, now: float) -> bytes:
        header = parse_header(raw)
        if not header.flags & FLAG_REQUEST:
            self._handle_answer(header, raw)
            return b""
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
        try:
            avps = decode_avps(raw, 20, len(raw))
        except AvpLengthError as exc:
            error = AvpError(ResultCode.INVALID_AVP_LENGTH,
                             self.dictionary.failed_for_length_error(exc), str(exc))
            return self._avp_error(header, handler, _session_id(exc.decoded), error)
        try:
            found = self.dictionary.validate(avps, command.request)
        except AvpError as error:
            return self._avp_error(header, handler, _session_id(avps), error)
        if handler is not None:
            if state is not PeerState.OPEN:
                return b""  # CLOSING: we asked to disconnect, new work is not taken
            session_id = found["Session-Id"][0] if "Session-Id" in found else None
            try:
                return handler.handle_request(header, command, found)
            except AvpError as error:  # the application's own checks of AVP values
                return self._avp_error(header, handler, session_id, error)
            except Exception as exc:  # noqa: BLE001 - one request must not cost the link
                self.events.append((logging.ERROR, f"{self.peer_host}: answering 5012 "
                                    f"UNABLE_TO_COMPLY: {type(exc).__name__}: {exc}"))
                return handler.error_answer(header, session_id, AvpError(
                    ResultCode.UNABLE_TO_COMPLY, None, "internal error"))
        if header.code == COMMAND_DEVICE_WATCHDOG:
            return self._answer(header, ResultCode.SUCCESS, self.answers.origin_state)
        if header.code == COMMAND_DISCONNECT_PEER:
            answer = self._answer(header, ResultCode.SUCCESS)
            cause = found["Disconnect-Cause"][0].data
            self._close(f"peer sent DPR (Disconnect-Cause {int.from_bytes(cause, 'big')}); "
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
                self.events.append((logging.DEBUG, f"{self.peer_host}: DWA received"))

    def _answer(self, header: Header, code: ResultCode, extra: bytes = b"") -> bytes:
        body = self.answers.result_code(code) + self.answers.origin + extra
        return encode_message(header.flags & FLAG_PROXIABLE, header.code, header.application,
                              header.hop_by_hop, header.end_to_end, body)

    def _protocol_error(self, header: Header, raw: bytes, code: ResultCode,
                        text: str) -> bytes:
        try:
            session_id = _session_id(decode_avps(raw, 20, len(raw)))
        except AvpLengthError as exc:
            session_id = _session_id(exc.decoded)
        self.events.append((logging.INFO, f"{self.peer_host}: answering {code.value} "
                            f"{code.name}: {text}"))
        return self.answers.error(header, session_id, code, text=text)

    def _avp_error(self, header: Header, handler: Application | None, session_id: Avp | None,
                   error: AvpError) -> bytes:
        self.events.append((logging.INFO, f"{self.peer_host}: answering "
                            f"{error.result_code.value} {error.result_code.name}: {error.text}"))
        if handler is not None:
            return handler.error_answer(header, session_id, error)
        if header.code == COMMAND_CAPABILITIES_EXCHANGE:
            answer = self._capabilities_answer(header, error.result_code, error.failed_avp,
                                               error.text)
            self._close(f"CER refused with {error.result_code.value}: {error.text}",
                        logging.WARNING)
            return answer
        return self.answers.error(header, session_id, error.result_code, error.failed_avp,
                                  error.text)

    def _handle_cer(self, header: Header, found: AvpIndex) -> bytes:
        host = found["Origin-Host"][0].data.decode()
        realm = found["Origin-Realm"][0].data.decode()
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
            self.events.append((logging.INFO, f"{host}: CER while we are disconnecting"))
            return self._capabilities_answer(header, ResultCode.UNABLE_TO_COMPLY,
                                             text="disconnecting")
        if self.state is PeerState.OPEN:
            self.events.append((logging.INFO, f"{host}: CER repeated on an open connection"))
        self.peer_host, self.peer_realm = host, realm
        self.state = PeerState.OPEN
        self.events.append((logging.INFO, f"peer {host} (realm {realm}) is open"))
        return self._capabilities_answer(header, ResultCode.SUCCESS)

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
        return encode_message(flags, header.code, header.application, header.hop_by_hop,
                              header.end_to_end, b"".join(parts))


def _session_id(avps: list[Avp]) -> Avp | None:
    for avp in avps:
        if avp.code == SESSION_ID_CODE and not avp.vendor:
            return avp
    return None
