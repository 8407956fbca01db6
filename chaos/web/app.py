"""The HTTP surface of ``swarmnet serve`` (Starlette, served by Hypercorn's trio worker).

    GET  /                         the page (plain HTML, CSS, JS from static/)
    GET  /api/runs                 every run of the runs directory
    GET  /api/run?run=KEY          one run: verdict per checker, faults, flagged messages
    GET  /api/run/report?run=KEY   its report.html, as it is (sandboxed: no script runs)
    GET  /api/run/journey?run=KEY&message=ID   one message's journey (chaos trace's view)
    GET  /api/nights               the nightly folders, night by night
    GET  /api/live                 the live runs, and the one watched by default
    GET  /api/live/stream?run=KEY  server-sent events: the whole state, then every round
    GET  /api/live/snapshot?run=KEY   the last round, as JSON
    POST /api/act                  kill|pause|resume|restart a node, partition two swarms, heal
    GET  /metrics                  Prometheus text format

Authority: the page only reads, except ``POST /api/act``, which the run's
controller carries out (its control token, read from the run directory).
So that no other page in the browser can act through this one, every POST
must carry the token this server made at start and put in the page it
serves (``X-Swarmnet-Token``), as JSON (a cross-site form cannot send either),
and an ``Origin`` that is this server's; every request must name this server
in ``Host`` (a DNS name re-bound to 127.0.0.1 is refused).  Bad input is a
4xx with a message; an unknown run 404; a run that cannot be acted on 409.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import trio
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from testnet import rundir

from . import detail, metrics, runs
from .live import Watcher

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_HEADER = "x-swarmnet-token"
NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
SWARM_ID = re.compile(r"^[0-9a-f]{16}$")
NODE_ACTIONS = ("kill", "pause", "resume", "restart")
ACTIONS = NODE_ACTIONS + ("partition", "heal")
ACT_TIMEOUT_S = 90.0  # a restart waits for the node to be ready again
READY_WAIT_S = 3.0
NAMED = "@named"  # the key of a run named on the command line outside the runs directory
REPORT_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Serving:
    """What the app works from: the runs directory, the watchers, the token it put in its page."""

    runs_dir: Path
    nursery: trio.Nursery
    named_run: Path | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    origins: set[str] = field(default_factory=set)  # filled in once the listening address is known
    index: runs.RunIndex = field(init=False)
    watchers: dict[str, Watcher] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = runs.RunIndex(self.runs_dir)
        if self.named_run is not None:
            key = self.index.key_of(self.named_run)
            self.named_key = key if key is not None else NAMED
        else:
            self.named_key = None

    def path_of(self, key: str) -> Path:
        if key == NAMED and self.named_run is not None and self.named_key == NAMED:
            return self.named_run
        return self.index.path_of(key)

    def default_live(self) -> str | None:
        return self.named_key or self.index.latest_live()

    def watcher(self, key: str) -> Watcher:
        """The watcher of run ``key``, started if none runs."""
        w = self.watchers.get(key)
        if w is None:
            path = self.path_of(key)
            if not (path / rundir.RUN_JSON).is_file():
                raise runs.UnknownRun(f"{key} has no run.json")
            w = self.watchers[key] = Watcher(path, key)

            async def watch() -> None:
                try:
                    await w.run_until_idle()
                finally:
                    if self.watchers.get(key) is w:
                        del self.watchers[key]

            self.nursery.start_soon(watch)
        w.touch()
        return w


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _run_key(request: Request) -> str:
    key = request.query_params.get("run")
    if not key:
        raise HTTPException(400, "name a run: ?run=KEY (a key from /api/runs)")
    if len(key) > 512 or "\x00" in key:
        raise HTTPException(400, "that is not a run key")
    return key


def _path(request: Request, key: str) -> Path:
    try:
        return _serving(request).path_of(key)
    except runs.UnknownRun as exc:
        raise HTTPException(404, str(exc)) from None


# --------------------------------------------------------------------------- pages and runs


async def index(request: Request) -> Response:
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(page.replace("{{TOKEN}}", _serving(request).token),
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                            "style-src 'self' 'unsafe-inline'; frame-src 'self'"})


async def list_runs(request: Request) -> Response:
    s = _serving(request)
    started = time.monotonic()
    rows = await trio.to_thread.run_sync(s.index.scan)
    out = [r.to_json() for r in rows]
    return JSONResponse({"root": str(s.index.root), "runs": out, "took_ms": round((time.monotonic() - started) * 1000)})


async def run_page(request: Request) -> Response:
    s = _serving(request)
    key = _run_key(request)
    path = _path(request, key)
    row = s.index.row(key) if key != NAMED else runs.read_row(key, path)
    return JSONResponse(await trio.to_thread.run_sync(detail.run_detail, path, row))


async def report(request: Request) -> Response:
    key = _run_key(request)
    path = _path(request, key) / "report.html"
    headers = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff"}
    try:
        text = await trio.to_thread.run_sync(lambda: path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return HTMLResponse("<!doctype html><meta charset=utf-8><body style='font-family:sans-serif'>"
                            "<p>This run has no report.html (only chaos runs write one; "
                            "<code>swarmnet check</code> makes the verdict of another run).</p>",
                            status_code=404, headers=headers)
    except OSError as exc:
        return HTMLResponse(f"<p>report.html cannot be read: {exc.strerror}</p>", status_code=404, headers=headers)
    return HTMLResponse(text, headers=headers)


async def journey(request: Request) -> Response:
    key = _run_key(request)
    path = _path(request, key)
    try:
        message = detail.check_message_key(request.query_params.get("message", ""))
    except detail.BadMessageKey as exc:
        raise HTTPException(400, str(exc)) from None
    out = await trio.to_thread.run_sync(detail.journey_html, path, message)
    return JSONResponse(out, status_code=200 if "html" in out else 404)


async def nights(request: Request) -> Response:
    s = _serving(request)

    def build() -> list[dict[str, Any]]:
        return runs.nights(s.index, s.index.scan())

    return JSONResponse({"folders": await trio.to_thread.run_sync(build)})


# --------------------------------------------------------------------------- live


async def live_runs(request: Request) -> Response:
    s = _serving(request)
    rows = await trio.to_thread.run_sync(s.index.scan)
    live = [{"key": r.key, "run_id": r.run_id, "nodes": r.nodes, "state": r.state, "scenario": r.scenario}
            for r in rows if r.live]
    default = s.default_live()
    if s.named_key == NAMED:
        live.insert(0, {"key": NAMED, "run_id": s.named_run.name if s.named_run else NAMED, "nodes": None,
                        "state": None, "scenario": None})
    return JSONResponse({"default": default, "runs": live})


def _live_watcher(request: Request) -> Watcher:
    s = _serving(request)
    key = request.query_params.get("run") or s.default_live()
    if not key:
        raise HTTPException(404, "no live network in this runs directory: start one with `swarmnet up` "
                                 "(or name one with `swarmnet serve --run-dir`)")
    try:
        return s.watcher(key)
    except runs.UnknownRun as exc:
        raise HTTPException(404, str(exc)) from None


async def live_snapshot(request: Request) -> Response:
    w = _live_watcher(request)
    with trio.move_on_after(READY_WAIT_S):
        await w.ready.wait()
    return JSONResponse({"seq": w.seq, "snapshot": w.snapshot, "events": list(w.events)[-50:]})


async def live_stream(request: Request) -> Response:
    w = _live_watcher(request)

    async def events() -> AsyncIterator[dict[str, str]]:
        with trio.move_on_after(READY_WAIT_S):
            await w.ready.wait()
        send, recv = w.subscribe()
        try:
            async with recv:
                async for msg in recv:
                    yield {"event": msg["type"], "data": json.dumps(msg, default=str)}
            # The watcher dropped a page that fell behind, or stopped: the page reconnects.
        finally:
            w.unsubscribe(send)

    return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- acting


def _check_origin(request: Request) -> None:
    s = _serving(request)
    token = request.headers.get(TOKEN_HEADER, "")
    if not secrets.compare_digest(token.encode(), s.token.encode()):
        raise HTTPException(403, "acting needs this page's token (reload the page served by `swarmnet serve`)")
    origin = request.headers.get("origin")
    if origin is not None and origin not in s.origins:
        raise HTTPException(403, f"requests from {origin} may not act on this network")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send the action as application/json")


async def act(request: Request) -> Response:
    _check_origin(request)
    s = _serving(request)
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object: {run, action, node | swarms}")
    action, key = body.get("action"), body.get("run")
    if action not in ACTIONS:
        raise HTTPException(400, f"action must be one of {', '.join(ACTIONS)}")
    if not isinstance(key, str) or not key:
        raise HTTPException(400, "name the run: 'run' (a key from /api/live)")
    path = _path(request, key)
    try:
        run = rundir.load_run(path)
    except rundir.RunDirError as exc:
        raise HTTPException(409, str(exc)) from None
    if action in NODE_ACTIONS:
        node = body.get("node")
        if not isinstance(node, str) or not NODE_NAME.match(node):
            raise HTTPException(400, f"{action} needs 'node': a node name such as n03")
        if node not in {n["name"] for n in run["nodes"]}:
            raise HTTPException(404, f"no node {node} in run {run['run_id']}")
        call, args, what = "node", {"what": action, "name": node}, f"{action} {node}"
    elif action == "partition":
        swarms = body.get("swarms")
        if (not isinstance(swarms, list) or len(swarms) != 2
                or not all(isinstance(x, str) and SWARM_ID.match(x) for x in swarms)):
            raise HTTPException(400, "partition needs 'swarms': two swarm ids, 16 hex digits each")
        if swarms[0] == swarms[1]:
            raise HTTPException(400, "partition needs two different swarms")
        call, args, what = "partition", {"swarms": [int(x, 16) for x in swarms]}, \
            f"partition between swarms {swarms[0][:6]}… and {swarms[1][:6]}…"
    else:
        call, args, what = "heal", {}, "heal every fault started from here or the CLI"
    w = s.watchers.get(key)
    if w is not None:
        w.add_event("action", f"asked the controller: {what}")
        w.wake()
    try:
        result = await rundir.control_call(run, path, call, timeout_s=ACT_TIMEOUT_S, **args)
    except rundir.ControlError as exc:
        if w is not None:
            w.add_event("action", f"{what}: refused: {exc}", "error")
            w.wake()
        raise HTTPException(409, str(exc)) from None
    if w is not None:
        w.add_event("action", f"{what}: done", "ok")
        w.wake()
    return JSONResponse({"action": action, "run": key, "result": result})


async def prometheus(request: Request) -> Response:
    s = _serving(request)
    key = request.query_params.get("run") or s.default_live()
    if key:
        try:
            w = s.watcher(key)
        except runs.UnknownRun as exc:
            raise HTTPException(404, str(exc)) from None
        with trio.move_on_after(READY_WAIT_S):
            await w.ready.wait()
    return Response(metrics.render(lambda: list(s.watchers.values())), media_type=metrics.CONTENT_TYPE)


# --------------------------------------------------------------------------- the app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail))


def make_app(serving: Serving, allowed_hosts: list[str]) -> Starlette:
    """The ASGI app over ``serving``; requests must name one of ``allowed_hosts``."""
    routes = [
        Route("/", index),
        Route("/api/runs", list_runs),
        Route("/api/run", run_page),
        Route("/api/run/report", report),
        Route("/api/run/journey", journey),
        Route("/api/nights", nights),
        Route("/api/live", live_runs),
        Route("/api/live/snapshot", live_snapshot),
        Route("/api/live/stream", live_stream),
        Route("/api/act", act, methods=["POST"]),
        Route("/metrics", prometheus),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error},
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)])
    app.state.serving = serving
    return app
