from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import structlog
from openai import AsyncOpenAI

import asyncbg
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Undo what a test (the CLI's in-process ones, capture_logs) did to logging set-up."""
    std = logging.getLogger("asyncbg")
    level, propagate, handlers = std.level, std.propagate, list(std.handlers)
    yield
    std.setLevel(level)
    std.propagate = propagate
    std.handlers[:] = handlers
    structlog.reset_defaults()


#: A real, throwaway PostgreSQL (started by dev.py, or by the fixtures themselves).
pytest_plugins = ["tests.pg_fixtures"]

#: Polling and retries at test speed: the fake server's responses last tens of milliseconds.
FAST_POLL = asyncbg.PollPolicy(first_poll=0.005, min_interval=0.005, max_interval=0.02, jitter=0)
FAST_RETRY = asyncbg.RetryPolicy(max_attempts=30, base=0.001, max_backoff=0.01)


@pytest.fixture
def server() -> FakeResponsesServer:
    return FakeResponsesServer(latency=LatencyModel.fixed(0.03))


@pytest_asyncio.fixture
async def client(server: FakeResponsesServer) -> AsyncIterator[AsyncOpenAI]:
    c = fake_client(server)
    try:
        yield c
    finally:
        await c.close()


def manager(client: AsyncOpenAI, **kwargs: object) -> asyncbg.BackgroundManager:
    kwargs.setdefault("poll_policy", FAST_POLL)
    kwargs.setdefault("retry_policy", FAST_RETRY)
    kwargs.setdefault("max_concurrency", 8)
    return asyncbg.BackgroundManager(client, **kwargs)  # type: ignore[arg-type]


def meta(duration: float | None = None, outcome: str | None = None) -> dict[str, str]:
    """Per-request script for the fake server."""
    m = {}
    if duration is not None:
        m["fake_duration"] = str(duration)
    if outcome is not None:
        m["fake_outcome"] = outcome
    return m


class HeldClock:
    """The fake server's clock, which a test can stop: while held, no response moves on (a
    response's status is read off the clock), so "every job is live now" is a state the test
    makes rather than a race it hopes to win on a loaded machine."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._held_at: float | None = None

    def __call__(self) -> float:
        held_at = self._held_at
        return time.monotonic() - self._offset if held_at is None else held_at

    def hold(self) -> None:
        if self._held_at is None:
            self._held_at = self()

    def advance(self, seconds: float) -> None:
        """Move held time on by ``seconds`` (and keep it held)."""
        assert self._held_at is not None, "advance() is for a held clock"
        self._held_at += seconds

    def release(self) -> None:
        if self._held_at is not None:
            self._offset = time.monotonic() - self._held_at
            self._held_at = None


class CreateGate:
    """Holds create requests at the door, before the fake sees them, while it is shut: a test
    makes "these creates have left the client and are not answered yet" a state it controls.
    Open unless :meth:`shut`; ``waiting`` counts the creates held now."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.opened = threading.Event()
        self.opened.set()
        self.waiting = 0

    def shut(self) -> None:
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (not self.opened.is_set() and scope["type"] == "http"
                and scope["method"] == "POST" and scope["path"] == "/v1/responses"):
            self.waiting += 1
            try:
                await asyncio.to_thread(self.opened.wait)
            finally:
                self.waiting -= 1
        await self.app(scope, receive, send)


class HttpFake:
    """A fake server served by uvicorn on 127.0.0.1 inside the test's event loop."""

    def __init__(self, server: FakeResponsesServer, base_url: str, gate: CreateGate) -> None:
        self.server = server
        self.base_url = base_url
        self.gate = gate
        self.clock = HeldClock()
        server.clock = self.clock

    def hold(self) -> None:
        """Stop the server's time: live responses stay live until :meth:`release`."""
        self.clock.hold()

    def release(self) -> None:
        self.clock.release()


@pytest.fixture
def http_fake() -> Iterator[HttpFake]:
    """Served from its own thread and event loop: a pytest-asyncio fixture's setup and teardown
    run in different tasks, so a task group cannot span its ``yield``."""
    import uvicorn

    from asyncbg._asgi import listen
    from asyncbg.testing import asgi_app

    server = FakeResponsesServer(latency=LatencyModel.uniform(0.05, 0.3))
    sock = listen("127.0.0.1", 0)  # its connections send at once (TCP_NODELAY)
    gate = CreateGate(asgi_app(server))
    web = uvicorn.Server(uvicorn.Config(gate, log_level="error", lifespan="off"))
    thread = threading.Thread(target=asyncio.run, args=(web.serve([sock]),), daemon=True)
    thread.start()
    try:
        yield HttpFake(server, f"http://127.0.0.1:{sock.getsockname()[1]}/v1", gate)
    finally:
        gate.open()  # nothing left waiting at the door
        web.should_exit = True
        thread.join(timeout=10)
        sock.close()
