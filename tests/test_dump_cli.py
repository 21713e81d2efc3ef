"""`eir dump --date D` (the DIRBS operator data dump) and `eir report clones`, run as
subprocesses on an observations database filled as a server fills it."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import yaml

from eir.check.observations import ObservationLog
from helpers_process import run_eir

DAY, NEXT_DAY = 20240501, 20240502
PHONE_A, PHONE_B, PHONE_C = "35123400000017", "35123400000025", "35123400000033"
IMSI_1, IMSI_2, IMSI_3 = "510100000000001", "510100000000002", "510100000000003"
MSISDN_1 = "6281100000001"
KEY = "lab-share-2024"


# -- helpers --------------------------------------------------------------------------------

def config(directory: Path, **observations) -> Path:
    """A config whose observations database is directory/obs.sqlite, filled with: on DAY,
    A with IMSIs 1 and 2 (seen twice), B without IMSI; on NEXT_DAY, A with 3, B with 1 and 2,
    C with 1; on the day before DAY, C with 2."""
    database = directory / "obs.sqlite"
    log = ObservationLog(database, msisdns={IMSI_1: MSISDN_1})
    for day, imei, imsi in [
            (DAY, PHONE_A, IMSI_2), (DAY, PHONE_A, IMSI_1), (DAY, PHONE_B, None),
            (DAY, PHONE_A, IMSI_1), (NEXT_DAY, PHONE_A, IMSI_3), (NEXT_DAY, PHONE_B, IMSI_1),
            (NEXT_DAY, PHONE_B, IMSI_2), (NEXT_DAY, PHONE_C, IMSI_1), (DAY - 1, PHONE_C, IMSI_2)]:
        log.record(day, imei, imsi)
    log.close()
    path = directory / "eir.yaml"
    path.write_text(yaml.safe_dump({"observations": {"database": str(database),
                                                     **observations}}), encoding="utf-8")
    return path



def succeeds(*args: str) -> str:
    result = run_eir(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def hashed(value: str) -> str:
    return hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()[:32]


# -- eir dump -------------------------------------------------------------------------------

def test_dump_has_one_row_per_distinct_combination_of_the_day(tmp_path):
    assert succeeds("dump", "--date", str(DAY), "--config", str(config(tmp_path))) == (
        "date,imei,imsi,msisdn,rat\n"
        f"{DAY},{PHONE_A},{IMSI_1},{MSISDN_1},006\n"
        f"{DAY},{PHONE_A},{IMSI_2},,006\n"
        f"{DAY},{PHONE_B},,,006\n")


def test_dump_to_a_file(tmp_path):
    output = tmp_path / "dump.csv"
    result = run_eir("dump", "--date", str(NEXT_DAY), "--output", str(output),
                     "--config", str(config(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert f"{output}: 4 row(s) for 2024-05-02" in result.stderr
    assert output.read_text(encoding="utf-8") == (
        "date,imei,imsi,msisdn,rat\n"
        f"{NEXT_DAY},{PHONE_A},{IMSI_3},,006\n"
        f"{NEXT_DAY},{PHONE_B},{IMSI_1},{MSISDN_1},006\n"
        f"{NEXT_DAY},{PHONE_B},{IMSI_2},,006\n"
        f"{NEXT_DAY},{PHONE_C},{IMSI_1},{MSISDN_1},006\n")


def test_dump_of_a_day_without_observations_is_the_header_alone(tmp_path):
    assert succeeds("dump", "--date", "20240601", "--config", str(config(tmp_path))) == \
        "date,imei,imsi,msisdn,rat\n"


def test_pseudonymised_dump_carries_keyed_hashes_not_numbers(tmp_path):
    out = succeeds("dump", "--date", str(DAY), "--pseudonymise",
                   "--config", str(config(tmp_path, pseudonymise_key=KEY)))
    assert out == ("date,imei,imsi,msisdn,rat\n"
                   f"{DAY},{PHONE_A},{hashed(IMSI_1)},{hashed(MSISDN_1)},006\n"
                   f"{DAY},{PHONE_A},{hashed(IMSI_2)},,006\n"
                   f"{DAY},{PHONE_B},,,006\n")
    assert IMSI_1 not in out and IMSI_2 not in out and MSISDN_1 not in out


def test_configured_key_pseudonymises_without_the_flag(tmp_path):
    out = succeeds("dump", "--date", str(DAY),
                   "--config", str(config(tmp_path, pseudonymise_key=KEY)))
    assert hashed(IMSI_1) in out and IMSI_1 not in out


def test_pseudonymise_without_a_key_is_refused(tmp_path):
    result = run_eir("dump", "--date", str(DAY), "--pseudonymise",
                     "--config", str(config(tmp_path)))
    assert result.returncode == 2
    assert "--pseudonymise needs observations.pseudonymise_key" in result.stderr
    assert result.stdout == ""


def test_dump_without_a_database_is_refused(tmp_path):
    missing = tmp_path / "eir.yaml"
    missing.write_text(yaml.safe_dump({"observations": {
        "database": str(tmp_path / "none.sqlite")}}), encoding="utf-8")
    result = run_eir("dump", "--date", str(DAY), "--config", str(missing))
    assert result.returncode == 1
    assert "none.sqlite: no observations database" in result.stderr
    assert not (tmp_path / "none.sqlite").exists()


def test_dump_refuses_a_malformed_date(tmp_path):
    result = run_eir("dump", "--date", "20241301", "--config", str(config(tmp_path)))
    assert result.returncode == 2
    assert "'20241301' is not a date" in result.stderr


# -- eir report clones ----------------------------------------------------------------------

def test_clones_report_lists_imeis_with_several_imsis_most_first(tmp_path):
    out = succeeds("report", "clones", "--since", "2024-05-01", "--json",
                   "--config", str(config(tmp_path)))
    masked = {imsi: imsi[:5] + "******" + imsi[-4:] for imsi in (IMSI_1, IMSI_2, IMSI_3)}
    assert json.loads(out) == [
        {"imei": PHONE_A, "imsis": 3, "first_seen": "2024-05-01", "last_seen": "2024-05-02",
         "imsi_list": [masked[IMSI_1], masked[IMSI_2], masked[IMSI_3]]},
        {"imei": PHONE_B, "imsis": 2, "first_seen": "2024-05-02", "last_seen": "2024-05-02",
         "imsi_list": [masked[IMSI_1], masked[IMSI_2]]}]


def test_clones_report_shows_whole_imsis_with_show_imsi(tmp_path):
    path = config(tmp_path)
    path.write_text(path.read_text() + "logging:\n  show_imsi: true\n")
    out = succeeds("report", "clones", "--since", "2024-05-01", "--json", "--config", str(path))
    assert json.loads(out)[0]["imsi_list"] == [IMSI_1, IMSI_2, IMSI_3]


def test_clones_report_counts_only_days_since_the_date(tmp_path):
    out = succeeds("report", "clones", "--since", "2024-04-30", "--json",
                   "--config", str(config(tmp_path)))
    assert [(row["imei"], row["imsis"]) for row in json.loads(out)] == [
        (PHONE_A, 3), (PHONE_B, 2), (PHONE_C, 2)]


def test_clones_report_with_a_higher_threshold_as_a_table(tmp_path):
    out = succeeds("report", "clones", "--since", "2024-05-01", "--min-imsis", "3",
                   "--config", str(config(tmp_path)))
    assert out.splitlines() == [
        "IMEI            IMSIS  FIRST SEEN  LAST SEEN   IMSI LIST",
        f"{PHONE_A}      3  2024-05-01  2024-05-02  51010******0001 51010******0002 "
        "51010******0003"]
