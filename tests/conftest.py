"""Shared fixtures: a real `eir serve` process on a loopback port, with its log readable."""

from __future__ import annotations

import pytest

from helpers_process import RunningServer, start_eir

# An `eir serve` subprocess: .address, .host, .port, .lines (its stderr), .log(),
# .wait_for_log(regex, timeout, start), .stop(signal) -> exit code.
RunningEir = RunningServer


@pytest.fixture
def eir_server(tmp_path_factory):
    """Factory: `eir_server(*extra_args, lists=[...])` → RunningEir, stopped at teardown.
    Each server runs in a fresh directory, so what it writes there (observations.sqlite)
    stays out of the repository."""
    started: list[RunningEir] = []

    def factory(*args: str, **kwargs) -> RunningEir:
        kwargs.setdefault("cwd", tmp_path_factory.mktemp("eir-serve"))
        running = start_eir(*args, **kwargs)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.kill()


# Modules whose tests bound latency or rate (a p99 beside a flood, a paced replay's count):
# scripts/test.sh runs them after the rest, one at a time (`-m serial`), while the others run
# in parallel (`pytest -n auto -m "not serial"`, pytest-xdist), so that their margins are
# measured on a machine no other test of ours is loading.
SERIAL_MODULES = {"test_faults_wire", "test_overload", "test_sbi_attacks", "test_http1",
                  "test_mme_sim", "test_replay"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__ in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
