"""Fleet workers under faults, in-process: a ledger that goes away, a worker whose key is refused.

Two workers share one SQLite ledger (the same rules as PostgreSQL's, see tests/test_fleet.py for
the processes and PostgreSQL itself); the fake server counts creates per request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncbg
from asyncbg._fleet import AccountRefused, ServerUnreachable, enqueue_requests, run_worker
from asyncbg._http import Rejected, Unreachable
from asyncbg._ledgers import LedgerUnavailable, Outcome, Record
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger
from asyncbg.providers import OpenAIResponses
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_POLL, FAST_RETRY

pytestmark = pytest.mark.asyncio


class Outage(SharedSQLiteLedger):
    """A shared SQLite ledger that answers LedgerUnavailable while ``down``."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise LedgerUnavailable(f"{self.location}: connection lost")

    async def acquire(self, limit: int, lease: float, *, live_only: bool = False
                      ) -> list[Record]:
        self._check()
        return await super().acquire(limit, lease, live_only=live_only)

    async def record(self, key: str, outcome: Outcome) -> None:
        self._check()
        await super().record(key, outcome)

    async def sending(self, key: str, *, resubmit: bool) -> None:
        self._check()
        await super().sending(key, resubmit=resubmit)

    async def renew(self, keys: Collection[str], lease: float) -> set[str]:
        self._check()
        return await super().renew(keys, lease)

    async def unfinished(self) -> int:
        self._check()
        return await super().unfinished()


async def submitted(db: Path, items: list[tuple[str, dict[str, Any]]]) -> Path:
    """A shared SQLite ledger at ``db`` with ``items`` waiting, as ``asyncbg submit`` leaves it."""
    setup = SharedSQLiteLedger(db)
    await setup.open()
    await enqueue_requests(setup, items)
    await setup.close()
    return db


def lines(n: int, duration: float) -> list[tuple[str, dict[str, Any]]]:
    return [(f"r{i}", {"model": "m", "input": f"line {i}",
                       "metadata": {"fake_duration": str(duration)}}) for i in range(n)]


async def test_a_worker_rides_out_a_ledger_outage_and_creates_each_line_once(
    tmp_path: Path,
) -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.1))
    db = await submitted(tmp_path / "fleet.db", lines(40, 0.3))
    ledger = Outage(db, lease=5.0)
    client = fake_client(server)

    async def outage() -> None:
        await anyio.sleep(0.3)
        ledger.down = True  # mid-run: creates answered, completions arriving
        await anyio.sleep(1.0)
        ledger.down = False

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(outage)
                code = await run_worker(client, ledger, concurrency=8, lease=5.0,
                                        exit_when_idle=True, stop=anyio.Event(),
                                        poll_policy=FAST_POLL, retry_policy=FAST_RETRY,
                                        idle=0.05, db_patience=30.0)
    finally:
        await client.close()
    assert code == 0
    check = SharedSQLiteLedger(db)
    await check.open()
    records = await check.records()
    await check.close()
    assert {r.status for r in records} == {"completed"} and len(records) == 40
    assert server.counters.creates == 40  # nothing created twice, nothing recorded failed


class RefusedKey(OpenAIResponses):
    """A provider whose every create is refused, as a server refuses a bad API key."""

    async def create(self, params: Any, *, key: str | None = None) -> Any:
        raise Rejected("Incorrect API key provided", http_status=401, code="invalid_api_key")


async def test_a_worker_with_a_refused_key_stops_and_leaves_its_jobs_to_the_others(
    tmp_path: Path,
) -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    db = await submitted(tmp_path / "fleet.db", lines(30, 0.05))
    good_client, bad_client = fake_client(server), fake_client(server)
    stop = anyio.Event()
    outcome: dict[str, object] = {}

    async def bad() -> None:
        try:
            await run_worker(RefusedKey(bad_client), SharedSQLiteLedger(db, lease=5.0),
                             concurrency=8, lease=5.0, exit_when_idle=True, stop=stop,
                             poll_policy=FAST_POLL, retry_policy=FAST_RETRY, idle=0.02)
        except AccountRefused as exc:
            outcome["bad"] = exc

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bad)
                await anyio.sleep(0.2)  # the bad worker takes its share first
                outcome["good"] = await run_worker(
                    good_client, SharedSQLiteLedger(db, lease=5.0), concurrency=8, lease=5.0,
                    exit_when_idle=True, stop=anyio.Event(), poll_policy=FAST_POLL,
                    retry_policy=FAST_RETRY, idle=0.02)
    finally:
        await good_client.close()
        await bad_client.close()
    assert isinstance(outcome["bad"], AccountRefused)
    assert "Incorrect API key" in str(outcome["bad"]) and outcome["good"] == 0
    check = SharedSQLiteLedger(db)
    await check.open()
    records = await check.records()
    await check.close()
    assert {r.status for r in records} == {"completed"}, [
        (r.key, r.error_code) for r in records if r.status != "completed"]
    assert len(records) == 30
    assert server.counters.creates == 30


class NoServer(OpenAIResponses):
    """A provider whose every create finds nothing listening (connection refused)."""

    async def create(self, params: Any, *, key: str | None = None) -> Any:
        raise Unreachable("cannot connect: connection refused")


class WriteLandsLate(SharedSQLiteLedger):
    """The first ``connection_error`` outcome is written, and its caller hears nothing more
    until the exit cuts its wait (a write the database made, whose answer never came back:
    the ledger says ``local``, the job here says "abandoned")."""

    cut: str | None = None

    async def _fenced(self, key: str, sql: str, args: tuple[Any, ...], **kw: Any) -> None:
        await super()._fenced(key, sql, args, **kw)
        if "connection_error" in args and self.cut is None:
            self.cut = key
            await anyio.sleep_forever()


async def test_a_worker_leaving_unreachable_requeues_what_the_ledger_recorded_not_what_it_saw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker whose server cannot be reached leaves, and puts back to waiting every line
    it ended ``local`` for it, by what the ledger holds: one whose outcome write landed while
    the exit cut its caller off stayed ``local`` for good (CI: test_fleet_rescue, r1)."""
    import functools

    import asyncbg._fleet as fleet_module

    # The write's wait is a write of a create's answer: the exit gives it 0.2 s, not 10.
    monkeypatch.setattr(fleet_module, "BackgroundManager",
                        functools.partial(asyncbg.BackgroundManager, exit_grace=0.2))
    db = await submitted(tmp_path / "fleet.db", lines(3, 0.01))
    client = fake_client(FakeResponsesServer())
    ledger = WriteLandsLate(db, lease=5.0)
    try:
        with anyio.fail_after(60), pytest.raises(ServerUnreachable):
            await run_worker(NoServer(client), ledger, concurrency=2, lease=5.0,
                             exit_when_idle=True, stop=anyio.Event(), poll_policy=FAST_POLL,
                             retry_policy=FAST_RETRY, idle=0.02)
    finally:
        await client.close()
    assert ledger.cut is not None  # the case happened
    check = SharedSQLiteLedger(db)
    await check.open()
    records = await check.records()
    await check.close()
    assert {r.key: r.state for r in records} == {f"r{i}": "new" for i in range(3)}


async def test_the_refused_codes_are_the_accounts() -> None:
    from asyncbg._http import NO_RETRY_CODES as ACCOUNT_CODES

    assert "insufficient_quota" in ACCOUNT_CODES
    assert isinstance(asyncbg.LedgerUnavailable("x"), asyncbg.LedgerError)


async def test_a_worker_that_takes_its_own_running_key_again_does_not_fail_it(
    tmp_path: Path,
) -> None:
    """Its lease ran out while it ran the key, and its own claim took it again: the old handle
    is dropped and the job goes on (it was recorded ``failed`` as a duplicate key before)."""
    from asyncbg._fleet import _Worker

    server = FakeResponsesServer(latency=LatencyModel.fixed(0.3))
    db = tmp_path / "fleet.db"
    ledger = SharedSQLiteLedger(db, lease=5.0)
    await ledger.open()
    await enqueue_requests(ledger, lines(1, 0.3))
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(client, journal=ledger,
                                             poll_policy=FAST_POLL) as mgr:
            worker = _Worker(ledger, concurrency=2, lease=5.0, stop=anyio.Event(), idle=0.05,
                             exit_when_idle=True)
            (record,) = await ledger.acquire(1, 5.0)
            await worker._start(mgr, record.key, record.request, record.digest)
            first = worker.jobs["r0"]
            await first.wait_accepted(timeout=10)
            # The same key, again.
            await worker._start(mgr, record.key, record.request, record.digest)
            second = worker.jobs["r0"]
            await second.wait(timeout=10)
        assert second.status is asyncbg.JobStatus.COMPLETED
        assert second.response_id == first.response_id and server.counters.creates == 1
        final = await ledger.get("r0")
        assert final is not None and final.status == "completed"
    finally:
        await ledger.close()
        await client.close()


async def test_a_create_is_not_sent_when_too_little_of_its_lease_is_left(
    tmp_path: Path,
) -> None:
    """A process stopped past its lease (SIGSTOP) wakes with a create about to leave: its own
    monotonic clock says the lease may be someone else's now, so the create is not sent."""
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    client = fake_client(server)
    ledger = SharedSQLiteLedger(tmp_path / "fleet.db", lease=3.0)
    try:
        async with asyncbg.BackgroundManager(client, journal=ledger,
                                             poll_policy=FAST_POLL) as mgr:
            scheduler = mgr._scheduler
            real = scheduler.lease_taken

            def stopped_for_a_while(key: str, at: float) -> None:
                real(key, at - 2.5)  # as if the claim was sent 2.5 s (of 3) ago

            scheduler.lease_taken = stopped_for_a_while  # type: ignore[method-assign]
            job = await mgr.submit(key="k", model="m", input="x")
            with pytest.raises(asyncbg.ManagerStateError):  # left, not sent
                await job.wait(timeout=10)
            scheduler.lease_taken = real  # type: ignore[method-assign]
            fine = await mgr.submit(key="other", model="m", input="x")
            await fine.wait(timeout=10)
        assert server.counters.creates == 1  # "other" only
        assert fine.status is asyncbg.JobStatus.COMPLETED
    finally:
        await client.close()


class Unanswering(Outage):
    """While ``down``, the calls wait as a pool waits for a database that is gone."""

    waiting = 0

    async def acquire(self, limit: int, lease: float, *, live_only: bool = False
                      ) -> list[Record]:
        if self.down:
            self.waiting += 1
            await anyio.sleep(3600)
        return await super().acquire(limit, lease, live_only=live_only)

    async def release(self, keys: Collection[str]) -> None:
        if self.down:
            await anyio.sleep(3600)
        await super().release(keys)

    async def requeue(self, keys: Collection[str], *,
                      codes: Collection[str] | None = None) -> None:
        if self.down:
            await anyio.sleep(3600)
        await super().requeue(keys, codes=codes)


async def test_a_worker_told_to_stop_while_its_database_is_down_stops_within_a_renewal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGTERM (``stop``) with the database gone: the worker waits neither on the look for
    more work under way nor on the hand-back of its leases (each waited about 35 s for a
    connection, signals or not); it says they run out by themselves, and the live responses
    stay recorded for the next worker to poll."""
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.01))  # responses of a minute
    db = await submitted(tmp_path / "fleet.db", lines(6, 60.0))
    ledger = Unanswering(db, lease=3.0)
    client = fake_client(server)
    stop = anyio.Event()

    async def down_then_stop() -> None:
        check = SharedSQLiteLedger(db)
        await check.open()
        try:
            for _ in range(3000):  # the test's fail_after bounds it first
                records = await check.records()
                if len(records) == 6 and {r.state for r in records} == {"live"}:
                    break
                await anyio.sleep(0.01)
        finally:
            await check.close()
        ledger.down = True
        for _ in range(3000):  # a look for work is under way, waiting
            if ledger.waiting:
                break
            await anyio.sleep(0.01)
        stop.set()

    try:
        with anyio.fail_after(30):  # the hand-back alone would take an hour
            async with anyio.create_task_group() as tg:
                tg.start_soon(down_then_stop)
                code = await run_worker(client, ledger, concurrency=8, lease=3.0,
                                        exit_when_idle=False, stop=stop,
                                        poll_policy=FAST_POLL, retry_policy=FAST_RETRY,
                                        idle=0.05, db_patience=30.0)
    finally:
        await client.close()
    assert code == 0
    assert "worker.leases_not_handed_back" in caplog.text
    check = SharedSQLiteLedger(db)
    await check.open()
    records = await check.records()
    await check.close()
    assert len(records) == 6 and {r.state for r in records} == {"live"}
    assert all(r.response_id for r in records) and server.counters.creates == 6


async def test_a_worker_claims_with_the_ledgers_digest_unless_it_changes_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose stored request is what the worker sends (as ``submit`` stores it) is claimed
    with the ledger's own digest, not encoded and hashed again; one whose stored request the
    worker would change (stored by other means) is fingerprinted as before, so the claim
    compares what is sent (a job never sent takes the request it is sent with)."""
    import asyncbg._manager as manager_module
    from asyncbg._ledgers._base import fingerprint

    server = FakeResponsesServer(latency=LatencyModel.fixed(0.01))
    db = await submitted(tmp_path / "fleet.db", lines(20, 0.01))
    odd = SharedSQLiteLedger(db)
    await odd.open()
    # Not what a worker sends (no background, no store): its digest is of this request.
    await odd.enqueue([("odd", *fingerprint({"model": "m", "input": "odd"}))])
    await odd.close()
    encoded: list[str] = []

    def counted(params: Any) -> tuple[str, bytes]:
        encoded.append(str(params.get("input")))
        return fingerprint(params)

    monkeypatch.setattr(manager_module, "fingerprint", counted)
    client = fake_client(server)
    try:
        with anyio.fail_after(60):
            code = await run_worker(client, SharedSQLiteLedger(db, lease=5.0), concurrency=8,
                                    lease=5.0, exit_when_idle=True, stop=anyio.Event(),
                                    poll_policy=FAST_POLL, retry_policy=FAST_RETRY, idle=0.02)
    finally:
        await client.close()
    check = SharedSQLiteLedger(db)
    await check.open()
    records = {r.key: r for r in await check.records()}
    await check.close()
    assert encoded == ["odd"]  # the 20 submitted lines were claimed with the stored digest
    assert code == 0
    assert {k: r.status for k, r in records.items()} == {
        **{f"r{i}": "completed" for i in range(20)}, "odd": "completed"}
    sent = json.loads(records["odd"].request)
    assert sent["background"] is True and sent["store"] is True
    assert records["odd"].digest == fingerprint(sent)[0]  # of what was sent, not as stored
    assert server.counters.creates == 21


class HeldCreate(OpenAIResponses):
    """Creates that wait, once sent, until the test lets their answer come back."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.sent, self.answer = anyio.Event(), anyio.Event()

    async def create(self, params: Any, *, key: str | None = None) -> Any:
        self.sent.set()
        await self.answer.wait()
        return await super().create(params, key=key)


@pytest.mark.parametrize("taker_sent", [False, True])
async def test_a_create_answered_after_its_lease_was_taken_is_kept_not_cancelled(
    taker_sent: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease of a key whose create is on its way is taken over (a create slower than the
    lease). The response is paid for: it is not cancelled (it was, as an "orphan"). If the
    taker has not sent its own create, the response is adopted (recorded live, polled to its
    end: one create for the line); if it has, it is reported as paid twice, left running."""
    import sqlite3
    import time

    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    db = await submitted(tmp_path / "fleet.db", lines(1, 0.05))
    client = fake_client(server)
    provider = HeldCreate(client)
    stop, said = anyio.Event(), anyio.Event()
    caplog.set_level("INFO", logger="asyncbg")

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "job.duplicate_paid" in record.getMessage():
                said.set()  # in the loop's own thread: the worker logs from it

    heard = Heard()
    logging.getLogger("asyncbg").addHandler(heard)

    async def worker() -> None:
        await run_worker(provider, SharedSQLiteLedger(db, lease=5.0), concurrency=1, lease=5.0,
                         exit_when_idle=True, stop=stop, poll_policy=FAST_POLL,
                         retry_policy=FAST_RETRY, idle=0.02)

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker)
                await provider.sent.wait()
                # Another process takes the key over (a new epoch); it may have sent already.
                with sqlite3.connect(db) as conn:
                    conn.execute(
                        "UPDATE jobs SET owner = 'taker', epoch = epoch + 1, lease_until = ?"
                        + (", sent_epoch = epoch + 1" if taker_sent else "")
                        + " WHERE key = 'r0'", (time.time() + 60,))
                conn.close()
                provider.answer.set()
                if taker_sent:
                    await said.wait()
                    stop.set()  # the taker's row stays its own: never idle
    finally:
        logging.getLogger("asyncbg").removeHandler(heard)
        await client.close()
    assert server.counters.cancels == 0  # it was cancelled as an "orphan"
    assert server.counters.creates == 1
    check = SharedSQLiteLedger(db)
    await check.open()
    (record,) = await check.records()
    await check.close()
    if taker_sent:
        assert (record.state, record.response_id) == ("sending", None)  # the taker's
        assert "job.duplicate_paid" in caplog.text
    else:
        assert (record.state, record.status) == ("done", "completed")
        assert "job.orphan_adopted" in caplog.text


@pytest.mark.parametrize("lease", [0.001, 0.5, float("inf"), float("nan")])
async def test_run_worker_refuses_a_lease_it_cannot_keep(tmp_path: Path, lease: float) -> None:
    """A lease under a second ran out during the ledger's own round trips: the worker took its
    jobs, sent nothing (its creates fenced) and took them again, at full CPU, forever."""
    db = await submitted(tmp_path / "fleet.db", lines(1, 0.01))
    client = fake_client(FakeResponsesServer())
    try:
        with pytest.raises(ValueError, match="lease must be at least 1 s and finite"):
            await run_worker(client, SharedSQLiteLedger(db), concurrency=1, lease=lease,
                             exit_when_idle=True, stop=anyio.Event())
    finally:
        await client.close()
