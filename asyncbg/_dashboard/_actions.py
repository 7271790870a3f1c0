"""What the dashboard may change, when it was started with ``--allow-actions`` and a token.

Cancels go to the provider through asyncbg's own public path, a :class:`BackgroundManager`
over the ledger that attaches to each key and cancels it: the outcome the server gives is
recorded in the ledger the usual way (a response that finished first stays finished: a cancel of
a finished response is a race, not a failure). Retrying failed notifications puts them back in
the ledger's outbox for the senders to deliver.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from .._ledgers import Ledger
from .._ledgers._outbox import Outbox

__all__ = ["Actions", "Cancelled", "token_matches"]


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


#: What a cancel did for one key: ``key``, ``response_id``, ``status`` (the server's, or
#: ``not_live`` when nothing was sent) and ``error``, as the action's JSON answer says it.
Cancelled = dict[str, str | None]


def _cancelled(key: str, response_id: str | None, status: str, error: str | None) -> Cancelled:
    return {"key": key, "response_id": response_id, "status": status, "error": error}


class Actions:
    """Cancels and notification retries on the ledger ``open_ledger()`` returns (unopened),
    with the provider's client ``make_client()`` returns (closed by its caller's exit)."""

    def __init__(self, *, open_ledger: Callable[[], Ledger], make_client: Callable[[], Any],
                 timeout: float = 30.0) -> None:
        self._open_ledger = open_ledger
        self._make_client = make_client
        self._timeout = timeout
        self._lock = anyio.Lock()  # one action at a time: no two managers on one key

    async def cancel(self, keys: Sequence[str] | None) -> list[Cancelled]:
        """Cancel ``keys`` (None: every live job) on the server and record the outcomes."""
        from .. import BackgroundManager

        async with self._lock:
            ledger = self._open_ledger()
            await ledger.open()
            try:
                if keys is None:
                    keys = [r.key for r in await ledger.records() if r.state == "live"]
                client = self._make_client()
                jobs = []
                done: list[Cancelled] = []
                try:
                    with anyio.move_on_after(self._timeout):
                        async with BackgroundManager(client, journal=ledger,
                                                     cancel_on_exit=False) as mgr:
                            for key in keys:
                                try:
                                    jobs.append(await mgr.attach(key))
                                except LookupError as exc:
                                    done.append(_cancelled(key, None, "not_live", str(exc)))
                            async with anyio.create_task_group() as tg:
                                for job in jobs:
                                    if not job.done:
                                        tg.start_soon(job.cancel)
                finally:
                    await _close(client)
                return [*done, *(_cancelled(j.key, j.response_id, j.status.value, j.error)
                                 for j in jobs)]
            finally:
                await ledger.close()

    async def retry_notifications(self) -> int:
        """Put every failed notification back in the outbox; how many."""
        async with self._lock:
            ledger = self._open_ledger()
            await ledger.open()
            try:
                if not isinstance(ledger, Outbox):
                    return 0
                return await ledger.retry_failed_deliveries(None)
            finally:
                await ledger.close()


async def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if close is not None:
        await close()
