"""Spend and pace, end to end against the fake server: costs, the budget, and paced creates."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from openai import AsyncOpenAI

import asyncbg
from asyncbg import JobStatus
from asyncbg.testing import (
    FakeRateLimit,
    FakeResponsesServer,
    LatencyModel,
    UsageModel,
    fake_client,
)

from .conftest import FAST_POLL, FAST_RETRY, manager

pytestmark = pytest.mark.asyncio
#: $1 per million input tokens, $0.10 cached, $10 per million output tokens.
PRICE = asyncbg.Price(input=1.0, cached_input=0.1, output=10.0)


def usage(input_tokens: int, output: int, reasoning: int = 0, cached: int = 0) -> dict[str, str]:
    return {"fake_input_tokens": str(input_tokens), "fake_output_tokens": str(output),
            "fake_reasoning_tokens": str(reasoning), "fake_cached_tokens": str(cached)}


async def test_each_job_has_its_usage_and_cost_and_statistics_add_them_up(
    client: AsyncOpenAI,
) -> None:
    async with manager(client, prices={"my-model": PRICE}) as mgr:
        a = await mgr.submit(model="my-model", input="x",
                             metadata=usage(1_000_000, 100_000, reasoning=400_000,
                                            cached=400_000))
        flex = await mgr.submit(model="my-model", input="x", service_tier="flex",
                                metadata=usage(1_000_000, 0))
    # 600k input at $1 + 400k cached at $0.10 + (100k + 400k reasoning) output at $10
    assert a.cost == pytest.approx(0.6 + 0.04 + 5.0)
    assert a.usage is not None and a.usage.output_tokens_details.reasoning_tokens == 400_000
    assert flex.cost == pytest.approx(0.5)  # flex: half price
    stats = mgr.statistics()
    assert stats.cost == pytest.approx(a.cost + flex.cost)
    assert stats.input_tokens == 2_000_000 and stats.cached_input_tokens == 400_000
    assert stats.output_tokens == 500_000 and stats.reasoning_tokens == 400_000


async def test_a_model_with_no_price_has_no_cost_and_one_warning(
    client: AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="asyncbg"):
        async with manager(client, max_cost=0.01) as mgr:
            jobs = [await mgr.submit(model="no-such-model-xyz", input="x") for _ in range(3)]
    assert all(j.status is JobStatus.COMPLETED and j.cost is None for j in jobs)
    assert mgr.statistics().cost == 0  # and it never counted against the budget
    warnings = [r for r in caplog.records if "price.unknown" in r.getMessage()]
    assert len(warnings) == 1 and "no-such-model-xyz" in warnings[0].getMessage()


async def test_a_budget_stops_creates_and_a_larger_one_runs_exactly_the_rest(
    server: FakeResponsesServer, tmp_path: Path
) -> None:
    # Each job costs $0.10 +-50 %; a budget of $2 runs about 20 of 40.
    server.usage = UsageModel(input_tokens=0, output_tokens=10_000, reasoning_tokens=0,
                              spread=0.5, seed=3)
    client = fake_client(server)
    db = tmp_path / "j.db"
    try:
        async with manager(client, journal=db, max_cost=2.0, max_concurrency=4,
                           prices={"m": PRICE}) as mgr:
            jobs = [await mgr.submit(key=f"k{i}", model="m", input="x",
                                     max_output_tokens=10_000) for i in range(40)]
        stats = mgr.statistics()
        not_run = [j for j in jobs if j.error_code == "budget_exceeded"]
        ran = [j for j in jobs if j.status is JobStatus.COMPLETED]
        assert stats.cost <= 2.0 * 1.05
        assert len(ran) + len(not_run) == 40 and len(ran) >= 14
        assert server.counters.creates == len(ran)  # nothing was sent for the others
        with pytest.raises(asyncbg.BudgetExceeded, match=r"budget of \$2\.00"):
            await not_run[0].result()
        assert isinstance(not_run[0].error, str) and "not run" in not_run[0].error
        # A rerun with a larger budget runs exactly the ones not run, and serves the rest.
        async with manager(client, journal=db, max_cost=100.0, max_concurrency=4,
                           prices={"m": PRICE}) as mgr:
            again = [await mgr.submit(key=f"k{i}", model="m", input="x",
                                      max_output_tokens=10_000) for i in range(40)]
        assert all(j.status is JobStatus.COMPLETED for j in again)
        assert server.counters.creates == 40
    finally:
        await client.close()


async def test_real_spend_past_the_budget_cancels_every_live_job(
    server: FakeResponsesServer,
) -> None:
    client = fake_client(server)
    try:
        async with manager(client, max_cost=1.0, prices={"m": PRICE}) as mgr:
            long = [await mgr.submit(model="m", input="x", max_output_tokens=10,
                                     metadata={"fake_duration": "30", **usage(10, 10)})
                    for _ in range(3)]
            for j in long:
                await j.wait_accepted()
            # estimated at cents; really $2 of output
            costly = await mgr.submit(model="m", input="x", metadata=usage(0, 200_000))
            await mgr.wait_all(long, timeout=10)
    finally:
        await client.close()
    assert costly.status is JobStatus.COMPLETED and costly.cost == pytest.approx(2.0)
    assert all(j.status is JobStatus.CANCELLED for j in long)
    assert all(j.error_code == "budget_exceeded" for j in long)
    assert server.counters.cancels == 3
    with pytest.raises(asyncbg.BudgetExceeded, match=r"\$1\.00"):
        await long[0].result()


async def test_creates_are_paced_below_the_servers_rate_limit() -> None:
    # The server admits 40 creates a second (429 + Retry-After + x-ratelimit headers above).
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.02),
                                 rate_limit=FakeRateLimit.per_second(40))
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(client, max_concurrency=200, poll_policy=FAST_POLL,
                                             retry_policy=FAST_RETRY) as mgr:
            jobs = [await mgr.submit(model="m", input=str(i)) for i in range(120)]
    finally:
        await client.close()
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    creates = server.counters.creates
    assert server.counters.rate_limited <= 0.02 * (creates + server.counters.rate_limited)
    assert mgr.statistics().rate_limited == server.counters.rate_limited


async def test_a_known_rate_limit_is_never_exceeded() -> None:
    # The client books its creates against 20 a second with a second's burst; the server
    # holds half a second more (10 requests), the slack for creates that reach it bunched up
    # behind a stalled event loop on a loaded machine. Unpaced (or with a minute's burst), 50
    # creates (max_concurrency) would reach it at once and 20 would be refused.
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.01),
                                 rate_limit=FakeRateLimit(requests_per_minute=1200,
                                                          burst_seconds=1.5))
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(
            client, max_concurrency=50, poll_policy=FAST_POLL, retry_policy=FAST_RETRY,
            rate_limit=asyncbg.RateLimit(requests_per_minute=1200),
        ) as mgr:
            jobs = [await mgr.submit(model="m", input=str(i)) for i in range(60)]
    finally:
        await client.close()
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert server.counters.rate_limited == 0


async def test_price_and_rate_limit_are_frozen_hashable_values() -> None:
    assert hash(PRICE) == hash(asyncbg.Price(input=1.0, cached_input=0.1, output=10.0))
    assert hash(asyncbg.RateLimit(requests_per_minute=5)) is not None
    with pytest.raises(ValueError):
        asyncbg.Price(input=-1.0, output=1.0)
