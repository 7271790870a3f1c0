"""The exceptions asyncbg raises.

    AsyncbgError
    ├── JobFailed              a job ended without a completed response (.job)
    │   ├── JobCancelled       it was cancelled, on the server or before it was sent
    │   └── JobIncomplete      the server stopped it early (see .job.response.incomplete_details)
    ├── DuplicateKeyError      a key was submitted twice to one manager
    ├── JournalMismatchError   a key in the journal was submitted with a different request
    └── ManagerStateError      the manager was used outside its ``async with`` (also a RuntimeError)

Timeouts raise the builtin :class:`TimeoutError`; the jobs keep running.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._job import Job

__all__ = [
    "AsyncbgError",
    "DuplicateKeyError",
    "JobCancelled",
    "JobFailed",
    "JobIncomplete",
    "ManagerStateError",
]


class AsyncbgError(Exception):
    """The root of every exception asyncbg raises on purpose."""


class JobFailed(AsyncbgError):
    """A job reached a terminal status other than ``completed``; ``.job`` is the job."""

    def __init__(self, job: Job, message: str) -> None:
        super().__init__(message)
        self.job = job


class JobCancelled(JobFailed):
    """The job was cancelled, on the server or locally before it was sent."""


class JobIncomplete(JobFailed):
    """The server ended the job early, e.g. at ``max_output_tokens``."""


class DuplicateKeyError(AsyncbgError, ValueError):
    """A key was submitted twice to one manager; keys name jobs and must be unique."""


class ManagerStateError(AsyncbgError, RuntimeError):
    """The manager was used before ``async with`` or after it exited."""
