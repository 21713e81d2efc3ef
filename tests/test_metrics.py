"""Prometheus metrics (eir.interfaces.metrics): a live `eir serve --metrics` scraped over HTTP after real
Diameter traffic, the lab dashboard's queries resolved against that scrape, list reloads and
syncs seen in the metrics, clone hits from the observations, and snapshots of several worker
processes merged."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
from datetime import date

import httpx
from helpers_ops import METRICS_LINE, endpoint, scrape, scrape_until, value, wait_until
from helpers_process import EXAMPLE_LIST, ROOT, eir_ok
from helpers_wire import (FLAG_REQUEST, ecr, open_peer, origin_avps, parse_answer,
                          read_message)
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from scapy.all import raw
from scapy.contrib.diameter import DiamG
from test_sbi import H2C_LINE, STATUS_PATH
from test_testbed_compose import TARGET_LABELS, promql_metrics_and_labels
from test_workers import worker_pids

from eir.interfaces.metrics import (LATENCY_BUCKETS, DiameterCounters, EirCollector, MetricsSnapshot,
                         QueuedLatency)
from eir.check.observations import ObservationLog
from eir.core.decision import day_number

ECR = "ME-Identity-Check"
DASHBOARD = ROOT / "testbed" / "grafana" / "dashboards" / "eir.json"


def exchange(sock, message: bytes):
    sock.sendall(message)
    return parse_answer(read_message(sock))


def dwr() -> bytes:
    return raw(DiamG(drFlags=FLAG_REQUEST, drCode=280, drAppId=0, drHbHId=90, drEtEId=90,
                     avpList=origin_avps()))


def metrics_server(eir_server, *args: str, **kwargs):
    server = eir_server("--metrics", "127.0.0.1:0", *args, **kwargs)
    return server, endpoint(server, METRICS_LINE)


def send_traffic(address) -> None:
    """CER, six ECRs of every outcome, an unknown command, a DWR; each answer checked."""
    sock = open_peer(address)
    try:
        cases = [("35209900176148", "001010000000001", 2001, 1),  # blacklisted IMEI
                 ("35332106470089", None, 2001, 2),  # greylisted
                 ("49015420323751", "001010123456789", 2001, 0),  # whitelisted pair
                 ("35000000000500", None, 2001, 0),  # whitelisted range
                 ("12345678901234", None, None, None),  # no rule: 5422
                 ("3520990017614X", None, 5004, None)]  # not an IMEI
        for number, (imei, imsi, code, status) in enumerate(cases, 10):
            answer = exchange(sock, ecr(imei, imsi, hop_by_hop=number, end_to_end=number,
                                        session_id=f"mme.test;1;{number}"))
            assert (answer.result_code, answer.equipment_status) == (code, status), imei
        assert exchange(sock, ecr(code=999, hop_by_hop=50, end_to_end=50)).result_code == 3001
        assert exchange(sock, dwr()).result_code == 2001
    finally:
        sock.close()


def test_requests_answers_latency_and_peers_of_a_live_server(eir_server):
    server, url = metrics_server(eir_server)
    before = scrape(url)
    assert value(before, "eir_requests_total", command=ECR) == 0
    assert value(before, "eir_peers", state="open") == 0

    sock = open_peer(server.address)
    try:
        samples = scrape(url)
        assert value(samples, "eir_peers", state="open") == 1
    finally:
        sock.close()
    wait_until(lambda: value(scrape(url), "eir_peers", state="open") == 0, "peer gone")

    send_traffic(server.address)
    samples = scrape(url)
    requests = {"Capabilities-Exchange": 2, ECR: 6, "other": 1, "Device-Watchdog": 1,
                "Disconnect-Peer": 0}
    for command, count in requests.items():
        assert value(samples, "eir_requests_total", command=command) == count, command
    answers = {("Capabilities-Exchange", "2001", "none"): 2,
               ("Device-Watchdog", "2001", "none"): 1,
               (ECR, "2001", "BLACKLISTED"): 1, (ECR, "2001", "GREYLISTED"): 1,
               (ECR, "2001", "WHITELISTED"): 2, (ECR, "5422", "UNKNOWN"): 1,
               (ECR, "5004", "none"): 1, ("other", "3001", "none"): 1}
    got = {tuple(dict(labels)[k] for k in ("command", "result_code", "equipment_status")):
           count for (name, labels), count in samples.items()
           if name == "eir_answers_total" and count}
    assert got == answers

    # Every request is in the histogram once, in buckets up to 1 s.
    total = sum(requests.values())
    assert value(samples, "eir_request_duration_seconds_count") == total
    assert value(samples, "eir_request_duration_seconds_bucket", le="+Inf") == total
    assert value(samples, "eir_request_duration_seconds_bucket", le="1.0") == total
    assert 0 < value(samples, "eir_request_duration_seconds_sum") < total
    bounds = sorted(float(dict(labels)["le"]) for name, labels in samples
                    if name == "eir_request_duration_seconds_bucket")
    assert bounds[:-1] == list(LATENCY_BUCKETS) and bounds[0] == 50e-6

    assert value(samples, "eir_list_entries", kind="imei") == 3
    assert value(samples, "eir_list_entries", kind="tacs") == 1
    version = [dict(labels)["version"] for name, labels in samples
               if name == "eir_list_version_info"]
    assert len(version) == 1 and len(version[0]) == 12
    assert 0 <= value(samples, "eir_list_age_seconds") < 3600
    assert sum(count for (name, _), count in samples.items()
               if name == "process_cpu_seconds_total") > 0
    assert server.stop() == 0


def start_time(pid: int) -> float:
    """A process's start (Unix time) from /proc, as the kernel states it."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    return float(fields[19]) / os.sysconf("SC_CLK_TCK") + boot


PROCESS_FAMILIES = ("process_cpu_seconds_total", "process_resident_memory_bytes",
                    "process_virtual_memory_bytes", "process_open_fds", "process_max_fds",
                    "process_start_time_seconds")


def test_process_metrics_cover_the_supervisor_and_every_worker(eir_server):
    """With workers, process_* has one series per process, labelled worker="supervisor",
    "0", "1", each that process's own (its start time is the one /proc gives its pid); the
    old code served the supervisor's alone, unlabelled."""
    server, url = metrics_server(eir_server, "--workers", "2")
    processes = {"supervisor": server.process.pid,
                 **{str(index): pid for index, pid in worker_pids(server).items()}}
    assert len(set(processes.values())) == 3
    samples = scrape(url)
    for label, pid in processes.items():
        for family in PROCESS_FAMILIES:
            assert value(samples, family, worker=label) > 0, (family, label)
        assert abs(value(samples, "process_start_time_seconds", worker=label) -
                   start_time(pid)) < 0.05, label
    unlabelled = [name for name, labels in samples
                  if name.startswith("process_") and "worker" not in dict(labels)]
    assert unlabelled == []
    assert server.stop() == 0


def test_a_flood_is_counted_whole_refusals_and_queued_requests_included(eir_server,
                                                                       tmp_path):
    """Under the overload limits (a small turn and queue), every request of a pipelined
    flood is counted once in eir_requests_total and in the latency histogram, answered or
    refused with 3004."""
    config = tmp_path / "eir.yaml"
    config.write_text("diameter:\n  overload:\n    requests_per_turn: 8\n"
                      "    max_queued_per_connection: 32\n")
    server, url = metrics_server(eir_server, "--config", str(config))
    flood = 400
    template = ecr("35209900176148", None)
    sock = open_peer(server.address)
    try:
        sock.sendall(template * flood)
        codes = [parse_answer(read_message(sock)).result_code for _ in range(flood)]
    finally:
        sock.close()
    refused = codes.count(3004)
    assert refused > 0 and codes.count(2001) == flood - refused
    samples = scrape(url)
    assert value(samples, "eir_requests_total", command=ECR) == flood
    assert value(samples, "eir_answers_total", command=ECR, result_code="3004",
                 equipment_status="none") == refused
    assert value(samples, "eir_answers_total", command=ECR, result_code="2001",
                 equipment_status="BLACKLISTED") == flood - refused
    assert value(samples, "eir_request_duration_seconds_count") == flood + 1  # and the CER


def test_queued_requests_are_timed_from_their_own_read():
    counters = DiameterCounters({324: ECR})
    latency = QueuedLatency(counters)
    # Read 1 at t=0: 10 requests, 4 answered at once, 6 queued (answered at t=0.001).
    latency.read(0.0, 0.001, handled=4, refused=0, backlog_growth=6, backlog=6)
    # Read 2 at t=0.004: 5 requests, 2 refused with 3004, 3 queued; 4 of read 1 answered.
    latency.read(0.004, 0.005, handled=6, refused=2, backlog_growth=-1, backlog=5)
    latency.served(0.030, served=5, backlog=0)  # read 1's last 2, read 2's 3
    assert latency.reads == collections.deque()
    assert sum(counters.latency_buckets) == 15
    expected_sum = 4 * 0.001 + 2 * 0.001 + 4 * 0.005 + 2 * 0.030 + 3 * 0.026
    assert abs(counters.latency_sum - expected_sum) < 1e-12


def test_observations_and_clone_hits(eir_server, tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text("observations:\n  flush_seconds: 0.1\n  clone_threshold: 1\n")
    server, url = metrics_server(eir_server, "--config", str(config))
    clone, single = "35209900176148", "35332106470089"
    sock = open_peer(server.address)
    try:
        for number, (imei, imsi) in enumerate([(clone, "001010000000001"),
                                               (clone, "001010000000002"),
                                               (single, "001010000000001")], 10):
            exchange(sock, ecr(imei, imsi, hop_by_hop=number, end_to_end=number))
        samples = scrape_until(
            url, lambda s: value(s, "eir_observations_written_total") == 3,
            "3 observations written")
        assert value(samples, "eir_clone_hits_total") == 1  # counted before `written` moved
        assert value(samples, "eir_observations_queued") == 0
        assert value(samples, "eir_observations_dropped_total") == 0
        # A third IMSI for the same IMEI the same day: the IMEI was already counted.
        exchange(sock, ecr(clone, "001010000000003", hop_by_hop=20, end_to_end=20))
        samples = scrape_until(
            url, lambda s: value(s, "eir_observations_written_total") == 4,
            "4th observation written")
        assert value(samples, "eir_clone_hits_total") == 1
    finally:
        sock.close()


def test_clone_hits_are_counted_once_per_imei_and_day_at_the_threshold(tmp_path):
    """The observation sink's clone detection on a real SQLite database."""
    log = ObservationLog(tmp_path / "observations.sqlite", clone_threshold=2)
    day, next_day = day_number(date(2026, 11, 20)), day_number(date(2026, 11, 21))
    imei, other = "35209900176148", "35332106470089"
    log.record(day, imei, "001010000000001")
    log.record(day, imei, "001010000000002")
    log.record(day, other, None)  # no IMSI: never a clone
    log.record(day, other, "001010000000001")
    assert log.flush() == 4 and log.clone_hits == 0  # 2 IMSIs are not more than 2
    log.record(day, imei, "001010000000003")
    log.record(day, imei, "001010000000001")  # seen already: still 3 distinct
    assert log.flush() == 2 and log.clone_hits == 1
    log.record(day, imei, "001010000000004")
    assert log.flush() == 1 and log.clone_hits == 1  # once per IMEI and day
    for number in range(1, 4):
        log.record(next_day, imei, f"00101000000000{number}")
    assert log.flush() == 3 and log.clone_hits == 2  # a new day counts again
    log.close()


def test_list_reloads_are_seen_in_the_metrics(eir_server, tmp_path):
    lists = tmp_path / "lists.csv"
    shutil.copy(EXAMPLE_LIST, lists)
    server, url = metrics_server(eir_server, lists=[lists])

    def version(samples) -> str:
        return next(dict(labels)["version"] for name, labels in samples
                    if name == "eir_list_version_info")

    first = scrape(url)
    with lists.open("a") as handle:
        handle.write("35999999000001,blacklist,,added\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"lists reloaded")
    second = scrape(url)
    assert version(second) != version(first)
    assert value(second, "eir_list_entries", kind="imei") == value(
        first, "eir_list_entries", kind="imei") + 1
    assert value(second, "eir_list_reloads_total", outcome="ok") == 1

    with lists.open("a") as handle:
        handle.write("not-an-imei,blacklist,,broken\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"list reload refused")
    third = scrape(url)
    assert value(third, "eir_list_reloads_total", outcome="refused") == 1
    assert version(third) == version(second)


def test_sync_outcomes_are_counted(eir_server, tmp_path):
    source = tmp_path / "drop"
    source.mkdir()
    (source / "lists.csv").write_text("imei,status,imsi,reason\n35209900176148,blacklist,,x\n")
    store = tmp_path / "store"
    eir_ok("sync", "--source", str(source), "--store", str(store))
    config = tmp_path / "eir.yaml"
    config.write_text(f"sync:\n  source: {source}\n  interval_seconds: 3600\n"
                      f"store:\n  directory: {store}\n")
    server, url = metrics_server(eir_server, "--config", str(config), lists=[])
    samples = scrape_until(
        url, lambda s: value(s, "eir_sync_total", outcome="up_to_date") == 1,
        "the start-up sync counted")
    assert value(samples, "eir_sync_total", outcome="published") == 0
    assert value(samples, "eir_sync_total", outcome="refused") == 0
    assert value(samples, "eir_sync_last_success_timestamp_seconds") > 0
    assert value(samples, "eir_list_entries", kind="imei") == 1


def exported_families() -> set[str]:
    """The metric names eir/interfaces/metrics.py exports, as a scrape shows them (counters with
    `_total`, info metrics with `_info`)."""
    source = (ROOT / "eir" / "interfaces" / "metrics.py").read_text(encoding="utf-8")
    suffix = {"Counter": "_total", "Gauge": "", "Info": "_info", "Histogram": ""}
    return {name + suffix[kind] for kind, name in
            re.findall(r'(Counter|Gauge|Info|Histogram)MetricFamily\(\s*"(eir_\w+)"', source)}


def test_every_exported_metric_is_in_the_production_table():
    families = exported_families()
    assert {"eir_sbi_requests_total", "eir_nrf_registered", "eir_answers_total"} <= families
    table = (ROOT / "docs" / "PRODUCTION.md").read_text(encoding="utf-8").split(
        "## Metrics", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `eir_")]
    documented = set(re.findall(r"`(eir_\w+)`", " ".join(row.split(" | ")[0] for row in rows)))
    assert families - documented == set()


def test_every_dashboard_query_resolves_against_a_live_scrape(eir_server, tmp_path):
    """Against an EIR that has synced from a registry drop and served N5g-eir too, so that
    every family the dashboard plots (sync age, 5G) is in the scrape."""
    source = tmp_path / "drop"
    source.mkdir()
    shutil.copy(EXAMPLE_LIST, source / "lists.csv")
    store = tmp_path / "store"
    eir_ok("sync", "--source", str(source), "--store", str(store))
    config = tmp_path / "eir.yaml"
    config.write_text(f"sync:\n  source: {source}\n  interval_seconds: 3600\n"
                      f"store:\n  directory: {store}\n")
    # Two workers, whatever the machine's cores: the process panels group by `worker`.
    server, url = metrics_server(eir_server, "--config", str(config), "--sbi", "127.0.0.1:0",
                                 "--workers", "2", lists=[])
    scrape_until(url, lambda s: value(s, "eir_sync_total", outcome="up_to_date") == 1,
                 "the start-up sync")
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        answer = client.get(endpoint(server, H2C_LINE) + STATUS_PATH,
                            params={"pei": "imeisv-3520990017614812"})
    assert answer.status_code == 200, answer.text
    send_traffic(server.address)
    samples = scrape(url)
    labels_of: dict[str, set[str]] = {}
    for name, labels in samples:
        labels_of.setdefault(name, set()).update(key for key, _ in labels)
    expressions = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
                   for target in panel.get("targets", [])]
    assert expressions
    for expression in expressions:
        metrics, labels = promql_metrics_and_labels(expression)
        assert metrics, expression
        for metric in metrics:
            assert metric in labels_of, f"{expression}: {metric} is not served"
        # Each label on some metric of the expression (a join's `by` groups what it kept),
        # or one that Prometheus adds.
        missing = labels - set().union(*(labels_of[metric] for metric in metrics)) \
            - TARGET_LABELS
        assert not missing, f"{expression}: {sorted(metrics)} have no label {missing}"


def _snapshot(**changes) -> MetricsSnapshot:
    snapshot = MetricsSnapshot(
        requests={ECR: 10, "Capabilities-Exchange": 1},
        answers={f"{ECR}|2001|BLACKLISTED": 4, f"{ECR}|5422|UNKNOWN": 6},
        latency_buckets=[5, 5] + [0] * (len(LATENCY_BUCKETS) - 1), latency_sum=0.001,
        peers={"wait-cer": 0, "open": 1, "closing": 0}, list_version="000001",
        list_entries={"imei": 3}, list_created=1000.0, taken=2000.0,
        sync={"published": 1, "up_to_date": 0, "refused": 0}, observations_written=7,
        clone_hits=1)
    for name, change in changes.items():
        setattr(snapshot, name, change)
    return snapshot


def test_snapshots_of_several_processes_merge_into_one_scrape():
    one = _snapshot()
    # A second worker: JSON round trip, as it would travel to the parent process.
    two = MetricsSnapshot.from_dict(json.loads(json.dumps(_snapshot(
        requests={ECR: 5}, answers={f"{ECR}|5422|UNKNOWN": 5}, list_version="000002",
        list_entries={"imei": 4}, taken=2001.0).as_dict())))
    merged = MetricsSnapshot.merge([one, two])
    assert merged.requests == {ECR: 15, "Capabilities-Exchange": 1}
    assert merged.answers == {f"{ECR}|2001|BLACKLISTED": 4, f"{ECR}|5422|UNKNOWN": 11}
    assert merged.latency_buckets[:2] == [10, 10] and merged.latency_sum == 0.002
    assert merged.peers["open"] == 2 and merged.sync["published"] == 2
    assert merged.observations_written == 14 and merged.clone_hits == 2
    assert (merged.list_version, merged.list_entries) == ("000002", {"imei": 4})  # newest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(EirCollector(lambda: merged))
    text = generate_latest(registry).decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert value(samples, "eir_requests_total", command=ECR) == 15
    assert value(samples, "eir_request_duration_seconds_count") == 20
    assert value(samples, "eir_request_duration_seconds_bucket", le="5e-05") == 10
    assert value(samples, "eir_peers", state="open") == 2
    assert value(samples, "eir_list_version_info", version="000002") == 1
    assert value(samples, "eir_list_age_seconds") == 1001.0
