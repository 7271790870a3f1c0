"""A live job keeps no body: only its id and status; the final body once it is terminal.

100,000 live jobs in one process would otherwise hold 100,000 answers (a real create answer
echoes the whole request). ``job.body`` and ``job.response`` are None while the job is live;
once it is terminal they are the final answer, exactly as the server sent it, and the journal
records the same bytes it always did.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI

import asyncbg
from asyncbg import JobStatus
from asyncbg._engine._job import Job, JobControl
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import manager, meta


class _Clock:
    """The fake server's clock, moved by the test (the job's length is then no wait)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Polls:
    """A hook that says when the second status check came back: by then the answers to the
    create and to the first check (the job is live) have been applied to the job."""

    def __init__(self) -> None:
        self.polls = 0
        self.second = anyio.Event()

    def job_submitted(self, job: Job, params: Any) -> None:
        pass

    def request_done(self, job: Job, kind: str, http_status: int | None,
                     seconds: float) -> None:
        if kind == "poll":
            self.polls += 1
            if self.polls == 2:
                self.second.set()

    def job_finished(self, job: Job) -> None:
        pass

    def job_detached(self, job: Job) -> None:
        pass


@pytest.mark.asyncio
@pytest.mark.parametrize("journal", [False, True])
async def test_a_live_job_keeps_no_body_and_a_terminal_one_keeps_the_final_one(
    tmp_path: Path, journal: bool
) -> None:
    clock = _Clock()
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.0), clock=clock)
    client = fake_client(server)
    seen: list[bytes | None] = []
    try:
        polls = _Polls()
        kwargs: dict[str, Any] = {"journal": tmp_path / "j.db"} if journal else {}
        async with manager(client, hooks=[polls], **kwargs) as mgr:
            job = await mgr.submit(key="k", model="m", input="x", metadata=meta(10.0))
            job.add_done_callback(lambda j: seen.append(j.body))
            await job.wait_accepted()
            # Answers have arrived (the create's, then status checks saying in_progress)...
            await polls.second.wait()
            assert job.status in (JobStatus.QUEUED, JobStatus.IN_PROGRESS)
            assert job.response_id is not None
            # ... and none of them is kept.
            assert job.body is None and job.response is None
            assert job.usage is None and job.tokens is None
            clock.now = 100.0  # the server's job is over
            response = await job.result()
    finally:
        await client.close()
    assert job.status is JobStatus.COMPLETED
    assert job.body is not None
    data = json.loads(job.body)
    assert data["id"] == job.response_id and data["status"] == "completed"
    assert response is job.response and response.status == "completed"
    assert response.output_text and job.tokens is not None and job.usage is not None
    assert seen == [job.body]  # a done callback sees the final body
    if journal:
        ledger = asyncbg.SQLiteLedger(tmp_path / "j.db")
        await ledger.open()
        try:
            record = await ledger.get("k")
        finally:
            await ledger.close()
        assert record is not None and record.status == "completed"
        assert record.body == job.body  # the journal records the final body, unchanged


@pytest.mark.asyncio
async def test_a_cancelled_live_job_keeps_the_cancel_answer(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", metadata=meta(60.0))
        await job.wait_accepted()
        assert job.body is None
        await job.cancel()
    assert job.status is JobStatus.CANCELLED and job.body is not None
    assert json.loads(job.body)["status"] == "cancelled"


@pytest.mark.asyncio
async def test_a_job_lost_on_the_server_ends_without_a_body(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", metadata=meta(60.0))
        await job.wait_accepted()
        server.restart(keep_state=False)
        await job.wait()
    assert job.error_code == "response_lost"
    assert job.body is None and job.response is None  # no final answer: none is made up


# -- JobControl, the one door: any sequence of updates -------------------------------------


class _Owner:
    """The least a job needs of its owner here."""

    class _Callbacks:
        def finished(self, job: Job, callbacks: Iterable[Callable[[Job], object]]) -> None:
            for fn in callbacks:
                fn(job)

        def late(self, job: Job, fn: Callable[[Job], object]) -> None:
            fn(job)

    callbacks = _Callbacks()

    async def cancel_job(self, job: Job) -> None:
        raise AssertionError("not here")

    def parse_result(self, body: bytes) -> Any:
        return body

    def parse_event(self, data: dict[str, Any]) -> Any:
        return data


_updates = st.lists(
    st.tuples(st.sampled_from(list(JobStatus)),
              st.one_of(st.none(), st.binary(min_size=1, max_size=8))),
    max_size=12)


@settings(max_examples=200, deadline=None)
@given(_updates)
def test_body_is_none_while_live_and_the_first_terminal_answer_after(
    updates: list[tuple[JobStatus, bytes | None]]
) -> None:
    async def run() -> None:
        job = Job(_Owner(), "k")  # type: ignore[arg-type]
        control = JobControl(job)
        final: bytes | None = None
        ended = False
        for status, body in updates:
            control.update(status, body=body, response_id="resp_1")
            if not ended and status.terminal:
                ended, final = True, body
            assert job.done is ended
            if not ended:
                assert job.body is None and job.response is None
            else:
                assert job.body == final  # kept from the terminal answer, never replaced

    anyio.run(run)
