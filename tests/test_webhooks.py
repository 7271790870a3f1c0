"""Webhooks: verified, deduplicated pushes resolve jobs at once; polling is only a safety net."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from structlog.testing import capture_logs

import asyncbg
from asyncbg import JobStatus
from asyncbg.testing import (
    FakeResponsesServer,
    LatencyModel,
    fake_client,
    new_secret,
    signed_delivery,
)

from .conftest import FAST_RETRY

pytestmark = pytest.mark.asyncio
SECRET = new_secret()
#: A safety net far longer than any test: a job can only finish here through a webhook.
NO_POLLS = asyncbg.PollPolicy.safety_net(100.0)


@pytest_asyncio.fixture
async def client(server: FakeResponsesServer) -> AsyncIterator[AsyncOpenAI]:
    c = fake_client(server, webhook_secret=SECRET)
    try:
        yield c
    finally:
        await c.close()


def manager(client: AsyncOpenAI, **kw: object) -> asyncbg.BackgroundManager:
    kw.setdefault("poll_policy", NO_POLLS)
    return asyncbg.BackgroundManager(client, webhooks=True, retry_policy=FAST_RETRY,
                                     **kw)  # type: ignore[arg-type]


async def test_webhooks_resolve_jobs_with_no_polling(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr, server.webhooks(mgr.handle_webhook, SECRET):
        jobs = [await mgr.submit(model="m", input=f"q{i}") for i in range(20)]
        with anyio.fail_after(10):  # without the pushes these would wait 100 s
            await mgr.wait_all(jobs)
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert (await jobs[3].result()).output_text == "echo: q3"
    assert server.counters.webhooks_sent == 20
    # one fetch per job, for the final Response the payload does not carry
    assert server.counters.retrieves == 20
    assert mgr.statistics().polls == 20


async def test_failed_cancelled_and_incomplete_events(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr, server.webhooks(mgr.handle_webhook, SECRET):
        failed = await mgr.submit(model="m", input="x", metadata={"fake_outcome": "failed"})
        inc = await mgr.submit(model="m", input="x", metadata={"fake_outcome": "incomplete"})
        with anyio.fail_after(10):
            await mgr.wait_all([failed, inc])
    assert failed.status is JobStatus.FAILED and inc.status is JobStatus.INCOMPLETE


async def _deliver(mgr: asyncbg.BackgroundManager, body: bytes,
                   headers: dict[str, str]) -> int:
    return await mgr.handle_webhook(body, headers)


async def test_forged_stale_and_replayed_deliveries_are_rejected_and_change_nothing(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", metadata={"fake_outcome": "stuck"})
        rid = await job.wait_accepted()
        assert rid is not None
        with capture_logs() as logs:
            forged_body, forged_headers = signed_delivery(new_secret(), "response.completed", rid)
            assert await _deliver(mgr, forged_body, forged_headers) == 400

            body, headers = signed_delivery(SECRET, "response.completed", rid)
            tampered = body.replace(b"response.completed", b"response.cancelled")
            assert await _deliver(mgr, tampered, headers) == 400

            stale_body, stale_headers = signed_delivery(
                SECRET, "response.completed", rid, timestamp=int(time.time()) - 301)
            assert await _deliver(mgr, stale_body, stale_headers) == 400

            assert await _deliver(mgr, body, {}) == 400  # no signature at all

            assert await _deliver(mgr, body, headers) == 200
            assert await _deliver(mgr, body, headers) == 409  # replayed webhook-id
        rejected = [e for e in logs if e["event"] == "webhook.rejected"]
        assert len(rejected) == 5
        stats = mgr.statistics()
        assert (stats.webhooks_accepted, stats.webhooks_rejected) == (1, 5)
        assert any("too old" in e["reason"] for e in rejected)
        assert any("replay" in e["reason"] for e in rejected)
        await anyio.sleep(0.05)
        # the one genuine delivery woke the job; the server says it is still queued
        assert job.status is JobStatus.QUEUED and server.counters.retrieves == 1
        await job.cancel()


async def test_an_unknown_response_id_is_acknowledged_and_ignored(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        body, headers = signed_delivery(SECRET, "response.completed", "resp_not_ours")
        assert await mgr.handle_webhook(body, headers) == 200


async def test_a_lost_webhook_is_caught_by_the_safety_net_poll(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    net = asyncbg.PollPolicy.safety_net(0.3)
    async with manager(client, poll_policy=net) as mgr, server.webhooks(
        mgr.handle_webhook, SECRET, drop_rate=1.0
    ):
        job = await mgr.submit(model="m", input="x")
        with anyio.fail_after(10):
            await job.wait()
    assert job.status is JobStatus.COMPLETED
    assert server.counters.webhooks_dropped == 1 and server.counters.webhooks_sent == 0
    assert mgr.statistics().polls == 1  # the safety net, once


async def test_duplicate_deliveries_are_deduplicated(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    async with manager(client) as mgr, server.webhooks(
        mgr.handle_webhook, SECRET, duplicate_rate=1.0
    ):
        jobs = [await mgr.submit(model="m", input="x") for _ in range(5)]
        with anyio.fail_after(10):
            await mgr.wait_all(jobs)
    assert server.counters.webhooks_sent == 5 and server.counters.webhooks_failed == 5  # 409s
    assert mgr.statistics().polls == 5


async def test_a_webhook_faster_than_the_create_answer_is_kept(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.latency = LatencyModel.fixed(0.0)
    server.inject("slow", route="create", delay=0.1)  # the answer lags the webhook
    async with manager(client) as mgr, server.webhooks(mgr.handle_webhook, SECRET):
        job = await mgr.submit(model="m", input="x")
        with anyio.fail_after(10):
            await job.wait()
    assert job.status is JobStatus.COMPLETED


async def test_webhooks_need_a_secret(server: FakeResponsesServer) -> None:
    c = fake_client(server)
    try:
        with pytest.raises(ValueError, match="OPENAI_WEBHOOK_SECRET"):
            asyncbg.BackgroundManager(c, webhooks=True)
    finally:
        await c.close()


async def test_webhook_app_served_by_uvicorn_receives_real_http_deliveries(
    client: AsyncOpenAI, server: FakeResponsesServer
) -> None:
    import uvicorn

    from asyncbg._asgi import listen

    sock = listen("127.0.0.1", 0)  # its connections send at once (TCP_NODELAY)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    async with manager(client) as mgr:
        web = uvicorn.Server(uvicorn.Config(asyncbg.webhook_app(mgr), log_level="error",
                                            lifespan="off"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(web.serve, [sock])
            async with server.webhooks(url, SECRET):
                jobs = [await mgr.submit(model="m", input="x") for _ in range(5)]
                with anyio.fail_after(10):
                    await mgr.wait_all(jobs)
            web.should_exit = True
    sock.close()
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    # each finished through its delivery: one fetch apiece, no safety-net poll (100 s)
    assert mgr.statistics().polls == 5
    assert server.counters.webhooks_failed == 0


# -- a flood of forged bodies ---------------------------------------------------------------------


class _Forged:
    """Stands in for a manager: every delivery is forged (400), and it counts them."""

    def __init__(self) -> None:
        self.handled = 0

    async def handle_webhook(self, body: bytes, headers: object) -> int:
        self.handled += 1
        return 400


async def _post(app: object, size: int, *, declared: bool | bytes, chunk: int = 64 * 1024
                ) -> int:
    """One POST of ``size`` bytes through the ASGI ``app``, read slowly: a chunk per turn.
    ``declared``: send a Content-Length (this value, if bytes)."""
    sent = 0
    status = 0

    async def receive() -> dict[str, object]:
        nonlocal sent
        await anyio.lowlevel.checkpoint()
        n = min(chunk, size - sent)
        sent += n
        return {"type": "http.request", "body": bytes(n), "more_body": sent < size}

    async def send(message: dict[str, object]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])  # type: ignore[call-overload]

    length = declared if isinstance(declared, bytes) else str(size).encode()
    headers = [(b"content-length", length)] if declared else []
    await app({"type": "http", "method": "POST", "headers": headers},  # type: ignore[operator]
              receive, send)
    return status


async def test_a_flood_of_large_forged_bodies_holds_bounded_memory() -> None:
    import tracemalloc

    from asyncbg._engine._webhooks import MAX_BODY, MAX_IN_FLIGHT

    forged = _Forged()
    app = asyncbg.webhook_app(forged)  # type: ignore[arg-type]
    statuses: list[int] = []

    async def one(i: int) -> None:
        statuses.append(await _post(app, MAX_BODY, declared=i % 2 == 0))

    tracemalloc.start()
    try:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                for i in range(300):
                    tg.start_soon(one, i)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(statuses) == 300 and set(statuses) == {400, 503}
    assert forged.handled == statuses.count(400) <= MAX_IN_FLIGHT // MAX_BODY
    # what was read is bounded by max_in_flight (a body is read, then joined: twice at most)
    assert peak < 2 * MAX_IN_FLIGHT + 8 * MAX_BODY, peak
    warnings = [e for e in logs if e["event"] == "webhook.rejections"]
    assert len(warnings) == 1  # one warning for the flood, not one per request
    assert sum(e["event"] == "webhook.rejected" for e in logs) == statuses.count(503)


async def test_a_body_over_max_body_is_413_and_the_budget_comes_back() -> None:
    forged = _Forged()
    app = asyncbg.webhook_app(forged, max_body=1000, max_in_flight=1000)  # type: ignore[arg-type]
    assert await _post(app, 1001, declared=True) == 413
    assert await _post(app, 1001, declared=False, chunk=100) == 413
    assert await _post(app, 1000, declared=False, chunk=100) == 400  # whole budget is free
    assert await _post(app, 1000, declared=True) == 400
    assert forged.handled == 2


async def test_a_content_length_in_other_digits_is_not_a_crash() -> None:
    forged = _Forged()
    app = asyncbg.webhook_app(forged)  # type: ignore[arg-type]
    assert await _post(app, 2, declared="²".encode("latin-1")) == 400  # "²".isdigit() is True
    assert forged.handled == 1


async def test_rejections_warn_once_per_interval_with_a_count() -> None:
    from asyncbg._engine._webhooks import RejectionLog

    now = [0.0]
    log = RejectionLog(interval=10.0, clock=lambda: now[0])
    with capture_logs() as logs:
        for t in (0.0, 1.0, 2.0, 9.9, 10.0, 10.5, 25.0):
            now[0] = t
            log.rejected(400, "forged", webhook_id=f"wh_{t}")
    warnings = [(e["count"], e["last_reason"]) for e in logs if e["event"] == "webhook.rejections"]
    assert warnings == [(1, "forged"), (4, "forged"), (2, "forged")]
    assert sum(e["event"] == "webhook.rejected" for e in logs) == 7
