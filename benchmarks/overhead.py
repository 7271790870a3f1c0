"""Orchestration overhead and submission throughput: asyncbg against the careful raw-SDK loop.

Both sides run against the same out-of-process fake server, one after the other, and the server
counts every HTTP call. The overhead run makes both sides make the *same* calls: every job runs
``duration = k * interval + interval / 2`` seconds and both sides poll it at a fixed interval
with no jitter, so each job is seen live ``k`` times and done on poll ``k + 1`` whatever the
sub-interval scheduling noise (up to half an interval of drift per job). The counts are compared,
and CPU is reported in total and per call.
"""

from __future__ import annotations

import time
from typing import Any

import asyncbg
from benchmarks import baselines
from benchmarks.common import counters, fixed, job, reset, sdk_client


async def overhead(base_url: str, n: int, *, interval: float, live_polls: int,
                   concurrency: int) -> dict[str, Any]:
    duration = live_polls * interval + interval / 2
    requests = [job(i, duration) for i in range(n)]
    out: dict[str, Any] = {"jobs": n, "interval_s": interval, "duration_s": duration,
                           "concurrency": concurrency,
                           "expected_calls": n * (live_polls + 2)}
    for side in ("baseline", "asyncbg"):
        await reset(base_url)
        # Both sides use the SDK's default client. (A pool with room for all 200 connections
        # costs the baseline more, not less: httpcore checks every pooled connection for
        # expiry on each request.)
        c = sdk_client(base_url)
        t = time.process_time()
        wall = time.monotonic()
        try:
            if side == "baseline":
                statuses = await baselines.careful_loop(c, requests, interval=interval,
                                                        concurrency=concurrency)
            else:
                async with asyncbg.BackgroundManager(
                    c, max_concurrency=concurrency, poll_policy=fixed(interval)
                ) as mgr:
                    jobs = [await mgr.submit(**r) for r in requests]
                statuses = [j.status.value for j in jobs]
        finally:
            await c.close()
        cpu = time.process_time() - t
        wall = time.monotonic() - wall
        seen = await counters(base_url)
        calls = seen["creates"] + seen["retrieves"]
        out[side] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 2),
                     "creates": seen["creates"], "retrieves": seen["retrieves"],
                     "http_calls": calls, "cpu_us_per_call": round(cpu / calls * 1e6),
                     "completed": statuses.count("completed")}
    a, b = out["asyncbg"], out["baseline"]
    out["same_calls"] = a["http_calls"] == b["http_calls"]
    out["cpu_ratio"] = round(a["cpu_s"] / b["cpu_s"], 3)
    out["per_call_ratio"] = round(a["cpu_us_per_call"] / b["cpu_us_per_call"], 3)
    out["goal"] = "<= 0.15"  # issue 23: client CPU per job, whole life
    return out


async def throughput(base_url: str, n: int) -> dict[str, Any]:
    concurrency = 64
    requests = [job(i, 0.0) for i in range(n)]  # done at create: creates are all there is
    out: dict[str, Any] = {"jobs": n, "concurrency": concurrency}
    for side in ("baseline", "asyncbg"):
        await reset(base_url)
        c = sdk_client(base_url)
        start = time.monotonic()
        try:
            if side == "baseline":
                await baselines.gather_creates(c, requests, concurrency=concurrency)
            else:
                async with asyncbg.BackgroundManager(c, max_concurrency=concurrency) as mgr:
                    for r in requests:
                        await mgr.submit(**r)
        finally:
            await c.close()
        seen = await counters(base_url)
        out[side] = {"jobs_per_s": round(n / (time.monotonic() - start), 1),
                     "creates": seen["creates"]}
    out["ratio"] = round(out["asyncbg"]["jobs_per_s"] / out["baseline"]["jobs_per_s"], 3)
    out["goal"] = ">= 0.9"
    return out
