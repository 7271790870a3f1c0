"""What one HTTP request's failure means, and the text of any server's error body.

Every provider call makes one attempt; the scheduler decides about retries. The errors here
sort a failure into what the scheduler must know: could the request have reached the server
(a create sent again might be paid twice), may it be retried, when, and what did the server say,
whatever shape its error body has (OpenAI's ``{"error": {"message"}}``, FastAPI's
``{"detail": ...}``, ``{"errors": [...]}``, ``{"message"}``, or plain text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._policies import parse_retry_after

__all__ = [
    "NO_RETRY_CODES",
    "BadAnswer",
    "NoCredit",
    "NotFound",
    "Rejected",
    "RequestError",
    "Transient",
    "Unreachable",
    "error_text",
    "rate_limit_headers",
]


class RequestError(Exception):
    """One attempt at a request failed; ``message`` says how, in words for a user."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        limits: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        #: The answer's rate-limit headers, for pacing (see :func:`rate_limit_headers`).
        self.limits = limits


class Rejected(RequestError):
    """The server refused the request for good (a 4xx other than 404, 408 and 429)."""


class NoCredit(Rejected):
    """The account cannot be served at all (no credit, a hard billing limit, deactivated).

    Sent as a 429 by OpenAI (code ``insufficient_quota``) although retrying cannot help: every
    later request of the account meets the same answer until someone pays or fixes it.
    """


#: Error codes that say the account, not the request or the moment, is the problem: an answer
#: carrying one is never retried, whatever its HTTP status.
NO_RETRY_CODES = frozenset({
    "insufficient_quota", "billing_hard_limit_reached", "billing_not_active",
    "account_deactivated", "access_terminated",
})


class NotFound(Rejected):
    """404: the server does not know this id (for a response we created: it is lost)."""


class Transient(RequestError):
    """Worth retrying: 408, 429, 5xx, a timeout, or a connection dropped after sending.

    ``maybe_sent`` is True when the request may have reached the server (the connection broke
    after it was written): a create retried then may start a second, paid response.
    """

    def __init__(self, message: str, *, maybe_sent: bool = False, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.maybe_sent = maybe_sent


class Unreachable(RequestError):
    """No connection could be made (refused, DNS, TLS): the request never left this machine."""


class BadAnswer(RequestError):
    """The server answered something that is not a JSON object (an HTML page, say)."""


def error_text(body: bytes | str | Any, *, limit: int = 500) -> tuple[str | None, str | None]:
    """The message and code of an error body, whatever its shape; (None, None) if empty."""
    data: Any = body
    if isinstance(body, bytes | str):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        text = text.strip()
        if not text:
            return None, None
        try:
            data = json.loads(text)
        except ValueError:
            return _clip(text, limit), None
    return _from_json(data, limit)


def _from_json(data: Any, limit: int) -> tuple[str | None, str | None]:
    if isinstance(data, str):
        return _clip(data, limit), None
    if isinstance(data, list):
        parts = [m for m in (_from_json(item, limit)[0] for item in data) if m]
        return (_clip("; ".join(parts), limit) if parts else None), None
    if not isinstance(data, Mapping):
        return (_clip(json.dumps(data), limit) if data is not None else None), None
    code = data.get("code")
    code = code if isinstance(code, str) else None
    for name in ("error", "detail", "errors"):
        if name in data and data[name] not in (None, "", [], {}):
            message, inner = _from_json(data[name], limit)
            if message:
                return message, inner or code
    for name in ("message", "msg", "error_description", "title"):
        value = data.get(name)
        if isinstance(value, str) and value:
            where = data.get("loc")
            if isinstance(where, list) and where:
                value = f"{'.'.join(str(p) for p in where)}: {value}"
            return _clip(value, limit), code
    return _clip(json.dumps(data), limit), code


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The headers that say how much of a rate limit is left (``x-ratelimit-*``, Retry-After)."""
    found = {
        k.lower(): v for k, v in headers.items()
        if k.lower().startswith("x-ratelimit-") or k.lower() in ("retry-after", "retry-after-ms")
    }
    return found or None


def _error_type(body: bytes | Any) -> str | None:
    """The ``error.type`` of an OpenAI-shaped error body, when it names a no-retry code."""
    data: Any = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except ValueError:
            return None
    error = data.get("error") if isinstance(data, Mapping) else None
    kind = error.get("type") if isinstance(error, Mapping) else None
    return kind if isinstance(kind, str) and kind in NO_RETRY_CODES else None


def classify_status(
    http_status: int, headers: Mapping[str, str], body: bytes | Any, what: str
) -> RequestError:
    """The error for an HTTP answer with a non-2xx status."""
    message, code = error_text(body)
    request_id = headers.get("x-request-id")
    text = message or f"HTTP {http_status} with no message"
    if code is None and http_status == 429:
        code = _error_type(body)  # OpenAI's quota answers may say it in "type" only
    if code in NO_RETRY_CODES:
        return NoCredit(f"{what}: HTTP {http_status} ({code}): {text}", http_status=http_status,
                        code=code, request_id=request_id)
    if http_status == 429 or http_status == 408 or http_status >= 500:
        return Transient(
            f"{what}: HTTP {http_status}: {text}", http_status=http_status, code=code,
            request_id=request_id, retry_after=parse_retry_after(headers),
            limits=rate_limit_headers(headers) if http_status == 429 else None,
        )
    kind = NotFound if http_status == 404 else Rejected
    return kind(text, http_status=http_status, code=code, request_id=request_id)
