"""The outbox: webhook notifications kept in the ledger until a receiver has taken them.

A notification (:class:`Notice`) rides on the terminal :class:`~asyncbg.Outcome` it announces
and is written in the same transaction, so that no outcome is ever recorded without its
notification, nor a notification without its outcome. It stays ``pending`` until a receiver
answered 2xx (then it is deleted), or until asyncbg gives up on it (then it is ``failed``, kept
for ``asyncbg status`` to show and ``asyncbg notify --retry-failed`` to send again): never
dropped silently.

A pending delivery is sent by one sender at a time: :meth:`Outbox.take_deliveries` leases it to
an owner for a while (row locks with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the write lock of
``BEGIN IMMEDIATE`` on SQLite), so that two workers of a fleet never post it together; a sender
that dies mid-post leaves a lease that runs out, and another sender posts it again.

Times are relative (seconds from now, seconds old): each ledger reads its own clock, the
database's for PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

__all__ = ["Delivery", "DeliveryState", "Notice", "Outbox"]

#: ``pending``: to be sent (perhaps after a backoff). ``failed``: given up on (too old, or the
#: endpoint answered 410 Gone); sent again only when asked (``--retry-failed``).
DeliveryState = Literal["pending", "failed"]


@dataclass(frozen=True, slots=True)
class Notice:
    """A webhook notification, written with the terminal outcome it announces."""

    #: The ``webhook-id``: unique per job outcome, the same on every attempt.
    id: str
    url: str
    #: The JSON body exactly as it is posted (and signed) on every attempt.
    body: bytes


@dataclass(frozen=True, slots=True)
class Delivery:
    """A notification in the outbox: pending, or failed."""

    id: str
    key: str
    url: str
    body: bytes
    state: DeliveryState
    #: Attempts made so far.
    attempts: int
    #: Seconds since the notification was written (with its outcome).
    age: float
    #: Why the last attempt failed (None before any).
    error: str | None
    #: The HTTP status of that attempt (None when no answer came).
    http_status: int | None


@runtime_checkable
class Outbox(Protocol):
    """A ledger that keeps webhook notifications (``BackgroundManager(notify=...)`` needs one).

    :meth:`~asyncbg.Ledger.record` writes ``outcome.notification``, when there is one, in the
    same transaction as the outcome. ``url`` None means every endpoint.
    """

    async def take_deliveries(self, url: str | None, limit: int, *, owner: str,
                              lease: float, done: Collection[str] = ()) -> list[Delivery]:
        """Lease up to ``limit`` pending deliveries that are due and that no live sender holds,
        oldest first, to ``owner`` for ``lease`` seconds; first delete ``done`` (as
        :meth:`deliveries_done`), in the same transaction: one round trip for both."""
        ...

    async def deliveries_done(self, ids: Collection[str]) -> None:
        """These were answered 2xx: delete them."""
        ...

    async def release_deliveries(self, ids: Collection[str], *, owner: str) -> None:
        """``owner`` stops before their attempts ended (it is leaving): hand them back, due
        now, for another sender to take without waiting for the lease to run out."""
        ...

    async def delivery_failed(self, id: str, *, owner: str, retry_in: float | None,
                              error: str, http_status: int | None) -> None:
        """An attempt by ``owner`` failed: count it and try again in ``retry_in`` seconds,
        or with ``retry_in`` None mark it failed. Its lease is released either way."""
        ...

    async def deliver_now(self, url: str) -> int:
        """The endpoint answered 2xx again: its pending deliveries waiting for a retry (and held
        by no sender) are due now, rather than when their backoff ends; returns how many."""
        ...

    async def fail_deliveries(self, url: str, *, older_than: float | None, error: str) -> int:
        """Mark the pending deliveries to ``url`` failed: all of them (``older_than`` None, the
        endpoint is gone) or those older than ``older_than`` seconds; returns how many."""
        ...

    async def retry_failed_deliveries(self, url: str | None) -> int:
        """Make the failed deliveries pending again, due now and with their age reset, so that
        they get the whole ``give_up_after`` again; returns how many."""
        ...

    async def next_delivery(self, url: str | None, *, held: bool = True) -> float | None:
        """Seconds until a pending delivery may be taken (0: now; counting the leases other
        senders hold), or None when none is pending. ``held=False`` leaves out the deliveries
        a sender holds now (theirs to settle)."""
        ...

    async def deliveries(self) -> list[Delivery]:
        """Every pending and failed delivery, oldest first."""
        ...
