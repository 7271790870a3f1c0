"""asyncbg: run many OpenAI background-mode Responses at once, reliably and cheaply.

    async with asyncbg.BackgroundManager(AsyncOpenAI(), max_concurrency=32) as mgr:
        job = await mgr.submit(model="gpt-5.2", input="...", key="row-17")
        response = await job.result()
"""

import importlib
import typing

if typing.TYPE_CHECKING:
    from ._dashboard import dashboard_app
    from ._deadline._manager import (
        DeadlineLine,
        DeadlineManager,
        DeadlineStatistics,
    )
    from ._deadline._policy import DeadlinePolicy, Way
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
    from ._outcomes import Escalation, Hedge
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


if typing.TYPE_CHECKING:
    __version__: str  # read when first asked for: importlib.metadata costs tens of ms

__all__ = [
    "AsyncbgError",
    "BackgroundManager",
    "BudgetExceeded",
    "DeadlineLine",
    "DeadlineManager",
    "DeadlinePolicy",
    "DeadlineStatistics",
    "DuplicateKeyError",
    "Escalation",
    "Hedge",
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
    "Way",
    "__version__",
    "dashboard_app",
    "serve_metrics",
    "webhook_app",
]

# Names are imported when first used, so that ``asyncbg --help`` does not pay for the OpenAI
# SDK: name -> (module, attribute).
_LAZY: dict[str, tuple[str, str]] = {
    "AsyncbgError": ("._errors", "AsyncbgError"),
    "BackgroundManager": ("._manager", "BackgroundManager"),
    "BudgetExceeded": ("._errors", "BudgetExceeded"),
    "DeadlineLine": ("._deadline._manager", "DeadlineLine"),
    "DeadlineManager": ("._deadline._manager", "DeadlineManager"),
    "DeadlinePolicy": ("._deadline._policy", "DeadlinePolicy"),
    "DeadlineStatistics": ("._deadline._manager", "DeadlineStatistics"),
    "DuplicateKeyError": ("._errors", "DuplicateKeyError"),
    "Escalation": ("._outcomes", "Escalation"),
    "Hedge": ("._outcomes", "Hedge"),
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
    "OpenTelemetry": ("._otel", "OpenTelemetry"),
    "Outcome": ("._ledgers", "Outcome"),
    "PollPolicy": ("._policies", "PollPolicy"),
    "Price": ("._spend._pricing", "Price"),
    "RateLimit": ("._spend._pacing", "RateLimit"),
    "Record": ("._ledgers", "Record"),
    "RetryPolicy": ("._policies", "RetryPolicy"),
    "SQLiteLedger": ("._ledgers", "SQLiteLedger"),
    "Way": ("._deadline._policy", "Way"),
    "dashboard_app": ("._dashboard", "dashboard_app"),
    "serve_metrics": ("._otel", "serve_metrics"),
    "webhook_app": ("._engine._webhooks", "webhook_app"),
}


def __getattr__(name: str) -> typing.Any:
    if name == "__version__":
        version = globals()["__version__"] = _version()
        return version
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
