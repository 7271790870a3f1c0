"""What the batch providers share besides the engine (:mod:`._batching`): the engine's view of
a poll of a batch and of one request's outcome, the body of an answer without a result, SDK
errors in asyncbg's terms, and requests as plain JSON.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2

from .._http import RequestError, Transient, Unreachable, classify_status
from .._status import JobStatus
from ._prepare import plain

__all__ = ["Remote", "Result", "plain", "sdk_error", "status_body",
           "verify_standard_webhook"]


@dataclass(frozen=True, slots=True)
class Result:
    """How one request of an ended batch ended: its status, body and the API's reason."""

    status: JobStatus
    body: bytes
    error: str | None = None
    error_code: str | None = None
    #: The HTTP status the API reports for this request (OpenAI's output lines), else 200.
    http_status: int = 200


@dataclass(frozen=True, slots=True)
class Remote:
    """One poll of a batch: where it stands, in the engine's terms."""

    #: The jobs' status while the batch runs (QUEUED, IN_PROGRESS); any once it has ended.
    status: JobStatus
    ended: bool
    #: The API's own status word, for messages and bodies (``in_progress``, ``canceling``...).
    raw_status: str
    #: How many requests the batch holds, when the API says.
    total: int | None = None
    #: What the API module needs to read the results (file ids, inlined responses...).
    handle: Any = None


def status_body(rid: str, batch_id: str, cid: str, status: str) -> bytes:
    """The body of an answer that carries no result: which batch, which request, what state."""
    return json.dumps({"id": rid, "object": "batch.request", "batch_id": batch_id,
                       "custom_id": cid, "status": status}).encode()


def sdk_error(exc: Exception, what: str, base_url: str) -> RequestError:
    """The :mod:`asyncbg._http` error for an ``APIStatusError`` or ``APIConnectionError`` of a
    Stainless-built SDK (``openai``, ``anthropic``: their exceptions have the same shape)."""
    status = getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    if isinstance(status, int) and response is not None:
        try:
            content: Any = response.content
        except httpx2.ResponseNotRead:  # a streamed answer: the SDK parsed its body
            content = getattr(exc, "body", None)
        return classify_status(status, response.headers, content, what)
    cause = exc.__cause__
    reason = str(cause or exc) or type(cause or exc).__name__
    if type(cause).__name__ in ("ConnectError", "ConnectTimeout"):
        return Unreachable(f"cannot connect to {base_url}: {reason}")
    return Transient(f"{what}: connection lost: {reason}", maybe_sent=True)


#: Seconds a delivery's timestamp may lie from now (the Standard Webhooks default, as the SDKs).
WEBHOOK_TOLERANCE = 300


def verify_standard_webhook(body: bytes, headers: Mapping[str, str], secret: str | None, *,
                            now: float | None = None) -> dict[str, Any]:
    """A delivery signed per Standard Webhooks (Gemini's static webhooks; OpenAI's are the
    same scheme), verified: its JSON payload. Raises ``ValueError`` for a forged, stale or
    malformed one.

    The signature is ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), the key
    being the base64-decoded part of a ``whsec_...`` secret; several may be given, space-
    separated, while a secret rotates.
    """
    if not secret:
        raise ValueError("no webhook secret to verify the delivery with")
    get = {k.lower(): v for k, v in headers.items()}.get
    wid, stamp, signatures = get("webhook-id"), get("webhook-timestamp"), get("webhook-signature")
    if not wid or not stamp or not signatures:
        raise ValueError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(stamp)
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True) if (
            secret.startswith("whsec_")) else secret.encode()
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"malformed webhook timestamp or secret: {exc}") from exc
    if abs((time.time() if now is None else now) - ts) > WEBHOOK_TOLERANCE:
        raise ValueError("the webhook's timestamp is more than 5 minutes away: stale or replayed")
    mac = hmac.new(key, b"%s.%d.%s" % (wid.encode(), ts, body), hashlib.sha256).digest()
    expected = base64.b64encode(mac).decode()
    if not any(hmac.compare_digest(part.partition(",")[2], expected)
               for part in signatures.split() if part.startswith("v1,")):
        raise ValueError("the webhook signature does not match")
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("the webhook payload is not a JSON object")
    return data
