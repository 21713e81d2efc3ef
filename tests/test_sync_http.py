"""Sync from an HTTP(S) URL: manifest-driven downloads with conditional requests into the
store's cache; any failure refuses the sync with the store untouched."""

import hashlib
import json
import socket
import subprocess
import sys
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import pytest

from eir import fetch
from eir.decision import EquipmentStatus, RuleSet, UnknownPolicy
from eir.store import Store
from eir.sync import DOWNLOADS, SyncError, sync

DAY = 20261201
BLACK = EquipmentStatus.BLACKLISTED
A, B, C = "35209900176148", "35332106470089", "35000000000001"
HEADER = "imei,block_date,reasons\n"
FULL = "20261120_blacklist.zip"
DELTA = "20261121_blacklist_delta_5_6_blocked.csv"


def rows(*imeis: str) -> str:
    return HEADER + "".join(f"{imei},20200101,stolen\n" for imei in imeis)


def full_list(*imeis: str) -> bytes:
    """A DIRBS zip: the full blacklist of run 5, with the delta from run 4 that led to it."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("20261120_blacklist.csv", rows(*imeis))
        archive.writestr("20261120_blacklist_delta_4_5_blocked.csv", rows(imeis[0]))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Seen:
    name: str
    conditional: bool
    status: int


class Registry:
    """A registry publishing a directory over HTTP under /lists/: ETag (a hash of the body) and
    Last-Modified on every answer, 304 on a matching If-None-Match, every request recorded.
    `faults[name]` makes one file misbehave: "truncate" (announces the full Content-Length,
    sends half and closes), "no-length" (no Content-Length, body ends when the connection
    closes)."""

    def __init__(self, root):
        self.root = root
        root.mkdir()
        self.seen: list[Seen] = []
        self.faults: dict[str, str] = {}
        self.url = ""

    def publish(self, files: dict[str, bytes], manifest: dict[str, str] | None = None):
        """Write `files` and a manifest of their checksums (or of `manifest` if given)."""
        for name, data in files.items():
            (self.root / name).write_bytes(data)
        listed = manifest or {name: sha256(data) for name, data in files.items()}
        (self.root / "manifest.json").write_text(json.dumps({"files": listed}))

    def seen_since(self, mark: int) -> list[Seen]:
        return self.seen[mark:]

    def handler(self):
        registry = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5

            def do_GET(self):
                name = urllib.parse.unquote(self.path.removeprefix("/lists/"))
                path = registry.root / name
                conditional = "If-None-Match" in self.headers
                if "/" in name or not self.path.startswith("/lists/") or not path.is_file():
                    registry.seen.append(Seen(name, conditional, 404))
                    self.send_error(404)
                    return
                body = path.read_bytes()
                etag = f'"{sha256(body)[:16]}"'
                status = 304 if self.headers.get("If-None-Match") == etag else 200
                registry.seen.append(Seen(name, conditional, status))
                self.send_response(status)
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
                fault = registry.faults.get(name)
                if status == 304:
                    self.end_headers()
                    return
                if fault != "no-length":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if fault == "truncate" else body)

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "registry")
    server = ThreadingHTTPServer(("127.0.0.1", 0), registry.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    registry.url = f"http://127.0.0.1:{server.server_port}/lists/"
    yield registry
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def verdict(store, imei):
    return RuleSet(store.open_current(), UnknownPolicy.UNKNOWN).decide(imei, None, day=DAY)


def store_contents(store) -> dict[str, bytes]:
    """Snapshots, list states and CURRENT: everything but the download cache."""
    return {str(p.relative_to(store.root)): p.read_bytes() for p in store.root.rglob("*")
            if p.is_file() and p.relative_to(store.root).parts[0] != DOWNLOADS}


def cache_files(store) -> set[str]:
    """Names in the download cache of the (one) URL synced from, temporaries included."""
    [directory] = [p for p in (store.root / DOWNLOADS).iterdir() if p.is_dir()]
    return {p.name for p in directory.iterdir()}


def synced_once(registry, store) -> dict[str, bytes]:
    """Publish the full blacklist {A, B}, sync it, and return the store's contents."""
    registry.publish({FULL: full_list(A, B)})
    assert sync(registry.url, store).version == "000001"
    return store_contents(store)


def refused(registry, store, before, match):
    """The next sync is refused with `match`, the store as `before`, A still blacklisted."""
    with pytest.raises(SyncError, match=match):
        sync(registry.url, store)
    assert store_contents(store) == before
    assert store.current_version() == "000001"
    assert verdict(store, A).status is BLACK


# -- what a sync downloads -------------------------------------------------------------------

def test_first_sync_downloads_the_manifest_and_its_files_and_publishes(registry, store):
    registry.publish({FULL: full_list(A, B)})
    result = sync(registry.url, store)
    assert (result.published, result.version) == (True, "000001")
    assert registry.seen == [Seen("manifest.json", False, 200), Seen(FULL, False, 200)]
    assert verdict(store, A).status is BLACK and verdict(store, B).status is BLACK
    assert cache_files(store) == {"manifest.json", FULL}


def test_second_sync_asks_conditionally_gets_304s_and_publishes_nothing(registry, store):
    synced_once(registry, store)
    [directory] = [p for p in (store.root / DOWNLOADS).iterdir() if p.is_dir()]
    written = (directory / FULL).stat().st_mtime_ns
    mark = len(registry.seen)
    again = sync(registry.url, store)
    assert (again.published, again.version) == (False, "000001")
    assert registry.seen_since(mark) == [Seen("manifest.json", True, 304), Seen(FULL, True, 304)]
    assert (directory / FULL).stat().st_mtime_ns == written  # not downloaded again
    assert sorted(again.fetched) == [f"{FULL}: not modified", "manifest.json: not modified"]


def test_file_changed_on_the_server_is_downloaded_and_published(registry, store):
    synced_once(registry, store)
    registry.publish({FULL: full_list(A, B, C)})
    mark = len(registry.seen)
    result = sync(registry.url, store)
    assert (result.published, result.version) == (True, "000002")
    assert registry.seen_since(mark) == [Seen("manifest.json", True, 200), Seen(FULL, True, 200)]
    assert verdict(store, C).status is BLACK


def test_only_the_new_delta_is_downloaded_and_applied(registry, store):
    synced_once(registry, store)
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()})
    mark = len(registry.seen)
    result = sync(registry.url, store)
    assert (result.published, result.version) == (True, "000002")
    assert registry.seen_since(mark) == [Seen("manifest.json", True, 200), Seen(FULL, True, 304),
                                         Seen(DELTA, False, 200)]
    assert verdict(store, C).status is BLACK


def test_file_no_longer_listed_leaves_the_cache(registry, store):
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()})
    sync(registry.url, store)
    (registry.root / DELTA).unlink()
    registry.publish({FULL: full_list(A, B)})
    sync(registry.url, store)
    assert cache_files(store) == {"manifest.json", FULL}


def test_source_may_name_the_manifest_itself(registry, store):
    registry.publish({FULL: full_list(A, B)})
    assert sync(registry.url + "manifest.json", store).published
    assert registry.seen == [Seen("manifest.json", False, 200), Seen(FULL, False, 200)]


def test_cli_syncs_from_a_url(registry, tmp_path):
    registry.publish({FULL: full_list(A, B)})
    done = subprocess.run([sys.executable, "-m", "eir", "sync", "--source", registry.url,
                           "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("published version 000001: ")


# -- refusals: the store untouched -----------------------------------------------------------

def test_manifest_is_required_for_a_url_source(registry, store):
    (registry.root / FULL).write_bytes(full_list(A, B))
    with pytest.raises(SyncError, match=rf"{registry.url}manifest\.json: HTTP 404"):
        sync(registry.url, store)
    assert store.current_version() is None


def test_listed_file_missing_on_the_server_is_refused_naming_its_url(registry, store):
    before = synced_once(registry, store)
    registry.publish({FULL: full_list(A, B)}, manifest={FULL: sha256(full_list(A, B)),
                                                        DELTA: sha256(rows(C).encode())})
    refused(registry, store, before, rf"{registry.url}{DELTA}: HTTP 404")


def test_checksum_mismatch_is_refused_and_the_file_not_kept(registry, store):
    before = synced_once(registry, store)
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()},
                     manifest={FULL: sha256(full_list(A, B)), DELTA: "0" * 64})
    refused(registry, store, before,
            rf"{registry.url}{DELTA}: sha256: {sha256(rows(C).encode())} does not match "
            f"the manifest's {'0' * 64}")
    assert cache_files(store) == {"manifest.json", FULL}


def test_files_verified_before_a_refusal_stay_cached(registry, store):
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()},
                     manifest={FULL: sha256(full_list(A, B)), DELTA: "0" * 64})
    with pytest.raises(SyncError, match="does not match the manifest"):
        sync(registry.url, store)
    assert store.current_version() is None
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()})
    mark = len(registry.seen)
    assert sync(registry.url, store).published
    assert Seen(FULL, True, 304) in registry.seen_since(mark)


def test_truncated_download_is_refused(registry, store):
    before = synced_once(registry, store)
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()})
    registry.faults[DELTA] = "truncate"
    size = len(rows(C).encode())
    refused(registry, store, before, rf"{registry.url}{DELTA}: truncated: received "
                                     rf"{size // 2} of the {size} bytes announced")
    assert cache_files(store) == {"manifest.json", FULL}


@pytest.mark.parametrize("fault", ["", "no-length"])
def test_file_over_the_size_limit_is_refused(registry, store, monkeypatch, fault):
    before = synced_once(registry, store)
    delta = rows(C, *[f"3500000000{n:04d}" for n in range(100)]).encode()
    registry.publish({FULL: full_list(A, B), DELTA: delta})
    registry.faults[DELTA] = fault
    monkeypatch.setattr(fetch, "MAX_FILE_BYTES", 1000)
    refused(registry, store, before, rf"{registry.url}{DELTA}: .*larger than the limit")
    assert cache_files(store) == {"manifest.json", FULL}


def test_manifest_naming_a_path_is_refused(registry, store, tmp_path):
    registry.publish({}, manifest={"../escape.csv": sha256(b"")})
    with pytest.raises(SyncError, match=r"files\.\.\./escape\.csv: not a plain file name"):
        sync(registry.url, store)
    assert not (store.root / DOWNLOADS / "escape.csv").exists()


def test_unreachable_server_is_refused_naming_the_url(store):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/lists/"
    with pytest.raises(SyncError, match=rf"{url}manifest\.json: .*[Cc]onnection refused"):
        sync(url, store)


def test_server_that_never_answers_times_out(store, monkeypatch):
    monkeypatch.setattr(fetch, "TIMEOUT_SECONDS", 0.5)
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        with pytest.raises(SyncError, match=rf"{url}manifest\.json: .*timed out"):
            sync(url, store)
