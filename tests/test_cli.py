"""The command line, run as a subprocess: `python3 -m eir --version` and `eir check`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import eir
from helpers_process import run_eir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LIST = "config/lists/example.csv"  # relative to ROOT, the subprocesses' directory


def source_of(row_start: str) -> str:
    """`file:line` of the example list's row starting with `row_start` (the list may gain
    comments; the test follows its rows)."""
    lines = (ROOT / EXAMPLE_LIST).read_text(encoding="utf-8").splitlines()
    [number] = [n for n, line in enumerate(lines, 1) if line.startswith(row_start)]
    return f"{EXAMPLE_LIST}:{number}"



def check(*args: str) -> subprocess.CompletedProcess:
    result = run_eir("check", *args, "--list", EXAMPLE_LIST)
    assert result.returncode == 0, result.stderr
    return result


def test_version():
    result = run_eir("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"open EIR {eir.__version__}"


# One case per kind of verdict, from config/lists/example.csv.
CASES = [
    pytest.param(["35209900176148"], "BLACKLISTED", "reported stolen (ticket 1042)",
                 source_of("35209900176148,"), id="blacklisted-imei"),
    pytest.param(["352099001761481"], "BLACKLISTED", "reported stolen",
                 source_of("35209900176148,"), id="15-digit-imei"),
    pytest.param(["3520990017614812"], "BLACKLISTED", "reported stolen",
                 source_of("35209900176148,"), id="16-digit-imeisv"),
    pytest.param(["35332106470089"], "GREYLISTED", "suspected clone",
                 source_of("35332106470089,"), id="greylisted-imei"),
    pytest.param(["49015420323751", "--imsi", "001010123456789"], "WHITELISTED",
                 "individually registered import", source_of("49015420323751,whitelist"),
                 id="imei-imsi-pair"),
    pytest.param(["49015420323751", "--imsi", "001010000000001"], "BLACKLISTED",
                 "unregistered import", source_of("49015420323751,blacklist"),
                 id="pair-other-imsi"),
    pytest.param(["35000000004242"], "WHITELISTED", "lab test handsets",
                 source_of("35000000000000-"), id="range"),
    pytest.param(["86000000123456"], "BLACKLISTED", "counterfeit model", source_of("86000000,"),
                 id="tac"),
    pytest.param(["01234567890123"], "UNKNOWN", "unknown policy", "policy", id="unknown"),
]


@pytest.mark.parametrize("args, status, reason, source", CASES)
def test_check_prints_status_reason_and_source(args, status, reason, source):
    lines = check(*args).stdout.splitlines()
    assert lines[0] == status
    assert lines[1].startswith("reason: ") and reason in lines[1]
    assert lines[2].startswith(f"source: {source} ")


@pytest.mark.parametrize("args, status, reason, source", CASES[:1] + CASES[-1:])
def test_check_json(args, status, reason, source):
    result = json.loads(check(*args, "--json").stdout)
    assert result["imei"] == args[0][:14]
    assert (result["status"], result["source"]) == (status, source)
    assert reason in result["reason"]
    assert result["match"] in {"imei", "unknown-policy"}
    assert result["list_version"]


def test_check_unknown_policy_flag():
    result = json.loads(check("01234567890123", "--unknown", "greylisted", "--json").stdout)
    assert (result["status"], result["match"]) == ("GREYLISTED", "unknown-policy")


def test_check_uses_config_eir_yaml_by_default():
    result = run_eir("check", "35209900176148")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].startswith(f"source: {source_of('35209900176148,')} ")


@pytest.mark.parametrize("imei, detail", [
    ("35209900l76148", "not all digits"),
    ("3520990017614", "13 digits"),
])
def test_check_bad_imei_exits_2_with_a_clear_message(imei, detail):
    result = run_eir("check", imei, "--list", EXAMPLE_LIST)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("eir: IMEI: ") and detail in result.stderr


def test_check_bad_imsi_exits_2():
    result = run_eir("check", "35209900176148", "--imsi", "abc", "--list", EXAMPLE_LIST)
    assert result.returncode == 2
    assert "IMSI" in result.stderr


def test_check_bad_list_exits_2_naming_file_line_and_field(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("imei,status\n35209900176148,blacklist\n35209900176149,stolen\n",
                    encoding="utf-8")
    result = run_eir("check", "35209900176148", "--list", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{path}:3: status: 'stolen'" in result.stderr


def test_check_missing_list_exits_2_naming_the_file(tmp_path):
    result = run_eir("check", "35209900176148", "--list", str(tmp_path / "absent.csv"))
    assert result.returncode == 2
    assert str(tmp_path / "absent.csv") in result.stderr


def test_check_bad_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text("diameter:\n  watchdog_seconds: -1\n", encoding="utf-8")
    result = run_eir("check", "35209900176148", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:2: diameter.watchdog_seconds:" in result.stderr


def test_serve_bad_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text("lists:\n  unknown_policy: maybe\n", encoding="utf-8")
    result = run_eir("serve", "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert f"{config}:2: lists.unknown_policy:" in result.stderr


def test_usage_errors_exit_2():
    assert run_eir().returncode == 2
    assert run_eir("check").returncode == 2
    assert run_eir("serve", "--listen", "nowhere").returncode == 2
