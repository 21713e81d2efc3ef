"""Duplicate request detection (RFC 6733 §3, §5.5.4).

An MME that lost a transport connection re-sends the requests still unanswered on it, with
the T flag set, on another connection (to us again, or to another EIR). A retransmission of a
request we answered recently must get the same answer, and must not change state again (our
observations log, for one).

What makes a retransmission: the same request, from the same peer. A request is named by its
(Origin-Host, End-to-End Identifier) (RFC 6733 §3), but both are the peer's to choose, so the
name alone proves nothing: a request that reuses the name of another with different contents
(another IMEI) must get its own answer, never the other's (it would carry the other's verdict
and Session-Id). So an entry is found by its *identity* -- the peer's identity (the
Origin-Host it gave at CER on the connection the request arrives on, which the allowlist and
TLS checked; not only the Origin-Host AVP of the message), the request's Origin-Host, command
and End-to-End id -- and answers only a request whose *digest* -- a BLAKE2b hash (16 bytes) of
its AVPs, so of every byte of the request but the T flag and the Hop-by-Hop id, which a
retransmission changes (see `request_keys`) -- is the stored one: the request itself is not
kept. A T-flag request that finds
nothing, or a different digest, is handled as new and counted (`misses`, `mismatches`).

What is stored, and why: the answer bytes of application requests that the application
answered (the ECA with a verdict). Those depend on state that can change between the original
and its retransmission (the lists in force, the date, grandfathering) and their handling
records an observation, so they cannot be recomputed. Error answers to malformed requests are
not stored: they follow from the request bytes alone, so a retransmission gets the same answer
by being checked again; 3004 answers are not stored either (a retransmission should get a
real try). Base protocol messages (CER, DWR, DPR) belong to one connection and are never
retransmitted.

Memory: bounded by `max_entries` entries and by `max_bytes` bytes, both exact (the oldest
entries go first as soon as a store passes either), whatever the mix of messages: an entry
counts as `ENTRY_OVERHEAD_BYTES` + its identity + digest + answer (what is really allocated,
measured with tracemalloc: see tests/test_duplicates.py), so large answers (a long echoed
Session-Id) fill the byte budget with fewer entries. Entries older than the window are dropped
in batches (every `EXPIRY_BATCH` stores, and before each look-up). An answer larger than the
whole budget is not stored.

The cost on the hot path: a BLAKE2b digest of the request's AVPs (~0.4 µs for an ECR here,
the most of it), a dict insert and two deque appends per answered request (`store_all` for
the fast path's runs: ~1.2 µs a new answer in all); only requests with the T flag look answers up.
"""

from __future__ import annotations

from collections import deque
from hashlib import blake2b

EXPIRY_BATCH = 256  # stores between expiry passes: expiring is cheaper in batches
DIGEST_BYTES = 16
# Bytes an entry costs beyond its identity, digest and answer bytes: two bytes objects'
# headers, a dict slot (with the dict's spare room), two deque cells and the float of its
# time. Measured with tracemalloc over 100,000 entries (~150 on CPython 3.11); rounded up.
ENTRY_OVERHEAD_BYTES = 192
# Digests start as copies of this one: a copy and an update cost ~0.4 µs for an ECR,
# blake2b(data, digest_size=...) ~0.7 (its keyword parameters are parsed on every call).
_EMPTY_DIGEST = blake2b(digest_size=DIGEST_BYTES)


def request_keys(peer: bytes, origin_host: bytes, raw: bytes) -> tuple[bytes, bytes]:
    """(identity, digest) of a validated application request: see the module docstring.

    `peer` is the Origin-Host the connection's CER gave, lower-cased and NUL-terminated;
    `origin_host` the request's own Origin-Host AVP payload: both validated
    DiameterIdentities (at most 255 bytes, no NUL), so the identity is kept as it is (~50
    bytes), unhashed, with the command code and application. The digest covers the AVPs:
    of the rest of the header, the version is 1, the length follows from the AVPs, the
    flags from the command (R and P as it requires, E clear: else it was refused) but for
    the T flag, and the Hop-by-Hop id is what a retransmission may change."""
    identity = raw[5:12] + raw[16:20] + peer + origin_host
    hasher = _EMPTY_DIGEST.copy()
    hasher.update(raw[20:])
    return identity, hasher.digest()


class DuplicateCache:
    """Recent answers by request identity, shared by all connections of a process (the
    retransmission usually arrives on a new one)."""

    def __init__(self, window_seconds: float, max_entries: int, max_bytes: int):
        self.window = window_seconds
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # what the entries kept count for (see the module docstring)
        # identity → digest + answer, one bytes object.
        self._entries: dict[bytes, bytes] = {}
        # Insertion order, for expiry: identities and the times they were stored (bytes and
        # floats only, so the cyclic GC has nothing in here to follow).
        self._identities: deque[bytes] = deque()
        self._times: deque[float] = deque()
        self._until_expiry = EXPIRY_BATCH
        self.hits = 0  # T-flag requests answered from the cache
        self.misses = 0  # T-flag requests not found (never seen, expired, evicted)
        self.mismatches = 0  # T-flag requests whose identity names a different request

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, identity: bytes, digest: bytes, answer: bytes, now: float) -> None:
        entries = self._entries
        if identity in entries:
            return  # the first answer stands (a retransmission of a request we never saw)
        entry = digest + answer
        cost = ENTRY_OVERHEAD_BYTES + len(identity) + len(entry)
        total = self.bytes + cost
        if total > self.max_bytes or len(entries) >= self.max_entries:
            if cost > self.max_bytes:
                return
            while entries and (total > self.max_bytes or len(entries) >= self.max_entries):
                total -= self._drop_oldest()
        entries[identity] = entry
        self._identities.append(identity)
        self._times.append(now)
        self.bytes = total
        self._until_expiry -= 1
        if not self._until_expiry:
            self._until_expiry = EXPIRY_BATCH
            self._expire(now)

    def store_all(self, peer: bytes, requests: list[bytes], origin_hosts: list[bytes],
                  answers: list[bytes], now: float) -> None:
        """`store(*request_keys(peer, origin_host, raw), answer, now)` for each request in
        order (the fast path's runs, eir.diameter.peer): the same entries, evictions and byte
        count, in one loop with request_keys inline and the state in locals; a store that is
        due to expire entries, or too large to keep, goes through `store` itself.
        tests/test_duplicates.py compares the two."""
        entries = self._entries
        identities, times = self._identities, self._times
        max_bytes, max_entries = self.max_bytes, self.max_entries
        empty_digest = _EMPTY_DIGEST
        drop_oldest = self._drop_oldest  # (its own update of self.bytes is overwritten below)
        total, until_expiry = self.bytes, self._until_expiry
        for raw, origin_host, answer in zip(requests, origin_hosts, answers):
            identity = raw[5:12] + raw[16:20] + peer + origin_host  # as request_keys
            if identity in entries:
                continue  # the first answer stands (store does the same)
            hasher = empty_digest.copy()  # the digest as request_keys computes it
            hasher.update(raw[20:])
            entry = hasher.digest() + answer
            cost = ENTRY_OVERHEAD_BYTES + len(identity) + len(entry)
            if until_expiry == 1 or cost > max_bytes:
                self.bytes, self._until_expiry = total, until_expiry
                self.store(identity, entry[:DIGEST_BYTES], answer, now)
                total, until_expiry = self.bytes, self._until_expiry
                continue
            total += cost
            while entries and (total > max_bytes or len(entries) >= max_entries):
                total -= drop_oldest()
            entries[identity] = entry
            identities.append(identity)
            times.append(now)
            until_expiry -= 1
        self.bytes, self._until_expiry = total, until_expiry

    def answer_for(self, identity: bytes, digest: bytes, raw: bytes,
                   now: float) -> bytes | None:
        """The stored answer to the request (`identity`, `digest`), with the Hop-by-Hop id of
        `raw` (the retransmission) in place of the original's; None when not stored (counted
        as a miss) or when the identity names another request (counted as a mismatch)."""
        self._expire(now)
        entry = self._entries.get(identity)
        if entry is None:
            self.misses += 1
            return None
        if entry[:DIGEST_BYTES] != digest:
            self.mismatches += 1
            return None
        self.hits += 1
        start = DIGEST_BYTES
        return entry[start:start + 12] + raw[12:16] + entry[start + 16:]

    def _drop_oldest(self) -> int:
        """Drop the oldest entry; the bytes it counted for."""
        identity = self._identities.popleft()
        self._times.popleft()
        cost = ENTRY_OVERHEAD_BYTES + len(identity) + len(self._entries.pop(identity))
        self.bytes -= cost
        return cost

    def _expire(self, now: float) -> None:
        times = self._times
        oldest_kept = now - self.window
        while times and times[0] < oldest_kept:
            self._drop_oldest()
