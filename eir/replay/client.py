"""The load generator of one process: N pipelining Diameter connections on one asyncio loop.

Each connection does CER/CEA first, then sends its share of the run's requests: request i
(over the whole run) goes on connection i mod N, as a pre-encoded template with its ids and
Session-Id counter patched in, keeping at most `window` requests outstanding. With a rate (or
a capture's recorded pace) request i is due at start + offset(i); its latency is measured
from that due time, not from when it could be written, so a full window or a slow loop shows
as latency instead of being hidden (coordinated omission). Flat out, latency runs from the
write. Answers are matched by hop-by-hop id. DWR and DPR from the server are answered; at the
end each connection sends DPR and waits (bounded) for DPA.

Per request the harness does little more than a minimal pipelining client (bench/replay_cpu.py
measures both): a request is one bytes `%` of its template; a read is framed and its answers
classified in one pass (messages.AnswerReader, a memo of the answers' shapes); the verdicts
are counted and the latencies recorded into the histogram in bulk once per interval.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from itertools import repeat
from typing import Callable

from eir.diameter.constants import (
    COMMAND_CAPABILITIES_EXCHANGE,
    COMMAND_DISCONNECT_PEER,
    FLAG_REQUEST,
)
from eir.replay.messages import (
    COUNTER_MODULO,
    AnswerReader,
    Identity,
    VerdictClasses,
    encode_answer_to,
    encode_cer,
    encode_dpr,
    verdict_of,
)
from eir.replay.stats import (
    INTERVAL_S,
    IntervalReport,
    WorkerResult,
    clear_histogram,
    new_histogram,
    record_latencies,
)
from eir.replay.workload import Workload

_IDS = struct.Struct("!II")
_WORD = struct.Struct("!I")
# Requests per write. Flat out, a connection also waits for room for a whole chunk (or for all
# it has left) before it writes: fewer, fuller writes (each one a TCP send, a system call),
# and with a window of several chunks the server still always has the next ones queued.
CHUNK = 32
LAST_HOP_BY_HOP = 0xFFFFFFFE  # then 1 again (0 and 0xFFFFFFFF are the CER's and the DPR's)
CONNECT_TIMEOUT_S = 5.0
DPA_TIMEOUT_S = 2.0
CER_HOP_BY_HOP, DPR_HOP_BY_HOP = 0, 0xFFFFFFFF


class ReplayError(Exception):
    """The run could not start or go on (target unreachable, CER refused): the message says
    which connection and why."""


@dataclass
class Plan:
    """Everything one worker needs; picklable, so it can be sent to a worker process."""

    worker: int
    host: str
    port: int
    connections: list[int]  # global connection numbers this worker runs
    total_connections: int
    workload: Workload
    identity: Identity
    count: int | None  # requests in the whole run (None: until the duration)
    duration_s: float | None
    rate: float | None  # requests per second over the whole run (None: flat out / capture)
    speed: float | None  # capture pace factor (None: not a capture, or 0 = flat out)
    window: int
    timeout_s: float
    pcap_part: str | None = None  # write this worker's traffic as a pcap here

    def offset(self, i: int) -> float | None:
        """When request i is due, in seconds from the start; None: as soon as there is room."""
        if self.rate:
            return i / self.rate
        if self.speed and self.workload.offsets is not None:
            return self.workload.offsets[self.workload.order[i]] / self.speed
        return None


class Connection(asyncio.Protocol):
    def __init__(self, worker: "Worker", number: int):
        self.worker = worker
        self.number = number  # global connection number j: sends requests j, j+N, j+2N, ...
        self.loop = asyncio.get_running_loop()
        self.reader = AnswerReader(worker.verdict_classes)
        self.transport: asyncio.Transport | None = None
        self.cea: asyncio.Future = self.loop.create_future()
        self.dpa: asyncio.Future = self.loop.create_future()
        self.closed: asyncio.Future = self.loop.create_future()
        self.outstanding: dict[int, tuple[float, float, int]] = {}  # hbh → (start, sent, i)
        self.next_request = number  # global index of the next request to send
        self.next_hop_by_hop = 1
        self.sending = False
        self.done_sending = False
        self.finished = False
        self.timer: asyncio.TimerHandle | None = None
        self.flow = None  # a pcap flow when the traffic is written

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        why = f"connection lost ({exc})" if exc else "the server closed the connection"
        for future in (self.cea, self.dpa, self.closed):
            if not future.done():
                future.set_result(why)
        if self.timer is not None:
            self.timer.cancel()
        if not self.finished:
            self.worker.connection_broken(self, why)

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        if self.flow is not None:
            self.flow.server_sent(data)
        entries: list[tuple[float, float, int]] = []
        classes: list[int] = []
        others: list[bytes] = []
        problem = self.reader.feed(data, self.outstanding, entries, classes, others)
        if entries:
            self.worker.answered(entries, classes, now)
        for message in others:
            self._other_message(message)
        if problem is not None:
            self._abort(problem)
            return
        if self.sending:
            self.pump()

    def _other_message(self, message: bytes) -> None:
        """A message that answers no outstanding request: the server's DWR or DPR, our CEA or
        DPA, or an answer after its request timed out."""
        flags_code = _WORD.unpack_from(message, 4)[0]
        code = flags_code & 0xFFFFFF
        if flags_code >> 24 & FLAG_REQUEST:
            self._server_request(message, code)
        elif code == COMMAND_CAPABILITIES_EXCHANGE:
            if not self.cea.done():
                self.cea.set_result(message)
        elif code == COMMAND_DISCONNECT_PEER:
            if not self.dpa.done():
                self.dpa.set_result(None)
        else:
            self.worker.result.late_answers += 1

    # -- sending ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        if self.flow is not None:
            self.flow.client_sent(data)

    def pump(self) -> None:
        """Send every request that is due, as far as the window allows."""
        if self.done_sending:
            self._maybe_finish()
            return
        worker = self.worker
        plan = worker.plan
        room = plan.window - len(self.outstanding)
        if room <= 0:
            return
        now = self.loop.time()
        dues = self._paced_dues(room, now) if worker.paced else self._flat_out_dues(room, now)
        workload = plan.workload
        formats = worker.formats
        order = workload.order
        cycle = len(order)
        step = plan.total_connections
        outstanding = self.outstanding
        pack_ids = _IDS.pack
        first = i = self.next_request
        hop_by_hop = self.next_hop_by_hop
        batch: list[bytes] = []
        add = batch.append
        for due in dues:
            outstanding[hop_by_hop] = (due, now, i)
            add(formats[order[i % cycle]] % (pack_ids(hop_by_hop, i & 0xFFFFFFFF),
                                             i % COUNTER_MODULO))
            hop_by_hop = hop_by_hop + 1 if hop_by_hop < LAST_HOP_BY_HOP else 1
            i += step
            if len(batch) == CHUNK:
                self.write(b"".join(batch))
                batch.clear()
        if batch:
            self.write(b"".join(batch))
        self.next_request = i
        self.next_hop_by_hop = hop_by_hop
        worker.sent((i - first) // step)
        if self.done_sending:
            self._maybe_finish()

    def _flat_out_dues(self, room: int, now: float):
        """As many requests as there is room for (and left to send), due now."""
        worker = self.worker
        duration = worker.plan.duration_s
        if worker.stopping or (duration is not None and now - worker.start >= duration):
            self.done_sending = True
            return ()
        step = worker.plan.total_connections
        left = max(0, (worker.limit - self.next_request + step - 1) // step)
        if left <= room:
            self.done_sending = True
            return repeat(now, left)
        if room < min(CHUNK, worker.plan.window):
            return ()  # a whole chunk when there is room for it
        return repeat(now, room)

    def _paced_dues(self, room: int, now: float) -> list[float]:
        """The due times of the requests due by now (at most `room`); a wake-up at the next."""
        worker = self.worker
        plan = worker.plan
        start, duration, limit = worker.start, plan.duration_s, worker.limit
        step = plan.total_connections
        offset = plan.offset
        dues: list[float] = []
        i = self.next_request
        while len(dues) < room:
            if i >= limit or worker.stopping:
                self.done_sending = True
                break
            due = start + offset(i)
            if duration is not None and due - start >= duration:
                self.done_sending = True
                break
            if due > now:
                self._wake_at(due)
                break
            dues.append(due)
            i += step
        if dues:
            lag = now - min(dues)
            if lag > worker.result.max_send_lag_s:
                worker.result.max_send_lag_s = lag
        return dues

    def _wake_at(self, due: float) -> None:
        timer = self.timer
        if timer is not None and not timer.cancelled() and timer.when() <= due:
            return
        if timer is not None:
            timer.cancel()
        self.timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.pump()

    def stop_sending(self) -> None:
        self.done_sending = True
        if self.timer is not None:
            self.timer.cancel()
        self._maybe_finish()

    def expire(self, now: float) -> None:
        """Count requests unanswered for timeout_s as timed out, and free their room."""
        outstanding = self.outstanding
        deadline = now - self.worker.plan.timeout_s
        expired = 0
        while outstanding:
            hop_by_hop, (_, sent_at, _) = next(iter(outstanding.items()))
            if sent_at > deadline:
                break
            del outstanding[hop_by_hop]
            expired += 1
        if expired:
            self.worker.timed_out(expired)
            if self.sending:
                self.pump()
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.done_sending and not self.outstanding and not self.finished:
            self.finished = True
            self.worker.connection_finished(self)

    # -- requests from the server -------------------------------------------------------------

    def _server_request(self, message: bytes, code: int) -> None:
        self.write(encode_answer_to(message, self.worker.plan.identity))
        if code == COMMAND_DISCONNECT_PEER:
            self.worker.result.connection_errors.append(
                f"connection {self.number}: the server sent DPR (it is shutting down)")
            self.stop_sending()

    def _abort(self, why: str) -> None:
        self.worker.result.connection_errors.append(f"connection {self.number}: {why}")
        self.transport.abort()


class Worker:
    """Runs a Plan: connects, waits for the common start, sends, reports to `sink`."""

    def __init__(self, plan: Plan, sink: Callable, stop_requested: Callable[[], bool] = None):
        self.plan = plan
        self.sink = sink
        self.stop_requested = stop_requested or (lambda: False)
        self.result = WorkerResult(plan.worker)
        self.limit = plan.count if plan.count is not None else (
            plan.workload.natural_count if not plan.workload.cyclic else 1 << 62)
        self.paced = plan.offset(0) is not None
        self.start = 0.0
        self.stopping = False
        self.connections: list[Connection] = []
        self.histogram = new_histogram()
        self.interval_counts = [0, 0, 0, 0]  # sent, answered, errors, timeouts
        self.interval_index = 0
        self.formats = [template.format for template in plan.workload.templates]
        self.verdict_classes = VerdictClasses()
        # The answers since the last interval report: counted and recorded when it is made.
        self.latencies: list[float] = []  # seconds
        self.classes: list[int] = []  # verdict class numbers
        self.expected_now = 0  # of them, error answers the workload meant to provoke
        self.check_each = plan.workload.captured is not None  # compare with the capture
        self.all_finished: asyncio.Future | None = None
        self.pcap = None

    # -- counting (called by connections) -----------------------------------------------------

    def sent(self, count: int) -> None:
        self.result.sent += count
        self.interval_counts[0] += count

    def answered(self, entries: list[tuple[float, float, int]], classes: list[int],
                 now: float) -> None:
        """The answers of one read: entries (due, sent, request number) and verdict classes."""
        self.result.last_answer = now
        self.latencies.extend([now - entry[0] for entry in entries])
        self.classes.extend(classes)
        if self.check_each or (self.plan.workload.expected_errors is not None
                               and not self.verdict_classes.errors.isdisjoint(classes)):
            self._check_each(entries, classes)

    def _check_each(self, entries: list[tuple[float, float, int]], classes: list[int]) -> None:
        """Error answers the workload meant to provoke; changes from a capture's verdicts."""
        workload = self.plan.workload
        order, expected, captured = workload.order, workload.expected_errors, workload.captured
        cycle = len(order)
        errors, verdicts = self.verdict_classes.errors, self.verdict_classes.verdicts
        result = self.result
        for (_, _, i), number in zip(entries, classes):
            template = order[i % cycle]
            verdict = verdicts[number]
            if number in errors and expected is not None and expected[template] == verdict[0]:
                result.expected_errors += 1
                self.expected_now += 1
            if captured is not None:
                before = captured[template]
                if before is not None:
                    result.compared += 1
                    if before != verdict:
                        imei, imsi = workload.subjects[template]
                        result.diffs[(imei, imsi, before, verdict)] += 1

    def _count_answers(self) -> None:
        """Count and record the answers since the last interval report into it."""
        counts = self.interval_counts
        result = self.result
        errors, verdicts = self.verdict_classes.errors, self.verdict_classes.verdicts
        error_answers = 0
        for number, n in Counter(self.classes).items():
            result.by_verdict[verdicts[number]] += n
            if number in errors:
                error_answers += n
        answered = len(self.classes)
        result.answered += answered
        counts[1] += answered
        counts[2] += error_answers - self.expected_now
        record_latencies(self.histogram, self.latencies)
        self.latencies, self.classes, self.expected_now = [], [], 0

    def timed_out(self, count: int) -> None:
        self.result.timeouts += count
        self.interval_counts[3] += count

    def connection_broken(self, connection: Connection, why: str) -> None:
        result = self.result
        result.connection_errors.append(f"connection {connection.number}: {why}")
        result.lost += len(connection.outstanding)
        self.interval_counts[2] += len(connection.outstanding)
        connection.outstanding.clear()
        if not connection.done_sending:
            step = self.plan.total_connections
            remaining = max(0, self.limit - connection.next_request)
            if self.limit < 1 << 62:
                result.unsent += (remaining + step - 1) // step
        connection.done_sending = True
        if not connection.finished:
            connection.finished = True
            self.connection_finished(connection)

    def connection_finished(self, connection: Connection) -> None:
        if all(c.finished for c in self.connections) and not self.all_finished.done():
            self.all_finished.set_result(None)

    # -- the run --------------------------------------------------------------------------------

    async def run(self, wait_for_start: Callable) -> WorkerResult:
        """Connect and CER every connection, then `await wait_for_start()` (which returns the
        common start time, time.monotonic(), or None to abort), then run to the end."""
        loop = asyncio.get_running_loop()
        self.all_finished = loop.create_future()
        if self.plan.pcap_part is not None:
            from eir.replay.pcap import PcapWriter
            self.pcap = PcapWriter(self.plan.pcap_part)
        try:
            await self._connect_all()
            start = await wait_for_start()
            if start is None:
                return self.result
            self.start = start
            self.result.first_send = start
            if start > loop.time():
                await asyncio.sleep(start - loop.time())
            try:
                loop.add_signal_handler(signal.SIGINT, self.stop)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here: Ctrl-C then ends abruptly
            for connection in self.connections:
                connection.sending = True
                connection.pump()
            ticker = asyncio.ensure_future(self._tick())
            try:
                await self.all_finished
            finally:
                ticker.cancel()
            self._flush_intervals(final=True)
            await self._disconnect_all()
        finally:
            for connection in self.connections:
                if connection.transport is not None:
                    connection.transport.close()
            if self.pcap is not None:
                for connection in self.connections:
                    if connection.flow is not None:
                        connection.flow.close()
                self.pcap.close()
        return self.result

    def stop(self) -> None:
        """Ctrl-C: send nothing more; the outstanding answers are still awaited."""
        self.stopping = True
        for connection in self.connections:
            connection.stop_sending()

    async def _connect_all(self) -> None:
        loop = asyncio.get_running_loop()
        plan = self.plan
        for number in plan.connections:
            where = f"{plan.host}:{plan.port}"
            try:
                _, connection = await asyncio.wait_for(loop.create_connection(
                    lambda n=number: Connection(self, n), plan.host, plan.port),
                    CONNECT_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise ReplayError(f"cannot connect to {where}: no answer within "
                                  f"{CONNECT_TIMEOUT_S:g} s") from None
            except OSError as exc:
                # asyncio's message ("Connect call failed ...") hides the reason; errno has it.
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ReplayError(f"cannot connect to {where}: {why}") from None
            self.connections.append(connection)
            if self.pcap is not None:
                transport = connection.transport
                connection.flow = self.pcap.flow(transport.get_extra_info("sockname"),
                                                 transport.get_extra_info("peername"))
            local_ip = connection.transport.get_extra_info("sockname")[0]
            connection.write(encode_cer(plan.identity, local_ip, CER_HOP_BY_HOP))
            try:
                cea = await asyncio.wait_for(connection.cea, CONNECT_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise ReplayError(f"{where}: no CEA within {CONNECT_TIMEOUT_S:g} s: is it a "
                                  "Diameter server?") from None
            if isinstance(cea, str):
                raise ReplayError(f"{where}: {cea} before answering CER")
            code = verdict_of(cea)[0]
            if code != 2001:
                raise ReplayError(f"{where}: CER refused with Result-Code {code}")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self.start + (self.interval_index + 1) * INTERVAL_S
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            for connection in self.connections:
                connection.expire(now)
            if self.stop_requested() and not self.stopping:
                self.stop()
            self._flush_intervals(final=False)

    def _flush_intervals(self, final: bool) -> None:
        """Report every interval that has ended (all of them at the end of the run)."""
        now = asyncio.get_running_loop().time()
        ended = int((now - self.start) / INTERVAL_S)  # intervals before this one have ended
        last = ended if final else ended - 1
        while self.interval_index <= last:
            self._count_answers()
            counts = self.interval_counts
            self.sink(IntervalReport(self.plan.worker, self.interval_index, *counts,
                                     self.histogram.encode()))
            clear_histogram(self.histogram)
            self.interval_counts = [0, 0, 0, 0]
            self.interval_index += 1

    async def _disconnect_all(self) -> None:
        open_connections = [c for c in self.connections if not c.closed.done()]
        for connection in open_connections:
            connection.write(encode_dpr(self.plan.identity, DPR_HOP_BY_HOP))
        if open_connections:
            await asyncio.wait([c.dpa for c in open_connections], timeout=DPA_TIMEOUT_S)


def run_worker(plan: Plan, sink: Callable, wait_for_start: Callable,
               stop_requested: Callable[[], bool] = None) -> WorkerResult:
    worker = Worker(plan, sink, stop_requested)
    return asyncio.run(worker.run(wait_for_start))
