#!/usr/bin/env python3
"""The cheapest way to meet a deadline (issue 22, ``--by``): dollars against all-background.

    .venv/bin/python benchmarks/deadline.py [--lines 200] [--seed 0]

The same lines run through :class:`asyncbg.DeadlineManager` with ``by`` = 24 h, 8 h and 2 h,
and through a plain :class:`asyncbg.BackgroundManager` (all background, full price), each
against a fresh in-process fake with the same seed; a last run has 2 h and flex short of
capacity (the flex responses of a fifth of the lines never end). One fake clock drives the
fake server and the deadline policy; it advances 20 s every few milliseconds, so a day passes
in seconds.
Responses (flex and background) take a lognormal time around 10 minutes (clamped to 1 min-1 h;
the policy's needs are set to match: background 1 h, flex 2 h, batch 20 h);
batch requests the same, and ``--stuck`` of them never end (the batch is cancelled before the
deadline, and their lines move; a batch is polled at least every 20 ms of real time, as a
fake hour lasts half a second). Tokens come from the fake's usage model; dollars from the
genai-prices dataset for gpt-5.2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

import asyncbg
from asyncbg._providers import _batching
from asyncbg.testing import FakeAnswer, FakeResponsesServer, LatencyModel, fake_client

# A batch's polls are shared for up to 30 real seconds (nothing, for a batch of hours); here a
# fake hour passes in half a real second, so a batch is polled at least every 20 ms instead.
_batching.MAX_FRESH = 0.02

FAST = asyncbg.PollPolicy(first_poll=0.005, min_interval=0.005, max_interval=0.02)
LATENCY = LatencyModel.lognormal(600.0, 0.8, low=60.0, high=3600.0)
#: Needs that match this world: a response takes an hour at most.
POLICY = asyncbg.DeadlinePolicy(batch_needs=20 * 3600.0, flex_needs=2 * 3600.0,
                                background_needs=3600.0, check_every=0.003)
STEP = 20.0  # fake seconds per tick


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _ticking(clock: Clock, done: anyio.Event) -> None:
    while not done.is_set():
        await anyio.sleep(0.003)
        clock.now += STEP


class SlowFlex(FakeResponsesServer):
    """Flex short of capacity: the flex responses of the first ``stuck`` lines never end."""

    def __init__(self, stuck: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.stuck = stuck

    async def handle(self, method: str, path: str, query: Mapping[str, str],
                     body: bytes) -> FakeAnswer:
        if method == "POST" and path.endswith("/responses"):
            data = json.loads(body)
            line = int(str(data["input"]).split(":")[0].split()[-1])
            if data.get("service_tier") == "flex" and line < self.stuck:
                data["metadata"] = {"fake_outcome": "stuck"}
                body = json.dumps(data).encode()
        return await super().handle(method, path, query, body)


def _request(i: int) -> dict[str, object]:
    return {"model": "gpt-5.2", "input": f"Question {i}: " + "lorem ipsum " * 40}


async def by_deadline(lines: int, hours: float, stuck: float, seed: int,
                      slow_flex: float = 0.0) -> dict[str, object]:
    clock = Clock()
    server = SlowFlex(int(lines * slow_flex), latency=LATENCY, clock=clock, seed=seed)
    for i in range(int(lines * stuck)):
        server.batches.script(f"l{i}@batch", outcome="stuck")
    client = fake_client(server)
    done = anyio.Event()
    ends: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_ticking, clock, done)
        async with asyncbg.DeadlineManager(
                client, by=hours * 3600, clock=clock, on_done=lambda _: ends.append(clock.now),
                poll_policy=FAST, batch_poll_policy=FAST,
                batch_delay=0.05, max_concurrency=lines,
                policy=POLICY) as dm:
            for i in range(lines):
                await dm.submit_request(_request(i), key=f"l{i}")
        done.set()
    await client.close()
    s = dm.statistics()
    late = sum(ln.job is not None and ln.job.status.value != "completed" for ln in dm.lines)
    return {"by_hours": hours, "slow_flex": slow_flex, "lines": s.lines,
            "dollars": {k: round(v, 4) for k, v in s.dollars.items()},
            "total": round(s.cost, 4), "full_price": round(s.full_price, 4),
            "moved": s.moved, "not_completed": late, "flex_kept_pace": s.flex_kept_pace,
            "last_line_ended_at_hours": round(max(ends) / 3600, 2)}


async def all_background(lines: int, seed: int) -> float:
    clock = Clock()
    server = FakeResponsesServer(latency=LATENCY, clock=clock, seed=seed)
    client = fake_client(server)
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_ticking, clock, done)
        async with asyncbg.BackgroundManager(client, poll_policy=FAST,
                                             max_concurrency=lines) as mgr:
            for i in range(lines):
                await mgr.submit_request(_request(i), key=f"l{i}")
        done.set()
    await client.close()
    return round(mgr.statistics().cost, 4)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--stuck", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    baseline = await all_background(a.lines, a.seed)
    print(json.dumps({"all_background_dollars": baseline}))
    for hours, slow_flex in ((24.0, 0.0), (8.0, 0.0), (2.0, 0.0), (2.0, 0.2)):
        result = await by_deadline(a.lines, hours, a.stuck, a.seed, slow_flex)
        result["against_all_background"] = round(float(result["total"]) / baseline, 3)  # type: ignore[arg-type]
        print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
