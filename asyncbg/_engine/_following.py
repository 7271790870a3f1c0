"""The steps a shared ledger adds: following a job another process owns, and losing a lease.

A claim that comes back :attr:`~asyncbg.ClaimOutcome.FOLLOW` means another live process holds
the key's lease and runs it. The job is queued like any other but, once it has a slot, it reads
the ledger instead of the server (:meth:`SharedLedgerSteps._follow`, at the poll policy's pace):
it ends with the owner's record, or, when the owner's lease runs out, the claim takes the key
over and the job goes on here: polling the recorded response id, or creating it (counted as a
possible duplicate when a create may have left). A cancel asked of a followed job (the user's,
or its deadline) is sent to the server for the response the owner recorded; the owner then
records the outcome, which the follower reads.

A write that the ledger refuses with :class:`~asyncbg._ledgers._shared.LeaseLost`, or a lease a
renewal finds lost (:meth:`SharedLedgerSteps.drop`), ends the job here without any request and
without recording anything: another process owns it now. Before a cancel, the lease is renewed,
so that a process that lost it can never cancel the new owner's response.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio

from .. import _log
from .._http import RequestError
from .._ledgers._base import ClaimOutcome, LedgerError, Record, fingerprint
from .._ledgers._shared import LeaseLost, SharedLedger
from .._policies import PollPolicy
from .._providers._base import Answer
from .._status import JobStatus
from ._job import Job
from ._life import Entry, Stage, move
from ._steps import AFTER_CANCEL, Permit, Steps

__all__ = ["SharedLedgerSteps", "answer_of"]


class SharedLedgerSteps(Steps):
    """Mixed into :class:`~asyncbg._engine._scheduler.Scheduler`; see the module docstring."""

    _following: set[str]
    _shared: bool

    if TYPE_CHECKING:  # the Scheduler's own methods
        def add(self, job: Job, params: dict[str, Any] | None, policy: PollPolicy, *,
                deadline: float | None = None) -> Entry: ...

        def serve(self, job: Job, answer: Answer) -> None: ...

        def _detach(self, entry: Entry) -> None: ...

        def lease_taken(self, key: str, at: float) -> None: ...

    def follow(self, job: Job, params: dict[str, Any], policy: PollPolicy, *,
               deadline: float | None = None) -> Entry:
        """Queue a job another live process runs (a FOLLOW claim): it reads the ledger, at the
        poll policy's pace, until that process records the end, or until its lease runs out
        and a claim takes the job over here. It holds a concurrency slot like any job."""
        self._following.add(job.key)
        return self.add(job, params, policy, deadline=deadline)

    async def _follow(self, entry: Entry, permit: Permit) -> float | None:
        job, ledger, params = entry.job, self.ledger, entry.params
        assert ledger is not None and params is not None
        try:
            record = await ledger.get(job.key)
            claim = None
            if record is None or not record.terminal:
                claimed_at = anyio.current_time()
                claim = await ledger.claim(job.key, *fingerprint(params))
                record = claim.record
                if claim.outcome is not ClaimOutcome.FOLLOW:
                    self.lease_taken(job.key, claimed_at)
        except LeaseLost:
            raise
        except LedgerError as exc:  # unreachable for now: read it again later
            _log.warning("job.follow_failed", key=job.key, error=str(exc))
            return entry.policy.max_interval * entry.scale
        if claim is not None and claim.outcome is ClaimOutcome.FOLLOW:
            if entry.cancel_by_user:  # a deadline here is not ours to act on: it is their job
                return await self._cancel_followed(entry, permit, record)
            age = anyio.current_time() - entry.started
            return entry.policy.next_interval(age, scale=entry.scale)
        permit.release()
        self._following.discard(job.key)
        if claim is None or claim.outcome is ClaimOutcome.DONE:
            self.serve(job, answer_of(record))  # the owner recorded the end
            self._close(entry, settled=True)
            return None
        if claim.outcome is ClaimOutcome.MISMATCH:
            self._drop(entry, JobStatus.FAILED, "the process that owned this key replaced its "
                       "request with another; give this request a new key", "journal_mismatch")
            return None
        # The owner's lease ran out: the job is ours now.
        _log.warning("job.taken_over", key=job.key, response_id=record.response_id,
                     outcome=claim.outcome.value)
        entry.started = anyio.current_time()
        entry.cancel_sent = False
        if claim.outcome is ClaimOutcome.RESUME:
            entry.sent = True
            move(entry, Stage.LIVE)
            entry.control.update(JobStatus.from_server(record.status),
                                 response_id=record.response_id)
            self._known(entry)
            return 0.0
        if claim.outcome is ClaimOutcome.RESEND:
            entry.resubmit = True
            self.possible_duplicates += 1
            _log.warning("job.possible_duplicate", key=job.key,
                         reason="create sent but never recorded")
        move(entry, Stage.CREATING)
        return 0.0

    async def _cancel_followed(self, entry: Entry, permit: Permit,
                               record: Record) -> float | None:
        """Cancel asked of a job another process owns: cancel the response it recorded on the
        server (the owner records the outcome); nothing to cancel before it has an id."""
        rid = record.response_id
        if rid is None or entry.cancel_sent:
            return AFTER_CANCEL
        entry.cancel_sent = True
        self.requests += 1
        _log.info("job.cancel_sent", key=entry.job.key, response_id=rid,
                  reason="asked, for a job another process runs")
        try:
            answer = await self.provider.cancel(rid)
        except RequestError as exc:
            _log.info("job.cancel_failed", key=entry.job.key, response_id=rid,
                      error=exc.message)
            return AFTER_CANCEL
        finally:
            permit.release()
        if answer.status.terminal:
            # Served as the server says; the owner records it (this process holds no lease).
            self._following.discard(entry.job.key)
            self.serve(entry.job, answer)
            self._close(entry, settled=True)
            return None
        return AFTER_CANCEL

    async def _cancel_live(self, entry: Entry, permit: Permit) -> float | None:
        if not await self._still_ours(entry):
            return None
        return await self._cancel(entry, permit)

    def drop(self, key: str) -> None:
        """The lease on ``key`` was lost (found by a renewal): stop running it here."""
        entry = self._entries.get(key)
        if entry is not None and not entry.job.done:
            self._lease_lost(entry, None)

    def _lease_lost(self, entry: Entry, exc: LeaseLost | None) -> None:
        """Another process took the job over: detach it locally, with no request and nothing
        recorded (its waiters learn it was left running; the new owner finishes it)."""
        if entry.stage is Stage.ENDED:
            return
        if exc is not None:
            _log.warning("job.lease_lost", key=entry.job.key, response_id=entry.job.response_id,
                         error=str(exc))
        self._following.discard(entry.job.key)
        self._detach(entry)

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


def answer_of(record: Record) -> Answer:
    """A ledger record as the answer it stands for (a job served without a request)."""
    body = record.body if record.body is not None else json.dumps(
        {"id": record.response_id, "status": record.status}).encode()
    return Answer(JobStatus.from_server(record.status), record.response_id, body,
                  record.http_status or 200, record.request_id, None, record.error,
                  record.error_code)
