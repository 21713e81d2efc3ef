"""Registry list formats (eir.lists.formats): DIRBS full lists and deltas, import-side
change_type deltas, GSMA-style TAC files and the native CSV, parsed from real files on disk
(plain and zipped) into the neutral form of eir.lists.entries."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from eir.core.decision import EquipmentStatus
from eir.lists.native import ListError
from eir.lists.entries import Kind, ListDelta, ListEntries
from eir.lists.formats import parse_all, parse_path

BLACKLIST = "20261120_blacklist.csv"
NOTIFICATIONS = "20261120_notifications_op1.csv"
EXCEPTIONS = "20261120_exceptions_op1.csv"
IMEI_A, IMEI_B, IMEI_C = "35123456789012", "35123456789013", "86000000000001"


# --- helpers ----------------------------------------------------------------------------------

def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def zipped(csv_path: Path, *more: Path) -> Path:
    """`x.csv` (and any more CSVs) in `x.zip`, next to it."""
    archive = csv_path.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in (csv_path, *more):
            out.write(path, arcname=path.name)
    return archive


def lines(*rows: str) -> str:
    return "".join(row + "\n" for row in rows)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ListError) as caught:
        parse_path(path)
    return caught.value.problems


def entries_by_imei(entries: ListEntries) -> dict[int, tuple[int, object]]:
    """{imei: (imsi, attribute)} of every exact entry."""
    return {int(imei): (int(imsi), entries.attributes[int(index)])
            for imei, imsi, index in zip(entries.imei, entries.imsi, entries.attribute)}


@pytest.fixture(params=["plain", "zip"])
def packed(request):
    """Turns a written CSV into what the test parses: itself, or a zip holding it."""
    return (lambda path: path) if request.param == "plain" else zipped


# --- full lists -------------------------------------------------------------------------------

def test_blacklist_gives_blacklist_entries_with_date_and_readable_reasons(tmp_path, packed):
    path = packed(write(tmp_path, BLACKLIST, lines(
        "imei,block_date,reasons",
        f"{IMEI_A},20261101,stolen|duplicate",
        f"{IMEI_B},20261120,stolen")))
    result = parse_path(path)
    assert isinstance(result, ListEntries) and result.rows == 2
    found = entries_by_imei(result)
    imsi, attribute = found[int(IMEI_A)]
    assert imsi == 0
    assert (attribute.kind, attribute.block_date, attribute.reason, attribute.source) == \
        (Kind.BLACKLIST, 20261101, "stolen, duplicate", BLACKLIST)
    assert attribute.status_on(20261031) is None
    assert attribute.status_on(20261101) is EquipmentStatus.BLACKLISTED
    assert found[int(IMEI_B)][1].reason == "stolen"


def test_notifications_are_keyed_by_imei_alone_and_note_amnesty(tmp_path, packed):
    path = packed(write(tmp_path, NOTIFICATIONS, lines(
        "imei,imsi,msisdn,block_date,reasons,amnesty_granted",
        f"{IMEI_A},510011234567890,6281234567,20261201,duplicate,False",
        f"{IMEI_B},510019999999999,6289999999,20261215,not_registered,True")))
    found = entries_by_imei(parse_path(path))
    imsi, attribute = found[int(IMEI_A)]
    assert imsi == 0
    assert (attribute.kind, attribute.block_date, attribute.reason) == \
        (Kind.NOTIFICATION, 20261201, "duplicate")
    assert attribute.status_on(20261130) is EquipmentStatus.GREYLISTED
    assert attribute.status_on(20261201) is EquipmentStatus.BLACKLISTED
    assert found[int(IMEI_B)][1].reason == "not_registered (amnesty granted)"


def test_exceptions_pair_the_imei_with_its_imsi(tmp_path, packed):
    path = packed(write(tmp_path, EXCEPTIONS, lines(
        "imei,imsi,msisdn",
        f"{IMEI_A},510011234567890,6281234567",
        f"{IMEI_C},51001123,")))
    result = parse_path(path)
    found = entries_by_imei(result)
    assert found[int(IMEI_A)][0] == 510011234567890
    assert found[int(IMEI_C)][0] == 51001123
    assert {attribute.kind for attribute in result.attributes} == {Kind.EXCEPTION}
    assert result.imei.dtype == np.uint64 and result.attribute.dtype == np.uint32


def test_imeis_are_normalised_to_their_first_14_digits(tmp_path):
    path = write(tmp_path, BLACKLIST, lines(
        "imei,block_date,reasons",
        "35123456789012,20261101,x",  # 14
        "351234567890235,20261101,x",  # 15: check digit dropped
        "3512345678903401,20261101,x",  # 16: IMEISV, SVN dropped
        "35123456789045AB,20261101,x"))  # 14 digits then junk: DIRBS keeps the 14
    assert parse_path(path).imei.tolist() == [35123456789012, 35123456789023,
                                             35123456789034, 35123456789045]


def test_rows_with_the_same_date_and_reasons_share_one_attribute(tmp_path):
    kinds = [("20261101", "stolen"), ("20261101", "stolen|duplicate"), ("20261215", "stolen")]
    rows = [f"{35000000000000 + n},{kinds[n % 3][0]},{kinds[n % 3][1]}" for n in range(10_000)]
    result = parse_path(write(tmp_path, BLACKLIST, lines("imei,block_date,reasons", *rows)))
    assert result.rows == 10_000 and len(result.attributes) == 3
    described = [(result.attributes[index].block_date, result.attributes[index].reason)
                 for index in result.attribute[:3]]
    assert described == [(20261101, "stolen"), (20261101, "stolen, duplicate"),
                         (20261215, "stolen")]


def test_a_list_without_a_dirbs_name_is_recognised_by_its_header(tmp_path):
    result = parse_path(write(tmp_path, "from-registry.csv", lines(
        "IMEI,Block_Date,Reasons", f"{IMEI_A},20261101,stolen")))
    assert result.attributes[0].kind is Kind.BLACKLIST


def test_a_zip_holding_the_full_list_and_its_deltas_gives_each(tmp_path):
    full = write(tmp_path, BLACKLIST, lines("imei,block_date,reasons",
                                            f"{IMEI_A},20261101,stolen"))
    delta = write(tmp_path, "20261120_blacklist_delta_7_8_blocked.csv",
                  lines("imei,block_date,reasons", f"{IMEI_B},20261120,stolen"))
    archive = zipped(full, delta)
    assert isinstance(parse_path(archive), ListEntries)
    everything = parse_all(archive)
    assert [type(result) for result in everything] == [ListEntries, ListDelta]
    assert everything[1].added.imei.tolist() == [int(IMEI_B)]


# --- deltas -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, list_name, adds", [
    ("20261120_blacklist_delta_41_42_blocked.csv", "blacklist", True),
    ("20261120_blacklist_delta_41_42_changed.csv", "blacklist", True),
    ("20261120_blacklist_delta_41_42_unblocked.csv", "blacklist", False),
])
def test_blacklist_delta_reason_decides_added_or_removed(tmp_path, packed, name, list_name,
                                                         adds):
    path = packed(write(tmp_path, name, lines("imei,block_date,reasons",
                                              f"{IMEI_A},20261101,stolen")))
    delta = parse_path(path)
    assert isinstance(delta, ListDelta)
    assert (delta.list_name, delta.base, delta.run) == (list_name, "41", "42")
    moved, other = (delta.added, delta.removed) if adds else (delta.removed, delta.added)
    assert moved.imei.tolist() == [int(IMEI_A)] and len(other.imei) == 0


@pytest.mark.parametrize("reason, adds", [("new", True), ("changed", True), ("resolved", False),
                                          ("no_longer_seen", False), ("blacklisted", False)])
def test_notifications_delta_reasons(tmp_path, reason, adds):
    delta = parse_path(write(tmp_path, f"20261120_notifications_op1_delta_-1_5_{reason}.csv",
                             lines("imei,imsi,msisdn,block_date,reasons",
                                   f"{IMEI_A},510011234567890,628123,20261201,duplicate")))
    assert (delta.list_name, delta.base, delta.run) == ("notifications_op1", "-1", "5")
    assert len(delta.added.imei) == (1 if adds else 0)
    assert len(delta.removed.imei) == (0 if adds else 1)


@pytest.mark.parametrize("reason, adds", [("added", True), ("removed", False)])
def test_exceptions_delta_keys_by_imei_and_imsi(tmp_path, reason, adds):
    delta = parse_path(write(tmp_path, f"20261120_exceptions_op1_delta_3_4_{reason}.csv",
                             lines("imei,imsi,msisdn", f"{IMEI_A},510011234567890,628123")))
    side = delta.added if adds else delta.removed
    assert list(zip(side.imei.tolist(), side.imsi.tolist())) == [(int(IMEI_A), 510011234567890)]


def test_a_delta_with_an_unknown_reason_is_refused(tmp_path):
    problems = problems_of(write(tmp_path, "20261120_blacklist_delta_1_2_exploded.csv",
                                 lines("imei,block_date,reasons")))
    assert "exploded" in problems[0] and problems[0].startswith(str(tmp_path))


def test_stolen_list_change_types_split_into_added_and_removed(tmp_path):
    delta = parse_path(write(tmp_path, "stolen_delta.csv", lines(
        "imei,reporting_date,status,change_type",
        f"{IMEI_A},20261101,,add",
        f"{IMEI_B},,blacklist,update",
        f"{IMEI_C},20261102,,remove",
        "35999999999999,20261103,pending,add")))
    assert (delta.list_name, delta.base, delta.run) == ("stolen", "", "")
    added = entries_by_imei(delta.added)
    assert sorted(added) == [int(IMEI_A), int(IMEI_B)]
    assert (added[int(IMEI_A)][1].kind, added[int(IMEI_A)][1].block_date) == \
        (Kind.BLACKLIST, 20261101)
    assert added[int(IMEI_B)][1].block_date == 0  # no reporting date: blocked whatever the day
    assert sorted(delta.removed.imei.tolist()) == [35999999999999, int(IMEI_C)]


def test_pairing_list_change_types(tmp_path):
    delta = parse_path(write(tmp_path, "pairing_delta.csv", lines(
        "imei,imsi,msisdn,change_type",
        f"{IMEI_A},510011234567890,628123,add",
        f"{IMEI_B},510019999999999,,remove")))
    assert delta.list_name == "pairing"
    assert list(zip(delta.added.imei.tolist(), delta.added.imsi.tolist())) == \
        [(int(IMEI_A), 510011234567890)]
    assert delta.removed.imsi.tolist() == [510019999999999]
    assert delta.added.attributes[0].kind is Kind.EXCEPTION


# --- TAC file and native CSV ------------------------------------------------------------------

def test_tac_file_maps_tacs_to_brand_and_model(tmp_path, packed):
    path = packed(write(tmp_path, "gsma_tac.csv", lines(
        "tac,manufacturer,model_name,bands,device_type",
        "35123456,Apple,iPhone 12,LTE,Smartphone",
        "86000000,Xiaomi,,GSM,Feature phone",
        "01234567,,,,")))
    assert parse_path(path) == {35123456: "Apple iPhone 12", 86000000: "Xiaomi"}


def test_tac_file_prefers_brand_and_marketing_name_and_reads_pipes(tmp_path):
    path = write(tmp_path, "tacdb.txt", lines(
        "TAC|Manufacturer|Model_Name|Brand_Name|Marketing_Name",
        "35123456|Apple Inc|A2172|Apple|iPhone 12"))
    assert parse_path(path) == {35123456: "Apple iPhone 12"}


def test_native_csv_becomes_entries_ranges_and_tacs(tmp_path):
    path = write(tmp_path, "ours.csv", lines(
        "# our own list",
        "imei,status,imsi,reason",
        f"{IMEI_A},blacklist,,stolen",
        f"{IMEI_B},whitelist,510011234567890,",
        "35000000000000-35000000000099,greylist,,batch",
        "86000000,blacklist,,bad model"))
    result = parse_path(path)
    found = entries_by_imei(result)
    imsi, attribute = found[int(IMEI_A)]
    assert (imsi, attribute.kind, attribute.status, attribute.reason, attribute.source) == \
        (0, Kind.NATIVE, EquipmentStatus.BLACKLISTED, "stolen", f"{path}:3")
    assert found[int(IMEI_B)][0] == 510011234567890
    assert [(r.start, r.end, r.attribute.status) for r in result.ranges] == \
        [(35000000000000, 35000000000099, EquipmentStatus.GREYLISTED)]
    assert [(t.tac, t.attribute.subject) for t in result.tacs] == [(86000000, "TAC 86000000")]
    assert result.rows == 4


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("row, field, says", [
    ("3512345678901,20261101,stolen", "imei", "not an IMEI"),
    ("35123456789012345678,20261101,stolen", "imei", "at most 16"),
    (f"{IMEI_A},20261331,stolen", "block_date", "not a date"),
    (f"{IMEI_A},2026-11-01,stolen", "block_date", "not a date"),
    (f"{IMEI_A},20261101", "row", "2 cells, header has 3"),
])
def test_a_bad_blacklist_row_is_named_by_file_line_and_field(tmp_path, packed, row, field,
                                                             says):
    csv_path = write(tmp_path, BLACKLIST, lines(
        "imei,block_date,reasons", f"{IMEI_A},20261101,ok", "", f"{IMEI_B},20261101,ok", row))
    path = packed(csv_path)
    problems = problems_of(path)
    where = f"{path}!{BLACKLIST}" if path.suffix == ".zip" else str(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{where}:5: {field}: ") and says in problems[0]


@pytest.mark.parametrize("imsi", ["1234", "5100112345678901", "51001x23"])
def test_an_imsi_that_is_not_5_to_15_digits_is_refused(tmp_path, imsi):
    path = write(tmp_path, EXCEPTIONS, lines("imei,imsi,msisdn", f"{IMEI_A},{imsi},1"))
    assert problems_of(path) == [f"{path}:2: imsi: {imsi!r} is not an IMSI (5 to 15 digits)"]


def test_a_missing_column_names_the_header_line(tmp_path):
    path = write(tmp_path, NOTIFICATIONS, lines("imei,imsi,block_date",
                                                f"{IMEI_A},510011234567890,20261101"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:1: header: missing column(s) msisdn, reasons")


def test_an_empty_file_is_refused(tmp_path):
    path = write(tmp_path, BLACKLIST, b"")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:1: header: file is empty")


def test_a_file_that_is_not_utf8_names_the_line_without_hiding_earlier_rows(tmp_path):
    path = write(tmp_path, BLACKLIST, lines("imei,block_date,reasons", "bad,20261101,ok",
                                            f"{IMEI_A},20261101,ok").encode()
                 + f"{IMEI_B},20261101,caf\xe9\n".encode("latin-1"))
    problems = problems_of(path)
    assert problems[0].startswith(f"{path}:2: imei: 'bad'")
    assert problems[1].startswith(f"{path}:4: encoding: not UTF-8")
    assert len(problems) == 2


def test_a_plain_file_cut_short_mid_row_is_refused(tmp_path):
    path = write(tmp_path, BLACKLIST, f"imei,block_date,reasons\n{IMEI_A},20261101,")
    assert problems_of(path) == [
        f"{path}:2: row: the last line has no line end (file cut short?)"]


def test_a_list_with_only_its_header_is_empty_not_an_error(tmp_path):
    result = parse_path(write(tmp_path, BLACKLIST, lines("imei,block_date,reasons")))
    assert result.rows == 0 and len(result.imei) == 0


def test_lines_stay_right_after_rows_with_the_wrong_number_of_cells(tmp_path):
    path = write(tmp_path, BLACKLIST, lines(
        "imei,block_date,reasons", "1,2", f"{IMEI_A},20261101,a", "1,2,3,4", "bad,20261101,a"))
    assert problems_of(path) == [
        f"{path}:2: row: 2 cells, header has 3",
        f"{path}:4: row: 4 cells, header has 3",
        f"{path}:5: imei: 'bad' is not an IMEI (it must start with 14 digits)"]


def test_a_truncated_zip_is_refused(tmp_path):
    archive = zipped(write(tmp_path, BLACKLIST, lines(
        "imei,block_date,reasons", *[f"{35000000000000 + n},20261101,x" for n in range(2000)])))
    archive.write_bytes(archive.read_bytes()[:-200])
    [problem] = problems_of(archive)
    assert problem.startswith(f"{archive}: zip: corrupt or truncated archive")


def test_a_zip_with_corrupt_data_is_refused(tmp_path):
    archive = zipped(write(tmp_path, BLACKLIST, lines(
        "imei,block_date,reasons", *[f"{35000000000000 + n},20261101,x" for n in range(2000)])))
    data = bytearray(archive.read_bytes())
    data[len(data) // 3] ^= 0xFF
    archive.write_bytes(bytes(data))
    [problem] = problems_of(archive)
    assert problem.startswith(f"{archive}!{BLACKLIST}: zip: corrupt or truncated archive")


def test_line_numbers_count_physical_lines_across_quoted_newlines(tmp_path):
    path = write(tmp_path, BLACKLIST, lines(
        "imei,block_date,reasons", f'{IMEI_A},20261101,"two', 'lines"', "bad,20261101,x"))
    assert problems_of(path) == [f"{path}:4: imei: 'bad' is not an IMEI (it must start with "
                                 "14 digits)"]


def test_every_bad_field_of_every_row_is_reported_first_lines_first(tmp_path):
    rows = [f"{IMEI_A},20261101,ok"] * 100 + ["x,20261399,y"] * 300
    path = write(tmp_path, BLACKLIST, lines("imei,block_date,reasons", *rows))
    problems = problems_of(path)
    assert problems[0] == f"{path}:102: imei: 'x' is not an IMEI (it must start with 14 digits)"
    assert problems[1].startswith(f"{path}:102: block_date: ")
    assert problems[-1] == f"{path}: ... and 551 more problems in this file"


def test_a_bad_tac_is_named(tmp_path):
    path = write(tmp_path, "tacs.csv", lines("tac,manufacturer", "3512345,Apple"))
    assert problems_of(path) == [f"{path}:2: tac: '3512345' is not a TAC (8 digits)"]


def test_a_bad_change_type_is_named(tmp_path):
    path = write(tmp_path, "pairing.csv", lines("imei,imsi,change_type",
                                                f"{IMEI_A},510011234567890,update"))
    assert problems_of(path) == [f"{path}:2: change_type: 'update' is not one of add, remove"]


def test_an_unknown_header_is_refused(tmp_path):
    path = write(tmp_path, "whatever.csv", lines("serial,colour", "1,red"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:1: header: not a known list format")


def test_zip_bomb_member_is_refused_before_parsing(tmp_path):
    import zipfile

    from eir.lists.native import ListError
    from eir.lists.formats import parse_path

    path = tmp_path / "20261120_blacklist.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("20261120_blacklist.csv", "w", force_zip64=True) as member:
            member.write(b"imei,block_date,reasons\n")
            zeros = bytes(1 << 20)
            for _ in range(1100):  # 1.1 GiB of zeros, compressed about 1000:1
                member.write(zeros)
    with pytest.raises(ListError, match="refused as a possible zip bomb"):
        parse_path(path)


# --- cell limits: the same in every format ----------------------------------------------------

HUGE = 4 << 20  # the 4 MB reasons cell the sync once accepted


@pytest.mark.parametrize("name, header, row, field, limit", [
    (BLACKLIST, "imei,block_date,reasons", f"{IMEI_A},20261201,{{}}", "reasons", 1024),
    (NOTIFICATIONS, "imei,imsi,msisdn,block_date,reasons",
     f"{IMEI_A},001010123456789,6281100000001,20261201,{{}}", "reasons", 1024),
    (NOTIFICATIONS, "imei,imsi,msisdn,block_date,reasons",
     f"{IMEI_A},001010123456789,{{}},20261201,stolen", "msisdn", 64),
    (EXCEPTIONS, "imei,imsi,msisdn", f"{IMEI_A},001010123456789,{{}}", "msisdn", 64),
    ("stolen.csv", "imei,reporting_date,status,change_type", f"{IMEI_A},20261201,{{}},add",
     "status", 64),
    ("tac.csv", "tac,manufacturer,model_name", "35123456,{},Phone", "manufacturer", 1024),
    ("native.csv", "imei,status,imsi,reason", f"{IMEI_A},blacklist,,{{}}", "reason", 1024),
])
@pytest.mark.parametrize("size", ["limit", "huge"])
def test_a_cell_over_its_limit_is_refused_by_file_line_and_field(tmp_path, name, header, row,
                                                                  field, limit, size):
    length = limit + 1 if size == "limit" else HUGE
    path = write(tmp_path, name, lines(header, row.format("x" * length)))
    problems = problems_of(path)
    if name == "native.csv" and size == "huge":  # Python's csv stops at 128 KiB per cell
        assert problems == [f"{path}:2: row: field larger than field limit (131072)"]
        return
    [problem] = [p for p in problems if f": {field}: " in p]
    assert problem.endswith(f": {field}: {length} characters (at most {limit} in this "
                            "column)"), problem
    assert problem.startswith(f"{path}:2: ") and len(problem) < 300


@pytest.mark.parametrize("name, header, row", [
    (BLACKLIST, "imei,block_date,reasons", f"{IMEI_A},20261201,{{}}"),
    ("native.csv", "imei,status,imsi,reason", f"{IMEI_A},blacklist,,{{}}"),
])
def test_a_reason_of_exactly_the_limit_is_kept_whole(tmp_path, name, header, row):
    reason = "é" * 1024  # characters, not bytes
    entries = parse_path(write(tmp_path, name, lines(header, row.format(reason))))
    assert [a.reason for a in entries.attributes] == [reason]


def test_a_huge_imei_cell_is_named_by_its_length_not_echoed(tmp_path):
    path = write(tmp_path, BLACKLIST, lines("imei,block_date,reasons",
                                            f"{'3' * HUGE},20261201,stolen"))
    [problem] = problems_of(path)
    assert problem == (f"{path}:2: imei: a cell of {HUGE} characters has {HUGE} characters, "
                       "an IMEI has at most 16")
