"""Where asyncbg's log events go: structlog when the application configured it, else stdlib.

The library never configures logging and never writes to stdout. structlog's *default*
configuration prints to stdout, so asyncbg emits through structlog only once the application has
called ``structlog.configure`` (:func:`structlog.is_configured`); otherwise every event goes to
the stdlib logger ``asyncbg``, where an unconfigured application sees only warnings and errors
(on stderr, through Python's last-resort handler) and a configured one tunes it the usual way.

Events are names with key-value context (``job.terminal key='q1' status='failed'``). Nothing is
bound and kept per job: a bound logger per job would cost memory across 100,000 jobs, so callers
pass the context (key, response_id, status, attempt) with each event.

structlog is not imported here: an application that configured it has imported it, so it is
looked up in ``sys.modules`` (its import costs tens of milliseconds, most of them rich's, which
``structlog.dev`` imports; ``asyncbg status`` logs nothing and does not pay for it).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

__all__ = ["debug", "enabled", "error", "exception", "info", "warning"]

#: logging's levels, by their values: logging itself is imported when first needed.
_DEBUG, _INFO, _WARNING, _ERROR = 10, 20, 30, 40
_METHOD = {_DEBUG: "debug", _INFO: "info", _WARNING: "warning", _ERROR: "error"}
_std: logging.Logger | None = None


def _stdlib() -> logging.Logger:
    """The stdlib logger ``asyncbg``."""
    global _std
    if _std is None:
        import logging

        _std = logging.getLogger("asyncbg")
    return _std


def _configured() -> ModuleType | None:
    """structlog, once the application has configured it; else None (never imported here)."""
    structlog = sys.modules.get("structlog")
    is_configured = getattr(structlog, "is_configured", None)  # None: not (fully) imported
    return structlog if is_configured is not None and is_configured() else None


def enabled(level: int) -> bool:
    """Whether an event at ``level`` would go anywhere (skip building costly context if not)."""
    return _configured() is not None or _stdlib().isEnabledFor(level)


def _emit(level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
    structlog = _configured()
    if structlog is not None:
        # A fresh proxy each time: one kept here would, under cache_logger_on_first_use, keep
        # the configuration of its first use for ever, whatever the application sets later.
        logger = structlog.get_logger("asyncbg")
        method = getattr(logger, "exception" if exc_info else _METHOD[level])
        method(event, **fields)
        return
    std = _stdlib()
    if not std.isEnabledFor(level):
        return
    context = " ".join(f"{k}={v!r}" for k, v in fields.items() if v is not None)
    std.log(level, "%s %s" if context else "%s%s", event, context, exc_info=exc_info,
             stacklevel=3, extra={"asyncbg_event": event, "asyncbg_context": fields})


def debug(event: str, **fields: Any) -> None:
    _emit(_DEBUG, event, fields)


def info(event: str, **fields: Any) -> None:
    _emit(_INFO, event, fields)


def warning(event: str, **fields: Any) -> None:
    _emit(_WARNING, event, fields)


def error(event: str, **fields: Any) -> None:
    _emit(_ERROR, event, fields)


def exception(event: str, **fields: Any) -> None:
    """An error with the current exception's traceback (for asyncbg's own bugs only)."""
    _emit(_ERROR, event, fields, exc_info=True)
