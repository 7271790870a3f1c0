"""Zero data retention: what background mode cannot do, what passes through, what is kept."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio
import pytest
from openai import AsyncOpenAI

import asyncbg
from asyncbg import JobStatus

from .conftest import manager

pytestmark = pytest.mark.asyncio


async def test_store_false_refused_says_why_and_what_to_do(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", store=False)
    assert job.status is JobStatus.FAILED
    assert "needs store=true" in (job.error or "") and "zero data retention" in (job.error or "")


async def test_encrypted_reasoning_is_passed_through_to_the_result(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", include=["reasoning.encrypted_content"])
    response = await job.result()
    reasoning = [item for item in response.output if item.type == "reasoning"]
    assert reasoning and reasoning[0].encrypted_content


async def test_journal_bodies_false_keeps_no_response_on_disk(
    client: AsyncOpenAI, tmp_path: Path
) -> None:
    db = tmp_path / "j.db"
    async with manager(client, journal=db, journal_bodies=False) as mgr:
        job = await mgr.submit(key="k", model="m", input="a secret answer")
    assert (await job.result()).output_text == "echo: a secret answer"  # the caller has it
    con = sqlite3.connect(db)
    bodies = con.execute("SELECT response FROM jobs").fetchall()
    con.close()
    # what it cost is kept (a rerun counts it against max_cost), not what it said
    kept = json.loads(bodies[0][0])
    assert "output" not in kept and kept["usage"]["output_tokens"] == 1000
    files = [p async for p in anyio.Path(tmp_path).glob("j.db*")]
    on_disk = b"".join([await p.read_bytes() for p in files])
    assert b"echo: a secret answer" not in on_disk  # the request is kept; the answer is not
    # the id and status are kept, so a rerun serves the outcome without paying again
    prices = {"m": asyncbg.Price(input=1.0, output=1.0)}
    async with manager(client, journal=db, journal_bodies=False, prices=prices) as mgr:
        again = await mgr.submit(key="k", model="m", input="a secret answer")
    assert again.status is JobStatus.COMPLETED and again.response_id == job.response_id
    # what the first run spent counts on a rerun (a rerun's max_cost bounds the whole run)
    assert mgr.statistics().cost > 0 and mgr.statistics().output_tokens == 1000
