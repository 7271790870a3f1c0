"""asyncbg: run many OpenAI background-mode Responses at once, reliably and cheaply.

    async with asyncbg.BackgroundManager(AsyncOpenAI(), max_concurrency=32) as mgr:
        job = await mgr.submit(model="gpt-5.2", input="...", key="row-17")
        response = await job.result()
"""

from ._dashboard import dashboard_app
from ._engine._job import Job
from ._engine._webhooks import webhook_app
from ._errors import (
    AsyncbgError,
    BudgetExceeded,
    DuplicateKeyError,
    JobCancelled,
    JobFailed,
    JobIncomplete,
    JournalMismatchError,
    ManagerStateError,
)
from ._ledgers import (
    Ledger,
    LedgerError,
    LedgerUnavailable,
    MemoryLedger,
    Outcome,
    Record,
    SQLiteLedger,
)
from ._manager import BackgroundManager, ManagerStatistics
from ._notify._notify import Notify
from ._otel import OpenTelemetry, serve_metrics
from ._policies import PollPolicy, RetryPolicy
from ._spend._pacing import RateLimit
from ._spend._pricing import Price
from ._status import JobStatus

#: The SQLite journal of earlier versions: ``journal="run.db"`` makes one.
Journal = SQLiteLedger


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asyncbg")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "AsyncbgError",
    "BackgroundManager",
    "BudgetExceeded",
    "DuplicateKeyError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobIncomplete",
    "JobStatus",
    "Journal",
    "JournalMismatchError",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "ManagerStateError",
    "ManagerStatistics",
    "MemoryLedger",
    "Notify",
    "OpenTelemetry",
    "Outcome",
    "PollPolicy",
    "Price",
    "RateLimit",
    "Record",
    "RetryPolicy",
    "SQLiteLedger",
    "__version__",
    "dashboard_app",
    "serve_metrics",
    "webhook_app",
]

# Users import asyncbg.X: say so in reprs, tracebacks and docs, not asyncbg._x.X.
for _name in __all__:
    _value = globals()[_name]
    if getattr(_value, "__module__", "").startswith("asyncbg."):
        _value.__module__ = __name__
del _name, _value
