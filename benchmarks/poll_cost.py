#!/usr/bin/env python3
"""Client CPU per status check: the SDK's retrieve, a bare httpx2 GET, and LeanPoller.

    .venv/bin/python benchmarks/poll_cost.py [--n 1000] [--rounds 5] [--json out.json]

The fake server runs in its own process (``benchmarks/fake_server.py``, started the way
``benchmarks/run.py`` starts it, without importing the harness), so ``time.process_time()`` here
is the client's CPU alone. One long response is created, then each
side polls it ``n`` times per round; rounds are interleaved and each side's median is reported.
Every side ends holding the status string, as a poller needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from asyncbg._providers._lean import LeanPoller, read_status  # noqa: E402

GOAL = 0.15


@contextlib.contextmanager
def server_process() -> Iterator[str]:
    """Start benchmarks/fake_server.py on a free port; yield its base URL once it accepts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_server.py"), "--port", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the fake server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def measure(base_url: str, n: int, rounds: int) -> dict[str, Any]:
    # The SDK's default http client: LeanPoller mirrors only that (a custom one opts out).
    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=base_url, max_retries=0)
    lean = LeanPoller.for_client(client)
    if lean is None:
        raise RuntimeError("LeanPoller.for_client() declined the benchmark client")
    bare = httpx2.AsyncClient(headers=dict(lean.headers), timeout=600)
    try:
        created = await client.responses.create(
            model="bench", input="poll cost", background=True,
            metadata={"fake_duration": "3600", "fake_queue": "0"},
        )
        rid = created.id
        path = f"responses/{rid}"
        url = lean.url(path)

        async def sdk() -> str:
            return (await client.responses.retrieve(rid)).status or ""

        async def httpx2_get() -> str:
            answer = await bare.get(url)
            return str(json.loads(answer.content)["status"])

        async def lean_json() -> str:
            answer = await lean.get(path)
            return str(json.loads(answer.body)["status"])

        async def lean_quick() -> str:
            answer = await lean.get(path)
            return read_status(answer.body) or ""

        sides: dict[str, Callable[[], Awaitable[str]]] = {
            "sdk_retrieve": sdk,
            "httpx2_get+json": httpx2_get,
            "lean_get+json": lean_json,
            "lean_get+read_status": lean_quick,
        }
        for name, call in sides.items():
            status = await call()
            if status != "in_progress":
                raise RuntimeError(f"{name} read status {status!r}, expected 'in_progress'")
        body_bytes = len((await lean.get(path)).body)
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name, call in sides.items():
                for _ in range(max(n // 10, 5)):  # warm the connection and caches
                    await call()
                t = time.process_time()
                for _ in range(n):
                    await call()
                samples[name].append((time.process_time() - t) / n * 1e6)
    finally:
        await lean.aclose()
        await bare.aclose()
        await client.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    sdk_us = medians["sdk_retrieve"]
    return {
        "n": n,
        "rounds": rounds,
        "body_bytes": body_bytes,
        "us_per_check": {name: round(us, 1) for name, us in medians.items()},
        "ratio_vs_sdk": {name: round(us / sdk_us, 3) for name, us in medians.items()},
        "goal": f"lean <= {GOAL} x sdk",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="checks per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    with server_process() as base_url:
        result = asyncio.run(measure(base_url, args.n, args.rounds))
    print(f"client CPU per status check (median of {args.rounds} interleaved rounds of "
          f"{args.n}; body {result['body_bytes']} bytes)")
    print(f"{'side':<24}{'us/check':>10}{'vs SDK':>9}")
    for name, us in result["us_per_check"].items():
        print(f"{name:<24}{us:>10.1f}{result['ratio_vs_sdk'][name]:>9.3f}")
    lean = result["ratio_vs_sdk"]["lean_get+read_status"]
    print(f"lean/SDK = {lean:.3f} (goal <= {GOAL}: {'met' if lean <= GOAL else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
