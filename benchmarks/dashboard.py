#!/usr/bin/env python3
"""The dashboard on a big ledger (issue 21): 1,000,000 jobs in an SQLite journal and in
PostgreSQL.

    .venv/bin/python benchmarks/dashboard.py [--jobs 1000000] [--only sqlite,postgres]

For each backend, a ledger of ``--jobs`` jobs is written straight into the ledger's own tables
(0.5 % live, 1 % waiting, 2 % failed, the rest completed with a ~450-byte body carrying usage),
then the dashboard app is started on it as ``asyncbg dashboard`` starts it (its lifespan: open,
first full scan), and measured:

- ``startup_ms``: the lifespan's start (open, counts from counters and indexes, first render);
- ``first_page_ms``: the first ``GET /`` after that (and ``page_ms_median``, of 5);
  ``first_counts_exact``: whether the first ``/summary.json`` already had every job by status
  (from the ledger's counters, before any full scan);
- ``scan_ms``: one full scan of every job (counts, the hour's throughput, latency buckets,
  failures by code), and ``usage_scan_ms``: the scan of every finished body for tokens;
- ``update_ms`` and ``queries_per_update``: one live update between two full scans (median of
  20), and how many statements it ran;
- ``scan_every_s``: how often the full scan runs at the default share (2 % of the time).

PostgreSQL comes from ``$ASYNCBG_TEST_POSTGRES`` or a throwaway server (tests/pg_server.py).

``--counter-cost`` measures instead what an SQLite journal's counters (``job_counts``, kept by
triggers) cost its writers: CPU time of inserting 100,000 jobs in one transaction, and of 15,000
state changes each in its own transaction, with the triggers and without (two runs each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncbg._dashboard._app import open_source
from asyncbg._dashboard._tally import Tally

NOW = time.time()


def body(i: int) -> bytes:
    return json.dumps({
        "id": f"resp_{i:012x}", "object": "response", "created_at": int(NOW - 3000),
        "completed_at": NOW - 60 - i % 600, "status": "completed", "model": "gpt-5.2",
        "service_tier": "default", "background": True,
        "output": [{"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": "an answer " * 8}]}],
        "usage": {"input_tokens": 120 + i % 50, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": 800, "output_tokens_details": {"reasoning_tokens": 500},
                  "total_tokens": 920 + i % 50},
    }, separators=(",", ":")).encode()


def shape(i: int, jobs: int) -> tuple[str, str]:
    """(state, status) of job ``i``: the last 1 % waits, the 0.5 % before it is live."""
    if i >= jobs * 0.99:
        return "new", "pending"
    if i >= jobs * 0.985:
        return "live", "in_progress"
    if i % 50 == 0:
        return "done", "failed"
    return "done", "completed"


def fill_sqlite(path: Path, jobs: int) -> None:
    from asyncbg import SQLiteLedger

    async def create() -> None:
        ledger = SQLiteLedger(path)
        await ledger.open()
        await ledger.close()

    anyio.run(create)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(jobs):
            state, status = shape(i, jobs)
            done = state == "done"
            yield (f"row-{i}", i + 1, "d", b"{}", state, f"resp_{i:012x}" if state != "new"
                   else None, status, body(i) if status == "completed" else None,
                   "boom" if status == "failed" else None,
                   "server_error" if status == "failed" else None,
                   NOW - 3600 + i * 3000 / jobs, NOW - 3000 + i * 3000 / jobs if done
                   else NOW)

    db.executemany(
        "INSERT INTO jobs (key, seq, digest, request, state, response_id, status, response, "
        "error, error_code, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows())
    db.execute("COMMIT")
    db.close()


def fill_postgres(dsn: str, jobs: int) -> None:
    import psycopg

    from asyncbg._ledgers._postgres import PostgresLedger

    async def create() -> None:
        ledger = PostgresLedger(dsn)
        await ledger.open()
        await ledger.close()

    anyio.run(create)
    sample = body(7).decode()
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute(f"""
            INSERT INTO asyncbg_jobs (key, digest, request, state, response_id, status, body,
                                      error, error_code, created, updated)
            SELECT 'row-' || i, 'd', '\\x7b7d',
                   s.state, CASE WHEN s.state <> 'new' THEN 'resp_' || i END, s.status,
                   CASE WHEN s.status = 'completed' THEN convert_to(%s, 'UTF8') END,
                   CASE WHEN s.status = 'failed' THEN 'boom' END,
                   CASE WHEN s.status = 'failed' THEN 'server_error' END,
                   %s - 3600 + i * 3000.0 / {jobs},
                   CASE WHEN s.state = 'done' THEN %s - 3000 + i * 3000.0 / {jobs} ELSE %s END
            FROM generate_series(0, {jobs} - 1) AS i,
                 LATERAL (SELECT CASE WHEN i >= {jobs} * 0.99 THEN 'new'
                                      WHEN i >= {jobs} * 0.985 THEN 'live' ELSE 'done' END
                                 AS state,
                                 CASE WHEN i >= {jobs} * 0.99 THEN 'pending'
                                      WHEN i >= {jobs} * 0.985 THEN 'in_progress'
                                      WHEN i %% 50 = 0 THEN 'failed' ELSE 'completed' END
                                 AS status) s
        """, (sample, NOW, NOW, NOW))
        db.execute("VACUUM ANALYZE asyncbg_jobs")


#: How many SQL statements each method of a source runs.
STATEMENTS = {"now": 0, "start": 3, "counts": 1, "window": 2, "rows": 1, "workers": 1,
              "endpoints": 1, "aggregate": 3, "usage": 2}


class Counting:
    """Counts the statements a source runs."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._source, name)
        if name in STATEMENTS and callable(value):
            async def counted(*args: Any, **kwargs: Any) -> Any:
                self.count += STATEMENTS[name]
                return await value(*args, **kwargs)
            return counted
        return value


async def measure_source(spec: str) -> dict[str, float]:
    source = Counting(open_source(spec))
    await source.open()
    try:
        clock = [0.0]
        tally = Tally(source, clock=lambda: clock[0])  # type: ignore[arg-type]
        started = time.perf_counter()
        await tally.start()
        start_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        await tally.scan()
        scan_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        await tally.update_usage()
        usage_ms = (time.perf_counter() - started) * 1000
        times, queries = [], []
        for _ in range(20):
            before = source.count
            started = time.perf_counter()
            await tally.update()
            times.append((time.perf_counter() - started) * 1000)
            queries.append(source.count - before)
        assert tally.scans == 1 and not await tally.scan(), "the full scan ran again"
        view = tally.view()
        return {"start_ms": round(start_ms, 1), "scan_ms": round(scan_ms, 1),
                "usage_scan_ms": round(usage_ms, 1),
                "update_ms": round(statistics.median(times), 2),
                "queries_per_update": max(queries),
                "scan_every_s": round(max(0.5, scan_ms / 1000 / 0.02), 1),
                "total_seen": view.total, "live_seen": len(view.live_rows),
                "output_tokens": view.output_tokens or 0}
    finally:
        await source.close()


def measure_app(spec: str, jobs: int) -> dict[str, Any]:
    from starlette.testclient import TestClient

    import asyncbg

    app = asyncbg.dashboard_app(spec)
    started = time.perf_counter()
    with TestClient(app) as client:
        startup = (time.perf_counter() - started) * 1000
        first = client.get("/summary.json").json()
        want = {s: 0 for s in ("pending", "in_progress", "completed", "failed")}
        for i in range(jobs):
            want[shape(i, jobs)[1]] += 1
        exact = first["by_status"] == {s: n for s, n in want.items() if n}
        pages = []
        for _ in range(5):
            started = time.perf_counter()
            page = client.get("/")
            pages.append((time.perf_counter() - started) * 1000)
            assert page.status_code == 200
    return {"startup_ms": round(startup, 1), "first_page_ms": round(pages[0], 1),
            "page_ms_median": round(statistics.median(pages), 1), "first_counts_exact": exact}


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    import psycopg

    from tests.pg_fixtures import with_database
    from tests.pg_server import throwaway_postgres

    with contextlib.ExitStack() as stack:
        server = os.environ.get("ASYNCBG_TEST_POSTGRES") or stack.enter_context(
            throwaway_postgres())
        name = f"dash_bench_{os.getpid()}"
        with psycopg.connect(server, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        try:
            yield with_database(server, name)
        finally:
            with psycopg.connect(server, autocommit=True) as db:
                db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def counter_cost(rows: int = 100_000, changes: int = 5_000) -> dict[str, list[float]]:
    """CPU microseconds per insert and per state change, with and without the triggers."""
    from asyncbg import SQLiteLedger

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(4):
            triggers = run % 2 == 1
            path = Path(tmp) / f"{run}.journal"

            async def create(path: Path = path) -> None:
                ledger = SQLiteLedger(path)
                await ledger.open()
                await ledger.close()

            anyio.run(create)
            db = sqlite3.connect(path, isolation_level=None)
            db.execute("PRAGMA synchronous = NORMAL")  # as the ledger sets it (WAL already)
            if not triggers:
                for name in ("insert", "update", "delete"):
                    db.execute(f"DROP TRIGGER job_counts_{name}")
            started = time.process_time()
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO jobs (key, seq, digest, request, state, status, created, updated) "
                "VALUES (?, ?, 'd', x'7b7d', 'new', 'pending', 0, 0)",
                ((f"k{i}", i) for i in range(rows)))
            db.execute("COMMIT")
            insert = (time.process_time() - started) / rows * 1e6
            started = time.process_time()
            for i in range(changes):  # a job's three writes, each its own transaction
                for state, status in (("sending", "pending"), ("live", "queued"),
                                      ("done", "completed")):
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("UPDATE jobs SET state = ?, status = ? WHERE key = ?",
                               (state, status, f"k{i}"))
                    db.execute("COMMIT")
            change = (time.process_time() - started) / (3 * changes) * 1e6
            db.close()
            name = "with_triggers" if triggers else "without_triggers"
            results.setdefault(f"insert_us_{name}", []).append(round(insert, 1))
            results.setdefault(f"change_us_{name}", []).append(round(change, 1))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--only", default="sqlite,postgres")
    parser.add_argument("--counter-cost", action="store_true",
                        help="measure what the SQLite counters cost writers instead")
    args = parser.parse_args()
    if args.counter_cost:
        print(json.dumps(counter_cost(), indent=2))
        return 0
    results: dict[str, Any] = {"jobs": args.jobs}
    if "sqlite" in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "big.journal"
            started = time.perf_counter()
            fill_sqlite(path, args.jobs)
            print(f"sqlite: {args.jobs:,} jobs written in {time.perf_counter() - started:.0f}s",
                  file=sys.stderr)
            results["sqlite"] = {**measure_app(str(path), args.jobs),
                                 **anyio.run(measure_source, str(path)),
                                 "file_mb": round(path.stat().st_size / 1e6)}
    if "postgres" in args.only:
        with postgres() as dsn:
            started = time.perf_counter()
            fill_postgres(dsn, args.jobs)
            print(f"postgres: {args.jobs:,} jobs written in "
                  f"{time.perf_counter() - started:.0f}s", file=sys.stderr)
            results["postgres"] = {**measure_app(dsn, args.jobs),
                                   **anyio.run(measure_source, dsn)}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
