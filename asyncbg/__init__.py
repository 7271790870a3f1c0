"""asyncbg: run many OpenAI background-mode Responses at once, reliably and cheaply.

    async with asyncbg.BackgroundManager(AsyncOpenAI(), max_concurrency=32) as mgr:
        job = await mgr.submit(model="gpt-5.2", input="...", key="row-17")
        response = await job.result()
"""

import importlib
import typing

if typing.TYPE_CHECKING:
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
    from ._policies import PollPolicy, RetryPolicy
    from ._spend._pacing import RateLimit
    from ._spend._pricing import Price
    from ._status import JobStatus

    #: The SQLite journal of earlier versions: ``journal="run.db"`` makes one.
    Journal = SQLiteLedger

__version__ = "0.2.0"

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
    "Outcome",
    "PollPolicy",
    "Price",
    "RateLimit",
    "Record",
    "RetryPolicy",
    "SQLiteLedger",
    "__version__",
    "webhook_app",
]

# Names are imported when first used, so that ``asyncbg --help`` does not pay for the OpenAI
# SDK: name -> (module, attribute).
_LAZY: dict[str, tuple[str, str]] = {
    "AsyncbgError": ("._errors", "AsyncbgError"),
    "BackgroundManager": ("._manager", "BackgroundManager"),
    "BudgetExceeded": ("._errors", "BudgetExceeded"),
    "DuplicateKeyError": ("._errors", "DuplicateKeyError"),
    "Job": ("._engine._job", "Job"),
    "JobCancelled": ("._errors", "JobCancelled"),
    "JobFailed": ("._errors", "JobFailed"),
    "JobIncomplete": ("._errors", "JobIncomplete"),
    "JobStatus": ("._status", "JobStatus"),
    "Journal": ("._ledgers", "SQLiteLedger"),
    "JournalMismatchError": ("._errors", "JournalMismatchError"),
    "Ledger": ("._ledgers", "Ledger"),
    "LedgerError": ("._ledgers", "LedgerError"),
    "LedgerUnavailable": ("._ledgers", "LedgerUnavailable"),
    "ManagerStateError": ("._errors", "ManagerStateError"),
    "ManagerStatistics": ("._manager", "ManagerStatistics"),
    "MemoryLedger": ("._ledgers", "MemoryLedger"),
    "Notify": ("._notify._notify", "Notify"),
    "Outcome": ("._ledgers", "Outcome"),
    "PollPolicy": ("._policies", "PollPolicy"),
    "Price": ("._spend._pricing", "Price"),
    "RateLimit": ("._spend._pacing", "RateLimit"),
    "Record": ("._ledgers", "Record"),
    "RetryPolicy": ("._policies", "RetryPolicy"),
    "SQLiteLedger": ("._ledgers", "SQLiteLedger"),
    "webhook_app": ("._engine._webhooks", "webhook_app"),
}


def __getattr__(name: str) -> typing.Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attribute)
    # Users import asyncbg.X: say so in reprs, tracebacks and docs, not asyncbg._x.X.
    if getattr(value, "__module__", "").startswith("asyncbg."):
        value.__module__ = __name__
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
