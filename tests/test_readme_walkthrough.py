"""README's walk-through, run as a new user pastes it (issue 16: from a registry drop directory
to a served store, a replay, a dump the registry accepts and a dashboard that shows it,
following README alone).

Every ```sh block of the section, in order, goes into one bash (`set -eo pipefail`: a command
that fails ends the walk), from the repository root, as written but for three things: its
ports become free ones and /tmp/eir-walk a temporary directory, so that it can run beside
other tests; and a block marked `<!-- walk-through: not run by the test ... -->` (Grafana's
Docker container) is left out. Between the blocks, what the user would look at is checked:
after the replay, every query of the lab's dashboard whose metrics the EIR serves is asked of
the Prometheus the walk-through started, and must answer with data (the replay's ECRs among
it); after the dump, the file passes DIRBS-Core's operator import checks.

Needs Prometheus (`prometheus` on PATH, as scripts/test.sh installs it); about 25 s.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers_ops import scrape, wait_until
from helpers_process import ROOT
from test_dirbs_round_trip import dirbs_would_import
from test_testbed_compose import promql_metrics_and_labels

README = ROOT / "README.md"
DASHBOARD = ROOT / "testbed" / "grafana" / "dashboards" / "eir.json"
SECTION = "## Walk-through: from the registry's files to the registry's dump"
NOT_RUN = "<!-- walk-through: not run by the test"
WORK = "/tmp/eir-walk"
PORTS = {"127.0.0.1:3868": "diameter", "127.0.0.1:9464": "metrics",
         "127.0.0.1:9090": "prometheus"}
BLOCK_TIMEOUT_SECONDS = 120.0
ECR = "ME-Identity-Check"


def walkthrough_blocks(run: bool = True) -> list[str]:
    """The section's ```sh blocks that the test runs (or, `run` false, those it does not), in
    order."""
    section = README.read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = []
    for match in re.finditer(r"(<!--[^\n]*-->\n)?```sh\n(.*?)```", section, flags=re.S):
        marker, block = match.groups()
        if run != bool(marker and marker.startswith(NOT_RUN)):
            blocks.append(block)
    return blocks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Shell:
    """One bash reading commands from its standard input, as a terminal's would; its own
    process group, so that whatever it left running in the background can be ended."""

    def __init__(self, environment: dict[str, str]):
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=ROOT, env=environment, start_new_session=True)
        self.blocks = 0
        self.run("set -eo pipefail")

    def run(self, block: str) -> str:
        """Run a block; its output. Fails with that output if the shell ends (a command
        failed) or the block takes longer than BLOCK_TIMEOUT_SECONDS."""
        self.blocks += 1
        marker = f"__walk_through_block_{self.blocks}_done__"
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{block}\necho {marker}\n".encode())
        self.process.stdin.flush()
        output = b""
        deadline = time.monotonic() + BLOCK_TIMEOUT_SECONDS
        while marker.encode() + b"\n" not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"block still running:\n{block}\noutput:\n{output.decode()}"
            readable, _, _ = select.select([self.process.stdout], [], [], min(remaining, 0.2))
            data = os.read(self.process.stdout.fileno(), 65536) if readable else b""
            # A command failed (set -e): the shell is gone, though what it started in the
            # background may still hold its output open.
            assert data or self.process.poll() is None, \
                f"the shell ended in:\n{block}\noutput:\n{output.decode()}"
            output += data
        return output.decode().replace(marker + "\n", "")

    def end(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group this shell leads
        except ProcessLookupError:
            pass
        self.process.wait()


def dashboard_queries(instance: str) -> list[str]:
    return [target["expr"].replace("$instance", instance)
            for panel in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
            for target in panel.get("targets", [])]


def prometheus_query(base: str, expression: str) -> list[dict]:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": expression}, timeout=10)
    assert answer.status_code == 200, (expression, answer.text)
    return answer.json()["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Prometheus "
                    "(apt install prometheus, as scripts/test.sh does)")
def test_the_walk_through_runs_as_written(tmp_path):
    blocks = walkthrough_blocks()
    assert len(blocks) >= 6, blocks
    ports = {name: free_port() for name in PORTS.values()}
    work = tmp_path / "walk"

    def as_run(block: str) -> str:
        for address, name in PORTS.items():
            block = block.replace(address, f"127.0.0.1:{ports[name]}")
        return block.replace(WORK, str(work))

    environment = {key: value for key, value in os.environ.items()
                   if key not in ("EIR_CONFIG", "EIR_API_TOKEN")}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    shell = Shell(environment)
    try:
        outputs = []
        for block in blocks:
            outputs.append(shell.run(as_run(block)))
            if "eir replay" in block:
                check_the_dashboard(ports)
        text = "\n".join(outputs)
        assert "BLACKLISTED" in text and "reported stolen" in text
        dumps = sorted(work.glob("op1_*.zip"))
        assert len(dumps) == 1, text
        rows = dirbs_would_import(dumps[0])
        assert rows and {row["rat"] for row in rows} == {"006"}
        assert {row["imei"] for row in rows} >= {"35209900176148"}
    finally:
        shell.end()


def check_the_dashboard(ports: dict[str, int]) -> None:
    """Prometheus, as the walk-through started it, has the EIR's series: each dashboard query
    whose metrics the EIR serves answers with data, the ECR rate above 0; the alert rules are
    loaded."""
    served = {name for name, _ in scrape(f"http://127.0.0.1:{ports['metrics']}")}
    prometheus = f"http://127.0.0.1:{ports['prometheus']}"
    expressions = [expression for expression in dashboard_queries(".*")
                   if promql_metrics_and_labels(expression)[0] <= served]
    assert len(expressions) >= 10, expressions
    for expression in expressions:
        wait_until(lambda: prometheus_query(prometheus, expression),
                   f"data for the dashboard's {expression}", timeout=30)
    ecrs = prometheus_query(prometheus, f'sum(rate(eir_requests_total{{command="{ECR}"}}[1m]))')
    assert float(ecrs[0]["value"][1]) > 0
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert any(rule.get("name") == "EirDown" for group in rules for rule in group["rules"])


def test_the_grafana_container_gets_the_labs_dashboard_and_the_walk_throughs_prometheus():
    """The block not run (Docker): what it mounts exists, and the lab's data source, which it
    provisions, names a host that its --add-host maps to this machine, at the port the
    walk-through's Prometheus listens on."""
    [grafana] = walkthrough_blocks(run=False)
    mounted = re.findall(r'-v "\$REPO/([^:"]+):', grafana)
    assert mounted and all((ROOT / path).is_dir() for path in mounted), mounted
    provisioning = ROOT / "testbed" / "grafana" / "provisioning" / "datasources"
    [source] = [entry for path in provisioning.glob("*.yml")
                for entry in yaml.safe_load(path.read_text())["datasources"]]
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)", source["url"]).groups()
    assert f"--add-host {host}:127.0.0.1" in grafana and "--network host" in grafana
    assert any(f"--web.listen-address=127.0.0.1:{port}" in block
               for block in walkthrough_blocks())
