"""The native CSV list format: parsing, normalisation, and `file:line: field: problem` errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from eir.core.decision import EquipmentStatus, Match, UnknownPolicy
from eir.lists.native import ListError, load_rule_set, read_native_csv

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LIST = ROOT / "config" / "lists" / "example.csv"
HEADER = "imei,status,imsi,reason\n"
GOOD_ROW = "35209900176148,blacklist,,stolen\n"


def write_list(tmp_path: Path, text: str | bytes, name: str = "list.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ListError) as caught:
        read_native_csv(path)
    return caught.value.problems


# -- good files ----------------------------------------------------------------------------

def test_example_list_loads():
    rules = read_native_csv(EXAMPLE_LIST)
    assert len(rules) == 6
    assert all(rule.source.startswith(f"{EXAMPLE_LIST}:") for rule in rules)


def test_row_fields_become_a_rule(tmp_path):
    path = write_list(tmp_path, HEADER + "35209900176148,greylist,001010123456789,clone?\n")
    [rule] = read_native_csv(path)
    assert (rule.imei, rule.status, rule.imsi, rule.reason, rule.source) == (
        "35209900176148", EquipmentStatus.GREYLISTED, "001010123456789", "clone?",
        f"{path}:2")


@pytest.mark.parametrize("cell", ["35209900176148", "352099001761481", "3520990017614800"])
def test_14_15_and_16_digit_imeis_normalise_to_14(tmp_path, cell):
    [rule] = read_native_csv(write_list(tmp_path, f"{HEADER}{cell},blacklist,,\n"))
    assert rule.imei == "35209900176148"


def test_range_with_15_and_16_digit_ends_normalises_both(tmp_path):
    path = write_list(tmp_path, HEADER + "350000000000001-3500000000999912,whitelist,,\n")
    [rule] = read_native_csv(path)
    assert rule.imei_range == (35000000000000, 35000000009999)


def test_eight_digits_is_a_tac(tmp_path):
    [rule] = read_native_csv(write_list(tmp_path, HEADER + "86000000,blacklist,,\n"))
    assert (rule.tac, rule.imei, rule.imei_range) == ("86000000", None, None)


@pytest.mark.parametrize("status, expected", [
    ("whitelist", EquipmentStatus.WHITELISTED), ("blacklist", EquipmentStatus.BLACKLISTED),
    ("greylist", EquipmentStatus.GREYLISTED), (" Blacklist ", EquipmentStatus.BLACKLISTED),
])
def test_statuses(tmp_path, status, expected):
    [rule] = read_native_csv(write_list(tmp_path, f"{HEADER}35209900176148,{status},,\n"))
    assert rule.status is expected


def test_comments_and_blank_lines_are_skipped_and_lines_still_counted(tmp_path):
    path = write_list(tmp_path, "# a list\n\nimei,status\n# one, with a comma\n   \n"
                                "35209900176148,blacklist\n  # indented comment\n"
                                "86000000,greylist\n")
    rules = read_native_csv(path)
    assert [rule.source for rule in rules] == [f"{path}:6", f"{path}:8"]


def test_imsi_and_reason_columns_are_optional(tmp_path):
    [rule] = read_native_csv(write_list(tmp_path, "imei,status\n35209900176148,whitelist\n"))
    assert (rule.imsi, rule.reason, rule.status) == (None, "", EquipmentStatus.WHITELISTED)


def test_columns_may_come_in_any_order(tmp_path):
    path = write_list(tmp_path, "reason,imsi,status,imei\nlab,001010123456789,greylist,"
                                "35209900176148\n")
    [rule] = read_native_csv(path)
    assert (rule.imei, rule.imsi, rule.status, rule.reason) == (
        "35209900176148", "001010123456789", EquipmentStatus.GREYLISTED, "lab")


def test_short_row_leaves_optional_cells_empty(tmp_path):
    [rule] = read_native_csv(write_list(tmp_path, HEADER + "35209900176148,blacklist\n"))
    assert (rule.imsi, rule.reason) == (None, "")


def test_reason_may_hold_quoted_commas(tmp_path):
    path = write_list(tmp_path, HEADER + '35209900176148,blacklist,,"stolen, ticket 12"\n')
    assert read_native_csv(path)[0].reason == "stolen, ticket 12"


# -- bad rows: file:line: field: problem ---------------------------------------------------

@pytest.mark.parametrize("row, field, detail", [
    ("3520990017614a,blacklist,,", "imei", "not all digits"),
    ("3520990017614,blacklist,,", "imei", "13 digits"),
    ("35209900176148123,blacklist,,", "imei", "17 digits"),
    ("8600000,blacklist,,", "imei", "7 digits"),
    (",blacklist,,", "imei", ""),
    ("35000000009999-35000000000000,whitelist,,", "imei", "ends before it starts"),
    ("35000000000000-3500000000999x,whitelist,,", "imei", "not all digits"),
    ("35000000000000-,whitelist,,", "imei", "range"),
    ("35209900176148,stolen,,", "status", "'stolen'"),
    ("35209900176148,,,", "status", "''"),
    ("35209900176148,blacklist,0010101234x,", "imsi", "not an IMSI"),
    ("35209900176148,blacklist,1234,", "imsi", "not an IMSI"),
    ("35209900176148,blacklist,0010101234567890,", "imsi", "not an IMSI"),
    ("35209900176148,blacklist,,why,extra", "row", "5 cells, header has 4"),
])
def test_bad_row_is_reported_as_file_line_field_problem(tmp_path, row, field, detail):
    path = write_list(tmp_path, HEADER + GOOD_ROW + "# comment\n" + row + "\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:4: {field}: ")
    assert detail in problem


def test_every_bad_field_of_every_row_is_reported(tmp_path):
    path = write_list(tmp_path, HEADER + "x,y,z,\n" + GOOD_ROW + "35209900176148,nope,,\n")
    assert [p.split(": ")[1] for p in problems(path)] == ["imei", "status", "imsi", "status"]
    assert [p.split(": ")[0] for p in problems(path)] == [f"{path}:2"] * 3 + [f"{path}:4"]


@pytest.mark.parametrize("header, detail", [
    ("imei,reason", "missing column(s) status"),
    ("status,imsi", "missing column(s) imei"),
    ("imei,status,colour", "unknown column(s) colour"),
    ("35209900176148,blacklist,,", "missing column(s) imei, status"),
])
def test_bad_header_is_reported_with_its_line(tmp_path, header, detail):
    path = write_list(tmp_path, f"# header next\n{header}\n{GOOD_ROW}")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:2: header: ")
    assert detail in problem


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file_is_refused(tmp_path, text):
    path = write_list(tmp_path, text)
    [problem] = problems(path)
    assert problem.startswith(f"{path}:1: header: ") and "empty" in problem


def test_header_only_file_is_an_empty_list(tmp_path):
    assert read_native_csv(write_list(tmp_path, HEADER)) == []


def test_non_utf8_file_is_refused_naming_the_file(tmp_path):
    latin1_row = b"35332106470089,greylist,,caf\xe9\n"
    path = write_list(tmp_path, (HEADER + GOOD_ROW).encode() + latin1_row)
    [problem] = problems(path)
    assert problem.startswith(f"{path}") and "UTF-8" in problem


def test_missing_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "absent.csv"
    [problem] = problems(path)
    assert problem.startswith(f"{path}: ") and "No such file" in problem


def test_many_problems_are_all_kept_and_the_message_is_capped(tmp_path):
    path = write_list(tmp_path, HEADER + "x,blacklist,,\n" * 120)
    with pytest.raises(ListError) as caught:
        read_native_csv(path)
    assert len(caught.value.problems) == 120
    assert "and 70 more problems" in str(caught.value)


# -- a bad file is refused whole ------------------------------------------------------------

def test_a_file_with_one_bad_row_is_refused_whole(tmp_path):
    path = write_list(tmp_path, HEADER + GOOD_ROW * 3 + "x,blacklist,,\n" + GOOD_ROW)
    with pytest.raises(ListError) as caught:
        load_rule_set([path], UnknownPolicy.UNKNOWN)
    assert caught.value.problems == [
        f"{path}:5: imei: 'x' is not all digits (expected an IMEI, an 8-digit TAC or START-END)"]


def test_one_bad_file_refuses_all_files(tmp_path):
    good = write_list(tmp_path, HEADER + GOOD_ROW, "good.csv")
    bad = write_list(tmp_path, HEADER + "35209900176148,maybe,,\n", "bad.csv")
    with pytest.raises(ListError) as caught:
        load_rule_set([good, bad], UnknownPolicy.UNKNOWN)
    assert [p.split(":")[0] for p in caught.value.problems] == [str(bad)]


def test_problems_of_several_files_are_all_reported(tmp_path):
    first = write_list(tmp_path, HEADER + "1,blacklist,,\n", "first.csv")
    second = write_list(tmp_path, HEADER + "2,blacklist,,\n", "second.csv")
    with pytest.raises(ListError) as caught:
        load_rule_set([first, second], UnknownPolicy.UNKNOWN)
    assert [p.split(":")[0] for p in caught.value.problems] == [str(first), str(second)]


def test_good_files_load_into_one_rule_set_with_a_content_version(tmp_path):
    first = write_list(tmp_path, HEADER + GOOD_ROW, "first.csv")
    second = write_list(tmp_path, HEADER + "86000000,greylist,,\n", "second.csv")
    rule_set = load_rule_set([first, second], UnknownPolicy.WHITELISTED)
    assert rule_set.rule_count == 2
    assert rule_set.decide("35209900176148").status is EquipmentStatus.BLACKLISTED
    assert rule_set.decide("86000000000001").match is Match.TAC
    assert rule_set.decide("11111111111111").status is EquipmentStatus.WHITELISTED
    again = load_rule_set([first, second], UnknownPolicy.WHITELISTED)
    assert again.version == rule_set.version
    second.write_text(HEADER + "86000000,blacklist,,\n", encoding="utf-8")
    assert load_rule_set([first, second], UnknownPolicy.WHITELISTED).version != rule_set.version


def test_a_row_the_csv_reader_cannot_read_names_its_line(tmp_path):
    # a cell beyond the csv module's field size limit (131,072 characters)
    path = write_list(tmp_path, f"{HEADER}# comment\n{GOOD_ROW}35209900176149,blacklist,,"
                                f"{'x' * 200_000}\n")
    assert problems(path) == [f"{path}:4: row: field larger than field limit (131072)"]
