"""Helpers for the web console's tests: a live `eir serve --api` whose console edits a
local list, and a logged-in httpx client."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
from helpers_ops import API_LINE, TOKEN, endpoint
from helpers_process import EXAMPLE_LIST

READ_TOKEN = "read-only-token-0123456789"
CONSOLE_LINE = r"web console at (http://\S+)/console/"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def console_config(directory: Path, console: str = "") -> Path:
    """A configuration whose lists are the example list and an empty local list that the
    console edits; observations flushed every 0.1 s; `console`: more console.* lines."""
    shutil.copy(EXAMPLE_LIST, directory / "example.csv")
    (directory / "local.csv").write_text("imei,status,imsi,reason\n# the console's rules\n")
    config = directory / "eir.yaml"
    config.write_text("lists:\n  files: [example.csv, local.csv]\n"
                      "observations:\n  flush_seconds: 0.1\n"
                      "console:\n  local_list: local.csv\n  journal: console.jsonl\n"
                      + console)
    return config


def start_console(eir_server, monkeypatch, directory: Path, *args: str, console: str = "",
                  workers: int = 1):
    """(server, API base URL) of `eir serve --api --workers N` with
    console_config(directory, console)."""
    monkeypatch.setenv("EIR_API_TOKEN", TOKEN)
    monkeypatch.setenv("EIR_API_READ_TOKEN", READ_TOKEN)
    config = console_config(directory, console)
    server = eir_server("--config", str(config), "--api", "127.0.0.1:0", "--workers",
                        str(workers), *args, lists=[])
    url = endpoint(server, API_LINE)
    assert server.wait_for_log(CONSOLE_LINE).group(1) == url
    return server, url


def logged_in(url: str, token: str = TOKEN) -> httpx.Client:
    """An httpx client holding a console session of the role `token` logs in as."""
    client = httpx.Client(base_url=url + "/console", timeout=15)
    response = client.post("/login", data={"token": token})
    assert response.status_code == 303, response.text
    return client


def csrf_of(client: httpx.Client, path: str = "/lookup") -> str:
    """The session's CSRF token, as a page's forms carry it."""
    return CSRF.search(client.get(path).text).group(1)
