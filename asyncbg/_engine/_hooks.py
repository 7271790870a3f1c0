"""What the engine tells an observer (OpenTelemetry, a dashboard's counters) as jobs move.

A small seam in the manner of stamina's instrumentation hooks: the engine calls every hook it
was given, synchronously and at once, at four points of a job's life; a hook must be quick and
must not raise (one that does is logged and the others still run). The engine never imports an
implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._job import Job

__all__ = ["Hooks", "RequestKind"]

#: The kinds of request the engine sends for a job.
RequestKind = str  # "create" | "poll" | "fetch" | "cancel" | "stream"


@runtime_checkable
class Hooks(Protocol):
    """Called by the engine; see the module docstring."""

    def job_submitted(self, job: Job, params: Mapping[str, Any] | None) -> None:
        """``job`` was queued with these request parameters (None when re-attached by key)."""
        ...

    def request_done(self, job: Job, kind: RequestKind, http_status: int | None,
                     seconds: float) -> None:
        """One request for ``job`` came back (``http_status`` None: no answer at all)."""
        ...

    def job_finished(self, job: Job) -> None:
        """``job`` is terminal and recorded (its status, usage, cost, response id are set)."""
        ...

    def job_detached(self, job: Job) -> None:
        """``job`` was left running on the server (the manager exited, or another process
        took it over): no more hooks come for it from this manager."""
        ...
