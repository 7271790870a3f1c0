#!/usr/bin/env python3
"""What asyncbg.OpenTelemetry costs (issue 21), as a ratio of one status check.

    .venv/bin/python benchmarks/otel.py [--jobs 2000] [--polls 10] [--rounds 5]

A job's hooks as the engine calls them: ``job_submitted``, one ``create`` and ``--polls``
``poll`` answers through ``request_done``, then ``job_finished``, on real finished jobs (a
manager ran them against the in-process fake). Measured in CPU time (``time.process_time()``),
median of ``--rounds``:

- ``api_only``: ``opentelemetry-api`` with no SDK configured (the global no-op providers);
- ``sdk_in_memory``: the SDK with an in-memory span exporter (simple processor) and an
  in-memory metric reader.

Each per job and per poll (``request_done`` alone), and as a ratio of asyncbg's status check
(``benchmarks/poll_cost.py``'s ``asyncbg_check``, measured here the same way against the fake
server in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncbg
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client
from benchmarks.common import server_process
from benchmarks.poll_cost import measure as poll_cost


async def finished_jobs(n: int) -> list[asyncbg.Job]:
    client = fake_client(FakeResponsesServer(latency=LatencyModel.fixed(0.0)))
    poll = asyncbg.PollPolicy(first_poll=0.001, min_interval=0.001, jitter=0)
    try:
        async with asyncbg.BackgroundManager(client, max_concurrency=256,
                                             poll_policy=poll) as mgr:
            jobs = [await mgr.submit(model="gpt-5.2", input="x", key=f"j{i}")
                    for i in range(n)]
            return await mgr.wait_all(jobs)
    finally:
        await client.close()


def per_job_us(hooks: asyncbg.OpenTelemetry, jobs: list[asyncbg.Job], polls: int,
               rounds: int) -> tuple[float, float]:
    params = {"model": "gpt-5.2", "input": "x"}
    job_us, poll_us = [], []
    for _ in range(rounds):
        started = time.process_time()
        for job in jobs:
            hooks.job_submitted(job, params)
            hooks.request_done(job, "create", 200, 0.01)
            for _ in range(polls):
                hooks.request_done(job, "poll", 200, 0.005)
            hooks.job_finished(job)
        job_us.append((time.process_time() - started) / len(jobs) * 1e6)
        job = jobs[0]
        hooks.job_submitted(job, params)
        started = time.process_time()
        for _ in range(len(jobs) * polls):
            hooks.request_done(job, "poll", 200, 0.005)
        poll_us.append((time.process_time() - started) / (len(jobs) * polls) * 1e6)
        hooks.job_finished(job)
    return statistics.median(job_us), statistics.median(poll_us)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--polls", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    with server_process() as url:
        check_us = asyncio.run(poll_cost(url, 500, 3))["asyncbg_us"]
    jobs = asyncio.run(finished_jobs(args.jobs))
    tracing = TracerProvider()
    spans = InMemorySpanExporter()
    tracing.add_span_processor(SimpleSpanProcessor(spans))
    sides: dict[str, Any] = {
        "api_only": asyncbg.OpenTelemetry(),
        "sdk_in_memory": asyncbg.OpenTelemetry(
            tracer_provider=tracing,
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])),
    }
    result: dict[str, Any] = {"jobs": args.jobs, "polls_per_job": args.polls,
                              "status_check_us": check_us}
    for name, hooks in sides.items():
        job, poll = per_job_us(hooks, jobs, args.polls, args.rounds)
        spans.clear()
        result[name] = {"us_per_job": round(job, 2), "us_per_poll": round(poll, 3),
                        "job_vs_check": round(job / check_us, 4),
                        "poll_vs_check": round(poll / check_us, 4)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
