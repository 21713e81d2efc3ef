"""Fetch: mirror what a registry publishes over HTTP(S) into a cache directory of the store.

At a base URL (`https://ceir.example/lists/`, or the URL of its manifest) the registry
publishes `manifest.json` — `{"files": {"NAME": "<sha256 hex>", ...}}`, the same manifest a
drop directory may hold — the files it names next to it, and, when it signs, the signature
`manifest.json.sig`. There is no directory listing over HTTP: the manifest is required, and
only the files it names are fetched.

    STORE/download/<host>-<hash>/          the cached copy: a drop directory (eir.lists.sync)
    STORE/download/<host>-<hash>.json      ETag and Last-Modified of each file, its sha256
    STORE/download/<host>-<hash>.lock      held while fetching and syncing from the copy

Every request is conditional when a cached copy and its validators exist (If-None-Match,
If-Modified-Since); a 304 keeps the cached copy, which must still match the manifest (else it
is fetched again, unconditionally). Downloads go to a temporary name and are renamed into the
cache only when complete (as long as the server's Content-Length said) and of the manifest's
sha256; each is capped at MAX_FILE_BYTES so a hostile or broken server cannot fill the disk,
and every socket operation times out after TIMEOUT_SECONDS. The manifest (and signature) are
installed in the cache last, once every file it names is there; files it no longer names are
then removed. Any failure raises FetchError naming the URL: files already cached stay, and
so does the previous manifest.

Transport (Transport): https:// with the certificate and host name verified against
`ca_file` or the system's trust store, TLS 1.2 at least, and a client certificate when the
registry requires one. A redirect is followed only within the source's origin (scheme, host,
port): one to http:// or to another host is refused before anything is requested there.
Whether plain http:// may be used at all is eir.lists.sync's decision (a setting and a signature).
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from eir.lists.manifest import ManifestError, parse_manifest

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
MAX_FILE_BYTES = 4 << 30  # a listed file larger than this is refused
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = 4096
TIMEOUT_SECONDS = 60.0  # per socket operation (connect, each read)
# A whole download must end by then, even from a server that trickles one byte a minute.
MIN_RATE_BYTES_PER_S = 64 << 10  # the deadline is TIMEOUT_SECONDS + size / this rate
_BLOCK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class FetchError(Exception):
    """A download failed or was refused; the message names the URL and why."""


@dataclass
class Fetched:
    directory: Path  # the cached copy, a drop directory holding the manifest and its files
    downloaded: list[str] = field(default_factory=list)  # names fetched anew
    not_modified: list[str] = field(default_factory=list)  # names the server answered 304


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class Transport:
    """How a registry URL is fetched (the `sync` section of the configuration).

    ca_file: the CA certificates (PEM) that the registry's server certificate must chain to;
        None: the system's trust store. The host name is always checked.
    client_certificate, client_key: a client certificate (PEM) for registries that require
        mutual TLS; the key may be in the certificate's file.
    allow_http: plain http:// may be used (eir.lists.sync also requires a signed manifest then).
    """

    allow_http: bool = False
    ca_file: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None

    @classmethod
    def of(cls, settings) -> "Transport":
        """From eir.core.config.SyncSettings."""
        return cls(settings.allow_http, _path(settings.ca_file),
                   _path(settings.client_certificate), _path(settings.client_key))

    def tls_context(self) -> ssl.SSLContext:
        """Certificate and host name verified; TLS 1.2 at least."""
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise FetchError(f"sync.ca_file: {self.ca_file}: cannot load: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.client_certificate is not None:
            try:
                context.load_cert_chain(
                    str(self.client_certificate),
                    str(self.client_key) if self.client_key else None)
            except (OSError, ssl.SSLError) as exc:
                raise FetchError(f"sync.client_certificate: {self.client_certificate}: cannot "
                                 f"load with its key: {getattr(exc, 'strerror', None) or exc}"
                                 ) from None
        return context


def _path(value) -> Path | None:
    return Path(value) if value else None


@contextmanager
def mirrored(url: str, cache_root: Path, *, signature: bool = False,
             check: Callable[[bytes, bytes | None, str], None] | None = None,
             transport: Transport | None = None) -> Iterator[Fetched]:
    """Bring the cache of `url` up to date and yield it, locked against other fetches of the
    same URL until the `with` block ends (the caller syncs from it meanwhile).

    signature: also fetch `manifest.json.sig` (None when the server has none, 404).
    check(manifest bytes, signature bytes or None, base URL): called before any listed file is
    fetched; whatever it raises stops the fetch (a bad signature downloads nothing more).
    transport: TLS trust and client certificate (default: the system's trust store).
    A redirect is followed only to the same scheme, host and port.
    """
    base = _base_url(url)
    opener = _opener(base, transport or Transport())
    key = _cache_key(base)
    cache_root.mkdir(parents=True, exist_ok=True)
    directory = cache_root / key
    directory.mkdir(exist_ok=True)
    with open(cache_root / f"{key}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield _Mirror(base, directory, cache_root / f"{key}.json", opener).run(signature,
                                                                                   check)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Mirror:
    def __init__(self, base: str, directory: Path, validators_path: Path,
                 opener: urllib.request.OpenerDirector):
        self.base = base
        self.directory = directory
        self.validators_path = validators_path
        self.validators = _load_json(validators_path)
        self.result = Fetched(directory)
        self.opener = opener
        self.opener.addheaders = [("User-Agent", "open-eir-sync"),
                                  ("Accept-Encoding", "identity")]

    def run(self, signature: bool,
            check: Callable[[bytes, bytes | None, str], None] | None) -> Fetched:
        for leftover in self.directory.glob(".*.part"):
            leftover.unlink(missing_ok=True)  # from a fetch that died mid-download
        staged: list[tuple[str, Path, dict]] = []  # manifest and signature, installed last
        try:
            manifest_bytes = self._small(MANIFEST, MAX_MANIFEST_BYTES, staged, required=True)
            expected = _parse_manifest(manifest_bytes, self._url(MANIFEST))
            signature_bytes = (self._small(SIGNATURE, MAX_SIGNATURE_BYTES, staged,
                                           required=False) if signature else None)
            if check is not None:
                check(manifest_bytes, signature_bytes, self.base)
            for name, digest in expected.items():
                self._file(name, digest.lower())
            for name, temporary, record in staged:
                os.replace(temporary, self.directory / name)
                self.validators[name] = _with_stat(record, self.directory / name)
            if not signature:
                (self.directory / SIGNATURE).unlink(missing_ok=True)
                self.validators.pop(SIGNATURE, None)
            keep = set(expected) | {MANIFEST, SIGNATURE}
            for path in self.directory.iterdir():
                if path.name not in keep and not path.name.startswith(".") and \
                        path.is_file():
                    path.unlink()
                    self.validators.pop(path.name, None)
        finally:
            for _, temporary, _ in staged:
                temporary.unlink(missing_ok=True)
            _save_json(self.validators_path, self.validators)
        return self.result

    def _url(self, name: str) -> str:
        return self.base + urllib.parse.quote(name)

    def _small(self, name: str, cap: int, staged: list, required: bool) -> bytes | None:
        """The manifest or signature: fetched to a temporary file, installed later."""
        cached = self.directory / name
        record = self.validators.get(name) if cached.is_file() else None
        temporary = self.directory / f".{name}.{os.getpid()}.part"
        outcome = self._get(name, record, temporary, cap, missing_ok=not required)
        if outcome is None:
            return None
        if outcome == "not modified":
            return cached.read_bytes()
        staged.append((name, temporary, outcome))
        return temporary.read_bytes()

    def _file(self, name: str, digest: str) -> None:
        cached = self.directory / name
        record = self.validators.get(name) if cached.is_file() else None
        temporary = self.directory / f".{name}.{os.getpid()}.part"
        try:
            outcome = self._get(name, record, temporary, MAX_FILE_BYTES)
            if outcome == "not modified":
                if _cached_sha256(cached, record) == digest:
                    return
                # The server says unchanged, the manifest says otherwise: ask again in full.
                outcome = self._get(name, None, temporary, MAX_FILE_BYTES)
            if outcome["sha256"] != digest:
                raise FetchError(f"{self._url(name)}: sha256: {outcome['sha256']} does not "
                                 f"match the manifest's {digest}")
            os.replace(temporary, cached)
            self.validators[name] = _with_stat(outcome, cached)
        finally:
            temporary.unlink(missing_ok=True)

    def _get(self, name: str, record: dict | None, temporary: Path, cap: int,
             missing_ok: bool = False) -> dict | str | None:
        """GET base+name into `temporary`: its validators and sha256; "not modified" (304);
        None (404, when missing_ok)."""
        url = self._url(name)
        request = urllib.request.Request(url)
        if record and record.get("etag"):
            request.add_header("If-None-Match", record["etag"])
        if record and record.get("last_modified"):
            request.add_header("If-Modified-Since", record["last_modified"])
        try:
            response = self.opener.open(request, timeout=TIMEOUT_SECONDS)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 304 and record:
                self.result.not_modified.append(name)
                return "not modified"
            if exc.code == 404 and missing_ok:
                return None
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise FetchError(f"{url}: {exc.reason}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise FetchError(f"{url}: {exc or type(exc).__name__}") from None
        with response:
            if response.status != 200:
                raise FetchError(f"{url}: HTTP {response.status} {response.reason}, "
                                 "expected 200")
            length = _content_length(response, url)
            if length is not None and length > cap:
                raise FetchError(f"{url}: {length} bytes, larger than the limit of {cap}")
            digest, received = hashlib.sha256(), 0
            deadline = time.monotonic() + TIMEOUT_SECONDS + (
                length if length is not None else cap) / MIN_RATE_BYTES_PER_S
            try:
                with open(temporary, "wb") as out:
                    while block := response.read(_BLOCK):
                        received += len(block)
                        if received > cap:
                            raise FetchError(f"{url}: larger than the limit of {cap} bytes")
                        if time.monotonic() > deadline:
                            raise FetchError(f"{url}: too slow: {received} bytes after "
                                             f"the whole download's deadline")
                        digest.update(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
            except (OSError, http.client.HTTPException) as exc:
                temporary.unlink(missing_ok=True)
                raise FetchError(f"{url}: download failed after {received} bytes: "
                                 f"{exc or type(exc).__name__}") from None
            except FetchError:
                temporary.unlink(missing_ok=True)
                raise
            if length is not None and received != length:
                temporary.unlink(missing_ok=True)
                raise FetchError(f"{url}: truncated: received {received} of the {length} "
                                 "bytes announced")
            headers = response.headers
        self.result.downloaded.append(name)
        return {"url": url, "etag": headers.get("ETag"),
                "last_modified": headers.get("Last-Modified"),
                "sha256": digest.hexdigest()}


def _opener(base: str, transport: Transport) -> urllib.request.OpenerDirector:
    handlers: list = [_SameOriginRedirects(base)]
    if base.lower().startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=transport.tls_context()))
    return urllib.request.build_opener(*handlers)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed only within the source's origin (scheme, host and port): a
    redirect from https:// to http:// would fetch the lists in clear, and one to another host
    would fetch them from a server the operator never named."""

    def __init__(self, base: str):
        self.origin = _origin(base)

    def redirect_request(self, request, response, code, message, headers, new_url):
        target = urllib.parse.urljoin(request.full_url, new_url)
        if _origin(target) != self.origin:
            response.close()
            shown = target if len(target) <= 200 else target[:200] + "..."
            raise FetchError(f"{request.full_url}: HTTP {code} redirect to {shown!r} refused: "
                             f"it leaves {self.origin[0]}://{self.origin[1]}:{self.origin[2]}")
        return super().redirect_request(request, response, code, message, headers, new_url)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1  # not a port: never the source's
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(
        scheme, 0)


def _base_url(url: str) -> str:
    """The URL the manifest and files sit under, ending in `/`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise FetchError(f"{url}: not an http:// or https:// URL")
    path = parts.path
    if path.endswith("/" + MANIFEST):
        path = path[:-len(MANIFEST)]
    elif not path.endswith("/"):
        path += "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _cache_key(base: str) -> str:
    host = urllib.parse.urlsplit(base).hostname or "source"
    slug = re.sub(r"[^A-Za-z0-9.-]", "_", host)[:60]
    return f"{slug}-{hashlib.sha256(base.encode()).hexdigest()[:12]}"


def _parse_manifest(data: bytes, url: str) -> dict[str, str]:
    try:
        files = parse_manifest(data, url).files
    except ManifestError as exc:
        raise FetchError(str(exc)) from None
    problems = []
    for name, digest in files.items():
        if (not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name
                or name in (MANIFEST, SIGNATURE) or len(name) > 255):
            problems.append(f"{url}: files.{name}: not a plain file name")
        elif not isinstance(digest, str) or not _SHA256.match(digest):
            problems.append(f"{url}: files.{name}: {digest!r} is not a sha256 (64 hex digits)")
    if problems:
        raise FetchError("\n".join(problems))
    return files


def _content_length(response, url: str) -> int | None:
    text = response.headers.get("Content-Length")
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise FetchError(f"{url}: bad Content-Length {text!r}") from None


def _cached_sha256(path: Path, record: dict | None) -> str:
    """The recorded sha256 while the file is as it was written, else hashed again."""
    stat = path.stat()
    if record and record.get("size") == stat.st_size and \
            record.get("mtime_ns") == stat.st_mtime_ns and record.get("sha256"):
        return record["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _with_stat(record: dict, path: Path) -> dict:
    stat = path.stat()
    return {**record, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _load_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or damaged: every request is then unconditional
    return document if isinstance(document, dict) else {}


def _save_json(path: Path, document: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)
