"""What the dashboard may change, when it was started with ``--allow-actions`` and a token.

Cancels go to the provider through asyncbg's own public path, a :class:`BackgroundManager`
over the ledger that attaches to each key and cancels it: the outcome the server gives is
recorded in the ledger the usual way (a response that finished first stays finished: a cancel of
a finished response is a race, not a failure). On a fleet's ledger every write is fenced by the
key's lease, so the dashboard first claims the key; when a live worker holds it, the response is
cancelled on the server by its id and that worker records the end at its next status check
(the answer says so). Retrying failed notifications puts them back in the ledger's outbox for
the senders to deliver.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from .._http import RequestError
from .._ledgers import ClaimOutcome, Ledger
from .._ledgers._outbox import Outbox
from .._ledgers._shared import SharedLedger

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

    async def cancel(self, keys: Sequence[str]) -> list[Cancelled]:
        """Cancel ``keys`` on the server and record the outcomes."""
        from .. import BackgroundManager

        async with self._lock:
            ledger = self._open_ledger()
            await ledger.open()
            try:
                client = self._make_client()
                jobs = []
                done: list[Cancelled] = []
                try:
                    with anyio.move_on_after(self._timeout):
                        async with BackgroundManager(client, journal=ledger,
                                                     cancel_on_exit=False) as mgr, \
                                anyio.create_task_group() as tg:
                            for key in keys:
                                if not await _ours(ledger, key):  # a live worker's
                                    tg.start_soon(_cancel_held, mgr, ledger, key, done)
                                    continue
                                try:
                                    job = await mgr.attach(key)
                                except LookupError as exc:
                                    done.append(_cancelled(key, None, "not_live", str(exc)))
                                    continue
                                jobs.append(job)
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


async def _ours(ledger: Ledger, key: str) -> bool:
    """Whether this process may record ``key``'s end: always on a run's journal; on a shared
    ledger once it holds the key's lease (claimed here), False while a live worker holds it."""
    if not isinstance(ledger, SharedLedger):
        return True
    record = await ledger.get(key)
    if record is None or record.state != "live":
        return True  # nothing to claim: attach() says what it is
    claim = await ledger.claim(key, record.digest, record.request)
    return claim.outcome is not ClaimOutcome.FOLLOW


async def _cancel_held(mgr: Any, ledger: Ledger, key: str, done: list[Cancelled]) -> None:
    """Cancel on the server a response a live worker runs; the worker records its end."""
    record = await ledger.get(key)
    if record is None or record.state != "live" or record.response_id is None:
        done.append(_cancelled(key, None, "not_live", "it ended meanwhile"))
        return
    try:
        answer = await mgr.provider.cancel(record.response_id)
    except RequestError as exc:  # refused (it had ended: a race), or unreachable
        done.append(_cancelled(key, record.response_id, record.status, exc.message))
        return
    done.append(_cancelled(key, record.response_id, answer.status.value,
                           "recorded by the worker that holds it, at its next status check"))


async def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if close is not None:
        await close()
