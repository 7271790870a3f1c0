#!/usr/bin/env python3
"""``asyncbg status`` on a ledger of a million jobs: before (every record read) and after (the
overview: counters and the rows it lists), in the same run, on each kind of ledger.

    python benchmarks/status_scale.py                   # 1,000,000 jobs, 3 rounds, all stores
    python benchmarks/status_scale.py --jobs 100000 --store sqlite

The ledgers hold ``--jobs`` jobs as a long run leaves them: 99 % finished with a final body
(OpenAI usage), 0.5 % ended locally, 2,000 live (a tenth of them jobs of 4 remote batches), 10
being sent and the rest waiting. Stores: ``journal`` (the SQLite journal of ``asyncbg run``:
no leases), ``fleet`` (a shared SQLite journal that workers leased) and ``postgres``
($ASYNCBG_TEST_POSTGRES, a database of its own made and dropped, or a throwaway server). Each
is written as the previous version wrote it (no tallies) and then opened once by this version,
which adds and backfills its counters (``backfill_s``, once).

Figures, per store and round: ``before_ms`` (the whole ``status`` command in-process, with its
read of every record, as before), ``after_first_ms`` (the same command with the overview, in a
fresh process state for the ledger: its first call) and ``after_ms`` (median of 5 more calls);
for ``fleet``, ``unfinished()`` from the counters against the previous indexed count; and,
once per store, the ``asyncbg status`` command as a subprocess (3 runs, wall time, beside
``python -c pass`` for the interpreter's own start). Goal (issue 20): status <= 100 ms at
1,000,000 jobs; unfinished() on shared SQLite <= 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from asyncbg._cli import _ops  # noqa: E402
from asyncbg._ledgers import SQLiteLedger  # noqa: E402
from asyncbg._ledgers import _sqlite_queries as sq  # noqa: E402
from asyncbg._ledgers._overview import from_records  # noqa: E402
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger  # noqa: E402

LIVE = 2000
SENDING = 10


def _mix(jobs: int) -> tuple[int, int, int]:
    """(done, local, live) of ``jobs``; the rest after SENDING are waiting."""
    live = min(LIVE, jobs // 10)
    local = jobs // 200
    done = int(jobs * 0.99) - live
    return done, local, live


# A row per job in SQL: x is the job's number. Bodies ~400 bytes, as a short answer's.
_STATE = """CASE WHEN x <= {done} THEN 'done' WHEN x <= {done} + {local} THEN 'local'
    WHEN x <= {done} + {local} + {live} THEN 'live'
    WHEN x <= {done} + {local} + {live} + {sending} THEN 'sending' ELSE 'new' END"""
_BODY = """CASE WHEN x <= {done} THEN CAST(json_object('id', 'resp_' || x, 'object', 'response',
    'status', 'completed', 'model', 'gpt-5-nano', 'output', json_array(json_object(
    'type', 'message', 'role', 'assistant', 'content', json_array(json_object('type',
    'output_text', 'text', 'The answer to question ' || x || ' is ' || (x % 97) || '.'))))
    , 'usage', json_object('input_tokens', 20 + x % 50, 'input_tokens_details',
    json_object('cached_tokens', 0), 'output_tokens', 100 + x % 300,
    'output_tokens_details', json_object('reasoning_tokens', 64), 'total_tokens',
    120 + x % 50 + x % 300)) AS BLOB) END"""


def _sql_rows(jobs: int, *, sqlite: bool) -> tuple[str, str, str]:
    done, local, live = _mix(jobs)
    fmt = {"done": done, "local": local, "live": live, "sending": SENDING}
    state = _STATE.format(**fmt)
    body = _BODY.format(**fmt)
    rid = (f"CASE WHEN x <= {done} THEN 'resp_' || x WHEN x <= {done + local} THEN NULL "
           f"WHEN x <= {done + local} + {live // 10} THEN 'batch_' || (x % 4) || '#line-' || x "
           f"WHEN x <= {done + local + live} THEN 'resp_' || x END")
    if not sqlite:
        body = (body.replace("json_object(", "json_build_object(")
                .replace("json_array(", "json_build_array(")
                .replace("AS BLOB)", "AS text)").replace("CAST(json_build", "convert_to(CAST("
                                                         "json_build") + "")
        body = body.replace("AS text) END", "AS text), 'UTF8') END")
    return state, body, rid


def build_sqlite(path: Path, jobs: int, *, fleet: bool) -> float:
    """The journal as the previous version left it; then this version's first open (the
    backfill of its counters), timed."""
    async def make() -> None:
        ledger = SQLiteLedger(path)
        await ledger.open()
        await ledger.close()

    anyio.run(make)
    state, body, rid = _sql_rows(jobs, sqlite=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        for name in ("jobs_live", "jobs_sending", "jobs_batched"):
            db.execute(f"DROP INDEX {name}")
        for name in ("insert", "delete", "update"):
            db.execute(f"DROP TRIGGER job_tallies_{name}")
        db.execute("DROP TABLE job_tallies")
        db.execute(f"""
            INSERT INTO jobs (key, seq, digest, request, state, response_id, status, response,
                              resubmits, created, updated, epoch)
            WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {jobs})
            SELECT 'line-' || x, x, hex(randomblob(16)),
                   CAST('{{"input":"question ' || x || '","model":"gpt-5-nano"}}' AS BLOB),
                   {state}, {rid},
                   CASE WHEN ({state}) = 'done' THEN 'completed'
                        WHEN ({state}) = 'local' THEN 'failed'
                        WHEN ({state}) = 'live' THEN 'in_progress' ELSE 'pending' END,
                   {body}, x % 1000 = 0, 1.7e9 + x / 100.0, 1.7e9 + x / 100.0, {int(fleet)}
            FROM c""")
        db.execute("COMMIT")
    finally:
        db.close()
    started = time.perf_counter()
    anyio.run(make)  # adds job_tallies and its indexes, filled from every row
    return time.perf_counter() - started


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    from benchmarks.fleet_scale import database

    with database() as dsn:
        yield dsn


def build_postgres(dsn: str, jobs: int) -> float:
    """The ledger at the previous schema version, filled; then this version's first open (the
    upgrade: counters backfilled, indexes built), timed."""
    import psycopg

    from asyncbg._ledgers import _pg_queries as q
    from asyncbg._ledgers._postgres import PostgresLedger

    state, body, rid = _sql_rows(jobs, sqlite=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in q.CREATE_V1:
            conn.execute(sql)
        for version in range(1, q.SCHEMA_VERSION - 1):
            with conn.transaction():
                for sql in q.UPGRADES[version]:
                    conn.execute(sql)
        conn.execute(q.WRITE_SCHEMA_VERSION, (str(q.SCHEMA_VERSION - 1),))
        conn.execute(f"""
            INSERT INTO asyncbg_jobs (key, digest, request, state, response_id, status, body,
                                      resubmits, created, updated, epoch)
            SELECT 'line-' || x, md5(x::text),
                   convert_to('{{"input":"question ' || x || '","model":"gpt-5-nano"}}', 'UTF8'),
                   {state}, {rid},
                   CASE WHEN ({state}) = 'done' THEN 'completed'
                        WHEN ({state}) = 'local' THEN 'failed'
                        WHEN ({state}) = 'live' THEN 'in_progress' ELSE 'pending' END,
                   {body}, (x % 1000 = 0)::int, 1.7e9 + x / 100.0, 1.7e9 + x / 100.0, 1
            FROM generate_series(1, {jobs}) AS x""")
        conn.execute("VACUUM ANALYZE asyncbg_jobs")

    async def make() -> None:
        ledger = PostgresLedger(dsn)
        await ledger.open()
        await ledger.close()

    started = time.perf_counter()
    anyio.run(make)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE asyncbg_jobs")
    return time.perf_counter() - started


async def _full_read(ledger: Any) -> Any:
    return from_records(await ledger.records())


def status_ms(spec: str, *, before: bool) -> float:
    """The whole ``asyncbg status`` command in-process (open, read, print to a buffer), ms."""
    args = argparse.Namespace(ledger=spec, json=False)
    saved = _ops.overview
    if before:
        _ops.overview = _full_read  # type: ignore[assignment]  # the read before the overview
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            started = time.perf_counter()
            rc = anyio.run(_ops.status, args)
            took = (time.perf_counter() - started) * 1000
    finally:
        _ops.overview = saved  # type: ignore[assignment]
    if before and rc == 2:  # the full read ran past the ledger's statement timeout (as before)
        return -took
    assert rc == 0 and "jobs" in out.getvalue(), out.getvalue()
    return took


def same_text(spec: str) -> None:
    """The overview's text is the full read's, word for word (as --json, but the ages)."""
    texts = []
    for before in (True, False):
        saved = _ops.overview
        if before:
            _ops.overview = _full_read  # type: ignore[assignment]
        try:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                anyio.run(_ops.status, argparse.Namespace(ledger=spec, json=True))
        finally:
            _ops.overview = saved  # type: ignore[assignment]
        if not out.getvalue():  # the full read timed out: nothing to compare (tests do)
            return
        summary = json.loads(out.getvalue())
        for b in summary["batches"]:
            b.pop("age"), b.pop("expires_in")
        texts.append(summary)
    assert texts[0] == texts[1], "the overview differs from the full read"


def unfinished_ms(path: Path) -> tuple[float, float]:
    """unfinished() on a shared SQLite journal: from the counters, and the indexed count."""
    async def timed() -> float:
        ledger = SharedSQLiteLedger(path)
        await ledger.open()
        try:
            started = time.perf_counter()
            await ledger.unfinished()
            return (time.perf_counter() - started) * 1000
        finally:
            await ledger.close()

    after = anyio.run(timed)
    db = sqlite3.connect(path)
    try:
        started = time.perf_counter()
        db.execute(sq.UNFINISHED).fetchone()
        before = (time.perf_counter() - started) * 1000
    finally:
        db.close()
    return before, after


def unfinished_waiting(jobs: int, directory: Path) -> dict[str, Any]:
    """unfinished() on a shared SQLite journal where every job waits (issue 20's case: the
    indexed count reads the whole index of unfinished jobs), 3 times each way."""
    path = directory / f"status_scale_waiting_{os.getpid()}.db"
    try:
        async def make() -> None:
            ledger = SharedSQLiteLedger(path)
            await ledger.open()
            await ledger.close()

        anyio.run(make)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"""
            INSERT INTO jobs (key, seq, digest, request, state, status, created, updated)
            WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {jobs})
            SELECT 'line-' || x, x, 'd', CAST('{{}}' AS BLOB), 'new', 'pending', x, x FROM c""")
        db.execute("COMMIT")
        db.close()
        runs = [unfinished_ms(path) for _ in range(3)]
        return {"before_ms": [round(b, 1) for b, _ in runs],
                "after_ms": [round(a, 2) for _, a in runs]}
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def subprocess_ms(spec: str, runs: int = 3) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"status": [], "python_c_pass": []}
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "asyncbg", "status", "--ledger", spec],
                              capture_output=True, cwd=HERE.parent, check=False)
        out["status"].append(round((time.perf_counter() - started) * 1000, 1))
        assert done.returncode == 0, done.stderr
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out["python_c_pass"].append(round((time.perf_counter() - started) * 1000, 1))
    return out


def measure(name: str, spec: str, rounds: int, path: Path | None) -> dict[str, Any]:
    result: dict[str, Any] = {"rounds": []}
    same_text(spec)
    for _ in range(rounds):
        r: dict[str, Any] = {"before_ms": round(status_ms(spec, before=True), 1)}
        r["after_first_ms"] = round(status_ms(spec, before=False), 1)
        r["after_ms"] = round(statistics.median(
            status_ms(spec, before=False) for _ in range(5)), 1)
        # A negative before_ms: the full read failed (statement timeout, exit 2) after that long.
        r["ratio"] = round(abs(r["before_ms"]) / r["after_ms"], 1)
        if name == "fleet" and path is not None:
            before, after = unfinished_ms(path)
            r["unfinished_before_ms"], r["unfinished_after_ms"] = round(before, 1), round(
                after, 2)
        result["rounds"].append(r)
        print(f"{name}: {r}", file=sys.stderr, flush=True)
    result["subprocess_ms"] = subprocess_ms(spec)
    print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=["all", "journal", "fleet", "sqlite", "postgres"],
                        default="all")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"),
                        help="where the SQLite journals are written (and removed after)")
    args = parser.parse_args()
    stores = {"all": ["journal", "fleet", "postgres"], "sqlite": ["journal", "fleet"]}.get(
        args.store, [args.store])
    report: dict[str, Any] = {"jobs": args.jobs, "load_before": os.getloadavg()}
    for name in stores:
        if name == "postgres":
            with pg_database() as dsn:
                report[name] = {"backfill_s": round(build_postgres(dsn, args.jobs), 1)}
                report[name].update(measure(name, dsn, args.rounds, None))
            continue
        path = args.dir / f"status_scale_{name}_{os.getpid()}.db"
        try:
            report[name] = {"backfill_s": round(build_sqlite(path, args.jobs,
                                                             fleet=name == "fleet"), 1)}
            report[name].update(measure(name, str(path), args.rounds, path))
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    if "fleet" in stores:
        report["unfinished_all_waiting"] = unfinished_waiting(args.jobs, args.dir)
        print(f"waiting: {report['unfinished_all_waiting']}", file=sys.stderr, flush=True)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
