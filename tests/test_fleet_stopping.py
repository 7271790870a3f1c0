"""A worker told to stop while its SQLite ledger is locked by another program says what it waits
for, waits a bounded time, and leaves at once on a second signal, losing nothing.

The fault is real: another connection (the worker runs in a process of its own) holds the
ledger's write lock with ``BEGIN IMMEDIATE``, so every write of the worker's meets SQLite's busy
wait, which runs in a worker thread that nothing cancels. The creates are held at the fake
server's door until the lock is taken, so that they are answered while nothing can be recorded.
The fake counts creates per ``custom_id``.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import anyio
import pytest

from asyncbg._fleet import enqueue_requests
from asyncbg._ledgers import LedgerUnavailable
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

from .conftest import HttpFake
from .test_fleet_rescue import (
    N,
    creates_per_line,
    env_for,
    finished,
    kept_lines,
    lines,
    until,
    worker,
)


async def submitted(db: Path) -> None:
    setup = SharedSQLiteLedger(db)
    await setup.open()
    try:
        await enqueue_requests(setup, lines())
    finally:
        await setup.close()


@pytest.mark.asyncio
async def test_a_worker_on_a_locked_ledger_says_what_it_waits_for_and_leaves_on_a_second_signal(
    http_fake: HttpFake, tmp_path: Path,
) -> None:
    """SIGTERM: one line says what the exit waits for (the lock, the responses not recorded)
    and that a second signal leaves at once; the second one does (the busy waits, 5 s each,
    one after another, held it about 25 s whatever came). The ids go to the rescue file, and
    the next worker adopts them: each line is created once."""
    db = tmp_path / "fleet.db"
    await submitted(db)
    env = env_for(http_fake, tmp_path / "state")
    locker = sqlite3.connect(db, isolation_level=None, timeout=30)
    err = ""
    try:
        http_fake.gate.shut()
        proc = await worker(str(db), env, "--db-patience", "120")
        assert proc.stderr is not None
        stderr = proc.stderr

        async def read() -> None:
            nonlocal err
            async for chunk in stderr:
                err += chunk.decode()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await until(lambda: http_fake.gate.waiting == N)
                locker.execute("BEGIN IMMEDIATE")  # another program writing
                http_fake.gate.open()
                await until(lambda: http_fake.server.counters.creates == N)
                proc.send_signal(signal.SIGTERM)
                await until(lambda: "interrupt again" in err, within=30)
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(15):  # a hang guard (it took 27 s, second signal or not)
                    code = await proc.wait()
                    still_locked = locker.in_transaction
        finally:
            if proc.returncode is None:
                proc.kill()
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
    assert code == 128 + signal.SIGTERM, err
    assert still_locked  # it left with the ledger still locked: nothing let it go
    said = [line for line in err.splitlines() if line.startswith("asyncbg: ")]
    companion = tmp_path / "fleet.db.unrecorded"
    assert said[0].startswith("asyncbg: SIGTERM: stopping;"), err
    assert said[1].startswith(f"asyncbg: {db} is locked by another program writing to it: "
                              "waiting up to "), err
    assert said[1].endswith(f"interrupt again to leave at once: the ids of responses created "
                            f"and not recorded go to {companion} for the next worker on this "
                            "machine to adopt, and the leases run out by themselves"), err
    assert said[2].startswith("asyncbg: SIGTERM again: leaving now;"), err
    assert len(said) == 3, err  # said once
    assert f"{N} response ids kept in {companion}" in err.strip().splitlines()[-1], err
    assert sorted(k["key"] for k in kept_lines(companion)) == [f"r{i}" for i in range(N)]
    # The next worker adopts them and polls them to their end: nothing is created again.
    code, err = await finished(await worker(str(db), env, "--exit-when-idle"))
    assert code == 0, err
    assert f"adopted={N}" in err and "duplicates=0" in err, err
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(N)}
    check = SharedSQLiteLedger(db)
    await check.open()
    try:
        assert [r.status for r in await check.records()] == ["completed"] * N
    finally:
        await check.close()


@pytest.mark.asyncio
async def test_a_write_waiting_for_a_lock_gives_up_when_told(tmp_path: Path) -> None:
    """The ledger's wait for another program's write lock runs in a worker thread; given up
    (a worker leaving), it ends within a slice of SQLite's wait instead of running its 5 s,
    and every wait after it fails at once while the file stays locked."""
    db = tmp_path / "fleet.db"
    await submitted(db)
    ledger = SharedSQLiteLedger(db)
    await ledger.open()
    locker = sqlite3.connect(db, isolation_level=None, timeout=30)
    errors: list[str] = []
    try:
        locker.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            async def write() -> None:
                with pytest.raises(LedgerUnavailable) as raised:
                    await ledger.requeue_unpaid()
                errors.append(str(raised.value))

            tg.start_soon(write)
            await until(lambda: ledger.locked)  # it waits for the lock
            ledger.give_up_waits(0)
        with pytest.raises(LedgerUnavailable) as raised:
            await ledger.requeue_unpaid()  # still locked: no wait at all now
        errors.append(str(raised.value))
        locker.execute("ROLLBACK")
        assert await ledger.requeue_unpaid() == 0  # free again: a write goes through
        assert not ledger.locked
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
        await ledger.close()
    assert "is locked by another program writing to it" in errors[0], errors
    assert "(waited 5 s)" not in errors[0], errors  # given up, not waited out
    assert "(waited 5 s)" not in errors[1], errors


@pytest.mark.asyncio
async def test_an_outbox_write_waits_for_the_lock_as_the_ledgers_writes_do(
    tmp_path: Path,
) -> None:
    """The ledger's writes wait for another program's lock in slices of 0.1 s, up to 5 s; the
    outbox's single statements shared the connection's 0.1 s and failed at the first slice.
    Now they wait too (the lock is let go once the write has met it), and a leaving manager's
    :meth:`leave_now` gives the journal's waits up, as a worker's second signal does."""
    from openai import AsyncOpenAI

    import asyncbg

    db = tmp_path / "fleet.db"
    await submitted(db)
    ledger = SharedSQLiteLedger(db)
    await ledger.open()
    locker = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        locker.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(ledger.deliveries_done, ["n1"])  # waits while the file is locked
            await until(lambda: ledger.locked)
            locker.execute("ROLLBACK")  # let go: the write goes through
        assert not ledger.locked

        client = AsyncOpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")
        async with asyncbg.BackgroundManager(client, journal=ledger) as mgr:
            locker.execute("BEGIN IMMEDIATE")
            async with anyio.create_task_group() as tg:
                async def write() -> None:
                    with pytest.raises(LedgerUnavailable) as raised:
                        await ledger.requeue_unpaid()
                    assert "(waited 5 s)" not in str(raised.value)  # given up, not waited out

                tg.start_soon(write)
                await until(lambda: ledger.locked)
                mgr.leave_now()
            locker.execute("ROLLBACK")
        await client.close()
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
        await ledger.close()
