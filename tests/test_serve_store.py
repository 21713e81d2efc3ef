"""`eir serve` answering from a snapshot store, over real S13 connections: it follows syncs and
rollbacks on open connections, swaps under load without failing a request, two servers on one
store answer alike, and an empty store is synced first (or refused with a hint)."""

from __future__ import annotations

import threading
from pathlib import Path

from helpers_wire import ecr, open_peer, parse_answer, read_message

from eir.lists.store import Store
from eir.lists.sync import sync
from helpers_process import eir_ok as cli_ok, run_eir

ROOT = Path(__file__).resolve().parent.parent
IMSI = "001010123456789"
# Version 1 blacklists A; version 2 blacklists B instead and greylists C (notified, blocked
# only in 2099). Block dates are past: the server decides for today.
A, B, C = "35123456000017", "35123456000025", "35123456000033"
V1 = {A: "BLACKLISTED", B: "UNKNOWN", C: "UNKNOWN"}
V2 = {A: "UNKNOWN", B: "BLACKLISTED", C: "GREYLISTED"}
STATUS_NAMES = {0: "WHITELISTED", 1: "BLACKLISTED", 2: "GREYLISTED"}
RELOAD_TIMEOUT = 5.0  # poll_seconds is 0.2: a reload takes well under a second
# ECRs at most in the load test: about 15,000 are sent here (two swaps under way at ~10,000/s);
# the cap only matters when swaps are slow, and then the test says so.
LOAD_CAP = 60_000
BATCH = 100  # ECRs in flight at once


# --- helpers ----------------------------------------------------------------------------------

def write_drop(directory: Path, version: dict[str, str]) -> Path:
    """A registry drop directory whose lists give the verdicts of `version` (V1 or V2)."""
    directory.mkdir(parents=True, exist_ok=True)
    black = [imei for imei, status in version.items() if status == "BLACKLISTED"]
    grey = [imei for imei, status in version.items() if status == "GREYLISTED"]
    (directory / "20261120_blacklist.csv").write_text(
        "imei,block_date,reasons\n" + "".join(f"{imei},20200101,stolen\n" for imei in black))
    (directory / "20261120_notifications_op1.csv").write_text(
        "imei,imsi,msisdn,block_date,reasons\n" +
        "".join(f"{imei},{IMSI},6281100000001,20991231,duplicate\n" for imei in grey))
    return directory


def write_config(path: Path, **sections: dict) -> Path:
    """A config file with store.poll_seconds 0.2 and any other sections given."""
    sections.setdefault("store", {})
    sections["store"] = {"poll_seconds": 0.2} | sections["store"]
    text = "".join(f"{section}:\n" + "".join(f"  {key}: {value}\n"
                                            for key, value in values.items())
                   for section, values in sections.items())
    path.write_text(text)
    return path




def outcome_of(message: bytes) -> str:
    """The verdict an ECA carries: a status name, UNKNOWN (5422), or what went wrong."""
    answer = parse_answer(message)
    if (answer.code, answer.application, answer.is_request) != (324, 16777252, False):
        return f"not an ECA: {answer}"
    if answer.result_code == 2001 and answer.equipment_status in STATUS_NAMES:
        return STATUS_NAMES[answer.equipment_status]
    if answer.result_code is None and answer.experimental_result == (10415, 5422):
        return "UNKNOWN"
    return f"error: Result-Code {answer.result_code}, Experimental-Result " \
           f"{answer.experimental_result}"


class S13Peer:
    """One S13 connection that asks for verdicts, pipelined; each distinct answer (ignoring
    its hop-by-hop and end-to-end ids) is decoded by scapy once."""

    def __init__(self, address: tuple[str, int]):
        self.sock = open_peer(address)
        self.hop = 1000
        self._requests: dict[str, bytes] = {}
        self._outcomes: dict[bytes, str] = {}

    def close(self) -> None:
        self.sock.close()

    def send(self, imeis: list[str]) -> list[int]:
        """Send one ECR per IMEI in one write; their hop-by-hop ids, in order."""
        hops, data = [], bytearray()
        for imei in imeis:
            template = self._requests.get(imei)
            if template is None:
                template = self._requests[imei] = ecr(imei=imei, imsi=IMSI,
                                                      session_id=f"mme.test;load;{imei}")
            self.hop += 1
            ids = self.hop.to_bytes(4, "big") * 2
            data += template[:12] + ids + template[20:]
            hops.append(self.hop)
        self.sock.sendall(data)
        return hops

    def receive(self, hop: int) -> str:
        message = read_message(self.sock)
        got = int.from_bytes(message[12:16], "big")
        assert got == hop, f"answer for hop-by-hop {got}, expected {hop}"
        key = message[:12] + message[20:]
        if key not in self._outcomes:
            self._outcomes[key] = outcome_of(message)
        return self._outcomes[key]

    def ask(self, *imeis: str) -> dict[str, str]:
        hops = self.send(list(imeis))
        return {imei: self.receive(hop) for imei, hop in zip(imeis, hops)}


class Load(threading.Thread):
    """Keeps a peer asking for A, B and C, BATCH at a time, until stopped or LOAD_CAP."""

    def __init__(self, peer: S13Peer):
        super().__init__(daemon=True)
        self.peer = peer
        self.sent = 0
        self.answers: list[tuple[str, str]] = []  # (imei, outcome), in order
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._changed = threading.Condition()

    def run(self) -> None:
        try:
            while not self._stopping.is_set() and self.sent < LOAD_CAP:
                imeis = [(A, B, C)[(self.sent + i) % 3] for i in range(BATCH)]
                hops = self.peer.send(imeis)
                self.sent += len(imeis)
                for imei, hop in zip(imeis, hops):
                    outcome = self.peer.receive(hop)
                    with self._changed:
                        self.answers.append((imei, outcome))
                        self._changed.notify_all()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            with self._changed:
                self._changed.notify_all()

    def wait_for_more(self, count: int, timeout: float = 10.0) -> None:
        """Block until `count` more answers than now have arrived."""
        with self._changed:
            target = len(self.answers) + count
            done = self._changed.wait_for(
                lambda: len(self.answers) >= target or not self.is_alive(), timeout)
            assert done and len(self.answers) >= target, (
                f"load stopped at {len(self.answers)} answers (cap {LOAD_CAP}): {self.error!r}")

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), "load thread did not finish"


def epochs_seen(answers: list[tuple[str, str]], epochs: list[dict[str, str]]) -> int:
    """Check every answer comes from one list version, the versions in force in `epochs`
    order (a swap is atomic and never undone out of order); return how many epochs the
    answers went through."""
    epoch = 0
    for index, (imei, outcome) in enumerate(answers):
        while epochs[epoch][imei] != outcome:
            epoch += 1
            assert epoch < len(epochs), (
                f"answer {index} for {imei} is {outcome}: from no list version in force at "
                f"that point (allowed: {[e[imei] for e in epochs]})")
    return epoch + 1


# --- fixtures ---------------------------------------------------------------------------------

def store_at_v1(tmp_path: Path) -> Path:
    store_dir = tmp_path / "store"
    assert sync(str(write_drop(tmp_path / "v1", V1)), Store(store_dir)).version == "000001"
    return store_dir


def serve_from(eir_server, tmp_path: Path, store_dir: Path):
    """`eir serve --store DIR` with a config file that only sets store.poll_seconds."""
    config = write_config(tmp_path / "eir.yaml")
    server = eir_server("--config", str(config), "--store", str(store_dir), lists=[])
    server.wait_for_log(r"lists version 000001")
    return server


def reloaded(server, version: str, start: int) -> None:
    server.wait_for_log(rf"lists reloaded: version {version}\b", RELOAD_TIMEOUT, start)


# --- tests ------------------------------------------------------------------------------------

def test_a_sync_reaches_an_open_connection(eir_server, tmp_path):
    store_dir = store_at_v1(tmp_path)
    server = serve_from(eir_server, tmp_path, store_dir)
    peer = S13Peer(server.address)
    try:
        assert peer.ask(A, B, C) == V1
        mark = len(server.lines)
        out = cli_ok("sync", "--source", str(write_drop(tmp_path / "v2", V2)),
                     "--store", str(store_dir))
        assert "published version 000002" in out
        reloaded(server, "000002", mark)
        assert peer.ask(A, B, C) == V2  # same connection, no reconnect
    finally:
        peer.close()
    assert server.stop() == 0


def test_a_rollback_is_followed_by_the_server(eir_server, tmp_path):
    store_dir = store_at_v1(tmp_path)
    sync(str(write_drop(tmp_path / "v2", V2)), Store(store_dir))
    server = eir_server("--config", str(write_config(tmp_path / "eir.yaml")),
                        "--store", str(store_dir), lists=[])
    server.wait_for_log(r"lists version 000002")
    peer = S13Peer(server.address)
    try:
        assert peer.ask(A, B, C) == V2
        mark = len(server.lines)
        assert "version 000001 is in force" in cli_ok("lists", "rollback", "--store",
                                                      str(store_dir))
        reloaded(server, "000001", mark)
        assert peer.ask(A, B, C) == V1
    finally:
        peer.close()


def test_no_request_fails_while_lists_swap_under_load(eir_server, tmp_path):
    store_dir = store_at_v1(tmp_path)
    store = Store(store_dir)
    server = serve_from(eir_server, tmp_path, store_dir)
    load = Load(S13Peer(server.address))
    load.start()
    try:
        load.wait_for_more(1000)
        mark = len(server.lines)
        assert sync(str(write_drop(tmp_path / "v2", V2)), store).version == "000002"
        reloaded(server, "000002", mark)
        load.wait_for_more(1000)
        mark = len(server.lines)
        assert store.rollback() == "000001"
        reloaded(server, "000001", mark)
        load.wait_for_more(1000)
    finally:
        load.stop()
        load.peer.close()
    assert load.error is None, repr(load.error)
    assert len(load.answers) == load.sent, "some ECRs got no answer"
    # Every answer is a verdict of V1 or V2 (none an error), in swap order: V1, V2, V1.
    assert epochs_seen(load.answers, [V1, V2, V1]) == 3
    assert server.stop() == 0


def test_two_servers_on_one_store_answer_alike_after_a_sync(eir_server, tmp_path):
    store_dir = store_at_v1(tmp_path)
    # The store set in the config file this time (relative to it), not by --store.
    config = write_config(tmp_path / "eir.yaml", store={"directory": "store"})
    servers = [eir_server("--config", str(config), lists=[]) for _ in range(2)]
    peers = [S13Peer(server.address) for server in servers]
    try:
        imeis = (A, B, C, "35123456000041", "86000000000001")  # the last two on no list

        def answers_alike() -> dict[str, str]:
            first, second = (peer.ask(*imeis) for peer in peers)
            assert first == second
            return first

        assert answers_alike() == V1 | {imei: "UNKNOWN" for imei in imeis[3:]}
        marks = [len(server.lines) for server in servers]
        cli_ok("sync", "--source", str(write_drop(tmp_path / "v2", V2)),
               "--store", str(store_dir))
        for server, mark in zip(servers, marks):
            reloaded(server, "000002", mark)
        assert answers_alike() == V2 | {imei: "UNKNOWN" for imei in imeis[3:]}
    finally:
        for peer in peers:
            peer.close()


def test_two_nodes_with_their_own_stores_follow_one_source_alike(eir_server, tmp_path):
    """Issue 3 item 8: two nodes, each with its own store, pointed at the same registry
    source, reach the same snapshot version and answer identically."""
    source = write_drop(tmp_path / "registry", V1)
    servers = []
    for node in ("node1", "node2"):
        config = write_config(tmp_path / f"{node}.yaml", store={"directory": node},
                              sync={"source": str(source), "interval_seconds": 0.3})
        servers.append(eir_server("--config", str(config), lists=[]))
    peers = [S13Peer(server.address) for server in servers]
    try:
        imeis = (A, B, C, "35123456000041")
        for server in servers:
            server.wait_for_log(r"lists version 000001")
        first, second = (peer.ask(*imeis) for peer in peers)
        assert first == second == V1 | {"35123456000041": "UNKNOWN"}
        marks = [len(server.lines) for server in servers]
        write_drop(source, V2)  # the registry publishes new lists
        for server, mark in zip(servers, marks):
            reloaded(server, "000002", mark)
        first, second = (peer.ask(*imeis) for peer in peers)
        assert first == second == V2 | {"35123456000041": "UNKNOWN"}
    finally:
        for peer in peers:
            peer.close()


def test_serving_an_empty_store_syncs_first_from_the_configured_source(eir_server, tmp_path):
    drop = write_drop(tmp_path / "v1", V1)
    config = write_config(tmp_path / "eir.yaml", sync={"source": str(drop)})
    store_dir = tmp_path / "empty"
    server = eir_server("--config", str(config), "--store", str(store_dir), lists=[])
    server.wait_for_log(r"lists version 000001")
    assert Store(store_dir).current_version() == "000001"
    peer = S13Peer(server.address)
    try:
        assert peer.ask(A, B, C) == V1
    finally:
        peer.close()


def test_serving_an_empty_store_without_a_source_exits_saying_to_run_eir_sync(tmp_path):
    config = write_config(tmp_path / "eir.yaml")
    result = run_eir("serve", "--config", str(config), "--store", str(tmp_path / "empty"),
                     "--listen", "127.0.0.1:0", timeout=15)
    assert result.returncode != 0
    assert "eir sync" in result.stderr, result.stderr
    assert "listening on" not in result.stderr
