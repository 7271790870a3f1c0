#!/usr/bin/env python3
"""Hedged requests against a heavy tail (issue 24): p99 time to done and cost, with and without.

    .venv/bin/python benchmarks/hedge.py [--jobs 200] [--median 0.5] [--seed 1]

The fake server draws each response's duration from a lognormal (median ``--median`` s, sigma
0.25) and makes 2 % of responses 10x slower, per response (a slow replica: a second copy of
the same request is usually quick). ``--jobs`` jobs are submitted at once with room for all of
them, once without hedging and once with ``Hedge(after="p95", max_extra=0.05)``. Reported for
each: p50, p99 and max seconds from submit to done, creates, and the run's cost; for the
hedged run, the copies sent and won and what the losers cost as a share of the run's spend.

The fake runs in-process (``fake_client``): its clock is real, so these take real seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncbg
from asyncbg.testing import FakeResponsesServer, LatencyModel, UsageModel, fake_client
from benchmarks.common import pct

PRICE = asyncbg.Price(input=1.0, output=10.0)


async def workload(*, jobs: int, hedge: asyncbg.Hedge | None, median: float = 0.5,
                   sigma: float = 0.25, tail: float = 0.02, seed: int = 1) -> dict[str, Any]:
    """One run of ``jobs`` jobs on a lognormal workload with a ``tail`` of 10x jobs."""
    server = FakeResponsesServer(
        latency=LatencyModel("lognormal", median=median, sigma=sigma, tail=tail,
                             tail_factor=10.0),
        usage=UsageModel(input_tokens=1000, output_tokens=500, reasoning_tokens=500),
        seed=seed)
    poll = asyncbg.PollPolicy(first_poll=median / 5, min_interval=median / 10,
                              max_interval=median / 2, jitter=0)
    client = fake_client(server)
    done: list[float] = []
    try:
        async with asyncbg.BackgroundManager(
            client, max_concurrency=2 * jobs, max_requests=256, poll_policy=poll,
            prices={"m": PRICE}, hedge=hedge,
            # Known limits: no slow start, so that every job starts at once.
            rate_limit=asyncbg.RateLimit(requests_per_minute=1e9),
        ) as mgr:
            started = anyio.current_time()
            handles = [await mgr.submit(model="m", input=f"q{i}") for i in range(jobs)]
            async for _ in mgr.as_completed(handles):
                done.append(anyio.current_time() - started)
    finally:
        await client.close()
    stats = mgr.statistics()
    return {
        "jobs": jobs,
        "completed": sum(j.status is asyncbg.JobStatus.COMPLETED for j in handles),
        "p50_s": round(pct(done, 0.50), 4),
        "p99_s": round(pct(done, 0.99), 4),
        "max_s": round(max(done), 4),
        "done_s": done,
        "creates": server.counters.creates,
        "cost": round(stats.cost, 6),
        "hedges": stats.hedges,
        "hedges_won": stats.hedges_won,
        "hedge_cost": round(stats.hedge_cost, 6),
        "hedge_share": round(stats.hedge_cost / stats.cost, 4) if stats.cost else 0.0,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    plain = await workload(jobs=args.jobs, hedge=None, median=args.median, seed=args.seed)
    hedged = await workload(jobs=args.jobs, hedge=asyncbg.Hedge(after="p95", max_extra=0.05),
                            median=args.median, seed=args.seed)
    for side in (plain, hedged):
        del side["done_s"]
    return {"without": plain, "with": hedged,
            "p99_ratio": round(hedged["p99_s"] / plain["p99_s"], 3),
            "cost_ratio": round(hedged["cost"] / plain["cost"], 4)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--median", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    print(json.dumps(anyio.run(main, parser.parse_args()), indent=2))
