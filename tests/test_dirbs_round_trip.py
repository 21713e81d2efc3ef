"""A DIRBS round trip (issue 16): the registry's files in, as dirbs-listgen publishes them
(full lists zipped with the deltas of their run: blacklist, notifications and exceptions for
one operator; then the next run's deltas), a replay of S13 traffic and an N5g-eir check, and
the operator data dump out, checked against what DIRBS-Core's operator import accepts.

The checks below are DIRBS-Core's, read from its repository (dirbs/DIRBS-Core):
- file name: importer_utils.perform_operator_filename_checks and operator_expected_file_dates
  (`<operator>_<YYYYMMDD>_<YYYYMMDD>.zip`, start not after end, start not in the future);
- the zip: importer_utils.extract_csv_from_zip (exactly one member, named as the zip);
- the columns and cells: etc/schema/OperatorImportSchema_v2.csvs, the schema of the default
  import (perform_rat_import), with @totalColumns 5 and @ignoreColumnNameCase;
- every row's date inside the file name's range (OperatorDataImporter._check_data_date_range).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zipfile
from datetime import date, datetime, timedelta
from pathlib import Path

import httpx
from helpers_ops import endpoint
from helpers_process import eir_ok, run_eir

from eir.core.imei import luhn_check_digit

OPERATOR = "op1"
STOLEN, STOLEN_LATER = "35209900176148", "35209900176149"  # run 1, run 2
NOTIFIED, NOTIFIED_IMSI = "35332106470089", "001010000000007"
EXCEPTED, EXCEPTED_IMSI = "35404509123456", "001010000000008"
FIVE_G = "35111111000017"  # on no list: checked over N5g-eir only
H2C_LINE = r"N5g-eir served on (http://\S+)/n5g-eir-eic/v1/ \(h2c\)"

# OperatorImportSchema_v2.csvs, column by column (all but date @optional: empty allowed).
V2_COLUMNS = ("date", "imei", "imsi", "msisdn", "rat")
V2_CELLS = {
    "date": r"^(20[0-9]{2}((0[13578]|1[02])31|(01|0[3-9]|1[0-2])(29|30)|(0[1-9]|1[0-2])"
            r"(0[1-9]|1[0-9]|2[0-8]))|20([02468][048]|[13579][26])0229)$",
    "imei": r"^[0-9A-Fa-f\*\#]{1,16}$",
    "imsi": r"^[0-9]{1,15}$",
    "msisdn": r"^[0-9]{1,15}$",
    "rat": r"^(00[1-7]|10[1-5])(\|(00[1-7]|10[1-5]))*$",
}
V2_OPTIONAL = {"imei", "imsi", "msisdn", "rat"}


def dirbs_zip(path: Path, files: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)


def listgen_run(drop: Path, day: str, base: int, run: int, full: bool, rows: dict) -> None:
    """What one dirbs-listgen run publishes: per list, a zip of the full list (unless not
    `full`, as with --no-full-lists) and one delta file per reason of that list (a header
    alone when nothing changed), with the rows of `rows[(list, reason)]` and `rows[list]`."""
    lists = {"blacklist": ("imei,block_date,reasons", ("blocked", "unblocked", "changed")),
             f"notifications_{OPERATOR}": ("imei,imsi,msisdn,block_date,reasons",
                                          ("new", "resolved", "blacklisted", "no_longer_seen",
                                           "changed")),
             f"exceptions_{OPERATOR}": ("imei,imsi,msisdn", ("added", "removed"))}
    for name, (header, reasons) in lists.items():
        files = {}
        if full:
            files[f"{day}_{name}.csv"] = header + "\n" + rows.get(name, "")
        for reason in reasons:
            files[f"{day}_{name}_delta_{base}_{run}_{reason}.csv"] = \
                header + "\n" + rows.get((name, reason), "")
        dirbs_zip(drop / f"{day}_{name}.zip", files)


def dirbs_would_import(path: Path) -> list[dict]:
    """The rows of an operator data dump, after every check DIRBS-Core's operator import
    makes before it loads a file (see the module docstring); AssertionError otherwise."""
    stem = path.name.removesuffix(".zip")
    assert path.name.endswith(".zip"), path.name
    start, end = (datetime.strptime(part, "%Y%m%d").date() for part in stem.split("_")[-2:])
    assert start <= end and start <= date.today(), path.name
    with zipfile.ZipFile(path) as archive:
        members = archive.namelist()
        assert len(members) == 1, members
        assert os.path.splitext(os.path.basename(members[0]))[0] == stem, members
        text = archive.read(members[0]).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    assert [cell.lower() for cell in rows[0]] == list(V2_COLUMNS), rows[0]
    records = []
    for line, row in enumerate(rows[1:], 2):
        assert len(row) == len(V2_COLUMNS), (line, row)
        record = dict(zip(V2_COLUMNS, row))
        for column, cell in record.items():
            if cell or column not in V2_OPTIONAL:
                assert re.match(V2_CELLS[column], cell), (line, column, cell)
        day = datetime.strptime(record["date"], "%Y%m%d").date()
        assert start <= day <= end, (line, record["date"], path.name)
        records.append(record)
    return records


def test_registry_files_in_traffic_and_a_dump_dirbs_core_accepts(eir_server, tmp_path):
    drop, store, out = tmp_path / "drop", tmp_path / "store", tmp_path / "out"
    for directory in (drop, out):
        directory.mkdir()
    past = "20200101"
    future = (date.today() + timedelta(days=30)).strftime("%Y%m%d")
    # Run 1: two stolen IMEIs, one of them the owner's SIM may still use (an exception); a
    # notification for a device to be blocked in a month. Each row also in its run's delta
    # (base -1: the first run), as dirbs-listgen writes them.
    stolen = f"{STOLEN},{past},stolen\n{EXCEPTED},{past},stolen\n"
    notified = f"{NOTIFIED},{NOTIFIED_IMSI},,{future},duplicate\n"
    excepted = f"{EXCEPTED},{EXCEPTED_IMSI},\n"
    notifications, exceptions = f"notifications_{OPERATOR}", f"exceptions_{OPERATOR}"
    listgen_run(drop, "20261120", -1, 1, True, {
        "blacklist": stolen, ("blacklist", "blocked"): stolen,
        notifications: notified, (notifications, "new"): notified,
        exceptions: excepted, (exceptions, "added"): excepted})
    assert "published version 000001" in eir_ok("sync", "--source", str(drop), "--store",
                                                str(store))
    # Run 2, deltas only (dirbs-listgen --no-full-lists): one more stolen IMEI.
    listgen_run(drop, "20261121", 1, 2, False, {
        ("blacklist", "blocked"): f"{STOLEN_LATER},{past},stolen\n"})
    assert "published version 000002" in eir_ok("sync", "--source", str(drop), "--store",
                                                str(store))
    checks = {(STOLEN, None): "BLACKLISTED", (STOLEN_LATER, None): "BLACKLISTED",
              (NOTIFIED, NOTIFIED_IMSI): "GREYLISTED",
              (EXCEPTED, EXCEPTED_IMSI): "WHITELISTED", (EXCEPTED, NOTIFIED_IMSI): "BLACKLISTED"}
    for (imei, imsi), status in checks.items():
        imsi_args = ("--imsi", imsi) if imsi else ()
        assert eir_ok("check", imei, *imsi_args, "--store", str(store)).startswith(status), \
            (imei, imsi)

    server = eir_server("--store", str(store), "--sbi", "127.0.0.1:0", lists=[])
    sbi = endpoint(server, H2C_LINE)
    result = run_eir("replay", "--target", f"{server.host}:{server.port}", "--generate",
                     "white=40,black=30,grey=20,unknown=5,invalid=5", "--list", str(store),
                     "--count", "1000", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["by_equipment_status"] == {"WHITELISTED": 400, "BLACKLISTED": 300,
                                             "GREYLISTED": 200}
    assert (report["errors"], report["expected_errors"], report["timeouts"]) == (0, 50, 0)
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        answer = client.get(sbi + "/n5g-eir-eic/v1/equipment-status", params={
            "pei": f"imei-{FIVE_G}{luhn_check_digit(FIVE_G)}", "supi": "imsi-001010000000009"})
        assert answer.status_code == 404  # unknown: 5422's N5g-eir twin, still observed
    assert server.stop() == 0  # the last flush of the observations

    today = date.today().strftime("%Y%m%d")
    eir_ok("dump", "--date", today, "--store", str(store), "--operator", OPERATOR,
           "--output", str(out))
    [dump] = list(out.iterdir())
    assert dump.name == f"{OPERATOR}_{today}_{today}.zip"
    records = dirbs_would_import(dump)
    rats = {(r["imei"], r["imsi"]): r["rat"] for r in records}
    assert rats[(FIVE_G, "001010000000009")] == ""  # NR: DIRBS-Core has no code for it
    s13 = [rat for key, rat in rats.items() if key[0] != FIVE_G]
    assert s13 and set(s13) == {"006"}  # E-UTRAN: every S13 check
    assert {r["imei"] for r in records} >= {STOLEN, NOTIFIED, EXCEPTED}
