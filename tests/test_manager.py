"""BackgroundManager end to end, against the in-process fake server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from openai import AsyncOpenAI
from structlog.testing import capture_logs

import asyncbg
from asyncbg import JobStatus
from asyncbg.testing import FakeResponsesServer, FaultRates, LatencyModel, fake_client

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


async def test_fan_out_reaches_but_never_exceeds_max_concurrency(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.latency = LatencyModel.uniform(0.2, 0.3)  # long enough that 5 overlap on a busy box
    async with manager(client, max_concurrency=5) as mgr:
        jobs = [await mgr.submit(model="m", input=f"q{i}") for i in range(40)]
        # submit returns at once, before any slot is free for most jobs
        assert sum(j.status is JobStatus.PENDING for j in jobs) >= 35
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert server.counters.creates == 40
    assert server.counters.max_in_flight == 5
    assert [(await j.result()).output_text for j in jobs] == [f"echo: q{i}" for i in range(40)]
    assert mgr.statistics().by_status["completed"] == 40
    assert mgr.statistics().live == 0


async def test_job_surface(client: AsyncOpenAI, server: FakeResponsesServer) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(key="row-17", model="m", input="hello", reasoning={"effort": "high"})
        assert job.key == "row-17" and job.response_id is None and job.response is None
        assert not job.done and "pending" in repr(job)
        assert await job.wait() is job
        response = await job.result()
    assert job.done and job.status is JobStatus.COMPLETED
    assert job.response_id == response.id and job.response is not None
    assert response.output_text == "echo: hello" and response.usage is not None
    assert "completed" in repr(job) and job.response_id in repr(job)
    auto = mgr.jobs
    assert [j.key for j in auto] == ["row-17"]


async def test_store_true_is_sent_unless_the_caller_set_it(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        default = await mgr.submit(model="m", input="x")
        refused = await mgr.submit(model="m", input="x", store=False)
    assert default.status is JobStatus.COMPLETED and default.response.store is True  # type: ignore[union-attr]
    assert refused.status is JobStatus.FAILED
    assert "store=true" in (refused.error or "")


async def test_keys_are_generated_and_must_be_unique(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        a = await mgr.submit(model="m", input="x")
        b = await mgr.submit(model="m", input="x")
        assert a.key != b.key
        await mgr.submit(key="k", model="m", input="x")
        with pytest.raises(asyncbg.DuplicateKeyError, match="'k'"):
            await mgr.submit(key="k", model="m", input="x")


async def test_using_the_manager_outside_its_block_is_a_clear_error(client: AsyncOpenAI) -> None:
    mgr = manager(client)
    with pytest.raises(RuntimeError, match="async with"):
        await mgr.submit(model="m", input="x")
    async with mgr:
        pass
    with pytest.raises(asyncbg.ManagerStateError, match="exited"):
        await mgr.submit(model="m", input="x")
    with pytest.raises(RuntimeError):
        async with mgr:
            pass


async def test_wait_any_returns_the_first_to_finish_and_times_out(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        slow = await mgr.submit(model="m", input="slow", metadata=meta(0.3))
        fast = await mgr.submit(model="m", input="fast", metadata=meta(0.02))
        assert await mgr.wait_any([slow, fast]) is fast
        stuck = await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
        with pytest.raises(TimeoutError):
            await mgr.wait_any([stuck], timeout=0.05)
        assert not stuck.done  # a timeout leaves the job running
        # already-finished jobs answer at once, earliest finisher first
        await slow.wait()
        assert await mgr.wait_any([slow, fast, stuck]) is fast
        await stuck.cancel()


async def test_wait_all_keeps_order_and_times_out(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        jobs = [await mgr.submit(model="m", input=str(d), metadata=meta(d))
                for d in (0.08, 0.01, 0.04)]
        assert await mgr.wait_all(jobs, timeout=5) == jobs
        assert all(j.done for j in jobs)
        stuck = await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
        with pytest.raises(TimeoutError):
            await mgr.wait_all([*jobs, stuck], timeout=0.05)
        assert stuck.status is JobStatus.QUEUED
        await mgr.cancel_all()


async def test_as_completed_yields_in_completion_order_and_times_out(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        durations = (0.6, 0.05, 0.3)  # apart enough for a loaded machine
        jobs = [await mgr.submit(model="m", input=str(d), metadata=meta(d)) for d in durations]
        order = [j async for j in mgr.as_completed(jobs)]
        assert [j.key for j in order] == [jobs[1].key, jobs[2].key, jobs[0].key]

        stuck = await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
        seen = []
        with pytest.raises(TimeoutError):
            async for j in mgr.as_completed([jobs[0], stuck], timeout=0.05):
                seen.append(j)
        assert seen == [jobs[0]]  # the finished one comes out before the deadline
        assert not stuck.done
        await stuck.cancel()


async def test_timeouts_on_a_job(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        stuck = await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
        with pytest.raises(TimeoutError):
            await stuck.wait(timeout=0.03)
        with pytest.raises(TimeoutError):
            await stuck.result(timeout=0.03)
        await stuck.cancel()


async def test_cancel_a_live_job_on_the_server(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
        await job.wait_accepted()
        await job.cancel()
        assert job.status is JobStatus.CANCELLED
        assert server.status_of(job.response_id) == "cancelled"
        assert server.counters.cancels == 1
        with pytest.raises(asyncbg.JobCancelled) as info:
            await job.result()
        assert info.value.job is job and isinstance(info.value, asyncbg.JobFailed)
        await job.cancel()  # again: a no-op
    assert server.counters.cancels == 1


async def test_cancel_a_finished_job_is_a_no_op(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x")
        await job.wait()
        await job.cancel()
    assert job.status is JobStatus.COMPLETED and server.counters.cancels == 0


@pytest.mark.parametrize("cancel_finished", ["error", "return"])
async def test_cancel_racing_completion_keeps_the_servers_terminal_status(
    client: AsyncOpenAI, server: FakeResponsesServer, cancel_finished: str
) -> None:
    # The response finishes on the server, the client has not polled yet, then cancel() is sent:
    # the server answers 400 (or the final object); the job must end completed, not failed.
    server.cancel_finished = cancel_finished  # type: ignore[assignment]
    slow_poll = asyncbg.PollPolicy(first_poll=60, min_interval=60, max_interval=60)
    async with manager(client, poll_policy=slow_poll) as mgr:
        job = await mgr.submit(model="m", input="x", metadata=meta(0.01))
        await job.wait_accepted()
        await anyio.sleep(0.03)  # it ends on the server at 0.01 s; the client polls at 60 s
        assert server.status_of(job.response_id) == "completed"  # type: ignore[arg-type]
        await job.cancel()
    assert job.status is JobStatus.COMPLETED
    assert (await job.result()).output_text == "echo: x"
    assert server.counters.cancels == 1


async def test_cancel_a_pending_job_sends_nothing(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client, max_concurrency=1) as mgr:
        blocker = await mgr.submit(model="m", input="b", metadata=meta(outcome="stuck"))
        pending = await mgr.submit(model="m", input="p")
        await anyio.sleep(0.02)
        assert pending.status is JobStatus.PENDING
        await pending.cancel()
        assert pending.status is JobStatus.CANCELLED
        with pytest.raises(asyncbg.JobCancelled, match="before it was sent"):
            await pending.result()
        await blocker.cancel()
    assert server.counters.creates == 1 and server.counters.cancels == 1


async def test_cancel_all(client: AsyncOpenAI, server: FakeResponsesServer) -> None:
    async with manager(client, max_concurrency=2) as mgr:
        jobs = [await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
                for _ in range(4)]
        await jobs[0].wait_accepted()
        await jobs[1].wait_accepted()
        await mgr.cancel_all()
        assert all(j.status is JobStatus.CANCELLED for j in jobs)
    assert server.counters.cancels == 2 and server.live_count() == 0


async def test_leaving_normally_waits_for_every_job(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        jobs = [await mgr.submit(model="m", input="x", metadata=meta(0.05)) for _ in range(5)]
    assert all(j.status is JobStatus.COMPLETED for j in jobs)


class Boom(Exception):
    pass


async def test_an_exception_in_the_block_cancels_server_jobs_and_propagates_unchanged(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    boom = Boom("user code failed")
    with pytest.raises(Boom) as info:
        async with manager(client, max_concurrency=3) as mgr:
            jobs = [await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
                    for _ in range(5)]
            for j in jobs[:3]:
                await j.wait_accepted()
            raise boom
    assert info.value is boom  # not wrapped in an ExceptionGroup
    live = [j for j in jobs if j.response_id is not None]
    assert len(live) == 3
    assert all(server.status_of(j.response_id) == "cancelled" for j in live)  # type: ignore[arg-type]
    assert server.live_count() == 0 and server.counters.creates == 3
    assert all(j.status is JobStatus.CANCELLED for j in jobs)


async def test_a_cancelled_host_cancels_server_jobs(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    with anyio.CancelScope() as scope:
        async with manager(client) as mgr:
            job = await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
            await job.wait_accepted()
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught
    assert server.status_of(job.response_id) == "cancelled"
    assert job.done


async def test_cleanup_on_error_is_bounded_in_time(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    # the guard: cleanup gives up after ~cancel_timeout, not the 30 s the cancel would take
    with anyio.fail_after(5), pytest.raises(Boom):
        async with manager(client, cancel_timeout=0.05) as mgr:
            job = await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
            await job.wait_accepted()
            server.inject("slow", route="cancel", delay=30)
            raise Boom
    assert job.done


async def test_failed_and_incomplete_responses(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        failed = await mgr.submit(model="m", input="x", metadata=meta(outcome="failed"))
        incomplete = await mgr.submit(model="m", input="x", metadata=meta(outcome="incomplete"))
        ok = await mgr.submit(model="m", input="x")
    with pytest.raises(asyncbg.JobFailed, match="failed to generate") as info:
        await failed.result()
    assert type(info.value) is asyncbg.JobFailed and failed.status is JobStatus.FAILED
    assert failed.response is not None and failed.response.error is not None
    with pytest.raises(asyncbg.JobIncomplete, match="max_output_tokens"):
        await incomplete.result()
    assert incomplete.response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    assert ok.status is JobStatus.COMPLETED
    assert issubclass(asyncbg.JobFailed, asyncbg.AsyncbgError)


async def test_a_rejected_request_fails_only_its_own_job(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        bad = await mgr.submit(model="", input="x")
        good = [await mgr.submit(model="m", input="x") for _ in range(3)]
    assert bad.status is JobStatus.FAILED and bad.response_id is None
    with pytest.raises(asyncbg.JobFailed, match=r"HTTP 400.*Missing required parameter: 'model'"):
        await bad.result()
    assert all(j.status is JobStatus.COMPLETED for j in good)
    assert mgr.statistics().pending == 0


async def test_storms_of_429_and_5xx_end_with_every_job_done_and_no_duplicate_creates(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.fault_rates = FaultRates(rate_429=0.3, rate_500=0.1, rate_503=0.1, retry_after=0.001,
                                    seed=7)
    async with manager(client, max_concurrency=10) as mgr:
        jobs = [await mgr.submit(model="m", input=f"q{i}") for i in range(60)]
        await mgr.wait_all(jobs)
        # a cancel storm too
        stuck = [await mgr.submit(model="m", input="s", metadata=meta(outcome="stuck"))
                 for _ in range(5)]
        for j in stuck:
            await j.wait_accepted()
        await mgr.cancel_all()
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert all(j.status is JobStatus.CANCELLED for j in stuck)
    assert server.counters.creates == 65  # every 429/5xx create created nothing; none resent twice
    assert server.counters.faults > 50 and mgr.statistics().retries == server.counters.faults
    assert mgr.statistics().possible_duplicates == 0


async def test_a_dropped_create_is_retried_and_counted_as_a_possible_duplicate(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("reset_after", route="create")  # processed, then the answer is lost
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x")
    assert job.status is JobStatus.COMPLETED
    assert server.counters.creates == 2  # the unavoidable duplicate, made visible:
    assert mgr.statistics().possible_duplicates == 1


async def test_timeouts_and_resets_on_polls_are_retried(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("reset", route="retrieve", times=3)
    server.inject("503", route="retrieve", times=2)
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x")
    assert job.status is JobStatus.COMPLETED and mgr.statistics().retries == 5


async def test_retries_give_up_with_a_clear_message(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("500", route="create", times=100)
    async with manager(client, retry_policy=asyncbg.RetryPolicy(max_attempts=3, base=0)) as mgr:
        job = await mgr.submit(model="m", input="x")
    assert job.status is JobStatus.FAILED
    assert "create failed after 3 attempts" in (job.error or "")
    assert server.counters.creates == 0


async def test_a_restart_that_keeps_state_is_survived_and_one_that_loses_it_fails_cleanly(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        kept = await mgr.submit(model="m", input="x", metadata=meta(0.05))
        await kept.wait_accepted()
        server.restart(keep_state=True, downtime=0.03)
        await kept.wait()
        lost = await mgr.submit(model="m", input="x", metadata=meta(0.2))
        await lost.wait_accepted()
        server.restart(keep_state=False)
        await lost.wait()
    assert kept.status is JobStatus.COMPLETED
    assert lost.status is JobStatus.FAILED and "not found" in (lost.error or "")


async def test_slow_answers_do_not_block_other_jobs(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("slow", route="create", delay=0.3)
    async with manager(client) as mgr:
        slow = await mgr.submit(model="m", input="slow")
        # Wait until its create is on the wire, meeting the slow answer (the SDK's first request
        # may go through a worker thread first, so "all tasks blocked" is not enough).
        while not server.counters.faults:  # noqa: ASYNC110 - the fake has no event for this
            await anyio.sleep(0.001)
        fast = await mgr.submit(model="m", input="fast")
        first = await mgr.wait_any([slow, fast])
    assert first is fast and slow.status is JobStatus.COMPLETED


async def test_the_servers_poll_after_hint_is_honoured(server: FakeResponsesServer) -> None:
    server.poll_after_ms = 5
    client = fake_client(server)
    lazy = asyncbg.PollPolicy(first_poll=0.2, min_interval=0.2, max_interval=0.2)
    try:
        async with manager(client, poll_policy=lazy) as mgr:
            job = await mgr.submit(model="m", input="x", metadata=meta(0.3))
        hinted = server.counters.polls[job.response_id]  # type: ignore[index]
        server.poll_after_ms = None
        async with manager(client, poll_policy=lazy) as mgr:
            job = await mgr.submit(model="m", input="x", metadata=meta(0.15))
        plain = server.counters.polls[job.response_id]  # type: ignore[index]
    finally:
        await client.close()
    assert plain == 1  # policy alone: first poll at 0.2 s sees it done
    assert hinted >= 5  # the 5 ms hint was followed instead


async def test_discounted_windows_are_polled_less(server: FakeResponsesServer) -> None:
    server.clock = clock = HeldClock()  # both stay live while the polls are counted
    clock.hold()
    client = fake_client(server)
    policy = asyncbg.PollPolicy(first_poll=0.05, min_interval=0.05, max_interval=0.05,
                                jitter=0, window_scale={"8h": 20.0})
    try:
        async with manager(client, poll_policy=policy) as mgr:
            flex = await mgr.submit(model="m", input="x", metadata=meta(1.0),
                                    background_options={"completion_window": "8h"})
            std = await mgr.submit(model="m", input="x", metadata=meta(1.0))
            await flex.wait_accepted()
            await std.wait_accepted()
            polls = server.counters.polls
            flex_id, std_id = str(flex.response_id), str(std.response_id)
            with anyio.fail_after(120):
                while polls.get(std_id, 0) < 21:  # noqa: ASYNC110 (no event for a poll)
                    await anyio.sleep(0.01)
            # every 0.05 s against every second: a loaded loop's lag narrows it, not to 3x
            assert polls.get(flex_id, 0) * 3 < polls[std_id]
            clock.advance(2.0)
            await mgr.wait_all([flex, std])
    finally:
        await client.close()


async def test_logging_events_carry_context_and_no_secrets(client: AsyncOpenAI) -> None:
    with capture_logs() as logs:
        async with manager(client) as mgr:
            job = await mgr.submit(key="k1", model="m", input="top secret prompt")
            await job.wait_accepted()
            await job.wait()
            stuck = await mgr.submit(key="k2", model="m", input="s", metadata=meta(outcome="stuck"))
            await stuck.wait_accepted()
            await stuck.cancel()
    events = {e["event"] for e in logs}
    assert {"job.submitted", "job.status_changed", "job.terminal", "job.cancel_sent"} <= events
    submitted = next(e for e in logs if e["event"] == "job.submitted" and e["key"] == "k1")
    assert submitted["response_id"] == job.response_id and "elapsed" in submitted
    assert "status" in submitted
    text = repr(logs)
    assert "top secret prompt" not in text and "sk-fake" not in text


async def test_retry_is_logged_with_its_attempt(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("429", route="create", retry_after=0.001)
    with capture_logs() as logs:
        async with manager(client) as mgr:
            await mgr.submit(key="r", model="m", input="x")
    retry = next(e for e in logs if e["event"] == "request.retry")
    assert retry["key"] == "r" and retry["attempt"] == 1 and retry["status_code"] == 429


async def test_prompts_are_logged_only_when_asked(client: AsyncOpenAI) -> None:
    with capture_logs() as logs:
        async with manager(client, log_prompts=True) as mgr:
            await mgr.submit(model="m", input="visible prompt")
    assert any(e.get("input") == "visible prompt" for e in logs)
