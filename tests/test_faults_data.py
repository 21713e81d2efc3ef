"""Data faults (issue 7, item 3; docs/RELIABILITY.md): kill -9 during a sync (the snapshot
build and its publication) and during a running server's swap, a full disk under a sync and
under the observations database (then space coming back), and adversarial list files.

What is covered elsewhere is not repeated: a publisher killed at random points inside
Store.publish (tests/test_store.py), kill -9 of the server with observations flushed
(tests/test_observations.py), the disk full for good while recording (the same), zip bombs,
truncated and corrupt zips, bad rows and encodings (tests/test_registry_formats.py,
tests/test_lists.py), swaps under load (tests/test_serve_store.py).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eir.core.decision import EquipmentStatus, RuleSet, UnknownPolicy
from eir.lists.store import Store
from eir.lists.sync import sync
from helpers_ops import METRICS_LINE, endpoint, scrape, value, wait_until
from helpers_process import ROOT, eir_ok, run_eir
from helpers_wire import check_all
from test_observations import (IMSI_A, check_many, distinct_imeis, stored_rows,
                               write_config as observations_config)
from test_serve_store import A, B, C, IMSI, V1, V2, outcome_of, write_config, write_drop

KILLS = 6
# Blacklisted in both versions, so that a sync takes long enough to be killed inside (about
# a second here) and a snapshot cut short would lose them.
BULK = 300_000
BULK_TAC = "35100000"
STATUS = {EquipmentStatus.BLACKLISTED: "BLACKLISTED", EquipmentStatus.GREYLISTED: "GREYLISTED",
          EquipmentStatus.WHITELISTED: "WHITELISTED"}


def bulk_imei(number: int) -> str:
    return f"{BULK_TAC}{number:06d}"


def write_bulk_drop(directory: Path, version: dict[str, str]) -> Path:
    """write_drop of test_serve_store, its blacklist grown by BULK entries."""
    write_drop(directory, version)
    with open(directory / "20261120_blacklist.csv", "a") as blacklist:
        blacklist.writelines(f"{bulk_imei(n)},20200101,stolen\n" for n in range(BULK))
    return directory


def verdicts_in_force(store: Store) -> tuple[str, dict[str, str]]:
    """(version, {A, B, C: verdict}) as the snapshot in force answers, and checks the bulk
    entries are all there (first, middle, last)."""
    snapshot = store.open_current()
    rules = RuleSet(snapshot, UnknownPolicy.UNKNOWN)
    verdicts = {}
    for imei in (A, B, C):
        decision = rules.decide(imei, IMSI)
        verdicts[imei] = STATUS.get(decision.status, "UNKNOWN")
    for number in (0, BULK // 2, BULK - 1):
        assert rules.decide(bulk_imei(number)).status is EquipmentStatus.BLACKLISTED
    return snapshot.version, verdicts


# -- kill -9 during a sync ---------------------------------------------------------------------

def test_sync_killed_at_random_points_leaves_the_previous_or_the_new_snapshot(tmp_path):
    """`eir sync` killed -9 at random points of its run (reading the lists, building the
    snapshot, publishing it), each run syncing the other version (V1, V2) than the one in
    force: the store then answers all of the previous version or all of the new one, never a
    mix nor nothing, and a sync after it completes."""
    store_dir = tmp_path / "store"
    store = Store(store_dir)
    drops = {"V1": write_bulk_drop(tmp_path / "v1", V1), "V2": write_bulk_drop(tmp_path / "v2", V2)}
    verdicts_of = {"V1": V1, "V2": V2}
    assert sync(str(drops["V1"]), store).version == "000001"

    def command(name: str, directory: Path) -> list[str]:
        return [sys.executable, "-m", "eir", "sync", "--source", str(drops[name]), "--store",
                str(directory)]

    # An uninterrupted run on a copy, to spread the kills over its duration.
    timing_store = tmp_path / "timing-store"
    assert sync(str(drops["V1"]), Store(timing_store)).version == "000001"
    started = time.monotonic()
    subprocess.run(command("V2", timing_store), check=True, capture_output=True, timeout=120)
    duration = time.monotonic() - started
    rng = random.Random(20261123)
    in_force, outcomes = "V1", []
    for kill in range(KILLS):
        target = "V2" if in_force == "V1" else "V1"
        previous = store.current_version()
        child = subprocess.Popen(command(target, store_dir), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, cwd=tmp_path)
        time.sleep(rng.uniform(0.3, 1.0) * duration)  # the kill point, deliberately random
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        version, verdicts = verdicts_in_force(store)
        if version != previous:
            assert int(version) == int(previous) + 1, (kill, previous, version)
            in_force = target
        assert verdicts == verdicts_of[in_force], (kill, version, in_force, verdicts)
        outcomes.append("killed" if child.returncode == -signal.SIGKILL else "completed")
    print(f"\nsync of {BULK} entries ({duration:.2f} s uninterrupted) killed {KILLS} times: "
          f"{outcomes}, store at {store.current_version()}")
    assert "killed" in outcomes
    target = "V2" if in_force == "V1" else "V1"
    sync(str(drops[target]), store)
    assert verdicts_in_force(store)[1] == verdicts_of[target]
    assert not list(store_dir.rglob("*.tmp")), sorted(store_dir.rglob("*"))


# -- kill -9 during a server's swap ------------------------------------------------------------

def test_server_killed_during_a_swap_restarts_on_the_previous_or_the_new_version(
        eir_server, tmp_path):
    store_dir = tmp_path / "store"
    store = Store(store_dir)
    assert sync(str(write_drop(tmp_path / "v1", V1)), store).version == "000001"
    config = write_config(tmp_path / "eir.yaml")  # store.poll_seconds 0.2
    server = eir_server("--config", str(config), "--store", str(store_dir), lists=[])
    server.wait_for_log(r"lists version 000001")
    assert sync(str(write_drop(tmp_path / "v2", V2)), store).version == "000002"
    # Killed while the swap is under way: at the first line naming the new version (a
    # worker's `lists reloaded`), as the other processes are swapping.
    server.wait_for_log(r"000002")
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    restarted = eir_server("--config", str(config), "--store", str(store_dir), lists=[])
    version = restarted.wait_for_log(r"lists version (\d{6})").group(1)
    expected = {"000001": V1, "000002": V2}[version]
    answers = check_all(restarted.address, [(imei, IMSI) for imei in (A, B, C)])
    assert {imei: outcome_of_answer(answer) for imei, answer in zip((A, B, C), answers)} \
        == expected
    assert version == "000002"  # the store's version in force: a restart follows CURRENT


def outcome_of_answer(answer) -> str:
    if answer.result_code is None and answer.experimental_result == (10415, 5422):
        return "UNKNOWN"
    return {0: "WHITELISTED", 1: "BLACKLISTED", 2: "GREYLISTED"}[answer.equipment_status]


# -- disk full -----------------------------------------------------------------------------------

def test_a_sync_on_a_full_disk_is_refused_and_the_store_keeps_its_version(eir_server, tmp_path):
    """`eir sync` under a file size limit below the snapshot's size (RLIMIT_FSIZE: writes
    past it fail with EFBIG, as on a full disk): refused with the reason, the store untouched
    and no partial file left; a server on the store keeps answering V1."""
    store_dir = tmp_path / "store"
    store = Store(store_dir)
    assert sync(str(write_bulk_drop(tmp_path / "v1", V1)), store).version == "000001"
    config = write_config(tmp_path / "eir.yaml")
    server = eir_server("--config", str(config), "--store", str(store_dir), lists=[])
    server.wait_for_log(r"lists version 000001")
    v2 = write_bulk_drop(tmp_path / "v2", V2)
    result = subprocess.run(["prlimit", "--fsize=262144", sys.executable, "-m", "eir", "sync",
                             "--source", str(v2), "--store", str(store_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert "store untouched" in result.stderr and "File too large" in result.stderr, \
        result.stderr
    assert verdicts_in_force(store) == ("000001", V1)
    assert not list(store_dir.rglob("*.tmp")), sorted(store_dir.rglob("*"))
    answers = check_all(server.address, [(imei, IMSI) for imei in (A, B, C)])
    assert [outcome_of_answer(answer) for answer in answers] == [V1[A], V1[B], V1[C]]


def test_observations_survive_a_full_disk_until_space_returns(eir_server, tmp_path):
    """The server's file size limit is lowered while it runs, so that its flushes fail as on
    a full disk, then raised again (prlimit --pid). Meanwhile it answers every request, says
    so in its log and its metrics, and once space is back every observation is written:
    none lost."""
    config = observations_config(tmp_path, flush_seconds=0.2)
    server = eir_server("--config", str(config), "--metrics", "127.0.0.1:0")
    metrics = endpoint(server, METRICS_LINE)
    database = tmp_path / "obs.sqlite"
    before = distinct_imeis(50)
    check_many(server.address, before, IMSI_A)
    wait_until(lambda: len(stored_rows(database)) == len(before), "the first rows written")
    size = database.stat().st_size + (Path(f"{database}-wal").stat().st_size
                                      if Path(f"{database}-wal").exists() else 0)
    limit = str(max(size, database.stat().st_size))
    subprocess.run(["prlimit", "--pid", str(server.process.pid), f"--fsize={limit}:unlimited"],
                   check=True)
    during = distinct_imeis(3050)[50:]
    answers = check_many(server.address, during, IMSI_A)
    assert all(outcome_of(answer) == "UNKNOWN" for answer in answers)
    server.wait_for_log(r"observations: cannot write \d+ record\(s\) to .*obs\.sqlite")
    samples = scrape(metrics)
    assert value(samples, "eir_observations_flush_errors_total") >= 1
    assert value(samples, "eir_observations_dropped_total") == 0
    subprocess.run(["prlimit", "--pid", str(server.process.pid), "--fsize=unlimited:unlimited"],
                   check=True)
    wait_until(lambda: len(stored_rows(database)) == len(before) + len(during),
               "every observation written once space is back", timeout=20)
    assert {imei for _, imei, _, _ in stored_rows(database)} == set(before) | set(during)
    assert server.stop() == 0
    server.wait_for_log(r"final flush done: \d+ written, 0 dropped, \d+ failed flush\(es\), "
                        r"0 pending")


# -- adversarial list files --------------------------------------------------------------------

def refusal(tmp_path: Path, name: str, content: bytes) -> str:
    """`eir check` on a list file with `content`: it must be refused; the message."""
    path = tmp_path / name
    path.write_bytes(content)
    result = run_eir("check", "--list", str(path), A)
    assert result.returncode != 0, result.stdout
    return result.stderr


HEADER = b"imei,status,imsi,reason\n"


def test_a_huge_key_field_is_named_by_its_size_not_echoed(tmp_path):
    message = refusal(tmp_path, "huge.csv", HEADER + b"3" * 100_000 + b",blacklist,,x\n")
    assert "huge.csv:2: imei: 100000 characters (at most 64 in this column)" in message
    assert len(message) < 300, len(message)


def test_a_field_beyond_the_csv_field_limit_names_the_line(tmp_path):
    message = refusal(tmp_path, "reason.csv",
                      HEADER + f"{A},blacklist,,".encode() + b"x" * 200_000 + b"\n")
    assert "reason.csv:2: row: field larger than field limit" in message
    assert len(message) < 300


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_list_in_another_encoding_is_refused_naming_the_line(tmp_path, encoding):
    text = "imei,status,imsi,reason\n" + f"{A},blacklist,,volé\n"
    message = refusal(tmp_path, "encoded.csv", text.encode(encoding))
    line = 1 if encoding == "utf-16" else 2
    assert f"encoded.csv:{line}: encoding: not UTF-8" in message


def test_a_utf8_byte_order_mark_is_skipped(tmp_path):
    """Spreadsheets write one; the registry formats already skip it."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + HEADER + f"{A},blacklist,,stolen\n".encode())
    assert eir_ok("check", "--list", str(path), A).startswith("BLACKLISTED")


def test_conflicting_duplicate_rows_in_one_file_are_refused_naming_both_lines(tmp_path):
    """The same IMEI blacklisted, whitelisted and greylisted in one file: the author must
    settle it; each later row is named with the row it conflicts with."""
    rows = [f"{A},blacklist,,stolen\n", f"{A},whitelist,,ok\n", f"{A},greylist,,watch\n",
            f"{A},blacklist,,again\n"]  # the same status again is no conflict
    path = tmp_path / "conflict.csv"
    path.write_bytes(HEADER + "".join(rows).encode())
    result = run_eir("check", "--list", str(path), A)
    assert result.returncode != 0
    assert f"conflict.csv:3: status: whitelisted conflicts with blacklisted for IMEI {A} at " \
           f"{path}:2" in result.stderr, result.stderr
    assert "conflict.csv:4: status: greylisted conflicts with blacklisted" in result.stderr
    assert "conflict.csv:5" not in result.stderr


def test_the_same_imei_in_two_files_takes_the_most_severe_status(tmp_path):
    """Across files lists overlap by design (a blacklist beside a registry whitelist):
    black wins over grey over white, and the source names the winning row."""
    white, black = tmp_path / "white.csv", tmp_path / "black.csv"
    white.write_bytes(HEADER + f"{A},whitelist,,registered\n".encode())
    black.write_bytes(HEADER + f"{A},blacklist,,stolen\n".encode())
    for files in ((white, black), (black, white)):
        arguments = [item for path in files for item in ("--list", str(path))]
        verdict = json.loads(eir_ok("check", "--json", *arguments, A))
        assert verdict["status"] == "BLACKLISTED" and "black.csv:2" in verdict["source"]
