"""Shared fixtures: a real `eir serve` process on a loopback port, with its log readable."""

from __future__ import annotations

import pytest

from helpers_process import RunningServer, start_eir

# An `eir serve` subprocess: .address, .host, .port, .lines (its stderr), .log(),
# .wait_for_log(regex, timeout, start), .stop(signal) -> exit code.
RunningEir = RunningServer


@pytest.fixture
def eir_server():
    """Factory: `eir_server(*extra_args, lists=[...])` → RunningEir, stopped at teardown."""
    started: list[RunningEir] = []

    def factory(*args: str, **kwargs) -> RunningEir:
        running = start_eir(*args, **kwargs)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.kill()
