#!/usr/bin/env python3
"""A fleet's ledger at a million jobs: enqueue, claims, counts and wake-ups on PostgreSQL.

    python benchmarks/fleet_scale.py                 # 1,000,000 jobs (a few minutes on 2 cores)
    python benchmarks/fleet_scale.py --jobs 100000   # quicker
    python benchmarks/fleet_scale.py --store sqlite  # claims on a shared SQLite journal

PostgreSQL is $ASYNCBG_TEST_POSTGRES (a database of its own is made there and dropped after) or
a throwaway server (tests/pg_server.py). Figures, each against the goal of issue 20:

- ``enqueue_s``: ``asyncbg submit``'s write of N Batch API lines (``SharedLedger.enqueue``, one
  transaction), goal <= 60 s for 1,000,000;
- ``claim_ms``: one worker's ``acquire(16)`` while ``--leased`` jobs are leased by another
  worker and the rest wait (p50, p99 of ``--claims`` claims), goal <= 5 ms;
- ``status_ms``: ``counts()`` and ``unfinished()`` (what ``status`` and an idle worker read),
  goal <= 100 ms;
- ``wake_ms``: from the start of ``enqueue`` of one job in one process's ledger to another's
  next ``acquire`` returning jobs, the other waiting in ``wait_for_work`` (LISTEN/NOTIFY) with
  a 5 s poll, goal <= 100 ms.

``--upgrade`` measures instead the first open of a ledger of the schema version before this
one (N rows written by SQL: 80 % finished with a body, 10 % live, 10 % waiting, half of these
two held by a worker), which upgrades it (``upgrade_s``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from asyncbg._ledgers import _pg_queries as q  # noqa: E402
from asyncbg._ledgers import canonical, digest  # noqa: E402
from asyncbg._ledgers._postgres import PostgresLedger  # noqa: E402
from asyncbg._ledgers._shared import SharedLedger  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A fresh database on $ASYNCBG_TEST_POSTGRES or on a throwaway server; dropped after."""
    import psycopg

    from tests.pg_fixtures import with_database
    from tests.pg_server import throwaway_postgres

    with contextlib.ExitStack() as stack:
        server = os.environ.get("ASYNCBG_TEST_POSTGRES") or stack.enter_context(
            throwaway_postgres())
        name = f"bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(server, name)
        finally:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def lines(n: int, prefix: str = "line") -> list[tuple[str, str, bytes]]:
    """N jobs as ``asyncbg submit`` enqueues them: key, digest, canonical request."""
    items = []
    for i in range(n):
        params = {"model": "gpt-5-nano", "input": f"question {i}", "background": True,
                  "store": True, "metadata": {"asyncbg_custom_id": f"{prefix}-{i}"}}
        items.append((f"{prefix}-{i}", digest(params), canonical(params)))
    return items


async def timed_claims(worker: SharedLedger, claims: int) -> list[float]:
    """Milliseconds of each of ``claims`` claims of 16 jobs."""
    took = []
    for _ in range(claims):
        t = time.perf_counter()
        got = await worker.acquire(16, 3600.0)
        took.append((time.perf_counter() - t) * 1000)
        assert len(got) == 16
    return took


async def measure(dsn: str, *, jobs: int, leased: int, claims: int) -> dict[str, object]:
    submitter = PostgresLedger(dsn, timeout=600.0)
    busy = PostgresLedger(dsn, lease=3600.0)
    worker = PostgresLedger(dsn, lease=3600.0)
    for led in (submitter, busy, worker):
        await led.open()
    try:
        items = lines(jobs)
        started = time.perf_counter()
        assert await submitter.enqueue(items) == jobs
        enqueue_s = time.perf_counter() - started
        del items
        print(f"enqueued {jobs:,} in {enqueue_s:.1f} s", file=sys.stderr, flush=True)

        # Another worker holds `leased` jobs (running), as a big fleet does.
        for _ in range(0, leased, 10_000):
            await busy.acquire(10_000, 3600.0)
        import psycopg

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("VACUUM ANALYZE asyncbg_jobs")

        # The claim statement's own time on the server (EXPLAIN ANALYZE, rolled back): what
        # the client's figure is made of besides the round trip and this machine's load.
        server_claim = []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for _ in range(20):
                try:
                    async with conn.transaction():
                        cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) "
                                                 + q.acquire(16),
                                                 {"owner": "probe",
                                                  "lease": 3600.0, "margin": 1200.0})
                        [[plan]] = await cur.fetchall()
                        plan = json.loads(plan) if isinstance(plan, str) else plan
                        server_claim.append(float(plan[0]["Execution Time"]))
                        raise psycopg.Rollback
                except psycopg.Rollback:
                    pass
        claim = await timed_claims(worker, claims)
        status, unfinished = [], []
        for _ in range(20):
            t = time.perf_counter()
            counts = await worker.counts()
            status.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            left = await worker.unfinished()
            unfinished.append((time.perf_counter() - t) * 1000)
        assert sum(counts.values()) == jobs and left == jobs

        wake = []
        await worker.release(list(worker.held()))
        await worker.wait_for_work(0.0)  # starts listening
        for i in range(20):
            arrived = anyio.Event()
            took: list[float] = []

            async def take(done: anyio.Event = arrived, took: list[float] = took) -> None:
                while True:
                    await worker.wait_for_work(5.0)
                    if await worker.acquire(16, 3600.0):
                        took.append(time.perf_counter())
                        done.set()
                        return

            async with anyio.create_task_group() as tg:
                tg.start_soon(take)
                await anyio.sleep(0.05)  # the worker is waiting
                t = time.perf_counter()
                await submitter.enqueue(lines(1, prefix=f"late{i}"))
                await arrived.wait()
            wake.append((took[0] - t) * 1000)
    finally:
        busy.forget(list(busy.held()))  # nothing to hand back: the database is dropped next
        for led in (submitter, busy, worker):
            await led.close()
    return {
        "jobs": jobs, "leased": leased,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "enqueue_s": round(enqueue_s, 1),
        "enqueue_lines_per_s": round(jobs / enqueue_s),
        "claim_ms_p50": round(pct(claim, 50), 2), "claim_ms_p99": round(pct(claim, 99), 2),
        "claim_server_ms_p50": round(pct(server_claim, 50), 2),
        "status_counts_ms_p50": round(pct(status, 50), 2),
        "unfinished_ms_p50": round(pct(unfinished, 50), 2),
        "wake_ms_p50": round(pct(wake, 50), 1), "wake_ms_max": round(max(wake), 1),
    }


async def measure_upgrade(dsn: str, *, jobs: int) -> dict[str, object]:
    """The first open of a ledger of the previous schema version, with ``jobs`` rows."""
    import psycopg

    from tests.pg_fixtures import make_old_schema

    with psycopg.connect(dsn, autocommit=True) as conn:
        make_old_schema(conn, q.SCHEMA_VERSION - 1)
        body = json.dumps({"id": "resp_x", "status": "completed", "output": [{"type": "message",
                           "content": [{"type": "output_text", "text": "an answer " * 10}]}],
                           "usage": {"input_tokens": 20, "output_tokens": 30}})
        conn.execute(
            "INSERT INTO asyncbg_jobs (key, digest, request, state, status, response_id, body, "
            "input_tokens, output_tokens, owner, epoch, lease_until, created, updated) "
            "SELECT 'line-' || i, md5(i::text), convert_to(json_build_object('model', 'm', "
            "'input', 'question ' || i)::text, 'UTF8'), s.state, s.status, "
            "CASE WHEN s.state IN ('live', 'done') THEN 'resp_' || i END, "
            "CASE WHEN s.state = 'done' THEN convert_to(%s, 'UTF8') END, "
            "CASE WHEN s.state = 'done' THEN 20 END, CASE WHEN s.state = 'done' THEN 30 END, "
            "CASE WHEN i %% 20 IN (8, 9) THEN 'w' END, 1, "
            "CASE WHEN i %% 20 IN (8, 9) THEN 1e10 END, i, i "
            "FROM generate_series(1, %s) AS i, LATERAL (SELECT CASE WHEN i %% 10 < 8 THEN 'done' "
            "WHEN i %% 10 = 8 THEN 'live' ELSE 'new' END AS state) AS t, "
            "LATERAL (SELECT t.state, CASE t.state WHEN 'done' THEN 'completed' "
            "WHEN 'live' THEN 'in_progress' ELSE 'pending' END AS status) AS s",
            (body, jobs))
        conn.execute("VACUUM ANALYZE asyncbg_jobs")
    ledger = PostgresLedger(dsn)
    started = time.perf_counter()
    await ledger.open()
    upgrade_s = time.perf_counter() - started
    try:
        counts = await ledger.counts()
        assert sum(counts.values()) == jobs, counts
        assert len(await ledger.acquire(16, 60.0)) == 16
    finally:
        ledger.forget(list(ledger.held()))
        await ledger.close()
    return {"jobs": jobs, "from_version": q.SCHEMA_VERSION - 1, "to_version": q.SCHEMA_VERSION,
            "load_average_1m": round(os.getloadavg()[0], 2), "upgrade_s": round(upgrade_s, 2)}


async def measure_sqlite(path: Path, *, jobs: int, leased: int, claims: int
                         ) -> dict[str, object]:
    """The same claims on a shared SQLite journal (processes on one machine)."""
    from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

    submitter = SharedSQLiteLedger(path)
    busy = SharedSQLiteLedger(path, lease=3600.0)
    worker = SharedSQLiteLedger(path, lease=3600.0)
    for led in (submitter, busy, worker):
        await led.open()
    try:
        started = time.perf_counter()
        for start in range(0, jobs, 100_000):
            await submitter.enqueue(lines(min(100_000, jobs - start), prefix=f"c{start}"))
        enqueue_s = time.perf_counter() - started
        print(f"enqueued {jobs:,} in {enqueue_s:.1f} s", file=sys.stderr, flush=True)
        for _ in range(0, leased, 10_000):
            await busy.acquire(10_000, 3600.0)
        claim = await timed_claims(worker, claims)
        unfinished = []
        for _ in range(5):
            t = time.perf_counter()
            left = await worker.unfinished()
            unfinished.append((time.perf_counter() - t) * 1000)
        assert left == jobs
    finally:
        busy.forget(list(busy.held()))
        worker.forget(list(worker.held()))
        for led in (submitter, busy, worker):
            await led.close()
    return {
        "store": "sqlite", "jobs": jobs, "leased": leased,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "enqueue_s": round(enqueue_s, 1),
        "claim_ms_p50": round(pct(claim, 50), 2), "claim_ms_p99": round(pct(claim, 99), 2),
        "unfinished_ms_p50": round(pct(unfinished, 50), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--leased", type=int, default=200_000,
                        help="jobs another worker holds while the claims are timed")
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--store", choices=["postgres", "sqlite"], default="postgres",
                        help="sqlite: a shared SQLite journal in a temporary directory")
    parser.add_argument("--upgrade", action="store_true",
                        help="time the upgrade of a ledger of the previous schema instead")
    args = parser.parse_args()
    if args.upgrade:
        with database() as dsn:
            report = anyio.run(lambda: measure_upgrade(dsn, jobs=args.jobs))
        print(json.dumps(report, indent=2))
        return 0
    if args.store == "sqlite":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report = anyio.run(lambda: measure_sqlite(
                Path(tmp) / "fleet.db", jobs=args.jobs, leased=min(args.leased, args.jobs // 2),
                claims=args.claims))
        print(json.dumps(report, indent=2))
        return 0
    with database() as dsn:
        report = anyio.run(lambda: measure(dsn, jobs=args.jobs,
                                           leased=min(args.leased, args.jobs // 2),
                                           claims=args.claims))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
