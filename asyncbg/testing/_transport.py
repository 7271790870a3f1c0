"""Two ways to reach a FakeResponsesServer: an in-process httpx2 transport, and an ASGI app."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx2
import openai

from .._asgi import ASGIApp, Receive, Scope, Send, read_body
from ._server import FakeResponsesServer

__all__ = ["FakeTransport", "asgi_app", "fake_client"]


class _Stream(httpx2.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes], request: httpx2.Request) -> None:
        self._chunks = chunks
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except ConnectionResetError as exc:
            raise httpx2.ReadError(str(exc), request=self._request) from exc

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class FakeTransport(httpx2.AsyncBaseTransport):
    """Sends requests straight to a :class:`FakeResponsesServer`: no sockets, no ports."""

    def __init__(self, server: FakeResponsesServer) -> None:
        self.server = server

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        query = dict(parse_qsl(request.url.query.decode()))
        answer = await self.server.handle(request.method, request.url.path, query, body)
        if answer.delay:
            await anyio.sleep(answer.delay)
        if answer.reset or answer.reset_after:
            raise httpx2.ReadError("connection reset by the fake server", request=request)
        if answer.stream is not None:
            return httpx2.Response(
                answer.status, headers=answer.headers, stream=_Stream(answer.stream, request)
            )
        return httpx2.Response(answer.status, headers=answer.headers, content=answer.body)


def fake_client(server: FakeResponsesServer, **kwargs: Any) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` wired to ``server`` in-process. Close it with ``await client.close()``."""
    kwargs.setdefault("api_key", "sk-fake-asyncbg")
    kwargs.setdefault("base_url", "http://fake-openai.invalid/v1")
    kwargs.setdefault("webhook_secret", None)
    return openai.AsyncOpenAI(
        http_client=httpx2.AsyncClient(transport=FakeTransport(server)), **kwargs
    )


def asgi_app(server: FakeResponsesServer) -> ASGIApp:
    """The server as an ASGI application (``uvicorn`` serves it; see ``asyncbg fake-server``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["path"].startswith("/_fake/"):
            await _admin(server, scope, send)
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode()))
        answer = await server.handle(scope["method"], scope["path"], query, body)
        if answer.delay:
            await anyio.sleep(answer.delay)
        if answer.reset or answer.reset_after:
            # ASGI cannot drop a socket; announcing a body and then failing makes the server
            # close the connection mid-answer, which the client sees as a dropped connection.
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"1000")]})
            raise ConnectionResetError("fake server: injected connection reset")
        headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        if answer.stream is None:
            await send({"type": "http.response.body", "body": answer.body})
            return
        async for chunk in answer.stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


async def _admin(server: FakeResponsesServer, scope: Scope, send: Send) -> None:
    """``GET /_fake/counters`` and ``POST /_fake/reset``, for a server in another process."""
    route = (scope["method"], scope["path"])
    if route == ("GET", "/_fake/counters"):
        status, body = 200, json.dumps(server.snapshot()).encode()
    elif route == ("POST", "/_fake/reset"):
        server.counters.reset()
        status, body = 200, b"{}"
    else:
        status, body = 404, b'{"error": {"message": "unknown admin route"}}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
