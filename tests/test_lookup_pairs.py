"""The C levels of a snapshot lookup (eir.lists._lookup.ExactIndex.pair and .lookup) against the
pure-Python path (Snapshot._lookup_python) on random compiled snapshots with IMEI+IMSI pairs:
IMEIs paired with several IMSIs, the first and last pair entries, empty sections, pairs whose
set gives no status on the day, ranges and TAC rules below, request strings int() reads
differently from plain digits. Then the hand-over cases (NotImplemented) and the C-level
verdict cache."""

from __future__ import annotations

import functools
import gc
import os
import random
import sys
import weakref

import numpy as np
import pytest

from eir.core.decision import EquipmentStatus, Match, RuleSet, Verdict
from eir.lists.entries import Attribute, Kind, ListEntries, RangeRule, TacRule
from eir.lists.snapshot import (
    IMEI,
    IMEI_IMSI,
    SNR_DIGITS,
    Snapshot,
    _set_verdict,
    compile_snapshot,
)

_lookup = pytest.importorskip(
    "eir.lists._lookup", reason="eir.lists._lookup not built (no C compiler at install time)")

BLACK, GREY, WHITE = (EquipmentStatus.BLACKLISTED, EquipmentStatus.GREYLISTED,
                      EquipmentStatus.WHITELISTED)
IMSI_BASE = 510_10 * 10**10
DAYS = (20200101, 20210615, 20991231)


def attributes(rng: random.Random) -> list[Attribute]:
    """Every kind, with block dates around DAYS: on some days a set gives no status."""
    found = [Attribute(Kind.EXCEPTION, "ex.csv"),
             Attribute(Kind.NATIVE, "native.csv:2", BLACK, 0, "stolen", "IMEI x"),
             Attribute(Kind.NATIVE, "native.csv:3", GREY, 0, "", "IMEI y")]
    for i in range(6):
        found.append(Attribute(Kind.BLACKLIST, "bl.csv", None, rng.choice(DAYS) + i, f"r{i}"))
        found.append(Attribute(Kind.NOTIFICATION, "n.csv", None, rng.choice(DAYS) + i, f"n{i}"))
    return found


def random_lists(rng: random.Random, pairs: int, exact: int, wider: bool) -> list[ListEntries]:
    """Two lists over a few TACs (so that IMEIs repeat across them and sets combine): exact
    entries, pairs (some IMEIs with several IMSIs, some also listed alone), and optionally
    ranges and TAC rules over the same TACs."""
    tacs = rng.sample(range(10_000_000, 99_999_999), 5)

    def imei() -> int:
        return rng.choice(tacs) * SNR_DIGITS + rng.randrange(2000)

    lists = []
    for name in ("a", "b"):
        listed = ListEntries(name)
        listed.attributes = attributes(rng)
        imeis = [imei() for _ in range(exact)]
        imsis = [0] * exact
        for _ in range(pairs):
            paired = rng.choice(imeis) if imeis and rng.random() < 0.3 else imei()
            for _ in range(rng.choice((1, 1, 1, 2, 3))):  # an IMEI with several IMSIs
                imeis.append(paired)
                imsis.append(IMSI_BASE + rng.randrange(50))  # few IMSIs: pairs repeat
        listed.imei = np.array(imeis, np.uint64)
        listed.imsi = np.array(imsis, np.uint64)
        listed.attribute = np.array([rng.randrange(len(listed.attributes)) for _ in imeis],
                                    np.uint32)
        listed.rows = len(imeis)
        if wider:
            for _ in range(5):
                start = imei()
                listed.ranges.append(RangeRule(start, start + rng.randrange(500),
                                               rng.choice((0, IMSI_BASE + rng.randrange(50))),
                                               rng.choice(listed.attributes)))
            for tac in tacs[:3]:
                listed.tacs.append(TacRule(tac, rng.choice((0, IMSI_BASE + rng.randrange(50))),
                                           rng.choice(listed.attributes)))
        lists.append(listed)
    return lists


def c_snapshot(data: bytes) -> Snapshot:
    """A snapshot searched through eir.lists._lookup, wired here as Snapshot does it, so that
    EIR_PURE_PYTHON=1 (which makes Snapshot use the Python path) does not change what this
    file tests."""
    snapshot = Snapshot.from_bytes(data)
    snapshot._exact = _lookup.ExactIndex(
        snapshot._tac, snapshot._tac_start, snapshot._imei_key, snapshot._imei_set_hi,
        snapshot._imei_fence, pair_imei=snapshot._pair_imei, pair_imsi=snapshot._pair_imsi,
        pair_set=snapshot._pair_set, set_count=len(snapshot.sets),
        resolve=functools.partial(_set_verdict, snapshot.sets, snapshot.attributes),
        wider=bool(len(snapshot._range_start) or len(snapshot._tacrule_tac)))
    snapshot._c_lookup = snapshot._exact.lookup
    return snapshot


def python_pair(snapshot: Snapshot, imei: int, imsi: int) -> int:
    """What ExactIndex.pair must say, by a scan of the sections."""
    found = [snapshot._pair_set[i] for i in range(len(snapshot._pair_imei))
             if snapshot._pair_imei[i] == imei and snapshot._pair_imsi[i] == imsi]
    return -1 if not found else found[0] if len(found) == 1 else -2


def pair_queries(snapshot: Snapshot, rng: random.Random) -> list[tuple[int, int]]:
    """Every pair, its neighbours in IMEI and IMSI, the first and last entries', misses."""
    imeis, imsis = list(snapshot._pair_imei), list(snapshot._pair_imsi)
    queries = [(0, 0), (0, IMSI_BASE), (2**64 - 1, 2**64 - 1), (10**14 - 1, IMSI_BASE)]
    for imei, imsi in zip(imeis, imsis):
        queries += [(imei, imsi), (imei, imsi + 1), (imei, imsi - 1), (imei - 1, imsi),
                    (imei + 1, imsi), (imei, 0)]
    queries += [(rng.randrange(10**14), IMSI_BASE + rng.randrange(50)) for _ in range(200)]
    return queries


def pure_python(snapshot: Snapshot) -> Snapshot:
    """The same snapshot searched by the Python path only."""
    twin = Snapshot.from_bytes(snapshot._keep)
    twin._exact = twin._c_lookup = None
    return twin


def request_strings(snapshot: Snapshot, rng: random.Random) -> list[tuple[str, str | None]]:
    """(IMEI, IMSI) as a request carries them: listed and paired IMEIs with their own IMSIs,
    other IMSIs and none, plus strings int() reads its own way."""
    imeis = {int(i) for i in snapshot._pair_imei}
    imsis = [int(i) for i in snapshot._pair_imsi] or [IMSI_BASE]
    keys = snapshot._imei_key
    for position, tac in enumerate(snapshot._tac):
        for index in range(snapshot._tac_start[position], snapshot._tac_start[position + 1]):
            imeis.add(tac * SNR_DIGITS + (keys[index] >> 12))
    queries = []
    for imei in sorted(imeis):
        text = f"{imei:014d}"
        queries += [(text, None), (text, ""), (text, str(rng.choice(imsis))),
                    (text, str(IMSI_BASE + rng.randrange(50)))]
    for imei, imsi in zip(snapshot._pair_imei, snapshot._pair_imsi):
        text = f"{imei:014d}"
        queries += [(text, str(imsi)), (text, f"000{imsi}"), (text, f"{imsi}x"),
                    (text, "٥" + str(imsi)[1:]), (text, str(imsi) + "0" * 10),
                    (f" {text} ", str(imsi)), (f"{imei}_", str(imsi))]
    queries += [(f"{rng.randrange(10**14):014d}", str(rng.choice(imsis))) for _ in range(100)]
    queries += [("0", None), ("99999999999999", "0"), ("1" * 19, None), ("1" * 20, "5"),
                ("+35209900176148", None), ("٣٥٢٠٩٩٠٠١٧٦١٤٨", None), ("3520990017614x", None)]
    return queries


def outcome(lookup, *args):
    try:
        return lookup(*args)
    except Exception as exc:  # the same error from both paths
        return type(exc)


@pytest.mark.parametrize("seed", range(6))
def test_c_pair_search_matches_a_scan(seed):
    rng = random.Random(seed)
    snapshot = c_snapshot(compile_snapshot(
        random_lists(rng, pairs=rng.choice((1, 30, 300)), exact=rng.choice((0, 50)),
                     wider=False), "v"))
    index = snapshot._exact
    assert len(snapshot._pair_imei) > 0
    several = 0
    for imei, imsi in pair_queries(snapshot, rng):
        assert index.pair(imei, imsi) == python_pair(snapshot, imei, imsi), (imei, imsi)
        several += len([i for i in snapshot._pair_imei if i == imei]) > 1
    assert several or len(snapshot._pair_imei) < 3  # IMEIs with several IMSIs were asked


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("wider", [False, True])
def test_c_lookup_gives_the_python_verdicts(seed, wider):
    rng = random.Random(seed * 31 + wider)
    snapshot = c_snapshot(compile_snapshot(
        random_lists(rng, pairs=rng.choice((0, 1, 40, 200)), exact=rng.choice((0, 1, 60)),
                     wider=wider), "v"))
    python = pure_python(snapshot)
    rules = RuleSet(snapshot)
    matches = set()
    for day in DAYS + DAYS[:1]:  # the first day again: the cache was dropped in between
        for imei, imsi in request_strings(snapshot, rng):
            got = outcome(snapshot.lookup, imei, imsi, day)
            assert got == outcome(python.lookup, imei, imsi, day), (imei, imsi, day)
            matches.add(getattr(got, "match", got))
            hot = outcome(snapshot.hot_lookup, imei, imsi, day)
            assert hot is NotImplemented or hot == got
            if got is not ValueError and got is not None:
                assert rules.decide(imei, imsi, day=day) == got
    if len(snapshot._pair_imei):
        assert Match.IMEI_IMSI in matches
    assert ValueError in matches  # strings int() refuses: the same error from both


def test_empty_snapshot_and_empty_sections():
    snapshot = c_snapshot(compile_snapshot([], "v"))
    index = snapshot._exact
    assert index.pair(35_000_000_000_000, IMSI_BASE) == -1
    assert snapshot.lookup("35000000000000", str(IMSI_BASE), 20260101) is None
    # only pairs: no exact entry, no TAC
    only_pairs = ListEntries("ex", np.array([35_000_000_000_001], np.uint64),
                             np.array([IMSI_BASE], np.uint64), np.zeros(1, np.uint32),
                             [Attribute(Kind.EXCEPTION, "ex.csv")], rows=1)
    snapshot = c_snapshot(compile_snapshot([only_pairs], "v"))
    assert len(snapshot._tac) == 0
    verdict = snapshot.lookup("35000000000001", str(IMSI_BASE), 20260101)
    assert (verdict.status, verdict.match) == (WHITE, Match.IMEI_IMSI)
    assert snapshot.lookup("35000000000001", str(IMSI_BASE + 1), 20260101) is None
    assert snapshot.lookup("35000000000001", None, 20260101) is None


def test_pair_without_a_status_on_the_day_falls_through_to_the_imei():
    """A paired entry whose set gives no status yet (a blacklist entry before its date) does
    not decide: the IMEI's own entry does, as in the Python path."""
    later = Attribute(Kind.BLACKLIST, "bl.csv", None, 20300101, "later")
    notified = Attribute(Kind.NOTIFICATION, "n.csv", None, 20300101, "soon")
    imei = 35_209_900_176_148
    listed = ListEntries("x", np.array([imei, imei], np.uint64),
                         np.array([IMSI_BASE, 0], np.uint64), np.array([0, 1], np.uint32),
                         [later, notified], rows=2)
    snapshot = c_snapshot(compile_snapshot([listed], "v"))
    verdict = snapshot.lookup(str(imei), str(IMSI_BASE), 20260101)
    assert (verdict.status, verdict.match) == (GREY, Match.IMEI)
    verdict = snapshot.lookup(str(imei), str(IMSI_BASE), 20300101)
    assert (verdict.status, verdict.match) == (BLACK, Match.IMEI_IMSI)


def raw_index(imeis, imsis, sets, resolve=None, set_count=0):
    """An ExactIndex over hand-made pair sections (a compiled snapshot merges duplicates)."""
    return _lookup.ExactIndex(
        np.zeros(0, np.uint32), np.zeros(1, np.uint64), np.zeros(0, np.uint32),
        pair_imei=np.array(imeis, np.uint64), pair_imsi=np.array(imsis, np.uint64),
        pair_set=np.array(sets, np.uint32), resolve=resolve, set_count=set_count)


def test_several_entries_for_one_pair_are_handed_to_python():
    index = raw_index([5, 7, 7, 7, 9], [1, 2, 2, 3, 1], [0, 1, 2, 3, 4],
                      resolve=lambda *args: "verdict", set_count=5)
    assert [index.pair(7, 2), index.pair(7, 3), index.pair(9, 1), index.pair(5, 1)] == \
        [-2, 3, 4, 0]
    assert [index.pair(7, 1), index.pair(6, 2), index.pair(10, 1), index.pair(0, 0)] == [-1] * 4
    assert index.lookup("7", "2", 20260101) is NotImplemented
    assert index.lookup("7", "3", 20260101) == "verdict"
    assert index.lookup("7", "4", 20260101) is None


def test_lookup_hands_over_what_it_does_not_read():
    index = raw_index([5], [1], [0], resolve=lambda *args: "verdict", set_count=1)
    assert index.lookup("5", "1", 20260101) == "verdict"
    assert index.lookup("5", "0001", 20260101) == "verdict"  # int("0001") == 1
    for imei, imsi, day in [(5, "1", 1), (b"5", "1", 1), ("5 ", "1", 1), ("", "1", 1),
                            ("1" * 20, "1", 1), ("5", 1, 1), ("5", b"1", 1), ("5", "1", 1.0),
                            ("5", "1", None), ("5", "1", -1)]:
        assert index.lookup(imei, imsi, day) is NotImplemented, (imei, imsi, day)
    # not an IMSI: no pair applies (as int() of a non-digit string is never tried)
    for imsi in (None, "", "1x", "١", "1" * 25):
        assert index.lookup("5", imsi, 20260101) is None
    # a set index beyond the sets: Python raises its IndexError
    assert raw_index([5], [1], [3], resolve=lambda *a: 1, set_count=3).lookup(
        "5", "1", 1) is NotImplemented
    # built without resolve (or released): the Python path answers
    assert raw_index([5], [1], [0]).lookup("5", "1", 20260101) is NotImplemented


def test_verdicts_are_cached_per_set_and_level_until_the_day_changes():
    calls = []

    def resolve(member, level, day):
        calls.append((member, level, day))
        return Verdict(WHITE, Match.IMEI_IMSI, f"{member} {level} {day}", "x")

    index = _lookup.ExactIndex(
        np.array([1], np.uint32), np.array([0, 1], np.uint64), np.array([5 << 12 | 1], np.uint32),
        pair_imei=np.array([SNR_DIGITS + 5], np.uint64), pair_imsi=np.array([7], np.uint64),
        pair_set=np.array([0], np.uint32), resolve=resolve, set_count=2)
    imei = str(SNR_DIGITS + 5)
    first = index.lookup(imei, "7", 20260101)
    assert index.lookup(imei, "7", 20260101) is first
    assert index.lookup(imei, None, 20260101).reason == "1 1 20260101"
    assert index.lookup(imei, "8", 20260101).reason == "1 1 20260101"
    assert calls == [(0, IMEI_IMSI, 20260101), (1, IMEI, 20260101)]
    assert index.lookup(imei, "7", 20260102).reason == "0 0 20260102"
    assert index.lookup(imei, "7", 20260101) is not first
    assert len(calls) == 4

    def failing(member, level, day):
        raise RuntimeError("resolve failed")

    broken = _lookup.ExactIndex(np.array([1], np.uint32), np.array([0, 1], np.uint64),
                                np.array([5 << 12], np.uint32), resolve=failing, set_count=1)
    with pytest.raises(RuntimeError, match="resolve failed"):
        broken.lookup(imei, None, 20260101)


def test_released_index_finds_nothing_and_frees_its_verdicts():
    verdict = Verdict(WHITE, Match.IMEI_IMSI, "kept", "x")
    index = raw_index([5], [1], [0], resolve=lambda *args: verdict, set_count=1)
    assert index.lookup("5", "1", 20260101) is verdict
    before = sys.getrefcount(verdict)
    index.release()
    assert sys.getrefcount(verdict) == before - 1
    assert index.pair(5, 1) == -1 and index(5) == -1
    assert index.lookup("5", "1", 20260101) is NotImplemented


def test_pair_sections_go_together():
    empty32, empty64 = np.zeros(0, np.uint32), np.zeros(0, np.uint64)
    base = (empty32, np.zeros(1, np.uint64), empty32)
    with pytest.raises(TypeError, match="together"):
        _lookup.ExactIndex(*base, pair_imei=empty64)
    with pytest.raises(ValueError, match="length"):
        _lookup.ExactIndex(*base, pair_imei=np.zeros(2, np.uint64), pair_imsi=empty64,
                           pair_set=empty32)
    with pytest.raises(TypeError, match="pair_set"):
        _lookup.ExactIndex(*base, pair_imei=empty64, pair_imsi=empty64, pair_set=empty64)
    with pytest.raises(TypeError, match="callable"):
        _lookup.ExactIndex(*base, resolve=5)


@pytest.mark.skipif(bool(os.environ.get("EIR_PURE_PYTHON")), reason="EIR_PURE_PYTHON is set")
def test_snapshot_uses_the_c_levels_when_built():
    listed = ListEntries("ex", np.array([35_000_000_000_001], np.uint64),
                         np.array([IMSI_BASE], np.uint64), np.zeros(1, np.uint32),
                         [Attribute(Kind.EXCEPTION, "ex.csv")], rows=1)
    snapshot = Snapshot.from_bytes(compile_snapshot([listed], "v"))
    assert snapshot._exact.pair(35_000_000_000_001, IMSI_BASE) == 0
    assert snapshot._c_lookup("35000000000001", str(IMSI_BASE), 20260101).match is \
        Match.IMEI_IMSI


def test_a_snapshot_is_freed_without_the_cycle_collector():
    """The index, its lookup() and resolve() hold nothing that refers back to the snapshot:
    a replaced snapshot (and its mapping) goes when its last user drops it."""
    listed = ListEntries("ex", np.array([35_000_000_000_001, 35_000_000_000_002], np.uint64),
                         np.array([IMSI_BASE, 0], np.uint64), np.zeros(2, np.uint32),
                         [Attribute(Kind.EXCEPTION, "ex.csv")], rows=2)
    snapshot = Snapshot.from_bytes(compile_snapshot([listed], "v"))
    assert snapshot.lookup("35000000000001", str(IMSI_BASE), 20260101).status is WHITE
    gone = weakref.ref(snapshot)
    gc.disable()
    try:
        del snapshot
        assert gone() is None
    finally:
        gc.enable()


def test_resolve_may_release_or_reenter_the_index():
    """resolve() is Python code: whatever it does to the index, lookup() must not read freed
    buffers or cache a verdict for the wrong day."""
    imei = SNR_DIGITS + 5
    sections = (np.array([1], np.uint32), np.array([0, 1], np.uint64),
                np.array([5 << 12 | 1], np.uint32))
    pairs = {"pair_imei": np.array([imei], np.uint64), "pair_imsi": np.array([7], np.uint64),
             "pair_set": np.array([0], np.uint32)}

    def releasing(member, level, day):  # the pair gives no status (None): on to the IMEI
        index.release()

    index = _lookup.ExactIndex(*sections, **pairs, resolve=releasing, set_count=2)
    assert index.lookup(str(imei), "7", 20260101) is None

    def reentering(member, level, day):
        if day == 20260101:
            assert index.lookup(str(imei), None, 20260102) == "1 20260102"
        return f"{level} {day}"

    index = _lookup.ExactIndex(*sections, **pairs, resolve=reentering, set_count=2)
    assert index.lookup(str(imei), "7", 20260101) == "0 20260101"
    assert index.lookup(str(imei), "7", 20260102) == "0 20260102"
    assert index.lookup(str(imei), None, 20260102) == "1 20260102"


def test_with_ranges_or_tac_rules_an_empty_answer_is_handed_over():
    """wider=True: where neither C level decides, the ranges and TAC rules may, so lookup()
    says NotImplemented (Snapshot.lookup and RuleSet.decide then take the Python path)."""
    index = raw_index([5], [1], [0], resolve=lambda *args: None, set_count=1)
    assert index.lookup("5", "1", 20260101) is None
    index = _lookup.ExactIndex(
        np.zeros(0, np.uint32), np.zeros(1, np.uint64), np.zeros(0, np.uint32),
        pair_imei=np.array([5], np.uint64), pair_imsi=np.array([1], np.uint64),
        pair_set=np.array([0], np.uint32), resolve=lambda *args: None, set_count=1,
        wider=True)
    assert index.lookup("5", "1", 20260101) is NotImplemented  # the pair gives no status
    assert index.lookup("6", None, 20260101) is NotImplemented  # no entry at all
    tac = Attribute(Kind.NATIVE, "native.csv:1", GREY, 0, "", "TAC 35000000")
    listed = ListEntries("n", np.array([35_000_000_000_001], np.uint64), np.zeros(1, np.uint64),
                         np.zeros(1, np.uint32), [tac], rows=2)
    listed.tacs.append(TacRule(35_000_000, 0, tac))
    snapshot = c_snapshot(compile_snapshot([listed], "v"))
    assert snapshot._c_lookup("35000000000002", None, 20260101) is NotImplemented
    verdict = RuleSet(snapshot).decide("35000000000002", None, day=20260101)
    assert (verdict.status, verdict.match) == (GREY, Match.TAC)
    assert snapshot.lookup("35000000000001", None, 20260101).match is Match.IMEI


@pytest.mark.parametrize("seed", range(3))
def test_coarse_fences_find_what_the_python_search_finds(seed):
    """TACs large enough for several coarse fence entries (one per 4,096 keys), and enough
    pairs for several pair fence entries (one per 64): asked twice, so that the second pass
    reads the coarse fences the first one filled."""
    rng = np.random.default_rng(seed)
    tacs = [35_000_000 + seed, 86_000_000 + seed, 1_000_000 + seed]
    imeis = np.concatenate([
        tac * SNR_DIGITS + rng.choice(SNR_DIGITS, size, replace=False)
        for tac, size in zip(tacs, (300_000, 20_000, 5_000))]).astype(np.uint64)
    paired = rng.choice(imeis, 5_000, replace=False)
    attribute = Attribute(Kind.BLACKLIST, "bl.csv", None, 20200101, "r")
    listed = ListEntries(
        "bl", np.concatenate([imeis, paired]),
        np.concatenate([np.zeros(len(imeis), np.uint64),
                        IMSI_BASE + rng.integers(0, 100, len(paired)).astype(np.uint64)]),
        np.concatenate([np.zeros(len(imeis), np.uint32), np.ones(len(paired), np.uint32)]),
        [attribute, Attribute(Kind.EXCEPTION, "ex.csv")], rows=len(imeis) + len(paired))
    snapshot = c_snapshot(compile_snapshot([listed], "v"))
    index = snapshot._exact
    numbers = np.concatenate([imeis[::7], imeis[::11] + 1, imeis[::13] - 1,
                              np.array(tacs, np.uint64) * SNR_DIGITS,
                              np.array(tacs, np.uint64) * SNR_DIGITS + SNR_DIGITS - 1]).tolist()
    expected = [snapshot._exact_python(n) for n in numbers]
    pair_queries = [(int(i), int(s)) for i, s in zip(snapshot._pair_imei[::3],
                                                     snapshot._pair_imsi[::3])]
    pair_queries += [(i + 1, s) for i, s in pair_queries[:500]] + \
        [(i, s + 1) for i, s in pair_queries[:500]]
    pair_imei, pair_imsi = np.asarray(snapshot._pair_imei), np.asarray(snapshot._pair_imsi)
    pair_set = np.asarray(snapshot._pair_set)

    def scanned(imei: int, imsi: int) -> int:  # python_pair, with numpy (5,000 entries)
        found = pair_set[(pair_imei == imei) & (pair_imsi == imsi)]
        return -1 if not len(found) else int(found[0]) if len(found) == 1 else -2

    pairs_expected = [scanned(imei, imsi) for imei, imsi in pair_queries]
    assert 0 < pairs_expected.count(-1) < len(pairs_expected)
    for _ in range(2):
        assert [index(n) for n in numbers] == expected
        assert [index.pair(imei, imsi) for imei, imsi in pair_queries] == pairs_expected
