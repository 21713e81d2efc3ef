"""The N5g-eir fast path (eir.interfaces.h2wire, sbi.fast_path) never answers differently from
h2: its Huffman decoder against hpack's, its HPACK block decoding against hpack's decoder
(the same table afterwards, or the table untouched and the block left to h2), its request
check as a subset of h2's header validation, and whole sessions, the same client bytes fed
to an SbiSession with and without the fast path, compared answer by answer. More examples
with EIR_FUZZ=1."""

from __future__ import annotations

import os
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError
from hpack import Decoder, Encoder
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman as hpack_decode_huffman
from hpack.struct import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from eir.check.service import EquipmentCheck
from eir.core.config import SbiSettings
from eir.core.decision import UnknownPolicy
from eir.interfaces.h2wire import decode_huffman, decode_request, plain_request
from eir.interfaces.sbi import (
    EquipmentIdentityCheck,
    N5gEir,
    SbiCounters,
    SbiSession,
    malformed,
)
from eir.lists.native import load_rule_set

EXAMPLES = 20_000 if os.environ.get("EIR_FUZZ") else 300
EXAMPLE_LIST = Path(__file__).resolve().parent.parent / "config" / "lists" / "example.csv"
HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
PATH = b"/n5g-eir-eic/v1/equipment-status"


def _hpack_huffman(data: bytes) -> bytes | None:
    try:
        return hpack_decode_huffman(data)
    except Exception:  # noqa: BLE001 - hpack's decoding errors
        return None


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(st.binary(max_size=80),
                 st.binary(max_size=80).map(HUFFMAN.encode),
                 st.binary(max_size=80).map(lambda data: HUFFMAN.encode(data)[:-1])))
def test_huffman_decoding_is_hpacks(data):
    assert decode_huffman(data) == _hpack_huffman(data)


NAMES = [b":method", b":scheme", b":authority", b":path", b"user-agent", b"accept",
         b"host", b"te", b"connection", b"Accept", b"x y", b":status", b"", b"x:y",
         b"3gpp-sbi-target-apiroot", b"content-length"]
VALUES = [b"GET", b"POST", b"CONNECT", b"http", b"eir.test:80", b"AMF-1", b" padded",
          b"trailers", b"", b"a\nb", b"x\x00", PATH + b"?pei=imei-352099001761481",
          PATH + b"?pei=imeisv-3520990017614812&supi=imsi-001010123456789", b"*/*"]
header = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES))
plain_start = st.just([(b":method", b"GET"), (b":scheme", b"http"),
                       (b":authority", b"eir.test"),
                       (b":path", PATH + b"?pei=imei-352099001761481")])
header_lists = st.one_of(st.lists(header, max_size=8),
                         st.tuples(plain_start, st.lists(header, max_size=3)).map(
                             lambda parts: parts[0] + parts[1]),
                         st.permutations([(b":method", b"GET"), (b":scheme", b"https"),
                                          (b":authority", b"eir"), (b":path", b"/x"),
                                          (b"user-agent", b"AMF")]).map(list))


@settings(max_examples=EXAMPLES, deadline=None)
@given(header_lists)
def test_a_plain_request_is_one_h2_accepts_with_the_same_fields(headers):
    request = plain_request(headers)
    if request is not None:
        assert malformed(headers) is None
        fields = {name: value for name, value in headers}
        assert request == (fields[b":method"], fields[b":path"], fields.get(b"user-agent"))


def _encode(encoder: Encoder, headers, representation: str, huffman: bool) -> bytes:
    if representation == "never":
        headers = [NeverIndexedHeaderTuple(name, value) for name, value in headers]
    return encoder.encode(headers, huffman=huffman)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(header_lists, st.sampled_from(["indexed", "never"]), st.booleans(),
                          st.integers(0, 4)), min_size=1, max_size=6),
       st.integers(100, 4096))
def test_hpack_blocks_decode_as_hpack_does_and_leave_its_table_in_step(blocks, table_size):
    encoder, reference, ours = Encoder(), Decoder(), Decoder()
    encoder.header_table_size = table_size
    for headers, representation, huffman, cut in blocks:
        block = _encode(encoder, headers, representation, huffman)
        if cut:  # a truncated block: h2's to refuse
            block = block[:-cut]
        try:
            expected = [(bytes(name), bytes(value)) for name, value in
                        reference.decode(block, raw=True)]
        except Exception:  # noqa: BLE001 - hpack refuses it: so must we, leaving it to h2
            expected = None
        before = list(ours.header_table.dynamic_entries)
        request = decode_request(block, ours.header_table, 8192)
        if request is None:
            assert list(ours.header_table.dynamic_entries) == before
            if expected is None:
                return  # the connection ends there
            ours.decode(block, raw=True)  # as h2 does with a block we leave it
        else:
            assert expected is not None and plain_request(expected) == request
        assert list(ours.header_table.dynamic_entries) == list(
            reference.header_table.dynamic_entries)


# -- whole sessions, with and without the fast path -------------------------------------------

def _session(fast: bool) -> SbiSession:
    rules = load_rule_set([EXAMPLE_LIST], UnknownPolicy.UNKNOWN)
    check = EquipmentIdentityCheck(EquipmentCheck(rules), SbiCounters())
    settings = SbiSettings(fast_path=fast, frames_per_turn=64)
    session = SbiSession(check, settings, N5gEir.h2_configuration(), b"127.0.0.1", 0.0)
    return session


def _answers(fast: bool, turns: list[list[tuple[str, object]]]) -> list:
    """What an h2 client gets for `turns` of requests: (kind, argument) with kind "get"
    (headers), "reset" (of the stream before), "window" or "settings"."""
    session = _session(fast)
    client = H2Connection(H2Configuration(  # a client that sends malformed headers too
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    client.initiate_connection()
    seen = []
    back = session.start() + session.receive(client.data_to_send(), 0.0)
    streams: dict[int, list] = {}
    for turn_number, turn in enumerate(turns):
        if session.closed:
            break
        for kind, argument in turn:
            if kind == "get":
                stream_id = client.get_next_available_stream_id()
                client.send_headers(stream_id, argument, end_stream=True)
                streams[stream_id] = []
            elif kind == "reset" and streams and max(streams) in client.streams \
                    and not client.streams[max(streams)].closed:
                client.reset_stream(max(streams))
            elif kind == "settings":
                client.update_settings(argument)
            elif kind == "ping":
                client.ping(b"12345678")
        back += session.receive(client.data_to_send(), float(turn_number))
        while session.waiting:
            back += session.resume(float(turn_number))
        try:
            events = client.receive_data(back)
        except ProtocolError as exc:  # hpack's own table size quirks, in both paths alike
            seen.append(("the client refused", str(exc)))
            break
        for event in events:
            if type(event) is ResponseReceived:
                streams[event.stream_id].append(event.headers)
            elif type(event) is DataReceived:
                client.acknowledge_received_data(event.flow_controlled_length,
                                                 event.stream_id)
                streams[event.stream_id].append(event.data)
            elif type(event) in (StreamEnded, StreamReset):
                streams[event.stream_id].append(type(event).__name__)
        pending = client.data_to_send()  # window updates, acks
        back = session.receive(pending, float(turn_number)) if pending else b""
        seen.append((session.closed_reason, sorted(streams.items())))
    return seen


def _get(path: bytes, method: bytes = b"GET", extra=()) -> tuple[str, list]:
    return ("get", [(b":method", method), (b":scheme", b"http"), (b":authority", b"eir.test"),
                    (b":path", path), (b"user-agent", b"AMF-1"), *extra])


queries = st.sampled_from([b"?pei=imei-352099001761481", b"?pei=imeisv-3520990017614812",
                           b"?pei=imei-490154203237518&supi=imsi-001010123456789",
                           b"?pei=imei-1", b"", b"?supi=imsi-1", b"?pei=imei-35209900176148%31",
                           b"?pei=imei-353321064700899&pei=imei-1", b"?gpsi=msisdn-1&pei="])
requests = st.one_of(
    queries.map(lambda query: _get(PATH + query)),
    queries.map(lambda query: _get(b"/other" + query)),
    queries.map(lambda query: _get(PATH + query, method=b"POST")),
    queries.map(lambda query: _get(PATH + query, extra=[(b"accept", b"application/json")])),
    queries.map(lambda query: _get(PATH + query, extra=[(b"te", b"gzip")])),  # malformed
    queries.map(lambda query: _get(PATH + query, extra=[(b"Bad", b"x")])),
    st.just(("reset", None)), st.just(("ping", None)))
# SETTINGS in a turn of their own: within a turn, h2 applies every frame's settings before
# the generic path answers the requests that came before them, where the fast path answers
# in frame order (both are right; an INITIAL_WINDOW_SIZE of 10 then blocks one and not the
# other). One header table size only: hpack signals a series of different sizes as it was
# set, larger ones included, which a client refuses once it acknowledged a smaller one (an
# answer h2 encodes then fails either way).
settings_turns = st.sampled_from([{0x1: 0}, {0x4: 10}, {0x4: 65535}]).map(
    lambda values: [("settings", values)])


@settings(max_examples=EXAMPLES // 3, deadline=None)
@given(st.lists(st.one_of(st.lists(requests, min_size=1, max_size=12), settings_turns),
                min_size=1, max_size=5))
def test_a_session_answers_the_same_with_and_without_the_fast_path(turns):
    assert _answers(True, turns) == _answers(False, turns)


def test_the_fast_path_answers_the_common_request():
    session = _session(True)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.receive_data(session.start() + session.receive(client.data_to_send(), 0.0))
    session.receive(client.data_to_send(), 0.0)  # the SETTINGS ack
    client.send_headers(client.get_next_available_stream_id(), _get(
        PATH + b"?pei=imei-352099001761481")[1], end_stream=True)
    client.receive_data(session.receive(client.data_to_send(), 0.0))  # h2 answers the first
    requests_before = dict(session.check.counters.requests)
    sent = []
    for _ in range(3):
        sent.append(client.get_next_available_stream_id())
        client.send_headers(sent[-1], _get(PATH + b"?pei=imei-352099001761481")[1],
                            end_stream=True)
    back = session.receive(client.data_to_send(), 0.0)
    # h2 did not see them (it holds only the first) and was told they were opened.
    assert list(session.h2.streams) in ([], [1])
    assert session.h2.highest_inbound_stream_id == sent[-1]
    bodies = [event.data for event in client.receive_data(back) if type(event) is DataReceived]
    assert bodies == [b'{"status": "BLACKLISTED"}'] * 3
    assert session.check.counters.requests == {200: requests_before.get(200, 0) + 3}


def test_a_header_table_size_sent_twice_is_still_signalled():
    """hpack forgets a pending table size change when the same size comes again
    (SbiSession._handle sets it back): the next answer starts with the update."""
    turns = [[("settings", {0x1: 0})], [("settings", {0x1: 0})],
             [_get(PATH + b"?pei=imei-352099001761481")],
             [_get(PATH + b"?pei=imei-352099001761481")]]
    for fast in (True, False):
        closed, streams = _answers(fast, turns)[-1]
        assert closed is None and [answer[-1] for _, answer in streams] == [
            "StreamEnded", "StreamEnded"]
