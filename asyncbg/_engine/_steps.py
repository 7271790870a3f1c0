"""One request of one job, and what its answer does: the scheduler's I/O steps.

Every step is one attempt and returns when the job is next due (seconds), or None when the job
ended, was parked, or was handed to its stream. The scheduler looks at what was asked meanwhile
when a step returns (``Scheduler._after``), so no step reschedules a job itself.

What a step learns is recorded in the ledger first, then applied to the job. A ledger write that
fails for operational reasons is retried (``Scheduler._write``): it never becomes the job's
outcome. Creates give up after the retry policy's attempts; polls of a live response never do.

A create runs under a shield from the moment its ``sending`` record is written until the
response id the server answered is recorded: no interrupt, crash or exit of the manager
abandons a sent create unrecorded (on exit the shield gets a short deadline, see
``Scheduler.close``). The request slot (:class:`Permit`) is given back as soon as the request
is answered, before any ledger write.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import anyio

from .. import _log
from .._http import (
    NO_RETRY_CODES,
    BadAnswer,
    NoCredit,
    NotFound,
    Rejected,
    RequestError,
    Transient,
    Unreachable,
)
from .._ledgers._base import Ledger, LedgerError, Outcome, digest
from .._ledgers._rescue import keep_in
from .._ledgers._shared import LeaseLost, SharedLedger
from .._policies import RetryPolicy
from .._providers._base import Answer, Provider
from .._spend._limiter import Limiter
from .._status import JobStatus
from ._hooks import Hooks
from ._life import CANCEL, FETCH, Entry, Stage, move
from ._meter import PARK, Meter, Ticket

__all__ = ["Permit", "Steps", "Stop"]

T = TypeVar("T")

#: Seconds between polls of a job whose cancel was sent but not yet confirmed terminal.
AFTER_CANCEL = 0.25
#: Connection attempts, while no request has ever reached the server, before every create not
#: yet sent is failed at once: a wrong base URL should take seconds to report, not minutes.
UNREACHABLE_ATTEMPTS = 3
#: A Retry-After at least this long is worth a warning: the run will look stalled meanwhile.
LONG_WAIT = 10.0
#: Seconds before a 404 on a status check is checked again: one 404 is not yet "lost".
LOST_CONFIRM = 1.0
#: The fields of a final body kept when the journal keeps no bodies: what it cost, not what it
#: said (``journal_bodies=False``), so that a rerun counts earlier spend against ``max_cost``.
SPEND_FIELDS = ("id", "object", "status", "model", "service_tier", "usage", "usageMetadata",
                "modelVersion", "background_options", "error", "incomplete_details")


class Stop(Exception):
    """The manager must stop: ``error`` is what it raises (the ledger stayed unwritable)."""

    def __init__(self, error: LedgerError) -> None:
        super().__init__(str(error))
        self.error = error


class Permit:
    """One of ``max_requests`` request slots, given back exactly once (:meth:`release` is
    idempotent, and the step's ``finally`` always calls it). A step that must write to the
    ledger before its request (a create's ``sending``) takes its permit only then, so that a
    slow ledger never holds a request slot."""

    __slots__ = ("_held", "_limiter")

    def __init__(self, limiter: Limiter, *, held: bool) -> None:
        self._limiter = limiter
        self._held = held

    async def acquire(self) -> None:
        if not self._held:
            await self._limiter.acquire()
            self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter.release()


#: Why a create's response is kept rather than recorded (see Steps._keep_orphan).
_LEASE_LOST = "its lease was lost while the create was in flight"


class Steps:
    """The I/O steps, mixed into :class:`~asyncbg._engine._scheduler.Scheduler` (which owns the
    state named here)."""

    provider: Provider
    ledger: Ledger | None
    retry: RetryPolicy
    log_prompts: bool
    requests: int
    polls: int
    retries: int
    possible_duplicates: int
    meter: Meter
    hooks: tuple[Hooks, ...]
    #: False: the ledger keeps ids, statuses, errors and usage but no response bodies.
    journal_bodies: bool = True
    _entries: dict[str, Entry]
    _by_response_id: dict[str, Entry]
    _early: OrderedDict[str, None]
    _reached_server: bool
    _unreachable: str | None
    say_unreachable: bool
    _budget_tripped: bool
    _paced: deque[Entry]
    _budget_parked: deque[Entry]
    _shields: set[anyio.CancelScope]
    #: The ledger is shared by processes holding leases (a fleet's).
    _shared: bool
    _closing_at: float | None
    #: The server refused the account (401/403, no credit): (message, code) of the first such
    #: answer; every create not yet sent fails with it, unsent (a fleet hands them back).
    refused: tuple[str, str] | None

    # provided by the Scheduler
    def _close(self, entry: Entry, *, settled: bool = False) -> None:
        raise NotImplementedError

    def _poke(self, entry: Entry) -> None:
        raise NotImplementedError

    def _known(self, entry: Entry) -> None:
        raise NotImplementedError

    def _lease_lost(self, entry: Entry, exc: LeaseLost | None) -> None:
        raise NotImplementedError

    def _lease_left(self, entry: Entry) -> bool:
        raise NotImplementedError

    def _fenced(self, entry: Entry) -> bool:
        """A create is fenced by its lease: True (and the job handed back) when too little of
        it is left to be sure no other process took the key over (a SIGSTOP, a ledger that did
        not take renewals)."""
        if self._lease_left(entry):
            return False
        _log.warning("job.lease_expiring", key=entry.job.key,
                     action="not sent: another process may own this key now")
        self._lease_lost(entry, None)
        return True

    async def _write(self, call: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError

    def _ledger_failed(self, exc: LedgerError) -> float:
        raise NotImplementedError

    def _ledger_ok(self) -> None:
        raise NotImplementedError

    def _notice(self, entry: Entry, outcome: Outcome, body: bytes | None) -> Outcome:
        raise NotImplementedError

    def _start_stream(self, entry: Entry, ticket: Ticket | None) -> None:
        raise NotImplementedError

    # -- creating --------------------------------------------------------------------------

    def _admit(self, entry: Entry) -> Ticket | bool:
        """May ``entry``'s create go now? Its :class:`Ticket` when it may; True when the step
        must run anyway to end the job (the server is unreachable or refused the account: a
        ledger write); False when it waits (paced, parked for the budget, rescheduled) or
        was dropped over budget. Synchronous, and asked by the scheduler before it starts a
        step, so a create that must wait costs no task: one ``_create`` per create sent."""
        if (self._unreachable is not None and not self._reached_server) or (
                self.refused is not None):
            return True
        meter = self.meter
        assert entry.params is not None
        admitted = meter.admit(entry.job.key, entry.params)
        if admitted is None:
            # Nothing is sent; the record stays unsent, so a rerun with a larger budget runs it.
            self._drop(entry, JobStatus.FAILED, meter.budget_message(), "budget_exceeded")
            return False
        if isinstance(admitted, Ticket):
            return admitted
        if admitted == PARK:
            self._budget_parked.append(entry)  # woken when a live job settles
        elif meter.window_full():
            self._paced.append(entry)  # woken by the next create's answer
        else:
            self._push(entry, admitted)  # paced: not an attempt, nothing sent
        return False

    async def _create(self, entry: Entry, permit: Permit, admitted: Ticket | None) -> float | None:
        """Send ``entry``'s create with the ticket :meth:`_admit` gave it (None: it fails)."""
        job = entry.job
        if (self._unreachable is not None and not self._reached_server) or (
                self.refused is not None) or admitted is None:
            if admitted is not None:
                with admitted:  # not sent: its place in the pacer's window goes back
                    pass
            if self._unreachable is not None and not self._reached_server:
                await self._fail(entry, JobStatus.FAILED, self._unreachable, "connection_error")
            else:
                assert self.refused is not None
                await self._fail(entry, JobStatus.FAILED, *self.refused)
            return None
        meter = self.meter
        if entry.stream:
            self._start_stream(entry, admitted)  # the stream's open is its create
            return None
        with admitted as ticket:
            if self._fenced(entry):
                return None
            if self.ledger is not None:
                try:
                    await self.ledger.sending(job.key, resubmit=entry.resubmit)
                except LeaseLost:
                    raise
                except LedgerError as exc:
                    # Nothing was sent: the create waits until the ledger can record it.
                    meter.unsent(job.key)
                    return self._ledger_failed(exc)
                self._ledger_ok()
                if self._shared:
                    entry.sent_epoch = cast(SharedLedger, self.ledger).epoch_of(job.key)
            await permit.acquire()
            if self._fenced(entry):  # checked again right before it leaves
                return None
            entry.resubmit = False
            entry.sent = True
            with anyio.CancelScope(shield=True) as shield:
                self._shields.add(shield)
                if self._closing_at is not None:
                    shield.deadline = self._closing_at
                try:
                    return await self._send_create(entry, permit, ticket)
                finally:
                    self._shields.discard(shield)
        if entry.unrecorded is None:
            # The shield's exit deadline cut the create off: it may have started a response.
            # The ``sending`` record stays, so the next run counts it as a possible duplicate.
            _log.warning("job.create_abandoned", key=job.key,
                         reason="the manager exited before the create was answered")
        # Otherwise it was answered and the ledger did not take the id in time: the
        # manager's shutdown keeps it where the next run finds it (``Scheduler.shutdown``).
        return None

    async def _send_create(self, entry: Entry, permit: Permit, ticket: Ticket) -> float | None:
        job = entry.job
        assert entry.params is not None
        self.requests += 1
        started = anyio.current_time()
        try:
            answer = await self.provider.create(entry.params, key=job.key)
        except RequestError as exc:
            permit.release()
            # No credit is not a rate limit, whatever its status says: the pace stays.
            ticket.answered(400 if isinstance(exc, NoCredit) else exc.http_status or 0,
                            exc.limits)  # wakes a paced create
            self._hook_request(entry, "create", exc.http_status, started)
            if not isinstance(exc, Transient) or not exc.maybe_sent:
                self.meter.unsent(job.key)
            return await self._create_failed(entry, exc)
        permit.release()
        ticket.answered(answer.http_status, answer.limits)  # wakes a paced create
        self._hook_request(entry, "create", answer.http_status, started)
        self._reached_server = True
        self._unreachable = None
        return await self._accepted(entry, answer)

    def _wake_budget(self) -> None:
        """A job settled: the jobs parked for the budget may fit now; each asks again."""
        parked, self._budget_parked = self._budget_parked, deque()
        for entry in parked:
            if entry.stage is Stage.CREATING and entry.step is None:
                self._push(entry, 0.0)

    def _wake_paced(self) -> None:
        """A create came back, so more may go: wake the longest-waiting paced jobs, as many as
        the pacer's window has room for now (at least one). The window grows as answers come
        back (slow start doubles it): waking one job per answer would keep the creates in
        flight at the first window's size for good."""
        room = max(self.meter.room(), 1)
        while self._paced and room:
            entry = self._paced.popleft()
            if entry.stage is Stage.CREATING and entry.step is None:
                self._push(entry, 0.0)
                room -= 1

    async def _create_failed(self, entry: Entry, exc: RequestError) -> float | None:
        job = entry.job
        if exc.http_status in (401, 403) or isinstance(exc, NoCredit) or (
                exc.code in NO_RETRY_CODES or exc.code == "invalid_api_key"):
            # The account is refused: no create can succeed, so none is retried or sent.
            self._reached_server = True
            message = _explain(exc)
            code = exc.code or ("unauthorized" if exc.http_status == 401 else "forbidden")
            if self.refused is None:
                self.refused = (message, code)
                _log.error("server.refused", base_url=self.provider.base_url, error=message,
                           code=code, action="creates not yet sent fail at once")
            await self._fail(entry, JobStatus.FAILED, message, code,
                             http_status=exc.http_status, request_id=exc.request_id)
            return None
        if isinstance(exc, Rejected | BadAnswer):
            self._reached_server = True
            await self._fail(
                entry, JobStatus.FAILED, _explain(exc),
                exc.code or ("invalid_response" if isinstance(exc, BadAnswer)
                             else "request_failed"),
                http_status=exc.http_status, request_id=exc.request_id)
            return None
        if isinstance(exc, Unreachable):
            return await self._create_unreachable(entry, exc)
        assert isinstance(exc, Transient)
        self._reached_server = self._reached_server or exc.http_status is not None
        if exc.maybe_sent:
            # The request may have reached the server and started a paid response; with no
            # idempotency key there is no way to know. Count it and say so.
            self.possible_duplicates += 1
            _log.warning("job.possible_duplicate", key=job.key,
                         reason="a create's answer was lost; it is sent again")
        return await self._retry_or_fail(entry, exc, "create")

    async def _create_unreachable(self, entry: Entry, exc: Unreachable) -> float | None:
        if self._reached_server:
            return await self._retry_or_fail(entry, exc, "create")
        entry.attempt += 1
        if entry.attempt < UNREACHABLE_ATTEMPTS:
            self.retries += 1
            return float(0.25 * 2 ** (entry.attempt - 1))
        # Nothing has ever reached the server: fail fast, every create not yet sent with it.
        if self._unreachable is None and self.say_unreachable:  # once, not once per create
            _log.error("server.unreachable", base_url=self.provider.base_url, error=exc.message)
        self._unreachable = exc.message
        await self._fail(entry, JobStatus.FAILED, exc.message, "connection_error")
        return None

    async def _retry_or_fail(self, entry: Entry, exc: RequestError, what: str) -> float | None:
        """A create met a transient error: retry after a backoff, or give up."""
        entry.attempt += 1
        if entry.attempt >= self.retry.max_attempts:
            code = ("rate_limited" if exc.http_status == 429 else
                    "connection_error" if exc.http_status is None else "server_error")
            await self._fail(
                entry, JobStatus.FAILED,
                f"{what} failed after {entry.attempt} attempts; last error: {exc.message}",
                code, http_status=exc.http_status, request_id=exc.request_id)
            return None
        delay = self.retry.delay(entry.attempt, exc.retry_after)
        self._note_retry(entry, exc, what, delay)
        return delay

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

    async def _accepted(self, entry: Entry, answer: Answer) -> float | None:
        job = entry.job
        if answer.response_id is None:
            await self._fail(entry, JobStatus.FAILED,
                             "the server's answer to create carried no response id",
                             "invalid_response", http_status=answer.http_status,
                             request_id=answer.request_id)
            return None
        if entry.stage is Stage.ENDED:
            await self._orphaned(entry, answer)
            return None
        entry.unrecorded = answer.response_id  # until the ledger has it (named on a stop)
        try:
            await self._take(entry, answer)
        except LeaseLost:
            await self._orphaned(entry, answer)
            raise
        entry.unrecorded = None
        _log.info("job.submitted", key=job.key, response_id=job.response_id,
                  status=job.status.value, elapsed=round(job.elapsed, 3),
                  **({"input": entry.params.get("input")}
                     if self.log_prompts and entry.params else {}))
        if job.done:
            return None
        move(entry, Stage.LIVE)
        entry.attempt = 0
        entry.started = anyio.current_time()
        if answer.poll_after is not None and entry.policy.honor_poll_after:
            return answer.poll_after
        return entry.policy.first(entry.scale)

    async def _orphaned(self, entry: Entry, answer: Answer) -> None:
        """A create was answered after its job stopped being ours here. Cancelled by the
        user, a deadline or the budget while the create was on its way: the cancel is sent
        now. Its lease lost (another process may have taken the key over): the response is
        paid for, and only a user's cancel cancels one, so it is kept in the ledger's rescue
        file with the epoch it was sent at and adopted by the fenced rule (recorded live if
        the key was not created again meanwhile; otherwise said to be paid twice and left
        running), as a worker that left without recording an id keeps it."""
        rid = answer.response_id
        assert rid is not None
        key = entry.job.key
        if not entry.asked(CANCEL):
            await self._keep_orphan(entry, rid)
            return
        _log.info("job.orphan_cancelled", key=key, response_id=rid,
                  reason="the job was cancelled while its create was in flight")
        try:
            await self.provider.cancel(rid)
        except RequestError as exc:
            _log.warning("job.cancel_failed", key=key, response_id=rid, error=exc.message)

    async def _keep_orphan(self, entry: Entry, rid: str) -> None:
        key, epoch = entry.job.key, entry.sent_epoch
        if not self._shared or epoch is None:
            _log.warning("job.orphan_left", key=key, response_id=rid,
                         reason="created after its job stopped being run here",
                         action="left running on the server")
            return
        shared = cast(SharedLedger, self.ledger)
        try:
            sent = {} if entry.params is None else {key: digest(entry.params)}
            path = await keep_in(shared.rescue(), [(key, rid)], epochs={key: epoch},
                                 digests=sent,
                                 note={"ledger": shared.location, "owner": shared.owner})
            adoption = await shared.adopt_kept()
        except LedgerError as exc:
            _log.warning("job.orphan_kept", key=key, response_id=rid, epoch=epoch,
                         reason=_LEASE_LOST, error=str(exc), action="left running; the next "
                         "worker on this machine adopts it if it was kept")
            return
        verdict = adoption.verdict_of(rid)
        if verdict == "adopted":
            _log.warning("job.orphan_adopted", key=key, response_id=rid, reason=_LEASE_LOST,
                         action="recorded live for the fleet to poll: it was not created "
                         "again")
        elif verdict == "duplicate":
            _log.warning("job.duplicate_paid", key=key, response_id=rid, file=str(path),
                         reason=f"{_LEASE_LOST} and the key was created again",
                         action="left running on the server; nothing cancels it")
        elif verdict is None:
            _log.warning("job.orphan_kept", key=key, response_id=rid, file=str(path),
                         reason=_LEASE_LOST,
                         action="kept for the workers on this machine to adopt")

    # -- live jobs ---------------------------------------------------------------------------

    async def _poll(self, entry: Entry, permit: Permit) -> float | None:
        job = entry.job
        rid = job.response_id
        assert rid is not None
        fetch = entry.asked(FETCH)
        entry.asks &= ~FETCH
        self.polls += 1
        self.requests += 1
        started = anyio.current_time()
        try:
            answer = await (self.provider.fetch(rid) if fetch else self.provider.check(rid))
        except NotFound as exc:
            permit.release()
            self._hook_request(entry, "fetch" if fetch else "poll", exc.http_status, started)
            return await self._not_found(entry, exc)
        except RequestError as exc:
            # A live response exists and is paid for: a failing poll never ends the job. Back
            # off up to the policy's longest interval and go on; only a deadline ends the wait.
            permit.release()
            self._hook_request(entry, "fetch" if fetch else "poll", exc.http_status, started)
            entry.attempt += 1
            if fetch:
                entry.ask(FETCH)
            if exc.http_status == 429:
                self.meter.poll_limited(exc.retry_after)  # one hold-off for every poll
            delay = min(self.retry.delay(entry.attempt, exc.retry_after),
                        max(entry.policy.max_interval, 1.0) * entry.scale)
            delay = max(delay, self.meter.poll_delay())
            self._note_retry(entry, exc, "retrieve", delay)
            if entry.attempt % 10 == 0:
                _log.warning("job.poll_failing", key=job.key, response_id=rid,
                             attempts=entry.attempt, error=exc.message)
            return delay
        permit.release()
        self._hook_request(entry, "fetch" if fetch else "poll", answer.http_status, started)
        entry.attempt = 0
        entry.not_found = 0
        if answer.status is JobStatus.PENDING and not entry.asked(CANCEL):
            return self._send_again(entry, answer)
        await self._take(entry, answer)
        if job.done:
            return None
        return max(self._next_delay(entry, answer), self.meter.poll_delay())

    async def _not_found(self, entry: Entry, exc: RequestError) -> float | None:
        """A 404 for a response we created: lost only if a second check, a little later, says
        so too (one 404 can be a replica that has not seen the response yet)."""
        entry.not_found += 1
        if entry.not_found < 2:
            _log.info("job.not_found_once", key=entry.job.key,
                      response_id=entry.job.response_id, recheck_in=LOST_CONFIRM)
            return min(LOST_CONFIRM, max(entry.policy.min_interval * 4, 0.02))
        rid = entry.job.response_id
        await self._fail(
            entry, JobStatus.FAILED,
            f"response {rid} was not found on the server (HTTP {exc.http_status}: "
            f"{exc.message}); it is lost, and its result with it",
            "response_lost", http_status=exc.http_status, request_id=exc.request_id)
        return None

    def _send_again(self, entry: Entry, answer: Answer) -> float:
        """The server says the job's request never ran and nothing was paid for it (a batch
        request whose batch expired; the provider decides how often): create it again. Its
        ``sending`` record replaces the old response id in the ledger, so a crash before then
        re-attaches to the old one and is told the same again."""
        job = entry.job
        rid = job.response_id
        _log.warning("job.sent_again", key=job.key, response_id=rid, reason=answer.error)
        if rid is not None:
            self._by_response_id.pop(rid, None)
        entry.control.forget_response()
        self.meter.unsent(job.key)  # reserved again when the create is admitted
        move(entry, Stage.CREATING)
        return 0.0

    def _next_delay(self, entry: Entry, answer: Answer) -> float:
        if entry.cancel_sent:
            # A cancelled response settles within moments; don't wait a long interval.
            return min(entry.policy.min_interval, AFTER_CANCEL)
        return entry.policy.next_interval(anyio.current_time() - entry.started,
                                          scale=entry.scale, poll_after=answer.poll_after)

    async def _cancel(self, entry: Entry, permit: Permit) -> float | None:
        job = entry.job
        rid = job.response_id
        assert rid is not None
        entry.cancel_sent = True
        self.requests += 1
        reason = entry.cancel_reason[0] if entry.cancel_reason else "asked"
        _log.info("job.cancel_sent", key=job.key, response_id=rid, reason=reason)
        started = anyio.current_time()
        try:
            answer = await self.provider.cancel(rid)
        except NotFound as exc:
            permit.release()
            self._hook_request(entry, "cancel", exc.http_status, started)
            return await self._not_found(entry, exc)
        except Rejected as exc:
            # The response finished before the cancel arrived. Servers answer that race
            # differently (400, 409, or the final object); poll to learn the real outcome.
            permit.release()
            self._hook_request(entry, "cancel", exc.http_status, started)
            _log.info("job.cancel_raced", key=job.key, response_id=rid,
                      status_code=exc.http_status, error=exc.message)
            entry.ask(FETCH)
            return 0.0
        except RequestError as exc:
            permit.release()
            self._hook_request(entry, "cancel", exc.http_status, started)
            entry.cancel_sent = False
            entry.attempt += 1
            delay = self.retry.delay(entry.attempt, exc.retry_after)
            self._note_retry(entry, exc, "cancel", delay)
            return delay
        permit.release()
        self._hook_request(entry, "cancel", answer.http_status, started)
        await self._take(entry, answer)
        return None if job.done else AFTER_CANCEL

    # -- recording -----------------------------------------------------------------------------

    async def _take(self, entry: Entry, answer: Answer) -> None:
        """Apply a server answer: with a ledger, commit it first, then move the job.

        Committing first means a job is never reported done (and its result never handed out)
        before its final body is recorded. A write that fails is retried (``_write``): the job
        stays as the server last said until the ledger has it.
        """
        job = entry.job
        status = answer.status
        if job.done or entry.stage is Stage.ENDED:
            return
        first = job.response_id is None and answer.response_id is not None
        error, code = answer.error, answer.error_code
        if status is JobStatus.CANCELLED and entry.cancel_reason is not None:
            error, code = f"cancelled: {entry.cancel_reason[0]}", entry.cancel_reason[1]
        if self.ledger is not None and (first or status is not job.status):
            terminal = status.terminal
            body = None
            if terminal and answer.body is not None:
                body = answer.body if self.journal_bodies else _spend_only(answer.body)
            outcome = Outcome(status.value, job.response_id or answer.response_id, body,
                              error if terminal else None, code if terminal else None,
                              answer.http_status, answer.request_id)
            await self._commit(entry, outcome, answer.body)
        cost = None
        if status.terminal:
            _usage, cost = self.meter.settle(job.key, entry.params, answer.body)
        entry.control.update(status, body=answer.body, response_id=answer.response_id,
                             error=error, error_code=code, request_id=answer.request_id,
                             cost=cost)
        if first:
            self._known(entry)
        if job.done:
            self._close(entry, settled=True)
            if self.meter.over_budget:
                self._budget_spent()

    async def _commit(self, entry: Entry, outcome: Outcome, body: bytes | None) -> None:
        """Write ``outcome`` (with its notification when terminal), retrying until it holds."""
        ledger = self.ledger
        assert ledger is not None
        if JobStatus(outcome.status).terminal:
            outcome = self._notice(entry, outcome, body)
        key = entry.job.key
        await self._write(lambda: ledger.record(key, outcome))

    def _budget_spent(self) -> None:
        """Real spend passed ``max_cost``: cancel every live job on the server at once."""
        if self._budget_tripped:
            return
        self._budget_tripped = True
        reason = (self.meter.budget_message(), "budget_exceeded")
        _log.warning("budget.spent", message=reason[0])
        for entry in list(self._entries.values()):
            if entry.stage in (Stage.LIVE, Stage.STREAMING) and not entry.asked(CANCEL):
                # Jobs not yet sent are refused by the budget before their create.
                entry.ask(CANCEL, reason)
                self._poke(entry)

    # -- ending ------------------------------------------------------------------------------

    async def _fail(
        self, entry: Entry, status: JobStatus, error: str, code: str, *,
        http_status: int | None = None, request_id: str | None = None,
    ) -> None:
        """End a job by asyncbg's own conclusion (rejected, unreachable, lost, given up),
        recorded first when a create was sent for it."""
        if self.ledger is not None and (entry.sent or entry.job.response_id is not None):
            await self._commit(entry, Outcome(
                status.value, entry.job.response_id, None, error, code, http_status,
                request_id), None)
        if entry.stage is not Stage.ENDED:
            entry.control.update(status, error=error, error_code=code)
            self._close(entry)

    def _drop(self, entry: Entry, status: JobStatus, error: str, code: str) -> None:
        """End a job on our side with nothing to record (nothing was sent, or a bug)."""
        if entry.stage is not Stage.ENDED:
            entry.control.update(status, error=error, error_code=code)
            self._close(entry)

    # -- pushes and hooks ----------------------------------------------------------------------

    def _push(self, entry: Entry, delay: float) -> None:
        raise NotImplementedError

    def _hook_request(self, entry: Entry, kind: str, http_status: int | None,
                      started: float) -> None:
        if self.hooks:
            seconds = anyio.current_time() - started
            for hook in self.hooks:
                try:
                    hook.request_done(entry.job, kind, http_status, seconds)
                except Exception:  # noqa: BLE001 - an observer must not break a job
                    _log.exception("hook.failed", hook=type(hook).__name__)


def _explain(exc: RequestError) -> str:
    if isinstance(exc, BadAnswer):
        return exc.message
    code = f", {exc.code}" if exc.code else ""
    return f"rejected by the server (HTTP {exc.http_status}{code}): {exc.message}"


def _spend_only(body: bytes) -> bytes | None:
    """A final body without what the response said: only what identifies and prices it."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    kept = {name: data[name] for name in SPEND_FIELDS if name in data}
    return json.dumps(kept, separators=(",", ":")).encode()
