"""Re-attaching to ended batches: N jobs in N/B batches, collected by a new process.

A first manager submits every job with a journal and leaves before its first poll (a crash,
say): the journal holds each job's ``<batch_id>#<custom_id>``. Once every batch has ended on
the fake, a second manager with a new provider submits the same keys: each resumes its batch.
What is measured: the wall time of that second run, the fake's result downloads and batch polls
(the goal: one download per batch, a few polls per batch, whatever the number of jobs).

    python benchmarks/batch_reattach.py [--jobs 10000] [--batch-size 1000]
                                        [--provider openai-batch|anthropic|gemini]

In-process fake (no sockets), the official SDK of each API, a journal on local disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

import asyncbg
from asyncbg import testing
from asyncbg.providers import AnthropicBatches, GeminiBatches, OpenAIBatch
from asyncbg.testing import FakeResponsesServer

#: The first process leaves before its first poll.
NEVER = asyncbg.PollPolicy(first_poll=3600, min_interval=3600, max_interval=3600)


class Leave(Exception):
    """Raised to leave the first manager with its batches running."""


def _request(provider: str, key: str) -> dict[str, Any]:
    if provider == "openai-batch":
        return {"model": "gpt-5", "input": f"question {key}"}
    if provider == "anthropic":
        return {"model": "claude-sonnet-4-5", "max_tokens": 256,
                "messages": [{"role": "user", "content": f"question {key}"}]}
    return {"model": "gemini-2.5-flash", "contents": f"question {key}"}


def _provider(name: str, server: FakeResponsesServer, batch_size: int) -> tuple[Any, Any]:
    """(provider, client to close) for ``name`` on the in-process fake."""
    if name == "openai-batch":
        client: Any = testing.fake_client(server)
        return OpenAIBatch(client, max_batch_size=batch_size, batch_delay=30), client
    if name == "anthropic":
        client = testing.fake_anthropic_client(server)
        return AnthropicBatches(client, max_batch_size=batch_size, batch_delay=30), client
    client = testing.fake_genai_client(server)
    return GeminiBatches(client, max_batch_size=batch_size, batch_delay=30), client


async def _close(client: Any) -> None:
    aio = getattr(client, "aio", None)
    await (aio.aclose() if aio is not None else client.close())


async def measure(*, jobs: int, batch_size: int, provider: str) -> dict[str, Any]:
    logging.getLogger("asyncbg").setLevel(logging.ERROR)
    server = FakeResponsesServer(latency=testing.LatencyModel.fixed(0.2))
    server.batches.timing = testing.BatchTiming(validating=0.01, finalizing=0.01, cancelling=0.01)
    keys = [f"k{i}" for i in range(jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "run.journal"
        first, client = _provider(provider, server, batch_size)
        t0 = time.perf_counter()
        try:
            async with asyncbg.BackgroundManager(first, journal=journal, cancel_on_exit=False,
                                                 poll_policy=NEVER,
                                                 max_concurrency=jobs) as mgr:
                submitted = [await mgr.submit(key=k, **_request(provider, k)) for k in keys]
                for job in submitted:
                    await job.wait_accepted()
                raise Leave
        except Leave:
            pass
        finally:
            await _close(client)
        submit_s = time.perf_counter() - t0
        await anyio.sleep(0.5)  # every batch has ended on the fake
        batches = server.counters.batch_creates
        server.counters.reset()

        second, client = _provider(provider, server, batch_size)
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            async with asyncbg.BackgroundManager(second, journal=journal,
                                                 max_concurrency=jobs) as mgr:
                again = [await mgr.submit(key=k, **_request(provider, k)) for k in keys]
                await mgr.wait_all(again)
        finally:
            await _close(client)
        reattach_s = time.perf_counter() - t0
        reattach_cpu_s = time.process_time() - cpu0
    c = server.counters
    return {
        "provider": provider, "jobs": jobs, "batches": batches,
        "completed": sum(j.status is asyncbg.JobStatus.COMPLETED for j in again),
        "submit_s": round(submit_s, 2), "reattach_s": round(reattach_s, 2),
        "reattach_cpu_s": round(reattach_cpu_s, 2),
        "result_downloads": c.result_fetches, "batch_polls": c.batch_polls,
        "batch_creates": c.batch_creates,
        "provider_requests": getattr(second, "requests", None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--provider", default="openai-batch",
                        choices=("openai-batch", "anthropic", "gemini"))
    args = parser.parse_args()
    result = anyio.run(lambda: measure(jobs=args.jobs, batch_size=args.batch_size,
                                       provider=args.provider))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
