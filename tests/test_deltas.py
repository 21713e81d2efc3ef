"""Registry deltas: applied run after run on the list in force; a wrong base is refused."""

import subprocess
import sys
import zipfile

import numpy as np
import pytest

from eir.core.decision import EquipmentStatus, RuleSet, UnknownPolicy
from eir.lists.entries import Attribute, Kind, ListDelta, ListEntries
from eir.lists.state import DeltaError, ListState
from eir.lists.store import Store, StoreError
from eir.lists.sync import SyncError, sync

DAY = 20261201
BLACK, WHITE = EquipmentStatus.BLACKLISTED, EquipmentStatus.WHITELISTED
A, B, C = "35209900176148", "35332106470089", "35000000000001"
OWNER, OTHER = "001010123456789", "001010999999999"


def listed(rows, kind=Kind.BLACKLIST, name="bl"):
    attribute = Attribute(kind, name, block_date=20200101, reason="stolen")
    imei = np.array([int(r[0]) for r in rows], np.uint64)
    imsi = np.array([int(r[1]) if len(r) > 1 else 0 for r in rows], np.uint64)
    entries = ListEntries(name, imei, imsi, np.zeros(len(rows), np.uint32), [attribute])
    entries.rows = len(rows)
    return entries


def delta(name, base, run, added=(), removed=(), kind=Kind.BLACKLIST):
    return ListDelta(name, base, run, listed(added, kind), listed(removed, kind))


def keys(state):
    return sorted(zip(state.entries.imei.tolist(), state.entries.imsi.tolist()))


def test_state_round_trips_through_a_table_file(tmp_path):
    state = ListState("blacklist", "5", listed([(B,), (A,)]), {35209900: "Acme"}, ["f@1"])
    state.save(tmp_path / "bl.state")
    again = ListState.open(tmp_path / "bl.state")
    assert again.entries.ordered and again.entries.imei.tolist() == sorted([int(A), int(B)])
    assert (again.name, again.run, again.files, again.tac_names) == (
        "blacklist", "5", ["f@1"], {35209900: "Acme"})
    assert keys(again) == keys(state)
    assert again.entries.attributes == state.entries.attributes


def test_delta_removes_then_adds_and_takes_the_run():
    state = ListState("blacklist", "5", listed([(A,), (B,)]))
    after = state.apply([delta("blacklist", "5", "6", added=[(C,)], removed=[(A,)])],
                        ["d@1"])
    assert after.run == "6"
    assert keys(after) == sorted([(int(B), 0), (int(C), 0)])
    assert keys(state) == sorted([(int(A), 0), (int(B), 0)])  # the old state is unchanged


def test_changed_entry_replaces_the_old_one_with_the_same_key():
    state = ListState("blacklist", "5", listed([(A,)]))
    after = state.apply([delta("blacklist", "5", "6", added=[(A,)])], ["d@1"])
    assert keys(after) == [(int(A), 0)]


def test_exceptions_are_keyed_by_imei_and_imsi():
    state = ListState("exceptions_op1", "5",
                      listed([(A, OWNER), (A, OTHER)], Kind.EXCEPTION))
    after = state.apply([delta("exceptions_op1", "5", "6", removed=[(A, OTHER)],
                               kind=Kind.EXCEPTION)], ["d@1"])
    assert keys(after) == [(int(A), int(OWNER))]


def test_delta_on_another_base_is_refused():
    state = ListState("blacklist", "6", listed([(A,)]))
    with pytest.raises(DeltaError, match="on top of run 9, but the blacklist list in force "
                                         "is from run 6"):
        state.apply([delta("blacklist", "9", "10", added=[(B,)])], ["d.csv@1"])


# -- through sync, from files ----------------------------------------------------------------

HEADER = "imei,block_date,reasons\n"


def write_zip(path, members: dict[str, str]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)


def verdict(store, imei, imsi=None):
    return RuleSet(store.open_current(), UnknownPolicy.UNKNOWN).decide(imei, imsi, day=DAY)


@pytest.fixture
def drop(tmp_path):
    """A DIRBS zip: the full blacklist of run 5 with the delta from run 4 that led to it."""
    directory = tmp_path / "drop"
    directory.mkdir()
    write_zip(directory / "20261120_blacklist.zip", {
        "20261120_blacklist.csv": f"{HEADER}{A},20200101,stolen\n{B},20200101,stolen\n",
        "20261120_blacklist_delta_4_5_blocked.csv": f"{HEADER}{B},20200101,stolen\n"})
    return directory


def test_full_list_in_a_zip_takes_the_run_of_its_deltas(drop, tmp_path):
    store = Store(tmp_path / "store")
    result = sync(str(drop), store)
    assert result.published
    assert {s["run"] for s in result.sources} == {"5"}
    assert verdict(store, A).status is BLACK and verdict(store, B).status is BLACK


def test_next_delta_applies_and_resync_is_up_to_date(drop, tmp_path):
    store = Store(tmp_path / "store")
    sync(str(drop), store)
    (drop / "20261121_blacklist_delta_5_6_unblocked.csv").write_text(
        f"{HEADER}{A},20200101,stolen\n")
    result = sync(str(drop), store)
    assert (result.published, result.version) == (True, "000002")
    assert verdict(store, A).status is None  # unblocked: unknown now
    assert verdict(store, B).status is BLACK
    again = sync(str(drop), store)
    assert (again.published, again.version) == (False, "000002")


def test_delta_with_a_wrong_base_is_refused_and_the_store_untouched(drop, tmp_path):
    store = Store(tmp_path / "store")
    sync(str(drop), store)
    before = sorted(p.name for p in store.root.rglob("*"))
    (drop / "20261122_blacklist_delta_9_10_blocked.csv").write_text(
        f"{HEADER}{C},20200101,stolen\n")
    with pytest.raises(SyncError, match="20261122_blacklist_delta_9_10_blocked.csv: delta "
                                        "applies on top of run 9"):
        sync(str(drop), store)
    assert sorted(p.name for p in store.root.rglob("*")) == before
    assert store.current_version() == "000001"
    assert verdict(store, C).status is None


def test_stolen_list_delta_adds_and_removes(tmp_path, drop):
    store = Store(tmp_path / "store")
    sync(str(drop), store)
    stolen = drop / "stolen_delta.csv"
    stolen.write_text(f"imei,reporting_date,status,change_type\n{C},20200101,,add\n")
    sync(str(drop), store)
    assert verdict(store, C).status is BLACK
    stolen.write_text(f"imei,reporting_date,status,change_type\n{C},20200101,,remove\n")
    sync(str(drop), store)
    assert verdict(store, C).status is None
    assert verdict(store, A).status is BLACK  # the blacklist in force stays


def test_cli_sync_refusal_exits_1_naming_the_delta(drop, tmp_path):
    store = tmp_path / "store"
    run = [sys.executable, "-m", "eir", "sync", "--source", str(drop), "--store", str(store)]
    assert subprocess.run(run, capture_output=True).returncode == 0
    (drop / "20261122_blacklist_delta_9_10_blocked.csv").write_text(
        f"{HEADER}{C},20200101,stolen\n")
    refused = subprocess.run(run, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "store untouched" in refused.stderr
    assert "delta applies on top of run 9, but the blacklist list in force is from run 5" \
        in refused.stderr


def test_dated_stolen_deltas_are_all_applied_not_superseded(tmp_path, drop):
    store = Store(tmp_path / "store")
    header = "imei,reporting_date,status,change_type\n"
    (drop / "20261120_stolen.csv").write_text(f"{header}{C},20200101,,add\n")
    (drop / "20261121_stolen.csv").write_text(f"{header}35000000000002,20200101,,add\n")
    result = sync(str(drop), store)
    assert verdict(store, C).status is BLACK
    assert verdict(store, "35000000000002").status is BLACK
    assert not any("stolen" in note for note in result.ignored)


def test_a_zip_with_two_full_lists_keeps_both(tmp_path):
    source = tmp_path / "drop"
    source.mkdir()
    write_zip(source / "20261120_registry.zip", {
        "20261120_blacklist.csv": f"{HEADER}{A},20200101,stolen\n",
        "20261120_exceptions_op1.csv": f"imei,imsi,msisdn\n{A},{OWNER},6281\n"})
    store = Store(tmp_path / "store")
    sync(str(source), store)
    assert verdict(store, A).status is BLACK
    assert verdict(store, A, OWNER).status is WHITE


def test_an_older_full_list_does_not_replace_a_newer_run(drop, tmp_path):
    store = Store(tmp_path / "store")
    sync(str(drop), store)  # blacklist of run 5
    older = tmp_path / "older"
    older.mkdir()
    write_zip(older / "20261119_blacklist.zip", {
        "20261119_blacklist.csv": f"{HEADER}{C},20200101,stolen\n",
        "20261119_blacklist_delta_3_4_blocked.csv": f"{HEADER}{C},20200101,stolen\n"})
    result = sync(str(older), store)
    assert not result.published
    assert any("run 4 is older than the blacklist list in force (run 5)" in note
               for note in result.ignored)
    assert verdict(store, A).status is BLACK and verdict(store, C).status is None


def test_an_unreadable_list_state_refuses_the_sync_with_its_path(drop, tmp_path):
    store = Store(tmp_path / "store")
    sync(str(drop), store)
    for state in store.states.glob("*.state"):
        state.write_bytes(b"not a list state")
    (drop / "20261121_blacklist_delta_5_6_unblocked.csv").write_text(f"{HEADER}{A},20200101,x\n")
    with pytest.raises(StoreError, match="list state unreadable"):
        sync(str(drop), store)
    assert store.current_version() == "000001"


def test_resolving_one_subscribers_notification_keeps_the_others(tmp_path):
    """A cloned IMEI is notified to several subscribers: one resolving must not clear it."""
    source = tmp_path / "drop"
    source.mkdir()
    header = "imei,imsi,msisdn,block_date,reasons\n"
    write_zip(source / "20261120_notifications_op1.zip", {
        "20261120_notifications_op1.csv":
            f"{header}{A},{OWNER},6281,20991231,duplicate\n{A},{OTHER},6282,20991231,duplicate\n",
        "20261120_notifications_op1_delta_4_5_new.csv":
            f"{header}{A},{OWNER},6281,20991231,duplicate\n"})
    store = Store(tmp_path / "store")
    sync(str(source), store)
    assert verdict(store, A).status is EquipmentStatus.GREYLISTED
    (source / "20261121_notifications_op1_delta_5_6_resolved.csv").write_text(
        f"{header}{A},{OWNER},6281,20991231,duplicate\n")
    sync(str(source), store)
    assert verdict(store, A).status is EquipmentStatus.GREYLISTED  # OTHER's still stands
    (source / "20261122_notifications_op1_delta_6_7_resolved.csv").write_text(
        f"{header}{A},{OTHER},6282,20991231,duplicate\n")
    sync(str(source), store)
    assert verdict(store, A).status is None
