"""asyncbg: run many OpenAI background-mode Responses at once, reliably and cheaply.

    async with asyncbg.BackgroundManager(AsyncOpenAI(), max_concurrency=32) as mgr:
        job = await mgr.submit(model="gpt-5.2", input="...", key="row-17")
        response = await job.result()
"""

from ._errors import (
    AsyncbgError,
    DuplicateKeyError,
    JobCancelled,
    JobFailed,
    JobIncomplete,
    ManagerStateError,
)
from ._job import Job
from ._journal import Journal, JournalMismatchError
from ._manager import BackgroundManager, ManagerStatistics
from ._policies import PollPolicy, RetryPolicy
from ._status import JobStatus
from ._webhooks import webhook_app

__version__ = "0.1.0"

__all__ = [
    "AsyncbgError",
    "BackgroundManager",
    "DuplicateKeyError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobIncomplete",
    "JobStatus",
    "Journal",
    "JournalMismatchError",
    "ManagerStateError",
    "ManagerStatistics",
    "PollPolicy",
    "RetryPolicy",
    "__version__",
    "webhook_app",
]
