"""Expired batch requests: each provider hands a request that its batch's window ran out on
back to be sent again (``PENDING``, code ``expired``), up to ``batch_retries`` times, counted;
a request with a result is never handed back. Through each official SDK, on the fake."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from asyncbg import JobStatus
from asyncbg._providers._base import Answer
from asyncbg.testing import BatchTiming, FakeResponsesServer

from . import test_providers
from .test_providers import Api

api = test_providers.api
server = test_providers.server

pytestmark = pytest.mark.asyncio

#: A batch expires 0.15 s after its creation.
EXPIRING = BatchTiming(validating=0.01, finalizing=0.01, cancelling=0.01, window=0.15)


async def _until_ended(provider: Any, rid: str) -> Answer:
    with anyio.fail_after(10):
        while True:
            answer: Answer = await provider.check(rid)
            if answer.status is not JobStatus.QUEUED and answer.status is not \
                    JobStatus.IN_PROGRESS:
                return answer
            await anyio.sleep(0.02)


async def test_an_expired_request_is_handed_back_once_then_fails(
    api: Api, server: FakeResponsesServer
) -> None:
    server.batches.timing = EXPIRING
    server.batches.script("late", outcome="stuck", times=2)  # its first two batches expire
    provider = api.provider(batch_delay=0.05)
    answers: dict[str, Answer] = {}

    async def create(key: str) -> None:
        answers[key] = await provider.create(api.request(key), key=key)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for key in ("done", "late"):
                tg.start_soon(create, key)
    done, late = answers["done"], answers["late"]
    assert server.counters.batch_creates == 1  # one batch: one request ends, one expires
    assert late.response_id is not None and done.response_id is not None
    first = await _until_ended(provider, late.response_id)
    assert first.status is JobStatus.PENDING and first.error_code in ("expired", "batch_expired")
    assert "sent again in a new batch (1 of 1)" in (first.error or "")
    assert provider.reruns == 1
    # The request that finished is never handed back, whatever its batch did.
    assert (await _until_ended(provider, done.response_id)).status is JobStatus.COMPLETED

    again = await provider.create(api.request("late"), key="late")
    assert again.response_id is not None
    assert again.response_id != late.response_id  # a new batch
    second = await _until_ended(provider, again.response_id)
    assert second.status is JobStatus.FAILED and second.error_code in ("expired",
                                                                        "batch_expired")
    assert provider.reruns == 1  # batch_retries=1: the second expiry is the job's end


async def test_a_request_sent_again_completes_in_its_new_batch(
    api: Api, server: FakeResponsesServer
) -> None:
    server.batches.timing = EXPIRING
    server.batches.script("late", outcome="stuck", times=1)
    provider = api.provider(batch_delay=0.0, batch_retries=2)
    late = await provider.create(api.request("late"), key="late")
    assert late.response_id is not None
    assert (await _until_ended(provider, late.response_id)).status is JobStatus.PENDING
    again = await provider.create(api.request("late"), key="late")
    assert again.response_id is not None
    assert (await _until_ended(provider, again.response_id)).status is JobStatus.COMPLETED
    assert provider.reruns == 1 and server.counters.batch_creates == 2


async def test_batch_retries_zero_ends_an_expired_request_at_once(
    api: Api, server: FakeResponsesServer
) -> None:
    server.batches.timing = EXPIRING
    server.batches.script("late", outcome="stuck")
    provider = api.provider(batch_delay=0.0, batch_retries=0)
    late = await provider.create(api.request("late"), key="late")
    assert late.response_id is not None
    answer = await _until_ended(provider, late.response_id)
    assert answer.status is JobStatus.FAILED and "expired" in (answer.error or "")
    assert provider.reruns == 0
    with pytest.raises(ValueError, match="batch_retries"):
        api.provider(batch_retries=-1)
