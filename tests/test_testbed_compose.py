"""The lab testbed (docker-compose.yml and testbed/), checked without a Docker engine.

Each `check_*` function reads the compose file and the configs it names, as the containers
would see them through their bind mounts, and returns the problems it finds (empty: none).
The tests run every check on the repository, then again on copies broken on purpose, one
edit each, to show that each check notices what it is there to notice. The last test runs
Debian's freeDiameter with the MME's freeDiameter config against `eir serve` with the lab's
EIR config.
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from eir.core.config import ConfigError, load_settings, parse_host_port
from eir.lists.native import ListError
from eir.serve.server import load_rules
from helpers_process import LoggedProcess, run_eir

ROOT = Path(__file__).resolve().parent.parent

SERVICES = ("mongodb", "subscriber", "hss", "pcrf", "mme", "sgwc", "sgwu", "smf", "upf",
            "eir", "enb", "ue", "prometheus", "grafana")
OPEN5GS_DAEMONS = {"hss": "open5gs-hssd", "pcrf": "open5gs-pcrfd", "mme": "open5gs-mmed",
                   "sgwc": "open5gs-sgwcd", "sgwu": "open5gs-sgwud", "smf": "open5gs-smfd",
                   "upf": "open5gs-upfd"}
MME_IMAGE_VARIABLE = "OPEN5GS_MME_IMAGE"
DIAMETER_PORT = 3868  # freeDiameter's default Port, and a ConnectPeer's

# The scenario of testbed/README.md: the list in force (eir.yaml's lists.files) has the UE's
# IMEI blacklisted; its prepared variant beside it has it whitelisted.
WHITELISTED_VARIANT = "lab-whitelisted.csv"
SCENARIO = ((None, "BLACKLISTED"), (WHITELISTED_VARIANT, "WHITELISTED"))
SCENARIO_ATTACH = {"BLACKLISTED": "reject", "WHITELISTED": "allow"}

# The MME with S13 (open5gs/open5gs pull request 4802), as the code published beside it reads
# its `mme.eir` section: LetMeConnect001/open5gs-s13 at MME_S13_COMMIT, the commit the lab's
# build steps pin. src/mme/mme-context.c knows these keys (any other: "unknown key"), each
# *_action `allow` or `reject` and `allow` by default; src/mme/mme-s13-handler.c applies the
# action of the answer's Equipment-Status, rejects 5422 whatever the keys say, and every
# reject is an Attach Reject with EMM cause #6 (illegal ME).
MME_S13_REPOSITORY = "LetMeConnect001/open5gs-s13"
MME_S13_COMMIT = "9f4a3016bf60a727877ee28716512387a814eefb"
MME_EIR_KEYS = {"enabled", "host", "realm", "max_age", "failure_action", "missing_pei_action",
                "whitelist_action", "greylist_action", "blacklist_action"}
MME_EIR_ACTIONS = ("allow", "reject")
MME_EIR_STATUS_ACTION = {"WHITELISTED": "whitelist_action", "GREYLISTED": "greylist_action",
                         "BLACKLISTED": "blacklist_action"}
MME_REJECT_CAUSE = "#6"

# open EIR's Prometheus metrics (`eir serve --metrics`, eir.interfaces.metrics) and their labels.
METRIC_LABELS = {
    "eir_requests_total": {"command"},
    "eir_answers_total": {"command", "result_code", "equipment_status"},
    "eir_peers": {"state"},
    "eir_list_entries": {"kind"},
    "eir_list_age_seconds": set(),
    "eir_sync_total": {"outcome"},
    "eir_sync_last_success_timestamp_seconds": set(),
    "eir_list_reloads_total": {"outcome"},
    "eir_observations_written_total": set(),
    "eir_observations_dropped_total": set(),
    "eir_clone_hits_total": set(),
    "eir_sbi_requests_total": {"status_code"},
    "eir_sbi_verdicts_total": {"equipment_status"},
    "eir_sbi_connections": set(),
    "eir_nrf_registered": set(),
    "eir_build_info": {"version"},
    "process_cpu_seconds_total": {"worker"},  # worker: with several workers (metrics.py)
    "process_resident_memory_bytes": {"worker"},
}
# Labels Prometheus adds to every series it scrapes (its target's), beside the EIR's own.
TARGET_LABELS = {"instance", "job"}
# What the dashboard must show (issue 16): a metric each, and the instance variable.
DASHBOARD_METRICS = {
    "sync age": "eir_sync_last_success_timestamp_seconds",
    "refused reloads": "eir_list_reloads_total",
    "clone hits": "eir_clone_hits_total",
    "5G verdicts": "eir_sbi_verdicts_total",
}
INSTANCE_VARIABLE = "instance"
ECR_COMMAND = "ME-Identity-Check"
HISTOGRAMS = {"eir_request_duration_seconds": set()}
for _histogram, _labels in HISTOGRAMS.items():
    METRIC_LABELS[f"{_histogram}_bucket"] = _labels | {"le"}
    METRIC_LABELS[f"{_histogram}_sum"] = _labels
    METRIC_LABELS[f"{_histogram}_count"] = _labels


# --- readers -------------------------------------------------------------------------------

def compose_default(value: str) -> str:
    """A compose value with `${VAR:-default}` replaced by its default and `$$` by `$`."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value).replace("$$", "$")


@dataclass
class PeerEntry:
    name: str
    options: dict[str, str]
    flags: set[str]


@dataclass
class FreeDiameterConfig:
    path: Path
    values: dict[str, list[str]] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    peers: dict[str, PeerEntry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def value(self, key: str) -> str | None:
        found = self.values.get(key)
        return found[0] if found else None

    @property
    def listen_port(self) -> int:
        return int(self.value("Port") or DIAMETER_PORT)


FD_STATEMENT = re.compile(
    r'\s*(?P<key>\w+)\s*'
    r'(?:=\s*(?P<value>"[^"]*"(?:\s*,\s*"[^"]*")*|[^;{"\s]+)\s*)?'
    r'(?::\s*"[^"]*"\s*)?'
    r'(?:\{(?P<block>[^}]*)\}\s*)?;')
FD_OPTION = re.compile(r'\s*(?P<key>\w+)\s*(?:=\s*(?P<value>"[^"]*"|[^;\s]+)\s*)?;')


def _without_comments(text: str) -> str:
    """freeDiameter's `#` comments removed (none of our quoted strings holds a `#`)."""
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _unquote(value: str) -> str:
    return value[1:-1] if value.startswith('"') and value.endswith('"') else value


def parse_freediameter(path: Path) -> FreeDiameterConfig:
    """The statements of a freeDiameter configuration file; what cannot be read is a problem."""
    config = FreeDiameterConfig(path)
    text = _without_comments(path.read_text(encoding="utf-8"))
    position = 0
    while text[position:].strip():
        match = FD_STATEMENT.match(text, position)
        if not match:
            start = len(text) - len(text[position:].lstrip())
            line = text.count("\n", 0, start) + 1
            config.problems.append(f"{path}:{line}: not a freeDiameter statement: "
                                   f"{text[position:].strip().splitlines()[0]!r}")
            break
        key, value, block = match.group("key"), match.group("value"), match.group("block")
        if key == "ConnectPeer":
            options: dict[str, str] = {}
            flags: set[str] = set()
            for option in FD_OPTION.finditer(block or ""):
                if option.group("value") is None:
                    flags.add(option.group("key"))
                else:
                    options[option.group("key")] = _unquote(option.group("value"))
            config.peers[_unquote(value or "")] = PeerEntry(_unquote(value or ""), options, flags)
        elif value is None:
            config.flags.add(key)
        else:
            config.values.setdefault(key, []).append(_unquote(value.split(",")[0].strip()))
        position = match.end()
    return config


def parse_ini(path: Path) -> configparser.ConfigParser:
    """An srsRAN .conf of `[section]` and `key = value` lines."""
    parser = configparser.ConfigParser(inline_comment_prefixes=("#",), interpolation=None)
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return parser


def libconfig_value(path: Path, key: str) -> str | None:
    """The first `key = value;` of a libconfig file (srsRAN's rr.conf), as text."""
    match = re.search(rf"^\s*{re.escape(key)}\s*=\s*([^;\s]+)\s*;", path.read_text(),
                      re.MULTILINE)
    return match.group(1) if match else None


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "Inf", "NaN", "inf", "nan"}


@lru_cache(maxsize=1)
def eir_serve_options() -> frozenset[str]:
    """The options `eir serve --help` lists."""
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", run_eir("serve", "--help").stdout))


def promql_metrics_and_labels(expression: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression refers to."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*"
                               r"\(([^)]*)\)", text):
        labels |= {name.strip() for name in grouping.split(",") if name.strip()}
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ",
                  text)
    metrics = set()
    for match in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", text):
        if match.group() in PROMQL_KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue  # a keyword, or a function's name
        metrics.add(match.group())
    return metrics, labels


# --- the lab as the containers see it --------------------------------------------------------

class LabError(Exception):
    """A config path a service names is on no bind mount, or its file does not exist."""


class Lab:
    """docker-compose.yml under `root`, and the host files behind each service's mounts."""

    def __init__(self, root: Path):
        self.root = root
        self.compose_path = root / "docker-compose.yml"
        self.compose = yaml.safe_load(self.compose_path.read_text(encoding="utf-8"))
        self.services: dict[str, dict] = self.compose.get("services") or {}

    def service(self, name: str) -> dict:
        return self.services.get(name) or {}

    def address(self, name: str) -> str | None:
        networks = self.service(name).get("networks")
        if isinstance(networks, dict):
            for settings in networks.values():
                if isinstance(settings, dict) and settings.get("ipv4_address"):
                    return settings["ipv4_address"]
        return None

    def bind_mounts(self, name: str) -> list[tuple[str, PurePosixPath]]:
        """(host source as written, container target) of the service's bind mounts."""
        mounts = []
        for volume in self.service(name).get("volumes") or []:
            source, target = _volume_source_target(volume)
            if source.startswith((".", "/")):
                mounts.append((source, PurePosixPath(target)))
        return mounts

    def host_path(self, name: str, container_path: str) -> Path | None:
        """The host file behind `container_path` in service `name`, if a bind mount holds it."""
        wanted = PurePosixPath(container_path)
        for source, target in self.bind_mounts(name):
            if wanted == target or target in wanted.parents:
                return (self.root / source / wanted.relative_to(target)).resolve()
        return None

    def command(self, name: str) -> list[str]:
        command = self.service(name).get("command") or []
        return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]

    def config_file(self, name: str, container_path: str) -> Path:
        """The host file of a config path a service names; LabError when there is none."""
        path = self.host_path(name, container_path)
        if path is None:
            raise LabError(f"{name}: {container_path} is on no bind mount")
        if not path.is_file():
            raise LabError(f"{name}: {container_path} is {path}, which does not exist")
        return path

    def option(self, name: str, flag: str) -> str | None:
        """The value after `flag` in the service's command (`-c FILE`, `--config FILE`)."""
        command = self.command(name)
        for index, word in enumerate(command):
            if word == flag and index + 1 < len(command):
                return command[index + 1]
            if word.startswith(flag + "="):
                return word.split("=", 1)[1]
        return None

    def open5gs_config(self, name: str) -> tuple[Path, dict]:
        path = self.config_file(name, self.option(name, "-c") or "")
        return path, yaml.safe_load(path.read_text(encoding="utf-8"))

    def freediameter(self, name: str) -> FreeDiameterConfig:
        _, config = self.open5gs_config(name)
        return parse_freediameter(self.config_file(name, config[name]["freeDiameter"]))

    def eir_config_path(self) -> Path:
        return self.config_file("eir", self.option("eir", "--config") or "")

    def srsran(self, name: str) -> configparser.ConfigParser:
        return parse_ini(self.config_file(name, self.command(name)[0]))


def _volume_source_target(volume) -> tuple[str, str]:
    if isinstance(volume, dict):
        return str(volume.get("source", "")), str(volume.get("target", ""))
    parts = str(volume).split(":")
    return (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])


def _servers(section: dict | None, key: str) -> list[str]:
    """The `address`es of an Open5GS `server:`/`client:` list."""
    entries = (section or {}).get(key) or []
    return [str(entry.get("address")) for entry in entries if isinstance(entry, dict)]


# --- checks: each returns its problems ----------------------------------------------------

def check_services(lab: Lab) -> list[str]:
    problems = [f"no service {name!r}" for name in SERVICES if name not in lab.services]
    for name, service in lab.services.items():
        image = compose_default(str(service.get("image", "")))
        build = service.get("build")
        if not image and not build:
            problems.append(f"{name}: neither an image nor a build")
        if build:
            context = lab.root / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (build.get("dockerfile", "Dockerfile")
                                    if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: build file {dockerfile} does not exist")
        for other in service.get("depends_on") or []:
            if other not in lab.services:
                problems.append(f"{name}: depends on {other!r}, which is no service")
    mme_image = str(lab.service("mme").get("image", ""))
    if not re.fullmatch(rf"\$\{{{MME_IMAGE_VARIABLE}:-[^}}]+\}}", mme_image):
        problems.append(f"mme: image {mme_image!r} is not ${{{MME_IMAGE_VARIABLE}:-...}}")
    for name, daemon in OPEN5GS_DAEMONS.items():
        command = lab.command(name)
        if not command or command[0] != daemon or lab.option(name, "-c") is None:
            problems.append(f"{name}: command {command} is not `{daemon} -c FILE`")
    return problems


def check_mounts(lab: Lab) -> list[str]:
    problems = []
    declared = set(lab.compose.get("volumes") or {})
    for name, service in lab.services.items():
        for volume in service.get("volumes") or []:
            source, _ = _volume_source_target(volume)
            if source.startswith((".", "/")):
                if not (lab.root / source).exists():
                    problems.append(f"{name}: mounted host path {source} does not exist")
            elif source and source not in declared:
                problems.append(f"{name}: volume {source!r} is not declared under volumes:")
    return problems


def check_config_paths(lab: Lab) -> list[str]:
    """Every config path a command names, and every path those configs name, exists."""
    problems = []

    def need(name: str, container_path: str) -> Path | None:
        try:
            return lab.config_file(name, container_path)
        except LabError as exc:
            problems.append(str(exc))
            return None

    for name in OPEN5GS_DAEMONS:
        path = need(name, lab.option(name, "-c") or "")
        if path is None:
            continue
        section = (yaml.safe_load(path.read_text()) or {}).get(name) or {}
        if "freeDiameter" in section:
            need(name, section["freeDiameter"])
    need("eir", lab.option("eir", "--config") or "")
    for name in ("enb", "ue"):
        path = need(name, (lab.command(name) or [""])[0])
        if path is not None and name == "enb":
            for value in parse_ini(path)["enb_files"].values():
                need(name, value)
    need("prometheus", lab.option("prometheus", "--config.file") or "")
    for provisioning in ("datasources", "dashboards"):
        directory = lab.host_path("grafana", f"/etc/grafana/provisioning/{provisioning}")
        if directory is None or not any(directory.glob("*.yml")):
            problems.append(f"grafana: no provisioning/{provisioning}/*.yml is mounted")
    for provider in _grafana_providers(lab):
        folder = lab.host_path("grafana", provider["options"]["path"])
        if folder is None or not any(folder.glob("*.json")):
            problems.append(f"grafana: dashboard folder {provider['options']['path']} has "
                            "no mounted dashboard")
    return problems


def check_host_ports(lab: Lab) -> list[str]:
    problems = []
    taken: dict[tuple[int, str], str] = {}
    for name, service in lab.services.items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                published, protocol = str(port.get("published", "")), port.get("protocol", "tcp")
            else:
                spec, _, protocol = str(port).partition("/")
                parts = spec.rsplit(":", 2)
                published = parts[-2] if len(parts) >= 2 else ""
                protocol = protocol or "tcp"
            if not published:
                continue
            key = (int(published), protocol)
            if key in taken:
                problems.append(f"host port {published}/{protocol} is published by both "
                                f"{taken[key]} and {name}")
            taken[key] = name
    return problems


def _published_on_loopback(service: dict, port: int) -> bool:
    return any(str(entry).split("/")[0] in (f"127.0.0.1:{port}:{port}", f"127.0.0.1:{port}")
               for entry in service.get("ports") or [])


def check_api(lab: Lab) -> list[str]:
    """The lab serves the admin API and console: api.listen set, the port exposed and
    published on the host's loopback, and a token long enough given to the service."""
    problems = []
    settings = load_settings(lab.eir_config_path())
    if not settings.api.listen:
        return ["eir.yaml: api.listen is not set: the lab serves no API or console"]
    port = parse_host_port(settings.api.listen)[1]
    service = lab.service("eir")
    exposed = {int(str(entry).split("/")[0]) for entry in service.get("expose") or []}
    if port not in exposed:
        problems.append(f"eir service: does not expose the API port {port}")
    if not _published_on_loopback(service, port):
        problems.append(f"eir service: the API port {port} is not published on 127.0.0.1")
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(entry.split("=", 1) for entry in environment)
    token = compose_default(str(environment.get("EIR_API_TOKEN", "")))
    if not token and settings.api.token is None:
        problems.append("eir service: no API token (EIR_API_TOKEN or api.token): "
                        "`eir serve` refuses api.listen without one")
    elif token and len(token) < 16:
        problems.append(f"eir service: EIR_API_TOKEN default {token!r} is under 16 characters")
    return problems


def check_addresses(lab: Lab) -> list[str]:
    problems = []
    subnets = [ipaddress.ip_network(entry["subnet"])
               for network in (lab.compose.get("networks") or {}).values()
               for entry in ((network or {}).get("ipam") or {}).get("config") or []]
    seen: dict[str, str] = {}
    for name in lab.services:
        address = lab.address(name)
        if address is None:
            continue
        if not any(ipaddress.ip_address(address) in subnet for subnet in subnets):
            problems.append(f"{name}: {address} is in no subnet of the compose networks")
        if address in seen:
            problems.append(f"{name} and {seen[address]} both have address {address}")
        seen[address] = name
    for name in (*OPEN5GS_DAEMONS, "eir", "enb", "ue"):
        if lab.address(name) is None:
            problems.append(f"{name}: no fixed ipv4_address (the configs name it by address)")
    return problems


def check_diameter(lab: Lab) -> list[str]:
    """The Diameter peers: every ConnectPeer reaches a peer of that identity, at its address
    and port; the MME's ConnectPeer and `eir:` section name the EIR as its config says."""
    problems = []
    settings = load_settings(lab.eir_config_path())
    eir = settings.diameter
    eir_listen = [parse_host_port(item) for item in eir.listen]
    eir_ports = {port for _, port in eir_listen}
    eir_address = lab.address("eir")
    identities: dict[str, tuple[str, FreeDiameterConfig]] = {}
    configs = {}
    for name in OPEN5GS_DAEMONS:
        _, yaml_config = lab.open5gs_config(name)
        if "freeDiameter" not in (yaml_config.get(name) or {}):
            continue
        config = configs[name] = lab.freediameter(name)
        problems += config.problems
        identity = config.value("Identity")
        if identity in identities or identity == eir.origin_host:
            problems.append(f"{name}: Diameter identity {identity} is used twice")
        identities[identity] = (name, config)
        if config.value("ListenOn") != lab.address(name):
            problems.append(f"{name}: freeDiameter ListenOn {config.value('ListenOn')} is not "
                            f"the service's address {lab.address(name)}")
    for name, config in configs.items():
        for peer in config.peers.values():
            connect_to = peer.options.get("ConnectTo")
            port = int(peer.options.get("Port", DIAMETER_PORT))
            where = f"{config.path.name}: ConnectPeer {peer.name!r}"
            if peer.name == eir.origin_host:
                if connect_to != eir_address:
                    problems.append(f"{where}: ConnectTo {connect_to} is not the eir service's "
                                    f"address {eir_address}")
                if port not in eir_ports:
                    problems.append(f"{where}: Port {port} is not the EIR's listen port "
                                    f"{sorted(eir_ports)}")
                if not any(host in ("0.0.0.0", eir_address) for host, _ in eir_listen):
                    problems.append(f"eir.yaml: listens on {eir.listen}, not on {eir_address}")
                if (eir.transport == "tcp") != ("No_SCTP" in peer.flags):
                    state = "set" if "No_SCTP" in peer.flags else "missing"
                    problems.append(f"{where}: No_SCTP is {state}, but the EIR's transport is "
                                    f"{eir.transport}")
                if config.value("Realm") != eir.origin_realm:
                    problems.append(f"{config.path.name}: Realm {config.value('Realm')} is not "
                                    f"the EIR's realm {eir.origin_realm}")
            elif peer.name in identities:
                other, other_config = identities[peer.name]
                if connect_to != lab.address(other):
                    problems.append(f"{where}: ConnectTo {connect_to} is not {other}'s address "
                                    f"{lab.address(other)}")
                if port != other_config.listen_port:
                    problems.append(f"{where}: Port {port} is not {other}'s Diameter port")
            else:
                problems.append(f"{where}: no peer of the lab has that identity")
    mme_fd = configs.get("mme")
    if mme_fd is None or eir.origin_host not in mme_fd.peers:
        problems.append(f"mme.conf: no ConnectPeer named {eir.origin_host!r}, the EIR's "
                        "origin_host")
    exposed = {int(str(port).split("/")[0]) for port in lab.service("eir").get("expose") or []}
    if not eir_ports <= exposed:
        problems.append(f"eir service: exposes {sorted(exposed)}, not the listen port "
                        f"{sorted(eir_ports)}")
    eir_section = (lab.open5gs_config("mme")[1].get("mme") or {}).get("eir") or {}
    if eir_section.get("enabled") is not True:
        problems.append("mme.yaml: eir.enabled is not true")
    if eir_section.get("realm") != eir.origin_realm:
        problems.append(f"mme.yaml: eir.realm {eir_section.get('realm')!r} is not the EIR's "
                        f"realm {eir.origin_realm!r}")
    if eir_section.get("host") != eir.origin_host:
        problems.append(f"mme.yaml: eir.host {eir_section.get('host')!r} is not the EIR's "
                        f"identity {eir.origin_host!r} (its ConnectPeer)")
    return problems


# --- the DRA profile (testbed/dra): freeDiameter as a relay in front of two EIR nodes -------

DRA_PROFILE = "dra"
DRA_SERVICE = "dra"
DRA_ROUTING = ("acl_wl", "rt_default", "rt_load_balance", "rt_busypeers")
FREEDIAMETER_MIN_TW = 6  # seconds: freeDiameter refuses a smaller TwTimer
FD_EXTENSION = re.compile(r'LoadExtension\s*=\s*"([^"]+)"\s*(?::\s*"([^"]*)"\s*)?;')
RT_DEFAULT_RULE = re.compile(r'(?P<criteria>\*|\w+=(?:"[^"]*"|\["[^"]*"\]))\s*:\s*'
                             r'(?P<target>(?:rlm=)?(?:"[^"]*"|\["[^"]*"\]))\s*\+=\s*'
                             r'(?P<score>-?\w+)\s*;')


def freediameter_extensions(path: Path) -> dict[str, str | None]:
    """LoadExtension of a freeDiameter config: extension name (dict_nasreq, rt_default, ...)
    → its configuration file as written (None: none), in load order."""
    text = _without_comments(path.read_text(encoding="utf-8"))
    return {PurePosixPath(library).stem: conf or None
            for library, conf in FD_EXTENSION.findall(text)}


def rt_default_rules(path: Path) -> list[re.Match]:
    """The `CRITERIA : TARGET += SCORE ;` rules of an rt_default configuration."""
    return list(RT_DEFAULT_RULE.finditer(_without_comments(path.read_text(encoding="utf-8"))))


def rt_default_matches(target: str, identity: str) -> bool:
    """Whether an rt_default TARGET (a quoted name, or a bracketed POSIX ERE) is `identity`."""
    pattern = target.removeprefix("rlm=")
    if pattern.startswith("["):
        return re.search(pattern[2:-2], identity) is not None
    return pattern.strip('"').lower() == identity.lower()


def dra_eir_nodes(lab: Lab) -> list[str]:
    """The services of the DRA profile that run `eir serve`."""
    return [name for name, service in lab.services.items()
            if DRA_PROFILE in (service.get("profiles") or []) and lab.command(name)[:2] ==
            ["eir", "serve"]]


def check_dra(lab: Lab) -> list[str]:
    """The DRA relays to every EIR node of its profile, at its address, port and identity,
    with the routing extensions and their configs; the nodes share one PostgreSQL for
    observations and one registry source, each with its own store."""
    problems: list[str] = []
    dra = lab.service(DRA_SERVICE)
    if DRA_PROFILE not in (dra.get("profiles") or []):
        return [f"{DRA_SERVICE}: not a service of profile {DRA_PROFILE!r}"]
    command = lab.command(DRA_SERVICE)
    if command[:1] != ["freeDiameterd"] or lab.option(DRA_SERVICE, "-c") is None:
        return [f"{DRA_SERVICE}: command {command} is not `freeDiameterd -c FILE`"]
    try:
        config_path = lab.config_file(DRA_SERVICE, lab.option(DRA_SERVICE, "-c"))
    except LabError as exc:
        return [str(exc)]
    config = parse_freediameter(config_path)
    if config.problems:
        return config.problems
    where = config_path.name

    # The EIR nodes: identities, settings, and what they share.
    nodes: dict[str, tuple[str, object]] = {}  # origin host → (service, settings)
    for name in dra_eir_nodes(lab):
        unknown = [word for word in lab.command(name)[2:]
                   if word.startswith("--") and word.split("=")[0] not in eir_serve_options()]
        if unknown:
            problems.append(f"{name}: {', '.join(unknown)}: not an option of `eir serve`")
            continue
        try:
            settings = load_settings(lab.config_file(name, lab.option(name, "--config") or ""))
        except (LabError, ConfigError, OSError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        identity = lab.option(name, "--origin-host") or settings.diameter.origin_host
        if identity in nodes:
            problems.append(f"{name} and {nodes[identity][0]} both have Diameter identity "
                            f"{identity}")
        nodes[identity] = (name, settings)
    if len(nodes) < 2:
        problems.append(f"profile {DRA_PROFILE}: {len(nodes)} EIR node(s), the DRA needs two "
                        "or more")

    # The DRA itself.
    identity, realm = config.value("Identity"), config.value("Realm")
    mme_identity = lab.freediameter("mme").value("Identity")
    if identity in nodes or identity == mme_identity:
        problems.append(f"{where}: Identity {identity} is another peer's")
    if config.value("ListenOn") != lab.address(DRA_SERVICE):
        problems.append(f"{where}: ListenOn {config.value('ListenOn')} is not the {DRA_SERVICE} "
                        f"service's address {lab.address(DRA_SERVICE)}")
    exposed = {int(str(port).split("/")[0]) for port in dra.get("expose") or []}
    if config.listen_port not in exposed:
        problems.append(f"{DRA_SERVICE} service: exposes {sorted(exposed)}, not its Port "
                        f"{config.listen_port}")
    tw = int(config.value("TwTimer") or 30)
    if tw < FREEDIAMETER_MIN_TW:
        problems.append(f"{where}: TwTimer {tw} is below freeDiameter's minimum "
                        f"{FREEDIAMETER_MIN_TW}")
    if config.value("TcTimer") is None:
        problems.append(f"{where}: no TcTimer (a lost EIR node is retried every 30 s)")
    if "NoRelay" in config.flags:
        problems.append(f"{where}: NoRelay: a DRA must relay")

    # Every node is a ConnectPeer at its address and port; every ConnectPeer is a node.
    for peer in config.peers.values():
        at = f"{where}: ConnectPeer {peer.name!r}"
        if peer.name not in nodes:
            problems.append(f"{at}: no EIR node of profile {DRA_PROFILE} has that identity")
            continue
        name, settings = nodes[peer.name]
        ports = {port for _, port in map(parse_host_port, settings.diameter.listen)}
        if peer.options.get("ConnectTo") != lab.address(name):
            problems.append(f"{at}: ConnectTo {peer.options.get('ConnectTo')} is not {name}'s "
                            f"address {lab.address(name)}")
        if int(peer.options.get("Port", DIAMETER_PORT)) not in ports:
            problems.append(f"{at}: Port {peer.options.get('Port')} is not {name}'s listen "
                            f"port {sorted(ports)}")
        node_exposed = {int(str(p).split("/")[0]) for p in lab.service(name).get("expose") or []}
        if not ports <= node_exposed:
            problems.append(f"{name} service: exposes {sorted(node_exposed)}, not its listen "
                            f"port {sorted(ports)}")
        if (settings.diameter.transport == "tcp") != ("No_SCTP" in peer.flags):
            problems.append(f"{at}: No_SCTP does not match {name}'s transport "
                            f"{settings.diameter.transport}")
        if settings.diameter.origin_realm != realm:
            problems.append(f"{at}: {name}'s realm {settings.diameter.origin_realm} is not the "
                            f"DRA's Realm {realm}")
        allowed = {entry.host for entry in settings.diameter.peers}
        if allowed and identity not in allowed:
            problems.append(f"{name}: diameter.peers {sorted(allowed)} leaves out the DRA "
                            f"({identity})")
    for node in nodes.keys() - config.peers.keys():
        problems.append(f"{where}: no ConnectPeer for EIR node {node} ({nodes[node][0]})")

    # The routing extensions, and their configs.
    extensions = freediameter_extensions(config_path)
    order = list(extensions)
    if "dict_dcca" in extensions and ("dict_nasreq" not in extensions
                                      or order.index("dict_nasreq") > order.index("dict_dcca")):
        problems.append(f"{where}: dict_dcca is loaded before dict_nasreq")
    configs: dict[str, Path] = {}
    for extension in DRA_ROUTING:
        if extension not in extensions:
            problems.append(f"{where}: {extension} is not loaded")
        elif extensions[extension] is not None:
            try:
                configs[extension] = lab.config_file(DRA_SERVICE, extensions[extension])
            except LabError as exc:
                problems.append(str(exc))
    if "rt_busypeers" in configs:
        text = _without_comments(configs["rt_busypeers"].read_text(encoding="utf-8"))
        timeout = re.search(r"RelayTimeout\s*=\s*(\d+)\s*;", text)
        if timeout and int(timeout.group(1)) != 0:
            problems.append(f"rt_busypeers: RelayTimeout {timeout.group(1)}: with it set, "
                            "freeDiameter 1.2.1 drops a request answered 3004 instead of "
                            "re-sending it (testbed/dra/README.md)")
        if re.search(r"\bSkipTooBusyErrors\s*;", text):
            problems.append("rt_busypeers: SkipTooBusyErrors: 3004 would reach the MME")
    if "rt_default" in configs:
        targets = [rule.group("target") for rule in rt_default_rules(configs["rt_default"])
                   if rule.group("score") != "NO_DELIVERY"]
        for node in nodes:
            if not any(rt_default_matches(target, node) for target in targets):
                problems.append(f"rt_default: no rule routes to EIR node {node}")
        if any(rt_default_matches(target, mme_identity) for target in targets):
            problems.append(f"rt_default: a rule routes requests to the MME {mme_identity}")
    if "acl_wl" in configs:
        allowed_lines = _without_comments(configs["acl_wl"].read_text(encoding="utf-8"))
        if not any(mme_identity in line.split() and "ALLOW_IPSEC" in line.split()
                   for line in allowed_lines.splitlines()):
            problems.append(f"acl_wl: the MME {mme_identity} may not connect without TLS "
                            "(ALLOW_IPSEC), and the DRA has no TLS credentials")

    # What the nodes share: one observations database, one registry source; own stores.
    urls = {settings.observations.url for _, settings in nodes.values()}
    if len(urls) != 1 or None in urls:
        problems.append(f"EIR nodes: observations.url {sorted(map(str, urls))} is not one "
                        "shared PostgreSQL database")
    else:
        url = urlsplit(urls.pop())
        database = lab.service(url.hostname or "")
        environment = database.get("environment") or {}
        if not database:
            problems.append(f"observations.url: host {url.hostname!r} is no service")
        elif (environment.get("POSTGRES_USER"), environment.get("POSTGRES_DB")) != (
                url.username, url.path.lstrip("/")):
            problems.append(f"observations.url: user/database {url.username}/"
                            f"{url.path.lstrip('/')} are not {url.hostname}'s POSTGRES_USER/"
                            f"POSTGRES_DB")
    sources = {settings.sync.source for _, settings in nodes.values()}
    if len(sources) != 1 or None in sources:
        problems.append(f"EIR nodes: sync.source {sorted(map(str, sources))} is not one "
                        "registry source")
    stores: dict[str, str] = {}
    synced: set[Path] = set()
    for name, settings in nodes.values():
        source = settings.sync.source or ""
        if not source.startswith(("http://", "https://")):
            host_source = lab.host_path(name, source)
            if host_source is None or not host_source.is_dir():
                problems.append(f"{name}: sync.source {source} is no mounted directory")
            elif host_source not in synced:  # what each node does first: sync it, for real
                synced.add(host_source)
                with tempfile.TemporaryDirectory() as store:
                    result = run_eir("sync", "--source", str(host_source), "--store", store)
                if result.returncode != 0:
                    problems.append(f"{name}: `eir sync` of {source} fails: "
                                    f"{(result.stderr or result.stdout).strip()}")
        store = settings.store.directory
        volume = next((src for src, target in map(_volume_source_target,
                                                  lab.service(name).get("volumes") or [])
                       if store is not None and (PurePosixPath(target) == PurePosixPath(store)
                                                 or PurePosixPath(target) in
                                                 PurePosixPath(store).parents)), None)
        if volume is None or volume.startswith((".", "/")):
            problems.append(f"{name}: store.directory {store} is on no named volume")
        elif volume in stores:
            problems.append(f"{name} and {stores[volume]} share the store volume {volume}")
        else:
            stores[volume] = name
    return problems


def check_eir_config(lab: Lab) -> list[str]:
    """The EIR's command is one `eir serve` accepts, and its config and lists load as
    `eir serve` loads them."""
    command = lab.command("eir")
    if command[:2] != ["eir", "serve"]:
        return [f"eir: command {command} is not `eir serve ...`"]
    unknown = [word for word in command[2:]
               if word.startswith("--") and word.split("=")[0] not in eir_serve_options()]
    if unknown:
        return [f"eir: {', '.join(unknown)}: not an option of `eir serve` (see its --help)"]
    try:
        settings = load_settings(lab.eir_config_path())
        load_rules(settings, first_sync=False)
    except (ConfigError, ListError, OSError) as exc:
        return [f"eir config: {exc}"]
    if settings.store.directory is not None:
        return ["eir config: the lab answers from list files, not a store"]
    working_directory = PurePosixPath(lab.service("eir").get("working_dir", "/"))
    if settings.observations.enabled and settings.observations.database is None and not any(
            _volume_source_target(v)[1] == str(working_directory)
            for v in lab.service("eir").get("volumes") or []):
        return [f"eir: observations go to {working_directory}, which is on no volume"]
    return []


def check_scenario(lab: Lab) -> list[str]:
    """The UE's IMEI has, in each list of the README's scenario, the status it says: asked of
    the EIR itself (`eir check`), with the UE's IMEI and IMSI from its srsRAN config."""
    problems = []
    usim = lab.srsran("ue")["usim"]
    imei, imsi = usim["imei"], usim["imsi"]
    config = lab.eir_config_path()
    in_force = load_settings(config).lists.files
    readme = (lab.root / "testbed" / "README.md").read_text(encoding="utf-8")
    for variant, expected in SCENARIO:
        arguments = ["check", imei, "--imsi", imsi, "--config", str(config), "--json"]
        which = variant or "in force"
        if variant is not None:
            arguments += ["--list", str(in_force[0].parent / variant)]
            if variant not in readme:
                problems.append(f"testbed/README.md does not mention {variant}")
        result = run_eir(*arguments)
        if result.returncode != 0:
            problems.append(f"eir check {which}: {result.stderr.strip()}")
            continue
        verdict = json.loads(result.stdout)
        if verdict["status"] != expected:
            problems.append(f"lists {which}: IMEI {imei} is {verdict['status']}, the scenario "
                            f"needs {expected} ({verdict['reason']}; {verdict['source']})")
    if imei not in readme:
        problems.append(f"testbed/README.md does not name the UE's IMEI {imei}")
    return problems


def mme_attach_outcome(eir_section: dict, status: str) -> str:
    """`allow` or `reject`: what the pull request's MME does with an answer of this
    Equipment-Status (UNKNOWN: 5422)."""
    if status == "UNKNOWN":
        return "reject"
    return str(eir_section.get(MME_EIR_STATUS_ACTION[status], "allow"))


def check_mme_eir_policy(lab: Lab) -> list[str]:
    """The MME's `eir:` section holds only keys the S13 MME code reads, and with it the MME
    refuses the scenario's blacklisted UE and lets the whitelisted one in; the build steps pin
    the code read, and the READMEs give the reject cause that code sends."""
    problems = []
    eir_section = (lab.open5gs_config("mme")[1].get("mme") or {}).get("eir") or {}
    for key, value in eir_section.items():
        if key not in MME_EIR_KEYS:
            problems.append(f"mme.yaml: eir: unknown key `{key}` for the S13 MME (it reads "
                            f"{sorted(MME_EIR_KEYS)})")
        elif key.endswith("_action") and value not in MME_EIR_ACTIONS:
            problems.append(f"mme.yaml: eir.{key}: {value!r} is not allow or reject")
    for _variant, status in SCENARIO:
        outcome, needed = mme_attach_outcome(eir_section, status), SCENARIO_ATTACH[status]
        if outcome != needed:
            problems.append(f"mme.yaml: an answer {status} would {outcome} the attach "
                            f"({MME_EIR_STATUS_ACTION[status]}); the scenario needs {needed}")
    lab_readme = (lab.root / "testbed" / "README.md").read_text(encoding="utf-8")
    if f"{MME_S13_REPOSITORY}" not in lab_readme or MME_S13_COMMIT not in lab_readme:
        problems.append(f"testbed/README.md: the MME build does not pin {MME_S13_REPOSITORY} "
                        f"at {MME_S13_COMMIT}")
    for name, text in (("testbed/README.md", lab_readme),
                       ("README.md", (lab.root / "README.md").read_text(encoding="utf-8")
                        if (lab.root / "README.md").is_file() else "")):
        causes = set(re.findall(r"(?:EMM cause|reject) \(?(#\d+)", text))
        for cause in sorted(causes - {MME_REJECT_CAUSE}):
            problems.append(f"{name}: EMM cause {cause}: the S13 MME rejects with "
                            f"{MME_REJECT_CAUSE} only")
    return problems


def check_radio(lab: Lab) -> list[str]:
    """PLMN, TAC, carrier, S1 and ZeroMQ addresses agree between MME, eNB and UE."""
    problems = []
    mme = lab.open5gs_config("mme")[1]["mme"]
    enb, ue = lab.srsran("enb"), lab.srsran("ue")
    plmn = (str(enb["enb"]["mcc"]), str(enb["enb"]["mnc"]))
    for key in ("tai", "gummei"):
        for entry in mme.get(key) or []:
            mme_plmn = (str(entry["plmn_id"]["mcc"]), str(entry["plmn_id"]["mnc"]))
            if mme_plmn != plmn:
                problems.append(f"mme.yaml {key} PLMN {mme_plmn} is not the eNB's {plmn}")
    if not ue["usim"]["imsi"].startswith("".join(plmn)):
        problems.append(f"ue.conf: IMSI {ue['usim']['imsi']} is not of PLMN {plmn}")
    rr = lab.config_file("enb", enb["enb_files"]["rr_config"])
    tac = libconfig_value(rr, "tac")
    mme_tacs = {int(entry["tac"]) for entry in mme.get("tai") or []}
    if tac is None or int(tac, 0) not in mme_tacs:
        problems.append(f"rr.conf: TAC {tac} is not among the MME's {sorted(mme_tacs)}")
    earfcn = libconfig_value(rr, "dl_earfcn")
    if earfcn != ue["rat.eutra"]["dl_earfcn"]:
        problems.append(f"ue.conf: dl_earfcn {ue['rat.eutra']['dl_earfcn']} is not the cell's "
                        f"{earfcn}")
    s1ap = _servers(mme.get("s1ap"), "server")
    if enb["enb"]["mme_addr"] not in s1ap or lab.address("mme") not in s1ap:
        problems.append(f"enb.conf: mme_addr {enb['enb']['mme_addr']} is not the MME's S1AP "
                        f"server {s1ap} at the mme service's address")
    for key in ("gtp_bind_addr", "s1c_bind_addr"):
        if enb["enb"][key] != lab.address("enb"):
            problems.append(f"enb.conf: {key} {enb['enb'][key]} is not the enb service's address")
    for near, far in (("enb", "ue"), ("ue", "enb")):
        near_args = dict(item.split("=", 1) for item in
                         lab.srsran(near)["rf"]["device_args"].split(","))
        far_args = dict(item.split("=", 1) for item in
                        lab.srsran(far)["rf"]["device_args"].split(","))
        far_port = far_args["tx_port"].rsplit(":", 1)[1]
        wanted = f"tcp://{lab.address(far)}:{far_port}"
        if near_args["rx_port"] != wanted:
            problems.append(f"{near}: ZeroMQ rx_port {near_args['rx_port']} is not the {far}'s "
                            f"tx_port at its address ({wanted})")
        if near_args["base_srate"] != far_args["base_srate"]:
            problems.append(f"{near} and {far}: ZeroMQ base_srate differs")
    return problems


def check_subscriber(lab: Lab) -> list[str]:
    """The SIM the `subscriber` service provisions is the UE's, in the HSS's database."""
    problems = []
    environment = lab.service("subscriber").get("environment") or {}
    usim = lab.srsran("ue")["usim"]
    for env_key, usim_key in (("SUBSCRIBER_IMSI", "imsi"), ("SUBSCRIBER_K", "k"),
                              ("SUBSCRIBER_OPC", "opc")):
        if str(environment.get(env_key, "")).lower() != usim[usim_key].lower():
            problems.append(f"subscriber: {env_key} {environment.get(env_key)!r} is not the "
                            f"UE's {usim_key} {usim[usim_key]!r}")
    script = " ".join(compose_default(word) for word in lab.command("subscriber"))
    if not re.search(r"open5gs-dbctl add \"\$SUBSCRIBER_IMSI\" \"\$SUBSCRIBER_K\" "
                     r"\"\$SUBSCRIBER_OPC\"", script):
        problems.append(f"subscriber: command {script!r} does not add the SIM")
    hss_db = lab.open5gs_config("hss")[1].get("db_uri", "")
    for uri in (hss_db, environment.get("DB_URI", "")):
        host = re.sub(r"^mongodb://([^/:]+).*$", r"\1", str(uri))
        if host not in lab.services:
            problems.append(f"database {uri!r}: host {host!r} is no service")
    return problems


def check_core_links(lab: Lab) -> list[str]:
    """GTP-C and PFCP: each client address is its server's, at the server's service address."""
    problems = []
    configs = {name: lab.open5gs_config(name)[1][name] for name in OPEN5GS_DAEMONS}
    links = (("mme", "gtpc", "sgwc", "sgwc", "gtpc"), ("mme", "gtpc", "smf", "smf", "gtpc"),
             ("sgwc", "pfcp", "sgwu", "sgwu", "pfcp"), ("smf", "pfcp", "upf", "upf", "pfcp"))
    for client, interface, key, server, server_interface in links:
        wanted = _servers(configs[client].get(interface, {}).get("client"), key)
        offered = _servers(configs[server].get(server_interface), "server")
        if not wanted or set(wanted) - set(offered):
            problems.append(f"{client}.yaml: {interface} client {key} {wanted} is not "
                            f"{server}'s {server_interface} server {offered}")
    for name, config in configs.items():
        for interface in ("s1ap", "gtpc", "gtpu", "pfcp"):
            for address in _servers(config.get(interface), "server"):
                if address != lab.address(name):
                    problems.append(f"{name}.yaml: {interface} server {address} is not the "
                                    f"service's address {lab.address(name)}")
    return problems


def check_prometheus(lab: Lab) -> list[str]:
    problems = []
    path = lab.config_file("prometheus", lab.option("prometheus", "--config.file") or "")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        return [f"{path.name}: not YAML: {exc}"]
    targets = [target for job in config.get("scrape_configs") or []
               for static in job.get("static_configs") or []
               for target in static.get("targets") or []]
    eir_targets = [t for t in targets if t.rsplit(":", 1)[0] in ("eir", lab.address("eir"))]
    exposed = {int(str(port).split("/")[0]) for port in lab.service("eir").get("expose") or []}
    diameter = {parse_host_port(item)[1]
                for item in load_settings(lab.eir_config_path()).diameter.listen}
    metrics_ports = exposed - diameter
    metrics_listen = lab.option("eir", "--metrics")
    if metrics_listen is not None:  # once `eir serve --metrics HOST:PORT` exists
        metrics_ports &= {parse_host_port(metrics_listen)[1]}
    if not eir_targets:
        problems.append(f"prometheus.yml: no target on the eir service (targets: {targets})")
    for target in eir_targets:
        port = int(target.rsplit(":", 1)[1])
        if port not in metrics_ports:
            problems.append(f"prometheus.yml: target {target} is not the EIR's metrics port "
                            f"(exposed besides Diameter: {sorted(metrics_ports)})")
    return problems


def _provisioned(lab: Lab, kind: str) -> list[dict]:
    """The entries (`providers`, `datasources`) of Grafana's mounted provisioning files."""
    folder = lab.host_path("grafana", f"/etc/grafana/provisioning/{kind}")
    key = "providers" if kind == "dashboards" else kind
    return [entry for path in (sorted(folder.glob("*.yml")) if folder else [])
            for entry in (yaml.safe_load(path.read_text()) or {}).get(key) or []]


def _grafana_providers(lab: Lab) -> list[dict]:
    return _provisioned(lab, "dashboards")


def _dashboard_files(lab: Lab) -> list[Path]:
    folders = [lab.host_path("grafana", provider["options"]["path"])
               for provider in _grafana_providers(lab)]
    return [path for folder in folders if folder for path in sorted(folder.glob("*.json"))]


def check_grafana(lab: Lab) -> list[str]:
    problems = []
    sources = _provisioned(lab, "datasources")
    uids = {source.get("uid") for source in sources}
    for source in sources:
        host = re.sub(r"^https?://([^:/]+).*$", r"\1", source.get("url", ""))
        if host not in lab.services:
            problems.append(f"datasource {source.get('name')}: {source.get('url')} is no service")
    dashboards = _dashboard_files(lab)
    if not dashboards:
        problems.append("grafana: no dashboard JSON")
    for path in dashboards:
        try:
            dashboard = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            problems.append(f"{path.name}: not JSON: {exc}")
            continue
        queried = set()
        for panel in dashboard.get("panels") or []:
            targets = panel.get("targets") or []
            if not targets:
                problems.append(f"{path.name}: panel {panel.get('title')!r} queries nothing")
            for source in [panel, *targets]:
                uid = (source.get("datasource") or {}).get("uid")
                if uid not in uids:
                    problems.append(f"{path.name}: panel {panel.get('title')!r} uses datasource "
                                    f"{uid!r}, not a provisioned one {sorted(uids)}")
            for target in targets:
                metrics, labels = promql_metrics_and_labels(target.get("expr", ""))
                if not metrics:
                    problems.append(f"{path.name}: {target.get('expr')!r} queries no metric")
                for metric in metrics - METRIC_LABELS.keys():
                    problems.append(f"{path.name}: panel {panel.get('title')!r} queries "
                                    f"{metric}, which open EIR does not export")
                known = set().union(TARGET_LABELS,
                                    *(METRIC_LABELS.get(m, set()) for m in metrics))
                for label in labels - known:
                    problems.append(f"{path.name}: panel {panel.get('title')!r} uses label "
                                    f"{label!r}, which {sorted(metrics)} do not have")
                queried |= metrics
        if not queried:
            problems.append(f"{path.name}: queries no metric at all")
        for variable in (dashboard.get("templating") or {}).get("list") or []:
            uid = (variable.get("datasource") or {}).get("uid")
            if variable.get("type") == "query" and uid not in uids:
                problems.append(f"{path.name}: variable {variable.get('name')!r} uses "
                                f"datasource {uid!r}, not a provisioned one {sorted(uids)}")
        problems += _dashboard_coverage(path.name, dashboard, queried)
    return problems


def _dashboard_coverage(name: str, dashboard: dict, queried: set[str]) -> list[str]:
    """The panels an operator needs, per instance, each titled for what it plots."""
    problems = [f"{name}: no panel for {what} ({metric})"
                for what, metric in DASHBOARD_METRICS.items() if metric not in queried]
    variables = {variable.get("name") for variable in
                 (dashboard.get("templating") or {}).get("list") or []}
    if INSTANCE_VARIABLE not in variables:
        problems.append(f"{name}: no ${INSTANCE_VARIABLE} variable to pick an EIR")
    for panel in dashboard.get("panels") or []:
        title = panel.get("title") or ""
        for target in panel.get("targets") or []:
            expression = target.get("expr", "")
            if f"${INSTANCE_VARIABLE}" not in expression:
                problems.append(f"{name}: panel {title!r} ignores ${INSTANCE_VARIABLE}: "
                                f"{expression}")
            if (ECR_COMMAND in title or "ECR" in title.split()) \
                    and f'command="{ECR_COMMAND}"' not in expression:
                problems.append(f"{name}: panel {title!r} plots every command, not only "
                                f"{ECR_COMMAND}: {expression}")
    return problems


def _alert_rules(lab: Lab) -> tuple[Path, list[Path]]:
    """prometheus.yml and the rule files it loads (relative to it, as Prometheus reads them)."""
    config = lab.config_file("prometheus", lab.option("prometheus", "--config.file") or "")
    loaded = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("rule_files") or []
    return config, [config.parent / name for name in loaded]


def check_alerts(lab: Lab) -> list[str]:
    """Prometheus loads alert rules, and they hold the alerts docs/PRODUCTION.md lists."""
    _config, rule_files = _alert_rules(lab)
    if not rule_files:
        return ["prometheus.yml: loads no rule_files: no alert rules"]
    alerts = {rule["alert"] for path in rule_files if path.is_file()
              for group in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
                  "groups") or []
              for rule in group.get("rules") or [] if "alert" in rule}
    production = (ROOT / "docs" / "PRODUCTION.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(Eir[A-Za-z]+)` \|", production, flags=re.M))
    problems = [f"prometheus.yml: rule file {path.name} does not exist"
                for path in rule_files if not path.is_file()]
    problems += [f"alert {name} is in docs/PRODUCTION.md but in no rule file"
                 for name in sorted(documented - alerts)]
    problems += [f"alert {name} is in the rules but not in docs/PRODUCTION.md"
                 for name in sorted(alerts - documented)]
    return problems


CHECKS = [check_services, check_mounts, check_config_paths, check_host_ports, check_api,
          check_addresses,
          check_diameter, check_dra, check_eir_config, check_scenario, check_mme_eir_policy,
          check_radio,
          check_subscriber, check_core_links, check_prometheus, check_alerts, check_grafana]


# --- the repository's lab passes every check ---------------------------------------------------

@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab(ROOT)


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_lab_passes(lab, check):
    assert check(lab) == []


def test_promql_reader_finds_metrics_and_labels():
    metrics, labels = promql_metrics_and_labels(
        'histogram_quantile(0.99, sum by (le) (rate(eir_request_duration_seconds_bucket'
        '{command="ECR"}[5m]))) / on(job) group_left bool eir_peers offset 5m')
    assert metrics == {"eir_request_duration_seconds_bucket", "eir_peers"}
    assert labels == {"le", "command", "job"}


def test_freediameter_reader_reads_mme_conf(lab):
    config = lab.freediameter("mme")
    assert config.problems == []
    assert config.value("Identity") == "mme.localdomain"
    eir_peer = config.peers["eir.localdomain"]
    assert eir_peer.options == {"ConnectTo": "172.22.0.20", "Port": "3868"}
    assert eir_peer.flags == {"No_TLS", "No_SCTP"}
    assert "dict_dcca_3gpp.fdx" in config.values["LoadExtension"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian package prometheus)")
def test_promtool_accepts_prometheus_config_and_dashboard_queries(lab, tmp_path):
    """Prometheus's own checker: the scrape config, and every dashboard query as PromQL."""
    config = lab.config_file("prometheus", lab.option("prometheus", "--config.file") or "")
    queries = [target["expr"] for path in _dashboard_files(lab)
               for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]
               for target in panel["targets"]]
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{index}", "expr": query}
        for index, query in enumerate(queries)]}]}))
    for command in (["promtool", "check", "config", str(config)],
                    ["promtool", "check", "rules", str(rules)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout, result.stdout


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian package prometheus)")
def test_promtool_checks_and_unit_tests_the_alert_rules(lab):
    config, rule_files = _alert_rules(lab)
    tests = sorted(config.parent.glob("*.test.yml"))
    assert rule_files and tests
    for command in (["promtool", "check", "rules", *map(str, rule_files)],
                    ["promtool", "test", "rules", *map(str, tests)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                cwd=config.parent)
        assert result.returncode == 0, result.stdout + result.stderr
    unit_tested = {test["alertname"] for path in tests
                   for group in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
                   for test in group.get("alert_rule_test") or [] if test.get("exp_alerts")}
    rules = {rule["alert"] for path in rule_files
             for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
             for rule in group["rules"]}
    assert rules - unit_tested == set(), "alerts no unit test sees firing"


# --- each check notices a lab broken on purpose ------------------------------------------------

BREAKS = [
    # (check, file, text, replacement, words the problem must contain)
    (check_services, "docker-compose.yml", "  prometheus:\n    image: prom/prometheus:v2.53.0\n",
     "  prometheus:\n", "prometheus: neither an image nor a build"),
    (check_services, "docker-compose.yml", "${OPEN5GS_MME_IMAGE:-open5gs-s13:pr-4802}",
     "gradiant/open5gs:2.7.6", "is not ${OPEN5GS_MME_IMAGE"),
    (check_services, "docker-compose.yml", "    dockerfile: Dockerfile\n",
     "    dockerfile: Dockerfile.missing\n", "does not exist"),
    (check_mounts, "docker-compose.yml", "./testbed/prometheus:", "./testbed/prometheus-gone:",
     "testbed/prometheus-gone does not exist"),
    (check_mounts, "docker-compose.yml", "      - eir-data:/var/lib/eir",
     "      - eir-state:/var/lib/eir", "'eir-state' is not declared"),
    (check_config_paths, "testbed/open5gs/mme.yaml",
     "freeDiameter: /etc/open5gs-lab/freeDiameter/mme.conf",
     "freeDiameter: /etc/open5gs-lab/freeDiameter/mme-s13.conf", "mme-s13.conf"),
    (check_config_paths, "testbed/srsran/enb.conf", "/etc/srsran-lab/rb.conf",
     "/etc/srsran/rb.conf", "/etc/srsran/rb.conf is on no bind mount"),
    (check_config_paths, "docker-compose.yml", '"--config", "/etc/eir/eir.yaml"',
     '"--config", "/etc/eir/lab.yaml"', "/etc/eir/lab.yaml"),
    (check_host_ports, "docker-compose.yml", '"127.0.0.1:3000:3000"', '"127.0.0.1:9090:3000"',
     "host port 9090/tcp is published by both prometheus and grafana"),
    (check_api, "testbed/eir/eir.yaml", '  listen: "0.0.0.0:8080"', "  listen: null",
     "api.listen is not set"),
    (check_api, "docker-compose.yml", '      - "127.0.0.1:8080:8080"\n', "",
     "the API port 8080 is not published on 127.0.0.1"),
    (check_api, "docker-compose.yml", "EIR_API_TOKEN: ${EIR_API_TOKEN:-open-eir-lab-api-token}",
     "EIR_API_TOKEN_UNUSED: x", "no API token"),
    (check_addresses, "docker-compose.yml", "ipv4_address: 172.22.0.41",
     "ipv4_address: 172.22.0.40", "both have address 172.22.0.40"),
    (check_diameter, "testbed/open5gs/freeDiameter/mme.conf", "Port = 3868;", "Port = 3869;",
     "Port 3869 is not the EIR's listen port"),
    (check_diameter, "testbed/open5gs/freeDiameter/mme.conf", 'ConnectTo = "172.22.0.20"',
     'ConnectTo = "172.22.0.21"', "172.22.0.21 is not the eir service's address"),
    (check_diameter, "testbed/eir/eir.yaml", "origin_host: eir.localdomain",
     "origin_host: eir.lab.example", "no ConnectPeer named 'eir.lab.example'"),
    (check_diameter, "testbed/eir/eir.yaml", "origin_realm: localdomain",
     "origin_realm: epc.example", "eir.realm 'localdomain' is not the EIR's realm"),
    (check_diameter, "testbed/open5gs/mme.yaml", "host: eir.localdomain", "host: eir",
     "eir.host 'eir' is not the EIR's identity"),
    (check_diameter, "testbed/open5gs/freeDiameter/mme.conf",
     'Port = 3868; No_TLS; No_SCTP; };', 'Port = 3868; No_TLS; };',
     "No_SCTP is missing, but the EIR's transport is tcp"),
    (check_diameter, "testbed/open5gs/freeDiameter/hss.conf", 'ConnectTo = "172.22.0.6"',
     'ConnectTo = "172.22.0.7"', "is not mme's address"),
    (check_diameter, "testbed/open5gs/freeDiameter/mme.conf", 'Realm = "localdomain";',
     'Realm = "localdomain"', "not a freeDiameter statement"),
    (check_dra, "testbed/dra/freediameter.conf", 'ConnectTo = "172.22.0.22"',
     'ConnectTo = "172.22.0.24"', "ConnectTo 172.22.0.24 is not eir-b's address"),
    (check_dra, "docker-compose.yml", '"--origin-host", "eir-b.localdomain"',
     '"--origin-host", "eir-c.localdomain"', "no ConnectPeer for EIR node eir-c.localdomain"),
    (check_dra, "testbed/dra/freediameter.conf", "TwTimer = 6;", "TwTimer = 3;",
     "below freeDiameter's minimum"),
    (check_dra, "testbed/dra/freediameter.conf",
     'LoadExtension = "/usr/lib/freeDiameter/rt_load_balance.fdx";', "",
     "rt_load_balance is not loaded"),
    (check_dra, "testbed/dra/rt_busypeers.conf", "RelayTimeout = 0;", "RelayTimeout = 2000;",
     "RelayTimeout 2000"),
    (check_dra, "testbed/dra/rt_default.conf", r'["^eir-[a-z0-9]+\.localdomain$"]',
     r'["^eir-a\.localdomain$"]', "no rule routes to EIR node eir-b.localdomain"),
    (check_dra, "testbed/dra/acl_wl.conf", "ALLOW_IPSEC mme.localdomain", "mme.localdomain",
     "may not connect without TLS"),
    (check_dra, "testbed/dra/eir-node.yaml", "url: postgresql://eir:eir@postgres/eir",
     "url: postgresql://eir:eir@postgres/observations", "are not postgres's POSTGRES_USER"),
    (check_dra, "docker-compose.yml", "      - eir-b-data:/var/lib/eir",
     "      - eir-a-data:/var/lib/eir", "share the store volume eir-a-data"),
    (check_dra, "testbed/dra/eir-node.yaml", "  source: /etc/eir/registry",
     "  source: /etc/eir/registry-gone", "is no mounted directory"),
    (check_dra, "testbed/dra/registry/20261201_blacklist.csv", "35349006987331,20200101,",
     "35349006987331,someday,", "`eir sync` of /etc/eir/registry fails"),
    (check_eir_config, "testbed/eir/eir.yaml", "  transport: tcp",
     "  transport: tcp\n  watchdog_seconds: 0", "watchdog_seconds"),
    (check_eir_config, "testbed/eir/lists/lab.csv", "86000000,blacklist,",
     "86000000,stolen,", "lab.csv"),
    (check_scenario, "testbed/eir/lists/lab.csv", "353490069873319,blacklist,",
     "353490069873319,whitelist,", "is WHITELISTED, the scenario needs BLACKLISTED"),
    (check_scenario, "testbed/eir/lists/lab-whitelisted.csv", "353490069873319,whitelist,",
     "353490069873319,greylist,", "is GREYLISTED, the scenario needs WHITELISTED"),
    (check_scenario, "testbed/srsran/ue.conf", "imei = 353490069873319",
     "imei = 353490069873327", "is UNKNOWN, the scenario needs BLACKLISTED"),
    (check_mme_eir_policy, "testbed/open5gs/mme.yaml", "    blacklist_action: reject\n", "",
     "an answer BLACKLISTED would allow the attach"),
    (check_mme_eir_policy, "testbed/open5gs/mme.yaml", "    max_age: 5\n",
     "    max_age: 5\n    timeout: 3\n", "unknown key `timeout`"),
    (check_mme_eir_policy, "testbed/open5gs/mme.yaml", "    greylist_action: allow",
     "    greylist_action: deny", "eir.greylist_action: 'deny' is not allow or reject"),
    (check_mme_eir_policy, "testbed/open5gs/mme.yaml", "    whitelist_action: allow",
     "    whitelist_action: reject", "an answer WHITELISTED would reject the attach"),
    (check_mme_eir_policy, "testbed/README.md", MME_S13_COMMIT, "main",
     "does not pin LetMeConnect001/open5gs-s13"),
    (check_mme_eir_policy, "testbed/README.md", "rejected with EMM cause #6",
     "rejected with EMM cause #17", "EMM cause #17"),
    (check_radio, "testbed/srsran/rr.conf", "tac = 0x0007;", "tac = 0x0008;",
     "TAC 0x0008 is not among the MME's [7]"),
    (check_radio, "testbed/srsran/enb.conf", "mnc = 01", "mnc = 02", "is not the eNB's"),
    (check_radio, "testbed/srsran/ue.conf", "rx_port=tcp://172.22.0.30:2000",
     "rx_port=tcp://172.22.0.30:2002", "ZeroMQ rx_port tcp://172.22.0.30:2002"),
    (check_radio, "testbed/srsran/enb.conf", "mme_addr = 172.22.0.6", "mme_addr = 172.22.0.5",
     "mme_addr 172.22.0.5 is not the MME's S1AP server"),
    (check_subscriber, "docker-compose.yml", "SUBSCRIBER_K: 00112233445566778899aabbccddeeff",
     "SUBSCRIBER_K: 00112233445566778899aabbccddeefe", "SUBSCRIBER_K"),
    (check_subscriber, "testbed/open5gs/hss.yaml", "mongodb://mongodb/open5gs",
     "mongodb://mongo/open5gs", "host 'mongo' is no service"),
    (check_core_links, "testbed/open5gs/mme.yaml", "        - address: 172.22.0.7",
     "        - address: 172.22.0.8", "is not sgwc's gtpc server"),
    (check_core_links, "testbed/open5gs/upf.yaml", "      - address: 172.22.0.10\n  gtpu",
     "      - address: 172.22.0.11\n  gtpu", "is not upf's pfcp server"),
    (check_prometheus, "testbed/prometheus/prometheus.yml", '"eir:9464"', '"eir:9100"',
     "target eir:9100 is not the EIR's metrics port"),
    (check_prometheus, "testbed/prometheus/prometheus.yml", '"eir:9464"', '"eir:3868"',
     "target eir:3868 is not the EIR's metrics port"),
    (check_eir_config, "docker-compose.yml", '"--config", "/etc/eir/eir.yaml"]',
     '"--config", "/etc/eir/eir.yaml", "--prometheus", "0.0.0.0:9464"]',
     "--prometheus: not an option of `eir serve`"),
    (check_prometheus, "testbed/prometheus/prometheus.yml", "  - job_name: eir",
     "  - job_name: [eir", "prometheus.yml: not YAML"),
    (check_alerts, "testbed/prometheus/prometheus.yml", "rule_files:\n  - alerts.yml\n", "",
     "loads no rule_files"),
    (check_alerts, "testbed/prometheus/alerts.yml", "alert: EirSyncRefused",
     "alert: EirSyncsRefused", "alert EirSyncRefused is in docs/PRODUCTION.md but in no"),
    (check_grafana, "testbed/grafana/dashboards/eir.json", "sum by (state) (eir_peers{",
     "sum by (state) (eir_peer_count{", "queries eir_peer_count, which open EIR does not"),
    (check_grafana, "testbed/grafana/dashboards/eir.json",
     "sum by (equipment_status) (rate(eir_answers_total{",
     "sum by (imei) (rate(eir_answers_total{", "uses label 'imei'"),
    (check_grafana, "testbed/grafana/dashboards/eir.json", '"title": "Diameter requests by '
     'command"', '"title": "ME-Identity-Check requests by command"',
     "plots every command, not only ME-Identity-Check"),
    (check_grafana, "testbed/grafana/dashboards/eir.json",
     'sum(increase(eir_clone_hits_total{instance=~\\"$instance\\"}[1d]))',
     'sum(increase(eir_observations_queued{instance=~\\"$instance\\"}[1d]))',
     "no panel for clone hits"),
    (check_grafana, "testbed/grafana/dashboards/eir.json", '"name": "instance"',
     '"name": "node"', "no $instance variable"),
    (check_grafana, "testbed/grafana/dashboards/eir.json",
     'max(eir_list_age_seconds{instance=~\\"$instance\\"})', "max(eir_list_age_seconds)",
     "panel 'List age' ignores $instance"),
    (check_grafana, "testbed/grafana/dashboards/eir.json", '"uid": "lab-prometheus"',
     '"uid": "prometheus"', "not a provisioned one"),
    (check_grafana, "testbed/grafana/dashboards/eir.json", '"panels": [', '"panels": [,',
     "not JSON"),
]


def _broken_copy(tmp_path: Path, file: str, text: str, replacement: str) -> Lab:
    """The lab's files copied under tmp_path, with `text` in `file` replaced (first one)."""
    root = tmp_path / "lab"
    root.mkdir()
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(ROOT / name, root / name)
    for part in ("README.md", "eir", "open5gs", "srsran", "prometheus", "grafana", "dra"):
        source = ROOT / "testbed" / part
        if source.is_dir():
            shutil.copytree(source, root / "testbed" / part)
        else:
            (root / "testbed").mkdir(exist_ok=True)
            shutil.copy(source, root / "testbed" / part)
    target = root / file
    original = target.read_text(encoding="utf-8")
    assert text in original, f"{file} no longer holds {text!r}: update this break"
    target.write_text(original.replace(text, replacement, 1), encoding="utf-8")
    return Lab(root)


@pytest.mark.parametrize(
    "check, file, text, replacement, problem", BREAKS,
    ids=[f"{check.__name__}:{file.rsplit('/', 1)[-1]}:{index}"
         for index, (check, file, *_rest) in enumerate(BREAKS)])
def test_check_notices_break(tmp_path, check, file, text, replacement, problem):
    broken = _broken_copy(tmp_path, file, text, replacement)
    problems = check(broken)
    assert any(problem in found for found in problems), problems


# --- the EIR's healthcheck, run as Docker would run it ------------------------------------------

def healthcheck_command(lab: Lab, port: int) -> list[str]:
    """The eir service's healthcheck (CMD form), asking about `port` instead of 3868."""
    test = lab.service("eir")["healthcheck"]["test"]
    assert test[0] == "CMD" and f":{DIAMETER_PORT:04X}" in test[-1], test
    return [sys.executable, *test[2:-1],
            test[-1].replace(f":{DIAMETER_PORT:04X}", f":{port:04X}")]


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_healthcheck_sees_an_ipv6_only_listener(lab):
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            listener.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        port = listener.getsockname()[1]
        command = healthcheck_command(lab, port)
        assert subprocess.run(command, timeout=30).returncode == 1  # bound, not listening
        listener.listen()
        assert subprocess.run(command, timeout=30).returncode == 0


def test_healthcheck_sees_an_ipv4_listener(lab):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        command = healthcheck_command(lab, listener.getsockname()[1])
        assert subprocess.run(command, timeout=30).returncode == 0


# --- the MME's freeDiameter config against the lab's EIR, for real --------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_mme_conf(lab: Lab, eir_port: int) -> str:
    """mme.conf as the lab has it, moved to loopback: ListenOn 127.0.0.1 on a free port, the
    EIR's ConnectPeer to `eir_port`, the other peers (not running here) left out. NoRelay
    goes too: Debian's freeDiameter has no S13 application to advertise (the MME built from
    pull request 4802 does), so it offers the relay application, which open EIR accepts."""
    eir_identity = load_settings(lab.eir_config_path()).diameter.origin_host
    lines = []
    for line in lab.config_file("mme", "/etc/open5gs-lab/freeDiameter/mme.conf").read_text(
            ).splitlines():
        statement = line.split("#", 1)[0].strip()
        if statement.startswith("ListenOn"):
            line = 'ListenOn = "127.0.0.1";'
        elif statement == "NoRelay;":
            continue
        elif statement.startswith("ConnectPeer"):
            if f'"{eir_identity}"' not in statement:
                continue
            line = re.sub(r'ConnectTo = "[^"]*"', 'ConnectTo = "127.0.0.1"', statement)
            line = re.sub(r"Port = \d+", f"Port = {eir_port}", line)
        lines.append(line)
    lines += [f"Port = {_free_port()};", "SecPort = 0;", "No_IPv6;", "TcTimer = 30;"]
    return "\n".join(lines) + "\n"


@pytest.mark.peer
@pytest.mark.skipif(shutil.which("freeDiameterd") is None,
                    reason="freeDiameterd is not installed (Debian package freediameterd)")
def test_mme_freediameter_conf_opens_to_lab_eir(lab, eir_server, tmp_path, monkeypatch):
    config = lab.eir_config_path()
    lists = load_settings(config).lists.files
    monkeypatch.setenv("EIR_API_TOKEN", "t" * 16)  # the compose file's environment
    server = eir_server("--config", str(config), "--api", "127.0.0.1:0", lists=lists)
    settings = load_settings(config).diameter
    conf = tmp_path / "mme.conf"
    conf.write_text(loopback_mme_conf(lab, server.port))
    process = subprocess.Popen(["freeDiameterd", "-c", str(conf)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                               errors="replace")
    peer = LoggedProcess(process, process.stdout, "freeDiameterd")
    try:
        # freeDiameterd waits up to 4 s before its first connection attempt.
        opened = rf"'STATE_WAITCEA'\t-> 'STATE_OPEN'\t'{re.escape(settings.origin_host)}'"
        peer.wait_for_line(opened, timeout=20)
        server.wait_for_log(r"peer mme\.localdomain \(realm localdomain\) is open")
    finally:
        peer.kill()
