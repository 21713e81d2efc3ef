"""eir.interfaces.console.access, sans-IO: who logs in as what, signed expiring sessions, and
the login limiter's bounds with hostile numbers of attempts and addresses."""

from __future__ import annotations

import itsdangerous.timed
import pytest
from helpers_console import READ_TOKEN
from helpers_ops import TOKEN
from helpers_process import run_eir

from eir.interfaces.console.access import ADMIN, READ, LoginLimiter, Sessions, csrf_ok, role_of


def test_roles_and_sessions(monkeypatch):
    assert role_of(TOKEN, TOKEN, READ_TOKEN) == ADMIN
    assert role_of(READ_TOKEN, TOKEN, READ_TOKEN) == READ
    assert role_of(READ_TOKEN, TOKEN, None) is None
    assert role_of("", TOKEN, READ_TOKEN) is None and role_of(TOKEN[:-1], TOKEN, None) is None
    sessions = Sessions(TOKEN, READ_TOKEN, max_age=3600)
    cookie = sessions.issue(READ)
    session = sessions.read(cookie)
    assert session.role == READ and not session.may_change
    assert csrf_ok(session, session.csrf) and not csrf_ok(session, None)
    assert not csrf_ok(session, session.csrf[:-1] + "x")
    # A multipart form may carry the field as a file part: refused, not a crash (500).
    assert not csrf_ok(session, object())
    assert sessions.issue(READ) != cookie  # a fresh CSRF token per session
    # Another key (a token changed) or an altered cookie: no session.
    assert Sessions(TOKEN, "another-read-token-0123", 3600).read(cookie) is None
    payload, _, signature = cookie.rpartition(".")
    assert sessions.read(payload + "." + signature[::-1]) is None
    assert sessions.read("") is None and sessions.read("x" * 5000) is None
    # Expired after max_age.
    now = itsdangerous.timed.time.time()
    monkeypatch.setattr(itsdangerous.timed.time, "time", lambda: now + 3601)
    assert sessions.read(cookie) is None


def test_login_limiter_window_and_bounded_table():
    limiter = LoginLimiter(max_failures=3, window=60, max_addresses=4)
    for moment in (0, 1, 2):
        assert limiter.retry_after("192.0.2.1", moment) == 0
        limiter.failed("192.0.2.1", moment)
    assert limiter.retry_after("192.0.2.1", 3) == pytest.approx(57)
    assert limiter.retry_after("192.0.2.2", 3) == 0
    assert limiter.retry_after("192.0.2.1", 60.5) == 0  # the first failure left the window
    # A million failures from one address keep max_failures times, not a million.
    for moment in range(10 ** 5):
        limiter.failed("192.0.2.9", 100 + moment * 1e-6)
    assert len(limiter._failures["192.0.2.9"]) == 3
    # Addresses beyond max_addresses share one count: the table does not grow.
    for number in range(10 ** 4):
        limiter.failed(f"10.0.{number // 256}.{number % 256}", 200)
    assert len(limiter._failures) <= 4 + 1
    assert limiter.retry_after("10.99.99.99", 200) > 0  # limited with the other newcomers
    assert limiter.retry_after("10.99.99.99", 261) == 0  # ...until the window passed


def test_local_list_must_be_a_list_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    (tmp_path / "local.csv").write_text("imei,status\n")
    (tmp_path / "eir.yaml").write_text("console:\n  local_list: local.csv\n  "
                                       "session_seconds: 0\n")
    result = run_eir("serve", "--config", str(tmp_path / "eir.yaml"), "--api", "0")
    assert result.returncode == 2 and "console.session_seconds" in result.stderr
    (tmp_path / "other.csv").write_text("imei,status\n")
    (tmp_path / "eir.yaml").write_text("lists:\n  files: [other.csv]\n"
                                       "console:\n  local_list: local.csv\n")
    result = run_eir("serve", "--config", str(tmp_path / "eir.yaml"), "--api", "0",
                     "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert "console.local_list" in result.stderr and "must be one of lists.files" in result.stderr
