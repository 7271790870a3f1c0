"""A lean create sends what the SDK sends, byte for byte, and its answers read the same.

Each request shape of the corpus is created twice against one local aiohttp server that records
the request line, the headers and the body: once through the SDK (``lean_creates=False``, the
path asyncbg took before) and once through the lean path, whose ``_raw.create`` is replaced by
one that fails the test. The body must be the same bytes; headers are compared lower-cased as a
multiset (HTTP gives neither case nor order a meaning), with nothing allowed to differ.
"""

from __future__ import annotations

import datetime
import enum
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import pydantic
import pytest
import pytest_asyncio
from aiohttp import web

from asyncbg._http import BadAnswer, NoCredit, Rejected, RequestError, Transient, Unreachable
from asyncbg._providers import OpenAIResponses
from asyncbg._providers._lean_create import create_body, sdk_field_order
from asyncbg._status import JobStatus

QUEUED = {"id": "resp_1", "object": "response", "created_at": 1, "status": "queued",
          "model": "m", "output": []}

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "the city's name, e.g. \"Zürich\""},
        "population": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
        "coords": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"], "additionalProperties": False}]},
    },
    "required": ["name", "population", "tags", "coords"],
    "additionalProperties": False,
}

#: Real request shapes, as users write them (asyncbg adds ``background`` and ``store``).
CORPUS: dict[str, dict[str, Any]] = {
    "minimal": {"model": "gpt-5", "input": "Write a haiku about queues."},
    "tools": {
        "model": "gpt-5",
        "input": "What is the weather in Paris?",
        "tools": [
            {"type": "function", "name": "get_weather", "description": "Current weather.",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"], "additionalProperties": False},
             "strict": True},
            {"type": "web_search"},
            {"type": "file_search", "vector_store_ids": ["vs_123"], "max_num_results": 5},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "max_tool_calls": 4,
    },
    "structured-outputs": {
        "model": "gpt-5-mini",
        "input": [{"role": "user", "content": "Describe Zürich."}],
        "text": {"format": {"type": "json_schema", "name": "city", "schema": SCHEMA,
                            "strict": True}, "verbosity": "low"},
    },
    "reasoning": {
        "model": "o3",
        "input": "Prove that there are infinitely many primes.",
        "reasoning": {"effort": "high", "summary": "auto"},
        "max_output_tokens": 20000,
        "include": ["reasoning.encrypted_content", "web_search_call.action.sources"],
    },
    "metadata": {
        "model": "gpt-5",
        "input": "x",
        "metadata": {"customer": "c-42", "note": "ünïcödé ✓ \u2028 \"quoted\" \\ back"},
        "service_tier": "flex",
        "prompt_cache_key": "k1",
        "safety_identifier": "user-7",
    },
    "files-by-id": {
        "model": "gpt-5",
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "Summarize both."},
            {"type": "input_file", "file_id": "file-abc"},
            {"type": "input_image", "file_id": "file-img", "detail": "high"},
        ]}],
        "instructions": "You are terse.",
        "previous_response_id": "resp_prev",
        "temperature": 0.2,
        "top_p": 1,
        "truncation": "auto",
    },
    "extra-body": {
        # fields the SDK does not know by name travel in extra_body, after the known ones;
        # ``timeout`` is a body field here, not the SDK's request option
        "input": "x",
        "model": "gpt-5",
        "a_new_api_field": {"nested": [1, 2.5, None, True]},
        "timeout": 5,
    },
    "nulls-and-numbers": {
        "model": "gpt-5", "input": "x", "temperature": None, "top_logprobs": 0,
        "max_output_tokens": 10**12, "metadata": {}, "tools": [],
    },
    "conversation-prompt": {
        "model": "gpt-5", "conversation": "conv_1",
        "prompt": {"id": "pmpt_1", "version": "2", "variables": {"city": "Paris"}},
        "stream_options": {"include_obfuscation": False},
    },
}


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Recorder:
    base: str = ""
    seen: list[Seen] = field(default_factory=list)
    reply: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path,
                              sorted((k.decode().lower(), v.decode())
                                     for k, v in request.raw_headers), body))
        if self.reply is not None:
            return await self.reply(request)
        return web.json_response(QUEUED, headers={"x-request-id": "req_1",
                                                  "x-ratelimit-remaining-requests": "99"})


@pytest_asyncio.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield rec
    finally:
        await runner.cleanup()


class NotThroughTheSdk:
    """Stands in for ``_raw`` where a create must take the lean path."""

    async def create(self, **kwargs: Any) -> Any:
        raise AssertionError("the create went through the SDK")


def providers(base: str, **client_options: Any) -> tuple[OpenAIResponses, OpenAIResponses]:
    """(through the SDK, lean) on two clients built alike."""
    def client() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key="sk-test", base_url=f"{base}/v1", **client_options)

    sdk = OpenAIResponses(client(), lean_creates=False)
    lean = OpenAIResponses(client())
    lean._raw = NotThroughTheSdk()  # type: ignore[assignment]
    return sdk, lean


async def close(*provs: OpenAIResponses) -> None:
    for prov in provs:
        await prov.aclose()
        await prov.client.close()


async def both(rec: Recorder, params: dict[str, Any], **client_options: Any) -> tuple[Any, Any]:
    """Create ``params`` (prepared as the engine prepares them) through both paths: what each
    answered or raised."""
    sdk, lean = providers(rec.base, **client_options)
    out: list[Any] = []
    try:
        for prov in (sdk, lean):
            try:
                out.append(await prov.create(prov.prepare(params, stream=False)))
            except RequestError as exc:
                out.append(exc)
    finally:
        await close(sdk, lean)
    return out[0], out[1]


@pytest.mark.asyncio
@pytest.mark.parametrize("params", CORPUS.values(), ids=CORPUS.keys())
async def test_same_request_as_the_sdk(recorder: Recorder, params: dict[str, Any]) -> None:
    sdk_answer, lean_answer = await both(recorder, params)
    sdk_seen, lean_seen = recorder.seen
    assert (lean_seen.method, lean_seen.target) == (sdk_seen.method, sdk_seen.target)
    assert lean_seen.headers == sdk_seen.headers
    assert lean_seen.body == sdk_seen.body
    assert lean_answer == sdk_answer
    assert lean_answer.status is JobStatus.QUEUED and lean_answer.request_id == "req_1"
    assert lean_answer.limits == {"x-ratelimit-remaining-requests": "99"}


@pytest.mark.asyncio
async def test_same_request_with_client_options(recorder: Recorder) -> None:
    options: dict[str, Any] = {
        "organization": "org-1", "project": "proj-1", "timeout": 20.0,
        "default_headers": {"X-Custom": "yes", "User-Agent": "my-app/1.0"},
        "default_query": {"feature": "a b"},
    }
    await both(recorder, CORPUS["tools"], **options)
    sdk_seen, lean_seen = recorder.seen
    assert (lean_seen.target, lean_seen.headers, lean_seen.body) == (
        sdk_seen.target, sdk_seen.headers, sdk_seen.body)
    assert lean_seen.target == "/v1/responses?feature=a+b"


class Color(enum.Enum):
    RED = "red"


class Model(pydantic.BaseModel):
    effort: str = "low"


#: Values only the SDK's transform or encoder can vouch for: these creates go through it.
NOT_PLAIN: dict[str, dict[str, Any]] = {
    "pydantic-model": {"reasoning": Model()},
    "enum": {"metadata": {"color": Color.RED}},
    "tuple": {"include": ("reasoning.encrypted_content",)},
    "date": {"metadata": {"when": datetime.date(2026, 1, 2)}},
    "omit": {"temperature": openai.omit},
    "int-keys": {"metadata": {1: "one"}},
    "str-subclass": {"instructions": type("S", (str,), {})("hi")},
}


@pytest.mark.parametrize("extra", NOT_PLAIN.values(), ids=NOT_PLAIN.keys())
def test_what_is_not_plain_json_goes_through_the_sdk(extra: dict[str, Any]) -> None:
    assert create_body({"model": "m", "input": "x", **extra}, ("model", "input")) is None


def test_nan_and_cycles_go_through_the_sdk() -> None:
    assert create_body({"model": "m", "temperature": float("nan")}, ("model",)) is None
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    assert create_body({"model": "m", "metadata": cyclic}, ("model",)) is None
    assert create_body({"model": "m", "stream": True}, ("model",)) is None


@pytest.mark.asyncio
async def test_sdk_field_order_is_the_sdks() -> None:
    order = await sdk_field_order()
    assert order is not None
    assert order[:2] == ("model", "service_tier")  # the SDK's literal order, not alphabetical
    assert "stream" not in order and "extra_body" not in order


class CountingSdk:
    """``_raw`` that counts the creates it sends."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.creates = 0

    async def create(self, **kwargs: Any) -> Any:
        self.creates += 1
        return await self.raw.create(**kwargs)


@pytest.mark.asyncio
async def test_a_pydantic_value_is_sent_by_the_sdk(recorder: Recorder) -> None:
    prov = OpenAIResponses(openai.AsyncOpenAI(api_key="sk", base_url=f"{recorder.base}/v1"))
    prov._raw = sdk = CountingSdk(prov._raw)  # type: ignore[assignment]
    try:
        answer = await prov.create(prov.prepare(
            {"model": "m", "input": "x", "reasoning": Model(effort="high")}, stream=False))
        assert sdk.creates == 1
        await prov.create(prov.prepare({"model": "m", "input": "x"}, stream=False))
        assert sdk.creates == 1  # the next, plain one is lean again
    finally:
        await close(prov)
    assert answer.status is JobStatus.QUEUED
    assert ("x-stainless-raw-response", "true") in recorder.seen[0].headers


# -- answers that are errors: read the same on both paths -------------------------------------


def error_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
    async def reply(request: web.Request) -> web.StreamResponse:
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, headers=headers,
                                content_type="text/html")
        return web.json_response(body, status=status, headers=headers)
    return reply


ERRORS: dict[str, tuple[int, Any, dict[str, str], type[RequestError]]] = {
    "rate-limited": (429, {"error": {"message": "Slow down", "code": "rate_limit_exceeded"}},
                     {"retry-after-ms": "1500", "x-request-id": "req_9",
                      "x-ratelimit-remaining-requests": "0"}, Transient),
    "garbage-retry-after": (429, {"error": {"message": "Slow", "code": None}},
                            {"retry-after": "NaN"}, Transient),
    "no-credit": (429, {"error": {"message": "No quota", "code": "insufficient_quota"}}, {},
                  NoCredit),
    "bad-request": (400, {"error": {"message": "Invalid 'store': false", "param": "store"}}, {},
                    Rejected),
    "server-error": (500, {"error": {"message": "boom"}}, {}, Transient),
    "html": (502, b"<html>bad gateway</html>", {}, Transient),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
async def test_errors_read_as_through_the_sdk(
    recorder: Recorder, case: tuple[int, Any, dict[str, str], type[RequestError]]
) -> None:
    status, body, headers, kind = case
    recorder.reply = error_reply(status, body, headers)
    sdk_error, lean_error = await both(recorder, {"model": "m", "input": "x", "store": False})
    assert type(sdk_error) is kind and type(lean_error) is kind
    assert vars(lean_error) == vars(sdk_error)
    assert lean_error.args == sdk_error.args


@pytest.mark.asyncio
async def test_a_200_that_is_not_json_reads_the_same(recorder: Recorder) -> None:
    recorder.reply = error_reply(200, b"<html>login</html>")
    sdk_error, lean_error = await both(recorder, {"model": "m", "input": "x"})
    assert type(lean_error) is type(sdk_error) is BadAnswer
    assert vars(lean_error) == vars(sdk_error)


@pytest.mark.asyncio
async def test_a_redirect_is_followed_by_the_sdk(recorder: Recorder) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/responses":
            raise web.HTTPTemporaryRedirect("/v2/responses")
        return web.json_response(QUEUED)

    recorder.reply = reply
    prov = OpenAIResponses(openai.AsyncOpenAI(api_key="sk", base_url=f"{recorder.base}/v1"))
    try:
        answer = await prov.create({"model": "m", "input": "x"})
    finally:
        await close(prov)
    assert answer.response_id == "resp_1"
    assert [s.target for s in recorder.seen] == ["/v1/responses", "/v1/responses",
                                                  "/v2/responses"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.asyncio
async def test_refused_is_unreachable_nothing_sent() -> None:
    _, lean = providers(f"http://127.0.0.1:{closed_port()}")
    try:
        with pytest.raises(Unreachable):
            await lean.create({"model": "m", "input": "x"})
    finally:
        await close(lean)


@pytest.mark.asyncio
async def test_a_connection_dropped_after_sending_may_have_created() -> None:
    async def drop(reader: Any, writer: Any) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    import asyncio

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, lean = providers(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(Transient) as caught:
            await lean.create({"model": "m", "input": "x"})
    finally:
        await close(lean)
        server.close()
        await server.wait_closed()
    assert caught.value.maybe_sent is True
