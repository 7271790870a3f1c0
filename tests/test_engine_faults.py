"""The engine under faults: each defect of the engine issue, shown by a test that failed before.

Every test here bounds its waits (``anyio.fail_after``) far above what the fixed engine needs, so
that a regression shows up as a failure rather than a hang, and none depends on how fast the
machine is.
"""

from __future__ import annotations

import gc
import sqlite3
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI

import asyncbg
from asyncbg import JobStatus, LedgerUnavailable, ManagerStateError
from asyncbg._engine._life import MOVES, Entry, IllegalMove, Stage, move
from asyncbg._ledgers import MemoryLedger
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client
from tests.conftest import FAST_POLL, manager, meta
from tests.engine_driver import ChaosLedger

pytestmark = pytest.mark.asyncio


class FlakyLedger(ChaosLedger):
    """A MemoryLedger whose writes fail with LedgerUnavailable while ``down`` is set."""

    @property
    def failed_writes(self) -> int:
        return self.failures


async def eventually(check: Callable[[], bool], *, within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110 - state of the fake server, which has no event
            await anyio.sleep(0.005)


def zeroed(mgr: asyncbg.BackgroundManager) -> dict[str, int]:
    return {k: v for k, v in mgr._scheduler.in_use().items() if v}


# -- the state machine --------------------------------------------------------------------------


async def test_the_table_refuses_a_move_it_does_not_list() -> None:
    entry = Entry(asyncbg.Job(None, "k"), {}, FAST_POLL, 1.0, None)  # type: ignore[arg-type]
    move(entry, Stage.CREATING)
    move(entry, Stage.LIVE)
    with pytest.raises(IllegalMove, match="LIVE -> WAITING"):
        move(entry, Stage.WAITING)
    move(entry, Stage.ENDED)
    assert MOVES[Stage.ENDED] == frozenset()
    with pytest.raises(IllegalMove):
        move(entry, Stage.LIVE)


# -- paid work is never recorded wrong ----------------------------------------------------------


async def test_a_ledger_down_while_a_response_completes_keeps_it_completed(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    ledger = FlakyLedger()
    async with manager(client, journal=ledger) as mgr:
        job = await mgr.submit(key="k", model="m", input="x", metadata=meta(0.1))
        await job.wait_accepted(timeout=10)
        ledger.down = True  # the terminal write fails for a while
        await eventually(lambda: ledger.failed_writes >= 3)
        assert not job.done  # not reported done before the ledger has it
        ledger.down = False
        await job.wait(timeout=10)
    assert job.status is JobStatus.COMPLETED and (await job.result()).output_text == "echo: x"
    record = await ledger.get("k")
    assert record is not None and record.state == "done" and record.status == "completed"
    creates = server.counters.creates
    async with manager(client, journal=ledger) as mgr:  # a rerun is served, nothing created
        again = await mgr.submit(key="k", model="m", input="x", metadata=meta(0.1))
    assert again.status is JobStatus.COMPLETED and server.counters.creates == creates
    assert zeroed(mgr) == {}


async def test_a_real_sqlite_lock_past_the_busy_timeout_is_waited_out(
    client: AsyncOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("asyncbg._ledgers._sqlite._BUSY_TIMEOUT", 0.05)
    db = tmp_path / "j.db"
    locked = threading.Event()
    release = threading.Event()

    def hold_the_lock() -> None:
        con = sqlite3.connect(db, timeout=5)
        con.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(10)
        con.rollback()
        con.close()

    async with manager(client, journal=db) as mgr:
        job = await mgr.submit(key="k", model="m", input="x", metadata=meta(0.2))
        await job.wait_accepted(timeout=10)
        thread = threading.Thread(target=hold_the_lock)
        thread.start()
        await anyio.to_thread.run_sync(locked.wait)
        await anyio.sleep(0.5)  # the job completes on the server meanwhile; writes fail
        assert not job.done
        release.set()
        await job.wait(timeout=10)
        thread.join()
    assert job.status is JobStatus.COMPLETED
    con = sqlite3.connect(db)
    assert con.execute("SELECT status FROM jobs").fetchall() == [("completed",)]
    con.close()


async def test_a_ledger_down_past_patience_stops_leaving_recorded_responses_running(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    ledger = FlakyLedger()
    with pytest.raises(LedgerUnavailable, match=r"could not be written for 0\.[3-9] s"):
        async with manager(client, journal=ledger, ledger_patience=0.3) as mgr:
            live = await mgr.submit(key="live", model="m", input="x", metadata=meta(30))
            await live.wait_accepted(timeout=10)
            ledger.down = True
            await mgr.submit(key="later", model="m", input="y", metadata=meta(30))
            await anyio.sleep(30)  # the manager stops this block
    assert server.counters.creates == 1  # "later" was never sent: its sending write failed
    assert server.counters.cancels == 0  # the recorded one is left running for a rerun
    record = await ledger.get("live")
    assert record is not None and record.state == "live"


def _down_after_sending(ledger: Any) -> None:
    """From the first ``sending`` write on, the ledger is down: the create leaves, and the
    write of its response id fails."""
    original = ledger.sending

    async def sending_then_down(key: str, *, resubmit: bool) -> None:
        await original(key, resubmit=resubmit)
        ledger.down = True

    ledger.sending = sending_then_down


async def test_an_unrecorded_response_is_held_past_patience_until_the_ledger_takes_it(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    ledger = FlakyLedger()
    _down_after_sending(ledger)
    async with manager(client, journal=ledger, ledger_patience=0.05) as mgr:
        job = await mgr.submit(key="k", model="m", input="x", metadata=meta(0.05))
        # Far past patience (backoff 0.05, 0.1, 0.2, ... s): a stop would have come by now.
        await eventually(lambda: ledger.failed_writes >= 6, within=30)
        assert not job.done and job.response_id is None  # not known before it is recorded
        ledger.down = False
        await job.wait(timeout=10)
    assert job.status is JobStatus.COMPLETED
    record = await ledger.get("k")
    assert record is not None and record.state == "done"
    assert server.counters.creates == 1 and server.counters.cancels == 0


class _FailingWrites:
    """An SQLite journal whose ``record`` writes fail (LedgerUnavailable) while ``down``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from asyncbg._ledgers._sqlite import SQLiteLedger

        self.down = False
        self.failed_writes = 0
        record, sending = SQLiteLedger.record, SQLiteLedger.sending

        async def failing_record(ledger: SQLiteLedger, key: str, outcome: Any) -> None:
            if self.down:
                self.failed_writes += 1
                raise LedgerUnavailable(f"{ledger.location}: the disk is full")
            await record(ledger, key, outcome)

        async def sending_then_down(ledger: SQLiteLedger, key: str, *, resubmit: bool) -> None:
            await sending(ledger, key, resubmit=resubmit)
            self.down = True

        monkeypatch.setattr(SQLiteLedger, "record", failing_record)
        monkeypatch.setattr(SQLiteLedger, "sending", sending_then_down)


async def test_leaving_with_an_unrecorded_response_keeps_its_id_and_the_next_run_reattaches(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncbg._ledgers._sqlite import SQLiteLedger

    db = tmp_path / "j.db"
    faults = _FailingWrites(monkeypatch)
    caught: list[BaseException] = []

    async def run_until_cancelled() -> None:
        try:
            async with manager(client, journal=SQLiteLedger(db, exclusive=True),
                               ledger_patience=0.05, exit_grace=0.2,
                               cancel_on_exit=False) as mgr:
                await mgr.submit(key="k", model="m", input="x", metadata=meta(0.5))
                await anyio.sleep_forever()
        except BaseException as exc:
            caught.append(exc)
            raise

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_until_cancelled)
            await eventually(lambda: faults.failed_writes >= 6, within=30)  # past patience
            tg.cancel_scope.cancel()  # the application leaves (Ctrl-C, say)
    assert caught and isinstance(caught[0], anyio.get_cancelled_exc_class())
    assert server.counters.creates == 1 and server.counters.cancels == 0  # left running
    kept = (tmp_path / "j.db.unrecorded").read_bytes().rstrip(b"\0")
    assert kept.count(b'"key": "k"') == 1
    faults.down = False  # the disk has room again
    async with manager(client, journal=SQLiteLedger(db, exclusive=True)) as mgr:
        again = await mgr.submit(key="k", model="m", input="x", metadata=meta(0.5))
        await again.wait(timeout=10)
    assert again.status is JobStatus.COMPLETED and server.counters.creates == 1
    assert mgr.statistics().possible_duplicates == 0
    assert not (tmp_path / "j.db.unrecorded").exists()  # emptied, and removed on close


async def test_the_kept_ids_survive_a_torn_line_a_symlink_and_a_full_reservation(
    tmp_path: Path,
) -> None:
    from asyncbg._ledgers._rescue import RESERVE, Rescue

    rescue = Rescue(tmp_path / "j.db")
    assert rescue.read() == [] and rescue.path == tmp_path / "j.db.unrecorded"
    rescue.reserve()
    assert rescue.path.stat().st_size == RESERVE and rescue.read() == []
    rescue.keep([("a", "resp_a")])
    rescue.keep([("b", "resp_b"), ("c", "resp_c")])  # after the first, not over it
    with rescue.path.open("r+b") as f:  # a crash in the middle of a line
        f.seek(len(rescue.path.read_bytes().rstrip(b"\0")))
        f.write(b'{"key": "d", "resp')
    assert rescue.read() == [("a", "resp_a"), ("b", "resp_b"), ("c", "resp_c")]
    assert rescue.path.stat().st_size == RESERVE  # written over the zeros
    rescue.clear()
    assert rescue.read() == [] and rescue.path.stat().st_size == RESERVE
    rescue.release()
    assert not rescue.path.exists()
    rescue.keep([("e", "resp_e")] * 2000)  # past the reservation: written all the same
    assert len(rescue.read()) == 2000
    rescue.release()
    assert rescue.path.exists()  # it keeps ids: never removed
    rescue.path.unlink()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    rescue.path.symlink_to(target)
    with pytest.raises(OSError):
        rescue.keep([("a", "resp_a")])
    assert target.read_bytes() == b""  # a symlink is not followed


async def test_a_bug_is_internal_error_and_never_recorded(
    client: AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = MemoryLedger()
    from asyncbg._engine import _scheduler

    async with manager(client, journal=ledger) as mgr:
        job = await mgr.submit(key="k", model="m", input="x", metadata=meta(5))
        await job.wait_accepted(timeout=10)

        def broken(*_: Any, **__: Any) -> None:
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr(_scheduler.Scheduler, "_poll", broken)
        await job.wait(timeout=10)
    assert job.status is JobStatus.FAILED and job.error_code == "internal_error"
    record = await ledger.get("k")
    assert record is not None and record.state == "live"  # a rerun re-attaches


# -- hangs --------------------------------------------------------------------------------------


async def test_leaving_returns_when_a_callback_submits_while_another_job_runs(
    client: AsyncOpenAI,
) -> None:
    held: list[asyncbg.Job] = []
    with anyio.fail_after(20):
        async with manager(client) as mgr:
            async def follow_up(job: asyncbg.Job) -> None:
                held.append(await mgr.submit(key=f"after-{job.key}", model="m", input="y",
                                             metadata=meta(0.05)))

            first = await mgr.submit(key="fast", model="m", input="x", metadata=meta(0.01))
            first.add_done_callback(follow_up)
            held.append(await mgr.submit(key="slow", model="m", input="x", metadata=meta(0.3)))
    assert [j.status for j in held] == [JobStatus.COMPLETED] * 2


async def test_wait_any_and_as_completed_raise_for_a_detached_job(client: AsyncOpenAI) -> None:
    raised: list[BaseException] = []
    with pytest.raises(RuntimeError, match="leave"):
        async with manager(client, journal=MemoryLedger(), cancel_on_exit=False) as mgr:
            job = await mgr.submit(key="o", model="m", input="x", metadata=meta(30))
            await job.wait_accepted(timeout=10)

            async def waiter() -> None:
                try:
                    await mgr.wait_any([job], timeout=10)
                except ManagerStateError as exc:
                    raised.append(exc)

            assert mgr._tg is not None
            mgr._tg.start_soon(waiter)
            await anyio.sleep(0.05)
            raise RuntimeError("leave")
    assert job.detached and not job.done
    with anyio.fail_after(5), pytest.raises(ManagerStateError):
        await mgr.wait_any([job])
    with anyio.fail_after(5), pytest.raises(ManagerStateError):
        async for _ in mgr.as_completed([job]):
            pass


async def test_the_pacer_recovers_after_many_failed_creates(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("500", route="create", times=24)  # two attempts of each of 12 jobs
    async with manager(client, retry_policy=asyncbg.RetryPolicy(max_attempts=2, base=0.001,
                                                                max_backoff=0.002)) as mgr:
        failed = [await mgr.submit(model="m", input="x") for _ in range(12)]
        await mgr.wait_all(failed, timeout=20)
        assert [j.status for j in failed] == [JobStatus.FAILED] * 12, [j.error for j in failed]
        later = [await mgr.submit(model="m", input="x", metadata=meta(0.01)) for _ in range(6)]
        await mgr.wait_all(later, timeout=20)
    assert all(j.status is JobStatus.COMPLETED for j in later)
    assert zeroed(mgr) == {}
    assert mgr.meter.pacer.statistics().in_flight == 0


async def test_the_pacer_recovers_after_creates_that_raise_unexpectedly(
    client: AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with manager(client) as mgr:
        real = mgr.provider.create
        calls = {"n": 0}

        async def create(params: Any, *, key: str | None = None) -> Any:
            calls["n"] += 1
            if calls["n"] <= 8:  # twice the slow-start window
                raise ValueError("the SDK raised something nobody expected")
            return await real(params, key=key)

        monkeypatch.setattr(mgr.provider, "create", create)
        broken = [await mgr.submit(model="m", input="x") for _ in range(8)]
        await mgr.wait_all(broken, timeout=20)
        assert {j.error_code for j in broken} == {"internal_error"}
        later = [await mgr.submit(model="m", input="x", metadata=meta(0.01)) for _ in range(6)]
        await mgr.wait_all(later, timeout=20)
    assert all(j.status is JobStatus.COMPLETED for j in later)
    assert zeroed(mgr) == {}


async def test_cancel_of_a_job_another_process_runs_returns(
    server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "shared.db"
    owner_client, follower_client = fake_client(server), fake_client(server)
    owner_ledger = SharedSQLiteLedger(db, lease=5.0)
    follower_ledger = SharedSQLiteLedger(db, lease=5.0)
    try:
        async with manager(owner_client, journal=owner_ledger) as owner:
            running = await owner.submit(key="k", model="m", input="x", metadata=meta(30))
            await running.wait_accepted(timeout=10)
            async with manager(follower_client, journal=follower_ledger) as follower:
                followed = await follower.submit(key="k", model="m", input="x",
                                                 metadata=meta(30))
                with anyio.fail_after(10):
                    await followed.cancel()
            assert followed.status is JobStatus.CANCELLED
            await running.wait(timeout=10)  # the owner sees the cancel and records it
        assert running.status is JobStatus.CANCELLED
    finally:
        await owner_client.close()
        await follower_client.close()


# -- limits apply to every job ---------------------------------------------------------------


async def test_stream_jobs_ask_the_budget_before_they_are_created(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    prices = {"m": asyncbg.Price(input=1000.0, output=1000.0)}  # $ per million tokens
    async with manager(client, max_cost=0.05, prices=prices, stream=True,
                       max_concurrency=30) as mgr:
        jobs = [await mgr.submit(model="m", input="x", max_output_tokens=50)
                for _ in range(30)]
        await mgr.wait_all(jobs, timeout=30)
    refused = [j for j in jobs if j.error_code == "budget_exceeded"]
    assert refused and server.counters.creates == 30 - len(refused)
    assert mgr.statistics().cost <= 0.05 * 1.5
    assert zeroed(mgr) == {}


# -- promises on the error path -------------------------------------------------------------


async def test_a_crash_of_an_internal_task_still_sweeps_live_jobs(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    with pytest.raises(ZeroDivisionError):
        async with manager(client) as mgr:
            jobs = [await mgr.submit(model="m", input="x", metadata=meta(30)) for _ in range(3)]
            for job in jobs:
                await job.wait_accepted(timeout=10)

            async def crash() -> None:
                raise ZeroDivisionError("an internal task crashed")

            assert mgr._tg is not None
            mgr._tg.start_soon(crash)
            await anyio.sleep(30)
    assert all(job.status is JobStatus.CANCELLED for job in jobs)
    assert server.counters.cancels == 3
    with anyio.fail_after(5):
        await jobs[0].wait()


@pytest.mark.parametrize("header", ["nan", "inf", "-5", "1e308", ""])
async def test_garbage_retry_after_and_poll_after_never_end_the_manager(header: str) -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.02))
    server.poll_after_ms = header  # type: ignore[assignment]
    server.inject("429", route="create", times=2,
                  retry_after=float(header) if header else None)
    server.inject("429", route="retrieve", times=2,
                  retry_after=float(header) if header else None)
    client = fake_client(server)
    try:
        policy = asyncbg.RetryPolicy(max_attempts=10, base=0.001, max_backoff=0.01,
                                     max_retry_after=0.05)
        with anyio.fail_after(20):
            async with manager(client, retry_policy=policy,
                               poll_policy=asyncbg.PollPolicy(
                                   first_poll=0.005, min_interval=0.005, max_interval=0.02,
                                   jitter=0, honor_poll_after=False)) as mgr:
                job = await mgr.submit(model="m", input="x", metadata=meta(0.02))
        assert job.status is JobStatus.COMPLETED
    finally:
        await client.close()


async def test_cancel_during_an_in_flight_poll_acts_at_once() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.2))
    client = fake_client(server)
    slow = asyncbg.PollPolicy(first_poll=0.2, min_interval=15.0, max_interval=15.0, jitter=0)
    try:
        async with manager(client, poll_policy=slow) as mgr:
            job = await mgr.submit(model="m", input="x", metadata=meta(60))
            await job.wait_accepted(timeout=10)
            server.inject("slow", route="retrieve", delay=0.5)  # the first poll is out a while
            await eventually(lambda: any(e.step == "poll" for e in mgr._scheduler.entries()))
            with anyio.fail_after(5):  # a whole 15 s interval before the fix
                await job.cancel()
        assert job.status is JobStatus.CANCELLED
    finally:
        await client.close()


async def test_a_webhook_during_an_in_flight_poll_fetches_at_once() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.1))
    client = fake_client(server)
    slow = asyncbg.PollPolicy(first_poll=0.5, min_interval=15.0, max_interval=15.0, jitter=0)
    try:
        async with manager(client, poll_policy=slow) as mgr:
            job = await mgr.submit(model="m", input="x", metadata=meta(0.3))
            rid = await job.wait_accepted(timeout=10)
            assert rid is not None
            server.inject("slow", route="retrieve", delay=1.0)  # the next poll takes a second
            await eventually(lambda: any(e.step == "poll" for e in mgr._scheduler.entries()))
            mgr._scheduler.wake(rid)  # what a verified webhook does, while the poll is out
            with anyio.fail_after(5):
                await job.wait()
        assert job.status is JobStatus.COMPLETED
    finally:
        await client.close()


async def test_one_404_is_checked_again_before_a_response_is_lost(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", metadata=meta(0.2))
        await job.wait_accepted(timeout=10)
        server.inject("404", route="retrieve", times=1)
        await job.wait(timeout=10)
    assert job.status is JobStatus.COMPLETED


# -- resources ----------------------------------------------------------------------------------


async def test_a_manager_forgets_finished_jobs_nobody_holds(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        for _ in range(20):
            job = await mgr.submit(model="m", input="x", metadata=meta(0.01))
            await job.wait(timeout=10)
        ref = weakref.ref(job)
        del job
        gc.collect()
        assert ref() is None and mgr.jobs == []
        assert mgr.statistics().by_status == {"completed": 20}
        assert mgr.statistics().submitted == 20
    assert zeroed(mgr) == {}


async def test_the_notify_outbox_without_a_journal_keeps_no_finished_rows(
    client: AsyncOpenAI,
) -> None:
    from asyncbg.testing import WebhookReceiver, new_secret

    secret = new_secret()
    async with WebhookReceiver(secret) as receiver:
        notify = asyncbg.Notify(receiver.url, secret=secret, backoff=0.02, timeout=2.0)
        async with manager(client, notify=notify) as mgr:
            jobs = [await mgr.submit(model="m", input="x", metadata=meta(0.01))
                    for _ in range(10)]
            await mgr.wait_all(jobs, timeout=10)
    assert len(receiver.ids()) == 10
    ledger = mgr.journal
    assert isinstance(ledger, MemoryLedger)
    assert await ledger.records() == [] and await ledger.deliveries() == []


async def test_stream_jobs_beyond_the_slow_start_window_all_run(client: AsyncOpenAI) -> None:
    async with manager(client, stream=True, max_concurrency=12) as mgr:
        jobs = [await mgr.submit(model="m", input="x", metadata=meta(0.2)) for _ in range(12)]
        await mgr.wait_all(jobs, timeout=20)  # the pacer's window starts at 4
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert zeroed(mgr) == {}


async def test_an_interrupt_during_a_create_records_its_response(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    ledger = MemoryLedger()
    server.inject("slow", route="create", delay=0.5)
    with anyio.CancelScope() as scope:  # what Ctrl-C does to the task running the manager
        async with manager(client, journal=ledger, cancel_on_exit=False) as mgr:
            job = await mgr.submit(key="k", model="m", input="x", metadata=meta(30))
            await eventually(lambda: any(e.step == "create" and e.sent
                                         for e in mgr._scheduler.entries()))
            scope.cancel()
            await anyio.sleep(30)
    record = await ledger.get("k")
    assert record is not None and record.state == "live" and record.response_id
    assert server.counters.creates == 1 and job.detached
    async with manager(client, journal=ledger) as mgr:  # a rerun re-attaches, creates nothing
        again = await mgr.submit(key="k", model="m", input="x", metadata=meta(30))
        assert again.response_id == record.response_id
        await again.cancel()
    assert server.counters.creates == 1
