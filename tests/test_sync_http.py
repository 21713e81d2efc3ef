"""Sync from an HTTPS URL: manifest-driven downloads with conditional requests into the
store's cache; any failure refuses the sync with the store untouched. The registry is a real
local HTTPS server with certificates made here; what a sync refuses in transport (redirects
out of the source's origin, plain http://, an untrusted certificate) is tried against it."""

import datetime
import hashlib
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import threading
import urllib.parse
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from eir.lists import fetch
from eir.core.decision import EquipmentStatus, RuleSet, UnknownPolicy
from eir.lists.fetch import Transport
from eir.lists.store import Store
from eir.lists.sync import DOWNLOADS, SyncError, sync

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


# -- certificates ------------------------------------------------------------------------------

def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _pem(directory: Path, stem: str, certificate, key) -> tuple[Path, Path]:
    paths = directory / f"{stem}.pem", directory / f"{stem}.key"
    paths[0].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate the EIR is told to trust (sync.ca_file)
    server: tuple[Path, Path]  # the registry's certificate and key: 127.0.0.1 and localhost
    client: tuple[Path, Path]  # a client certificate from the same CA (mutual TLS)


def make_pki(directory: Path) -> Pki:
    directory.mkdir()
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def certificate(subject: str, key, issuer_key, ca: bool, names=()):
        builder = (x509.CertificateBuilder().subject_name(_name(subject))
                   .issuer_name(_name("Test Registry CA")).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                            critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_path, _ = _pem(directory, "ca", certificate("Test Registry CA", ca_key, ca_key, True),
                      ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    server = _pem(directory, "registry", certificate(
        "registry.test", server_key, ca_key, False,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        server_key)
    client = _pem(directory, "eir", certificate("eir.test", client_key, ca_key, False),
                  client_key)
    return Pki(ca_path, server, client)


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
    closes). `redirects[name]` answers 302 with that Location instead."""

    def __init__(self, root):
        self.root = root
        root.mkdir()
        self.seen: list[Seen] = []
        self.faults: dict[str, str] = {}
        self.redirects: dict[str, str] = {}
        self.url = ""
        self.transport = Transport()

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
                if name in registry.redirects:
                    registry.seen.append(Seen(name, conditional, 302))
                    self.send_response(302)
                    self.send_header("Location", registry.redirects[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("sync-pki") / "pki")


@contextmanager
def serve(registry: Registry, tls: ssl.SSLContext | None):
    """Serve `registry` over HTTPS (or plain HTTP without `tls`) on a loopback port, setting
    its URL. Each TLS handshake runs in the request's own thread."""
    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def finish_request(self, request, client_address):
            if tls is not None:
                request = tls.wrap_socket(request, server_side=True)
            super().finish_request(request, client_address)

        def handle_error(self, request, client_address):
            pass  # a client that refused our certificate is what some tests want

    server = Server(("127.0.0.1", 0), registry.handler())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    registry.url = (f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}/lists/")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def server_tls(pki: Pki, client_ca: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.server)
    if client_ca:  # mutual TLS: a client certificate from the CA is required
        context.load_verify_locations(pki.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
def registry(tmp_path, pki):
    """The registry over HTTPS; `registry.transport` trusts its CA (sync.ca_file)."""
    registry = Registry(tmp_path / "registry")
    registry.transport = Transport(ca_file=pki.ca)
    with serve(registry, server_tls(pki)):
        yield registry


@pytest.fixture
def clear(tmp_path):
    """A second registry, on plain http://, that a redirect may point to."""
    registry = Registry(tmp_path / "clear")
    with serve(registry, None):
        yield registry


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
    assert sync(registry.url, store, transport=registry.transport).version == "000001"
    return store_contents(store)


def refused(registry, store, before, match, default_trust=False):
    """The next sync is refused with `match`, the store as `before`, A still blacklisted.
    default_trust: sync with no transport settings, as the attacks below do."""
    with pytest.raises(SyncError, match=match):
        if default_trust:
            sync(registry.url, store)
        else:
            sync(registry.url, store, transport=registry.transport)
    assert store_contents(store) == before
    assert store.current_version() == "000001"
    assert verdict(store, A).status is BLACK


# -- what a sync downloads -------------------------------------------------------------------

def test_first_sync_downloads_the_manifest_and_its_files_and_publishes(registry, store):
    registry.publish({FULL: full_list(A, B)})
    result = sync(registry.url, store, transport=registry.transport)
    assert (result.published, result.version) == (True, "000001")
    assert registry.seen == [Seen("manifest.json", False, 200), Seen(FULL, False, 200)]
    assert verdict(store, A).status is BLACK and verdict(store, B).status is BLACK
    assert cache_files(store) == {"manifest.json", FULL}


def test_second_sync_asks_conditionally_gets_304s_and_publishes_nothing(registry, store):
    synced_once(registry, store)
    [directory] = [p for p in (store.root / DOWNLOADS).iterdir() if p.is_dir()]
    written = (directory / FULL).stat().st_mtime_ns
    mark = len(registry.seen)
    again = sync(registry.url, store, transport=registry.transport)
    assert (again.published, again.version) == (False, "000001")
    assert registry.seen_since(mark) == [Seen("manifest.json", True, 304), Seen(FULL, True, 304)]
    assert (directory / FULL).stat().st_mtime_ns == written  # not downloaded again
    assert sorted(again.fetched) == [f"{FULL}: not modified", "manifest.json: not modified"]


def test_file_changed_on_the_server_is_downloaded_and_published(registry, store):
    synced_once(registry, store)
    registry.publish({FULL: full_list(A, B, C)})
    mark = len(registry.seen)
    result = sync(registry.url, store, transport=registry.transport)
    assert (result.published, result.version) == (True, "000002")
    assert registry.seen_since(mark) == [Seen("manifest.json", True, 200), Seen(FULL, True, 200)]
    assert verdict(store, C).status is BLACK


def test_only_the_new_delta_is_downloaded_and_applied(registry, store):
    synced_once(registry, store)
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()})
    mark = len(registry.seen)
    result = sync(registry.url, store, transport=registry.transport)
    assert (result.published, result.version) == (True, "000002")
    assert registry.seen_since(mark) == [Seen("manifest.json", True, 200), Seen(FULL, True, 304),
                                         Seen(DELTA, False, 200)]
    assert verdict(store, C).status is BLACK


def test_file_no_longer_listed_leaves_the_cache(registry, store):
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()})
    sync(registry.url, store, transport=registry.transport)
    (registry.root / DELTA).unlink()
    registry.publish({FULL: full_list(A, B)})
    sync(registry.url, store, transport=registry.transport)
    assert cache_files(store) == {"manifest.json", FULL}


def test_source_may_name_the_manifest_itself(registry, store):
    registry.publish({FULL: full_list(A, B)})
    assert sync(registry.url + "manifest.json", store, transport=registry.transport).published
    assert registry.seen == [Seen("manifest.json", False, 200), Seen(FULL, False, 200)]


def test_cli_syncs_from_a_url(registry, tmp_path, pki):
    registry.publish({FULL: full_list(A, B)})
    config = tmp_path / "eir.yaml"
    config.write_text(f"sync:\n  ca_file: {pki.ca}\n")
    done = subprocess.run([sys.executable, "-m", "eir", "sync", "--source", registry.url,
                           "--store", str(tmp_path / "store"), "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("published version 000001: ")


# -- refusals: the store untouched -----------------------------------------------------------

def test_manifest_is_required_for_a_url_source(registry, store):
    (registry.root / FULL).write_bytes(full_list(A, B))
    with pytest.raises(SyncError, match=rf"{registry.url}manifest\.json: HTTP 404"):
        sync(registry.url, store, transport=registry.transport)
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
        sync(registry.url, store, transport=registry.transport)
    assert store.current_version() is None
    registry.publish({FULL: full_list(A, B), DELTA: rows(C).encode()})
    mark = len(registry.seen)
    assert sync(registry.url, store, transport=registry.transport).published
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
        sync(registry.url, store, transport=registry.transport)
    assert not (store.root / DOWNLOADS / "escape.csv").exists()


def test_unreachable_server_is_refused_naming_the_url(store):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{probe.getsockname()[1]}/lists/"
    with pytest.raises(SyncError, match=rf"{url}manifest\.json: .*[Cc]onnection refused"):
        sync(url, store)


def test_server_that_never_answers_times_out(store, monkeypatch):
    monkeypatch.setattr(fetch, "TIMEOUT_SECONDS", 0.5)
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/"
        with pytest.raises(SyncError, match=rf"{url}manifest\.json: .*timed out"):
            sync(url, store)


# -- transport: where the lists may come from -------------------------------------------------
# These attacks call sync() as `eir sync --source URL` does with no sync settings (the system
# trust store, here pointed at the test CA by SSL_CERT_FILE), so they run unchanged against the
# code before redirects and plain http:// were restricted, and fail there.

@pytest.fixture
def trusted_by_default(monkeypatch, pki):
    """The test CA in the default trust store (OpenSSL reads SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))


@pytest.fixture
def elsewhere(tmp_path, pki):
    """Another HTTPS server, with a certificate the EIR trusts, reached as https://localhost."""
    registry = Registry(tmp_path / "elsewhere")
    with serve(registry, server_tls(pki)):
        registry.url = registry.url.replace("127.0.0.1", "localhost")
        yield registry


def attacker_lists(registry: Registry) -> None:
    """What an attacker serves: A is no longer blacklisted."""
    registry.publish({FULL: full_list(B, C)})


def test_redirect_from_https_to_http_is_refused_and_nothing_fetched_in_clear(
        registry, clear, store, trusted_by_default):
    registry.publish({FULL: full_list(A, B)})
    assert sync(registry.url, store).version == "000001"
    before = store_contents(store)
    attacker_lists(clear)
    registry.redirects.update({name: clear.url + name for name in ("manifest.json", FULL)})
    refused(registry, store, before, rf"{registry.url}manifest\.json: HTTP 302 redirect to "
                                     rf"'{clear.url}manifest\.json' refused: it leaves "
                                     rf"https://127\.0\.0\.1:\d+", default_trust=True)
    assert clear.seen == []


def test_redirect_to_another_host_is_refused(registry, elsewhere, store, trusted_by_default):
    registry.publish({FULL: full_list(A, B)})
    assert sync(registry.url, store).version == "000001"
    before = store_contents(store)
    attacker_lists(elsewhere)
    registry.redirects.update({name: elsewhere.url + name for name in ("manifest.json", FULL)})
    refused(registry, store, before, r"redirect to 'https://localhost:\d+/lists/manifest\.json' "
                                     r"refused", default_trust=True)
    assert elsewhere.seen == []


def test_redirect_within_the_source_is_followed(registry, store):
    registry.publish({FULL: full_list(A, B)})
    (registry.root / "manifest-42.json").write_bytes((registry.root / "manifest.json").read_bytes())
    registry.redirects["manifest.json"] = "/lists/manifest-42.json"
    assert sync(registry.url, store, transport=registry.transport).published
    assert [seen.name for seen in registry.seen] == ["manifest.json", "manifest-42.json", FULL]


@pytest.mark.parametrize("allow_http", [False, True])
def test_unsigned_plain_http_is_refused_before_any_request(clear, store, allow_http):
    attacker_lists(clear)
    expected = (r"plain http:// needs a signed manifest: sync\.allow_http is set, but "
                r"sync\.public_key is not" if allow_http else
                r"plain http:// refused: use https://, or set sync\.allow_http: true together "
                r"with sync\.public_key")
    with pytest.raises(SyncError, match=rf"^{clear.url}: {expected}$"):
        if allow_http:
            sync(clear.url, store, transport=Transport(allow_http=True))
        else:
            sync(clear.url, store)  # as `eir sync --source http://...` did before
    assert clear.seen == [] and store.current_version() is None


def test_certificate_from_a_ca_not_trusted_is_refused(registry, store):
    registry.publish({FULL: full_list(A, B)})
    with pytest.raises(SyncError, match=r"manifest\.json: .*CERTIFICATE_VERIFY_FAILED"):
        sync(registry.url, store, transport=Transport())  # the system's CAs only
    assert store.current_version() is None


def test_client_certificate_for_a_registry_that_requires_one(tmp_path, pki, store):
    registry = Registry(tmp_path / "mutual")
    registry.publish({FULL: full_list(A, B)})
    with serve(registry, server_tls(pki, client_ca=True)):
        with pytest.raises(SyncError, match=r"manifest\.json: "):
            sync(registry.url, store, transport=Transport(ca_file=pki.ca))
        assert registry.seen == []
        certificate, key = pki.client
        transport = Transport(ca_file=pki.ca, client_certificate=certificate, client_key=key)
        assert sync(registry.url, store, transport=transport).published


def test_a_ca_file_that_cannot_be_loaded_is_named(registry, store, tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(SyncError, match=rf"sync\.ca_file: {missing}: cannot load"):
        sync(registry.url, store, transport=Transport(ca_file=missing))
    assert registry.seen == []
