"""The command line as a new user meets it: help for every option with its default, usage
errors, configuration errors that say where and what was meant, a reader that stops early,
and every `eir <command> --flag` written in README.md and docs/ checked against that
command's own `--help`, so that the documentation cannot drift from the code."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
from helpers_process import ROOT, run_eir

from eir.cli import build_parser, main, settings_from



def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every command `eir` has, as typed: `serve`, `lists status`, `report clones`, ..."""
    found = []
    for action in parser._actions:  # argparse keeps its subcommands there only
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, f"{prefix}{name} ") or [prefix + name]
    return found


COMMANDS = tuple(_commands(build_parser()))
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                    *(ROOT / "testbed").glob("**/README.md")])


def help_text(command: str) -> str:
    """What `eir COMMAND --help` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([*command.split(), "--help"])
    assert exited.value.code == 0
    return out.getvalue()


def options_of(command: str) -> dict[str, str]:
    """The options `eir COMMAND --help` lists, each with its help text (joined lines)."""
    options: dict[str, str] = {}
    current = None
    for line in help_text(command).splitlines():
        match = re.match(r"^  (?:-\w, )?(--[a-z0-9-]+)(.*)$", line)
        if match:
            current = match.group(1)
            options[current] = match.group(2)
        elif current and line.startswith("    "):
            options[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in options.items()}


# --- help ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help(command):
    options = options_of(command)
    for flag, text in options.items():
        # The help text follows the metavar: more than a metavar or a {choice,...} list.
        words = re.sub(r"^\s*(\{[^}]*\}|[A-Z_:.|]+)", "", text).strip()
        assert words, f"eir {command} {flag} has no help"


@pytest.mark.parametrize("command, flag", [("serve", "--config"), ("serve", "--transport"),
                                           ("serve", "--log-level"), ("serve", "--listen"),
                                           ("serve", "--store"), ("sync", "--config"),
                                           ("sync", "--store"), ("dump", "--store"),
                                           ("report clones", "--store"),
                                           ("lists status", "--store")])
def test_options_taking_their_value_from_the_config_show_their_default(command, flag):
    assert "default" in options_of(command)[flag], options_of(command)[flag]


def test_store_help_says_what_each_command_does_with_the_store():
    texts = {command: options_of(command)["--store"]
             for command in ("serve", "check", "sync", "lists status", "dump")}
    assert len(set(texts.values())) == len(texts), texts
    assert "observations" in texts["dump"]
    assert "observations" in options_of("report clones")["--store"]
    assert "publish" in texts["sync"]


# --- arguments ----------------------------------------------------------------------------------

def test_listen_takes_a_bare_port_like_metrics():
    args = build_parser().parse_args(["serve", "--listen", "3878", "--metrics", "9464"])
    args.config = ROOT / "config" / "eir.yaml"
    settings = settings_from(args)
    assert settings.diameter.listen == ["0.0.0.0:3878", "[::]:3878"]
    assert settings.metrics.listen == "9464"


@pytest.mark.parametrize("value", ["70000", "host", ":3868"])
def test_listen_refuses_what_is_no_address(value):
    result = run_eir("serve", "--listen", value)
    assert result.returncode == 2
    assert "--listen" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("arguments", [
    ("lists", "status", "--store", "{store}"), ("--help",), ("serve", "--help"),
    ("lists", "status", "--help"), ("report", "clones", "--help"), ("--version",)])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, arguments):
    """`eir lists status | head -2`, `eir --help | head -1`: the reader has gone before the
    text is written (argparse's help and version end by SystemExit, past the flush that
    caught it for the listing: they ended in "Exception ignored ... BrokenPipeError" and exit
    120). Buffered output, as in a user's shell: PYTHONUNBUFFERED (set where the tests run)
    would make each write fail at once, where argparse ignores the error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("EIR_CONFIG", "PYTHONUNBUFFERED")}
    command = [argument.format(store=tmp_path / "store") for argument in arguments]
    try:
        result = subprocess.run([sys.executable, "-m", "eir", *command], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=30, cwd=ROOT,
                                env=environment)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141  # 128 + SIGPIPE, as a shell reports `cat` in a pipe


# --- configuration errors -----------------------------------------------------------------------

def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    config = tmp_path / "eir.yaml"
    config.write_text("diameter:\n  origin_host: [eir\n  origin_realm: x\n")
    result = run_eir("check", "352099001761481", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:3:15: not valid YAML" in result.stderr, result.stderr
    assert "<unicode string>" not in result.stderr


@pytest.mark.parametrize("yaml_text, line, suggestion", [
    ("lists:\n  unknown_polcy: unknown\n", 2, "did you mean lists.unknown_policy?"),
    ("diameter:\n  origin_hots: eir.example\n", 2, "did you mean diameter.origin_host?"),
    ("metric:\n  listen: 9464\n", 1, "did you mean metrics?"),
])
def test_a_misspelt_key_gets_a_suggestion(tmp_path, yaml_text, line, suggestion):
    config = tmp_path / "eir.yaml"
    config.write_text(yaml_text)
    result = run_eir("check", "352099001761481", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:{line}:" in result.stderr and suggestion in result.stderr, result.stderr


def test_sync_quiet_leaves_out_the_ignored_files(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    for day in ("20261119", "20261120"):
        (drop / f"{day}_blacklist.csv").write_text(
            "imei,block_date,reasons\n35209900176148,20200101,stolen\n")
    store = tmp_path / "store"
    loud = run_eir("sync", "--source", str(drop), "--store", str(store))
    assert loud.returncode == 0, loud.stderr
    assert "ignored: 20261119_blacklist.csv: superseded" in loud.stdout
    (drop / "20261121_blacklist.csv").write_text(
        "imei,block_date,reasons\n35209900176149,20200101,stolen\n")
    quiet = run_eir("sync", "--quiet", "--source", str(drop), "--store", str(store))
    assert quiet.returncode == 0, quiet.stderr
    assert "ignored" not in quiet.stdout and "published version" in quiet.stdout


# --- the documentation against --help -----------------------------------------------------------

COMMAND_IN_TEXT = re.compile(
    r"\beir (" + "|".join(sorted(map(re.escape, COMMANDS), key=len, reverse=True)) + r")\b(.*)")


def _code(text: str) -> tuple[list[str], list[list[str]]]:
    """The inline code spans of a Markdown text, and its code blocks (fenced or indented),
    each a list of lines."""
    spans, blocks, prose = [], [], []
    block: list[str] | None = None
    fenced = False
    previous_blank = True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is not None:  # the fence's own lines, or an indented block before it
                blocks.append(block)
            block = None if fenced else []
            fenced = not fenced
            continue
        if fenced:
            block.append(line)
        elif line.startswith("    ") and (previous_blank or block is not None):
            if block is None:
                block = []
            block.append(line)
        else:
            if block is not None and line.strip():
                blocks.append(block)
                block = None
            prose.append(line)
        previous_blank = not line.strip()
    if block:
        blocks.append(block)
    spans = re.findall(r"`([^`]+)`", "\n".join(prose))
    return spans, blocks


def documented_commands(text: str) -> list[tuple[str, str]]:
    """(command, its arguments as written) for every `eir COMMAND ...` in the code of a
    Markdown text; a code block's command goes on over lines ending in a backslash and over
    synopsis lines starting with `[` or `--`."""
    found = []
    spans, blocks = _code(text)
    for span in spans:
        for match in COMMAND_IN_TEXT.finditer(" ".join(span.split())):
            found.append((match.group(1), match.group(2)))
    for block in blocks:
        current = None
        continued = False
        for line in block:
            code = line.split(" #", 1)[0]
            match = COMMAND_IN_TEXT.search(code)
            if match:
                current = [match.group(1), match.group(2)]
                found.append(current)
            elif current is not None and (continued or code.lstrip().startswith(("[", "--"))):
                current[1] += " " + code
            else:
                current = None
            continued = code.rstrip().endswith("\\")
    return [(command, arguments) for command, arguments in found]


def test_the_documentation_reader_finds_commands_in_code():
    text = ("Run `eir sync --source DIR\n--store S` then:\n\n"
            "    eir serve [--config FILE]\n"
            "              [--listen HOST:PORT]   # a comment --not-a-flag\n"
            "    curl --silent http://x\n\n"
            "```\n"
            "docker compose exec eir eir check 1 --json \\\n"
            "    --imsi 2\n"
            "```\n")
    assert documented_commands(text) == [
        ("sync", " --source DIR --store S"),
        ("serve", " [--config FILE]               [--listen HOST:PORT]  "),
        ("check", " 1 --json \\     --imsi 2"),
    ]


def flags_not_in_help(text: str) -> list[str]:
    """`eir COMMAND --flag` written in a Markdown text whose flag `eir COMMAND --help` lacks."""
    known = {command: set(options_of(command)) for command in COMMANDS}
    problems = []
    for command, arguments in documented_commands(text):
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", arguments):
            if flag not in known[command]:
                problems.append(f"eir {command} {flag}: not in `eir {command} --help`")
    return sorted(set(problems))


def test_a_flag_no_command_has_is_caught():
    text = ("    eir serve --config eir.yaml --prometheus 9464\n\n"
            "and `eir dump --date 20261120 --store S --format csv`.\n")
    assert flags_not_in_help(text) == ["eir dump --format: not in `eir dump --help`",
                                       "eir serve --prometheus: not in `eir serve --help`"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_documented_flag_exists_in_the_commands_help(document):
    assert flags_not_in_help(document.read_text(encoding="utf-8")) == []


def test_readme_command_line_lists_every_option_of_every_command():
    """README's "Command line" synopsis is complete: each command with all its options."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    synopsis: dict[str, set[str]] = {}
    for command, arguments in documented_commands(section):
        synopsis.setdefault(command, set()).update(
            re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", arguments))
    assert sorted(synopsis) == sorted(COMMANDS)
    missing = {command: sorted(set(options_of(command)) - {"--help"} - flags)
               for command, flags in synopsis.items()}
    assert {command: flags for command, flags in missing.items() if flags} == {}
