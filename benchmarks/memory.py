"""A long-lived manager: 50,000 jobs one after another, and what stays in memory.

A service keeps one ``BackgroundManager`` open for days. The manager keeps only what the caller
can still reach (live jobs, and finished ones the caller holds); counts and statistics stay. This
runs ``--jobs`` instant jobs through one manager against the in-process fake server, at most
``--live`` at a time, the caller dropping each job once it has read its result, and prints the
resident set size after warm-up and at the end. Goal: at most 10 MB of growth after warm-up.

    .venv/bin/python benchmarks/memory.py [--jobs 50000] [--live 200] [--notify]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncbg
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client
from benchmarks.common import quiet_logs, rss_kib


def forget_on_server(server: FakeResponsesServer, rid: str | None) -> None:
    """The in-process fake keeps every response it made: drop a finished one, so that what
    grows is the client's memory alone."""
    if rid is not None:
        server._responses.pop(rid, None)
        server.counters.polls.pop(rid, None)
        server.counters.detection_delays.pop(rid, None)


async def churn(jobs: int, live: int, notify: bool, gc_mode: str = "on") -> dict[str, object]:
    if gc_mode == "refreeze":
        # What the CLI does (asyncbg/_cli freeze_start_up): start-up frozen, then the survivors
        # of every full collection. A reference cycle among frozen objects would never be
        # collected: this shows whether the engine leaves any.
        from asyncbg._cli import freeze_start_up

        freeze_start_up()
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.0))
    client = fake_client(server)
    policy = asyncbg.PollPolicy(first_poll=0.0, min_interval=0.001, max_interval=0.01, jitter=0)
    samples: list[tuple[int, int]] = []
    frozen: dict[int, int] = {}
    warm = min(5_000, jobs // 10)
    receiver = None
    if notify:
        from asyncbg.testing import WebhookReceiver, new_secret

        secret = new_secret()
        receiver = WebhookReceiver(secret)
        await receiver.__aenter__()
    try:
        kwargs: dict[str, object] = {}
        if receiver is not None:
            kwargs["notify"] = asyncbg.Notify(receiver.url, secret=receiver.secret)
        async with asyncbg.BackgroundManager(client, max_concurrency=live, poll_policy=policy,
                                             **kwargs) as mgr:  # type: ignore[arg-type]
            done = 0
            todo = iter(range(jobs))

            async def worker() -> None:
                nonlocal done
                for i in todo:
                    job = await mgr.submit(model="m", input=f"x{i}")
                    await job.result()
                    forget_on_server(server, job.response_id)
                    del job  # the caller lets go of it: so may the manager
                    done += 1
                    if done in (warm, jobs) or done % 10_000 == 0:
                        gc.collect()
                        samples.append((done, rss_kib("VmRSS")))
                        frozen[done] = gc.get_freeze_count()

            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                for _ in range(live):
                    tg.start_soon(worker)
            stats = mgr.statistics()
    finally:
        await client.close()
        if receiver is not None:
            await receiver.__aexit__(None, None, None)
    after_warm = next(kib for n, kib in samples if n >= warm)
    end = samples[-1][1]
    return {"jobs": jobs, "live": live, "notify": notify, "gc_mode": gc_mode,
            "frozen_objects": frozen,
            "seconds": round(time.monotonic() - started, 1),
            "rss_kib": dict(samples), "growth_after_warmup_mb": round((end - after_warm) / 1024, 2),
            "manager_keeps_jobs": len(mgr.jobs), "completed": stats.by_status,
            "goal": "growth after warm-up <= 10 MB"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--live", type=int, default=200)
    parser.add_argument("--notify", action="store_true")
    parser.add_argument("--gc", choices=("on", "refreeze"), default="on",
                        help="refreeze: as the CLI runs (gc.freeze after every full collection)")
    args = parser.parse_args()
    quiet_logs()
    print(json.dumps(anyio.run(churn, args.jobs, args.live, args.notify, args.gc), indent=1))


if __name__ == "__main__":
    main()
