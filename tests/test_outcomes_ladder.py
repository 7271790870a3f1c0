"""The ladder's decision, stateful: random sequences of attempt outcomes against a model of
what the issue asks (escalate on ``on=`` up to ``max_attempts``; a rerun decides the same)."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from asyncbg import Escalation, JobStatus
from asyncbg._outcomes._ladder import KINDS, attempt_key, kind_of, next_attempt

OUTCOMES = (*KINDS, "completed", "cancelled", "budget_exceeded")
STEPS = ({"max_output_tokens": 8000}, {"model": "strong"}, {"model": "other",
                                                            "reasoning": {"effort": "high"}})


class Ladder(RuleBasedStateMachine):
    """One job's attempts, ended one by one; the decision checked after each."""

    def __init__(self) -> None:
        super().__init__()
        self.escalation = Escalation()
        self.kinds: list[str] = []
        self.decisions: list[int | None] = []
        self.stopped = False

    @initialize(on=st.sets(st.sampled_from(KINDS), min_size=1),
                steps=st.integers(0, len(STEPS)), extra=st.integers(0, 2))
    def made(self, on: set[str], steps: int, extra: int) -> None:
        self.escalation = Escalation(on=sorted(on), steps=STEPS[:steps],
                                     max_attempts=steps + 1 + extra)

    @precondition(lambda self: not self.stopped)
    @rule(kind=st.sampled_from(OUTCOMES))
    def attempt_ends(self, kind: str) -> None:
        self.kinds.append(kind)
        decided = next_attempt(self.escalation, self.kinds)
        self.decisions.append(decided)
        expected = (len(self.kinds) + 1 if kind in self.escalation.on
                    and len(self.kinds) < self.escalation.max_attempts else None)
        assert decided == expected
        self.stopped = decided is None

    @rule()
    def next_job(self) -> None:
        """Another job under the same ladder: its attempts start again from the first."""
        assert next_attempt(self.escalation, []) == 1
        self.kinds, self.decisions, self.stopped = [], [], False

    @invariant()
    def never_more_than_max_attempts(self) -> None:
        assert len(self.kinds) <= self.escalation.max_attempts

    @invariant()
    def a_rerun_replays_every_decision(self) -> None:
        # The decision reads only the recorded outcomes: each prefix decides as it did.
        for n, decided in enumerate(self.decisions, start=1):
            assert next_attempt(self.escalation, self.kinds[:n]) == decided

    @invariant()
    def each_attempt_has_its_own_key_and_request(self) -> None:
        base: dict[str, Any] = {"model": "m", "input": "x"}
        keys = {attempt_key("k", n) for n in range(1, len(self.kinds) + 2)}
        assert len(keys) == len(self.kinds) + 1 and "k" in keys
        for n in range(1, len(self.kinds) + 2):
            request = self.escalation.params_for(base, n)
            applied = list(self.escalation.steps[:n - 1])
            if n - 1 > len(applied) and self.escalation.steps:
                applied.append(self.escalation.steps[-1])
            expected = dict(base)
            for step in applied:
                expected.update(step)
            assert request == expected


Ladder.TestCase.settings = settings(max_examples=80, stateful_step_count=8, deadline=None,
                                    derandomize=True, database=None)
TestLadder = Ladder.TestCase


def test_kinds_follow_status_and_code() -> None:
    assert kind_of(JobStatus.COMPLETED, None, None) == "completed"
    assert kind_of(JobStatus.COMPLETED, None, "no") == "invalid"
    assert kind_of(JobStatus.INCOMPLETE, None, None) == "incomplete"
    assert kind_of(JobStatus.CANCELLED, "deadline_exceeded", None) == "cancelled"
    assert kind_of(JobStatus.FAILED, "server_error", None) == "server_error"
    assert kind_of(JobStatus.FAILED, "rate_limit_exceeded", None) == "rate_limited"
    assert kind_of(JobStatus.FAILED, "budget_exceeded", None) == "budget_exceeded"
    assert kind_of(JobStatus.FAILED, "invalid_prompt", None) == "failed"
    assert attempt_key("k", 1, hedge=True) == "k#hedge" and attempt_key("k", 3) == "k#3"
