"""testbed/mme-sim: the MME stand-in (a freeDiameter extension in C) against a real `eir serve`.

The extension is built with make and gcc into a temporary directory, loaded by Debian's
freeDiameterd, and sends ECRs for the rows of a terminals CSV. Every answer it logs is checked
against the verdict the decision engine gives for that row on the same list file, so a wrong
IMEI or IMSI on the wire, a mixed-up answer, a lost answer or a misread AVP fails the test.
freeDiameterd also checks each ECA against the 29.272 grammar the extension puts in its
dictionary (it drops an answer that breaks it, which would show here as a timeout).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from eir.core.decision import UnknownPolicy
from eir.core.imei import ImeiError, normalise_imei
from eir.lists.native import load_rule_set
from helpers_process import ROOT, LoggedProcess
from test_freediameter import free_port

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(shutil.which("freeDiameterd") is None,
                       reason="freeDiameterd is not installed (Debian package freediameterd)"),
]

SOURCE = ROOT / "testbed" / "mme-sim"
# freeDiameterd waits a random 0-4 s before its first connection attempt.
CONNECT_TIMEOUT = 15.0
SUMMARY = r"mme_sim: summary "
DICTIONARIES = ["dict_nasreq", "dict_eap", "dict_dcca", "dict_dcca_3gpp"]  # in this order

# Every kind of rule and precedence level: exact IMEI, IMEI+IMSI pairing, range, an exact IMEI
# inside a range, TAC, TAC+IMSI pairing.
LIST = """\
imei,status,imsi,reason
35209900176148,blacklist,,stolen
35332106470089,greylist,,under investigation
35891203456781,whitelist,,registered handset
49015420323751,whitelist,001010123456789,import registered for one subscriber
49015420323751,blacklist,,unregistered import
35000000000000-35000000009999,whitelist,,lab handsets
35000000000500,blacklist,,lost lab handset
86000000,blacklist,,counterfeit model
86000000,greylist,001010000000077,counterfeit model kept for one subscriber
"""

# (imei, imsi, software_version) as the MME sends them: 14, 15 and 16 digit IMEIs, with and
# without IMSI, unknown IMEIs, and two malformed ones (the EIR must answer 5004).
TERMINALS = [
    ("352099001761481", "001010000000001", "01"),
    ("35209900176148", "", ""),
    ("3520990017614812", "001010000000002", ""),
    ("35332106470089", "001010000000003", "07"),
    ("35891203456781", "001010000000004", ""),
    ("49015420323751", "001010123456789", ""),
    ("49015420323751", "001010000000005", ""),
    ("49015420323751", "", ""),
    ("35000000000042", "001010000000006", ""),
    ("35000000000500", "001010000000007", ""),
    ("86000000123456", "001010000000008", ""),
    ("86000000123456", "001010000000077", ""),
    ("99000000000001", "001010000000009", ""),
    ("01234567890123", "", ""),
    ("3520990017614A", "001010000000010", ""),
    ("12345", "", ""),
]


@dataclass(frozen=True)
class Expected:
    """The fields of an `answer` line that depend on the verdict."""

    result_code: str
    experimental_result_code: str
    equipment_status: str


def expected_answers(list_path: Path) -> list[Expected]:
    """What `eir serve --list list_path --unknown unknown` must answer for each terminal row,
    from the decision engine on the same file (a malformed IMEI: 5004 INVALID_AVP_VALUE)."""
    rules = load_rule_set([list_path], UnknownPolicy.UNKNOWN)
    expected = []
    for imei, imsi, _ in TERMINALS:
        try:
            verdict = rules.decide(normalise_imei(imei), imsi or None)
        except ImeiError:
            expected.append(Expected("5004", "-", "-"))
            continue
        if verdict.status is None:
            expected.append(Expected("-", "5422", "-"))
        else:
            expected.append(Expected("2001", "-", verdict.status.name))
    return expected


def fields(line: str) -> dict[str, str]:
    """`kind key=value ...` → {"kind": kind, key: value, ...}."""
    kind, *pairs = line.split(" ")
    return {"kind": kind, **dict(pair.split("=", 1) for pair in pairs)}


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    """mme_sim.fdx built with make and gcc out of tree; the build must be warning-free."""
    build = tmp_path_factory.mktemp("mme-sim-build")
    source_files = sorted(SOURCE.rglob("*"))
    result = subprocess.run(["make", "-C", str(SOURCE), f"BUILD_DIR={build}"],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning:" not in output, output
    assert sorted(SOURCE.rglob("*")) == source_files, "the build wrote into the source tree"
    return build / "mme_sim.fdx"


@pytest.fixture
def lists(tmp_path) -> Path:
    path = tmp_path / "lists.csv"
    path.write_text(LIST)
    return path


@pytest.fixture
def terminals(tmp_path) -> Path:
    path = tmp_path / "terminals.csv"
    path.write_text("imei,imsi,software_version\n# a comment line, skipped\n\n" + "".join(
        f"{imei},{imsi},{version}\n" for imei, imsi, version in TERMINALS))
    return path


def csv_lines(path: Path) -> list[int]:
    """1-based line numbers of the data rows of a terminals CSV, in order."""
    return [number for number, line in enumerate(path.read_text().splitlines(), 1)
            if line and not line.startswith(("#", "imei,"))]


class MmeSim(LoggedProcess):
    """freeDiameterd running mme_sim (no -d: a load run must not log every message)."""

    def __init__(self, directory: Path, extension: Path, eir_port: int, dictionaries=DICTIONARIES,
                 peer: str = "eir.localdomain", **settings):
        """`peer`: the identity of the Diameter peer at 127.0.0.1:`eir_port` (an EIR, or a
        DRA in front of EIRs)."""
        self.output = directory / "answers.log"
        sim_config = directory / "mme_sim.conf"
        sim_config.write_text(f"output = {self.output.name}\n" + "".join(
            f"{key} = {value}\n" for key, value in settings.items()))
        config = directory / "freediameter.conf"
        config.write_text(
            'Identity = "mme.localdomain";\nRealm = "localdomain";\n'
            f'Port = {free_port()};\nSecPort = 0;\nNo_SCTP;\nNo_IPv6;\nListenOn = "127.0.0.1";\n'
            "TcTimer = 30;\nTwTimer = 30;\nAppServThreads = 2;\n"
            + "".join(f'LoadExtension = "/usr/lib/freeDiameter/{name}.fdx";\n'
                      for name in dictionaries)
            + f'LoadExtension = "{extension}" : "{sim_config}";\n'
            f'ConnectPeer = "{peer}" {{ ConnectTo = "127.0.0.1"; Port = {eir_port}; '
            "No_TLS; No_SCTP; };\n")
        process = subprocess.Popen(
            ["freeDiameterd", "-c", str(config)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
        super().__init__(process, process.stdout, "freeDiameterd with mme_sim")

    def wait_for(self, pattern: str, timeout: float) -> int:
        return self.wait_for_line(pattern, 0, timeout)[0]

    def finish(self, timeout: float) -> tuple[list[dict[str, str]], dict[str, str]]:
        """Wait for the summary and for freeDiameterd to exit 0 by itself; the per-request
        lines and the summary from the output file."""
        self.wait_for(SUMMARY, timeout)
        assert self.process.wait(CONNECT_TIMEOUT) == 0, self.log()
        lines = self.output.read_text().splitlines()
        assert lines and lines[-1].startswith("summary "), lines[-3:]
        return [fields(line) for line in lines[:-1]], fields(lines[-1])


@pytest.fixture
def run_sim(tmp_path, extension):
    started: list[MmeSim] = []

    def start(eir_port: int, **settings) -> MmeSim:
        sim = MmeSim(tmp_path, extension, eir_port, **settings)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.kill()


def check_every_answer(records, summary, terminals: Path, expected: list[Expected],
                       count: int) -> None:
    """Request n (1-based) went out for row (n-1) % rows and got that row's verdict; the
    summary adds up."""
    lines = csv_lines(terminals)
    assert len(records) == count, records[-3:]
    assert sorted(int(record["seq"]) for record in records) == list(range(1, count + 1))
    for record in records:
        row = (int(record["seq"]) - 1) % len(TERMINALS)
        imei, imsi, _ = TERMINALS[row]
        want = expected[row]
        assert record["kind"] == "answer", record
        assert (record["csv_line"], record["imei"], record["imsi"]) == (
            str(lines[row]), imei, imsi or "-"), record
        assert (record["result_code"], record["experimental_result_code"],
                record["equipment_status"]) == (
            want.result_code, want.experimental_result_code, want.equipment_status), record
        assert int(record["latency_us"]) > 0
    rounds, rest = divmod(count, len(TERMINALS))
    sent_per_row = [rounds + (row < rest) for row in range(len(TERMINALS))]

    def sent_with(predicate) -> int:
        return sum(n for n, want in zip(sent_per_row, expected) if predicate(want))

    assert summary["outcome"] == "complete", summary
    assert (summary["planned"], summary["sent"], summary["answered"]) == (str(count),) * 3
    assert (summary["timeouts"], summary["dropped"], summary["unsent"]) == ("0", "0", "0"), summary
    # 5004 answers are errors to an MME; every verdict (2001 + status, 5422) is not.
    assert int(summary["errors"]) == sent_with(lambda want: want.result_code == "5004")
    for status in ("WHITELISTED", "BLACKLISTED", "GREYLISTED"):
        assert int(summary[status.lower()]) == sent_with(
            lambda want: want.equipment_status == status), (status, summary)
    assert int(summary["equipment_unknown"]) == sent_with(
        lambda want: want.experimental_result_code == "5422")


def test_every_answer_matches_the_lists(eir_server, run_sim, lists, terminals):
    """Three rounds of every row at 100 ECR/s, with Debian's 3GPP dictionary loaded."""
    server = eir_server("--unknown", "unknown", lists=[lists])
    count, rate = 3 * len(TERMINALS), 100
    sim = run_sim(server.port, csv=terminals, rate=rate, count=count, answer_timeout_ms=5000,
                  destination_realm="localdomain", destination_host="eir.localdomain")
    records, summary = sim.finish(CONNECT_TIMEOUT + count / rate + 10)

    check_every_answer(records, summary, terminals, expected_answers(lists), count)
    # Paced, not a burst: request n leaves no earlier than (n-1)/rate after the first.
    assert float(summary["elapsed_s"]) >= (count - 1) / rate
    assert not re.search(r"\bERROR\b", sim.log()), sim.log()
    server.wait_for_log(r"peer mme\.localdomain \(realm localdomain\) is open")
    server.wait_for_log(r"mme\.localdomain: peer sent DPR")


@pytest.mark.parametrize("rate", [0, 2000], ids=["flat-out", "2000-per-s"])
def test_load_run_reports_its_rate(eir_server, run_sim, lists, terminals, rate, capsys,
                                   record_property):
    """A few thousand ECRs, with mme_sim's own S13 AVP definitions (no dict_dcca_3gpp):
    flat out with 128 outstanding, and at a target rate it must reach."""
    server = eir_server("--unknown", "unknown", lists=[lists])
    count = 4000
    sim = run_sim(server.port, dictionaries=[], csv=terminals, rate=rate, count=count,
                  window=128, answer_timeout_ms=5000)
    records, summary = sim.finish(CONNECT_TIMEOUT + 25)

    check_every_answer(records, summary, terminals, expected_answers(lists), count)
    reached = float(summary["rate_per_s"])
    elapsed = float(summary["elapsed_s"])
    record_property("mme_sim_rate_per_s", reached)
    with capsys.disabled():
        print(f"\nmme_sim {count} ECRs, target {rate or 'flat out'}: {reached:.0f} ECR/s "
              f"in {elapsed:.2f} s, latency avg {summary['latency_us_avg']} us, "
              f"max {summary['latency_us_max']} us")
    assert elapsed < 30
    if rate:
        assert elapsed >= (count - 1) / rate
        # Answers per second from the first send to the last answer: a slow last answer on
        # this shared machine costs a little; a sender that cannot keep the pace costs more.
        assert reached >= 0.8 * rate, summary
    else:
        # Little's law from the logged latencies: the mean number of ECRs in flight. It
        # cannot exceed the window; above 1 it shows requests pipelined, not sent one by one.
        in_flight = sum(int(record["latency_us"]) for record in records) / 1e6 / elapsed
        assert 1 < in_flight <= 128, in_flight
        # A sanity floor far below what this machine does (tens of thousands a second): a
        # sender that waits for each answer, or a window stuck shut, would fall under it.
        assert reached >= 1000, summary
    assert re.search(r"mme_sim: defining AVP Equipment-Status", sim.log())


def test_unanswered_requests_time_out_and_the_run_still_ends(eir_server, run_sim, lists,
                                                             terminals):
    """The EIR stops answering (SIGSTOP) once the peer is open: ECRs sent after that are
    logged as timeouts, counted as errors, and the run ends by itself."""
    # One process, so that SIGSTOP stops what answers (not a supervisor of workers).
    server = eir_server("--unknown", "unknown", "--workers", "1", lists=[lists])
    sim = run_sim(server.port, csv=terminals, rate=1, count=3, answer_timeout_ms=700)
    sim.wait_for(r"mme_sim: peer eir\.localdomain is open", CONNECT_TIMEOUT)
    server.process.send_signal(signal.SIGSTOP)  # ECR 2 leaves a second later, ECR 3 two
    try:
        sim.wait_for(SUMMARY, 10)
    finally:
        server.process.send_signal(signal.SIGCONT)
    records, summary = sim.finish(CONNECT_TIMEOUT)

    by_seq = {record["seq"]: record for record in records}
    assert sorted(by_seq) == ["1", "2", "3"] and len(records) == 3, records
    # ECR 1 left as the peer opened, maybe before the EIR stopped: answered right, or not.
    first, want = by_seq["1"], expected_answers(lists)[0]
    assert first["kind"] == "timeout" or (
        first["result_code"], first["equipment_status"]) == (want.result_code,
                                                             want.equipment_status), first
    late = [by_seq["2"], by_seq["3"]]
    assert [record["kind"] for record in late] == ["timeout", "timeout"], records
    assert all(int(record["latency_us"]) >= 700_000 for record in late), late
    timeouts = sum(record["kind"] == "timeout" for record in records)
    assert int(summary["timeouts"]) == timeouts >= 2
    assert int(summary["errors"]) == timeouts  # the rows sent are all valid IMEIs
    assert int(summary["answered"]) + timeouts == 3
    assert summary["outcome"] == "complete"


def test_no_open_peer_ends_the_run_with_nothing_sent(run_sim, terminals):
    """Nobody listens where the EIR should be: after peer_wait_s the run ends by itself."""
    sim = run_sim(free_port(), csv=terminals, destination_host="eir.localdomain", peer_wait_s=1)
    records, summary = sim.finish(CONNECT_TIMEOUT)
    assert records == []
    assert (summary["sent"], summary["outcome"]) == ("0", "no_peer"), summary
    assert summary["planned"] == str(len(TERMINALS))  # count defaults to one round
    assert re.search(r"mme_sim: peer eir\.localdomain was not open within peer_wait_s = 1 s: "
                     r"nothing sent", sim.log()), sim.log()


def test_configuration_errors_name_file_line_and_key(run_sim, tmp_path, terminals):
    bad_rows = tmp_path / "bad.csv"
    bad_rows.write_text("imei,imsi\n35209900176148,001010000000001\n35209900176148,12\n"
                        "3520 9900176148,\n")
    sim = run_sim(free_port(), csv=bad_rows, rate="fast", window=0, colour="blue")
    assert sim.process.wait(CONNECT_TIMEOUT) != 0
    log = sim.log()
    config = tmp_path / "mme_sim.conf"
    for problem in (f"{config}:3: rate: 'fast': expected ECR per second",
                    f"{config}:4: window: '0': expected a whole number",
                    f"{config}:5: colour: 'blue': unknown key"):
        assert problem in log, log
    # The CSV is read only once the configuration is valid.
    assert f"{bad_rows}:" not in log

    sim = run_sim(free_port(), csv=bad_rows)
    assert sim.process.wait(CONNECT_TIMEOUT) != 0
    log = sim.log()
    for problem in (f"{bad_rows}:3: imsi: '12' is not 5 to 15 digits",
                    f"{bad_rows}:4: imei: contains a space"):
        assert problem in log, log
