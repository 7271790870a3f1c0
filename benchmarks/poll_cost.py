#!/usr/bin/env python3
"""Client CPU per status check: asyncbg's public check against the SDK's retrieve, with the
layers below it (a bare httpx2 GET, the lean poller alone) for where the time goes.

    .venv/bin/python benchmarks/poll_cost.py [--n 1000] [--rounds 5] [--json out.json]

The fake server runs in its own process (``benchmarks/fake_server.py``), so
``time.process_time()`` here is the client's CPU alone. The client is a plain
``AsyncOpenAI(api_key=..., base_url=...)`` with the SDK's own http client, the one asyncbg's
lean path mirrors. One long response is created, then each side polls it ``n`` times per round;
rounds are interleaved and each side's median is reported. Every side ends holding the status,
as a poller needs it:

* ``sdk_retrieve``: ``client.responses.retrieve(id)``, the baseline;
* ``asyncbg_check``: ``asyncbg.providers.OpenAIResponses(client).check(id)``, what the scheduler
  calls for every live poll (lean GET, the body parsed as JSON, an ``Answer`` built);
* ``httpx2_get+json``: the SDK's HTTP client alone, with the same headers;
* ``lean_get+json`` / ``lean_get+read_status``: asyncbg's aiohttp poller alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from asyncbg._providers._lean import LeanPoller, read_status  # noqa: E402
from asyncbg.providers import OpenAIResponses  # noqa: E402
from benchmarks.common import sdk_client, server_process  # noqa: E402

GOAL = 0.12
SIDES = ("sdk_retrieve", "asyncbg_check", "httpx2_get+json", "lean_get+json",
         "lean_get+read_status")


async def measure(base_url: str, n: int, rounds: int) -> dict[str, Any]:
    client = sdk_client(base_url)
    # The same decision OpenAIResponses makes for this client: the benchmark must measure the
    # lean path, not the SDK fallback.
    lean = LeanPoller.for_client(client)
    if lean is None:
        raise RuntimeError("LeanPoller.for_client() declined the benchmark client")
    provider = OpenAIResponses(client)
    bare = httpx2.AsyncClient(headers=dict(lean.headers), timeout=600)
    try:
        created = await client.responses.create(
            model="bench", input="poll cost", background=True,
            metadata={"fake_duration": "36000", "fake_queue": "0"},
        )
        rid = created.id
        path = f"responses/{rid}"
        url = lean.url(path)

        async def sdk() -> str:
            return (await client.responses.retrieve(rid)).status or ""

        async def check() -> str:
            return (await provider.check(rid)).status.value

        async def httpx2_get() -> str:
            answer = await bare.get(url)
            return str(json.loads(answer.content)["status"])

        async def lean_json() -> str:
            answer = await lean.get(path)
            return str(json.loads(answer.body)["status"])

        async def lean_quick() -> str:
            answer = await lean.get(path)
            return read_status(answer.body) or ""

        calls: dict[str, Callable[[], Awaitable[str]]] = dict(zip(SIDES, (
            sdk, check, httpx2_get, lean_json, lean_quick), strict=True))
        for name, call in calls.items():
            status = await call()
            if status != "in_progress":
                raise RuntimeError(f"{name} read status {status!r}, expected 'in_progress'")
        body_bytes = len((await lean.get(path)).body)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                for _ in range(max(n // 10, 5)):  # warm the connection and caches
                    await call()
                t = time.process_time()
                for _ in range(n):
                    await call()
                samples[name].append((time.process_time() - t) / n * 1e6)
    finally:
        await provider.aclose()
        await lean.aclose()
        await bare.aclose()
        await client.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    sdk_us = medians["sdk_retrieve"]
    ratios = {name: round(us / sdk_us, 3) for name, us in medians.items()}
    return {
        "n": n,
        "rounds": rounds,
        "body_bytes": body_bytes,
        "lean": True,
        "us_per_check": {name: round(us, 1) for name, us in medians.items()},
        "ratio_vs_sdk": ratios,
        "spread_us": {name: [round(min(v), 1), round(max(v), 1)] for name, v in samples.items()},
        "sdk_us": round(sdk_us, 1),
        "asyncbg_us": round(medians["asyncbg_check"], 1),
        "ratio": ratios["asyncbg_check"],
        "goal": f"<= {GOAL}",
    }


def report(result: dict[str, Any]) -> str:
    lines = [f"client CPU per status check (median of {result['rounds']} interleaved rounds of "
             f"{result['n']}; body {result['body_bytes']} bytes)",
             f"{'side':<24}{'us/check':>10}{'vs SDK':>9}   rounds (min-max us)"]
    for name, us in result["us_per_check"].items():
        low, high = result["spread_us"][name]
        lines.append(f"{name:<24}{us:>10.1f}{result['ratio_vs_sdk'][name]:>9.3f}   "
                     f"{low}-{high}")
    ratio = result["ratio"]
    lines.append(f"asyncbg/SDK = {ratio:.3f} (goal <= {GOAL}: "
                 f"{'met' if ratio <= GOAL else 'NOT met'})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="checks per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    with server_process() as base_url:
        result = asyncio.run(measure(base_url, args.n, args.rounds))
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
