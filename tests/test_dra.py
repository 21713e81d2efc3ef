"""Two EIR nodes behind a real Diameter routing agent.

Debian's freeDiameterd runs the lab's DRA configuration, testbed/dra/freediameter.conf (moved
to loopback: ListenOn, its Port, the EIR nodes' ConnectTo and Port, the paths of its extension
configs), with its routing extensions rt_default, rt_load_balance and rt_busypeers, between
mme_sim (testbed/mme-sim, freeDiameter as the MME) and two `eir serve` nodes with the DRA's
identities for them (eir-a.localdomain, eir-b.localdomain). Every answer the MME logs is
checked against the verdict the decision engine gives for its row (tests/test_mme_sim.py),
so a request lost, answered twice, mixed up or answered wrongly after a failover fails here.

What is shown: ECRs are spread over both nodes; a node killed (-9) with requests pending on
it has them failed over by the DRA with the T flag (RFC 6733 §5.5.4) to the other node, which
answers them as it answers a fresh request; the killed node restarts and the DRA uses it
again; a node answering 3004 TOO_BUSY has its work moved to the other by rt_busypeers, with no
error reaching the MME; both nodes record their checks in one PostgreSQL database, once per
distinct check. docs/SCALE-OUT.md has the figures.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from eir.core.imei import normalise_imei
from helpers_ops import wait_until
from helpers_process import ROOT, LoggedProcess
from test_freediameter import free_port
from test_mme_sim import (CONNECT_TIMEOUT, TERMINALS, MmeSim, check_every_answer,
                          expected_answers, extension, lists, terminals)  # noqa: F401
from test_observations_postgres import (database_url, postgres, stored_rows,  # noqa: F401
                                        today_number)
from test_testbed_compose import parse_freediameter

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(shutil.which("freeDiameterd") is None,
                       reason="freeDiameterd is not installed (Debian package freediameterd)"),
]

DRA_DIRECTORY = ROOT / "testbed" / "dra"
DRA_CONFIG = DRA_DIRECTORY / "freediameter.conf"
CONTAINER_DIRECTORY = "/etc/dra/"  # where the dra service mounts testbed/dra
NODE_A, NODE_B = sorted(parse_freediameter(DRA_CONFIG).peers)  # eir-a, eir-b .localdomain
# A node with room for one request at a time: a burst through the DRA makes it answer 3004.
TINY_QUEUES = {"requests_per_turn": 1, "max_queued_per_connection": 1, "max_queued_total": 1}
# The hung-node test waits for the DRA's watchdog (~2 x TwTimer, 10-14 s): run it with
# EIR_DRA_WATCHDOG=1 (docs/SCALE-OUT.md has its figures).
WATCHDOG_TEST = os.environ.get("EIR_DRA_WATCHDOG") == "1"
DRA_TW = int(parse_freediameter(DRA_CONFIG).value("TwTimer"))


def opened(identity: str) -> str:
    """The DRA's log line for `identity` reaching STATE_OPEN (first time, or again)."""
    return rf"-> 'STATE_OPEN'\t'{re.escape(identity)}'"


def loopback_dra_conf(node_ports: dict[str, int], port: int) -> str:
    """testbed/dra/freediameter.conf as the lab has it, moved to loopback: ListenOn 127.0.0.1
    on `port`, each EIR node's ConnectPeer to 127.0.0.1 at its port, the extension configs
    read from testbed/dra rather than the container's /etc/dra."""
    lines = []
    for line in DRA_CONFIG.read_text().splitlines():
        statement = line.split("#", 1)[0].strip()
        if statement.startswith("ListenOn"):
            line = 'ListenOn = "127.0.0.1";'
        elif statement.startswith("Port ="):
            line = f"Port = {port};"
        elif statement.startswith("ConnectPeer"):
            name = re.match(r'ConnectPeer = "([^"]+)"', statement).group(1)
            line = re.sub(r'ConnectTo = "[^"]*"', 'ConnectTo = "127.0.0.1"', statement)
            line = re.sub(r"Port = \d+", f"Port = {node_ports[name]}", line)
        lines.append(line.replace(CONTAINER_DIRECTORY, f"{DRA_DIRECTORY}/"))
    return "\n".join(lines) + "\n"


class Dra(LoggedProcess):
    """freeDiameterd running the lab's DRA configuration; -dd logs every message it relays,
    with its flags (`f:RP-T`: a request retransmitted after a failover)."""

    def __init__(self, directory: Path, node_ports: dict[str, int], verbose: bool = False):
        self.port = free_port()
        config = directory / "dra.conf"
        config.write_text(loopback_dra_conf(node_ports, self.port))
        process = subprocess.Popen(
            ["freeDiameterd", *(["-dd"] if verbose else []), "-c", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace")
        super().__init__(process, process.stdout, "freeDiameterd (DRA)")

    def wait_for(self, pattern: str, start: int = 0, timeout: float = CONNECT_TIMEOUT) -> int:
        return self.wait_for_line(pattern, start, timeout)[0]


class Node:
    """One `eir serve` behind the DRA, on a fixed port (so that it can restart there), one
    worker process (SIGSTOP stops what answers), with its Prometheus metrics."""

    def __init__(self, eir_server, identity: str, config: Path, lists: Path):
        self.identity, self.port, self.metrics_port = identity, free_port(), free_port()
        self._start = lambda: eir_server(
            "--config", str(config), "--origin-host", identity, "--unknown", "unknown",
            "--workers", "1",
            "--listen", f"127.0.0.1:{self.port}", "--metrics", f"127.0.0.1:{self.metrics_port}",
            lists=[lists])
        self.server = self._start()

    def restart(self) -> None:
        self.server = self._start()

    def answers(self) -> dict[str, float]:
        """Its ECR answers so far by Result-Code (2001 counts every Equipment-Status)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as response:
            text = response.read().decode()
        counts: dict[str, float] = {}
        for code, value in re.findall(r'^eir_answers_total\{command="ME-Identity-Check",'
                                      r'equipment_status="\w+",result_code="(\d+)"\} (\S+)$',
                                      text, re.MULTILINE):
            counts[code] = counts.get(code, 0.0) + float(value)
        return counts


def answered(node: Node) -> float:
    return sum(node.answers().values())


@pytest.fixture
def dra_lab(eir_server, tmp_path, lists):
    """Factory: two EIR nodes (node X with `settings[X]` as its config file, if given) and
    the DRA in front of them, both nodes open at the DRA."""
    started: list[Dra] = []

    def start(verbose: bool = False, settings: dict | None = None):
        nodes = {}
        for identity in (NODE_A, NODE_B):
            config = tmp_path / f"{identity}.yaml"
            config.write_text(yaml.safe_dump((settings or {}).get(identity) or {
                "logging": {"level": "info"}}))
            nodes[identity] = Node(eir_server, identity, config, lists)
        dra = Dra(tmp_path, {identity: node.port for identity, node in nodes.items()},
                  verbose)
        started.append(dra)
        for identity in nodes:
            dra.wait_for(opened(identity))
        return dra, nodes[NODE_A], nodes[NODE_B]

    yield start
    for dra in started:
        dra.kill()


def run_mme(tmp_path, extension, dra: Dra, name: str, **settings) -> MmeSim:  # noqa: F811
    """mme_sim connected to the DRA only, sending to realm localdomain with no
    Destination-Host (which node answers is the DRA's choice)."""
    directory = tmp_path / name
    directory.mkdir()
    settings.setdefault("answer_timeout_ms", 5000)
    return MmeSim(directory, extension, dra.port, peer="dra.localdomain",
                  destination_realm="localdomain", **settings)


def finish(sim: MmeSim, timeout: float):
    try:
        return sim.finish(timeout)
    finally:
        sim.kill()


def distinct_checks(lists: Path) -> set[tuple]:
    """The observation rows the TERMINALS rows make today, each distinct check once: (day,
    IMEI, IMSI, MSISDN), malformed IMEIs (5004) left out."""
    day = today_number()
    return {(day, normalise_imei(imei), imsi, "")
            for (imei, imsi, _), want in zip(TERMINALS, expected_answers(lists))
            if want.result_code != "5004"}

def established_receive_queue(port: int) -> int:
    """Bytes waiting in the receive queues of the established TCP connections to local
    `port` (/proc/net/tcp): what a stopped node has been sent and not read."""
    waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            waiting += int(fields[4].split(":")[1], 16)
    return waiting


def test_ecrs_through_the_dra_are_spread_over_both_nodes_and_each_answered_right(
        dra_lab, tmp_path, extension, lists, terminals, capsys):  # noqa: F811
    dra, node_a, node_b = dra_lab()
    count = 100 * len(TERMINALS)
    sim = run_mme(tmp_path, extension, dra, "spread", csv=terminals, count=count, rate=0)
    records, summary = finish(sim, CONNECT_TIMEOUT + 30)

    check_every_answer(records, summary, terminals, expected_answers(lists), count)
    share_a, share_b = answered(node_a), answered(node_b)
    assert share_a + share_b == count
    # rt_load_balance gives each request to the node with fewer pending: both work.
    assert min(share_a, share_b) >= 0.2 * count, (share_a, share_b)
    assert not re.search(r"\bERROR\b", dra.log()), dra.log()
    with capsys.disabled():
        print(f"\nthrough the DRA: {count} ECRs flat out, {summary['rate_per_s']} ECR/s, "
              f"{share_a:.0f} to {NODE_A}, {share_b:.0f} to {NODE_B}, latency avg "
              f"{summary['latency_us_avg']} us, max {summary['latency_us_max']} us")


def test_node_killed_under_load_fails_over_with_t_flag_and_rejoins_after_restart(
        dra_lab, tmp_path, extension, lists, terminals, capsys):  # noqa: F811
    """Node A is stopped (SIGSTOP) under load until the DRA has sent it requests it will
    never answer, then killed (-9): the DRA sees the connection reset, sends the pending
    requests again with the T flag to node B, and the MME gets every answer right. Node A
    restarts, the DRA reconnects it and gives it work again."""
    dra, node_a, node_b = dra_lab(verbose=True)
    count, rate = 2000, 1000
    sim = run_mme(tmp_path, extension, dra, "failover", csv=terminals, count=count, rate=rate)
    wait_until(lambda: answered(node_a) >= 100, f"{NODE_A} answered 100", CONNECT_TIMEOUT)
    node_a.server.process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: established_receive_queue(node_a.port) > 0,
               f"requests waiting unread at {NODE_A}", 5, interval=0.005)
    node_a.server.process.kill()
    node_a.server.process.wait(5)
    killed = time.monotonic()
    records, summary = finish(sim, CONNECT_TIMEOUT + 30)

    # Every request answered, and answered right: those failed over included.
    check_every_answer(records, summary, terminals, expected_answers(lists), count)
    log = dra.log()
    failed_over = re.findall(rf"Failing over message sent to '{re.escape(NODE_A)}': "
                             r"[^\n]*16777252/324 f:RP-T ", log)
    resent = re.findall(rf"SENT to '{re.escape(NODE_B)}': [^\n]*16777252/324 f:RP-T ", log)
    assert failed_over and len(resent) == len(failed_over), log[-5000:]
    # The in-flight window: the requests the DRA failed over waited from when they went to
    # node A (after it stopped) until node B answered them after the kill.
    held = killed - stopped
    latencies = sorted(int(record["latency_us"]) / 1e6 for record in records)
    assert latencies[-1] < held + 1.0, (held, latencies[-5:])

    node_a.restart()
    index = dra.wait_for(rf"'STATE_OPEN'\t-> 'STATE_CLOSED'\t'{re.escape(NODE_A)}'")
    dra.wait_for(opened(NODE_A), index, timeout=30)  # TcTimer 4 s, and its jitter
    again = run_mme(tmp_path, extension, dra, "rejoined", csv=terminals,
                    count=20 * len(TERMINALS), rate=0)
    records, summary = finish(again, CONNECT_TIMEOUT + 30)
    check_every_answer(records, summary, terminals, expected_answers(lists),
                       20 * len(TERMINALS))
    assert answered(node_a) > 0  # the restarted node (fresh counters) is used again
    with capsys.disabled():
        print(f"\nkill -9 under {rate} ECR/s: {len(failed_over)} request(s) failed over with "
              f"the T flag; node held {held * 1000:.0f} ms; slowest answer "
              f"{latencies[-1] * 1000:.0f} ms, next {latencies[-2] * 1000:.0f} ms")


def test_overloaded_node_answers_3004_and_rt_busypeers_sends_the_work_to_the_other(
        dra_lab, tmp_path, extension, lists, terminals, capsys):  # noqa: F811
    tiny = {"diameter": {"overload": TINY_QUEUES}}
    dra, node_a, node_b = dra_lab(settings={NODE_A: tiny})
    count = 100 * len(TERMINALS)
    sim = run_mme(tmp_path, extension, dra, "busy", csv=terminals, count=count, rate=0)
    records, summary = finish(sim, CONNECT_TIMEOUT + 30)

    # No 3004 reached the MME (it would fail check_every_answer: not a verdict, not 5004).
    check_every_answer(records, summary, terminals, expected_answers(lists), count)
    busy, calm = node_a.answers(), node_b.answers()
    assert busy.get("3004", 0) > 0, busy
    assert "3004" not in calm or calm["3004"] == 0, calm
    # Every request got one real answer: node A's 3004s were all answered again by node B.
    assert sum(busy.values()) - busy["3004"] + sum(calm.values()) == count
    assert not re.search(r"\bERROR\b", dra.log()), dra.log()
    with capsys.disabled():
        print(f"\n{NODE_A} with queues of 1: answered 3004 {busy['3004']:.0f} times, all "
              f"re-sent to {NODE_B} by rt_busypeers; {count} ECRs at "
              f"{summary['rate_per_s']} ECR/s, latency max {summary['latency_us_max']} us")


def test_both_nodes_record_each_check_once_in_one_postgres(
        dra_lab, tmp_path, extension, lists, terminals, database_url):  # noqa: F811
    """Both nodes answer (node A is overloaded, so the DRA moves part of its work to B);
    each distinct (day, IMEI, IMSI) checked is one row, whichever nodes saw it."""
    shared = {"observations": {"url": database_url, "flush_seconds": 0.2}}
    busy = {"observations": shared["observations"],
            "diameter": {"overload": TINY_QUEUES}}
    dra, node_a, node_b = dra_lab(settings={NODE_A: busy, NODE_B: shared})
    count = 20 * len(TERMINALS)
    sim = run_mme(tmp_path, extension, dra, "observed", csv=terminals, count=count, rate=0)
    records, summary = finish(sim, CONNECT_TIMEOUT + 30)
    check_every_answer(records, summary, terminals, expected_answers(lists), count)
    assert node_a.answers().get("2001", 0) > 0 and node_b.answers().get("2001", 0) > 0

    for node in (node_a, node_b):  # SIGTERM: each node flushes what it holds, then exits
        assert node.server.stop(signal.SIGTERM) == 0
    rows = stored_rows(database_url)
    assert sorted(rows) == sorted(distinct_checks(lists))


def test_dra_restarted_reconnects_to_nodes_that_refuse_a_second_connection(
        dra_lab, tmp_path, extension, lists, terminals):  # noqa: F811
    """diameter.duplicate_peers: refuse on both nodes. The DRA opens one connection per
    node, so it is accepted; a DRA killed (-9) and started again (a new process, the same
    identity) is accepted again, since its old connections died with it (RST), and ECRs
    flow through the new one."""
    refuse = {"diameter": {"duplicate_peers": "refuse"}}
    dra, node_a, node_b = dra_lab(settings={NODE_A: refuse, NODE_B: refuse})
    dra.process.kill()
    dra.process.wait(5)
    for node in (node_a, node_b):
        node.server.wait_for_log(r"dra\.localdomain: peer closed the connection")
    (tmp_path / "again").mkdir()
    again = Dra(tmp_path / "again", {NODE_A: node_a.port, NODE_B: node_b.port})
    try:
        for identity in (NODE_A, NODE_B):
            again.wait_for(opened(identity))
        count = 10 * len(TERMINALS)
        sim = run_mme(tmp_path, extension, again, "after-restart", csv=terminals,
                      count=count, rate=0)
        records, summary = finish(sim, CONNECT_TIMEOUT + 30)
    finally:
        again.kill()
    check_every_answer(records, summary, terminals, expected_answers(lists), count)
    for node in (node_a, node_b):
        assert "CER refused" not in node.server.log(), node.server.log()


@pytest.mark.skipif(not WATCHDOG_TEST, reason="waits ~15 s for the DRA's watchdog: "
                    "EIR_DRA_WATCHDOG=1 runs it")
def test_hung_node_is_found_by_the_watchdog_and_its_requests_fail_over(
        dra_lab, tmp_path, extension, lists, terminals, database_url, capsys):  # noqa: F811
    """Node A stops answering without closing its connection (SIGSTOP): nothing tells the
    DRA but its watchdog. After Tw without a message it sends a DWR, after another Tw without
    the DWA the node is SUSPECT and its pending requests go to node B with the T flag. The
    MME waits longer than that (answer_timeout 20 s), so it sees every answer, late, once.
    Node A then resumes and answers the requests it held too (the DRA drops those answers):
    both nodes handled them, and the shared observations database still has one row per
    distinct check."""
    shared = {"observations": {"url": database_url, "flush_seconds": 0.2}}
    dra, node_a, node_b = dra_lab(settings={NODE_A: shared, NODE_B: shared})
    rate = 1000
    count = rate * (2 * DRA_TW + 8)  # the run outlasts the watchdog's 2 x Tw (+ jitter)
    sim = run_mme(tmp_path, extension, dra, "hung", csv=terminals, count=count, rate=rate,
                  answer_timeout_ms=20_000)
    wait_until(lambda: answered(node_a) >= 100, f"{NODE_A} answered 100", CONNECT_TIMEOUT)
    before_stop = answered(node_a)
    node_a.server.process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        dra.wait_for(rf"-> 'STATE_SUSPECT'\t'{re.escape(NODE_A)}'", timeout=2 * DRA_TW + 6)
        found = time.monotonic() - stopped
        records, summary = finish(sim, CONNECT_TIMEOUT + count / rate + 30)
    finally:
        node_a.server.process.send_signal(signal.SIGCONT)

    check_every_answer(records, summary, terminals, expected_answers(lists), count)
    held = sorted(int(record["latency_us"]) / 1e6 for record in records
                  if int(record["latency_us"]) > 1_000_000)
    assert held, "no request was held by the stopped node"
    # Held from when it went to node A until the failover; none longer than the watchdog.
    assert held[-1] <= found + 1.0, (found, held)
    # Node A, resumed, answers what it held (node B answered those already).
    wait_until(lambda: answered(node_a) >= before_stop + len(held),
               f"{NODE_A} answered the requests it held", 10)
    for node in (node_a, node_b):  # SIGTERM: each node flushes what it holds, then exits
        assert node.server.stop(signal.SIGTERM) == 0
    assert sorted(stored_rows(database_url)) == sorted(distinct_checks(lists))
    with capsys.disabled():
        print(f"\nhung node under {rate} ECR/s, TwTimer {DRA_TW} s: SUSPECT after "
              f"{found:.1f} s; {len(held)} request(s) held, answered by {NODE_B} after "
              f"{held[0]:.1f}-{held[-1]:.1f} s")
