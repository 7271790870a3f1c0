"""The journal under a re-attach of many batch jobs: claims answered from records read ahead,
and concurrent writes carried together to the worker thread, with every call's outcome (and
error) its own. What made re-attaching 10,000 jobs take 37 s (two thread trips per job)."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from asyncbg import JobStatus
from asyncbg._ledgers._base import ClaimOutcome, Outcome, digest
from asyncbg._ledgers._hops import Hops
from asyncbg._ledgers._sqlite import SQLiteLedger

pytestmark = pytest.mark.asyncio

N = 600


async def _recorded(path: Path) -> None:
    """A journal of N keys: the first half done, the rest live."""
    ledger = SQLiteLedger(path)
    await ledger.open()

    async def one(i: int) -> None:
        key = f"k{i}"
        await ledger.sending(key, resubmit=False)
        status = JobStatus.COMPLETED if i < N // 2 else JobStatus.IN_PROGRESS
        await ledger.record(key, Outcome(status.value, f"batch_1#{key}",
                                         b"{}" if status.terminal else None))

    try:
        for i in range(N):  # in order: claim order is what a rerun follows
            await ledger.claim(f"k{i}", digest({"i": i}), b'{"i":%d}' % i)
        async with anyio.create_task_group() as tg:
            for i in range(N):
                tg.start_soon(one, i)
    finally:
        await ledger.close()


async def test_a_rerun_s_claims_are_read_ahead_and_answer_as_the_file_says(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.journal"
    await _recorded(path)
    ledger = SQLiteLedger(path)
    await ledger.open()
    try:
        trips = ledger._hops.trips
        outcomes = []
        for i in range(N):
            claim = await ledger.claim(f"k{i}", digest({"i": i}), b'{"i":%d}' % i)
            assert claim.record.response_id == f"batch_1#k{i}"
            outcomes.append(claim.outcome)
        # 600 claims: a handful of trips (one per 256 read ahead), not 600.
        assert ledger._hops.trips - trips <= 5
        assert outcomes == ([ClaimOutcome.DONE] * (N // 2)
                            + [ClaimOutcome.RESUME] * (N - N // 2))
        # A different request under a recorded key is still a mismatch, read ahead or not.
        await ledger.claim("k0", digest({"i": 0}), b'{"i":0}')  # reads k1.. ahead
        assert (await ledger.claim("k1", digest({"i": -1}), b"{}")).outcome is \
            ClaimOutcome.MISMATCH
        # A key written since it was read ahead is claimed from the file.
        await ledger.claim("k300", digest({"i": 300}), b'{"i":300}')
        await ledger.record("k301", Outcome("completed", "batch_1#k301", b"{}"))
        assert (await ledger.claim("k301", digest({"i": 301}), b"{}")).outcome is \
            ClaimOutcome.DONE
    finally:
        await ledger.close()


async def test_concurrent_writes_share_trips_and_each_keeps_its_own_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.journal"
    ledger = SQLiteLedger(path)
    await ledger.open()
    try:
        for i in range(200):
            await ledger.claim(f"k{i}", digest({"i": i}), b"{}")
            await ledger.sending(f"k{i}", resubmit=False)
        errors: list[str] = []

        async def record(key: str) -> None:
            try:
                await ledger.record(key, Outcome("completed", f"b#{key}", b"{}"))
            except KeyError:
                errors.append(key)

        trips = ledger._hops.trips
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(record, f"k{i}")
            tg.start_soon(record, "never-claimed")  # a bug of the caller's: its error only
        assert errors == ["never-claimed"]
        assert ledger._hops.trips - trips <= 10  # 201 writes, not 201 trips
        records = {r.key: r for r in await ledger.records()}
        assert all(records[f"k{i}"].state == "done" for i in range(200))
    finally:
        await ledger.close()


async def test_a_write_cancelled_before_its_trip_is_withdrawn(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "run.journal")
    await ledger.open()
    try:
        await ledger.claim("a", digest({}), b"{}")
        await ledger.claim("b", digest({}), b"{}")
        await ledger.sending("b", resubmit=False)

        def slow(db: object) -> None:
            time.sleep(0.05)  # in the worker thread: holds the trip

        async with anyio.create_task_group() as tg:
            tg.start_soon(ledger._call, slow)
            await anyio.sleep(0.01)  # the slow call is in its trip
            with anyio.move_on_after(0.01):
                await ledger.sending("a", resubmit=False)  # waits for the next trip: withdrawn
            await ledger.record("b", Outcome("completed", "b#b", b"{}"))  # the next trip
        by_key = {r.key: r for r in await ledger.records()}
        assert by_key["a"].state == "new"  # the withdrawn write never ran
        assert by_key["b"].state == "done"
    finally:
        await ledger.close()


async def test_a_carrier_cancelled_before_its_trip_hands_the_waiting_calls_on() -> None:
    limiter = anyio.CapacityLimiter(1)
    hops: Hops[list[str]] = Hops(limiter)
    ran: list[str] = []
    scopes = {name: anyio.CancelScope() for name in ("c", "w")}

    async def call(name: str) -> None:
        with scopes.get(name, anyio.CancelScope()):
            await hops.call(ran, lambda r: r.append(name))

    await limiter.acquire()  # the thread is busy: every carrier waits for it
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "c")  # carries its own call, waiting for the thread
            await anyio.sleep(0.01)
            tg.start_soon(call, "w")
            tg.start_soon(call, "x")
            await anyio.sleep(0.01)
            scopes["c"].cancel()  # w takes over, carrying w and x, waiting for the thread
            await anyio.sleep(0.01)
            scopes["w"].cancel()  # x must take over: nobody else is left to carry it
            await anyio.sleep(0.01)
            limiter.release()
    assert ran == ["x"]
