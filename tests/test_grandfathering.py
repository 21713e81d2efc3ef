"""Grandfathering (whitelist mode): with unknown_policy blacklisted and a cut-off date, an
IMEI+IMSI pair observed before the cut-off is WHITELISTED (match "grandfathered"); another
IMSI in the same phone, a pair first seen after the cut-off, or a request without IMSI gets
the unknown policy; any list entry (a blacklisted IMEI) still wins. Through `eir check` and
through a real `eir serve`, which also learns new pairs from its own flushes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from eir.check.observations import ObservationLog
from helpers_process import EXAMPLE_LIST, ROOT
from helpers_wire import ecr, open_peer, parse_answer, read_message

STOLEN_IMEI = "35209900176148"  # blacklisted in config/lists/example.csv
OLD_PHONE = "35123400000017"  # on no list
NEW_PHONE = "35123400000025"  # on no list, first seen after the cut-off
OWNER_IMSI, OTHER_IMSI = "510100000000001", "510100000000002"
BEFORE, CUTOFF, AFTER = 20200401, "2020-04-18", 20200420


# -- helpers --------------------------------------------------------------------------------

def observed(database: Path, records: list[tuple[int, str, str]]) -> None:
    """Store (day, imei, imsi) observations as a server would have."""
    log = ObservationLog(database)
    for day, imei, imsi in records:
        log.record(day, imei, imsi)
    log.close()
    assert log.written == len(records)


def whitelist_mode_config(directory: Path, cutoff: str = CUTOFF, **observations) -> Path:
    path = directory / "eir.yaml"
    path.write_text(yaml.safe_dump({
        "lists": {"files": [str(EXAMPLE_LIST)], "unknown_policy": "blacklisted"},
        "observations": {"database": str(directory / "obs.sqlite"), **observations},
        "grandfathering": {"cutoff_date": cutoff}}), encoding="utf-8")
    return path


def seeded_config(directory: Path) -> Path:
    observed(directory / "obs.sqlite", [
        (BEFORE, OLD_PHONE, OWNER_IMSI), (BEFORE + 5, OLD_PHONE, OWNER_IMSI),
        (BEFORE, STOLEN_IMEI, OWNER_IMSI), (AFTER, NEW_PHONE, OWNER_IMSI)])
    return whitelist_mode_config(directory)


def check(config: Path, imei: str, imsi: str | None = None) -> dict:
    environment = dict(os.environ)
    environment.pop("EIR_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "eir", "check", imei, "--json", "--config", str(config)]
        + (["--imsi", imsi] if imsi else []),
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def equipment_status(address, imei: str, imsi: str) -> int | None:
    sock = open_peer(address)
    try:
        sock.sendall(ecr(imei, imsi))
        return parse_answer(read_message(sock)).equipment_status
    finally:
        sock.close()


# -- eir check ------------------------------------------------------------------------------

def test_pair_seen_before_the_cutoff_is_whitelisted_as_grandfathered(tmp_path):
    verdict = check(seeded_config(tmp_path), OLD_PHONE, OWNER_IMSI)
    assert (verdict["status"], verdict["match"], verdict["source"]) == (
        "WHITELISTED", "grandfathered", "observations")
    assert verdict["reason"] == ("IMEI with this IMSI was seen on the network on 2020-04-01, "
                                 "before the cut-off 2020-04-18")


def test_same_phone_with_another_imsi_gets_the_unknown_policy(tmp_path):
    verdict = check(seeded_config(tmp_path), OLD_PHONE, OTHER_IMSI)
    assert (verdict["status"], verdict["match"]) == ("BLACKLISTED", "unknown-policy")


def test_request_without_imsi_gets_the_unknown_policy(tmp_path):
    verdict = check(seeded_config(tmp_path), OLD_PHONE)
    assert (verdict["status"], verdict["match"]) == ("BLACKLISTED", "unknown-policy")


def test_pair_first_seen_after_the_cutoff_gets_the_unknown_policy(tmp_path):
    verdict = check(seeded_config(tmp_path), NEW_PHONE, OWNER_IMSI)
    assert (verdict["status"], verdict["match"]) == ("BLACKLISTED", "unknown-policy")


def test_blacklisted_imei_seen_before_the_cutoff_stays_blacklisted(tmp_path):
    verdict = check(seeded_config(tmp_path), STOLEN_IMEI, OWNER_IMSI)
    assert (verdict["status"], verdict["match"]) == ("BLACKLISTED", "imei")


def test_without_a_cutoff_observations_change_nothing(tmp_path):
    config = seeded_config(tmp_path)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["grandfathering"]["cutoff_date"] = None
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    verdict = check(config, OLD_PHONE, OWNER_IMSI)
    assert (verdict["status"], verdict["match"]) == ("BLACKLISTED", "unknown-policy")


# -- eir serve ------------------------------------------------------------------------------

def test_server_grandfathers_pairs_from_the_database(eir_server, tmp_path):
    server = eir_server("--config", str(seeded_config(tmp_path)), lists=[])
    server.wait_for_log(r"grandfathering: 2 IMEI\+IMSI pair\(s\) seen before the cut-off "
                        r"2020-04-18")
    assert equipment_status(server.address, OLD_PHONE, OWNER_IMSI) == 0
    assert equipment_status(server.address, OLD_PHONE, OTHER_IMSI) == 1
    assert equipment_status(server.address, STOLEN_IMEI, OWNER_IMSI) == 1


def test_server_learns_pairs_seen_before_a_future_cutoff(eir_server, tmp_path):
    """Cut-off in the future: a phone used today keeps working after it, as soon as its
    observation is flushed (no restart)."""
    config = whitelist_mode_config(tmp_path, cutoff="2999-01-01", flush_seconds=0.2)
    server = eir_server("--config", str(config), lists=[])
    server.wait_for_log(r"grandfathering: nothing observed yet|grandfathering: 0 IMEI")
    assert equipment_status(server.address, OLD_PHONE, OWNER_IMSI) == 1  # not yet known
    deadline = time.monotonic() + 10
    while equipment_status(server.address, OLD_PHONE, OWNER_IMSI) != 0:
        assert time.monotonic() < deadline, "the flushed pair was never grandfathered"
        time.sleep(0.05)  # polling interval of a bounded loop
    assert equipment_status(server.address, OLD_PHONE, OTHER_IMSI) == 1
