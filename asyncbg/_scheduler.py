"""The scheduler: one task, one heap of due work, and a short I/O task only when work is due.

A napping job is a tuple in a heap: no coroutine, no task, no cancel scope, nothing for the
cyclic garbage collector to walk. When a job's time comes (a create, a poll, a cancel), the
scheduler takes one of ``max_requests`` request slots and starts a short task for that one
request; the task records what the server said and puts the job back in the heap. Retries are
rescheduled the same way, so a job backing off costs no more than one napping. Waking a job (a
webhook, a cancel, a deadline) means rescheduling it at once.

Jobs wait for one of ``max_concurrency`` slots in a FIFO queue before they are created; a slot is
held from the create until the job is terminal.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from typing import Any

import anyio
from anyio.abc import TaskGroup

from . import _log
from ._http import BadAnswer, NotFound, Rejected, RequestError, Transient, Unreachable
from ._job import Job, JobControl
from ._ledgers._base import Ledger, Outcome
from ._limiter import Limiter
from ._policies import PollPolicy, RetryPolicy
from ._providers._base import Answer, Provider
from ._status import JobStatus

__all__ = ["Entry", "Scheduler"]

PENDING, CREATING, LIVE, STREAMING, ENDED = range(5)
#: Seconds between polls of a job whose cancel was sent but not yet confirmed terminal.
AFTER_CANCEL = 0.25
#: Connection attempts, while no request has ever reached the server, before every create not
#: yet sent is failed at once: a wrong base URL should take seconds to report, not minutes.
UNREACHABLE_ATTEMPTS = 3
#: Terminal webhooks remembered for responses whose create answer has not arrived yet.
EARLY_LIMIT = 10_000
#: A Retry-After at least this long is worth a warning: the run will look stalled meanwhile.
LONG_WAIT = 10.0


class Entry:
    """The scheduler's record of one job: what to send, and where it stands."""

    __slots__ = (
        "attempt", "cancel_reason", "cancel_sent", "cancel_wanted", "control", "deadline",
        "fetch_wanted", "gen", "in_flight", "job", "params", "policy", "resubmit", "scale",
        "sent", "stage", "started", "stream_scope",
    )

    def __init__(self, job: Job, params: dict[str, Any] | None, policy: PollPolicy,
                 scale: float, deadline: float | None) -> None:
        self.job = job
        self.control = JobControl(job)
        self.params = params
        self.policy = policy
        self.scale = scale
        self.deadline = deadline
        self.stage = PENDING
        self.gen = 0
        self.attempt = 0
        self.started = 0.0
        self.resubmit = False
        self.sent = False
        self.in_flight = False
        self.cancel_wanted = False
        self.cancel_sent = False
        self.cancel_reason: tuple[str, str] | None = None
        self.fetch_wanted = False
        self.stream_scope: anyio.CancelScope | None = None


class Scheduler:
    """Runs every job of one manager; see the module docstring."""

    def __init__(
        self, provider: Provider, ledger: Ledger | None, *, max_concurrency: int,
        max_requests: int, retry: RetryPolicy, log_prompts: bool = False,
    ) -> None:
        self.provider = provider
        self.ledger = ledger
        self.retry = retry
        self.max_concurrency = max_concurrency
        self.log_prompts = log_prompts
        self.requests_limiter = Limiter(max_requests)
        self._heap: list[tuple[float, int, int, Entry]] = []
        self._seq = itertools.count()
        self._pending: deque[Entry] = deque()
        self._entries: dict[str, Entry] = {}
        self._by_response_id: dict[str, Entry] = {}
        self._early: OrderedDict[str, None] = OrderedDict()
        self._active = 0
        self._kick = anyio.Event()
        self._idle: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self._reached_server = False
        self._unreachable: str | None = None
        # counters, read by statistics()
        self.requests = 0
        self.polls = 0
        self.retries = 0
        self.possible_duplicates = 0

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The one scheduling task; it owns every I/O task. Runs until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            heap = self._heap
            while True:
                self._kick = anyio.Event()
                self._fill(tg)
                now = anyio.current_time()
                while heap and heap[0][0] <= now:
                    _, _, gen, entry = heapq.heappop(heap)
                    if gen != entry.gen or entry.stage == ENDED:
                        continue
                    await self.requests_limiter.acquire()
                    entry.in_flight = True
                    tg.start_soon(self._io, entry)
                if self._kick.is_set():
                    continue
                if heap:
                    with anyio.move_on_after(heap[0][0] - anyio.current_time()):
                        await self._kick.wait()
                else:
                    await self._kick.wait()

    def _fill(self, tg: TaskGroup) -> None:
        """Move waiting jobs into free concurrency slots."""
        pending = self._pending
        while pending and self._active < self.max_concurrency:
            entry = pending.popleft()
            if entry.stage != PENDING:
                continue  # cancelled while waiting
            if entry.deadline is not None and anyio.current_time() >= entry.deadline:
                self._end(entry, JobStatus.CANCELLED, "its deadline passed before it was sent",
                          "deadline_exceeded")
                continue
            self._active += 1
            entry.started = anyio.current_time()
            if entry.params is not None and self.provider.is_stream(entry.params):
                entry.stage = STREAMING
                tg.start_soon(self._stream, entry)
            elif entry.job.response_id is not None:
                entry.stage = LIVE  # re-attached: poll soon
                self._schedule(entry, entry.policy.first(entry.scale))
            else:
                entry.stage = CREATING
                self._schedule(entry, 0.0)

    def _schedule(self, entry: Entry, delay: float) -> None:
        """Put ``entry`` in the heap, due after ``delay`` seconds (earlier entries go stale)."""
        entry.gen += 1
        if entry.deadline is not None and not entry.cancel_wanted:
            delay = min(delay, max(entry.deadline - anyio.current_time(), 0.0))
        item = (anyio.current_time() + delay, next(self._seq), entry.gen, entry)
        heapq.heappush(self._heap, item)
        if self._heap[0] is item:
            self._kick.set()

    # -- adding, waking, cancelling -----------------------------------------------------------

    def add(self, job: Job, params: dict[str, Any] | None, policy: PollPolicy, *,
            deadline: float | None = None, resubmit: bool = False,
            response_id: str | None = None, status: JobStatus = JobStatus.PENDING) -> Entry:
        """Queue a job: created when a slot frees or, re-attached to ``response_id``, polled."""
        scale = self.provider.poll_scale(params or {}, policy)
        entry = Entry(job, params, policy, scale, deadline)
        entry.resubmit = resubmit
        if response_id is not None:
            entry.sent = True
            entry.control.update(status if not status.terminal else JobStatus.IN_PROGRESS,
                                 response_id=response_id)
        if params is not None and self.provider.is_stream(params):
            entry.control.start_stream()
        self._entries[job.key] = entry
        self._idle = None
        if job.response_id is not None:
            self._known(entry)
        self._pending.append(entry)
        self._kick.set()
        return entry

    def wake(self, response_id: str) -> bool:
        """A push said ``response_id`` is terminal: fetch it at once. False if unknown."""
        entry = self._by_response_id.get(response_id)
        if entry is None:
            # Perhaps ours, and faster than the create's answer: remember it.
            self._early[response_id] = None
            if len(self._early) > EARLY_LIMIT:
                self._early.popitem(last=False)
            return False
        entry.fetch_wanted = True
        if entry.stage == LIVE and not entry.in_flight:
            self._schedule(entry, 0.0)
        return True

    def _known(self, entry: Entry) -> None:
        rid = entry.job.response_id
        assert rid is not None
        self._by_response_id[rid] = entry
        if rid in self._early:
            del self._early[rid]
            entry.fetch_wanted = True

    async def cancel_job(self, job: Job, *, reason: tuple[str, str] | None = None) -> None:
        """Cancel a job: locally if nothing was sent, else on the server; wait until terminal."""
        entry = self._entries.get(job.key)
        if entry is None or job.done:
            return
        if entry.stage == PENDING or (entry.stage == CREATING and not entry.in_flight
                                      and not entry.sent):
            self._end(entry, JobStatus.CANCELLED, "cancelled before it was sent", "cancelled")
            return
        entry.cancel_wanted = True
        entry.cancel_reason = reason
        if entry.stream_scope is not None:
            entry.stream_scope.cancel()  # no stream event exists for a cancel: stop reading
        elif entry.stage == LIVE and not entry.in_flight:
            self._schedule(entry, 0.0)
        await job.wait()

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
        if self.ledger is not None:
            await self.ledger.sending(job.key, resubmit=entry.resubmit)
        entry.resubmit = False
        entry.sent = True
        self.requests += 1
        try:
            answer = await self.provider.create(entry.params)
        except (Rejected, BadAnswer) as exc:
            self._reached_server = True
            await self._end_recorded(
                entry, JobStatus.FAILED, _explain(exc),
                exc.code or ("invalid_response" if isinstance(exc, BadAnswer)
                             else "request_failed"),
                http_status=exc.http_status, request_id=exc.request_id)
            return
        except Unreachable as exc:
            await self._create_unreachable(entry, exc)
            return
        except Transient as exc:
            self._reached_server = self._reached_server or exc.http_status is not None
            if exc.maybe_sent:
                # The request may have reached the server and started a paid response; with no
                # idempotency key there is no way to know. Count it and say so.
                self.possible_duplicates += 1
                _log.warning("job.possible_duplicate", key=job.key,
                             reason="a create's answer was lost; it is sent again")
            await self._retry_or_fail(entry, exc, "create")
            return
        self._reached_server = True
        self._unreachable = None
        await self._accepted(entry, answer)

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
        self._unreachable = exc.message
        _log.error("server.unreachable", base_url=self.provider.base_url, error=exc.message)
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
            delay = min(self.retry.delay(entry.attempt, exc.retry_after),
                        max(entry.policy.max_interval, 1.0) * entry.scale)
            self._note_retry(entry, exc, "retrieve", delay)
            if entry.attempt % 10 == 0:
                _log.warning("job.poll_failing", key=job.key, response_id=rid,
                             attempts=entry.attempt, error=exc.message)
            self._schedule(entry, delay)
            return
        entry.attempt = 0
        await self._take(entry, answer)
        if not job.done:
            self._schedule(entry, self._next_delay(entry, answer))

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
            await self.ledger.record(job.key, Outcome(
                status.value, job.response_id or answer.response_id,
                answer.body if terminal else None, error if terminal else None,
                code if terminal else None, answer.http_status, answer.request_id))
        entry.control.update(status, body=answer.body, response_id=answer.response_id,
                             error=error, error_code=code, request_id=answer.request_id)
        if first:
            self._known(entry)
        if job.done:
            self._finished(entry)

    async def _end_recorded(
        self, entry: Entry, status: JobStatus, error: str, code: str, *,
        http_status: int | None = None, request_id: str | None = None,
    ) -> None:
        """End a job on our side (rejected, unreachable, lost), ledger first."""
        if self.ledger is not None and (entry.sent or entry.job.response_id is not None):
            await self.ledger.record(entry.job.key, Outcome(
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

    # -- streams -------------------------------------------------------------------------------

    async def _stream(self, entry: Entry) -> None:
        from ._streaming import run_stream

        try:
            polled = await run_stream(self, entry)
        except Exception as exc:  # noqa: BLE001 - a bug must fail one job, not the manager
            _log.exception("job.crashed", key=entry.job.key)
            await self._end_recorded(entry, JobStatus.FAILED,
                                     f"asyncbg internal error: {exc!r}", "internal_error")
            return
        if polled and not entry.job.done:
            entry.stage = LIVE if entry.job.response_id is not None else CREATING
            entry.stream_scope = None
            self._schedule(entry, 0.0)

    # -- what a job asks of its owner (JobOwner) -------------------------------------------------

    def parse_result(self, body: bytes) -> Any:
        return self.provider.parse_result(body)

    def parse_event(self, data: dict[str, Any]) -> Any:
        return self.provider.parse_event(data)

    # -- for the stream runner and the manager -------------------------------------------------

    async def take(self, entry: Entry, answer: Answer) -> None:
        await self._take(entry, answer)

    async def end(self, entry: Entry, status: JobStatus, error: str, code: str, *,
                  http_status: int | None = None) -> None:
        await self._end_recorded(entry, status, error, code, http_status=http_status)

    def serve(self, job: Job, answer: Answer) -> None:
        """A job the ledger already holds the outcome of: finish it without any request."""
        JobControl(job).update(answer.status, body=answer.body, response_id=answer.response_id,
                               error=answer.error, error_code=answer.error_code,
                               request_id=answer.request_id)

    def jobs_left(self) -> int:
        return len(self._entries)

    async def wait_idle(self) -> None:
        """Return once every job added so far is terminal."""
        while self._entries:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    @property
    def live(self) -> int:
        return self._active

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    async def shutdown(self, *, cancel: bool, cancel_timeout: float) -> None:
        """The manager is leaving on an error: settle every job that is not terminal.

        Jobs never sent end cancelled locally (nothing recorded: a rerun sends them). A create
        cut off in flight may have started a response: it ends cancelled, and its ``sending``
        record makes the next run count it. Live jobs are cancelled on the server in one
        bounded sweep (``cancel``), or left running for a later run to re-attach (detached).
        """
        live: list[Entry] = []
        for entry in list(self._entries.values()):
            if entry.stage in (PENDING, CREATING) and entry.job.response_id is None:
                if entry.in_flight or (entry.stage == CREATING and entry.sent):
                    message = ("abandoned while its create was in flight; a response may exist "
                               "on the server")
                else:
                    message = ("cancelled before it was sent" if cancel
                               else "not sent: the manager exited first")
                self._end(entry, JobStatus.CANCELLED, message, "cancelled")
            elif cancel:
                live.append(entry)
            else:
                entry.control.detach()
        if not live:
            return
        with anyio.move_on_after(cancel_timeout):
            async with anyio.create_task_group() as tg:
                for entry in live:
                    tg.start_soon(self._sweep_one, entry)
        for entry in live:
            if not entry.job.done:
                self._end(entry, JobStatus.CANCELLED,
                          "abandoned: the manager exited before the job finished and the "
                          "server did not confirm the cancel", "cancelled")

    async def _sweep_one(self, entry: Entry) -> None:
        rid = entry.job.response_id
        assert rid is not None
        async with self.requests_limiter:
            _log.info("job.cancel_sent", key=entry.job.key, response_id=rid,
                      reason="manager exiting")
            self.requests += 1
            try:
                answer = await self.provider.cancel(rid)
                if not answer.status.terminal:
                    answer = await self.provider.fetch(rid)
            except Rejected:
                try:  # most likely it finished first (the cancel race): keep what it says
                    answer = await self.provider.fetch(rid)
                except RequestError as exc:
                    _log.warning("job.cancel_failed", key=entry.job.key, error=exc.message)
                    return
            except RequestError as exc:
                _log.warning("job.cancel_failed", key=entry.job.key, error=exc.message)
                return
            await self._take(entry, answer)


def _explain(exc: RequestError) -> str:
    if isinstance(exc, BadAnswer):
        return exc.message
    code = f", {exc.code}" if exc.code else ""
    return f"rejected by the server (HTTP {exc.http_status}{code}): {exc.message}"

