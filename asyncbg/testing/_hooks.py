"""The fake server's webhook delivery loop: one timer for all responses, a heap of due times."""

from __future__ import annotations

import heapq
import random
import socket
from collections.abc import Callable

import anyio
import anyio.abc
import httpx2

from ._state import Counters
from ._webhooks import WebhookTarget, signed_delivery


class WebhookSender:
    """Delivers one ``response.<status>`` event per response when it becomes due.

    ``take(response_id, now)`` answers the status to announce, or ``None`` when there is
    nothing to send (the response is gone, still live, or was announced already).
    """

    def __init__(
        self, target: WebhookTarget, secret: str, *, clock: Callable[[], float],
        take: Callable[[str, float], str | None], rng: random.Random, counters: Counters,
        drop_rate: float, duplicate_rate: float, delay: float,
    ) -> None:
        self.target = target
        self.secret = secret
        self.clock = clock
        self.take = take
        self.rng = rng
        self.counters = counters
        self.drop_rate = drop_rate
        self.duplicate_rate = duplicate_rate
        self.delay = delay
        self.heap: list[tuple[float, str]] = []
        self.wake = anyio.Event()
        self.http = (
            # TCP_NODELAY: a POST's headers and body go out in two writes, and Nagle's
            # algorithm with a delayed ACK would hold the body back ~40 ms.
            httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]))
            if isinstance(target, str) else None
        )

    def due(self, at: float, rid: str) -> None:
        heapq.heappush(self.heap, (at + self.delay, rid))
        self.wake.set()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    async def run(self) -> None:
        # Deliveries go out concurrently, as a real sender's do: a slow receiver must not
        # delay every other event behind it.
        async with anyio.create_task_group() as tg:
            await self._schedule(tg)

    async def _schedule(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            if not self.heap:
                await self.wake.wait()
                self.wake = anyio.Event()
                continue
            at, rid = self.heap[0]
            wait = at - self.clock()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self.wake.wait()
                if self.wake.is_set():
                    self.wake = anyio.Event()
                continue
            heapq.heappop(self.heap)
            status = self.take(rid, self.clock())
            if status is None:
                continue
            if self.rng.random() < self.drop_rate:
                self.counters.webhooks_dropped += 1
                continue
            body, headers = signed_delivery(self.secret, f"response.{status}", rid)
            copies = 2 if self.rng.random() < self.duplicate_rate else 1
            tg.start_soon(self._send_copies, body, headers, copies)

    async def _send_copies(self, body: bytes, headers: dict[str, str], copies: int) -> None:
        for _ in range(copies):
            await self.send(body, headers)

    async def send(self, body: bytes, headers: dict[str, str]) -> None:
        try:
            if self.http is not None:
                assert isinstance(self.target, str)
                answer = await self.http.post(self.target, content=body, headers=headers)
                ok = answer.status_code < 300
            else:
                assert not isinstance(self.target, str)
                result = await self.target(body, headers)
                ok = not isinstance(result, int) or result < 300
        except httpx2.HTTPError:
            ok = False
        if ok:
            self.counters.webhooks_sent += 1
        else:
            self.counters.webhooks_failed += 1
