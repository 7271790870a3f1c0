"""Webhook delivery for the fake server, signed per the standard-webhooks scheme.

``client.webhooks.unwrap`` verifies these deliveries: the signature is
``v1,`` + base64(HMAC-SHA256(secret, f"{webhook_id}.{timestamp}.{body}")), where a secret of the
form ``whsec_<base64>`` is base64-decoded first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["WebhookTarget", "new_secret", "sign", "signed_delivery"]

#: Where deliveries go: a URL to POST to, or an async callable taking (body, headers), such as
#: ``BackgroundManager.handle_webhook``.
WebhookTarget = str | Callable[[bytes, Mapping[str, str]], Awaitable[object]]


def new_secret() -> str:
    """A fresh secret in OpenAI's ``whsec_`` format."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    signed = f"{webhook_id}.{timestamp}.{body.decode()}".encode()
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_delivery(
    secret: str, event_type: str, response_id: str, *, timestamp: int | None = None,
    webhook_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A signed delivery: the body and its headers."""
    ts = int(time.time()) if timestamp is None else timestamp
    wid = webhook_id or f"wh_{secrets.token_hex(12)}"
    body = json.dumps({
        "id": f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "created_at": ts,
        "type": event_type,
        "data": {"id": response_id},
    }).encode()
    headers = {
        "content-type": "application/json",
        "webhook-id": wid,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, wid, ts, body),
    }
    return body, headers
