"""Command line: `eir serve`, `eir check`, `eir sync`, `eir lists`, `eir dump`, `eir report`,
`eir replay`, `eir conformance`, `eir --version`."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
import time
import zipfile
from datetime import date
from pathlib import Path
from typing import Callable

from eir import __version__
from eir.check.observations import (
    CLONE_MIN_IMSIS,
    ObservationError,
    clone_suspects,
    database_location,
    dump_file_name,
    write_dump,
)
from eir.conformance import add_arguments as conformance_arguments
from eir.conformance import main as conformance_main
from eir.core.config import (
    ConfigError,
    Settings,
    default_config_path,
    expand_listen,
    load_settings,
    parse_host_port,
    parse_local_listen,
)
from eir.core.decision import UnknownPolicy, day_number, format_day
from eir.core.imei import ImeiError, normalise_imei
from eir.core.logs import mask_imsi
from eir.diameter.dictionary import DictionaryError
from eir.lists.native import ListError, parse_imsi
from eir.lists.store import Store, StoreError
from eir.lists.sync import SyncError, sync_configured

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a process SIGPIPE ended


def _accepted_by(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the option's text as given, once `parse` accepts it (its ValueError
    becomes the usage error, after the option's name)."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check


_host_port = _accepted_by(parse_host_port)
_diameter_listen = _accepted_by(expand_listen)
_local_listen = _accepted_by(parse_local_listen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eir", description="open EIR: Equipment Identity Register over Diameter S13.")
    parser.add_argument("--version", action="version", version=f"open EIR {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_check(commands)
    _add_sync(commands)
    _add_lists(commands)
    _add_observation_commands(commands)
    _add_replay(commands)
    conformance = commands.add_parser(
        "conformance", help="S13 and RFC 6733 checks against any EIR, each citing its "
                            "clause (docs/REPLAY.md)")
    conformance_arguments(conformance)
    _client_options(conformance, "conformance.localdomain", 2.0, "wait this long for each "
                    "answer")
    return parser


def _client_options(sub: argparse.ArgumentParser, origin_host: str, timeout: float,
                    timeout_help: str) -> None:
    """The options of a command that talks to an EIR as an MME does (replay, conformance):
    its Diameter identity and how long it waits for an answer."""
    sub.add_argument("--timeout", type=float, default=timeout, metavar="S",
                     help=f"{timeout_help} (default {timeout:g})")
    sub.add_argument("--origin-host", default=origin_host, metavar="HOST",
                     help=f"our Origin-Host (an FQDN) in CER and requests (default "
                          f"{origin_host})")
    sub.add_argument("--origin-realm", default="localdomain", metavar="REALM",
                     help="our Origin-Realm in CER and requests (default localdomain)")
    sub.add_argument("--destination-realm", default="localdomain", metavar="REALM",
                     help="Destination-Realm of the requests (default localdomain)")


def _common_options(sub: argparse.ArgumentParser, store_help: str) -> None:
    _config_option(sub)
    sub.add_argument("--list", dest="lists", action="append", type=Path, metavar="FILE",
                     help="list file in the native CSV format; repeat for several "
                          "(default: the config's lists.files; replaces them)")
    sub.add_argument("--unknown", choices=[p.value for p in UnknownPolicy],
                     help="verdict for an IMEI no list entry matches (default: the "
                          "config's lists.unknown_policy, unknown = 5422)")
    _store_option(sub, store_help)


def _config_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", type=Path, metavar="FILE",
                     help="YAML configuration; flags override it (default: $EIR_CONFIG, "
                          "else ./config/eir.yaml if present, else built-in defaults)")


def _store_option(sub: argparse.ArgumentParser, text: str) -> None:
    sub.add_argument("--store", type=Path, metavar="DIR",
                     help=f"snapshot store directory: {text} (default: the config's "
                          "store.directory)")


def _add_serve(commands) -> None:
    """eir serve: the server."""
    serve = commands.add_parser("serve", help="run the Diameter S13 server")
    _common_options(serve, "answer from its snapshot in force instead of list files, and "
                           "sync into it when sync.source is set")
    serve.add_argument("--listen", action="append", type=_diameter_listen, metavar="HOST:PORT",
                       help="address to listen on, [ADDR]:PORT for IPv6, or a bare PORT for "
                            "every IPv4 and IPv6 address; repeat for several (default: the "
                            "config's diameter.listen, 0.0.0.0:3868 and [::]:3868; replaces it)")
    serve.add_argument("--origin-host", metavar="HOST",
                       help="our Origin-Host (default: the config's diameter.origin_host, "
                            "eir.localdomain)")
    serve.add_argument("--origin-realm", metavar="REALM",
                       help="our Origin-Realm (default: the config's diameter.origin_realm, "
                            "localdomain)")
    serve.add_argument("--transport", choices=["tcp", "sctp"],
                       help="transport of the Diameter listeners (default: the config's "
                            "diameter.transport, tcp)")
    serve.add_argument("--watchdog", type=float, metavar="SECONDS",
                       help="Tw: send DWR after this long without traffic (default: the "
                            "config's diameter.watchdog_seconds, 30)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="least severe log records written (default: the config's "
                            "logging.level, info)")
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="text lines or one JSON object per line (default: the config's "
                            "logging.format, text)")
    serve.add_argument("--metrics", type=_local_listen, metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (a bare "
                            "PORT binds 127.0.0.1; default: the config's metrics.listen, off)")
    serve.add_argument("--event-loop", choices=["asyncio", "uvloop"],
                       help="the event loop (uvloop: pip install open-eir[fast]; default: the "
                            "config's event_loop, asyncio)")
    serve.add_argument("--workers", type=_worker_count, metavar="N",
                       help="worker processes serving the listeners (default: the "
                       "config's `workers`, 0 there meaning one per core)")
    serve.add_argument("--api", type=_local_listen, metavar="HOST:PORT",
                       help="serve the admin and lookup API (a bare PORT binds 127.0.0.1; "
                            "token: api.token or $EIR_API_TOKEN; default: the config's "
                            "api.listen, off)")
    serve.add_argument("--sbi", type=_host_port, metavar="HOST:PORT",
                       help="serve N5g-eir (5G-EIR, TS 29.511) over cleartext HTTP/2 there "
                            "(default: the config's sbi.listen, off)")


def _add_check(commands) -> None:
    """eir check: one verdict."""
    check = commands.add_parser("check", help="print the verdict for one IMEI")
    _common_options(check, "answer from its snapshot in force instead of list files")
    check.add_argument("imei", help="14-16 digit IMEI or IMEISV")
    check.add_argument("--imsi", help="the subscriber's IMSI (default: none, as an ECR "
                                      "without User-Name)")
    check.add_argument("--software-version", help="the 2-digit software version (default: "
                                                  "none)")
    check.add_argument("--json", action="store_true", help="print a JSON object")


def _add_sync(commands) -> None:
    """eir sync: a drop directory or URL into the store."""
    sync_command = commands.add_parser(
        "sync", help="compile a registry drop directory into a new snapshot in the store")
    sync_command.add_argument("--source", metavar="DIR_OR_URL",
                              help="drop directory, or http(s) URL of the registry's "
                                   "manifest.json (default: the config's sync.source)")
    sync_command.add_argument("--quiet", action="store_true",
                              help="do not list the files the sync ignored (warnings and "
                                   "the outcome are still printed)")
    _config_option(sync_command)
    _store_option(sync_command, "where the new snapshot is published")


def _add_lists(commands) -> None:
    """eir lists status|rollback|unpin: the snapshot store."""
    lists = commands.add_parser("lists", help="the snapshot store: status, rollback")
    lists_commands = lists.add_subparsers(dest="lists_command", required=True,
                                          metavar="ACTION")
    status = lists_commands.add_parser("status", help="versions, sources, counts and age")
    status.add_argument("--json", action="store_true", help="print a JSON array")
    rollback = lists_commands.add_parser(
        "rollback", help="put an earlier version back in force (default: the previous one)")
    unpin = lists_commands.add_parser(
        "unpin", help="let syncs publish again after a rollback pinned the store")
    rollback.add_argument("version", nargs="?",
                          help="the version to put in force, as `eir lists status` shows it "
                               "(default: the one before the version in force)")
    for sub, text in ((status, "the one to show"), (rollback, "the one to roll back"),
                      (unpin, "the one to unpin")):
        _config_option(sub)
        _store_option(sub, text)


def _add_observation_commands(commands) -> None:
    """eir dump and eir report clones: from the observations."""
    dump = commands.add_parser(
        "dump", help="the DIRBS operator data dump of one day (date,imei,imsi,msisdn,rat)")
    dump.add_argument("--date", required=True, type=_day, metavar="YYYYMMDD",
                      help="the day to dump")
    dump.add_argument("--output", type=Path, metavar="FILE",
                      help="write here instead of standard output (with --operator: the "
                           "directory of the zip, default the current one)")
    dump.add_argument("--operator", type=_operator_id, metavar="ID",
                      help="write the zip DIRBS-Core imports, ID_YYYYMMDD_YYYYMMDD.zip "
                           "(ID: the registry's lower-case operator id)")
    dump.add_argument("--pseudonymise", action="store_true",
                      help="replace IMSIs and MSISDNs with keyed hashes (needs "
                           "observations.pseudonymise_key; when that is set, dumps are "
                           "always pseudonymised)")

    report = commands.add_parser("report", help="reports from the observations")
    reports = report.add_subparsers(dest="report", required=True, metavar="REPORT")
    clones = reports.add_parser(
        "clones", help="IMEIs seen with several IMSIs (cloned IMEIs, SIM swaps)")
    clones.add_argument("--since", required=True, type=_day, metavar="YYYY-MM-DD",
                        help="first day to look at")
    clones.add_argument("--min-imsis", type=int, default=CLONE_MIN_IMSIS, metavar="K",
                        help="list IMEIs seen with at least K distinct IMSIs (default "
                             f"{CLONE_MIN_IMSIS})")
    clones.add_argument("--json", action="store_true", help="print a JSON array")
    for sub in (dump, clones):
        _config_option(sub)
        _store_option(sub, "where the server keeps observations.sqlite, unless "
                           "observations.database or observations.url says otherwise")


def _add_replay(commands) -> None:
    """eir replay: the load and replay harness."""
    replay = commands.add_parser(
        "replay", help="load and replay harness: send ECRs to an EIR, report latency and "
                       "verdicts (docs/REPLAY.md)")
    replay.add_argument("--target", required=True, type=_host_port, metavar="HOST:PORT",
                        help="the EIR to load (loopback only, unless --allow-remote)")
    replay.add_argument("--connections", type=int, metavar="N",
                        help="Diameter connections, each with its own CER (default: one per "
                             "process)")
    replay.add_argument("--processes", type=int, default=1, metavar="N",
                        help="worker processes sharing the connections (default 1)")
    replay.add_argument("--window", type=int, default=128, metavar="W",
                        help="requests outstanding per connection at most (default 128)")
    amount = replay.add_mutually_exclusive_group()
    amount.add_argument("--count", type=int, metavar="N",
                        help="requests in the whole run (default: one pass of the mix or "
                             "capture)")
    amount.add_argument("--duration", type=float, metavar="S",
                        help="send for this many seconds, then wait for the answers")
    replay.add_argument("--rate", type=float, metavar="R",
                        help="requests per second over all connections (default: flat out; "
                             "latency is then measured from each request's scheduled time)")
    source = replay.add_mutually_exclusive_group()
    source.add_argument("--mix", type=Path, metavar="FILE.csv",
                        help="CSV with columns imei,imsi: the requests, in order, cycled")
    source.add_argument("--generate", metavar="MIX",
                        help="shares of verdict classes, e.g. white=60,black=20,grey=10,"
                             "unknown=5,invalid=5 (the default), drawn from --list")
    source.add_argument("--pcap", type=Path, metavar="FILE",
                        help="replay the ECRs of a pcap/pcapng capture and compare each "
                             "answer with the captured one")
    replay.add_argument("--list", dest="lists", action="append", type=Path, metavar="FILE",
                        help="with --generate: the list file(s) the target serves (default "
                             "config/lists/example.csv), or one directory: a snapshot store "
                             "or a registry drop directory")
    replay.add_argument("--speed", type=float, default=1.0, metavar="FACTOR",
                        help="with --pcap: replay at the recorded pace times FACTOR (default "
                             "1; 0 = flat out)")
    replay.add_argument("--write-pcap", type=Path, metavar="FILE",
                        help="write the traffic (requests and answers) as a pcap")
    replay.add_argument("--json", action="store_true",
                        help="print the report as one JSON object (last line of stdout)")
    replay.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="plot throughput and latency over time and the latency histogram")
    replay.add_argument("--progress", action="store_true",
                        help="print progress lines even when stderr is not a terminal")
    replay.add_argument("--allow-remote", action="store_true",
                        help="allow a target that is not a loopback address")
    replay.add_argument("--seed", type=int, default=1,
                        help="with --generate: the random seed of the IMEIs drawn (default 1)")
    _client_options(replay, "replay.localdomain", 5.0, "count a request unanswered after S "
                    "seconds as timed out")


def _day(text: str) -> int:
    """YYYYMMDD or YYYY-MM-DD → YYYYMMDD as an int."""
    digits = text.replace("-", "") if len(text) == 10 else text
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError
        return day_number(date(int(digits[:4]), int(digits[4:6]), int(digits[6:])))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYYMMDD or YYYY-MM-DD)") \
            from None


def config_path(args: argparse.Namespace) -> Path | None:
    """--config, else $EIR_CONFIG, else ./config/eir.yaml if present; None: built-in
    defaults."""
    return args.config if args.config is not None else default_config_path()


def no_lists(settings: Settings, config: Path | None) -> str | None:
    """Why there is nothing to answer from (no list file and no store), else None."""
    if settings.lists.files or settings.store.directory is not None:
        return None
    where = (f"{config} names neither lists.files nor store.directory" if config is not None
             else "no configuration file (neither --config, $EIR_CONFIG nor "
                  "./config/eir.yaml)")
    return (f"no lists loaded: {where}; give --list FILE, --store DIR or --config FILE")


def _operator_id(text: str) -> str:
    # DIRBS-Core's operator ids are lower case (its importer asserts it); the file name is
    # split on `_` from the right, so an id may hold one.
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a DIRBS operator id (lower-case letters, digits, _ and -)")
    return text


def settings_from(args: argparse.Namespace) -> Settings:
    path = config_path(args)
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
    if getattr(args, "lists", None):
        lists["files"] = args.lists
    if getattr(args, "unknown", None):
        lists["unknown_policy"] = UnknownPolicy(args.unknown)
    update: dict = {}
    if getattr(args, "store", None) is not None:
        update["store"] = settings.store.model_copy(update={"directory": args.store})
    if getattr(args, "source", None):
        update["sync"] = settings.sync.model_copy(update={"source": args.source})
    if diameter:
        update["diameter"] = settings.diameter.model_validate(
            settings.diameter.model_dump() | diameter)
    if lists:
        update["lists"] = settings.lists.model_copy(update=lists)
    logging_update = {key: value for key, value in (
        ("level", getattr(args, "log_level", None)),
        ("format", getattr(args, "log_format", None))) if value}
    if logging_update:
        update["logging"] = settings.logging.model_copy(update=logging_update)
    for section in ("metrics", "api", "sbi"):
        if getattr(args, section, None):
            update[section] = getattr(settings, section).model_copy(
                update={"listen": getattr(args, section)})
    return settings.model_copy(update=update) if update else settings


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers (1 or more)")
    return value


def _serve(args: argparse.Namespace) -> int:
    from eir.core.logs import configure_logging
    from eir.serve.server import build_server
    from eir.serve.workers import WorkerStartError, default_worker_count

    settings = settings_from(args)
    # Serving no list at all would answer every IMEI with the unknown policy: a forgotten
    # config or volume, not a choice (an operator who means it gives an empty list file).
    missing = no_lists(settings, config_path(args))
    if missing is not None:
        print(f"eir: refusing to serve: {missing}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.logging, sys.stderr)
    workers = args.workers or settings.workers or default_worker_count()
    event_loop = args.event_loop or settings.event_loop
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            print("eir: event_loop uvloop: uvloop is not installed (pip install "
                  "open-eir[fast])", file=sys.stderr)
            return EXIT_USAGE
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    server = build_server(settings, workers, args.argv)
    server.settings_source = lambda: settings_from(args)  # SIGHUP reads it again
    if server.worker_socket is None:  # not again in each worker
        logging.getLogger("eir.cli").info(
            "configuration: %s", config_path(args) or "built-in defaults (no file)")
    try:
        asyncio.run(server.serve_forever())
    except OSError as exc:
        print(f"eir: cannot listen: {exc}", file=sys.stderr)
        return 1
    except WorkerStartError as exc:
        print(f"eir: {exc}", file=sys.stderr)
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
    from eir.serve.server import grandfather_index, load_rules

    grandfathering = grandfather_index(settings)
    if grandfathering is not None:
        try:
            grandfathering.load(database_location(settings))
        except ObservationError as exc:
            print(f"eir: grandfathering: nothing observed yet: {exc}", file=sys.stderr)
    rule_set = load_rules(settings, grandfathering, first_sync=False)  # a query writes nothing
    verdict = rule_set.explain(imei, imsi)
    missing = no_lists(settings, config_path(args))
    if missing is not None:
        print(f"eir: warning: {missing}", file=sys.stderr)
    if args.json:
        print(json.dumps({"imei": imei, "imsi": imsi, "status": verdict.status_name,
                          "match": verdict.match.value, "reason": verdict.reason,
                          "source": verdict.source, "list_version": rule_set.version}))
    else:
        print(verdict.status_name)
        print(f"reason: {verdict.reason}")
        print(f"source: {verdict.source} (lists version {rule_set.version})")
    return 0


def _store(settings: Settings) -> Store:
    if settings.store.directory is None:
        raise StoreError("no store: give --store DIR or set store.directory in the config")
    return Store(settings.store.directory, settings.store.keep)


def _sync(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if not settings.sync.source:
        raise SyncError("no source: give --source DIR or set sync.source in the config")
    store = _store(settings)
    result = sync_configured(settings.sync, store)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for note in () if args.quiet else result.ignored:
        print(f"ignored: {note}")
    if result.published:
        print(f"published version {result.version}: " + ", ".join(
            f"{count} {name}" for name, count in result.counts.items()))
    else:
        print(f"up to date: version {result.version} already holds these files")
    return 0


def _lists(args: argparse.Namespace) -> int:
    store = _store(settings_from(args))
    if args.lists_command == "rollback":
        version = store.rollback(args.version)
        print(f"version {version} is in force; syncs are refused until `eir lists unpin`")
        return 0
    if args.lists_command == "unpin":
        pinned = store.unpin()
        print(f"unpinned (was pinned at {pinned}): syncs publish again" if pinned else
              "the store was not pinned")
        return 0
    versions = store.versions()
    pinned = store.pinned()
    if args.json:
        print(json.dumps([{"version": v.version, "in_force": v.in_force,
                           "pinned": v.version == pinned,
                           "created": v.info.created, "age_seconds": round(v.age_seconds),
                           "counts": v.info.counts, "manifest": v.info.manifest,
                           "sources": v.info.sources}
                          for v in versions]))
        return 0
    if not versions:
        print(f"{store.root}: no snapshot yet (run eir sync)")
    if pinned is not None:
        print(f"pinned at version {pinned} by a rollback: syncs are refused until "
              "`eir lists unpin`")
    for stored in versions:
        mark = "*" if stored.in_force else " "
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stored.info.created))
        counts = ", ".join(f"{n} {k}" for k, n in stored.info.counts.items())
        pin = "  (pinned)" if stored.version == pinned else ""
        print(f"{mark} {stored.version}  {created}  age {_age(stored.age_seconds)}  "
              f"{counts}{pin}")
        manifest = stored.info.manifest
        if manifest is not None:
            print(f"      manifest sequence {manifest['sequence']} published "
                  f"{manifest['published']} sha256 {manifest['sha256']}")
            print(f"      signed by {manifest['signer'] or 'nobody (no public key set)'}")
        for source in stored.info.sources:
            # In full: what an auditor matches against the registry's manifest.
            digest = f" sha256 {source['sha256']}" if source.get("sha256") else ""
            rows = f": {source['rows']} rows" if source.get("rows") is not None else ""
            run = f" run {source['run']}" if source.get("run") else ""
            print(f"      {source['name']}{rows}{run}{digest}")
    return 0


def _dump(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    key = settings.observations.pseudonymise_key
    if args.pseudonymise and not key:
        print("eir: --pseudonymise needs observations.pseudonymise_key in the configuration",
              file=sys.stderr)
        return EXIT_USAGE
    path = database_location(settings)
    if args.output is None and args.operator is None:
        write_dump(path, args.date, sys.stdout, key)
        return 0
    output = args.output
    if args.operator is not None:
        output = (args.output or Path(".")) / dump_file_name(args.operator, args.date,
                                                              args.date)
    partial = output.with_name(output.name + ".partial")
    try:
        if args.operator is None:
            with open(partial, "w", encoding="utf-8", newline="") as out:
                count = write_dump(path, args.date, out, key)
        else:
            # One member, named as the zip with .csv: DIRBS-Core refuses anything else;
            # dated now (a name alone would be dated 1980-01-01).
            member_info = zipfile.ZipInfo(Path(output.name).with_suffix(".csv").name,
                                          date_time=time.localtime()[:6])
            member_info.compress_type = zipfile.ZIP_DEFLATED
            with zipfile.ZipFile(partial, "w") as archive, \
                    archive.open(member_info, "w") as member, \
                    io.TextIOWrapper(member, encoding="utf-8", newline="") as out:
                count = write_dump(path, args.date, out, key)
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        print(f"eir: {output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ObservationError:
        partial.unlink(missing_ok=True)
        raise
    print(f"{output}: {count} row(s) for {format_day(args.date)}"
          + (" (IMSIs and MSISDNs pseudonymised)" if key else ""), file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.min_imsis < 1:
        print("eir: --min-imsis must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    suspects = clone_suspects(database_location(settings), args.since, args.min_imsis)
    # The IMSIs an analyst needs, masked as in the logs unless logging.show_imsi.
    shown = (lambda imsi: imsi) if settings.logging.show_imsi else mask_imsi
    if args.json:
        print(json.dumps([{"imei": s.imei, "imsis": s.imsis,
                           "first_seen": format_day(s.first_day),
                           "last_seen": format_day(s.last_day),
                           "imsi_list": [shown(imsi) for imsi in s.imsi_list]}
                          for s in suspects]))
        return 0
    if not suspects:
        print(f"no IMEI seen with {args.min_imsis} or more IMSIs since "
              f"{format_day(args.since)}")
        return 0
    print(f"{'IMEI':<14}  {'IMSIS':>5}  {'FIRST SEEN':<10}  {'LAST SEEN':<10}  IMSI LIST")
    for suspect in suspects:
        print(f"{suspect.imei:<14}  {suspect.imsis:>5}  {format_day(suspect.first_day)}  "
              f"{format_day(suspect.last_day)}  "
              + " ".join(shown(imsi) for imsi in suspect.imsi_list))
    return 0


def _replay(args: argparse.Namespace) -> int:
    try:
        from eir.replay import main as replay_main
    except ImportError as exc:
        print(f"eir replay: {exc.name} is missing: install open EIR again (pip install -e .), "
              "its dependencies include eir replay's",
              file=sys.stderr)
        return EXIT_USAGE
    return replay_main(args)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            # Here, where a reader gone away is caught, not at exit: also after argparse's
            # --help and --version, which end by SystemExit with the text still buffered.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`eir lists status | head -2`): stop quietly, as `cat` does,
        # with stdout on /dev/null so that the exit's flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # eir serve re-runs itself with the same arguments as each of its workers
    # (eir.serve.workers).
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "sync":
            return _sync(args)
        if args.command == "lists":
            return _lists(args)
        if args.command == "dump":
            return _dump(args)
        if args.command == "report":
            return _report(args)
        if args.command == "replay":
            return _replay(args)
        if args.command == "conformance":
            return conformance_main(args)
        return _check(args)
    except ConfigError as exc:
        print(f"eir: bad configuration:\n{exc}", file=sys.stderr)
    except ListError as exc:
        print(f"eir: list refused:\n{exc}", file=sys.stderr)
    except DictionaryError as exc:
        print(f"eir: bad dictionary: {exc}", file=sys.stderr)
    except SyncError as exc:
        print(f"eir: sync refused, store untouched:\n{exc}", file=sys.stderr)
        return EXIT_REFUSED
    except StoreError as exc:
        # Its message starts with the store's path, or says there is no store.
        print(f"eir: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ObservationError as exc:
        print(f"eir: observations: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_USAGE
