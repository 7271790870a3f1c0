"""The command line's logging: structlog and the stdlib ``asyncbg`` logger, both to stderr.

Both write to whatever ``sys.stderr`` is *when a line is logged*, not the file object that was
current at configure time: while a progress bar is on screen, rich replaces ``sys.stderr`` with a
proxy that prints each line above the bar, so log lines never glue onto it.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import structlog

__all__ = ["LEVELS", "configure_logging"]

LEVELS = ("debug", "info", "warning", "error")


class StderrLogger:
    """A structlog logger that prints each rendered line to the current ``sys.stderr``."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger(*_args: Any) -> StderrLogger:
    return StderrLogger()


class _StderrHandler(logging.Handler):
    """Like ``logging.StreamHandler(sys.stderr)``, but looks ``sys.stderr`` up on every record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class _JsonFormatter(logging.Formatter):
    """One JSON object a line, with the same keys as structlog's JSON output."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "event": getattr(record, "asyncbg_event", record.getMessage()),
            **(getattr(record, "asyncbg_context", None) or {}),
            "level": record.levelname.lower(),
            "logger": record.name,
            "timestamp": self.formatTime(record),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=repr)


def configure_logging(*, level: str = "warning", json: bool = False) -> None:
    """Send asyncbg's events to stderr at ``level``: readable text, or JSON lines with ``json``."""
    import structlog  # here, not at import: ``asyncbg --help`` does not need it

    number = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        # Plain tracebacks: rich's would print every frame's locals, request bodies included.
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                           exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.format_exc_info] if json else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=_stderr_logger,
        # Not cached: the library's module-level logger would keep this configuration for
        # good, and a later structlog.configure (an embedding application, a test) would not
        # reach it. The cost is one small object per event.
        cache_logger_on_first_use=False,
    )
    # The library logs through structlog once it is configured; anything that reaches the
    # stdlib logger "asyncbg" goes to the same place at the same level.
    std = logging.getLogger("asyncbg")
    for handler in list(std.handlers):
        if isinstance(handler, _StderrHandler):
            std.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(
        _JsonFormatter() if json
        else logging.Formatter("%(asctime)s [%(levelname)-8s] %(message)s")
    )
    std.addHandler(handler)
    std.setLevel(number)
    std.propagate = False
