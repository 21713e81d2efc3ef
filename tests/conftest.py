"""Shared fixtures: a real `eir serve` process on a loopback port, with its log readable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LIST = ROOT / "config" / "lists" / "example.csv"
_LISTENING = re.compile(r"listening on (\w+) (\S+):(\d+)$")


@dataclass
class RunningEir:
    """An `eir serve` subprocess. Its stderr is collected line by line in `lines`."""

    process: subprocess.Popen
    host: str = ""
    port: int = 0
    lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        """Block until a log line (from index `start` on) matches `pattern`; fail after timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reading):
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout}s; log:\n"
                        + "\n".join(self.lines))
                self._changed.wait(remaining)

    def _read(self) -> None:
        self._reading = True
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._reading = False
            self._changed.notify_all()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"eir serve did not exit within {timeout}s:\n{self.log()}")


def start_eir(*args: str, lists: list[Path] | None = None, host: str = "127.0.0.1",
              cwd: Path | None = None, timeout: float = 15.0) -> RunningEir:
    """Start `eir serve` on an ephemeral port of `host` and wait until it listens."""
    command = [sys.executable, "-m", "eir", "serve", "--listen", f"{host}:0"
               if ":" not in host else f"[{host}]:0"]
    for path in lists if lists is not None else [EXAMPLE_LIST]:
        command += ["--list", str(path)]
    command += list(args)
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment.pop("EIR_CONFIG", None)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, cwd=cwd or ROOT, env=environment)
    running = RunningEir(process)
    running._reading = True
    threading.Thread(target=running._read, daemon=True).start()
    try:
        match = running.wait_for_log(_LISTENING.pattern, timeout)
    except AssertionError:
        process.kill()
        raise
    running.host, running.port = match.group(2).strip("[]"), int(match.group(3))
    return running


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
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
