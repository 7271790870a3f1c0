"""A FIFO limiter that waits without raising.

anyio's Semaphore and CapacityLimiter, when full, raise ``WouldBlock`` and wait inside the
``except`` block; every waiter then holds an exception whose traceback and frame form a cycle,
garbage that only the cyclic collector frees. asyncbg waits on these once per request, so at
scale that garbage sets off full collections that stall the event loop. This one hands a
released slot straight to the next waiter through an ``anyio.Event``.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType

import anyio

__all__ = ["Limiter"]


class Limiter:
    """At most ``total`` holders at once; waiters are served first come, first served."""

    __slots__ = ("_free", "_waiters", "total")

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a limit must be at least 1, got {total!r}")
        self.total = total
        self._free = total
        self._waiters: deque[anyio.Event] = deque()

    @property
    def free(self) -> int:
        """Slots nobody holds."""
        return self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self._free and not self._waiters:
            self._free -= 1
            return
        handed = anyio.Event()
        self._waiters.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self.release()  # a slot was handed over as we were cancelled: pass it on
            else:
                self._waiters.remove(handed)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the slot goes straight to the next waiter
        else:
            self._free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
