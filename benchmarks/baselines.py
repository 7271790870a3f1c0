"""The loops people write by hand, which asyncbg is measured against.

Each takes an ``AsyncOpenAI`` and a list of ``responses.create`` keyword dicts and returns the
final statuses, in the same order. None of them handles errors: they are the honest first draft.
"""

from __future__ import annotations

import asyncio
from typing import Any

from openai import AsyncOpenAI

LIVE = ("queued", "in_progress")


async def seeds_loop(client: AsyncOpenAI, requests: list[dict[str, Any]],
                     *, interval: float = 10.0) -> list[str]:
    """The seeds' loop: create, then retrieve every ``interval`` s, one task per job, gather."""

    async def one(params: dict[str, Any]) -> str:
        r = await client.responses.create(**params, background=True)
        while r.status in LIVE:
            await asyncio.sleep(interval)
            r = await client.responses.retrieve(r.id)
        return str(r.status)

    return list(await asyncio.gather(*(one(p) for p in requests)))


async def careful_loop(client: AsyncOpenAI, requests: list[dict[str, Any]],
                       *, interval: float, concurrency: int) -> list[str]:
    """A careful raw-SDK version: a semaphore bounds live responses, gather, a fixed interval."""
    slots = asyncio.Semaphore(concurrency)

    async def one(params: dict[str, Any]) -> str:
        async with slots:
            r = await client.responses.create(**params, background=True)
            while r.status in LIVE:
                await asyncio.sleep(interval)
                r = await client.responses.retrieve(r.id)
            return str(r.status)

    return list(await asyncio.gather(*(one(p) for p in requests)))


async def gather_creates(client: AsyncOpenAI, requests: list[dict[str, Any]],
                         *, concurrency: int) -> int:
    """Raw submission: ``asyncio.gather`` of creates behind a semaphore; returns how many."""
    slots = asyncio.Semaphore(concurrency)

    async def one(params: dict[str, Any]) -> None:
        async with slots:
            await client.responses.create(**params, background=True)

    await asyncio.gather(*(one(p) for p in requests))
    return len(requests)
