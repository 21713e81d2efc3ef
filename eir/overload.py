"""Overload control: bounded work per connection and overall.

The server answers every request on the event loop, one connection's read at a time. Without
limits, one peer sending faster than the server can answer holds the loop for as long as its
read takes (an asyncio read of 256 KiB is ~1,100 ECRs, ~20 ms), and every other peer waits
behind it; what cannot be read piles up in socket buffers, and latency grows with them.

Requests differ in cost by their AVPs, not by their count: a plain ECR (7 AVPs) takes
~18 µs; every further AVP ~0.5 µs to decode and as much again to validate, a Proxy-Info
(3 AVPs, echoed in the answer) ~4 µs. Unbounded, a valid ECR of 64 KiB packed with ~2,300
Proxy-Info took ~12 ms, ~700 plain ECRs, and a few connections sending them held every
other peer's answers for tens of milliseconds. So work is weighed in AVPs and bytes as well
as requests (figures from `python bench/heavy.py`, best of 5 on the development VM):

* **AVPs per message.** A request may hold at most `diameter.max_avps_per_message` AVPs
  (default 128), counted at every depth of grouping; decoding stops at the first beyond,
  which is answered 5009 DIAMETER_AVP_OCCURS_TOO_MANY_TIMES with that AVP as Failed-AVP
  (RFC 6733 §7.1.5; inside the Grouped AVP around it, §7.5). A request of 64 KiB packed
  with AVPs is refused at ~0.1-0.15 ms; the heaviest valid one (40 Proxy-Info, the last
  filled up to 64 KiB) takes ~0.18 ms, ~10 plain ECRs. A real ECR holds ~15 AVPs, a CER
  some tens. RFC 6733 sets no bound on Proxy-Info (one an agent on the path adds) but
  requires every one echoed in the answer unchanged, in order (§6.2, §6.7.2): an answer
  may not drop some, so a request with more than the budget allows is refused whole with
  5009, the code for an AVP that occurs more often than the receiver accepts, rather than
  answered without some of its Proxy-Info (which would strand the answer at a proxy).
  An answer is at most its request and a fixed overhead (Origin-Host/Realm, Result-Code,
  the S13 AVPs every ECA carries, an Error-Message of at most 200 characters, the headers
  around a Failed-AVP): Proxy-Info is echoed as received and Failed-AVP holds at most the
  offending AVP of the request.

And the decisions are taken in the sans-IO peer, `eir.diameter.peer.PeerConnection`, from
the `Admission` data below; the asyncio shell only calls back while work is queued:

* **Turns.** A connection's requests are answered at most `requests_per_turn` at a time,
  or `bytes_per_turn` bytes of requests, whichever comes first (one request at least): 8
  to 14 plain ECRs of 150-250 bytes, ~0.2 ms; 2 requests at the AVP budget, ~0.35 ms; one
  of 64 KiB. (At 4096 bytes, 16 plain ECRs would fit, but 4 requests at the AVP budget,
  ~0.7 ms, would too: the turns of a few heavy connections add up for the peer waiting.)
  The rest of its read waits in its queue and is resumed on the next turn of the event
  loop, after the other connections had theirs; a read that finds requests queued,
  or that follows a full turn of its connection (a turn's worth of requests or bytes: a
  read of a few large requests is one), only queues, so a connection gets one turn per
  turn of the loop. A peer with a few small requests in flight is answered in the turn
  its read arrives, however busy another connection is: it waits for one turn of each
  busy connection at most.
* **Reads** are at most `read_bytes` (the shell's one read buffer, eir.server), so that
  framing and queueing a flooding peer's read (64 KiB, ~450 ECRs of 140 bytes) costs
  ~0.2 ms, not asyncio's 256 KiB.
* **Queue bounds.** A connection may have `max_queued_per_connection` requests waiting
  beyond those its current turn answers, and `max_queued_bytes_per_connection` bytes of
  requests waiting (its current turn's included); all connections together
  `max_queued_total` requests and `max_queued_bytes_total` bytes. An application request
  beyond any bound is answered 3004 DIAMETER_TOO_BUSY at once (E bit, Session-Id echoed,
  Origin-Host/Realm): that costs ~2 µs where answering costs ~18, tells the MME to try
  another EIR, and bounds how long a queued request waits. Queued requests hold at most
  `max_queued_bytes_total` bytes, plus for each connection the one turn that is never
  refused (at most `bytes_per_turn` and one message): without the byte bounds, 4096
  requests of 64 KiB could wait on one connection, 256 MiB. Base protocol messages (DWR,
  DPR, CER) are never refused with 3004: a watchdog answered "busy" would fail the link
  over, which is worse than a slow answer; a connection queueing twice the bounds of them
  is closed.
* **Reading.** While a connection's queue is full (in requests or bytes) the shell stops
  reading from it (`PeerConnection.reading`), until the queue is half empty in both: its
  turns then go to answering rather than to refusing, and TCP slows that peer down. Each
  read it does get still answers 3004 at once to what does not fit.
* **Connections.** At most `max_connections` at once and `max_connections_per_address` from
  one source address, counted from accept (TLS handshakes included); beyond, the connection
  is closed at once with a log line.
* A peer that does not read its answers makes the transport's write buffer grow: the shell
  then stops reading from it until it drains (TCP pushes back on that peer alone).

Every request read gets an answer (2001, an error, or 3004) unless the connection closes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass
class Admission:
    """Limits on queued work; one instance is shared by all connections of a server, so
    `queued_total` and `queued_bytes_total` count the requests waiting on all of them."""

    requests_per_turn: int = 16
    max_queued_per_connection: int = 4096
    max_queued_total: int = 16384
    bytes_per_turn: int = 2048
    max_queued_bytes_per_connection: int = 1 << 20
    max_queued_bytes_total: int = 4 << 20
    queued_total: int = 0  # requests waiting in connection queues right now
    queued_bytes_total: int = 0  # their bytes
    refused_total: int = 0  # requests answered 3004 since start


class ConnectionLimits:
    """Counts open connections, in all and per source address; refuses beyond the limits."""

    def __init__(self, max_connections: int, max_per_address: int,
                 section: str = "diameter.overload"):
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.section = section  # where the settings are, for the refusals' text
        self.open = 0
        self._by_address: Counter[str] = Counter()
        self.refused_total = 0

    def admit(self, address: str) -> str | None:
        """Count a new connection from `address`; or, beyond a limit, say why not."""
        if self.open >= self.max_connections:
            self.refused_total += 1
            return (f"{self.open} connections are open, the most allowed "
                    f"({self.section}.max_connections)")
        if self._by_address[address] >= self.max_per_address:
            self.refused_total += 1
            return (f"{self._by_address[address]} connections from {address} are open, the "
                    "most allowed from one address "
                    f"({self.section}.max_connections_per_address)")
        self.open += 1
        self._by_address[address] += 1
        return None

    def release(self, address: str) -> None:
        self.open -= 1
        remaining = self._by_address[address] - 1
        if remaining > 0:
            self._by_address[address] = remaining
        else:
            del self._by_address[address]
