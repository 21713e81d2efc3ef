"""The sans-IO codec: AVP and message round trips, the Framer, and fuzzing of every decoder.

Messages are built with our own codec and dictionary; interop with independent encoders is
tested elsewhere.
"""

from __future__ import annotations

import struct
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir.check.service import EquipmentCheck
from eir.core.decision import UnknownPolicy
from eir.diameter.codec import (Avp, AvpLengthError, Framer, decode_avps, encode_avp,
                                encode_message, parse_header)
from eir.diameter.constants import (APPLICATION_RELAY, APPLICATION_S13, AVP_FLAG_MANDATORY,
                                    AVP_FLAG_VENDOR, FLAG_PROXIABLE, FLAG_REQUEST, VENDOR_3GPP)
from eir.diameter.dictionary import Dictionary
from eir.diameter.peer import LocalIdentity, PeerConnection, PeerState, Timers
from eir.lists.native import load_rule_set
from eir.interfaces.s13 import S13Application

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LIST = ROOT / "config" / "lists" / "example.csv"
DICTIONARY = Dictionary.load()
LOCAL = LocalIdentity("eir.test", "test")
RULE_SET = load_rule_set([EXAMPLE_LIST], UnknownPolicy.UNKNOWN)

# -- helpers -------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u24 = st.integers(0, 0xFFFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def expected_avp_flags(flags: int, vendor: int) -> int:
    """encode_avp makes the V flag follow the vendor."""
    return flags | AVP_FLAG_VENDOR if vendor else flags & ~AVP_FLAG_VENDOR


@st.composite
def avps(draw) -> Avp:
    vendor = draw(st.one_of(st.just(0), st.just(VENDOR_3GPP), u32))
    flags = draw(u8)
    return Avp(draw(u32), expected_avp_flags(flags, vendor), vendor,
               draw(st.binary(max_size=70)))


@st.composite
def messages(draw) -> bytes:
    body = b"".join(a.encode() for a in draw(st.lists(avps(), max_size=6)))
    return encode_message(draw(u8), draw(u24), draw(u32), draw(u32), draw(u32), body)


def feed_all(framer: Framer, chunks) -> list[bytes]:
    out = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out


def split(data: bytes, points) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def raw_header(version: int, length: int) -> bytes:
    """A 20-byte header with an arbitrary version and length field."""
    return struct.pack("!IIIII", (version << 24) | length, (FLAG_REQUEST << 24) | 280, 0, 1, 1)


E = DICTIONARY.encode


def cer(*apps: int, hop_by_hop: int = 1) -> bytes:
    body = (E("Origin-Host", "mme.test") + E("Origin-Realm", "test")
            + E("Host-IP-Address", "127.0.0.1") + E("Vendor-Id", 0) + E("Product-Name", "t")
            + b"".join(E("Auth-Application-Id", app) for app in apps))
    return encode_message(FLAG_REQUEST, 257, 0, hop_by_hop, hop_by_hop, body)


def ecr(imei: str = "35209900176148") -> bytes:
    body = (E("Session-Id", "mme.test;1;2") + E("Auth-Session-State", 1)
            + E("Origin-Host", "mme.test") + E("Origin-Realm", "test")
            + E("Destination-Realm", "test")
            + E("Terminal-Information", [E("IMEI", imei), E("Software-Version", "01")])
            + E("User-Name", "001010123456789"))
    return encode_message(FLAG_REQUEST | FLAG_PROXIABLE, 324, APPLICATION_S13, 7, 7, body)


def new_peer(now: float = 0.0) -> PeerConnection:
    app = S13Application(DICTIONARY, LOCAL, EquipmentCheck(RULE_SET))
    return PeerConnection(DICTIONARY, LOCAL, {APPLICATION_S13: app}, now=now,
                          local_addresses=("127.0.0.1",), timers=Timers(watchdog_jitter=0))


def open_peer() -> PeerConnection:
    peer = new_peer()
    answer = peer.receive(cer(APPLICATION_S13), 0.0)
    assert peer.state is PeerState.OPEN, answer
    return peer


def assert_well_formed_output(out: bytes) -> None:
    """Whatever the peer writes is whole Diameter answers whose AVPs decode."""
    framer = Framer(max_length=0xFFFFFF)
    for message in framer.feed(out):
        header = parse_header(message)
        assert not header.is_request
        decode_avps(message, 20, len(message))
    assert framer.error is None and framer.buffered == 0


# Fuzz inputs that get past the Framer: a valid header around a random or AVP-shaped body.
_DICTIONARY_KEYS = sorted((a.code, a.vendor) for a in DICTIONARY.avps.values())


@st.composite
def fuzz_avp(draw, depth: int = 0) -> bytes:
    code, vendor = draw(st.one_of(st.sampled_from(_DICTIONARY_KEYS), st.tuples(u32, u32)))
    flags = draw(st.sampled_from([AVP_FLAG_MANDATORY, 0, 0x20, 0xFF]))
    if depth < 2 and draw(st.booleans()):
        data = b"".join(draw(st.lists(fuzz_avp(depth + 1), max_size=3)))
    else:
        data = draw(st.one_of(st.binary(max_size=20),
                              st.sampled_from([b"", b"\0\0\0\1", b"35209900176148", b"\xff"])))
    avp = encode_avp(code, flags, vendor, data)
    if draw(st.integers(0, 9)) == 0:  # now and then, a length field that lies
        avp = avp[:5] + draw(u24).to_bytes(3, "big") + avp[8:]
    return avp


@st.composite
def fuzz_message(draw) -> bytes:
    body = draw(st.one_of(
        st.binary(max_size=200).map(lambda b: b + bytes(-len(b) % 4)),
        st.lists(fuzz_avp(), max_size=12).map(b"".join)))
    return encode_message(
        draw(st.one_of(st.sampled_from([FLAG_REQUEST, FLAG_REQUEST | FLAG_PROXIABLE, 0, 0xE0]),
                       u8)),
        draw(st.one_of(st.sampled_from([257, 280, 282, 324]), u24)),
        draw(st.one_of(st.sampled_from([0, APPLICATION_S13, APPLICATION_RELAY]), u32)),
        draw(u32), draw(u32), body)


@st.composite
def mutated_message(draw) -> bytes:
    """A valid CER/ECR/DWR/DPR with body bytes overwritten and maybe cut short (the length
    field is kept consistent, so that the message gets past the Framer)."""
    base = bytearray(draw(st.sampled_from([
        cer(APPLICATION_S13), ecr(), ecr("3520990017614"), ecr("35a09900176148"),
        encode_message(FLAG_REQUEST, 280, 0, 1, 1, E("Origin-Host", "m") + E("Origin-Realm", "r")),
        encode_message(FLAG_REQUEST, 282, 0, 1, 1, E("Origin-Host", "m") + E("Origin-Realm", "r")
                       + E("Disconnect-Cause", 0))])))
    for position, value in draw(st.lists(st.tuples(st.integers(20, len(base) - 1), u8),
                                         max_size=4)):
        base[position] = value
    length = len(base)
    if draw(st.booleans()):  # cut short, on a 4-byte boundary
        length = 20 + 4 * draw(st.integers(0, (len(base) - 20) // 4))
    base[1:4] = length.to_bytes(3, "big")
    return bytes(base[:length])


any_input = st.one_of(st.binary(max_size=300), fuzz_message(), mutated_message())
FUZZ = settings(max_examples=300, deadline=timedelta(milliseconds=500),
                suppress_health_check=[HealthCheck.too_slow])


# -- round trips ---------------------------------------------------------------------------

@given(code=u32, flags=u8, vendor=st.one_of(st.just(0), u32), data=st.binary(max_size=300))
def test_avp_round_trips_through_encode_and_decode(code, flags, vendor, data):
    encoded = encode_avp(code, flags, vendor, data)
    assert len(encoded) % 4 == 0
    assert decode_avps(encoded, 0, len(encoded)) == [
        Avp(code, expected_avp_flags(flags, vendor), vendor, data)]


@given(st.lists(avps(), max_size=10))
def test_avp_sequence_round_trips(sequence):
    encoded = b"".join(a.encode() for a in sequence)
    assert decode_avps(encoded, 0, len(encoded)) == sequence


def test_avp_padding_is_zero_and_not_counted_in_length():
    encoded = encode_avp(1, AVP_FLAG_MANDATORY, 0, b"abcde")
    assert encoded == b"\0\0\0\1\x40\0\0\x0dabcde\0\0\0"


def test_vendor_avp_header_carries_v_flag_and_vendor_id():
    encoded = encode_avp(1402, AVP_FLAG_MANDATORY, VENDOR_3GPP, b"1")
    assert encoded[:12] == struct.pack("!III", 1402, (0xC0 << 24) | 13, VENDOR_3GPP)


@given(st.lists(messages(), min_size=1, max_size=5))
def test_messages_round_trip_through_encode_and_framer(batch):
    framer = Framer(max_length=0xFFFFFF)
    assert framer.feed(b"".join(batch)) == batch
    assert framer.error is None and framer.buffered == 0
    for message in batch:
        header = parse_header(message)
        assert header.length == len(message)
        assert message[0] == 1
        decode_avps(message, 20, len(message))


@given(flags=u8, code=u24, application=u32, hop=u32, end=u32, body=st.lists(avps(), max_size=5))
def test_header_fields_round_trip(flags, code, application, hop, end, body):
    raw = encode_message(flags, code, application, hop, end, b"".join(a.encode() for a in body))
    header = parse_header(raw)
    assert (header.flags, header.code, header.application, header.hop_by_hop,
            header.end_to_end) == (flags, code, application, hop, end)
    assert header.is_request == bool(flags & FLAG_REQUEST)
    assert decode_avps(raw, 20, header.length) == body


# -- Framer --------------------------------------------------------------------------------

@given(batch=st.lists(messages(), min_size=1, max_size=8),
       points=st.lists(st.integers(0, 10_000), max_size=30))
def test_framer_copes_with_any_split_of_pipelined_messages(batch, points):
    stream = b"".join(batch)
    framer = Framer(max_length=0xFFFFFF)
    assert feed_all(framer, split(stream, points)) == batch
    assert framer.error is None and framer.buffered == 0


def test_framer_byte_by_byte():
    batch = [cer(APPLICATION_S13, hop_by_hop=i) for i in range(3)]
    stream = b"".join(batch)
    framer = Framer()
    assert feed_all(framer, [stream[i:i + 1] for i in range(len(stream))]) == batch


def test_framer_holds_a_partial_message_until_complete():
    message = cer(APPLICATION_S13)
    framer = Framer()
    assert framer.feed(message[:-1]) == []
    assert framer.buffered == len(message) - 1
    assert framer.feed(message[-1:]) == [message]
    assert framer.buffered == 0


@pytest.mark.parametrize("bad, problem", [
    (raw_header(1, 16), "length 16"),
    (raw_header(1, 0), "length 0"),
    (raw_header(1, 22), "length 22"),
    (raw_header(1, 1024 + 4), "length 1028"),
    (raw_header(2, 20), "version 2"),
    (raw_header(0, 20), "version 0"),
])
def test_framer_error_on_bad_header_still_returns_earlier_messages(bad, problem):
    good = [cer(APPLICATION_S13, hop_by_hop=1), cer(APPLICATION_S13, hop_by_hop=2)]
    framer = Framer(max_length=1024)
    trailing = cer(APPLICATION_S13, hop_by_hop=3)
    assert framer.feed(b"".join(good) + bad + trailing) == good
    assert framer.error is not None and problem in framer.error
    assert framer.feed(trailing) == []  # the rest of the stream is meaningless


def test_framer_error_detected_from_the_first_four_bytes():
    framer = Framer(max_length=1024)
    assert framer.feed(raw_header(1, 2000)[:4]) == []
    assert framer.error is not None


def test_framer_accepts_a_message_of_exactly_max_length():
    message = encode_message(FLAG_REQUEST, 280, 0, 1, 1, encode_avp(1, 0, 0, bytes(1024 - 28)))
    assert len(message) == 1024
    framer = Framer(max_length=1024)
    assert framer.feed(message) == [message]
    assert framer.error is None


# -- decode_avps errors --------------------------------------------------------------------

@pytest.mark.parametrize("raw, code", [
    (struct.pack("!II", 264, (0x40 << 24) | 7), 264),  # length below the 8-byte header
    (struct.pack("!III", 1402, (0xC0 << 24) | 11, VENDOR_3GPP), 1402),  # below 12 with V
    (struct.pack("!II", 264, (0x40 << 24) | 40) + b"abcd", 264),  # runs past the end
    (struct.pack("!II", 264, (0x40 << 24) | 13) + b"abcd", 264),  # runs past by one byte
    (struct.pack("!II", 264, 0x40 << 24)[:6], 264),  # header cut short
    (struct.pack("!II", 1402, (0xC0 << 24) | 16), 1402),  # V flag, no room for Vendor-Id
])
def test_decode_avps_raises_avp_length_error(raw, code):
    with pytest.raises(AvpLengthError) as caught:
        decode_avps(raw, 0, len(raw))
    assert caught.value.code == code


def test_decode_avps_error_after_a_good_avp_names_the_bad_one():
    raw = encode_avp(263, AVP_FLAG_MANDATORY, 0, b"sid") + struct.pack("!II", 1, 100)
    with pytest.raises(AvpLengthError) as caught:
        decode_avps(raw, 0, len(raw))
    assert (caught.value.code, caught.value.reported_length) == (1, 100)


def test_decode_avps_respects_the_end_bound():
    first = encode_avp(1, 0, 0, b"abcd")
    raw = first + encode_avp(2, 0, 0, b"x" * 8)
    assert decode_avps(raw, 0, len(first)) == [Avp(1, 0, 0, b"abcd")]
    with pytest.raises(AvpLengthError):
        decode_avps(raw, 0, len(first) + 8)  # second AVP declared past the bound


# -- no input crashes or hangs ------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=400))
def test_decode_avps_never_fails_except_with_avp_length_error(data):
    try:
        result = decode_avps(data, 0, len(data))
    except AvpLengthError:
        return
    assert sum((12 if a.vendor or a.flags & AVP_FLAG_VENDOR else 8) + len(a.data)
               for a in result) <= len(data)


@FUZZ
@given(chunks=st.lists(st.one_of(st.binary(max_size=100), fuzz_message()), max_size=6))
def test_framer_never_fails_on_any_bytes(chunks):
    framer = Framer(max_length=4096)
    for chunk in chunks:
        for message in framer.feed(chunk):
            assert message[0] == 1
            assert parse_header(message).length == len(message)
    assert framer.buffered <= sum(map(len, chunks))


@pytest.mark.parametrize("make_peer", [new_peer, open_peer], ids=["before CER", "once open"])
@FUZZ
@given(chunks=st.lists(any_input, min_size=1, max_size=4))
def test_peer_receive_never_raises(make_peer, chunks):
    peer = make_peer()
    for index, chunk in enumerate(chunks):
        out = peer.receive(chunk, float(index))
        assert_well_formed_output(out)
        peer.on_timer(float(index))


def test_fuzz_helpers_reach_the_application():
    """The open-connection fuzz is only worth something if a valid ECR gets an ECA."""
    peer = open_peer()
    answer = peer.receive(ecr(), 1.0)
    header = parse_header(answer)
    assert (header.code, header.application, header.is_request) == (324, APPLICATION_S13, False)
    found = {(a.code, a.vendor): a.data for a in decode_avps(answer, 20, len(answer))}
    assert found[(1445, VENDOR_3GPP)] == (1).to_bytes(4, "big")  # the example list's blacklist
