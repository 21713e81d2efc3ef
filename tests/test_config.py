"""Configuration: the documented example equals the defaults, and bad files say where."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from eir.core.config import ConfigError, Settings, load_settings, parse_host_port
from eir.core.decision import UnknownPolicy
from eir.lists.native import load_rule_set, read_native_csv

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config" / "eir.yaml"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eir.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return str(caught.value)


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= model_keys(field.annotation, f"{prefix}{name}.")
    return keys


def yaml_keys(document: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in document.items():
        keys.add(prefix + name)
        if isinstance(value, dict):
            keys |= yaml_keys(value, f"{prefix}{name}.")
    return keys


# -- the documented example ----------------------------------------------------------------

def test_example_config_equals_the_built_in_defaults_except_list_files():
    settings = load_settings(EXAMPLE_CONFIG)
    defaults = Settings()
    assert settings.diameter == defaults.diameter
    assert settings.logging == defaults.logging
    assert settings.dictionaries == defaults.dictionaries
    assert settings.lists.unknown_policy == defaults.lists.unknown_policy
    assert settings.console.local_list is not None  # the local rules, shipped empty
    console = settings.console.model_copy(update={"local_list": None})
    assert settings.model_copy(update={"lists": defaults.lists,
                                       "console": console}) == defaults


def test_example_config_lists_the_example_and_local_lists_relative_to_itself():
    settings = load_settings(EXAMPLE_CONFIG)
    lists = ROOT / "config" / "lists"
    assert [path.resolve() for path in settings.lists.files] == [
        (lists / "example.csv").resolve(), (lists / "local.csv").resolve()]
    assert all(path.is_file() for path in settings.lists.files)
    # The console edits the local list, shipped with its header and no rule.
    assert settings.console.local_list.resolve() == (lists / "local.csv").resolve()
    assert read_native_csv(settings.console.local_list) == []


def test_the_lists_version_quoted_in_the_docs_is_the_shipped_lists_one():
    settings = load_settings(EXAMPLE_CONFIG)
    version = load_rule_set(settings.lists.files, settings.lists.unknown_policy).version
    for document in ("README.md", "docs/PRODUCTION.md"):
        quoted = set(re.findall(r"(?:lists version |\"list_version\":\")([0-9a-f]{12})\b",
                                (ROOT / document).read_text(encoding="utf-8")))
        assert quoted == {version}, document


def test_example_config_documents_every_setting():
    document = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    assert yaml_keys(document) == model_keys(Settings)


def test_missing_or_empty_config_is_the_defaults(tmp_path):
    assert load_settings(None) == Settings()
    assert load_settings(write_config(tmp_path, "# nothing\n")) == Settings()


def test_config_values_are_read(tmp_path):
    path = write_config(tmp_path, """\
        diameter:
          origin_host: eir.example.org
          listen: ["127.0.0.1:3869", "[::1]:3869"]
          watchdog_seconds: 6.5
        lists:
          files: [a.csv, /abs/b.csv]
          unknown_policy: greylisted
        logging: {level: debug}
        """)
    settings = load_settings(path)
    assert settings.diameter.origin_host == "eir.example.org"
    assert settings.diameter.listen == ["127.0.0.1:3869", "[::1]:3869"]
    assert settings.diameter.watchdog_seconds == 6.5
    assert settings.lists.files == [tmp_path / "a.csv", Path("/abs/b.csv")]
    assert settings.lists.unknown_policy is UnknownPolicy.GREYLISTED
    assert settings.logging.level == "debug"


# -- bad configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, line, key, detail", [
    ("diameter:\n  origin_host: a\n  colour: blue\n", 3, "diameter.colour", "Extra inputs"),
    ("logging:\n  level: info\nfoo: 1\n", 3, "foo", "Extra inputs"),
    ("diameter:\n  watchdog_seconds: soon\n", 2, "diameter.watchdog_seconds", "number"),
    ("diameter:\n\n  watchdog_seconds: -5\n", 3, "diameter.watchdog_seconds", "greater than 0"),
    ("diameter:\n  watchdog_seconds: 0\n", 2, "diameter.watchdog_seconds", "greater than 0"),
    ("diameter:\n  listen:\n    - nowhere\n", 2, "diameter.listen", "HOST:PORT"),
    ("diameter:\n  listen: ['[::1:3868']\n", 2, "diameter.listen", "HOST:PORT"),
    ("diameter:\n  listen: ['1.2.3.4:99999']\n", 2, "diameter.listen", "HOST:PORT"),
    ("diameter:\n  listen:\n    - '127.0.0.1:3868'\n    - [1]\n", 4, "diameter.listen.1",
     "string"),
    ("diameter:\n  listen: []\n", 2, "diameter.listen", "at least 1"),
    ("diameter:\n  transport: udp\n", 2, "diameter.transport", "tcp"),
    ("diameter:\n  origin_host: 'has space'\n", 2, "diameter.origin_host", "DiameterIdentity"),
    ("diameter:\n  host_ip_addresses: [not-an-ip]\n", 2, "diameter.host_ip_addresses",
     "IP"),
    ("diameter:\n  max_message_bytes: 10\n", 2, "diameter.max_message_bytes", "1024"),
    ("diameter:\n  max_avps_per_message: 8\n", 2, "diameter.max_avps_per_message",
     "greater than or equal to 32"),
    ("diameter:\n  overload:\n    bytes_per_turn: 0\n", 3, "diameter.overload.bytes_per_turn",
     "greater than or equal to 1"),
    ("lists:\n  unknown_policy: maybe\n", 2, "lists.unknown_policy", "unknown"),
    ("lists:\n  files: notalist\n", 2, "lists.files", "list"),
    ("logging:\n  level: loud\n", 2, "logging.level", "debug"),
    ("sbi:\n  nrf:\n    url: http://nrf\n    priority: 65536\n", 4, "sbi.nrf.priority",
     "less than or equal to 65535"),
    ("sbi:\n  nrf:\n    url: http://nrf\n    capacity: -1\n", 4, "sbi.nrf.capacity",
     "greater than or equal to 0"),
    ("sbi:\n  nrf:\n    url: http://nrf\n    locality: ''\n", 4, "sbi.nrf.locality",
     "at least 1 character"),
    ("sbi:\n  nrf:\n    url: http://nrf\n    locality: \"site\\na\"\n", 4,
     "sbi.nrf.locality", "pattern"),
    ("diameter: 5\n", 1, "diameter", ""),
])
def test_bad_config_names_file_line_and_dotted_key(tmp_path, text, line, key, detail):
    path = write_config(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert detail in message


def test_every_bad_key_is_reported(tmp_path):
    path = write_config(tmp_path, "diameter:\n  watchdog_seconds: -1\n  transport: udp\n")
    lines = config_error(path).splitlines()
    assert sorted(tuple(line.split(": ")[0:2]) for line in lines) == [
        (f"{path}:2", "diameter.watchdog_seconds"), (f"{path}:3", "diameter.transport")]


@pytest.mark.parametrize("text", ["diameter:\n  listen: [unclosed\n",
                                  "diameter:\n\torigin_host: x\n",
                                  "a: 1\n a: 2\n b\n"])
def test_bad_yaml_names_file_and_line(tmp_path, text):
    path = write_config(tmp_path, text)
    message = config_error(path)
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: not valid YAML: ", message), message
    assert "<unicode string>" not in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    message = config_error(write_config(tmp_path, text))
    assert "mapping" in message


def test_missing_config_file_names_it(tmp_path):
    path = tmp_path / "absent.yaml"
    message = config_error(path)
    assert message.startswith(f"{path}: ") and "No such file" in message


# -- listen addresses ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0.0.0.0:3868", ("0.0.0.0", 3868)),
    ("[::]:3868", ("::", 3868)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_parse_host_port(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["3868", ":3868", "host:", "host:port", "[::1]3868",
                                  "[zz::1]:3868", "host:70000"])
def test_parse_host_port_refuses(text):
    with pytest.raises(ValueError):
        parse_host_port(text)


@pytest.mark.parametrize("text", ["::1:3868", "2001:db8::5:3868"])
def test_parse_host_port_refuses_unbracketed_ipv6(text):
    """Ambiguous: "2001:db8::5:3868" is itself an IPv6 address; the documented form is
    [ADDR]:PORT, so guessing which part is the port would silently listen elsewhere."""
    with pytest.raises(ValueError):
        parse_host_port(text)


@pytest.mark.parametrize("text, line, key, detail", [
    ("sync:\n  client_key: eir.key\n", 1, "sync", "client_key is set without client_certificate"),
    ("sync:\n  max_age_seconds: 0\n", 2, "sync.max_age_seconds", "greater than 0"),
    ("sync:\n  allow_http: sometimes\n", 2, "sync.allow_http", "boolean"),
])
def test_bad_sync_transport_settings_are_named(tmp_path, text, line, key, detail):
    path = write_config(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert detail in message


def test_sync_key_and_tls_files_are_relative_to_the_config(tmp_path):
    settings = load_settings(write_config(tmp_path, """\
        sync:
          public_key: keys/registry.pub.pem
          ca_file: tls/ca.pem
          client_certificate: tls/eir.pem
          client_key: /etc/eir/eir.key
        """))
    assert (settings.sync.public_key, settings.sync.ca_file, settings.sync.client_certificate,
            settings.sync.client_key) == (
        str(tmp_path / "keys/registry.pub.pem"), str(tmp_path / "tls/ca.pem"),
        str(tmp_path / "tls/eir.pem"), "/etc/eir/eir.key")
