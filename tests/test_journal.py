"""The journal: re-attach after a crash instead of paying twice."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from openai import AsyncOpenAI

import asyncbg
from asyncbg import JobStatus, Journal, JournalMismatchError, Outcome
from asyncbg._ledgers import canonical, digest
from asyncbg.testing import FakeResponsesServer, fake_client

from .conftest import HeldClock, manager, meta

# The core suite runs on both of anyio's backends (on trio, polls take the SDK path).
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client(server: FakeResponsesServer) -> AsyncIterator[AsyncOpenAI]:
    c = fake_client(server)
    try:
        yield c
    finally:
        await c.close()


def params(**kw: object) -> dict[str, object]:
    return {"model": "m", "input": "x", **kw}


async def test_a_finished_job_is_served_from_the_journal_without_a_request(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "run.db"
    async with manager(client, journal=db) as mgr:
        first = await mgr.submit(key="k", **params())
    assert first.status is JobStatus.COMPLETED
    before = (server.counters.creates, server.counters.retrieves)
    async with manager(client, journal=db) as mgr:
        again = await mgr.submit(key="k", **params())
        assert again.done  # at once
    assert (server.counters.creates, server.counters.retrieves) == before
    assert (await again.result()).output_text == "echo: x"
    assert again.response_id == first.response_id


async def test_a_failed_job_is_served_too(client: AsyncOpenAI, tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    async with manager(client, journal=db) as mgr:
        await mgr.submit(key="f", **params(metadata=meta(outcome="failed")))
    async with manager(client, journal=db) as mgr:
        job = await mgr.submit(key="f", **params(metadata=meta(outcome="failed")))
    with pytest.raises(asyncbg.JobFailed, match="failed to generate"):
        await job.result()


async def _left_by_a_killed_process(
    db: Path, client: AsyncOpenAI, key: str, p: dict[str, object], *, recorded: bool
) -> str:
    """Write the journal exactly as a process killed mid-run leaves it."""
    journal = Journal(db)
    await journal.open()
    full = {**p, "background": True, "store": True}
    await journal.claim(key, digest(full), canonical(full))
    await journal.sending(key, resubmit=False)
    r = await client.responses.create(**full)  # type: ignore[call-overload]
    if recorded:
        await journal.record(key, Outcome(r.status, r.id))  # type: ignore[arg-type]
    await journal.close()
    return str(r.id)


async def test_a_live_job_resumes_polling_its_response(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "run.db"
    p = params(metadata=meta(0.1))
    rid = await _left_by_a_killed_process(db, client, "live", p, recorded=True)
    async with manager(client, journal=db) as mgr:
        job = await mgr.submit(key="live", **p)
        assert job.response_id == rid and job.status is JobStatus.QUEUED
    assert job.status is JobStatus.COMPLETED and job.response_id == rid
    assert server.counters.creates == 1  # only the killed process's create
    assert mgr.statistics().possible_duplicates == 0


async def test_a_job_caught_in_the_create_window_is_resubmitted_and_counted(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "run.db"
    await _left_by_a_killed_process(db, client, "w", params(), recorded=False)
    async with manager(client, journal=db) as mgr:
        job = await mgr.submit(key="w", **params())
    assert job.status is JobStatus.COMPLETED
    assert server.counters.creates == 2  # the unavoidable duplicate...
    assert mgr.statistics().possible_duplicates == 1  # ...counted
    journal = Journal(db)
    await journal.open()
    assert await journal.resubmits() == 1
    await journal.close()


async def test_a_key_reused_with_a_different_request_is_an_error_naming_it(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "run.db"
    async with manager(client, journal=db) as mgr:
        await mgr.submit(key="row-17", **params())
    async with manager(client, journal=db) as mgr:
        with pytest.raises(JournalMismatchError, match=r"'row-17'.*different request"):
            await mgr.submit(key="row-17", **params(input="something else"))
    assert server.counters.creates == 1
    assert issubclass(JournalMismatchError, asyncbg.AsyncbgError)


async def test_the_journal_is_private_and_records_each_status_and_the_final_json(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "run.db"
    server.clock = clock = HeldClock()  # each status lasts until the test moves time on
    clock.hold()
    async with manager(client, journal=db) as mgr:
        job = await mgr.submit(key="k", **params(metadata={**meta(1.0), "fake_queue": "0.5"}))
        await job.wait_accepted()
        clock.advance(0.6)
        with anyio.fail_after(30):
            while job.status is not JobStatus.IN_PROGRESS:  # noqa: ASYNC110 (no event for it)
                await anyio.sleep(0.005)
        clock.advance(0.6)
        await job.wait()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    con = sqlite3.connect(db)
    state, rid, status, body = con.execute(
        "SELECT state, response_id, status, response FROM jobs WHERE key='k'").fetchone()
    statuses = [s for (s,) in con.execute("SELECT status FROM events WHERE key='k' ORDER BY id")]
    con.close()
    assert (state, rid, status) == ("done", job.response_id, "completed")
    assert json.loads(body)["output"][0]["content"][0]["text"] == "echo: x"
    assert statuses == ["queued", "in_progress", "completed"]


async def test_a_rejected_job_is_sent_again_on_rerun(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    # Nothing was created for it, so nothing can be paid twice; the rerun may succeed.
    db = tmp_path / "run.db"
    server.inject("500", route="create", times=100)
    async with manager(client, journal=db,
                       retry_policy=asyncbg.RetryPolicy(max_attempts=2, base=0)) as mgr:
        job = await mgr.submit(key="k", **params())
    assert job.status is JobStatus.FAILED
    server._faults.clear()
    async with manager(client, journal=db) as mgr:
        job = await mgr.submit(key="k", **params())
    assert job.status is JobStatus.COMPLETED and server.counters.creates == 1


async def test_journal_given_as_an_object(client: AsyncOpenAI, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    async with manager(client, journal=journal) as mgr:
        await mgr.submit(key="a", **params())
    assert mgr.journal is journal
