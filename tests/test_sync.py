"""Sync (eir.lists.sync and `eir sync`): a registry drop directory on disk becomes one published
snapshot version whose verdicts follow each list's meaning; anything wrong (manifest, row,
zip) refuses the whole sync and leaves the store byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from eir.core.decision import EquipmentStatus, Match, RuleSet, UnknownPolicy
from eir.lists.store import Store
from eir.lists.sync import SyncError, sync
from helpers_process import run_eir

ROOT = Path(__file__).resolve().parent.parent
BLACK, GREY, WHITE = (EquipmentStatus.BLACKLISTED, EquipmentStatus.GREYLISTED,
                      EquipmentStatus.WHITELISTED)

STOLEN = "35123456000017"  # on the blacklist, and paired with OWNER by the exceptions list
NOTIFIED = "35123456000025"  # on the notifications list
NATIVE = "35123456000033"  # on our own native CSV
ELSEWHERE = "35123456000041"  # on no list
OWNER, OTHER = "001010123456789", "001010999999999"
BLACKLIST = "20261120_blacklist.csv"


# --- helpers ----------------------------------------------------------------------------------

def lines(*rows: str) -> str:
    return "".join(row + "\n" for row in rows)


def blacklist_rows(imei: str = STOLEN, block_date: int = 20261201) -> list[str]:
    return ["imei,block_date,reasons", f"{imei},{block_date},stolen|reported by owner"]


def write_drop(directory: Path, blacklist: list[str] | None = None, packing: str = "plain",
               blacklist_name: str = BLACKLIST, manifest: bool = False) -> Path:
    """A drop directory holding a DIRBS blacklist (plain or zipped), notifications and
    exceptions lists, a native CSV and a TAC file; with manifest.json when asked."""
    directory.mkdir(parents=True, exist_ok=True)
    text = lines(*(blacklist or blacklist_rows()))
    if packing == "zip":
        with zipfile.ZipFile(directory / blacklist_name.replace(".csv", ".zip"), "w",
                             zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(blacklist_name, text)
    else:
        (directory / blacklist_name).write_text(text)
    (directory / "20261120_notifications_op1.csv").write_text(lines(
        "imei,imsi,msisdn,block_date,reasons",
        f"{NOTIFIED},{OTHER},6281100000001,20261215,duplicate IMEI"))
    (directory / "20261120_exceptions_op1.csv").write_text(lines(
        "imei,imsi,msisdn", f"{STOLEN},{OWNER},6281100000002"))
    (directory / "native.csv").write_text(lines(
        "imei,status,imsi,reason", f"{NATIVE},greylist,,under investigation"))
    (directory / "tac.csv").write_text(lines(
        "tac,manufacturer,model_name", f"{STOLEN[:8]},Acme,Phone 3"))
    if manifest:
        write_manifest(directory)
    return directory


def list_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name != "manifest.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(directory: Path, files: dict[str, str] | None = None) -> None:
    if files is None:
        files = {p.name: sha256(p) for p in list_files(directory)}
    (directory / "manifest.json").write_text(json.dumps({"files": files}))


def store_files(store: Store) -> dict[str, bytes]:
    """Every file of the store with its bytes: what "untouched" compares."""
    return {str(p.relative_to(store.root)): p.read_bytes()
            for p in sorted(store.root.rglob("*")) if p.is_file()}


def rules_in_force(store: Store) -> RuleSet:
    return RuleSet(store.open_current(), UnknownPolicy.UNKNOWN)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def served(tmp_path, store):
    """A store holding version 000001 from a good drop directory, and the store's files as
    they were then (refused syncs must leave exactly these)."""
    result = sync(str(write_drop(tmp_path / "first")), store)
    assert (result.version, result.published) == ("000001", True)
    return store_files(store)


def assert_refused_untouched(source: Path, store: Store, before: dict[str, bytes],
                             *expected: str) -> str:
    """The sync of `source` is refused with every `expected` text, and the store's files
    (CURRENT, snapshots, states) are byte for byte what they were."""
    with pytest.raises(SyncError) as caught:
        sync(str(source), store)
    message = str(caught.value)
    for text in expected:
        assert text in message, message
    assert store_files(store) == before
    assert store.current_version() == "000001"
    return message


# --- one drop directory, one version, each list's meaning ---------------------------------------

@pytest.fixture(params=["plain", "zip"])
def synced(request, tmp_path, store) -> RuleSet:
    """Rules in force after syncing a full drop directory (blacklist plain or zipped)."""
    result = sync(str(write_drop(tmp_path / "drop", packing=request.param)), store)
    assert (result.version, result.published) == ("000001", True)
    assert [(v.version, v.in_force) for v in store.versions()] == [("000001", True)]
    return rules_in_force(store)


@pytest.mark.parametrize("day, status", [(20261130, None), (20261201, BLACK), (20270101, BLACK)])
def test_blacklist_entry_is_blacklisted_from_its_block_date(synced, day, status):
    verdict = synced.decide(STOLEN, day=day)
    assert verdict.status is status
    if status is not None:
        assert verdict.match is Match.IMEI
        assert "stolen" in verdict.reason and "reported by owner" in verdict.reason


@pytest.mark.parametrize("day, status", [(20261120, GREY), (20261214, GREY), (20261215, BLACK),
                                         (20270101, BLACK)])
def test_notification_is_greylisted_before_block_date_and_blacklisted_from_it(synced, day,
                                                                              status):
    verdict = synced.decide(NOTIFIED, OTHER, day=day)
    assert verdict.status is status
    assert "duplicate IMEI" in verdict.reason
    # Keyed by the IMEI alone: another subscriber with the device gets the same.
    assert synced.decide(NOTIFIED, OWNER, day=day).status is status


def test_exception_whitelists_the_imei_only_for_its_imsi(synced):
    day = 20261202  # the blacklist entry is in force
    owner = synced.decide(STOLEN, OWNER, day=day)
    assert (owner.status, owner.match) == (WHITE, Match.IMEI_IMSI)
    assert synced.decide(STOLEN, OTHER, day=day).status is BLACK
    assert synced.decide(STOLEN, None, day=day).status is BLACK
    # Before the block date the exception still whitelists its pair, and nobody else.
    assert synced.decide(STOLEN, OWNER, day=20261101).status is WHITE
    assert synced.decide(STOLEN, OTHER, day=20261101).status is None


def test_native_csv_rows_keep_their_status(synced):
    verdict = synced.decide(NATIVE, day=20261201)
    assert verdict.status is GREY and "under investigation" in verdict.reason


def test_an_imei_on_no_list_gets_the_unknown_policy(synced):
    assert synced.decide(ELSEWHERE, day=20261201).match is Match.UNKNOWN_POLICY


def test_tac_file_device_name_appears_in_explained_verdicts(synced):
    assert "Acme Phone 3" in synced.explain(STOLEN, OTHER, day=20261201).reason
    assert "Acme" not in synced.explain("86000000000001", day=20261201).reason


def test_every_file_is_recorded_with_its_sha256(tmp_path, store):
    drop = write_drop(tmp_path / "drop")
    result = sync(str(drop), store)
    recorded = {s["name"]: s["sha256"] for s in store.open_current().info.sources}
    assert recorded == {p.name: sha256(p) for p in list_files(drop)}
    assert {s["name"] for s in result.sources} == set(recorded)


# --- what is (not) published ------------------------------------------------------------------

def test_a_second_sync_of_identical_files_publishes_nothing(tmp_path, store):
    drop = write_drop(tmp_path / "drop")
    assert sync(str(drop), store).published
    before = store_files(store)
    again = sync(str(drop), store)
    assert (again.version, again.published) == ("000001", False)
    assert [v.version for v in store.versions()] == ["000001"]
    assert store_files(store) == before


def test_a_changed_list_publishes_a_new_version(tmp_path, store, served):
    changed = write_drop(tmp_path / "changed", blacklist_rows(ELSEWHERE))
    result = sync(str(changed), store)
    assert (result.version, result.published) == ("000002", True)
    rules = rules_in_force(store)
    assert rules.decide(ELSEWHERE, day=20261201).status is BLACK
    assert rules.decide(STOLEN, day=20261201).status is None  # the new full list replaced it


def test_the_newest_dated_file_of_a_list_wins_and_the_older_is_reported(tmp_path, store):
    drop = write_drop(tmp_path / "drop")
    (drop / "20261119_blacklist.csv").write_text(lines(*blacklist_rows(ELSEWHERE)))
    result = sync(str(drop), store)
    assert any(note.startswith("20261119_blacklist.csv") and BLACKLIST in note
               for note in result.ignored), result.ignored
    rules = rules_in_force(store)
    assert rules.decide(STOLEN, day=20261201).status is BLACK
    assert rules.decide(ELSEWHERE, day=20261201).status is None


# --- manifest ---------------------------------------------------------------------------------

def test_a_correct_manifest_is_accepted(tmp_path, store):
    result = sync(str(write_drop(tmp_path / "drop", manifest=True)), store)
    assert result.published


def _wrong_checksum(drop: Path) -> None:
    write_manifest(drop)
    (drop / BLACKLIST).write_text(lines(*blacklist_rows(ELSEWHERE, 20270101)))  # changed since


def _file_not_in_manifest(drop: Path) -> None:
    write_manifest(drop, {p.name: sha256(p) for p in list_files(drop) if p.name != "native.csv"})


def _entry_without_file(drop: Path) -> None:
    files = {p.name: sha256(p) for p in list_files(drop)}
    write_manifest(drop, files | {"20261120_exceptions_op2.csv": "0" * 64})


def _unreadable_manifest(drop: Path) -> None:
    (drop / "manifest.json").write_text('{"files": {"20261120_blacklist.csv": ')


@pytest.mark.parametrize("spoil, expected", [
    pytest.param(_wrong_checksum, [f"{BLACKLIST}: sha256:", "does not match"],
                 id="checksum-mismatch"),
    pytest.param(_file_not_in_manifest, ["native.csv: manifest: not listed"],
                 id="file-missing-from-manifest"),
    pytest.param(_entry_without_file, ["20261120_exceptions_op2.csv: listed but not in"],
                 id="entry-without-file"),
    pytest.param(_unreadable_manifest, ["manifest.json: unreadable manifest"],
                 id="unreadable-manifest"),
])
def test_a_manifest_problem_refuses_the_sync_and_leaves_the_store_untouched(
        tmp_path, store, served, spoil, expected):
    drop = write_drop(tmp_path / "drop", blacklist_rows(ELSEWHERE))  # would change the lists
    spoil(drop)
    assert_refused_untouched(drop, store, served, *expected)


# --- bad files --------------------------------------------------------------------------------

def test_a_bad_row_refuses_the_sync_naming_file_line_and_field(tmp_path, store, served):
    rows = blacklist_rows(ELSEWHERE) + ["3512345600005,20261201,stolen"]  # 13 digits, line 3
    drop = write_drop(tmp_path / "drop", rows)
    message = assert_refused_untouched(drop, store, served, f"{BLACKLIST}:3: imei:")
    assert "3512345600005" in message


def test_a_truncated_zip_refuses_the_sync(tmp_path, store, served):
    drop = write_drop(tmp_path / "drop", blacklist_rows(ELSEWHERE), packing="zip")
    archive = drop / "20261120_blacklist.zip"
    archive.write_bytes(archive.read_bytes()[:-30])
    assert_refused_untouched(drop, store, served, "20261120_blacklist.zip", "zip")


# --- the command line -------------------------------------------------------------------------

def test_cli_sync_publishes_and_prints_the_version(tmp_path):
    drop = write_drop(tmp_path / "drop")
    result = run_eir("sync", "--source", str(drop), "--store", str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr
    assert "published version 000001" in result.stdout
    assert Store(tmp_path / "store").current_version() == "000001"


def test_cli_sync_refusal_exits_1_and_says_store_untouched(tmp_path, store, served):
    drop = write_drop(tmp_path / "drop", blacklist_rows() + ["1234,20261201,stolen"])
    result = run_eir("sync", "--source", str(drop), "--store", str(store.root))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "store untouched" in result.stderr
    assert f"{BLACKLIST}:3: imei:" in result.stderr
    assert store_files(store) == served


def test_cli_lists_status_json_lists_versions_with_counts_and_sources(tmp_path, store, served):
    changed = write_drop(tmp_path / "changed", blacklist_rows(ELSEWHERE))
    assert sync(str(changed), store).version == "000002"
    result = run_eir("lists", "status", "--store", str(store.root), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert [(v["version"], v["in_force"]) for v in status] == [("000002", True),
                                                               ("000001", False)]
    newest = status[0]
    assert newest["counts"]["imei"] == 3  # blacklist, notification, native rows
    assert newest["counts"]["pairs"] == 1  # the exception
    assert newest["counts"]["tac_names"] == 1
    assert {s["name"]: s["sha256"] for s in newest["sources"]} == {
        p.name: sha256(p) for p in list_files(changed)}
    assert 0 <= newest["age_seconds"] < 60


def test_cli_rollback_then_check_answers_from_the_rolled_back_version(tmp_path, store):
    # Block dates in the past: `eir check` decides for today.
    sync(str(write_drop(tmp_path / "first", blacklist_rows(STOLEN, 20200101))), store)
    sync(str(write_drop(tmp_path / "second", blacklist_rows(ELSEWHERE, 20200101))), store)

    def check(imei: str) -> dict:
        result = run_eir("check", imei, "--store", str(store.root), "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    answer = check(ELSEWHERE)
    assert (answer["status"], answer["list_version"]) == ("BLACKLISTED", "000002")
    rollback = run_eir("lists", "rollback", "--store", str(store.root))
    assert rollback.returncode == 0, rollback.stderr
    assert "version 000001 is in force" in rollback.stdout
    answer = check(STOLEN)
    assert (answer["status"], answer["list_version"]) == ("BLACKLISTED", "000001")
    assert "stolen" in answer["reason"] and "Acme Phone 3" in answer["reason"]
    assert check(ELSEWHERE)["status"] == "UNKNOWN"


def test_rollback_pins_the_store_until_unpinned(tmp_path, store):
    """Without the pin, the next (periodic) sync would publish again what was rolled back."""
    source = tmp_path / "pinned-drop"
    write_drop(source)
    sync(str(source), store)
    write_drop(source, blacklist=blacklist_rows(block_date=20200101))
    assert sync(str(source), store).version == "000002"
    assert store.rollback() == "000001"
    with pytest.raises(SyncError, match="pinned at version 000001 by a rollback"):
        sync(str(source), store)
    assert store.current_version() == "000001"
    assert store.unpin() == "000001"
    result = sync(str(source), store)
    assert (result.published, store.current_version()) == (True, "000003")


def test_sync_counters_count_each_outcome(tmp_path, store):
    from eir.lists.sync import SyncCounters

    counters = SyncCounters()
    source = write_drop(tmp_path / "counted-drop")
    counters.record(sync(str(source), store))
    counters.record(sync(str(source), store))
    (source / BLACKLIST).write_text(lines("imei,block_date,reasons", "1234,20200101,x"))
    with pytest.raises(SyncError) as refusal:
        sync(str(source), store)
    counters.record(None, refusal.value)
    assert (counters.published, counters.up_to_date, counters.refused) == (1, 1, 1)
    assert counters.last_success is not None
    assert counters.last_refusal.startswith(f"{BLACKLIST}:2: imei:")


def test_check_on_an_empty_store_does_not_sync(tmp_path):
    """`eir check` is a query: it must not publish into the store, whatever the config says."""
    source = write_drop(tmp_path / "drop")
    config = tmp_path / "eir.yaml"
    config.write_text(f"store:\n  directory: store\nsync:\n  source: {source}\n")
    result = run_eir("check", STOLEN, "--config", str(config))
    assert result.returncode == 1
    assert "no snapshot yet (run eir sync)" in result.stderr
    assert not (tmp_path / "store" / "CURRENT").exists()


def test_manifest_naming_a_file_that_is_no_list_says_so(tmp_path, store):
    source = write_drop(tmp_path / "drop")
    (source / "README.md").write_text("lists for operators\n")
    write_manifest(source)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["files"]["README.md"] = sha256(source / "README.md")
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SyncError, match=r"files\.README\.md: not a list file"):
        sync(str(source), store)


# --- integrity: what is published is what was verified ------------------------------------------
# Each test here is an attack that the sync before issue 14 let through.

def test_a_list_renamed_over_after_verification_is_not_what_is_published(tmp_path, store,
                                                                         served, monkeypatch):
    """The race made deterministic: the file is replaced (atomic rename) after its checksum was
    verified against the manifest, just before the parser opens it. The sync parses the copy it
    hashed, so the verified list is published and the attacker's is never read."""
    from eir.lists import formats

    drop = write_drop(tmp_path / "drop", blacklist_rows(STOLEN) + [f"{NATIVE},20200101,lost"],
                      manifest=True)
    forged = tmp_path / "forged.csv"
    forged.write_text(lines(*blacklist_rows(ELSEWHERE)))  # STOLEN gone, ELSEWHERE blocked
    parse_all = formats.parse_all

    def race(path, *args, **kwargs):
        if forged.exists():
            forged.replace(drop / BLACKLIST)  # rename(2): atomic, as an attacker would
        return parse_all(path, *args, **kwargs)

    monkeypatch.setattr(formats, "parse_all", race)
    verified = json.loads((drop / "manifest.json").read_text())["files"][BLACKLIST]
    result = sync(str(drop), store)
    assert not forged.exists()  # the rename did happen, between verification and parsing
    assert (result.version, result.published) == ("000002", True)
    rules = rules_in_force(store)
    assert rules.decide(STOLEN, day=20261201).status is BLACK
    assert rules.decide(ELSEWHERE, day=20261201).status is None
    [recorded] = [s for s in store.open_current().info.sources if s["name"] == BLACKLIST]
    assert recorded["sha256"] == verified != sha256(drop / BLACKLIST)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_anything_but_a_regular_file_in_the_drop_is_refused_by_name(tmp_path, store, served,
                                                                     kind):
    drop = write_drop(tmp_path / "drop")
    outside = tmp_path / "outside.csv"
    outside.write_text(lines("imei,status,imsi,reason", f"{ELSEWHERE},blacklist,,planted"))
    planted = drop / "planted.csv"
    if kind == "symlink":
        planted.symlink_to(outside)
        what = "a symbolic link: refused"
    elif kind == "fifo":
        os.mkfifo(planted)
        what = "not a regular file: refused"
    else:
        planted.mkdir()
        what = "not a regular file: refused"
    assert_refused_untouched(drop, store, served, f"{planted}: {what}")
    assert rules_in_force(store).decide(ELSEWHERE, day=20261201).status is None


def test_a_manifest_that_is_a_symlink_is_refused(tmp_path, store, served):
    drop = write_drop(tmp_path / "drop", manifest=True)
    elsewhere = tmp_path / "manifest.json"
    (drop / "manifest.json").replace(elsewhere)
    (drop / "manifest.json").symlink_to(elsewhere)
    assert_refused_untouched(drop, store, served, "manifest.json: a symbolic link: refused")


# --- no going back, for sources without a sequence number ---------------------------------------

def test_an_older_dated_full_list_does_not_replace_the_newer_one_in_force(tmp_path, store,
                                                                         served):
    """A drop directory without a manifest sequence: the date in the file name is what tells
    last month's blacklist, put back, from a new one."""
    old = write_drop(tmp_path / "old", blacklist_rows(ELSEWHERE),
                     blacklist_name="20261020_blacklist.csv")
    result = sync(str(old), store)
    assert (result.version, result.published) == ("000001", False)
    assert store_files(store) == served
    assert any("20261020_blacklist.csv: dated before the blacklist list in force "
               f"({BLACKLIST})" in note for note in result.ignored), result.ignored
    assert result.warnings == [f"{old}: no manifest.json: files are not checked against "
                               "checksums, and only the dates in file names keep an older "
                               "list from replacing a newer one"]
    assert rules_in_force(store).decide(STOLEN, day=20261201).status is BLACK


def test_a_manifest_without_sequence_syncs_with_a_warning(tmp_path, store):
    drop = write_drop(tmp_path / "drop", manifest=True)
    result = sync(str(drop), store)
    assert result.published
    assert result.warnings == [f"{drop / 'manifest.json'}: no sequence: only the dates in "
                               "file names keep an older list from replacing a newer one "
                               "(registries: see README, signed lists)"]
    assert store.open_current().info.manifest["sequence"] is None
    done = run_eir("sync", "--source", str(drop), "--store", str(store.root))
    assert "warning: " in done.stderr and "no sequence" in done.stderr


def write_sequenced_manifest(directory: Path, sequence, published="2026-12-06T04:00:00Z"):
    document = {"files": {p.name: sha256(p) for p in list_files(directory)
                          if p.name != "manifest.json.sig"}}
    if sequence is not None:
        document.update(sequence=sequence, published=published)
    (directory / "manifest.json").write_text(json.dumps(document))


def test_unsigned_manifest_sequence_is_enforced_too(tmp_path, store):
    drop = write_drop(tmp_path / "drop")
    write_sequenced_manifest(drop, 7)
    assert sync(str(drop), store).version == "000001"
    before = store_files(store)
    write_sequenced_manifest(drop, 6)
    with pytest.raises(SyncError, match=r"sequence: 6 \(published 2026-12-06T04:00:00Z\) is "
                                        r"older than sequence 7 .* of version 000001 in force: "
                                        r"refused as a rollback"):
        sync(str(drop), store)
    write_sequenced_manifest(drop, None)
    with pytest.raises(SyncError, match=r"sequence: missing, but this store has published "
                                        r"sequence 7 \(version 000001 in force\): refused"):
        sync(str(drop), store)
    (drop / "manifest.json").unlink()
    with pytest.raises(SyncError, match=r"sequence: no manifest, but this store has published "
                                        r"sequence 7"):
        sync(str(drop), store)
    assert store_files(store) == before


def test_after_a_rollback_and_unpin_only_the_newest_sequence_comes_back(tmp_path, store):
    """The operator rolled back to sequence 1 and unpinned: sequence 2, served again by an
    attacker, is still older than the newest this store published (3); 3 itself comes back."""
    source = tmp_path / "drop"
    published = {}
    for sequence, imei in enumerate([STOLEN, ELSEWHERE, NATIVE], 1):
        write_drop(source, blacklist_rows(imei))
        write_sequenced_manifest(source, sequence)
        published[sequence] = {p.name: p.read_bytes() for p in source.iterdir()}
        sync(str(source), store)
    assert store.rollback("000001") == "000001" and store.unpin() == "000001"
    before = store_files(store)
    for name, data in published[2].items():
        (source / name).write_bytes(data)
    with pytest.raises(SyncError, match=r"sequence: 2 .* is older than sequence 3, the newest "
                                        r"this store has published \(version 000001 in force "
                                        r"is from sequence 1, put back by a rollback\)"):
        sync(str(source), store)
    assert store_files(store) == before
    for name, data in published[3].items():
        (source / name).write_bytes(data)
    result = sync(str(source), store)
    assert (result.version, result.published) == ("000004", True)
    assert store.open_current().info.manifest["sequence"] == 3


@pytest.mark.parametrize("fields, problem", [
    ({"sequence": "7", "published": "2026-12-06T04:00:00Z"},
     r"sequence: '7' is not an integer from 0 to"),
    ({"sequence": True, "published": "2026-12-06T04:00:00Z"}, r"sequence: True is not"),
    ({"sequence": -1, "published": "2026-12-06T04:00:00Z"}, r"sequence: -1 is not"),
    ({"sequence": 7, "published": "2026-12-06T04:00:00"}, r"published: '2026-12-06T04:00:00' "
                                                           r"has no time zone"),
    ({"sequence": 7, "published": "yesterday"}, r"published: 'yesterday' is not an RFC 3339"),
    ({"sequence": 7}, r"published: missing \(sequence and published go together\)"),
])
def test_bad_sequence_or_publication_time_is_refused_naming_the_field(tmp_path, store, served,
                                                                       fields, problem):
    drop = write_drop(tmp_path / "drop", blacklist_rows(ELSEWHERE))
    write_sequenced_manifest(drop, None)
    document = json.loads((drop / "manifest.json").read_text())
    (drop / "manifest.json").write_text(json.dumps({**document, **fields}))
    assert_refused_untouched(drop, store, served, "manifest.json: ")
    with pytest.raises(SyncError, match=problem):
        sync(str(drop), store)


def test_rollback_and_unpin_are_journaled_as_the_operators_acts(tmp_path, store):
    source = tmp_path / "drop"
    write_drop(source)
    write_sequenced_manifest(source, 1)
    sync(str(source), store)
    write_drop(source, blacklist=blacklist_rows(ELSEWHERE))
    write_sequenced_manifest(source, 2)
    assert sync(str(source), store).version == "000002"
    rollback = run_eir("lists", "rollback", "--store", str(store.root))
    assert rollback.returncode == 0, rollback.stderr
    assert "rollback to version 000001 (was 000002) by " in rollback.stderr  # logged
    with pytest.raises(SyncError, match="pinned at version 000001 by a rollback"):
        sync(str(source), store)  # the sync does not undo the operator's pin
    assert store.unpin(by="auditor test") == "000001"
    assert sync(str(source), store).version == "000003"  # sequence 2 again, asked for
    acts = [(r["act"], r["version"], r["previous"]) for r in store.journal_records()]
    assert acts == [("publish", "000001", None), ("publish", "000002", "000001"),
                    ("rollback", "000001", "000002"), ("unpin", "000001", "000001"),
                    ("publish", "000003", "000001")]
    records = store.journal_records()
    assert "eir lists rollback" in records[2]["by"] and records[3]["by"] == "auditor test"
    assert records[1]["manifest"]["sequence"] == 2
    assert {f["name"]: f["sha256"] for f in records[1]["files"]}[BLACKLIST] == \
        sha256(source / BLACKLIST)


def test_api_shows_provenance_and_journals_a_rollback_made_through_it(tmp_path, store,
                                                                      eir_server, monkeypatch):
    import httpx
    from helpers_ops import API_LINE, TOKEN, authorised, endpoint

    source = tmp_path / "drop"
    for sequence, imei in enumerate([STOLEN, ELSEWHERE], 1):
        write_drop(source, blacklist_rows(imei))
        write_sequenced_manifest(source, sequence)
        sync(str(source), store)
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    server = eir_server("--api", "127.0.0.1:0", "--store", str(store.root), lists=[])
    url = endpoint(server, API_LINE)
    status = httpx.get(url + "/v1/lists", headers=authorised(), timeout=10).json()
    newest = status["versions"][0]
    assert newest["manifest"]["sequence"] == 2 and newest["manifest"]["signer"] is None
    assert newest["manifest"]["sha256"] == sha256(source / "manifest.json")
    assert {s["name"]: s["sha256"] for s in newest["sources"]}[BLACKLIST] == \
        sha256(source / BLACKLIST)
    answer = httpx.post(url + "/v1/lists/rollback", headers=authorised(), timeout=30)
    assert answer.json()["version"] == "000001"
    server.wait_for_log(r"rollback to version 000001 \(was 000002\) by .*eir serve")
    [act] = [r for r in store.journal_records() if r["act"] == "rollback"]
    assert "eir serve" in act["by"]


def test_a_4_mb_reasons_cell_is_refused_and_the_version_in_force_keeps_serving(tmp_path,
                                                                              store, served):
    """It would otherwise go out in every API answer and audit record about that IMEI."""
    huge = "x" * (4 << 20)
    drop = write_drop(tmp_path / "drop", blacklist_rows() + [f"{ELSEWHERE},20261201,{huge}"])
    message = assert_refused_untouched(
        drop, store, served,
        f"{BLACKLIST}:3: reasons: {len(huge)} characters (at most 1024 in this column)")
    assert len(message) < 1000


@pytest.mark.parametrize("max_age, stale", [(86400.0, 1.0), (1e10, 0.0)])
def test_lists_older_than_max_age_raise_the_stale_metric(tmp_path, store, eir_server, max_age,
                                                         stale):
    """Frozen on old lists (a registry gone quiet, or an attacker holding it back): alertable."""
    from helpers_ops import METRICS_LINE, endpoint, scrape

    source = write_drop(tmp_path / "drop")
    write_sequenced_manifest(source, 1, published="2026-01-02T03:04:05Z")
    sync(str(source), store)
    config = tmp_path / "eir.yaml"
    config.write_text(f"sync:\n  max_age_seconds: {max_age}\n")
    server = eir_server("--metrics", "127.0.0.1:0", "--store", str(store.root),
                        "--config", str(config), lists=[])
    samples = scrape(endpoint(server, METRICS_LINE))
    assert samples[("eir_list_published_timestamp_seconds", frozenset())] == 1767323045.0
    assert samples[("eir_list_stale", frozenset())] == stale
