"""Shared ledgers against a real PostgreSQL (and the shared SQLite journal): the Ledger rules of
tests/test_ledgers.py, then leases, epochs, SKIP LOCKED, enqueue and the schema."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import psycopg
import pytest
import pytest_asyncio

from asyncbg import JournalMismatchError
from asyncbg._ledgers import ClaimOutcome, LedgerError, Outcome, canonical, digest, open_ledger
from asyncbg._ledgers import _pg_queries as pg_queries
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg._ledgers._shared import EnqueueMismatch, LeaseLost, SharedLedger, safety_margin
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger


def req(**kw: object) -> tuple[str, bytes]:
    params = {"model": "m", "input": "x", **kw}
    return digest(params), canonical(params)


A, A_BYTES = req()
B, B_BYTES = req(input="other")
DONE = Outcome("completed", "resp_1", body=b'{"id":"resp_1"}', http_status=200, request_id="rq")
#: Short enough to let a lease run out within a test, long enough for a few statements.
LEASE = 0.4

Factory = Callable[..., SharedLedger]


@pytest.fixture(params=["postgres", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Makes ledgers on one shared store: a PostgreSQL database of its own, or one journal."""
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        return lambda **kw: PostgresLedger(dsn, **kw)
    return lambda **kw: SharedSQLiteLedger(tmp_path / "j.db", **kw)


@pytest_asyncio.fixture
async def ledger(make: Factory) -> AsyncIterator[SharedLedger]:
    led = make(lease=LEASE)
    await led.open()
    try:
        yield led
    finally:
        await led.close()


@pytest_asyncio.fixture
async def other(make: Factory) -> AsyncIterator[SharedLedger]:
    """A second process's ledger on the same store."""
    led = make(lease=LEASE)
    await led.open()
    try:
        yield led
    finally:
        await led.close()


async def run_out() -> None:
    """Wait until a lease taken now has run out."""
    await anyio.sleep(LEASE + 0.1)


async def run_out_sending() -> None:
    """Wait until a lease taken now, whose holder wrote ``sending``, can be taken over: one
    safety margin after it ran out."""
    await anyio.sleep(LEASE + safety_margin(LEASE) + 0.1)


# -- the Ledger rules, as for every ledger ----------------------------------------------------

@pytest.mark.asyncio
async def test_the_ledger_rules_hold(ledger: SharedLedger) -> None:
    assert isinstance(ledger, SharedLedger)
    first = await ledger.claim("k", A, A_BYTES)
    assert first.outcome is ClaimOutcome.NEW
    r = first.record
    assert (r.key, r.digest, r.request, r.state, r.status) == ("k", A, A_BYTES, "new", "pending")
    assert await ledger.get("k") == r and await ledger.get("missing") is None
    again = await ledger.claim("k", B, B_BYTES)  # claimed, never sent: the newer one wins
    assert again.outcome is ClaimOutcome.NEW and again.record.digest == B
    assert again.record.created == r.created
    await ledger.sending("k", resubmit=False)
    assert (await ledger.claim("k", A, A_BYTES)).outcome is ClaimOutcome.MISMATCH
    resend = await ledger.claim("k", B, B_BYTES)
    assert resend.outcome is ClaimOutcome.RESEND and resend.record.state == "sending"
    await ledger.sending("k", resubmit=True)
    assert await ledger.resubmits() == 1
    await ledger.record("k", Outcome("queued", "resp_1", body=b"{}", http_status=200))
    await ledger.record("k", Outcome("in_progress"))  # no id: the known one stays
    live = await ledger.claim("k", B, B_BYTES)
    assert live.outcome is ClaimOutcome.RESUME
    assert (live.record.state, live.record.response_id, live.record.status, live.record.body) == (
        "live", "resp_1", "in_progress", None)
    await ledger.record("k", DONE)
    done = await ledger.claim("k", B, B_BYTES)
    assert done.outcome is ClaimOutcome.DONE
    assert (done.record.state, done.record.body, done.record.http_status, done.record.request_id
            ) == ("done", DONE.body, 200, "rq")
    assert (await ledger.claim("k", A, A_BYTES)).outcome is ClaimOutcome.MISMATCH


@pytest.mark.asyncio
async def test_local_endings_are_claimed_afresh_and_order_is_claim_order(
    ledger: SharedLedger,
) -> None:
    for key in ("c", "a", "b"):
        await ledger.claim(key, A, A_BYTES)
    await ledger.sending("a", resubmit=False)
    await ledger.record("a", Outcome("in_progress", "resp_a"))
    await ledger.record("a", Outcome("failed", error="gone", error_code="response_lost"))
    local = await ledger.get("a")
    assert local is not None and (local.state, local.response_id) == ("local", "resp_a")
    fresh = await ledger.claim("a", B, B_BYTES)
    assert fresh.outcome is ClaimOutcome.NEW
    assert (fresh.record.state, fresh.record.error, fresh.record.digest) == ("new", None, B)
    assert [r.key for r in await ledger.records()] == ["c", "a", "b"]


@pytest.mark.asyncio
async def test_bugs_are_clear_errors(make: Factory) -> None:
    led = make()
    with pytest.raises(RuntimeError, match="not open"):
        await led.get("k")
    await led.open()
    await led.open()  # opens nest
    await led.close()
    with pytest.raises(KeyError, match="never claimed"):
        await led.sending("nope", resubmit=False)
    with pytest.raises(KeyError, match="never claimed"):
        await led.record("nope", DONE)
    await led.claim("k", A, A_BYTES)
    with pytest.raises(ValueError, match="JobStatus value, not 'finished'"):
        await led.record("k", Outcome("finished"))
    await led.close()
    await led.close()
    with pytest.raises(RuntimeError, match="not open"):
        await led.records()


# -- leases and epochs -------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_key_another_live_owner_holds_is_followed_then_taken_over(
    ledger: SharedLedger, other: SharedLedger
) -> None:
    assert ledger.owner != other.owner
    await ledger.claim("k", A, A_BYTES)
    await ledger.sending("k", resubmit=False)
    await ledger.record("k", Outcome("queued", "resp_1"))
    follow = await other.claim("k", A, A_BYTES)
    assert follow.outcome is ClaimOutcome.FOLLOW and follow.record.response_id == "resp_1"
    assert (await other.claim("k", B, B_BYTES)).outcome is ClaimOutcome.MISMATCH
    assert "k" not in other.held()
    assert await ledger.renew(list(ledger.held()), LEASE) == set()  # renewed: still followed
    await anyio.sleep(LEASE * 0.6)
    assert (await other.claim("k", A, A_BYTES)).outcome is ClaimOutcome.FOLLOW
    await run_out()
    takeover = await other.claim("k", A, A_BYTES)
    assert takeover.outcome is ClaimOutcome.RESUME and takeover.record.response_id == "resp_1"
    assert other.held()["k"] == ledger.held()["k"] + 1  # a new epoch
    # The old owner can write nothing more, and learns it.
    with pytest.raises(LeaseLost, match="held by another process"):
        await ledger.record("k", DONE)
    assert "k" not in ledger.held()
    record = await other.get("k")
    assert record is not None and record.state == "live"
    await other.record("k", DONE)
    finished = await ledger.claim("k", A, A_BYTES)  # a finished key is served to anyone
    assert finished.outcome is ClaimOutcome.DONE and finished.record.body == DONE.body


@pytest.mark.asyncio
async def test_a_renewal_reports_the_leases_taken_over(
    ledger: SharedLedger, other: SharedLedger
) -> None:
    for key in ("a", "b"):
        await ledger.claim(key, A, A_BYTES)
    await run_out()
    await other.claim("a", A, A_BYTES)  # taken over: a lease that ran out
    assert await ledger.renew(["a", "b", "unknown"], LEASE) == {"a"}
    assert set(ledger.held()) == {"b"}
    with pytest.raises(LeaseLost):
        await ledger.sending("a", resubmit=False)
    await ledger.sending("b", resubmit=False)  # the renewed one is still ours


@pytest.mark.asyncio
async def test_a_sending_key_taken_over_is_resent_and_counted(
    ledger: SharedLedger, other: SharedLedger
) -> None:
    await ledger.claim("k", A, A_BYTES)
    await ledger.sending("k", resubmit=False)
    await run_out_sending()
    claim = await other.claim("k", A, A_BYTES)
    assert claim.outcome is ClaimOutcome.RESEND
    await other.sending("k", resubmit=True)
    assert await other.resubmits() == 1


@pytest.mark.asyncio
async def test_a_create_in_flight_is_given_one_more_margin_to_be_recorded(
    make: Factory
) -> None:
    """The lease of a key whose holder wrote ``sending`` ran out (a stalled process, a slow
    network): nobody takes it for one more safety margin, in which the holder can still
    record its create's answer; the takeover then polls that response instead of creating."""
    lease = 3.0  # a margin of 1 s: room for a loaded machine between the steps below
    holder, other = make(lease=lease), make(lease=lease)
    await holder.open()
    await other.open()
    try:
        await holder.enqueue([("k", A, A_BYTES), ("quiet", B, B_BYTES)])
        assert len(await holder.acquire(2, lease)) == 2
        await holder.claim("k", A, A_BYTES)
        await holder.sending("k", resubmit=False)  # "quiet" stays new: nothing was sent
        assert await holder.renew(["k", "quiet"], lease) == set()  # both run out from now
        await anyio.sleep(lease + 0.05)
        assert [r.key for r in await other.acquire(10, lease)] == ["quiet"]
        assert (await other.claim("k", A, A_BYTES)).outcome is ClaimOutcome.FOLLOW
        await holder.record("k", Outcome("queued", "resp_1"))  # still its epoch: recorded
        await anyio.sleep(safety_margin(lease))
        [taken] = await other.acquire(10, lease)
        assert (taken.key, taken.state, taken.response_id) == ("k", "live", "resp_1")
        claim = await other.claim("k", A, A_BYTES)
        assert claim.outcome is ClaimOutcome.RESUME and await other.resubmits() == 0
    finally:
        await holder.close()
        await other.close()


@pytest.mark.asyncio
async def test_only_a_create_sent_at_the_holders_epoch_delays_a_takeover(
    ledger: SharedLedger, other: SharedLedger, make: Factory
) -> None:
    """A key still ``sending`` from an earlier holder, taken over and never sent again (its new
    holder died at once), is taken at the end of the lease: no create of the last holder can
    be in flight."""
    await ledger.claim("k", A, A_BYTES)
    await ledger.sending("k", resubmit=False)
    await run_out_sending()
    assert (await other.claim("k", A, A_BYTES)).outcome is ClaimOutcome.RESEND  # then dies
    await run_out()
    third = make(lease=LEASE)
    await third.open()
    try:
        assert [r.key for r in await third.acquire(10, LEASE)] == ["k"]
    finally:
        await third.close()


@pytest.mark.asyncio
async def test_writes_that_arrive_together_go_out_together_each_fenced(pg_dsn: str) -> None:
    """Fenced writes that wait at the same moment share one statement (a worker running
    hundreds of jobs does not queue them one by one on the pool), and each is still fenced:
    the one whose lease went elsewhere fails alone, with nothing written for it."""
    ledger = PostgresLedger(pg_dsn, lease=30.0)
    await ledger.open()
    try:
        keys = [f"k{i}" for i in range(60)]
        await ledger.enqueue([(key, *req(i=key)) for key in keys])
        assert len(await ledger.acquire(60, 30.0)) == 60
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE asyncbg_jobs SET owner = 'another', epoch = epoch + 1 "
                         "WHERE key = 'k7'")
        failed: dict[str, BaseException] = {}

        async def write(key: str, what: str) -> None:
            try:
                if what == "sending":
                    await ledger.sending(key, resubmit=False)
                else:
                    await ledger.record(key, Outcome("queued", f"resp_{key}") if what == "live"
                                        else DONE)
            except LeaseLost as exc:
                failed[key] = exc

        for what in ("sending", "live", "done"):
            before = ledger.round_trips
            async with anyio.create_task_group() as tg:
                for key in keys:
                    tg.start_soon(write, key, what)
            # The first alone, the others together (and one look at why k7 failed); one
            # statement each would be 60.
            assert ledger.round_trips - before <= 6, (what, ledger.round_trips - before)
        assert list(failed) == ["k7"] and "held by another process" in str(failed["k7"])
        records = {r.key: r for r in await ledger.records()}
        assert records["k7"].state == "new"
        assert {r.state for key, r in records.items() if key != "k7"} == {"done"}
        assert records["k3"].body == DONE.body and records["k3"].http_status == 200
    finally:
        await ledger.close()


@pytest_asyncio.fixture
async def k1_sent(pg_dsn: str) -> AsyncIterator[PostgresLedger]:
    """A ledger holding k0 and k1, with k1 recorded as sent (its next write is a response id)."""
    ledger = PostgresLedger(pg_dsn, lease=30.0)
    await ledger.open()
    try:
        await ledger.enqueue([(key, *req(i=key)) for key in ("k0", "k1")])
        assert len(await ledger.acquire(2, 30.0)) == 2
        await ledger.sending("k1", resubmit=False)
        yield ledger
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_two_writes_of_one_key_made_together_go_out_one_after_the_other(
    k1_sent: PostgresLedger,
) -> None:
    """A key's second write made while its first waits to go out (a poll's outcome beside a
    create's answer) is not put in the same statement, where the server would apply one of the
    two at random and call the other lost: it goes out after, and the last one made stands."""
    ledger = k1_sent
    before = ledger.round_trips
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: ledger.sending("k0", resubmit=False))  # goes out at once
        await anyio.lowlevel.checkpoint()
        # Both wait behind it, in this order.
        tg.start_soon(ledger.record, "k1", Outcome("queued", "resp_k1"))
        await anyio.lowlevel.checkpoint()
        tg.start_soon(ledger.record, "k1", DONE)
    assert ledger.round_trips - before == 3
    records = {r.key: r for r in await ledger.records()}
    assert (records["k1"].state, records["k1"].body) == ("done", DONE.body)
    assert records["k1"].response_id == DONE.response_id


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(4000):  # the test's fail_after bounds it first
        if condition():
            return
        await anyio.sleep(0.005)
    raise AssertionError("never came")


@pytest.mark.asyncio
async def test_a_key_s_write_cancelled_before_it_went_lets_the_next_one_go(
    pg_dsn: str, k1_sent: PostgresLedger,
) -> None:
    """A key's write waits behind its earlier one, which waits behind a held statement; that
    one is cancelled before it was sent (alone in its batch): the waiting one goes out, and
    nothing waits for a batch never sent."""
    ledger = k1_sent
    locker = await psycopg.AsyncConnection.connect(pg_dsn)
    try:
        await locker.execute("SELECT 1 FROM asyncbg_jobs WHERE key = 'k0' FOR UPDATE")
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                first, went = anyio.CancelScope(), anyio.Event()

                async def ended() -> None:
                    with first:
                        await ledger.record("k1", DONE)

                async def live() -> None:
                    await ledger.record("k1", Outcome("queued", "resp_k1"))
                    went.set()

                tg.start_soon(lambda: ledger.sending("k0", resubmit=False))  # held
                await _until(lambda: ledger._group.busy)
                tg.start_soon(ended)  # waits behind it
                await _until(lambda: "k1" in ledger._group.keys)
                tg.start_soon(live)  # waits for the write of k1 before it
                for _ in range(5):  # it reaches its wait without any I/O
                    await anyio.lowlevel.checkpoint()
                assert not went.is_set()
                first.cancel()
                await _until(lambda: [w.kind for w in ledger._group.waiting.writes]
                             == ["live"])
                await locker.commit()
                await went.wait()
    finally:
        await locker.close()
    records = {r.key: r for r in await ledger.records()}
    assert (records["k1"].state, records["k1"].response_id) == ("live", "resp_k1")
    assert records["k0"].state == "sending"


@pytest.mark.asyncio
async def test_grouped_writes_keep_every_value_as_it_was_given(pg_dsn: str) -> None:
    """The grouped writes carry their rows as JSON (bodies as base64): any bytes, text with
    quotes, backslashes and non-ASCII, missing values and big numbers come back as given."""
    ledger = PostgresLedger(pg_dsn, lease=30.0)
    await ledger.open()
    outcomes = [
        Outcome("completed", "resp_\"q\\", body=bytes(range(256)) * 3, http_status=200,
                request_id="rq-é"),
        Outcome("failed", error='bad "input" \\ ünïcode ✓\n', error_code="x\ty"),
        Outcome("incomplete", "resp_2", body=b"", http_status=None, request_id=None),
        Outcome("cancelled", None),
    ]
    try:
        keys = [f"k'{i}\"" for i in range(len(outcomes))]
        await ledger.enqueue([(key, *req(i=key)) for key in keys])
        assert len(await ledger.acquire(10, 30.0)) == len(keys)
        async with anyio.create_task_group() as tg:  # sending, together
            for key in keys:
                tg.start_soon(lambda key=key: ledger.sending(key, resubmit=True))
        async with anyio.create_task_group() as tg:  # live, together
            for key in keys:
                tg.start_soon(ledger.record, key, Outcome("in_progress", f"live_{key}"))
        async with anyio.create_task_group() as tg:  # the outcomes, together
            for key, outcome in zip(keys, outcomes, strict=True):
                tg.start_soon(ledger.record, key, outcome)
        records = {r.key: r for r in await ledger.records()}
        for key, o in zip(keys, outcomes, strict=True):
            r = records[key]
            assert (r.status, r.body, r.error, r.error_code, r.http_status, r.request_id) == (
                o.status, o.body, o.error, o.error_code, o.http_status, o.request_id)
            assert r.response_id == (o.response_id or f"live_{key}")
            assert r.resubmits == 1
        assert ledger.held() == {}
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_grouped_writes_cancelled_on_their_way_or_waiting_leave_no_one_stuck(
    pg_dsn: str,
) -> None:
    """The write that carries a statement is cancelled while the statement waits on a lock,
    one queued behind it is cancelled before it is sent: the queued one is never written, and
    the next write goes out at once (nothing waits for a statement that will never come
    back)."""
    ledger = PostgresLedger(pg_dsn, lease=30.0)
    await ledger.open()
    try:
        await ledger.enqueue([(key, *req(i=key)) for key in ("k0", "k1", "k2")])
        assert len(await ledger.acquire(3, 30.0)) == 3
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker, \
                locker.transaction():
            await locker.execute("SELECT 1 FROM asyncbg_jobs WHERE key = 'k0' FOR UPDATE")
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    carrier, queued = anyio.CancelScope(), anyio.CancelScope()

                    async def write(key: str, scope: anyio.CancelScope) -> None:
                        with scope:
                            await ledger.sending(key, resubmit=False)

                    tg.start_soon(write, "k0", carrier)  # blocks on the lock
                    await anyio.sleep(0.3)
                    tg.start_soon(write, "k2", queued)  # waits for the statement
                    await anyio.sleep(0.1)
                    queued.cancel()
                    carrier.cancel()
                await ledger.sending("k1", resubmit=False)  # at once, not stuck
        states = {r.key: r.state for r in await ledger.records()}
        # The carried statement may still commit once the lock is gone (the server learns of
        # the cancel, or of the closed connection, only later): its write is not known.
        assert states["k1"] == "sending" and states["k2"] == "new"
        assert states["k0"] in ("new", "sending")
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_waiting_batch_whose_leader_is_cancelled_is_sent_by_the_next(
    pg_dsn: str,
) -> None:
    """Writes queued behind a statement wait each on its own batch, and only the first (the
    leader) is woken to send it; when the leader is cancelled before its turn, the next one
    sends the batch: nothing waits for a leader that is gone, and the cancelled one is not
    written."""
    ledger = PostgresLedger(pg_dsn, lease=30.0)
    await ledger.open()
    keys = ["k0", "k1", "k2", "k3"]

    try:
        await ledger.enqueue([(key, *req(i=key)) for key in keys])
        assert len(await ledger.acquire(4, 30.0)) == 4
        group = ledger._group
        locker = await psycopg.AsyncConnection.connect(pg_dsn)
        try:
            await locker.execute("SELECT 1 FROM asyncbg_jobs WHERE key = 'k0' FOR UPDATE")
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    scopes = {key: anyio.CancelScope() for key in keys}

                    async def write(key: str) -> None:
                        with scopes[key]:
                            await ledger.sending(key, resubmit=False)

                    tg.start_soon(write, "k0")  # its statement waits on the lock
                    await _until(lambda: group.busy)
                    for key in keys[1:]:
                        tg.start_soon(write, key)
                    await _until(lambda: len(group.waiting.writes) == 3)
                    assert group.waiting.leader is not None
                    assert group.waiting.leader.key == "k1"
                    scopes["k1"].cancel()
                    await _until(lambda: len(group.waiting.writes) == 2)
                    await locker.commit()  # k0's statement comes back: k2 sends k2 and k3
        finally:
            await locker.close()
        states = {r.key: r.state for r in await ledger.records()}
        assert states == {"k0": "sending", "k1": "new", "k2": "sending", "k3": "sending"}
    finally:
        await ledger.close()


# -- the fleet: enqueue, acquire, renew, release -------------------------------------------------

@pytest.mark.asyncio
async def test_enqueue_is_idempotent_and_all_or_nothing(ledger: SharedLedger) -> None:
    items = [(f"k{i}", *req(i=i)) for i in range(5)]
    assert await ledger.enqueue(items) == 5
    assert await ledger.enqueue(items) == 0
    assert await ledger.enqueue([*items, ("k5", *req(i=5))]) == 1
    bad = [("new-1", *req(i=100)), ("k2", *req(i=999)), ("new-2", *req(i=101))]
    with pytest.raises(EnqueueMismatch, match="key 'k2' is already in the ledger") as info:
        await ledger.enqueue(bad)
    assert isinstance(info.value, JournalMismatchError) and info.value.key == "k2"
    assert [r.key for r in await ledger.records()] == [f"k{i}" for i in range(6)]
    records = await ledger.records()
    assert {(r.state, r.status) for r in records} == {("new", "pending")}
    assert await ledger.unfinished() == 6 and ledger.held() == {}


@pytest.mark.asyncio
async def test_acquire_takes_waiting_and_expired_keys_oldest_first(
    ledger: SharedLedger, other: SharedLedger
) -> None:
    await ledger.enqueue([(f"k{i}", *req(i=i)) for i in range(5)])
    got = await ledger.acquire(3, LEASE)
    assert [r.key for r in got] == ["k0", "k1", "k2"]
    assert [r.key for r in await other.acquire(10, LEASE)] == ["k3", "k4"]
    assert await other.acquire(10, LEASE) == []
    # The worker's claim of a key it acquired needs no round trip and takes it as it is.
    claim = await ledger.claim("k0", *req(i=0))
    assert claim.outcome is ClaimOutcome.NEW and claim.record == got[0]
    await ledger.sending("k0", resubmit=False)
    await ledger.record("k0", DONE)
    await run_out()
    again = await other.acquire(10, LEASE)  # k1, k2 ran out; k0 is finished
    assert [r.key for r in again] == ["k1", "k2", "k3", "k4"]
    assert await ledger.renew(list(ledger.held()), LEASE) == {"k1", "k2"}


@pytest.mark.asyncio
async def test_a_full_worker_can_adopt_only_live_responses(
    ledger: SharedLedger, other: SharedLedger
) -> None:
    await ledger.enqueue([(f"k{i}", *req(i=i)) for i in range(3)])
    await ledger.acquire(2, LEASE)
    for key in ("k0", "k1"):
        await ledger.claim(key, *req(i=int(key[1])))
        await ledger.sending(key, resubmit=False)
    await ledger.record("k1", Outcome("queued", "resp_1"))
    await run_out_sending()  # k0's create may have been in flight: one margin more
    adopted = await other.acquire(10, LEASE, live_only=True)
    assert [(r.key, r.response_id) for r in adopted] == [("k1", "resp_1")]
    assert [r.key for r in await other.acquire(10, LEASE)] == ["k0", "k2"]


@pytest.mark.asyncio
async def test_released_keys_are_taken_at_once_with_a_new_epoch(
    ledger: SharedLedger, other: SharedLedger
) -> None:
    await ledger.enqueue([("k", A, A_BYTES)])
    assert len(await ledger.acquire(1, 30.0)) == 1  # a long lease
    await ledger.claim("k", A, A_BYTES)
    await ledger.sending("k", resubmit=False)
    await ledger.record("k", Outcome("queued", "resp_1"))
    epoch = ledger.held()["k"]
    assert await other.acquire(1, 30.0) == []
    await ledger.release(["k"])
    assert ledger.held() == {}
    [taken] = await other.acquire(1, 30.0)
    assert (taken.state, taken.response_id) == ("live", "resp_1")
    assert other.held() == {"k": epoch + 1}
    assert (await other.claim("k", A, A_BYTES)).outcome is ClaimOutcome.RESUME


@pytest.mark.asyncio
async def test_local_endings_can_be_requeued_by_their_owner(
    ledger: SharedLedger, other: SharedLedger
) -> None:
    await ledger.enqueue([("k", A, A_BYTES)])
    await ledger.acquire(1, LEASE)
    await ledger.sending("k", resubmit=False)
    await ledger.record("k", Outcome("failed", error="unreachable",
                                     error_code="connection_error"))
    await other.requeue(["k"])  # not its own: nothing changes
    assert await other.acquire(1, LEASE) == []
    await ledger.requeue(["k"], codes=["invalid_api_key"])  # another code: nothing changes
    assert await other.acquire(1, LEASE) == []
    await ledger.requeue(["k"], codes=["invalid_api_key", "connection_error"])
    [again] = await other.acquire(1, LEASE)
    assert (again.state, again.status, again.error, again.error_code) == (
        "new", "pending", None, None)


@pytest.mark.asyncio
async def test_workers_alive_are_those_that_renewed(
    ledger: SharedLedger, other: SharedLedger
) -> None:
    assert await ledger.workers() == []
    await ledger.enqueue([(f"k{i}", *req(i=i)) for i in range(3)])
    await ledger.acquire(2, LEASE)
    await ledger.renew(list(ledger.held()), LEASE)
    await other.renew([], LEASE)
    workers = {w.owner: w for w in await ledger.workers()}
    assert set(workers) == {ledger.owner, other.owner}
    assert (workers[ledger.owner].held, workers[other.owner].held) == (2, 0)
    await other.close()
    await other.open()  # a closed ledger is gone from the list at once
    assert [w.owner for w in await ledger.workers()] == [ledger.owner]
    await run_out()
    assert await ledger.workers() == []  # not renewed within its lease: not alive


@pytest.mark.asyncio
async def test_concurrent_acquires_take_each_key_once(make: Factory) -> None:
    """SKIP LOCKED (PostgreSQL) and BEGIN IMMEDIATE (SQLite): eight processes, each key once."""
    ledgers = [make(lease=30.0) for _ in range(8)]
    for led in ledgers:
        await led.open()
    try:
        await ledgers[0].enqueue([(f"k{i}", *req(i=i)) for i in range(400)])
        taken: list[str] = []

        async def drain(led: SharedLedger) -> None:
            while got := await led.acquire(7, 30.0):
                taken.extend(r.key for r in got)

        async with anyio.create_task_group() as tg:
            for led in ledgers:
                tg.start_soon(drain, led)
        assert sorted(taken) == sorted(f"k{i}" for i in range(400))
        assert sum(len(led.held()) for led in ledgers) == 400
    finally:
        for led in ledgers:
            await led.close()


# -- PostgreSQL only --------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_renewal_is_one_round_trip_for_any_number_of_keys(pg_dsn: str) -> None:
    led = PostgresLedger(pg_dsn)
    await led.open()
    try:
        await led.enqueue([(f"k{i}", *req(i=i)) for i in range(500)])
        await led.acquire(500, 30.0)
        await led.renew([], 30.0)  # the first one also tidies the workers table
        before = led.round_trips
        assert await led.renew(list(led.held()), 30.0) == set()
        assert led.round_trips - before == 1
    finally:
        await led.close()


@pytest.mark.asyncio
async def test_workers_starting_together_make_the_schema_once(pg_dsn: str) -> None:
    ledgers = [PostgresLedger(pg_dsn) for _ in range(6)]
    async with anyio.create_task_group() as tg:
        for led in ledgers:
            tg.start_soon(led.open)
    try:
        for i, led in enumerate(ledgers):
            assert (await led.claim(f"k{i}", A, A_BYTES)).outcome is ClaimOutcome.NEW
        assert len(await ledgers[0].records()) == 6
    finally:
        for led in ledgers:
            await led.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT value FROM asyncbg_meta").fetchall() == [
            (str(pg_queries.SCHEMA_VERSION),)]


@pytest.mark.asyncio
async def test_foreign_and_newer_schemas_are_refused(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE asyncbg_jobs (id int)")
    with pytest.raises(LedgerError, match="asyncbg_jobs table that asyncbg did not make"):
        await PostgresLedger(pg_dsn).open()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE asyncbg_jobs")
    led = PostgresLedger(pg_dsn)
    await led.open()
    await led.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE asyncbg_meta SET value = %s",
                     (str(pg_queries.SCHEMA_VERSION + 2),))
    newer, known = pg_queries.SCHEMA_VERSION + 2, pg_queries.SCHEMA_VERSION
    with pytest.raises(LedgerError,
                       match=rf"newer asyncbg .*version {newer}; this one knows up to {known}"):
        await PostgresLedger(pg_dsn).open()


@pytest.mark.asyncio
async def test_exclusive_ledgers_exclude_each_other(pg_dsn: str) -> None:
    first = PostgresLedger(pg_dsn, exclusive=True)
    await first.open()
    try:
        with pytest.raises(LedgerError, match="in use by another asyncbg run"):
            await PostgresLedger(pg_dsn, exclusive=True).open()
        reader = PostgresLedger(pg_dsn)
        await reader.open()
        await reader.close()
    finally:
        await first.close()


@pytest.mark.asyncio
async def test_unreachable_server_and_password_are_handled(pg_dsn: str) -> None:
    url = "postgresql://u:secret@127.0.0.1:1/db"
    led = open_ledger(url)
    assert isinstance(led, PostgresLedger) and "secret" not in repr(led)
    with pytest.raises(LedgerError, match="cannot use the PostgreSQL server") as info:
        await led.open()
    assert "secret" not in str(info.value)


def test_without_psycopg_the_message_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "asyncbg._ledgers._postgres", raising=False)
    with pytest.raises(LedgerError, match=r"^PostgreSQL ledgers need psycopg: pip install "
                                          r"'asyncbg\[postgres\]'$"):
        open_ledger("postgres://db/x")


# -- SQLite only ---------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_version_2_journal_gains_leases(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with sqlite3.connect(path) as db:  # a version 2 journal, as asyncbg wrote it before
        from asyncbg._ledgers import _sqlite_queries as q

        for sql in (*q.CREATE_V2, *q.V2_INDEXES):
            db.execute(sql)
        db.execute("INSERT INTO jobs (key, seq, digest, request, state, response_id, status, "
                   "created, updated) VALUES ('k', 1, ?, ?, 'live', 'resp_1', 'queued', 1, 1)",
                   (A, A_BYTES))
        db.execute(f"PRAGMA application_id = {q.APPLICATION_ID}")
        db.execute("PRAGMA user_version = 2")
    db.close()
    led = SharedSQLiteLedger(path, lease=LEASE)
    await led.open()
    try:
        [record] = await led.acquire(5, LEASE)
        assert (record.key, record.state, record.response_id) == ("k", "live", "resp_1")
        assert (await led.claim("k", A, A_BYTES)).outcome is ClaimOutcome.RESUME
    finally:
        await led.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (4,)
    db.close()
