"""Overload control: bounded work per connection and overall.

The server answers every request on the event loop, one connection's read at a time. Without
limits, one peer sending faster than the server can answer holds the loop for as long as its
read takes (an asyncio read of 256 KiB is ~1,100 ECRs, ~20 ms), and every other peer waits
behind it; what cannot be read piles up in socket buffers, and latency grows with them.

So (the decisions are taken in the sans-IO peer, `eir.diameter.peer.PeerConnection`, from
the `Admission` data below; the asyncio shell only calls back while work is queued):

* **Turns.** A connection's requests are answered at most `requests_per_turn` at a time;
  the rest of its read waits in its queue and is resumed on the next turn of the event loop,
  after the other connections had theirs; a read that finds requests queued only queues,
  so a connection gets one turn per turn of the loop. A peer with a few requests in flight
  is answered in the turn its read arrives, however busy another connection is.
* **Reads** are at most `read_bytes` (the shell's one read buffer, eir.server), so that
  framing and queueing a flooding peer's read costs ~0.3 ms, not asyncio's 256 KiB.
* **Queue bounds.** Beyond the requests its current turn answers, a connection may have
  `max_queued_per_connection` requests waiting, and all connections together
  `max_queued_total`. An application request beyond either bound is answered 3004
  DIAMETER_TOO_BUSY at once (E bit, Session-Id echoed, Origin-Host/Realm): that costs ~1 µs
  where answering costs ~18, tells the MME to try another EIR, and bounds how long a queued
  request waits (max_queued_per_connection / requests_per_turn turns). Base protocol
  messages (DWR, DPR, CER) are never refused with 3004: a watchdog answered "busy" would
  fail the link over, which is worse than a slow answer.
* **Reading.** While a connection's queue is full the shell stops reading from it
  (`PeerConnection.reading`), until the queue is half empty: its turns then go to answering
  rather than to refusing, and TCP slows that peer down. Each read it does get still
  answers 3004 at once to what does not fit.
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
    `queued_total` counts the requests waiting on all of them."""

    requests_per_turn: int = 16
    max_queued_per_connection: int = 4096
    max_queued_total: int = 16384
    queued_total: int = 0  # requests waiting in connection queues right now
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
