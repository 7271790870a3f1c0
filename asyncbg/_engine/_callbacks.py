"""Done callbacks: run in the manager's task group, one at a time, in completion order.

``job.add_done_callback(fn)`` and ``BackgroundManager(on_done=fn)`` take ``fn(job)``, sync or
async. When a job becomes terminal (its outcome already in the journal), its callbacks are queued
here, then the manager's ``on_done``; one task drains the queue, awaiting what a callback returns
when it is awaitable, so that callbacks run in the order the jobs finished and an async one never
overlaps the next. One that raises is logged with the job's key, and the rest go on.

A callback added to a job already terminal runs at once; an async one is queued (it runs after
those already waiting). The manager drains the queue before it exits.

``wait_any`` and ``as_completed`` do not come through here: they listen to jobs with plain
synchronous functions called the moment a job ends (``Job.add_listener``).
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio

from .. import _log
from .._errors import ManagerStateError

if TYPE_CHECKING:
    from ._job import Job

__all__ = ["Callback", "Callbacks"]

#: ``fn(job)``: returns None, or an awaitable (an ``async def``) that is awaited.
Callback = Callable[["Job"], Any]


class Callbacks:
    """The queue of done callbacks of one manager, and the task that runs them."""

    __slots__ = ("_busy", "_drained", "_kick", "_queue", "on_done", "running")

    def __init__(self, on_done: Callback | None = None) -> None:
        #: Called for every job of the manager, after the job's own callbacks.
        self.on_done = on_done
        self._queue: deque[tuple[Job, Callback | None, Awaitable[Any] | None]] = deque()
        self._kick = anyio.Event()
        self._drained: anyio.Event | None = None
        self._busy = False
        #: True while :meth:`run` can take more (the manager is open).
        self.running = False

    def finished(self, job: Job, callbacks: Iterable[Callback]) -> None:
        """``job`` became terminal: queue its callbacks, then ``on_done``."""
        queue = self._queue
        for fn in callbacks:
            queue.append((job, fn, None))
        if self.on_done is not None:
            queue.append((job, self.on_done, None))
        if queue:
            self._kick.set()

    def late(self, job: Job, fn: Callback) -> None:
        """``fn`` was added to ``job`` after it ended: call it now; queue what it returns if
        that must be awaited."""
        result = _call(job, fn)
        if not inspect.isawaitable(result):
            return
        if not self.running:
            if inspect.iscoroutine(result):
                result.close()  # never awaited, on purpose: say so rather than warn
            raise ManagerStateError(
                f"an async callback was added to job {job.key!r} after its manager exited; "
                "await it yourself, or add it inside the manager's `async with` block"
            )
        self._queue.append((job, None, result))
        self._kick.set()

    async def run(self) -> None:
        """Drain the queue for ever (a task of the manager's group)."""
        self.running = True
        try:
            while True:
                await self._drain()
                self._kick = anyio.Event()
                if not self._queue:
                    await self._kick.wait()
        finally:
            self.running = False

    async def wait_drained(self) -> None:
        """Return once every callback queued so far has run (the manager is leaving)."""
        while self._queue or self._busy:
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()

    async def run_rest(self, timeout: float) -> None:
        """After the task stopped (the manager left on an error): run what is still queued,
        for up to ``timeout`` seconds; what is left then is logged and dropped."""
        with anyio.move_on_after(timeout, shield=True):
            await self._drain()
        if self._queue:
            _log.warning("job.callbacks_skipped", count=len(self._queue),
                         keys=sorted({job.key for job, _, _ in self._queue})[:10],
                         reason=f"the manager was leaving and they took over {timeout:g} s")
            self._queue.clear()

    async def _drain(self) -> None:
        queue = self._queue
        while queue:
            job, fn, pending = queue.popleft()
            self._busy = True
            try:
                if pending is None:
                    assert fn is not None
                    pending = _call(job, fn)
                if inspect.isawaitable(pending):
                    try:
                        await pending
                    except Exception:  # noqa: BLE001 - one bad callback must not stop the rest
                        _log.exception("job.callback_failed", key=job.key)
            finally:
                self._busy = False
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.set()


def _call(job: Job, fn: Callback) -> Any:
    """``fn(job)``; what it returns, or None after logging what it raised."""
    try:
        return fn(job)
    except Exception:  # noqa: BLE001 - one bad callback must not stop the rest
        _log.exception("job.callback_failed", key=job.key)
        return None
