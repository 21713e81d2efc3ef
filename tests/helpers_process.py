"""Subprocesses whose log is read line by line, and `eir serve` started on an ephemeral port.

Used by tests/conftest.py (the `eir_server` fixture), tests/test_freediameter.py
(freeDiameterd) and bench/e2e.py (the servers under load). Imports neither pytest nor eir.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Sequence

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LIST = ROOT / "config" / "lists" / "example.csv"
LISTENING = re.compile(r"listening on (\w+) (\S+):(\d+)$")


class LoggedProcess:
    """A subprocess and the lines of one of its text pipes, collected by a daemon thread."""

    def __init__(self, process: subprocess.Popen, pipe: IO[str], name: str):
        self.process = process
        self.name = name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reading = True
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._reading = False
            self._changed.notify_all()

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def line(self, index: int) -> str:
        with self._changed:
            return self.lines[index]

    def wait_for_line(self, pattern: str, start: int = 0,
                      timeout: float = 10.0) -> tuple[int, re.Match]:
        """(index, match) of the first line from index `start` on that matches `pattern`.

        Raises AssertionError after `timeout` seconds, or as soon as the pipe is at its end
        (the process closed it or exited) with no line matching."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(start, len(self.lines)):
                    match = regex.search(self.lines[index])
                    if match:
                        return index, match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reading:
                    why = f"within {timeout}s" if self._reading else "before its output ended"
                    raise AssertionError(f"{self.name} logged no line matching {pattern!r} "
                                         f"{why}; its log:\n" + "\n".join(self.lines))
                self._changed.wait(remaining)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig` and return the exit code; kill it and fail if it outlives `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s:\n{self.log()}") from None


class RunningServer(LoggedProcess):
    """A server that logged "listening on PROTO HOST:PORT" on stderr."""

    host: str = ""
    port: int = 0

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        """Block until a log line (from index `start` on) matches `pattern`; fail after timeout."""
        return self.wait_for_line(pattern, start, timeout)[1]


def start_server(command: Sequence[str], cwd: Path | None = None,
                 timeout: float = 15.0) -> RunningServer:
    """Run `command` (its stderr read line by line) until it logs "listening on …"."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment.pop("EIR_CONFIG", None)
    process = subprocess.Popen(list(command), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, errors="replace", cwd=cwd or ROOT, env=environment)
    server = RunningServer(process, process.stderr, " ".join(command))
    try:
        match = server.wait_for_log(LISTENING.pattern, timeout)
    except BaseException:
        server.kill()
        raise
    server.host, server.port = match.group(2).strip("[]"), int(match.group(3))
    return server


def start_eir(*args: str, lists: Sequence[Path] | None = None, host: str = "127.0.0.1",
              cwd: Path | None = None, timeout: float = 15.0,
              prefix: Sequence[str] = ()) -> RunningServer:
    """Start `eir serve` on an ephemeral port of `host` and wait until it listens.

    `lists` defaults to config/lists/example.csv; `args` are appended to the command line;
    `prefix` goes before it (e.g. `taskset -c 0` or a profiler)."""
    listen = f"[{host}]:0" if ":" in host else f"{host}:0"
    command = [*prefix, sys.executable, "-m", "eir", "serve", "--listen", listen]
    for path in lists if lists is not None else [EXAMPLE_LIST]:
        command += ["--list", str(path)]
    server = start_server(command + list(args), cwd, timeout)
    server.name = "eir serve"
    return server


def run_eir(*args: str, cwd: Path = ROOT, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python -m eir ARGS` to completion (EIR_CONFIG unset), its output captured as text."""
    environment = dict(os.environ)
    environment.pop("EIR_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "eir", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def eir_ok(*args: str, cwd: Path = ROOT, timeout: float = 30) -> str:
    """run_eir that must exit 0; its standard output."""
    result = run_eir(*args, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout

