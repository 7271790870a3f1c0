"""The core behaviours on both of anyio's backends: asyncio and trio.

On trio the lean status check (aiohttp is asyncio-only) falls back to the SDK path by itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import asyncbg
from asyncbg import JobStatus
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_POLL, FAST_RETRY, meta

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeResponsesServer, object]]:
    server = FakeResponsesServer(latency=LatencyModel.uniform(0.01, 0.04))
    client = fake_client(server)
    try:
        yield server, client
    finally:
        await client.close()


def mgr(client: object, **kw: object) -> asyncbg.BackgroundManager:
    return asyncbg.BackgroundManager(client, poll_policy=FAST_POLL, retry_policy=FAST_RETRY,
                                     **kw)  # type: ignore[arg-type]


async def test_fan_out_cancel_and_failures(fake: tuple[FakeResponsesServer, object]) -> None:
    server, client = fake
    async with mgr(client, max_concurrency=4) as m:
        jobs = [await m.submit(model="m", input=f"q{i}") for i in range(12)]
        failed = await m.submit(model="m", input="x", metadata=meta(outcome="failed"))
        stuck = await m.submit(model="m", input="s", metadata=meta(outcome="stuck"))
        await stuck.wait_accepted()
        await stuck.cancel()
        first = await m.wait_any(jobs)
        done = [j async for j in m.as_completed(jobs)]
    assert first in jobs and set(done) == set(jobs)
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert failed.status is JobStatus.FAILED and stuck.status is JobStatus.CANCELLED
    assert server.counters.max_in_flight <= 4
    assert (await jobs[0].result()).output_text == "echo: q0"


async def test_journal_reattach(fake: tuple[FakeResponsesServer, object], tmp_path: Path) -> None:
    server, client = fake
    async with mgr(client, journal=tmp_path / "j.db") as m:
        job = await m.submit(key="k", model="m", input="x")
    async with mgr(client, journal=tmp_path / "j.db") as m:
        again = await m.submit(key="k", model="m", input="x")
    assert again.status is JobStatus.COMPLETED and again.response_id == job.response_id
    assert server.counters.creates == 1


async def test_a_stream_job(fake: tuple[FakeResponsesServer, object]) -> None:
    server, client = fake
    server.inject("drop", route="create", after=2)
    async with mgr(client) as m:
        job = await m.submit(model="m", input="hello there", stream=True)
        seen = [e.sequence_number async for e in job.events()]
    assert job.status is JobStatus.COMPLETED and job.text == "echo: hello there"
    assert seen == list(range(len(seen)))


class Boom(Exception):
    pass


async def test_an_error_in_the_block_cancels_live_jobs(
    fake: tuple[FakeResponsesServer, object],
) -> None:
    server, client = fake
    with pytest.raises(Boom):
        async with mgr(client) as m:
            job = await m.submit(model="m", input="s", metadata=meta(outcome="stuck"))
            await job.wait_accepted()
            raise Boom
    assert server.status_of(job.response_id) == "cancelled"  # type: ignore[arg-type]
