"""`eir replay` against a live `eir serve`: each mode, the JSON report, pcap write/replay/diff.

The harness runs as `python -m eir replay` (the real command line). What it reports is checked
against what the list says (config/lists/example.csv, verdicts written out below as in
test_tshark.py), against tshark's dissection of the pcap it writes, and against captures built
with scapy (TCP segmentation, SCTP DATA chunks, pcapng) whose bytes nobody here encoded by
hand. Every run is bounded in count or duration, and by the subprocess timeout.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from helpers_process import EXAMPLE_LIST, RunningServer, run_eir, start_eir
from helpers_wire import (DEFAULT_IMSI, S13_APPLICATION, VENDOR_3GPP, ecr, parse_answer,
                          read_message)
from scapy.all import IP, SCTP, TCP, Ether, raw, wrpcap, wrpcapng
from scapy.contrib.diameter import AVP, DiamG
from scapy.layers.sctp import SCTPChunkData

from eir.replay.pcap import read_capture

# (IMEI, IMSI) → the verdict config/lists/example.csv gives.
ROWS = [
    ("352099001761481", "001010000000001", "BLACKLISTED"),  # exact IMEI, stolen
    ("35332106470089", "001010000000002", "GREYLISTED"),  # exact IMEI, under investigation
    ("490154203237518", DEFAULT_IMSI, "WHITELISTED"),  # IMEI+IMSI pair beats its blacklisting
    ("490154203237518", "001010000000009", "BLACKLISTED"),  # same IMEI, another subscriber
    ("35000000000123", "", "WHITELISTED"),  # lab range, no IMSI
    ("860000001234567", "001010000000003", "BLACKLISTED"),  # counterfeit TAC
    ("12345678901234", "001010000000004", None),  # no rule: 5422
]
CHANGED_IMEIS = {"352099001761481", "35332106470089"}
TIMEOUT = 60


def replay(*args: str, cwd: Path | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    kwargs = {"cwd": cwd} if cwd is not None else {}
    result = run_eir("replay", *args, timeout=TIMEOUT, **kwargs)
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def replay_json(*args: str) -> dict:
    result = replay(*args, "--json")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_mix(path: Path, rows=ROWS) -> Path:
    path.write_text("imei,imsi\n# a comment line, skipped\n"
                    + "".join(f"{imei},{imsi}\n" for imei, imsi, _ in rows))
    return path


def expected_statuses(rows, passes: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, status in rows:
        if status is not None:
            counts[status] = counts.get(status, 0) + passes
    return dict(sorted(counts.items()))


@pytest.fixture(scope="module")
def served_list(tmp_path_factory) -> Path:
    """A copy of the example list, so that a test can change it and send SIGHUP."""
    directory = tmp_path_factory.mktemp("replay-list")
    path = directory / "lists.csv"
    shutil.copy(EXAMPLE_LIST, path)
    return path


@pytest.fixture(scope="module")
def eir(tmp_path_factory, served_list) -> RunningServer:
    server = start_eir(lists=[served_list], cwd=tmp_path_factory.mktemp("replay-serve"))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def target(eir) -> str:
    return f"{eir.host}:{eir.port}"


@pytest.fixture(scope="module")
def written_capture(tmp_path_factory, target) -> tuple[Path, dict]:
    """The traffic of a CSV-mix run, written by --write-pcap, and that run's report."""
    directory = tmp_path_factory.mktemp("replay-capture")
    mix = write_mix(directory / "mix.csv")
    pcap = directory / "traffic.pcap"
    report = replay_json("--target", target, "--mix", str(mix), "--count", str(2 * len(ROWS)),
                         "--connections", "2", "--write-pcap", str(pcap))
    return pcap, report


def check_schema(report: dict) -> None:
    for key in ("sent", "answered", "errors", "timeouts"):
        assert isinstance(report[key], int), key
    assert isinstance(report["rate_per_s"], (int, float))
    latency = report["latency_ms"]
    figures = [latency[name] for name in ("p50", "p90", "p99", "p999", "max")]
    assert all(isinstance(value, (int, float)) and value > 0 for value in figures), latency
    assert figures == sorted(figures), latency
    assert isinstance(report["by_result"], dict)
    assert isinstance(report["by_equipment_status"], dict)


# -- synthetic load ---------------------------------------------------------------------------

def test_csv_mix_with_count_reports_what_the_list_says(tmp_path, target):
    mix = write_mix(tmp_path / "mix.csv")
    passes = 3
    report = replay_json("--target", target, "--mix", str(mix),
                         "--count", str(passes * len(ROWS)), "--connections", "2")
    check_schema(report)
    assert (report["sent"], report["answered"]) == (passes * len(ROWS), passes * len(ROWS))
    assert (report["errors"], report["timeouts"]) == (0, 0)
    assert report["by_equipment_status"] == expected_statuses(ROWS, passes)
    unknown = sum(status is None for _, _, status in ROWS) * passes
    assert report["by_result"] == {"2001": passes * len(ROWS) - unknown, "5422": unknown}
    assert report["rate_per_s"] > 0


def test_generated_mix_for_a_duration_at_a_rate(target):
    rate, duration = 400, 2.0
    result = replay("--target", target, "--generate",
                    "white=60,black=20,grey=10,unknown=5,invalid=5", "--list", str(EXAMPLE_LIST),
                    "--duration", str(duration), "--rate", str(rate), "--connections", "2",
                    "--json", "--progress")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    check_schema(report)
    expected = rate * duration
    # How close the pacing came is reported, not asserted to the millisecond: the count of
    # requests sent is what a paced run of this length must produce, within 20%.
    assert abs(report["sent"] - expected) <= 0.2 * expected, report
    assert report["answered"] == report["sent"] and report["timeouts"] == 0
    assert report["target_rate_per_s"] == rate
    assert report["latency_from"] == "the scheduled send time"
    shares = {"WHITELISTED": 0.60, "BLACKLISTED": 0.20, "GREYLISTED": 0.10}
    for status, share in shares.items():
        got = report["by_equipment_status"][status] / report["sent"]
        assert abs(got - share) < 0.03, (status, got, report)
    # Invalid IMEIs are refused with 5004, as the mix meant: expected errors, not errors (in
    # the progress line too); unknown ones get 5422.
    assert report["expected_errors"] == report["by_result"]["5004"] > 0
    assert report["errors"] == 0
    assert "errors+timeouts 0" in result.stderr
    assert report["by_result"]["5422"] > 0
    assert "p99" in result.stderr and "/s" in result.stderr  # the progress lines


def test_several_connections_and_processes_merge_exactly(tmp_path, target):
    # 2,000 requests = two passes over the 1,000-request generated sequence, whose shares are
    # exact per pass: every count below is exact, whichever process sent what.
    pcap = tmp_path / "merged.pcap"
    report = replay_json("--target", target, "--generate",
                         "white=60,black=20,grey=10,unknown=5,invalid=5", "--list",
                         str(EXAMPLE_LIST), "--count", "2000", "--connections", "4",
                         "--processes", "2", "--window", "32", "--write-pcap", str(pcap))
    check_schema(report)
    assert (report["processes"], report["connections"]) == (2, 4)
    assert (report["sent"], report["answered"], report["timeouts"]) == (2000, 2000, 0)
    assert report["by_equipment_status"] == {"BLACKLISTED": 400, "GREYLISTED": 200,
                                             "WHITELISTED": 1200}
    assert report["by_result"] == {"2001": 1800, "5004": 100, "5422": 100}
    assert (report["errors"], report["expected_errors"]) == (0, 100)
    # The two processes' captures were merged into one, read back whole, in time order.
    capture = read_capture(pcap)
    assert len(capture.ecrs) == 2000
    assert all(ecr.answer is not None for ecr in capture.ecrs)
    times = [ecr.time for ecr in capture.ecrs]
    assert times == sorted(times)
    assert not list(tmp_path.glob("merged.pcap.part*"))


# -- pcap: write, dissect, replay, diff ---------------------------------------------------

def tshark_fields(pcap: Path, *fields: str, display_filter: str = "diameter") -> list[list[str]]:
    command = ["tshark", "-r", str(pcap), "-Y", display_filter, "-T", "fields",
               "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"]
    for name in fields:
        command += ["-e", name]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return [line.split("|") for line in result.stdout.splitlines()]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_dissects_the_written_pcap(written_capture):
    pcap, report = written_capture
    rows = tshark_fields(pcap, "diameter.cmd.code", "diameter.flags.request", "diameter.IMEI",
                         "diameter.Result-Code", "diameter.Equipment-Status",
                         "diameter.Experimental-Result-Code", "_ws.malformed",
                         "_ws.expert.message")
    assert rows, "tshark found no Diameter frame"
    assert not any(row[6] or row[7] for row in rows), rows  # no malformed packet, no expert
    commands = [code for row in rows for code in row[0].split(",")]
    assert commands.count("257") == 4  # CER and CEA on each of the 2 connections
    assert commands.count("282") == 4  # DPR and DPA on each
    imeis = [imei for row in rows if row[2] for imei in row[2].split(",")]
    assert sorted(imeis) == sorted(imei for imei, _, _ in ROWS for _ in range(2))
    statuses = [s for row in rows if row[4] for s in row[4].split(",")]
    names = {"0": "WHITELISTED", "1": "BLACKLISTED", "2": "GREYLISTED"}
    counted: dict[str, int] = {}
    for value in statuses:
        counted[names[value]] = counted.get(names[value], 0) + 1
    assert dict(sorted(counted.items())) == report["by_equipment_status"]
    experimental = [c for row in rows if row[5] for c in row[5].split(",")]
    assert experimental == ["5422", "5422"]
    # The checksums we computed are the ones tshark computes.
    bad = tshark_fields(pcap, "frame.number", display_filter=(
        "tcp.checksum.status == 0 || ip.checksum.status == 0"))
    assert bad == []


def test_pcap_round_trip_has_no_diffs_then_names_the_changed_imeis(written_capture, target,
                                                                   eir, served_list):
    pcap, written = written_capture
    report = replay_json("--target", target, "--pcap", str(pcap), "--speed", "0")
    assert report["sent"] == report["answered"] == written["sent"]
    diff = report["diff"]
    assert (diff["compared"], diff["changed"], diff["changes"]) == (written["sent"], 0, [])
    assert report["by_equipment_status"] == written["by_equipment_status"]

    # Change two verdicts in the list the server runs, reload it, replay the same capture.
    original = served_list.read_text()
    changed = (original.replace("35209900176148,blacklist", "35209900176148,whitelist")
               .replace("35332106470089,greylist", "35332106470089,blacklist"))
    assert changed != original
    served_list.write_text(changed)
    mark = len(eir.lines)
    try:
        eir.process.send_signal(signal.SIGHUP)
        eir.wait_for_log(r"lists reloaded", start=mark)
        result = replay("--target", target, "--pcap", str(pcap), "--json")
    finally:
        served_list.write_text(original)
        mark = len(eir.lines)
        eir.process.send_signal(signal.SIGHUP)
        eir.wait_for_log(r"lists reloaded", start=mark)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    diff = report["diff"]
    assert set(diff["changed_imeis"]) == CHANGED_IMEIS
    by_imei = {c["imei"]: c for c in diff["changes"]}
    assert by_imei["352099001761481"]["before"]["equipment_status"] == "BLACKLISTED"
    assert by_imei["352099001761481"]["after"]["equipment_status"] == "WHITELISTED"
    assert by_imei["35332106470089"]["before"]["equipment_status"] == "GREYLISTED"
    assert by_imei["35332106470089"]["after"]["equipment_status"] == "BLACKLISTED"
    assert all(c["count"] == 2 for c in diff["changes"])  # each row was sent twice
    assert diff["changed"] == 4 and diff["compared"] == written["sent"]
    assert "352099001761481" in result.stderr and "→" in result.stderr  # the text report


# -- captures built with scapy ----------------------------------------------------------------

CLIENT, SERVER = ("10.0.0.1", 40000), ("10.0.0.2", 3868)


def eca(hop_by_hop: int, end_to_end: int, session_id: str, status: int | None) -> bytes:
    if status is None:
        result = [AVP("Experimental-Result", val=[AVP("Vendor-Id", val=VENDOR_3GPP),
                                                  AVP("Experimental-Result-Code", val=5422)])]
    else:
        result = [AVP("Result-Code", val=2001), AVP("Equipment-Status", val=status)]
    return raw(DiamG(drFlags=0x40, drCode=324, drAppId=S13_APPLICATION, drHbHId=hop_by_hop,
                     drEtEId=end_to_end, avpList=[AVP("Session-Id", val=session_id)] + result))


def tcp_packet(from_client: bool, seq: int, ack: int, payload: bytes = b"", flags: str = "PA",
               when: float = 0.0):
    (src, sport), (dst, dport) = (CLIENT, SERVER) if from_client else (SERVER, CLIENT)
    packet = Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq, ack=ack,
                                                  flags=flags) / payload
    packet.time = when
    return packet


def segmented_capture() -> tuple[list, list[str]]:
    """Three ECRs, the first two and half the third in one segment, the rest in another that
    arrives after a retransmission of the first; the three ECAs in one segment. The captured
    ECA for the stolen phone says WHITELISTED, which the live EIR will contradict."""
    imeis = ["352099001761481", "35000000000123", "12345678901234"]
    requests = [ecr(imei, "001010000000001", session_id=f"mme;1;{n}", hop_by_hop=100 + n,
                    end_to_end=200 + n) for n, imei in enumerate(imeis)]
    answers = b"".join([eca(100, 200, "mme;1;0", 0), eca(101, 201, "mme;1;1", 0),
                        eca(102, 202, "mme;1;2", None)])
    stream = b"".join(requests)
    cut = len(requests[0]) + len(requests[1]) + len(requests[2]) // 2
    c, s = 1000, 5000
    packets = [
        tcp_packet(True, c, 0, flags="S", when=1.0),
        tcp_packet(False, s, c + 1, flags="SA", when=1.0),
        tcp_packet(True, c + 1, s + 1, flags="A", when=1.0),
        tcp_packet(True, c + 1, s + 1, stream[:cut], when=1.1),
        tcp_packet(True, c + 1, s + 1, stream[:cut], when=1.15),  # retransmitted
        tcp_packet(True, c + 1 + cut, s + 1, stream[cut:], when=1.2),
        tcp_packet(False, s + 1, c + 1 + len(stream), answers, when=1.3),
    ]
    return packets, imeis


def test_tcp_segmentation_and_several_messages_per_segment_parse(tmp_path):
    packets, imeis = segmented_capture()
    # Out of order on the wire: the second data segment before the first.
    packets[3], packets[5] = packets[5], packets[3]
    for name, write in (("segmented.pcap", wrpcap), ("segmented.pcapng", wrpcapng)):
        path = tmp_path / name
        write(str(path), packets)
        capture = read_capture(path)
        assert [e.imei for e in capture.ecrs] == imeis, name
        assert [e.answer for e in capture.ecrs] == [(2001, 0), (2001, 0), (5422, None)], name
        assert capture.unpaired_answers == 0


def test_capture_starting_mid_stream_resynchronises(tmp_path):
    packets, imeis = segmented_capture()
    request = ecr(imeis[0], "001010000000001", hop_by_hop=7, end_to_end=7)
    # No handshake: the capture starts with the tail of an earlier message.
    mid = [tcp_packet(True, 90_000, 1, request[-13:] + request, when=2.0)]
    path = tmp_path / "mid.pcap"
    wrpcap(str(path), mid)
    capture = read_capture(path)
    assert [e.imei for e in capture.ecrs] == [imeis[0]]
    assert any("mid-stream" in note for note in capture.notes)


def test_sctp_data_chunks_parse(tmp_path):
    first = ecr("352099001761481", "001010000000001", session_id="s;1", hop_by_hop=1,
                end_to_end=1)
    second = ecr("35332106470089", "001010000000002", session_id="s;2", hop_by_hop=2,
                 end_to_end=2)
    half = len(second) // 2

    def sctp(from_client: bool, *chunks):
        (src, sport), (dst, dport) = (CLIENT, SERVER) if from_client else (SERVER, CLIENT)
        packet = IP(src=src, dst=dst) / SCTP(sport=sport, dport=dport)
        for chunk in chunks:
            packet = packet / chunk
        return packet

    def data(tsn: int, payload: bytes, beginning: int = 1, ending: int = 1):
        return SCTPChunkData(tsn=tsn, stream_id=1, proto_id=46, beginning=beginning,
                             ending=ending, data=payload)

    packets = [
        sctp(True, data(1, first)),
        sctp(True, data(1, first)),  # retransmitted TSN
        sctp(True, data(2, second[:half], ending=0), data(3, second[half:], beginning=0)),
        sctp(False, data(50, eca(1, 1, "s;1", 1)), data(51, eca(2, 2, "s;2", 2))),
    ]
    path = tmp_path / "sctp.pcap"
    wrpcap(str(path), packets)
    capture = read_capture(path)
    assert [e.imei for e in capture.ecrs] == ["352099001761481", "35332106470089"]
    assert [e.answer for e in capture.ecrs] == [(2001, 1), (2001, 2)]


def test_replaying_a_scapy_capture_reports_the_contradicted_verdict(tmp_path, target):
    packets, imeis = segmented_capture()
    path = tmp_path / "segmented.pcap"
    wrpcap(str(path), packets)
    report = replay_json("--target", target, "--pcap", str(path), "--speed", "4")
    assert report["sent"] == report["answered"] == 3
    assert report["diff"]["changed_imeis"] == [imeis[0]]  # captured WHITELISTED, now stolen
    (change,) = report["diff"]["changes"]
    assert (change["before"]["equipment_status"], change["after"]["equipment_status"]) == (
        "WHITELISTED", "BLACKLISTED")


# -- refusals and failures ----------------------------------------------------------------

def test_non_loopback_target_is_refused():
    result = replay("--target", "192.0.2.1:3868", "--count", "1", expect=2)
    assert "not a loopback address" in result.stderr and "--allow-remote" in result.stderr


def test_unreachable_target_is_named():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = replay("--target", f"127.0.0.1:{port}", "--count", "1", expect=1)
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr
    assert "refused" in result.stderr.lower()


def test_bad_mix_csv_names_file_line_and_field(tmp_path, target):
    mix = tmp_path / "bad.csv"
    mix.write_text("imei,imsi\n35209900176148,001010000000001\n3520990017614X,\n"
                   "35209900176148,12ab\n")
    result = replay("--target", target, "--mix", str(mix), expect=2)
    assert f"{mix}:3: imei: '3520990017614X' is not an IMEI" in result.stderr
    assert f"{mix}:4: imsi: '12ab' is not an IMSI" in result.stderr


def test_unanswered_requests_time_out_and_the_run_ends():
    """A Diameter peer that answers CER (built with scapy) and then never answers an ECR."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def silent_peer():
        connection, _ = listener.accept()
        with connection:
            cer = read_message(connection)
            header = DiamG(cer)
            cea = DiamG(drFlags=0, drCode=257, drAppId=0, drHbHId=header.drHbHId,
                        drEtEId=header.drEtEId, avpList=[
                            AVP("Result-Code", val=2001), AVP("Origin-Host", val="silent"),
                            AVP("Origin-Realm", val="test"),
                            AVP("Host-IP-Address", val="127.0.0.1"), AVP("Vendor-Id", val=0),
                            AVP("Product-Name", val="silent")])
            connection.sendall(raw(cea))
            connection.settimeout(TIMEOUT)
            while chunk := connection.recv(65536):
                received.append(chunk)

    thread = threading.Thread(target=silent_peer, daemon=True)
    thread.start()
    try:
        report = replay_json("--target", f"127.0.0.1:{port}", "--generate", "invalid=1",
                             "--count", "5", "--timeout", "0.5")
    finally:
        listener.close()
    thread.join(TIMEOUT)
    assert (report["sent"], report["answered"], report["timeouts"]) == (5, 0, 5)
    assert report["latency_ms"]["p99"] is None
    messages = b"".join(received)
    assert messages.count(b"INVALID") == 5  # the five ECRs did reach the peer
    assert parse_answer(messages[:int.from_bytes(messages[1:4], "big")]).code == 324


def test_plot_is_a_png(tmp_path, target):
    plot = tmp_path / "latency.png"
    replay("--target", target, "--generate", "white=1", "--list", str(EXAMPLE_LIST),
           "--count", "500", "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 20_000  # three labelled panels, not an empty canvas
