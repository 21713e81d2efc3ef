"""Bounded-memory list building (eir.lists.table): sorting in spilled runs, merging block
by block, table files, and a snapshot compiled block by block that is byte-identical to one
compiled in a single block."""

import os
import subprocess
import sys

import numpy as np
import pytest

from eir.core.decision import EquipmentStatus
from eir.lists import sections, table
from eir.lists.entries import Attribute, Kind, ListDelta, ListEntries
from eir.lists.state import ListState
from eir.lists.table import Block, EntrySorter, merge, open_table, write_table
from eir.lists.snapshot import Snapshot, compile_snapshot
from eir.lists.store import Store
from eir.lists.sync import sync

RNG = np.random.default_rng(7)


def random_entries(n, paired=False, notified=False, attributes=3, imeis=None):
    imei = imeis if imeis is not None else RNG.integers(35_000_000_000_000, 35_000_000_000_000
                                                          + 50 * n, n).astype(np.uint64)
    imsi = RNG.integers(1, 4, n).astype(np.uint64) * 10**14 if paired else None
    subscriber = RNG.integers(1, 4, n).astype(np.uint64) if notified else None
    return Block.of(imei, imsi, subscriber,
                    RNG.integers(0, attributes, n).astype(np.uint32))


def rows(block):
    return list(zip(np.asarray(block.imei).tolist(), np.asarray(block.imsi).tolist(),
                    np.asarray(block.subscriber).tolist(), np.asarray(block.attribute).tolist()))


@pytest.mark.parametrize("paired, notified", [(False, False), (True, False), (False, True)])
def test_sorter_spilling_runs_gives_the_same_order_as_one_sort(tmp_path, paired, notified):
    entries = random_entries(5000, paired, notified)
    sorter = EntrySorter(tmp_path, run_rows=700)
    for start in range(0, 5000, 333):
        part = entries.slice(start, start + 333)
        sorter.add(part.imei, part.imsi if paired else None,
                   part.subscriber if notified else None, part.attribute)
    assert len(list(tmp_path.glob("run-*"))) == 5  # spilled every 3 batches of 333
    result = sorter.finish()
    assert not list(tmp_path.glob("run-*"))  # runs removed once merged
    assert rows(result) == sorted(rows(entries))
    assert (result.imsi.strides == (0,)) == (not paired)  # zero columns stay free


def test_merge_keeps_every_entry_of_an_imei_in_one_block():
    # many duplicates of few IMEIs, in three sources
    sources = [random_entries(900, imeis=RNG.integers(1, 60, 900).astype(np.uint64)).sorted()
               for _ in range(3)]
    seen_last = -1
    total = 0
    for pieces in merge(sources, block_rows=30):
        imeis = np.concatenate([np.asarray(p.imei) for p in pieces])
        assert len(imeis) and imeis.min() > seen_last  # in order, no IMEI split
        seen_last = int(imeis.max())
        total += len(imeis)
    assert total == 2700


def test_table_file_round_trip_and_refusals(tmp_path):
    entries = random_entries(1000, paired=True).sorted()
    path = tmp_path / "t.table"
    write_table(path, [entries.slice(0, 400), entries.slice(400, 1000)], {"x": 1})
    meta, again = open_table(path)
    assert meta == {"x": 1} and rows(again) == rows(entries)
    assert again.subscriber.strides == (0,)  # never stored: all zero
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(table.TableError, match="t.table"):
        open_table(path)


def mapped_under(directory):
    """Names of the files under `directory` this process has mapped (unlinked ones too)."""
    names = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) == 6 else ""
            if path.startswith(f"{directory}/"):
                names.add(path.removesuffix(" (deleted)").rpartition("/")[2])
    return names


def attribute(i):
    return Attribute(Kind.BLACKLIST, "bl.csv", block_date=20200101 + i, reason=f"r{i}")


def listed(block, n_attributes, ordered=False):
    return ListEntries("bl", block.imei, block.imsi, block.attribute,
                       [attribute(i) for i in range(n_attributes)], rows=len(block),
                       ordered=ordered)


@pytest.mark.parametrize("seed", [0, 1, 2])  # data of its own: not the order tests ran in
@pytest.mark.parametrize("n_attributes", [5, 5000])  # 5000: attribute sets need imei_set_hi
def test_snapshot_compiled_in_small_blocks_is_byte_identical(monkeypatch, n_attributes, seed):
    # Combined sets of IMEIs and of IMEI+IMSI pairs in one merged block were numbered plain
    # first, then pairs: block by block, not as the whole list would (seeds 0-2 all failed).
    monkeypatch.setattr(sys.modules[__name__], "RNG", np.random.default_rng(seed))
    # high attribute ids only from the middle on: imei_set_hi starts late and is back-filled
    plain = random_entries(6000, attributes=n_attributes)
    plain.attribute[:3000] %= 100
    lists = [listed(plain, n_attributes),
             listed(random_entries(800, paired=True), n_attributes),
             listed(random_entries(800, imeis=plain.imei[:800].copy()), n_attributes)]
    whole = compile_snapshot(lists, "v1", created=1.0)
    monkeypatch.setattr(table, "BLOCK_ROWS", 97)
    blocked = compile_snapshot(lists, "v1", created=1.0)
    assert blocked == whole
    snapshot = Snapshot.from_bytes(blocked)
    assert (snapshot._imei_set_hi is not None) == (n_attributes > 4096)
    day = 20300101
    for imei in plain.imei[::250].tolist():
        verdict = snapshot.lookup(f"{imei:014d}", None, day)
        assert verdict is not None and verdict.status is EquipmentStatus.BLACKLISTED


def test_delta_applied_to_a_spilled_state_matches_the_in_memory_result(tmp_path, monkeypatch):
    base = random_entries(3000, attributes=2)
    state = ListState("blacklist", "5", listed(base, 2))
    removed = base.slice(100, 400)
    added = random_entries(500, attributes=1)
    delta = ListDelta("blacklist", "5", "6",
                      listed(added, 1), listed(removed, 2))
    in_memory = state.apply([delta], ["d@1"])
    monkeypatch.setattr(table, "RUN_ROWS", 200)
    monkeypatch.setattr(table, "BLOCK_ROWS", 150)
    spilled = state.apply([delta], ["d@1"], scratch=tmp_path)
    # written to scratch, not held in memory: mapped, the file already unlinked
    assert [name for name in mapped_under(tmp_path) if name.startswith("table-")]
    assert not list(tmp_path.glob("table-*"))
    for result in (in_memory, spilled):
        assert result.entries.ordered
        got = set(zip(result.entries.imei.tolist(), result.entries.attribute.tolist()))
        gone = set(removed.imei.tolist()) | set(added.imei.tolist())
        want = {(i, a) for i, a in zip(base.imei.tolist(), base.attribute.tolist())
                if i not in gone} | {(i, a + 2) for i, a in zip(added.imei.tolist(),
                                                                 added.attribute.tolist())}
        assert got == want


def test_sync_removes_its_scratch_and_a_killed_syncs_but_not_a_running_syncs(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "20261120_blacklist.csv").write_text(
        "imei,block_date,reasons\n35209900176148,20200101,stolen\n")
    store = Store(tmp_path / "store")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    killed = store.root / "tmp" / f"sync-{dead}-abc"
    running = store.root / "tmp" / f"sync-{os.getpid()}-other"
    for directory in (killed, running):
        directory.mkdir(parents=True)
        (directory / "run-1.table").write_bytes(b"x" * 100)
    assert sync(str(drop), store).published
    assert sorted(p.name for p in (store.root / "tmp").iterdir()) == [running.name]
    state, = (store.root / "lists").glob("blacklist-*.state")
    assert ListState.open(state).entries.imei.tolist() == [35209900176148]


def test_sorter_gives_the_runs_disk_space_back_as_it_merges_them(tmp_path, monkeypatch):
    # 8 runs of 25,000 rows, merged in blocks of 2,000: each run's consumed pages are
    # punched out while the merge goes on, and the result is the same as one sort.
    punched = []

    def punch(descriptor, offset, length, real=table.punch_hole):
        punched.append((os.fstat(descriptor).st_ino, offset, length))
        return real(descriptor, offset, length)

    monkeypatch.setattr(table, "punch_hole", punch)
    monkeypatch.setattr(table, "BLOCK_ROWS", 2000)
    entries = random_entries(200_000)
    sorter = EntrySorter(tmp_path, run_rows=25_000)
    for start in range(0, 200_000, 25_000):
        part = entries.slice(start, start + 25_000)
        sorter.add(part.imei, None, None, part.attribute)
    runs = {os.stat(path).st_ino for path in sorter.runs}
    result = sorter.finish()
    assert rows(result) == sorted(rows(entries))
    assert {inode for inode, _, _ in punched} == runs  # every run gave space back
    assert sum(length for _, _, length in punched) > 0.8 * 200_000 * 12


def test_release_punches_only_whole_pages_already_merged(tmp_path):
    entries = random_entries(100_000, attributes=5).sorted()
    path = tmp_path / "run.table"
    write_table(path, [entries], {})
    allocated = os.stat(path).st_blocks
    _, mapped = open_table(path)
    release = table._Release([path])
    release.taken([mapped.slice(0, 60_000)])
    release.close()
    if os.stat(path).st_blocks == allocated:
        pytest.skip("this filesystem cannot punch holes")
    assert os.stat(path).st_blocks * 512 <= allocated * 512 - 60_000 * 12 + 2 * 4096 * 2
    # the rows not yet merged are intact, down to the partial page before them
    _, again = open_table(path)
    assert rows(again.slice(60_000, 100_000)) == rows(entries.slice(60_000, 100_000))


def test_sync_compiles_from_the_saved_states_with_the_scratch_tables_dropped(tmp_path,
                                                                              monkeypatch):
    # A list larger than a sort run is sorted into a scratch table; once saved as the
    # list's state, the compile reads the state, and the scratch table is no longer mapped
    # (unlinked, so its space is back before the snapshot's sections spill).
    from eir.lists import sync as sync_module

    drop = tmp_path / "drop"
    drop.mkdir()
    imeis = RNG.choice(10**6, 3000, replace=False) + 35_209_900_000_000
    (drop / "20261120_blacklist.csv").write_text(
        "imei,block_date,reasons\n" + "".join(f"{i},20200101,stolen\n" for i in imeis))
    store = Store(tmp_path / "store")
    monkeypatch.setattr(table, "RUN_ROWS", 1000)
    seen = {}

    def write_snapshot(out, lists, *args, scratch=None, **kwargs):
        seen["scratch mapped"] = mapped_under(scratch)
        seen["lists from"] = {name for name in mapped_under(store.root / "lists")}
        return real(out, lists, *args, scratch=scratch, **kwargs)

    real = sync_module.write_snapshot
    monkeypatch.setattr(sync_module, "write_snapshot", write_snapshot)
    assert sync(str(drop), store).published
    assert seen["scratch mapped"] == set()
    assert any(name.startswith("blacklist-") for name in seen["lists from"])
    verdict = store.open_current().lookup(f"{imeis[0]}", None, 20300101)
    assert verdict is not None and verdict.status is EquipmentStatus.BLACKLISTED


def test_spilled_sections_give_their_disk_space_back_as_they_are_copied(tmp_path,
                                                                         monkeypatch):
    # Spilled sections are copied into the file in 16 MB pieces, each punched out of the
    # spill after it is copied: the spill and the file do not both hold the section.
    punched = []

    def punch(descriptor, offset, length, real=sections.punch_hole):
        punched.append((offset, length))
        return real(descriptor, offset, length)

    entries = random_entries(3_000_000, attributes=5).sorted()
    whole = tmp_path / "whole.table"
    write_table(whole, [entries], {})
    monkeypatch.setattr(sections, "punch_hole", punch)
    monkeypatch.setattr(sections, "SPILL_BYTES", 1 << 20)
    spilled = tmp_path / "spilled.table"
    write_table(spilled, [entries.slice(i, i + 500_000) for i in range(0, 3_000_000, 500_000)],
                {})
    assert spilled.read_bytes() == whole.read_bytes()
    # imei: 24,000,000 bytes in two pieces, attribute: 12,000,000 in one
    assert sorted(punched) == [(0, 12_000_000), (0, 16 << 20),
                               (16 << 20, 24_000_000 - (16 << 20))]
