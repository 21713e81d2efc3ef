"""Which peer identities (CER Origin-Hosts) have an open connection, server-wide.

RFC 6733 §2.1: a Diameter node "MUST NOT use more than one transport connection to
communicate with a given peer, unless multiple instances exist on the peer". Its peer state
machine (§5.6) answers a CER from a peer that is open already (R-Open, event R-Conn-CER) with
R-Reject: the new connection is refused, the open one stays. The election of §5.6.4 settles
a different race -- both peers connecting to each other at once, the loser closing the
connection *it* initiated -- and an EIR only responds, never initiates, so there is never a
connection of ours to elect against: for a responder, §5.6.4 comes down to R-Reject.

`diameter.duplicate_peers` says what happens to a second connection:

* `refuse`: CEA 5012 DIAMETER_UNABLE_TO_COMPLY and close, logged (with the reason) and
  counted (eir_duplicate_peer_connections_total{action="refused"}). The first stays: a peer
  cannot take another's place by connecting again. The price: an MME whose old connection
  is half-open (it restarted unseen) waits for our watchdog (2 Tw) to close it; and without
  an allowlist (diameter.peers with addresses) or TLS, anyone that connects first with an
  MME's Origin-Host locks that MME out.
* `allow` (the default): served, with a warning logged and counted (action="allowed"): for
  MMEs that run several instances under one identity, as §2.1 permits, and so that nobody
  is locked out by a connection made in its name.

With several worker processes (eir.workers) the registry is the supervisor's: a worker asks
it (`claim`) before it answers a CER, and tells it when the connection ends (`release`); a
worker that dies releases all of its claims.
"""

from __future__ import annotations

from typing import Literal

DuplicatePeerPolicy = Literal["refuse", "allow"]


class PeerIdentities:
    """Open connections per Origin-Host (compared case-insensitively, as DNS names are)."""

    def __init__(self, policy: DuplicatePeerPolicy):
        self.policy = policy
        self.open: dict[str, int] = {}
        self.duplicates = {"refused": 0, "allowed": 0}  # eir_duplicate_peer_connections

    def claim(self, host: str) -> tuple[bool, str | None]:
        """(granted, why): a refusal says why; a connection allowed beside others says so;
        a first connection has nothing to say."""
        key = host.lower()
        count = self.open.get(key, 0)
        if count and self.policy == "refuse":
            self.duplicates["refused"] += 1
            return False, (f"Origin-Host {host} has an open connection already "
                           "(diameter.duplicate_peers: refuse)")
        self.open[key] = count + 1
        if not count:
            return True, None
        self.duplicates["allowed"] += 1
        return True, (f"Origin-Host {host} now has {count + 1} open connections "
                      "(diameter.duplicate_peers: allow)")

    def release(self, host: str) -> None:
        key = host.lower()
        count = self.open.get(key, 0)
        if count <= 1:
            self.open.pop(key, None)
        else:
            self.open[key] = count - 1
