"""Configuration: a YAML file validated into typed settings.

A bad file is refused with the key, the line and what is wrong: `config/eir.yaml:7:
diameter.watchdog_seconds: Input should be greater than 0`. Command-line flags override
the file (see eir.cli). Defaults here are the ones config/eir.yaml documents.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import typing
import uuid
from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from eir.core.decision import UnknownPolicy
from eir.core.untrusted import DEFAULT_VALUE_CHARS

DEFAULT_CONFIG_PATH = Path("config/eir.yaml")
CONFIG_ENVIRONMENT_VARIABLE = "EIR_CONFIG"


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


ANY_ADDRESSES = ("0.0.0.0", "[::]")  # a bare Diameter listen PORT binds both


def expand_listen(text: str) -> list[str]:
    """A Diameter listen address: `HOST:PORT`, `[IPV6]:PORT`, or a bare `PORT` meaning every
    IPv4 and IPv6 address (as the default `0.0.0.0:3868`, `[::]:3868`)."""
    text = text.strip()
    addresses = [f"{host}:{text}" for host in ANY_ADDRESSES] if text.isdigit() else [text]
    for address in addresses:
        parse_host_port(address)  # raises ValueError, saying what is wrong
    return addresses


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` → (host, port)."""
    text = text.strip()
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if (not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535
            or ":" in host and not bracketed):
        raise ValueError(f"{text!r} is not HOST:PORT (IPv6 as [ADDR]:PORT)")
    if bracketed:
        ipaddress.IPv6Address(host)  # raises ValueError with its own message
    return host, int(port_text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _diameter_identity(value: str) -> str:
    if not value or not value.isascii() or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty DiameterIdentity (ASCII, no spaces)")
    return value


# -- peer security and overload (eir.net.security, eir.diameter.overload, .duplicates) -------

class AllowedPeerSettings(_Strict):
    """One entry of diameter.peers: a peer that may open a connection."""

    host: str  # its Origin-Host
    realm: str | None = None  # its Origin-Realm; null: any
    addresses: list[str] = Field(default_factory=list)  # networks or addresses; []: any

    @field_validator("host", "realm")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        return value if value is None else _diameter_identity(value)

    @field_validator("addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item)  # strict: 10.0.0.1/24 (host bits set) is refused
        return value


class TlsSettings(_Strict):
    """TLS on connect (RFC 6733 §13): listeners where the TLS handshake comes before CER."""

    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:5868", "[::]:5868"])
    certificate: Path  # PEM: our certificate (chain)
    key: Path  # PEM: its private key
    ca: Path | None = None  # PEM: the CA(s) that sign our peers' certificates
    require_client_cert: bool = True  # mutual TLS: a peer without a valid certificate is refused
    verify_origin_host: bool = True  # CER's Origin-Host must be a name in that certificate

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_host_port(item)
        return value


class DuplicateSettings(_Strict):
    """The cache of recent answers for retransmissions (eir.diameter.duplicates). Its memory
    is bounded by both budgets, exactly: an entry counts its answer bytes plus ~224 bytes
    (digests and bookkeeping), so 100,000 ECAs of ~200 bytes take ~42 MB, and a flood of
    requests with large answers fills `max_bytes` with fewer entries."""

    window_seconds: float = Field(60.0, ge=0)  # 0: no duplicate detection
    max_entries: int = Field(100_000, ge=0)  # 0: no duplicate detection
    max_bytes: int = Field(64 << 20, ge=0)  # 0: no duplicate detection


class OverloadSettings(_Strict):
    max_connections: int = Field(1024, ge=1)
    max_connections_per_address: int = Field(64, ge=1)
    # A connection's turn ends after this many requests or this many bytes of requests,
    # whichever comes first (eir.diameter.overload: a byte of request costs up to ~0.2 µs).
    requests_per_turn: int = Field(16, ge=1)
    bytes_per_turn: int = Field(2048, ge=1)
    # Requests, and bytes of requests, waiting for their turn; beyond: 3004 TOO_BUSY.
    max_queued_per_connection: int = Field(4096, ge=1)
    max_queued_total: int = Field(16384, ge=1)
    max_queued_bytes_per_connection: int = Field(1 << 20, ge=1)
    max_queued_bytes_total: int = Field(4 << 20, ge=1)
    read_bytes: int = Field(65536, ge=4096)  # at most this much read per read
    idle_timeout_seconds: float = Field(0.0, ge=0)  # 0: never


class DiameterSettings(_Strict):
    origin_host: str = "eir.localdomain"
    origin_realm: str = "localdomain"
    # Before `listen`: validated first, so that `listen: []` may mean "TLS only".
    tls: TlsSettings | None = None
    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:3868", "[::]:3868"])
    transport: Literal["tcp", "sctp"] = "tcp"
    host_ip_addresses: list[str] = Field(default_factory=list)
    product_name: str = "open EIR"
    vendor_id: int = Field(0, ge=0, le=0xFFFFFFFF)
    watchdog_seconds: float = Field(30.0, gt=0)
    cer_timeout_seconds: float = Field(10.0, gt=0)
    disconnect_timeout_seconds: float = Field(3.0, gt=0)
    max_message_bytes: int = Field(65536, ge=1024, le=0xFFFFFF)
    # AVPs a request may hold, counted at every depth of grouping (each costs ~1 µs to
    # decode and validate); beyond: 5009 DIAMETER_AVP_OCCURS_TOO_MANY_TIMES
    # (eir.diameter.overload).
    max_avps_per_message: int = Field(128, ge=32)
    # Plain ECRs answered by the C fast path (eir/lists/_ecr.c, when built), the rest by the
    # generic path; false: every request by the generic path (the benchmarks' baseline).
    # Same answers either way (tests/test_fast_path.py).
    fast_path: bool = True
    peers: list[AllowedPeerSettings] = Field(default_factory=list)  # []: any peer
    duplicates: DuplicateSettings = Field(default_factory=DuplicateSettings)
    # A CER from an Origin-Host that has an open connection already (eir.diameter.identities):
    # refuse (CEA 5012, RFC 6733 §5.6 R-Reject) or allow (served, logged and counted).
    duplicate_peers: Literal["refuse", "allow"] = "allow"
    overload: OverloadSettings = Field(default_factory=OverloadSettings)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: list[str], info: ValidationInfo) -> list[str]:
        tls = info.data.get("tls")
        if not value and not (tls is not None and tls.listen):
            raise ValueError("List should have at least 1 item (or, for TLS only, "
                             "addresses in diameter.tls.listen)")
        return [address for item in value for address in expand_listen(item)]

    @field_validator("peers")
    @classmethod
    def _peers(cls, value: list[AllowedPeerSettings]) -> list[AllowedPeerSettings]:
        seen = set()
        for peer in value:
            if peer.host.lower() in seen:
                raise ValueError(f"{peer.host} is listed twice")
            seen.add(peer.host.lower())
        return value

    @field_validator("host_ip_addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_address(item)
        return value

    @field_validator("origin_host", "origin_realm")
    @classmethod
    def _identity(cls, value: str) -> str:
        return _diameter_identity(value)


class ListSettings(_Strict):
    files: list[Path] = Field(default_factory=list)
    unknown_policy: UnknownPolicy = UnknownPolicy.UNKNOWN


class StoreSettings(_Strict):
    directory: Path | None = None
    keep: int = Field(5, ge=1)
    poll_seconds: float = Field(5.0, gt=0)


class SyncSettings(_Strict):
    source: str | None = None
    interval_seconds: float = Field(3600.0, gt=0)
    public_key: str | None = None
    # URL sources (eir.lists.fetch.Transport): plain http:// only with this set and a public_key;
    # the CA (PEM) the registry's certificate must chain to (None: the system's); a client
    # certificate and key (PEM) for registries that require mutual TLS.
    allow_http: bool = False
    ca_file: str | None = None
    # Lists older than this (since the registry published their manifest, else since they
    # were compiled) set eir_list_stale to 1: a registry gone quiet, or someone holding the
    # EIR on old lists. None: no alert.
    max_age_seconds: float | None = Field(None, gt=0)
    client_certificate: str | None = None
    client_key: str | None = None

    @model_validator(mode="after")
    def _client_key_needs_certificate(self) -> "SyncSettings":
        if self.client_key and not self.client_certificate:
            raise ValueError("client_key is set without client_certificate")
        return self


class ObservationSettings(_Strict):
    enabled: bool = True
    database: Path | None = None
    url: str | None = None  # postgresql://...: PostgreSQL instead of the SQLite database
    flush_seconds: float = Field(1.0, gt=0)
    msisdn_file: Path | None = None
    pseudonymise_key: str | None = None
    # An IMEI seen with more than this many distinct IMSIs on one day counts as a clone hit
    # (eir_clone_hits_total); null: no clone detection.
    clone_threshold: int | None = Field(2, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (the SQLite file is `database`)")
        return value


class GrandfatheringSettings(_Strict):
    cutoff_date: date | None = None


class LogRateLimitSettings(_Strict):
    """Lines about a peer (eir.core.logs.LogRateLimit): at most `lines` of one kind (logger,
    message, level) from one address per `interval_seconds`, then one line saying how many
    were suppressed, so that no peer makes the EIR write much more than it sends."""

    lines: int = Field(100, ge=0)  # 0: no limit
    interval_seconds: float = Field(10.0, gt=0)
    # (kind, address) pairs tracked at once; beyond, the lines of new pairs share one limit
    max_keys: int = Field(1024, ge=1)


class LoggingSettings(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"  # json: one object per line (eir.core.logs)
    show_imsi: bool = False  # False: IMSIs in logs and audit masked, 00101******6789
    # A value a peer chose (Origin-Host, Session-Id, IMEI, HTTP path...) is shown with its
    # control characters escaped and cut past this many characters ("...[N more chars]").
    max_value_chars: int = Field(DEFAULT_VALUE_CHARS, ge=16)
    max_message_chars: int = Field(4096, ge=256)  # a whole log message, cut likewise
    rate_limit: LogRateLimitSettings = Field(default_factory=LogRateLimitSettings)


# -- operations: metrics, admin API, audit (eir.interfaces.metrics, .api, eir.core.logs) ------

LOOPBACK = "127.0.0.1"


def parse_local_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPV6]:PORT`, or a bare `PORT` meaning 127.0.0.1:PORT (the HTTP
    endpoints are bound to loopback unless an address is given)."""
    text = text.strip()
    if text.isdigit():
        text = f"{LOOPBACK}:{text}"
    return parse_host_port(text)


class _HttpListenSettings(_Strict):
    """An HTTP/1.1 endpoint (eir.interfaces.api.HttpEndpoint, limits in eir.net.http1)."""

    listen: str | None = None  # HOST:PORT or PORT (127.0.0.1); null: off
    # Connections kept at once, and from one address. When full, a new connection closes
    # the longest-idle one (not answering a whole request: between requests, or with a
    # request still arriving) to make room; it is refused only when every connection in its
    # way is answering one. So idle or slow connections never keep /healthz, /readyz or
    # /metrics from answering.
    max_connections: int = Field(64, ge=1)
    max_connections_per_address: int = Field(16, ge=1)
    # A connection that sends nothing is closed after this long: a new one before its first
    # byte, a kept-alive one between requests (uvicorn's timeout_keep_alive).
    idle_timeout_seconds: float = Field(5.0, gt=0)
    # A request (head and body) must be whole this long after its first byte, else the
    # connection is closed (slowloris: a head sent a byte at a time).
    request_read_timeout_seconds: float = Field(10.0, gt=0)
    # A request head (request line and headers) still incomplete after this many bytes is
    # answered 400 and the connection closed (h11's max_incomplete_event_size: it bounds
    # what a slow connection makes the server hold; a head that comes whole in one read is
    # bounded by that read, 256 KiB).
    max_incomplete_head_bytes: int = Field(16384, ge=1024)
    # A request body must come with a Content-Length of at most this (413 otherwise, 411
    # for a chunked body), checked before the app reads it.
    max_body_bytes: int = Field(65536, ge=0)
    backlog: int = Field(1024, ge=1)  # the listening socket's accept queue

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_local_listen(value)
        return value


class MetricsSettings(_HttpListenSettings):
    pass


API_TOKEN_ENVIRONMENT_VARIABLE = "EIR_API_TOKEN"
API_READ_TOKEN_ENVIRONMENT_VARIABLE = "EIR_API_READ_TOKEN"
API_TOKEN_MIN_LENGTH = 16


def _token_from(variable: str, setting: SecretStr | None) -> str | None:
    """$`variable` if set, else `setting`; ConfigError if the variable is too short."""
    token = os.environ.get(variable)
    if token is not None:
        if len(token) < API_TOKEN_MIN_LENGTH:
            raise ConfigError(f"${variable}: must be at least {API_TOKEN_MIN_LENGTH} "
                              "characters")
        return token
    return setting.get_secret_value() if setting is not None else None


class ApiSettings(_HttpListenSettings):
    # Bearer token of the admin and lookup API; $EIR_API_TOKEN overrides it. Required when
    # `listen` is set. Kept as a SecretStr: printing the settings shows '**********'.
    token: SecretStr | None = None
    # The read-only role's token ($EIR_API_READ_TOKEN overrides it): it logs in to the web
    # console (eir.interfaces.console) as a reader, who looks up and browses but changes
    # nothing (a call centre). null: no read-only role.
    read_only_token: SecretStr | None = None

    @field_validator("token", "read_only_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < API_TOKEN_MIN_LENGTH:
            raise ValueError(f"must be at least {API_TOKEN_MIN_LENGTH} characters")
        return value

    def effective_token(self) -> str | None:
        """$EIR_API_TOKEN if set, else `token`; ConfigError if either is too short."""
        return _token_from(API_TOKEN_ENVIRONMENT_VARIABLE, self.token)

    def effective_read_only_token(self) -> str | None:
        """$EIR_API_READ_TOKEN if set, else `read_only_token`."""
        return _token_from(API_READ_TOKEN_ENVIRONMENT_VARIABLE, self.read_only_token)


class ConsoleSettings(_Strict):
    """The web console (eir.interfaces.console) at /console on the admin API's endpoint."""

    enabled: bool = True
    # A login lasts this long (the signed session cookie's age), then asks for the token again.
    session_seconds: float = Field(8 * 3600.0, gt=0)
    # The session cookie's Secure flag (sent back over HTTPS only): null, when the request
    # came over TLS; true, always (the console behind a TLS-terminating reverse proxy).
    secure_cookie: bool | None = None
    # Failed logins from one address within login_window_seconds; beyond, every login from
    # it is refused (429) until the window has passed: a token cannot be guessed by trying.
    max_login_failures: int = Field(5, ge=1)
    login_window_seconds: float = Field(300.0, gt=0)
    # Addresses whose failures are tracked at once; beyond, the new ones share one count.
    max_tracked_addresses: int = Field(4096, ge=1)
    # The native CSV list the console edits (local rules); it must be one of lists.files,
    # so that a reload applies it; with a store, any file, published into the store at each
    # change (eir.lists.sync.publish_local). null: no local rules.
    local_list: Path | None = None
    # Every change made in the console (rules, rollback, unpin, sync), and every login,
    # one JSON line: time, act, role, address, before, after. null: console.jsonl in the
    # store directory, else in the current directory.
    journal: Path | None = None
    # Observations shown per lookup (the newest days first).
    max_sightings: int = Field(100, ge=1, le=10000)
    # How often the traffic view asks for fresh numbers.
    refresh_seconds: float = Field(5.0, ge=1)


class AuditSettings(_Strict):
    enabled: bool = False
    sample: float = Field(1.0, ge=0.0, le=1.0)  # share of verdicts audited; 1: all
    path: Path | None = None  # default: audit.jsonl in the store directory, else here
    flush_seconds: float = Field(1.0, gt=0)


# -- N5g-eir over HTTP/2 (eir.interfaces.sbi) -------------------------------------------------

class SbiTlsSettings(_Strict):
    """The N5g-eir listener over TLS (https, ALPN h2)."""

    listen: str  # HOST:PORT
    certificate: Path  # PEM: our certificate (chain)
    key: Path  # PEM: its private key
    ca: Path | None = None  # PEM: the CA(s) that sign the clients' certificates
    require_client_cert: bool = False  # mutual TLS (needs `ca`)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_host_port(value)
        return value


class NrfSettings(_Strict):
    """Registration with an NRF as a 5G_EIR NF instance (TS 29.510 NFManagement)."""

    url: str  # the NRF's apiRoot: http://nrf:7777 (h2c) or https://nrf:443 (TLS, ALPN h2)
    # Our NF instance id (a UUID); null: a UUID derived from diameter.origin_host, so that
    # a restart registers the same instance again.
    nf_instance_id: str | None = None
    # The address the AMFs reach our N5g-eir on, HOST:PORT (advertised in the NF profile);
    # null: the sbi.listen address (which then must not be a wildcard).
    advertise: str | None = None
    heartbeat_seconds: int = Field(10, ge=1)  # asked for; the NRF's answer decides
    ca: Path | None = None  # PEM: the CA of an https NRF's certificate (null: the system's)
    # How AMFs choose among several 5G-EIR instances (TS 29.510 NFProfile, advertised when
    # set): priority, lower preferred; capacity, a relative weight among instances of equal
    # priority; locality, e.g. the site, for AMFs that prefer their own. null: not sent.
    priority: int | None = Field(None, ge=0, le=65535)
    capacity: int | None = Field(None, ge=0, le=65535)
    locality: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[ -~]+$")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// (h2c) or https:// URL")
        return value.rstrip("/")

    @field_validator("nf_instance_id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        return str(uuid.UUID(value)) if value is not None else None

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value


class SbiSettings(_Strict):
    listen: str | None = None  # HOST:PORT of the h2c (cleartext HTTP/2) listener; null: off
    tls: SbiTlsSettings | None = None
    # Connections at once, and from one source address (counted from accept; beyond: closed
    # at once with a log line).
    max_connections: int = Field(256, ge=1)
    max_connections_per_address: int = Field(32, ge=1)
    # Requests in flight per connection (SETTINGS_MAX_CONCURRENT_STREAMS); a stream beyond
    # is refused alone (RST_STREAM REFUSED_STREAM, RFC 9113 §5.1.2).
    max_concurrent_streams: int = Field(128, ge=1)
    # SETTINGS_MAX_HEADER_LIST_SIZE, and the most bytes one header block (HEADERS and its
    # CONTINUATIONs) may have before it is decoded; beyond: GOAWAY ENHANCE_YOUR_CALM.
    max_header_list_bytes: int = Field(8192, ge=1024, le=65536)
    # Work per connection per turn of the event loop: at most this many frames and (beyond
    # the first frame) bytes; the rest waits for the next turn, the connection unread.
    frames_per_turn: int = Field(8, ge=1)
    bytes_per_turn: int = Field(16384, ge=1024)
    read_bytes: int = Field(65536, ge=4096)  # at most this much read per read
    # Floods (GOAWAY ENHANCE_YOUR_CALM beyond): streams reset by the client or refused by us
    # (rapid reset, CVE-2023-44487), and frames that carry no request (SETTINGS, PING,
    # PRIORITY, WINDOW_UPDATE, empty DATA, unknown types), per second per connection, with
    # `flood_burst_seconds` worth of either allowed at once.
    max_resets_per_second: float = Field(100.0, gt=0)
    max_control_frames_per_second: float = Field(1000.0, gt=0)
    flood_burst_seconds: float = Field(10.0, gt=0)
    # A connection must send the HTTP/2 preface (magic and SETTINGS) within this (over TLS,
    # the handshake before it has as long again); and is closed (GOAWAY NO_ERROR) after
    # this long without a request.
    preface_timeout_seconds: float = Field(10.0, gt=0)
    idle_timeout_seconds: float = Field(300.0, ge=0)  # 0: never
    # After our GOAWAY on cleartext, what the client still sends is read and dropped for at
    # most this long before the close (a close with unread data would send a TCP reset,
    # which can overtake the GOAWAY); 0: closed at once.
    close_linger_seconds: float = Field(2.0, ge=0)
    # The common request (one HEADERS frame, a plain GET) decoded and answered with
    # pre-encoded frames beside h2 (eir.interfaces.h2wire); false: h2 does every frame (the
    # bench baseline, bench/sbi.py --generic).
    fast_path: bool = True
    nrf: NrfSettings | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value


class Settings(_Strict):
    workers: int = Field(0, ge=0)  # worker processes (eir.serve.workers); 0: one per core
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"  # uvloop: pip install open-eir[fast]
    diameter: DiameterSettings = Field(default_factory=DiameterSettings)
    lists: ListSettings = Field(default_factory=ListSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    observations: ObservationSettings = Field(default_factory=ObservationSettings)
    grandfathering: GrandfatheringSettings = Field(default_factory=GrandfatheringSettings)
    dictionaries: list[Path] = Field(default_factory=list)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    sbi: SbiSettings = Field(default_factory=SbiSettings)


def default_config_path() -> Path | None:
    """$EIR_CONFIG, else ./config/eir.yaml if present, else none (built-in defaults)."""
    from_environment = os.environ.get(CONFIG_ENVIRONMENT_VARIABLE)
    if from_environment:
        return Path(from_environment)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_settings(path: Path | None) -> Settings:
    """Settings from a YAML file (relative paths in it are relative to the file)."""
    if path is None:
        return Settings()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(path, exc)) from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    try:
        settings = Settings.model_validate(document)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            location = [part for part in error["loc"] if not str(part).startswith("function-")]
            key = ".".join(str(part) for part in location)
            line = _line_of(text, location)
            where = f"{path}:{line}" if line else str(path)
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message += _suggestion(location)
            lines.append(f"{where}: {key}: {message}")
        raise ConfigError("\n".join(lines)) from None
    base = path.parent
    source = settings.sync.source
    if source and "://" not in source:
        source = str(base / source)
    sync_paths = {key: str(base / value) for key in ("public_key", "ca_file",
                                                      "client_certificate", "client_key")
                  if (value := getattr(settings.sync, key))}
    return settings.model_copy(update={
        "lists": settings.lists.model_copy(
            update={"files": [base / f for f in settings.lists.files]}),
        "store": settings.store.model_copy(update={
            "directory": base / settings.store.directory if settings.store.directory
            else None}),
        "sync": settings.sync.model_copy(update={"source": source, **sync_paths}),
        "observations": settings.observations.model_copy(update={
            key: base / value for key in ("database", "msisdn_file")
            if (value := getattr(settings.observations, key)) is not None}),
        "dictionaries": [base / d for d in settings.dictionaries],
        "diameter": _tls_paths_from(settings.diameter, base),
        "audit": settings.audit.model_copy(update={
            "path": base / settings.audit.path if settings.audit.path else None}),
        "sbi": _sbi_paths_from(settings.sbi, base),
        "console": settings.console.model_copy(update={
            key: base / value for key in ("local_list", "journal")
            if (value := getattr(settings.console, key)) is not None}),
    })


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """`FILE:LINE:COLUMN: not valid YAML: problem`, not PyYAML's `in "<unicode string>"`."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def _suggestion(location: list) -> str:
    """` (did you mean KEY?)` for a misspelt key, from the keys valid where it stands."""
    model: type[BaseModel] | None = Settings
    for part in location[:-1]:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        model = _section_model(field.annotation) if field is not None else None
    if model is None:
        return ""
    close = difflib.get_close_matches(str(location[-1]), list(model.model_fields), n=1)
    if not close:
        return ""
    parent = [str(part) for part in location[:-1] if not isinstance(part, int)]
    return f" (did you mean {'.'.join([*parent, close[0]])}?)"


def _section_model(annotation: object) -> type[BaseModel] | None:
    """The settings class a field holds, directly or in a list or an Optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _section_model(argument)
        if found is not None:
            return found
    return None


def _tls_paths_from(diameter: DiameterSettings, base: Path) -> DiameterSettings:
    """diameter.tls's certificate, key and CA relative to the configuration file."""
    tls = diameter.tls
    if tls is None:
        return diameter
    return diameter.model_copy(update={"tls": tls.model_copy(update={
        key: base / value for key in ("certificate", "key", "ca")
        if (value := getattr(tls, key)) is not None})})


def _sbi_paths_from(sbi: SbiSettings, base: Path) -> SbiSettings:
    """sbi.tls's files and sbi.nrf.ca relative to the configuration file."""
    update: dict[str, object] = {}
    if sbi.tls is not None:
        update["tls"] = sbi.tls.model_copy(update={
            key: base / value for key in ("certificate", "key", "ca")
            if (value := getattr(sbi.tls, key)) is not None})
    if sbi.nrf is not None and sbi.nrf.ca is not None:
        update["nrf"] = sbi.nrf.model_copy(update={"ca": base / sbi.nrf.ca})
    return sbi.model_copy(update=update) if update else sbi


def _line_of(text: str, location: list) -> int | None:
    """The 1-based line of the key at `location` in the YAML text, as far as it exists."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
