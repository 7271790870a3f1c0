"""The engine's promises: one create per key, a live job never abandoned, outcomes never dressed up.

Each test here is a case that the engine before the rebuild got wrong (see issues 10 and 11).
"""

from __future__ import annotations

import socket
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from openai import AsyncOpenAI
from structlog.testing import capture_logs

import asyncbg
from asyncbg import JobStatus
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_POLL, FAST_RETRY, manager, meta

pytestmark = pytest.mark.asyncio


async def test_concurrent_submits_of_one_key_create_one_response(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    errors: list[BaseException] = []
    jobs: list[asyncbg.Job] = []

    async def submit(mgr: asyncbg.BackgroundManager) -> None:
        try:
            jobs.append(await mgr.submit(key="same", model="m", input="x"))
        except asyncbg.DuplicateKeyError as exc:
            errors.append(exc)

    async with manager(client, journal=tmp_path / "j.db") as mgr, \
            anyio.create_task_group() as tg:
        tg.start_soon(submit, mgr)
        tg.start_soon(submit, mgr)
    assert len(jobs) == 1 and len(errors) == 1
    assert server.counters.creates == 1 and [j.key for j in mgr.jobs] == ["same"]


async def test_poll_failures_never_end_a_live_job(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    # More consecutive poll failures than the retry policy allows for a create: the response
    # exists and is paid for, so polling backs off and goes on.
    server.inject("500", route="retrieve", times=12)
    server.inject("reset", route="retrieve", times=3)
    policy = asyncbg.RetryPolicy(max_attempts=3, base=0.001, max_backoff=0.005)
    async with manager(client, retry_policy=policy) as mgr:
        job = await mgr.submit(model="m", input="x", metadata=meta(0.02))
    assert job.status is JobStatus.COMPLETED and job.error is None
    assert mgr.statistics().retries == 15


async def test_a_response_the_server_forgot_is_reported_lost_not_in_progress(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    async with manager(client, journal=tmp_path / "j.db") as mgr:
        job = await mgr.submit(key="k", model="m", input="x", metadata=meta(0.3))
        await job.wait_accepted()
        server.restart(keep_state=False)
        await job.wait()
    assert job.status is JobStatus.FAILED and job.error_code == "response_lost"
    assert job.response_id is not None and job.response_id in (job.error or "")
    assert "not found" in (job.error or "")
    ledger = asyncbg.SQLiteLedger(tmp_path / "j.db")
    await ledger.open()
    record = await ledger.get("k")
    await ledger.close()
    assert record is not None and record.status == "failed" and record.http_status == 404
    assert record.error_code == "response_lost"


@pytest.mark.parametrize("style", ["detail", "text"])
async def test_error_text_is_read_from_every_body_shape(style: str) -> None:
    server = FakeResponsesServer(error_style=style)  # type: ignore[arg-type]
    client = fake_client(server)
    try:
        async with manager(client) as mgr:
            job = await mgr.submit(model="", input="x")
    finally:
        await client.close()
    assert job.status is JobStatus.FAILED
    assert "Missing required parameter: 'model'" in (job.error or ""), job.error
    assert "HTTP 400" in (job.error or "")


async def test_stream_refused_in_a_detail_body_falls_back_to_polling() -> None:
    server = FakeResponsesServer(refuse_background_stream=True, error_style="detail",
                                 latency=LatencyModel.fixed(0.02))
    client = fake_client(server)
    try:
        async with manager(client) as mgr:
            job = await mgr.submit(model="m", input="x", stream=True)
    finally:
        await client.close()
    assert job.status is JobStatus.COMPLETED
    assert server.counters.creates == 1 and server.counters.retrieves >= 1


async def test_an_html_answer_is_a_clear_job_error_naming_url_and_content_type(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("html", route="create")
    with capture_logs() as logs:
        async with manager(client) as mgr:
            bad = await mgr.submit(model="m", input="x")
            good = await mgr.submit(model="m", input="y")
    assert bad.status is JobStatus.FAILED and good.status is JobStatus.COMPLETED
    assert "text/html" in (bad.error or "") and "/responses" in (bad.error or "")
    assert not any(e["event"] == "job.crashed" for e in logs)  # no traceback for it


async def test_request_fields_never_collide_with_submit_keywords(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    body = {"model": "m", "input": "x", "key": "a body field", "poll_policy": 3,
            "metadata": {"key": "k"}}
    async with manager(client) as mgr:
        job = await mgr.submit_request(body, key="row-1")
    assert job.key == "row-1" and job.status is JobStatus.COMPLETED


async def test_a_refused_connection_fails_fast_and_is_no_possible_duplicate() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = AsyncOpenAI(api_key="sk-x", base_url=f"http://127.0.0.1:{port}/v1")
    try:
        async with manager(client, max_concurrency=4,
                           retry_policy=asyncbg.RetryPolicy(max_attempts=8)) as mgr:
            jobs = [await mgr.submit(model="m", input=str(i)) for i in range(20)]
    finally:
        await client.close()
    assert all(j.status is JobStatus.FAILED for j in jobs)
    assert {j.error_code for j in jobs} == {"connection_error"}
    assert all(f"127.0.0.1:{port}" in (j.error or "") for j in jobs)
    stats = mgr.statistics()
    assert stats.possible_duplicates == 0
    # a few attempts for the first creates, then every other job fails without a request
    assert stats.requests <= 4 * 3


async def test_a_long_retry_after_is_a_warning_when_the_wait_starts(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("429", route="create", retry_after=3600)
    policy = asyncbg.RetryPolicy(max_attempts=3, base=0.001, max_retry_after=0.01)
    with capture_logs() as logs:
        async with manager(client, retry_policy=policy) as mgr:
            job = await mgr.submit(model="m", input="x")
    assert job.status is JobStatus.COMPLETED
    warned = [e for e in logs if e["event"].startswith("rate limited by the server: waiting")]
    assert warned and warned[0]["log_level"] == "warning" and warned[0]["retry_after"] == 3600


async def test_a_deadline_cancels_the_job_on_the_server(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", metadata=meta(outcome="stuck"),
                               deadline=0.05)
        ok = await mgr.submit(model="m", input="y", deadline=30)
    assert job.status is JobStatus.CANCELLED and job.error_code == "deadline_exceeded"
    assert server.status_of(job.response_id) == "cancelled"  # type: ignore[arg-type]
    assert ok.status is JobStatus.COMPLETED


class Boom(Exception):
    pass


async def test_cancel_on_exit_false_leaves_live_responses_running_for_a_rerun(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "j.db"
    with pytest.raises(Boom):
        async with manager(client, journal=db, cancel_on_exit=False, max_concurrency=2) as mgr:
            jobs = [await mgr.submit(key=f"k{i}", model="m", input="x", metadata=meta(0.3))
                    for i in range(4)]
            await jobs[0].wait_accepted()
            await jobs[1].wait_accepted()
            raise Boom
    assert server.counters.cancels == 0
    live = [j for j in jobs if j.response_id is not None]
    assert len(live) == 2 and all(server.status_of(j.response_id) != "cancelled"  # type: ignore[arg-type]
                                  for j in live)
    assert all(not j.done for j in live)  # detached, not dressed up as cancelled
    with pytest.raises(asyncbg.ManagerStateError, match="left running"):
        await live[0].wait()
    # the rerun collects the live ones (no new create) and sends the two never sent
    async with manager(client, journal=db) as mgr:
        again = [await mgr.submit(key=f"k{i}", model="m", input="x", metadata=meta(0.3))
                 for i in range(4)]
    assert all(j.status is JobStatus.COMPLETED for j in again)
    assert [j.response_id for j in again[:2]] == [j.response_id for j in live]
    assert server.counters.creates == 4


async def test_attach_follows_a_recorded_key_without_its_request(
    client: AsyncOpenAI, server: FakeResponsesServer, tmp_path: Path
) -> None:
    db = tmp_path / "j.db"
    with pytest.raises(Boom):
        async with manager(client, journal=db, cancel_on_exit=False) as mgr:
            job = await mgr.submit(key="k", model="m", input="x", metadata=meta(0.2))
            await job.wait_accepted()
            raise Boom
    async with manager(client, journal=db) as mgr:
        attached = await mgr.attach("k")
        with pytest.raises(LookupError):
            await mgr.attach("never-sent")
    assert attached.status is JobStatus.COMPLETED and attached.response_id == job.response_id
    assert server.counters.creates == 1


async def test_wait_any_across_two_managers(server: FakeResponsesServer) -> None:
    one, two = fake_client(server), fake_client(server)
    try:
        async with manager(one) as m1, manager(two) as m2:
            slow = await m1.submit(model="m", input="s", metadata=meta(0.3))
            fast = await m2.submit(model="m", input="f", metadata=meta(0.02))
            assert await m1.wait_any([slow, fast]) is fast
    finally:
        await one.close()
        await two.close()


async def test_a_failed_callback_does_not_stop_the_others(client: AsyncOpenAI) -> None:
    seen: list[str] = []

    def bad(job: asyncbg.Job) -> None:
        raise RuntimeError("callback bug")

    async with manager(client) as mgr:
        job = await mgr.submit(key="k", model="m", input="x")
        job.add_done_callback(bad)
        job.add_done_callback(lambda j: seen.append(j.key))
    assert seen == ["k"]
    job.add_done_callback(lambda j: seen.append("late"))  # added when done: runs at once
    assert seen == ["k", "late"]


QUIET = """
import anyio
import asyncbg
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

async def main():
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.02))
    server.inject("500", route="create")
    client = fake_client(server)
    policy = asyncbg.PollPolicy(first_poll=0.005, min_interval=0.005, max_interval=0.02)
    retry = asyncbg.RetryPolicy(base=0.001)
    async with asyncbg.BackgroundManager(client, poll_policy=policy, retry_policy=retry) as mgr:
        for i in range(5):
            await mgr.submit(model="m", input=str(i))
        await mgr.submit(model="", input="rejected")
    await client.close()
    print("RESULT", dict(sorted(mgr.statistics().by_status.items())))

anyio.run(main)
"""


async def test_the_library_is_quiet_unconfigured() -> None:
    done = await anyio.run_process([sys.executable, "-c", textwrap.dedent(QUIET)], check=False)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    # stdout holds only what the script printed; no debug or info line anywhere
    assert out.splitlines() == ["RESULT {'completed': 5, 'failed': 1}"], out
    assert "job.terminal" not in err and "job.submitted" not in err
    assert "request.retry" not in err


async def test_webhook_app_refuses_big_bodies_and_malformed_headers(
    server: FakeResponsesServer,
) -> None:
    client = fake_client(server, webhook_secret=asyncbg.testing.new_secret())
    try:
        async with asyncbg.BackgroundManager(client, webhooks=True,
                                             poll_policy=FAST_POLL, retry_policy=FAST_RETRY) as mgr:
            app = asyncbg.webhook_app(mgr, max_body=1000)
            reads = 0

            async def call(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> int:
                nonlocal reads
                sent: list[dict[str, object]] = []
                pending = list(chunks)

                async def receive() -> dict[str, object]:
                    nonlocal reads
                    reads += 1
                    body = pending.pop(0) if pending else b""
                    return {"type": "http.request", "body": body, "more_body": bool(pending)}

                async def send(message: dict[str, object]) -> None:
                    sent.append(message)

                scope = {"type": "http", "method": "POST", "headers": headers}
                await app(scope, receive, send)  # type: ignore[arg-type]
                return int(sent[0]["status"])  # type: ignore[call-overload]

            declared = await call([(b"content-length", b"100000000")], [b"x"])
            assert declared == 413 and reads == 0  # refused before reading anything
            streamed = await call([], [b"x" * 600, b"x" * 600, b"x" * 600])
            assert streamed == 413 and reads == 2  # stopped as soon as it passed the limit
            odd = await call([(b"webhook-id", b"msg_1"), (b"webhook-timestamp", b"1"),
                              (b"webhook-signature", "v1,é".encode())], [b"{}"])
            assert odd == 400
    finally:
        await client.close()
