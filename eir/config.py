"""Configuration: a YAML file validated into typed settings.

A bad file is refused with the key, the line and what is wrong: `config/eir.yaml:7:
diameter.watchdog_seconds: Input should be greater than 0`. Command-line flags override
the file (see eir.cli). Defaults here are the ones config/eir.yaml documents.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from eir.decision import UnknownPolicy

DEFAULT_CONFIG_PATH = Path("config/eir.yaml")
CONFIG_ENVIRONMENT_VARIABLE = "EIR_CONFIG"


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


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


class DiameterSettings(_Strict):
    origin_host: str = "eir.localdomain"
    origin_realm: str = "localdomain"
    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:3868", "[::]:3868"],
                              min_length=1)
    transport: Literal["tcp", "sctp"] = "tcp"
    host_ip_addresses: list[str] = Field(default_factory=list)
    product_name: str = "open EIR"
    vendor_id: int = Field(0, ge=0, le=0xFFFFFFFF)
    watchdog_seconds: float = Field(30.0, gt=0)
    cer_timeout_seconds: float = Field(10.0, gt=0)
    disconnect_timeout_seconds: float = Field(3.0, gt=0)
    max_message_bytes: int = Field(65536, ge=1024, le=0xFFFFFF)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_host_port(item)
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
        if not value or not value.isascii() or any(c.isspace() for c in value):
            raise ValueError("must be a non-empty DiameterIdentity (ASCII, no spaces)")
        return value


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


class ObservationSettings(_Strict):
    enabled: bool = True
    database: Path | None = None
    url: str | None = None  # postgresql://...: PostgreSQL instead of the SQLite database
    flush_seconds: float = Field(1.0, gt=0)
    msisdn_file: Path | None = None
    pseudonymise_key: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (the SQLite file is `database`)")
        return value


class GrandfatheringSettings(_Strict):
    cutoff_date: date | None = None


class LoggingSettings(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(_Strict):
    diameter: DiameterSettings = Field(default_factory=DiameterSettings)
    lists: ListSettings = Field(default_factory=ListSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    observations: ObservationSettings = Field(default_factory=ObservationSettings)
    grandfathering: GrandfatheringSettings = Field(default_factory=GrandfatheringSettings)
    dictionaries: list[Path] = Field(default_factory=list)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)


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
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
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
            lines.append(f"{where}: {key}: {message}")
        raise ConfigError("\n".join(lines)) from None
    base = path.parent
    source = settings.sync.source
    if source and "://" not in source:
        source = str(base / source)
    public_key = settings.sync.public_key
    if public_key:
        public_key = str(base / public_key)
    return settings.model_copy(update={
        "lists": settings.lists.model_copy(
            update={"files": [base / f for f in settings.lists.files]}),
        "store": settings.store.model_copy(update={
            "directory": base / settings.store.directory if settings.store.directory
            else None}),
        "sync": settings.sync.model_copy(update={"source": source, "public_key": public_key}),
        "observations": settings.observations.model_copy(update={
            key: base / value for key in ("database", "msisdn_file")
            if (value := getattr(settings.observations, key)) is not None}),
        "dictionaries": [base / d for d in settings.dictionaries],
    })


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
