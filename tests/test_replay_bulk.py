"""The load generator's bulk paths against their one-at-a-time references.

`eir replay` frames and classifies a read of answers in one pass with a memo of answer shapes
(messages.AnswerReader), builds requests with one bytes `%` (EcrTemplate.format), and records
latencies and reads percentiles in bulk (stats). Each is checked here against the plain way
it replaces, on answers of every shape another EIR may send: AVPs in any order, Session-Id
first, elsewhere or missing, Experimental-Result 5422, errors with Failed-AVP, lengths that
lie, and any cut of the stream into reads.
"""

from __future__ import annotations

import random
import struct
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir.diameter.codec import encode_avp, encode_message
from eir.diameter.constants import VENDOR_3GPP
from eir.replay.messages import (
    SESSION_COUNTER_DIGITS,
    AnswerReader,
    EcrTemplate,
    Identity,
    VerdictClasses,
    ecr_template,
    verdict_of,
)
from eir.replay.stats import (
    HIGHEST_US,
    LOWEST_US,
    clear_histogram,
    new_histogram,
    record_latencies,
    values_at_percentiles,
)

ECA, CEA, DWR = 324, 257, 280
MANDATORY, VENDOR_FLAG = 0x40, 0x80
BULK = settings(max_examples=300, deadline=timedelta(milliseconds=1000),
                suppress_health_check=[HealthCheck.too_slow])


def avp(code: int, data: bytes, vendor: int = 0) -> bytes:
    return encode_avp(code, MANDATORY | (VENDOR_FLAG if vendor else 0), vendor, data)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


# The AVPs an EIR's answer may carry, each a verdict-bearing one or not.
verdict_avps = st.sampled_from([
    avp(268, u32(2001)), avp(268, u32(5004)), avp(268, u32(3002)), avp(268, b"\0\0\x07"),
    avp(297, avp(266, u32(VENDOR_3GPP)) + avp(298, u32(5422))),  # Experimental-Result 5422
    avp(297, avp(298, u32(5422)) + avp(266, u32(VENDOR_3GPP))),  # its children the other way
    avp(297, b"\0\0\x01"),  # an Experimental-Result whose children cannot be cut
    avp(1445, u32(0), VENDOR_3GPP), avp(1445, u32(1), VENDOR_3GPP),
    avp(1445, u32(2), VENDOR_3GPP), avp(1445, u32(1)),  # Equipment-Status without its vendor
    avp(279, avp(1401, avp(1402, b"12345678INVALID", VENDOR_3GPP), VENDOR_3GPP)),  # Failed-AVP
    avp(281, b"IMEI is not 14 to 16 digits"),  # Error-Message
    avp(264, b"eir.example.net"), avp(296, b"example.net"), avp(277, u32(1)),
    avp(260, avp(266, u32(VENDOR_3GPP)) + avp(258, u32(16777252))),
])
session_ids = st.builds(lambda n: avp(263, b"eir.example.net;%d;replay" % n),
                        st.integers(0, 10 ** 12))


@st.composite
def answers(draw) -> tuple[bytes, int]:
    """(an answer, its hop-by-hop id): an ECA, sometimes another command or a request, with
    the Session-Id first, elsewhere or missing, and sometimes a length that lies."""
    body = draw(st.lists(verdict_avps, max_size=7))
    where = draw(st.sampled_from(["first", "first", "first", "elsewhere", "none"]))
    if where != "none":
        body.insert(0 if where == "first" else draw(st.integers(0, len(body))),
                    draw(session_ids))
    hop_by_hop = draw(st.integers(1, 40))
    command = draw(st.sampled_from([ECA, ECA, ECA, ECA, CEA, DWR]))
    flags = 0x80 if command == DWR else draw(st.sampled_from([0, 0, 0, 0x20]))  # R; E bit
    message = bytearray(encode_message(flags, command, 16777252, hop_by_hop, 7, b"".join(body)))
    lie = draw(st.sampled_from([None, None, None, None, "session", "cut"]))
    if lie == "session" and len(message) >= 28:  # the first AVP's length is wrong
        wrong = draw(st.one_of(st.integers(0, 12), st.integers(0, len(message) + 8),
                               st.integers(0, 0xFFFFFF)))
        message[25:28] = wrong.to_bytes(3, "big")
    elif lie == "cut" and len(message) > 20:  # the message ends inside its last AVP
        message = message[:draw(st.integers(20, len(message) - 1))]
        message[1:4] = len(message).to_bytes(3, "big")
    return bytes(message), hop_by_hop


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    """The stream in reads, cut at `points` (offsets, any order, duplicates allowed)."""
    edges = sorted({0, len(stream), *(p % (len(stream) + 1) for p in points)})
    return [stream[a:b] for a, b in zip(edges, edges[1:])]


@BULK
@given(st.lists(answers(), max_size=30), st.lists(st.integers(0, 1 << 16), max_size=12),
       st.booleans())
def test_answer_reader_classifies_as_a_full_decode_whatever_the_shape_and_reads(
        messages, points, small_memo):
    """Each answer to an outstanding request gets the class of verdict_of(answer); everything
    else comes out whole, in order; any cut of the stream gives the same."""
    classes_of = VerdictClasses()
    if small_memo:  # past MAX_SHAPES the memo stops growing: every new shape decoded in full
        classes_of.MAX_SHAPES = 2
    reader = AnswerReader(classes_of)
    outstanding = {hop_by_hop: ("entry", hop_by_hop) for hop_by_hop in range(1, 21)}
    expected_entries, expected_verdicts, expected_others = [], [], []
    pending = dict(outstanding)
    for message, hop_by_hop in messages:
        answer = not message[4] & 0x80
        if answer and hop_by_hop in pending:
            expected_entries.append(pending.pop(hop_by_hop))
            expected_verdicts.append(verdict_of(message))
        else:
            expected_others.append(message)
    entries: list = []
    classes: list[int] = []
    others: list[bytes] = []
    for data in cut(b"".join(message for message, _ in messages), points):
        assert reader.feed(data, outstanding, entries, classes, others) is None
    assert entries == expected_entries
    assert [classes_of.verdicts[number] for number in classes] == expected_verdicts
    assert others == expected_others
    assert reader.buffer == b""
    assert len(classes_of.memo) <= classes_of.MAX_SHAPES


def test_the_memo_serves_repeated_shapes_and_keeps_verdicts_apart():
    """Answers that differ only in their Session-Id and ids share one memo entry; a different
    verdict, or the same verdict with the AVPs in another order, is a shape of its own."""
    classes_of = VerdictClasses()
    reader = AnswerReader(classes_of)

    def eca(hop_by_hop: int, *body: bytes) -> bytes:
        session = avp(263, b"eir;%d" % (hop_by_hop * 7919))
        return encode_message(0, ECA, 16777252, hop_by_hop, hop_by_hop, session + b"".join(body))

    white = (avp(268, u32(2001)), avp(1445, u32(0), VENDOR_3GPP))
    black_reordered = (avp(1445, u32(1), VENDOR_3GPP), avp(268, u32(2001)))
    unknown = (avp(297, avp(266, u32(VENDOR_3GPP)) + avp(298, u32(5422))),)
    stream = [eca(h, *white) for h in range(1, 50)] + [eca(h, *black_reordered)
                                                       for h in range(50, 60)]
    stream += [eca(h, *unknown) for h in range(60, 70)]
    outstanding = {h: h for h in range(1, 70)}
    entries, classes, others = [], [], []
    assert reader.feed(b"".join(stream), outstanding, entries, classes, others) is None
    assert entries == list(range(1, 70)) and not others and not outstanding
    verdicts = [classes_of.verdicts[n] for n in classes]
    assert verdicts == [(2001, 0)] * 49 + [(2001, 1)] * 10 + [(5422, None)] * 10
    assert len(classes_of.memo) == 3
    assert classes_of.errors == set()  # 5422 is a verdict (equipment unknown), not an error


def test_a_session_id_too_short_to_be_an_avp_is_not_skipped():
    """A Session-Id whose length (4) is less than an AVP header: a full decode stops there (no
    verdict), so the reader must not key the answer on what follows it, which here would read
    as a Result-Code."""
    body = u32(263) + u32(MANDATORY << 24 | 4) + u32(12) + u32(0) + avp(268, u32(2001))
    message = encode_message(0, ECA, 16777252, 1, 1, body)
    assert verdict_of(message) == (None, None)
    classes_of = VerdictClasses()
    classes: list[int] = []
    AnswerReader(classes_of).feed(message, {1: "entry"}, [], classes, [])
    assert [classes_of.verdicts[n] for n in classes] == [(None, None)]


def test_a_message_shorter_than_its_header_is_named():
    reader = AnswerReader(VerdictClasses())
    bad = b"\x01\x00\x00\x10" + bytes(16)
    assert reader.feed(bad, {}, [], [], []) == "the server sent a message of length 16"


@BULK
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_answer_reader_takes_any_bytes(data, points):
    """Garbage in: an error string or nothing, never an exception."""
    reader = AnswerReader(VerdictClasses())
    outstanding = {h: h for h in range(256)}
    for chunk in cut(data, points):
        if reader.feed(chunk, outstanding, [], [], []) is not None:
            break


# -- requests ---------------------------------------------------------------------------------

def patched(template: EcrTemplate, hop_by_hop: int, end_to_end: int, counter: int) -> bytes:
    """The request as the harness built it before: the raw bytes, three fields patched."""
    buffer = bytearray(template.raw)
    struct.pack_into("!II", buffer, 12, hop_by_hop, end_to_end)
    at = template.counter_at
    if at is not None:
        buffer[at:at + SESSION_COUNTER_DIGITS] = b"%012d" % (counter % 10 ** 12)
    return bytes(buffer)


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 10 ** 15),
       st.sampled_from(["replay.localdomain", "mme%d.100%.net", "%s%%b"]))
def test_a_request_from_the_format_is_the_patched_template(hop_by_hop, end_to_end, counter,
                                                           host):
    """Also with `%` in the identity (escaped in the format) and for a capture's ECR, whose
    Session-Id is sent as it is."""
    template = ecr_template(Identity(origin_host=host), "35209900176148", "001010000000001",
                            "01")
    as_captured = EcrTemplate(template.raw, None)
    for each in (template, as_captured):
        assert each.instance(hop_by_hop, end_to_end, counter) == patched(
            each, hop_by_hop, end_to_end, counter)


# -- latencies --------------------------------------------------------------------------------

def random_latencies(rng: random.Random) -> list[float]:
    shape = rng.choice(["tight", "spread", "edges"])
    if shape == "tight":
        return [rng.uniform(0.0001, 0.0003) for _ in range(rng.randrange(0, 3000))]
    if shape == "spread":
        return [rng.lognormvariate(-7, 2) for _ in range(rng.randrange(0, 3000))]
    return [rng.choice([-1.0, 0.0, 1e-7, 0.5e-6, 4000.0, 1e9]) for _ in range(50)]


def test_bulk_recording_equals_one_record_value_per_answer():
    for seed in range(20):
        latencies = random_latencies(random.Random(seed))
        one_by_one, bulk = new_histogram(), new_histogram()
        for latency in latencies:
            one_by_one.record_value(min(max(int(latency * 1_000_000), LOWEST_US), HIGHEST_US))
        record_latencies(bulk, latencies)
        assert list(bulk.counts) == list(one_by_one.counts), seed
        assert (bulk.get_total_count(), bulk.get_min_value(), bulk.get_max_value()) == (
            one_by_one.get_total_count(), one_by_one.get_min_value(),
            one_by_one.get_max_value()), seed


def test_percentiles_from_the_cumulative_sum_equal_the_packages_walk():
    quantiles = [0.0, 0.1, 1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0]
    for seed in range(20):
        histogram = new_histogram()
        record_latencies(histogram, random_latencies(random.Random(seed)))
        assert values_at_percentiles(histogram, quantiles) == [
            histogram.get_value_at_percentile(q) for q in quantiles], seed


def test_clearing_leaves_what_reset_leaves():
    cleared, reset = new_histogram(), new_histogram()
    for histogram in (cleared, reset):
        record_latencies(histogram, random_latencies(random.Random(7)))
        histogram.set_start_time_stamp(1000)
        histogram.set_end_time_stamp(2000)
    clear_histogram(cleared)
    reset.reset()
    assert list(cleared.counts) == list(reset.counts)
    assert {k: v for k, v in vars(cleared).items() if k not in ("counts", "encoder")} == {
        k: v for k, v in vars(reset).items() if k not in ("counts", "encoder")}
    assert cleared.encode() == reset.encode()
