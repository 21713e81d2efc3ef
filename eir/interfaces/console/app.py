"""The console's pages and forms (see eir.interfaces.console)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.exceptions import HTTPException as StarletteHTTPException

from eir.check.observations import (
    CLONE_MIN_IMSIS,
    ObservationError,
    database_location,
    equipment_history,
    equipment_sightings,
)
from eir.core.config import ConfigError
from eir.core.decision import format_day
from eir.core.imei import normalise_imei
from eir.core.logs import mask_imsi, redact
from eir.core.untrusted import untrusted
from eir.diameter.peer import ANSWERED_DUPLICATE, ANSWERED_ERROR
from eir.interfaces.api import (
    ApiProblem,
    connected_peers,
    list_status,
    rollback_lists,
    unpin_lists,
)
from eir.interfaces.console.access import LoginLimiter, Session, Sessions, csrf_ok, role_of
from eir.interfaces.console.rules import LocalList, RuleEditError, StaleRuleError
from eir.interfaces.metrics import (
    LATENCY_BUCKETS,
    NO_EQUIPMENT_STATUS,
    merged_snapshot,
    worker_snapshots,
)
from eir.interfaces.ports import ServerView
from eir.lists.native import ListError, parse_imsi
from eir.lists.store import Store, StoreError, operator
from eir.lists.sync import SyncError

log = logging.getLogger("eir.console")

HERE = Path(__file__).parent
COOKIE = "eir_console"
JOURNAL_NAME = "console.jsonl"
# Fixed texts a redirect may ask a page to show (?done=...): never text from the URL.
DONE = {"added": "Rule added and the lists reloaded.",
        "edited": "Rule changed and the lists reloaded.",
        "published": "The local rules file is in force as it is.",
        "deleted": "Rule deleted and the lists reloaded.",
        "rollback": "Rolled back; the store is pinned until unpinned.",
        "unpin": "Store unpinned: syncs publish again.",
        "logout": "Logged out."}
LIST_ACTIONS = {"rollback": "Roll back", "unpin": "Unpin the store",
                "sync": "Sync now from the registry"}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY", "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer", "cache-control": "no-store"}
# The per-connection answer counts the peers table shows (eir.diameter.peer's
# PeerConnection.answered keys), with their column titles.
PEER_OUTCOMES = {"WHITELISTED": "White", "BLACKLISTED": "Black", "GREYLISTED": "Grey",
                 "UNKNOWN": "Unknown", ANSWERED_ERROR: "Errors", ANSWERED_DUPLICATE: "Repeated"}
STATIC = {"console.css": "text/css; charset=utf-8",
          "console.js": "text/javascript; charset=utf-8"}


class ConsoleProblem(Exception):
    """A page saying what went wrong, with its HTTP status."""

    def __init__(self, status: int, title: str, detail: str | list[str]):
        super().__init__(title)
        self.status, self.title = status, title
        self.details = detail if isinstance(detail, list) else [detail]


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the session, and the address the request came from."""

    session: Session
    address: str

    @property
    def who(self) -> str:
        return f"web console, role {self.session.role}, from {self.address}"


def console_app(server: ServerView, token: str) -> FastAPI:
    """The console over a running server (eir.serve.server.EirServer, seen as a ServerView);
    `token` is the API's (admin) token."""
    settings = server.settings
    console = settings.console
    read_token = settings.api.effective_read_only_token()
    if read_token is not None and read_token == token:
        raise ConfigError("api.read_only_token must differ from the API token")
    local = _local_list(settings)
    sessions = Sessions(token, read_token, console.session_seconds)
    limiter = LoginLimiter(console.max_login_failures, console.login_window_seconds,
                           console.max_tracked_addresses)
    journal_path = console.journal or (Path(settings.store.directory) / JOURNAL_NAME
                                       if settings.store.directory else Path(JOURNAL_NAME))
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                            undefined=StrictUndefined)
    show_imsi = settings.logging.show_imsi

    def shown_imsi(imsi: str) -> str:
        return imsi if show_imsi or not imsi else mask_imsi(imsi)

    templates.filters["imsi"] = shown_imsi
    templates.filters["redacted"] = lambda text: text if show_imsi else redact(text)
    templates.filters["day"] = format_day
    static = {name: (HERE / "static" / name).read_bytes() for name in STATIC}
    edit_lock = asyncio.Lock()  # one change of the local list (and its reload) at a time

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def page(request: Request, name: str, code: int = 200, viewer: Viewer | None = None,
             **values) -> HTMLResponse:
        base = request.scope.get("root_path", "")
        done = DONE.get(request.query_params.get("done", ""))
        html = templates.get_template(name).render(
            base=base, viewer=viewer, done=done, **values)
        return HTMLResponse(html, status_code=code)

    def address_of(request: Request) -> str:
        return request.client.host if request.client else "?"

    def viewer_of(request: Request) -> Viewer | None:
        session = sessions.read(request.cookies.get(COOKIE))
        return Viewer(session, address_of(request)) if session is not None else None

    def to_login(request: Request) -> RedirectResponse:
        base = request.scope.get("root_path", "")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{base}/login?{urlencode({'next': target})}", 303)

    async def changer(request: Request) -> tuple[Viewer, dict]:
        """The admin viewer and the form of a change; ConsoleProblem for anyone else."""
        viewer = viewer_of(request)
        if viewer is None:
            raise ConsoleProblem(401, "Not logged in", "log in again: the session ended")
        form = await request.form()
        if not csrf_ok(viewer.session, form.get("csrf")):
            log.warning("console: %s: change refused: missing or wrong CSRF token",
                        untrusted(viewer.address), extra={"peer": viewer.address})
            raise ConsoleProblem(403, "Refused", "the form's CSRF token is missing or wrong: "
                                 "reload the page and try again")
        refuse_reader(viewer, request.url.path)
        return viewer, {key: value for key, value in form.items() if isinstance(value, str)}

    def refuse_reader(viewer: Viewer, what: str) -> None:
        if not viewer.session.may_change:
            log.warning("console: %s: %s refused to the read-only role",
                        untrusted(viewer.address), untrusted(what),
                        extra={"peer": viewer.address})
            raise ConsoleProblem(403, "Read-only", "the read-only role cannot change "
                                 "anything: log in with the admin token")

    async def record(act: str, role: str | None, address: str, **fields) -> None:
        """One line in the console journal (in a thread: it is a file write)."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "act": act, "role": role, "address": address, **fields},
                          ensure_ascii=False)
        await asyncio.get_running_loop().run_in_executor(None, _append, journal_path, line)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(ConsoleProblem)
    async def _problem(request: Request, exc: ConsoleProblem):
        return page(request, "problem.html", exc.status, viewer_of(request), title=exc.title,
                    details=exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return page(request, "problem.html", exc.status_code, viewer_of(request),
                    title="Not found" if exc.status_code == 404 else "Error",
                    details=[str(exc.detail)])

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in static:
            raise ConsoleProblem(404, "Not found", "no such file")
        return Response(static[name], media_type=STATIC[name],
                        headers={"cache-control": "max-age=3600"})

    @app.get("/")
    async def home(request: Request):
        base = request.scope.get("root_path", "")
        return RedirectResponse(f"{base}/lookup", 303)

    # -- access --------------------------------------------------------------------------

    @app.get("/login")
    async def login_form(request: Request, next: str = ""):
        return page(request, "login.html", next=_local_target(request, next))

    @app.post("/login")
    async def login(request: Request):
        address = address_of(request)
        now = time.monotonic()
        wait = limiter.retry_after(address, now)
        if wait > 0:
            log.warning("console: %s: login refused: too many failures (console."
                        "max_login_failures)", untrusted(address), extra={"peer": address})
            return page(request, "login.html", 429, next="", error=(
                f"Too many failed logins from {address}: try again in {wait:.0f} s."))
        form = await request.form()
        role = role_of(str(form.get("token", "")), token, read_token)
        target = _local_target(request, str(form.get("next", "")))
        if role is None:
            limiter.failed(address, now)
            log.warning("console: %s: login failed (wrong token)", untrusted(address),
                        extra={"peer": address})
            await record("login-failed", None, address)
            return page(request, "login.html", 401, next=target, error="Wrong token.")
        await record("login", role, address)
        base = request.scope.get("root_path", "")
        response = RedirectResponse(target or f"{base}/lookup", 303)
        response.set_cookie(COOKIE, sessions.issue(role), max_age=int(console.session_seconds),
                            path=base or "/", httponly=True, samesite="strict",
                            secure=(console.secure_cookie
                                    if console.secure_cookie is not None
                                    else request.url.scheme == "https"))
        return response

    @app.post("/logout")
    async def logout(request: Request):
        base = request.scope.get("root_path", "")
        response = RedirectResponse(f"{base}/login?done=logout", 303)
        response.delete_cookie(COOKIE, path=base or "/", httponly=True, samesite="strict")
        return response

    # -- lookup --------------------------------------------------------------------------

    @app.get("/lookup")
    async def lookup(request: Request, imei: str = "", imsi: str = ""):
        viewer = viewer_of(request)
        if viewer is None:
            return to_login(request)
        imei, imsi = imei.strip().replace(" ", ""), imsi.strip()
        if not imei:
            return page(request, "lookup.html", viewer=viewer, imei="", imsi="", result=None)
        problems = []
        if not (imei.isascii() and imei.isdigit() and 14 <= len(imei) <= 16):
            problems.append(f"IMEI {imei[:64]!r}: must be an IMEI or IMEISV, 14 to 16 digits")
        if imsi:
            try:
                parse_imsi(imsi)
            except ValueError:
                problems.append("IMSI: must be 5 to 15 digits")
        if problems:
            return page(request, "lookup.html", 400, viewer=viewer, imei=imei[:64],
                        imsi="", result=None, problems=problems)
        key = normalise_imei(imei)
        rule_set = server.rule_set
        verdict = rule_set.explain(key, imsi or None)
        device = rule_set.snapshot.device_name(int(key[:8]))
        observed = None
        if server.observations is not None:
            observed = await asyncio.get_running_loop().run_in_executor(
                None, _observed, database_location(settings), key, console.max_sightings)
        return page(request, "lookup.html", viewer=viewer, imei=imei, imsi=imsi, result={
            "key": key, "status": verdict.status_name,
            "result_code": 2001 if verdict.status is not None else 5422,
            "match": verdict.match.value, "reason": verdict.reason,
            "source": verdict.source, "version": rule_set.version, "device": device,
            "observed": observed, "share": f"{request.scope.get('root_path', '')}/lookup?"
                                          + urlencode({"imei": imei, "imsi": imsi})})

    # -- local rules ---------------------------------------------------------------------

    @app.get("/rules")
    async def rules(request: Request, q: str = ""):
        viewer = viewer_of(request)
        if viewer is None:
            return to_login(request)
        rows = local.rules(q.strip()) if local is not None else []
        return page(request, "rules.html", viewer=viewer, rows=rows, q=q[:200],
                    path=str(local.path) if local is not None else None,
                    store=str(local.store.root) if local and local.store else None,
                    differs=local is not None and local.differs_from(
                        server.rule_set.snapshot.info.sources),
                    version=server.rule_set.version)

    @app.get("/rules/new")
    async def new_rule(request: Request):
        viewer = viewer_of(request)
        if viewer is None:
            return to_login(request)
        refuse_reader(viewer, "the rule form")
        _need_local(local)
        return page(request, "rule_form.html", viewer=viewer, row=None, cells={
            "imei": "", "status": "blacklist", "imsi": "", "reason": ""})

    @app.get("/rules/{index}/edit")
    async def edit_rule(request: Request, index: int, tag: str = ""):
        viewer = viewer_of(request)
        if viewer is None:
            return to_login(request)
        refuse_reader(viewer, "the rule form")
        _need_local(local)
        try:
            row = local.find(index, tag)
        except StaleRuleError as exc:
            raise ConsoleProblem(409, "Changed meanwhile", exc.problems) from None
        return page(request, "rule_form.html", viewer=viewer, row=row, cells=row.cells)

    async def change(request: Request, index: int | None, delete: bool = False):
        viewer, form = await changer(request)
        _need_local(local)
        cells = None if delete else {column: form.get(column, "") for column in
                                     ("imei", "status", "imsi", "reason")}
        async with edit_lock:
            previous = local.snapshot()
            try:
                before, after = await asyncio.get_running_loop().run_in_executor(
                    None, local.change, index, form.get("tag"), cells)
            except StaleRuleError as exc:
                raise ConsoleProblem(409, "Changed meanwhile", exc.problems) from None
            except RuleEditError as exc:
                row = None if index is None else local.find(index, form.get("tag", ""))
                return page(request, "rule_form.html", 400, viewer=viewer, row=row,
                            cells=cells, problems=exc.problems)
            await put_in_force(viewer, previous)
        act = "rule-delete" if delete else "rule-add" if index is None else "rule-edit"
        # IMSIs masked as in the audit log (unless logging.show_imsi); the list file has them.
        shown_before, shown_after = (None if row is None else dict(
            row.cells, imsi=shown_imsi(row.imsi)) for row in (before, after))
        await record(act, viewer.session.role, viewer.address, list=str(local.path),
                     before=shown_before, after=shown_after, version=server.rule_set.version)
        log.warning("console: %s: %s by %s: before %s, after %s", local.path.name, act,
                    untrusted(viewer.who), untrusted(shown_before), untrusted(shown_after))
        done = "deleted" if delete else "added" if index is None else "edited"
        return RedirectResponse(f"{request.scope.get('root_path', '')}/rules?done={done}",
                                303)

    async def put_in_force(viewer: Viewer, previous: bytes | None) -> None:
        """The local list's file, just changed, in force: published into the store (if the
        lists come from one), then reloaded; else the file put back as it was (`previous`)
        and ConsoleProblem."""
        assert local is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, local.publish, f"{viewer.who}; {operator()}")
        except (ListError, SyncError, StoreError) as exc:
            local.restore(previous)
            raise ConsoleProblem(409, "Not published", [
                f"the change was undone; the store {local.store.root if local.store else ''} "
                "keeps the version in force:", str(exc)]) from None
        if await server.reload_lists():
            return
        if local.store is not None:  # published: the store's version in force holds it
            raise ConsoleProblem(409, "Reload refused", [
                f"the change is in force in the store ({local.store.root}), but this "
                "server could not load it; it tries again when it polls the store:",
                server.last_reload_error or "see the server's log"])
        local.restore(previous)
        await server.reload_lists()
        raise ConsoleProblem(409, "Reload refused", [
            "the change was undone; the lists in force stay in force:",
            server.last_reload_error or "see the server's log"])

    @app.post("/rules/publish")
    async def publish_rules(request: Request):
        """With a store: put the file in force as it is (after a rollback or a hand edit)."""
        viewer, _ = await changer(request)
        _need_local(local)
        async with edit_lock:
            before = server.rule_set.version
            await put_in_force(viewer, local.snapshot())
        await record("rules-publish", viewer.session.role, viewer.address,
                     list=str(local.path), before=before, after=server.rule_set.version)
        return RedirectResponse(f"{request.scope.get('root_path', '')}/rules?done=published",
                                303)

    @app.post("/rules/add")
    async def add_rule(request: Request):
        return await change(request, None)

    @app.post("/rules/{index}/edit")
    async def save_rule(request: Request, index: int):
        return await change(request, index)

    @app.post("/rules/{index}/delete")
    async def delete_rule(request: Request, index: int):
        return await change(request, index, delete=True)

    # -- lists ---------------------------------------------------------------------------

    @app.get("/lists")
    async def lists(request: Request):
        viewer = viewer_of(request)
        if viewer is None:
            return to_login(request)
        status = await asyncio.get_running_loop().run_in_executor(None, list_status, server)
        return page(request, "lists.html", viewer=viewer, status=status,
                    can_sync=bool(settings.sync.source and settings.store.directory))

    @app.get("/lists/confirm")
    async def confirm(request: Request, action: str = "", version: str = ""):
        viewer = viewer_of(request)
        if viewer is None:
            return to_login(request)
        refuse_reader(viewer, f"the {action[:20]} form")
        if action not in LIST_ACTIONS:
            raise ConsoleProblem(404, "Not found", "no such action")
        return page(request, "confirm.html", viewer=viewer, action=action,
                    title=LIST_ACTIONS[action], version=version[:64],
                    in_force=server.rule_set.version)

    @app.post("/lists/rollback")
    async def rollback(request: Request):
        viewer, form = await changer(request)
        before = server.rule_set.version
        try:
            result = await rollback_lists(server, form.get("version") or None,
                                          by=f"{viewer.who}; {operator()}")
        except ApiProblem as exc:
            raise ConsoleProblem(exc.problem.status, exc.problem.title,
                                 exc.problem.detail) from None
        await record("rollback", viewer.session.role, viewer.address, before=before,
                     after=result.version, pinned=result.pinned)
        return RedirectResponse(f"{request.scope.get('root_path', '')}/lists?done=rollback",
                                303)

    @app.post("/lists/unpin")
    async def unpin(request: Request):
        viewer, _ = await changer(request)
        try:
            pinned = await unpin_lists(server, by=f"{viewer.who}; {operator()}")
        except ApiProblem as exc:
            raise ConsoleProblem(exc.problem.status, exc.problem.title,
                                 exc.problem.detail) from None
        await record("unpin", viewer.session.role, viewer.address, before=pinned, after=None)
        return RedirectResponse(f"{request.scope.get('root_path', '')}/lists?done=unpin", 303)

    @app.post("/lists/sync")
    async def sync_now(request: Request):
        viewer, _ = await changer(request)
        if not (settings.sync.source and settings.store.directory):
            raise ConsoleProblem(409, "No registry source", "sync.source and "
                                 "store.directory must be set to sync")
        before = server.rule_set.version
        outcome = await server.sync_now()
        await record("sync", viewer.session.role, viewer.address, before=before,
                     after=server.rule_set.version, outcome=outcome)
        return page(request, "synced.html", viewer=viewer, outcome=outcome)

    # -- peers and traffic ---------------------------------------------------------------

    @app.get("/peers")
    async def peers(request: Request):
        viewer = viewer_of(request)
        if viewer is None:
            return to_login(request)
        return page(request, "peers.html", viewer=viewer, refresh=console.refresh_seconds,
                    **await live_numbers())

    @app.get("/peers/live")
    async def peers_live(request: Request):
        viewer = viewer_of(request)
        if viewer is None:
            raise ConsoleProblem(401, "Not logged in", "the session ended")
        return page(request, "live.html", viewer=viewer, **await live_numbers())

    async def live_numbers() -> dict:
        return {"peers": await connected_peers(server), "outcomes": list(PEER_OUTCOMES),
                "outcome_names": PEER_OUTCOMES,
                "traffic": traffic(merged_snapshot(server, await worker_snapshots(server))),
                "taken": time.strftime("%H:%M:%S")}

    return app


def _append(path: Path, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as journal:
            journal.write(line + "\n")
    except OSError as exc:
        log.error("console: cannot append to %s (%s): not journaled: %s", path,
                  exc.strerror or exc, untrusted(line))


def _local_list(settings) -> LocalList | None:
    """console.local_list: with a store, published into it at each change; else it must be
    one of lists.files (else a reload would not read it): ConfigError otherwise. Or None
    (no local rules)."""
    path = settings.console.local_list
    if path is None:
        return None
    if settings.store.directory is not None:
        return LocalList(path, Store(settings.store.directory, settings.store.keep))
    if Path(path).resolve() not in {Path(f).resolve() for f in settings.lists.files}:
        raise ConfigError(f"console.local_list: {path} must be one of lists.files (or a "
                          "--list), so that a reload applies it")
    return LocalList(path)


def _need_local(local: LocalList | None) -> None:
    if local is None:
        raise ConsoleProblem(409, "No local list", "set console.local_list (one of "
                             "lists.files, or any file with a store) to edit local rules")


def _local_target(request: Request, target: str) -> str:
    """`target` if it is a path of this console (after login), else '' (no open redirect)."""
    base = request.scope.get("root_path", "")
    if target.startswith(base + "/") and not target.startswith("//") and "\\" not in target:
        return quote(target, safe="/?=&%-._~+")
    return ""


def _observed(location, key: str, limit: int) -> dict | None:
    try:
        history = equipment_history(location, key)
        sightings = equipment_sightings(location, key, limit)
    except ObservationError:
        return None  # nothing flushed yet
    days: dict[int, list[str]] = {}
    for day, imsi in sightings:
        days.setdefault(day, []).append(imsi)
    return {"first": history.first_day, "last": history.last_day, "imsis": history.imsis,
            "clone": history.imsis >= CLONE_MIN_IMSIS, "clone_min": CLONE_MIN_IMSIS,
            "days": sorted(days.items(), reverse=True), "limit": limit,
            "cut": len(sightings) >= limit}


def traffic(snapshot) -> dict:
    """The numbers the traffic view shows, from an eir.interfaces.metrics snapshot."""
    verdicts = dict.fromkeys(("WHITELISTED", "BLACKLISTED", "GREYLISTED", "UNKNOWN"), 0)
    others: dict[str, int] = {}  # every other answer: "command Result-Code"
    for key, count in snapshot.answers.items():
        command, code, status = key.split("|")
        if status != NO_EQUIPMENT_STATUS:  # a verdict, 5422 included (UNKNOWN)
            verdicts[status] = verdicts.get(status, 0) + count
        elif count:
            others[f"{command} {code}"] = others.get(f"{command} {code}", 0) + count
    buckets = snapshot.latency_buckets
    total = sum(buckets)
    return {"verdicts": verdicts, "others": others, "requests": snapshot.requests,
            "sbi": snapshot.sbi_verdicts, "sbi_connections": snapshot.sbi_connections,
            "observed": total,
            "mean_ms": snapshot.latency_sum / total * 1e3 if total else None,
            "p50_ms": _quantile_ms(buckets, 0.5), "p99_ms": _quantile_ms(buckets, 0.99),
            "peer_states": snapshot.peers, "version": snapshot.list_version}


def _quantile_ms(buckets: list[int], q: float) -> str:
    """The histogram bucket bound the q-quantile is under, as Prometheus would bound it."""
    total = sum(buckets)
    if not total:
        return "–"
    seen = 0
    for bound, count in zip((*LATENCY_BUCKETS, None), buckets):
        seen += count
        if seen >= q * total:
            return f"≤ {bound * 1e3:g} ms" if bound is not None else "> 1 s"
    return "> 1 s"
