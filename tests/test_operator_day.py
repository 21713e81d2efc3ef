"""Issue 16, the operator's day: what a new user meets from the registry's files to the
registry's dump. No list found (serve refuses, check says why), the Docker image's example
configuration, the store's pin in `eir lists status` and the API's unpin and sync, SIGHUP after a
configuration edit."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import zipfile
from datetime import date
from pathlib import Path

import httpx
from helpers_ops import API_LINE, TOKEN, authorised, endpoint
from helpers_process import EXAMPLE_LIST, ROOT, eir_ok, run_eir
from helpers_wire import ecr, open_peer, parse_answer, read_message

from eir.core.config import load_settings
from eir.check.observations import RAT_EUTRAN, RAT_NR, ObservationLog, write_dump

UNLISTED = "01234567890123"  # on no list of config/lists/example.csv


def drop_with_two_versions(tmp_path: Path) -> tuple[Path, Path]:
    """(drop directory, store) with versions 000001 and 000002 published."""
    drop, store = tmp_path / "drop", tmp_path / "store"
    drop.mkdir()
    for day, imei in (("20261120", "35209900176148"), ("20261121", "35209900176149")):
        (drop / f"{day}_blacklist.csv").write_text(
            f"imei,block_date,reasons\n{imei},20200101,stolen\n")
        eir_ok("sync", "--source", str(drop), "--store", str(store))
    return drop, store


# -- 1. no list found ----------------------------------------------------------------------

def test_serve_without_any_list_refuses_and_says_why(tmp_path):
    # An empty directory: no ./config/eir.yaml, no --list, no --store. The old code served
    # 0 rules (every IMEI 5422) with an INFO line; a timeout here is that bug.
    result = run_eir("serve", "--listen", "127.0.0.1:0", cwd=tmp_path, timeout=10)
    assert result.returncode == 2
    assert "refusing to serve: no lists loaded" in result.stderr
    assert "--list FILE, --store DIR or --config FILE" in result.stderr


def test_serve_with_a_config_naming_no_list_refuses_naming_the_file(tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text("lists:\n  unknown_policy: whitelisted\n")
    result = run_eir("serve", "--config", str(config), "--listen", "127.0.0.1:0",
                     cwd=tmp_path, timeout=10)
    assert result.returncode == 2
    assert f"{config} names neither lists.files nor store.directory" in result.stderr


def test_check_without_any_list_says_the_unknown_is_for_want_of_lists(tmp_path):
    result = run_eir("check", UNLISTED, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "UNKNOWN"
    assert "warning: no lists loaded" in result.stderr


def test_serving_an_empty_list_is_a_warning(eir_server, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("imei,status,imsi,reason\n")
    server = eir_server(lists=[empty])
    server.wait_for_log(r"WARNING.*the lists in force hold 0 rules: every IMEI gets the "
                        r"unknown policy \(unknown\)")
    assert server.stop() == 0


def test_docker_image_carries_the_example_configuration():
    # .dockerignore used to leave config/ out, so `docker run open-eir` served 0 rules.
    ignored = {line.strip().rstrip("/") for line in
               (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert "config" not in ignored
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY config /etc/eir" in dockerfile
    assert "ENV EIR_CONFIG=/etc/eir/eir.yaml" in dockerfile
    # What the image serves: the config names lists, and they exist beside it.
    settings = load_settings(ROOT / "config" / "eir.yaml")
    assert settings.lists.files and all(path.is_file() for path in settings.lists.files)


# -- 3. the pin, rollback by number, unpin and sync through the API, errors read once --------

def test_lists_status_shows_the_pin_in_text_and_json(tmp_path):
    _, store = drop_with_two_versions(tmp_path)
    eir_ok("lists", "rollback", "1", "--store", str(store))  # `1` is version 000001
    text = eir_ok("lists", "status", "--store", str(store))
    assert "pinned at version 000001 by a rollback" in text
    assert "* 000001" in text and "(pinned)" in text
    versions = json.loads(eir_ok("lists", "status", "--json", "--store", str(store)))
    assert {v["version"]: v["pinned"] for v in versions} == {"000002": False, "000001": True}
    eir_ok("lists", "unpin", "--store", str(store))
    versions = json.loads(eir_ok("lists", "status", "--json", "--store", str(store)))
    assert not any(v["pinned"] for v in versions)


def test_store_errors_name_the_store_once(tmp_path):
    drop_with_two_versions(tmp_path)
    # A store named `store` made the old message read "eir: store: store: version ...".
    result = run_eir("lists", "rollback", "9", "--store", "store", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("eir: store: version 000009 is not kept (kept: 000002, "
                                     "000001)")


def test_api_unpins_and_syncs_journaled_as_the_api(eir_server, monkeypatch, tmp_path):
    drop, store = drop_with_two_versions(tmp_path)
    config = tmp_path / "eir.yaml"
    config.write_text(f"store:\n  directory: {store}\nsync:\n  source: {drop}\n"
                      "  interval_seconds: 3600\n")
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    server = eir_server("--config", str(config), "--api", "127.0.0.1:0", lists=[])
    url = endpoint(server, API_LINE)

    def post(path: str, body=None) -> httpx.Response:
        return httpx.post(url + path, json=body, headers=authorised(), timeout=30)

    assert httpx.post(url + "/v1/lists/unpin", timeout=10).status_code == 401
    answer = post("/v1/lists/rollback", {"version": "1"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"version": "000001", "pinned": "000001"}
    refused = post("/v1/lists/sync")  # pinned: a sync is refused
    assert refused.status_code == 409 and "pinned at version 000001" in refused.json()["detail"]
    answer = post("/v1/lists/unpin")
    assert answer.status_code == 200 and answer.json() == {"was_pinned": "000001"}
    assert post("/v1/lists/unpin").json() == {"was_pinned": None}
    (drop / "20261122_blacklist.csv").write_text(
        "imei,block_date,reasons\n35209900176150,20200101,stolen\n")
    answer = post("/v1/lists/sync")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"outcome": "published version 000003", "version": "000003"}
    journal = [json.loads(line) for line in (store / "journal.jsonl").read_text().splitlines()]
    acts = [(record["act"], str(record.get("by", ""))) for record in journal]
    assert [act for act, _ in acts][-3:] == ["rollback", "unpin", "publish"]
    assert all(by.startswith("admin API from 127.0.0.1; ")
               for act, by in acts[-3:-1])
    assert server.stop() == 0


# -- 4. SIGHUP after a configuration edit -------------------------------------------------

def verdict(sock, imei: str, hop_by_hop: int) -> tuple[int | None, int | None]:
    sock.sendall(ecr(imei=imei, hop_by_hop=hop_by_hop))
    answer = parse_answer(read_message(sock))
    return answer.result_code, answer.equipment_status


def test_sighup_applies_the_unknown_policy_and_names_what_needs_a_restart(eir_server,
                                                                          tmp_path):
    config = tmp_path / "eir.yaml"
    lists = f"lists:\n  files: [{EXAMPLE_LIST}]\n"
    config.write_text(lists + "  unknown_policy: unknown\n")
    server = eir_server("--config", str(config), lists=[])
    with open_peer(server.address) as sock:
        assert verdict(sock, UNLISTED, 1) == (None, None)  # 5422, in Experimental-Result
        config.write_text(lists + "  unknown_policy: greylisted\n"
                          "diameter:\n  watchdog_seconds: 7\n")
        mark = len(server.lines)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(r"WARNING.*SIGHUP: configuration changed, not applied until a "
                            r"restart: diameter\.watchdog_seconds$", start=mark)
        server.wait_for_log(r"SIGHUP: configuration applied: lists\.unknown_policy$",
                            start=mark)
        assert verdict(sock, UNLISTED, 2) == (2001, 2)  # GREYLISTED

        # A configuration that does not load is refused whole; the policy stays.
        config.write_text(lists + "  unknown_policy: maybe\n")
        mark = len(server.lines)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(r"SIGHUP: configuration refused", start=mark)
        server.wait_for_log(r"lists reloaded", start=mark)
        assert verdict(sock, UNLISTED, 3) == (2001, 2)
    assert server.stop() == 0


def test_sighup_applies_a_new_list_file_in_every_worker(eir_server, tmp_path):
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text(f"imei,status\n{UNLISTED},whitelist\n")
    second.write_text(f"imei,status\n{UNLISTED},blacklist\n")
    config = tmp_path / "eir.yaml"
    config.write_text(f"lists:\n  files: [{first}]\n")
    server = eir_server("--config", str(config), "--workers", "2", lists=[])
    config.write_text(f"lists:\n  files: [{second}]\n")
    mark = len(server.lines)
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"SIGHUP: configuration applied: lists\.files$", start=mark)
    # Each new connection may land on either worker: both answer from the new file.
    for hop in range(4):
        with open_peer(server.address) as sock:
            assert verdict(sock, UNLISTED, hop) == (2001, 1)  # BLACKLISTED
    assert server.stop() == 0


# -- 5. dump and clones read what `eir serve --store` wrote ----------------------------------

def test_dump_and_clones_find_what_serve_wrote_under_its_store(eir_server, tmp_path):
    _, store = drop_with_two_versions(tmp_path)
    server = eir_server("--store", str(store), lists=[])  # runs in a directory of its own
    imsis = ("001010000000001", "001010000000002")
    with open_peer(server.address) as sock:
        for hop, imsi in enumerate(imsis):
            sock.sendall(ecr(imei=UNLISTED, imsi=imsi, hop_by_hop=hop))
            read_message(sock)
    assert server.stop() == 0  # the last flush on the way out
    today = date.today().strftime("%Y%m%d")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dump = eir_ok("dump", "--date", today, "--store", str(store), cwd=elsewhere)
    assert [line.split(",")[1:3] for line in dump.splitlines()[1:]] == \
        [[UNLISTED, imsi] for imsi in imsis]
    clones = json.loads(eir_ok("report", "clones", "--since", today, "--store", str(store),
                               "--json", cwd=elsewhere))
    assert [(c["imei"], c["imsis"]) for c in clones] == [(UNLISTED, 2)]


def test_readme_usage_lines_give_dump_and_clones_their_config_and_store():
    readme = (ROOT / "README.md").read_text()
    for command in ("eir dump --date YYYYMMDD", "eir report clones --since YYYY-MM-DD"):
        [line] = [line for line in readme.splitlines() if line.strip().startswith(command)]
        assert "[--config FILE]" in line and "[--store DIR]" in line, line


# -- 2. a DIRBS delta next to a plain full list: the run, as dirbs-listgen sets it -----------

BLACKLIST_HEADER = "imei,block_date,reasons\n"
BLACKLIST_REASONS = ("blocked", "unblocked", "changed")


def listgen_run(drop: Path, day: str, base: int, run: int, full: str | None,
                blocked: str) -> None:
    """What one dirbs-listgen run writes for the blacklist, unzipped: the full list (unless
    None) and one delta per reason, all named with `day`."""
    if full is not None:
        (drop / f"{day}_blacklist.csv").write_text(BLACKLIST_HEADER + full)
    for reason in BLACKLIST_REASONS:
        rows = blocked if reason == "blocked" else ""
        (drop / f"{day}_blacklist_delta_{base}_{run}_{reason}.csv").write_text(
            BLACKLIST_HEADER + rows)


def test_an_unzipped_full_list_is_from_the_run_of_its_deltas(tmp_path):
    drop, store = tmp_path / "drop", tmp_path / "store"
    drop.mkdir()
    listgen_run(drop, "20261120", -1, 1, "35209900176148,20200101,stolen\n",
                "35209900176148,20200101,stolen\n")
    eir_ok("sync", "--source", str(drop), "--store", str(store))
    # The next run's delta, next to the plain full list of run 1 (refused before: "the
    # list in force is from a file that names no run").
    listgen_run(drop, "20261121", 1, 2, None, "35209900176149,20200102,stolen\n")
    assert "published version 000002" in eir_ok("sync", "--source", str(drop), "--store",
                                                str(store))
    assert eir_ok("check", "35209900176149", "--store", str(store)).startswith("BLACKLISTED")
    [in_force] = [v for v in json.loads(eir_ok("lists", "status", "--json", "--store",
                                               str(store))) if v["in_force"]]
    assert {s["run"] for s in in_force["sources"]} == {"2"}


def test_a_delta_on_a_full_list_without_its_deltas_says_what_to_publish(tmp_path):
    drop, store = tmp_path / "drop", tmp_path / "store"
    drop.mkdir()
    (drop / "20261120_blacklist.csv").write_text(BLACKLIST_HEADER +
                                                "35209900176148,20200101,stolen\n")
    eir_ok("sync", "--source", str(drop), "--store", str(store))
    listgen_run(drop, "20261121", 1, 2, None, "35209900176149,20200102,stolen\n")
    result = run_eir("sync", "--source", str(drop), "--store", str(store))
    assert result.returncode == 1
    assert "names no run (a DIRBS full list is from the run of the deltas" in result.stderr


# -- 7. eir replay draws from a store or a drop directory -----------------------------------

def test_replay_generates_from_a_store_and_from_a_drop_directory(eir_server, tmp_path):
    drop, store = drop_with_two_versions(tmp_path)
    server = eir_server("--store", str(store), lists=[])
    target = f"{server.host}:{server.port}"
    for source in (store, drop):  # `--list store` was "Is a directory"
        result = run_eir("replay", "--target", target, "--generate", "black=90,invalid=10",
                         "--list", str(source), "--count", "100", "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["by_equipment_status"] == {"BLACKLISTED": 90}
        assert (report["errors"], report["expected_errors"]) == (0, 10)
    assert server.stop() == 0


# -- 6. observations keep where each check came from; older databases gain the column ---------

def test_observations_record_the_rat_and_the_dump_carries_dirbs_codes(tmp_path):
    database = tmp_path / "observations.sqlite"
    with sqlite3.connect(database) as old:  # a database written before the rats column
        old.execute("CREATE TABLE observations (date INTEGER NOT NULL, imei TEXT NOT NULL, "
                    "imsi TEXT NOT NULL, msisdn TEXT NOT NULL, PRIMARY KEY (date, imei, imsi)) "
                    "WITHOUT ROWID")
        old.execute("INSERT INTO observations VALUES (20261120, '35000000000001', "
                    "'001010000000001', '')")
    log = ObservationLog(database)
    log.record(20261120, "35000000000002", "001010000000002", RAT_EUTRAN)
    log.record(20261120, "35000000000002", "001010000000002", RAT_NR)  # same key, both
    log.record(20261120, "35000000000003", "001010000000003", RAT_NR)
    log.close()
    log = ObservationLog(database)  # a later flush adds a RAT to a stored key
    log.record(20261120, "35000000000003", "001010000000003", RAT_EUTRAN)
    log.record(20261120, "35000000000004", "001010000000004", RAT_NR)
    log.close()
    out = io.StringIO()
    assert write_dump(database, 20261120, out) == 4
    assert out.getvalue().splitlines() == [
        "date,imei,imsi,msisdn,rat",
        "20261120,35000000000001,001010000000001,,",  # before the column: unknown
        "20261120,35000000000002,001010000000002,,006",
        "20261120,35000000000003,001010000000003,,006",
        "20261120,35000000000004,001010000000004,,"]  # NR alone: DIRBS-Core has no code


def test_dump_with_operator_writes_the_zip_dirbs_core_names(tmp_path):
    database = tmp_path / "observations.sqlite"
    log = ObservationLog(database)
    log.record(20261120, "35000000000002", "001010000000002")
    log.close()
    config = tmp_path / "eir.yaml"
    config.write_text(f"observations:\n  database: {database}\n")
    result = run_eir("dump", "--date", "20261120", "--operator", "op1", "--config",
                     str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "op1_20261120_20261120.zip") as archive:
        assert archive.namelist() == ["op1_20261120_20261120.csv"]
        # Dated when it was written, not 1980-01-01 (a member opened by its name alone).
        written = archive.getinfo("op1_20261120_20261120.csv").date_time[:3]
        assert written == date.today().timetuple()[:3]
        assert archive.getinfo("op1_20261120_20261120.csv").compress_type == \
            zipfile.ZIP_DEFLATED
        assert archive.read("op1_20261120_20261120.csv").decode().splitlines()[1] == \
            "20261120,35000000000002,001010000000002,,006"
    refused = run_eir("dump", "--date", "20261120", "--operator", "OP1", cwd=tmp_path)
    assert refused.returncode == 2 and "lower-case" in refused.stderr
