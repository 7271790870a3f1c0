"""Receiving webhooks: verify, deduplicate, and wake the job so it fetches its result at once."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

from ._asgi import ASGIApp, Receive, Scope, Send, read_body

if TYPE_CHECKING:
    from ._manager import BackgroundManager

__all__ = ["WebhookInbox", "webhook_app"]

_log = structlog.get_logger("asyncbg")

TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.failed", "response.cancelled", "response.incomplete"}
)
#: How many webhook ids are remembered for deduplication. The SDK refuses deliveries older than
#: 300 s, so an id only needs remembering for that long; this bound is generous for that.
SEEN_LIMIT = 100_000
#: Terminal events whose response id is not known yet (the webhook beat the create's answer).
EARLY_LIMIT = 10_000


class WebhookInbox:
    """A manager's webhook state: the ids already seen and the events that arrived early."""

    def __init__(self, manager: BackgroundManager, secret: str | None) -> None:
        self.manager = manager
        self.secret = secret
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.early: OrderedDict[str, None] = OrderedDict()
        self.accepted = 0
        self.rejected = 0

    async def handle(self, body: bytes, headers: Mapping[str, str]) -> int:
        """Verify and apply one delivery; returns the HTTP status to answer with."""
        headers = {k.lower(): v for k, v in headers.items()}
        webhook_id = headers.get("webhook-id", "")
        log = _log.bind(webhook_id=webhook_id)
        try:
            # Synchronous even on AsyncOpenAI: an HMAC over a small body, cheap enough inline.
            event = self.manager.client.webhooks.unwrap(body, headers, secret=self.secret)
        except ValueError as exc:  # InvalidWebhookSignatureError, stale, missing headers
            self.rejected += 1
            log.warning("webhook.rejected", reason=str(exc))
            return 400
        if webhook_id in self.seen:
            self.rejected += 1
            log.warning("webhook.rejected", reason="replay: this webhook-id was already handled")
            return 409
        self.seen[webhook_id] = None
        if len(self.seen) > SEEN_LIMIT:
            self.seen.popitem(last=False)
        self.accepted += 1
        event_type = getattr(event, "type", None)
        data = getattr(event, "data", None)
        response_id = getattr(data, "id", None)
        if event_type not in TERMINAL_EVENTS or not isinstance(response_id, str):
            log.info("webhook.ignored", type=event_type)
            return 200
        job = self.manager._by_response_id.get(response_id)
        if job is None:
            # Perhaps ours, and faster than the create's answer: remember it.
            self.early[response_id] = None
            if len(self.early) > EARLY_LIMIT:
                self.early.popitem(last=False)
            log.info("webhook.unknown_response", response_id=response_id, type=event_type)
            return 200
        log.info("webhook.received", key=job.key, response_id=response_id, type=event_type)
        job._wake()  # the job's runner wakes and fetches the final Response once
        return 200

    def claim_early(self, response_id: str) -> bool:
        """True (once) when a terminal webhook for this id arrived before the id was known."""
        if response_id in self.early:
            del self.early[response_id]
            return True
        return False



def webhook_app(manager: BackgroundManager) -> ASGIApp:
    """An ASGI app that receives OpenAI webhooks for ``manager``.

    Mount it in Starlette/FastAPI (``app.mount("/openai-webhooks", webhook_app(mgr))``) or serve
    it with uvicorn. Each POST answers 200, or 4xx for a forged, stale or replayed delivery.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["method"] != "POST":
            status = 405
        else:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            status = await manager.handle_webhook(body, headers)
        reply = json.dumps({"ok": status == 200}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": reply})

    return app
