"""Command line: `eir serve`, `eir check`, `eir --version`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from eir import __version__
from eir.config import ConfigError, Settings, default_config_path, load_settings, \
    parse_host_port
from eir.decision import UnknownPolicy
from eir.diameter.dictionary import DictionaryError
from eir.imei import ImeiError, normalise_imei
from eir.lists import ListError, load_rule_set, parse_imsi

EXIT_USAGE = 2


def _host_port(text: str) -> str:
    try:
        parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eir", description="open EIR: Equipment Identity Register over Diameter S13.")
    parser.add_argument("--version", action="version", version=f"open EIR {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", type=Path, metavar="FILE",
                         help="YAML configuration (default: $EIR_CONFIG, else "
                              "./config/eir.yaml if present, else built-in defaults)")
        sub.add_argument("--list", dest="lists", action="append", type=Path, metavar="FILE",
                         help="list file in the native CSV format; repeat for several "
                              "(replaces the config file's lists)")
        sub.add_argument("--unknown", choices=[p.value for p in UnknownPolicy],
                         help="verdict for an IMEI no list entry matches")

    serve = commands.add_parser("serve", help="run the Diameter S13 server")
    common(serve)
    serve.add_argument("--listen", action="append", type=_host_port, metavar="HOST:PORT",
                       help="address to listen on, [ADDR]:PORT for IPv6; repeat for several "
                            "(replaces the config file's)")
    serve.add_argument("--origin-host", help="our Origin-Host")
    serve.add_argument("--origin-realm", help="our Origin-Realm")
    serve.add_argument("--transport", choices=["tcp", "sctp"])
    serve.add_argument("--watchdog", type=float, metavar="SECONDS",
                       help="Tw: send DWR after this long without traffic")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check", help="print the verdict for one IMEI")
    common(check)
    check.add_argument("imei", help="14-16 digit IMEI or IMEISV")
    check.add_argument("--imsi", help="the subscriber's IMSI")
    check.add_argument("--software-version", help="the 2-digit software version")
    check.add_argument("--json", action="store_true", help="print a JSON object")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    path = args.config if args.config is not None else default_config_path()
    settings = load_settings(path)
    diameter: dict = {}
    if getattr(args, "listen", None):
        diameter["listen"] = args.listen
    for flag, key in (("origin_host", "origin_host"), ("origin_realm", "origin_realm"),
                      ("transport", "transport"), ("watchdog", "watchdog_seconds")):
        value = getattr(args, flag, None)
        if value is not None:
            diameter[key] = value
    lists: dict = {}
    if args.lists:
        lists["files"] = args.lists
    if args.unknown:
        lists["unknown_policy"] = UnknownPolicy(args.unknown)
    update: dict = {}
    if diameter:
        update["diameter"] = settings.diameter.model_validate(
            settings.diameter.model_dump() | diameter)
    if lists:
        update["lists"] = settings.lists.model_copy(update=lists)
    if getattr(args, "log_level", None):
        update["logging"] = settings.logging.model_copy(update={"level": args.log_level})
    return settings.model_copy(update=update) if update else settings


def _serve(args: argparse.Namespace) -> int:
    from eir.server import build_server

    settings = settings_from(args)
    logging.basicConfig(
        level=settings.logging.level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(settings)
    try:
        asyncio.run(server.serve_forever())
    except OSError as exc:
        print(f"eir: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        imei = normalise_imei(args.imei)
    except ImeiError as exc:
        print(f"eir: IMEI: {exc}", file=sys.stderr)
        return EXIT_USAGE
    imsi = None
    if args.imsi:
        try:
            imsi = parse_imsi(args.imsi)
        except ValueError as exc:
            print(f"eir: IMSI: {exc}", file=sys.stderr)
            return EXIT_USAGE
    rule_set = load_rule_set(settings.lists.files, settings.lists.unknown_policy)
    verdict = rule_set.decide(imei, imsi, args.software_version)
    if args.json:
        print(json.dumps({"imei": imei, "imsi": imsi, "status": verdict.status_name,
                          "match": verdict.match.value, "reason": verdict.reason,
                          "source": verdict.source, "list_version": rule_set.version}))
    else:
        print(verdict.status_name)
        print(f"reason: {verdict.reason}")
        print(f"source: {verdict.source} (lists version {rule_set.version})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return _check(args)
    except ConfigError as exc:
        print(f"eir: bad configuration:\n{exc}", file=sys.stderr)
    except ListError as exc:
        print(f"eir: list refused:\n{exc}", file=sys.stderr)
    except DictionaryError as exc:
        print(f"eir: bad dictionary: {exc}", file=sys.stderr)
    return EXIT_USAGE
