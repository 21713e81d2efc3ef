"""The decision engine: precedence, severity within a level, ranges, unknown policies, and
lookups whose cost does not grow with the number of rules."""

from __future__ import annotations

import itertools
import sys
import timeit

import pytest

import eir.core.decision
from eir.core.decision import EquipmentStatus, Match, Rule, RuleSet, UnknownPolicy
from eir.lists.native import load_rule_set
from eir.lists.snapshot import build_rule_set

WHITE, GREY, BLACK = (EquipmentStatus.WHITELISTED, EquipmentStatus.GREYLISTED,
                      EquipmentStatus.BLACKLISTED)
IMEI = "35209900176148"
IMSI = "001010123456789"
OTHER_IMSI = "001010999999999"
RANGE = (35209900000000, 35209900999999)  # contains IMEI
TAC = IMEI[:8]

# Precedence levels, most specific first: (match, rule fields). Each matches IMEI with IMSI.
LEVELS = [
    (Match.IMEI_IMSI, {"imei": IMEI, "imsi": IMSI}),
    (Match.IMEI, {"imei": IMEI}),
    (Match.RANGE_IMSI, {"imei_range": RANGE, "imsi": IMSI}),
    (Match.RANGE, {"imei_range": RANGE}),
    (Match.TAC_IMSI, {"tac": TAC, "imsi": IMSI}),
    (Match.TAC, {"tac": TAC}),
]
PAIRED_LEVELS = [level for level in LEVELS if "imsi" in level[1]]


def rule(fields: dict, status: EquipmentStatus, line: int, reason: str = "") -> Rule:
    return Rule(status=status, source=f"lists/test.csv:{line}", reason=reason, **fields)


def decide(rules, imei: str = IMEI, imsi: str | None = IMSI,
           policy: UnknownPolicy = UnknownPolicy.UNKNOWN):
    return build_rule_set(rules, policy).decide(imei, imsi)


def in_range(low: int, high: int):
    return build_rule_set([rule({"imei_range": (low, high)}, WHITE, 1)])


def imei14(number: int) -> str:
    return f"{number:014d}"


# -- precedence ----------------------------------------------------------------------------

@pytest.mark.parametrize("level", range(len(LEVELS)), ids=[m.value for m, _ in LEVELS])
def test_most_specific_level_decides_even_against_a_more_severe_lower_level(level):
    """Level `level` whitelists; every less specific level blacklists; the whitelist wins."""
    match, fields = LEVELS[level]
    rules = [rule(fields, WHITE, line=100)]
    rules += [rule(lower, BLACK, line=200 + n) for n, (_, lower) in enumerate(LEVELS[level + 1:])]
    verdict = decide(rules)
    assert (verdict.status, verdict.match, verdict.source) == (WHITE, match,
                                                               "lists/test.csv:100")


@pytest.mark.parametrize("level", range(len(LEVELS)), ids=[m.value for m, _ in LEVELS])
def test_more_specific_level_blacklist_beats_every_lower_level(level):
    match, fields = LEVELS[level]
    rules = [rule(lower, WHITE, line=200 + n) for n, (_, lower) in enumerate(LEVELS[level + 1:])]
    rules.append(rule(fields, BLACK, line=100))
    verdict = decide(rules)
    assert (verdict.status, verdict.match, verdict.source) == (BLACK, match,
                                                               "lists/test.csv:100")


def test_no_rule_matches_gives_the_unknown_policy():
    other = "99999999000000"
    verdict = decide([rule(fields, BLACK, n) for n, (_, fields) in enumerate(LEVELS)], other)
    assert (verdict.status, verdict.match, verdict.source) == (None, Match.UNKNOWN_POLICY,
                                                               "policy")


@pytest.mark.parametrize("level", range(len(LEVELS)), ids=[m.value for m, _ in LEVELS])
@pytest.mark.parametrize("statuses, expected", [
    ((WHITE, GREY, BLACK), BLACK),
    ((WHITE, BLACK), BLACK),
    ((GREY, BLACK), BLACK),
    ((WHITE, GREY), GREY),
])
def test_equal_specificity_blacklist_beats_greylist_beats_whitelist(level, statuses, expected):
    match, fields = LEVELS[level]
    for order in itertools.permutations(statuses):
        rules = [rule(fields, status, line) for line, status in enumerate(order, 1)]
        verdict = decide(rules)
        assert (verdict.status, verdict.match) == (expected, match), order
        assert verdict.source == f"lists/test.csv:{order.index(expected) + 1}"


@pytest.mark.parametrize("level", range(len(PAIRED_LEVELS)),
                         ids=[m.value for m, _ in PAIRED_LEVELS])
@pytest.mark.parametrize("imsi", [OTHER_IMSI, None])
def test_paired_rule_is_ignored_for_another_or_no_imsi(level, imsi):
    _, fields = PAIRED_LEVELS[level]
    assert decide([rule(fields, BLACK, 1)], imsi=imsi).match is Match.UNKNOWN_POLICY


@pytest.mark.parametrize("level", range(len(PAIRED_LEVELS)),
                         ids=[m.value for m, _ in PAIRED_LEVELS])
def test_paired_rule_for_another_imsi_falls_through_to_the_unpaired_rule(level):
    match, fields = PAIRED_LEVELS[level]
    unpaired = {k: v for k, v in fields.items() if k != "imsi"}
    rules = [rule(fields, WHITE, 1), rule(unpaired, BLACK, 2)]
    assert decide(rules, imsi=IMSI).status is WHITE
    other = decide(rules, imsi=OTHER_IMSI)
    assert (other.status, other.source) == (BLACK, "lists/test.csv:2")
    assert other.match.value == match.value.removesuffix("+imsi")


def test_paired_range_for_another_imsi_falls_through_to_tac():
    rules = [rule({"imei_range": RANGE, "imsi": IMSI}, WHITE, 1), rule({"tac": TAC}, GREY, 2)]
    verdict = decide(rules, imsi=OTHER_IMSI)
    assert (verdict.status, verdict.match) == (GREY, Match.TAC)


def test_tac_rule_matches_every_imei_of_the_tac_and_no_other():
    rule_set = build_rule_set([rule({"tac": "86000000"}, BLACK, 1)])
    assert rule_set.decide("86000000000000").status is BLACK
    assert rule_set.decide("86000000999999").status is BLACK
    assert rule_set.decide("86000001000000").match is Match.UNKNOWN_POLICY
    assert rule_set.decide("85999999999999").match is Match.UNKNOWN_POLICY


# -- ranges --------------------------------------------------------------------------------

def test_range_bounds_are_inclusive():
    rule_set = in_range(35000000000100, 35000000000199)
    assert rule_set.decide(imei14(35000000000099)).match is Match.UNKNOWN_POLICY
    assert rule_set.decide(imei14(35000000000100)).status is WHITE
    assert rule_set.decide(imei14(35000000000199)).status is WHITE
    assert rule_set.decide(imei14(35000000000200)).match is Match.UNKNOWN_POLICY


def test_single_imei_range():
    rule_set = in_range(35000000000100, 35000000000100)
    assert rule_set.decide(imei14(35000000000100)).match is Match.RANGE
    assert rule_set.decide(imei14(35000000000101)).match is Match.UNKNOWN_POLICY


def test_overlapping_ranges_take_the_most_severe_where_they_overlap():
    rule_set = build_rule_set([rule({"imei_range": (100, 299)}, WHITE, 1),
                              rule({"imei_range": (200, 399)}, BLACK, 2)])
    expected = {99: None, 100: WHITE, 199: WHITE, 200: BLACK, 299: BLACK, 300: BLACK,
                399: BLACK, 400: None}
    for number, status in expected.items():
        assert rule_set.decide(imei14(number)).status is status, number


def test_nested_ranges():
    rule_set = build_rule_set([rule({"imei_range": (100, 999)}, WHITE, 1),
                              rule({"imei_range": (400, 499)}, GREY, 2),
                              rule({"imei_range": (450, 459)}, BLACK, 3),
                              rule({"imei_range": (300, 599)}, WHITE, 4)])
    expected = {99: (None, "policy"), 100: (WHITE, "lists/test.csv:1"),
                399: (WHITE, "lists/test.csv:1"), 400: (GREY, "lists/test.csv:2"),
                449: (GREY, "lists/test.csv:2"), 450: (BLACK, "lists/test.csv:3"),
                459: (BLACK, "lists/test.csv:3"), 460: (GREY, "lists/test.csv:2"),
                499: (GREY, "lists/test.csv:2"), 500: (WHITE, None), 999: (WHITE, None),
                1000: (None, "policy")}
    for number, (status, source) in expected.items():
        verdict = rule_set.decide(imei14(number))
        assert verdict.status is status, number
        if source is not None:
            assert verdict.source == source, number


def test_paired_range_beats_an_unpaired_overlapping_range_only_for_its_imsi():
    rule_set = build_rule_set([rule({"imei_range": (100, 199)}, BLACK, 1),
                              rule({"imei_range": (150, 249), "imsi": IMSI}, WHITE, 2)])
    assert rule_set.decide(imei14(160), IMSI).match is Match.RANGE_IMSI
    assert rule_set.decide(imei14(160), IMSI).status is WHITE
    assert rule_set.decide(imei14(160), OTHER_IMSI).status is BLACK
    assert rule_set.decide(imei14(220), OTHER_IMSI).match is Match.UNKNOWN_POLICY
    assert rule_set.decide(imei14(120), IMSI).status is BLACK


def test_many_ranges_each_found():
    rules = [rule({"imei_range": (n * 1000, n * 1000 + 9)}, (WHITE, GREY, BLACK)[n % 3], n)
             for n in range(1, 300)]
    rule_set = build_rule_set(rules)
    for n in range(1, 300):
        assert rule_set.decide(imei14(n * 1000 + 5)).source == f"lists/test.csv:{n}"
        assert rule_set.decide(imei14(n * 1000 + 10)).match is Match.UNKNOWN_POLICY


# -- unknown policy and verdict contents --------------------------------------------------

@pytest.mark.parametrize("policy, status", [
    (UnknownPolicy.UNKNOWN, None),
    (UnknownPolicy.WHITELISTED, WHITE),
    (UnknownPolicy.GREYLISTED, GREY),
    (UnknownPolicy.BLACKLISTED, BLACK),
])
def test_unknown_policies(policy, status):
    verdict = decide([rule({"imei": "11111111111111"}, BLACK, 1)], policy=policy)
    assert (verdict.status, verdict.match, verdict.source) == (status, Match.UNKNOWN_POLICY,
                                                               "policy")
    assert policy.value in verdict.reason
    assert verdict.status_name == (status.name if status is not None else "UNKNOWN")


def test_unknown_policy_does_not_override_a_listed_imei():
    verdict = decide([rule({"imei": IMEI}, WHITE, 1)], policy=UnknownPolicy.BLACKLISTED)
    assert (verdict.status, verdict.match) == (WHITE, Match.IMEI)


@pytest.mark.parametrize("fields, subject", [
    ({"imei": IMEI}, f"IMEI {IMEI}"),
    ({"imei": IMEI, "imsi": IMSI}, f"IMEI {IMEI} with IMSI {IMSI}"),
    ({"imei_range": RANGE}, "IMEI range 35209900000000-35209900999999"),
    ({"tac": TAC}, f"TAC {TAC}"),
])
def test_verdict_reason_names_the_rule_and_its_reason(fields, subject):
    verdict = decide([rule(fields, BLACK, 7, reason="reported stolen")])
    assert verdict.reason == f"{subject} is blacklisted: reported stolen"
    assert verdict.source == "lists/test.csv:7"


def test_verdict_source_is_the_list_file_and_line(tmp_path):
    path = tmp_path / "stolen.csv"
    path.write_text("imei,status,imsi,reason\n# comment\n\n"
                    f"{IMEI},greylist,,watch it\n86000000,blacklist,,fake TAC\n",
                    encoding="utf-8")
    rule_set = load_rule_set([path], UnknownPolicy.UNKNOWN)
    verdict = rule_set.decide(IMEI)
    assert (verdict.status, verdict.source) == (GREY, f"{path}:4")
    assert "watch it" in verdict.reason
    assert rule_set.decide("86000000123456").source == f"{path}:5"


# -- lookups do not scan -------------------------------------------------------------------

EXACT_BASE = 10_000_000_000_000
RANGE_BASE = 50_000_000_000_000
QUERIES = {  # (imei, imsi): one query per level, present in both the small and large sets
    "exact": (imei14(EXACT_BASE + 3 * 7), None),
    "pair": ("86100000000001", IMSI),
    "range": (imei14(RANGE_BASE + 1 * 1000 + 42), None),
    "tac": ("86000000123456", None),
    "miss": ("99999999999999", IMSI),
}


def scaling_rules(exact: int, ranges: int):
    """`exact` IMEI rules, `ranges` disjoint ranges, one TAC and one pair: exact + ranges + 2."""
    for n in range(exact):
        yield Rule(BLACK, "big.csv", imei=imei14(EXACT_BASE + n * 7))
    for n in range(ranges):
        start = RANGE_BASE + n * 1000
        yield Rule(GREY, "big.csv", imei_range=(start, start + 499))
    yield Rule(BLACK, "big.csv", tac="86000000")
    yield Rule(WHITE, "big.csv", imei="86100000000001", imsi=IMSI)


@pytest.fixture(scope="module")
def small_and_large() -> tuple[RuleSet, RuleSet]:
    small = build_rule_set(scaling_rules(5, 3))
    large = build_rule_set(scaling_rules(1_000_000, 10_000))
    assert (small.rule_count, large.rule_count) == (10, 1_010_002)
    return small, large


def python_steps(rule_set: RuleSet, imei: str, imsi: str | None) -> int:
    """Python-level steps (function calls and lines, in any module) of one decide()."""
    steps = 0

    def tracer(frame, event, arg):
        nonlocal steps
        steps += 1
        return tracer

    sys.settrace(tracer)
    try:
        rule_set.decide(imei, imsi)
    finally:
        sys.settrace(None)
    return steps


@pytest.mark.parametrize("query", QUERIES)
def test_lookup_takes_the_same_steps_for_10_and_1_million_rules(small_and_large, query):
    small, large = small_and_large
    imei, imsi = QUERIES[query]
    small_verdict, large_verdict = small.decide(imei, imsi), large.decide(imei, imsi)
    assert (small_verdict.status, small_verdict.match) == (large_verdict.status,
                                                           large_verdict.match)
    # A few steps of difference are one constant-time branch (a snapshot with over 4,096
    # distinct meanings stores set indexes in a second array); a scan costs thousands.
    assert abs(python_steps(large, imei, imsi) - python_steps(small, imei, imsi)) <= 3


def test_lookup_time_stays_flat_from_10_to_1_million_rules(small_and_large):
    """Catches scans the step count cannot see (a C-level `in` over a list, say)."""
    small, large = small_and_large

    def best_time(rule_set: RuleSet) -> float:
        calls = [(rule_set.decide, imei, imsi) for imei, imsi in QUERIES.values()]

        def run():
            for call, imei, imsi in calls:
                call(imei, imsi)

        return min(timeit.repeat(run, number=500, repeat=7))

    small_time, large_time = best_time(small), best_time(large)
    assert large_time < 3 * small_time, (small_time, large_time)


def test_decision_module_documents_the_precedence_tested_here():
    doc = eir.core.decision.__doc__
    order = ["exact IMEI paired", "exact IMEI", "IMEI range paired", "IMEI range",
             "TAC paired", "TAC", "grandfathering", "unknown-equipment policy"]
    positions = [doc.index(text, doc.index(order[i - 1]) + 1 if i else 0)
                 for i, text in enumerate(order)]
    assert positions == sorted(positions)
    assert [m.value for m, _ in LEVELS] + [Match.GRANDFATHERED.value,
                                           Match.UNKNOWN_POLICY.value] == [m.value for m in Match]
