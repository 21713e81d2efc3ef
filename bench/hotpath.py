"""In-process hot path: bytes of an ECR in, bytes of the ECA out, no sockets.

Each ECR goes through the real `PeerConnection.receive` of a connection opened by a CER, with
the real S13 application and a RuleSet built from a list of realistic size (100,000 exact
IMEIs, ranges, TACs, IMEI+IMSI pairs), so framing, header checks, AVP decoding, grammar
validation, the decision and the ECA encoding are all inside the measured call.

Measured:
  * one ECR per receive() call, timed per call with time.perf_counter_ns → msg/s, p50, p99;
  * 64 pipelined ECRs per receive() call (what a busy connection delivers) → msg/s;
  * python-diameter's codec on the same ECR bytes: Message.from_bytes, to_answer(), the same
    ECA AVPs set from constants (no decision), as_bytes() → msg/s, p50, p99, and the ratio.

Also the workload shared with e2e.py lives here: the list, the request mix, the ECR encoder.

    python3 bench/hotpath.py [--quick] [--count N]      # last line of output: JSON figures
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's eir/, installed or not
# tests/ is not a package: its helpers (python-diameter request builders, used by the tests
# too; the `eir serve` launcher for e2e.py) are imported as top-level modules from there.
sys.path.insert(0, str(ROOT / "tests"))

import logging  # noqa: E402

logging.getLogger("diameter").setLevel(logging.ERROR)

from diameter.message import Message  # noqa: E402
from diameter.message.avp.grouped import VendorSpecificApplicationId  # noqa: E402
from helpers_pydiameter import S13, TGPP, build_cer, build_ecr  # noqa: E402

from eir.decision import RuleSet, UnknownPolicy  # noqa: E402
from eir.config import DuplicateSettings  # noqa: E402
from eir.diameter.dictionary import Dictionary  # noqa: E402
from eir.diameter.duplicates import DuplicateCache  # noqa: E402
from eir.diameter.peer import LocalIdentity, PeerConnection  # noqa: E402
from eir.imei import luhn_check_digit  # noqa: E402
from eir.lists import load_rule_set  # noqa: E402
from eir.metrics import DiameterCounters  # noqa: E402
from eir.s13 import S13Application  # noqa: E402

MME_HOST, MME_REALM = b"mme.bench.localdomain", b"localdomain"
EIR_HOST, EIR_REALM = b"eir.localdomain", b"localdomain"
SESSION_PREFIX = "mme.bench.localdomain;1700000000;"
SESSION_DIGITS = 10
BATCH = 64
_IDS = struct.Struct("!II")


# -- workload: the list and the request mix ------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    exact: int = 100_000  # exact IMEIs, mostly blacklisted (stolen phones)
    pairs: int = 2_000  # IMEI+IMSI pairs (registered imports)
    ranges: int = 1_000  # IMEI ranges of 1,000 (test and lab blocks)
    tacs: int = 2_000  # whole TACs (device models)


def _imei15(rng: random.Random, tac: str | None = None) -> str:
    body = (tac or f"{rng.randrange(10**7, 10**8):08d}") + f"{rng.randrange(10**6):06d}"
    return body + luhn_check_digit(body)


def _imsi(rng: random.Random) -> str:
    return f"00101{rng.randrange(10**10):010d}"


@dataclass
class Workload:
    """The list rows (native CSV) and the (IMEI, IMSI) pairs the requests carry."""

    rows: list[tuple[str, str, str, str]]
    probes: list[tuple[str, str]]

    def write_csv(self, path: Path) -> Path:
        lines = ["imei,status,imsi,reason"]
        lines += [",".join(row) for row in self.rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def build_workload(sizes: Sizes = Sizes(), probes: int = 4096, seed: int = 13) -> Workload:
    """A list of realistic size, and a request mix: 60% exact IMEI hits, 5% IMEI+IMSI pair
    hits, 10% range hits, 10% TAC hits, 15% IMEIs no rule matches (→ 5422)."""
    rng = random.Random(seed)
    statuses = ["blacklist"] * 90 + ["greylist"] * 8 + ["whitelist"] * 2
    rows = []
    exact = [_imei15(rng) for _ in range(sizes.exact)]
    rows += [(imei, rng.choice(statuses), "", "reported stolen") for imei in exact]
    pairs = [(_imei15(rng), _imsi(rng)) for _ in range(sizes.pairs)]
    rows += [(imei, "whitelist", imsi, "registered import") for imei, imsi in pairs]
    # Ranges and TACs use TACs starting with 9 or 8; random IMEIs above rarely hit them.
    ranges = []
    for index in range(sizes.ranges):
        start = int(f"9{index:07d}") * 10**6 + rng.randrange(0, 10**6 - 1000)
        ranges.append((start, start + 999))
    rows += [(f"{a:014d}-{b:014d}", "greylist", "", "lab block") for a, b in ranges]
    tacs = [f"8{index:07d}" for index in range(sizes.tacs)]
    rows += [(tac, "whitelist", "", "approved model") for tac in tacs]

    mix = []
    for _ in range(probes):
        draw = rng.random()
        if draw < 0.60:
            mix.append((rng.choice(exact), _imsi(rng)))
        elif draw < 0.65:
            mix.append(rng.choice(pairs))
        elif draw < 0.75:
            start, _ = rng.choice(ranges)
            imei14 = f"{start + rng.randrange(1000):014d}"
            mix.append((imei14 + luhn_check_digit(imei14), _imsi(rng)))
        elif draw < 0.85:
            mix.append((_imei15(rng, rng.choice(tacs)), _imsi(rng)))
        else:
            mix.append((_imei15(rng, f"7{rng.randrange(10**7):07d}"), _imsi(rng)))
    return Workload(rows, mix)


# -- messages, encoded by python-diameter (an encoder we did not write) ---------------------

def encode_cer(hop_by_hop: int = 1) -> bytes:
    return build_cer(MME_HOST, MME_REALM, product_name="bench", hop_by_hop=hop_by_hop)


def ecr_stream(workload: Workload, count: int, first_hop_by_hop: int = 1) -> list[bytes]:
    """`count` ECRs cycling through the probe mix, each with its own hop-by-hop and
    end-to-end id (first_hop_by_hop + i) and Session-Id (…;i)."""
    templates = []
    placeholder = SESSION_PREFIX + "0" * SESSION_DIGITS
    for imei, imsi in workload.probes:
        raw = build_ecr(imei, imsi, placeholder, hop_by_hop=0, origin_host=MME_HOST,
                        origin_realm=MME_REALM).as_bytes()
        templates.append((raw, raw.find(placeholder.encode()) + len(SESSION_PREFIX)))
    out = []
    pack_into = _IDS.pack_into
    n = len(templates)
    for i in range(count):
        raw, at = templates[i % n]
        buf = bytearray(raw)
        ids = (first_hop_by_hop + i) & 0xFFFFFFFF
        pack_into(buf, 12, ids, ids)
        buf[at:at + SESSION_DIGITS] = b"%010d" % i
        out.append(bytes(buf))
    return out


def probe_of(index: int, workload: Workload) -> tuple[str, str]:
    return workload.probes[index % len(workload.probes)]


def verdict_of_answer(raw: bytes) -> tuple[int | None, int | None, int | None]:
    """(Result-Code, Equipment-Status, Experimental-Result-Code) as python-diameter reads them."""
    answer = Message.from_bytes(raw)
    experimental = getattr(answer, "experimental_result", None)
    return (getattr(answer, "result_code", None), getattr(answer, "equipment_status", None),
            experimental.experimental_result_code if experimental else None)


def expected_from_rule_set(rule_set: RuleSet, imei: str, imsi: str):
    status = rule_set.decide(imei[:14], imsi, "23").status
    return (2001, int(status), None) if status is not None else (None, None, 5422)


# -- the measured paths ------------------------------------------------------------------

def percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass
class Figures:
    per_s: float
    p50_us: float
    p99_us: float

    @classmethod
    def of(cls, latencies_ns: list[int], messages: int, elapsed_ns: int) -> "Figures":
        latencies_ns.sort()
        return cls(messages * 1e9 / elapsed_ns, percentile(latencies_ns, 0.50) / 1e3,
                   percentile(latencies_ns, 0.99) / 1e3)


def open_peer(rule_set: RuleSet) -> PeerConnection:
    dictionary = Dictionary.load()
    local = LocalIdentity(EIR_HOST.decode(), EIR_REALM.decode())
    # The counters `eir serve` keeps for its metrics, so that their cost is measured too.
    counters = DiameterCounters.for_dictionary(dictionary)
    s13 = S13Application(dictionary, local, rule_set, counters=counters)
    # The duplicate cache `eir serve` keeps by default: every answered ECR is stored.
    defaults = DuplicateSettings()
    duplicates = DuplicateCache(defaults.window_seconds, defaults.max_entries,
                                defaults.max_bytes)
    peer = PeerConnection(dictionary, local, {s13.application_id: s13}, time.monotonic(),
                          local_addresses=("127.0.0.1",), counters=counters,
                          duplicates=duplicates)
    cea = peer.receive(encode_cer(), time.monotonic())
    if verdict_of_answer(cea)[0] != 2001 or not peer.state.name == "OPEN":
        raise SystemExit(f"CER was not accepted: {peer.events}")
    peer.events.clear()
    return peer


def run_ours_single(peer: PeerConnection, ecrs: list[bytes], count: int):
    """One ECR per receive() call; returns (Figures, answers)."""
    clock = time.perf_counter_ns
    receive = peer.receive
    latencies = [0] * count
    answers = [b""] * count
    n = len(ecrs)
    now = time.monotonic()
    start = clock()
    for i in range(count):
        t0 = clock()
        answers[i] = receive(ecrs[i % n], now)
        latencies[i] = clock() - t0
    elapsed = clock() - start
    return Figures.of(latencies, count, elapsed), answers


def run_ours_batched(peer: PeerConnection, ecrs: list[bytes], count: int) -> Figures:
    """BATCH pipelined ECRs per receive() call; latency figures are per batch / BATCH."""
    batches = [b"".join(ecrs[i:i + BATCH]) for i in range(0, len(ecrs) - BATCH + 1, BATCH)]
    calls = max(1, count // BATCH)
    clock = time.perf_counter_ns
    receive = peer.receive
    latencies = [0] * calls
    now = time.monotonic()
    start = clock()
    for i in range(calls):
        t0 = clock()
        receive(batches[i % len(batches)], now)
        latencies[i] = (clock() - t0) // BATCH
    elapsed = clock() - start
    out = receive(batches[0], now)
    answers = 0
    pos = 0
    while pos < len(out):
        answers += 1
        pos += int.from_bytes(out[pos + 1:pos + 4], "big")
    if answers != BATCH:
        raise SystemExit(f"batched receive answered {answers} of {BATCH} ECRs")
    return Figures.of(latencies, calls * BATCH, elapsed)


def python_diameter_answer(raw: bytes) -> bytes:
    """What a python-diameter S13 server does per ECR, minus the decision."""
    request = Message.from_bytes(raw)
    answer = request.to_answer()
    answer.session_id = request.session_id
    answer.vendor_specific_application_id = VendorSpecificApplicationId(
        vendor_id=TGPP, auth_application_id=S13)
    answer.auth_session_state = 1
    answer.origin_host, answer.origin_realm = EIR_HOST, EIR_REALM
    answer.result_code = 2001
    answer.equipment_status = 1
    return answer.as_bytes()


def run_python_diameter(ecrs: list[bytes], count: int) -> Figures:
    clock = time.perf_counter_ns
    latencies = [0] * count
    n = len(ecrs)
    start = clock()
    for i in range(count):
        t0 = clock()
        python_diameter_answer(ecrs[i % n])
        latencies[i] = clock() - t0
    elapsed = clock() - start
    return Figures.of(latencies, count, elapsed)


def verify(answers: list[bytes], workload: Workload, rule_set: RuleSet, samples: int) -> int:
    """Decode the first answers with python-diameter and compare with RuleSet.decide."""
    for i, raw in enumerate(answers[:samples]):
        imei, imsi = probe_of(i, workload)
        got, want = verdict_of_answer(raw), expected_from_rule_set(rule_set, imei, imsi)
        if got != want:
            raise SystemExit(f"answer {i} for IMEI {imei} IMSI {imsi}: got {got}, want {want}")
    return min(samples, len(answers))


class OtherLoad:
    """CPU time the rest of the machine used while we measured (other processes, in CPUs).

    The benchmark is only as good as the machine is quiet: this says when it was not."""

    def __init__(self) -> None:
        self.started = (self._busy(), time.monotonic())

    @staticmethod
    def _busy() -> float:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except OSError:
            return float("nan")
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def cpus(self, own_cpu_seconds: float) -> float:
        """Average number of CPUs busy with something else than `own_cpu_seconds`."""
        busy, started = self.started
        wall = time.monotonic() - started
        return max(0.0, (self._busy() - busy - own_cpu_seconds) / wall) if wall > 0 else 0.0


def load_note(cpus: float) -> str:
    if cpus != cpus:  # nan: no /proc
        return ""
    note = f"other processes used {cpus:.2f} CPU meanwhile"
    return note + (" -- WARNING: machine not quiet, figures are low" if cpus > 0.10 else "")


def pin_to(core: int) -> str:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (single core or no sched_setaffinity)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI)")
    parser.add_argument("--count", type=int, help="ECRs per measurement of our path")
    parser.add_argument("--core", type=int, default=1, help="CPU core to pin to (-1: none)")
    args = parser.parse_args(argv)
    count = args.count or (20_000 if args.quick else 200_000)
    theirs = max(1_000, count // 10)

    pinning = pin_to(args.core) if args.core >= 0 else "not pinned"
    t = time.perf_counter()
    workload = build_workload()
    with tempfile.TemporaryDirectory() as tmp:
        rule_set = load_rule_set([workload.write_csv(Path(tmp) / "bench.csv")],
                                 UnknownPolicy.UNKNOWN)
    ecrs = ecr_stream(workload, min(count, 65_536))
    print(f"hot path: {rule_set.rule_count:,} rules loaded, {len(ecrs):,} distinct ECRs "
          f"({len(ecrs[0])} bytes) encoded in {time.perf_counter() - t:.1f} s; {pinning}; "
          f"Python {sys.version.split()[0]}", flush=True)

    peer = open_peer(rule_set)
    run_ours_single(peer, ecrs, min(count, 5_000))  # warm-up
    load, own = OtherLoad(), time.process_time()
    ours, answers = run_ours_single(peer, ecrs, count)
    checked = verify(answers, workload, rule_set, 2_000)
    del answers
    batched = run_ours_batched(peer, ecrs, count)
    if peer.events:
        raise SystemExit(f"the peer logged events during the run: {peer.events[:3]}")
    run_python_diameter(ecrs, 200)  # warm-up
    pd = run_python_diameter(ecrs, theirs)
    ratio = ours.per_s / pd.per_s
    other = load.cpus(time.process_time() - own)

    print(f"  eir  receive(), 1 ECR/call   {ours.per_s:>10,.0f} msg/s   p50 {ours.p50_us:7.1f} µs"
          f"   p99 {ours.p99_us:7.1f} µs   ({count:,} calls; {checked:,} answers verified)")
    print(f"  eir  receive(), {BATCH} ECRs/call {batched.per_s:>10,.0f} msg/s   "
          f"p50 {batched.p50_us:7.1f} µs   p99 {batched.p99_us:7.1f} µs   (per message)")
    print(f"  python-diameter codec        {pd.per_s:>10,.0f} msg/s   p50 {pd.p50_us:7.1f} µs"
          f"   p99 {pd.p99_us:7.1f} µs   (from_bytes + to_answer + as_bytes; {theirs:,} calls)")
    print(f"  ratio eir / python-diameter codec: {ratio:.1f}x "
          f"(batched: {batched.per_s / pd.per_s:.1f}x); {load_note(other)}")
    figures = {
        "hotpath_ecr_per_s": round(ours.per_s), "hotpath_p50_us": round(ours.p50_us, 1),
        "hotpath_p99_us": round(ours.p99_us, 1),
        "hotpath_batched_ecr_per_s": round(batched.per_s),
        "python_diameter_codec_per_s": round(pd.per_s),
        "python_diameter_codec_p50_us": round(pd.p50_us, 1),
        "python_diameter_codec_p99_us": round(pd.p99_us, 1),
        "ratio_vs_python_diameter_codec": round(ratio, 2),
        "hotpath_other_cpu_load": round(other, 2),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
