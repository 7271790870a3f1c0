"""Completion notifications in one process: done callbacks, and signed webhooks posted from the
journal's outbox to a real receiver on 127.0.0.1 (``asyncbg.testing.WebhookReceiver``, which
verifies each delivery with ``openai``'s ``client.webhooks.verify_signature``)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio
import structlog
from openai import AsyncOpenAI
from structlog.testing import capture_logs

import asyncbg
from asyncbg import JobStatus, ManagerStateError, Outcome
from asyncbg._ledgers._outbox import Notice, Outbox
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg._ledgers._shared import LeaseLost
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger
from asyncbg._notify.send import Sender
from asyncbg._notify.sign import signed_headers
from asyncbg.testing import FakeResponsesServer, WebhookReceiver, new_secret

from .conftest import HeldClock, manager, meta

SECRET = new_secret()
A = "a" * 64


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(SECRET) as r:
        yield r


@contextlib.contextmanager
def logged() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog's ``capture_logs``, leaving structlog unconfigured again: it configures it, and
    asyncbg logs through structlog once it is (later tests reading stdlib logs would miss)."""
    was = structlog.is_configured()
    with capture_logs() as logs:
        yield logs
    if not was:
        structlog.reset_defaults()


def fast(url: str, **kwargs: Any) -> asyncbg.Notify:
    """Retries at test speed."""
    options: dict[str, Any] = dict(secret=SECRET, backoff=0.02, max_backoff=0.1, timeout=2.0,
                                   wait_on_exit=10.0)
    return asyncbg.Notify(url, **{**options, **kwargs})


# -- callbacks -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_callbacks_run_in_completion_order_after_the_journal(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    server.clock = clock = HeldClock()  # the jobs end when the test moves time on, one by one
    clock.hold()
    calls: list[tuple[str, str]] = []
    journaled: list[str] = []
    mgr = manager(client, journal=tmp_path / "j.db",
                  on_done=lambda j: calls.append(("on_done", j.key)))

    async def slow_async(job: asyncbg.Job) -> None:
        record = await mgr.journal.get(job.key)  # type: ignore[union-attr]
        assert record is not None
        journaled.append(record.state)
        await anyio.sleep(0.01)  # the next callbacks wait for this one
        calls.append(("async", job.key))

    def bad(job: asyncbg.Job) -> None:
        raise RuntimeError("callback bug")

    with logged() as logs:
        async with mgr:
            jobs = [await mgr.submit(key=f"k{i}", model="m", input="x",
                                     metadata=meta(0.04 * (5 - i))) for i in range(5)]
            for job in jobs:
                job.add_done_callback(bad)
                job.add_done_callback(slow_async)
                job.add_done_callback(lambda j: calls.append(("sync", j.key)))
            for job in jobs:
                await job.wait_accepted()  # created while time stands still
            clock.advance(0.05)
            await jobs[4].wait()
            late: list[str] = []
            jobs[4].add_done_callback(lambda j: late.append(j.key))  # ended: runs at once
            assert late == ["k4"]

            async def late_async(job: asyncbg.Job) -> None:
                calls.append(("late", job.key))

            jobs[4].add_done_callback(late_async)  # scheduled, runs before the manager exits
            for job in reversed(jobs[:4]):
                clock.advance(0.04)
                await job.wait()
    order = [j.key for j in sorted(jobs, key=lambda j: j.finish_order)]
    assert order[0] == "k4" and order[-1] == "k0"  # not submission order
    expected = [(kind, key) for key in order for kind in ("async", "sync", "on_done")]
    assert [c for c in calls if c[0] != "late"] == expected
    assert ("late", "k4") in calls
    assert journaled == ["done"] * 5  # the outcome was in the journal before any callback
    failures = [e for e in logs if e["event"] == "job.callback_failed"]
    assert sorted(e["key"] for e in failures) == [f"k{i}" for i in range(5)]

    async def after(job: asyncbg.Job) -> None:
        pass

    with pytest.raises(ManagerStateError, match="after its manager exited"):
        jobs[0].add_done_callback(after)
    jobs[0].add_done_callback(lambda j: late.append(j.key))  # a sync one still runs
    assert late == ["k4", "k0"]


@pytest.mark.asyncio
async def test_a_callback_may_submit_more_work(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        async def follow_up(job: asyncbg.Job) -> None:
            if job.key == "first":
                mgr_jobs.append(await mgr.submit(key="second", model="m", input="y"))

        mgr_jobs = [await mgr.submit(key="first", model="m", input="x")]
        mgr_jobs[0].add_done_callback(follow_up)
    assert [j.key for j in mgr.jobs] == ["first", "second"]  # the jobs this test holds
    assert all(j.status is JobStatus.COMPLETED for j in mgr_jobs)


# -- webhooks --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_each_outcome_is_posted_signed_with_the_body_of_the_contract(
    client: AsyncOpenAI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    outcomes = {"ok": "completed", "bad": "failed", "cut": "incomplete"}
    async with manager(client, journal=tmp_path / "j.db", notify=fast(receiver.url)) as mgr:
        held = {key: await mgr.submit(key=key, model="gpt-4o-mini", input="x",
                                      metadata=meta(0.02, outcome))
                for key, outcome in outcomes.items()}
        stuck = await mgr.submit(key="stop", model="gpt-4o-mini", input="x",
                                 metadata=meta(30))
        await stuck.wait_accepted()
        await stuck.cancel()
    assert receiver.rejected == 0 and receiver.duplicates == 0
    got = receiver.by_key()
    assert {k: d.type for k, d in got.items()} == {
        "ok": "job.completed", "bad": "job.failed", "cut": "job.incomplete",
        "stop": "job.cancelled"}
    ok = got["ok"]
    assert ok.headers["webhook-id"].startswith("msg_")
    assert abs(ok.timestamp - time.time()) < 60
    assert ok.headers["webhook-signature"].startswith("v1,")
    assert set(ok.payload) == {"type", "timestamp", "data"}
    assert ok.payload["timestamp"].endswith("Z")
    data = ok.data
    job = held["ok"]
    assert data == {
        "key": "ok", "custom_id": "ok", "response_id": job.response_id, "status": "completed",
        "error": None, "created_at": data["created_at"], "completed_at": data["completed_at"],
        "usage": json.loads(job.body or b"{}")["usage"], "cost": job.cost}
    assert isinstance(data["created_at"], int) and data["completed_at"] >= data["created_at"]
    assert "result" not in data  # only with include_result=True
    assert got["bad"].data["error"]["message"] and got["bad"].data["status"] == "failed"
    stats = mgr.statistics()
    assert (stats.notifications_delivered, stats.notifications_given_up) == (4, 0)
    with sqlite3.connect(tmp_path / "j.db") as db:  # deleted once answered 2xx
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    db.close()


@pytest.mark.asyncio
async def test_include_result_and_no_journal(client: AsyncOpenAI,
                                            receiver: WebhookReceiver) -> None:
    async with manager(client, notify=fast(receiver.url, include_result=True)) as mgr:
        job = await mgr.submit(key="k", model="m", input="hello")
    assert isinstance(mgr.journal, asyncbg.MemoryLedger)  # the outbox lives in memory
    [delivery] = receiver.deliveries
    assert delivery.data["result"] == json.loads(job.body or b"")
    assert delivery.data["result"]["output"][0]["content"][0]["text"] == "echo: hello"


@pytest.mark.asyncio
async def test_failures_retry_with_backoff_and_honour_retry_after(
    client: AsyncOpenAI, receiver: WebhookReceiver
) -> None:
    receiver.fail(times=2)
    receiver.rate_limit(0.4, times=1)
    started = anyio.current_time()
    async with manager(client, notify=fast(receiver.url)) as mgr:
        await mgr.submit(key="k", model="m", input="x")
    elapsed = anyio.current_time() - started
    assert receiver.attempts == 4 and len(receiver.deliveries) == 1
    assert elapsed >= 0.4  # the Retry-After was waited out
    stats = mgr.statistics()
    assert (stats.notifications_delivered, stats.notification_failures) == (1, 3)


@pytest.mark.asyncio
async def test_a_410_stops_deliveries_to_the_endpoint_and_marks_them_failed(
    client: AsyncOpenAI, receiver: WebhookReceiver
) -> None:
    receiver.gone()
    ledger = asyncbg.MemoryLedger()
    async with manager(client, journal=ledger, notify=fast(receiver.url, max_concurrent=1)) as m:
        for i in range(6):
            await m.submit(key=f"k{i}", model="m", input="x", metadata=meta(0.01 * i))
    assert receiver.attempts == 1 and receiver.deliveries == []
    failed = await ledger.deliveries()
    assert [d.state for d in failed] == ["failed"] * 6  # kept, not dropped
    assert {d.http_status for d in failed} == {410, None}
    # The endpoint is back: --retry-failed (here, by hand) sends them again.
    receiver.recover()
    assert await ledger.retry_failed_deliveries(None) == 6
    async with manager(client, journal=ledger, notify=fast(receiver.url)):
        pass
    assert sorted(receiver.by_key()) == [f"k{i}" for i in range(6)]
    assert await ledger.deliveries() == []


@pytest.mark.asyncio
async def test_a_410_stops_the_deliveries_queued_behind_it(receiver: WebhookReceiver) -> None:
    """With ``max_concurrent=1`` a round takes two deliveries: one posted, one queued behind it.
    The queued one must not be posted once the first met a 410 (the race behind a flaky
    "two attempts" on a loaded machine, made certain here: all six are due before the start)."""
    receiver.gone()
    ledger = asyncbg.MemoryLedger()
    for i in range(6):
        ledger._add(f"k{i}", Notice(id=f"wh_{i}", url=receiver.url, body=b'{"i": %d}' % i))
    sender = Sender(fast(receiver.url, max_concurrent=1), ledger)
    async with anyio.create_task_group() as tg:
        await tg.start(sender.run)
        assert await sender.flush(10.0) == []
        tg.cancel_scope.cancel()
    assert receiver.attempts == 1
    assert [d.state for d in await ledger.deliveries()] == ["failed"] * 6
    assert sender.gave_up == 6


@pytest.mark.asyncio
async def test_after_give_up_after_a_delivery_is_marked_failed_never_dropped(
    client: AsyncOpenAI, receiver: WebhookReceiver
) -> None:
    receiver.fail()
    ledger = asyncbg.MemoryLedger()
    with logged() as logs:
        async with manager(client, journal=ledger,
                           notify=fast(receiver.url, give_up_after=0.3)) as mgr:
            await mgr.submit(key="k", model="m", input="x")
    [delivery] = await ledger.deliveries()
    assert delivery.state == "failed" and delivery.http_status == 500
    assert delivery.error is not None and "gave up" in delivery.error
    assert mgr.statistics().notifications_given_up == 1
    # Said for the delivery (its last attempt failed past the limit), or for the endpoint's
    # backlog (the limit passed while the endpoint's backoff held it: which, is the machine's
    # speed).
    assert [e.get("key", e.get("count")) for e in logs if e["event"] == "notify.gave_up"] in (
        ["k"], [1])
    assert SECRET not in repr(logs) and SECRET[6:] not in repr(logs)
    assert SECRET not in repr(mgr.notify)


@pytest.mark.asyncio
async def test_what_is_pending_at_exit_is_named_and_kept(
    client: AsyncOpenAI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    await receiver.down()
    with logged() as logs:
        async with manager(client, journal=tmp_path / "j.db",
                           notify=fast(receiver.url, wait_on_exit=0.3)) as mgr:
            for i in range(3):
                await mgr.submit(key=f"k{i}", model="m", input="x")
    [warning] = [e for e in logs if e["event"] == "notify.pending"]
    assert warning["count"] == 3 and sorted(warning["keys"]) == ["k0", "k1", "k2"]
    assert warning["log_level"] == "warning"
    # The next manager with the same URL delivers them, with the same webhook ids.
    ledger = asyncbg.SQLiteLedger(tmp_path / "j.db")
    await ledger.open()
    ids = sorted(d.id for d in await ledger.deliveries())
    await ledger.close()
    await receiver.up()
    async with manager(client, journal=tmp_path / "j.db", notify=fast(receiver.url)) as mgr:
        job = await mgr.submit(key="k0", model="m", input="x")  # served from the journal
    assert job.status is JobStatus.COMPLETED
    assert sorted(receiver.ids()) == ids  # nothing new for a job served from the journal


@pytest.mark.asyncio
async def test_a_receiver_down_at_first_then_up_gets_every_job_once(
    client: AsyncOpenAI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    n = 200
    await receiver.down()

    async def bring_up() -> None:
        await anyio.sleep(1.0)
        await receiver.up()

    async with anyio.create_task_group() as tg:
        tg.start_soon(bring_up)
        async with manager(client, journal=tmp_path / "j.db", max_concurrency=64,
                           notify=fast(receiver.url, backoff=0.05, max_backoff=0.3)) as mgr:
            for i in range(n):
                await mgr.submit(key=f"k{i}", model="m", input="x", metadata=meta(0.01))
            await mgr.wait_all(mgr.jobs)
            jobs_done = anyio.current_time()
        left = anyio.current_time() - jobs_done
    assert sorted(receiver.by_key()) == sorted(f"k{i}" for i in range(n))  # 0 lost
    assert receiver.duplicates <= n // 100
    assert left < 5.0
    # While the receiver was down it was probed, not hammered: one attempt per backoff.
    stats = mgr.statistics()
    assert stats.notifications_delivered == n and stats.notification_failures < 30


@pytest.mark.asyncio
async def test_a_stalled_receiver_does_not_slow_the_jobs(
    client: AsyncOpenAI, receiver: WebhookReceiver
) -> None:
    receiver.stall(5.0)
    async with manager(client, notify=fast(receiver.url, timeout=0.2, wait_on_exit=0.5)) as m:
        jobs = [await m.submit(key=f"k{i}", model="m", input="x") for i in range(20)]
        with anyio.move_on_after(30):  # a safety net: the test's point is the counts below
            await m.wait_all(jobs)
        # Every job ended while no notification had been delivered (the receiver holds each
        # past the sender's timeout): the jobs did not wait for their webhooks.
        assert [j.status.value for j in jobs] == ["completed"] * 20, "the jobs waited"
        assert m.statistics().notifications_delivered == 0
    assert receiver.deliveries == []
    assert m.statistics().notification_failures >= 1


def test_notify_checks_its_arguments_and_never_shows_the_secret() -> None:
    notify = asyncbg.Notify("https://user:pw@app.example/hooks?token=t", secret=SECRET)
    assert SECRET not in repr(notify)
    with pytest.raises(ValueError, match="http:// or https:// URL"):
        asyncbg.Notify("ftp://x/y", secret=SECRET)
    with pytest.raises(ValueError, match="not base64") as info:
        asyncbg.Notify("https://x/y", secret="whsec_!!!")
    assert "!!!" not in str(info.value)
    with pytest.raises(ValueError, match="timeout"):
        asyncbg.Notify("https://x/y", secret=SECRET, timeout=0)
    from asyncbg._notify._notify import endpoint

    assert endpoint(notify.url) == "https://app.example/hooks"


def test_signatures_verify_with_the_openai_sdk() -> None:
    import base64

    import openai

    body = b'{"type":"job.completed"}'
    headers = signed_headers(base64.b64decode(SECRET[6:]), "msg_1", body)
    openai.OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=SECRET)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="x").webhooks.verify_signature(body + b" ", headers,
                                                               secret=SECRET)


# -- the outbox of each ledger ---------------------------------------------------------------------


async def open_outbox(kind: str, tmp_path: Path, dsn: str | None) -> Any:
    if kind == "memory":
        return asyncbg.MemoryLedger()
    if kind == "sqlite":
        ledger: Any = asyncbg.SQLiteLedger(tmp_path / "j.db")
    else:
        assert dsn is not None
        ledger = PostgresLedger(dsn)
    await ledger.open()
    return ledger


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
async def test_the_outbox_of_every_ledger(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dsn = request.getfixturevalue("pg_dsn") if kind == "postgres" else None
    ledger = await open_outbox(kind, tmp_path, dsn)
    try:
        as_object: object = ledger  # (narrowing `ledger` itself would hide its Ledger side)
        assert isinstance(as_object, Outbox)
        url = "http://127.0.0.1:1/h"
        for key in ("a", "b", "c"):
            await ledger.claim(key, A, b"{}")
            await ledger.record(key, Outcome("completed", f"resp_{key}", b"{}",
                                             notification=Notice(f"msg_{key}", url, b"{}")))
        assert await ledger.next_delivery(url) == 0.0
        assert await ledger.next_delivery("http://other/") is None
        one = await ledger.take_deliveries(url, 2, owner="one", lease=30.0)
        two = await ledger.take_deliveries(url, 5, owner="two", lease=30.0)
        assert [d.key for d in one] == ["a", "b"] and [d.key for d in two] == ["c"]
        assert await ledger.take_deliveries(url, 5, owner="three", lease=30.0) == []
        assert 25.0 < (await ledger.next_delivery(url) or 0) <= 30.0  # leased
        await ledger.deliveries_done(["msg_a"])
        await ledger.delivery_failed("msg_b", owner="two", retry_in=0.0, error="not yours",
                                     http_status=500)  # another owner's: ignored
        await ledger.delivery_failed("msg_b", owner="one", retry_in=0.0, error="HTTP 500",
                                     http_status=500)
        await ledger.delivery_failed("msg_c", owner="two", retry_in=None, error="HTTP 410",
                                     http_status=410)
        rows = {d.key: d for d in await ledger.deliveries()}
        assert sorted(rows) == ["b", "c"]
        assert (rows["b"].state, rows["b"].attempts, rows["b"].error) == ("pending", 1,
                                                                         "HTTP 500")
        assert (rows["c"].state, rows["c"].http_status) == ("failed", 410)
        assert [d.key for d in await ledger.take_deliveries(None, 5, owner="x", lease=0.01)] \
            == ["b"]
        await anyio.sleep(0.05)  # its lease ran out: another sender takes it
        assert [d.key for d in await ledger.take_deliveries(url, 5, owner="y", lease=30)] \
            == ["b"]
        assert await ledger.next_delivery(url, held=False) is None  # y holds the one left
        await ledger.release_deliveries(["msg_b"], owner="not y")
        assert (await ledger.next_delivery(url) or 0) > 25.0
        await ledger.release_deliveries(["msg_b"], owner="y")  # y is leaving: due at once
        assert await ledger.next_delivery(url) == 0.0
        [b] = await ledger.take_deliveries(url, 5, owner="z", lease=30)
        await ledger.delivery_failed(b.id, owner="z", retry_in=3600.0, error="down",
                                     http_status=None)
        assert (await ledger.next_delivery(url) or 0) > 3000
        assert await ledger.deliver_now(url) == 1  # the endpoint is back: due now
        assert await ledger.next_delivery(url) == 0.0
        assert await ledger.fail_deliveries(url, older_than=None, error="gone") == 1
        assert await ledger.next_delivery(url) is None
        assert await ledger.retry_failed_deliveries(url) == 2
        assert {d.state for d in await ledger.deliveries()} == {"pending"}
        assert await ledger.fail_deliveries(url, older_than=3600.0, error="old") == 0
    finally:
        await ledger.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_refused_write_writes_no_notification(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The outcome and its notification are one transaction: a write fenced out by another
    process's lease writes neither."""
    if kind == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        first: Any = PostgresLedger(dsn, lease=0.05)
        second: Any = PostgresLedger(dsn, lease=30)
    else:
        first = SharedSQLiteLedger(tmp_path / "j.db", lease=0.05)
        second = SharedSQLiteLedger(tmp_path / "j.db", lease=30)
    await first.open()
    await second.open()
    try:
        await first.claim("k", A, b"{}")
        await first.record("k", Outcome("queued", "resp_1"))
        await anyio.sleep(0.1)
        await second.claim("k", A, b"{}")  # the lease ran out: taken over
        notice = Notice("msg_k", "http://127.0.0.1:1/h", b"{}")
        with pytest.raises(LeaseLost):
            await first.record("k", Outcome("completed", "resp_1", b"{}", notification=notice))
        assert await second.deliveries() == []
        await second.record("k", Outcome("completed", "resp_1", b"{}", notification=notice))
        assert [d.id for d in await first.deliveries()] == ["msg_k"]
    finally:
        await first.close()
        await second.close()


@pytest.mark.asyncio
async def test_a_version_1_postgres_ledger_gains_the_outbox(pg_dsn: str) -> None:
    import psycopg

    from asyncbg._ledgers import _pg_queries as q

    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # as asyncbg 0.2 made it
        for sql in q.CREATE_V1:
            conn.execute(sql)
        conn.execute(q.WRITE_SCHEMA_VERSION, ("1",))
    ledger = PostgresLedger(pg_dsn)
    await ledger.open()
    try:
        assert await ledger.deliveries() == []
    finally:
        await ledger.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT value FROM asyncbg_meta").fetchall() == [
            (str(q.SCHEMA_VERSION),)]
