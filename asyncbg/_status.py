"""Job statuses, and the one place where the server's status strings are mapped onto them."""

from __future__ import annotations

import enum

__all__ = ["JobStatus"]


class JobStatus(enum.StrEnum):
    """Where a job is. ``PENDING`` is local (waiting for a slot); the rest are the API's values."""

    PENDING = "pending"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INCOMPLETE = "incomplete"

    @property
    def terminal(self) -> bool:
        """True for the four statuses a response never leaves."""
        return self in _TERMINAL

    @classmethod
    def from_server(cls, status: object) -> JobStatus:
        """Map a server status onto the enum; an unknown or missing one counts as still live.

        Servers add transitional statuses (e.g. ``cancelling``); treating them as live means we
        keep polling until a status we know is terminal arrives, which is always safe.
        """
        if isinstance(status, str):
            return _FROM_SERVER.get(status, JobStatus.IN_PROGRESS)
        return JobStatus.IN_PROGRESS


_TERMINAL = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.INCOMPLETE}
)
_FROM_SERVER: dict[str, JobStatus] = {
    s.value: s for s in JobStatus if s is not JobStatus.PENDING
}
