"""Gemini batches past the inlined limit go as an input file: uploaded through the Files API
(google-genai's resumable upload), referenced by the batch, and read back from the batch's
responses file, one download per batch, re-attach included. The limit is lowered here; in
production it is the API's 20 MB."""

from __future__ import annotations

import io
import json
from pathlib import Path

import anyio
import pytest
from google.genai import types

import asyncbg
from asyncbg import JobStatus
from asyncbg.providers import GeminiBatches
from asyncbg.testing import FakeResponsesServer, fake_genai_client

from . import test_providers
from .test_providers import BATCHING, Boom

server = test_providers.server

pytestmark = pytest.mark.asyncio


def _request(key: str) -> dict[str, object]:
    return {"model": "gemini-2.5-flash", "contents": f"question {key}",
            "config": types.GenerateContentConfig(max_output_tokens=50,
                                                  system_instruction="be brief")}


async def test_a_batch_past_the_inline_limit_goes_as_a_file(
    server: FakeResponsesServer,
) -> None:
    client = fake_genai_client(server)
    try:
        provider = GeminiBatches(client, batch_delay=0.05, inline_limit=1_000)
        async with asyncbg.BackgroundManager(provider, **BATCHING) as mgr:
            small = await mgr.submit(key="small", **_request("small"))
            await small.wait()  # one request: under the limit, inlined
            assert server.counters.file_uploads == 0
            jobs = [await mgr.submit(key=f"k{i}", **_request(f"k{i}")) for i in range(20)]
            await mgr.wait_all(jobs)
        assert small.status is JobStatus.COMPLETED
        assert all(j.status is JobStatus.COMPLETED for j in jobs)
        result = await jobs[3].result()
        assert result.text == "echo: question k3"  # each job its own line's answer
        assert jobs[3].usage is not None and jobs[3].tokens is not None
        assert result.usage_metadata is not None
        assert (result.usage_metadata.candidates_token_count or 0) <= 50  # its config went
        assert server.counters.file_uploads == 1 and server.counters.batch_creates == 2
        # The input file holds each request as google-genai writes an inlined one, by key.
        files = server.batches._gemini._files.values()
        lines = [json.loads(x) for f in files for x in f.splitlines() if b'"request"' in x]
        assert {x["key"] for x in lines} == {f"k{i}" for i in range(20)}
        assert lines[0]["request"]["generationConfig"] == {"maxOutputTokens": 50}
        assert lines[0]["request"]["systemInstruction"]["parts"] == [{"text": "be brief"}]
    finally:
        await client.aio.aclose()


async def test_a_file_batch_re_attached_downloads_its_results_once(
    server: FakeResponsesServer, tmp_path: Path
) -> None:
    journal = tmp_path / "run.journal"
    client = fake_genai_client(server)
    keys = [f"k{i}" for i in range(30)]
    never = asyncbg.PollPolicy(first_poll=60, min_interval=60, max_interval=60)
    try:
        with pytest.raises(Boom):
            async with asyncbg.BackgroundManager(  # one batch, sent when all 30 have joined
                    GeminiBatches(client, batch_delay=30, max_batch_size=30, inline_limit=0),
                    journal=journal,
                    cancel_on_exit=False, **{**BATCHING, "poll_policy": never}) as mgr:
                jobs = [await mgr.submit(key=k, **_request(k)) for k in keys]
                for job in jobs:
                    await job.wait_accepted()
                raise Boom
        assert server.counters.batch_creates == 1 and server.counters.file_uploads == 1
        await anyio.sleep(0.3)  # the batch has ended on the server
        server.counters.reset()
        async with asyncbg.BackgroundManager(
                GeminiBatches(client, batch_delay=0.05, inline_limit=0), journal=journal,
                **BATCHING) as mgr:
            again = [await mgr.submit(key=k, **_request(k)) for k in keys]
            await mgr.wait_all(again)
        assert all(j.status is JobStatus.COMPLETED for j in again)
        assert server.counters.result_fetches == 1 and server.counters.batch_creates == 0
    finally:
        await client.aio.aclose()


async def test_the_fake_refuses_an_input_file_it_does_not_hold(
    server: FakeResponsesServer,
) -> None:
    client = fake_genai_client(server)
    try:
        line = {"key": "a", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}
        uploaded = await client.aio.files.upload(
            file=io.BytesIO(json.dumps(line).encode() + b"\n"),
            config=types.UploadFileConfig(mime_type="jsonl"))
        assert uploaded.name is not None and server.batches._gemini.has_file(uploaded.name)
        with pytest.raises(Exception, match="was not found"):
            await client.aio.batches.create(model="gemini-2.5-flash", src="files/nope")
    finally:
        await client.aio.aclose()
