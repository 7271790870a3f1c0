"""Calls to a blocking database connection, run in a worker thread one hop at a time, with the
calls that arrive while a hop runs carried together by the next one.

A hop to a worker thread and back costs far more than a small SQLite transaction (a few hundred
microseconds against tens on a busy machine), and a manager's jobs write their outcomes
concurrently: 10,000 jobs re-attached to ended batches answer within moments of each other.
Carrying every waiting call in one hop pays for one hop instead of thousands. Each call still
runs by itself, in order, as one transaction of its own (the calls are unchanged): what one call
raises is raised to its caller only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread

__all__ = ["Hops"]

C = TypeVar("C")
T = TypeVar("T")


class _Call:
    """One call waiting for, or carried by, a hop."""

    __slots__ = ("done", "error", "fn", "result", "wake")

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        #: Set when the call has run, or when it must carry the waiting calls itself.
        self.wake = anyio.Event()


class Hops(Generic[C]):
    """Runs ``fn(connection)`` calls in a worker thread, one hop at a time (``limiter``), each
    hop carrying every call that waits.

    A caller cancelled while its call waits for a hop withdraws it; once a hop carries it, the
    call runs to its end (as with ``anyio.to_thread.run_sync``), whether its caller still
    waits or not.
    """

    __slots__ = ("_carrying", "_limiter", "_waiting", "trips")

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._waiting: list[_Call] = []
        self._carrying = False
        #: Hops made so far (each carrying one call or more).
        self.trips = 0

    async def call(self, connection: C, fn: Callable[[C], T]) -> T:
        call = _Call(fn)
        self._waiting.append(call)
        try:
            while not call.done:
                if self._carrying:
                    await call.wake.wait()
                    if not call.done:
                        call.wake = anyio.Event()  # asked to carry: the loop takes it on
                    continue
                await self._carry(connection)
        except BaseException:
            if call in self._waiting:  # not carried yet: withdrawn
                self._waiting.remove(call)
            raise
        finally:
            if not self._carrying and self._waiting:
                # This task stopped carrying (cancelled) with calls still waiting: the first
                # of them carries on.
                self._waiting[0].wake.set()
        if call.error is not None:
            raise call.error
        result: T = call.result
        return result

    async def _carry(self, connection: C) -> None:
        """Carry the waiting calls, hop after hop, until none waits."""
        self._carrying = True
        try:
            while self._waiting:
                calls, self._waiting = self._waiting, []
                self.trips += 1
                try:
                    await anyio.to_thread.run_sync(_run, connection, calls,
                                                   limiter=self._limiter)
                finally:
                    for c in calls:
                        if c.done:
                            c.wake.set()
                        else:  # the hop never started (cancelled before it): wait again
                            self._waiting.append(c)
        finally:
            self._carrying = False


def _run(connection: Any, calls: list[_Call]) -> None:
    for call in calls:
        try:
            call.result = call.fn(connection)
        except Exception as exc:  # noqa: BLE001 - handed to the call's own caller
            call.error = exc
        call.done = True
