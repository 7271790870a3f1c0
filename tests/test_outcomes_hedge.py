"""Hedged requests (asyncbg/_outcomes/_hedge.py) against the fake server's heavy tail."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import AsyncOpenAI

import asyncbg
from asyncbg import Hedge, JobStatus
from asyncbg.testing import FakeResponsesServer, LatencyModel
from benchmarks.hedge import workload

from .conftest import manager

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # timing against the fake's real clock: one backend is enough


async def test_the_tail_is_hedged_and_the_extra_spend_stays_under_its_cap() -> None:
    # 24 jobs of 0.1 s, 15 % of responses 10x slower (drawn per response, seed 2: three of
    # them without hedging); a copy after the p90 of finished jobs. How much of the tail the
    # copies cut is a wall-clock figure, measured by benchmarks/hedge.py (README), not here:
    # on a loaded machine one run's stalls can swamp it.
    hedge = Hedge(after="p90", max_extra=0.2, min_samples=6)
    plain = await workload(jobs=24, hedge=None, median=0.1, sigma=0.0, tail=0.15, seed=2)
    hedged = await workload(jobs=24, hedge=hedge, median=0.1, sigma=0.0, tail=0.15, seed=2)
    assert plain["completed"] == hedged["completed"] == 24
    assert hedged["hedges"] >= 1 and hedged["hedges_won"] >= 1
    assert hedged["creates"] <= 24 + hedged["hedges"]
    assert 0 < hedged["hedge_cost"] <= 0.2 * hedged["cost"]
    assert plain["hedges"] == 0 and plain["creates"] == 24


async def test_a_hedge_copy_is_a_reservation_under_the_budget(
    client: AsyncOpenAI, server: FakeResponsesServer,
) -> None:
    server.latency = LatencyModel.fixed(0.02)
    prices = {"m": asyncbg.Price(input=0.0, output=1_000.0)}  # $1 per 1,000 output tokens
    hedge = Hedge(after=0.0, max_extra=1.0, min_samples=1)
    request = {"model": "m", "input": "x", "max_output_tokens": 1000,
               "metadata": {"fake_output_tokens": "500", "fake_reasoning_tokens": "0"}}
    async with manager(client, prices=prices, max_cost=1.2, hedge=hedge) as mgr:
        warm = await mgr.submit_request(request, key="warm")  # no copy: none finished yet
        await warm.wait()
        slow = await mgr.submit_request(
            {**request, "metadata": {**request["metadata"], "fake_duration": "0.3"}}, key="k")
        await slow.wait()
    # $0.50 spent and about as much reserved for k: its copy cannot fit beside it, so it waits
    # for room, and is cancelled unsent once k completes
    original, copy = slow.attempts
    assert copy.key == "k#hedge" and copy.status is JobStatus.CANCELLED
    assert copy.response_id is None and server.counters.creates == 2
    assert slow.status is JobStatus.COMPLETED and slow.response_id == original.response_id
    assert mgr.statistics().hedges == 1 and mgr.statistics().hedges_won == 0


def test_hedge_is_checked_when_made() -> None:
    for bad in ({"after": "p100"}, {"after": "fast"}, {"after": -1.0}, {"max_extra": 2},
                {"min_samples": 0}):
        with pytest.raises(ValueError, match="Hedge"):
            Hedge(**bad)  # type: ignore[arg-type]


async def test_a_rerun_after_a_hedge_serves_the_winner_and_sends_nothing(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path,
) -> None:
    server.latency = LatencyModel.fixed(0.02)
    hedge = Hedge(after=0.2, max_extra=1.0, min_samples=1)
    journal = tmp_path / "run.db"
    async with manager(client, journal=journal, hedge=hedge) as mgr:
        await (await mgr.submit(key="warm", model="m", input="x")).wait()
        server.latency = LatencyModel.fixed(30)  # the original is stuck on a slow replica...
        job = await mgr.submit(key="k", model="m", input="x")
        await job.wait_accepted()
        server.latency = LatencyModel.fixed(0.02)  # ...and its copy, 0.2 s later, is quick
        await job.wait()
    original, copy = job.attempts
    assert copy.key == "k#hedge" and job.response_id == copy.response_id
    assert original.status is JobStatus.CANCELLED and job.status is JobStatus.COMPLETED
    assert mgr.statistics().hedges_won == 1 and server.counters.creates == 3
    assert server.counters.cancels == 1

    async with manager(client, journal=journal, hedge=hedge) as mgr:
        again = await mgr.submit(key="k", model="m", input="x")
        await again.wait()
    assert server.counters.creates == 3  # both served from the journal
    assert again.status is JobStatus.COMPLETED and again.response_id == copy.response_id
    assert [a.key for a in again.attempts] == ["k", "k#hedge"]
