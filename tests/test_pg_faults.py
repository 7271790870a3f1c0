"""PostgresLedger under faults, against a real PostgreSQL: cancelled calls, terminated backends,
a stuck statement, a paused backend, a restarted server, and the outbox's one-statement take.

Each failure must be a LedgerUnavailable (may pass) or a LedgerError, never a raw psycopg error
and never a hang; once the database is back, the same ledger object works again.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import psycopg
import pytest
import pytest_asyncio

from asyncbg._ledgers import LedgerError, LedgerUnavailable, Outcome, canonical, digest
from asyncbg._ledgers._outbox import Notice
from asyncbg._ledgers._postgres import PostgresLedger

from .pg_server import PostgresError, RestartableServer, restartable_postgres


def req(i: int) -> tuple[str, bytes]:
    params = {"model": "m", "input": f"x{i}"}
    return digest(params), canonical(params)


def items(n: int, prefix: str = "k") -> list[tuple[str, str, bytes]]:
    return [(f"{prefix}{i}", *req(i)) for i in range(n)]


LIVE = Outcome("in_progress", "resp_1")


@pytest_asyncio.fixture
async def ledger(pg_dsn: str) -> AsyncIterator[PostgresLedger]:
    led = PostgresLedger(pg_dsn, timeout=1.0, max_connections=2)
    await led.open()
    try:
        yield led
    finally:
        await led.close()


@contextlib.contextmanager
def admin(dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A connection of the test's own (another program using the database)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def backends(conn: psycopg.Connection[tuple[Any, ...]]) -> list[int]:
    """The server processes of every other session on this database (the ledger's)."""
    rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()").fetchall()
    return [int(row[0]) for row in rows]


def terminate(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                        "datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


# -- cancellation --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_calls_cancelled_mid_query_leave_the_pool_clean(
    ledger: PostgresLedger, pg_dsn: str
) -> None:
    await ledger.enqueue(items(20))
    [*taken] = await ledger.acquire(20, 30.0)
    with admin(pg_dsn) as other, other.transaction():
        # Every statement on asyncbg_jobs now waits on the server for this lock.
        other.execute("LOCK TABLE asyncbg_jobs IN ACCESS EXCLUSIVE MODE")
        for i in range(12):
            with anyio.move_on_after(0.05) as scope:
                if i % 3 == 0:
                    await ledger.records()
                elif i % 3 == 1:
                    await ledger.record(taken[i].key, LIVE)
                else:
                    await ledger.claim(f"new{i}", *req(i))
            assert scope.cancelled_caught  # cancelled while the statement waited
    # Cancellations at every other point of a call's life too: before, during, after it.
    for i in range(40):
        with anyio.move_on_after(i * 0.0005):
            await ledger.get(f"k{i % 20}")
    for i in range(300):
        record = await ledger.get(f"k{i % 20}")
        assert record is not None and record.key == f"k{i % 20}"
    # A claim cancelled while it waited may still have been committed by the server once the
    # lock went (psycopg closes the connection; the statement is not taken back): nothing else.
    assert {r.key for r in await ledger.records()} - {f"new{i}" for i in range(12)} == {
        f"k{i}" for i in range(20)}
    stats = ledger._pool.get_stats() if ledger._pool else {}
    assert stats.get("pool_size", 0) <= 2  # closed connections were replaced, none leaked


# -- connections dropped by the server ----------------------------------------------------------


@pytest.mark.asyncio
async def test_terminated_backends_are_replaced_without_an_error(
    ledger: PostgresLedger, pg_dsn: str
) -> None:
    await ledger.enqueue(items(10))
    with admin(pg_dsn) as other:
        for _ in range(3):
            assert await ledger.get("k1") is not None  # the pool's connections are in use
            assert terminate(other) >= 1
            # The next call finds its connection dead, replaces it and runs on a fresh one.
            assert len(await ledger.records()) == 10
            await ledger.renew(list(ledger.held()), 30.0)


@pytest.mark.asyncio
async def test_backends_terminated_mid_use_fail_calls_only_as_unavailable(
    ledger: PostgresLedger, pg_dsn: str
) -> None:
    await ledger.enqueue(items(50))
    records = await ledger.acquire(50, 30.0)
    failures: list[BaseException] = []
    done = 0

    async def busy() -> None:
        nonlocal done
        for i in range(250):
            record = records[i % 50]
            try:
                if i % 2:
                    await ledger.record(record.key, LIVE)
                else:
                    await ledger.get(record.key)
            except LedgerError as exc:
                failures.append(exc)
            done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(busy)
        with admin(pg_dsn) as other:
            for _ in range(6):
                await anyio.sleep(0.02)
                terminate(other)
    assert done == 750
    assert all(isinstance(exc, LedgerUnavailable) for exc in failures), failures
    assert len(failures) < 40, failures  # most calls ride it out on a fresh connection
    for record in records:  # and the same object goes on working
        await ledger.record(record.key, LIVE)
    assert {r.state for r in await ledger.records()} == {"live"}


# -- stuck statements ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_stuck_statement_times_out_while_renewals_go_through(
    ledger: PostgresLedger, pg_dsn: str
) -> None:
    await ledger.enqueue(items(10))
    [a, b, *rest] = await ledger.acquire(10, 30.0)
    events: list[str] = []
    errors: list[BaseException] = []

    async def stuck(key: str) -> None:
        try:
            await ledger.record(key, LIVE)
        except LedgerError as exc:
            errors.append(exc)
        events.append("stuck call ended")

    with admin(pg_dsn) as other, other.transaction():
        other.execute("SELECT 1 FROM asyncbg_jobs WHERE key = ANY(%s) FOR UPDATE",
                      ([a.key, b.key],))
        async with anyio.create_task_group() as tg:
            tg.start_soon(stuck, a.key)  # both connections of the pool wait on the row lock
            tg.start_soon(stuck, b.key)
            await anyio.sleep(0.1)
            lost = await ledger.renew([r.key for r in rest], 30.0)
            events.append("renewed")
    assert lost == set()
    assert events == ["renewed", "stuck call ended", "stuck call ended"]
    assert len(errors) == 2
    for exc in errors:
        assert isinstance(exc, LedgerUnavailable) and "did not finish within 1 s" in str(exc)
    await ledger.record(a.key, LIVE)  # the lock is gone: the same connections work again
    assert (await ledger.get(a.key)) is not None


@pytest.mark.asyncio
async def test_a_paused_server_process_is_a_timeout_not_a_hang(
    ledger: PostgresLedger, pg_dsn: str
) -> None:
    with admin(pg_dsn) as other:
        await ledger.enqueue(items(3))
        pids = backends(other)
    assert pids
    for pid in pids:  # idle backends holding no lock: SIGSTOP stops nobody else
        os.kill(pid, signal.SIGSTOP)
    try:
        with anyio.fail_after(10):  # the ledger's own bound is 2 s
            with pytest.raises(LedgerUnavailable, match="did not answer within 2 s"):
                await ledger.records()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert len(await ledger.records()) == 3


# -- a restarted server ---------------------------------------------------------------------------


T = TypeVar("T")


@pytest.fixture(scope="module")
def restartable() -> Iterator[RestartableServer]:
    """A server of this module's own: the tests stop it, and leave it running again."""
    try:
        with restartable_postgres() as server:
            yield server
    except PostgresError as exc:  # pragma: no cover - the shared server's fixture says why
        pytest.skip(f"no PostgreSQL server of its own: {exc}")


async def settled(call: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """``call()`` once the server answers again: LedgerUnavailable is retried, bounded."""
    with anyio.fail_after(timeout):
        while True:
            try:
                return await call()
            except LedgerUnavailable:
                await anyio.sleep(0.1)


async def until_it_works(ledger: PostgresLedger, timeout: float = 30.0) -> int:
    """Call the ledger until a call succeeds (the server is coming back); the failures seen."""
    failures = 0
    with anyio.fail_after(timeout):
        while True:
            try:
                await ledger.records()
            except LedgerUnavailable:
                failures += 1
            else:
                return failures


@pytest.mark.asyncio
async def test_a_restarted_server_is_waited_out_by_the_same_ledger(
    restartable: RestartableServer,
) -> None:
    ledger = PostgresLedger(restartable.dsn, timeout=1.0, max_connections=2)
    await ledger.open()
    try:
        await ledger.enqueue(items(5))
        taken = await ledger.acquire(5, 30.0)
        await ledger.renew([r.key for r in taken], 30.0)
        restartable.stop()
        with anyio.fail_after(10):  # every call fails as unavailable, within its bound
            for call in (ledger.records(), ledger.renew(list(ledger.held()), 30.0),
                         ledger.record(taken[0].key, LIVE)):
                with pytest.raises(LedgerUnavailable):
                    await call
        restartable.start()
        await until_it_works(ledger)
        # The pool refills its connections meanwhile: a call may still wait for one (bounded).
        await settled(lambda: ledger.record(taken[0].key, LIVE))  # the lease survived: a row
        assert await settled(lambda: ledger.renew(list(ledger.held()), 30.0)) == set()
        assert (await ledger.get(taken[0].key)).state == "live"  # type: ignore[union-attr]
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_server_down_at_open_is_unavailable_with_the_password_hidden(
    restartable: RestartableServer,
) -> None:
    url = restartable.dsn.replace("postgres@", "postgres:hunter2@")
    restartable.stop(fast=False)
    try:
        ledger = PostgresLedger(url, timeout=1.0, connect_timeout=1.0)
        with anyio.fail_after(10), pytest.raises(LedgerUnavailable) as info:
            await ledger.open()
    finally:
        restartable.start()
    assert "hunter2" not in str(info.value) and "postgres:***@" in str(info.value)


# -- the outbox ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_outbox_never_deletes_and_re_leases_one_row_in_one_statement(
    ledger: PostgresLedger,
) -> None:
    """take_deliveries(done=...) deletes what was delivered and leases more in one statement;
    a delivered row whose lease ran out meanwhile must be deleted, not leased again."""
    await ledger.enqueue(items(3))
    records = await ledger.acquire(3, 30.0)
    for i, record in enumerate(records):
        notice = Notice(id=f"n{i}", url="http://hook", body=b"{}")
        await ledger.record(record.key, Outcome("completed", f"resp_{i}", body=b"{}",
                                                notification=notice))
    for i in range(3):
        await anyio.sleep(0.01)  # the last call's 1 ms leases have run out: all are takeable
        taken = await ledger.take_deliveries("http://hook", 3, owner="me", lease=0.001)
        assert f"n{i}" in {d.id for d in taken}
        await anyio.sleep(0.01)  # the leases run out while it is being posted
        again = await ledger.take_deliveries("http://hook", 3, owner="me", lease=0.001,
                                             done=[f"n{i}"])
        assert f"n{i}" not in {d.id for d in again}  # delivered: never posted again
        assert f"n{i}" not in {d.id for d in await ledger.deliveries()}
