"""A webhook receiver for tests: the other end of ``BackgroundManager(notify=...)``.

    async with WebhookReceiver(secret) as receiver:
        notify = asyncbg.Notify(receiver.url, secret=secret)
        ...
        await receiver.wait_for(10)          # ten distinct notifications, verified
        receiver.answer(500)                  # from now on, fail every delivery
        receiver.answer(429, retry_after=2, times=1)
        await receiver.down(); await receiver.up()   # refuse connections for a while

An aiohttp server on 127.0.0.1 (a free port) that checks every delivery with ``openai``'s
``client.webhooks.verify_signature`` given the same secret, as a real receiver would, records
the verified ones it answered 2xx, and answers, stalls or goes away on command.
"""

from __future__ import annotations

import json
import socket
from collections import Counter, deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import openai
from aiohttp import web

__all__ = ["ReceivedWebhook", "WebhookReceiver"]


@dataclass(frozen=True, slots=True)
class ReceivedWebhook:
    """One delivery the receiver verified and answered 2xx."""

    webhook_id: str
    timestamp: int
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data

    @property
    def type(self) -> str:
        return str(self.payload["type"])

    @property
    def data(self) -> dict[str, Any]:
        data = self.payload["data"]
        assert isinstance(data, dict)
        return data


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    retry_after: float | None
    delay: float


class WebhookReceiver:
    """Receives signed webhooks on ``url`` (see the module docstring), on ``port`` or a free one.

    ``deliveries`` holds every verified delivery answered 2xx, duplicates included (a sender
    delivers at least once); ``attempts`` counts every request, ``rejected`` those whose
    signature did not verify (answered 400).
    """

    def __init__(self, secret: str, *, path: str = "/hooks", port: int = 0,
                 tolerance: int = 300) -> None:
        self.secret = secret
        self.path = path
        self.tolerance = tolerance
        self.deliveries: list[ReceivedWebhook] = []
        self.attempts = 0
        self.rejected = 0
        self._client = openai.OpenAI(api_key="unused", webhook_secret=secret)
        self._script: deque[tuple[_Answer, int | None]] = deque()
        self._default = _Answer(200, None, 0.0)
        self._changed = anyio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._port = port  # 0: a free one, kept across down() and up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}{self.path}"

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        # A stalled delivery is not waited for at exit: the sender has given up on it.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self.up()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        with anyio.CancelScope(shield=True):
            if self._runner is not None:
                await self._runner.cleanup()
            self._client.close()

    async def down(self) -> None:
        """Stop listening: deliveries meet a refused connection until :meth:`up`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def up(self) -> None:
        """Listen (again, on the same port)."""
        assert self._runner is not None, "use the receiver as `async with WebhookReceiver(...)`"
        if self._site is not None:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()

    # -- behaviour ------------------------------------------------------------------------------

    def answer(self, status: int = 200, *, times: int | None = None,
               retry_after: float | None = None, delay: float = 0.0) -> None:
        """Answer the next ``times`` deliveries (every one, with None) with ``status``, after
        ``delay`` seconds, with a ``Retry-After`` when given. Scripted answers are used in
        order; then the last unlimited one stays."""
        behaviour = _Answer(status, retry_after, delay)
        if times is None:
            self._script.clear()
            self._default = behaviour
        else:
            self._script.append((behaviour, times))

    def fail(self, *, times: int | None = None, status: int = 500) -> None:
        self.answer(status, times=times)

    def stall(self, seconds: float, *, times: int | None = None) -> None:
        """Hold deliveries ``seconds`` before answering (a sender's timeout cuts it short)."""
        self.answer(200, times=times, delay=seconds)

    def rate_limit(self, retry_after: float, *, times: int | None = None) -> None:
        self.answer(429, times=times, retry_after=retry_after)

    def gone(self) -> None:
        """Answer 410 Gone from now on: the sender must stop."""
        self.answer(410)

    def recover(self) -> None:
        """Answer 200 from now on."""
        self.answer(200)

    # -- what came ------------------------------------------------------------------------------

    def ids(self) -> Counter[str]:
        """How many times each ``webhook-id`` was delivered."""
        return Counter(d.webhook_id for d in self.deliveries)

    @property
    def duplicates(self) -> int:
        return len(self.deliveries) - len(self.ids())

    def by_key(self) -> dict[str, ReceivedWebhook]:
        """The latest delivery of each job key."""
        return {str(d.data["key"]): d for d in self.deliveries}

    async def wait_for(self, count: int, *, timeout: float = 10.0) -> list[ReceivedWebhook]:
        """Wait until ``count`` distinct notifications were delivered; returns all deliveries."""
        with anyio.fail_after(timeout):
            while len(self.ids()) < count:
                await self._changed.wait()
        return list(self.deliveries)

    # -- the endpoint ---------------------------------------------------------------------------

    def _next_answer(self) -> _Answer:
        if self._script:
            behaviour, times = self._script[0]
            if times is not None and times <= 1:
                self._script.popleft()
            else:
                self._script[0] = (behaviour, None if times is None else times - 1)
            return behaviour
        return self._default

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            self._client.webhooks.verify_signature(body, headers, secret=self.secret,
                                                   tolerance=self.tolerance)
        except (openai.InvalidWebhookSignatureError, ValueError) as exc:
            self.rejected += 1
            return web.Response(status=400, text=f"bad signature: {exc}")
        behaviour = self._next_answer()
        if behaviour.delay:
            await anyio.sleep(behaviour.delay)
        if 200 <= behaviour.status < 300:
            self.deliveries.append(ReceivedWebhook(
                headers["webhook-id"], int(headers["webhook-timestamp"]), headers, body))
            changed, self._changed = self._changed, anyio.Event()
            changed.set()
        extra = {} if behaviour.retry_after is None else {
            "retry-after": f"{behaviour.retry_after:g}"}
        return web.Response(status=behaviour.status, headers=extra)
