"""The scheduler's record of one job, and the stages it moves through."""

from __future__ import annotations

from typing import Any

import anyio

from .._policies import PollPolicy
from ._job import Job, JobControl

__all__ = ["CREATING", "ENDED", "LIVE", "PENDING", "STREAMING", "Entry"]

PENDING, CREATING, LIVE, STREAMING, ENDED = range(5)


class Entry:
    """The scheduler's record of one job: what to send, and where it stands."""

    __slots__ = (
        "attempt", "cancel_reason", "cancel_sent", "cancel_wanted", "control", "deadline",
        "fetch_wanted", "gen", "in_flight", "job", "params", "policy", "resubmit", "scale",
        "sent", "stage", "started", "stream_scope",
    )

    def __init__(self, job: Job, params: dict[str, Any] | None, policy: PollPolicy,
                 scale: float, deadline: float | None) -> None:
        self.job = job
        self.control = JobControl(job)
        self.params = params
        self.policy = policy
        self.scale = scale
        self.deadline = deadline
        self.stage = PENDING
        self.gen = 0
        self.attempt = 0
        self.started = 0.0
        self.resubmit = False
        self.sent = False
        self.in_flight = False
        self.cancel_wanted = False
        self.cancel_sent = False
        self.cancel_reason: tuple[str, str] | None = None
        self.fetch_wanted = False
        self.stream_scope: anyio.CancelScope | None = None
