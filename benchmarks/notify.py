#!/usr/bin/env python3
"""Completion notifications: none lost when the receiver is down or the run is killed, and what a
delivered notification costs the client.

    .venv/bin/python benchmarks/notify.py [--jobs 1000] [--down 30] [--json out.json]
    .venv/bin/python benchmarks/notify.py --quick        # 200 jobs, receiver down 5 s

The fake Responses server and the webhook receiver (``asyncbg.testing.WebhookReceiver``, which
verifies every delivery with ``openai``'s ``client.webhooks.verify_signature``) each run in their
own process, so ``time.process_time()`` here is asyncbg's CPU alone.

1. **receiver down**: a ``--jobs`` run (SQLite journal, ``notify=``) whose jobs end spread over
   ``--down + 10`` s while the receiver is down for its first ``--down`` s. Reported: when the
   last job ended, when the last notification arrived, notifications lost and duplicated, and
   attempts that failed (a down endpoint is probed, not hammered).
2. **kill -9**: ``asyncbg run --notify`` with the receiver down, killed with SIGKILL once every
   job has ended (every notification pending), then the receiver up and the same command again.
3. **CPU per delivered notification**: real notifications (from jobs run with the receiver
   down), ``max(--jobs, 2000)`` pending in a journal, drained by one sender: its CPU (threads
   included) per delivery, median of 3 rounds; plus what writing one with its outcome adds
   (building it, and its row in the outcome's transaction, timed as SQL: the thread hop around
   the transaction is there with or without it). Against the CPU of one status check
   (``benchmarks/poll_cost.py``'s ``asyncbg_check``, measured in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import asyncbg  # noqa: E402
from asyncbg._engine._meter import Meter  # noqa: E402
from asyncbg._ledgers import Outcome, Record, SQLiteLedger  # noqa: E402
from asyncbg._ledgers._outbox import Notice  # noqa: E402
from asyncbg._notify._notify import Notices  # noqa: E402
from asyncbg._notify.send import Sender  # noqa: E402
from asyncbg.testing import WebhookReceiver, new_secret  # noqa: E402
from benchmarks.common import _free_port, job, quiet_logs, sdk_client, server_process  # noqa: E402
from benchmarks.poll_cost import measure as poll_cost  # noqa: E402

SECRET = new_secret()


# -- the receiver, in its own process --------------------------------------------------------------


async def serve(port: int, secret: str) -> None:
    """``--serve PORT``: receive until SIGTERM, then print what came as JSON on stdout."""
    async with WebhookReceiver(secret, port=port) as receiver:
        print("ready", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
    print(json.dumps({"ids": receiver.ids(), "attempts": receiver.attempts,
                      "rejected": receiver.rejected}), flush=True)


class Receiver:
    """The receiver process: started when asked (until then the port refuses connections)."""

    #: Every receiver started, so that a benchmark that fails leaves none running.
    started: ClassVar[list[Receiver]] = []

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.proc: anyio.abc.Process | None = None
        Receiver.started.append(self)

    @classmethod
    async def kill_all(cls) -> None:
        for receiver in cls.started:
            proc = receiver.proc
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def start(self) -> None:
        self.proc = await anyio.open_process(
            [sys.executable, __file__, "--serve", str(self.port), "--secret", SECRET])
        assert self.proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await self.proc.stdout.receive()

    async def stop(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGTERM)
        out = b""
        async for chunk in self.proc.stdout:
            out += chunk
        await self.proc.wait()
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result


def tally(received: dict[str, Any], expected: int) -> dict[str, Any]:
    ids: dict[str, int] = received["ids"]
    return {"notified": len(ids), "lost": expected - len(ids),
            "duplicates": sum(ids.values()) - len(ids),
            "receiver_attempts": received["attempts"], "rejected": received["rejected"]}


# -- 1. receiver down for the first N s ------------------------------------------------------------


async def receiver_down(base_url: str, jobs: int, down: float, tmp: Path) -> dict[str, Any]:
    receiver = Receiver()
    notify = asyncbg.Notify(receiver.url, secret=SECRET, wait_on_exit=600.0)
    client = sdk_client(base_url)
    started = time.monotonic()
    spread = down + 10.0

    async def up_later() -> None:
        await anyio.sleep(down)
        await receiver.start()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(up_later)
            async with asyncbg.BackgroundManager(
                    client, journal=tmp / "down.db", notify=notify, max_concurrency=jobs,
                    max_requests=128) as mgr:
                for i in range(jobs):
                    await mgr.submit(key=f"j{i}", **job(i, 1.0 + spread * i / jobs))
                await mgr.wait_all(mgr.jobs)
                jobs_done = time.monotonic() - started
            notified = time.monotonic() - started
    finally:
        await client.close()
    stats = mgr.statistics()
    return {"jobs": jobs, "down_s": down, "last_job_ended_s": round(jobs_done, 1),
            "all_notified_s": round(notified, 1),
            "after_receiver_up_s": round(notified - down, 1),
            "failed_attempts": stats.notification_failures,
            **tally(await receiver.stop(), jobs)}


# -- 2. kill -9 of a run with deliveries pending, then a rerun -------------------------------------


def _pending(journal: Path) -> int:
    if not journal.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute(
                "SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


async def killed_run(base_url: str, jobs: int, tmp: Path) -> dict[str, Any]:
    source = tmp / "in.jsonl"
    with source.open("w") as f:
        for i in range(jobs):
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/responses",
                                "body": job(i, 0.5 + 1.5 * i / jobs)}) + "\n")
    out = tmp / "out.jsonl"
    journal = tmp / "out.jsonl.journal"
    receiver = Receiver()
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": base_url,
           "ASYNCBG_NOTIFY_SECRET": SECRET}
    argv = [sys.executable, "-m", "asyncbg", "run", str(source), "-o", str(out), "--notify",
            receiver.url, "--concurrency", str(jobs)]
    run = await anyio.open_process(argv, env=env, stdout=None, stderr=None)
    try:
        with anyio.fail_after(300):  # another process's journal: time is all there is
            while True:
                if _pending(journal) >= jobs:
                    break
                await anyio.sleep(0.1)
    finally:
        run.kill()  # SIGKILL, with every notification pending
        await run.wait()
    pending = _pending(journal)
    await receiver.start()
    t = time.monotonic()
    rerun = await anyio.run_process(argv, env=env, check=False)
    took = time.monotonic() - t
    return {"jobs": jobs, "pending_at_kill": pending, "rerun_exit": rerun.returncode,
            "rerun_s": round(took, 1), "left_pending": _pending(journal),
            **tally(await receiver.stop(), pending)}


# -- 3. CPU per delivered notification -------------------------------------------------------------


async def cpu_per_notification(base_url: str, jobs: int, tmp: Path) -> dict[str, Any]:
    """Jobs run with the receiver down leave real notifications pending; they are copied into
    fresh journals of ``n`` each, drained by one sender per round (3 rounds, the median)."""
    receiver = Receiver()  # not started yet: every notification stays pending
    journal = tmp / "cpu.db"
    notify = asyncbg.Notify(receiver.url, secret=SECRET, wait_on_exit=0.0)
    client = sdk_client(base_url)
    try:
        async with asyncbg.BackgroundManager(client, journal=journal, notify=notify,
                                             max_concurrency=jobs) as mgr:
            for i in range(jobs):
                await mgr.submit(key=f"c{i}", **job(i, 0.05))
    finally:
        await client.close()
    ledger = SQLiteLedger(journal)
    await ledger.open()
    record = (await ledger.records())[0]
    bodies = [d.body for d in await ledger.deliveries()]
    await ledger.close()
    await receiver.start()
    n = max(jobs, 2000)
    samples: list[float] = []
    rates: list[float] = []
    left = 0
    for rnd in range(3):
        ledger = SQLiteLedger(tmp / f"drain-{rnd}.db")
        await ledger.open()
        try:
            for i in range(n):
                key = f"d{rnd}-{i}"
                await ledger.claim(key, "a" * 64, b"{}")
                await ledger.record(key, Outcome("completed", f"resp_{key}", record.body,
                                                 notification=Notice(
                    f"msg_{key}", receiver.url, bodies[i % len(bodies)])))
            sender = Sender(asyncbg.Notify(receiver.url, secret=SECRET), ledger)
            async with anyio.create_task_group() as tg:
                cpu, wall = time.process_time(), time.monotonic()
                tg.start_soon(sender.run)
                left += len(await sender.flush(600.0))
                cpu, wall = time.process_time() - cpu, time.monotonic() - wall
                tg.cancel_scope.cancel()
        finally:
            await ledger.close()
        samples.append(cpu / max(sender.delivered, 1) * 1e6)
        rates.append(sender.delivered / wall)
    received = tally(await receiver.stop(), 3 * n)
    written = await write_cost(record, tmp, n)
    poll = await poll_cost(base_url, 500, 3)
    drain = statistics.median(samples)
    per = drain + written["us_per_notification"]
    return {"delivered": 3 * n - left, "left": left, "rounds": [round(v, 1) for v in samples],
            "deliveries_per_s": round(statistics.median(rates), 0),
            "drain_us_per_notification": round(drain, 1), "write": written,
            "cpu_us_per_notification": round(per, 1),
            "poll_us": poll["asyncbg_us"], "ratio_vs_poll": round(per / poll["asyncbg_us"], 2),
            "delivery_vs_poll": round(drain / poll["asyncbg_us"], 2), **received}


async def write_cost(record: Record, tmp: Path, n: int) -> dict[str, Any]:
    """What writing a notification with its outcome adds: building it (from a real answer,
    priced), and its row in the outcome's transaction. The row is timed as the journal writes
    it, statement by statement in one transaction, with and without it (interleaved rounds,
    medians): the thread hop around the transaction is the same either way, and its noise
    would drown a difference of microseconds."""
    from asyncbg._ledgers import _sqlite_queries as q

    assert record.body is not None
    # A model with a price, as real ones have: pricing is part of building a notification.
    body = json.dumps({**json.loads(record.body), "model": "gpt-4o-mini"}).encode()
    notices = Notices(asyncbg.Notify("http://127.0.0.1:1/hooks", secret=SECRET),
                      Meter(prices=None, max_cost=None, rate_limit=None, max_concurrency=1))
    outcome = Outcome("completed", record.response_id, body)
    t = time.process_time()
    built = [notices.notice(f"k{i}", None, outcome, body) for i in range(n)]
    build = (time.process_time() - t) / n * 1e6
    samples: dict[str, list[float]] = {"plain": [], "notified": []}
    for rnd in range(5):
        for kind in samples:
            path = tmp / f"write-{kind}-{rnd}.db"
            ledger = SQLiteLedger(path)
            await ledger.open()  # the schema, as a run makes it
            for i in range(n):
                await ledger.claim(f"k{i}", "a" * 64, b"{}")
            await ledger.close()
            db = sqlite3.connect(path, isolation_level=None)
            for pragma in q.CONNECTION_SETUP:
                db.execute(pragma)
            t = time.process_time()
            for i in range(n):
                key, now = f"k{i}", time.time()
                db.execute(q.BEGIN)
                db.execute(q.RECORD_TERMINAL, ("done", record.response_id, "completed", body,
                                               None, None, 200, None, now, key))
                db.execute(q.EVENT, (key, "completed", now))
                if kind == "notified":
                    notice = built[i]
                    db.execute(q.OUTBOX_ADD, (notice.id, key, notice.url, notice.body, now,
                                              now))
                db.execute(q.COMMIT)
            samples[kind].append((time.process_time() - t) / n * 1e6)
            db.close()
    cpu = {kind: statistics.median(values) for kind, values in samples.items()}
    row = cpu["notified"] - cpu["plain"]
    return {"build_us": round(build, 1), "transaction_us": round(cpu["plain"], 1),
            "transaction_with_notification_us": round(cpu["notified"], 1),
            "row_us": round(row, 1), "us_per_notification": round(build + row, 1)}


def report(result: dict[str, Any]) -> str:
    d, k, c = result["receiver_down"], result["kill9"], result["cpu"]
    return "\n".join([
        "| measure | result |",
        "|---|---|",
        f"| receiver down for the first {d['down_s']:g} s of a {d['jobs']:,}-job run | "
        f"last job ended at {d['last_job_ended_s']} s, every job notified at "
        f"{d['all_notified_s']} s ({d['after_receiver_up_s']} s after the receiver came up); "
        f"{d['notified']:,} notified, {d['lost']} lost, {d['duplicates']} duplicates; "
        f"{d['failed_attempts']} failed attempts while down |",
        f"| `kill -9` of `asyncbg run` with {k['pending_at_kill']:,} deliveries pending, then "
        f"a rerun | rerun exit {k['rerun_exit']} in {k['rerun_s']} s; {k['notified']:,} "
        f"delivered, {k['lost']} lost, {k['duplicates']} duplicates, {k['left_pending']} "
        "left pending |",
        f"| CPU per delivered notification | delivering {c['drain_us_per_notification']} us "
        f"({c['delivery_vs_poll']}x a poll; {c['deliveries_per_s']:.0f}/s), plus writing it "
        f"with the outcome {c['write']['us_per_notification']} us (building it "
        f"{c['write']['build_us']} us, its row {c['write']['row_us']} us): "
        f"{c['cpu_us_per_notification']} us in all, "
        f"{c['ratio_vs_poll']}x one status check ({c['poll_us']} us) |",
    ])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, server_process() as base_url:
        try:
            return {
                "receiver_down": await receiver_down(base_url, args.jobs, args.down,
                                                     Path(tmp)),
                "kill9": await killed_run(base_url, args.jobs, Path(tmp)),
                "cpu": await cpu_per_notification(base_url, args.jobs, Path(tmp)),
            }
        finally:
            with anyio.CancelScope(shield=True):
                await Receiver.kill_all()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--down", type=float, default=30.0, help="seconds the receiver is down")
    p.add_argument("--quick", action="store_true", help="200 jobs, receiver down 5 s")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--secret", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.secret))
        return
    if args.quick:
        args.jobs, args.down = 200, 5.0
    quiet_logs()
    result = asyncio.run(main_async(args))
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
