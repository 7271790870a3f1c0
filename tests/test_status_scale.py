"""``asyncbg status`` at any size: it reads counters and the rows it lists, never every record,
and says exactly what a full read says.

Every ledger kind (a run's SQLite journal, a fleet's shared one, PostgreSQL) is held to
:func:`~asyncbg._ledgers._overview.from_records` over random ledgers (hypothesis), through an
upgrade of a ledger written before the counters existed, under concurrent writers, and with the
counters missing (the fallback). What is read is counted by SQLite's virtual machine steps and
PostgreSQL's plans, not by a clock. benchmarks/status_scale.py times the same at a million jobs.
"""

from __future__ import annotations

import json
import random
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncbg._ledgers import Outcome, SQLiteLedger, canonical, digest
from asyncbg._ledgers import _pg_queries as q
from asyncbg._ledgers import _sqlite_queries as sq
from asyncbg._ledgers._outbox import Notice
from asyncbg._ledgers._overview import (
    Overview,
    body_tokens,
    from_records,
    live_records,
    overview,
    sqlite_overview,
)
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg._ledgers._shared import LeaseLost, SharedLedger
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

from .pg_fixtures import make_old_schema

# -- bodies: the tokens the triggers count are the tokens status counted ------------------------

_COUNTS = st.one_of(st.none(), st.integers(0, 10**6))
_USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens",
               "cache_creation_input_tokens", "promptTokenCount", "candidatesTokenCount",
               "thoughtsTokenCount", "cachedContentTokenCount", "prompt_tokens",
               "completion_tokens")
_USAGE = st.dictionaries(st.sampled_from(_USAGE_KEYS), _COUNTS, max_size=5)
_NESTED = st.one_of(_USAGE, st.builds(lambda u, m: {**u, "usageMetadata": m}, _USAGE, _USAGE))
_VALUE = st.one_of(_NESTED, st.sampled_from([None, 0, 0.0, "", [], {}, False, 5, "x", [1], True]))
_BODY_DICT = st.dictionaries(
    st.sampled_from(["usage", "usageMetadata", "usage_metadata", "id", "output"]), _VALUE,
    max_size=3)
BODIES = st.one_of(
    _BODY_DICT.map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"not json", b"[1, 2]", b'"s"', b"{}", b"\xff\xfe",
                     b'{"usage": {"input_tokens": 3, "output_tokens": 4}, "t": "\\u0000"}',
                     b'{ "usage" : { "prompt_tokens" : 2 , "completion_tokens" : 9 } }']))


@settings(max_examples=400, deadline=None)
@given(BODIES)
def test_sqlite_counts_the_tokens_of_a_body_as_status_did(body: bytes) -> None:
    db = sqlite3.connect(":memory:")
    try:
        assert db.execute(sq.TOKENS, {"body": body}).fetchone() == body_tokens(body)
    finally:
        db.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_postgresql_counts_the_tokens_of_a_body_as_status_did(pg_dsn: str, body: bytes) -> None:
    with psycopg.connect(pg_dsn) as conn:
        if conn.execute("SELECT to_regproc('asyncbg_tokens')").fetchone() == (None,):
            anyio.run(_make_schema, pg_dsn)
        row = conn.execute("SELECT i, o FROM asyncbg_tokens(%s)", (body,)).fetchone()
    assert row == body_tokens(body)


async def _make_schema(dsn: str) -> None:
    ledger = PostgresLedger(dsn)
    await ledger.open()
    await ledger.close()


# -- random ledgers ------------------------------------------------------------------------------


def items(n: int, prefix: str) -> list[tuple[str, str, bytes]]:
    out = []
    for i in range(n):
        params = {"model": "m", "input": f"{prefix}{i}"}
        out.append((f"{prefix}{i}", digest(params), canonical(params)))
    return out


def same(fast: Overview, slow: Overview) -> None:
    """The overview from counters says what a full read says (batches in any order)."""
    assert fast.read_from == "counters"
    assert dict(fast.counts) == dict(slow.counts)
    assert (fast.resubmits, fast.input_tokens, fast.output_tokens) == (
        slow.resubmits, slow.input_tokens, slow.output_tokens)
    assert list(fast.live) == list(slow.live)
    assert list(fast.sending) == list(slow.sending)
    assert sorted(fast.batches, key=repr) == sorted(slow.batches, key=repr)


async def check(ledger: SharedLedger) -> None:
    same(await overview(ledger), from_records(await ledger.records()))
    assert [r.key for r in await live_records(ledger)] == [
        r.key for r in await ledger.records() if r.state == "live"]
    unfinished = sum(1 for r in await ledger.records() if not r.terminal)
    assert await ledger.unfinished() == unfinished


STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled", "incomplete")
OPS = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 10**6), BODIES), max_size=40)


async def play(ledger: SharedLedger, ops: list[tuple[int, int, bytes]],
               delete: Callable[[str], Awaitable[None]], step: int = 0) -> None:
    """Run ``ops`` (what a fleet does, and a deletion behind its back) on ``ledger``."""
    for n, (action, pick, body) in enumerate(ops):
        held = sorted(ledger.held())
        key = held[pick % len(held)] if held else None
        try:
            if action == 0:
                await ledger.enqueue(items(pick % 7 + 1, f"e{step}-{n}-"))
            elif action == 1:
                await ledger.acquire(pick % 9 + 1, 60.0)
            elif action == 2 and key is not None:
                await ledger.sending(key, resubmit=pick % 2 == 0)
            elif action == 3 and key is not None:  # a live response, or a batch's job
                rid = f"resp_{key}" if pick % 3 else f"batch_{pick % 4}#{key}"
                await ledger.record(key, Outcome(STATUSES[pick % 2], response_id=rid))
            elif action == 4 and key is not None:  # a final body
                rid = f"resp_{key}" if pick % 3 else f"msgbatch_{pick % 4}#{key}"
                await ledger.record(key, Outcome(STATUSES[2 + pick % 4], response_id=rid,
                                                 body=body))
            elif action == 5 and key is not None:  # ended locally: nothing paid
                await ledger.record(key, Outcome("failed", error="x", error_code="e"))
            elif action == 6:
                await ledger.requeue(held)
            elif action == 7 and held:
                await ledger.release(held[: pick % 3 + 1])
            elif action == 8:
                k, d, r = items(1, f"c{step}-{n}-")[0]
                await ledger.claim(k, d, r)
            elif action == 9:
                records = await ledger.records()
                if records:
                    gone = records[pick % len(records)].key
                    ledger.forget([gone])
                    await delete(gone)
        except LeaseLost:
            pass


def _sqlite_delete(path: Path) -> Callable[[str], Awaitable[None]]:
    async def delete(key: str) -> None:
        db = sqlite3.connect(path, timeout=10.0)
        try:
            with db:
                db.execute("DELETE FROM jobs WHERE key = ?", (key,))
        finally:
            db.close()

    return delete


def _pg_delete(dsn: str) -> Callable[[str], Awaitable[None]]:
    async def delete(key: str) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("DELETE FROM asyncbg_jobs WHERE key = %s", (key,))

    return delete


@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_a_shared_sqlite_overview_is_what_a_full_read_says(ops: list[Any]) -> None:
    async def main(path: Path) -> None:
        ledger = SharedSQLiteLedger(path, lease=60.0)
        await ledger.open()
        try:
            await play(ledger, ops, _sqlite_delete(path))
            await check(ledger)
        finally:
            ledger.forget(list(ledger.held()))
            await ledger.close()

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, Path(tmp) / "j.db")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_a_postgresql_overview_is_what_a_full_read_says(pg_dsn: str, ops: list[Any]) -> None:
    async def main() -> None:
        ledger = PostgresLedger(pg_dsn, lease=60.0)
        await ledger.open()
        try:
            await play(ledger, ops, _pg_delete(pg_dsn))
            await check(ledger)
        finally:
            ledger.forget(list(ledger.held()))
            await ledger.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the next example: empty
            conn.execute("DELETE FROM asyncbg_jobs")
            assert conn.execute("SELECT sum(resubmits), sum(input), sum(output) "
                                "FROM asyncbg_tallies").fetchone() in [(0, 0, 0), (None,) * 3]

    anyio.run(main)


@pytest.mark.asyncio
async def test_a_run_journal_overview_is_what_a_full_read_says(tmp_path: Path) -> None:
    """The journal of ``asyncbg run`` (a plain SQLiteLedger: no leases) through its own API."""
    ledger = SQLiteLedger(tmp_path / "j.db")
    await ledger.open()
    try:
        rng = random.Random(7)
        for key, dig, req in items(300, "r"):
            await ledger.claim(key, dig, req)
            roll = rng.random()
            if roll < 0.8:
                await ledger.sending(key, resubmit=roll < 0.05)
            if roll < 0.6:
                rid = f"resp_{key}" if roll < 0.4 else f"batch_{int(roll * 10)}#{key}"
                await ledger.record(key, Outcome("in_progress", response_id=rid))
            if roll < 0.3:
                body = json.dumps({"usage": {"input_tokens": rng.randrange(100),
                                             "output_tokens": rng.randrange(100)}}).encode()
                await ledger.record(key, Outcome("completed", body=body))
        same(await overview(ledger), from_records(await ledger.records()))
    finally:
        await ledger.close()


# -- upgrades, concurrent writers, the fallback -------------------------------------------------


def _bodies(rng: random.Random) -> bytes:
    return json.dumps({"usage": {"input_tokens": rng.randrange(1000),
                                 "output_tokens": rng.randrange(1000),
                                 "cache_read_input_tokens": rng.choice([None, 5])}}).encode()


def _fill_raw(execute: Callable[..., Any], param: str, n: int) -> None:
    """Rows as an older asyncbg wrote them, of every state (bodies, resubmits, live, batches)."""
    rng = random.Random(n)
    for i in range(n):
        state = rng.choice(["new", "sending", "live", "done", "local"])
        rid = (None if state in ("new", "sending") else
               rng.choice([f"resp_{i}", f"batch_{i % 3}#k{i}", f"batches/{i % 2}#k{i}"]))
        status = {"new": "pending", "sending": "pending", "live": "queued",
                  "done": "completed", "local": "failed"}[state]
        body = _bodies(rng) if state == "done" else None
        if state == "done" and i % 97 == 0:
            body = b"not JSON: the backfill takes each body on its own"
        execute(f"INSERT INTO {{jobs}} (key, digest, request, state, response_id, status, "
                f"{{body}}, resubmits, created, updated) VALUES ({', '.join([param] * 9)}, 0)",
                (f"k{i}", "d", b"r", state, rid, status, body, rng.choice([0, 0, 1, 2]),
                 float(rng.randrange(1000))))


@pytest.mark.asyncio
async def test_an_sqlite_journal_from_before_gains_its_counters_backfilled(
        tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    ledger = SQLiteLedger(path)
    await ledger.open()
    await ledger.close()
    db = sqlite3.connect(path)
    with db:  # as the previous version left it: no tallies, none of their indexes
        for name in ("jobs_live", "jobs_sending", "jobs_batched"):
            db.execute(f"DROP INDEX {name}")
        db.execute("DROP TABLE job_tallies")
        for name in ("insert", "delete", "update"):
            db.execute(f"DROP TRIGGER job_tallies_{name}")
        _fill_raw(lambda sql, args: db.execute(
            sql.format(jobs="jobs", body="response").replace("created, updated)",
                       "created, updated, seq)").replace(", 0)", ", 0, ?)"),
            (*args, int(args[0][1:]) + 1)), "?", 400)
    db.close()
    shared = SharedSQLiteLedger(path)
    await shared.open()
    try:
        await check(shared)
    finally:
        await shared.close()


#: The last PostgreSQL schema version without the tallies (the upgrade from it adds them).
BEFORE_TALLIES = next(version for version, sqls in q.UPGRADES.items()
                      if any("CREATE TABLE asyncbg_tallies" in sql for sql in sqls))
#: The last one without the token columns.
BEFORE_TOKENS = next(version for version, sqls in q.UPGRADES.items()
                     if any("ADD COLUMN input_tokens" in sql for sql in sqls))


@pytest.mark.asyncio
async def test_a_postgresql_ledger_from_before_gains_its_counters_backfilled(
        pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the schema before the tallies
        make_old_schema(conn, BEFORE_TALLIES)
        _fill_raw(lambda sql, args: conn.execute(
            sql.format(jobs="asyncbg_jobs", body="body"), args), "%s", 400)
    ledger = PostgresLedger(pg_dsn)
    await ledger.open()
    try:
        await check(ledger)
    finally:
        await ledger.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(q.READ_SCHEMA_VERSION).fetchone() == (str(q.SCHEMA_VERSION),)


@pytest.mark.asyncio
async def test_bodies_written_before_their_token_columns_keep_the_tallies_exact(
        pg_dsn: str) -> None:
    """Rows of the version before (bodies without ``input_tokens``/``output_tokens``: their
    tokens were parsed by the trigger) are taken away by parsing again when they change or go,
    while bodies written now are counted from the columns the writer filled: the tallies stay
    what a full read says through every kind of change to either."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        make_old_schema(conn, BEFORE_TOKENS)
        _fill_raw(lambda sql, args: conn.execute(
            sql.format(jobs="asyncbg_jobs", body="body"), args), "%s", 120)
    ledger = PostgresLedger(pg_dsn, lease=60.0)
    await ledger.open()
    try:
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM asyncbg_jobs WHERE body IS NOT NULL "
                                "AND input_tokens IS NULL").fetchone() != (0,)
        await check(ledger)
        rng = random.Random(7)
        await ledger.enqueue(items(30, "n"))
        for r in await ledger.acquire(100, 60.0):  # old rows among them
            await ledger.sending(r.key, resubmit=rng.random() < 0.3)
            body = rng.choice([_bodies(rng), b'{"usage": {"input_tokens": 2.5}}', b"{}",
                               b'{"usage": {"input_tokens": 3}, "x": NaN}'])
            notice = (Notice(f"n-{r.key}", "http://receiver.invalid/", b"{}")
                      if rng.random() < 0.3 else None)  # its own statement
            await ledger.record(r.key, Outcome("completed", f"resp_{r.key}", body=body,
                                               notification=notice))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            written = conn.execute("SELECT count(*) FROM asyncbg_jobs "
                                   "WHERE input_tokens IS NOT NULL").fetchone()
            assert written is not None and written[0] > 20  # the columns' path was taken
            # Old bodies and new ones go: each taken away as it was added.
            conn.execute("DELETE FROM asyncbg_jobs WHERE key IN "
                         "(SELECT key FROM asyncbg_jobs WHERE body IS NOT NULL "
                         "ORDER BY key LIMIT 40)")
            conn.execute("UPDATE asyncbg_jobs SET body = NULL WHERE key IN "
                         "(SELECT key FROM asyncbg_jobs WHERE body IS NOT NULL "
                         "ORDER BY key DESC LIMIT 10)")
        await check(ledger)
    finally:
        ledger.forget(list(ledger.held()))
        await ledger.close()


async def _busy(ledger: SharedLedger, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        for r in await ledger.acquire(5, 60.0):
            await ledger.sending(r.key, resubmit=rng.random() < 0.3)
            await ledger.record(r.key, Outcome("queued", response_id=f"resp_{r.key}"))
            if rng.random() < 0.7:
                await ledger.record(r.key, Outcome("completed", response_id=f"resp_{r.key}",
                                                   body=_bodies(rng)))
        await anyio.lowlevel.checkpoint()


@pytest.mark.asyncio
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_concurrent_writers_keep_the_overview_exact(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ledgers: list[SharedLedger] = [
        SharedSQLiteLedger(tmp_path / "j.db", lease=60.0) if store == "sqlite"
        else PostgresLedger(request.getfixturevalue("pg_dsn"), lease=60.0) for _ in range(3)]
    for ledger in ledgers:
        await ledger.open()
    try:
        await ledgers[0].enqueue(items(200, "w"))
        async with anyio.create_task_group() as tg:
            for seed, ledger in enumerate(ledgers):
                tg.start_soon(_busy, ledger, seed, 15)
        await check(ledgers[0])
    finally:
        for ledger in ledgers:
            ledger.forget(list(ledger.held()))
            await ledger.close()


@pytest.mark.asyncio
async def test_without_counters_status_reads_the_journal_whole(tmp_path: Path) -> None:
    """A file whose counters are missing (dropped, or written where they never were) is read
    the slow way, with the same answer."""
    path = tmp_path / "j.db"
    ledger = SharedSQLiteLedger(path, lease=60.0)
    await ledger.open()
    try:
        await ledger.enqueue(items(30, "f"))
        for r in await ledger.acquire(10, 60.0):
            await ledger.record(r.key, Outcome("completed", response_id=f"resp_{r.key}",
                                               body=_bodies(random.Random(1))))
        before = await overview(ledger)
        db = sqlite3.connect(path)
        with db:
            db.execute("DROP TABLE job_counts")
            db.execute("DROP TABLE job_tallies")
        db.close()
        slow = await overview(ledger)
        assert slow.read_from == "records"
        same(before, slow)
        assert await ledger.unfinished() == 20
        assert await ledger.used_by_a_fleet()
    finally:
        await ledger.close()


# -- what is read -------------------------------------------------------------------------------


def _steps(path: Path) -> int:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        count = [0]

        def step() -> int:
            count[0] += 1
            return 0

        db.set_progress_handler(step, 1)
        assert sqlite_overview(db) is not None
        db.execute(sq.UNFINISHED_COUNTED).fetchone()
        return count[0]
    finally:
        db.close()


@pytest.mark.asyncio
async def test_the_sqlite_overview_reads_the_same_at_any_size(tmp_path: Path) -> None:
    """SQLite's virtual machine steps for the whole overview do not grow with the finished and
    waiting jobs: 30 times the jobs, about the same steps (a full read: 30 times the steps)."""
    steps = []
    for n in (200, 6000):
        path = tmp_path / f"{n}.db"
        ledger = SharedSQLiteLedger(path, lease=60.0)
        await ledger.open()
        try:
            await ledger.enqueue(items(2 * n, "s"))
            for r in await ledger.acquire(10, 60.0):  # ten live, listed
                await ledger.record(r.key, Outcome("queued", response_id=f"resp_{r.key}"))
        finally:
            ledger.forget(list(ledger.held()))
            await ledger.close()
        db = sqlite3.connect(path)
        with db:  # n finished with bodies, n waiting
            db.execute("UPDATE jobs SET state = 'done', status = 'completed', response = ?, "
                       "response_id = 'resp_' || key WHERE seq > 10 AND seq <= ?",
                       (_bodies(random.Random(2)), n + 10))
        db.close()
        steps.append(_steps(path))
    assert steps[1] < steps[0] * 2, steps


def _plan_rows(node: dict[str, Any]) -> int:
    own = int(node.get("Actual Rows", 0)) + int(node.get("Rows Removed by Filter", 0))
    return own + sum(_plan_rows(child) for child in node.get("Plans", []))


@pytest.mark.asyncio
async def test_the_postgresql_overview_reads_only_the_rows_it_lists(pg_dsn: str) -> None:
    ledger = PostgresLedger(pg_dsn, lease=60.0)
    await ledger.open()
    try:
        await ledger.enqueue(items(6010, "p"))
        for r in await ledger.acquire(10, 60.0):
            await ledger.record(r.key, Outcome("queued", response_id=f"resp_{r.key}"))
        ledger.forget(list(ledger.held()))
    finally:
        await ledger.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE asyncbg_jobs SET state = 'done', status = 'completed', "
                     "body = %s, response_id = 'resp_' || key WHERE seq > 10 AND seq <= 3010",
                     (_bodies(random.Random(3)),))
        conn.execute("VACUUM ANALYZE asyncbg_jobs")
        for sql in (q.COUNTS, q.TALLIES, q.LIVE_ROWS, q.SENDING_KEYS, q.BATCH_GROUPS):
            [[plan]] = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").fetchall()
            if isinstance(plan, str):
                plan = json.loads(plan)
            # The ten live rows and the counters' few, not 6,000 jobs.
            assert _plan_rows(plan[0]["Plan"]) < 200, (sql, plan)
