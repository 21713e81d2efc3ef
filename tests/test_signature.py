"""Ed25519-signed manifests: with a public key configured, a source (drop directory or URL)
syncs only when manifest.json.sig verifies over the exact manifest bytes."""

import base64
import functools
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from eir.core.decision import EquipmentStatus, RuleSet, UnknownPolicy
from eir.lists.store import Store
from eir.lists.fetch import Transport
from eir.lists.sync import DOWNLOADS, SyncError, sync

DAY = 20261201
BLACK = EquipmentStatus.BLACKLISTED
A, B, C = "35209900176148", "35332106470089", "35000000000001"
FULL = "20261120_blacklist.csv"
EXTRA = "20261121_extra.csv"
_MTIMES = itertools.count(int(time.time()) - 100_000, 10)
_SEQUENCES = itertools.count(1)
# The URL sources here are plain http:// (the stdlib file server): allowed since signed.
HTTP = Transport(allow_http=True)


def rows(*imeis: str) -> bytes:
    return ("imei,block_date,reasons\n"
            + "".join(f"{imei},20200101,stolen\n" for imei in imeis)).encode()


def write(path, data: bytes):
    """Write with an mtime of its own: the URL source's If-Modified-Since has 1 s granularity."""
    path.write_bytes(data)
    mtime = next(_MTIMES)
    os.utime(path, (mtime, mtime))


def publish(directory, files: dict[str, bytes], key: Ed25519PrivateKey | None,
            encoding: str = "raw", sequence: int | None = None) -> bytes:
    """Write `files` and their manifest, of the next sequence number unless `sequence` is
    given; sign it with `key` (raw or base64) unless None."""
    for name, data in files.items():
        write(directory / name, data)
    manifest = json.dumps({
        "sequence": next(_SEQUENCES) if sequence is None else sequence,
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }).encode()
    write(directory / "manifest.json", manifest)
    if key is not None:
        signature = key.sign(manifest)
        write(directory / "manifest.json.sig",
              base64.b64encode(signature) + b"\n" if encoding == "base64" else signature)
    return manifest


def public_pem(key, path):
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def verdict(store, imei):
    return RuleSet(store.open_current(), UnknownPolicy.UNKNOWN).decide(imei, None, day=DAY)


def store_contents(store) -> dict[str, bytes]:
    return {str(p.relative_to(store.root)): p.read_bytes() for p in store.root.rglob("*")
            if p.is_file() and p.relative_to(store.root).parts[0] != DOWNLOADS}


@pytest.fixture
def signer():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def key_file(signer, tmp_path):
    return public_pem(signer, tmp_path / "registry.pub.pem")


@pytest.fixture
def drop(tmp_path):
    directory = tmp_path / "drop"
    directory.mkdir()
    return directory


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


@pytest.fixture
def served(drop):
    """A URL serving the drop directory (stdlib file server: Last-Modified, If-Modified-Since)."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(drop))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(params=["directory", "url"])
def source(request, drop):
    """The drop directory itself, or a URL serving it."""
    return str(drop) if request.param == "directory" else request.getfixturevalue("served")


def signed_and_synced(drop, source, store, signer, key_file) -> dict[str, bytes]:
    """Publish {A, B} signed, sync it with the key; return the store's contents."""
    publish(drop, {FULL: rows(A, B)}, signer)
    assert sync(source, store, key_file, HTTP).version == "000001"
    return store_contents(store)


def refused(source, store, key_file, before, match):
    with pytest.raises(SyncError, match=match):
        sync(source, store, key_file, HTTP)
    assert store_contents(store) == before
    assert verdict(store, A).status is BLACK and verdict(store, C).status is None


# -- accepted --------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_signed_manifest_syncs(drop, source, store, signer, key_file, encoding):
    publish(drop, {FULL: rows(A, B)}, signer, encoding)
    result = sync(source, store, key_file, HTTP)
    assert (result.published, result.version) == (True, "000001")
    assert verdict(store, A).status is BLACK


def test_signature_made_with_openssl_verifies(drop, store, signer, key_file, tmp_path):
    """The README's recipe: openssl pkeyutl -sign -rawin over manifest.json."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    private = tmp_path / "registry-key.pem"
    private.write_bytes(signer.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    publish(drop, {FULL: rows(A, B)}, None)
    subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(private),
                    "-in", str(drop / "manifest.json"), "-out", str(drop / "manifest.json.sig")],
                   check=True, timeout=30)
    assert sync(str(drop), store, key_file, HTTP).published


# -- refused: the store untouched ------------------------------------------------------------

def test_manifest_changed_after_signing_is_refused(drop, source, store, signer, key_file):
    before = signed_and_synced(drop, source, store, signer, key_file)
    signature = (drop / "manifest.json.sig").read_bytes()
    publish(drop, {FULL: rows(A, B), EXTRA: rows(C)}, None)  # new manifest, old signature
    write(drop / "manifest.json.sig", signature)
    refused(source, store, key_file, before,
            rf"manifest\.json\.sig: signature over .*manifest\.json does not verify with "
            rf"{key_file}")


def test_signature_by_another_key_is_refused(drop, source, store, signer, key_file):
    before = signed_and_synced(drop, source, store, signer, key_file)
    publish(drop, {FULL: rows(A, B), EXTRA: rows(C)}, Ed25519PrivateKey.generate())
    refused(source, store, key_file, before, f"does not verify with {key_file}")


def test_missing_signature_is_refused(drop, source, store, signer, key_file):
    before = signed_and_synced(drop, source, store, signer, key_file)
    publish(drop, {FULL: rows(A, B), EXTRA: rows(C)}, None)
    (drop / "manifest.json.sig").unlink()
    refused(source, store, key_file, before,
            rf"manifest\.json\.sig: missing: the signature over .*manifest\.json is required "
            rf"by the public key {key_file}")


def test_missing_manifest_is_refused_when_a_key_is_set(drop, source, store, signer, key_file):
    before = signed_and_synced(drop, source, store, signer, key_file)
    write(drop / EXTRA, rows(C))
    (drop / "manifest.json").unlink()
    refused(source, store, key_file, before, r"manifest\.json: (missing|HTTP 404)")


def test_signature_that_is_not_64_bytes_is_refused(drop, source, store, signer, key_file):
    before = signed_and_synced(drop, source, store, signer, key_file)
    publish(drop, {FULL: rows(A, B), EXTRA: rows(C)}, None)
    write(drop / "manifest.json.sig", b"not a signature\n")
    refused(source, store, key_file, before, r"manifest\.json\.sig: not an Ed25519 signature")


def test_bad_signature_over_a_url_downloads_no_list_file(drop, served, store, signer,
                                                         key_file):
    before = signed_and_synced(drop, served, store, signer, key_file)
    publish(drop, {FULL: rows(A, B), EXTRA: rows(C)}, Ed25519PrivateKey.generate())
    refused(served, store, key_file, before, "does not verify")
    [cache] = [p for p in (store.root / DOWNLOADS).iterdir() if p.is_dir()]
    assert sorted(p.name for p in cache.iterdir()) == [FULL, "manifest.json",
                                                      "manifest.json.sig"]


def test_key_that_is_not_ed25519_is_refused(drop, store, signer, tmp_path):
    publish(drop, {FULL: rows(A, B)}, signer)
    wrong = public_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "ec.pem")
    with pytest.raises(SyncError, match=rf"{wrong}: not an Ed25519 public key"):
        sync(str(drop), store, wrong)
    assert store.current_version() is None


def test_unsigned_drop_directory_syncs_when_no_key_is_set(drop, store):
    publish(drop, {FULL: rows(A, B)}, None)
    assert sync(str(drop), store).published


# -- no going back: the signed sequence ------------------------------------------------------

def files_of(drop) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in drop.iterdir()}


def test_last_months_signed_lists_served_again_are_refused(drop, source, store, signer,
                                                           key_file):
    """A replay: the registry's own signature, valid, over an older manifest and its files."""
    publish(drop, {FULL: rows(A, B)}, signer)
    assert sync(source, store, key_file, HTTP).version == "000001"
    last_month = files_of(drop)
    publish(drop, {FULL: rows(A, B, C)}, signer)
    assert sync(source, store, key_file, HTTP).version == "000002"
    before = store_contents(store)
    for name, data in last_month.items():
        write(drop / name, data)
    with pytest.raises(SyncError, match=r"manifest\.json: sequence: \d+ \(published .*\) is "
                                        r"older than sequence \d+ .* of version 000002 in "
                                        r"force: refused as a rollback"):
        sync(source, store, key_file, HTTP)
    assert store_contents(store) == before
    assert verdict(store, C).status is BLACK


def test_old_signed_manifest_over_a_url_downloads_no_list_file(drop, served, store, signer,
                                                               key_file):
    publish(drop, {FULL: rows(A, B)}, signer, sequence=1)
    sync(served, store, key_file, HTTP)
    publish(drop, {FULL: rows(A, B, C)}, signer, sequence=2)
    sync(served, store, key_file, HTTP)
    [cache] = [p for p in (store.root / DOWNLOADS).iterdir() if p.is_dir()]
    cached = files_of(cache)
    publish(drop, {FULL: rows(A)}, signer, sequence=1)
    with pytest.raises(SyncError, match="refused as a rollback"):
        sync(served, store, key_file, HTTP)
    assert files_of(cache) == cached  # the older list was not even downloaded


def test_a_signed_manifest_whose_sequence_is_in_force_is_a_no_op(drop, source, store, signer,
                                                                 key_file):
    publish(drop, {FULL: rows(A, B)}, signer, sequence=5)
    assert sync(source, store, key_file, HTTP).version == "000001"
    before = store_contents(store)
    publish(drop, {FULL: rows(B)}, signer, sequence=5)  # A unblocked, but not a new sequence
    result = sync(source, store, key_file, HTTP)
    assert (result.version, result.published) == ("000001", False)
    assert result.ignored == [result.ignored[0]]
    assert "sequence 5 is in force already (with other bytes" in result.ignored[0]
    assert store_contents(store) == before and verdict(store, A).status is BLACK


def test_a_signed_manifest_needs_a_sequence(drop, source, store, signer, key_file):
    manifest = json.dumps({"files": {FULL: hashlib.sha256(rows(A)).hexdigest()}}).encode()
    write(drop / FULL, rows(A))
    write(drop / "manifest.json", manifest)
    write(drop / "manifest.json.sig", signer.sign(manifest))
    with pytest.raises(SyncError, match=r"manifest\.json: sequence: missing: a signed manifest "
                                        r"must carry `sequence` and `published`"):
        sync(source, store, key_file, HTTP)
    assert store.current_version() is None


def test_status_shows_sequence_signer_and_each_file_as_parsed(drop, store, signer, key_file,
                                                              tmp_path):
    from helpers_process import run_eir

    manifest = publish(drop, {FULL: rows(A, B), EXTRA: b"imei,status\n" + C.encode() +
                              b",blacklist\n"}, signer, sequence=41)
    sync(str(drop), store, key_file)
    done = run_eir("lists", "status", "--store", str(store.root), "--json")
    [version] = json.loads(done.stdout)
    fingerprint = "SHA256:" + hashlib.sha256(signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    assert version["manifest"] == {
        "sequence": 41, "published": json.loads(manifest)["published"],
        "sha256": hashlib.sha256(manifest).hexdigest(), "signer": fingerprint}
    assert {s["name"]: s["sha256"] for s in version["sources"]} == {
        FULL: hashlib.sha256(rows(A, B)).hexdigest(),
        EXTRA: hashlib.sha256((drop / EXTRA).read_bytes()).hexdigest()}
    text = run_eir("lists", "status", "--store", str(store.root)).stdout
    assert f"manifest sequence 41 published {version['manifest']['published']}" in text
    assert f"signed by {fingerprint}" in text
    assert f"{FULL}: 2 rows sha256 {hashlib.sha256(rows(A, B)).hexdigest()}" in text
    if shutil.which("openssl"):  # an auditor finds the same fingerprint with openssl
        der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(key_file), "-outform",
                              "DER"], capture_output=True, check=True, timeout=30).stdout
        assert fingerprint == "SHA256:" + hashlib.sha256(der).hexdigest()
