"""Fuzzing of the codec, of the Diameter connection handler, of the S13 fast path against the
generic path, and of the N5g-eir HTTP/2 connection (targets: tests/helpers_fuzz.py).

Default run (~35 s): the committed corpus replayed, a hypothesis run of each target (the
Diameter ones with allocations traced; fast_path's is tests/test_fast_path.py), the
regressions found, and a short coverage-guided atheris run of each target (tests/fuzz/run.py,
5 s each).

Long run, behind a flag: `EIR_FUZZ_INPUTS=1000000 .venv/bin/python -m pytest -q
tests/test_fuzz.py -k atheris` runs atheris for that many inputs per target instead
(1M: ~8 min for the codec and ~17 for the peer on 2 idle cores, 24 and 31 min on a loaded
machine; see docs/RELIABILITY.md). fast_path: 1M inputs as two jobs of 500,000 (`run.py
fast_path -runs=500000 -seed=N -max_len=1024`, nice 10), 22-24 min in parallel on a machine
at load ~10, no difference found.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from h2.errors import ErrorCodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers_fuzz
import test_codec
import test_peer_state as sans_io
from eir.diameter.codec import Framer, encode_avp
from eir.diameter.constants import ResultCode
from eir.diameter.dictionary import MAX_GROUPED_DEPTH, AvpError
from eir.diameter.peer import PeerState

TESTS = Path(__file__).resolve().parent
RUNNER = TESTS / "fuzz" / "run.py"
CORPUS = TESTS / "fuzz" / "corpus"
FUZZ_INPUTS = int(os.environ.get("EIR_FUZZ_INPUTS", "0"))  # 0: the short run
SHORT_RUN_SECONDS = 5
E = sans_io.E
PROXY_INFO = sans_io.D["Proxy-Info"]


def corpus_files(target: str) -> list[Path]:
    files = sorted((CORPUS / target).iterdir())
    assert len(files) >= 10, f"corpus of {target} is missing"
    return files


# -- the corpus ----------------------------------------------------------------------------

@pytest.mark.parametrize("target", sorted(helpers_fuzz.TARGETS))
def test_corpus_replays_without_a_crash_or_a_broken_property(target):
    for path in corpus_files(target):
        try:
            helpers_fuzz.TARGETS[target](path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{path.relative_to(TESTS)}: {exc!r}") from exc


def test_peer_corpus_reaches_the_application_and_the_error_answers():
    """The seeds are only worth something if they get past CER to the S13 application and
    to the error answers; a corpus of messages the peer refuses at once would fuzz little."""
    result_codes = set()
    for path in corpus_files("peer"):
        data = path.read_bytes()
        if not data[0] & 1 or data[0] & 0x80:  # the seeds sent after a valid CER
            continue
        peer = helpers_fuzz.new_fuzz_peer(data[0])
        peer.receive(sans_io.cer(sans_io.APPLICATION_S13), 0.0)
        for raw in Framer(0xFFFFFF).feed(peer.receive(data[2:], 1.0)):
            message = sans_io.Message(raw)
            if message.header.code == sans_io.ECR and message.all("Result-Code"):
                result_codes.add(message.value("Result-Code"))
    assert {2001, 3008, 5004, 5005, 5014} <= result_codes, result_codes


# -- regressions found by the fuzzer ---------------------------------------------------------

def nested(avp_name: str, levels: int, innermost: bytes) -> bytes:
    """`levels` Grouped AVPs of one kind, each holding the next, around `innermost`."""
    definition = sans_io.D[avp_name]
    for _ in range(levels):
        innermost = encode_avp(definition.code, definition.flags, definition.vendor, innermost)
    return innermost


def ecr_with(extra: bytes) -> bytes:
    return sans_io.request(sans_io.ECR, sans_io.ecr()[20:] + extra, sans_io.APPLICATION_S13,
                           sans_io.FLAG_REQUEST | sans_io.FLAG_PROXIABLE)


def test_nested_proxy_info_reproducer_is_in_the_corpus():
    """RecursionError escaped PeerConnection.receive on an ECR holding Proxy-Info nested
    900 deep (its grammar's *[ AVP ] admits itself): the connection died without answer."""
    reproducer = (CORPUS / "peer" / "crash-nested-proxy-info").read_bytes()
    assert reproducer[2:].count(PROXY_INFO.code.to_bytes(4, "big")) > 800
    helpers_fuzz.fuzz_peer(reproducer)


def test_grouped_avps_nested_too_deep_get_5004_and_the_connection_stays_open():
    peer = sans_io.open_peer()
    proxy_info = nested("Proxy-Info", 3000, E("Proxy-Host", "dra.test"))
    answer = sans_io.one_message(peer.receive(ecr_with(proxy_info), 1.0))
    assert answer.value("Result-Code") == ResultCode.INVALID_AVP_VALUE
    assert answer.value("Session-Id") == "mme.test;1"
    assert answer.value("Error-Message").startswith("Proxy-Info: Proxy-Info: ")
    assert f"nested more than {MAX_GROUPED_DEPTH} deep" in sans_io.event_text(peer)
    assert peer.state is PeerState.OPEN
    assert sans_io.one_message(peer.receive(sans_io.ecr(), 2.0)).value("Result-Code") == 2001


def test_nesting_in_a_cer_before_any_authentication_gets_a_5004_cea_and_a_close():
    """The CER grammar admits *[ AVP ] too: any TCP client could hit the RecursionError."""
    peer = sans_io.new_peer()
    failed = nested("Failed-AVP", 900, E("Origin-Host", "x"))
    cea = sans_io.one_message(peer.receive(sans_io.cer(sans_io.APPLICATION_S13, extra=failed),
                                           0.0))
    assert cea.value("Result-Code") == ResultCode.INVALID_AVP_VALUE
    assert peer.closed and "CER refused with 5004" in peer.closed_reason


@pytest.mark.parametrize("levels, refused", [(MAX_GROUPED_DEPTH, False),
                                             (MAX_GROUPED_DEPTH + 1, True)])
def test_grouped_nesting_limit_is_exact(levels, refused):
    grammar = sans_io.D.command(sans_io.APPLICATION_S13, sans_io.ECR).request
    avps = sans_io.Message(ecr_with(nested("Failed-AVP", levels, E("Origin-Host", "x")))).avps
    if not refused:
        assert sans_io.D.validate(avps, grammar).groups["Failed-AVP"]
        return
    with pytest.raises(AvpError) as caught:
        sans_io.D.validate(avps, grammar)
    assert caught.value.result_code == ResultCode.INVALID_AVP_VALUE


# -- no allocation driven by a length field ------------------------------------------------

def traced_peak(action) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def with_length_word(message: bytes, length: int) -> bytes:
    return b"\1" + length.to_bytes(3, "big") + message[4:]


ECR = sans_io.ecr()
LYING_LENGTHS = {
    "message length 16 MiB, above the maximum": with_length_word(ECR, 0xFFFFFC),
    "message length the maximum, 140 bytes sent": with_length_word(ECR, 65536),
    "AVP length 16 MiB": ECR[:-4] + b"\0\xff\xff\xff",
    "Grouped AVP holding an AVP of length 16 MiB": ecr_with(encode_avp(
        PROXY_INFO.code, PROXY_INFO.flags, 0, b"\0\0\1\x18\x40\xff\xff\xff")),
}


@pytest.mark.parametrize("data", LYING_LENGTHS.values(), ids=LYING_LENGTHS.keys())
def test_a_declared_length_is_never_allocated(data):
    peer = sans_io.open_peer()
    peak = traced_peak(lambda: peer.receive(data, 1.0))
    assert peak < 16 * 1024, peak  # the 64 KiB maximum, let alone 16 MiB, would show


def test_traced_peak_does_see_a_message_held_whole():
    """The bound above can fail: a real 60 KiB message read in two parts is held (~60 KiB)."""
    message = sans_io.request(sans_io.DWR, sans_io.PEER_ORIGIN + E("Error-Message", "x" * 60000))
    peer = sans_io.open_peer()
    peer.receive(message[:100], 1.0)
    assert traced_peak(lambda: peer.receive(message[100:], 1.0)) > 60000


# -- hypothesis: the same targets, with allocations traced ---------------------------------

control = st.binary(min_size=2, max_size=2)
stream = st.lists(st.one_of(test_codec.any_input, st.binary(max_size=40)),
                  max_size=4).map(b"".join)
fuzz_inputs = st.builds(lambda head, body: head + body, control, stream)


@settings(max_examples=300, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow])
@given(data=fuzz_inputs)
def test_hypothesis_codec(data):
    # Cutting, decoding and validating copy each byte a few times; a length field obeyed
    # would allocate up to 16 MiB.
    assert traced_peak(lambda: helpers_fuzz.fuzz_codec(data)) < 64 * 1024 + 16 * len(data)


@settings(max_examples=300, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow])
@given(data=fuzz_inputs)
def test_hypothesis_peer(data):
    # The peer and its S13 application are built inside the target: ~100 KiB of that.
    assert traced_peak(lambda: helpers_fuzz.fuzz_peer(data)) < 256 * 1024 + 16 * len(data)


# -- the N5g-eir HTTP/2 connection -----------------------------------------------------------

def test_h2_corpus_reaches_answers_stream_errors_and_every_goaway_code():
    """The h2 seeds get past the preface to answers, to stream errors and to each
    connection error, so that the fuzzer starts from every branch of SbiSession."""
    statuses, resets, goaways = set(), set(), set()
    for path in corpus_files("h2"):
        run = helpers_fuzz.fuzz_h2(path.read_bytes())
        statuses.update(run.statuses)
        resets.update(run.resets)
        goaways.add(run.goaway)
    assert {b"200", b"405"} <= statuses, statuses
    assert {ErrorCodes.REFUSED_STREAM, ErrorCodes.PROTOCOL_ERROR} <= resets, resets
    assert {ErrorCodes.NO_ERROR, ErrorCodes.PROTOCOL_ERROR, ErrorCodes.FLOW_CONTROL_ERROR,
            ErrorCodes.FRAME_SIZE_ERROR, ErrorCodes.COMPRESSION_ERROR,
            ErrorCodes.ENHANCE_YOUR_CALM} <= goaways, goaways


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags)) +
            stream_id.to_bytes(4, "big") + payload)


# Frames of every type (and a few unknown ones), on the streams that matter: the connection,
# the first requests, an even (server) id, the highest id.
h2_frames = st.builds(h2_frame, st.integers(0, 11), st.integers(0, 255),
                      st.sampled_from([0, 1, 3, 5, 2, 2**31 - 1]), st.binary(max_size=48))
h2_inputs = st.builds(lambda control, chunk, frames: bytes([control, chunk]) + b"".join(frames),
                      st.integers(0, 255).map(lambda c: c | 2), st.integers(0, 255),
                      st.lists(st.one_of(h2_frames, st.binary(max_size=16)), max_size=12))


@settings(max_examples=300, deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow])
@given(data=h2_inputs)
def test_hypothesis_h2(data):
    helpers_fuzz.fuzz_h2(data)


# -- atheris: coverage-guided ----------------------------------------------------------------

@pytest.mark.parametrize("target", sorted(helpers_fuzz.TARGETS))
def test_atheris(target, tmp_path):
    """A short run by default; EIR_FUZZ_INPUTS=N runs N inputs (no time limit)."""
    limit = (f"-runs={FUZZ_INPUTS}" if FUZZ_INPUTS
             else f"-max_total_time={SHORT_RUN_SECONDS}")
    result = subprocess.run([sys.executable, str(RUNNER), target, "--work", str(tmp_path),
                             limit], capture_output=True, text=True)
    log = "\n".join(line for line in result.stderr.splitlines()
                    if not line.startswith("INFO: Instrumenting"))
    artifacts = sorted(p.name for p in tmp_path.iterdir() if "-" in p.name
                       and p.name.split("-")[0] in ("crash", "timeout", "oom", "leak"))
    assert result.returncode == 0 and not artifacts, f"{artifacts}\n{log[-6000:]}"
    runs = int(re.search(r"stat::number_of_executed_units: (\d+)", log).group(1))
    assert runs >= (FUZZ_INPUTS or 100), log[-3000:]  # short run: it did run
