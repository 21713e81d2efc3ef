"""`eir conformance`: every check passes against a live `eir serve`, and each one fails against
a deliberately wrong stand-in.

The stand-in is a proxy in front of the same live `eir serve`, with one fault switched on:
it rewrites the answers (a wrong Result-Code, 5422 in Result-Code, Proxy-Info dropped, the P
bit cleared...), rewrites or swallows requests (the M bit ignored, DWR unanswered, a version 2
message left hanging), or frames the stream wrongly (one message per read). The EIR behind it
is correct, so each failure is the fault's, and the check that names it is the one caught.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest
from helpers_process import EXAMPLE_LIST, RunningServer, run_eir, start_eir

from eir.conformance import (CHECKS, FAIL, PASS, Expected, Identity, Probe, dictionary,
                             read_expectations, run_checks)
from eir.diameter.codec import Avp, Framer, decode_avps, encode_message, parse_header
from eir.diameter.constants import (APPLICATION_S13, COMMAND_DEVICE_WATCHDOG,
                                    COMMAND_DISCONNECT_PEER, COMMAND_ME_IDENTITY_CHECK,
                                    FLAG_ERROR, FLAG_PROXIABLE, VENDOR_3GPP)

SESSION_ID, RESULT_CODE, AUTH_APPLICATION_ID, VSAI = 263, 268, 258, 260
AUTH_SESSION_STATE, FAILED_AVP, ERROR_MESSAGE, PROXY_INFO, EXPERIMENTAL_RESULT = \
    277, 279, 281, 284, 297
TERMINAL_INFORMATION, IMEI, SOFTWARE_VERSION, USER_NAME, EQUIPMENT_STATUS = \
    1401, 1402, 1403, 1, 1445
DEADLINE_S = 0.3  # the pipelining deadline in these runs; the slow fault waits longer


@pytest.fixture(scope="module")
def eir(tmp_path_factory) -> RunningServer:
    server = start_eir(cwd=tmp_path_factory.mktemp("conformance"))
    yield server
    server.kill()


def test_every_check_passes_against_eir_serve(eir):
    result = run_eir("conformance", "--target", f"{eir.host}:{eir.port}",
                     "--expect", str(EXAMPLE_LIST), "--json", timeout=60)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    failures = [c for c in report["checks"] if c["status"] != PASS]
    assert failures == [], result.stderr
    assert result.returncode == 0
    assert [c["check"] for c in report["checks"]] == [c.name for c in CHECKS]
    assert all(c["clause"] for c in report["checks"])
    assert report["passed"] == len(CHECKS) and report["failed"] == 0


def test_user_expectations_csv(eir, tmp_path):
    """imei,imsi,expected rows: a right one passes; a wrong one fails with its line; a bad
    expectation file is a usage error (exit 2) naming the line."""
    good = tmp_path / "good.csv"
    good.write_text("imei,imsi,expected\n352099001761481,,BLACKLISTED\n"
                    "12345678901234,001010000000004,5422\n3520990017614,,5004\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("imei,imsi,expected\n352099001761481,,WHITELISTED\n")
    target = f"{eir.host}:{eir.port}"
    assert run_eir("conformance", "--target", target, "--check", "verdicts",
                   "--expect", str(good)).returncode == 2  # 13 digits: not an IMEI
    good.write_text("imei,imsi,expected\n352099001761481,,BLACKLISTED\n"
                    "12345678901234,001010000000004,5422\n")
    assert run_eir("conformance", "--target", target, "--check", "verdicts",
                   "--expect", str(good)).returncode == 0
    wrong = run_eir("conformance", "--target", target, "--check", "verdicts",
                    "--expect", str(bad))
    assert wrong.returncode == 1
    assert "bad.csv:2: IMEI 352099001761481" in wrong.stdout
    assert "2001 BLACKLISTED, expected 2001 WHITELISTED" in wrong.stdout
    unusable = tmp_path / "unusable.csv"
    unusable.write_text("imei,imsi,expected\n352099001761481,,PURPLE\n")
    refused = run_eir("conformance", "--target", target, "--expect", str(unusable))
    assert refused.returncode == 2
    assert "unusable.csv:2: expected: 'PURPLE'" in refused.stderr


def test_declared_unknown_default(eir):
    """An EIR declared to answer GREYLISTED for unknown IMEIs fails the check when it
    answers 5422; the default declaration (5422) passes."""
    target = f"{eir.host}:{eir.port}"
    assert run_eir("conformance", "--target", target, "--check", "unknown-imei").returncode == 0
    declared = run_eir("conformance", "--target", target, "--check", "unknown-imei",
                       "--unknown", "GREYLISTED")
    assert declared.returncode == 1
    assert "expected 2001 GREYLISTED" in declared.stdout


def test_usage_errors_exit_2():
    for args, said in ((["--check", "no-such-check"], "--check no-such-check: no such check"),
                       (["--timeout", "0"], "--timeout and --deadline must be more than 0"),
                       (["--unknown", "PURPLE"], "--unknown: 'PURPLE' is not")):
        result = run_eir("conformance", "--target", "127.0.0.1:1", *args)
        assert result.returncode == 2, result.stderr
        assert said in result.stderr


def test_unreachable_target_exits_1():
    result = run_eir("conformance", "--target", "127.0.0.1:1", "--check", "dwr-dwa")
    assert result.returncode == 1
    assert "cannot connect to 127.0.0.1:1" in result.stdout


# -- the wrong stand-in ---------------------------------------------------------------------------

def _avps(raw: bytes) -> list[Avp]:
    return decode_avps(raw, 20, len(raw))


def _rebuild(raw: bytes, avps: list[Avp], flags: int | None = None,
             application: int | None = None) -> bytes:
    header = parse_header(raw)
    return encode_message(header.flags if flags is None else flags, header.code,
                          header.application if application is None else application,
                          header.hop_by_hop, header.end_to_end,
                          b"".join(avp.encode() for avp in avps))


def _without(raw: bytes, *codes: int) -> bytes:
    return _rebuild(raw, [avp for avp in _avps(raw) if avp.code not in codes])


def _encoded(name: str, value) -> Avp:
    data = dictionary().encode(name, value)
    return decode_avps(data, 0, len(data))[0]


def _as_unknown(raw: bytes) -> bytes:
    """The answer an EIR gives an IMEI it did not find: Experimental-Result 5422."""
    encode = dictionary().encode
    kept = [avp for avp in _avps(raw) if avp.code not in (RESULT_CODE, EQUIPMENT_STATUS,
                                                            EXPERIMENTAL_RESULT)]
    return _rebuild(raw, kept + [_encoded("Experimental-Result", [
        encode("Vendor-Id", VENDOR_3GPP), encode("Experimental-Result-Code", 5422)])])


@dataclass
class Sent:
    """What the stand-in noted of a request, to fault its answer."""

    imei: str | None
    software_version: bool
    user_name: bool


def _sent(raw: bytes) -> Sent:
    imei, software_version, user_name = None, False, False
    for avp in _avps(raw):
        if avp.code == USER_NAME:
            user_name = True
        elif avp.code == TERMINAL_INFORMATION and avp.vendor == VENDOR_3GPP:
            for child in decode_avps(avp.data, 0, len(avp.data)):
                if child.code == IMEI:
                    imei = child.data.decode()
                elif child.code == SOFTWARE_VERSION:
                    software_version = True
    return Sent(imei, software_version, user_name)


def _status_to_grey(raw: bytes) -> bytes:
    return _rebuild(raw, [avp if avp.code != EQUIPMENT_STATUS
                          else _encoded("Equipment-Status", 2) for avp in _avps(raw)])


def _invalid_as_greylisted(raw: bytes) -> bytes:
    """5004 for a non-digit IMEI turned into 2001 GREYLISTED, as PyHSS answers it."""
    avps = _avps(raw)
    if not any(a.code == RESULT_CODE and a.data == (5004).to_bytes(4, "big") for a in avps):
        return raw
    kept = [a for a in avps if a.code not in (RESULT_CODE, FAILED_AVP, ERROR_MESSAGE)]
    return _rebuild(raw, kept + [_encoded("Result-Code", 2001),
                                 _encoded("Equipment-Status", 2)])


def _result_5422(raw: bytes) -> bytes:
    avps = _avps(raw)
    if not any(a.code == EXPERIMENTAL_RESULT for a in avps):
        return raw
    return _rebuild(raw, [a for a in avps if a.code != EXPERIMENTAL_RESULT]
                    + [_encoded("Result-Code", 5422)])


def _other_session(raw: bytes) -> bytes:
    avps = _avps(raw)
    avps = [Avp(a.code, a.flags, a.vendor, a.data[::-1]) if a.code == SESSION_ID else a
            for a in avps]
    return _rebuild(raw, avps)


def _is_eca(raw: bytes) -> bool:
    return parse_header(raw).code == COMMAND_ME_IDENTITY_CHECK


# Answer faults: (answer, what the stand-in noted of its request) → the answer sent instead.
ANSWER_FAULTS = {
    "cer-cea": lambda raw, sent: (_without(raw, AUTH_APPLICATION_ID, VSAI)
                                  if parse_header(raw).code == 257 else raw),
    "eca-header": lambda raw, sent: (_rebuild(raw, _avps(raw), parse_header(raw).flags
                                              & ~FLAG_PROXIABLE) if _is_eca(raw) else raw),
    "eca-avps": lambda raw, sent: _without(raw, AUTH_SESSION_STATE) if _is_eca(raw) else raw,
    "echo": lambda raw, sent: _other_session(raw) if _is_eca(raw) else raw,
    "proxy-info": lambda raw, sent: _without(raw, PROXY_INFO),
    "unknown-imei": lambda raw, sent: _result_5422(raw),
    "verdicts": lambda raw, sent: _status_to_grey(raw),
    # An exact string match on the IMEI, as a PyHSS does: a 15th or 16th digit misses.
    "imei-lengths": lambda raw, sent: (_as_unknown(raw) if sent and sent.imei
                                       and len(sent.imei) != 14 else raw),
    "software-version": lambda raw, sent: (_as_unknown(raw) if sent and sent.software_version
                                           else raw),
    "no-user-name": lambda raw, sent: (_without(raw, EQUIPMENT_STATUS)
                                       if sent and not sent.user_name else raw),
    "malformed-imei": lambda raw, sent: _invalid_as_greylisted(raw),
    "missing-avp": lambda raw, sent: _without(raw, FAILED_AVP),
}

# Request faults: the request as the EIR behind gets it (None: swallowed, never answered).
REQUEST_FAULTS = {
    # An EIR that ignores the M bit of AVPs it does not know.
    "unknown-m-avp": lambda raw: _rebuild(raw, [a for a in _avps(raw) if a.code < 0x10000000]),
    "wrong-application": lambda raw: (_rebuild(raw, _avps(raw), application=APPLICATION_S13)
                                      if parse_header(raw).code == COMMAND_ME_IDENTITY_CHECK
                                      else raw),
    "e-bit-request": lambda raw: _rebuild(raw, _avps(raw), parse_header(raw).flags
                                          & ~FLAG_ERROR),
    "dwr-dwa": lambda raw: None if parse_header(raw).code == COMMAND_DEVICE_WATCHDOG else raw,
    "dpr-dpa": lambda raw: None if parse_header(raw).code == COMMAND_DISCONNECT_PEER else raw,
}

# Stream faults, by check: how the stand-in reads the client's bytes.
PER_READ = {"framing-split", "framing-many"}  # each read taken as whole messages
HANG_ON_VERSION = {"version"}  # a version 2 message: nothing more is read, nothing answered
SLOW = {"pipelining"}  # every answer held back past the deadline

# What each check must say when it catches its fault.
CAUGHT = {
    "cer-cea": "does not advertise S13",
    "eca-header": "P bit of the answer differs",
    "eca-avps": "0 Auth-Session-State AVPs",
    "echo": "Session-Id b'2;ecnamrofnoc",
    "proxy-info": "0 Proxy-Info AVPs echoed",
    "unknown-imei": "Result-Code 5422 beside or instead of Experimental-Result",
    "verdicts": "2001 GREYLISTED, expected 2001 BLACKLISTED",
    "imei-lengths": "(15 digits): Experimental-Result 5422 (vendor 10415), expected 2001",
    "software-version": "with Software-Version 23: Experimental-Result 5422",
    "no-user-name": "without User-Name: 2001, expected 2001 BLACKLISTED",
    "malformed-imei": "Result-Code 2001 (2001 GREYLISTED), expected 5004",
    "missing-avp": "no Failed-AVP in the 5005 answer",
    "unknown-m-avp": "expected 5001",
    "wrong-application": "expected 3007",
    "e-bit-request": "expected 3008",
    "version": "no answer within",
    "dwr-dwa": "no answer within",
    "dpr-dpa": "no answer within",
    "pipelining": "64 of 64 pipelined ECRs unanswered",
    "framing-split": "no answer within",
    "framing-many": "3 of 4 messages sent in one segment unanswered",
}

# One fault per check, and every check has one.
assert (set(ANSWER_FAULTS) | set(REQUEST_FAULTS) | PER_READ | HANG_ON_VERSION | SLOW
        == set(CAUGHT) == {c.name for c in CHECKS})


class StandIn:
    """A proxy to the live EIR that commits the fault named after one check."""

    def __init__(self, fault: str, upstream: tuple[str, int]):
        self.fault = fault
        self.upstream = upstream
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _client(self, reader, writer) -> None:
        self.tasks.add(asyncio.current_task())
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        sent: dict[int, Sent] = {}
        downstream = asyncio.ensure_future(self._answers(up_reader, writer, sent))
        self.tasks.add(downstream)
        try:
            await self._requests(reader, up_writer, sent)
            up_writer.write_eof()
            await downstream  # the answers still on their way
        except (asyncio.CancelledError, ConnectionError):
            pass  # stopped at the end of the test, or the client went away
        finally:
            downstream.cancel()
            up_writer.close()
            writer.close()

    async def _requests(self, reader, up_writer, sent) -> None:
        framer = Framer(1 << 20)
        fault = self.fault
        unframed = False
        while data := await reader.read(65536):
            if unframed:
                up_writer.write(data)
                continue
            if fault in PER_READ:
                # The message is taken to start and end with the read: the first whole one
                # is served, the rest dropped.
                length = int.from_bytes(data[1:4], "big") if len(data) >= 4 else 0
                messages = [data[:length]] if 20 <= length <= len(data) else []
            else:
                messages = framer.feed(data)
                if framer.error is not None:
                    if fault in HANG_ON_VERSION:
                        await asyncio.Event().wait()  # wedged: reads nothing, answers nothing
                    # The version check writes its message alone: this read is that message,
                    # passed on for the EIR behind to judge, and the rest of the stream too.
                    up_writer.write(data)
                    unframed = True
            for message in messages:
                sent[parse_header(message).hop_by_hop] = _sent(message)
                request_fault = REQUEST_FAULTS.get(fault)
                if request_fault is not None:
                    message = request_fault(message)
                if message is not None:
                    up_writer.write(message)

    async def _answers(self, up_reader, writer, sent) -> None:
        framer = Framer(1 << 20)
        answer_fault = ANSWER_FAULTS.get(self.fault)
        loop = asyncio.get_running_loop()
        while data := await up_reader.read(65536):
            for message in framer.feed(data):
                if answer_fault is not None:
                    message = answer_fault(message, sent.get(parse_header(message).hop_by_hop))
                if self.fault in SLOW:
                    loop.call_later(DEADLINE_S * 1.5, self._late, writer, message)
                else:
                    writer.write(message)
        writer.close()

    @staticmethod
    def _late(writer, message: bytes) -> None:
        if not writer.is_closing():
            writer.write(message)


@pytest.fixture(scope="module")
def expectations():
    return read_expectations(EXAMPLE_LIST)


@pytest.mark.parametrize("name", [c.name for c in CHECKS])
def test_each_check_fails_against_a_wrong_stand_in(eir, expectations, name):
    async def scenario():
        stand_in = StandIn(name, (eir.host, eir.port))
        port = await stand_in.start()
        probe = Probe("127.0.0.1", port, Identity(), timeout=0.5, deadline=DEADLINE_S,
                      expectations=expectations, unknown=Expected(result=5422))
        try:
            through_proxy = await run_checks(probe, [name])
            honest = StandIn("none", (eir.host, eir.port))
            probe.port = await honest.start()
            try:
                without_fault = await run_checks(probe, [name])
            finally:
                await honest.stop()
        finally:
            await stand_in.stop()
        return through_proxy[0], without_fault[0]

    faulty, honest = asyncio.run(scenario())
    assert faulty.outcome.status == FAIL, faulty
    assert CAUGHT[name] in faulty.outcome.detail, faulty
    # The same proxy without its fault passes: the failure is the fault's, not the proxy's.
    assert honest.outcome.status == PASS, honest
