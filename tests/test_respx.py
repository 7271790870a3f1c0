"""Unit tests with respx: exact wire behaviour of create, retrieve and cancel, and their retries.

respx patches ``httpx``; the SDK uses it only when given a legacy ``httpx.AsyncClient``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import respx
from openai import AsyncOpenAI

import asyncbg
from asyncbg import JobStatus

from .conftest import FAST_POLL, FAST_RETRY

pytestmark = pytest.mark.asyncio
BASE = "https://api.test/v1"


def body(status: str, rid: str = "resp_1", **extra: object) -> dict[str, object]:
    return {"id": rid, "object": "response", "status": status, "model": "m", "output": [],
            "created_at": 0, "background": True, **extra}


def err(status: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, headers=headers,
        json={"error": {"message": message, "type": "x", "param": None, "code": None}},
    )


@pytest_asyncio.fixture
async def client() -> AsyncIterator[AsyncOpenAI]:
    c = AsyncOpenAI(api_key="sk-test-secret", base_url=BASE, http_client=httpx.AsyncClient())
    try:
        yield c
    finally:
        await c.close()


def mgr(client: AsyncOpenAI, **kw: object) -> asyncbg.BackgroundManager:
    return asyncbg.BackgroundManager(client, poll_policy=FAST_POLL, retry_policy=FAST_RETRY,
                                     **kw)  # type: ignore[arg-type]


@respx.mock
async def test_create_sends_background_and_store_and_polls_until_done(client: AsyncOpenAI) -> None:
    create = respx.post(f"{BASE}/responses").respond(json=body("queued"))
    retrieve = respx.get(f"{BASE}/responses/resp_1").mock(side_effect=[
        httpx.Response(200, json=body("in_progress")),
        httpx.Response(200, json=body("completed", usage={"input_tokens": 1, "output_tokens": 2,
                                                          "total_tokens": 3})),
    ])
    async with mgr(client) as m:
        job = await m.submit(model="m", input="hi", reasoning={"effort": "high"})
    sent = json.loads(create.calls[0].request.content)
    assert sent["background"] is True and sent["store"] is True and sent["reasoning"]
    assert create.call_count == 1 and retrieve.call_count == 2
    assert job.status is JobStatus.COMPLETED and (await job.result()).usage.total_tokens == 3  # type: ignore[union-attr]


@respx.mock
async def test_create_429_and_5xx_are_retried_without_a_second_response(
    client: AsyncOpenAI,
) -> None:
    create = respx.post(f"{BASE}/responses").mock(side_effect=[
        err(429, "slow down", {"retry-after-ms": "1"}),
        err(503, "unavailable"),
        err(500, "boom"),
        httpx.Response(200, json=body("completed")),
    ])
    async with mgr(client) as m:
        job = await m.submit(model="m", input="hi")
    assert job.status is JobStatus.COMPLETED
    assert create.call_count == 4  # ours: the SDK's own retries are off (max_retries=0)
    assert m.statistics().retries == 3 and m.statistics().possible_duplicates == 0


@respx.mock
async def test_connection_errors_and_timeouts_are_retried(client: AsyncOpenAI) -> None:
    respx.post(f"{BASE}/responses").mock(side_effect=[
        httpx.ConnectError("refused"), httpx.Response(200, json=body("queued"))])
    respx.get(f"{BASE}/responses/resp_1").mock(side_effect=[
        httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("dropped"),
        httpx.Response(200, json=body("completed"))])
    async with mgr(client) as m:
        job = await m.submit(model="m", input="hi")
    assert job.status is JobStatus.COMPLETED
    assert m.statistics().retries == 3
    # a refused connection never left this machine: not a possible duplicate
    assert m.statistics().possible_duplicates == 0


@respx.mock
async def test_a_4xx_fails_the_job_with_the_servers_message(client: AsyncOpenAI) -> None:
    respx.post(f"{BASE}/responses").mock(return_value=err(400, "Invalid value for 'reasoning'."))
    async with mgr(client) as m:
        job = await m.submit(model="m", input="hi")
    assert job.status is JobStatus.FAILED
    with pytest.raises(asyncbg.JobFailed, match=r"HTTP 400.*Invalid value for 'reasoning'"):
        await job.result()


@respx.mock
@pytest.mark.parametrize("race_status", [400, 409])
async def test_cancel_race_answered_with_an_error_keeps_the_final_status(
    client: AsyncOpenAI, race_status: int
) -> None:
    respx.post(f"{BASE}/responses").respond(json=body("in_progress"))
    # it finished on the server just before the cancel arrived
    respx.get(f"{BASE}/responses/resp_1").respond(json=body("completed"))
    cancel = respx.post(f"{BASE}/responses/resp_1/cancel").mock(
        return_value=err(race_status, "Cannot cancel a completed response."))
    slow = asyncbg.PollPolicy(first_poll=30, min_interval=30, max_interval=30)
    async with asyncbg.BackgroundManager(client, poll_policy=slow, retry_policy=FAST_RETRY) as m:
        job = await m.submit(model="m", input="hi")
        await job.wait_accepted()
        await job.cancel()
    assert cancel.call_count == 1
    assert job.status is JobStatus.COMPLETED


@respx.mock
async def test_cancel_answered_with_the_final_object(client: AsyncOpenAI) -> None:
    respx.post(f"{BASE}/responses").respond(json=body("in_progress"))
    retrieve = respx.get(f"{BASE}/responses/resp_1").respond(json=body("in_progress"))
    respx.post(f"{BASE}/responses/resp_1/cancel").respond(json=body("cancelled"))
    async with mgr(client) as m:
        job = await m.submit(model="m", input="hi")
        await job.wait_accepted()
        polls_before = retrieve.call_count
        await job.cancel()
    assert job.status is JobStatus.CANCELLED
    assert retrieve.call_count == polls_before  # the cancel's own answer settled it


@respx.mock
async def test_poll_parses_sparse_payloads_leniently(client: AsyncOpenAI) -> None:
    # Real servers omit fields strict validation demands; the job must still finish.
    respx.post(f"{BASE}/responses").respond(json={"id": "resp_1", "status": "queued"})
    respx.get(f"{BASE}/responses/resp_1").respond(json={"id": "resp_1", "status": "completed",
                                                        "output": []})
    async with mgr(client) as m:
        job = await m.submit(model="m", input="hi")
    assert (await job.result()).id == "resp_1"
