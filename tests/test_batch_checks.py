"""Issue 22's remaining checks on every batch provider: one 404 on a batch's poll is checked
again before any job of it is called lost. Through each official SDK, on the fake."""

from __future__ import annotations

import pytest

import asyncbg
from asyncbg import JobStatus
from asyncbg.testing import FakeResponsesServer

from . import test_providers
from .test_providers import BATCHING, Api

api = test_providers.api
server = test_providers.server

pytestmark = pytest.mark.asyncio


async def test_one_404_on_a_batch_poll_is_checked_again_not_lost(
    api: Api, server: FakeResponsesServer
) -> None:
    async with asyncbg.BackgroundManager(api.provider(), **BATCHING) as mgr:
        jobs = [await mgr.submit(key=f"k{i}", **api.request(f"k{i}")) for i in range(3)]
        for job in jobs:
            await job.wait_accepted()
        server.inject("404", route="batch_retrieve")  # a replica that has not seen it yet
        await mgr.wait_all(jobs)
    assert all(j.status is JobStatus.COMPLETED for j in jobs), [j.error for j in jobs]
    assert server.counters.faults == 1
