"""The status checks' own transport (asyncbg/_providers/_lean_wire.py) against the SDK.

Every answer in the corpus is sent byte for byte by a raw server, once to a status check over
the wire and once to the SDK's ``responses.retrieve`` (``lean_polls=False``): both must read it
the same way (the same ``Answer``, or the same kind of error). The corpus has what the wire
parses itself: chunked and compressed bodies, error statuses, bodies that are not JSON, answers
cut off, a connection closed after the answer, and a keep-alive connection the server dropped.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import pytest_asyncio

from asyncbg._http import RequestError
from asyncbg._providers._lean import LeanPoller, LeanTransportError, _wire_for
from asyncbg._providers._lean_wire import Wire
from asyncbg.providers import OpenAIResponses

pytestmark = pytest.mark.asyncio

LIVE = json.dumps({"id": "resp_1", "object": "response", "created_at": 1,
                   "status": "in_progress", "model": "m", "output": []}).encode()
DONE = json.dumps({"id": "resp_1", "object": "response", "created_at": 1,
                   "status": "completed", "model": "m",
                   "output": [{"type": "message", "id": "msg_1", "status": "completed",
                               "role": "assistant", "content": [
                                   {"type": "output_text", "text": "hï", "annotations": []}]}],
                   "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}).encode()
FAILED = json.dumps({"id": "resp_1", "object": "response", "created_at": 1, "status": "failed",
                     "model": "m", "output": [],
                     "error": {"code": "server_error", "message": "it broke"}}).encode()


def answer(status: str, body: bytes, *headers: str, length: bool = True) -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", "X-Request-Id: req_7",
            *headers]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


#: name -> what the server writes for one request (then, with "close", it hangs up)
CORPUS: dict[str, tuple[bytes, bool]] = {
    "live": (answer("200 OK", LIVE), False),
    "completed": (answer("200 OK", DONE), False),
    "failed": (answer("200 OK", FAILED), False),
    "poll-after": (answer("200 OK", LIVE, "openai-poll-after-ms: 2500"), False),
    "chunked": (answer("200 OK", chunked(DONE), "Transfer-Encoding: chunked", length=False),
                False),
    "gzip": (answer("200 OK", gzip.compress(DONE), "Content-Encoding: gzip"), False),
    "deflate": (answer("200 OK", zlib.compress(LIVE), "Content-Encoding: deflate"), False),
    "raw-deflate": (answer("200 OK", zlib.compress(LIVE)[2:-4], "Content-Encoding: deflate"),
                    False),
    "gzip-chunked": (answer("200 OK", chunked(gzip.compress(LIVE)), "Content-Encoding: gzip",
                            "Transfer-Encoding: chunked", length=False), False),
    "close-after": (answer("200 OK", LIVE, "Connection: close"), True),
    "read-until-close": (answer("200 OK", DONE, "Connection: close", length=False), True),
    "not-found": (answer("404 Not Found", json.dumps(
        {"error": {"message": "No response found", "type": "invalid_request_error",
                   "code": None}}).encode()), False),
    "rate-limited": (answer("429 Too Many Requests", json.dumps(
        {"error": {"message": "Slow down", "code": "rate_limit_exceeded"}}).encode(),
        "retry-after-ms: 1500"), False),
    "server-error-html": (answer("502 Bad Gateway", b"<html>bad gateway</html>"), False),
    "not-json": (answer("200 OK", b"<html>a proxy's page</html>"), False),
    "json-not-object": (answer("200 OK", b'["status"]'), False),
    "empty-200": (answer("200 OK", b""), False),
    "cut-off": (answer("200 OK", LIVE)[:-10], True),
    "headers-cut-off": (b"HTTP/1.1 200 OK\r\nContent-Len", True),
    "garbage": (b"SMTP ready\r\n\r\n", True),
}


@dataclass
class RawServer:
    """Answers every request with ``reply`` (and hangs up after it when ``close``)."""

    reply: bytes = b""
    close: bool = False
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(head)
                writer.write(self.reply)
                await writer.drain()
                if self.close:
                    return
        finally:
            writer.close()

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"


@pytest_asyncio.fixture
async def raw() -> AsyncIterator[RawServer]:
    state = RawServer()
    state.server = await asyncio.start_server(state.serve, "127.0.0.1", 0)
    try:
        yield state
    finally:
        state.server.close()


def _outcome(result: Any) -> Any:
    if isinstance(result, RequestError):
        # The kind of error and what the engine reads from it; messages name different layers.
        return (type(result).__name__, result.http_status, result.code, result.retry_after,
                getattr(result, "maybe_sent", None))
    # A live check does not read the id (the job knows it): only the status is read then.
    rid = None if not result.status.terminal else result.response_id
    return (result.status, rid, result.body, result.http_status,
            result.request_id, result.poll_after, result.error, result.error_code)


async def _check(provider: OpenAIResponses) -> Any:
    try:
        return await provider.check("resp_1")
    except RequestError as exc:
        return exc


@pytest.mark.parametrize("name", CORPUS)
async def test_a_check_over_the_wire_reads_what_the_sdk_reads(raw: RawServer, name: str) -> None:
    raw.reply, raw.close = CORPUS[name]
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=raw.base_url, max_retries=0,
                                timeout=5.0)
    lean = OpenAIResponses(client)
    sdk = OpenAIResponses(client, lean_polls=False)
    try:
        over_wire = await _check(lean)
        assert lean._lean is not None and lean._lean._wire is not None  # the wire was used
        assert lean._lean._wire.opened
        through_sdk = await _check(sdk)
    finally:
        if lean._lean:
            await lean._lean.aclose()
        await client.close()
    assert _outcome(over_wire) == _outcome(through_sdk)


async def test_the_request_is_the_sdks(raw: RawServer) -> None:
    raw.reply = answer("200 OK", LIVE)
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=raw.base_url, max_retries=0,
                                organization="org-1", default_headers={"X-Custom": "yes"})
    lean = LeanPoller.for_client(client)
    assert lean is not None and lean._wire is not None
    try:
        await client.responses.retrieve("resp_ä b")
        await lean.get("responses/resp_ä b")
    finally:
        await lean.aclose()
        await client.close()
    sdk, wire = (_request_of(head) for head in raw.requests)
    assert wire == sdk


def _request_of(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    line, *headers = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    return line, sorted((n.lower(), v) for n, v in (h.split(": ", 1) for h in headers))


async def test_keeps_one_connection_alive_and_replaces_one_the_server_dropped(
    raw: RawServer,
) -> None:
    raw.reply = answer("200 OK", LIVE)
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=raw.base_url)
    lean = LeanPoller.for_client(client)
    assert lean is not None and lean._wire is not None
    try:
        for _ in range(3):
            assert (await lean.get("responses/resp_1")).status == 200
        assert raw.connections == 1 and lean._wire.connections == 1
        raw.close = True  # the next answer ends its connection (a server's keep-alive timeout)
        await lean.get("responses/resp_1")
        raw.close = False
        # The closed connection is not reused; a new one is made, and nothing failed.
        assert (await lean.get("responses/resp_1")).status == 200
        assert raw.connections == 2 and len(raw.requests) == 5
    finally:
        await lean.aclose()
        await client.close()


async def test_a_connection_dropped_while_idle_is_retried_once_on_a_new_one() -> None:
    # The server closes the idle connection just as the next request is written: nothing of
    # an answer was read, so the GET goes again on a new connection, once.
    served: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(1)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer("200 OK", LIVE))
            await writer.drain()
            if len(served) == 1:
                await reader.readuntil(b"\r\n\r\n")  # the second request: hang up unanswered
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"http://127.0.0.1:{port}/v1")
    lean = LeanPoller.for_client(client)
    assert lean is not None
    try:
        assert (await lean.get("responses/resp_1")).status == 200
        assert (await lean.get("responses/resp_1")).status == 200
        assert len(served) == 2
    finally:
        await lean.aclose()
        await client.close()
        server.close()


async def test_an_answer_cut_off_is_not_sent_again(raw: RawServer) -> None:
    raw.reply, raw.close = CORPUS["cut-off"]
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=raw.base_url)
    lean = LeanPoller.for_client(client)
    assert lean is not None
    try:
        with pytest.raises(LeanTransportError):
            await lean.get("responses/resp_1")
    finally:
        await lean.aclose()
        await client.close()
    assert len(raw.requests) == 1


async def test_uses_aiohttp_where_it_cannot_decode_what_is_advertised() -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(sock_read=5)
    for codings, wire in [("gzip, deflate", True), ("gzip, deflate, br", False),
                          ("zstd", False), ("identity", True)]:
        made, _ = _wire_for("http://h/v1/", "h", {"accept-encoding": codings}, None, timeout,
                            5.0)
        assert (made is not None) is wire, codings
    made, _ = _wire_for("http://h/v1/", "h", {"x-bad": "a\r\nb"}, None, timeout, 5.0)
    assert made is None


async def test_tls_goes_through_the_sdks_context() -> None:
    client = openai.AsyncOpenAI(api_key="sk-test", base_url="https://api.example.com/v1")
    lean = LeanPoller.for_client(client)
    assert lean is not None and isinstance(lean._wire, Wire)
    ssl_context = client._client._transport._pool._ssl_context  # type: ignore[attr-defined]
    assert lean._wire._ssl is ssl_context
    assert lean._wire._server_hostname == "api.example.com" and lean._wire._port == 443
    await client.close()
