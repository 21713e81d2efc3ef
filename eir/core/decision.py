"""The decision engine: which status an IMEI (with its IMSI) gets, and why.

Pure and free of Diameter: it takes digits and returns a `Verdict`. A `RuleSet` is an immutable
snapshot built once from rules; the server swaps whole snapshots, never edits one.

Precedence (most specific first; the first level with a matching rule decides):

    1. exact IMEI paired with this IMSI
    2. exact IMEI
    3. IMEI range paired with this IMSI
    4. IMEI range
    5. TAC paired with this IMSI
    6. TAC
    7. grandfathering: the IMEI was observed with this IMSI before the cut-off date
       (WHITELISTED, Match.GRANDFATHERED; only when grandfathering.cutoff_date is set)
    8. the unknown-equipment policy

A rule paired with an IMSI applies only when the request carries that IMSI. Grandfathering
is the level just above the unknown policy: any list entry (a blacklist entry above all)
still wins over it; it only turns what would have been the unknown policy's verdict into
WHITELISTED for an IMEI+IMSI pair seen on the network before the cut-off (Indonesia's
whitelist mode: unknown policy blacklisted, registered IMEIs whitelisted, phones already in
use keep working with the SIM they were used with). Within one level,
BLACKLISTED beats GREYLISTED beats WHITELISTED, so a conflicting duplicate errs on blocking.
Lookups are a dict hit on the TAC and bisections in a compiled snapshot (eir.lists.snapshot); only
the rules sharing one IMEI, one range segment or one TAC are looked at one by one, so the
cost does not grow with the rule count.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass
from datetime import date


class EquipmentStatus(enum.IntEnum):
    """Values of the Equipment-Status AVP (TS 29.272 §7.3.51)."""

    WHITELISTED = 0
    BLACKLISTED = 1
    GREYLISTED = 2

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {EquipmentStatus.WHITELISTED: 0, EquipmentStatus.GREYLISTED: 1,
             EquipmentStatus.BLACKLISTED: 2}


class UnknownPolicy(enum.Enum):
    """What an IMEI that no rule matches gets."""

    WHITELISTED = "whitelisted"
    GREYLISTED = "greylisted"
    BLACKLISTED = "blacklisted"
    UNKNOWN = "unknown"  # Experimental-Result DIAMETER_ERROR_EQUIPMENT_UNKNOWN (5422)


class Match(enum.Enum):
    """Which precedence level decided."""

    IMEI_IMSI = "imei+imsi"
    IMEI = "imei"
    RANGE_IMSI = "range+imsi"
    RANGE = "range"
    TAC_IMSI = "tac+imsi"
    TAC = "tac"
    GRANDFATHERED = "grandfathered"
    UNKNOWN_POLICY = "unknown-policy"


# Every status a verdict may have (None: equipment unknown), for counting a run of verdicts
# status by status with list.count (C, comparing by identity first) rather than by hashing
# each (an Enum's __hash__ is Python code).
VERDICT_STATUSES: tuple[EquipmentStatus | None, ...] = (*EquipmentStatus, None)


def status_name(status: EquipmentStatus | None) -> str:
    """A verdict's status as answers are counted by outcome: its name, UNKNOWN for None."""
    return status.name if status is not None else "UNKNOWN"


@dataclass(frozen=True, slots=True)
class Verdict:
    status: EquipmentStatus | None  # None: equipment unknown
    match: Match
    reason: str
    source: str

    @property
    def status_name(self) -> str:
        return status_name(self.status)


@dataclass(frozen=True, slots=True)
class Rule:
    """One list entry. Exactly one of `imei`, `imei_range`, `tac` is set."""

    status: EquipmentStatus
    source: str  # "file:line" or "list@version"
    reason: str = ""
    imei: str | None = None  # 14 digits
    imei_range: tuple[int, int] | None = None  # inclusive, as 14-digit numbers
    tac: str | None = None  # 8 digits
    imsi: str | None = None

    @property
    def subject(self) -> str:
        if self.imei is not None:
            what = f"IMEI {self.imei}"
        elif self.imei_range is not None:
            what = f"IMEI range {self.imei_range[0]:014d}-{self.imei_range[1]:014d}"
        else:
            what = f"TAC {self.tac}"
        return f"{what} with IMSI {self.imsi}" if self.imsi else what


def format_day(day: int) -> str:
    """YYYYMMDD (a day as the engine numbers them) as YYYY-MM-DD."""
    return f"{day // 10000:04d}-{day // 100 % 100:02d}-{day % 100:02d}"


def day_number(day: date) -> int:
    """A date as the engine numbers days: YYYYMMDD."""
    return day.year * 10000 + day.month * 100 + day.day


_day_cache = [-1, 0]  # [minute, YYYYMMDD]


def today() -> int:
    """The local date as YYYYMMDD, recomputed at most once a minute (hot path)."""
    now = time.time()
    minute = int(now // 60)
    if minute != _day_cache[0]:
        local = time.localtime(now)
        _day_cache[:] = [minute, local.tm_year * 10000 + local.tm_mon * 100 + local.tm_mday]
    return _day_cache[1]


class RuleSet:
    """What the engine decides on: an immutable compiled snapshot of every list entry
    (eir.lists.snapshot) and the policy for equipment no entry matches.

    The server swaps whole RuleSets; a request reads one and uses it to the end.
    """

    def __init__(self, snapshot, unknown_policy: UnknownPolicy = UnknownPolicy.UNKNOWN,
                 grandfathering=None):
        self.snapshot = snapshot
        # Snapshot.lookup, or its C version, which may return NotImplemented (see
        # Snapshot.hot_lookup); bound once: decide() is the hot path.
        self._hot_lookup = snapshot.hot_lookup
        self.unknown_policy = unknown_policy
        # None, or an object with `cutoff_text` (YYYY-MM-DD) and
        # `first_seen_before_cutoff(imei, imsi) -> YYYYMMDD | None` (eir.check.observations.
        # GrandfatherIndex): the pairs it knows get WHITELISTED instead of the unknown policy.
        self.grandfathering = grandfathering
        if unknown_policy is UnknownPolicy.UNKNOWN:
            self._unknown = Verdict(None, Match.UNKNOWN_POLICY,
                                    "no list entry matches and the unknown policy is "
                                    "'unknown'", "policy")
        else:
            self._unknown = Verdict(EquipmentStatus[unknown_policy.name], Match.UNKNOWN_POLICY,
                                    "no list entry matches; unknown policy is "
                                    f"{unknown_policy.value}", "policy")

    @property
    def version(self) -> str:
        return self.snapshot.version

    @property
    def rule_count(self) -> int:
        return self.snapshot.entry_count

    def decide(self, imei: str, imsi: str | None = None, day: int | None = None) -> Verdict:
        """The verdict for a normalised 14-digit IMEI, with the subscriber's IMSI if known,
        on `day` (YYYYMMDD, default today: registry entries change status with the date).
        No rule kind looks at the software version, so it is not asked for."""
        day = today() if day is None else day
        verdict = self._hot_lookup(imei, imsi, day)
        if verdict is NotImplemented:
            verdict = self.snapshot.lookup(imei, imsi, day)
        if verdict is not None:
            return verdict
        grandfathering = self.grandfathering
        if grandfathering is not None and imsi:
            seen = grandfathering.first_seen_before_cutoff(imei, imsi)
            if seen is not None:
                return Verdict(EquipmentStatus.WHITELISTED, Match.GRANDFATHERED,
                               f"IMEI with this IMSI was seen on the network on "
                               f"{format_day(seen)}, before the cut-off "
                               f"{grandfathering.cutoff_text}", "observations")
        return self._unknown

    def explain(self, imei: str, imsi: str | None = None, day: int | None = None) -> Verdict:
        """decide(), with the device's name (from a TAC file in the lists) in the reason: for
        people asking why, not for the hot path."""
        verdict = self.decide(imei, imsi, day)
        device = self.snapshot.device_name(int(imei[:8]))
        if not device:
            return verdict
        return dataclasses.replace(verdict, reason=f"{verdict.reason} (device: {device})")
