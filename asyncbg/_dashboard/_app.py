"""The dashboard's ASGI application: one page, live over server-sent events.

:class:`Board` owns the reading side: it opens the ledger's :class:`~._source.Source`, keeps a
:class:`~._tally.Tally` up to date on one task (every ``interval`` seconds) and the usage scan
on another, renders the live sections once per update, and wakes every open event stream with
them. Mounted in another application without its lifespan, the same work happens on demand when
a page or a stream asks for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import jinja2
import markupsafe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import _log
from .._ledgers import Ledger, LedgerError, SQLiteLedger
from ._actions import Actions, token_matches
from ._charts import bars, latency_labels
from ._pg_source import PostgresSource
from ._source import Source
from ._sqlite_source import SQLiteSource
from ._tally import Tally, View

__all__ = ["Board", "build_app", "open_source"]

_HERE = Path(__file__).parent
#: Request fields that carry the user's prompts, hidden unless ``show_prompts``.
PROMPT_FIELDS = frozenset({"input", "instructions", "messages", "prompt", "system", "contents",
                           "requests", "params", "request"})
_BODY_LIMIT = 64 * 1024  # bytes of a final body shown on a job's page
#: Live jobs listed on the page (every update sends them to every open page).
LIVE_ROWS_SHOWN = 300


def open_source(ledger: str | os.PathLike[str]) -> Source:
    """The reader of the ledger ``ledger`` names: a ``postgresql://`` URL or a journal path."""
    text = os.fspath(ledger)
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    if scheme in ("postgresql", "postgres"):
        return PostgresSource(text)
    if scheme is not None:
        raise LedgerError(f"{scheme}:// ledgers are not supported; pass a journal path or a "
                          "postgresql:// URL")
    return SQLiteSource(text)


def _writable_ledger(spec: str) -> Callable[[], Ledger]:
    def make() -> Ledger:
        if "://" in spec:
            from .._fleet import shared_ledger

            return shared_ledger(spec)
        return SQLiteLedger(spec)  # not exclusive: the run writing it goes on

    return make


# -- formatting -----------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "\N{EN DASH}"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m {seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h {seconds % 3600 // 60:02.0f}m"


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _hidden(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("(hidden: start the dashboard with --show-prompts)"
                    if k in PROMPT_FIELDS else _hidden(v)) for k, v in value.items()}
    return value


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_HERE / "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["duration"] = _duration
    env.filters["when"] = _when
    env.globals["bars"] = lambda *a, **k: markupsafe.Markup(bars(*a, **k))
    env.globals["latency_labels"] = latency_labels()
    env.globals["live_rows_shown"] = LIVE_ROWS_SHOWN
    env.globals["minute_labels"] = [f"-{59 - i}m" if i < 59 else "now" for i in range(60)]
    return env


# -- the board ------------------------------------------------------------------------------------


class Board:
    """The dashboard's state over one ledger; see the module docstring."""

    def __init__(self, source: Source, *, interval: float = 1.0, show_prompts: bool = False,
                 actions: Actions | None = None, token: str | None = None,
                 budget: float | None = None, tally: Tally | None = None) -> None:
        self.source = source
        self.tally = tally or Tally(source, budget=budget)
        self.interval = interval
        self.show_prompts = show_prompts
        self.actions = actions
        self.token = token
        self._env = _environment()
        self._lock = anyio.Lock()
        self._opened = False
        self._running = False
        self._changed = anyio.Event()
        self._version = 0
        self._html = ""
        self._view: View | None = None
        self._updated_at = -math.inf
        #: Where the app is mounted, with a trailing slash (links and the script use it).
        self.root = "/"

    # -- the life of the board --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the ledger, read what its indexes say, then keep the picture up to date until
        exit (the app's lifespan): live updates on one task, full scans on another."""
        self._running = True  # the scans run on their own task: not before the first page
        try:
            await self.refresh()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._updates)
                tg.start_soon(self._scans)
                yield
                tg.cancel_scope.cancel()
        finally:
            self._running = False
            await self.source.close()

    async def _updates(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            await self.refresh()

    async def _scans(self) -> None:
        while True:
            if await self._scan_once():
                await self.refresh(force=True)
            await anyio.sleep(0.25)

    async def _scan_once(self) -> bool:
        try:
            ran = await self.tally.scan()
            return await self.tally.update_usage() or ran
        except LedgerError as exc:
            self.tally.failed(exc)
            _log.warning("dashboard.read_failed", ledger=self.source.location, error=str(exc))
            return True

    async def refresh(self, *, force: bool = False) -> None:
        """Read what changed (unless the last read is younger than ``interval``), render the
        live sections and wake the streams."""
        async with self._lock:
            if not force and time.monotonic() - self._updated_at < self.interval * 0.5:
                return
            try:
                if not self._opened:
                    await self.source.open()
                    self._opened = True
                    await self.tally.start()
                else:
                    await self.tally.update()
                if not self._running:  # mounted without the lifespan: scan on demand too
                    await self._scan_once()
            except LedgerError as exc:
                if not self._opened:
                    raise
                self.tally.failed(exc)
                _log.warning("dashboard.read_failed", ledger=self.source.location, error=str(exc))
            self._updated_at = time.monotonic()
            self._view = self.tally.view()
            self._html = self.render("sections.html", view=self._view)
            self._version += 1
            self._changed.set()
            self._changed = anyio.Event()

    async def current(self, after: int = -1) -> tuple[int, str]:
        """The live sections newer than version ``after`` (waiting for the next update)."""
        while self._version <= after:
            if self._running:
                await self._changed.wait()
            else:  # mounted without the lifespan: update on demand
                await anyio.sleep(self.interval)
                await self.refresh()
        if not self._running and self._view is None:
            await self.refresh()
        return self._version, self._html

    def render(self, template: str, **context: Any) -> str:
        return self._env.get_template(template).render(
            board=self, actions=self.actions is not None, root=self.root, **context)

    # -- pages ------------------------------------------------------------------------------

    def _mounted(self, request: Request) -> None:
        self.root = str(request.scope.get("root_path", "")).rstrip("/") + "/"

    async def page(self, request: Request) -> Response:
        self._mounted(request)
        _, sections = await self.current()
        return HTMLResponse(self.render("page.html", sections=sections, view=self._view))

    async def sections(self, request: Request) -> Response:
        _, sections = await self.current()
        return HTMLResponse(sections)

    async def summary(self, request: Request) -> Response:
        """The same numbers as JSON (for scripts, and the tests)."""
        await self.current()
        view = self._view
        assert view is not None
        return JSONResponse({
            "ledger": view.location, "total": view.total, "by_status": dict(view.by_status),
            "finished": view.finished, "live": view.live, "eta_seconds": view.eta,
            "input_tokens": view.input_tokens, "output_tokens": view.output_tokens,
            "cost": view.cost, "failures": {f.code: f.count for f in view.failures},
            "workers": len(view.workers), "error": view.error})

    async def events(self, request: Request) -> Response:
        from sse_starlette.sse import EventSourceResponse

        async def stream() -> AsyncIterator[dict[str, str]]:
            seen = -1
            while True:
                seen, html = await self.current(seen)
                yield {"event": "update", "data": html}

        return EventSourceResponse(stream(), ping=15)

    async def job(self, request: Request) -> Response:
        self._mounted(request)
        key = request.path_params["key"]
        await self.current()
        try:
            detail = await self.source.detail(key)
        except LedgerError as exc:
            return HTMLResponse(self.render("error.html", message=str(exc)), status_code=503)
        if detail is None:
            return HTMLResponse(self.render("error.html", message=f"no job {key!r} in "
                                            f"{self.source.location}"), status_code=404)
        request_json = _json_or_text(detail.request)
        if not self.show_prompts:
            request_json = _hidden(request_json)
        body = detail.row.body
        shown = None if body is None else _json_or_text(body[:_BODY_LIMIT])
        usage = shown.get("usage") if isinstance(shown, dict) else None
        cost = None
        if isinstance(shown, dict) and isinstance(usage, dict) and shown.get("model"):
            from .._spend._pricing import PriceBook

            cost = PriceBook().cost(str(shown["model"]), usage,
                                    service_tier=shown.get("service_tier"))
        return HTMLResponse(self.render(
            "job.html", detail=detail, row=detail.row,
            request_text=json.dumps(request_json, indent=2, ensure_ascii=False),
            body_text=None if shown is None else json.dumps(shown, indent=2,
                                                            ensure_ascii=False),
            truncated=body is not None and len(body) > _BODY_LIMIT, usage=usage, cost=cost))

    # -- actions ----------------------------------------------------------------------------

    def _refused(self, request: Request) -> Response | None:
        if self.actions is None or self.token is None:
            return JSONResponse({"error": "read-only: start the dashboard with "
                                 "--allow-actions and ASYNCBG_DASHBOARD_TOKEN"}, 403)
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get(
            "x-asyncbg-token")
        if not token_matches(given, self.token):
            return JSONResponse({"error": "a wrong or missing token"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    async def cancel(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        assert self.actions is not None
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        keys = payload.get("keys") if isinstance(payload, dict) else None
        everything = isinstance(payload, dict) and payload.get("all") is True
        if not everything and not (isinstance(keys, list) and keys
                                   and all(isinstance(k, str) for k in keys)):
            return JSONResponse({"error": 'send {"keys": ["..."]} or {"all": true}'}, 400)
        try:
            # Every live job: from the indexes of unfinished jobs, no body is read.
            chosen = list(await self.source.live_keys()) if everything else keys
            assert chosen is not None
            done = await self.actions.cancel(chosen)
        except LedgerError as exc:
            return JSONResponse({"error": str(exc)}, 503)
        await self.refresh(force=True)
        return JSONResponse({"cancelled": done})

    async def retry_notifications(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        assert self.actions is not None
        try:
            count = await self.actions.retry_notifications()
        except LedgerError as exc:
            return JSONResponse({"error": str(exc)}, 503)
        await self.refresh(force=True)
        return JSONResponse({"retried": count})


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


def build_app(
    ledger: str | os.PathLike[str],
    *,
    show_prompts: bool,
    allow_actions: bool,
    token: str | None,
    client: Callable[[], Any] | None,
    interval: float,
    budget: float | None,
) -> Starlette:
    """What :func:`asyncbg.dashboard_app` returns (see there)."""
    spec = os.fspath(ledger)
    token = token if token is not None else os.environ.get("ASYNCBG_DASHBOARD_TOKEN") or None
    actions = None
    if allow_actions:
        if not token:
            raise ValueError("actions need a token: set ASYNCBG_DASHBOARD_TOKEN (or pass token=)")
        actions = Actions(open_ledger=_writable_ledger(spec), make_client=client or _openai)
    board = Board(open_source(spec), interval=interval, show_prompts=show_prompts,
                  actions=actions, token=token, budget=budget)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Mapping[str, Any]]:
        async with board.running():
            yield {}

    app = Starlette(routes=[
        Route("/", board.page),
        Route("/sections", board.sections),
        Route("/summary.json", board.summary),
        Route("/events", board.events),
        Route("/jobs/{key:path}", board.job),
        Route("/actions/cancel", board.cancel, methods=["POST"]),
        Route("/actions/retry-notifications", board.retry_notifications, methods=["POST"]),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ], lifespan=lifespan)
    app.state.board = board
    return app


def _openai() -> Any:
    import openai

    return openai.AsyncOpenAI(max_retries=0)
