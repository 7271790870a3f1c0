"""The exceptions asyncbg raises.

    AsyncbgError
    ├── JobFailed              a job ended without a completed response (.job)
    │   ├── JobCancelled       it was cancelled, on the server or before it was sent
    │   ├── JobIncomplete      the server stopped it early (see .job.response.incomplete_details)
    │   └── BudgetExceeded     not run (or cancelled) because max_cost was reached
    ├── DuplicateKeyError      a key was submitted twice to one manager (also a ValueError)
    ├── JournalMismatchError   a key in the journal was submitted with a different request
    ├── LedgerError            a journal/ledger cannot be used: corrupt, locked, unwritable
    │   └── LedgerUnavailable  for now: down, locked, timed out, disk full (a write is retried)
    └── ManagerStateError      the manager was used outside its ``async with`` (also a RuntimeError)

Timeouts raise the builtin :class:`TimeoutError`; the jobs keep running.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AsyncbgError",
    "BudgetExceeded",
    "DuplicateKeyError",
    "JobCancelled",
    "JobFailed",
    "JobIncomplete",
    "JournalMismatchError",
    "ManagerStateError",
]


class AsyncbgError(Exception):
    """The root of every exception asyncbg raises on purpose."""


class JobFailed(AsyncbgError):
    """A job reached a terminal status other than ``completed``; ``.job`` is the job."""

    def __init__(self, job: Any, message: str) -> None:
        super().__init__(message)
        #: The :class:`~asyncbg.Job` that failed.
        self.job = job


class JobCancelled(JobFailed):
    """The job was cancelled, on the server or locally before it was sent."""


class JobIncomplete(JobFailed):
    """The server ended the job early, e.g. at ``max_output_tokens``."""


class BudgetExceeded(JobFailed):
    """The job did not fit in ``max_cost`` (nothing was sent), or was cancelled on the server
    when real spend passed it. The message says the budget, the spend and what was not run."""


class DuplicateKeyError(AsyncbgError, ValueError):
    """A key was submitted twice to one manager; keys name jobs and must be unique."""


class JournalMismatchError(AsyncbgError, ValueError):
    """A key already in the journal was submitted with a different request."""


class ManagerStateError(AsyncbgError, RuntimeError):
    """The manager was used before ``async with``, after it exited, or a detached job awaited."""
