"""Background streams: events as they arrive, resume after a drop, fall back to polling."""

from __future__ import annotations

import anyio
import pytest
from openai import AsyncOpenAI
from structlog.testing import capture_logs

import asyncbg
from asyncbg import JobStatus
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client, new_secret

from .conftest import FAST_POLL, manager

pytestmark = pytest.mark.asyncio
TEXT = "the quick brown fox jumps over the lazy dog " * 3


async def test_a_stream_job_shows_events_and_text_without_polling(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.stream_events = 6
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input=TEXT, stream=True)
        seen = [e async for e in job.events()]
    assert job.status is JobStatus.COMPLETED
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert seen[0].type == "response.created" and seen[-1].type == "response.completed"
    assert job.text == f"echo: {TEXT}" == (await job.result()).output_text
    assert job.last_sequence == seen[-1].sequence_number
    assert server.counters.retrieves == 0 and mgr.statistics().polls == 0


async def test_a_dropped_stream_resumes_with_identical_text_and_no_duplicate_event(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.latency = LatencyModel.fixed(0.1)
    server.stream_events = 10
    async with manager(client) as mgr:
        clean = await mgr.submit(model="m", input=TEXT, stream=True)
        await clean.wait()
        server.inject("drop", route="create", after=3)
        server.inject("drop", route="retrieve", after=4)
        server.inject("drop", route="retrieve", after=2)
        with capture_logs() as logs:
            dropped = await mgr.submit(model="m", input=TEXT, stream=True)
            early = [e.sequence_number async for e in dropped.events()]
    late = [e.sequence_number async for e in dropped.events()]  # a late reader sees all too
    assert early == late == list(range(len(early)))  # none lost, none twice
    assert [e.type async for e in dropped.events()] == [e.type async for e in clean.events()]
    assert dropped.text == clean.text == f"echo: {TEXT}"
    assert dropped.status is JobStatus.COMPLETED
    resumes = [e for e in logs if e["event"] == "job.stream_resume"]
    assert [e["starting_after"] for e in resumes] == [2, 6, 8]
    assert server.counters.creates == 2 and server.counters.retrieves == 0


async def test_a_server_refusing_background_streams_is_polled_instead(
    server: FakeResponsesServer,
) -> None:
    server.refuse_background_stream = True
    client = fake_client(server)
    try:
        with capture_logs() as logs:
            async with manager(client, stream=True) as mgr:
                job = await mgr.submit(model="m", input="x")
    finally:
        await client.close()
    assert job.status is JobStatus.COMPLETED and mgr.statistics().polls >= 1
    refused = next(e for e in logs if e["event"] == "job.stream_refused")
    assert refused["fallback"] == "polling"
    assert server.counters.creates == 1  # the refused create created nothing


async def test_a_stream_too_old_to_resume_falls_back_to_polling(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.latency = LatencyModel.fixed(0.2)
    server.stream_resume_window = 0.0
    server.inject("drop", route="create", after=1)
    with capture_logs() as logs:
        async with manager(client) as mgr:
            job = await mgr.submit(model="m", input="x", stream=True)
    assert job.status is JobStatus.COMPLETED and mgr.statistics().polls >= 1
    assert any(e["event"] == "job.stream_resume_refused" for e in logs)


async def test_cancel_a_stream_job(client: AsyncOpenAI, server: FakeResponsesServer) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", stream=True,
                               metadata={"fake_duration": "30"})
        await job.wait_accepted()
        with anyio.fail_after(5):
            await job.cancel()
    assert job.status is JobStatus.CANCELLED
    assert server.status_of(job.response_id) == "cancelled"  # type: ignore[arg-type]


async def test_a_mixed_run_of_polling_webhook_and_stream_jobs(
    server: FakeResponsesServer,
) -> None:
    secret = new_secret()
    client = fake_client(server, webhook_secret=secret)
    try:
        async with asyncbg.BackgroundManager(
            client, webhooks=True, poll_policy=asyncbg.PollPolicy.safety_net(100)
        ) as mgr, server.webhooks(mgr.handle_webhook, secret):
            polled = [await mgr.submit(model="m", input="p", poll_policy=FAST_POLL)
                      for _ in range(4)]
            pushed = [await mgr.submit(model="m", input="w") for _ in range(4)]
            streamed = [await mgr.submit(model="m", input="s", stream=True) for _ in range(4)]
            with anyio.fail_after(10):
                await mgr.wait_all([*polled, *pushed, *streamed])
    finally:
        await client.close()
    assert all(j.status is JobStatus.COMPLETED for j in [*polled, *pushed, *streamed])
    polls = server.counters.polls
    assert all(polls[j.response_id] >= 1 for j in polled)  # type: ignore[index]
    assert all(polls[j.response_id] == 1 for j in pushed)  # type: ignore[index]
    assert all(j.response_id not in polls for j in streamed)
    assert all(j.text == "echo: s" for j in streamed)
