"""A PostgreSQL ledger whose cost does not grow with its size: claims read only rows they can
take (and so do a shared SQLite journal's), counts come from counters the triggers keep exact, a
big enqueue goes through COPY, and a waiting worker is woken by LISTEN/NOTIFY.
benchmarks/fleet_scale.py measures the same at a million jobs."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
import pytest_asyncio

from asyncbg._ledgers import Outcome, canonical, digest
from asyncbg._ledgers import _pg_queries as q
from asyncbg._ledgers import _sqlite_queries as sq
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg._ledgers._shared import EnqueueMismatch, LeaseLost
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

from .pg_fixtures import make_old_schema


def items(n: int, prefix: str = "k", salt: str = "") -> list[tuple[str, str, bytes]]:
    out = []
    for i in range(n):
        params = {"model": "m", "input": f"{prefix}{i}{salt}"}
        out.append((f"{prefix}{i}", digest(params), canonical(params)))
    return out


@pytest_asyncio.fixture
async def pair(pg_dsn: str) -> AsyncIterator[tuple[PostgresLedger, PostgresLedger]]:
    """Two workers' ledgers on one database."""
    one, two = PostgresLedger(pg_dsn, lease=30.0), PostgresLedger(pg_dsn, lease=30.0)
    await one.open()
    await two.open()
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


def actual_counts(dsn: str) -> dict[tuple[str, str], int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT state, status, count(*) FROM asyncbg_jobs "
                            "GROUP BY state, status").fetchall()
    return {(state, status): int(n) for state, status, n in rows}


# -- counts ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_counters_stay_exact_through_every_kind_of_write(
    pair: tuple[PostgresLedger, PostgresLedger], pg_dsn: str
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ledgers = list(pair)
    await ledgers[0].enqueue(items(6000, "big"))  # the COPY path
    statuses = ["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
    for step in range(120):
        led = rng.choice(ledgers)
        action = rng.randrange(7)
        held = list(led.held())
        try:
            if action == 0:
                await led.enqueue(items(rng.randrange(1, 30), f"s{step}-"))
            elif action == 1:
                await led.acquire(rng.randrange(1, 40), 30.0)
            elif action == 2 and held:
                key = rng.choice(held)
                await led.record(key, Outcome(rng.choice(statuses), f"resp_{key}", body=b"{}"))
            elif action == 3 and held:
                await led.record(rng.choice(held), Outcome("failed", error="x"))  # local
            elif action == 4:
                await led.requeue(held)
            elif action == 5 and held:
                await led.release(rng.sample(held, k=min(len(held), 5)))
            elif action == 6:
                key, dig, req = items(1, f"c{step}-")[0]
                await led.claim(key, dig, req)
        except LeaseLost:
            pass
        if step % 20 == 19:
            assert await led.counts() == actual_counts(pg_dsn), f"seed {seed}, step {step}"
    counts = await ledgers[0].counts()
    assert counts == actual_counts(pg_dsn), f"seed {seed}"
    assert await ledgers[1].unfinished() == sum(
        n for (state, _), n in counts.items() if state in ("new", "sending", "live"))


@pytest.mark.asyncio
async def test_a_version_2_ledger_gains_the_indexes_and_its_counts(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # as asyncbg wrote it before
        for sql in (*q.CREATE_V1, *q.UPGRADES[1]):
            conn.execute(sql)
        conn.execute(q.WRITE_SCHEMA_VERSION, ("2",))
        for i, state in enumerate(["new", "new", "live", "done", "local"]):
            conn.execute("INSERT INTO asyncbg_jobs (key, digest, request, state, status, "
                         "created, updated) VALUES (%s, 'd', 'r', %s, %s, 0, 0)",
                         (f"k{i}", state, "completed" if state == "done" else "pending"))
    ledger = PostgresLedger(pg_dsn)
    await ledger.open()
    try:
        assert await ledger.counts() == actual_counts(pg_dsn)
        assert await ledger.unfinished() == 3
        assert [r.key for r in await ledger.acquire(10, 30.0)] == ["k0", "k1", "k2"]
    finally:
        await ledger.close()
    with psycopg.connect(pg_dsn) as conn:
        names = {row[0] for row in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'asyncbg_jobs'")}
        assert conn.execute("SELECT value FROM asyncbg_meta").fetchall() == [
            (str(q.SCHEMA_VERSION),)]
    assert {"asyncbg_jobs_waiting", "asyncbg_jobs_leased"} <= names
    assert "asyncbg_jobs_open" not in names


#: The last schema version with the per-row counting trigger.
BEFORE_MOVES = next(version for version, sqls in q.UPGRADES.items()
                    if any("asyncbg_count_moves()" in sql for sql in sqls))


@pytest.mark.asyncio
async def test_the_previous_version_keeps_its_rows_and_exact_counts_and_counts_per_statement(
    pg_dsn: str,
) -> None:
    """A ledger of the version before the counters per statement (the per-row counting
    trigger), with jobs in every state, is upgraded on open: the rows and counts are kept, and
    from then on the counters are kept by statement-level triggers, exact through grouped
    writes of every kind in one statement."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # as the previous asyncbg wrote it
        make_old_schema(conn, BEFORE_MOVES)
        conn.execute("INSERT INTO asyncbg_jobs (key, digest, request, state, status, created, "
                     "updated) SELECT 'old' || i, 'd', 'r', 'new', 'pending', 0, 0 "
                     "FROM generate_series(0, 39) AS i")
        for state, status, keys in (("live", "queued", "old0, old1, old2"),
                                    ("done", "completed", "old3, old4"),
                                    ("local", "failed", "old5")):
            names = ", ".join(f"'{k}'" for k in keys.split(", "))
            conn.execute(f"UPDATE asyncbg_jobs SET state = '{state}', status = '{status}' "
                         f"WHERE key IN ({names})")
        conn.execute("DELETE FROM asyncbg_jobs WHERE key = 'old39'")
    before = {("new", "pending"): 33, ("live", "queued"): 3, ("done", "completed"): 2,
              ("local", "failed"): 1}
    ledger = PostgresLedger(pg_dsn, lease=30.0)
    await ledger.open()
    try:
        assert await ledger.counts() == actual_counts(pg_dsn) == before
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT value FROM asyncbg_meta").fetchall() == [
                (str(q.SCHEMA_VERSION),)]
            kinds = conn.execute(
                "SELECT tgname, (tgtype & 1) = 1 FROM pg_trigger "
                "WHERE tgrelid = 'asyncbg_jobs'::regclass AND NOT tgisinternal").fetchall()
        assert kinds and not any(per_row for _, per_row in kinds), kinds  # per statement
        taken = [r.key for r in await ledger.acquire(40, 30.0)]
        assert len(taken) == 36  # 33 new and 3 live
        new = [key for key in taken if key not in ("old0", "old1", "old2")]

        async def write(i: int, key: str) -> None:
            if i % 3 == 0:
                await ledger.sending(key, resubmit=False)
            elif i % 3 == 1:
                await ledger.record(key, Outcome("in_progress", f"resp_{key}"))
            else:
                await ledger.record(key, Outcome("completed", f"resp_{key}", body=b"{}"))

        for _ in range(2):  # every kind waiting together: one statement moves them all
            async with anyio.create_task_group() as tg:
                for i, key in enumerate(new):
                    tg.start_soon(write, i, key)
            new = [key for i, key in enumerate(new) if i % 3 != 2]
            assert await ledger.counts() == actual_counts(pg_dsn)
        await ledger.record("old0", Outcome("failed", error="x"))
        await ledger.requeue(["old0"])
        assert await ledger.counts() == actual_counts(pg_dsn)
    finally:
        await ledger.close()


# -- claims ---------------------------------------------------------------------------------------


def plan_rows(node: dict[str, Any]) -> int:
    """Rows a plan node and its children produced or threw away."""
    own = int(node.get("Actual Rows", 0)) + int(node.get("Rows Removed by Filter", 0))
    return own + sum(plan_rows(child) for child in node.get("Plans", []))


@pytest.mark.asyncio
async def test_a_claim_reads_only_rows_it_can_take_however_many_are_leased(
    pair: tuple[PostgresLedger, PostgresLedger], pg_dsn: str
) -> None:
    busy, worker = pair
    await busy.enqueue(items(6010))
    assert len(await busy.acquire(6000, 300.0)) == 6000  # running elsewhere
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE asyncbg_jobs")
        for sql in (q.acquire(16), q.acquire(16, live_only=True)):
            with conn.transaction():
                [[plan]] = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", {
                    "owner": "probe", "lease": 30.0, "margin": 10.0}).fetchall()
                if isinstance(plan, str):
                    plan = json.loads(plan)
                # 10 rows to take (and their index and heap visits), not 6,000 leased ones.
                assert plan_rows(plan[0]["Plan"]) < 200, plan
                raise psycopg.Rollback  # EXPLAIN ANALYZE ran the claim: take nothing
    assert [r.key for r in await worker.acquire(16, 30.0)] == [f"k{i}" for i in range(6000, 6010)]
    busy.forget(list(busy.held()))


@pytest.mark.asyncio
async def test_a_shared_sqlite_claim_reads_only_rows_it_can_take(tmp_path: Path) -> None:
    """The same for a shared SQLite journal: SQLite's virtual machine steps (counted by a
    progress handler) for a claim do not grow with the leased rows before the waiting ones."""
    busy = SharedSQLiteLedger(tmp_path / "j.db", lease=300.0)
    worker = SharedSQLiteLedger(tmp_path / "j.db", lease=300.0)
    await busy.open()
    await worker.open()
    try:
        steps = []
        for leased in (200, 6000):
            await busy.enqueue(items(leased + 10, prefix=f"r{leased}-"))
            assert len(await busy.acquire(leased, 300.0)) == leased  # running elsewhere
            db = sqlite3.connect(tmp_path / "j.db")
            try:
                count = [0]

                def step(count: list[int] = count) -> int:
                    count[0] += 1
                    return 0

                db.set_progress_handler(step, 1)
                for sql in (sq.ACQUIRE, sq.ACQUIRE_LIVE):
                    db.execute(sql, {"now": time.time(), "limit": 16, "margin": 10.0}).fetchall()
                steps.append(count[0])
            finally:
                db.close()
            taken = await worker.acquire(16, 300.0)
            assert [r.key for r in taken] == [f"r{leased}-{i}" for i in range(leased, leased + 10)]
        # 30 times the leased rows, about the same steps (before: 28 times the steps).
        assert steps[1] < steps[0] * 3, steps
    finally:
        busy.forget(list(busy.held()))
        await busy.close()
        await worker.close()


# -- enqueue --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_big_enqueue_is_idempotent_and_all_or_nothing(
    pair: tuple[PostgresLedger, PostgresLedger],
) -> None:
    one, two = pair
    batch = items(7000)
    assert await one.enqueue(batch) == 7000
    assert await two.enqueue(batch) == 0
    changed = [*items(7000), *items(1, "new")]
    changed[3500] = items(7000, salt="!")[3500]
    with pytest.raises(EnqueueMismatch) as info:
        await one.enqueue(changed)
    assert info.value.key == "k3500"
    assert await one.get("new0") is None  # nothing from the refused file
    assert await one.unfinished() == 7000
    records = await two.acquire(3, 30.0)
    assert [r.key for r in records] == ["k0", "k1", "k2"]  # in file order
    assert json.loads(records[0].request) == {"model": "m", "input": "k0"}


# -- wake-ups -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_waiting_worker_is_woken_by_an_enqueue_and_a_release(
    pair: tuple[PostgresLedger, PostgresLedger],
) -> None:
    submitter, worker = pair
    with anyio.fail_after(5):
        await worker.wait_for_work(30.0)  # the first call starts listening, and returns
    for step in ("enqueue", "release"):
        woken = anyio.Event()

        async def wait(done: anyio.Event = woken) -> None:
            await worker.wait_for_work(30.0)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.05)
            assert not woken.is_set()  # nothing arrived yet: it waits
            if step == "enqueue":
                await submitter.enqueue(items(3))
            else:
                await submitter.release(list(submitter.held()))
            with anyio.fail_after(10):  # far below the 30 s poll it replaces
                await woken.wait()
        if step == "enqueue":
            assert len(await submitter.acquire(3, 30.0)) == 3
    assert len(await worker.acquire(3, 30.0)) == 3


@pytest.mark.asyncio
async def test_a_lost_listening_connection_is_a_timed_wait_not_an_error(
    pair: tuple[PostgresLedger, PostgresLedger], pg_dsn: str
) -> None:
    submitter, worker = pair
    await worker.wait_for_work(0.0)  # starts listening
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # This test's database only: the server is shared with other tests' listeners.
        assert conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE query = %s AND datname = current_database()",
                            (q.LISTEN,)).fetchall() == [(True,)]
    with anyio.fail_after(10):
        await worker.wait_for_work(0.2)  # no error: the poll's wait, then listening again
        await worker.wait_for_work(0.2)
        woken = anyio.Event()

        async def wait() -> None:
            await worker.wait_for_work(30.0)
            woken.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.05)
            await submitter.enqueue(items(1))
            await woken.wait()
