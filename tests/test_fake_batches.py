"""The fake server's batch APIs, each driven through its official SDK and parsed by its types."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import anthropic
import httpx2
import openai
import pytest
import pytest_asyncio
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from openai.types import Batch, FileObject
from openai.types.responses import Response

from asyncbg.testing import (
    BatchTiming,
    FakeResponsesServer,
    FakeTransport,
    LatencyModel,
    UsageModel,
    asgi_app,
    fake_anthropic_client,
    fake_client,
    fake_genai_client,
)

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> FakeResponsesServer:
    s = FakeResponsesServer(latency=LatencyModel.fixed(10.0), clock=clock,
                            usage=UsageModel(input_tokens=50, output_tokens=20,
                                             reasoning_tokens=5, cached_fraction=0.2))
    s.batches.timing = BatchTiming(validating=1.0, finalizing=1.0, cancelling=1.0, window=100.0)
    return s


@pytest_asyncio.fixture
async def oai(server: FakeResponsesServer) -> AsyncIterator[openai.AsyncOpenAI]:
    c = fake_client(server, max_retries=0)
    try:
        yield c
    finally:
        await c.close()


@pytest_asyncio.fixture
async def claude(server: FakeResponsesServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = fake_anthropic_client(server, max_retries=0)
    try:
        yield c
    finally:
        await c.close()


@pytest_asyncio.fixture
async def gemini(server: FakeResponsesServer) -> AsyncIterator[Any]:
    c = fake_genai_client(server)
    try:
        yield c
    finally:
        await c.aio.aclose()


# -- OpenAI Batch API ----------------------------------------------------------------------


def _line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
            "body": {"model": "gpt-5", "input": f"question {custom_id}", **body}}


async def _openai_batch(client: openai.AsyncOpenAI, lines: list[dict[str, Any]]) -> Batch:
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = await client.files.create(file=("in.jsonl", content), purpose="batch")
    assert isinstance(f, FileObject) and f.purpose == "batch" and f.bytes == len(content)
    assert (await client.files.retrieve(f.id)).filename == "in.jsonl"
    return await client.batches.create(input_file_id=f.id, endpoint="/v1/responses",
                                       completion_window="24h", metadata={"run": "t"})


async def _jsonl(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, Any]:
    assert file_id is not None
    text = (await client.files.content(file_id)).text
    return {x["custom_id"]: x for x in map(json.loads, text.splitlines())}


async def test_openai_batch_runs_to_completion(
    oai: openai.AsyncOpenAI, server: FakeResponsesServer, clock: Clock
) -> None:
    server.batches.script("slow", duration=20.0)
    batch = await _openai_batch(oai, [
        _line("ok"), _line("slow"), _line("boom", metadata={"fake_outcome": "failed"}),
        {**_line("bad"), "body": {"input": "no model"}},
    ])
    assert batch.status == "validating" and batch.metadata == {"run": "t"}
    assert batch.request_counts is not None and batch.request_counts.total == 0
    clock.now += 1.5
    b = await oai.batches.retrieve(batch.id)
    assert b.status == "in_progress" and b.in_progress_at is not None
    assert b.request_counts is not None and (b.request_counts.total, b.request_counts.failed) \
        == (4, 1)  # the invalid request fails at once
    clock.now += 10.0
    b = await oai.batches.retrieve(batch.id)
    assert b.request_counts is not None
    assert (b.request_counts.completed, b.request_counts.failed) == (1, 2)
    clock.now += 10.0
    b = await oai.batches.retrieve(batch.id)
    assert b.status == "finalizing" and b.finalizing_at is not None and b.output_file_id is None
    clock.now += 1.0
    b = await oai.batches.retrieve(batch.id)
    assert b.status == "completed" and b.completed_at is not None and b.usage is not None
    assert b.usage.input_tokens == 100 and b.usage.output_tokens_details.reasoning_tokens == 10

    out = await _jsonl(oai, b.output_file_id)
    assert set(out) == {"ok", "slow"}
    resp = Response.model_validate(out["ok"]["response"]["body"])
    assert resp.status == "completed" and resp.output_text == "echo: question ok"
    assert out["ok"]["response"]["status_code"] == 200 and out["ok"]["error"] is None
    assert out["ok"]["id"].startswith("batch_req_")
    err = await _jsonl(oai, b.error_file_id)
    assert err["boom"]["response"]["status_code"] == 500
    assert err["bad"]["response"]["status_code"] == 400
    assert err["bad"]["response"]["body"]["error"]["param"] == "model"
    c = server.counters
    assert (c.file_uploads, c.batch_creates, c.batch_polls, c.result_fetches) == (1, 1, 4, 2)
    assert c.batch_requests == {batch.id: 4}
    assert server.snapshot()["batch_requests"] == {batch.id: 4}


async def test_openai_batch_cancel_keeps_what_finished(
    oai: openai.AsyncOpenAI, server: FakeResponsesServer, clock: Clock
) -> None:
    server.batches.script("quick", duration=2.0)
    server.batches.script("never", outcome="stuck")
    batch = await _openai_batch(oai, [_line("quick"), _line("never")])
    clock.now += 5.0
    b = await oai.batches.cancel(batch.id)
    assert b.status == "cancelling" and b.cancelling_at is not None
    clock.now += 1.0
    b = await oai.batches.retrieve(batch.id)
    assert b.status == "cancelled" and b.cancelled_at is not None
    assert set(await _jsonl(oai, b.output_file_id)) == {"quick"}
    err = await _jsonl(oai, b.error_file_id)
    assert err["never"]["response"] is None
    assert err["never"]["error"]["code"] == "batch_cancelled"
    with pytest.raises(openai.BadRequestError, match="status 'cancelled'"):
        await oai.batches.cancel(batch.id)
    assert server.counters.batch_cancels == 2


async def test_openai_batch_expires_and_fails_validation(
    oai: openai.AsyncOpenAI, server: FakeResponsesServer, clock: Clock
) -> None:
    server.batches.script("never", outcome="stuck")
    expiring = await _openai_batch(oai, [_line("ok"), _line("never")])
    broken = await _openai_batch(oai, [_line("a"), _line("a")])
    clock.now += 100.0
    b = await oai.batches.retrieve(expiring.id)
    assert b.status == "expired" and b.expired_at is not None
    assert (await _jsonl(oai, b.error_file_id))["never"]["error"]["code"] == "batch_expired"
    b = await oai.batches.retrieve(broken.id)
    assert b.status == "failed" and b.errors is not None and b.errors.data is not None
    assert b.errors.data[0].code == "duplicate_custom_id" and b.errors.data[0].line == 2
    listed = [x.id async for x in oai.batches.list(limit=1)]
    assert listed == [broken.id, expiring.id]


async def test_openai_batch_routes_meet_faults(
    oai: openai.AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("429", route="batch_create", retry_after=3)
    with pytest.raises(openai.RateLimitError) as info:
        await _openai_batch(oai, [_line("a")])
    assert info.value.response.headers["retry-after"] == "3"
    assert server.counters.batch_creates == 0
    batch = await _openai_batch(oai, [_line("a")])
    server.inject("500", route="batch_retrieve")
    with pytest.raises(openai.InternalServerError):
        await oai.batches.retrieve(batch.id)
    server.inject("500", route="files")
    with pytest.raises(openai.InternalServerError):
        await oai.files.retrieve(batch.input_file_id)
    assert server.counters.faults == 3
    with pytest.raises(openai.NotFoundError):
        await oai.batches.retrieve("batch_missing")


# -- Anthropic Message Batches -------------------------------------------------------------


def _request(custom_id: str, **params: Any) -> Any:
    return {"custom_id": custom_id, "params": {
        "model": "claude-sonnet-4-5", "max_tokens": 1024,
        "messages": [{"role": "user", "content": f"question {custom_id}"}], **params}}


async def _results(
    client: anthropic.AsyncAnthropic, batch_id: str
) -> dict[str, MessageBatchIndividualResponse]:
    decoder = await client.messages.batches.results(batch_id)
    results = {r.custom_id: r async for r in decoder}
    assert all(isinstance(r, MessageBatchIndividualResponse) for r in results.values())
    return results


async def test_anthropic_batch_runs_to_completion(
    claude: anthropic.AsyncAnthropic, server: FakeResponsesServer, clock: Clock
) -> None:
    server.batches.script("boom", outcome="failed")
    server.batches.script("short", outcome="incomplete")
    bad: Any = {"custom_id": "bad", "params": {"model": "claude-sonnet-4-5", "messages": []}}
    batch = await claude.messages.batches.create(
        requests=[_request("ok"), _request("boom"), _request("short", max_tokens=8), bad])
    assert isinstance(batch, MessageBatch) and batch.id.startswith("msgbatch_")
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 4 and batch.request_counts.succeeded == 0
    with pytest.raises(anthropic.AnthropicError, match="finished processing"):
        await claude.messages.batches.results(batch.id)
    clock.now += 12.0
    b = await claude.messages.batches.retrieve(batch.id)
    assert b.processing_status == "ended" and b.ended_at is not None
    counts = b.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (0, 2, 2)

    results = await _results(claude, batch.id)
    ok = results["ok"].result
    assert ok.type == "succeeded"
    assert ok.message.content[0].type == "text"
    assert ok.message.content[0].text == "echo: question ok"
    assert ok.message.stop_reason == "end_turn" and ok.message.usage.output_tokens == 20
    assert (ok.message.usage.input_tokens, ok.message.usage.cache_read_input_tokens) == (40, 10)
    short = results["short"].result
    assert short.type == "succeeded" and short.message.stop_reason == "max_tokens"
    assert short.message.usage.output_tokens == 8
    boom = results["boom"].result
    assert boom.type == "errored" and boom.error.error.type == "api_error"
    invalid = results["bad"].result
    assert invalid.type == "errored" and invalid.error.error.type == "invalid_request_error"
    c = server.counters
    # results() retrieves the batch first, for its results_url
    assert (c.batch_creates, c.batch_polls, c.result_fetches) == (1, 3, 1)


async def test_anthropic_batch_cancel_and_expiry(
    claude: anthropic.AsyncAnthropic, server: FakeResponsesServer, clock: Clock
) -> None:
    server.batches.script("quick", duration=2.0)
    server.batches.script("never", outcome="stuck")
    cancelled = await claude.messages.batches.create(
        requests=[_request("quick"), _request("never")])
    expiring = await claude.messages.batches.create(requests=[_request("never")])
    clock.now += 5.0
    b = await claude.messages.batches.cancel(cancelled.id)
    assert b.processing_status == "canceling" and b.cancel_initiated_at is not None
    clock.now += 1.0
    b = await claude.messages.batches.retrieve(cancelled.id)
    assert b.processing_status == "ended"
    assert (b.request_counts.succeeded, b.request_counts.canceled) == (1, 1)
    results = await _results(claude, cancelled.id)
    assert results["quick"].result.type == "succeeded"
    assert results["never"].result.type == "canceled"
    with pytest.raises(anthropic.BadRequestError):
        await claude.messages.batches.cancel(cancelled.id)

    clock.now += 100.0
    b = await claude.messages.batches.retrieve(expiring.id)
    assert b.processing_status == "ended" and b.request_counts.expired == 1
    assert (await _results(claude, expiring.id))["never"].result.type == "expired"
    page = await claude.messages.batches.list(limit=1)
    assert [x.id for x in page.data] == [expiring.id] and page.has_more
    assert [x.id async for x in claude.messages.batches.list(limit=1)] == [
        expiring.id, cancelled.id]


async def test_anthropic_batch_routes_meet_faults(
    claude: anthropic.AsyncAnthropic, server: FakeResponsesServer, clock: Clock
) -> None:
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        await claude.messages.batches.create(requests=[_request("not ok!")])
    server.inject("429", route="batch_create")
    with pytest.raises(anthropic.RateLimitError) as info:
        await claude.messages.batches.create(requests=[_request("a")])
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"] == {"type": "rate_limit_error",
                                        "message": "Rate limit reached; retry later."}
    batch = await claude.messages.batches.create(requests=[_request("a")])
    clock.now += 20.0
    server.inject("500", route="batch_results")
    with pytest.raises(anthropic.InternalServerError):
        await claude.messages.batches.results(batch.id)
    assert len(await _results(claude, batch.id)) == 1
    # The SDK's own retries see the fault through.
    retrying = fake_anthropic_client(server, max_retries=2)
    try:
        server.inject("503", route="batch_retrieve", retry_after=0.001)
        assert (await retrying.messages.batches.retrieve(batch.id)).id == batch.id
    finally:
        await retrying.close()
    assert server.counters.faults == 3
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.batches.retrieve("msgbatch_missing")


# -- Gemini Batch Mode ---------------------------------------------------------------------


def _inlined(key: str, **metadata: str) -> genai_types.InlinedRequest:
    return genai_types.InlinedRequest(
        contents=f"question {key}", metadata={"key": key, **metadata},
        config=genai_types.GenerateContentConfig(max_output_tokens=1000))


async def test_gemini_batch_runs_to_completion(
    gemini: Any, server: FakeResponsesServer, clock: Clock
) -> None:
    job = await gemini.aio.batches.create(
        model="gemini-2.5-flash",
        src=[_inlined("ok"), _inlined("boom", fake_outcome="failed"),
             _inlined("odd", fake_duration="soon")],
        config={"display_name": "eval"})
    assert isinstance(job, genai_types.BatchJob) and (job.name or "").startswith("batches/")
    assert job.state == genai_types.JobState.JOB_STATE_PENDING and job.display_name == "eval"
    assert job.model == "models/gemini-2.5-flash" and job.dest is None
    clock.now += 1.5
    job = await gemini.aio.batches.get(name=job.name)
    assert job.state == genai_types.JobState.JOB_STATE_RUNNING
    clock.now += 11.0
    job = await gemini.aio.batches.get(name=job.name)
    assert job.state == genai_types.JobState.JOB_STATE_SUCCEEDED and job.end_time is not None
    assert job.dest is not None and job.dest.inlined_responses is not None
    ok, boom, odd = job.dest.inlined_responses
    assert ok.response is not None and ok.response.text == "echo: question ok"
    assert ok.metadata == {"key": "ok"}
    usage = ok.response.usage_metadata
    assert usage is not None and (usage.prompt_token_count, usage.candidates_token_count,
                                  usage.thoughts_token_count) == (50, 20, 5)
    assert boom.error is not None and boom.error.code == 13 and boom.response is None
    assert odd.error is not None and odd.error.code == 3 and "fake_duration" in str(odd.error)
    c = server.counters
    assert (c.batch_creates, c.batch_polls, c.result_fetches) == (1, 2, 1)


async def test_gemini_batch_cancel_expiry_and_list(
    gemini: Any, server: FakeResponsesServer, clock: Clock
) -> None:
    server.batches.script("quick", duration=2.0)
    server.batches.script("never", outcome="stuck")
    cancelled = await gemini.aio.batches.create(
        model="gemini-2.5-flash", src=[_inlined("quick"), _inlined("never")])
    expiring = await gemini.aio.batches.create(model="gemini-2.5-flash", src=[_inlined("never")])
    clock.now += 5.0
    await gemini.aio.batches.cancel(name=cancelled.name)
    clock.now += 1.0
    job = await gemini.aio.batches.get(name=cancelled.name)
    assert job.state == genai_types.JobState.JOB_STATE_CANCELLED
    quick, never = job.dest.inlined_responses
    assert quick.response is not None and never.error is not None and never.error.code == 1
    with pytest.raises(genai_errors.ClientError) as info:
        await gemini.aio.batches.cancel(name=cancelled.name)
    assert info.value.status == "FAILED_PRECONDITION"
    clock.now += 100.0
    job = await gemini.aio.batches.get(name=expiring.name)
    assert job.state == genai_types.JobState.JOB_STATE_EXPIRED
    pager = await gemini.aio.batches.list(config={"page_size": 1})
    assert [j.name async for j in pager] == [expiring.name, cancelled.name]
    assert server.counters.batch_cancels == 2


async def test_gemini_batch_routes_meet_faults(
    gemini: Any, server: FakeResponsesServer
) -> None:
    server.inject("429", route="batch_create")
    with pytest.raises(genai_errors.ClientError) as info:
        await gemini.aio.batches.create(model="gemini-2.5-flash", src=[_inlined("a")])
    assert (info.value.code, info.value.status) == (429, "RESOURCE_EXHAUSTED")
    job = await gemini.aio.batches.create(model="gemini-2.5-flash", src=[_inlined("a")])
    server.inject("500", route="batch_retrieve")
    with pytest.raises(genai_errors.ServerError):
        await gemini.aio.batches.get(name=job.name)
    server.inject("reset", route="batch_cancel")
    with pytest.raises(httpx2.ReadError, match="reset"):
        await gemini.aio.batches.cancel(name=job.name)
    assert server.counters.faults == 3 and server.counters.batch_cancels == 0
    with pytest.raises(genai_errors.ClientError, match="NOT_FOUND"):
        await gemini.aio.batches.get(name="batches/missing")


# -- the server as a whole -----------------------------------------------------------------


async def test_restart_forgets_batches_and_asgi_serves_them(
    claude: anthropic.AsyncAnthropic, server: FakeResponsesServer
) -> None:
    batch = await claude.messages.batches.create(requests=[_request("a")])
    app = asgi_app(server)
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": f"/v1/messages/batches/{batch.id}",
             "query_string": b"", "headers": []}
    await app(scope, receive, send)
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["id"] == batch.id
    server.restart(keep_state=False)
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.batches.retrieve(batch.id)


async def test_one_server_serves_all_three_apis(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, gemini: Any,
    server: FakeResponsesServer, clock: Clock,
) -> None:
    openai_batch = await _openai_batch(oai, [_line("a")])
    claude_batch = await claude.messages.batches.create(requests=[_request("a")])
    gemini_job = await gemini.aio.batches.create(model="gemini-2.5-flash", src=[_inlined("a")])
    # google-genai calls the Gemini API's v1 by default, where OpenAI's /v1/batches is too;
    # a bare list answers both, each SDK reading its own fields.
    assert [b.id async for b in oai.batches.list()] == [openai_batch.id]
    assert [j.name async for j in await gemini.aio.batches.list()] == [gemini_job.name]
    # The same routes under v1beta, with a client wired by hand.
    beta = genai.Client(api_key="k", vertexai=False, http_options=genai_types.HttpOptions(
        base_url="http://fake.invalid", api_version="v1beta",
        async_client_args={"transport": FakeTransport(server)}))
    try:
        assert gemini_job.name is not None
        job = await beta.aio.batches.get(name=gemini_job.name)
        assert job.name == gemini_job.name
        clock.now += 20.0
        job = await beta.aio.batches.get(name=gemini_job.name)
        assert job.state == "JOB_STATE_SUCCEEDED"
    finally:
        await beta.aio.aclose()
    assert (await oai.batches.retrieve(openai_batch.id)).status == "completed"
    assert (await claude.messages.batches.retrieve(claude_batch.id)).processing_status == "ended"
    assert server.counters.batch_creates == 3 and server.counters.creates == 0
