"""One request of one job, and what its answer does: the scheduler's I/O steps.

Every step is one attempt. What it learns is recorded in the ledger first, then applied to the
job; a failure is rescheduled with a backoff (creates give up after the retry policy's attempts;
polls of a live response never do). :class:`Steps` is mixed into
:class:`~asyncbg._engine._scheduler.Scheduler`, which owns the state named at the top of the class.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import anyio

from .. import _log
from .._http import BadAnswer, NotFound, Rejected, RequestError, Transient, Unreachable
from .._ledgers._base import Ledger, Outcome
from .._ledgers._shared import LeaseLost
from .._policies import RetryPolicy
from .._providers._base import Answer, Provider
from .._spend._limiter import Limiter
from .._status import JobStatus
from ._entry import CREATING, ENDED, LIVE, PENDING, STREAMING, Entry
from ._meter import PARK, Meter

__all__ = ["Steps"]

#: Seconds between polls of a job whose cancel was sent but not yet confirmed terminal.
AFTER_CANCEL = 0.25
#: Connection attempts, while no request has ever reached the server, before every create not
#: yet sent is failed at once: a wrong base URL should take seconds to report, not minutes.
UNREACHABLE_ATTEMPTS = 3
#: A Retry-After at least this long is worth a warning: the run will look stalled meanwhile.
LONG_WAIT = 10.0


class Steps:
    """The I/O steps; see the module docstring."""

    provider: Provider
    ledger: Ledger | None
    retry: RetryPolicy
    log_prompts: bool
    requests_limiter: Limiter
    requests: int
    polls: int
    retries: int
    possible_duplicates: int
    _entries: dict[str, Entry]
    _by_response_id: dict[str, Entry]
    _early: OrderedDict[str, None]
    _active: int
    _kick: anyio.Event
    _idle: anyio.Event | None
    _reached_server: bool
    _unreachable: str | None
    meter: Meter
    #: False: the ledger keeps ids, statuses and errors but no response bodies (see the
    #: manager's ``journal_bodies``).
    journal_bodies: bool = True
    _budget_tripped: bool
    _paced: deque[Entry]
    _budget_parked: deque[Entry]

    def _schedule(self, entry: Entry, delay: float) -> None:
        raise NotImplementedError

    def _known(self, entry: Entry) -> None:
        raise NotImplementedError

    def _lease_lost(self, entry: Entry, exc: LeaseLost) -> None:
        raise NotImplementedError

    async def _record(self, entry: Entry, outcome: Outcome, body: bytes | None = None) -> None:
        raise NotImplementedError  # the Scheduler's: the outcome, with its notification

    # -- one request ---------------------------------------------------------------------------

    async def _io(self, entry: Entry) -> None:
        try:
            if entry.stage == CREATING:
                await self._create(entry)
            elif entry.stage == LIVE:
                if (entry.deadline is not None and not entry.cancel_wanted
                        and anyio.current_time() >= entry.deadline):
                    entry.cancel_wanted = True
                    entry.cancel_reason = ("its deadline passed", "deadline_exceeded")
                if entry.cancel_wanted and not entry.cancel_sent:
                    await self._cancel(entry)
                else:
                    await self._poll(entry)
        except LeaseLost as exc:
            # A shared ledger refused a write: another process took the job over. It is theirs
            # now: stop here, record nothing, send nothing (see asyncbg/_engine/_following.py).
            self._lease_lost(entry, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must fail one job, not the manager
            _log.exception("job.crashed", key=entry.job.key)
            await self._end_recorded(entry, JobStatus.FAILED,
                                     f"asyncbg internal error: {exc!r}", "internal_error")
        finally:
            entry.in_flight = False
            self.requests_limiter.release()

    async def _create(self, entry: Entry) -> None:
        job = entry.job
        assert entry.params is not None
        if entry.cancel_wanted:
            self._end(entry, JobStatus.CANCELLED, "cancelled before it was sent", "cancelled")
            return
        if self._unreachable is not None and not self._reached_server:
            await self._end_recorded(entry, JobStatus.FAILED, self._unreachable,
                                     "connection_error")
            return
        meter = self.meter
        wait = meter.admit(job.key, entry.params)
        if wait is None:
            # Nothing is sent; the record stays unsent, so a rerun with a larger budget runs it.
            self._end(entry, JobStatus.FAILED, meter.budget_message(), "budget_exceeded")
            return
        if wait == PARK:
            self._budget_parked.append(entry)  # woken when a live job settles
            return
        if wait > 0:  # paced: not an attempt, nothing sent
            if meter.window_full():
                self._paced.append(entry)  # woken by the next create's answer
            else:
                self._schedule(entry, wait)
            return
        if self.ledger is not None:
            await self.ledger.sending(job.key, resubmit=entry.resubmit)
        entry.resubmit = False
        entry.sent = True
        self.requests += 1
        try:
            answer = await self.provider.create(entry.params, key=job.key)
        except RequestError as exc:
            meter.answered(exc.http_status or 0, exc.limits)
            self._wake_paced()
            if not isinstance(exc, Transient) or not exc.maybe_sent:
                meter.unsent(job.key)
            await self._create_failed(entry, exc)
            return
        meter.answered(answer.http_status, answer.limits)
        self._wake_paced()
        self._reached_server = True
        self._unreachable = None
        await self._accepted(entry, answer)

    def _wake_budget(self) -> None:
        """A job settled: the jobs parked for the budget may fit now; each asks again."""
        parked, self._budget_parked = self._budget_parked, deque()
        for entry in parked:
            if entry.stage == CREATING and not entry.in_flight:
                self._schedule(entry, 0.0)

    def _wake_paced(self) -> None:
        """A create came back, so one more may go: wake the longest-waiting paced job."""
        while self._paced:
            entry = self._paced.popleft()
            if entry.stage == CREATING and not entry.in_flight:
                self._schedule(entry, 0.0)
                return

    async def _create_failed(self, entry: Entry, exc: RequestError) -> None:
        job = entry.job
        if isinstance(exc, Rejected | BadAnswer):
            self._reached_server = True
            await self._end_recorded(
                entry, JobStatus.FAILED, _explain(exc),
                exc.code or ("invalid_response" if isinstance(exc, BadAnswer)
                             else "request_failed"),
                http_status=exc.http_status, request_id=exc.request_id)
        elif isinstance(exc, Unreachable):
            await self._create_unreachable(entry, exc)
        else:
            assert isinstance(exc, Transient)
            self._reached_server = self._reached_server or exc.http_status is not None
            if exc.maybe_sent:
                # The request may have reached the server and started a paid response; with no
                # idempotency key there is no way to know. Count it and say so.
                self.possible_duplicates += 1
                _log.warning("job.possible_duplicate", key=job.key,
                             reason="a create's answer was lost; it is sent again")
            await self._retry_or_fail(entry, exc, "create")

    async def _create_unreachable(self, entry: Entry, exc: Unreachable) -> None:
        if self._reached_server:
            await self._retry_or_fail(entry, exc, "create")
            return
        entry.attempt += 1
        if entry.attempt < UNREACHABLE_ATTEMPTS:
            self.retries += 1
            self._schedule(entry, 0.25 * 2 ** (entry.attempt - 1))
            return
        # Nothing has ever reached the server: fail fast, every create not yet sent with it.
        if self._unreachable is None:  # said once, not once per create failing with it
            _log.error("server.unreachable", base_url=self.provider.base_url, error=exc.message)
        self._unreachable = exc.message
        await self._end_recorded(entry, JobStatus.FAILED, exc.message, "connection_error")

    async def _retry_or_fail(self, entry: Entry, exc: RequestError, what: str) -> None:
        """A create met a transient error: retry after a backoff, or give up."""
        entry.attempt += 1
        if entry.attempt >= self.retry.max_attempts:
            code = ("rate_limited" if exc.http_status == 429 else
                    "connection_error" if exc.http_status is None else "server_error")
            await self._end_recorded(
                entry, JobStatus.FAILED,
                f"{what} failed after {entry.attempt} attempts; last error: {exc.message}",
                code, http_status=exc.http_status, request_id=exc.request_id)
            return
        delay = self.retry.delay(entry.attempt, exc.retry_after)
        self._note_retry(entry, exc, what, delay)
        self._schedule(entry, delay)

    def _note_retry(self, entry: Entry, exc: RequestError, what: str, delay: float) -> None:
        self.retries += 1
        fields = dict(key=entry.job.key, request=what, attempt=entry.attempt,
                      delay=round(delay, 3), status_code=exc.http_status,
                      error=type(exc).__name__)
        if exc.retry_after is not None and exc.retry_after >= LONG_WAIT:
            # Minutes of silence look like a hang: say so when the wait starts.
            _log.warning(f"rate limited by the server: waiting {delay:.0f} s",
                         retry_after=exc.retry_after, **fields)
        else:
            _log.info("request.retry", **fields)

    async def _accepted(self, entry: Entry, answer: Answer) -> None:
        job = entry.job
        if answer.response_id is None:
            await self._end_recorded(entry, JobStatus.FAILED,
                                     "the server's answer to create carried no response id",
                                     "invalid_response", http_status=answer.http_status,
                                     request_id=answer.request_id)
            return
        await self._take(entry, answer)
        _log.info("job.submitted", key=job.key, response_id=job.response_id,
                  status=job.status.value, elapsed=round(job.elapsed, 3),
                  **({"input": entry.params.get("input")}
                     if self.log_prompts and entry.params else {}))
        if job.done:
            return
        entry.stage = LIVE
        entry.attempt = 0
        entry.started = anyio.current_time()
        if entry.cancel_wanted or entry.fetch_wanted:
            self._schedule(entry, 0.0)
        elif answer.poll_after is not None and entry.policy.honor_poll_after:
            self._schedule(entry, answer.poll_after)
        else:
            self._schedule(entry, entry.policy.first(entry.scale))

    async def _poll(self, entry: Entry) -> None:
        job = entry.job
        rid = job.response_id
        assert rid is not None
        fetch, entry.fetch_wanted = entry.fetch_wanted, False
        self.polls += 1
        self.requests += 1
        try:
            answer = await (self.provider.fetch(rid) if fetch else self.provider.check(rid))
        except NotFound as exc:
            await self._lost(entry, exc)
            return
        except RequestError as exc:
            # A live response exists and is paid for: a failing poll never ends the job. Back
            # off up to the policy's longest interval and go on; only a deadline ends the wait.
            entry.attempt += 1
            entry.fetch_wanted = fetch
            if exc.http_status == 429:
                self.meter.poll_limited(exc.retry_after)  # one hold-off for every poll
            delay = min(self.retry.delay(entry.attempt, exc.retry_after),
                        max(entry.policy.max_interval, 1.0) * entry.scale)
            delay = max(delay, self.meter.poll_delay())
            self._note_retry(entry, exc, "retrieve", delay)
            if entry.attempt % 10 == 0:
                _log.warning("job.poll_failing", key=job.key, response_id=rid,
                             attempts=entry.attempt, error=exc.message)
            self._schedule(entry, delay)
            return
        entry.attempt = 0
        await self._take(entry, answer)
        if not job.done:
            self._schedule(entry, max(self._next_delay(entry, answer), self.meter.poll_delay()))

    def _next_delay(self, entry: Entry, answer: Answer) -> float:
        if entry.cancel_sent:
            # A cancelled response settles within moments; don't wait a long interval.
            return min(entry.policy.min_interval, AFTER_CANCEL)
        return entry.policy.next_interval(anyio.current_time() - entry.started,
                                          scale=entry.scale, poll_after=answer.poll_after)

    async def _cancel(self, entry: Entry) -> None:
        job = entry.job
        rid = job.response_id
        assert rid is not None
        entry.cancel_sent = True
        self.requests += 1
        reason = entry.cancel_reason[0] if entry.cancel_reason else "asked"
        _log.info("job.cancel_sent", key=job.key, response_id=rid, reason=reason)
        try:
            answer = await self.provider.cancel(rid)
        except NotFound as exc:
            await self._lost(entry, exc)
            return
        except Rejected as exc:
            # The response finished before the cancel arrived. Servers answer that race
            # differently (400, 409, or the final object); poll to learn the real outcome.
            _log.info("job.cancel_raced", key=job.key, response_id=rid,
                      status_code=exc.http_status, error=exc.message)
            self._schedule(entry, 0.0)
            return
        except RequestError as exc:
            entry.cancel_sent = False
            entry.attempt += 1
            delay = self.retry.delay(entry.attempt, exc.retry_after)
            self._note_retry(entry, exc, "cancel", delay)
            self._schedule(entry, delay)
            return
        await self._take(entry, answer)
        if not job.done:
            self._schedule(entry, AFTER_CANCEL)

    async def _lost(self, entry: Entry, exc: RequestError) -> None:
        rid = entry.job.response_id
        await self._end_recorded(
            entry, JobStatus.FAILED,
            f"response {rid} was not found on the server (HTTP {exc.http_status}: "
            f"{exc.message}); it is lost, and its result with it",
            "response_lost", http_status=exc.http_status, request_id=exc.request_id)

    # -- recording -----------------------------------------------------------------------------

    async def _take(self, entry: Entry, answer: Answer) -> None:
        """Apply a server answer: with a ledger, commit it first, then move the job.

        Committing first means a job is never reported done (and its result never handed out)
        before its final body is recorded.
        """
        job = entry.job
        status = answer.status
        if job.done:
            return
        first = job.response_id is None and answer.response_id is not None
        error, code = answer.error, answer.error_code
        if status is JobStatus.CANCELLED and entry.cancel_reason is not None:
            error, code = f"cancelled: {entry.cancel_reason[0]}", entry.cancel_reason[1]
        if self.ledger is not None and (first or status is not job.status):
            terminal = status.terminal
            await self._record(entry, Outcome(
                status.value, job.response_id or answer.response_id,
                answer.body if terminal and self.journal_bodies else None,
                error if terminal else None,
                code if terminal else None, answer.http_status, answer.request_id), answer.body)
        cost = None
        if status.terminal:
            _usage, cost = self.meter.settle(job.key, entry.params, answer.body)
            self._wake_budget()
        entry.control.update(status, body=answer.body, response_id=answer.response_id,
                             error=error, error_code=code, request_id=answer.request_id,
                             cost=cost)
        if first:
            self._known(entry)
        if job.done:
            self._finished(entry)
            if self.meter.over_budget:
                self._budget_spent()

    def _budget_spent(self) -> None:
        """Real spend passed ``max_cost``: cancel every live job on the server at once."""
        if self._budget_tripped:
            return
        self._budget_tripped = True
        reason = (self.meter.budget_message(), "budget_exceeded")
        _log.warning("budget.spent", message=reason[0])
        for entry in list(self._entries.values()):
            if entry.stage not in (LIVE, STREAMING) or entry.cancel_wanted:
                continue  # jobs not yet sent are refused by the budget before their create
            entry.cancel_wanted = True
            entry.cancel_reason = reason
            if entry.stream_scope is not None:
                entry.stream_scope.cancel()
            elif entry.stage == LIVE and not entry.in_flight:
                self._schedule(entry, 0.0)

    async def _end_recorded(
        self, entry: Entry, status: JobStatus, error: str, code: str, *,
        http_status: int | None = None, request_id: str | None = None,
    ) -> None:
        """End a job on our side (rejected, unreachable, lost), ledger first."""
        if entry.job.response_id is not None:
            self.meter.settle(entry.job.key, entry.params, None)  # paid for, usage unknown
        else:
            self.meter.unsent(entry.job.key)
        self._wake_budget()
        if self.ledger is not None and (entry.sent or entry.job.response_id is not None):
            await self._record(entry, Outcome(
                status.value, entry.job.response_id, None, error, code, http_status, request_id))
        self._end(entry, status, error, code)

    def _end(self, entry: Entry, status: JobStatus, error: str, code: str) -> None:
        """End a job on our side with nothing to record (it was never sent)."""
        entry.control.update(status, error=error, error_code=code)
        self._finished(entry)

    def _finished(self, entry: Entry) -> None:
        if entry.stage == ENDED:
            return
        if entry.stage != PENDING:
            self._active -= 1
        entry.stage = ENDED
        entry.gen += 1
        rid = entry.job.response_id
        if rid is not None:
            self._by_response_id.pop(rid, None)
        self._entries.pop(entry.job.key, None)
        self._kick.set()
        if not self._entries and self._idle is not None:
            self._idle.set()


def _explain(exc: RequestError) -> str:
    if isinstance(exc, BadAnswer):
        return exc.message
    code = f", {exc.code}" if exc.code else ""
    return f"rejected by the server (HTTP {exc.http_status}{code}): {exc.message}"
