#!/usr/bin/env python3
"""Queue throughput side by side with PgQueuer, on the same PostgreSQL and the same machine.

    python benchmarks/pgqueuer_compare.py                 # 20,000 jobs each side (~2 min)
    python benchmarks/pgqueuer_compare.py --repeat 3 --worker-jobs 1000 --before main --asyncio-too

PgQueuer (https://github.com/janbjorge/pgqueuer) is a well-kept PostgreSQL job queue. It is not
a dependency of asyncbg: this script runs it from a virtual environment of its own
(``~/.cache/asyncbg-bench/pgqueuer``, made on first use with ``pip install pgqueuer asyncpg`` and
this checkout), and runs each side in a process of its own, one after the other, each on a fresh
database of the same server.

What is measured, each side draining a queue filled beforehand (the fill is timed apart):

- **PgQueuer**: dequeue -> run an instant no-op entrypoint -> ack, as its own benchmark does
  (``tools/benchmark.py --strategy drain``: 5 consumers, each with its own asyncpg connection,
  under uvloop), in batches of 10 (its default) and 50. Its consumer dequeues its next batch
  without waiting for the jobs it started (each an asyncio task); acks are buffered.
- **asyncbg, the queue** (``--side ledger``): what a worker's ledger does for one job, with the
  same 5 consumers and batches on one :class:`PostgresLedger`: claim it (``acquire``), record
  the create as sent, the response it created (an id), then its completion; no server. Each
  job is an asyncio task (``--spawn anyio``: an anyio task group's, about as costly per job as
  the queue itself); each consumer has 2 x batch slots (PgQueuer's least ``max_concurrent_tasks``)
  and takes its next batch as soon as a batch's worth is free, as a worker takes its free slots
  (``--take batch``: only once every job of the batch it took is finished, as this script did
  before; each job's three writes are round trips one after the other, so that consumer waits
  for the slowest of ten jobs of three round trips each). ``--before REF`` runs the same
  harness on another checkout's asyncbg (``git worktree``) in the same run. Both run on the
  loop ``asyncbg worker`` runs on (uvloop's, as PgQueuer's side; ``asyncbg/_cli/_loop.py``);
  ``--asyncio-too`` also runs this checkout's queue side on asyncio's own loop.
- **asyncbg, the whole worker** (``--side asyncbg``): :func:`asyncbg._fleet.run_worker` as
  ``asyncbg worker`` runs it, against the in-process fake server (instant no-op responses:
  created ``queued``, ``completed`` at the first poll), through the OpenAI SDK.

Reported: jobs per second for each, each repeat's ratio of asyncbg's queue to PgQueuer (both
ran one after the other) sorted, at each batch size; the load average after.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asyncbg-bench" / "pgqueuer"
VENV_PY = VENV / "bin" / "python"


def pgqueuer_python() -> Path:
    """A Python with pgqueuer, asyncpg and this checkout of asyncbg: made once, then reused."""
    if not VENV_PY.exists():
        print(f"pgqueuer_compare: making {VENV} (pip install pgqueuer asyncpg)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV_PY), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-e", str(ROOT), "pgqueuer", "asyncpg"], check=True)
    return VENV_PY


# -- PgQueuer ------------------------------------------------------------------------------


def pgqueuer_side(dsn: str, jobs: int, consumers: int, batch: int) -> dict[str, Any]:
    import asyncio

    import asyncpg
    from pgqueuer import PgQueuer, types
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries

    async def main() -> dict[str, Any]:
        queries = Queries(AsyncpgDriver(await asyncpg.connect(dsn)))
        await queries.install()
        started = time.perf_counter()
        for i in range(0, jobs, 1000):
            n = min(1000, jobs - i)
            await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
        filled = time.perf_counter() - started
        done = 0
        pgqs = []
        for _ in range(consumers):
            q = Queries(AsyncpgDriver(await asyncpg.connect(dsn)))
            pgq = PgQueuer(q.driver, queries=q)

            @pgq.entrypoint("noop")
            async def noop(job: Job) -> None:
                nonlocal done
                done += 1

            pgqs.append(pgq)
        cpu = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(pgq.run(batch_size=batch, mode=types.QueueExecutionMode.drain)
                               for pgq in pgqs))
        elapsed = time.perf_counter() - started
        left = sum(s.count for s in await queries.queue_size())
        return {"side": "pgqueuer", "consumers": consumers, "batch": batch, "jobs": jobs,
                "done": done, "left": left, "fill_s": round(filled, 2),
                "elapsed_s": round(elapsed, 2), "jobs_per_s": round(done / elapsed, 1),
                "cpu_s": round(time.process_time() - cpu, 2)}

    try:
        import uvloop
        return uvloop.run(main())  # as PgQueuer's own benchmark runs
    except ImportError:
        return asyncio.run(main())


# -- asyncbg -------------------------------------------------------------------------------------


def asyncbg_side(dsn: str, jobs: int, concurrency: int, *, uvloop: bool = True
                 ) -> dict[str, Any]:
    import anyio

    from asyncbg import PollPolicy
    from asyncbg._fleet import enqueue_requests, run_worker
    from asyncbg._ledgers._postgres import PostgresLedger
    from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

    async def main() -> dict[str, Any]:
        setup = PostgresLedger(dsn)
        await setup.open()
        started = time.perf_counter()
        await enqueue_requests(setup, ((f"j{i}", {
            "model": "m", "input": f"job {i}", "metadata": {"fake_duration": "0.001"}})
            for i in range(jobs)))
        filled = time.perf_counter() - started
        await setup.close()
        server = FakeResponsesServer(latency=LatencyModel.fixed(0.001))
        client = fake_client(server)
        ledger = PostgresLedger(dsn, lease=30.0)
        policy = PollPolicy(first_poll=0.002, min_interval=0.002, max_interval=0.05, jitter=0.0)
        cpu = time.process_time()
        started = time.perf_counter()
        try:
            await run_worker(client, ledger, concurrency=concurrency, lease=30.0,
                             exit_when_idle=True, stop=anyio.Event(), poll_policy=policy,
                             idle=0.05)
        finally:
            await client.close()
        elapsed = time.perf_counter() - started
        check = PostgresLedger(dsn)
        await check.open()
        counts = await check.counts()
        await check.close()
        done = sum(n for (state, status), n in counts.items()
                   if state == "done" and status == "completed")
        return {"side": "asyncbg", "concurrency": concurrency, "jobs": jobs, "done": done,
                "creates": server.counters.creates, "fill_s": round(filled, 2),
                "elapsed_s": round(elapsed, 2), "jobs_per_s": round(done / elapsed, 1),
                "cpu_s": round(time.process_time() - cpu, 2),
                "round_trips_per_job": round(ledger.round_trips / jobs, 2), "uvloop": uvloop}

    return anyio.run(main, backend_options={"use_uvloop": uvloop})  # as `asyncbg worker` runs


def ledger_side(dsn: str, jobs: int, consumers: int, batch: int, *, uvloop: bool = True,
                spawn: str = "asyncio", take: str = "slots") -> dict[str, Any]:
    """The queue alone, as PgQueuer's side is: ``consumers`` loops on one worker's ledger,
    each taking ``batch`` jobs at a time and running them at once (each in an asyncio task,
    as PgQueuer's consumer runs its jobs; ``spawn="anyio"``: in an anyio task group, as this
    script did before, whose own cost per task is about that of the queue's), each job
    recorded as sent, as created (a response id), then completed, with no request to any
    server."""
    import asyncio

    import anyio

    from asyncbg._fleet import enqueue_requests
    from asyncbg._ledgers._base import Outcome
    from asyncbg._ledgers._postgres import PostgresLedger

    async def main() -> dict[str, Any]:
        ledger = PostgresLedger(dsn, lease=30.0)
        await ledger.open()
        started = time.perf_counter()
        await enqueue_requests(ledger, ((f"j{i}", {"model": "m", "input": f"job {i}"})
                                        for i in range(jobs)))
        filled = time.perf_counter() - started
        done = 0

        async def run(key: str, request: bytes, stored: str) -> None:
            nonlocal done
            # As a worker claims a job it acquired: the request decoded (it is sent), and
            # claimed with the ledger's digest (what the worker sends is what is stored).
            json.loads(request)
            claim = await ledger.claim(key, stored, request)
            assert claim.outcome.value == "new", claim
            await ledger.sending(key, resubmit=False)
            await ledger.record(key, Outcome("queued", f"resp_{key}"))
            await ledger.record(key, Outcome("completed", f"resp_{key}", body=b"{}",
                                             http_status=200))
            done += 1

        async def consume() -> None:
            while records := await ledger.acquire(batch, 30.0):
                if spawn == "asyncio":
                    await asyncio.gather(*(run(r.key, r.request, r.digest) for r in records))
                    continue
                async with anyio.create_task_group() as tg:
                    for record in records:
                        tg.start_soon(run, record.key, record.request, record.digest)

        async def consume_slots() -> None:
            # Up to two batches running (PgQueuer's least max_concurrent_tasks); the next
            # batch is taken as soon as one batch's worth of slots is free, as a worker takes
            # its free slots, without waiting for the running ones to finish.
            running: set[asyncio.Task[None]] = set()
            freed = asyncio.Event()

            def finished(task: asyncio.Task[None]) -> None:
                running.discard(task)
                task.result()  # a failed job fails the run
                freed.set()

            while True:
                while 2 * batch - len(running) < batch:
                    freed.clear()
                    await freed.wait()
                records = await ledger.acquire(batch, 30.0)
                if not records:
                    break
                for r in records:
                    task = asyncio.create_task(run(r.key, r.request, r.digest))
                    running.add(task)
                    task.add_done_callback(finished)
            while running:
                freed.clear()
                await freed.wait()

        cpu = time.process_time()
        trips = ledger.round_trips
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(consumers):
                tg.start_soon(consume_slots if take == "slots" else consume)
        elapsed = time.perf_counter() - started
        left = await ledger.unfinished()
        per_job = (ledger.round_trips - trips) / jobs
        await ledger.close()
        return {"side": "asyncbg ledger", "consumers": consumers, "batch": batch,
                "jobs": jobs, "done": done, "left": left, "fill_s": round(filled, 2),
                "elapsed_s": round(elapsed, 2), "jobs_per_s": round(done / elapsed, 1),
                "cpu_s": round(time.process_time() - cpu, 2),
                "round_trips_per_job": round(per_job, 2), "uvloop": uvloop, "spawn": spawn,
                "take": take,
                "code": str(Path(sys.modules["asyncbg"].__file__ or "").parent.parent)}

    return anyio.run(main, backend_options={"use_uvloop": uvloop})


# -- the comparison ------------------------------------------------------------------------------


def one(python: Path, args: list[str]) -> dict[str, Any]:
    out = subprocess.run([str(python), __file__, *args], check=True, capture_output=True,
                         text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--worker-jobs", type=int, default=5000,
                   help="jobs for the whole worker (the engine's CPU per job is its limit)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--before", metavar="REF",
                   help="also run the queue side of this git ref (e.g. main), from a checkout "
                        "of its own (git worktree), in the same run: before and after")
    p.add_argument("--asyncio-too", action="store_true",
                   help="also run asyncbg's queue side on asyncio's own loop (the worker runs "
                        "on uvloop's, as PgQueuer's side does)")
    p.add_argument("--side", choices=["pgqueuer", "asyncbg", "ledger"], help=argparse.SUPPRESS)
    p.add_argument("--dsn", help=argparse.SUPPRESS)
    p.add_argument("--consumers", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=200, help=argparse.SUPPRESS)
    p.add_argument("--code", help=argparse.SUPPRESS)
    p.add_argument("--take", choices=["slots", "batch"], default="slots",
                   help="when the queue side takes more jobs: as soon as a batch's worth of "
                        "its 2 x batch slots is free (as PgQueuer's consumer and asyncbg's "
                        "worker do; default), or once the whole batch it took is finished "
                        "(this script before)")
    p.add_argument("--in-asyncio", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spawn", choices=["asyncio", "anyio"], default="asyncio",
                   help="how the queue side runs each job: an asyncio task (as PgQueuer's "
                        "consumer does; default) or an anyio task group's")
    args = p.parse_args()
    if args.side == "pgqueuer":
        print(json.dumps(pgqueuer_side(args.dsn, args.jobs, args.consumers, args.batch)))
        return
    if args.side == "ledger":
        if args.code:  # another checkout's asyncbg (--before), run by this same harness
            sys.path.insert(0, args.code)
        print(json.dumps(ledger_side(args.dsn, args.jobs, args.consumers, args.batch,
                                     uvloop=not args.in_asyncio, spawn=args.spawn,
                                     take=args.take)))
        return
    if args.side == "asyncbg":
        print(json.dumps(asyncbg_side(args.dsn, args.jobs, args.concurrency,
                                      uvloop=not args.in_asyncio)))
        return
    from benchmarks.fleet import emit, fresh_database, postgres

    python = pgqueuer_python()
    runs: list[dict[str, Any]] = []

    def run(side_python: Path, *extra: str) -> None:
        runs.append(one(side_python, list(extra)))
        print(json.dumps(runs[-1]), file=sys.stderr)  # its side's label may change below

    sides = ["pgqueuer", "asyncbg ledger"]
    with contextlib.ExitStack() as stack:
        before = None
        if args.before:
            before = stack.enter_context(checkout(args.before))
            sides.append(f"asyncbg ledger ({args.before})")
        if importlib.util.find_spec("uvloop") is None:
            sys.exit("pgqueuer_compare: no uvloop here (a dependency of asyncbg: "
                     "pip install -e .)")
        if args.asyncio_too:
            sides.append("asyncbg ledger (asyncio loop)")
        server_dsn = stack.enter_context(postgres())
        for rep in range(args.repeat):
            for batch in (10, 50):  # PgQueuer's default batch, and a worker's (its free slots)
                common = ["--jobs", str(args.jobs), "--consumers", "5", "--batch", str(batch)]
                run(python, "--side", "pgqueuer", *common,
                    "--dsn", fresh_database(server_dsn, "bench_pgq"))
                ledger = ["--side", "ledger", *common, "--spawn", args.spawn, "--take",
                          args.take]
                run(Path(sys.executable), *ledger,
                    "--dsn", fresh_database(server_dsn, "bench_asyncbg"))
                if before is not None:  # the same harness, the other checkout's asyncbg
                    run(Path(sys.executable), *ledger, "--code", str(before),
                        "--dsn", fresh_database(server_dsn, "bench_before"))
                    runs[-1]["side"] = sides[2]
                if args.asyncio_too:
                    run(Path(sys.executable), *ledger, "--in-asyncio",
                        "--dsn", fresh_database(server_dsn, "bench_asyncio"))
                    runs[-1]["side"] = sides[-1]
            if args.worker_jobs:
                run(Path(sys.executable), "--side", "asyncbg", "--jobs", str(args.worker_jobs),
                    "--concurrency", "200", "--dsn", fresh_database(server_dsn, "bench_worker"))
            print(f"repeat {rep + 1} of {args.repeat} done, load {os.getloadavg()}",
                  file=sys.stderr)
    ratios: dict[str, Any] = {}
    for batch in (10, 50):
        # Each repeat's ratio (both sides of it ran one after the other), and their spread.
        per_run = {side: [r["jobs_per_s"] for r in runs
                          if r["side"] == side and r.get("batch") == batch] for side in sides}
        ratios[f"batch {batch}"] = {
            "jobs_per_s": per_run,
            **{f"{side} / pgqueuer": sorted(round(a / p, 2) for a, p in zip(
                per_run[side], per_run["pgqueuer"], strict=True)) for side in sides[1:]}}
    worker = [r["jobs_per_s"] for r in runs if r["side"] == "asyncbg"]
    report = {"runs": runs, "queue": ratios, "worker_jobs_per_s": worker,
              "cpus": os.cpu_count(), "load_after": os.getloadavg()}
    emit(report, args.json)


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A checkout of ``ref`` of this repository, for the time of the run (git worktree)."""
    where = Path(tempfile.mkdtemp(prefix="asyncbg-before-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where),
                    ref], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
                       check=False)


if __name__ == "__main__":
    main()
