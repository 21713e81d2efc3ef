"""Compiled snapshots: registry semantics by date, duplicates, mmap round trip, size."""

import numpy as np
import pytest

from eir.core.decision import EquipmentStatus, Match, RuleSet, UnknownPolicy
from eir.lists.entries import Attribute, Kind, ListEntries
from eir.lists.snapshot import Snapshot, SnapshotError, compile_snapshot

BLACK, GREY, WHITE = (EquipmentStatus.BLACKLISTED, EquipmentStatus.GREYLISTED,
                      EquipmentStatus.WHITELISTED)
IMSI = "001010123456789"


def entries(name, rows, attributes):
    """rows: (imei, imsi or 0, attribute index)."""
    imei, imsi, attribute = zip(*rows) if rows else ((), (), ())
    listed = ListEntries(name, np.array(imei, np.uint64), np.array(imsi, np.uint64),
                         np.array(attribute, np.uint32), list(attributes))
    listed.rows = len(rows)
    return listed


def rule_set(*lists, tac_names=None):
    data = compile_snapshot(lists, "v1", tac_names)
    return RuleSet(Snapshot.from_bytes(data), UnknownPolicy.UNKNOWN)


BLACKLIST = Attribute(Kind.BLACKLIST, "20261120_blacklist.csv", block_date=20261201,
                      reason="stolen")
NOTIFIED = Attribute(Kind.NOTIFICATION, "20261120_notifications_op1.csv",
                     block_date=20261215, reason="duplicate")
EXCEPTION = Attribute(Kind.EXCEPTION, "20261120_exceptions_op1.csv")


@pytest.mark.parametrize("day, status", [(20261130, None), (20261201, BLACK), (20270101, BLACK)])
def test_blacklist_entry_applies_from_its_block_date(day, status):
    rules = rule_set(entries("bl", [(35209900176148, 0, 0)], [BLACKLIST]))
    assert rules.decide("35209900176148", day=day).status is status


@pytest.mark.parametrize("day, status", [(20261214, GREY), (20261215, BLACK)])
def test_notification_is_grey_until_block_date_then_black(day, status):
    rules = rule_set(entries("n", [(35209900176148, 0, 0)], [NOTIFIED]))
    verdict = rules.decide("35209900176148", day=day)
    assert verdict.status is status
    assert "2026-12-15" in verdict.reason and "duplicate" in verdict.reason
    assert verdict.source == "20261120_notifications_op1.csv"


def test_same_snapshot_changes_verdict_with_the_date_without_reload():
    rules = rule_set(entries("n", [(35209900176148, 0, 0)], [NOTIFIED]))
    assert rules.decide("35209900176148", day=20261214).status is GREY
    assert rules.decide("35209900176148", day=20261215).status is BLACK
    assert rules.decide("35209900176148", day=20261214).status is GREY


def test_exception_whitelists_a_blacklisted_imei_for_its_imsi_only():
    rules = rule_set(entries("bl", [(35209900176148, 0, 0)], [BLACKLIST]),
                     entries("ex", [(35209900176148, int(IMSI), 0)], [EXCEPTION]))
    owner = rules.decide("35209900176148", IMSI, day=20270101)
    assert (owner.status, owner.match) == (WHITE, Match.IMEI_IMSI)
    other = rules.decide("35209900176148", "001019999999999", day=20270101)
    assert (other.status, other.match) == (BLACK, Match.IMEI)


def test_an_imei_on_two_lists_takes_the_most_severe_in_force():
    rules = rule_set(entries("bl", [(35209900176148, 0, 0)], [BLACKLIST]),
                     entries("n", [(35209900176148, 0, 0)], [NOTIFIED]))
    # Before the blacklist's date only the notification is in force.
    assert rules.decide("35209900176148", day=20261130).status is GREY
    assert rules.decide("35209900176148", day=20261202).status is BLACK


def test_future_blacklist_alone_falls_through_to_the_unknown_policy():
    rules = rule_set(entries("bl", [(35209900176148, 0, 0)], [BLACKLIST]))
    assert rules.decide("35209900176148", day=20261101).match is Match.UNKNOWN_POLICY


def test_many_distinct_meanings_use_the_high_set_bits():
    count = 5000  # more than 4,096 attribute sets: set indexes need the second array
    attributes = [Attribute(Kind.BLACKLIST, "bl.csv", block_date=20200101, reason=f"r{n}")
                  for n in range(count)]
    rows = [(35000000000000 + n, 0, n) for n in range(count)]
    rules = rule_set(entries("bl", rows, attributes))
    for n in (0, 4095, 4096, count - 1):
        verdict = rules.decide(str(35000000000000 + n), day=20261201)
        assert verdict.reason.endswith(f": r{n}")


def test_snapshot_file_round_trip_through_mmap(tmp_path):
    rows = [(35209900176148, 0, 0), (35332106470089, 0, 0)]
    data = compile_snapshot([entries("bl", rows, [BLACKLIST])], "v7",
                            tac_names={35209900: "Acme Phone 3"})
    path = tmp_path / "s.eirsnap"
    path.write_bytes(data)
    snapshot = Snapshot.open(path)
    assert snapshot.version == "v7"
    assert snapshot.info.counts["imei"] == 2
    assert snapshot.device_name(35209900) == "Acme Phone 3"
    assert snapshot.device_name(35209901) is None
    verdict = snapshot.lookup("35332106470089", None, 20261202)
    assert verdict.status is BLACK


def test_exact_imeis_take_about_four_bytes_each():
    rng = np.random.default_rng(1)
    tacs = rng.integers(35000000, 36000000, size=2000, dtype=np.uint64)
    imeis = np.unique(tacs[rng.integers(0, 2000, size=200_000)] * 1_000_000
                      + rng.integers(0, 1_000_000, size=200_000, dtype=np.uint64))
    listed = ListEntries("bl", imeis, np.zeros(len(imeis), np.uint64),
                         np.zeros(len(imeis), np.uint32), [BLACKLIST])
    data = compile_snapshot([listed], "v1")
    assert len(data) / len(imeis) < 4.5


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_damaged_snapshot_is_refused(damage):
    data = compile_snapshot([entries("bl", [(35209900176148, 0, 0)], [BLACKLIST])], "v1")
    data = b"XXXXXXXX" + data[8:] if damage == "magic" else data[:len(data) - 16]
    with pytest.raises(SnapshotError):
        Snapshot.from_bytes(data)


def test_snapshot_with_a_malformed_header_is_refused_as_such():
    import json

    from eir.lists.snapshot import MAGIC

    header = json.dumps({"format": 1, "version": "x"}).encode()
    data = MAGIC + len(header).to_bytes(4, "little") + bytes(4) + header
    with pytest.raises(SnapshotError, match="malformed header or section: KeyError"):
        Snapshot.from_bytes(data)
