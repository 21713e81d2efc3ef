"""HTTP/1.1 for the admin API and /metrics (eir.interfaces.api.HttpEndpoint): which connections are
kept, how long a request may take to arrive, and what the access log may show of a request.

uvicorn serves these endpoints with its h11 protocol; what uvicorn offers does not bound an
attacker who opens connections and sends nothing, or a request head a byte at a time:

  * `limit_concurrency` counts open connections, idle ones included, and answers 503 to
    whatever request comes once it is reached: with it at 32, 31 idle connections made
    /healthz answer 503 for as long as they stayed open, and an orchestrator then restarts
    a healthy EIR. It is not used; `HttpConnectionPool` bounds the connections instead.
  * `timeout_keep_alive` closes a connection idle between two requests, but its timer is
    armed only after a response, and any byte received cancels it: a connection that never
    sends anything, or a slowloris that sends a header byte every few seconds, stays open.
    h11 has no header-read timeout of its own (it bounds how much of an incomplete head it
    buffers, max_incomplete_event_size: the `max_incomplete_head_bytes` setting).
    `GuardedH11Protocol` arms the same idle timer (`idle_timeout_seconds`) when a connection
    opens too, and a request-read timer of its own (`request_read_timeout_seconds`) from a
    request's first byte until the request (head and body) is whole. A timer around h11
    rather than a setting of it because h11 is sans-IO: it has no clock.

The connection bounds (`HttpConnectionPool`): at most `max_connections` per endpoint and
`max_connections_per_address` from one address. What fills them is what cannot lock a probe
out: a connection is *busy* only while the app works on a whole request (from its last byte
until the response is sent); between requests, or while a request (head or body) is still
arriving, it is idle, and an idle connection is the one given up to make room. A new
connection closes the longest-idle one of its own address when its address is full, or of
any address when the endpoint is full, and is refused only when every connection in its way
is busy: only the handlers' own time can fill the endpoint. (Counting a request whose body
is still arriving as busy would let 16 unauthenticated POSTs that never finish their body
lock the probes out of a loopback port for the request-read timeout, again and again:
FastAPI reads a body before it checks the token.) nginx does the same when it runs
out of connections (it closes idle keep-alive connections: "worker_connections are not
enough, reusing connections"). So /healthz, /readyz and /metrics answer whatever number of
idle or slow connections hold the port; the one race left is a probe that connects in the
same accept batch as more than `max_connections` other new connections (it may be closed
before its request is read; probes retry).

Request bodies (`bounded_body`): at most `max_body_bytes`, declared in a Content-Length,
checked before the app runs (FastAPI reads a whole body into memory before it checks the
token).

Access logs (`loggable_target`): the request target is shown with percent-encoding undone
(up to MAX_DECODING_ROUNDS times, so that double encoding is undone too), so that the
log formatter's IMSI masking (eir.core.logs) sees an IMSI however it was written. Query values
are not shown, except an `imsi` made of digits (which the formatter then masks unless
logging.show_imsi): a token, whatever its parameter name or encoding, never reaches the log.
In the path, `token=...`, `access_token=...`, `Bearer ...` and the API's own token are
replaced by `***`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Hashable, Iterable
from urllib.parse import parse_qsl, unquote

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from eir.core.untrusted import untrusted
from eir.net.security import format_address

log = logging.getLogger("eir.api")

MAX_DECODING_ROUNDS = 4
MAX_SHOWN_PARAMETERS = 16  # of a query, in an access log line
MASK = "***"
# A query parameter name shown as it is; any other is shown as "?".
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,32}")
# A secret named in a path: token=..., access_token: ..., Authorization=..., Bearer ...
_SECRET_IN_PATH = re.compile(
    r"(?i)(\b(?:access[_-]?token|token|api[_-]?key|password|secret|authorization|bearer)"
    r"(?:\W{1,5}bearer)?\W{1,5})([^\s/;&?#]+)")
# While a request is being read, the client's side (h11's `their_state`) is one of these;
# once it is whole, one of the next.
_READING = (h11.IDLE, h11.SEND_BODY)
_WHOLE = (h11.DONE, h11.MUST_CLOSE)


# -- which connections are kept (sans-IO) ----------------------------------------------------

class HttpConnectionPool:
    """The connections of one endpoint: who may come in, who is closed to make room.

    A connection is busy from the moment its request is whole (head and body) until its
    response is sent; idle otherwise (see the module docstring). Idle connections are kept
    in the order they became idle, so that the one closed to make room is the longest idle."""

    def __init__(self, max_connections: int, max_per_address: int):
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._idle: dict[Hashable, str] = {}  # connection → address, longest idle first
        self._busy: dict[Hashable, str] = {}
        self._per_address: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def admit(self, connection: Hashable, address: str) -> tuple[list, str | None]:
        """(connections to close to make room, None) when `connection` from `address` comes
        in; ([], why not) when it is refused. The connections to close are forgotten here at
        once (their `release` later does nothing)."""
        closing = []
        if self._per_address.get(address, 0) >= self.max_per_address:
            victim = self._longest_idle(address)
            if victim is None:
                return [], (f"all {self.max_per_address} connections from {address} are "
                            "answering a request (max_connections_per_address)")
            closing.append(victim)
        if len(self) - len(closing) >= self.max_connections:
            victim = self._longest_idle(None, besides=closing)
            if victim is None:
                return [], (f"all {self.max_connections} connections are answering a "
                            "request (max_connections)")
            closing.append(victim)
        for victim in closing:
            self.release(victim)
        self._idle[connection] = address
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return closing, None

    def busy(self, connection: Hashable) -> None:
        """`connection`'s request is whole, its response not yet sent."""
        address = self._idle.pop(connection, None)
        if address is not None:
            self._busy[connection] = address

    def idle(self, connection: Hashable) -> None:
        """`connection` sent its response: idle (the most recently idle) until its next
        request."""
        address = self._busy.pop(connection, None)
        if address is not None:
            self._idle[connection] = address

    def release(self, connection: Hashable) -> None:
        """`connection` is closed (or being closed)."""
        address = self._idle.pop(connection, None) or self._busy.pop(connection, None)
        if address is None:
            return
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]

    def _longest_idle(self, address: str | None, besides: Iterable = ()) -> Hashable | None:
        for connection, where in self._idle.items():
            if (address is None or where == address) and connection not in besides:
                return connection
        return None


# -- the protocol: uvicorn's h11 protocol with the pool and the timers --------------------------

class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, admitted by an `HttpConnectionPool`, with an idle timer from
    the connection's start (uvicorn's keep-alive timer, `timeout_keep_alive`, armed there too)
    and a request-read timer: `read_timeout` seconds from a request's first byte to its last.
    uvicorn creates one per connection through functools.partial(GuardedH11Protocol,
    pool=..., read_timeout=..., name=...) given as `http` in its Config."""

    def __init__(self, *args, pool: HttpConnectionPool, read_timeout: float, name: str,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool
        self.read_timeout = read_timeout
        self.name = name
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        address = self.client[0] if self.client else "?"
        closing, refusal = self.pool.admit(self, address)
        if refusal is not None:
            log.warning("%s: %s: connection refused: %s", self.name, self._remote(), refusal)
            transport.abort()
            return
        for victim in closing:
            log.debug("%s: %s: idle connection closed to make room for %s", self.name,
                      victim._remote(), self._remote())
            victim.transport.close()  # its connection_lost follows, as for any close
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def connection_lost(self, exc) -> None:
        self.pool.release(self)
        self._stop_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self.conn.their_state in _READING:
            self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)
        super().data_received(data)
        if self.conn.their_state not in _READING:  # the request is whole (or refused)
            self._stop_read_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if (self.cycle is not None and not self.cycle.response_complete
                and self.conn.their_state in _WHOLE):
            self.pool.busy(self)

    def on_response_complete(self) -> None:
        self.pool.idle(self)  # first: a pipelined request may be handed over in there
        super().on_response_complete()

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            log.info("%s: %s: closed: no whole request within %g s of its first byte "
                     "(request_read_timeout_seconds)", self.name, self._remote(),
                     self.read_timeout)
            self.transport.close()

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _remote(self) -> str:
        return format_address(self.client)


# -- request bodies ---------------------------------------------------------------------------

def bounded_body(app, max_bytes: int):
    """`app` (ASGI) behind a body limit: a request body must come with a Content-Length of
    at most `max_bytes`; else 413 (too large) or 411 (chunked: Length Required), answered
    before the app runs. FastAPI reads a whole body into memory, before it checks the token:
    without this, one unauthenticated POST could make the server hold a gigabyte."""

    async def limited(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])  # names are lower case (ASGI)
            length = headers.get(b"content-length", b"0")
            if b"transfer-encoding" in headers:
                return await _refuse(send, 411, f"a request body needs a Content-Length "
                                     f"(of at most {max_bytes} bytes)")
            if not length.isdigit() or int(length) > max_bytes:
                return await _refuse(send, 413, f"a request body may have at most "
                                     f"{max_bytes} bytes (max_body_bytes)")
        await app(scope, receive, send)

    return limited


async def _refuse(send, status: int, detail: str) -> None:
    title = {411: "Length required", 413: "Content too large"}[status]
    body = json.dumps({"type": "about:blank", "title": title, "status": status,
                       "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"), (b"connection", b"close"),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- what the access log shows -----------------------------------------------------------------

def loggable_target(raw_path: bytes, query: bytes, secrets: tuple[str, ...] = ()) -> str:
    """The request target for an access log line: percent-decoded, secrets masked, query
    values hidden except a digit-only `imsi` (see the module docstring). `secrets`: strings
    masked wherever they appear (the API's token)."""
    path = _decoded(raw_path.decode("latin-1"), plus_is_space=False)
    if path is None:
        path = f"(path percent-encoded more than {MAX_DECODING_ROUNDS} times)"
    else:
        path = _SECRET_IN_PATH.sub(lambda match: match.group(1) + MASK,
                                   _without(secrets, path))
    shown = []
    parameters = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    for name, value in parameters[:MAX_SHOWN_PARAMETERS]:
        name = _decoded(name, plus_is_space=True) or ""
        value = _decoded(value, plus_is_space=True) or ""
        if name.lower() == "imsi" and value.isascii() and value.isdigit():
            shown.append(f"{name}={value}")
        else:
            shown.append(f"{name if _PARAMETER_NAME.fullmatch(name) else '?'}="
                         f"{MASK if value else ''}")
    if len(parameters) > MAX_SHOWN_PARAMETERS:
        shown.append(f"...({len(parameters) - MAX_SHOWN_PARAMETERS} more)")
    target = path + ("?" + _without(secrets, "&".join(shown)) if shown else "")
    return untrusted(target)  # escaped and cut: a path cannot forge a log line


def _without(secrets: tuple[str, ...], text: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def _decoded(text: str, plus_is_space: bool) -> str | None:
    """`text` with percent-encoding (and, in a query, '+') undone until nothing changes;
    None when it would still change after MAX_DECODING_ROUNDS rounds."""
    for _ in range(MAX_DECODING_ROUNDS + 1):
        decoded = unquote(text.replace("+", " ") if plus_is_space else text,
                          encoding="utf-8", errors="replace")
        if decoded == text:
            return text
        text = decoded
    return None
