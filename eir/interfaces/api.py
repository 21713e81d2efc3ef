"""The HTTP admin and lookup API, and the HTTP endpoints' server (the API and /metrics).

Framework: FastAPI (on Starlette), served by uvicorn inside the EIR's own event loop. FastAPI
derives the OpenAPI document from the same pydantic models that validate requests and shape
responses (pydantic is already what validates the configuration), so the document cannot
drift from the code, and schemathesis tests the served document against the served API.
uvicorn runs as a task in the loop (`HttpEndpoint`): the handlers read the server's state
(rule set, peers, counters) directly, with no locks and no second copy; the one slow thing
an endpoint does, reading the observations database, runs in a thread.

The endpoints share the event loop with Diameter, so they are kept cheap and bounded: each
keeps at most `max_connections` HTTP/1.1 connections (`max_connections_per_address` from one
address), closes idle and slow ones (`idle_timeout_seconds`, `request_read_timeout_seconds`),
and is bound to loopback by default; idle connections never keep the probes and /metrics
from answering (eir.net.http1 says how and why). The access log shows no token and no
unmasked IMSI, however the request encodes them (eir.net.http1.loggable_target).

Authentication: `Authorization: Bearer <token>` with the token of `api.token` or
$EIR_API_TOKEN, compared in constant time; without it, 401. /healthz and /readyz are open
(orchestrators probe them without secrets; they tell nothing but up/ready), and so is
/openapi.json (the document holds no data). Errors are RFC 9457 problem details
(application/problem+json): type, title, status, detail, and `field` when one input is wrong.

The web console (eir.interfaces.console) is mounted at /console on the same app, unless
console.enabled is false: its own pages, sessions and errors (HTML), on the functions below
(`list_status`, `rollback_lists`, `connected_peers`) and the server's `reload_lists`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import socket
import time
from datetime import date
from typing import Literal

import uvicorn
from fastapi import Body, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from eir import __version__
from eir.check.observations import ObservationError, database_location, equipment_history
from eir.core.config import ConfigError, parse_local_listen
from eir.core.imei import normalise_imei
from eir.core.untrusted import untrusted
from eir.interfaces.ports import ServerView
from eir.lists.store import Store, StoreError, operator
from eir.net.http1 import GuardedH11Protocol, HttpConnectionPool, bounded_body, loggable_target

log = logging.getLogger("eir.api")

SHUTDOWN_SECONDS = 2.0
IMEI_PATTERN = r"^[0-9]{14,16}$"
IMSI_PATTERN = r"^[0-9]{5,15}$"
VERSION_PATTERN = r"^[0-9A-Za-z._-]{1,64}$"
PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBE_PATHS = ("/healthz", "/readyz")
# the web console (eir.interfaces.console), unless console.enabled is false
CONSOLE_PATH = "/console"
FIELD_MESSAGES = {
    "imei": "must be an IMEI or IMEISV: 14 to 16 digits",
    "imsi": "must be an IMSI: 5 to 15 digits",
    "version": "must be a store version such as 000003",
}


# -- models: what the OpenAPI document describes ---------------------------------------------

class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = Field(None, description="the input that is wrong, when one is")


class Observed(BaseModel):
    first_seen: date | None = Field(description="first day the IMEI was observed")
    last_seen: date | None = Field(description="last day the IMEI was observed")
    imsis: int = Field(description="distinct IMSIs it was observed with")


class EquipmentVerdict(BaseModel):
    imei: str = Field(description="the 14-digit key (TAC + serial) the lists use")
    imsi: str | None
    status: Literal["WHITELISTED", "BLACKLISTED", "GREYLISTED", "UNKNOWN"]
    result_code: int = Field(description="2001, or 5422 (equipment unknown) when status is "
                                         "UNKNOWN")
    match: str = Field(description="the precedence level that decided: imei+imsi, imei, "
                                   "range+imsi, range, tac+imsi, tac, grandfathered, "
                                   "unknown-policy")
    reason: str
    source: str = Field(description="the list file and line, or list and version")
    list_version: str
    observed: Observed | None = Field(description="from the observations (as of their "
                                                  "last flush); null when they are off")


class StoredList(BaseModel):
    version: str
    in_force: bool
    created: float = Field(description="Unix time it was compiled")
    age_seconds: float
    counts: dict[str, int]
    manifest: dict | None = Field(
        None, description="the registry manifest it was compiled from: sequence, published, "
                          "sha256 (of manifest.json) and signer (SHA256: fingerprint of the "
                          "public key that verified it, or null); null without a manifest")
    sources: list[dict] = Field(description="every file in force: name, sha256 of the bytes "
                                            "parsed, list, run, rows")


class ListStatus(BaseModel):
    version: str
    rules: int
    counts: dict[str, int]
    created: float
    age_seconds: float
    unknown_policy: str
    source: Literal["store", "files"]
    files: list[str] = Field(description="the list files, when not served from a store")
    store: str | None
    pinned: str | None = Field(description="the version a rollback pinned (syncs wait for "
                                           "`eir lists unpin`)")
    versions: list[StoredList] = Field(description="the store's versions, newest first")


class ReloadResult(BaseModel):
    version: str
    rules: int


class RollbackRequest(BaseModel):
    version: str | None = Field(None, pattern=VERSION_PATTERN,
                                description="default: the version before the one in force")


class RollbackResult(BaseModel):
    version: str = Field(description="the version now in force")
    pinned: str


class UnpinResult(BaseModel):
    was_pinned: str | None = Field(description="the version the store was pinned at (null: "
                                               "it was not pinned)")


class SyncResult(BaseModel):
    outcome: str = Field(description="what the sync did, in a sentence")
    version: str = Field(description="the version in force after it")


class PeerInfo(BaseModel):
    remote: str
    state: Literal["wait-cer", "open", "closing", "closed"]
    origin_host: str | None
    origin_realm: str | None
    connected_seconds: float
    answered: dict[str, int] = Field(description=(
        "requests answered on this connection since it opened, by outcome: WHITELISTED, "
        "BLACKLISTED, GREYLISTED, UNKNOWN (5422), ERROR (any error Result-Code, 3004 "
        "included), DUPLICATE (answered again from the duplicate cache)"))


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


class ApiProblem(Exception):
    def __init__(self, status: int, title: str, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.problem = Problem(title=title, status=status, detail=detail, field=field)
        self.headers = headers


def _problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(problem.model_dump(exclude_none=True), status_code=problem.status,
                        headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _problems(*statuses: int) -> dict:
    """OpenAPI `responses` for problem-details answers."""
    reference = {"$ref": "#/components/schemas/Problem"}
    return {status: {"description": _TITLES[status], "model": Problem,
                     "content": {PROBLEM_MEDIA_TYPE: {"schema": reference}}}
            for status in statuses}


_TITLES = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 405: "Method not "
           "allowed", 409: "Conflict", 500: "Internal error", 503: "Not ready"}


# -- the application ------------------------------------------------------------------------

def create_app(server: ServerView, token: str) -> FastAPI:
    """The API over a running server (eir.serve.server.EirServer, seen as a ServerView);
    `token` is the bearer token."""
    app = FastAPI(
        title="open EIR admin and lookup API", version=__version__,
        description="Verdicts, list status, reload and rollback, peers, health. Every "
                    "/v1 endpoint needs `Authorization: Bearer <token>`.",
        responses=_problems(401, 500),
        # No Swagger UI or ReDoc: their pages load scripts from a CDN, which an operator's
        # network should not have to reach; /openapi.json is what tools read.
        docs_url=None, redoc_url=None)
    bearer = HTTPBearer(auto_error=False, description="api.token or $EIR_API_TOKEN")
    expected = token.encode()

    async def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if credentials is None or not hmac.compare_digest(
                credentials.credentials.encode(), expected):
            raise ApiProblem(401, "Unauthorized",
                             "missing or wrong bearer token (Authorization: Bearer <token>)",
                             headers={"WWW-Authenticate": 'Bearer realm="eir"'})

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem):
        return _problem_response(exc.problem, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ())]
        field = location[-1] if len(location) > 1 else (location[0] if location else None)
        message = FIELD_MESSAGES.get(field) or first.get("msg", "invalid")
        where = " ".join(location[:-1]) if len(location) > 1 else "request"
        detail = f"{field}: {message}" if field else message
        return _problem_response(Problem(title="Bad request", status=400,
                                         detail=f"{detail} ({where})", field=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        return _problem_response(Problem(title=_TITLES.get(status, "Error"), status=status,
                                         detail=str(exc.detail)), getattr(exc, "headers", None))

    @app.middleware("http")
    async def _access_log(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        scope = request.scope
        # Probes come every few seconds from an orchestrator: logged only when debugging.
        level = logging.DEBUG if request.url.path in PROBE_PATHS else logging.INFO
        log.log(level, "%s %s %d %.1f ms", untrusted(request.method),
                loggable_target(scope["raw_path"], scope["query_string"], (token,)),
                response.status_code, (time.perf_counter() - started) * 1e3)
        return response

    secured = [Depends(authorised)]

    @app.get("/v1/equipment/{imei}", response_model=EquipmentVerdict, dependencies=secured,
             responses=_problems(400), summary="The verdict for an IMEI (and IMSI), and what "
             "the observations know of it")
    async def equipment(imei: str = Path(pattern=IMEI_PATTERN, description="IMEI or IMEISV"),
                        imsi: str | None = Query(None, pattern=IMSI_PATTERN,
                                                 description="the subscriber's IMSI")):
        key = normalise_imei(imei)
        rule_set = server.rule_set
        verdict = rule_set.explain(key, imsi)
        observed = None
        if server.observations is not None:
            observed = await asyncio.get_running_loop().run_in_executor(
                None, _observed, database_location(server.settings), key)
        return EquipmentVerdict(
            imei=key, imsi=imsi, status=verdict.status_name,
            result_code=2001 if verdict.status is not None else 5422,
            match=verdict.match.value, reason=verdict.reason, source=verdict.source,
            list_version=rule_set.version, observed=observed)

    @app.get("/v1/lists", response_model=ListStatus, dependencies=secured,
             summary="The lists in force and the store's versions")
    async def lists():
        return await asyncio.get_running_loop().run_in_executor(None, list_status, server)

    @app.post("/v1/lists/reload", response_model=ReloadResult, dependencies=secured,
              responses=_problems(409), summary="Load the lists again (as SIGHUP does); on "
              "error the lists in force stay in force")
    async def reload():
        if not await server.reload_lists():
            raise ApiProblem(409, "Reload refused", "the lists in force stay in force: "
                             + (server.last_reload_error or "see the server's log"))
        return ReloadResult(version=server.rule_set.version, rules=server.rule_set.rule_count)

    @app.post("/v1/lists/rollback", response_model=RollbackResult, dependencies=secured,
              responses=_problems(400, 404, 409), summary="Put an earlier store version back "
              "in force and pin the store (syncs wait for `eir lists unpin`)")
    async def rollback(http: Request, request: RollbackRequest | None = Body(None)):
        return await rollback_lists(server, request.version if request is not None else None,
                                    by=_caller(http))

    @app.post("/v1/lists/unpin", response_model=UnpinResult, dependencies=secured,
              responses=_problems(409), summary="Let syncs publish again after a rollback "
              "pinned the store (as `eir lists unpin`)")
    async def unpin(http: Request):
        return UnpinResult(was_pinned=await unpin_lists(server, by=_caller(http)))

    @app.post("/v1/lists/sync", response_model=SyncResult, dependencies=secured,
              responses=_problems(409), summary="Sync from the registry source now (as "
              "`eir sync`), and put a new version in force; 409 when refused")
    async def sync(http: Request):
        log.info("sync asked by %s", _caller(http))
        return await sync_lists(server)

    @app.get("/v1/peers", response_model=list[PeerInfo], dependencies=secured,
             summary="Diameter connections and their peers")
    async def peers():
        return [PeerInfo(**info) for info in await connected_peers(server)]

    @app.get("/healthz", response_model=Health, summary="The process answers (no token "
             "needed)")
    async def healthz():
        return Health(status="ok", version=__version__)

    @app.get("/readyz", response_model=Readiness, responses={503: {
        "description": "Not ready", "model": Readiness}}, summary="Ready when lists are "
        "loaded and the Diameter listener is up (no token needed)")
    async def readyz():
        checks = readiness(server)
        body = Readiness(ready=all(checks.values()), checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    if server.settings.console.enabled:
        from eir.interfaces.console import console_app

        app.mount(CONSOLE_PATH, console_app(server, token))
    return app


async def rollback_lists(server: ServerView, wanted: str | None,
                         by: str | None = None) -> RollbackResult:
    """Put store version `wanted` (None: the one before) back in force, pin the store and
    reload (POST /v1/lists/rollback, the console); ApiProblem when refused. `by`: who, for
    the store's journal (default: this process, eir.lists.store.operator)."""
    directory = server.settings.store.directory
    if directory is None:
        raise ApiProblem(409, "No store", "the lists come from files, not from a store "
                         "(store.directory): there is nothing to roll back to")
    store = Store(directory, server.settings.store.keep)
    loop = asyncio.get_running_loop()
    kept = [v.version for v in await loop.run_in_executor(None, store.versions)]
    if wanted is not None:
        wanted = Store.version_named(wanted)
    if wanted is not None and wanted not in kept:
        raise ApiProblem(404, "Not found", f"version {wanted} is not kept (kept: "
                         f"{', '.join(kept) or 'none'})", field="version")
    try:
        version = await loop.run_in_executor(None, store.rollback, wanted, by)
    except StoreError as exc:
        raise ApiProblem(409, "Rollback refused", str(exc)) from None
    if not await server.reload_lists():
        raise ApiProblem(409, "Reload refused", f"version {version} is in force in the "
                         "store, but loading it failed: " + (server.last_reload_error
                                                             or "see the server's log"))
    return RollbackResult(version=version, pinned=store.pinned() or version)


async def unpin_lists(server: ServerView, by: str | None = None) -> str | None:
    """Let syncs publish again after a rollback (POST /v1/lists/unpin, the console): the
    version that was pinned, or None; journaled by the store as the act of `by`."""
    directory = server.settings.store.directory
    if directory is None:
        raise ApiProblem(409, "No store", "the lists come from files, not from a store "
                         "(store.directory): there is nothing to unpin")
    store = Store(directory, server.settings.store.keep)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, store.unpin, by)
    except StoreError as exc:
        raise ApiProblem(409, "Unpin refused", str(exc)) from None


async def sync_lists(server: ServerView) -> SyncResult:
    """Sync from sync.source now (POST /v1/lists/sync, the console's "sync now"); a refused
    or failed sync is a 409 whose detail says why (the snapshot in force keeps serving)."""
    settings = server.settings
    if not (settings.sync.source and settings.store.directory):
        raise ApiProblem(409, "No registry source", "sync.source and store.directory must "
                         "be set to sync")
    outcome = await server.sync_now()
    # sync_now says what happened in a sentence; these two starts are its refusals.
    if outcome.startswith(("refused", "failed")):
        raise ApiProblem(409, "Sync refused", outcome)
    return SyncResult(outcome=outcome, version=server.rule_set.version)


def _caller(request: Request) -> str:
    """Who acted through the API, for the store's journal: the token's holder, from where,
    through this process."""
    address = request.client.host if request.client is not None else "?"
    return f"admin API from {address}; {operator()}"


async def connected_peers(server: ServerView) -> list[dict]:
    """The Diameter connections of this process and of its workers (GET /v1/peers)."""
    found = server.peer_infos()
    if server.supervisor is not None:  # several workers: each has its own connections
        for infos in await server.supervisor.ask_all("peers"):
            found += infos
    return found


def readiness(server: ServerView) -> dict[str, bool]:
    """What /readyz checks: a snapshot loaded, a Diameter listener serving, not stopping."""
    return {"lists_loaded": server.rule_set is not None,
            "diameter_listening": server.listening,
            "not_stopping": not server.stopping}


def _observed(location, imei: str) -> Observed:
    try:
        history = equipment_history(location, imei)
    except ObservationError:
        return Observed(first_seen=None, last_seen=None, imsis=0)  # nothing flushed yet
    return Observed(first_seen=_day(history.first_day), last_seen=_day(history.last_day),
                    imsis=history.imsis)


def _day(number: int | None) -> date | None:
    return None if number is None else date(number // 10000, number // 100 % 100,
                                            number % 100)


def list_status(server: ServerView) -> ListStatus:
    rule_set = server.rule_set
    info = rule_set.snapshot.info
    settings = server.settings
    directory = settings.store.directory
    versions, pinned = [], None
    if directory is not None:
        store = Store(directory, settings.store.keep)
        try:
            versions = [StoredList(version=v.version, in_force=v.in_force,
                                   created=v.info.created, age_seconds=round(v.age_seconds, 3),
                                   counts=v.info.counts, manifest=v.info.manifest,
                                   sources=v.info.sources)
                        for v in store.versions()]
            pinned = store.pinned()
        except StoreError as exc:
            log.warning("store: %s", exc)
    return ListStatus(
        version=rule_set.version, rules=rule_set.rule_count, counts=info.counts,
        created=info.created, age_seconds=round(max(0.0, time.time() - info.created), 3),
        unknown_policy=rule_set.unknown_policy.value,
        source="store" if directory is not None else "files",
        files=[] if directory is not None else [str(f) for f in settings.lists.files],
        store=str(directory) if directory is not None else None, pinned=pinned,
        versions=versions)


# -- serving inside the EIR's event loop ------------------------------------------------------

class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn as one task of the EIR's loop: the EIR owns SIGTERM, SIGINT and SIGHUP (its
    shutdown sends DPR to every peer), so uvicorn must not take them over."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpEndpoint:
    """An ASGI app served by uvicorn in the running event loop, on a socket bound here (so
    that a bad address fails with its own error, and port 0 tells its port), with the
    connection limits and timeouts of `settings` (eir.core.config._HttpListenSettings: the api
    or metrics section) applied by eir.net.http1."""

    def __init__(self, app, settings, name: str):
        self.app = bounded_body(app, settings.max_body_bytes)
        self.settings = settings
        self.listen = settings.listen
        self.name = name
        self.address: tuple[str, int] | None = None
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> tuple[str, int]:
        host, port = parse_local_listen(self.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.settings.backlog)
        except OSError as exc:
            sock.close()
            raise OSError(f"{self.name} {self.listen}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self.address = sock.getsockname()[:2]
        limits = self.settings
        # No limit_concurrency: it counts idle connections and answers 503 to the probes
        # once ~limit of them are open; the pool bounds connections instead (eir.net.http1).
        protocol = functools.partial(
            GuardedH11Protocol, name=self.name,
            pool=HttpConnectionPool(limits.max_connections, limits.max_connections_per_address),
            read_timeout=limits.request_read_timeout_seconds)
        config = uvicorn.Config(self.app, http=protocol, ws="none", log_config=None,
                                access_log=False, lifespan="off", server_header=False,
                                proxy_headers=False, backlog=limits.backlog,
                                h11_max_incomplete_event_size=limits.max_incomplete_head_bytes,
                                timeout_keep_alive=limits.idle_timeout_seconds,
                                timeout_graceful_shutdown=SHUTDOWN_SECONDS)
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        self._task.add_done_callback(self._ended)
        return self.address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %s", self.name, task.exception())

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_SECONDS + 1)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - shutting down anyway
            self._task.cancel()


class Operations:
    """The HTTP endpoints `eir serve` runs beside Diameter: /metrics (metrics.listen) and
    the admin API (api.listen). Built before the loop starts, so that a missing API token is
    a configuration error at start-up."""

    def __init__(self, server: ServerView):
        self.server = server
        settings = server.settings
        self.endpoints: list[HttpEndpoint] = []
        if settings.metrics.listen:
            from eir.interfaces.metrics import metrics_app

            self.endpoints.append(HttpEndpoint(metrics_app(server), settings.metrics,
                                               "metrics"))
        if settings.api.listen:
            token = settings.api.effective_token()
            if not token:
                raise ConfigError("api.listen is set but there is no API token: set api.token "
                                  "in the configuration or the EIR_API_TOKEN environment "
                                  "variable")
            self.endpoints.append(HttpEndpoint(create_app(server, token), settings.api,
                                               "admin API"))

    async def start(self) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            # uvicorn tells "Started server process" and the like at INFO: noise beside ours.
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        for endpoint in self.endpoints:
            await endpoint.start()
            where = "/metrics" if endpoint.name == "metrics" else "/ (OpenAPI at /openapi.json)"
            if endpoint.name != "metrics" and self.server.settings.console.enabled:
                where += f"; web console at {endpoint.url}{CONSOLE_PATH}/"
            log.info("%s served on %s%s", endpoint.name, endpoint.url, where)

    async def stop(self) -> None:
        await asyncio.gather(*(endpoint.stop() for endpoint in self.endpoints))
