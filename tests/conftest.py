from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from openai import AsyncOpenAI

import asyncbg
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

#: Polling and retries at test speed: the fake server's responses last tens of milliseconds.
FAST_POLL = asyncbg.PollPolicy(first_poll=0.005, min_interval=0.005, max_interval=0.02, jitter=0)
FAST_RETRY = asyncbg.RetryPolicy(max_attempts=30, base=0.001, max_backoff=0.01)


@pytest.fixture
def server() -> FakeResponsesServer:
    return FakeResponsesServer(latency=LatencyModel.fixed(0.03))


@pytest_asyncio.fixture
async def client(server: FakeResponsesServer) -> AsyncIterator[AsyncOpenAI]:
    c = fake_client(server)
    try:
        yield c
    finally:
        await c.close()


def manager(client: AsyncOpenAI, **kwargs: object) -> asyncbg.BackgroundManager:
    kwargs.setdefault("poll_policy", FAST_POLL)
    kwargs.setdefault("retry_policy", FAST_RETRY)
    kwargs.setdefault("max_concurrency", 8)
    return asyncbg.BackgroundManager(client, **kwargs)  # type: ignore[arg-type]


def meta(duration: float | None = None, outcome: str | None = None) -> dict[str, str]:
    """Per-request script for the fake server."""
    m = {}
    if duration is not None:
        m["fake_duration"] = str(duration)
    if outcome is not None:
        m["fake_outcome"] = outcome
    return m
