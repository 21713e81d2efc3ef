"""The asyncio shell: listeners, sockets, timers and signals around the sans-IO core."""

from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import date, timedelta

from eir import __version__
from eir.check.observations import (
    GrandfatherIndex,
    ObservationError,
    ObservationLog,
    database_location,
    observation_log,
)
from eir.check.service import EquipmentCheck
from eir.core.config import ConfigError, ListSettings, Settings, parse_host_port
from eir.core.decision import RuleSet
from eir.core.logs import AuditLog, audit_log
from eir.diameter.dictionary import DEFAULT_DICTIONARY_DIR, Dictionary
from eir.diameter.duplicates import DuplicateCache
from eir.diameter.identities import PeerIdentities
from eir.diameter.overload import Admission, ConnectionLimits
from eir.diameter.peer import LocalIdentity, PeerConnection, Timers
from eir.interfaces.metrics import DiameterCounters, QueuedLatency, snapshot_of
from eir.interfaces.s13 import S13Application
from eir.lists.native import ListError, load_rule_set
from eir.lists.store import Store, StoreError
from eir.lists.sync import SyncCounters, SyncError, sync_configured
from eir.net.flow import ReadGate
from eir.net.security import (
    AllowedPeer,
    PeerAllowlist,
    TlsAcceptor,
    certificate_names,
    format_address,
    server_tls_context,
)
from eir.serve.workers import (
    SBI_TRANSPORTS,
    Channel,
    ForwardedLimits,
    ForwardingBackend,
    Supervisor,
    WorkerLogPrefix,
    limits_kind,
    worker_channel,
)

log = logging.getLogger("eir.server")

# While the grandfathering cut-off is in the future (or just past), the index is rebuilt
# from the observations database this often (it also learns from every flush at once).
GRANDFATHER_RELOAD_SECONDS = 3600.0
# The supervisor (several workers): connections accepted per turn of its loop, and the
# listen backlog that holds the rest meanwhile.
ACCEPTS_PER_TURN = 64
# A worker hands its observations to the supervisor at least this often (the supervisor
# writes them at its own flush interval).
WORKER_FLUSH_SECONDS = 0.25
LISTEN_BACKLOG = 1024


def sctp_unavailable_reason() -> str | None:
    """None when this kernel can open an SCTP socket, else why not."""
    protocol = getattr(socket, "IPPROTO_SCTP", 132)
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, protocol)
    except OSError as exc:
        return f"this kernel has no SCTP: socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {exc}"
    probe.close()
    return None


def firmware_revision(version: str = __version__) -> int:
    """0.1.0 → 100: Firmware-Revision is an Unsigned32."""
    parts = (version.split(".") + ["0", "0"])[:3]
    try:
        major, minor, patch = (int(part) for part in parts)
    except ValueError:
        return 0
    return major * 10000 + minor * 100 + patch


class DiameterProtocol(ReadGate, asyncio.BufferedProtocol):
    """One transport connection: feeds the peer state machine and writes what it returns.

    Reads go into the server's one read buffer (`get_buffer`/`buffer_updated`), so that a
    read is at most `diameter.overload.read_bytes` (64 KiB, ~450 ECRs of 140 bytes): a
    flooding peer's read, framed and queued or refused before the next connection's turn,
    then costs ~0.2 ms (the costs of a read are measured in eir.diameter.overload).
    One buffer serves every connection because each read is copied out of it before the
    next one starts (the transports call get_buffer, fill it, and call buffer_updated in
    one go)."""

    def __init__(self, server: "EirServer", admitted: str | None = None):
        self.server = server
        self.loop = server.loop
        self.peer: PeerConnection | None = None
        self.transport: asyncio.Transport | None = None
        self.remote = "?"
        # Lines about this connection name its address (eir.core.logs rate-limits them by it).
        self.log_extra = {"peer": "?"}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        # The source address counted against the connection limits (a TLS connection is
        # counted before its handshake, by eir.net.security.TlsAcceptor); None: not counted yet.
        self._admitted = admitted
        self._resume_handle: asyncio.Handle | None = None
        self.counters = server.counters
        self.latency = QueuedLatency(server.counters)
        self.connected_at = 0.0  # loop time; for GET /v1/peers
        self.claimed_host: str | None = None  # in server.peer_identities (or the supervisor's)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        local = transport.get_extra_info("sockname")
        remote = transport.get_extra_info("peername")
        self.remote = format_address(remote)
        local_ip = _plain_ip(local[0]) if local else None
        server = self.server
        remote_ip = remote[0] if remote else ""
        self.log_extra = {"peer": remote_ip}
        if self._admitted is None:
            refusal = server.connection_limits.admit(remote_ip)
            if refusal is not None:
                log.warning("%s: connection refused: %s", self.remote, refusal,
                            extra=self.log_extra)
                transport.abort()
                return
            self._admitted = remote_ip
        tls = server.settings.diameter.tls
        names = None
        if tls is not None and tls.verify_origin_host:  # None on plain TCP: no certificate
            names = certificate_names(transport.get_extra_info("peercert"))
        self.connected_at = self.loop.time()
        self.peer = PeerConnection(
            server.dictionary, server.local, server.applications, self.loop.time(),
            local_addresses=(local_ip,) if local_ip else (), timers=server.timers,
            max_message_bytes=server.settings.diameter.max_message_bytes,
            max_avps_per_message=server.settings.diameter.max_avps_per_message,
            counters=server.counters, remote_address=remote_ip, allowlist=server.allowlist,
            certificate_names=names, duplicates=server.duplicates,
            admission=server.admission, claims_identity=True)
        server.connections.add(self)
        log.info("connection from %s", self.remote, extra=self.log_extra)
        self._schedule()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.read_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        """Bytes read from the peer (from buffer_updated, or early TLS data)."""
        peer = self.peer
        counters = self.counters
        received, backlog, refused = counters.received, peer.backlog, peer.refused_busy
        now = self.loop.time()
        out = peer.receive(data, now)
        if out:
            self.transport.write(out)
        # eir_request_duration_seconds: from reading a request to writing its answer.
        if backlog or peer.backlog:  # requests wait in the peer's queue (eir.diameter.overload)
            self.latency.read(now, self.loop.time(), counters.received - received,
                              peer.refused_busy - refused, peer.backlog - backlog,
                              peer.backlog)
        else:
            counters.observe(self.loop.time() - now, counters.received - received)
        if peer.events or peer.closed:
            self._after()
        deadline = peer.next_deadline()
        if deadline is not None and deadline < self._timer_when:
            self._schedule()
        if peer.backlog and self._resume_handle is None:
            self._resume_handle = self.loop.call_soon(self._resume)
        if peer.reading is not self._reading:
            self._set_reading()

    def _resume(self) -> None:
        """The next turn of this connection's queued requests (eir.diameter.overload):
        call_soon runs it after the reads and resumptions of the other connections that are
        ready now."""
        self._resume_handle = None
        peer = self.peer
        received = self.counters.received
        out = peer.resume(self.loop.time())
        if out:
            self.transport.write(out)
        self.latency.served(self.loop.time(), self.counters.received - received, peer.backlog)
        if peer.events or peer.closed:
            self._after()
        if peer.backlog:
            self._resume_handle = self.loop.call_soon(self._resume)
        if peer.reading is not self._reading:
            self._set_reading()

    def _may_read(self) -> bool:
        """Unless the peer's queue is full (eir.diameter.overload)."""
        return self.peer.reading

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.connection_lost(f"connection lost ({exc})" if exc else
                                      "peer closed the connection")
            self._log_events()
        if self._timer is not None:
            self._timer.cancel()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        if self._admitted is not None:
            self.server.connection_limits.release(self._admitted)
            self._admitted = None
        self._release_claim()
        self.server.connections.discard(self)
        self.server.connection_closed.set()

    def disconnect(self) -> None:
        """Orderly close at shutdown: DPR if open, then close on DPA or timeout."""
        out = self.peer.disconnect(self.loop.time())
        if out:
            self.transport.write(out)
        self._after()
        self._schedule()

    def _on_timer(self) -> None:
        self._timer = None
        out = self.peer.on_timer(self.loop.time())
        if out:
            self.transport.write(out)
        self._after()
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.peer.next_deadline()
        if deadline is not None and not self.peer.closed:
            self._timer_when = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)
        else:
            self._timer_when = float("inf")

    def _after(self) -> None:
        self._log_events()
        if self.peer.claiming is not None:
            self._claim(self.peer.claiming)
        if self.peer.closed and not self.transport.is_closing():
            self.transport.close()  # flushes what was written first

    # -- the peer's identity: one connection per Origin-Host (eir.diameter.identities) -----

    def _claim(self, host: str) -> None:
        self.peer.claiming = None  # asked
        channel = self.server.worker_channel
        if channel is None:
            self._claimed(host, *self.server.peer_identities.claim(host))
        else:
            self.server.spawn(self._claim_from_supervisor(channel, host))

    async def _claim_from_supervisor(self, channel: Channel, host: str) -> None:
        try:
            granted, why = await channel.request("claim", host=host)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            granted, why = False, f"the supervisor did not answer ({type(exc).__name__})"
        self._claimed(host, granted, why)

    def _claimed(self, host: str, granted: bool, why: str | None) -> None:
        if granted:
            self.claimed_host = host
            if why:
                log.warning("%s: %s", self.remote, why)
        peer = self.peer
        if peer.closed:  # lost while the claim was asked for
            self._release_claim()
            return
        out = peer.claim_decided(None if granted else why, self.loop.time())
        if out:
            self.transport.write(out)
        self._after()
        self._schedule()
        if peer.reading is not self._reading:
            self._set_reading()

    def _release_claim(self) -> None:
        host, self.claimed_host = self.claimed_host, None
        if host is None:
            return
        channel = self.server.worker_channel
        if channel is None:
            self.server.peer_identities.release(host)
        else:
            channel.send({"op": "release", "host": host})

    def _log_events(self) -> None:
        for level, message in self.peer.events:
            log.log(level, "%s: %s", self.remote, message, extra=self.log_extra)
        self.peer.events.clear()


class EirServer:
    def __init__(self, settings: Settings, rule_set: RuleSet, dictionary: Dictionary,
                 observations: ObservationLog | None = None,
                 grandfathering: GrandfatherIndex | None = None,
                 audit: AuditLog | None = None):
        self.settings = settings
        self.observations = observations
        self.grandfathering = grandfathering
        self.dictionary = dictionary
        # Metrics (eir.interfaces.metrics): plain counters the hot path bumps, read at scrape time.
        self.counters = DiameterCounters.for_dictionary(dictionary)
        self.reload_counts = {"ok": 0, "refused": 0}
        self.last_reload_error: str | None = None
        self.audit = audit  # None, or eir.core.logs.AuditLog: verdicts written by a thread
        diameter = settings.diameter
        self.local = LocalIdentity(
            origin_host=diameter.origin_host, origin_realm=diameter.origin_realm,
            product_name=diameter.product_name, vendor_id=diameter.vendor_id,
            firmware_revision=firmware_revision(), origin_state_id=int(time.time()),
            host_ip_addresses=tuple(diameter.host_ip_addresses))
        self.timers = Timers(watchdog=diameter.watchdog_seconds,
                             cer_timeout=diameter.cer_timeout_seconds,
                             disconnect_timeout=diameter.disconnect_timeout_seconds,
                             idle_timeout=diameter.overload.idle_timeout_seconds or None)
        # Peer security and overload control (eir.net.security, eir.diameter.overload): data
        # the peer state machines consult; the TLS context is built here so that unusable TLS
        # material stops the start-up before any listener opens.
        self.allowlist = PeerAllowlist(
            AllowedPeer(peer.host, peer.realm,
                        tuple(ipaddress.ip_network(a) for a in peer.addresses))
            for peer in diameter.peers)
        self.tls_context = None if diameter.tls is None else server_tls_context(
            diameter.tls.certificate, diameter.tls.key, diameter.tls.ca,
            diameter.tls.require_client_cert)
        # Origin-Hosts with an open connection (a worker asks its supervisor's instead).
        self.peer_identities = PeerIdentities(diameter.duplicate_peers)
        duplicates = diameter.duplicates
        self.duplicates = DuplicateCache(duplicates.window_seconds, duplicates.max_entries,
                                         duplicates.max_bytes) \
            if min(duplicates.window_seconds, duplicates.max_entries, duplicates.max_bytes) > 0 \
            else None
        overload = diameter.overload
        self.admission = Admission(
            requests_per_turn=overload.requests_per_turn,
            max_queued_per_connection=overload.max_queued_per_connection,
            max_queued_total=overload.max_queued_total,
            bytes_per_turn=overload.bytes_per_turn,
            max_queued_bytes_per_connection=overload.max_queued_bytes_per_connection,
            max_queued_bytes_total=overload.max_queued_bytes_total)
        self.connection_limits = ConnectionLimits(overload.max_connections,
                                                  overload.max_connections_per_address)
        self.read_buffer = memoryview(bytearray(overload.read_bytes))
        # The check both interfaces run (decide, observe, count, audit): one rule set in force.
        self.check = EquipmentCheck(rule_set, observations)
        self.s13 = S13Application(dictionary, self.local, self.check, counters=self.counters,
                                  audit=audit, fast_path=settings.diameter.fast_path)
        # Several workers (eir.serve.workers): the supervisor has `supervisor` and no Diameter
        # connections of its own; a worker has `worker_channel` and no listeners.
        self.supervisor = None
        self.worker_socket: socket.socket | None = None  # a worker's end of its channel
        self.worker_channel = None
        self._listening: list[tuple[socket.socket, str]] = []  # the supervisor's (+ N5g-eir's)
        self._staged_rule_set: RuleSet | None = None  # a worker's, between prepare and commit
        self._staged_lists: ListSettings | None = None  # and the list settings it came with
        self.applications = {self.s13.application_id: self.s13}
        self.connections: set[DiameterProtocol] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.addresses: list[tuple[str, int]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connection_closed = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        # Reads the configuration again (the file and the command line), for SIGHUP; None:
        # SIGHUP reloads the lists only (eir.cli sets it).
        self.settings_source: Callable[[], Settings] | None = None
        self.sync_counters = SyncCounters()
        self._background: set[asyncio.Task] = set()
        # /metrics and the admin API (eir.interfaces.api), when configured; built here so that a
        # missing API token stops the start-up, before any listener opens.
        self.operations = None
        if settings.metrics.listen or settings.api.listen:
            from eir.interfaces.api import Operations

            self.operations = Operations(self)
        # N5g-eir over HTTP/2 (eir.interfaces.sbi), when configured; built here for the same
        # reason.
        self.sbi = None
        if settings.sbi.listen or settings.sbi.tls is not None:
            from eir.interfaces.sbi import N5gEir

            self.sbi = N5gEir(self)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def rule_set(self) -> RuleSet:
        return self.check.rule_set

    def peer_infos(self) -> list[dict]:
        """The Diameter connections of this process, for GET /v1/peers."""
        now = self.loop.time()
        found = []
        for connection in list(self.connections):
            peer = connection.peer
            if peer is None:
                continue
            found.append({"remote": connection.remote, "state": peer.state.value,
                          "origin_host": peer.peer_host, "origin_realm": peer.peer_realm,
                          "connected_seconds": round(now - connection.connected_at, 3),
                          "answered": dict(peer.answered)})
        return found

    @property
    def listening(self) -> bool:
        """A Diameter listener is accepting (in a worker: the supervisor's channel is up)."""
        if self.worker_channel is not None:
            return not self.worker_channel.closed
        if self.supervisor is not None:
            return bool(self._listening) and self.supervisor.all_ready
        return any(listener.is_serving() for listener in self.listeners)

    def _wanted_listeners(self) -> list[tuple[str, str]]:
        wanted = [(item, self.settings.diameter.transport)
                  for item in self.settings.diameter.listen]
        if self.tls_context is not None:  # TLS on connect: always over TCP
            wanted += [(item, "tls") for item in self.settings.diameter.tls.listen]
        return wanted

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.worker_socket is not None:
            # Connections come from the supervisor (_on_control), counted there.
            self.worker_channel = Channel(self.loop, self.worker_socket, self._on_control,
                                          self._control_lost)
            self.connection_limits = ForwardedLimits(self.worker_channel)
            if self.sbi is not None:
                self.sbi.serve_handed_over(ForwardedLimits(self.worker_channel, "sbi"))
            return
        if self.supervisor is not None:
            await self._start_supervised()
            return
        transport = self.settings.diameter.transport
        wanted = self._wanted_listeners()
        for item, transport in wanted:
            host, port = parse_host_port(item)
            try:
                if transport == "tls":
                    listener = await self.loop.create_server(
                        self._tls_acceptor, host, port, reuse_address=True)
                elif transport == "sctp":
                    listener = await self.loop.create_server(
                        lambda: DiameterProtocol(self), sock=_sctp_socket(host, port))
                else:
                    listener = await self.loop.create_server(
                        lambda: DiameterProtocol(self), host, port, reuse_address=True)
            except OSError as exc:
                # The default listens on both wildcards; a host (or container) without IPv6
                # should still serve IPv4 rather than refuse to start.
                if host == "::" and len(wanted) > 1:
                    log.warning("not listening on %s: %s", item, exc)
                    continue
                raise OSError(f"{item}: {exc.strerror or exc}") from None
            self.listeners.append(listener)
            for sock in listener.sockets:
                bound = sock.getsockname()
                self.addresses.append((bound[0], bound[1]))
                log.info("listening on %s %s", transport, format_address(bound))
        if not self.listeners:
            raise OSError("no listen address could be bound")

    # -- several workers: the supervisor (eir.serve.workers) ----------------------------------

    async def _start_supervised(self) -> None:
        """Bind the listeners, start the workers, and accept once they are all ready."""
        wanted = self._wanted_listeners()
        for item, transport in wanted:
            host, port = parse_host_port(item)
            try:
                sockets = _listening_sockets(host, port, transport)
            except OSError as exc:
                if host == "::" and len(wanted) > 1:  # as in start(): IPv4 still serves
                    log.warning("not listening on %s: %s", item, exc)
                    continue
                for sock, _ in self._listening:
                    sock.close()
                raise OSError(f"{item}: {exc.strerror or exc}") from None
            self._listening += [(sock, transport) for sock in sockets]
        if not self._listening:
            raise OSError("no listen address could be bound")
        # N5g-eir's listeners too: their connections are handed over as S13's are (the
        # URLs are logged, and the NRF told, by self.sbi.start).
        for item, tls in self.sbi.wanted() if self.sbi is not None else ():
            host, port = parse_host_port(item)
            try:
                sockets = _listening_sockets(host, port, "tcp")
            except OSError as exc:
                for sock, _ in self._listening:
                    sock.close()
                raise OSError(f"sbi {item}: {exc.strerror or exc}") from None
            self._listening += [(sock, "sbi-tls" if tls else "sbi") for sock in sockets]
        await self.supervisor.start()
        for sock, transport in self._listening:
            self.loop.add_reader(sock.fileno(), self._accept, sock, transport)
            if transport not in SBI_TRANSPORTS:
                bound = sock.getsockname()
                self.addresses.append((bound[0], bound[1]))
                log.info("listening on %s %s", transport, format_address(bound))

    def _accept(self, listener: socket.socket, transport: str) -> None:
        """Accept what is waiting (a bounded number per turn) and hand it to a worker."""
        sbi = limits_kind(transport) == "sbi"
        limits = self.sbi.limits if sbi else self.connection_limits
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the next turn tries again
                log.warning("accepting a connection: %s", exc)
                return
            refusal = limits.admit(address[0])
            if refusal is not None:
                log.warning("%s: %sconnection refused: %s", format_address(address),
                            "N5g-eir " if sbi else "", refusal, extra={"peer": address[0]})
                sock.close()
                continue
            self.supervisor.hand_over(sock, address[0], transport)

    # -- several workers: a worker ---------------------------------------------------

    def _on_control(self, message: dict, fds: list[int]) -> None:
        """A message from the supervisor (eir.serve.workers)."""
        op = message["op"]
        channel = self.worker_channel
        if op == "connection":
            sock = socket.socket(fileno=fds[0])
            self.spawn(self._adopt(sock, message["address"], message["transport"]))
        elif op == "snapshot":
            channel.reply(message, snapshot_of(self).as_dict())
        elif op == "peers":
            channel.reply(message, self.peer_infos())
        elif op == "prepare":
            self.spawn(self._prepare_lists(message))
        elif op == "commit":
            if self._staged_rule_set is not None:
                self._swap(self._staged_rule_set, self._staged_lists)
                self._staged_rule_set = None
        elif op == "abort":
            self._staged_rule_set = None
        elif op == "learn":
            if self.grandfathering is not None:
                self.grandfathering.learn(message["rows"])
        elif op == "stop":
            self.stop()

    async def _adopt(self, sock: socket.socket, address: str, transport: str) -> None:
        """Serve a connection the supervisor accepted (and counted against the limits)."""
        limits = self.connection_limits
        if transport in SBI_TRANSPORTS:
            factory = self.sbi.adopt(address, SBI_TRANSPORTS[transport])
            limits = self.sbi.limits
        elif transport == "tls":
            factory = self._tls_acceptor
        else:
            factory = functools.partial(DiameterProtocol, self, address)
        try:
            await self.loop.connect_accepted_socket(factory, sock)
        except OSError as exc:
            log.info("a connection handed over was lost before it started: %s", exc)
            sock.close()
            limits.release(address)

    async def _prepare_lists(self, message: dict) -> None:
        lists = message.get("lists")
        rule_set = await self._load_lists(lists)
        if isinstance(rule_set, RuleSet):
            self._staged_rule_set, self._staged_lists = rule_set, lists
            self.worker_channel.reply(message, {"version": rule_set.version, "error": None})
        else:
            self.worker_channel.reply(message, {"version": None, "error": rule_set})

    def _control_lost(self) -> None:
        if not self.stopping:
            log.error("the supervisor is gone: stopping")
            self.stop()

    def _tls_acceptor(self) -> TlsAcceptor:
        limits = self.connection_limits
        return TlsAcceptor(self.tls_context, self.timers.cer_timeout, limits.admit,
                           limits.release, lambda address: DiameterProtocol(self, address),
                           self.spawn)

    async def reload_lists(self, lists: ListSettings | None = None) -> bool:
        """Load the lists (list files, or the store's snapshot in force) and swap them in;
        keep the old ones on error. `lists`: new list settings (files, unknown policy) to
        load with, in force from the swap on (SIGHUP after a configuration edit).

        Loading runs in a thread so the event loop keeps answering meanwhile (a large list
        takes seconds to parse); the swap itself is one reference assignment, so a request
        sees the old snapshot or the new one, never a mix. Reloads run one at a time.
        """
        async with self._reload_lock:
            rule_set = await self._load_lists(lists)
            if not isinstance(rule_set, RuleSet):
                self._reload_refused(rule_set)
                return False
            if self.supervisor is not None:
                # Every worker loads the same lists first; all swap, or none does.
                swapped, why = await self.supervisor.swap_lists(lists)
                if not swapped:
                    log.error("list reload refused, lists in force stay in force: %s", why)
                    self._reload_refused(why)
                    return False
            self._swap(rule_set, lists)
            self.reload_counts["ok"] += 1
            self.last_reload_error = None
            return True

    async def reload_configuration(self) -> bool:
        """SIGHUP: read the configuration again, apply what can change while serving (the
        `lists` section: list files and the unknown policy), name every other changed
        setting as waiting for a restart, and reload the lists. A configuration that does
        not load is refused whole (logged), and the lists are reloaded as they were."""
        if self.settings_source is None:
            return await self.reload_lists()
        try:
            fresh = await self.loop.run_in_executor(None, self.settings_source)
        except ConfigError as exc:
            log.error("SIGHUP: configuration refused, the settings in force stay in force:"
                      "\n%s", exc)
            return await self.reload_lists()
        changed = changed_settings(self.settings, fresh)
        live = [key for key in changed if key.startswith(LIVE_SECTIONS)]
        later = [key for key in changed if not key.startswith(LIVE_SECTIONS)]
        if later:
            log.warning("SIGHUP: configuration changed, not applied until a restart: %s",
                        ", ".join(later))
        if not live:
            log.info("SIGHUP: no list setting changed; reloading the lists")
            return await self.reload_lists()
        applied = await self.reload_lists(fresh.lists)
        if applied:
            log.info("SIGHUP: configuration applied: %s", ", ".join(live))
        else:
            log.error("SIGHUP: configuration not applied (the lists it names were refused): "
                      "%s", ", ".join(live))
        return applied

    async def _load_lists(self, lists: ListSettings | None = None) -> RuleSet | str:
        """The lists the settings name (with `lists` instead of theirs, if given), loaded
        in a thread; or why not (logged)."""
        settings = self.settings if lists is None else \
            self.settings.model_copy(update={"lists": lists})
        try:
            return await self.loop.run_in_executor(
                None, functools.partial(load_rules, settings, self.grandfathering,
                                        first_sync=self.worker_socket is None))
        except (ListError, StoreError) as exc:
            log.error("list reload refused, lists in force stay in force:\n%s", exc)
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a defect must not end the watcher
            log.exception("list reload failed, lists in force stay in force")
            return f"{type(exc).__name__}: {exc}"

    def _swap(self, rule_set: RuleSet, lists: ListSettings | None = None) -> None:
        self.check.rule_set = rule_set
        if lists is not None:
            self.settings = self.settings.model_copy(update={"lists": lists})
        _freeze_long_lived_objects()
        log.info("lists reloaded: version %s, %d rules", rule_set.version,
                 rule_set.rule_count)
        self._warn_if_empty()

    def _warn_if_empty(self) -> None:
        # Serving no rule is legal (an empty list file, an empty registry list) but rarely
        # meant: every IMEI then gets the unknown policy.
        if self.rule_set.rule_count == 0:
            log.warning("the lists in force hold 0 rules: every IMEI gets the unknown "
                        "policy (%s)", self.rule_set.unknown_policy.value)

    def _reload_refused(self, why: str) -> None:
        self.reload_counts["refused"] += 1
        self.last_reload_error = why

    async def _watch_store(self) -> None:
        """Follow the store's snapshot in force (a sync or a rollback changes it)."""
        store = Store(self.settings.store.directory, self.settings.store.keep)
        while True:
            await asyncio.sleep(self.settings.store.poll_seconds)
            try:
                version = store.current_version()
            except StoreError as exc:
                log.error("store: %s", exc)
                continue
            if version is not None and version != self.rule_set.version:
                await self.reload_lists()

    async def _sync_periodically(self) -> None:
        while True:
            await self.sync_now()
            await asyncio.sleep(self.settings.sync.interval_seconds)

    async def sync_now(self) -> str:
        """Sync once from sync.source (in a daemon thread), counted and logged, and reload
        when the version in force changed; what happened, in a sentence. Never raises: the
        snapshot in force keeps serving whatever the source holds."""
        store = Store(self.settings.store.directory, self.settings.store.keep)
        source = self.settings.sync.source
        try:
            result = await _in_daemon_thread(self.loop, sync_configured,
                                             self.settings.sync, store)
        except (SyncError, StoreError) as exc:
            self.sync_counters.record(None, exc)
            log.error("sync from %s refused; the snapshot in force keeps serving:\n%s",
                      source, exc)
            return f"refused; the snapshot in force keeps serving: {exc}"
        except Exception as exc:  # noqa: BLE001 - the next interval must still sync
            self.sync_counters.record(None, exc)
            log.exception("sync from %s failed; the snapshot in force keeps serving",
                          source)
            return f"failed ({type(exc).__name__}); the snapshot in force keeps serving"
        self.sync_counters.record(result)
        outcome = (f"published version {result.version}" if result.published
                   else f"up to date (version {result.version})")
        log.info("sync from %s: %s", source, outcome)
        for note in result.ignored:
            log.info("sync: ignored %s", note)
        for warning in result.warnings:
            log.warning("sync: %s", warning)
        if result.version != self.rule_set.version:
            await self.reload_lists()
        return outcome

    async def _keep_grandfathering(self) -> None:
        """Build the grandfathering index from the observations database (in a thread: at
        national scale it takes seconds), and rebuild it now and then while pairs can still
        qualify: until a day after the cut-off (a flush just after midnight may still carry
        the last day before it). Between builds it learns from every flush."""
        index = self.grandfathering
        path = database_location(self.settings)
        cutoff = self.settings.grandfathering.cutoff_date
        while True:
            try:
                count = await self.loop.run_in_executor(None, index.load, path)
            except ObservationError as exc:
                log.info("grandfathering: nothing observed yet: %s", exc)
            except Exception:  # noqa: BLE001 - retried at the next interval
                log.exception("grandfathering: building the index failed")
            else:
                log.info("grandfathering: %d IMEI+IMSI pair(s) seen before the cut-off %s "
                         "(%s)", count, index.cutoff_text, index.loaded_from)
            if date.today() > cutoff + timedelta(days=1):
                return  # no new pair can qualify any more
            await asyncio.sleep(GRANDFATHER_RELOAD_SECONDS)

    def stop(self) -> None:
        self._stop.set()

    def _stop_on_signal(self, signum: int) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        self.stop()

    def _reload_on_signal(self) -> None:
        log.info("SIGHUP received: reloading the configuration and the lists")
        self.spawn(self.reload_configuration())

    def spawn(self, coroutine) -> None:
        """Run `coroutine` as a task of this server (kept until done; stop cancels it)."""
        task = self.loop.create_task(coroutine)
        self._background.add(task)  # keep a reference until done (asyncio holds weak ones)
        task.add_done_callback(self._background.discard)

    async def serve_forever(self) -> None:
        # Signal handlers first: whoever sees "listening on" may signal us at once.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_on_signal, signum)
        if self.worker_socket is None:
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        else:  # the supervisor's SIGHUP reloads every worker together
            loop.add_signal_handler(signal.SIGHUP, lambda: None)
        await self.start()
        if self.observations is not None:
            self.observations.start()
            log.info("observations: recording to %s, flushed every %g s",
                     self.observations.path, self.observations.flush_seconds)
        if self.audit is not None:
            self.audit.start()
            log.info("audit: %g of verdicts to %s", self.audit.sample, self.audit.path)
        if self.operations is not None:
            await self.operations.start()
        if self.sbi is not None and self.worker_socket is None:  # workers: connections only
            await self.sbi.start([(sock, SBI_TRANSPORTS[transport])
                                  for sock, transport in self._listening
                                  if transport in SBI_TRANSPORTS]
                                 if self.supervisor is not None else None)
        if self.grandfathering is not None:
            self.spawn(self._keep_grandfathering())
        if self.settings.store.directory is not None and self.worker_socket is None:
            self.spawn(self._watch_store())
            if self.settings.sync.source:
                self.spawn(self._sync_periodically())
        _freeze_long_lived_objects()
        if self.worker_socket is not None:
            self.worker_channel.send({"op": "ready", "version": self.rule_set.version})
            await self._stop.wait()
            await self.shutdown()
            return
        log.info("open EIR %s serving as %s (realm %s), lists version %s, %d rules",
                 __version__, self.local.origin_host, self.local.origin_realm,
                 self.rule_set.version, self.rule_set.rule_count)
        self._warn_if_empty()
        if not self.allowlist:
            log.warning("no peer allowlist (diameter.peers is empty): any peer that "
                        "completes a CER is served")
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop listening, send DPR to every open peer, wait for DPA (bounded), exit."""
        if self.supervisor is not None:
            # The supervisor holds no Diameter connection: it hands each to a worker, and
            # counts it out when the worker reports its end.
            log.info("shutting down: %d connection(s) held by the workers",
                     self.connection_limits.open)
        else:
            log.info("shutting down: %d connection(s)", len(self.connections))
        if self.sbi is not None:  # NFDeregister first (bounded): AMFs stop choosing us
            await self.sbi.stop()
        for listener in self.listeners:
            listener.close()
        for sock, _ in self._listening:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        if self.supervisor is not None:  # each worker sends DPR to its own peers
            await self.supervisor.stop(self.timers.disconnect_timeout + 5)
        for task in list(self._background):
            task.cancel()
        for connection in list(self.connections):
            connection.disconnect()
        deadline = self.loop.time() + self.timers.disconnect_timeout + 1
        while self.connections and self.loop.time() < deadline:
            self.connection_closed.clear()
            try:
                await asyncio.wait_for(self.connection_closed.wait(),
                                       deadline - self.loop.time())
            except asyncio.TimeoutError:
                break
        for connection in list(self.connections):
            connection.transport.abort()
        for listener in self.listeners:
            await listener.wait_closed()
        if self.operations is not None:
            await self.operations.stop()
        if self.audit is not None:
            await self.loop.run_in_executor(None, self.audit.close)
        if self.observations is not None:
            observations = self.observations
            await self.loop.run_in_executor(None, observations.close)
            if self.worker_socket is not None:  # its records went to the supervisor
                log.debug("observations: %d handed to the supervisor", observations.written)
            else:
                    log.info("observations: final flush done: %d written, %d dropped, %d "
                         "failed flush(es), %d pending", observations.written,
                         observations.dropped, observations.flush_errors,
                         observations.pending)
        if self.worker_channel is not None:
            # Last: the supervisor takes a worker's closed channel for its exit, and reads
            # what it sent before (its final observations) then.
            self.worker_channel.close()
        log.info("stopped")


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, function, *args) -> asyncio.Future:
    """run_in_executor, but in a daemon thread: a sync stuck on a slow registry must not hold
    up SIGTERM (executor threads are joined at exit). Killing it mid-publish is safe: the
    store's writes are atomic."""
    future = loop.create_future()

    def settle(setter, value) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            outcome, setter = function(*args), future.set_result
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome, setter = exc, future.set_exception
        try:
            loop.call_soon_threadsafe(settle, setter, outcome)
        except RuntimeError:
            pass  # the loop has closed: the server is gone, nobody is waiting

    threading.Thread(target=run, name=f"eir-{function.__name__}", daemon=True).start()
    return future


def _freeze_long_lived_objects() -> None:
    """Move the snapshot's millions of objects out of the cyclic GC's reach: a full
    collection would otherwise walk them all (tens of ms per 100k rules), a latency spike."""
    gc.collect()
    gc.freeze()


def _listening_sockets(host: str, port: int, transport: str) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for one listen address (the supervisor's;
    one per address the host name resolves to, as asyncio's create_server binds)."""
    if transport == "sctp":
        return [_sctp_socket(host, port)]
    found = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            sock = socket.socket(family, kind, proto)
            found.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in found:
            sock.close()
        raise
    return found


def _sctp_socket(host: str, port: int) -> socket.socket:
    reason = sctp_unavailable_reason()
    if reason:
        raise OSError(reason)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, getattr(socket, "IPPROTO_SCTP", 132))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _plain_ip(address: str) -> str:
    """An IPv4-mapped IPv6 address as plain IPv4, for Host-IP-Address."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)




def load_rules(settings: Settings, grandfathering: GrandfatherIndex | None = None,
               first_sync: bool = True) -> RuleSet:
    """The rules the settings name: the store's snapshot in force when a store is set (with
    `first_sync`, it syncs first when the store is empty and a source is set), else the list
    files; with the grandfathering index, if any."""
    policy = settings.lists.unknown_policy
    if settings.store.directory is None:
        return load_rule_set(settings.lists.files, policy, grandfathering)
    store = Store(settings.store.directory, settings.store.keep)
    if first_sync and store.current_version() is None and settings.sync.source:
        try:
            result = sync_configured(settings.sync, store)
        except SyncError as exc:
            raise StoreError(f"first sync from {settings.sync.source} refused:\n{exc}") \
                from None
        for warning in result.warnings:
            log.warning("sync: %s", warning)
    return RuleSet(store.open_current(), policy, grandfathering)


# Settings a SIGHUP applies while serving; every other one is read at start-up only.
LIVE_SECTIONS = ("lists.",)


def changed_settings(before: Settings, after: Settings) -> list[str]:
    """The dotted names of the settings that differ (`lists.unknown_policy`, `metrics.listen`);
    a list or a mapping that changed is named as a whole."""
    changed: list[str] = []

    def walk(old, new, prefix: str) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(old.keys() | new.keys()):
                walk(old.get(key), new.get(key), f"{prefix}{key}.")
        elif old != new:
            changed.append(prefix.rstrip("."))

    walk(before.model_dump(), after.model_dump(), "")
    return changed


def grandfather_index(settings: Settings) -> GrandfatherIndex | None:
    """An empty index for grandfathering.cutoff_date (None when unset); fill it with
    `load(database_location(settings))`."""
    cutoff = settings.grandfathering.cutoff_date
    return GrandfatherIndex(cutoff) if cutoff is not None else None


def build_server(settings: Settings, workers: int = 1,
                 argv: list[str] | None = None) -> EirServer:
    """Load dictionaries and lists as the settings say (raises on any error).

    This process is one of three (eir.serve.workers): started by a supervisor, a worker (its
    channel in the environment); else, with `workers` > 1, the supervisor of that many
    workers, each started as `python -m eir ARGV`; else the only process."""
    dictionary = Dictionary.load([DEFAULT_DICTIONARY_DIR, *settings.dictionaries])
    grandfathering = grandfather_index(settings)
    channel = worker_channel()
    if channel is not None:
        index, control, forwarded = channel
        for handler in logging.getLogger().handlers:
            handler.addFilter(WorkerLogPrefix(index))
        # The supervisor serves /metrics and the API, syncs, and writes the observations.
        settings = settings.model_copy(update={
            "metrics": settings.metrics.model_copy(update={"listen": None}),
            "api": settings.api.model_copy(update={"listen": None})})
        observations = None
        if settings.observations.enabled:
            observations = ObservationLog(
                ForwardingBackend(forwarded),
                min(settings.observations.flush_seconds, WORKER_FLUSH_SECONDS))
        else:
            forwarded.close()
        server = EirServer(settings, load_rules(settings, grandfathering, first_sync=False),
                           dictionary, observations, grandfathering, audit_log(settings))
        server.worker_socket = control
        return server
    observations = observation_log(
        settings, on_written=grandfathering.learn if grandfathering is not None else None)
    if workers <= 1:
        return EirServer(settings, load_rules(settings, grandfathering), dictionary,
                         observations, grandfathering, audit_log(settings))
    # The workers answer (and audit) the requests; the supervisor keeps the lists too, for
    # the API's lookups, and checks the audit path now (a configuration error).
    audit = audit_log(settings)
    if audit is not None:
        audit.close()
    server = EirServer(settings, load_rules(settings, grandfathering), dictionary,
                       observations, grandfathering, audit=None)
    server.supervisor = Supervisor(server, workers, list(argv or []))
    if grandfathering is not None and observations is not None:
        # The workers' indexes learn the pairs the supervisor writes, as its own does.
        def learn(rows: list[tuple]) -> None:
            grandfathering.learn(rows)
            server.supervisor.share_learned(grandfathering.cutoff, rows)

        observations.on_written = learn
    return server

