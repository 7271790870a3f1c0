"""MemoryLedger: the ledger of a manager without a journal, a dict that lives as long as it does."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection

from ._base import Claim, ClaimOutcome, Outcome, Record
from ._outbox import Delivery, DeliveryState, Notice
from ._rules import claim_outcome, state_after, unclaimed

__all__ = ["MemoryLedger"]


class MemoryLedger:
    """A :class:`Ledger` kept in memory: same rules as the SQLite one, gone with the process.

    ``open()`` and ``close()`` do nothing, so one instance can serve several managers in turn
    (as a journal file would), which is what tests of re-attaching want. It keeps an outbox of
    webhook notifications too (see :mod:`._outbox`), as lasting as the rest.

    ``keep_finished=False`` (the outbox of a manager with ``notify=`` and no journal) forgets a
    finished key as soon as no notification of it is pending, so that memory stays bounded by
    the jobs in flight.
    """

    __slots__ = ("_keep_finished", "_outbox", "_records")

    def __init__(self, *, keep_finished: bool = True) -> None:
        # A dict keeps insertion order, and replacing a value keeps its place: claim order.
        self._records: dict[str, Record] = {}
        self._outbox: dict[str, _Row] = {}
        self._keep_finished = keep_finished

    def __repr__(self) -> str:
        return f"<MemoryLedger records={len(self._records)}>"

    @property
    def location(self) -> str:
        return "memory"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def claim(self, key: str, digest: str, request: bytes) -> Claim:
        now = time.time()
        old = self._records.get(key)
        if old is None:
            record = Record(
                key=key, digest=digest, request=bytes(request), state="new", response_id=None,
                status="pending", body=None, error=None, error_code=None, http_status=None,
                request_id=None, resubmits=0, created=now, updated=now,
            )
            self._records[key] = record
            return Claim(ClaimOutcome.NEW, record)
        outcome = claim_outcome(old.state, old.digest, digest)
        if outcome is ClaimOutcome.NEW:
            record = dataclasses.replace(
                old, digest=digest, request=bytes(request), state="new", response_id=None,
                status="pending", body=None, error=None, error_code=None, http_status=None,
                request_id=None, updated=now,
            )
        elif outcome is ClaimOutcome.RESEND:
            record = dataclasses.replace(old, request=bytes(request), status="pending", updated=now)
        elif outcome is not ClaimOutcome.MISMATCH and not old.request:
            # A record upgraded from an old journal has no request yet: fill it in.
            record = dataclasses.replace(old, request=bytes(request))
        else:
            return Claim(outcome, old)
        self._records[key] = record
        return Claim(outcome, record)

    async def sending(self, key: str, *, resubmit: bool) -> None:
        old = self._get(key)
        self._records[key] = dataclasses.replace(
            old, state="sending", response_id=None, status="pending",
            resubmits=old.resubmits + (1 if resubmit else 0), updated=time.time(),
        )

    async def record(self, key: str, outcome: Outcome) -> None:
        old = self._get(key)
        state = state_after(outcome)
        response_id = outcome.response_id if outcome.response_id is not None else old.response_id
        if state == "live":
            new = dataclasses.replace(
                old, state=state, response_id=response_id, status=outcome.status,
                updated=time.time(),
            )
        else:
            new = dataclasses.replace(
                old, state=state, response_id=response_id, status=outcome.status,
                body=outcome.body, error=outcome.error, error_code=outcome.error_code,
                http_status=outcome.http_status, request_id=outcome.request_id,
                updated=time.time(),
            )
            if outcome.notification is not None:
                self._add(key, outcome.notification)
            elif not self._keep_finished:
                self._records.pop(key, None)
                return
        self._records[key] = new

    async def get(self, key: str) -> Record | None:
        return self._records.get(key)

    async def records(self) -> list[Record]:
        return list(self._records.values())

    async def resubmits(self) -> int:
        return sum(r.resubmits for r in self._records.values())

    # -- the outbox ------------------------------------------------------------------------------

    def _add(self, key: str, notice: Notice) -> None:
        if notice.id not in self._outbox:
            now = time.monotonic()
            self._outbox[notice.id] = _Row(notice.id, key, notice.url, notice.body, now, now)

    async def take_deliveries(self, url: str | None, limit: int, *, owner: str,
                              lease: float, done: Collection[str] = ()) -> list[Delivery]:
        await self.deliveries_done(done)
        now = time.monotonic()
        due: list[_Row] = []
        for row in self._outbox.values():  # oldest first: the dict keeps insertion order
            if len(due) >= limit:
                break
            if row.state == "pending" and url in (None, row.url) and row.free_at() <= now:
                due.append(row)
        for row in due:
            row.owner, row.lease_until = owner, now + lease
        return [row.delivery(now) for row in due]

    async def deliveries_done(self, ids: Collection[str]) -> None:
        for id_ in ids:
            row = self._outbox.pop(id_, None)
            if row is not None and not self._keep_finished:
                record = self._records.get(row.key)
                if record is not None and record.terminal:
                    del self._records[row.key]

    async def release_deliveries(self, ids: Collection[str], *, owner: str) -> None:
        for id_ in ids:
            row = self._outbox.get(id_)
            if row is not None and row.owner == owner:
                row.owner = row.lease_until = None

    async def delivery_failed(self, id: str, *, owner: str, retry_in: float | None,
                              error: str, http_status: int | None) -> None:
        row = self._outbox.get(id)
        if row is None or row.owner != owner or row.state != "pending":
            return
        row.attempts += 1
        row.error, row.http_status = error, http_status
        row.owner = row.lease_until = None
        if retry_in is None:
            row.state = "failed"
        else:
            row.next_at = time.monotonic() + retry_in

    async def deliver_now(self, url: str) -> int:
        now = time.monotonic()
        later = [r for r in self._outbox.values() if r.state == "pending" and r.url == url
                 and r.next_at > now and (r.lease_until or 0.0) <= now]
        for row in later:
            row.next_at = now
        return len(later)

    async def fail_deliveries(self, url: str, *, older_than: float | None, error: str) -> int:
        now = time.monotonic()
        failed = 0
        for row in self._outbox.values():
            if row.state == "pending" and row.url == url and (
                    older_than is None or now - row.created > older_than):
                row.state, row.error = "failed", error
                failed += 1
        return failed

    async def retry_failed_deliveries(self, url: str | None) -> int:
        now = time.monotonic()
        again = [r for r in self._outbox.values() if r.state == "failed" and url in (None, r.url)]
        for row in again:
            row.state, row.created, row.next_at = "pending", now, now
            row.owner = row.lease_until = None
        return len(again)

    async def next_delivery(self, url: str | None, *, held: bool = True) -> float | None:
        now = time.monotonic()
        times = [r.free_at() for r in self._outbox.values()
                 if r.state == "pending" and url in (None, r.url)
                 and (held or (r.lease_until or 0.0) <= now)]
        return max(min(times) - now, 0.0) if times else None

    async def deliveries(self) -> list[Delivery]:
        now = time.monotonic()
        return [row.delivery(now) for row in self._outbox.values()]

    def _get(self, key: str) -> Record:
        try:
            return self._records[key]
        except KeyError:
            raise unclaimed(key, self.location) from None


@dataclasses.dataclass(slots=True)
class _Row:
    """One notification in a :class:`MemoryLedger`'s outbox (times are ``time.monotonic()``)."""

    id: str
    key: str
    url: str
    body: bytes
    created: float
    next_at: float
    state: DeliveryState = "pending"
    attempts: int = 0
    owner: str | None = None
    lease_until: float | None = None
    error: str | None = None
    http_status: int | None = None

    def free_at(self) -> float:
        """When it may be taken: when due, and when no sender holds it."""
        return max(self.next_at, self.lease_until or 0.0)

    def delivery(self, now: float) -> Delivery:
        return Delivery(self.id, self.key, self.url, self.body, self.state, self.attempts,
                        now - self.created, self.error, self.http_status)
