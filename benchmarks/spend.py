#!/usr/bin/env python3
"""Spend and pace against the fake server (issue "Spend and pace"): pacing below a rate limit,
and a budget over jobs whose usage varies. Both sides of each comparison run in this process.

    .venv/bin/python benchmarks/spend.py [--rate 100] [--jobs 1000] [--concurrency 500]

1. Pacing: the fake server admits ``--rate`` creates a second (429 + Retry-After +
   x-ratelimit headers above it). ``--jobs`` jobs at ``max_concurrency=--concurrency`` through
   asyncbg, against a raw ``asyncio.gather`` of the same creates behind a semaphore of the same
   size (the SDK's own retries on, as people run it). Reported: the share of creates answered
   429, and creates accepted per second as a fraction of the rate.
2. Budget: 500 jobs whose output varies +-50 % around $0.10 each, ``max_cost=$20`` (room for
   about 200). Reported: spend / max_cost (goal <= 1.05) and jobs run / jobs the budget allows at
   the jobs' real mean cost (goal >= 0.90).

The fake runs in-process (``fake_client``): its clock is real, so these take real seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai

import asyncbg
from asyncbg.testing import (
    FakeRateLimit,
    FakeResponsesServer,
    LatencyModel,
    UsageModel,
    fake_client,
)

FAST = asyncbg.PollPolicy(first_poll=0.05, min_interval=0.05, max_interval=0.2)
PRICE = asyncbg.Price(input=1.0, output=10.0)


async def paced(rate: float, jobs: int, concurrency: int) -> dict[str, float]:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.2),
                                 rate_limit=FakeRateLimit.per_second(rate))
    client = fake_client(server)
    started = time.monotonic()
    try:
        async with asyncbg.BackgroundManager(client, max_concurrency=concurrency,
                                             poll_policy=FAST) as mgr:
            for i in range(jobs):
                await mgr.submit(model="m", input=str(i))
    finally:
        await client.close()
    wall = time.monotonic() - started
    c = server.counters
    done = sum(n for s, n in mgr.statistics().by_status.items() if s == "completed")
    return {"creates": c.creates, "answered_429": c.rate_limited,
            "share_429": c.rate_limited / max(c.creates + c.rate_limited, 1),
            "throughput_vs_rate": c.creates / wall / rate, "completed": done, "wall_s": wall}


async def raw(rate: float, jobs: int, concurrency: int) -> dict[str, float]:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.2),
                                 rate_limit=FakeRateLimit.per_second(rate))
    client = fake_client(server, max_retries=2)
    gate = asyncio.Semaphore(concurrency)
    failed = 0
    started = time.monotonic()

    async def one(i: int) -> None:
        nonlocal failed
        async with gate:
            try:
                await client.responses.create(model="m", input=str(i), background=True)
            except openai.RateLimitError:
                failed += 1

    try:
        await asyncio.gather(*(one(i) for i in range(jobs)))
    finally:
        await client.close()
    wall = time.monotonic() - started
    c = server.counters
    return {"creates": c.creates, "answered_429": c.rate_limited,
            "share_429": c.rate_limited / max(c.creates + c.rate_limited, 1),
            "throughput_vs_rate": c.creates / wall / rate, "failed": failed, "wall_s": wall}


async def budget(jobs: int = 500, max_cost: float = 20.0) -> dict[str, float]:
    # 10,000 output tokens at $10 per million = $0.10 a job, +-50 %
    server = FakeResponsesServer(latency=LatencyModel.uniform(0.05, 0.3),
                                 usage=UsageModel(input_tokens=0, output_tokens=10_000,
                                                  reasoning_tokens=0, spread=0.5, seed=1))
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(client, max_concurrency=50, poll_policy=FAST,
                                             max_cost=max_cost, prices={"m": PRICE}) as mgr:
            handles = [await mgr.submit(model="m", input="x", max_output_tokens=10_000)
                       for _ in range(jobs)]
    finally:
        await client.close()
    costs = [j.cost for j in handles if j.cost is not None]
    spent = mgr.statistics().cost
    allowed = max_cost / statistics.mean(costs)
    return {"spent": spent, "spend_vs_max": spent / max_cost, "ran": len(costs),
            "ran_vs_allowed": len(costs) / allowed,
            "not_run": sum(j.error_code == "budget_exceeded" for j in handles)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=500)
    args = p.parse_args()
    a = await paced(args.rate, args.jobs, args.concurrency)
    r = await raw(args.rate, args.jobs, args.concurrency)
    b = await budget()
    print(f"pacing, R = {args.rate:g} creates/s, {args.jobs} jobs at max_concurrency "
          f"{args.concurrency}:")
    print(f"  asyncbg      429s {a['answered_429']:>6,} ({a['share_429']:.1%} of answers)  "
          f"throughput {a['throughput_vs_rate']:.2f} R  completed {a['completed']:,}  "
          f"({a['wall_s']:.1f} s)")
    print(f"  raw gather   429s {r['answered_429']:>6,} ({r['share_429']:.1%} of answers)  "
          f"throughput {r['throughput_vs_rate']:.2f} R  failed {r['failed']:,} "
          f"(SDK retries 2)  ({r['wall_s']:.1f} s)")
    print(f"budget $20 over 500 jobs of $0.10 +-50 %: spent ${b['spent']:.2f} "
          f"({b['spend_vs_max']:.3f} of max_cost), ran {b['ran']} = "
          f"{b['ran_vs_allowed']:.2f} of what it allows, not run {b['not_run']}")


if __name__ == "__main__":
    asyncio.run(main())
