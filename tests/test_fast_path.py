"""The S13 fast path (eir/lists/_ecr.c) answers exactly as the generic path does.

Differential (tests/helpers_fast_path.py): the same byte stream through a PeerConnection with
`fast_path` on and one with it off gives the same bytes, read for read, and the same events,
counters, verdict counts, observations, audit records, duplicate cache, queues. Checked on
valid ECRs of many shapes (which the fast path must take: else the comparison proves
nothing), on each near miss it must hand back, and by hypothesis on generated and mutated
streams. The coverage-guided run (atheris, target `fast_path`) is tests/test_fuzz.py's;
EIR_FUZZ_INPUTS=1000000 runs it for a million inputs.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers_fast_path as fast
import test_peer_state as sans_io
from eir.core.config import ConfigError, Settings, load_settings
from eir.diameter.constants import APPLICATION_S13
from eir.interfaces.s13 import S13Application, answer_ecrs

pytestmark = pytest.mark.skipif(answer_ecrs is None, reason="eir.lists._lookup is not built")

E = fast.E
PLAIN = fast.ecr(fast.plain_ecr_avps())
ALL_CONFIGURATIONS = [0, 1, 2, 3, 4, 8, 16, 32, 64, 4 | 8 | 16 | 64]


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


# -- the fast path takes what it should, and answers the same ------------------------------

SHAPES = {
    "plain": fast.plain_ecr_avps(),
    "no IMSI, no Software-Version, no Vendor-Specific-Application-Id": fast.plain_ecr_avps(
        imsi=None, software_version=None, vsai=False),
    "15-digit IMEI": fast.plain_ecr_avps(imei=fast.IMEIS[1] + "7"),
    "16-digit IMEISV": fast.plain_ecr_avps(imei=fast.IMEIS[2] + "01"),
    "IMEI+IMSI pair": fast.plain_ecr_avps(fast.IMEIS[2], "001010123456789"),
    "pair listed twice": fast.plain_ecr_avps(fast.IMEIS[8], "001010123456789"),
    "range": fast.plain_ecr_avps(fast.IMEIS[3]),
    "range with its IMSI": fast.plain_ecr_avps("99000000000050", "001010000000001"),
    "TAC": fast.plain_ecr_avps(fast.IMEIS[4]),
    "TAC with its IMSI": fast.plain_ecr_avps(fast.IMEIS[6], "99999"),
    "unknown IMEI": fast.plain_ecr_avps("77777777777777"),
    "grandfathered pair": fast.plain_ecr_avps(fast.IMEIS[5], fast.IMSIS[3]),
    "5-digit IMSI": fast.plain_ecr_avps(imsi="12345"),
    "Destination-Host": fast.plain_ecr_avps(destination_host=True),
    "reordered": list(reversed(fast.plain_ecr_avps())),
    "DRMP, Route-Record, 3GPP2-MEID": fast.plain_ecr_avps() + [
        E("DRMP", 15), E("Route-Record", "dra1.test"), E("Route-Record", "dra_2.test")],
    "MEID in Terminal-Information": fast.plain_ecr_avps()[:-2] + [fast.terminal_information(
        E("3GPP2-MEID", b"\x01\x02\x03"), E("IMEI", fast.IMEIS[0]))] + [E("User-Name", "00101")],
    "odd-length Session-Id (padding)": fast.plain_ecr_avps(session_id="mme;1;12"),
    "Acct-Application-Id": [E("Vendor-Specific-Application-Id", [
        E("Vendor-Id", 10415), E("Acct-Application-Id", 1)])] + fast.plain_ecr_avps(vsai=False),
    "Auth-Session-State 0": [E("Auth-Session-State", 0) if a == E("Auth-Session-State", 1)
                             else a for a in fast.plain_ecr_avps()],
    # V flag and Vendor-Id 0: the generic path reads it as the base AVP, and so does C
    "Session-Id with V flag, vendor 0": [
        b"\0\0\1\x07\xc0\0\0\x0f\0\0\0\0s;1\0"] + fast.plain_ecr_avps()[1:],
    "identity of 255 bytes": [a for a in fast.plain_ecr_avps() if a[:4] != u32(264)] + [
        E("Origin-Host", ".".join(["a" * 63] * 4))],
}


@pytest.mark.parametrize("control", ALL_CONFIGURATIONS)
def test_the_fast_path_answers_every_plain_shape_as_the_generic_path(control):
    requests = [fast.ecr(avps, hop_by_hop=i, end_to_end=i) for i, avps in
                enumerate(SHAPES.values())]
    taken = fast.differential(bytes([control, 0]) + b"".join(requests), fresh=True)
    if control & 4:  # small turns and queues: some answered 3004, the others by the fast path
        assert taken >= 3
    elif control & 16:  # at most 32 AVPs: every shape fits
        assert taken == len(requests)
    else:
        assert taken == len(requests)


def test_each_plain_shape_is_taken_alone():
    """Each shape alone: the fast path answers it (so each comparison above is of a fast
    answer with a generic one), split anywhere across reads too."""
    for name, avps in SHAPES.items():
        request = fast.ecr(avps)
        assert fast.differential(bytes([0, 0]) + request, fresh=True) == 1, name
        assert fast.differential(bytes([8, 7]) + request * 3, fresh=True) == 3, name


# -- near misses: handed back, answered by the generic path --------------------------------

def _replaced(code: int, new: bytes, avps=None) -> list[bytes]:
    """The plain ECR's AVPs with the (first) one of `code` replaced by `new` bytes."""
    avps = list(avps or fast.plain_ecr_avps())
    for i, avp in enumerate(avps):
        if int.from_bytes(avp[:4], "big") == code:
            avps[i] = new
            return avps
    raise AssertionError(code)


def _flags(flags: int) -> bytes:
    return fast.ecr(fast.plain_ecr_avps(), flags=flags)


def _with_plain_length(raw: bytes) -> bytes:
    return raw[:1] + len(raw).to_bytes(3, "big") + raw[4:]


HANDED_BACK = {
    "T flag (duplicate cache)": _flags(0xD0),
    "E flag": _flags(0xE0),
    "reserved header bit": _flags(0xC1),
    "P flag clear": _flags(0x80),
    "answer": _flags(0x40),
    "another command": fast.ecr(fast.plain_ecr_avps(), code=325),
    "another application": fast.ecr(fast.plain_ecr_avps(), application=16777251),
    "Proxy-Info": fast.ecr(fast.plain_ecr_avps() + [E("Proxy-Info", [
        E("Proxy-Host", "dra.test"), E("Proxy-State", b"x")])]),
    "unknown AVP, M flag": fast.ecr(fast.plain_ecr_avps() + [fast.avp(9999, b"x")]),
    "unknown AVP, no M flag": fast.ecr(fast.plain_ecr_avps() + [fast.avp(9999, b"x", 0)]),
    "known AVP outside the grammar": fast.ecr(fast.plain_ecr_avps() + [E("Result-Code", 2001)]),
    "IMEI of 13 digits": fast.ecr(fast.plain_ecr_avps(imei="3520990017614")),
    "IMEI of 17 digits": fast.ecr(fast.plain_ecr_avps(imei="35209900176148000")),
    "IMEI not digits": fast.ecr(fast.plain_ecr_avps(imei="3520990017614x")),
    "IMEI missing": fast.ecr(_replaced(1401, fast.terminal_information(E("Software-Version",
                                                                          "1")))),
    "IMEI twice": fast.ecr(_replaced(1401, fast.terminal_information(
        E("IMEI", fast.IMEIS[0]), E("IMEI", fast.IMEIS[1])))),
    "unknown child of Terminal-Information": fast.ecr(_replaced(1401, fast.terminal_information(
        E("IMEI", fast.IMEIS[0]), fast.avp(1404, b"x", 0xC0, 10415)))),
    "non-ASCII Software-Version": fast.ecr(fast.plain_ecr_avps(software_version="é")),
    "invalid UTF-8 Software-Version": fast.ecr(_replaced(1401, fast.terminal_information(
        E("IMEI", fast.IMEIS[0]), fast.avp(1403, b"\xff", 0xC0, 10415)))),
    "non-ASCII Session-Id": fast.ecr(fast.plain_ecr_avps(session_id="mme;é")),
    "User-Name of 4 digits": fast.ecr(fast.plain_ecr_avps(imsi="0010")),
    "User-Name of 16 digits": fast.ecr(fast.plain_ecr_avps(imsi="0010101234567890")),
    "User-Name not digits": fast.ecr(fast.plain_ecr_avps(imsi="00101012345678a")),
    "User-Name empty": fast.ecr(fast.plain_ecr_avps(imsi="")),
    "User-Name twice": fast.ecr(fast.plain_ecr_avps() + [E("User-Name", "00101")]),
    "Session-Id twice": fast.ecr(fast.plain_ecr_avps() + [E("Session-Id", "x")]),
    "Session-Id missing": fast.ecr(fast.plain_ecr_avps()[1:]),
    "Destination-Realm missing": fast.ecr([a for a in fast.plain_ecr_avps()
                                           if a[:4] != u32(283)]),
    "Origin-Host with a trailing dot": fast.ecr(_replaced(264, E("Origin-Host", "mme.test."))),
    "Origin-Host label ending with -": fast.ecr(_replaced(264, E("Origin-Host", "mme-.test"))),
    "Origin-Host ending with -": fast.ecr(_replaced(264, E("Origin-Host", "mme.test-"))),
    "Origin-Host label starting with -": fast.ecr(_replaced(264, E("Origin-Host", "-mme"))),
    "Origin-Host empty label": fast.ecr(_replaced(264, E("Origin-Host", "mme..test"))),
    "Origin-Host of 64-byte label": fast.ecr(_replaced(264, E("Origin-Host", "a" * 64))),
    "Origin-Host of 256 bytes": fast.ecr(_replaced(264, E("Origin-Host", "a." * 127 + "bc"))),
    "Origin-Host with a space": fast.ecr(_replaced(264, E("Origin-Host", "mme test"))),
    "Origin-Host empty": fast.ecr(_replaced(264, E("Origin-Host", ""))),
    "Route-Record invalid": fast.ecr(fast.plain_ecr_avps() + [E("Route-Record", "a..b")]),
    "DRMP 16": fast.ecr(fast.plain_ecr_avps() + [fast.avp(301, u32(16), 0)]),
    "DRMP of 3 bytes": fast.ecr(fast.plain_ecr_avps() + [fast.avp(301, b"\0\0\1", 0)]),
    "Auth-Session-State 2": fast.ecr(_replaced(277, fast.avp(277, u32(2)))),
    "Vendor-Specific-Application-Id without Vendor-Id": fast.ecr(_replaced(
        260, E("Vendor-Specific-Application-Id", [E("Auth-Application-Id", 1)]))),
    "Vendor-Id of 5 bytes": fast.ecr(_replaced(260, E("Vendor-Specific-Application-Id", [
        fast.avp(266, b"\0\0\0\0\1")]))),
    "AVP length past the end": fast.ecr(fast.plain_ecr_avps() + [b"\0\0\1\x07\x40\0\0\x40"]),
    "AVP length below its header": fast.ecr(fast.plain_ecr_avps() + [b"\0\0\1\x07\x40\0\0\x04"]),
    "message length beyond the bytes": PLAIN[:3] + bytes([PLAIN[3] + 4]) + PLAIN[4:] + b"\0" * 4,
    "33 AVPs (budget of 32)": fast.ecr(fast.plain_ecr_avps() + [E("Route-Record", "r")] * 24),
}


@pytest.mark.parametrize("name", sorted(HANDED_BACK))
def test_a_near_miss_is_handed_back_and_answered_the_same(name):
    request = HANDED_BACK[name]
    control = 16 if name.startswith("33 AVPs") else 8
    # alone, then between two plain ECRs (both taken: the order of answers is kept)
    assert fast.differential(bytes([control, 0]) + request, fresh=True) == 0, name
    assert fast.differential(bytes([control, 0]) + PLAIN + request + PLAIN,
                             fresh=True) == 2, name


def test_the_budget_counts_avps_at_every_depth():
    """32 AVPs with those inside the groups (at the budget): taken; one more: handed back."""
    avps = fast.plain_ecr_avps()  # 8 at the top, 4 inside: 12
    at_budget = fast.ecr(avps + [E("Route-Record", "r")] * 20)
    assert fast.differential(bytes([16, 0]) + at_budget, fresh=True) == 1
    beyond = fast.ecr(avps + [E("Route-Record", "r")] * 21)
    assert fast.differential(bytes([16, 0]) + beyond, fresh=True) == 0


def test_a_retransmission_of_a_fast_answer_is_answered_from_the_duplicate_cache():
    """The fast path stores its answers as the generic path does: the T-flag copy (generic
    path) finds the fast path's answer, byte for byte the one sent, with its new Hop-by-Hop
    id; a copy with other contents is answered anew."""
    original = fast.ecr(fast.plain_ecr_avps(), hop_by_hop=1, end_to_end=77)
    retransmitted = fast.ecr(fast.plain_ecr_avps(), flags=0xD0, hop_by_hop=2, end_to_end=77)
    other = fast.ecr(fast.plain_ecr_avps(imei=fast.IMEIS[1]), flags=0xD0, end_to_end=77)
    generic, side = fast._open_pair(8)
    before = side.application.fast_answers
    for chunk in (original, retransmitted, other):
        assert side.feed(chunk, 1.0) == generic.feed(chunk, 1.0)
    assert side.state() == generic.state()
    assert side.application.fast_answers - before == 1
    assert (side.duplicates.hits, side.duplicates.mismatches) == (1, 1)


def test_a_failing_rule_set_is_answered_by_the_generic_path():
    """An exception in decide(): the generic path answers 5012, as without the fast path."""

    class BrokenRules:  # stands in for a defect anywhere below handle_request
        def decide(self, *args, **kwargs):
            raise RuntimeError("boom")

    peer = sans_io.open_peer()
    application = peer.applications[APPLICATION_S13]
    application.check.rule_set = BrokenRules()
    answer = sans_io.one_message(peer.receive(PLAIN, 1.0))
    assert answer.value("Result-Code") == 5012
    assert application.fast_answers == 0


# -- the switch ----------------------------------------------------------------------------

def test_fast_path_off_leaves_every_request_to_the_generic_path(tmp_path):
    application = S13Application(sans_io.D, sans_io.LOCAL,
                                 fast.EquipmentCheck(fast.RULE_SETS[0]), fast_path=False)
    assert application.answer_run is None
    peer = sans_io.new_peer()
    peer.applications[APPLICATION_S13] = application
    assert Settings().diameter.fast_path is True
    config = tmp_path / "eir.yaml"
    config.write_text("diameter: {fast_path: false}\n")
    assert load_settings(config).diameter.fast_path is False
    config.write_text("diameter: {fast_path: sometimes}\n")
    with pytest.raises(ConfigError, match="diameter.fast_path"):
        load_settings(config)


# -- hypothesis: generated and mutated streams ---------------------------------------------

identities = st.one_of(
    st.sampled_from(["mme.test", "a", "A-9.b_c", "x" * 63, "-a", "a-", "a..b", "a.", ".a",
                     "a b", ""]),
    st.text(alphabet="ab9-_.\n", max_size=10))
digit_strings = st.text(alphabet="0123456789", max_size=18)
imeis = st.one_of(st.sampled_from(fast.IMEIS), st.sampled_from(fast.IMEIS).map(
    lambda imei: imei + "0"), digit_strings, st.text(max_size=16))
imsis = st.one_of(st.sampled_from(fast.IMSIS), digit_strings, st.text(max_size=16))
values = st.sampled_from([0, 1, 2, 15, 16, 10415, APPLICATION_S13, 2**32 - 1])
avp_flags = st.sampled_from([0x40, 0x40, 0x00, 0xC0, 0x60])

terminal_children = st.one_of(
    imeis.map(lambda v: E("IMEI", v)),
    st.text(max_size=4).map(lambda v: E("Software-Version", v)),
    st.binary(max_size=8).map(lambda v: E("3GPP2-MEID", v)),
    st.tuples(st.sampled_from([1404, 1402, 1403]), st.binary(max_size=6), avp_flags,
              st.sampled_from([10415, 0])).map(lambda t: fast.avp(t[0], t[1], t[2], t[3])))
top_avps = st.one_of(
    st.text(max_size=12).map(lambda v: E("Session-Id", v)),
    values.map(lambda v: fast.avp(301, u32(v), 0)),
    st.lists(st.tuples(st.sampled_from([266, 258, 259, 1]), values), max_size=3).map(
        lambda kids: fast.avp(260, b"".join(fast.avp(c, u32(v)) for c, v in kids))),
    values.map(lambda v: fast.avp(277, u32(v))),
    st.tuples(st.sampled_from([264, 296, 293, 283, 282]), identities).map(
        lambda t: fast.avp(t[0], t[1].encode())),
    st.lists(terminal_children, max_size=4).map(lambda kids: fast.terminal_information(*kids)),
    imsis.map(lambda v: E("User-Name", v)),
    st.just(E("Proxy-Info", [E("Proxy-Host", "p.test"), E("Proxy-State", b"s")])),
    st.tuples(st.integers(0, 400), st.binary(max_size=8), avp_flags,
              st.sampled_from([0, 10415, 1])).map(lambda t: fast.avp(*t)),
)


acceptable_avps = st.one_of(  # what a plain ECR may carry besides its own
    st.sampled_from([0, 7, 15]).map(lambda v: E("DRMP", v)),
    st.sampled_from(["dra.test", "d_2"]).map(lambda v: E("Route-Record", v)))
few = st.sampled_from([0, 0, 0, 1, 2])


@st.composite
def ecrs(draw) -> bytes:
    """An ECR: a plain one (half of them as they are) with AVPs dropped, added, moved; odd
    header bits; bytes changed."""
    avps = fast.plain_ecr_avps(draw(st.sampled_from(fast.IMEIS)),
                               draw(st.one_of(st.none(), st.sampled_from(fast.IMSIS))),
                               session_id=draw(st.sampled_from(["m;1", "mme.test;2;33"])),
                               destination_host=draw(st.booleans()), vsai=draw(st.booleans()))
    for _ in range(draw(few)):
        avps.insert(draw(st.integers(0, len(avps))), draw(acceptable_avps))
    if draw(st.booleans()):
        for _ in range(draw(few)):
            avps.pop(draw(st.integers(0, len(avps) - 1)))
        for _ in range(draw(few)):
            avps.insert(draw(st.integers(0, len(avps))), draw(top_avps))
    if draw(st.booleans()):
        avps = draw(st.permutations(avps))
    flags = draw(st.sampled_from([0xC0] * 12 + [0xD0, 0xE0, 0xC8, 0x80, 0x40]))
    raw = bytearray(fast.ecr(avps, flags=flags, code=draw(st.sampled_from([324] * 12 + [325])),
                             hop_by_hop=draw(st.integers(0, 3)), end_to_end=draw(
                                 st.integers(0, 3))))
    for _ in range(draw(few) if draw(st.integers(0, 3)) == 0 else 0):
        raw[draw(st.integers(20, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


streams = st.lists(st.one_of(ecrs(), ecrs(), ecrs(), st.just(sans_io.dwr()),
                             st.just(sans_io.cer(APPLICATION_S13)), st.binary(max_size=24)),
                   min_size=1, max_size=8).map(b"".join)


@settings(max_examples=120, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(control=st.integers(0, 255), chunk=st.sampled_from([0, 0, 0, 1, 7, 64, 200]),
       stream=streams)
def test_hypothesis_fast_and_generic_paths_agree(control, chunk, stream):
    fast.differential(bytes([control, chunk]) + stream, fresh=True)
