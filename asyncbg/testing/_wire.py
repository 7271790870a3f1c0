"""What the fake server puts on the wire: answers, error bodies in three styles, routes."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FakeAnswer"]

#: How error bodies look: OpenAI's ``{"error": {...}}``, FastAPI's ``{"detail": ...}``, or a
#: ``text/plain`` message.
ErrorStyle = Literal["openai", "detail", "text"]
RouteName = Literal["create", "retrieve", "cancel"]

_JSON = "application/json"
_HTML = b"""<!DOCTYPE html>
<html><head><title>Sign in to continue</title></head>
<body><h1>Network access requires sign-in</h1>
<p>Your request was intercepted by the corporate proxy. Please sign in to continue.</p>
</body></html>
"""


@dataclass(slots=True)
class FakeAnswer:
    """What the server answers one request with; ``reset`` means the connection drops."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    reset: bool = False
    reset_after: bool = False
    delay: float = 0.0


def json_answer(status: int, body: Any, headers: dict[str, str] | None = None) -> FakeAnswer:
    return FakeAnswer(status, {"content-type": _JSON, **(headers or {})},
                      json.dumps(body).encode())


def error_answer(
    style: ErrorStyle, status: int, message: str, type_: str, param: str | None = None,
    code: str | None = None,
) -> FakeAnswer:
    """An error in ``style``. In the ``detail`` style, an error about one parameter comes as
    FastAPI's validation list, ``[{"loc": ["body", param], "msg": ..., "type": ...}]``."""
    if style == "text":
        return FakeAnswer(status, {"content-type": "text/plain; charset=utf-8"},
                          message.encode())
    if style == "detail":
        if param is None:
            return json_answer(status, {"detail": message})
        kind = "missing" if code == "missing_required_parameter" else "value_error"
        return json_answer(status, {"detail": [
            {"loc": ["body", param], "msg": message, "type": kind}]})
    return json_answer(status, {"error": {
        "message": message, "type": type_, "param": param, "code": code}})


def not_found(style: ErrorStyle, rid: str) -> FakeAnswer:
    return error_answer(style, 404, f"Response with id '{rid}' not found.",
                        "invalid_request_error")


def html_page() -> FakeAnswer:
    """A 200 that is not the API: what a misconfigured proxy answers."""
    return FakeAnswer(200, {"content-type": "text/html; charset=utf-8"}, _HTML)


def request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def route(method: str, path: str) -> tuple[RouteName | None, str]:
    """Which route ``path`` is, and the response id in it."""
    parts = path.rstrip("/").split("/")
    # ['', 'v1', 'responses', id?, 'cancel'?]; also accept a base URL without /v1.
    if len(parts) > 1 and parts[1] == "v1":
        parts = ["", *parts[2:]]
    if len(parts) < 2 or parts[1] != "responses":
        return None, ""
    if len(parts) == 2 and method == "POST":
        return "create", ""
    if len(parts) == 3 and method == "GET":
        return "retrieve", parts[2]
    if len(parts) == 4 and parts[3] == "cancel" and method == "POST":
        return "cancel", parts[2]
    return None, ""


async def cut(stream: AsyncIterator[bytes], after: int) -> AsyncIterator[bytes]:
    """A stream that drops its connection after ``after`` events."""
    sent = 0
    async for chunk in stream:
        if sent >= after:
            break
        yield chunk
        sent += 1
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
    raise ConnectionResetError("fake server: stream dropped")
