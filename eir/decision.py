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
    7. the unknown-equipment policy

A rule paired with an IMSI applies only when the request carries that IMSI. Within one level,
BLACKLISTED beats GREYLISTED beats WHITELISTED, so a conflicting duplicate errs on blocking.
Lookups are dictionary hits and one bisection: their cost does not grow with the rule count.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Iterable


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
    UNKNOWN_POLICY = "unknown-policy"


@dataclass(frozen=True, slots=True)
class Verdict:
    status: EquipmentStatus | None  # None: equipment unknown
    match: Match
    reason: str
    source: str

    @property
    def status_name(self) -> str:
        return self.status.name if self.status is not None else "UNKNOWN"


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

    @property
    def match(self) -> Match:
        paired = self.imsi is not None
        if self.imei is not None:
            return Match.IMEI_IMSI if paired else Match.IMEI
        if self.imei_range is not None:
            return Match.RANGE_IMSI if paired else Match.RANGE
        return Match.TAC_IMSI if paired else Match.TAC

    def verdict(self) -> Verdict:
        why = f"{self.subject} is {self.status.name.lower()}"
        if self.reason:
            why += f": {self.reason}"
        return Verdict(self.status, self.match, why, self.source)


def _best(rules: list[Rule]) -> Rule:
    return max(rules, key=lambda rule: rule.status.severity)


def _precedence(rule: Rule) -> tuple[bool, int]:
    # Paired rules first (more specific), then the more severe status.
    return (rule.imsi is None, -rule.status.severity)


@dataclass(frozen=True, eq=False)
class RuleSet:
    """An immutable snapshot of every rule, indexed for constant-time lookups."""

    unknown_policy: UnknownPolicy
    version: str
    rule_count: int
    _imei_pairs: dict[tuple[str, str], Verdict] = field(repr=False)
    _imei: dict[str, Verdict] = field(repr=False)
    _tac_pairs: dict[tuple[str, str], Verdict] = field(repr=False)
    _tac: dict[str, Verdict] = field(repr=False)
    # Elementary segments of the range rules: _range_starts[i] is where segment i starts, and
    # _range_rules[i] the rules covering it in precedence order (empty where none do).
    _range_starts: list[int] = field(repr=False)
    _range_rules: list[tuple[tuple[Rule, Verdict], ...]] = field(repr=False)
    _unknown: Verdict = field(repr=False)

    @classmethod
    def build(cls, rules: Iterable[Rule], unknown_policy: UnknownPolicy = UnknownPolicy.UNKNOWN,
              version: str = "0") -> "RuleSet":
        imei_pairs: dict[tuple[str, str], list[Rule]] = {}
        imei: dict[str, list[Rule]] = {}
        tac_pairs: dict[tuple[str, str], list[Rule]] = {}
        tac: dict[str, list[Rule]] = {}
        ranges: list[Rule] = []
        count = 0
        for rule in rules:
            count += 1
            if rule.imei is not None:
                if rule.imsi is not None:
                    imei_pairs.setdefault((rule.imei, rule.imsi), []).append(rule)
                else:
                    imei.setdefault(rule.imei, []).append(rule)
            elif rule.tac is not None:
                if rule.imsi is not None:
                    tac_pairs.setdefault((rule.tac, rule.imsi), []).append(rule)
                else:
                    tac.setdefault(rule.tac, []).append(rule)
            elif rule.imei_range is not None:
                ranges.append(rule)
            else:
                raise ValueError(f"{rule.source}: rule has no IMEI, range or TAC")
        starts, covering = _segments(ranges)

        def best(table):
            return {key: _best(candidates).verdict() for key, candidates in table.items()}

        if unknown_policy is UnknownPolicy.UNKNOWN:
            unknown = Verdict(None, Match.UNKNOWN_POLICY,
                              "no list entry matches and the unknown policy is 'unknown'",
                              "policy")
        else:
            status = EquipmentStatus[unknown_policy.name]
            unknown = Verdict(status, Match.UNKNOWN_POLICY,
                              f"no list entry matches; unknown policy is {unknown_policy.value}",
                              "policy")
        return cls(unknown_policy, version, count, best(imei_pairs), best(imei),
                   best(tac_pairs), best(tac), starts, covering, unknown)

    def decide(self, imei: str, imsi: str | None = None,
               software_version: str | None = None) -> Verdict:
        """The verdict for a normalised 14-digit IMEI, the subscriber's IMSI if known.

        `software_version` is accepted so that rules on it can be added without changing
        callers; no rule kind uses it yet.
        """
        if imsi:
            verdict = self._imei_pairs.get((imei, imsi))
            if verdict is not None:
                return verdict
        verdict = self._imei.get(imei)
        if verdict is not None:
            return verdict
        if self._range_starts:
            index = bisect.bisect_right(self._range_starts, int(imei)) - 1
            if index >= 0:
                for rule, verdict in self._range_rules[index]:
                    if rule.imsi is None or rule.imsi == imsi:
                        return verdict
        tac = imei[:8]
        if imsi:
            verdict = self._tac_pairs.get((tac, imsi))
            if verdict is not None:
                return verdict
        verdict = self._tac.get(tac)
        if verdict is not None:
            return verdict
        return self._unknown


def _segments(ranges: list[Rule]) -> tuple[list[int], list[tuple[tuple[Rule, Verdict], ...]]]:
    """Cut overlapping ranges into elementary segments, each with its covering rules."""
    if not ranges:
        return [], []
    verdicts = {id(rule): rule.verdict() for rule in ranges}
    points = sorted({r.imei_range[0] for r in ranges} | {r.imei_range[1] + 1 for r in ranges})
    by_start = sorted(ranges, key=lambda r: r.imei_range[0])
    active: list[Rule] = []
    starts: list[int] = []
    covering: list[tuple[tuple[Rule, Verdict], ...]] = []
    next_rule = 0
    for point in points:
        while next_rule < len(by_start) and by_start[next_rule].imei_range[0] <= point:
            active.append(by_start[next_rule])
            next_rule += 1
        active = [r for r in active if r.imei_range[1] >= point]
        ordered = sorted(active, key=_precedence)
        starts.append(point)
        covering.append(tuple((rule, verdicts[id(rule)]) for rule in ordered))
    return starts, covering
