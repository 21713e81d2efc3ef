"""Server CPU per ECR, fast path (eir/lists/_ecr.c) against the generic path, in one run.

In process, no sockets (asyncio's read and write are not in the figures): pipelined ECRs of
bench/hotpath.py's workload (100,000 exact IMEIs, ranges, TACs, pairs; 60% exact hits, 5%
pairs, 10% ranges, 10% TACs, 15% unknown) go through the real `PeerConnection.receive` (and
`resume` while requests wait: the admission turns `eir serve` has by default) of a
connection opened by a CER, with what `eir serve` keeps by default: the counters, the
duplicate cache, an observation log (in memory: its writer thread is not started), and,
with --audit, an audit log. Twice, once with `diameter.fast_path` off (the generic path, the
baseline) and once on, alternating rounds; best and median of the rounds. The answers of the
two are compared byte for byte.

    python3 bench/fast_path.py [--quick] [--count N] [--batch N] [--profile] [--breakdown]
    # last line of output: JSON figures

--breakdown: what is left, by difference: the fast path with each of the defaults off in
turn (duplicate cache, admission turns, observations, counters), all of them off, and the C
call alone (on exact-IMEI and pair hits, and on the whole mix: ranges and TAC rules go
through RuleSet.decide in Python).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hotpath  # noqa: E402  (puts the checkout's eir/ and tests/ on the path)

from eir.check.observations import ObservationLog  # noqa: E402
from eir.check.service import EquipmentCheck  # noqa: E402
from eir.core.config import DuplicateSettings, OverloadSettings  # noqa: E402
from eir.core.decision import UnknownPolicy, today  # noqa: E402
from eir.diameter.codec import Framer  # noqa: E402
from eir.core.logs import AuditLog  # noqa: E402
from eir.diameter.dictionary import Dictionary  # noqa: E402
from eir.diameter.duplicates import DuplicateCache  # noqa: E402
from eir.diameter.overload import Admission  # noqa: E402
from eir.diameter.peer import LocalIdentity, PeerConnection  # noqa: E402
from eir.interfaces.metrics import DiameterCounters  # noqa: E402
from eir.interfaces.s13 import S13Application, answer_ecrs  # noqa: E402
from eir.lists.native import load_rule_set  # noqa: E402


def open_peer(rule_set, fast_path: bool, scratch: Path, audit: bool) -> PeerConnection:
    dictionary = Dictionary.load()
    local = LocalIdentity(hotpath.EIR_HOST.decode(), hotpath.EIR_REALM.decode())
    counters = DiameterCounters.for_dictionary(dictionary)
    name = "fast" if fast_path else "generic"
    observations = ObservationLog(scratch / f"observations-{name}.sqlite")
    audit_log = AuditLog(scratch / f"audit-{name}.jsonl") if audit else None
    s13 = S13Application(dictionary, local, EquipmentCheck(rule_set, observations),
                         counters=counters, audit=audit_log, fast_path=fast_path)
    defaults, overload = DuplicateSettings(), OverloadSettings()
    admission = Admission(
        requests_per_turn=overload.requests_per_turn,
        max_queued_per_connection=overload.max_queued_per_connection,
        max_queued_total=overload.max_queued_total, bytes_per_turn=overload.bytes_per_turn,
        max_queued_bytes_per_connection=overload.max_queued_bytes_per_connection,
        max_queued_bytes_total=overload.max_queued_bytes_total)
    peer = PeerConnection(
        dictionary, local, {s13.application_id: s13}, time.monotonic(),
        local_addresses=("127.0.0.1",), counters=counters,
        duplicates=DuplicateCache(defaults.window_seconds, defaults.max_entries,
                                  defaults.max_bytes), admission=admission)
    peer.receive(hotpath.encode_cer(), time.monotonic())
    if peer.state.name != "OPEN":
        raise SystemExit(f"CER was not accepted: {peer.events}")
    peer.events.clear()
    return peer


def serve(peer: PeerConnection, reads: list[bytes]) -> bytes:
    """Every read through receive(), and resume() until nothing waits, as the shell does."""
    out = []
    now = time.monotonic()
    for data in reads:
        out.append(peer.receive(data, now))
        while peer.backlog:
            out.append(peer.resume(now))
    return b"".join(out)


def per_ecr_us(peer: PeerConnection, reads: list[bytes], ecrs: int) -> float:
    start = time.process_time()
    serve(peer, reads)
    return (time.process_time() - start) * 1e6 / ecrs


def without(peer: PeerConnection, *parts: str) -> PeerConnection:
    """`peer` with some of what `eir serve` keeps by default turned off."""
    application = peer.applications[S13Application.application_id]
    if "admission" in parts:
        peer.admission = None
        peer._per_turn = peer._bytes_per_turn = sys.maxsize
    if "duplicates" in parts:
        peer.duplicates = None
    if "observations" in parts:
        application.check.observations = None
    if "counters" in parts:
        peer.counters = peer.answers.counters = application.answers.counters = None
        application.verdict_counts = None
    return peer


def breakdown(rule_set, scratch: Path, reads: list[bytes], ecrs: list[bytes]) -> None:
    count = len(ecrs)
    for parts in [(), ("duplicates",), ("admission",), ("observations",), ("counters",),
                  ("duplicates", "admission", "observations", "counters")]:
        peer = without(open_peer(rule_set, True, scratch, False), *parts)
        serve(peer, reads)
        best = min(per_ecr_us(peer, reads, count) for _ in range(5))
        print(f"  fast path, {'without ' + ', '.join(parts) if parts else 'as served':54s}"
              f" {best:6.2f} µs CPU per ECR", flush=True)
    messages = Framer().feed(b"".join(ecrs))
    application = open_peer(rule_set, True, scratch, False).applications[
        S13Application.application_id]
    args = (application._fast_templates, rule_set.snapshot.hot_lookup, rule_set.decide,
            today(), True)
    _, _, records = answer_ecrs(messages, 0, len(messages), 128, *args)
    exact = [m for m, r in zip(messages, records) if r[2].match.value in ("imei", "imei+imsi")]
    for name, batch in (("the whole mix", messages), ("exact-IMEI and pair hits", exact)):
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            answer_ecrs(batch, 0, len(batch), 128, *args)
            best = min(best, (time.process_time() - start) * 1e6 / len(batch))
        print(f"  answer_ecrs alone (C), {name:42s} {best:6.2f} µs CPU per ECR")
    start = time.process_time()
    Framer().feed(b"".join(ecrs))
    print(f"  {'Framer.feed (Python)':64s} "
          f"{(time.process_time() - start) * 1e6 / count:6.2f} µs CPU per ECR")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI)")
    parser.add_argument("--count", type=int, help="ECRs per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="ECRs per read")
    parser.add_argument("--core", type=int, default=1, help="CPU core to pin to (-1: none)")
    parser.add_argument("--audit", action="store_true", help="with an audit log")
    parser.add_argument("--profile", action="store_true", help="profile the fast path")
    parser.add_argument("--breakdown", action="store_true",
                        help="what is left, by difference (see above)")
    args = parser.parse_args(argv)
    if answer_ecrs is None:
        raise SystemExit("eir.lists._lookup is not built: no fast path to measure")
    count = args.count or (16_384 if args.quick else 131_072)
    pinning = hotpath.pin_to(args.core) if args.core >= 0 else "not pinned"
    workload = hotpath.build_workload()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        rule_set = load_rule_set([workload.write_csv(scratch / "bench.csv")],
                                 UnknownPolicy.UNKNOWN)
        ecrs = hotpath.ecr_stream(workload, count)
        reads = [b"".join(ecrs[i:i + args.batch]) for i in range(0, count, args.batch)]
        peers = {fast: open_peer(rule_set, fast, scratch, args.audit) for fast in (False, True)}
        answers = {fast: serve(peer, reads) for fast, peer in peers.items()}  # warm-up
        if answers[True] != answers[False]:
            raise SystemExit("the fast path answered differently from the generic path")
        print(f"fast path: {len(ecrs):,} ECRs of ~{len(ecrs[0])} bytes, {args.batch} per "
              f"read, {rule_set.rule_count:,} rules; {pinning}; answers identical "
              f"({len(answers[True]):,} bytes)", flush=True)
        load, own = hotpath.OtherLoad(), time.process_time()
        rounds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for fast, peer in peers.items():
                rounds[fast].append(per_ecr_us(peer, reads, count))
        other = load.cpus(time.process_time() - own)
        for fast, peer in peers.items():
            if peer.events:
                raise SystemExit(f"the peer logged events during the run: {peer.events[:3]}")
        if args.breakdown:
            breakdown(rule_set, scratch, reads, ecrs)
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(serve, peers[True], reads)
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    generic, fast = (min(rounds[False]), statistics.median(rounds[False])), (
        min(rounds[True]), statistics.median(rounds[True]))
    print(f"  generic path   {generic[0]:6.2f} µs CPU per ECR (median {generic[1]:.2f}) "
          f"{1e6 / generic[0]:>10,.0f} ECR/s")
    print(f"  fast path      {fast[0]:6.2f} µs CPU per ECR (median {fast[1]:.2f}) "
          f"{1e6 / fast[0]:>10,.0f} ECR/s")
    print(f"  ratio generic / fast: {generic[0] / fast[0]:.1f}x; {hotpath.load_note(other)}")
    figures = {"fast_path_cpu_us_per_ecr": round(fast[0], 2),
               "generic_path_cpu_us_per_ecr": round(generic[0], 2),
               "fast_path_speedup": round(generic[0] / fast[0], 2),
               "fast_path_other_cpu_load": round(other, 2)}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
