"""Standard Webhooks signatures, as ``openai``'s ``client.webhooks.verify_signature`` checks them.

``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(key, f"{webhook_id}.{timestamp}.{body}")),
where the key is the base64-decoded part of a ``whsec_...`` secret (any other secret is used as
its UTF-8 bytes, as the SDK does). A fresh timestamp is signed on every attempt, so that a
receiver's replay window (five minutes in the SDK) accepts a retry made hours later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

__all__ = ["STATIC_HEADERS", "secret_key", "signed_headers"]

#: The headers every attempt carries besides its own three (a sender's session sends them).
STATIC_HEADERS = {"content-type": "application/json", "user-agent": "asyncbg-notify/1"}


def secret_key(secret: str) -> bytes:
    """The HMAC key of ``secret``; ``ValueError`` (without the secret in it) when unusable."""
    if not secret:
        raise ValueError("the notify secret is empty; pass secret='whsec_...' (or set "
                         "ASYNCBG_NOTIFY_SECRET for the command line)")
    if not secret.startswith("whsec_"):
        return secret.encode()
    try:
        key = base64.b64decode(secret[6:], validate=True)
    except binascii.Error:
        raise ValueError("the notify secret starts with whsec_ but the rest is not base64; "
                         "make one with asyncbg.testing.new_secret()") from None
    if not key:
        raise ValueError("the notify secret whsec_... holds no key")
    return key


def signed_headers(key: bytes, webhook_id: str, body: bytes,
                   timestamp: int | None = None) -> dict[str, str]:
    """The headers of one attempt: id, timestamp, signature (plus :data:`STATIC_HEADERS`)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(key, b"%s.%s.%s" % (webhook_id.encode(), ts.encode(), body), hashlib.sha256)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
    }
