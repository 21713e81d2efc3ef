"""Heavy requests in process: what one request costs the event loop, by kind, and how large
its answer is (issue 13, item 3; docs/SECURITY.md, eir/overload.py).

Each request goes through the real `PeerConnection.receive` of a connection opened by a CER,
with the real S13 application and the example list, as `eir serve` would answer it (default
settings: max_message_bytes 65536, max_avps_per_message from eir.config). Kinds:

  * plain: the ECR of tests/test_peer_state.py (7 AVPs);
  * the ECR filled up to max_message_bytes with the smallest AVPs of several sorts: Proxy-Info
    (28 bytes, 3 AVPs, echoed in the answer), Route-Record (12 bytes), unknown AVPs without
    the M bit (8 bytes, ignored after decoding), and one Proxy-Info holding ~8,000 unknown
    AVPs; over the AVP budget these are answered 5009 after decoding the first
    max_avps_per_message AVPs;
  * the heaviest valid ones: Proxy-Info up to the AVP budget, and that with the last
    Proxy-State filled up to max_message_bytes;
  * a read of `read_bytes` of plain ECRs framed and queued behind a pending turn, and the
    3004 answers of a read refused whole (what a flooding peer's read costs).

    python3 bench/heavy.py [--repeat N]      # last line of output: JSON figures

Figures are the best of 5 runs of N requests each (the machine's noise removed, not its
speed): compare kinds with each other, not with another machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import test_peer_state as sans_io  # noqa: E402

from eir.config import DiameterSettings, OverloadSettings  # noqa: E402
from eir.diameter.codec import Framer, encode_avp, encode_message  # noqa: E402
from eir.diameter.constants import APPLICATION_S13, FLAG_PROXIABLE, FLAG_REQUEST  # noqa: E402
from eir.diameter.peer import PeerConnection  # noqa: E402
from eir.overload import Admission  # noqa: E402
from eir.s13 import S13Application  # noqa: E402

E = sans_io.E
DEFAULTS = DiameterSettings()
MAX_BYTES = DEFAULTS.max_message_bytes
MAX_AVPS = DEFAULTS.max_avps_per_message
PLAIN_AVPS = 7  # sans_io.ecr(): 6 at the top, IMEI inside Terminal-Information


def ecr_with(extra: bytes) -> bytes:
    body = sans_io.ecr()[20:] + extra
    return encode_message(FLAG_REQUEST | FLAG_PROXIABLE, sans_io.ECR, APPLICATION_S13,
                          0x1234, 0x5678, body)


def proxy_info(state: bytes = b"") -> bytes:
    return E("Proxy-Info", [E("Proxy-Host", "a"), E("Proxy-State", state)])


def filled(unit: bytes) -> bytes:
    """The ECR with as many `unit`s as fit in max_message_bytes."""
    room = MAX_BYTES - len(sans_io.ecr())
    return ecr_with(unit * (room // len(unit)))


def kinds() -> dict[str, bytes]:
    unknown = encode_avp(99999, 0, 0, b"")
    valid_infos = (MAX_AVPS - PLAIN_AVPS) // 3
    at_budget = ecr_with(proxy_info() * valid_infos)
    room = MAX_BYTES - len(at_budget) - 8
    return {
        "plain": sans_io.ecr(),
        "packed_proxy_info": filled(proxy_info()),
        "packed_route_record": filled(E("Route-Record", "a")),
        "packed_unknown_avps": filled(unknown),
        "proxy_info_of_unknown_avps": ecr_with(E("Proxy-Info", [
            E("Proxy-Host", "a"), E("Proxy-State", b"")] + [unknown] * (
                (MAX_BYTES - len(sans_io.ecr()) - 40) // 8))),
        "proxy_info_at_avp_budget": at_budget,
        "proxy_info_at_avp_budget_filled": ecr_with(
            proxy_info() * (valid_infos - 1) + proxy_info(b"s" * (room - room % 4))),
    }


def open_peer(admission: Admission | None = None) -> PeerConnection:
    application = S13Application(sans_io.D, sans_io.LOCAL, sans_io.RULE_SET)
    peer = PeerConnection(sans_io.D, sans_io.LOCAL, {APPLICATION_S13: application}, now=0.0,
                          max_message_bytes=MAX_BYTES, max_avps_per_message=MAX_AVPS,
                          admission=admission)
    peer.receive(sans_io.cer(APPLICATION_S13), 0.0)
    return peer


def best_of(run, count: int) -> float:
    """Seconds per call of run(), the best of 5 runs of `count` calls."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(count):
            run()
        best = min(best, (time.perf_counter() - started) / count)
    return best


def measure(repeat: int) -> dict:
    figures: dict = {"max_message_bytes": MAX_BYTES, "max_avps_per_message": MAX_AVPS}
    plain_cost = None
    for name, request in kinds().items():
        peer = open_peer()
        answer = peer.receive(request, 1.0)
        [message] = Framer(1 << 24).feed(answer)
        cost = best_of(lambda: peer.receive(request, 1.0),
                       repeat * 20 if name == "plain" else repeat)
        plain_cost = plain_cost or cost
        figures[name] = {
            "request_bytes": len(request), "answer_bytes": len(answer),
            "result_code": sans_io.Message(message).value("Result-Code"),
            "us": round(cost * 1e6, 1), "x_plain": round(cost / plain_cost, 1)}
    # A flooding peer's read: framed and queued behind a pending turn, or refused whole.
    overload = OverloadSettings()
    read = sans_io.ecr() * (overload.read_bytes // len(sans_io.ecr()))
    count = len(read) // len(sans_io.ecr())

    def queue_one_read() -> None:
        admission = Admission(max_queued_per_connection=10**6, max_queued_total=10**6,
                              max_queued_bytes_per_connection=1 << 30,
                              max_queued_bytes_total=1 << 30)
        peer = open_peer(admission)
        peer.receive(sans_io.ecr() * 2 * admission.requests_per_turn, 1.0)  # a turn pending
        started = time.perf_counter()
        peer.receive(read, 1.0)
        timings.append(time.perf_counter() - started)

    timings: list[float] = []
    for _ in range(5 * repeat // 10 + 5):
        queue_one_read()
    figures["read_queued"] = {"requests": count, "bytes": len(read),
                              "us": round(min(timings) * 1e6, 1)}
    refusing = open_peer(Admission(requests_per_turn=1, max_queued_per_connection=1,
                                   max_queued_total=1))
    refusing.receive(sans_io.ecr() * 2, 1.0)  # a turn and the queue's one request pending
    cost = best_of(lambda: refusing.receive(read, 1.0), max(1, repeat // 10))
    figures["read_refused_3004"] = {"requests": count, "bytes": len(read),
                                    "us": round(cost * 1e6, 1),
                                    "us_per_request": round(cost / count * 1e6, 2)}
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50,
                        help="heavy requests per timed run (plain: 20 times as many)")
    args = parser.parse_args(argv)
    figures = measure(args.repeat)
    for name, value in figures.items():
        print(f"{name:34s} {value}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
