"""MemoryLedger: the ledger of a manager without a journal, a dict that lives as long as it does."""

from __future__ import annotations

import dataclasses
import time

from ._base import Claim, ClaimOutcome, Outcome, Record
from ._rules import claim_outcome, state_after, unclaimed

__all__ = ["MemoryLedger"]


class MemoryLedger:
    """A :class:`Ledger` kept in memory: same rules as the SQLite one, gone with the process.

    ``open()`` and ``close()`` do nothing, so one instance can serve several managers in turn
    (as a journal file would), which is what tests of re-attaching want.
    """

    __slots__ = ("_records",)

    def __init__(self) -> None:
        # A dict keeps insertion order, and replacing a value keeps its place: claim order.
        self._records: dict[str, Record] = {}

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
        self._records[key] = new

    async def get(self, key: str) -> Record | None:
        return self._records.get(key)

    async def records(self) -> list[Record]:
        return list(self._records.values())

    async def resubmits(self) -> int:
        return sum(r.resubmits for r in self._records.values())

    def _get(self, key: str) -> Record:
        try:
            return self._records[key]
        except KeyError:
            raise unclaimed(key, self.location) from None
