"""The differential harness of the S13 fast path (eir/lists/_ecr.c): the same byte stream
through two PeerConnections alike in all but `fast_path` (on: plain ECRs answered in C; off:
the generic path only) must give the same bytes back, call for call, and leave the same state
behind at the end: events, counters, verdict counts, observations, audit records, duplicate cache,
queues and admission totals. Used by tests/test_fast_path.py (hypothesis) and by the atheris
target `fast_path` (tests/fuzz/run.py, registered in tests/helpers_fuzz.py).

Input layout (as the other fuzz targets, tests/helpers_fuzz.py): two control bytes, then
the stream as the peer sends it (a valid CER is received first: the fast path serves open
connections only).
  byte 0: bits 0-1 → the rule set (unknown policy UNKNOWN; BLACKLISTED; BLACKLISTED with
          grandfathering; no lists but the example's exact IMEIs); bit 2 → admission limits
          (small turns and queues: the 3004 and backlog paths); bit 3 → duplicate detection;
          bit 4 → max_avps_per_message 32 (else 128); bit 5 → max_message_bytes 1024 (else
          65536); bit 6 → audit log; bit 7 → the clock steps 11 s between chunks (past the
          CER timeout; timers are not run, the duplicate window counts).
  byte 1: the stream is fed in chunks of this many bytes (0: whole).
"""

from __future__ import annotations

import tempfile
from datetime import date
from pathlib import Path

from eir.check.observations import GrandfatherIndex, ObservationLog
from eir.check.observations import backend as observation_backend
from eir.check.service import EquipmentCheck
from eir.core.decision import UnknownPolicy, today
from eir.core.logs import AuditLog
from eir.diameter.codec import encode_avp
from eir.diameter.constants import APPLICATION_S13, FLAG_PROXIABLE, FLAG_REQUEST
from eir.diameter.duplicates import DuplicateCache
from eir.diameter.overload import Admission
from eir.diameter.peer import PeerConnection, PeerState, Timers
from eir.interfaces.metrics import DiameterCounters
from eir.interfaces.s13 import S13Application
from eir.lists.native import load_rule_set

import test_peer_state as sans_io

D = sans_io.D
E = D.encode
ROOT = Path(__file__).resolve().parent.parent
_SCRATCH = Path(tempfile.mkdtemp(prefix="eir-fast-path-"))

# The example lists, and more: an IMEI+IMSI pair listed in two lists, a range with an IMSI,
# a TAC with an IMSI.
IMEIS = ["35209900176148", "35332106470089", "49015420323751", "35000000000042",
         "86000000123456", "99000000000001", "12345678901234", "35000000010000",
         "49015420323752", "86000001000000"]
IMSIS = ["001010123456789", "001010000000001", "99999", "001010123456780"]
_EXTRA_ROWS = """\
49015420323752,whitelist,001010123456789,pair listed twice
99000000000000-99000000000099,greylist,001010000000001,range with an IMSI
12345678,whitelist,99999,TAC with an IMSI
"""


def _rule_sets():
    lists = _SCRATCH / "lists.csv"
    lists.write_text((ROOT / "config" / "lists" / "example.csv").read_text() + _EXTRA_ROWS)
    more = _SCRATCH / "more.csv"
    more.write_text("imei,status,imsi,reason\n49015420323752,greylist,001010123456789,"
                    "pair listed twice\n")
    exact_only = _SCRATCH / "exact.csv"
    exact_only.write_text("imei,status,imsi,reason\n35209900176148,blacklist,,stolen\n"
                          "35332106470089,greylist,,clone\n")
    grandfathering = GrandfatherIndex(date(2100, 1, 1))
    grandfathering.learn([(20240101, IMEIS[6], IMSIS[0]), (20240101, IMEIS[5], IMSIS[3])])
    return [load_rule_set([lists, more], UnknownPolicy.UNKNOWN),
            load_rule_set([lists, more], UnknownPolicy.BLACKLISTED),
            load_rule_set([lists, more], UnknownPolicy.BLACKLISTED, grandfathering),
            load_rule_set([exact_only], UnknownPolicy.WHITELISTED)]


RULE_SETS = _rule_sets()
CER = sans_io.cer(APPLICATION_S13)


class Side:
    """One connection with everything the hot path feeds, fast path on or off."""

    # The applications, by (configuration, fast path): building one encodes its templates
    # (~50 µs); each Side gives it new counters, observations, audit, so that one
    # configuration has one pair of Sides in use at a time (see differential).
    _applications: dict[tuple[int, bool], S13Application] = {}
    _backends: dict[bool, object] = {}

    def __init__(self, control: int, fast_path: bool):
        self.counters = DiameterCounters.for_dictionary(D)
        backend = Side._backends.get(fast_path)
        if backend is None:  # never opened: the log is never flushed
            backend = Side._backends[fast_path] = observation_backend(
                _SCRATCH / f"{'fast' if fast_path else 'generic'}.sqlite")
        self.observations = ObservationLog(backend)
        self.audit = AuditLog(_SCRATCH / "audit.jsonl") if control & 64 else None
        key = (control, fast_path)
        application = Side._applications.get(key)
        if application is None:
            application = Side._applications[key] = S13Application(
                D, sans_io.LOCAL, EquipmentCheck(RULE_SETS[control & 3]), fast_path=fast_path)
        application.check.observations = self.observations
        application.verdict_counts = self.counters.verdicts
        application.answers.counters = self.counters
        application.audit = self.audit
        self.application = application
        self.admission = (Admission(requests_per_turn=3, max_queued_per_connection=4,
                                    max_queued_total=8, bytes_per_turn=700,
                                    max_queued_bytes_per_connection=1500,
                                    max_queued_bytes_total=3000) if control & 4 else None)
        self.duplicates = DuplicateCache(60.0, 50, 1 << 20) if control & 8 else None
        self.peer = PeerConnection(
            D, sans_io.LOCAL, {APPLICATION_S13: application}, now=0.0,
            local_addresses=("127.0.0.1",),
            timers=Timers(watchdog=sans_io.TW, watchdog_jitter=0,
                          cer_timeout=sans_io.CER_TIMEOUT,
                          disconnect_timeout=sans_io.DPA_TIMEOUT),
            max_message_bytes=1024 if control & 32 else 65536,
            max_avps_per_message=32 if control & 16 else 128,
            duplicates=self.duplicates, admission=self.admission, counters=self.counters)

    now = 0.0  # the clock of this connection's reads

    def feed(self, chunk: bytes, now: float) -> list[bytes]:
        """What the peer writes for one read: receive(), then resume() while work waits."""
        out = [self.peer.receive(chunk, now)]
        while self.peer.backlog and not self.peer.closed:
            out.append(self.peer.resume(now))
        return out

    def state(self) -> dict:
        peer, counters = self.peer, self.counters
        state = {
            "events": peer.events, "state": peer.state, "closed": peer.closed_reason,
            "backlog": peer.backlog, "reading": peer.reading, "busy": peer.refused_busy,
            "answered": dict(peer.answered),  # per connection, by outcome (GET /v1/peers)
            "last request": peer._last_request,  # the idle timeout's clock
            "requests": counters.requests, "received": counters.received,
            "answers": counters.answers, "verdicts": counters.verdicts,
            "observations": self.observations._days, "dropped": self.observations.dropped,
        }
        if self.audit is not None:  # every field but the time
            state["audit"] = [record[1:] for record in self.audit._pending]
        if self.duplicates is not None:
            cache = self.duplicates
            state["duplicates"] = (list(cache._entries.items()), cache.bytes, cache.hits,
                                   cache.misses, cache.mismatches)
        if self.admission is not None:
            state["admission"] = (self.admission.queued_total,
                                  self.admission.queued_bytes_total,
                                  self.admission.refused_total)
        return state


def chunks_of(stream: bytes, size: int) -> list[bytes]:
    if not size or size >= len(stream):
        return [stream]
    return [stream[i:i + size] for i in range(0, len(stream), size)]


# Open connections kept between inputs, by configuration (control byte without the clock
# bit): opening one costs ~1 ms, most of an input's time. Reused while both sides are open,
# hold no partial message and no backlog, for at most REUSE_INPUTS inputs. What an earlier
# input left (counts, observations, cached answers) is the same on both sides.
_OPEN: dict[int, tuple[Side, Side]] = {}
_USES: dict[int, int] = {}
REUSE_INPUTS = 200


def _open_pair(control: int) -> tuple[Side, Side]:
    _OPEN.pop(control, None)  # its applications are the new pair's now
    generic, fast = Side(control, False), Side(control, True)
    assert generic.feed(CER, 0.0) == fast.feed(CER, 0.0)
    return generic, fast


def _reusable(side: Side) -> bool:
    peer = side.peer
    return peer.state is PeerState.OPEN and not peer.backlog and not peer._framer.buffered


def differential(data: bytes, fresh: bool = False) -> int:
    """Feed the input (layout: module docstring) to both sides; assert they agree. Returns
    how many requests the fast path answered. Unless `fresh`, on connections an earlier
    input left open (see _OPEN); a difference found there is run again on new connections,
    so that the failure says whether the input alone shows it."""
    if len(data) < 2:
        return 0
    control, chunk_size, stream = data[0], data[1], data[2:]
    key = control & 0x7F
    pair = _OPEN.pop(key, None)
    if fresh:
        pair = None
    reused = pair is not None
    if pair is None:
        pair, _USES[key] = _open_pair(key), 0
    generic, fast = pair
    before = fast.application.fast_answers
    step = 11.0 if control & 128 else 0.0
    try:
        for chunk in chunks_of(stream, chunk_size):
            if generic.peer.closed:
                assert fast.peer.closed
                break
            want, got = generic.feed(chunk, generic.now), fast.feed(chunk, fast.now)
            assert got == want, (chunk, got, want)
            generic.now += step
            fast.now += step
        # What accumulates (counts, records, the cache), compared once: after every read
        # would cost a chunk-by-chunk input hundreds of comparisons.
        assert fast.state() == generic.state()
    except AssertionError:
        if reused:
            differential(data, fresh=True)  # raises if the input alone shows it
            raise AssertionError("the paths differ on this input only after earlier inputs "
                                 "on the same connection") from None
        raise
    _USES[key] += 1
    if not fresh and _USES[key] < REUSE_INPUTS and _reusable(generic) and _reusable(fast):
        _OPEN[key] = pair
    return fast.application.fast_answers - before


# -- requests: valid ECRs of many shapes, and their near misses ----------------------------

def avp(code: int, data: bytes, flags: int = 0x40, vendor: int = 0) -> bytes:
    return encode_avp(code, flags, vendor, data)


def terminal_information(*children: bytes) -> bytes:
    return E("Terminal-Information", list(children))


def ecr(avps: list[bytes], flags: int = FLAG_REQUEST | FLAG_PROXIABLE, code: int = 324,
        application: int = APPLICATION_S13, hop_by_hop: int = 7, end_to_end: int = 9) -> bytes:
    body = b"".join(avps)
    header = bytes([1]) + (20 + len(body)).to_bytes(3, "big") + bytes([flags]) + \
        code.to_bytes(3, "big") + application.to_bytes(4, "big") + \
        hop_by_hop.to_bytes(4, "big") + end_to_end.to_bytes(4, "big")
    return header + body


def plain_ecr_avps(imei: str = IMEIS[0], imsi: str | None = IMSIS[0],
                   session_id: str = "mme.test;1;1", software_version: str | None = "23",
                   destination_host: bool = False, vsai: bool = True) -> list[bytes]:
    """The AVPs of a valid ECR as MMEs send it."""
    children = [E("IMEI", imei)]
    if software_version is not None:
        children.append(E("Software-Version", software_version))
    avps = [E("Session-Id", session_id)]
    if vsai:
        avps.append(E("Vendor-Specific-Application-Id", [
            E("Vendor-Id", 10415), E("Auth-Application-Id", APPLICATION_S13)]))
    avps += [E("Auth-Session-State", 1), E("Origin-Host", "mme.test"),
             E("Origin-Realm", "test")]
    if destination_host:
        avps.append(E("Destination-Host", "eir.test"))
    avps += [E("Destination-Realm", "test.realm"), terminal_information(*children)]
    if imsi is not None:
        avps.append(E("User-Name", imsi))
    return avps


def seed_inputs() -> dict[str, bytes]:
    """Named seeds for the atheris target: valid ECRs alone, pipelined with the base
    protocol's messages, mixed with near misses, under each configuration."""
    plain = ecr(plain_ecr_avps())
    no_imsi = ecr(plain_ecr_avps(imsi=None, software_version=None, vsai=False))
    retransmitted = bytearray(plain)
    retransmitted[4] |= 0x10
    mixed = (plain + sans_io.dwr() + no_imsi + ecr(plain_ecr_avps(IMEIS[3], IMSIS[1]))
             + ecr(plain_ecr_avps(imei="3520990017614")) + bytes(retransmitted)
             + ecr(plain_ecr_avps(IMEIS[5], IMSIS[3], destination_host=True)))
    many = b"".join(ecr(plain_ecr_avps(IMEIS[i % len(IMEIS)], IMSIS[i % len(IMSIS)],
                                       f"mme.test;{i}"), hop_by_hop=i, end_to_end=i)
                    for i in range(24))
    seeds = {}
    for control in (0, 1, 2, 3, 4, 8, 12, 16, 32, 64, 128, 4 | 8 | 64):
        seeds[f"plain-{control}"] = bytes([control, 0]) + plain
        seeds[f"mixed-{control}"] = bytes([control, 0]) + mixed
        seeds[f"many-{control}"] = bytes([control, 0]) + many
    seeds["mixed-chunks-of-37"] = bytes([12, 37]) + mixed
    seeds["many-dpr"] = bytes([4, 0]) + many + sans_io.dpr() + plain
    return seeds
