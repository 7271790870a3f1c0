"""Push modes: how soon a finished job is seen done, polled, by webhook, or by background stream.

The delay is from the server's terminal moment to the client seeing the job done (both
``CLOCK_MONOTONIC``, one machine). Completions are spread over seconds (steady state): a burst
of hundreds in a few hundred milliseconds would measure the two shared cores' queue, not the
push path. Webhooks are served by ``asyncbg.webhook_app`` under uvicorn in this process and
delivered by the fake server.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import anyio

import asyncbg
from benchmarks import baselines
from benchmarks.common import (
    counters,
    job,
    pct,
    reset,
    roomy_client,
    sdk_client,
    server_process,
    wait_ready,
)

SECRET = "whsec_" + "YmVuY2htYXJrLXNlY3JldC1iZW5jaG1hcmstc2VjcmV0"
MODES = ("poll_default", "webhook", "stream")


@contextlib.contextmanager
def push_server() -> Iterator[tuple[str, socket.socket]]:
    """A fake server process that delivers webhooks, and the socket they come to: yields
    (base URL, socket). The caller waits for the server (``wait_ready``) before using it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        hook_url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        with server_process("--webhook-url", hook_url, "--webhook-secret", SECRET,
                            wait=False) as base_url:
            yield base_url, sock


async def push(n: int, *, shortest: float = 1.0, longest: float = 6.0,
               seeds_interval: float = 1.0,
               server: tuple[str, socket.socket] | None = None) -> dict[str, Any]:
    """Run the push modes against ``server`` (from :func:`push_server`), or a new one."""
    if server is None:
        with push_server() as started:
            return await push(n, shortest=shortest, longest=longest,
                              seeds_interval=seeds_interval, server=started)
    import uvicorn

    base_url, sock = server
    wait_ready(base_url)
    rng = random.Random(7)
    durations = [rng.uniform(shortest, longest) for _ in range(n)]
    out: dict[str, Any] = {"jobs": n, "durations_s": f"uniform {shortest}-{longest}",
                           "completions_per_s": round(n / (longest - shortest), 1)}
    current: list[asyncbg.BackgroundManager] = []

    async def hooks(scope: Any, receive: Any, send: Any) -> None:
        await asyncbg.webhook_app(current[-1])(scope, receive, send)

    web = uvicorn.Server(uvicorn.Config(hooks, log_level="error", lifespan="off"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(web.serve, [sock])
        for mode in MODES:
            await reset(base_url)
            c = sdk_client(base_url, webhook_secret=SECRET)
            done_at: dict[str, float] = {}
            try:
                mgr = asyncbg.BackgroundManager(
                    c, max_concurrency=n, webhooks=mode == "webhook",
                    poll_policy=asyncbg.PollPolicy.safety_net() if mode != "poll_default"
                    else None,
                )
                current.append(mgr)
                async with mgr:
                    jobs = [await mgr.submit(**job(i, d), stream=mode == "stream")
                            for i, d in enumerate(durations)]
                    async for j in mgr.as_completed(jobs):
                        done_at[j.response_id or ""] = time.monotonic()
                completed = sum(j.status is asyncbg.JobStatus.COMPLETED for j in jobs)
            finally:
                await c.close()
            seen = await counters(base_url)
            delays = [(done_at[rid] - t) * 1000 for rid, t in seen["terminal_at"].items()
                      if rid in done_at]
            out[mode] = {"delay_p50_ms": round(pct(delays, 0.5), 1),
                         "delay_p95_ms": round(pct(delays, 0.95), 1),
                         "delay_max_ms": round(max(delays, default=0.0), 1),
                         "retrieves_per_job": round(seen["retrieves"] / n, 2),
                         "stream_requests": seen["stream_requests"],
                         "completed": completed}
        web.should_exit = True
    # The seeds' loop (every ``seeds_interval`` s) for comparison; a poller's delay is its
    # detection delay, which the server records.
    await reset(base_url)
    c = roomy_client(base_url, n + 16)
    try:
        await baselines.seeds_loop(c, [job(i, d) for i, d in enumerate(durations)],
                                   interval=seeds_interval)
    finally:
        await c.close()
    seen = await counters(base_url)
    found = [v * 1000 for v in seen["detection_delays"].values()]
    out["seeds_loop"] = {"interval_s": seeds_interval,
                         "delay_p50_ms": round(pct(found, 0.5), 1),
                         "delay_p95_ms": round(pct(found, 0.95), 1),
                         "retrieves_per_job": round(seen["retrieves"] / n, 2)}
    out["goal"] = "p95 <= 50 ms; webhook: 1 fetch of the final Response, no polls; stream: 0"
    return out
