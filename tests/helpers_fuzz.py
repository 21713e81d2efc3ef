"""Fuzz targets on the codec, on the whole Diameter connection handler, on the S13 fast path
(against the generic path: tests/helpers_fast_path.py) and on the N5g-eir HTTP/2 connection
(eir.interfaces.sbi.SbiSession), and the properties they check. One input is plain
bytes, so the same target runs under atheris (tests/fuzz/run.py, coverage-guided), under
hypothesis (tests/test_fuzz.py) and on the corpus (tests/fuzz/corpus/).

Input layout (every target): two control bytes, then the stream as the peer would send it.
  byte 0, codec: bit 0 → Framer max_length 1024 (else 65536); bits 1-7 → which grammar the
          bare AVP list is validated against.
  byte 0, peer: bit 0 → a valid CER is received first (the connection is open); bit 1 →
          admission limits (small turns and queues, in requests and bytes: the 3004 and
          backlog paths); bit 2 →
          duplicate detection; bit 3 → idle timeout; bits 4-5 → clock step between chunks
          (0, 0.5 s, 11 s: past the CER timeout, 31 s: past Tw); bit 6 → max_message_bytes
          1024 (else 65536); bit 7 → the fuzzed bytes come before the CER (when bit 0).
  byte 0, h2: bit 0 → small limits (2 frames per turn, 2 streams, 1 KiB header lists, 5
          resets and 5 control frames per second, 1 s of burst); bit 1 → the client preface
          (magic, SETTINGS, WINDOW_UPDATE) comes first; bits 2-3 → clock step between
          chunks (0, 0.5 s, 11 s: past the preface timeout, 301 s: past the idle timeout).
  byte 1: the stream is fed in chunks of this many bytes (0: whole).
  fast_path: the S13 fast path against the generic path, same layout, bits of its own:
          tests/helpers_fast_path.py.

A property that does not hold raises AssertionError; any other exception is a crash. Neither
target catches anything: whatever escapes is a finding.
"""

from __future__ import annotations

import logging

from h2.errors import ErrorCodes
from hpack import Decoder
from hyperframe.frame import (ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame,
                              RstStreamFrame, SettingsFrame)

from eir.check.service import EquipmentCheck
from eir.core.config import SbiSettings
from eir.diameter.codec import AvpLengthError, Framer, decode_avps, parse_header
from eir.diameter.constants import APPLICATION_S13, FLAG_ERROR, FLAG_REQUEST, HEADER_LENGTH
from eir.diameter.dictionary import AvpError
from eir.diameter.duplicates import DuplicateCache
from eir.diameter.peer import PeerConnection, PeerState, Timers
from eir.diameter.overload import Admission
from eir.interfaces.s13 import S13Application
from eir.interfaces.sbi import (CLIENT_PREFACE, FRAME_HEADER_BYTES, MAX_FRAME_BYTES,
                     EquipmentIdentityCheck, N5gEir, SbiCounters, SbiSession)

import helpers_fast_path
import test_peer_state as sans_io

D = sans_io.D
SMALL_MAX, DEFAULT_MAX = 1024, 65536  # 1024 is the least config.py allows
# Every grammar the dictionary holds: commands' requests and answers, and Grouped AVPs.
GRAMMARS = [g for c in D.commands.values() for g in (c.request, c.answer)] + [
    a.grammar for a in D.avps.values() if a.grammar is not None]
# A chunked stream calls on_timer and resume a bounded number of times per chunk: a loop
# that did not converge would be a hang, reported as such rather than spinning.
MAX_RESUMES_PER_CHUNK = 10_000
FINAL_TIMER_CALLS = 4


def chunks_of(stream: bytes, size: int) -> list[bytes]:
    if not size or size >= len(stream):
        return [stream]
    return [stream[i:i + size] for i in range(0, len(stream), size)]


# -- properties ----------------------------------------------------------------------------

def check_framed(message: bytes, max_length: int) -> None:
    """A message the Framer returned: version 1, a length that is its size, within bounds."""
    assert message[0] == 1
    length = parse_header(message).length
    assert length == len(message) and HEADER_LENGTH <= length <= max_length and not length & 3


def check_framer_buffer(framer: Framer, max_length: int) -> None:
    """What the Framer holds back is part of one message it has not seen whole yet, so less
    than max_length: a declared length is never allocated before its bytes arrive."""
    assert framer.buffered < max_length, (framer.buffered, max_length)
    assert framer.error is None or framer.buffered == 0


def check_avp_error(error: AvpError) -> None:
    """The Failed-AVP an error answer will carry is itself one well-formed AVP."""
    if error.failed_avp is not None:
        assert len(decode_avps(error.failed_avp, 0, len(error.failed_avp))) == 1


def decode_and_validate(body: bytes, start: int, grammar) -> None:
    """decode_avps then Dictionary.validate: only AvpLengthError and AvpError may come out."""
    try:
        avps = decode_avps(body, start, len(body))
    except AvpLengthError as exc:
        assert start <= len(body)
        check_avp_error(AvpError(5014, D.failed_for_length_error(exc), str(exc)))
        return
    try:
        D.validate(avps, grammar)
    except AvpError as error:
        check_avp_error(error)


def sent_messages(out: bytes) -> list[bytes]:
    """What the peer wrote: whole Diameter messages, each decodable to AVPs and, when the
    dictionary knows its command, valid against that command's grammar."""
    if not out:
        return []
    framer = Framer(max_length=0xFFFFFF)
    messages = framer.feed(out)
    assert framer.error is None and framer.buffered == 0, framer.error
    for message in messages:
        header = parse_header(message)
        assert header.length == len(message)
        avps = decode_avps(message, HEADER_LENGTH, len(message))
        # Failed-AVP holds the offending AVP as received: framed AVPs, values unchecked.
        failed = [a for a in avps if (a.code, a.vendor) == _FAILED_AVP]
        for avp in failed:
            assert decode_avps(avp.data, 0, len(avp.data))
        avps = [a for a in avps if (a.code, a.vendor) != _FAILED_AVP]
        command = D.command(header.application, header.code)
        results = [a for a in avps if (a.code, a.vendor) == _RESULT_CODE]
        if header.flags & FLAG_ERROR or any(int.from_bytes(r.data, "big") >= 3000
                                            for r in results):
            check_error_answer(header, avps)
        elif command is not None:
            D.validate(avps, command.request if header.is_request else command.answer)
    return messages


_RESULT_CODE, _ORIGIN_HOST, _ORIGIN_REALM, _FAILED_AVP = (
    (D[name].code, D[name].vendor)
    for name in ("Result-Code", "Origin-Host", "Origin-Realm", "Failed-AVP"))


def check_error_answer(header, avps) -> None:
    """An error answer follows RFC 6733 §7.2's answer-message grammar, not the command's
    (a request without Session-Id gets an answer without one): Origin-Host, Origin-Realm and
    one Result-Code, the E bit set for 3xxx codes only."""
    assert not header.is_request
    found = [(a.code, a.vendor) for a in avps]
    for key in (_RESULT_CODE, _ORIGIN_HOST, _ORIGIN_REALM):
        assert found.count(key) == 1, (key, found)
    [result] = [a for a in avps if (a.code, a.vendor) == _RESULT_CODE]
    assert len(result.data) == 4
    code = int.from_bytes(result.data, "big")
    assert bool(header.flags & FLAG_ERROR) == (3000 <= code < 4000), (header.flags, code)


# -- targets -------------------------------------------------------------------------------

def fuzz_codec(data: bytes) -> None:
    """Framer.feed in chunks, then each framed message and the bare stream as AVP lists."""
    if len(data) < 2:
        return
    control, chunk_size, stream = data[0], data[1], data[2:]
    max_length = SMALL_MAX if control & 1 else DEFAULT_MAX
    framer = Framer(max_length)
    for chunk in chunks_of(stream, chunk_size):
        for message in framer.feed(chunk):
            check_framed(message, max_length)
            header = parse_header(message)
            command = D.command(header.application, header.code)
            if command is not None:
                grammar = command.request if header.is_request else command.answer
            else:
                grammar = GRAMMARS[header.code % len(GRAMMARS)]
            decode_and_validate(message, HEADER_LENGTH, grammar)
        check_framer_buffer(framer, max_length)
    decode_and_validate(stream, 0, GRAMMARS[(control >> 1) % len(GRAMMARS)])


# Stateless between requests (no observation log, counters or audit): one serves every input,
# which saves a fifth of the time per input.
_APPLICATION = S13Application(D, sans_io.LOCAL, EquipmentCheck(sans_io.RULE_SET))


def new_fuzz_peer(control: int) -> PeerConnection:
    admission = (Admission(requests_per_turn=2, max_queued_per_connection=4,
                           max_queued_total=8, bytes_per_turn=600,
                           max_queued_bytes_per_connection=1200,
                           max_queued_bytes_total=2400) if control & 2 else None)
    return PeerConnection(
        D, sans_io.LOCAL, {APPLICATION_S13: _APPLICATION}, now=0.0,
        local_addresses=("127.0.0.1",),
        timers=Timers(watchdog=sans_io.TW, watchdog_jitter=0, cer_timeout=sans_io.CER_TIMEOUT,
                      disconnect_timeout=sans_io.DPA_TIMEOUT,
                      idle_timeout=5.0 if control & 8 else None),
        max_message_bytes=SMALL_MAX if control & 64 else DEFAULT_MAX,
        duplicates=DuplicateCache(60.0, 100, 1 << 20) if control & 4 else None,
        admission=admission)


_CLOCK_STEPS = (0.0, 0.5, sans_io.CER_TIMEOUT + 1, sans_io.TW + 1)
_VALID_CER = sans_io.cer(APPLICATION_S13)


class _PeerRun:
    """One connection driven through chunks and timers, with what it wrote checked."""

    def __init__(self, control: int):
        self.peer = new_fuzz_peer(control)
        self.max_length = self.peer.max_message_bytes
        self.mirror = Framer(self.max_length)  # the requests the peer can have framed
        self.requests = 0
        self.answers = 0
        self.now = 0.0

    def receive(self, chunk: bytes) -> None:
        peer = self.peer
        for message in self.mirror.feed(chunk):
            self.requests += bool(message[4] & FLAG_REQUEST)
        self.answered(peer.receive(chunk, self.now))
        for _ in range(MAX_RESUMES_PER_CHUNK):
            if not peer.backlog:
                break
            self.answered(peer.resume(self.now))
        else:
            raise AssertionError(f"backlog of {peer.backlog} not served")
        check_framer_buffer(peer._framer, self.max_length)  # the peer's own Framer

    def answered(self, out: bytes) -> None:
        for message in sent_messages(out):
            assert not message[4] & FLAG_REQUEST, "a request sent in reply to a read"
            self.answers += 1

    def timer(self) -> None:
        peer = self.peer
        deadline = peer.next_deadline()
        if deadline is not None and self.now >= deadline:
            for message in sent_messages(peer.on_timer(self.now)):
                assert message[4] & FLAG_REQUEST  # DWR, DPR: our own requests

    def check_end(self) -> None:
        peer = self.peer
        if peer.closed:
            assert peer.closed_reason, "closed without a reason"
        elif peer.state is not PeerState.CLOSING and self.mirror.error is None:
            # Open (or still waiting for CER): every request read got exactly one answer.
            assert self.answers == self.requests, (self.answers, self.requests)
        for level, text in peer.events:
            assert isinstance(level, int) and isinstance(text, str)


def fuzz_peer(data: bytes) -> None:
    """PeerConnection fed the stream in chunks, the clock moving and timers firing between."""
    if len(data) < 2:
        return
    control, chunk_size, stream = data[0], data[1], data[2:]
    run = _PeerRun(control)
    step = _CLOCK_STEPS[(control >> 4) & 3]
    pieces = chunks_of(stream, chunk_size)
    if control & 1:
        pieces = pieces + [_VALID_CER] if control & 128 else [_VALID_CER] + pieces
    for piece in pieces:
        if run.peer.closed:
            break
        run.receive(piece)
        run.now += step
        run.timer()
    for _ in range(FINAL_TIMER_CALLS):  # CER timeout, DWR, no DWA, DPA timeout
        deadline = run.peer.next_deadline()
        if deadline is None:
            break
        run.now = max(run.now, deadline)
        run.timer()
    run.check_end()


# -- the N5g-eir HTTP/2 connection -----------------------------------------------------------

# The service on the lists the peer target uses (the server is only where it reads them).
_CHECK = EquipmentIdentityCheck(EquipmentCheck(sans_io.RULE_SET), SbiCounters())
_H2_CONFIG = N5gEir.h2_configuration()
_H2_SMALL = SbiSettings(frames_per_turn=2, max_concurrent_streams=2,
                        max_header_list_bytes=1024, max_resets_per_second=5,
                        max_control_frames_per_second=5, flood_burst_seconds=1)
_H2_DEFAULT = SbiSettings()
# Magic, SETTINGS (empty), the connection window opened to its most.
H2_CLIENT_START = (CLIENT_PREFACE + bytes.fromhex("000000040000000000") +
                   bytes.fromhex("0000040800000000007fff0000"))
_H2_CLOCK_STEPS = (0.0, 0.5, _H2_DEFAULT.preface_timeout_seconds + 1,
                   _H2_DEFAULT.idle_timeout_seconds + 1)


class H2Run:
    """One SbiSession driven through chunks, turns and timers; what it wrote is checked as
    a client would read it: whole frames, none longer than a client accepts by default, the
    HEADERS decodable in order (one HPACK context), nothing after a GOAWAY, and a GOAWAY
    last whenever the session closed the connection itself."""

    def __init__(self, control: int):
        self.settings = _H2_SMALL if control & 1 else _H2_DEFAULT
        self.session = SbiSession(_CHECK, self.settings, _H2_CONFIG, b"fuzz", 0.0)
        self.now = 0.0
        self.decoder = Decoder()
        # Our encoder's table follows the client's SETTINGS_HEADER_TABLE_SIZE, which may
        # change several times within one chunk: not checked here (h2's business); what is
        # checked is that the blocks decode, in order.
        self.decoder.max_allowed_table_size = 2**32
        self.statuses: list[bytes] = []  # :status of every answer
        self.resets: list[int] = []  # RST_STREAM error codes
        self.goaway: int | None = None  # its error code
        self.wrote(self.session.start())

    def receive(self, chunk: bytes) -> None:
        session = self.session
        self.wrote(session.receive(chunk, self.now))
        for _ in range(MAX_RESUMES_PER_CHUNK):
            if not session.waiting:
                break
            self.wrote(session.resume(self.now))
        else:
            raise AssertionError("frames still waiting after every turn")
        # What stays buffered is part of one frame not yet whole (its declared length is
        # never allocated ahead).
        assert len(session._buffer) < FRAME_HEADER_BYTES + MAX_FRAME_BYTES

    def timer(self) -> None:
        deadline = self.session.next_deadline()
        if deadline is not None and self.now >= deadline:
            self.wrote(self.session.on_timer(self.now))

    def wrote(self, out: bytes) -> None:
        view = memoryview(out)
        position = 0
        while position < len(out):
            assert self.goaway is None, "a frame after GOAWAY"
            assert len(out) - position >= FRAME_HEADER_BYTES, "a partial frame header"
            frame, length = HeadersFrame.parse_frame_header(view[position:position + 9],
                                                             strict=True)
            assert length <= MAX_FRAME_BYTES, length
            end = position + FRAME_HEADER_BYTES + length
            assert end <= len(out), "a partial frame"
            frame.parse_body(view[position + FRAME_HEADER_BYTES:end])
            position = end
            self.check_frame(frame)
        events = self.session.events
        for level, text in events:
            assert level < logging.ERROR, text  # an ERROR is a defect (INTERNAL_ERROR)
        events.clear()

    def check_frame(self, frame) -> None:
        if isinstance(frame, HeadersFrame):
            assert frame.stream_id & 1 and "END_HEADERS" in frame.flags
            headers = dict(self.decoder.decode(frame.data, raw=True))
            self.statuses.append(headers[b":status"])
        elif isinstance(frame, (DataFrame, RstStreamFrame)):
            assert frame.stream_id & 1
            if isinstance(frame, RstStreamFrame):
                self.resets.append(frame.error_code)
        elif isinstance(frame, GoAwayFrame):
            self.goaway = frame.error_code
            ErrorCodes(frame.error_code)
        else:
            assert not isinstance(frame, ContinuationFrame)  # our header blocks fit a frame

    def check_end(self) -> None:
        session = self.session
        if session.closed and not session.closed_reason.startswith("the client"):
            assert self.goaway is not None, session.closed_reason


def fuzz_h2(data: bytes) -> H2Run | None:
    """SbiSession fed the stream in chunks, each turn taken, the clock moving and timers
    firing between."""
    if len(data) < 2:
        return None
    control, chunk_size, stream = data[0], data[1], data[2:]
    run = H2Run(control)
    step = _H2_CLOCK_STEPS[(control >> 2) & 3]
    pieces = chunks_of(stream, chunk_size)
    if control & 2:
        pieces = [H2_CLIENT_START] + pieces
    for piece in pieces:
        if run.session.closed:
            break
        run.receive(piece)
        run.now += step
        run.timer()
    run.check_end()
    return run


# fast_path: the S13 fast path against the generic path (layout: tests/helpers_fast_path.py).
TARGETS = {"codec": fuzz_codec, "peer": fuzz_peer, "h2": fuzz_h2,
           "fast_path": helpers_fast_path.differential}


# -- seeds: real messages, most encoded by scapy (an encoder nobody on this project wrote) ----

def seed_inputs(target: str) -> dict[str, bytes]:
    """Named seed inputs for `target`: CER, ECR, DWR, DPR and answers, alone and pipelined,
    and every error case of test_wire_errors. Control bytes as in the module docstring."""
    import helpers_wire as wire
    from helpers_faults import heavy_ecrs, proxy_info, with_avps
    from test_wire_errors import CASES

    ours = sans_io.open_peer()
    cea = new_fuzz_peer(0).receive(_VALID_CER, 0.0)
    eca = ours.receive(sans_io.ecr(), 1.0)
    dwr, dpr = sans_io.dwr(), sans_io.dpr()
    dwa = sans_io.answer_to(dwr)
    retransmitted = bytearray(wire.ecr(hop_by_hop=7, end_to_end=7))
    retransmitted[4] |= 0x10  # T flag
    messages = {
        "cer": wire.cer(), "ecr": wire.ecr(), "ecr-no-imsi": wire.ecr(imsi=None),
        "ecr-own-encoder": sans_io.ecr(), "dwr": dwr, "dpr": dpr, "dwa": dwa,
        "dpa": sans_io.answer_to(dpr), "cea": cea, "eca": eca,
    }
    if target == "h2":
        return h2_seed_inputs()
    if target == "fast_path":
        return helpers_fast_path.seed_inputs()
    if target == "codec":
        seeds = {name: bytes([0, 0]) + raw for name, raw in messages.items()}
        seeds["pipelined-chunks-of-7"] = bytes([0, 7]) + b"".join(messages.values())
        seeds["small-max"] = bytes([1, 0]) + wire.ecr()
        return seeds
    open_first, admission, duplicates, idle = 1, 2, 4, 8
    tw_step, cer_step, small_max, cer_last = 0x30, 0x20, 0x40, 0x80
    ecr = wire.ecr()
    seeds = {
        "ecr": bytes([open_first, 0]) + ecr,
        "cer-ecr-dwr-dpr": bytes([0, 0]) + wire.cer() + ecr + dwr + dpr,
        "cer-ecr-dwr-dpr-chunks-of-5": bytes([0, 5]) + wire.cer() + ecr + dwr + dpr,
        "ecr-before-cer": bytes([open_first | cer_last, 0]) + ecr,
        "ecr-flood-admission": bytes([open_first | admission, 0]) + ecr * 12,
        "dwr-flood-admission": bytes([open_first | admission, 0]) + dwr * 24,
        "retransmission": bytes([open_first | duplicates, 0]) + ecr + bytes(retransmitted),
        "idle": bytes([open_first | idle | cer_step, 0]) + ecr,
        "watchdog-dwa": bytes([open_first | tw_step, 0]) + dwa,
        "cer-timeout": bytes([cer_step, 0]) + b"\1",
        "small-max": bytes([open_first | small_max, 0]) + ecr,
        "dpa-unsolicited": bytes([open_first, 0]) + sans_io.answer_to(dpr),
        # Heavy requests (eir.diameter.overload): beyond the AVP budget (5009), at it (2001, its
        # Proxy-Info echoed), and a pipeline of those ending turns by their bytes.
        "proxy-info-beyond-the-avp-budget": bytes([open_first, 0]) + with_avps(
            ecr, proxy_info() * 140),
        "proxy-info-at-the-avp-budget": bytes([open_first, 0]) + heavy_ecrs(4096, 39)[1],
        "heavy-flood-admission": bytes([open_first | admission, 0]) + heavy_ecrs(
            4096, 39)[1] * 6,
    }
    for name, case in CASES.items():
        seeds["error " + name] = bytes([open_first, 0]) + case.request
    return seeds


def h2_seed_inputs() -> dict[str, bytes]:
    """Requests as the h2 library's client writes them (HPACK with its dynamic table, a
    body, a cancel, PING, SETTINGS, WINDOW_UPDATE), and each attack of
    tests/test_sbi_attacks.py: rapid reset, streams beyond the limit, floods, every
    connection error, a missing preface, an idle connection."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    from test_sbi_attacks import (CONNECTION_ERRORS, CONTINUATION, DATA, PING, frame, get,
                                  rst)

    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    path = b"/n5g-eir-eic/v1/equipment-status?pei=imei-352099001761481&supi=imsi-00101012"
    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"eir"),
            (b":path", path), (b"user-agent", b"AMF-fuzz")]
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, base, end_stream=True)
    client.send_headers(7, [(b":method", b"POST"), *base[1:]])
    client.send_data(7, b"{}", end_stream=True)
    client.send_headers(9, base)
    client.reset_stream(9)
    client.ping(b"12345678")
    client.update_settings({4: 1 << 20})
    client.increment_flow_control_window(1 << 20)
    client.close_connection()
    real = client.data_to_send()
    small, start, idle = 1, 2, 12
    seeds = {
        "h2-client": bytes([0, 0]) + real,
        "h2-client-chunks-of-7": bytes([0, 7]) + real,
        "h2-client-small-limits": bytes([small, 0]) + real,
        "gets": bytes([start, 0]) + get(1) + get(3) + get(5),
        "rapid-reset": bytes([start | small, 0]) + b"".join(get(n) + rst(n)
                                                            for n in range(1, 40, 2)),
        "refused-stream": bytes([start | small, 0]) + b"".join(
            get(n, end_stream=False) for n in (1, 3, 5)) + frame(DATA, 1, b"", 1),
        "ping-flood": bytes([start | small, 0]) + frame(PING, 0, bytes(8)) * 20,
        "empty-data-flood": bytes([start | small, 0]) + get(1, end_stream=False) +
        frame(DATA, 1) * 20,
        "continuation": bytes([start, 0]) + frame(1, 1, b"") + frame(CONTINUATION, 1,
                                                                     b"\x82", 4),
        "no-preface": bytes([0x8, 0]) + b"PRI * HT",
        "idle": bytes([start | idle, 0]) + get(1),
    }
    for name, (data, _, _) in CONNECTION_ERRORS.items():
        seeds["error " + name] = bytes([0 if name == "not HTTP/2" else start, 0]) + data
    return seeds


def write_seeds(target: str, directory) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    seeds = seed_inputs(target)
    for name, data in seeds.items():
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        (directory / f"seed-{slug}").write_bytes(data)
    return len(seeds)
