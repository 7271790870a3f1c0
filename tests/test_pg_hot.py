"""Schema 8: a job's middle writes (``sending``, then its response id) change no indexed column
and are HOT updates; the partial indexes are made on stored generated columns (``waiting``,
``leased``, ``batch_id``, ``batch_status``) that change only when a job is claimed, renewed,
released or ended.

What PostgreSQL did is read from its own statistics (``pg_stat_user_tables``), not from a
clock; the upgrade from schema 7 is run over rows in every state; and the generated columns and
the reads through their indexes are held to the base columns over random ledgers (hypothesis).
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings

from asyncbg._ledgers import Outcome
from asyncbg._ledgers import _pg_queries as q
from asyncbg._ledgers._overview import body_tokens
from asyncbg._ledgers._postgres import PostgresLedger

from .pg_fixtures import make_old_schema
from .test_ledger_scale import actual_counts
from .test_status_scale import OPS, _pg_delete, check, items, play

OPEN = ("new", "sending", "live")
#: The generated columns as the base columns say they should be, row by row.
EXPECTED = f"""
    SELECT key, waiting, leased, batch_id, batch_status,
           CASE WHEN lease_until IS NULL AND state IN {OPEN} THEN state END,
           CASE WHEN state IN {OPEN} THEN lease_until END,
           CASE WHEN strpos(response_id, '#') > 0 AND right(response_id, 1) <> '#'
                THEN regexp_replace(response_id, '#[^#]*$', '') END,
           CASE WHEN strpos(response_id, '#') > 0 AND right(response_id, 1) <> '#'
                THEN status END
    FROM asyncbg_jobs ORDER BY seq
"""


def generated_columns_agree(conn: psycopg.Connection[Any]) -> None:
    for row in conn.execute(EXPECTED).fetchall():
        assert row[1:5] == row[5:9], row


async def table_stats(dsn: str, updates: int) -> tuple[int, int]:
    """(row updates, HOT ones) of asyncbg_jobs, once the statistics count ``updates`` (each
    backend reports its counts when it exits, a little after its connection closed)."""
    with anyio.fail_after(60):
        while True:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute("SELECT pg_stat_clear_snapshot()")
                cur = await conn.execute(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                    "WHERE relname = 'asyncbg_jobs'")
                row = await cur.fetchone()
            if row is not None and row[0] >= updates:
                return int(row[0]), int(row[1])
            await anyio.sleep(0.05)


@pytest.mark.asyncio
async def test_the_writes_between_a_claim_and_the_outcome_are_hot_updates(pg_dsn: str) -> None:
    """Claim, ``sending``, the response id, the outcome: four updates a job, the two in the
    middle HOT (at schema 7, none was: the state and the response id were in the indexes)."""
    jobs = 200
    ledger = PostgresLedger(pg_dsn, lease=60.0)
    await ledger.open()
    try:
        await ledger.enqueue(items(jobs, "h"))

        async def run(key: str) -> None:
            await ledger.sending(key, resubmit=False)
            await ledger.record(key, Outcome("queued", f"resp_{key}"))
            await ledger.record(key, Outcome("completed", f"resp_{key}", body=b"{}"))

        # Claimed in batches, as a worker does, but each job's writes one statement after
        # another: writes grouped at random into one statement (as a busy worker's are) leave
        # their old versions on the page until that statement commits, so how many find room
        # would depend on the machine's load (168 of 400 seen under a parallel suite).
        for _ in range(jobs // 50):
            for r in await ledger.acquire(50, 60.0):
                await run(r.key)
        assert await ledger.counts() == {("done", "completed"): jobs}
    finally:
        await ledger.close()
    updates, hot = await table_stats(pg_dsn, 4 * jobs)
    assert updates == 4 * jobs
    # Every middle write has room on its page here (fillfactor 70, pruned between statements);
    # a full page would make one a plain update, so the bound leaves some slack. Claims and
    # outcomes are never HOT.
    assert jobs <= hot <= 2 * jobs, (updates, hot)


def _fill_every_state(conn: psycopg.Connection[Any]) -> None:
    """Rows as schema 7 wrote them, in every state: waiting, held, held past their lease (a
    create in flight among them), handed back, batched, finished, with bodies whose tokens
    were written beside them and bodies from before the token columns."""
    usage = json.dumps({"usage": {"input_tokens": 11, "output_tokens": 7}}).encode()
    rows = [
        # key, state, status, response_id, owner, epoch, lease_until, sent_epoch, body, tokens
        ("new-w", "new", "pending", None, None, 0, None, None, None, None),
        ("new-h", "new", "pending", None, "w1", 1, "now+", None, None, None),
        ("new-x", "new", "pending", None, "w1", 1, 1.0, None, None, None),
        ("send-w", "sending", "pending", None, None, 2, None, 1, None, None),
        ("send-h", "sending", "pending", None, "w1", 2, "now+", 2, None, None),
        ("send-x", "sending", "pending", None, "w1", 2, 1.0, 2, None, None),
        ("live-w", "live", "queued", "resp_1", None, 1, None, 1, None, None),
        ("live-h", "live", "in_progress", "resp_2", "w1", 1, "now+", 1, None, None),
        ("live-x", "live", "queued", "resp_3", "w1", 1, 1.0, 1, None, None),
        ("live-b", "live", "in_progress", "batch_9#live-b", "w1", 1, "now+", 1, None, None),
        ("live-bw", "live", "queued", "batch_9#live-bw", None, 1, None, 1, None, None),
        ("done-p", "done", "completed", "resp_4", None, 1, None, 1, usage, None),
        ("done-t", "done", "completed", "resp_5", None, 1, None, 1, usage, (11, 7)),
        ("done-b", "done", "completed", "batch_9#done-b", None, 1, None, 1, usage, (11, 7)),
        ("done-n", "done", "failed", "resp_6", None, 1, None, 1, b"not JSON", None),
        ("local", "local", "failed", None, None, 1, None, None, None, None),
        ("half#", "live", "queued", "batch_8#", None, 1, None, 1, None, None),
    ]
    now = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()
    assert now is not None
    for i, (key, state, status, rid, owner, epoch, until, sent, body, tokens) in enumerate(rows):
        conn.execute(
            "INSERT INTO asyncbg_jobs (key, digest, request, state, status, response_id, "
            "owner, epoch, lease_until, sent_epoch, body, input_tokens, output_tokens, "
            "resubmits, created, updated) "
            "VALUES (%s, 'd', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (key, json.dumps({"model": "m", "input": key}).encode(), state, status, rid,
             owner, epoch, now[0] + 3600 if until == "now+" else until, sent, body,
             *(tokens or (None, None)), i % 3, float(i), float(i)))


@pytest.mark.asyncio
async def test_a_schema_7_ledger_upgrades_with_its_rows_counts_and_tallies(pg_dsn: str) -> None:
    columns = ("key, seq, digest, request, state, response_id, status, body, error, resubmits, "
               "created, updated, owner, epoch, lease_until, sent_epoch, input_tokens, "
               "output_tokens")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        make_old_schema(conn, 7)
        _fill_every_state(conn)
        rows = conn.execute(f"SELECT {columns} FROM asyncbg_jobs ORDER BY seq").fetchall()
        counts = actual_counts(pg_dsn)
        tallies = conn.execute(q.TALLIES).fetchone()
    # What the tallies hold is what a full read of the bodies says.
    parsed = [body_tokens(bytes(r[7])) for r in rows if r[7] is not None]
    assert tallies == (sum(r[9] for r in rows), sum(i for i, _ in parsed),
                       sum(o for _, o in parsed))

    ledger = PostgresLedger(pg_dsn, lease=60.0)
    await ledger.open()
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            assert conn.execute(q.READ_SCHEMA_VERSION).fetchone() == ("8",)
            assert conn.execute(f"SELECT {columns} FROM asyncbg_jobs ORDER BY seq"
                                ).fetchall() == rows
            assert conn.execute(q.TALLIES).fetchone() == tallies
            generated_columns_agree(conn)
            indexes = dict(conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'asyncbg_jobs'"
            ).fetchall())
            options = conn.execute("SELECT reloptions FROM pg_class "
                                   "WHERE relname = 'asyncbg_jobs'").fetchone()
        assert await ledger.counts() == counts == actual_counts(pg_dsn)
        assert set(indexes) == {
            "asyncbg_jobs_pkey", "asyncbg_jobs_seq", "asyncbg_jobs_waiting",
            "asyncbg_jobs_released", "asyncbg_jobs_leased", "asyncbg_jobs_batched"}
        for name, definition in indexes.items():  # no index names what the middle writes change
            for column in ("state", "status", "response_id", "lease_until"):
                assert f"({column}" not in definition and f" {column}" not in definition, (
                    name, definition)
        assert options == (["fillfactor=70"],)
        await check(ledger)  # status: counts, tallies, live, sending, batches

        # Claims: the live ones first (a full worker's), then everything nobody holds in
        # claim order, expired leases included; a create in flight waits out its margin,
        # long past here.
        live = await ledger.acquire(10, 60.0, live_only=True)
        assert [r.key for r in live] == ["live-w", "live-x", "live-bw", "half#"]
        rest = await ledger.acquire(10, 60.0)
        assert [r.key for r in rest] == ["new-w", "new-x", "send-w", "send-x"]
        assert await ledger.acquire(10, 60.0) == []
        for r in [*live, *rest]:
            await ledger.sending(r.key, resubmit=False)
            await ledger.record(r.key, Outcome("completed", f"resp_{r.key}", body=b"{}"))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            generated_columns_agree(conn)
        assert await ledger.counts() == actual_counts(pg_dsn)
        await check(ledger)
    finally:
        ledger.forget(list(ledger.held()))
        await ledger.close()


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_the_generated_columns_and_the_reads_through_them_agree_with_the_states(
        pg_dsn: str, ops: list[Any]) -> None:
    """Random fleets' writes: every row's generated columns are what its state, lease and
    response id say; status (from the indexes) says what a full read says; and a claim takes
    exactly the unfinished rows nobody holds, in claim order."""
    async def main() -> None:
        ledger = PostgresLedger(pg_dsn, lease=60.0)
        other = PostgresLedger(pg_dsn, lease=60.0)
        await ledger.open()
        await other.open()
        try:
            await play(ledger, ops, _pg_delete(pg_dsn))
            await ledger.release(sorted(ledger.held())[::2])
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                generated_columns_agree(conn)
                free = [key for (key,) in conn.execute(
                    f"SELECT key FROM asyncbg_jobs WHERE lease_until IS NULL "
                    f"AND state IN {OPEN} ORDER BY seq").fetchall()]
                live = [key for (key,) in conn.execute(
                    "SELECT key FROM asyncbg_jobs WHERE lease_until IS NULL "
                    "AND state = 'live' ORDER BY seq").fetchall()]
            await check(ledger)
            assert [r.key for r in await other.acquire(1000, 60.0, live_only=True)] == live
            assert [r.key for r in await other.acquire(1000, 60.0)] == [
                key for key in free if key not in live]
        finally:
            for led in (ledger, other):
                led.forget(list(led.held()))
                await led.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the next example: empty
            conn.execute("DELETE FROM asyncbg_jobs")

    anyio.run(main)


@pytest.mark.asyncio
async def test_the_dashboard_reads_a_ledger_of_either_schema(pg_dsn: str) -> None:
    """The dashboard upgrades nothing: on a schema 7 ledger it reads through the old indexes,
    and once a worker upgraded the ledger, through the new ones, with the same answers."""
    from asyncbg._dashboard._pg_source import WINDOW, WINDOW_8, PostgresSource

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        make_old_schema(conn, 7)
        _fill_every_state(conn)
    sent = ["send-h", "send-x", "live-w", "live-h", "live-x", "live-b", "live-bw", "half#"]
    live = [key for key in sent if key.startswith(("live", "half"))]
    source = PostgresSource(pg_dsn)
    await source.open()
    try:
        for version in ("7", "8"):
            if version == "8":
                ledger = PostgresLedger(pg_dsn)
                await ledger.open()  # the upgrade, while the dashboard runs
                await ledger.close()
                assert await source.counts() is not None  # looks at the schema again
            assert source._window is (WINDOW_8 if version == "8" else WINDOW)
            with psycopg.connect(pg_dsn) as conn:
                assert conn.execute(q.READ_SCHEMA_VERSION).fetchone() == (version,)
            start = await source.start(window=100)
            assert [row.key for row in start.window] == sent, version
            assert start.total == 17, version
            assert await source.live_keys() == live, version
            rows, _, _ = await source.window(limit=100, after=0)
            assert [row.key for row in rows] == sent, version
    finally:
        await source.close()
