"""Whitelist mode at registry scale: a registry whitelist (registered IMEIs) synced like the
other lists, the unknown policy for everything else, and a blacklist entry still winning."""

import zipfile

import pytest

from eir.core.decision import EquipmentStatus, Match, RuleSet, UnknownPolicy
from eir.lists.store import Store
from eir.lists.sync import SyncError, sync

DAY = 20261201
REGISTERED, STOLEN, STRANGER = "35209900176148", "35332106470089", "35000000000001"


def decide(store, imei):
    return RuleSet(store.open_current(), UnknownPolicy.BLACKLISTED).decide(imei, None, day=DAY)


@pytest.fixture
def drop(tmp_path):
    directory = tmp_path / "drop"
    directory.mkdir()
    with zipfile.ZipFile(directory / "20261120_whitelist.zip", "w") as archive:
        archive.writestr("20261120_whitelist.csv",
                         f"imei,registration_date\n{REGISTERED}1,20210304\n{STOLEN}0,\n")
        archive.writestr("20261120_whitelist_delta_4_5_added.csv",
                         f"imei,registration_date\n{STOLEN}0,\n")
    (directory / "20261120_blacklist.csv").write_text(
        f"imei,block_date,reasons\n{STOLEN},20200101,stolen\n")
    return directory


def test_registered_imeis_work_and_the_rest_gets_the_unknown_policy(drop, tmp_path):
    store = Store(tmp_path / "store")
    assert sync(str(drop), store).published
    registered = decide(store, REGISTERED)
    assert (registered.status, registered.match) == (EquipmentStatus.WHITELISTED, Match.IMEI)
    assert registered.reason == "registered on the registry whitelist on 2021-03-04"
    assert registered.source == "20261120_whitelist.csv"
    stolen = decide(store, STOLEN)  # registered, then reported stolen: the blacklist wins
    assert (stolen.status, stolen.reason) == (
        EquipmentStatus.BLACKLISTED, "on the registry blacklist since 2020-01-01: stolen")
    stranger = decide(store, STRANGER)
    assert (stranger.status, stranger.match) == (EquipmentStatus.BLACKLISTED, Match.UNKNOWN_POLICY)


def test_whitelist_deltas_add_and_remove_registrations(drop, tmp_path):
    store = Store(tmp_path / "store")
    sync(str(drop), store)
    (drop / "20261121_whitelist_delta_5_6_removed.csv").write_text(
        f"imei,registration_date\n{REGISTERED},\n")
    (drop / "20261121_whitelist_delta_5_6_added.csv").write_text(
        f"imei,registration_date\n{STRANGER},20261121\n")
    assert sync(str(drop), store).version == "000002"
    assert decide(store, REGISTERED).match is Match.UNKNOWN_POLICY
    assert decide(store, STRANGER).reason == "registered on the registry whitelist on 2026-11-21"


def test_a_bad_registration_date_is_refused_naming_file_line_and_field(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "20261120_whitelist.csv").write_text(
        f"imei,registration_date\n{REGISTERED},20210304\n{STRANGER},2021-03-04\n")
    store = Store(tmp_path / "store")
    with pytest.raises(SyncError, match=r"20261120_whitelist.csv:3: registration_date: "
                                        r"'2021-03-04' is not a date \(YYYYMMDD\)"):
        sync(str(drop), store)
    assert store.current_version() is None
