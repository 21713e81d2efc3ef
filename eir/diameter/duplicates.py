"""Duplicate request detection (RFC 6733 §3, §5.5.4).

An MME that lost a transport connection re-sends the requests still unanswered on it, with
the T flag set, on another connection (to us again, or to another EIR). A request whose
(Origin-Host, End-to-End Identifier) we answered recently must get the same answer, and must
not change state again (our observations log, for one).

What is stored, and why: the answer bytes of application requests that the application
answered (the ECA with a verdict). Those depend on state that can change between the original
and its retransmission (the lists in force, the date, grandfathering) and their handling
records an observation, so they cannot be recomputed. Error answers to malformed requests are
not stored: they follow from the request bytes alone, so a retransmission gets the same answer
by being checked again; 3004 answers are not stored either (a retransmission should get a
real try). Base protocol messages (CER, DWR, DPR) belong to one connection and are never
retransmitted.

The cost on the hot path: storing is a dict insert and two deque appends per answered request
(the bytes object of the answer is kept, not copied), and expiry runs once per
`EXPIRY_BATCH` stores; only requests with the T flag look answers up. Memory is bounded by a
time window and a number of entries (plus one batch), whichever is reached first; an entry is
~the answer's size (~150 bytes for an ECA) plus ~150 bytes of bookkeeping.
"""

from __future__ import annotations

from collections import deque

EXPIRY_BATCH = 256  # stores between expiry passes: expiring is cheaper in batches


class DuplicateCache:
    """Recent answers by request key, shared by all connections (the retransmission usually
    arrives on a new one). The peer makes the keys: End-to-End Identifier and Origin-Host."""

    def __init__(self, window_seconds: float, max_entries: int):
        self.window = window_seconds
        self.max_entries = max_entries
        self._answers: dict[bytes, bytes] = {}
        # Insertion order, for expiry: keys and the times they were stored (bytes and floats
        # only, so the cyclic GC has nothing in here to follow).
        self._keys: deque[bytes] = deque()
        self._times: deque[float] = deque()
        self._until_expiry = EXPIRY_BATCH
        self.hits = 0

    def __len__(self) -> int:
        return len(self._answers)

    def store(self, key: bytes, answer: bytes, now: float) -> None:
        if self._answers.setdefault(key, answer) is not answer:
            return  # the first answer stands (a retransmission of a request we never saw)
        self._keys.append(key)
        self._times.append(now)
        self._until_expiry -= 1
        if not self._until_expiry:
            self._until_expiry = EXPIRY_BATCH
            self._expire(now)

    def answer_for(self, key: bytes, raw: bytes, now: float) -> bytes | None:
        """The stored answer to the request `key`, with the hop-by-hop id of `raw` (the
        retransmission) in place of the original's; None when not seen recently."""
        self._expire(now)
        answer = self._answers.get(key)
        if answer is None:
            return None
        self.hits += 1
        return answer[:12] + raw[12:16] + answer[16:]

    def _expire(self, now: float) -> None:
        answers, keys, times = self._answers, self._keys, self._times
        oldest_kept = now - self.window
        while times and (times[0] < oldest_kept or len(answers) > self.max_entries):
            times.popleft()
            del answers[keys.popleft()]
