#!/usr/bin/env python3
"""Scale: many jobs in flight in one process, with the cyclic GC on (Python's defaults).

    python benchmarks/scale.py --jobs 10000 --duration 40            # against its own server
    python benchmarks/scale.py --jobs 100000 --duration 400 --interval 120

Each run is a fresh process (so its RSS is its own) against a fresh fake server process. It
submits every job at once (``max_concurrency`` = the number of jobs), the way a user's loop
does, and waits for all of them. Reported: RSS (peak, and per job over the process's RSS before
the client was made), event-loop lag (a 10 ms ticker's overshoot: p99 and max), the cyclic GC's
pauses, polls/s, and how many jobs the server saw live at once.

``--interval`` replaces the default poll policy by a slow fixed one (first poll after
``--interval`` s, then every ``--interval`` s, 10 % jitter), so that 100,000 live jobs ask the
one-core fake server for at most ``jobs / interval`` polls a second.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import asyncbg  # noqa: E402
from benchmarks.common import (  # noqa: E402
    GcPauses,
    counters,
    fixed,
    job,
    pct,
    quiet_logs,
    reset,
    rss_kib,
    sdk_client,
    server_process,
    wait_ready,
)

#: A tick this late counts as a stall, and is matched against the GC's pauses.
STALL = 0.05


async def phase(base_url: str, n: int, duration: float, interval: float | None,
                gc_mode: str = "on") -> dict[str, Any]:
    lags: list[float] = []
    #: (start, end, CPU time this thread used meanwhile) of every tick later than STALL
    stalls: list[tuple[float, float, float]] = []
    jobs: list[asyncbg.Job] = []
    live: dict[str, float] = {}

    async def ticker() -> None:
        while True:
            t, cpu = time.monotonic(), time.thread_time()
            await anyio.sleep(0.01)
            now = time.monotonic()
            lags.append(now - t - 0.01)
            if now - t - 0.01 > STALL:
                stalls.append((t, now, time.thread_time() - cpu))

    async def all_live() -> None:
        """When every job has been accepted by the server, and the RSS then."""
        accepted = 0  # jobs[:accepted] all have a response id
        while True:
            while accepted < len(jobs) and jobs[accepted].response_id is not None:
                accepted += 1
            if accepted == n:
                break
            await anyio.sleep(1.0)
        live["s"] = time.monotonic() - start
        live["rss_kib"] = rss_kib("VmRSS")

    policy = None if interval is None else fixed(interval, jitter=0.1)
    base_rss = rss_kib("VmRSS")
    c = sdk_client(base_url)
    if gc_mode == "refreeze":
        # What a CLI process could also do: freeze start-up, then the survivors of every full
        # collection (live jobs), so that the next one walks only what came since.
        gc.freeze()
        gc.callbacks.append(_refreeze)
    elif gc_mode == "freeze":
        gc.freeze()  # what an application can do: imports and the client leave the GC's view
    elif gc_mode == "off":
        gc.disable()
    start = time.monotonic()
    cpu = time.process_time()
    try:
        with GcPauses() as gc_pauses:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                tg.start_soon(all_live)
                async with asyncbg.BackgroundManager(c, max_concurrency=n,
                                                     poll_policy=policy) as mgr:
                    for i in range(n):
                        jobs.append(await mgr.submit(**job(i, duration)))
                    submitted = time.monotonic() - start
                tg.cancel_scope.cancel()
    finally:
        await c.close()
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu
    seen = await counters(base_url)
    peak = rss_kib("VmHWM")
    stats = mgr.statistics()
    # A stall during which this thread ran less than half the time was the OS's doing (the
    # process waited for a core), not the event loop's.
    starved = sum(spent < (end - begin) / 2 for begin, end, spent in stalls)
    creating = (sum(begin - start < live["s"] for begin, _, _ in stalls) if live
                else len(stalls))
    return {"jobs": n, "duration_s": duration,
            "poll_policy": "default" if interval is None else f"every {interval} s",
            "max_in_flight": seen["max_in_flight"], "creates": seen["creates"],
            "submit_loop_s": round(submitted, 2),
            "all_live_s": round(live["s"], 1) if live else None,
            "rss_all_live_mb": round(live["rss_kib"] / 1024, 1) if live else None,
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "rss_base_mb": round(base_rss / 1024, 1), "rss_peak_mb": round(peak / 1024, 1),
            "rss_per_job_kb": round((peak - base_rss) / n, 2),
            # Once every job is live: the peak also counts finished jobs' final bodies (the
            # caller holds every job here) and the polls' buffers.
            "rss_per_live_job_kb": round((live["rss_kib"] - base_rss) / n, 2) if live else None,
            "loop_lag_p50_ms": round(pct(lags, 0.50) * 1000, 1),
            "loop_lag_p99_ms": round(pct(lags, 0.99) * 1000, 1),
            "loop_lag_max_ms": round(max(lags, default=0.0) * 1000, 1),
            "ticks": len(lags), "stalls_over_50ms": len(stalls),
            "stalls_starved": starved, "stalls_before_all_live": creating,
            "gc_mode": gc_mode,
            "gc": gc_pauses.summary([(begin, end) for begin, end, _ in stalls]),
            "polls": seen["retrieves"], "polls_per_s": round(seen["retrieves"] / wall, 1),
            "polls_per_job": round(seen["retrieves"] / n, 2),
            "completed": stats.by_status.get("completed", 0)}


def _refreeze(phase: str, info: dict[str, int]) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def scale(n: int, duration: float, interval: float | None = None, gc_mode: str = "on", *,
          base_url: str | None = None) -> dict[str, Any]:
    """One scale run in a fresh client process, against a fresh fake server process (or, given
    ``base_url``, against that one, reset first: the smoke run shares one)."""
    if base_url is None:
        # The client process starts while the server does (it waits for it: see main()).
        with server_process(wait=False) as url:
            return scale(n, duration, interval, gc_mode, base_url=url)
    extra = ["--gc", gc_mode] + ([] if interval is None else ["--interval", str(interval)])
    done = subprocess.run(
        [sys.executable, __file__, "--base-url", base_url, "--jobs", str(n),
         "--duration", str(duration), "--reset", *extra],
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the scale phase failed:\n{done.stderr}")
    return dict(json.loads(done.stdout))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--duration", type=float, default=40.0, help="seconds each job runs")
    p.add_argument("--interval", type=float, help="a slow fixed poll interval (see above)")
    p.add_argument("--gc", choices=("on", "freeze", "refreeze", "off"), default="on",
                   help="the cyclic GC: on (default), gc.freeze() after startup, that and after "
                   "every full collection (refreeze), or disabled")
    p.add_argument("--base-url", help="a running fake server; default: start one")
    p.add_argument("--reset", action="store_true", help="reset its counters first")
    args = p.parse_args()
    if args.base_url is None:
        print(json.dumps(scale(args.jobs, args.duration, args.interval, args.gc), indent=2))
        return
    wait_ready(args.base_url)
    if args.reset:
        anyio.run(reset, args.base_url)
    quiet_logs()
    print(json.dumps(anyio.run(phase, args.base_url, args.jobs, args.duration, args.interval,
                               args.gc)))


if __name__ == "__main__":
    main()
