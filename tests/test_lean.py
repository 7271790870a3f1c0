"""LeanPoller: the same GET the SDK sends, over aiohttp, against real local servers.

The mirror test captures both requests on the wire, on one aiohttp server, and compares them.
What may differ, and why nothing else does:

- header-name case and order (HTTP says neither matters): names are compared lower-cased, as a
  multiset of (name, value) pairs;
- ``cookie``: each client keeps its own jar, as httpx2 does; these servers set no cookies, so it
  is absent on both sides and is compared too;
- nothing else. ``x-stainless-retry-count`` is ``0`` on both (a lean GET is never a retry; the
  SDK's own retries send 1, 2, ...), ``x-stainless-read-timeout`` comes from ``client.timeout``
  on both (a per-call ``timeout=`` is not offered), and an idempotency key is sent only with
  non-GET requests.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pytest
import pytest_asyncio
from aiohttp import web

from asyncbg._providers._lean import (
    LeanConnectError,
    LeanError,
    LeanPoller,
    LeanTransportError,
    RawAnswer,
    read_status,
)

BODY = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "status": "in_progress",
    "model": "m",
    "output": [],
}

#: Header names allowed to differ between the SDK's request and LeanPoller's (see the docstring).
MAY_DIFFER: frozenset[str] = frozenset()


@dataclass
class Seen:
    method: str
    target: str  # path and query, as sent
    headers: list[tuple[str, str]]
    peer_port: int


@dataclass
class Recorder:
    """An aiohttp server on 127.0.0.1 that records each request and answers with ``reply``."""

    base: str = ""
    seen: list[Seen] = field(default_factory=list)
    reply: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                sorted((k.decode().lower(), v.decode()) for k, v in request.raw_headers),
                peer[1] if peer else -1,
            )
        )
        if self.reply is not None:
            return await self.reply(request)
        return web.json_response(BODY)


@pytest_asyncio.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.base = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


def poller(client: openai.AsyncOpenAI) -> LeanPoller:
    lean = LeanPoller.for_client(client)
    assert lean is not None, "LeanPoller declined a client it should mirror"
    return lean


# -- the request on the wire -----------------------------------------------------------------

ClientFactory = Callable[[str], openai.AsyncOpenAI]

MIRRORED: dict[str, ClientFactory] = {
    "openai": lambda base: openai.AsyncOpenAI(api_key="sk-test", base_url=f"{base}/v1"),
    "openai-options": lambda base: openai.AsyncOpenAI(
        api_key="sk-test",
        base_url=f"{base}/v1/",
        organization="org-1",
        project="proj-1",
        default_headers={
            "X-Custom": "yes",
            "User-Agent": "my-app/1.0",
            "X-Stainless-Lang": openai.Omit(),  # type: ignore[dict-item]
        },
        default_query={"feature": "a b&c/d", "n": 3},
        timeout=20.0,
    ),
    "openai-timeout-object": lambda base: openai.AsyncOpenAI(
        api_key="sk-test", base_url=f"{base}/v1", timeout=httpx2.Timeout(30, connect=2.5)
    ),
    "openai-no-timeout": lambda base: openai.AsyncOpenAI(
        api_key="sk-test", base_url=f"{base}/v1", timeout=None
    ),
    "openai-authorization-header": lambda base: openai.AsyncOpenAI(
        api_key="sk-test", base_url=f"{base}/v1", default_headers={"Authorization": "Bearer other"}
    ),
    "azure-deployment": lambda base: openai.AsyncAzureOpenAI(
        api_key="az-key",
        api_version="2025-03-01-preview",
        azure_endpoint=base,
        azure_deployment="my-deployment",
    ),
    "azure-ad-token": lambda base: openai.AsyncAzureOpenAI(
        azure_ad_token="ad-token", api_version="2025-03-01-preview", base_url=f"{base}/openai"
    ),
    "azure-key-beats-default-header": lambda base: openai.AsyncAzureOpenAI(
        api_key="az-key",
        api_version="2025-03-01-preview",
        azure_endpoint=base,
        default_headers={"api-key": "from-defaults"},
        default_query={"extra": "1"},
    ),
}


def difference(sdk: Seen, lean: Seen) -> dict[str, Any]:
    """What differs between two captured requests, leaving out MAY_DIFFER."""
    out: dict[str, Any] = {}
    if (sdk.method, sdk.target) != (lean.method, lean.target):
        out["request line"] = (f"{sdk.method} {sdk.target}", f"{lean.method} {lean.target}")
    a = [h for h in sdk.headers if h[0] not in MAY_DIFFER]
    b = [h for h in lean.headers if h[0] not in MAY_DIFFER]
    if a != b:
        out["only from the SDK"] = [h for h in a if h not in b]
        out["only from LeanPoller"] = [h for h in b if h not in a]
    return out


@pytest.mark.asyncio
@pytest.mark.parametrize("make", MIRRORED.values(), ids=MIRRORED.keys())
@pytest.mark.parametrize("rid", ["resp_abc123", "resp_ä b:c@d,e"])
async def test_same_request_as_the_sdk(recorder: Recorder, make: ClientFactory, rid: str) -> None:
    client = make(recorder.base)
    lean = poller(client)
    try:
        await client.responses.retrieve(rid)
        answer = await lean.get(f"responses/{rid}")
    finally:
        await lean.aclose()
        await client.close()
    sdk_seen, lean_seen = recorder.seen
    assert difference(sdk_seen, lean_seen) == {}
    assert answer.status == 200
    assert lean.url(f"responses/{rid}") == recorder.base + lean_seen.target


@pytest.mark.asyncio
@pytest.mark.parametrize("make", [MIRRORED["openai"], MIRRORED["azure-deployment"]])
async def test_same_query_with_call_params(recorder: Recorder, make: ClientFactory) -> None:
    client = make(recorder.base)
    lean = poller(client)
    try:
        await client.responses.retrieve("resp_1", starting_after=3, include_obfuscation=False)
        # in the SDK's order (its params TypedDict's); the query keeps the order given
        await lean.get(
            "responses/resp_1", params={"include_obfuscation": "false", "starting_after": "3"}
        )
    finally:
        await lean.aclose()
        await client.close()
    sdk_seen, lean_seen = recorder.seen
    assert difference(sdk_seen, lean_seen) == {}


def test_headers_snapshot() -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")
        lean = poller(client)
        await client.close()
        assert lean.headers["authorization"] == "Bearer sk-test"
        assert lean.headers["accept"] == "application/json"
        assert lean.headers["x-stainless-async"] == "async:asyncio"
        assert lean.headers["x-stainless-retry-count"] == "0"
        assert "content-type" not in lean.headers
        assert "host" not in lean.headers
        assert all(name == name.lower() for name in lean.headers)

    asyncio.run(main())


# -- answers ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_answers_any_status_as_bytes(recorder: Recorder) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/missing"):
            return web.json_response({"error": {"message": "nope"}}, status=404)
        if request.path.endswith("/moved"):
            raise web.HTTPFound(location=f"{recorder.base}/v1/responses/resp_1")
        if request.path.endswith("/zipped"):
            body = gzip.compress(b'{"status":"queued"}')
            return web.Response(body=body, headers={"Content-Encoding": "gzip"})
        return web.json_response(BODY, headers={"X-Request-Id": "req_1"})

    recorder.reply = reply
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"{recorder.base}/v1")
    lean = poller(client)
    try:
        ok = await lean.get("responses/resp_1")
        missing = await lean.get("responses/missing")
        moved = await lean.get("responses/moved")
        zipped = await lean.get("responses/zipped")
    finally:
        await lean.aclose()
        await client.close()
    assert isinstance(ok, RawAnswer)
    assert ok.status == 200
    assert ok.headers["x-request-id"] == ok.headers["X-Request-Id"] == "req_1"
    assert read_status(ok.body) == "in_progress"
    assert missing.status == 404
    assert b"nope" in missing.body
    assert moved.status == 302  # not followed: the caller hands it to the SDK
    assert len(recorder.seen) == 4
    assert zipped.body == b'{"status":"queued"}'


@pytest.mark.asyncio
async def test_keeps_connections_alive(recorder: Recorder) -> None:
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"{recorder.base}/v1")
    lean = poller(client)
    try:
        for _ in range(3):
            await lean.get("responses/resp_1")
    finally:
        await lean.aclose()
        await client.close()
    assert len({seen.peer_port for seen in recorder.seen}) == 1


# -- failures --------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio
async def test_refused_is_a_connect_error() -> None:
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"http://127.0.0.1:{closed_port()}/v1")
    lean = poller(client)
    try:
        with pytest.raises(LeanConnectError, match=r"GET http://127\.0\.0\.1:\d+/v1/responses/r"):
            await lean.get("responses/r")
    finally:
        await lean.aclose()
        await client.close()


async def raw_server(
    on_request: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await on_request(reader, writer)
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.asyncio
async def test_dropped_connection_is_a_transport_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"status\":")
        await writer.drain()

    server = await raw_server(hang_up)
    port = server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"http://127.0.0.1:{port}/v1")
    lean = poller(client)
    try:
        with pytest.raises(LeanTransportError, match=r"/v1/responses/r") as caught:
            await lean.get("responses/r")
        assert isinstance(caught.value, LeanError)
        assert caught.value.__cause__ is not None
    finally:
        await lean.aclose()
        await client.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_read_timeout_is_a_transport_error() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes

    server = await raw_server(never_answer)
    port = server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(
        api_key="sk-test", base_url=f"http://127.0.0.1:{port}/v1", timeout=0.05
    )
    lean = poller(client)
    try:
        assert lean.headers["x-stainless-read-timeout"] == "0.05"
        with pytest.raises(LeanTransportError):
            await lean.get("responses/r")
    finally:
        await lean.aclose()
        await client.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_aclose_is_final_and_idempotent(recorder: Recorder) -> None:
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=f"{recorder.base}/v1")
    unused = poller(client)
    await unused.aclose()  # never opened a session
    lean = poller(client)
    try:
        assert "idle" in repr(lean)
        await lean.get("responses/resp_1")
        assert "open" in repr(lean)
    finally:
        await lean.aclose()
        await lean.aclose()
        await client.close()
    assert "closed" in repr(lean)
    with pytest.raises(LeanConnectError, match="closed"):
        await lean.get("responses/resp_1")


# -- when it declines ------------------------------------------------------------------------


class Subclass(openai.AsyncOpenAI):
    async def _prepare_request(self, request: httpx2.Request) -> None:
        request.headers["X-Signed"] = "1"


async def key_provider() -> str:
    return "sk-fresh"


DECLINED: dict[str, tuple[Callable[[], openai.AsyncOpenAI], str]] = {
    "custom http_client": (
        lambda: openai.AsyncOpenAI(
            api_key="sk", base_url="http://127.0.0.1:9/v1", http_client=httpx2.AsyncClient()
        ),
        "custom http_client",
    ),
    "DefaultAsyncHttpxClient": (
        lambda: openai.AsyncOpenAI(
            api_key="sk",
            base_url="http://127.0.0.1:9/v1",
            http_client=openai.DefaultAsyncHttpxClient(),
        ),
        "custom http_client",
    ),
    "api_key callable": (
        lambda: openai.AsyncOpenAI(api_key=key_provider, base_url="http://127.0.0.1:9/v1"),
        "callable",
    ),
    "azure ad token provider": (
        lambda: openai.AsyncAzureOpenAI(
            azure_ad_token_provider=key_provider,
            api_version="2025-03-01-preview",
            azure_endpoint="http://127.0.0.1:9",
        ),
        "token provider",
    ),
    "subclass": (
        lambda: Subclass(api_key="sk", base_url="http://127.0.0.1:9/v1"),
        "overrides _prepare_request",
    ),
    "not http": (
        lambda: openai.AsyncOpenAI(api_key="sk", base_url="ftp://127.0.0.1:9/v1"),
        "not http(s)",
    ),
    "no bearer credential": (
        lambda: openai.AsyncOpenAI(api_key="", admin_api_key="adm", base_url="http://h/v1"),
        "no credential",
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", DECLINED.values(), ids=DECLINED.keys())
async def test_declines_what_it_cannot_mirror(
    case: tuple[Callable[[], openai.AsyncOpenAI], str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    make, reason = case
    client = make()
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncbg"):
            assert LeanPoller.for_client(client) is None
    finally:
        await client.close()
    [record] = [r for r in caplog.records if r.name == "asyncbg"]
    assert record.levelno == logging.DEBUG
    assert reason in record.getMessage()


@pytest.mark.asyncio
async def test_declines_a_proxy_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    client = openai.AsyncOpenAI(api_key="sk", base_url="https://api.example.com/v1")
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncbg"):
            assert LeanPoller.for_client(client) is None
    finally:
        await client.close()
    assert "proxy" in caplog.text


@pytest.mark.asyncio
async def test_declines_without_aiohttp(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = openai.AsyncOpenAI(api_key="sk", base_url="http://127.0.0.1:9/v1")
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncbg"):
            assert LeanPoller.for_client(client) is None
    finally:
        await client.close()
    assert "aiohttp is not installed" in caplog.text


def test_declines_on_trio(caplog: pytest.LogCaptureFixture) -> None:
    trio = pytest.importorskip("trio")

    async def main() -> LeanPoller | None:
        client = openai.AsyncOpenAI(api_key="sk", base_url="http://127.0.0.1:9/v1")
        try:
            return LeanPoller.for_client(client)
        finally:
            await client.close()

    with caplog.at_level(logging.DEBUG, logger="asyncbg"):
        assert trio.run(main) is None
    assert "trio" in caplog.text


def test_declines_outside_an_event_loop() -> None:
    client = openai.AsyncOpenAI(api_key="sk", base_url="http://127.0.0.1:9/v1")
    assert LeanPoller.for_client(client) is None
    asyncio.run(client.close())


def test_verifies_tls_with_the_sdk_context() -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(api_key="sk", base_url="https://api.example.com/v1")
        lean = poller(client)
        await client.close()
        assert lean._ssl is client._client._transport._pool._ssl_context  # type: ignore[attr-defined]

    asyncio.run(main())


# -- reading the status ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"id":"r","object":"response","created_at":1,"status":"in_progress"}', "in_progress"),
        (b'{ "id" : "r" , "status" : "queued" }', "queued"),
        (b'{"output":[{"type":"message","status":"completed"}],"status":"in_progress"}',
         "in_progress"),
        (b'{"error":{"status":"x"},"note":"\\"status\\": \\"fake\\"","status":"failed"}',
         "failed"),
        (b'{"instructions":"say \\"status\\":\\"no\\"","status":"cancelled"}', "cancelled"),
        (b'{"status":"caf\\u00e9"}', "caf\u00e9"),  # escaped: decided by json.loads
        (b'{"id":"r","output":[]}', None),
        (b'{"status":null}', None),
        (b'{' + b",".join(b'"k%d":[%d]' % (i, i) for i in range(100)) + b',"status":"queued"}',
         "queued"),
    ],
)
def test_read_status(body: bytes, status: str | None) -> None:
    assert read_status(body) == status


@pytest.mark.parametrize("body", [b"not json", b'["status"]', b""])
def test_read_status_rejects_what_is_not_an_object(body: bytes) -> None:
    with pytest.raises(ValueError):
        read_status(body)


def test_advertises_only_codings_aiohttp_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import compression_utils

    from asyncbg._providers._lean import _decodable

    monkeypatch.setattr(compression_utils, "HAS_BROTLI", False)
    monkeypatch.setattr(compression_utils, "HAS_ZSTD", False)
    assert _decodable("gzip, deflate, br, zstd") == "gzip, deflate"
    monkeypatch.setattr(compression_utils, "HAS_BROTLI", True)
    assert _decodable("gzip, deflate, br;q=0.9, zstd") == "gzip, deflate, br;q=0.9"


@pytest.mark.asyncio
async def test_a_refused_connection_is_named_in_a_few_words() -> None:
    """What a user reads of a dead server: host:port and the OS's reason, whichever transport
    met it (aiohttp's error carries its whole connection key in its repr)."""
    import aiohttp

    from asyncbg._providers._lean import connect_reason
    from asyncbg._providers._lean_wire import Wire, WireConnectError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it once closed
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(f"http://127.0.0.1:{port}/v1")
    assert connect_reason(caught.value) == f"127.0.0.1:{port}: connection refused"
    wire = Wire(host="127.0.0.1", port=port, host_header=f"127.0.0.1:{port}", headers={},
                ssl_context=None, connect_timeout=10, read_timeout=10, keepalive=None)
    with pytest.raises(WireConnectError) as refused:
        await wire.get("/v1")
    assert refused.value.reason == f"127.0.0.1:{port}: connection refused"
    wire.close()
    assert connect_reason(TimeoutError(), "h", 443) == "h:443: timed out"
