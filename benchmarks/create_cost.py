#!/usr/bin/env python3
"""Client CPU per create: asyncbg's create against the SDK's ``responses.create``.

    .venv/bin/python benchmarks/create_cost.py [--n 300] [--rounds 5] [--json out.json]
    .venv/bin/py-spy record --format raw -o create.txt -- \
        .venv/bin/python benchmarks/create_cost.py --side asyncbg_create --n 3000 --rounds 1

The fake server runs in its own process (``benchmarks/fake_server.py``), so
``time.process_time()`` here is the client's CPU alone. The client is a plain
``AsyncOpenAI(api_key=..., base_url=...)``, the one asyncbg's lean path mirrors. Each side sends
``n`` creates of the same realistic request (a function tool, a structured-output schema,
reasoning, metadata, ~1 KB of input) per round, one at a time; rounds are interleaved and each
side's median is reported:

* ``sdk_create``: ``client.responses.create(**params)``, the baseline (a parsed ``Response``);
* ``sdk_raw_create``: ``client.responses.with_raw_response.create(**params)``, what asyncbg sent
  before the lean create (the raw answer, no model);
* ``asyncbg_create``: ``OpenAIResponses(client).create(params)``, what the engine calls for
  each create (the lean POST, the answer parsed, an ``Answer`` built);
* ``asyncbg_create_sdk``: the same with ``lean_creates=False`` (the SDK path it falls back to).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from asyncbg.providers import OpenAIResponses  # noqa: E402
from benchmarks.common import sdk_client, server_process  # noqa: E402

GOAL = 0.25
SIDES = ("sdk_create", "sdk_raw_create", "asyncbg_create", "asyncbg_create_sdk")

PARAMS: dict[str, Any] = {
    "model": "bench",
    "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "Summarize the attached report. " * 30},
        {"type": "input_file", "file_id": "file-abc123"},
    ]}],
    "instructions": "Answer in three sentences.",
    "tools": [{"type": "function", "name": "lookup", "description": "Look a term up.",
               "parameters": {"type": "object", "properties": {"term": {"type": "string"}},
                              "required": ["term"], "additionalProperties": False},
               "strict": True}],
    "text": {"format": {"type": "json_schema", "name": "summary", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["summary", "score"],
        "properties": {"summary": {"type": "string"}, "score": {"type": "number"}}}}},
    "reasoning": {"effort": "low"},
    "metadata": {"fake_duration": "0", "fake_queue": "0", "batch": "b1"},
}


async def measure(base_url: str, n: int, rounds: int,
                  sides: tuple[str, ...] = SIDES) -> dict[str, Any]:
    client = sdk_client(base_url)
    lean = OpenAIResponses(client)
    via_sdk = OpenAIResponses(client, lean_creates=False)
    prepared = lean.prepare(PARAMS, stream=False)
    plain = {**PARAMS, "background": True, "store": True}
    try:
        async def sdk() -> str:
            return (await client.responses.create(**plain)).status or ""

        async def sdk_raw() -> str:
            raw = await client.responses.with_raw_response.create(**plain)
            return str(json.loads(raw.http_response.content)["status"])

        async def ours() -> str:
            return (await lean.create(prepared)).status.value

        async def ours_sdk() -> str:
            return (await via_sdk.create(prepared)).status.value

        calls: dict[str, Callable[[], Awaitable[str]]] = {
            name: call for name, call in zip(SIDES, (sdk, sdk_raw, ours, ours_sdk), strict=True)
            if name in sides}
        for name, call in calls.items():
            status = await call()
            if not status:
                raise RuntimeError(f"{name} read no status")
        if "asyncbg_create" in sides and not lean._lean:
            raise RuntimeError("the lean create path was not taken")
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                for _ in range(max(n // 10, 5)):
                    await call()
                t = time.process_time()
                for _ in range(n):
                    await call()
                samples[name].append((time.process_time() - t) / n * 1e6)
    finally:
        await lean.aclose()
        await via_sdk.aclose()
        await client.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    sdk_us = medians.get("sdk_create", math.nan)
    ratios = {name: round(us / sdk_us, 3) for name, us in medians.items()}
    return {
        "n": n,
        "rounds": rounds,
        "body_bytes": len(json.dumps(prepared)),
        "us_per_create": {name: round(us, 1) for name, us in medians.items()},
        "ratio_vs_sdk": ratios,
        "spread_us": {name: [round(min(v), 1), round(max(v), 1)] for name, v in samples.items()},
        "ratio": ratios.get("asyncbg_create", math.nan),
        "goal": f"<= {GOAL}",
    }


def report(result: dict[str, Any]) -> str:
    lines = [f"client CPU per create (median of {result['rounds']} interleaved rounds of "
             f"{result['n']}; request body ~{result['body_bytes']} bytes)",
             f"{'side':<24}{'us/create':>10}{'vs SDK':>9}   rounds (min-max us)"]
    for name, us in result["us_per_create"].items():
        low, high = result["spread_us"][name]
        lines.append(f"{name:<24}{us:>10.1f}{result['ratio_vs_sdk'][name]:>9.3f}   "
                     f"{low}-{high}")
    ratio = result["ratio"]
    lines.append(f"asyncbg/SDK = {ratio:.3f} (goal <= {GOAL}: "
                 f"{'met' if ratio <= GOAL else 'NOT met'})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="creates per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--side", choices=SIDES, action="append",
                   help="run only this side (repeatable; for a profiler)")
    args = p.parse_args()
    with server_process() as base_url:
        result = asyncio.run(measure(base_url, args.n, args.rounds, tuple(args.side or SIDES)))
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
