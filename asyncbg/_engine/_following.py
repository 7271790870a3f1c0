"""Shared ledgers in the scheduler: following a job another process owns, and losing a lease.

A claim that comes back :attr:`~asyncbg.ClaimOutcome.FOLLOW` means another live process holds
the key's lease and runs it. The job is queued like any other but, once it has a slot, it reads
the ledger instead of the server (:meth:`Following._follow`, at the poll policy's pace): it ends
with the owner's record, or, when the owner's lease runs out, the claim takes the key over and
the job goes on here: polling the recorded response id, or creating it (counted as a possible
duplicate when a create may have left).

A write that the ledger refuses with :class:`~asyncbg._ledgers._shared.LeaseLost`, or a lease a
renewal finds lost (:meth:`Following.drop`), ends the job here without any request and without
recording anything: another process owns it now. Before a cancel, the lease is renewed, so
that a process that lost it can never cancel the new owner's response.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio

from .. import _log
from .._ledgers._base import ClaimOutcome, LedgerError, Record, canonical, digest
from .._ledgers._shared import LeaseLost, SharedLedger
from .._policies import PollPolicy
from .._providers._base import Answer
from .._status import JobStatus
from ._entry import CREATING, ENDED, LIVE, Entry
from ._job import Job
from ._steps import Steps

__all__ = ["FOLLOWING", "Following", "answer_of"]

#: The stage of a followed job: after those of ._entry; like them, it holds a concurrency slot.
FOLLOWING = ENDED + 1


class Following(Steps):
    """Mixed into :class:`~asyncbg._engine._scheduler.Scheduler`; see the module docstring."""

    _following: set[str]
    _shared: bool

    if TYPE_CHECKING:  # the Scheduler's own methods
        def add(self, job: Job, params: dict[str, Any] | None, policy: PollPolicy, *,
                deadline: float | None = None) -> Entry: ...

        def serve(self, job: Job, answer: Answer) -> None: ...

    def follow(self, job: Job, params: dict[str, Any], policy: PollPolicy, *,
               deadline: float | None = None) -> Entry:
        """Queue a job another live process runs (a FOLLOW claim): it reads the ledger, at the
        poll policy's pace, until that process records the end, or until its lease runs out
        and a claim takes the job over here. It holds a concurrency slot like any job."""
        self._following.add(job.key)
        return self.add(job, params, policy, deadline=deadline)

    async def _io(self, entry: Entry) -> None:
        if entry.stage != FOLLOWING:
            await super()._io(entry)
            return
        try:
            await self._follow(entry)
        except LedgerError as exc:  # the ledger is unreachable for now: read it again later
            _log.warning("job.follow_failed", key=entry.job.key, error=str(exc))
            self._schedule(entry, entry.policy.max_interval * entry.scale)
        except Exception as exc:  # noqa: BLE001 - a bug must fail one job, not the manager
            _log.exception("job.crashed", key=entry.job.key)
            self._following.discard(entry.job.key)
            self._end(entry, JobStatus.FAILED, f"asyncbg internal error: {exc!r}",
                      "internal_error")
        finally:
            entry.in_flight = False
            self.requests_limiter.release()

    async def _follow(self, entry: Entry) -> None:
        job, ledger, params = entry.job, self.ledger, entry.params
        assert ledger is not None and params is not None
        record = await ledger.get(job.key)
        claim = None
        if record is None or not record.terminal:
            claim = await ledger.claim(job.key, digest(params), canonical(params))
            record = claim.record
            if claim.outcome is ClaimOutcome.FOLLOW:
                now = anyio.current_time()
                if entry.deadline is not None and now >= entry.deadline:
                    # Not ours to cancel: cancelled if it is taken over (and no longer woken
                    # at the deadline, which has passed).
                    entry.cancel_wanted = True
                    entry.cancel_reason = ("its deadline passed", "deadline_exceeded")
                age = now - entry.started
                self._schedule(entry, entry.policy.next_interval(age, scale=entry.scale))
                return
        self._following.discard(job.key)
        if claim is None or claim.outcome is ClaimOutcome.DONE:
            self.serve(job, answer_of(record))  # the owner recorded the end
            self._finished(entry)
        elif claim.outcome is ClaimOutcome.MISMATCH:
            self._end(entry, JobStatus.FAILED, "the process that owned this key replaced its "
                      "request with another; give this request a new key", "journal_mismatch")
        else:  # the owner's lease ran out: the job is ours now
            _log.warning("job.taken_over", key=job.key, response_id=record.response_id,
                         outcome=claim.outcome.value)
            entry.stage = CREATING
            if claim.outcome is ClaimOutcome.RESUME:
                entry.sent = True
                entry.stage = LIVE
                entry.control.update(JobStatus.from_server(record.status),
                                     response_id=record.response_id)
                self._known(entry)
            elif claim.outcome is ClaimOutcome.RESEND:
                entry.resubmit = True
                self.possible_duplicates += 1
                _log.warning("job.possible_duplicate", key=job.key,
                             reason="create sent but never recorded")
            entry.started = anyio.current_time()
            self._schedule(entry, 0.0)

    def drop(self, key: str) -> None:
        """The lease on ``key`` was lost (found by a renewal): stop running it here."""
        entry = self._entries.get(key)
        if entry is not None and not entry.job.done:
            self._lease_lost(entry, None)

    def _lease_lost(self, entry: Entry, exc: LeaseLost | None) -> None:
        """Another process took the job over: detach it locally, with no request and nothing
        recorded (its waiters learn it was left running; the new owner finishes it)."""
        if exc is not None:
            _log.warning("job.lease_lost", key=entry.job.key, response_id=entry.job.response_id,
                         error=str(exc))
        self._following.discard(entry.job.key)
        entry.control.detach()
        self._finished(entry)

    async def _still_ours(self, entry: Entry) -> bool:
        """Before a cancel on a shared ledger: renew the lease, so that a process that lost it
        can never cancel the new owner's response."""
        if not self._shared or entry.job.response_id is None:
            return True
        ledger = self.ledger
        assert isinstance(ledger, SharedLedger)
        if entry.job.key not in await ledger.renew([entry.job.key], ledger.lease):
            return True
        self._lease_lost(entry, None)
        return False

    async def _cancel(self, entry: Entry) -> None:
        if await self._still_ours(entry):
            await super()._cancel(entry)


def answer_of(record: Record) -> Answer:
    """A ledger record as the answer it stands for (a job served without a request)."""
    body = record.body if record.body is not None else json.dumps(
        {"id": record.response_id, "status": record.status}).encode()
    return Answer(JobStatus.from_server(record.status), record.response_id, body,
                  record.http_status or 200, record.request_id, None, record.error,
                  record.error_code)
