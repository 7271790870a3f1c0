"""asyncbg.OpenTelemetry: spans and metrics per the GenAI conventions, nothing without an SDK,
and the Prometheus endpoint (serve_metrics) scraped over real HTTP.

The engine calls the hooks (asyncbg/_engine/_hooks.py); here they are called the way the engine
does, around real jobs of a manager running against the fake server.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import asyncbg
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_POLL, FAST_RETRY, meta


async def run_jobs(hooks: asyncbg.OpenTelemetry) -> list[asyncbg.Job]:
    """Two jobs through a manager (one completes, one fails), with the hooks called where the
    engine calls them: 3 polls each, a 429 answer to one create that is then retried."""
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.01))
    client = fake_client(server)
    jobs = []
    try:
        async with asyncbg.BackgroundManager(client, poll_policy=FAST_POLL) as mgr:
            for key, outcome in (("good", None), ("bad", "failed")):
                params = {"model": "gpt-5.2", "input": "hi", "service_tier": "flex"}
                job = await mgr.submit(key=key, metadata=meta(outcome=outcome), **params)
                hooks.job_submitted(job, params)
                jobs.append(job)
            hooks.request_done(jobs[0], "create", 429, 0.002)
            for job in jobs:
                hooks.request_done(job, "create", 200, 0.003)
                for _ in range(3):
                    hooks.request_done(job, "poll", 200, 0.001)
            await mgr.wait_all(jobs)
            for job in jobs:
                hooks.job_finished(job)
    finally:
        await client.close()
    return jobs


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {m.name: list(m.data.data_points) for rm in data.resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics}


def recorded() -> tuple[asyncbg.OpenTelemetry, InMemorySpanExporter, InMemoryMetricReader]:
    """Hooks on the SDK, with what they record kept in memory."""
    spans = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    hooks = asyncbg.OpenTelemetry(tracer_provider=tracing,
                                  meter_provider=MeterProvider(metric_readers=[reader]))
    return hooks, spans, reader


@pytest.mark.asyncio
async def test_a_span_per_job_and_the_genai_metrics() -> None:
    hooks, spans, reader = recorded()
    good, bad = await run_jobs(hooks)

    finished = {s.attributes["asyncbg.job.key"]: s for s in spans.get_finished_spans()}
    assert set(finished) == {"good", "bad"}
    span = finished["good"]
    assert span.name == "chat gpt-5.2" and span.kind is SpanKind.CLIENT
    assert span.instrumentation_scope.schema_url.endswith("/1.44.0")
    a = span.attributes
    usage = good.usage
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-5.2" and a["gen_ai.response.model"] == "gpt-5.2"
    assert a["gen_ai.response.id"] == good.response_id
    assert a["gen_ai.usage.input_tokens"] == usage.input_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.output_tokens
    assert a["openai.request.service_tier"] == "flex"
    assert a["asyncbg.poll.count"] == 3 and a["asyncbg.job.status"] == "completed"
    assert a["asyncbg.cost.usd"] == pytest.approx(good.cost)
    assert "error.type" not in a
    assert [e.name for e in span.events] == ["asyncbg.create", "asyncbg.create"]  # 429, 200
    assert [e.attributes["http.response.status_code"] for e in span.events] == [429, 200]
    failed = finished["bad"]
    assert failed.attributes["error.type"] == bad.error_code
    assert failed.status.status_code is StatusCode.ERROR

    m = points(reader)
    tokens = {p.attributes["gen_ai.token.type"]: p for p in m["gen_ai.client.token.usage"]
              if "error.type" not in p.attributes}
    assert tokens["input"].sum == usage.input_tokens
    assert tokens["output"].sum == usage.output_tokens
    assert sum(p.count for p in m["gen_ai.client.operation.duration"]) == 2
    assert {p.attributes.get("error.type") for p in m["gen_ai.client.operation.duration"]} \
        == {None, bad.error_code}
    requests = {(p.attributes["asyncbg.request.kind"],
                 p.attributes["http.response.status_code"]): p.value
                for p in m["asyncbg.requests"]}
    assert requests == {("create", 429): 1, ("create", 200): 2, ("poll", 200): 6}
    assert [p.value for p in m["asyncbg.rate_limited"]] == [1]
    assert [p.value for p in m["asyncbg.jobs.live"]] == [0]  # every job counted out again
    assert sum(p.value for p in m["asyncbg.cost"]) == pytest.approx(good.cost + (bad.cost or 0))


@pytest.mark.asyncio
async def test_without_an_sdk_no_span_is_recorded() -> None:
    from opentelemetry.trace import NoOpTracerProvider

    hooks = asyncbg.OpenTelemetry(tracer_provider=NoOpTracerProvider())
    recorded = []
    original = hooks.job_finished

    def spy(job: asyncbg.Job) -> None:
        recorded.append(hooks._jobs[job].span.is_recording())
        original(job)

    hooks.job_finished = spy  # type: ignore[method-assign]
    await run_jobs(hooks)
    assert recorded == [False, False]
    assert not hooks._jobs  # nothing kept after the jobs


@pytest.mark.asyncio
async def test_serve_metrics_answers_a_prometheus_scrape() -> None:
    async with asyncbg.serve_metrics(0) as hooks:
        assert hooks.metrics_url is not None and hooks.metrics_url.startswith("http://127.0.0.1:")
        good, _ = await run_jobs(hooks)
        async with httpx.AsyncClient() as http:
            scrape = await http.get(hooks.metrics_url)
        port = int(hooks.metrics_url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(OSError):  # the port is taken: a clear error at once
            async with asyncbg.serve_metrics(port):
                pass
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    text = scrape.text
    assert 'asyncbg_requests_total{' in text and 'asyncbg_request_kind="poll"' in text
    line = next(line for line in text.splitlines()
                if line.startswith("gen_ai_client_token_usage")
                and line.split("{")[0].endswith("_sum") and 'gen_ai_token_type="output"' in line
                and "error_type" not in line)
    assert float(line.rsplit(" ", 1)[1]) == good.usage.output_tokens
    with pytest.raises(httpx.ConnectError):  # stopped with the block
        async with httpx.AsyncClient() as http:
            await http.get(hooks.metrics_url)


@pytest.mark.asyncio
async def test_the_metrics_port_option() -> None:
    import argparse

    from asyncbg._cli import _metrics

    parser = argparse.ArgumentParser()
    _metrics.add_option(parser)
    async with _metrics.hooks_for(parser.parse_args([])) as hooks:
        assert hooks == []  # no option, no server
    async with asyncbg.serve_metrics(0) as taken:
        port = taken.metrics_url.rsplit(":", 1)[1].split("/")[0]  # type: ignore[union-attr]
        with pytest.raises(_metrics.MetricsPortError, match=f"--metrics-port {port}: cannot"):
            async with _metrics.hooks_for(parser.parse_args(["--metrics-port", port])):
                pass
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-port", "70000"])


@pytest.mark.asyncio
async def test_through_the_engine() -> None:
    """The engine calls the hooks itself (BackgroundManager(hooks=...))."""
    hooks, spans, reader = recorded()
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.03))
    server.inject("429", route="create", retry_after=0.01)
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(client, poll_policy=FAST_POLL, retry_policy=FAST_RETRY,
                                             hooks=[hooks], max_concurrency=1) as mgr:
            hooks.observe(mgr)
            jobs = [await mgr.submit(model="gpt-5.2", input="hi", key=f"k{i}",
                                     metadata=meta(outcome="failed" if i == 2 else None))
                    for i in range(3)]
            waiting = points(reader)["asyncbg.jobs.waiting"][0].value
            assert waiting == mgr.statistics().pending >= 1  # one slot: the others wait
            await mgr.wait_all(jobs)
            stats = mgr.statistics()
    finally:
        await client.close()
    finished = {s.attributes["asyncbg.job.key"]: s for s in spans.get_finished_spans()}
    assert set(finished) == {"k0", "k1", "k2"}
    for job in jobs:
        a = finished[job.key].attributes
        assert a["gen_ai.response.id"] == job.response_id
        assert a["asyncbg.poll.count"] >= 1
        assert ("error.type" in a) is (job.key == "k2")
    creates = [e for s in finished.values() for e in s.events if e.name == "asyncbg.create"]
    assert sorted(e.attributes["http.response.status_code"] for e in creates) == [200, 200, 200,
                                                                                   429]
    m = points(reader)
    assert [p.value for p in m["asyncbg.jobs.live"]] == [0]
    assert [p.value for p in m["asyncbg.rate_limited"]] == [1]
    polls = sum(p.value for p in m["asyncbg.requests"]
                if p.attributes["asyncbg.request.kind"] == "poll")
    assert polls == stats.polls
    assert sum(p.count for p in m["gen_ai.client.operation.duration"]) == 3
    assert [p.value for p in m["asyncbg.jobs.waiting"]] == [0]
    assert [p.value for p in m["asyncbg.notifications.given_up"]] == [0]


@pytest.mark.asyncio
async def test_a_batch_jobs_span_names_its_batch() -> None:
    from asyncbg.providers import OpenAIBatch
    from asyncbg.testing import BatchTiming

    hooks, spans, _ = recorded()
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    server.batches.timing = BatchTiming(validating=0.01, finalizing=0.01, cancelling=0.01)
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(OpenAIBatch(client, batch_delay=0.05),
                                             poll_policy=FAST_POLL, hooks=[hooks]) as mgr:
            job = await mgr.submit(key="a", model="gpt-5", input="x")
            await job.wait()
    finally:
        await client.close()
    [span] = spans.get_finished_spans()
    assert job.response_id is not None
    assert span.attributes["asyncbg.batch.id"] == job.response_id.rpartition("#")[0] != ""
