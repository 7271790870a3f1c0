"""The batch providers end to end: each through its official SDK, against the fake server."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio
from anthropic.types import Message
from google.genai import types as genai_types
from openai.types.responses import Response

import asyncbg
from asyncbg import JobStatus
from asyncbg._spend._pricing import PriceBook
from asyncbg.providers import AnthropicBatches, GeminiBatches, OpenAIBatch, OpenAIResponses
from asyncbg.testing import (
    BatchTiming,
    FakeResponsesServer,
    LatencyModel,
    fake_anthropic_client,
    fake_client,
    fake_genai_client,
)

from .conftest import FAST_POLL, FAST_RETRY, HttpFake

pytestmark = pytest.mark.asyncio

#: Polling at test speed; the manager's own defaults let a burst of submits fill one batch.
BATCHING: dict[str, Any] = {
    "poll_policy": FAST_POLL, "retry_policy": FAST_RETRY, "max_concurrency": 1000,
}


@dataclass
class Api:
    """One batch API as the tests drive it: its provider, its requests, its result type."""

    name: str
    client: Any
    make: Callable[..., Any]
    request: Callable[[str], dict[str, Any]]
    result_type: type
    text: Callable[[Any], str]
    model: str

    def provider(self, **kw: Any) -> Any:
        kw.setdefault("batch_delay", 0.25)  # submits of one burst share a batch under load
        return self.make(self.client, **kw)


def _anthropic_request(key: str) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 256,
            "messages": [{"role": "user", "content": f"question {key}"}]}


def _gemini_request(key: str) -> dict[str, Any]:
    return {"model": "gemini-2.5-flash", "contents": f"question {key}",
            "config": genai_types.GenerateContentConfig(max_output_tokens=500)}


@pytest.fixture
def server() -> FakeResponsesServer:
    s = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    s.batches.timing = BatchTiming(validating=0.01, finalizing=0.01, cancelling=0.01)
    return s


@pytest_asyncio.fixture(params=["openai-batch", "anthropic", "gemini"])
async def api(request: pytest.FixtureRequest, server: FakeResponsesServer) -> AsyncIterator[Api]:
    if request.param == "openai-batch":
        oai = fake_client(server)
        try:
            yield Api("openai-batch", oai, OpenAIBatch,
                      lambda k: {"model": "gpt-5", "input": f"question {k}"}, Response,
                      lambda r: r.output_text, "gpt-5")
        finally:
            await oai.close()
    elif request.param == "anthropic":
        claude = fake_anthropic_client(server)
        try:
            yield Api("anthropic", claude, AnthropicBatches, _anthropic_request, Message,
                      lambda m: m.content[0].text, "claude-sonnet-4-5")
        finally:
            await claude.close()
    else:
        gemini = fake_genai_client(server)
        try:
            yield Api("gemini", gemini, GeminiBatches, _gemini_request,
                      genai_types.GenerateContentResponse, lambda r: r.text, "gemini-2.5-flash")
        finally:
            await gemini.aio.aclose()


class Boom(Exception):
    pass


# -- each provider -------------------------------------------------------------------------


async def test_fan_out_groups_jobs_into_one_batch_polled_once_for_all(
    api: Api, server: FakeResponsesServer
) -> None:
    server.batches.script("boom", outcome="failed")
    keys = [f"q{i}" for i in range(40)] + ["boom"]
    # The batch goes when it is full, however slowly the submits come on a loaded machine.
    provider = api.provider(max_batch_size=len(keys), batch_delay=30.0)
    async with asyncbg.BackgroundManager(provider, **BATCHING) as mgr:
        jobs = {k: await mgr.submit(key=k, **api.request(k)) for k in keys}
        await mgr.wait_all(jobs.values())
        polls = mgr.statistics().polls
    c = server.counters
    assert c.batch_creates == 1
    assert c.result_fetches == (2 if api.name == "openai-batch" else 1)  # output + error file
    assert polls >= len(keys) > 4 * c.batch_polls  # one poll of the batch settles every job
    batch_id = jobs["q0"].response_id.split("#")[0]  # type: ignore[union-attr]
    for k in keys[:-1]:
        job = jobs[k]
        assert job.status is JobStatus.COMPLETED and job.response_id == f"{batch_id}#{k}"
        result = await job.result()
        assert isinstance(result, api.result_type) and api.text(result) == f"echo: question {k}"
    boom = jobs["boom"]
    assert boom.status is JobStatus.FAILED and boom.error
    with pytest.raises(asyncbg.JobFailed, match="boom"):
        await boom.result()


async def test_a_job_costs_half_price(api: Api) -> None:
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        job = await mgr.submit(key="priced", **api.request("priced"))
    body = json.loads(job.body or b"{}")
    full = PriceBook().cost(api.model, body.get("usage") or body["usageMetadata"])
    assert full and job.cost == pytest.approx(full / 2)
    assert mgr.statistics().cost == pytest.approx(job.cost)


async def test_batches_respect_size_model_and_concurrency(
    api: Api, server: FakeResponsesServer
) -> None:
    async with asyncbg.BackgroundManager(api.provider(max_batch_size=3), **BATCHING) as mgr:
        jobs = [await mgr.submit(key=f"s{i}", **api.request(f"s{i}")) for i in range(7)]
        await mgr.wait_all(jobs)
    assert server.counters.batch_creates == 3
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    # max_concurrency counts jobs, not batches
    kw = {**BATCHING, "max_concurrency": 2}
    async with asyncbg.BackgroundManager(api.provider(), **kw) as mgr:
        jobs = [await mgr.submit(key=f"c{i}", **api.request(f"c{i}")) for i in range(4)]
        await mgr.wait_all(jobs)
    assert server.counters.batch_creates == 5
    assert max(server.counters.batch_requests.values()) == 3


async def test_cancel_one_job_ends_it_locally_and_its_batch_runs_on(
    api: Api, server: FakeResponsesServer
) -> None:
    server.batches.script("slow", duration=0.3)
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        keep = await mgr.submit(key="keep", **api.request("keep"))
        slow = await mgr.submit(key="slow", **api.request("slow"))
        await slow.wait_accepted()
        await slow.cancel()
        assert slow.status is JobStatus.CANCELLED and slow.error is not None
        assert "cancelled locally" in slow.error and slow.response_id.split("#")[0] in slow.error  # type: ignore[union-attr]
        await keep.wait()
    assert keep.status is JobStatus.COMPLETED and server.counters.batch_cancels == 0
    assert slow.status is JobStatus.CANCELLED  # its result was discarded when it came


async def test_cancelling_every_job_cancels_the_batch_and_keeps_what_finished(
    api: Api, server: FakeResponsesServer
) -> None:
    server.batches.script("never1", outcome="stuck")
    server.batches.script("never2", outcome="stuck")
    server.batches.script("quick", duration=0.01)
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        jobs = [await mgr.submit(key=k, **api.request(k)) for k in ("never1", "never2", "quick")]
        for job in jobs:
            await job.wait_accepted()
        await anyio.sleep(0.1)  # "quick" has finished on the server; its batch has not
        await mgr.cancel_all()
    never1, never2, quick = jobs
    assert server.counters.batch_cancels == 1
    assert never1.status is never2.status is JobStatus.CANCELLED
    assert "cancelled locally" in (never1.error or "")
    assert quick.status is JobStatus.COMPLETED  # the cancelled batch kept its result
    assert api.text(await quick.result()) == "echo: question quick"
    # a batch's last live job: cancelled on the server, with the provider's message
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        alone = await mgr.submit(key="never1", **api.request("never1"))
        await alone.wait_accepted()
        await alone.cancel()
    assert alone.status is JobStatus.CANCELLED and server.counters.batch_cancels == 2
    assert alone.error_code == "cancelled" and "cancelled" in (alone.error or "")


async def test_leaving_on_an_error_cancels_the_batch_on_the_server(
    api: Api, server: FakeResponsesServer
) -> None:
    server.batches.script("stuck1", outcome="stuck")
    server.batches.script("stuck2", outcome="stuck")
    with pytest.raises(Boom):
        async with asyncbg.BackgroundManager(api.provider(), cancel_timeout=2.0,
                                             **BATCHING) as mgr:
            jobs = [await mgr.submit(key=k, **api.request(k)) for k in ("stuck1", "stuck2")]
            for job in jobs:
                await job.wait_accepted()
            raise Boom
    assert server.counters.batch_cancels == 1
    assert all(j.status is JobStatus.CANCELLED for j in jobs)


async def test_a_crash_reattaches_to_the_batch_without_sending_it_again(
    api: Api, server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "run.journal"
    server.batches.script("late", duration=0.3)
    with pytest.raises(Boom):
        async with asyncbg.BackgroundManager(api.provider(max_batch_size=2, batch_delay=30.0),
                                             journal=db, cancel_on_exit=False,
                                             **BATCHING) as mgr:  # one batch, when both came
            first = [await mgr.submit(key=k, **api.request(k)) for k in ("early", "late")]
            for job in first:
                await job.wait_accepted()
            raise Boom
    assert server.counters.batch_creates == 1 and server.counters.batch_cancels == 0
    # a new process: a new provider that knows nothing, the same journal
    async with asyncbg.BackgroundManager(api.provider(), journal=db, **BATCHING) as mgr:
        again = [await mgr.submit(key=k, **api.request(k)) for k in ("early", "late")]
        attached = await mgr.attach("late")
        await mgr.wait_all(again)
    assert server.counters.batch_creates == 1
    assert [j.response_id for j in again] == [j.response_id for j in first]
    assert attached is again[1]
    for job in again:
        assert job.status is JobStatus.COMPLETED
        assert api.text(await job.result()) == f"echo: question {job.key}"


async def test_a_failed_batch_create_fails_or_retries_every_job_of_it(
    api: Api, server: FakeResponsesServer
) -> None:
    server.inject("500", route="batch_create")
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        jobs = [await mgr.submit(key=f"r{i}", **api.request(f"r{i}")) for i in range(3)]
        await mgr.wait_all(jobs)
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert mgr.statistics().retries == 3  # the one error, met by each create of the group
    server.inject("404", route="batch_create")
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        jobs = [await mgr.submit(key=f"x{i}", **api.request(f"x{i}")) for i in range(3)]
        await mgr.wait_all(jobs)
    assert all(j.status is JobStatus.FAILED for j in jobs)
    assert len({j.error for j in jobs}) == 1


async def test_a_lost_batch_fails_its_jobs(api: Api, server: FakeResponsesServer) -> None:
    server.batches.script("gone", duration=5.0)
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        job = await mgr.submit(key="gone", **api.request("gone"))
        await job.wait_accepted()
        server.restart(keep_state=False)
        await job.wait()
    assert job.status is JobStatus.FAILED and job.error_code == "response_lost"


# -- what differs by API -------------------------------------------------------------------


async def test_openai_batches_hold_one_model_each_and_name_refused_lines(
    server: FakeResponsesServer,
) -> None:
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(OpenAIBatch(client, batch_delay=0.05),
                                             **BATCHING) as mgr:
            a = await mgr.submit(key="a", model="gpt-5", input="x")
            b = await mgr.submit(key="b", model="gpt-5-mini", input="y")
            bad = await mgr.submit(key="bad", model="gpt-5", input="z", max_output_tokens=0)
            await mgr.wait_all([a, b, bad])
        assert server.counters.batch_creates == 2
        assert a.status is b.status is JobStatus.COMPLETED
        assert bad.status is JobStatus.FAILED and "HTTP 400" in (bad.error or "")
        assert "max_output_tokens" in (bad.error or "")
    finally:
        await client.close()


async def test_anthropic_keys_outside_its_custom_id_pattern_still_match(
    server: FakeResponsesServer,
) -> None:
    client = fake_anthropic_client(server)
    try:
        async with asyncbg.BackgroundManager(AnthropicBatches(client, batch_delay=0.05),
                                             **BATCHING) as mgr:
            job = await mgr.submit(key="eval/item 7.json", **_anthropic_request("7"))
            bad = await mgr.submit(key="bad", model="claude-sonnet-4-5", messages=[])
        assert job.status is JobStatus.COMPLETED and job.response_id.split("#")[1].startswith("k-")  # type: ignore[union-attr]
        assert bad.status is JobStatus.FAILED and bad.error_code == "invalid_request_error"
        with pytest.raises(ValueError, match="cannot stream"):
            async with asyncbg.BackgroundManager(AnthropicBatches(client)) as mgr:
                await mgr.submit(stream=True, **_anthropic_request("s"))
    finally:
        await client.close()


async def test_gemini_requests_are_checked_before_they_join_a_batch(
    server: FakeResponsesServer,
) -> None:
    client = fake_genai_client(server)
    try:
        async with asyncbg.BackgroundManager(GeminiBatches(client, batch_delay=0.05),
                                             **BATCHING) as mgr:
            with pytest.raises(ValueError, match="temperature"):
                await mgr.submit(model="gemini-2.5-flash", contents="x", temperature=0.2)
            ok = await mgr.submit(key="ok", **_gemini_request("ok"))
            bad = await mgr.submit(key="bad", model="gemini-2.5-flash", contents="y",
                                   config={"max_output_tokens": "many"})
        assert ok.status is JobStatus.COMPLETED and bad.status is JobStatus.FAILED
        assert bad.error_code == "invalid_request" and server.counters.batch_creates == 1
    finally:
        await client.aio.aclose()


# -- across providers ----------------------------------------------------------------------


async def test_wait_any_across_an_openai_response_and_an_anthropic_batch(
    server: FakeResponsesServer,
) -> None:
    oai = fake_client(server)
    claude = fake_anthropic_client(server)
    server.batches.script("slow", duration=5.0)
    try:
        async with asyncbg.BackgroundManager(OpenAIResponses(oai), poll_policy=FAST_POLL) as m1, \
                asyncbg.BackgroundManager(AnthropicBatches(claude, batch_delay=0.01),
                                          **BATCHING) as m2:
            response = await m1.submit(model="gpt-5", input="fast")
            message = await m2.submit(key="slow", **_anthropic_request("slow"))
            assert await m1.wait_any([message, response]) is response
            assert isinstance(await response.result(), Response)
            late = await m1.submit(model="gpt-5", input="slow",
                                   metadata={"fake_duration": "5"})
            quick = await m2.submit(key="quick", **_anthropic_request("quick"))
            assert await m2.wait_any([late, quick]) is quick
            assert isinstance(await quick.result(), Message)
            await m1.cancel_all()
            await m2.cancel_all()
    finally:
        await oai.close()
        await claude.close()


async def test_a_missing_sdk_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "anthropic", None)
    with pytest.raises(ImportError, match=r"asyncbg\[anthropic\]"):
        AnthropicBatches(object())  # type: ignore[arg-type]


async def test_batch_providers_are_providers_with_the_discount(
    api: Api, server: FakeResponsesServer
) -> None:
    provider = api.provider()
    assert isinstance(provider, asyncbg.providers.Provider)
    assert getattr(provider, "batch", False) is True
    assert type(provider).__module__ == "asyncbg.providers"
    assert provider.base_url.startswith("http://fake-")


# -- the command line ----------------------------------------------------------------------


def _cli_lines(provider: str, key: str) -> dict[str, Any]:
    if provider == "openai-batch":
        return {"custom_id": key, "method": "POST", "url": "/v1/responses",
                "body": {"model": "gpt-5", "input": f"question {key}"}}
    if provider == "anthropic":
        return {"custom_id": key, "params": _anthropic_request(key)}
    return {"key": key, "request": {"contents": [{"role": "user",
                                                   "parts": [{"text": f"question {key}"}]}],
                                    "generationConfig": {"maxOutputTokens": 500}}}


async def _run_cli(fake: HttpFake, tmp: Path, provider: str, *args: str) -> tuple[int, str]:
    root = fake.base_url.removesuffix("/v1")
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.base_url,
           "ANTHROPIC_API_KEY": "sk-ant-test", "ANTHROPIC_BASE_URL": root,
           "GEMINI_API_KEY": "gm-test"}
    env.pop("GOOGLE_API_KEY", None)
    extra = ["--base-url", root, "--model", "gemini-2.5-flash"] if provider == "gemini" else []
    done = await anyio.run_process(
        [sys.executable, "-m", "asyncbg", "run", str(tmp / "in.jsonl"), "-o",
         str(tmp / "out.jsonl"), "--provider", provider, *extra, *args],
        check=False, env=env, cwd=tmp)
    return done.returncode, done.stderr.decode() + done.stdout.decode()


@pytest.mark.parametrize("provider", ["openai-batch", "anthropic", "gemini"])
async def test_cli_round_trip_in_each_api_s_own_file_format(
    provider: str, http_fake: HttpFake, tmp_path: Path
) -> None:
    http_fake.server.batches.script("boom", outcome="failed")
    keys = ["a", "b", "boom"]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps(_cli_lines(provider, k)) + "\n" for k in keys) + "{not json\n")
    code, err = await _run_cli(http_fake, tmp_path, provider)
    assert code == 1, err  # a bad line and a failed request
    assert "in.jsonl:4: not valid JSON" in err and "boom" in err
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    id_name = "key" if provider == "gemini" else "custom_id"
    out = {line[id_name]: line for line in lines}
    assert set(out) == set(keys) and http_fake.server.counters.batch_creates == 1
    if provider == "openai-batch":
        assert out["a"]["error"] is None
        assert out["a"]["response"]["body"]["output"][0]["content"][0]["text"] == "echo: question a"
        assert out["boom"]["response"]["status_code"] == 500
    elif provider == "anthropic":
        assert out["a"]["result"]["type"] == "succeeded"
        assert out["a"]["result"]["message"]["content"][0]["text"] == "echo: question a"
        assert out["boom"]["result"]["type"] == "errored"
        assert out["boom"]["result"]["error"]["error"]["type"] == "api_error"
    else:
        text = out["a"]["response"]["candidates"][0]["content"]["parts"][0]["text"]
        assert text == "echo: question a" and "usageMetadata" in out["a"]["response"]
        assert out["boom"]["error"]["status"] == "INTERNAL"
    if provider != "gemini":
        return  # a rerun reads its own output back: once is enough (each run is a process)
    # run again: everything is served from the journal, nothing is sent
    code, err = await _run_cli(http_fake, tmp_path, provider)
    assert code == 1 and http_fake.server.counters.batch_creates == 1
    again = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert again == lines


# -- the deep-research seed ----------------------------------------------------------------


async def test_the_fake_scripts_a_research_run_with_web_searches_on_its_stream() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.3))
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(client, stream=True, poll_policy=FAST_POLL) as mgr:
            job = await mgr.submit(model="o4-mini-deep-research", input="battery costs",
                                   tools=[{"type": "web_search_preview"}], max_tool_calls=2,
                                   reasoning={"summary": "auto"})
            kinds = [event.type async for event in job.events()]
        response = await job.result()
    finally:
        await client.close()
    assert [item.type for item in response.output] == [
        "reasoning", "web_search_call", "reasoning", "web_search_call", "message"]
    assert response.max_tool_calls == 2 and response.output_text == "echo: battery costs"
    assert kinds.count("response.web_search_call.completed") == 2
    assert kinds.count("response.reasoning_summary_text.done") == 2
    assert kinds.index("response.web_search_call.completed") < kinds.index(
        "response.output_text.delta") and kinds[-1] == "response.completed"


async def test_the_deep_research_example_runs_on_the_fake() -> None:
    example = Path(__file__).parent.parent / "examples" / "deep_research.py"
    done = await anyio.run_process([sys.executable, str(example), "--seconds", "0.5"],
                                   check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "web search 3:" in out and "thinking:" in out and "done after 3 web searches" in out


async def test_usage_tokens_and_requests_are_the_providers(
    api: Api, server: FakeResponsesServer
) -> None:
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        jobs = [await mgr.submit(key=f"u{i}", **api.request(f"u{i}")) for i in range(6)]
        await mgr.wait_all(jobs)
        requests = mgr.statistics().requests
    for job in jobs:
        assert job.usage is not None  # Gemini's usage_metadata too
        assert job.tokens is not None and job.tokens.input > 0 and job.tokens.output > 0
    # the API's requests (a batch create, its polls, a results download), not one per job
    assert requests < 6 * 2
