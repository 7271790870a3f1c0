"""The batch providers, second pass: a linear re-attach, whole-batch cancels, a lost batch
confirmed before it fails, usage in each provider's terms and in one shape, and the requests
the server counted. Each through its official SDK, against the in-process fake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from anthropic.types import Usage
from google.genai import types as genai_types
from openai.types.responses import ResponseUsage

import asyncbg
from asyncbg import JobStatus
from asyncbg._providers._kinds import batch_of, provider_of
from asyncbg.providers import OpenAIBatch, tokens_of, usage_of
from asyncbg.testing import FakeResponsesServer, fake_client
from asyncbg.testing._webhooks import new_secret, signed_delivery

from . import test_providers
from .test_providers import BATCHING, Api, Boom

#: The fixtures of the first pass: each provider through its SDK, and the fake behind it.
api = test_providers.api
server = test_providers.server

pytestmark = pytest.mark.asyncio


async def _leave_live(api: Api, journal: Path, keys: list[str], **kw: Any) -> list[str]:
    """Submit ``keys`` with ``journal`` and leave their batches running, never polled (the
    process ended before its first poll); their response ids."""
    options = {**BATCHING, "poll_policy": asyncbg.PollPolicy(first_poll=60, min_interval=60,
                                                                  max_interval=60)}
    with pytest.raises(Boom):
        async with asyncbg.BackgroundManager(api.provider(**kw), journal=journal,
                                             cancel_on_exit=False, **options) as mgr:
            jobs = [await mgr.submit(key=k, **api.request(k)) for k in keys]
            for job in jobs:
                await job.wait_accepted()
            ids = [str(job.response_id) for job in jobs]
            raise Boom
    return ids


async def test_a_re_attach_downloads_each_batch_s_results_once_however_jobs_arrive(
    api: Api, server: FakeResponsesServer, tmp_path: Path
) -> None:
    journal = tmp_path / "run.journal"
    keys = [f"k{i}" for i in range(200)]
    ids = await _leave_live(api, journal, keys, max_batch_size=100, batch_delay=5.0)
    batches = {batch_of(rid) for rid in ids}
    assert len(batches) == 2 and server.counters.batch_creates == 2
    await anyio.sleep(0.3)  # every batch has ended on the server
    server.counters.reset()
    provider = api.provider()
    async with asyncbg.BackgroundManager(provider, journal=journal, **BATCHING) as mgr:
        first = []
        for k in keys[:40]:  # one by one: each job ends before the next arrives
            job = await mgr.submit(key=k, **api.request(k))
            await job.wait()
            first.append(job)
        rest = [await mgr.submit(key=k, **api.request(k)) for k in keys[40:]]
        await mgr.wait_all(rest)
    c = server.counters
    assert all(j.status is JobStatus.COMPLETED for j in [*first, *rest])
    assert c.batch_creates == 0
    assert c.result_fetches == 2  # one download per batch, not one per job
    assert c.batch_polls <= 2 * 3  # a batch is polled once per window, not once per job
    # What the server counted: Gemini's inlined results come with the poll of an ended batch.
    downloads = 0 if api.name == "gemini" else c.result_fetches
    # And OpenAI's input and output files, deleted as the manager left (two per batch).
    deletes = 4 if api.name == "openai-batch" else 0
    assert provider.requests == c.batch_polls + downloads + deletes


async def test_a_job_asking_again_after_its_answer_still_gets_its_result(
    api: Api, server: FakeResponsesServer
) -> None:
    provider = api.provider()
    async with asyncbg.BackgroundManager(provider, **BATCHING) as mgr:
        job = await mgr.submit(key="a", **api.request("a"))
        await job.wait()
        assert job.status is JobStatus.COMPLETED and job.response_id is not None
        again = await provider.fetch(job.response_id)  # a push after the poll, say
    assert again.status is JobStatus.COMPLETED and again.body == job.body


async def test_cancel_many_cancels_a_batch_with_one_request_and_keeps_what_finished(
    api: Api, server: FakeResponsesServer
) -> None:
    for i in range(3):
        server.batches.script(f"slow{i}", duration=60)
    provider = api.provider()
    async with asyncbg.BackgroundManager(provider, **BATCHING) as mgr:
        jobs = [await mgr.submit(key=k, **api.request(k))
                for k in ("quick", "slow0", "slow1", "slow2")]
        for job in jobs:
            await job.wait_accepted()
        await anyio.sleep(0.3)  # "quick" has finished; the batch has not
        ids = [str(j.response_id) for j in jobs]
        answers = await provider.cancel_many(ids)
        assert {a.status for a in answers} == {JobStatus.IN_PROGRESS}  # until checks say
        assert server.counters.batch_cancels == 1
        await mgr.wait_all(jobs)
    assert jobs[0].status is JobStatus.COMPLETED  # finished before the cancel: kept
    assert {j.status for j in jobs[1:]} == {JobStatus.CANCELLED}
    assert all("locally" not in (j.error or "") for j in jobs[1:])
    assert server.counters.batch_cancels == 1


async def test_usage_is_the_provider_s_own_and_tokens_one_shape(api: Api) -> None:
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        job = await mgr.submit(key="u", **api.request("u"))
        await job.wait()
    result = await job.result()
    usage = usage_of(result)
    expected = {"openai-batch": ResponseUsage, "anthropic": Usage,
                "gemini": genai_types.GenerateContentResponseUsageMetadata}[api.name]
    assert isinstance(usage, expected) or (isinstance(usage, dict) and usage)
    tokens = tokens_of(job.body)
    assert tokens is not None and tokens.input > 0 and tokens.output > 0
    assert tokens_of(b"not json") is None and tokens_of(None) is None


async def test_the_provider_and_batch_of_a_recorded_id() -> None:
    assert provider_of("resp_abc") == "openai" and batch_of("resp_abc") is None
    assert provider_of("batch_1#k") == "openai-batch" and batch_of("batch_1#k") == "batch_1"
    assert provider_of("msgbatch_01x#k#2") == "anthropic"
    assert batch_of("msgbatch_01x#k#2") == "msgbatch_01x#k"  # rpartition: the key may hold #
    assert provider_of("batches/abc#k") == "gemini"
    assert provider_of("weird_1#k") is None and provider_of(None) is None


async def test_a_batch_event_wakes_its_jobs_with_no_poll_before_it(
    api: Api, server: FakeResponsesServer
) -> None:
    secret = new_secret()
    provider = api.provider()
    kind = {"openai-batch": "batch.completed", "gemini": "batch.succeeded"}.get(api.name)
    async with asyncbg.BackgroundManager(provider, poll_policy=asyncbg.PollPolicy.safety_net(),
                                         max_concurrency=100) as mgr:
        jobs = [await mgr.submit(key=f"w{i}", **api.request(f"w{i}")) for i in range(5)]
        for job in jobs:
            await job.wait_accepted()
        batch_id = batch_of(jobs[0].response_id)
        assert batch_id is not None
        body, headers = signed_delivery(secret, kind or "batch.completed", batch_id)
        if kind is None:  # Anthropic sends no webhooks: a delivery is refused, polls go on
            with pytest.raises(ValueError, match="no webhooks"):
                provider.verify_webhook(body, headers, secret)
            await mgr.cancel_all()
            return
        await anyio.sleep(0.3)  # the batch has ended on the fake
        assert server.counters.batch_polls == 0  # nothing polled it: the safety net is slow
        with pytest.raises(ValueError):
            provider.verify_webhook(body, headers, new_secret())  # forged
        event = provider.verify_webhook(body, headers, secret)
        assert event.terminal and event.batch_id == batch_id and event.response_id is None
        assert set(event.response_ids) == {j.response_id for j in jobs}
        for rid in event.response_ids:  # what the manager's inbox does with a batch event
            mgr._scheduler.wake(rid)
        with anyio.fail_after(10):
            await mgr.wait_all(jobs)
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert server.counters.batch_polls == 1  # one poll, after the event, for all of them


@pytest.mark.parametrize("keep", [False, True])
async def test_openai_batch_files_are_deleted_once_every_result_is_in_the_journal(
    keep: bool, server: FakeResponsesServer, tmp_path: Path
) -> None:
    client = fake_client(server)
    try:
        provider = OpenAIBatch(client, batch_delay=0.05, keep_files=keep)
        async with asyncbg.BackgroundManager(provider, journal=tmp_path / "j.db",
                                             **BATCHING) as mgr:
            jobs = [await mgr.submit(key=f"f{i}", model="gpt-5", input=f"q{i}")
                    for i in range(3)]
            await mgr.wait_all(jobs)
        # The manager left with every result recorded: it deleted the batch's files.
        batch = await client.batches.retrieve(str(batch_of(jobs[0].response_id)))
        files = [f for f in (batch.input_file_id, batch.output_file_id) if f]
        assert len(files) == 2
        for file_id in files:
            if keep:
                await client.files.retrieve(file_id)  # still there
            else:
                with pytest.raises(openai.NotFoundError):
                    await client.files.retrieve(file_id)
        assert await provider.delete_files() == 0  # once
    finally:
        await client.close()


async def test_openai_batch_files_stay_when_the_manager_leaves_by_an_error(
    server: FakeResponsesServer, tmp_path: Path
) -> None:
    client = fake_client(server)
    try:
        provider = OpenAIBatch(client, batch_delay=0.05)
        with pytest.raises(Boom):
            async with asyncbg.BackgroundManager(provider, journal=tmp_path / "j.db",
                                                 **BATCHING) as mgr:
                job = await mgr.submit(key="f", model="gpt-5", input="q")
                await job.wait()
                raise Boom  # not every result is known to be recorded: nothing is deleted
        batch = await client.batches.retrieve(str(batch_of(job.response_id)))
        assert batch.output_file_id is not None
        await client.files.retrieve(batch.output_file_id)  # still there
    finally:
        await client.close()
