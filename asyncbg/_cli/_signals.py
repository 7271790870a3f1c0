"""SIGINT and SIGTERM during ``asyncbg run``: the first detaches, a second also cancels.

Live responses are paid for, so an interrupt does not throw them away: the run stops creating,
leaves what is live running on the server (the journal has every response id), and exits; the
same command run again collects them. A second signal while it stops, or
``--cancel-on-interrupt``, cancels them on the server first.

Responses the server created that the journal could not take (its disk is full) make the stop
wait up to the manager's exit grace for the journal; that wait is said in one line, and a
second signal then ends it at once: their ids go to ``JOURNAL.unrecorded`` for the next run.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus

__all__ = ["Interrupts"]

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupts:
    """Watches SIGINT/SIGTERM for one run and says what the run should do about them."""

    def __init__(self, *, cancel_live: bool = False, cancel_timeout: float = 10.0) -> None:
        #: The first signal received, or None.
        self.signal: signal.Signals | None = None
        #: Cancel live responses on the server before exiting (set by the option, or by a
        #: second signal).
        self.cancel_live = cancel_live
        self.cancel_timeout = cancel_timeout
        self.count = 0
        #: Called (once, bounded by ``cancel_timeout``) at the first signal when
        #: ``cancel_live`` is set, before the run is stopped: the run's ``mgr.cancel_all``.
        self.on_cancel: Callable[[], Awaitable[None]] | None = None
        #: Cancelled by a third signal: whatever cleanup is still running gives up.
        self.cleanup = anyio.CancelScope()
        #: Set while the run's manager is open: the responses the server created that the
        #: journal has not taken, and how to stop waiting for them (``mgr.unrecorded``,
        #: ``mgr.leave_now``); the stop waits for them up to ``exit_grace`` seconds, and
        #: ``kept_in`` is where their ids go then.
        self.held: Callable[[], int] | None = None
        self.leave: Callable[[], None] | None = None
        self.exit_grace = 10.0
        self.kept_in = ""
        #: Whether the wait for held responses was said (a second signal then leaves at once).
        self.waiting = False
        self._first_at = 0.0
        self._again = anyio.Event()

    @property
    def interrupted(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM (0 if none came)."""
        return 128 + int(self.signal) if self.signal is not None else 0

    @property
    def name(self) -> str:
        return _NAMES.get(self.signal, str(self.signal)) if self.signal is not None else ""

    async def watch(
        self, work: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Receive signals until cancelled; the first one cancels ``work``.

        Start it with ``await tg.start(interrupts.watch, scope)``: once it has started, the
        signals no longer raise ``KeyboardInterrupt`` or kill the process.
        """
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for received in signals:
                    await self.receive(signal.Signals(received), work)
                    if self.count == 1:
                        tg.start_soon(self._say_waiting)

    async def _say_waiting(self) -> None:
        """Once the run stops: one line when it waits for responses the journal has not
        taken (sampled, as the progress is, until the exit grace is over or the manager
        closed)."""
        until = self._first_at + self.exit_grace
        while (held := self.held) is not None and anyio.current_time() < until:
            count = held()
            if count:
                self.waiting = True
                left = math.ceil(until - anyio.current_time())
                what = "1 response" if count == 1 else f"{count} responses"
                _say(f"waiting up to {left} s for the journal to take {what} the server "
                     f"created (it cannot be written now); interrupt again to leave at once: "
                     f"their ids are kept in {self.kept_in} and the next run re-attaches "
                     "to them")
                return
            await anyio.sleep(0.1)

    async def receive(self, received: signal.Signals, work: anyio.CancelScope) -> None:
        """Act on one signal (``watch`` calls it; tests call it directly)."""
        self.count += 1
        if self.signal is None:
            self.signal = received
            self._first_at = anyio.current_time()
            if self.held is not None and self.held() and not self.cancel_live:
                # Not "again to cancel": a second signal ends the wait for the journal, as
                # the next line says (_say_waiting).
                _say(f"{self.name}: stopping; live responses are left running on the server")
            elif self.cancel_live:
                _say(f"{self.name}: stopping; cancelling the live responses on the server")
                if self.on_cancel is not None:
                    with anyio.move_on_after(self.cancel_timeout):
                        await self.on_cancel()
            else:
                _say(f"{self.name}: stopping; live responses are left running on the server "
                     "(interrupt again within a second to cancel them)")
            work.cancel()
        elif self.waiting and self.count == 2:
            if self.leave is not None:
                self.leave()
            _say(f"{self.name} again: leaving now; the ids of the responses the journal has "
                 f"not taken go to {self.kept_in}")
            self._again.set()
        elif self.count == 2:
            if not self.cancel_live:
                self.cancel_live = True
                _say(f"{self.name} again: the live responses will be cancelled on the server "
                     "(interrupt once more to exit at once)")
            self._again.set()
        else:
            if self.leave is not None:
                self.leave()  # "exit at once": no wait for the journal either
            self.cleanup.cancel()

    async def settle(self, grace: float) -> None:
        """Give a second signal until ``grace`` seconds after the first to ask for a cancel.

        A double Ctrl-C is one gesture; without this, a run that detaches in milliseconds
        would have exited before the second press arrived.
        """
        if self.cancel_live or self.signal is None:
            return
        with anyio.move_on_after(self._first_at + grace - anyio.current_time()):
            await self._again.wait()


def _say(message: str) -> None:
    print(f"asyncbg: {message}", file=sys.stderr, flush=True)
