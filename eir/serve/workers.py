"""Several worker processes behind the same listeners (`workers`, `eir serve --workers N`).

One event loop answers Diameter on one core. With N workers, the process `eir serve`
started becomes the **supervisor**: it binds the listeners (S13's and N5g-eir's), accepts
every connection and hands the accepted socket to the worker with the fewest connections
(SCM_RIGHTS over a Unix socket pair), and runs everything that must exist once: /metrics
(the workers' counters merged), the admin API, the NRF registration, registry syncs and the
store watch, the observation database writer, the audit file. Each **worker** is `python -m
eir` re-run with the same arguments (so a crashed worker can be started again, and no
threads are forked); it loads the same lists (a store's snapshot is a memory-mapped file:
one copy in the page cache for all workers) and serves the connections it is given.

Why hand over accepted sockets rather than SO_REUSEPORT: an MME keeps one or two
long-lived connections. SO_REUSEPORT spreads connections by a hash of their addresses,
so two MMEs land on the same worker half the time and one core idles; the supervisor
instead gives each new connection to the least-loaded worker.

The control channel (SOCK_SEQPACKET, one per worker) carries pickled dicts, both ways:

* supervisor → worker: `connection` (with the socket's fd; its `transport` says whether it
  is S13's, or N5g-eir's: SBI_TRANSPORTS), `snapshot` and `peers`
  (requests with an `id`, answered by a `reply`), `prepare` / `commit` / `abort` (list
  swaps: every worker loads the new lists first, then all swap on `commit`, so that they
  change version together, within a message's latency), `stop`.
* worker → supervisor: `ready`, `closed` (a handed-over connection ended: the connection
  limits, S13's or N5g-eir's as its `kind` says, are counted in the supervisor), `claim`
  (a request, answered by a `reply`: may a CER's Origin-Host open a connection,
  eir.diameter.identities: the registry is here) and
  `release` (that connection ended), `reply`, and `observations` (the records a
  worker's ObservationLog would have written: the supervisor's ObservationLog writes them,
  so one writer owns the database).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
from collections import deque
from typing import Callable

from eir.check.observations import Backend, observation_keys

log = logging.getLogger("eir.workers")

WORKER_ENVIRONMENT_VARIABLE = "EIR_WORKER_CHANNEL"  # "index:control-fd:observations-fd"
CHANNEL_BUFFER_BYTES = 4 << 20  # a peers list or an observations batch fits in a message
MAX_MESSAGE_FDS = 1
REPLY_TIMEOUT_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 120.0  # a worker loads the lists before it is ready
OBSERVATIONS_PER_MESSAGE = 5000
MESSAGES_PER_TURN = 16  # control messages handled per turn of the event loop
RESTART_DELAY_SECONDS = 1.0  # before restarting a worker that died within the window
RESTART_DELAY_WINDOW = 10.0
# Hand-over transports of N5g-eir connections (eir.interfaces.sbi): cleartext h2c, and TLS
# (the worker does the handshake); S13's are "tcp", "sctp" and "tls".
SBI_TRANSPORTS = {"sbi": False, "sbi-tls": True}  # transport → TLS


def limits_kind(transport: str) -> str:
    """Which connection limits a handed-over connection counts against: "sbi" or
    "diameter"."""
    return "sbi" if transport in SBI_TRANSPORTS else "diameter"


class WorkerStartError(Exception):
    """A worker could not start: `eir serve` stops (no half-served port)."""


def default_worker_count() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected SOCK_SEQPACKET pair (message boundaries kept, fds can travel)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHANNEL_BUFFER_BYTES)
    return ours, theirs


class Channel:
    """One end of a control channel on an event loop: messages (dicts) out, queued while
    the peer's buffer is full; messages in, to `on_message(message, fds)`; `on_closed()`
    once, when the other end is gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_message: Callable[[dict, list[int]], None],
                 on_closed: Callable[[], None]):
        self.loop = loop
        self.sock = sock
        sock.setblocking(False)
        self.on_message = on_message
        self.on_closed = on_closed
        self.closed = False
        self._outbox: deque[tuple[bytes, list[socket.socket]]] = deque()
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        loop.add_reader(sock.fileno(), self._readable)

    def send(self, message: dict, sockets: tuple[socket.socket, ...] = ()) -> None:
        """Send (or queue) a message; `sockets` travel with it and are closed here once
        sent (the other process has its own descriptors then)."""
        if self.closed:
            for sock in sockets:
                sock.close()
            return
        self._outbox.append((pickle.dumps(message, pickle.HIGHEST_PROTOCOL), list(sockets)))
        if len(self._outbox) == 1:
            self._flush()

    async def request(self, op: str, **fields) -> object:
        """Send a request and wait for its reply's value (TimeoutError, ConnectionError)."""
        if self.closed:
            raise ConnectionError("the channel is closed")
        ident = next(self._ids)
        future = self.loop.create_future()
        self._replies[ident] = future
        self.send({"op": op, "id": ident, **fields})
        try:
            return await asyncio.wait_for(future, REPLY_TIMEOUT_SECONDS)
        finally:
            self._replies.pop(ident, None)

    def reply(self, request: dict, value: object) -> None:
        self.send({"op": "reply", "id": request["id"], "value": value})

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            for _, sockets in self._outbox:
                for sock in sockets:
                    sock.close()
            self._outbox.clear()
            self.sock.close()
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(ConnectionError("the other process is gone"))

    def _flush(self) -> None:
        outbox = self._outbox
        while outbox:
            data, sockets = outbox[0]
            try:
                if sockets:
                    socket.send_fds(self.sock, [data], [s.fileno() for s in sockets])
                else:
                    self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.sock.fileno(), self._writable)
                return
            except OSError:
                self._lost()
                return
            outbox.popleft()
            for sock in sockets:
                sock.close()

    def _writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        self._flush()

    def _readable(self) -> None:
        # At most MESSAGES_PER_TURN per turn of the loop (the reader is level-triggered: the
        # rest comes next turn): a burst of hand-overs (each a connection to set up) must not
        # hold the loop while the worker's peers wait.
        for _ in range(MESSAGES_PER_TURN):
            if self.closed:
                return
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, CHANNEL_BUFFER_BYTES,
                                                  MAX_MESSAGE_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._lost()
                return
            message = pickle.loads(data)
            if message.get("op") == "reply":
                future = self._replies.get(message["id"])
                if future is not None and not future.done():
                    future.set_result(message["value"])
                continue
            try:
                self.on_message(message, fds)
            except Exception:  # noqa: BLE001 - one bad message must not end the channel
                log.exception("control message %r failed", message.get("op"))

    def _lost(self) -> None:
        if not self.closed:
            self.close()
            self.on_closed()


# -- the supervisor's side -----------------------------------------------------------------


class Worker:
    """The supervisor's handle on one worker process."""

    def __init__(self, index: int):
        self.index = index
        self.process: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.observations: socket.socket | None = None
        self.ready = False
        self.connections = 0
        # (limits kind, address) of its connections, as counted by the limits
        self.addresses: list[tuple[str, str]] = []
        self.hosts: list[str] = []  # Origin-Hosts its connections claimed (peer_identities)
        self.ready_event = asyncio.Event()
        self.started_at = 0.0  # loop time of its latest start

    @property
    def name(self) -> str:
        pid = self.process.pid if self.process is not None else "-"
        return f"worker {self.index} (pid {pid})"


class Supervisor:
    """Starts the workers, hands them connections, asks them for metrics and peers, swaps
    their lists together, restarts one that dies, and stops them (see the module doc).

    `server` is the supervisor's eir.serve.server.EirServer: its connection limits, its
    ObservationLog (None when observations are off) and its stopping flag are used here.
    """

    def __init__(self, server, count: int, argv: list[str]):
        self.server = server
        self.count = count
        self.argv = argv
        self.workers = [Worker(index) for index in range(count)]
        self._waiting: deque[tuple[socket.socket, str, str]] = deque()  # before any ready
        self._stopping = False
        self._started = False  # all were ready once: from then on, one that dies restarts
        self.restarts = 0

    async def start(self) -> None:
        """Start every worker and wait until all are ready (lists loaded)."""
        for worker in self.workers:
            self._spawn(worker)
        waits = [asyncio.wait_for(worker.ready_event.wait(), READY_TIMEOUT_SECONDS)
                 for worker in self.workers]
        try:
            await asyncio.gather(*waits)
        except asyncio.TimeoutError:
            await self.stop(0)
            raise WorkerStartError(f"workers not ready within {READY_TIMEOUT_SECONDS:.0f} "
                                   "s") from None
        for worker in self.workers:
            if not worker.ready:
                await self.stop(5)
                raise WorkerStartError(f"{worker.name} exited while starting (see its log "
                                       "above)")
        self._started = True

    @property
    def all_ready(self) -> bool:
        return all(worker.ready for worker in self.workers)

    def _spawn(self, worker: Worker) -> None:
        loop = self.server.loop
        control, control_child = channel_pair()
        observations, observations_child = channel_pair()
        environment = dict(os.environ)
        environment[WORKER_ENVIRONMENT_VARIABLE] = (
            f"{worker.index}:{control_child.fileno()}:{observations_child.fileno()}")
        worker.process = subprocess.Popen(
            [sys.executable, "-m", "eir", *self.argv], env=environment,
            pass_fds=(control_child.fileno(), observations_child.fileno()))
        control_child.close()
        observations_child.close()
        worker.ready = False
        worker.ready_event.clear()
        worker.connections = 0
        worker.started_at = loop.time()
        worker.channel = Channel(loop, control,
                                 lambda message, fds: self._on_message(worker, message, fds),
                                 lambda: self._on_exit(worker))
        worker.observations = observations
        observations.setblocking(False)
        loop.add_reader(observations.fileno(), self._read_observations, worker)
        log.info("%s started", worker.name)

    def _on_message(self, worker: Worker, message: dict, fds: list[int]) -> None:
        op = message["op"]
        for fd in fds:  # workers send no descriptors
            os.close(fd)
        if op == "closed":
            kind = message["kind"]
            worker.connections -= 1
            worker.addresses.remove((kind, message["address"]))
            self._limits(kind).release(message["address"])
        elif op == "claim":  # a CER passed its checks: may its Origin-Host open here?
            granted, why = self.server.peer_identities.claim(message["host"])
            if granted:
                worker.hosts.append(message["host"])
            worker.channel.reply(message, (granted, why))
        elif op == "release":
            worker.hosts.remove(message["host"])
            self.server.peer_identities.release(message["host"])
        elif op == "ready":
            worker.ready = True
            worker.ready_event.set()
            log.info("%s ready: lists version %s", worker.name, message["version"])
            while self._waiting:
                self.hand_over(*self._waiting.popleft())
        else:
            log.warning("%s: unexpected control message %r", worker.name, op)

    def _read_observations(self, worker: Worker) -> None:
        sink = self.server.observations
        while True:
            try:
                data = worker.observations.recv(CHANNEL_BUFFER_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.server.loop.remove_reader(worker.observations.fileno())
                return
            if sink is not None:
                for day, keys in pickle.loads(data):
                    sink.record_keys(day, keys)

    def _close_observations(self, worker: Worker) -> None:
        """Take what a worker that exited sent last (its final flush), then close."""
        if worker.observations is not None:
            self._read_observations(worker)
            self.server.loop.remove_reader(worker.observations.fileno())
            worker.observations.close()
            worker.observations = None

    def _on_exit(self, worker: Worker) -> None:
        self._close_observations(worker)
        # Its connections went with it: give their places back to the limits.
        for kind, address in worker.addresses:
            self._limits(kind).release(address)
        worker.addresses.clear()
        for host in worker.hosts:
            self.server.peer_identities.release(host)
        worker.hosts.clear()
        worker.ready = False
        worker.ready_event.set()  # a start() waiting on it finds it not ready
        code = None
        if worker.process is not None:
            try:  # its channel closes as it exits: this is at most a moment
                code = worker.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                code = worker.process.wait()
        if self._stopping:
            log.info("%s stopped (exit %s)", worker.name, code)
            return
        if not self._started:
            return  # start() reports it
        self.restarts += 1
        now = self.server.loop.time()
        # One that dies again soon after its start waits a little before the next, so that
        # a worker that cannot live does not spin the supervisor.
        delay = RESTART_DELAY_SECONDS if now - worker.started_at < RESTART_DELAY_WINDOW else 0
        log.error("%s exited unexpectedly (exit %s): starting another%s", worker.name, code,
                  f" in {delay:g} s" if delay else "")
        self.server.loop.call_later(delay, self._respawn, worker)

    def _respawn(self, worker: Worker) -> None:
        if not self._stopping:
            self._spawn(worker)

    def _limits(self, kind: str):
        """The supervisor's connection limits of that kind (eir.diameter.overload)."""
        if kind == "sbi":
            return self.server.sbi.limits
        return self.server.connection_limits

    def hand_over(self, sock: socket.socket, address: str, transport: str) -> None:
        """Give an accepted connection to the ready worker with the fewest connections (kept
        here until one is ready)."""
        ready = [worker for worker in self.workers if worker.ready]
        if not ready:
            self._waiting.append((sock, address, transport))
            return
        worker = min(ready, key=lambda w: w.connections)
        worker.connections += 1
        worker.addresses.append((limits_kind(transport), address))
        worker.channel.send({"op": "connection", "address": address, "transport": transport},
                            (sock,))

    def share_learned(self, cutoff: int, rows: list[tuple]) -> None:
        """Observation rows just written (the writer thread): the pairs the grandfathering
        index may learn go to every worker's index."""
        relevant = [(row[0], row[1], row[2]) for row in rows if row[0] < cutoff and row[2]]
        for start in range(0, len(relevant), OBSERVATIONS_PER_MESSAGE):
            self.server.loop.call_soon_threadsafe(
                self._broadcast, {"op": "learn",
                                  "rows": relevant[start:start + OBSERVATIONS_PER_MESSAGE]})

    def _broadcast(self, message: dict) -> None:
        for worker in self.workers:
            if worker.ready:
                worker.channel.send(message)

    async def ask_all(self, op: str) -> list:
        """Each ready worker's reply to `op` (a worker that fails to reply is left out)."""
        ready = [worker for worker in self.workers if worker.ready]
        replies = await asyncio.gather(*(worker.channel.request(op) for worker in ready),
                                       return_exceptions=True)
        found = []
        for worker, reply in zip(ready, replies):
            if isinstance(reply, BaseException):
                log.warning("%s did not answer %r: %s", worker.name, op,
                            reply or type(reply).__name__)
            else:
                found.append(reply)
        return found

    def worker_pids(self) -> dict[int, int]:
        """{index: pid} of the ready workers (their process_* metrics, eir.interfaces.metrics)."""
        return {worker.index: worker.process.pid for worker in self.workers
                if worker.ready and worker.process is not None}

    async def swap_lists(self, lists=None) -> tuple[bool, str | None]:
        """Every worker loads the lists in force now (with the list settings `lists`, when
        the configuration changed them); if all could, all swap; else none does. (ok, why
        not)."""
        ready = [worker for worker in self.workers if worker.ready]
        replies = await asyncio.gather(*(worker.channel.request("prepare", lists=lists)
                                         for worker in ready), return_exceptions=True)
        failures = []
        versions = set()
        for worker, reply in zip(ready, replies):
            if isinstance(reply, BaseException):
                failures.append(f"{worker.name}: {reply or type(reply).__name__}")
            elif reply["error"] is not None:
                failures.append(f"{worker.name}: {reply['error']}")
            else:
                versions.add(reply["version"])
        if len(versions) > 1:
            failures.append(f"workers loaded different versions: {sorted(versions)} (the "
                            "store changed meanwhile; the next reload settles it)")
        op = "abort" if failures else "commit"
        for worker in ready:
            worker.channel.send({"op": op})
        return (not failures, "; ".join(failures) or None)

    async def stop(self, timeout: float) -> None:
        """Ask every worker to stop (each sends DPR to its peers) and wait for them."""
        self._stopping = True
        for sock, _, _ in self._waiting:
            sock.close()
        self._waiting.clear()
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.send({"op": "stop"})
        loop = self.server.loop
        deadline = loop.time() + timeout
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            while process.poll() is None and loop.time() < deadline:
                await asyncio.sleep(0.02)  # polling a child's exit; the loop keeps serving
            if process.poll() is None:
                log.warning("%s did not stop within %.0f s: killed", worker.name, timeout)
                process.kill()
                process.wait()
            self._close_observations(worker)
            if worker.channel is not None and not worker.channel.closed:
                worker.channel.close()  # (else _on_exit has seen it go, and said so)
                log.info("%s stopped (exit %s)", worker.name, process.returncode)


# -- the worker's side ---------------------------------------------------------------------


def worker_channel() -> tuple[int, socket.socket, socket.socket] | None:
    """(index, control, observations) when this process is a worker, else None."""
    value = os.environ.pop(WORKER_ENVIRONMENT_VARIABLE, None)
    if not value:
        return None
    index, control, observations = (int(part) for part in value.split(":"))
    return (index, socket.socket(fileno=control), socket.socket(fileno=observations))


class WorkerLogPrefix(logging.Filter):
    """Marks every log record of worker N with `worker = N` (all processes share the
    supervisor's standard error): the text format starts its message with "worker N: ",
    the JSON format has a "worker" field (eir.logs)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


class ForwardedLimits:
    """A worker's connection limits (S13's, or N5g-eir's: `kind`): the supervisor admitted
    the connection already; its end is reported back so the supervisor can count it out."""

    def __init__(self, channel: Channel, kind: str = "diameter"):
        self.channel = channel
        self.kind = kind
        self.open = 0

    def admit(self, address: str) -> None:
        self.open += 1
        return None

    def release(self, address: str) -> None:
        self.open -= 1
        self.channel.send({"op": "closed", "address": address, "kind": self.kind})


class ForwardingBackend(Backend):
    """An observations 'database' that is the supervisor: a worker's ObservationLog flushes
    its records to it (one SEQPACKET message per batch; the writer thread blocks while the
    supervisor's buffer is full). The supervisor's ObservationLog writes them."""

    errors = (OSError,)

    def __init__(self, sock: socket.socket):
        super().__init__()
        self.sock = sock
        sock.setblocking(True)
        self.location = "the supervisor process"

    def connect(self):
        return self.sock

    def insert(self, connection, rows: list[tuple]) -> None:
        by_day: dict[int, list[str]] = {}
        for day, imei, imsi, _, rats in rows:
            by_day.setdefault(day, []).extend(observation_keys(imei, imsi, rats))
        batch = []
        size = 0
        for day, keys in by_day.items():
            for start in range(0, len(keys), OBSERVATIONS_PER_MESSAGE):
                chunk = keys[start:start + OBSERVATIONS_PER_MESSAGE]
                batch.append((day, chunk))
                size += len(chunk)
                if size >= OBSERVATIONS_PER_MESSAGE:
                    connection.sendall(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
                    batch, size = [], 0
        if batch:
            connection.sendall(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))

