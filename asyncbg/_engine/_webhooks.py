"""Receiving webhooks: verify, deduplicate, and wake the job so it fetches its result at once."""

from __future__ import annotations

import binascii
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from .. import _log
from .._asgi import ASGIApp, Receive, Scope, Send
from .._providers._base import WebhookEvent

__all__ = ["WebhookInbox", "webhook_app"]

#: How many webhook ids are remembered for deduplication. The SDK refuses deliveries older than
#: 300 s, so an id only needs remembering for that long; this bound is generous for that.
SEEN_LIMIT = 100_000
#: The largest delivery accepted: OpenAI's payloads carry only an id and a few fields.
MAX_BODY = 1024 * 1024


class Verifier(Protocol):
    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secret: str | None
    ) -> WebhookEvent: ...


class WebhookInbox:
    """A manager's webhook state: verification, the ids already seen, counters."""

    def __init__(self, verifier: Verifier, secret: str | None,
                 wake: Callable[[str], bool]) -> None:
        self.verifier = verifier
        self.secret = secret
        self.wake = wake
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
            _log.warning("webhook.rejected", webhook_id=webhook_id, reason=str(exc))
            return 400
        if webhook_id in self.seen:
            self.rejected += 1
            _log.warning("webhook.rejected", webhook_id=webhook_id,
                         reason="replay: this webhook-id was already handled")
            return 409
        self.seen[webhook_id] = None
        if len(self.seen) > SEEN_LIMIT:
            self.seen.popitem(last=False)
        self.accepted += 1
        if not event.terminal or event.response_id is None:
            _log.info("webhook.ignored", webhook_id=webhook_id, type=event.type)
            return 200
        if self.wake(event.response_id):
            _log.info("webhook.received", webhook_id=webhook_id,
                      response_id=event.response_id, type=event.type)
        else:
            _log.info("webhook.unknown_response", webhook_id=webhook_id,
                      response_id=event.response_id, type=event.type)
        return 200


class _Handler(Protocol):
    def handle_webhook(
        self, body: bytes, headers: Mapping[str, str]
    ) -> Awaitable[int]: ...


def webhook_app(manager: _Handler, *, max_body: int = MAX_BODY) -> ASGIApp:
    """An ASGI app that receives OpenAI webhooks for ``manager``.

    Mount it in Starlette/FastAPI (``app.mount("/openai-webhooks", webhook_app(mgr))``) or serve
    it with uvicorn. Each POST answers 200, or 4xx for a forged, stale or replayed delivery, and
    413 for a body over ``max_body`` bytes (refused before it is read whole).
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        if scope["method"] != "POST":
            status = 405
        else:
            body = await _read_limited(receive, headers, max_body)
            status = 413 if body is None else await manager.handle_webhook(body, headers)
        reply = json.dumps({"ok": status == 200}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": reply})

    return app


async def _read_limited(
    receive: Receive, headers: Mapping[str, str], limit: int
) -> bytes | None:
    """The request body, or None once it is known to exceed ``limit`` bytes."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)
