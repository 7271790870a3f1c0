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
import anyio.lowlevel
from anyio.abc import TaskGroup

from .. import _log
from .._http import Rejected, RequestError
from .._ledgers._base import Ledger, LedgerError, Outcome
from .._ledgers._shared import LeaseLost, SharedLedger
from .._notify._notify import Notices
from .._policies import PollPolicy, RetryPolicy
from .._providers._base import Answer, Provider
from .._spend._limiter import Limiter
from .._status import JobStatus
from ._callbacks import Callbacks
from ._entry import CREATING, ENDED, LIVE, PENDING, STREAMING, Entry
from ._following import FOLLOWING, Following
from ._job import Job, JobControl
from ._meter import Meter
from ._streaming import run_stream

__all__ = ["Entry", "Scheduler"]

#: I/O tasks started before the scheduler lets the others run (see ``run``).
BURST = 8
#: Terminal webhooks remembered for responses whose create answer has not arrived yet.
EARLY_LIMIT = 10_000


class Scheduler(Following):
    """Runs every job of one manager; see the module docstring."""

    def __init__(
        self, provider: Provider, ledger: Ledger | None, *, max_concurrency: int,
        max_requests: int, retry: RetryPolicy, meter: Meter, log_prompts: bool = False,
    ) -> None:
        self.provider = provider
        self.meter = meter
        self._budget_tripped = False
        self._paced: deque[Entry] = deque()
        self._budget_parked: deque[Entry] = deque()
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
        #: Keys whose claim said FOLLOW (shared ledgers), until they end or are taken over.
        self._following: set[str] = set()
        self._shared = isinstance(ledger, SharedLedger)
        #: Where the jobs' done callbacks run (the manager runs its task).
        self.callbacks = Callbacks()
        #: With ``notify=``: builds the notification written with each terminal outcome.
        self.notices: Notices | None = None
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
                started = 0
                while heap and heap[0][0] <= now:
                    _, _, gen, entry = heapq.heappop(heap)
                    if gen != entry.gen or entry.stage == ENDED:
                        continue
                    await self.requests_limiter.acquire()
                    entry.in_flight = True
                    tg.start_soon(self._io, entry)
                    started += 1
                    if started % BURST == 0:
                        # The limiter does not suspend while slots are free: without this a
                        # burst of due creates would all run their first steps (each ~1 ms of
                        # request building) in one loop iteration, stalling everything else.
                        await anyio.lowlevel.checkpoint()
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
            if entry.job.key in self._following:
                entry.stage = FOLLOWING  # read the ledger, not the server (see _follow)
                self._schedule(entry, entry.policy.first(entry.scale))
            elif entry.params is not None and self.provider.is_stream(entry.params):
                entry.stage = STREAMING
                tg.start_soon(self._stream, entry)
            elif entry.job.response_id is not None:
                # Re-attached (a rerun, or a dead worker's job taken over): it has been
                # running all along, and its result may be retrievable for only minutes.
                entry.stage = LIVE
                self._schedule(entry, 0.0)
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

    async def _record(self, entry: Entry, outcome: Outcome, body: bytes | None = None) -> None:
        """Commit ``outcome``; a terminal one carries its webhook notification (``notify=``),
        written in the same transaction, and the sender is woken once it is committed."""
        assert self.ledger is not None
        notices = self.notices
        if notices is None or not JobStatus(outcome.status).terminal:
            await self.ledger.record(entry.job.key, outcome)
            return
        key = entry.job.key
        await self.ledger.record(key, notices.attach(key, entry.params, outcome, body))
        notices.written()

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

    # -- streams -------------------------------------------------------------------------------

    async def _stream(self, entry: Entry) -> None:
        try:
            polled = await run_stream(self, entry)
        except LeaseLost as exc:  # another process took the job over (see _lease_lost)
            self._lease_lost(entry, exc)
            return
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
        """A job the ledger already holds the outcome of: finish it without any request.

        What it cost counts against the budget: a rerun's ``max_cost`` bounds the whole run.
        """
        _usage, cost = self.meter.settle(job.key, None, answer.body)
        JobControl(job).update(answer.status, body=answer.body, response_id=answer.response_id,
                               error=answer.error, error_code=answer.error_code,
                               request_id=answer.request_id, cost=cost)

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
            elif entry.stage == FOLLOWING:
                entry.control.detach()  # another process's job: never cancelled from here
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
            try:
                if not await self._still_ours(entry):
                    return
            except LedgerError as exc:
                _log.warning("job.cancel_failed", key=entry.job.key, error=str(exc))
                return
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
