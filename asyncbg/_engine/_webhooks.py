"""Receiving webhooks: verify, deduplicate, and wake the job so it fetches its result at once.

The endpoint faces the internet, so what a forger sends costs little: each body is limited
(``max_body``), and so is the sum of the bodies being read or handled at once
(``max_in_flight``): a flood of large forged bodies is answered 503 rather than held in memory.
Rejections are logged at debug level one by one, and as one warning per interval with a count,
so that an attack does not become thousands of log lines.
"""

from __future__ import annotations

import binascii
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from .. import _log
from .._asgi import ASGIApp, Receive, Scope, Send
from .._providers._base import WebhookEvent

__all__ = ["RejectionLog", "WebhookInbox", "webhook_app"]

#: How many webhook ids are remembered for deduplication. The SDK refuses deliveries older than
#: 300 s, so an id only needs remembering for that long; this bound is generous for that.
SEEN_LIMIT = 100_000
#: The largest delivery accepted: OpenAI's payloads carry only an id and a few fields.
MAX_BODY = 1024 * 1024
#: The most body bytes read or handled at once, across all requests (16 of the largest).
MAX_IN_FLIGHT = 16 * MAX_BODY
#: Seconds between two warnings about rejected deliveries.
WARN_EVERY = 60.0


class RejectionLog:
    """Rejected deliveries, logged one by one at debug level and as at most one warning per
    ``interval`` seconds: the first rejection after a quiet interval warns at once, later ones
    are counted into the next warning (``count``: rejections since the previous warning)."""

    __slots__ = ("_clock", "_count", "_next", "interval")

    def __init__(self, *, interval: float = WARN_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._count = 0
        self._next = -math.inf

    def rejected(self, status: int, reason: str, **fields: object) -> None:
        self._count += 1
        _log.debug("webhook.rejected", status_code=status, reason=reason, **fields)
        now = self._clock()
        if now < self._next:
            return
        _log.warning("webhook.rejections", count=self._count, last_status=status,
                     last_reason=reason, hint=f"at most one such warning every "
                     f"{self.interval:g} s; each rejection is logged at debug level")
        self._count = 0
        self._next = now + self.interval


class Verifier(Protocol):
    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secret: str | None
    ) -> WebhookEvent: ...


class WebhookInbox:
    """A manager's webhook state: verification, the ids already seen, counters."""

    def __init__(self, verifier: Verifier, secret: str | None,
                 wake: Callable[[str], bool], *, log: RejectionLog | None = None) -> None:
        self.verifier = verifier
        self.secret = secret
        self.wake = wake
        self.log = log or RejectionLog()
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.accepted = 0
        self.rejected = 0

    async def handle(self, body: bytes, headers: Mapping[str, str]) -> int:
        """Verify and apply one delivery; returns the HTTP status to answer with."""
        headers = {k.lower(): v for k, v in headers.items()}
        webhook_id = headers.get("webhook-id", "")
        try:
            event = self.verifier.verify_webhook(body, headers, self.secret)
        except (ValueError, TypeError, UnicodeError, binascii.Error) as exc:
            # InvalidWebhookSignatureError (a ValueError), stale, missing or malformed headers
            self.rejected += 1
            self.log.rejected(400, str(exc), webhook_id=webhook_id)
            return 400
        if webhook_id in self.seen:
            self.rejected += 1
            self.log.rejected(409, "replay: this webhook-id was already handled",
                              webhook_id=webhook_id)
            return 409
        self.seen[webhook_id] = None
        if len(self.seen) > SEEN_LIMIT:
            self.seen.popitem(last=False)
        self.accepted += 1
        # A response's event names it; a batch's event names every live job of the batch.
        ids = tuple(getattr(event, "response_ids", ()) or ()) or (
            (event.response_id,) if event.response_id is not None else ())
        if not event.terminal or not ids:
            _log.info("webhook.ignored", webhook_id=webhook_id, type=event.type)
            return 200
        for rid in ids:
            if self.wake(rid):
                _log.info("webhook.received", webhook_id=webhook_id, response_id=rid,
                          type=event.type)
            else:
                _log.info("webhook.unknown_response", webhook_id=webhook_id, response_id=rid,
                          type=event.type)
        return 200


class _Handler(Protocol):
    def handle_webhook(
        self, body: bytes, headers: Mapping[str, str]
    ) -> Awaitable[int]: ...


def webhook_app(manager: _Handler, *, max_body: int = MAX_BODY,
                max_in_flight: int = MAX_IN_FLIGHT) -> ASGIApp:
    """An ASGI app that receives OpenAI webhooks for ``manager``.

    Mount it in Starlette/FastAPI (``app.mount("/openai-webhooks", webhook_app(mgr))``) or serve
    it with uvicorn. Each POST answers 200, or 4xx for a forged, stale or replayed delivery, and
    413 for a body over ``max_body`` bytes (refused before it is read whole). While the bodies
    being read or handled already add up to ``max_in_flight`` bytes, a POST is answered 503
    (OpenAI sends a delivery again later), so a flood of forged bodies holds bounded memory.
    """
    if max_in_flight < max_body:
        raise ValueError(f"max_in_flight ({max_in_flight}) must be at least max_body "
                         f"({max_body})")
    budget = BodyBudget(max_in_flight)
    log = RejectionLog()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        extra: list[tuple[bytes, bytes]] = []
        if scope["method"] != "POST":
            status = 405
        else:
            held = [0]
            try:
                body = await _read_limited(receive, headers, max_body, budget, held)
                if isinstance(body, bytes):
                    status = await manager.handle_webhook(body, headers)
                else:
                    status = body
                    if status == 503:
                        extra.append((b"retry-after", b"1"))
                    log.rejected(status, _REASONS[status])
            finally:
                budget.give(held[0])
        reply = json.dumps({"ok": status == 200}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": reply})

    return app


_REASONS = {413: "the body is larger than max_body",
            503: "the bodies in flight already add up to max_in_flight"}


class BodyBudget:
    """Bytes of request bodies held at once, across requests, up to ``limit``."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Hold ``n`` more bytes, if they fit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


async def _read_limited(receive: Receive, headers: Mapping[str, str], limit: int,
                        budget: BodyBudget, held: list[int]) -> bytes | int:
    """The request body, or the status that refuses it: 413 once it is known to exceed
    ``limit`` bytes, 503 when it does not fit in ``budget``. ``held[0]`` counts the bytes taken
    from the budget; the caller gives them back when the request is done."""
    declared = headers.get("content-length", "")
    if declared.isascii() and declared.isdigit():
        size = int(declared)
        if size > limit:
            return 413
        if not budget.take(size):  # refused before a byte is read
            return 503
        held[0] = size
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return 413
        if size > held[0]:  # more than declared (or nothing was): hold the rest too
            if not budget.take(size - held[0]):
                return 503
            held[0] = size
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)
