"""The fake server's usage model, rate limits and wire variety, through the real SDK client."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from asyncbg.testing import (
    FakeRateLimit,
    FakeResponsesServer,
    LatencyModel,
    UsageModel,
    asgi_app,
    fake_client,
)
from asyncbg.testing._limits import format_duration

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kwargs: Any) -> FakeResponsesServer:
    """10 s responses: 2 s queued, then 8 s in progress."""
    kwargs.setdefault("latency", LatencyModel.fixed(10.0, queue_fraction=0.2))
    return FakeResponsesServer(clock=clock, **kwargs)


@pytest_asyncio.fixture
async def clients() -> AsyncIterator[list[openai.AsyncOpenAI]]:
    """Call ``connect(server)`` in a test; every client it made is closed afterwards."""
    made: list[openai.AsyncOpenAI] = []
    try:
        yield made
    finally:
        for c in made:
            await c.close()


@pytest.fixture
def connect(clients: list[openai.AsyncOpenAI]) -> Any:
    def connect(server: FakeResponsesServer) -> openai.AsyncOpenAI:
        clients.append(fake_client(server, max_retries=0))
        return clients[-1]
    return connect


def usage_of(response: Any) -> dict[str, Any] | None:
    return None if response.usage is None else response.usage.model_dump(exclude_unset=True)


def usage(inp: int, out: int, reasoning: int, cached: int = 0) -> dict[str, Any]:
    return {"input_tokens": inp,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": inp + out}


# -- usage -----------------------------------------------------------------------------------


async def test_default_usage_estimates_input_and_reports_openais_shape(
    clock: Clock, connect: Any
) -> None:
    c = connect(make(clock))
    r = await c.responses.create(model="m", input="x" * 400, background=True)
    assert r.usage is None  # queued
    clock.now += 10
    done = await c.responses.retrieve(r.id)
    assert usage_of(done) == usage(100, 1000, 800)


async def test_configured_usage_and_per_request_overrides(clock: Clock, connect: Any) -> None:
    c = connect(make(clock, usage=UsageModel(input_tokens=120, output_tokens=30,
                                             reasoning_tokens=70, cached_fraction=0.25)))
    a = await c.responses.create(model="m", input="hello", background=True)
    b = await c.responses.create(model="m", input="hello", background=True, metadata={
        "fake_input_tokens": "1000", "fake_output_tokens": "5", "fake_reasoning_tokens": "0",
        "fake_cached_tokens": "600"})
    clock.now += 10
    assert usage_of(await c.responses.retrieve(a.id)) == usage(120, 100, 70, cached=30)
    assert usage_of(await c.responses.retrieve(b.id)) == usage(1000, 5, 0, cached=600)
    with pytest.raises(openai.BadRequestError, match="fake_output_tokens"):
        await c.responses.create(model="m", input="x", background=True,
                                 metadata={"fake_output_tokens": "lots"})


async def test_spread_varies_counts_within_bounds_and_is_seeded(
    clock: Clock, connect: Any
) -> None:
    async def outputs(seed: int) -> list[int]:
        c = connect(make(clock, usage=UsageModel(output_tokens=200, reasoning_tokens=0,
                                                 spread=0.5, seed=seed),
                         latency=LatencyModel.fixed(0.0)))
        rs = [await c.responses.create(model="m", input="x", background=True)
              for _ in range(200)]
        return [r.usage.output_tokens for r in rs]

    first = await outputs(7)
    assert all(100 <= n <= 300 for n in first)
    assert min(first) < 120 and max(first) > 280  # it does spread, over the whole range
    assert 185 < sum(first) / len(first) < 215
    assert await outputs(7) == first
    assert await outputs(8) != first


async def test_usage_by_final_status(clock: Clock, connect: Any) -> None:
    c = connect(make(clock, usage=UsageModel(input_tokens=10, output_tokens=200,
                                             reasoning_tokens=800)))

    async def create(**kwargs: Any) -> Any:
        return await c.responses.create(model="m", input="x", background=True, **kwargs)

    capped_done = await create(max_output_tokens=600)
    incomplete = await create(metadata={"fake_outcome": "incomplete"})
    capped_incomplete = await create(max_output_tokens=300,
                                     metadata={"fake_outcome": "incomplete"})
    failed = await create(metadata={"fake_outcome": "failed"})
    queued_cancel = await create()
    await c.responses.cancel(queued_cancel.id)  # at +0: still queued, nothing used
    half_cancel = await create()
    clock.now += 6  # in progress from +2 to +10: half way
    cancelled = await c.responses.cancel(half_cancel.id)
    assert cancelled.status == "cancelled"
    assert usage_of(cancelled) == usage(10, 500, 400)
    clock.now += 10
    results = {r.id: await c.responses.retrieve(r.id) for r in
               (capped_done, incomplete, capped_incomplete, failed, queued_cancel)}
    assert usage_of(results[capped_done.id]) == usage(10, 600, 480)
    assert usage_of(results[incomplete.id]) == usage(10, 500, 400)
    assert usage_of(results[capped_incomplete.id]) == usage(10, 300, 240)
    assert results[failed.id].status == "failed" and results[failed.id].usage is None
    assert results[queued_cancel.id].usage is None


async def test_request_fields_are_echoed(clock: Clock, connect: Any) -> None:
    c = connect(make(clock))
    plain = await c.responses.with_raw_response.create(model="m", input="x", background=True)
    body = plain.http_response.json()
    assert body["service_tier"] == "default" and body["max_output_tokens"] is None
    assert "reasoning" not in body and "include" not in body
    raw = await c.responses.with_raw_response.create(
        model="m", input="x", background=True, service_tier="flex", max_output_tokens=64,
        reasoning={"effort": "high"}, instructions="be brief",
        include=["reasoning.encrypted_content"],
        extra_body={"background_options": {"priority": "low"}},
    )
    body = raw.http_response.json()
    assert body["service_tier"] == "flex" and body["max_output_tokens"] == 64
    assert body["reasoning"] == {"effort": "high"} and body["instructions"] == "be brief"
    assert body["include"] == ["reasoning.encrypted_content"]
    assert body["background_options"] == {"priority": "low"}
    auto = await c.responses.create(model="m", input="x", background=True, service_tier="auto")
    assert auto.service_tier == "default"  # the tier that served it


# -- rate limits -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0004, "1ms"), (0.12, "120ms"), (0.9999, "1s"), (1, "1s"), (1.5, "1.5s"),
     (17.92, "17.92s"), (60, "1m0s"), (90.5, "1m30.5s"), (360, "6m0s"), (3600, "1h0m0s"),
     (3723.25, "1h2m3.25s"), (-1, "0s")],
)
async def test_reset_durations_in_openais_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def limits(headers: httpx.Headers | Any, kind: str) -> tuple[str, str, str]:
    return tuple(headers[f"x-ratelimit-{k}-{kind}"]  # type: ignore[return-value]
                 for k in ("limit", "remaining", "reset"))


async def test_request_limit_refills_on_the_servers_clock(clock: Clock, connect: Any) -> None:
    server = make(clock, rate_limit=FakeRateLimit(requests_per_minute=3))
    c = connect(server)
    seen = []
    for _ in range(3):
        raw = await c.responses.with_raw_response.create(model="m", input="x", background=True)
        seen.append(limits(raw.headers, "requests"))
        assert "x-ratelimit-limit-tokens" not in raw.headers  # tokens are not limited
    assert seen == [("3", "2", "20s"), ("3", "1", "40s"), ("3", "0", "1m0s")]
    with pytest.raises(openai.RateLimitError) as info:
        await c.responses.create(model="m", input="x", background=True)
    answer = info.value.response
    assert answer.json() == {"error": {
        "message": "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1."
                   " Please try again in 20s. Visit https://platform.openai.com/account/"
                   "rate-limits to learn more.",
        "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    assert answer.headers["retry-after"] == "20" and answer.headers["retry-after-ms"] == "20000"
    assert limits(answer.headers, "requests") == ("3", "0", "1m0s")
    clock.now += 19.9
    with pytest.raises(openai.RateLimitError, match="try again in 100ms"):
        await c.responses.create(model="m", input="x", background=True)
    clock.now += 0.1
    raw = await c.responses.with_raw_response.create(model="m", input="x", background=True)
    assert limits(raw.headers, "requests") == ("3", "0", "1m0s")
    assert (server.counters.creates, server.counters.rate_limited) == (4, 2)
    assert server.snapshot()["rate_limited"] == 2


async def test_token_limit_counts_input_and_max_output(clock: Clock, connect: Any) -> None:
    server = make(clock, rate_limit=FakeRateLimit(tokens_per_minute=6000),
                  usage=UsageModel(output_tokens=100, reasoning_tokens=0))
    c = connect(server)
    # 100 input tokens + max_output_tokens 4900 = 5000 of 6000 (refilling 100/s)
    raw = await c.responses.with_raw_response.create(
        model="m", input="x" * 400, background=True, max_output_tokens=4900)
    assert limits(raw.headers, "tokens") == ("6000", "1000", "50s")
    assert "x-ratelimit-limit-requests" not in raw.headers
    # without max_output_tokens the usage model's output is the estimate: 100 + 100
    raw = await c.responses.with_raw_response.create(model="m", input="x" * 400,
                                                     background=True)
    assert limits(raw.headers, "tokens") == ("6000", "800", "52s")
    with pytest.raises(openai.RateLimitError) as info:
        await c.responses.create(model="m", input="x" * 400, background=True,
                                 max_output_tokens=900)  # 1000 > 800: 2 s short
    assert info.value.response.json()["error"]["type"] == "tokens"
    assert info.value.response.headers["retry-after-ms"] == "2000"
    with pytest.raises(openai.RateLimitError, match="Request too large") as info:
        await c.responses.create(model="m", input="x", background=True,
                                 max_output_tokens=7000)
    assert "retry-after" not in info.value.response.headers  # waiting cannot help
    clock.now += 2
    await c.responses.create(model="m", input="x" * 400, background=True,
                             max_output_tokens=900)
    assert (server.counters.creates, server.counters.rate_limited) == (3, 2)


async def test_per_second_form_admits_that_many_creates_a_second(
    clock: Clock, connect: Any
) -> None:
    server = make(clock, rate_limit=FakeRateLimit.per_second(5))
    c = connect(server)
    admitted = 0
    for step in range(301):  # 3 s in 10 ms steps, one create each
        clock.now = 1000.0 + step / 100
        try:
            await c.responses.create(model="m", input="x", background=True)
            admitted += 1
        except openai.RateLimitError:
            pass
    assert admitted == 5 + 3 * 5  # a one-second burst, then 5/s
    assert server.counters.rate_limited == 301 - admitted


async def test_polls_are_limited_only_when_asked(clock: Clock, connect: Any) -> None:
    server = make(clock, rate_limit=FakeRateLimit(requests_per_minute=1))
    c = connect(server)
    r = await c.responses.create(model="m", input="x", background=True)
    for _ in range(5):
        await c.responses.retrieve(r.id)
    server.rate_limit = FakeRateLimit(polls_per_minute=120, burst_seconds=1)  # 2/s, burst 2
    await c.responses.retrieve(r.id)
    await c.responses.cancel(r.id)
    with pytest.raises(openai.RateLimitError) as info:
        await c.responses.retrieve(r.id)
    assert info.value.response.headers["retry-after-ms"] == "500"
    clock.now += 0.5
    assert (await c.responses.retrieve(r.id)).status == "cancelled"
    assert server.counters.rate_limited == 1


# -- wire variety ----------------------------------------------------------------------------


async def test_detail_error_style(clock: Clock, connect: Any) -> None:
    c = connect(make(clock, error_style="detail"))
    with pytest.raises(openai.BadRequestError) as info:
        await c.responses.create(model="m", input="x", metadata={"fake_duration": "soon"})
    [item] = info.value.response.json()["detail"]
    assert item["loc"] == ["body", "metadata"] and item["type"] == "value_error"
    assert "fake_duration" in item["msg"]
    with pytest.raises(openai.BadRequestError) as info:
        await c.responses.create(model="", input="x")
    assert info.value.response.json()["detail"][0]["type"] == "missing"
    with pytest.raises(openai.NotFoundError) as missing:
        await c.responses.retrieve("resp_nope")
    assert missing.value.response.json() == {
        "detail": "Response with id 'resp_nope' not found."}


async def test_text_error_style(clock: Clock, connect: Any) -> None:
    server = make(clock, error_style="text")
    c = connect(server)
    server.inject("503")
    with pytest.raises(openai.InternalServerError) as info:
        await c.responses.create(model="m", input="x", background=True)
    answer = info.value.response
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.text == "The server had an error while processing your request."


async def test_html_fault_is_a_200_that_is_not_json(clock: Clock, connect: Any) -> None:
    server = make(clock)
    c = connect(server)
    server.inject("html", route="create")
    raw = await c.responses.with_raw_response.create(model="m", input="x", background=True)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/html")
    assert raw.http_response.text.startswith("<!DOCTYPE html>")
    assert server.counters.creates == 0 and server.counters.faults == 1


async def test_404_fault_on_a_response_that_exists(clock: Clock, connect: Any) -> None:
    server = make(clock)
    c = connect(server)
    r = await c.responses.create(model="m", input="x", background=True)
    server.inject("404", route="retrieve")
    with pytest.raises(openai.NotFoundError, match=r.id):
        await c.responses.retrieve(r.id)
    assert (await c.responses.retrieve(r.id)).status == "queued"
    server.inject("404", route="create")
    with pytest.raises(openai.NotFoundError) as info:
        await c.responses.create(model="m", input="x", background=True)
    assert info.value.code == "model_not_found" and server.counters.creates == 1


async def test_every_answer_has_a_unique_request_id(clock: Clock, connect: Any) -> None:
    server = make(clock)
    c = connect(server)
    ids = []
    raw = await c.responses.with_raw_response.create(model="m", input="x", background=True)
    ids.append(raw.headers["x-request-id"])
    ids.append((await c.responses.with_raw_response.retrieve(raw.parse().id))
               .headers["x-request-id"])
    server.inject("429", route="create", times=1)
    for request in (c.responses.retrieve("resp_nope"),  # 404
                    c.responses.create(model="m", input="x"),  # the 429
                    c.responses.create(model="", input="x")):  # 400
        with pytest.raises(openai.APIStatusError) as info:
            await request
        ids.append(info.value.response.headers["x-request-id"])
        assert info.value.request_id == ids[-1]
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == 5


async def test_max_live_caps_live_responses(clock: Clock, connect: Any) -> None:
    server = make(clock, max_live=2)
    c = connect(server)
    a = await c.responses.create(model="m", input="x", background=True)
    await c.responses.create(model="m", input="x", background=True,
                             metadata={"fake_duration": "4"})
    with pytest.raises(openai.RateLimitError) as info:
        await c.responses.create(model="m", input="x", background=True)
    assert info.value.code == "too_many_live_responses"
    assert info.value.response.headers["retry-after-ms"] == "4000"  # when the short one ends
    await c.responses.cancel(a.id)
    await c.responses.create(model="m", input="x", background=True)  # a's slot
    with pytest.raises(openai.RateLimitError):
        await c.responses.create(model="m", input="x", background=True)
    clock.now += 4
    await c.responses.create(model="m", input="x", background=True)
    assert (server.counters.creates, server.counters.max_live_rejected) == (4, 2)
    assert server.counters.rate_limited == 0 and server.live_count() == 2


@pytest.mark.parametrize("style", [None, "detail"])
async def test_background_stream_refusal_styles(
    clock: Clock, connect: Any, style: str | None
) -> None:
    c = connect(make(clock, refuse_background_stream=True, refuse_style=style))
    with pytest.raises(openai.BadRequestError) as info:
        await c.responses.create(model="m", input="x", background=True, stream=True)
    body = info.value.response.json()
    if style == "detail":
        assert body == {"detail": "Streaming is not supported for background responses on "
                                  "this server."}
    else:
        assert body["error"]["param"] == "stream"
        assert body["error"]["code"] == "unsupported_parameter"


async def test_asgi_answers_carry_the_same_headers_and_counters(clock: Clock) -> None:
    server = make(clock, rate_limit=FakeRateLimit(requests_per_minute=1), max_live=5)
    app = asgi_app(server)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://fake") as http:
        ok = await http.post("/v1/responses", json={"model": "m", "background": True})
        limited = await http.post("/v1/responses", json={"model": "m", "background": True})
        snapshot = (await http.get("/_fake/counters")).json()
    assert ok.status_code == 200 and limited.status_code == 429
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["retry-after"] == "60"
    assert ok.headers["x-request-id"] != limited.headers["x-request-id"]
    assert snapshot["rate_limited"] == 1 and snapshot["max_live_rejected"] == 0
    assert snapshot["creates"] == 1
