"""Results users can use (asyncbg/_outcomes/): checked answers, escalation ladders, hedges."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

import asyncbg
from asyncbg import Escalation, JobStatus
from asyncbg.providers import OpenAIResponses
from asyncbg.testing import FakeResponsesServer

from .conftest import manager

pytestmark = pytest.mark.anyio

GOOD = '{"answer": 42, "why": "it is"}'


class Answer(BaseModel):
    answer: int
    why: str


class Counting(OpenAIResponses):
    """The OpenAI provider, counting the creates sent for each journal key."""

    def __init__(self, client: AsyncOpenAI, creates: Counter[str]) -> None:
        super().__init__(client)
        self.creates = creates
        self.sent: list[dict[str, Any]] = []
        #: Set once the server has answered the create of that key.
        self.answered: dict[str, anyio.Event] = {}

    async def create(self, params: Mapping[str, Any], *, key: str | None = None) -> Any:
        self.creates[key or ""] += 1
        self.sent.append(dict(params))
        answer = await super().create(params, key=key)
        self.answered.setdefault(key or "", anyio.Event()).set()
        return answer


async def test_text_format_sends_the_sdk_schema_and_parsed_returns_the_model(
    client: AsyncOpenAI,
) -> None:
    provider = Counting(client, Counter())
    async with manager(provider) as mgr:
        job = await mgr.submit(key="q", model="m", input="x", text_format=Answer,
                               metadata={"fake_reply": GOOD})
        parsed = await job.parsed()
    assert parsed == Answer(answer=42, why="it is")
    fmt = provider.sent[0]["text"]["format"]
    assert fmt["type"] == "json_schema" and fmt["name"] == "Answer" and fmt["strict"] is True
    assert fmt["schema"]["required"] == ["answer", "why"]
    assert job.status is JobStatus.COMPLETED and job.invalid is None
    assert [a.key for a in job.attempts] == ["q"] and job.cost == job.attempts[0].cost


async def test_an_answer_that_does_not_parse_or_validate_is_completed_and_invalid(
    client: AsyncOpenAI,
) -> None:
    def positive(response: Any) -> None:
        if json.loads(response.output_text)["answer"] <= 0:
            raise ValueError("the answer must be positive")

    async with manager(client) as mgr:
        broken = await mgr.submit(model="m", input="x", text_format=Answer,
                                  metadata={"fake_reply": "not json"})
        rejected = await mgr.submit(model="m", input="x", validate=positive,
                                    metadata={"fake_reply": '{"answer": -1, "why": ""}'})
        plain = await mgr.submit(model="m", input="x")
    assert broken.status is JobStatus.COMPLETED and rejected.status is JobStatus.COMPLETED
    assert "does not parse as Answer: the answer: Invalid JSON" in (broken.invalid or "")
    assert rejected.invalid == ("validate rejected the answer: ValueError: the answer must be "
                                "positive")
    with pytest.raises(asyncbg.JobFailed, match="invalid: the answer does not parse"):
        await broken.parsed()
    assert (await rejected.result()).output_text.startswith('{"answer": -1')
    assert plain.invalid is None and plain.attempts == (plain,)
    with pytest.raises(asyncbg.AsyncbgError, match="without text_format"):
        await plain.parsed()


async def test_incomplete_then_a_bigger_budget_completes(client: AsyncOpenAI) -> None:
    creates: Counter[str] = Counter()
    ladder = Escalation(on=("incomplete",), steps=[{"max_output_tokens": 8000}])
    async with manager(Counting(client, creates), prices=PRICES) as mgr:
        job = await mgr.submit(key="k", model="m", input="x", max_output_tokens=100,
                               metadata={"fake_needs_output_tokens": "500"}, escalate=ladder)
        response = await job.result()
    first, second = job.attempts
    assert (first.key, first.status) == ("k", JobStatus.INCOMPLETE)
    assert (second.key, second.status) == ("k#2", JobStatus.COMPLETED)
    assert response.max_output_tokens == 8000 and job.response_id == second.response_id
    assert first.cost and second.cost and job.cost == pytest.approx(first.cost + second.cost)
    assert creates == {"k": 1, "k#2": 1}
    assert mgr.statistics().cost == pytest.approx(job.cost)


async def test_invalid_json_then_a_stronger_model_parses(client: AsyncOpenAI) -> None:
    ladder = Escalation(steps=[{"model": "strong"}])
    async with manager(client, escalate=ladder) as mgr:
        job = await mgr.submit(key="k", model="weak", input="x", text_format=Answer,
                               metadata={"fake_reply": "{not json", "fake_reply.strong": GOOD})
        assert (await job.parsed()).answer == 42
    assert [(a.key, a.response.model, a.invalid) for a in job.attempts] == [  # type: ignore[union-attr]
        ("k", "weak", None), ("k#2", "strong", None)]
    assert job.invalid is None and job.response.model == "strong"  # type: ignore[union-attr]


async def test_the_ladder_stops_at_max_attempts_repeating_the_last_step(
    client: AsyncOpenAI,
) -> None:
    ladder = Escalation(on=("server_error",), steps=[{"model": "b"}], max_attempts=3)
    async with manager(client) as mgr:
        job = await mgr.submit(key="k", model="a", input="x", escalate=ladder,
                               metadata={"fake_outcome": "failed"})
        untouched = await mgr.submit(key="u", model="a", input="x", escalate=ladder,
                                     metadata={"fake_outcome": "incomplete"})
        await mgr.wait_all([job, untouched])
    assert [a.key for a in job.attempts] == ["k", "k#2", "k#3"]
    assert [a.response.model for a in job.attempts] == ["a", "b", "b"]  # type: ignore[union-attr]
    assert job.status is JobStatus.FAILED and job.error_code == "server_error"
    assert [a.key for a in untouched.attempts] == ["u"]  # incomplete is not in on=


async def test_on_done_sees_the_users_job_once_not_each_attempt(client: AsyncOpenAI) -> None:
    seen: list[tuple[str, int]] = []
    ladder = Escalation(steps=[{"max_output_tokens": 900}])
    async with manager(client, on_done=lambda j: seen.append((j.key, len(j.attempts)))) as mgr:
        await mgr.submit(key="k", model="m", input="x", max_output_tokens=10, escalate=ladder,
                         metadata={"fake_needs_output_tokens": "500"})
        await mgr.submit(key="plain", model="m", input="x")
    assert sorted(seen) == [("k", 2), ("plain", 1)]


async def test_cancel_stops_the_ladder_and_cancels_the_live_attempt(
    client: AsyncOpenAI, server: FakeResponsesServer,
) -> None:
    ladder = Escalation(steps=[{"model": "b"}])
    async with manager(client) as mgr:
        job = await mgr.submit(key="k", model="m", input="x", escalate=ladder,
                               metadata={"fake_duration": "30"})
        assert await job.wait_accepted(timeout=5) is not None
        await job.cancel()
    assert job.status is JobStatus.CANCELLED and [a.key for a in job.attempts] == ["k"]
    assert server.counters.creates == 1 and server.counters.cancels == 1

    async with manager(client) as mgr:  # cancelled at once, before its ladder ran at all
        early = await mgr.submit(key="e", model="m", input="x", escalate=ladder)
        await early.cancel()
    assert early.status is JobStatus.CANCELLED and early.attempts[0].status is JobStatus.CANCELLED
    # at most its create was in flight: then it was cancelled on the server too
    assert len(early.attempts) == 1 and server.counters.creates == server.counters.cancels


async def test_a_crash_mid_ladder_and_a_rerun_continue_with_no_attempt_sent_twice(
    client: AsyncOpenAI, tmp_path: Path,
) -> None:
    creates: Counter[str] = Counter()
    journal = tmp_path / "run.db"
    ladder = Escalation(on=("incomplete",), steps=[{"max_output_tokens": 200,
                                                    "metadata": SLOW_THEN_SHORT},
                                                   {"max_output_tokens": 8000}])
    request = {"model": "m", "input": "x", "max_output_tokens": 100,
               "metadata": {"fake_needs_output_tokens": "500"}}

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        provider = Counting(client, creates)
        second = provider.answered["k#2"] = anyio.Event()
        async with manager(provider, journal=journal, escalate=ladder,
                           cancel_on_exit=False) as mgr:
            job = await mgr.submit_request(request, key="k")
            with anyio.fail_after(10):
                await second.wait()
            raise Crash
    assert creates == {"k": 1, "k#2": 1} and not job.done

    async with manager(Counting(client, creates), journal=journal, escalate=ladder) as mgr:
        again = await mgr.submit_request(request, key="k")
        await again.wait()
    assert [a.key for a in again.attempts] == ["k", "k#2", "k#3"]
    assert [a.status for a in again.attempts] == [JobStatus.INCOMPLETE, JobStatus.INCOMPLETE,
                                                 JobStatus.COMPLETED]
    assert creates == {"k": 1, "k#2": 1, "k#3": 1}  # k served, k#2 resumed, k#3 sent once

    async with manager(Counting(client, creates), journal=journal, escalate=ladder) as mgr:
        served = await mgr.submit_request(request, key="k")
        await served.wait()
    assert creates == {"k": 1, "k#2": 1, "k#3": 1}  # the whole ladder served from the journal
    assert served.status is JobStatus.COMPLETED and len(served.attempts) == 3
    assert served.response_id == again.response_id and served.cost == again.cost


async def test_a_changed_ladder_fails_the_job_naming_the_attempt(
    client: AsyncOpenAI, tmp_path: Path,
) -> None:
    journal = tmp_path / "run.db"
    request = {"model": "m", "input": "x", "metadata": {"fake_outcome": "incomplete"}}
    for model in ("b", "c"):
        async with manager(client, journal=journal,
                           escalate=Escalation(steps=[{"model": model}])) as mgr:
            job = await mgr.submit_request(request, key="k")
    assert job.status is JobStatus.FAILED and job.error_code == "escalation_failed"
    assert "attempt 2 could not be sent: key 'k#2' is already in the journal" in (job.error or "")


SLOW_THEN_SHORT = {"fake_needs_output_tokens": "500", "fake_duration": "0.2"}
PRICES = {"m": asyncbg.Price(input=1.0, output=4.0), "weak": asyncbg.Price(1.0, 4.0),
          "strong": asyncbg.Price(3.0, 12.0)}


def test_escalation_is_checked_when_made() -> None:
    with pytest.raises(ValueError, match=r"on=.*got 'sometimes'"):
        Escalation(on=("sometimes",))
    with pytest.raises(ValueError, match="non-empty mapping"):
        Escalation(steps=[{}])
    with pytest.raises(ValueError, match="max_attempts"):
        Escalation(max_attempts=0)
    with pytest.raises(ValueError, match=r"ladder\.json: unknown field 'step'"):
        Escalation.from_json({"step": []}, where="ladder.json")
    assert Escalation(steps=[{"model": "b"}]).max_attempts == 2
    assert Escalation.from_json({"steps": [{"model": "b"}], "max_attempts": 4},
                                where="x") == Escalation(steps=[{"model": "b"}], max_attempts=4)


async def test_a_failed_job_falls_back_to_the_anthropic_fake(
    client: AsyncOpenAI, server: FakeResponsesServer,
) -> None:
    from asyncbg.providers import AnthropicBatches
    from asyncbg.testing import fake_anthropic_client

    claude = fake_anthropic_client(server)
    ladder = Escalation(on=("server_error",),
                        steps=[{"provider": "anthropic", "model": "claude-sonnet-4-5"}])
    try:
        async with (
            manager(AnthropicBatches(claude, batch_delay=0.01)) as fallback,
            manager(client, escalate=ladder, fallbacks={"anthropic": fallback}) as mgr,
        ):
            job = await mgr.submit(key="k", model="gpt-5.2", input="hello",
                                   instructions="be brief", max_output_tokens=300,
                                   metadata={"fake_outcome": "failed"})
            with pytest.raises(ValueError, match="'tools' has no plain equivalent"):
                await mgr.submit(key="t", model="gpt-5.2", input="x", tools=[{"type": "x"}])
            with pytest.raises(ValueError, match="no manager for it"):
                await mgr.submit(key="g", model="m", input="x", escalate=Escalation(
                    steps=[{"provider": "gemini", "model": "g"}]))
            message = await job.result()
    finally:
        await claude.close()
    first, second = job.attempts
    assert first.status is JobStatus.FAILED and first.error_code == "server_error"
    assert second.key == "k#2" and second.status is JobStatus.COMPLETED
    assert message.content[0].text.endswith("hello") and message.model == "claude-sonnet-4-5"
    assert job.cost == second.cost or job.cost is None
    assert server.counters.batch_requests


async def test_escalate_false_turns_the_managers_ladder_off_for_one_job(
    client: AsyncOpenAI,
) -> None:
    ladder = Escalation(steps=[{"model": "b"}])
    async with manager(client, escalate=ladder) as mgr:
        off = await mgr.submit(key="off", model="a", input="x", escalate=False,
                               metadata={"fake_outcome": "incomplete"})
        on = await mgr.submit(key="on", model="a", input="x",
                              metadata={"fake_outcome": "incomplete"})
        await mgr.wait_all([off, on])
    assert off.attempts == (off,) and off.status is JobStatus.INCOMPLETE
    assert [a.key for a in on.attempts] == ["on", "on#2"]
    assert mgr.statistics().submitted == 3 and mgr.statistics().hedges == 0


async def test_a_malformed_fake_needs_output_tokens_is_refused(client: AsyncOpenAI) -> None:
    async with manager(client) as mgr:
        job = await mgr.submit(model="m", input="x", metadata={"fake_needs_output_tokens": "lots"})
        await job.wait()
    assert job.status is JobStatus.FAILED and "fake_needs_output_tokens" in (job.error or "")
