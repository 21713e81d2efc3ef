"""The snapshot store (eir.lists.store) on a real directory: publishing puts a version in force,
versions are listed and pruned, rollback goes back, leftovers and damage are handled, and a
writer killed with SIGKILL at any point leaves a CURRENT that opens and answers."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eir.core.decision import EquipmentStatus, Rule, RuleSet, UnknownPolicy
from eir.lists.entries import Attribute, Kind, ListEntries
from eir.lists.snapshot import compile_snapshot, entries_from_rules
from eir.lists.store import SUFFIX, Store, StoreError

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
BULK_TAC = 35100000  # the bulk entries' TAC; markers use another


# --- helpers ----------------------------------------------------------------------------------

def marker_imei(version: str) -> str:
    """The IMEI that only snapshot `version` blacklists: tells versions apart by content."""
    return f"35000000{int(version):06d}"


def snapshot_bytes(version: str, bulk: int = 0) -> bytes:
    """A compiled snapshot whose header says `version`, blacklisting marker_imei(version),
    plus `bulk` whitelisted IMEIs (to make the file big enough to be killed mid-write)."""
    lists = [entries_from_rules([Rule(EquipmentStatus.BLACKLISTED, f"version {version}",
                                      imei=marker_imei(version))])]
    if bulk:
        start = BULK_TAC * 1_000_000
        filler = ListEntries("bulk", np.arange(start, start + bulk, dtype=np.uint64),
                             np.zeros(bulk, np.uint64), np.zeros(bulk, np.uint32),
                             [Attribute(Kind.NATIVE, "bulk", EquipmentStatus.WHITELISTED,
                                        subject="bulk")])
        filler.rows = bulk
        lists.append(filler)
    return compile_snapshot(lists, version)


def publish(store: Store, bulk: int = 0) -> str:
    """Publish the next version the way a sync does (under the store's lock)."""
    with store.locked():
        version = store.next_version()
        store.publish(snapshot_bytes(version, bulk), version)
    return version


def assert_in_force_answers(store: Store, version: str, bulk: int = 0) -> None:
    """CURRENT names `version` and its snapshot opens whole and answers as that version."""
    assert store.current_version() == version
    snapshot = store.open_current()
    assert snapshot.version == version
    assert snapshot.info.counts["imei"] == 1 + bulk
    rules = RuleSet(snapshot, UnknownPolicy.UNKNOWN)
    assert rules.decide(marker_imei(version)).status is EquipmentStatus.BLACKLISTED
    if bulk:
        last = f"{BULK_TAC}{bulk - 1:06d}"
        assert rules.decide(last).status is EquipmentStatus.WHITELISTED


def kept(store: Store) -> list[str]:
    return [stored.version for stored in store.versions()]


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# --- publishing and listing -------------------------------------------------------------------

def test_an_empty_store_says_to_run_eir_sync(tmp_path):
    store = Store(tmp_path / "store")
    assert store.current_version() is None
    assert store.versions() == []
    with pytest.raises(StoreError, match="no snapshot yet.*run eir sync"):
        store.open_current()


def test_publish_puts_the_version_in_force_and_open_current_maps_it(tmp_path):
    store = Store(tmp_path / "store")
    version = publish(store)
    assert version == "000001"
    assert (store.root / "CURRENT").read_text() == "000001\n"
    assert (store.snapshots / f"000001{SUFFIX}").is_file()
    assert_in_force_answers(store, "000001")

    assert publish(store) == "000002"
    assert_in_force_answers(store, "000002")
    # The old version's marker is not in the new snapshot: nothing carried over by mistake.
    rules = RuleSet(store.open_current(), UnknownPolicy.UNKNOWN)
    assert rules.decide(marker_imei("000001")).status is None


def test_versions_are_listed_newest_first_with_the_one_in_force_marked(tmp_path):
    store = Store(tmp_path / "store")
    for _ in range(3):
        publish(store)
    listed = store.versions()
    assert [(v.version, v.in_force) for v in listed] == [
        ("000003", True), ("000002", False), ("000001", False)]
    assert all(v.info.version == v.version for v in listed)
    assert all(0 <= v.age_seconds < 60 for v in listed)


def test_keep_prunes_the_oldest_versions(tmp_path):
    store = Store(tmp_path / "store", keep=2)
    for _ in range(4):
        publish(store)
    assert kept(store) == ["000004", "000003"]
    assert sorted(p.name for p in store.snapshots.iterdir()) == [
        f"000003{SUFFIX}", f"000004{SUFFIX}"]


def test_pruning_never_removes_the_version_in_force_across_rollbacks(tmp_path):
    store = Store(tmp_path / "store", keep=2)
    publish(store)
    publish(store)
    assert store.rollback("000001") == "000001"
    assert_in_force_answers(store, "000001")
    # New publishes after a rollback: each new version is in force and answers; only `keep`
    # versions stay, and whichever is in force is always among them.
    for expected in ("000003", "000004"):
        assert publish(store) == expected
        assert_in_force_answers(store, expected)
        assert expected in kept(store) and len(kept(store)) == 2
    assert kept(store) == ["000004", "000003"]
    assert store.rollback() == "000003"
    assert_in_force_answers(store, "000003")


# --- rollback ---------------------------------------------------------------------------------

def test_rollback_without_a_version_goes_to_the_previous_one(tmp_path):
    store = Store(tmp_path / "store")
    for _ in range(3):
        publish(store)
    assert store.rollback() == "000002"
    assert_in_force_answers(store, "000002")
    assert store.rollback() == "000001"
    assert_in_force_answers(store, "000001")
    with pytest.raises(StoreError, match="no version older than 000001"):
        store.rollback()
    assert_in_force_answers(store, "000001")
    # Rolling back keeps every version: the newest can be put back by name.
    assert kept(store) == ["000003", "000002", "000001"]


def test_rollback_to_a_named_version(tmp_path):
    store = Store(tmp_path / "store")
    for _ in range(3):
        publish(store)
    assert store.rollback("000001") == "000001"
    assert_in_force_answers(store, "000001")
    assert store.rollback("000003") == "000003"
    assert_in_force_answers(store, "000003")


def test_rollback_to_an_unknown_version_lists_the_kept_ones(tmp_path):
    store = Store(tmp_path / "store", keep=2)
    for _ in range(3):
        publish(store)
    with pytest.raises(StoreError) as caught:
        store.rollback("000001")  # pruned
    assert "version 000001 is not kept" in str(caught.value)
    assert "kept: 000003, 000002" in str(caught.value)
    assert_in_force_answers(store, "000003")


# --- leftovers and damage ---------------------------------------------------------------------

@pytest.mark.parametrize("leftover", [
    pytest.param(f"snapshots/.000002{SUFFIX}.4242.tmp", id="snapshot-temp"),
    pytest.param(".CURRENT.4242.tmp", id="current-temp"),
])
def test_a_temp_file_left_by_a_killed_writer_is_ignored_and_cleaned(tmp_path, leftover):
    store = Store(tmp_path / "store")
    publish(store)
    # What a writer killed mid-write leaves: a partial file under its temporary name.
    partial = store.root / leftover
    partial.write_bytes(snapshot_bytes("000002")[:100])
    assert kept(store) == ["000001"]
    assert_in_force_answers(store, "000001")
    assert store.next_version() == "000002"

    assert publish(store) == "000002"
    assert_in_force_answers(store, "000002")
    assert not partial.exists(), f"{leftover} was not cleaned by the next publish"


@pytest.mark.parametrize("damage, says", [
    pytest.param(lambda path: path.unlink(), "No such file", id="missing"),
    pytest.param(lambda path: path.write_bytes(b""), "cannot map", id="empty"),
    pytest.param(lambda path: path.write_bytes(path.read_bytes()[:-64]), "truncated",
                 id="truncated"),
    pytest.param(lambda path: path.write_bytes(b"not a snapshot at all" * 10), "bad magic",
                 id="garbage"),
])
def test_current_naming_a_missing_or_damaged_snapshot_is_a_clear_store_error(tmp_path, damage,
                                                                             says):
    store = Store(tmp_path / "store")
    publish(store)
    publish(store, bulk=1000)  # the sections, not the header, are at the end
    damage(store.path_of("000002"))
    with pytest.raises(StoreError) as caught:
        store.open_current()
    message = str(caught.value)
    assert f"000002{SUFFIX}" in message and says in message, message
    # A damaged version is never offered: the listing and a rollback skip it.
    assert kept(store) == ["000001"]
    assert store.rollback() == "000001"
    assert_in_force_answers(store, "000001")


# --- crash safety -----------------------------------------------------------------------------

# Publishes up to 40 versions, saying when each write starts and ends (the parent kills on a
# line: just after "publishing", the kill lands inside Store.publish).
PUBLISHER = """
import sys
sys.path.insert(0, sys.argv[2])
from eir.lists.store import Store
from test_store import snapshot_bytes
store = Store(sys.argv[1], keep=3)
for _ in range(40):
    with store.locked():
        version = store.next_version()
        data = snapshot_bytes(version, bulk=int(sys.argv[3]))
        print("publishing", version, flush=True)
        store.publish(data, version)
    print("published", version, flush=True)
"""
KILLS = 20
BULK = 400_000  # ~1.6 MB per snapshot: long enough a write for a kill to land inside it


def run_publisher_and_kill(store_dir: Path, after_lines: int) -> list[list[str]]:
    """Start the publisher, SIGKILL it after it printed `after_lines` lines; all it printed."""
    child = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(store_dir), str(TESTS),
                              str(BULK)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    printed = []
    try:
        while len(printed) < after_lines:
            line = child.stdout.readline()
            if not line:
                break  # it finished (or died) first
            printed.append(line.split())
        child.send_signal(signal.SIGKILL)
        printed += [line.split() for line in child.stdout]  # what it said before dying
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    return printed


def test_a_publisher_killed_at_random_points_never_leaves_current_unusable(tmp_path):
    store = Store(tmp_path / "store", keep=3)
    rng = random.Random(20261123)
    published = None
    for kill in range(KILLS):
        # Kill just after a "publishing" line (inside the write: a partial temp file is
        # left about one time in three) or after a "published" one (between publishes).
        printed = run_publisher_and_kill(store.root, rng.randint(1, 4))
        assert printed and printed[0][0] == "publishing", printed
        started = [v for what, v in printed if what == "publishing"]
        finished = [v for what, v in printed if what == "published"]
        published = finished[-1] if finished else published
        allowed = {published, started[-1]} - {None}
        current = store.current_version()
        assert current in allowed, (f"kill {kill}: CURRENT is {current!r}, expected one of "
                                    f"{sorted(allowed)} (child printed {printed})")
        assert_in_force_answers(store, current, BULK)
        published = current
    # A later clean publish works, and no partial file is left behind.
    version = publish(store, BULK)
    assert_in_force_answers(store, version, BULK)
    assert not list(store.root.rglob("*.tmp")), files_under(store.root)
    assert len(kept(store)) == 3


# --- the journal ------------------------------------------------------------------------------

def test_publish_and_rollback_are_journaled_and_a_full_journal_does_not_undo_them(tmp_path,
                                                                                 caplog):
    store = Store(tmp_path / "store")
    publish(store)
    publish(store)
    assert store.rollback(by="operator on call") == "000001"
    assert [(r["act"], r["version"], r["previous"], r.get("by")) for r in
            store.journal_records()] == [("publish", "000001", None, None),
                                         ("publish", "000002", "000001", None),
                                         ("rollback", "000001", "000002", "operator on call")]
    store.unpin()
    store.journal.unlink()
    store.journal.mkdir()  # cannot be appended to, as on a full or read-only disk
    assert publish(store) == "000003"
    assert_in_force_answers(store, "000003")
    assert "not journaled" in caplog.text and '"act": "publish"' in caplog.text
