"""The C exact-IMEI search (eir.lists._lookup.ExactIndex) against the pure-Python one
(Snapshot._exact_python) on random compiled snapshots: hits, misses, TACs absent, the first and
last serial of each TAC, more than 4,096 attribute sets (imei_set_hi), with and without the
imei_fence section."""

from __future__ import annotations

import random

import numpy as np
import pytest

from eir.core.decision import EquipmentStatus
from eir.lists.entries import Attribute, Kind, ListEntries
from eir.lists.snapshot import SET_LOW_MASK, SNR_DIGITS, Snapshot, compile_snapshot

_lookup = pytest.importorskip(
    "eir.lists._lookup", reason="eir.lists._lookup not built (no C compiler at install time)")


def random_entries(rng: random.Random, tacs: int, per_tac: int, sets: int) -> ListEntries:
    """A blacklist of distinct IMEIs over `tacs` TACs, each with one of `sets` attributes."""
    entries = ListEntries("random")
    entries.attributes = [Attribute(Kind.BLACKLIST, "random.csv", EquipmentStatus.BLACKLISTED,
                                    20200101 + i % 28, f"reason {i}", "") for i in range(sets)]
    chosen_tacs = rng.sample(range(1, 99_999_999), tacs)
    imeis = set()
    for tac in chosen_tacs:
        count = rng.randint(1, per_tac)
        snrs = set(rng.sample(range(SNR_DIGITS), count)) | {0, SNR_DIGITS - 1} \
            if rng.random() < 0.3 else set(rng.sample(range(SNR_DIGITS), count))
        imeis.update(tac * SNR_DIGITS + snr for snr in snrs)
    imei = np.array(sorted(imeis), dtype=np.uint64)
    np.random.default_rng(rng.randrange(2**32)).shuffle(imei)
    entries.imei = imei
    entries.imsi = np.zeros(len(imei), np.uint64)
    entries.attribute = np.array([rng.randrange(sets) for _ in range(len(imei))], np.uint32)
    entries.rows = len(imei)
    return entries


def queries(snapshot: Snapshot, rng: random.Random) -> list[int]:
    """Every stored IMEI's neighbours and ends of its TAC, random serials, absent TACs."""
    tacs = list(snapshot._tac)
    starts = list(snapshot._tac_start)
    keys = snapshot._imei_key
    numbers = [0, 99_999_999_999_999, 10**15, 2**64 - 1]
    for i, tac in enumerate(tacs):
        first, last = keys[starts[i]] >> 12, keys[starts[i + 1] - 1] >> 12
        for snr in (first, last, first - 1, last + 1, 0, SNR_DIGITS - 1):
            if 0 <= snr < SNR_DIGITS:
                numbers.append(tac * SNR_DIGITS + snr)
        for index in rng.sample(range(starts[i], starts[i + 1]),
                                min(20, starts[i + 1] - starts[i])):
            snr = keys[index] >> 12
            numbers += [tac * SNR_DIGITS + snr + d for d in (-1, 0, 1) if 0 <= snr + d < SNR_DIGITS]
        numbers += [tac * SNR_DIGITS + rng.randrange(SNR_DIGITS) for _ in range(20)]
        numbers += [(tac + d) * SNR_DIGITS + rng.randrange(SNR_DIGITS) for d in (-1, 1)]
    numbers += [rng.randrange(10**14) for _ in range(2000)]
    return numbers


def c_index(snapshot: Snapshot):
    """The C search over the snapshot's sections (built here, so that EIR_PURE_PYTHON=1, which
    makes Snapshot use the Python search, does not change what this file tests)."""
    return _lookup.ExactIndex(snapshot._tac, snapshot._tac_start, snapshot._imei_key,
                              snapshot._imei_set_hi, snapshot._imei_fence)


def assert_same(snapshot: Snapshot, numbers: list[int]) -> int:
    """C and Python agree on every query; returns how many were hits."""
    index = c_index(snapshot)
    hits = 0
    for number in numbers:
        expected = snapshot._exact_python(number) if number < 10**14 else -1
        assert index(number) == expected, number
        hits += expected >= 0
    return hits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sets", [3, 5000])  # 5000 > 4096: imei_set_hi is used
def test_c_search_matches_python_search(seed, sets):
    rng = random.Random(seed * 7919 + sets)
    entries = random_entries(rng, tacs=rng.randint(1, 60), per_tac=rng.choice([5, 300, 3000]),
                             sets=sets)
    snapshot = Snapshot.from_bytes(compile_snapshot([entries], "v"))
    assert (snapshot._imei_set_hi is not None) == (sets > SET_LOW_MASK + 1)
    numbers = queries(snapshot, rng)
    hits = assert_same(snapshot, numbers)
    assert 0 < hits < len(numbers)
    index = c_index(snapshot)
    # every stored IMEI is found with its own attribute set
    expected = dict(zip(entries.imei.tolist(), entries.attribute.tolist()))
    for imei, attribute in rng.sample(sorted(expected.items()), min(500, len(expected))):
        assert index(imei) == attribute


def test_c_search_without_fence_matches_python_search():
    """A format-1 snapshot has no imei_fence: both searches still agree."""
    rng = random.Random(11)
    entries = random_entries(rng, tacs=30, per_tac=3000, sets=5000)
    snapshot = Snapshot.from_bytes(compile_snapshot([entries], "v"))
    snapshot._imei_fence = None  # both searches then go without it
    assert assert_same(snapshot, queries(snapshot, rng)) > 0


def test_empty_snapshot_finds_nothing():
    snapshot = Snapshot.from_bytes(compile_snapshot([], "v"))
    assert [c_index(snapshot)(n) for n in (0, 35_000_000_000_000, 99_999_999_999_999)] == [-1] * 3


def test_wrong_buffer_formats_are_refused():
    tac = np.array([1, 2], np.uint32)
    start = np.array([0, 1, 2], np.uint64)
    key = np.array([5 << 12, 6 << 12], np.uint32)
    with pytest.raises(TypeError, match="tac_start"):
        _lookup.ExactIndex(tac, start.astype(np.uint32), key)
    with pytest.raises(TypeError, match="imei_key"):
        _lookup.ExactIndex(tac, start, key.astype(np.uint64))
    with pytest.raises(ValueError, match="ascending"):
        _lookup.ExactIndex(tac, np.array([0, 3, 2], np.uint64), key)
    index = _lookup.ExactIndex(tac, start, key)
    assert index(2 * SNR_DIGITS + 6) == 0 and index(2 * SNR_DIGITS + 5) == -1


def test_buffers_are_released_with_the_index():
    """While an ExactIndex holds the buffers the bytearray cannot be resized; after it is
    gone it can."""
    data = bytearray(np.array([5 << 12], np.uint32).tobytes())
    index = _lookup.ExactIndex(np.array([1], np.uint32), np.array([0, 1], np.uint64),
                               memoryview(data).cast("I"))
    assert index(SNR_DIGITS + 5) == 0
    with pytest.raises(BufferError):
        data.extend(b"\0" * 4)
    del index
    data.extend(b"\0" * 4)
