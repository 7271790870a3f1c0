"""The scheduler: one task, one heap of due work, and a short I/O task only when work is due.

A napping job is a tuple in a heap: no coroutine, no task, no cancel scope, nothing for the
cyclic garbage collector to walk. When a job's time comes (a create, a poll, a cancel), the
scheduler takes one of ``max_requests`` request slots (a :class:`~._steps.Permit`) and starts a
short task for that one step; the step returns when the job is next due, and the scheduler puts
it back in the heap at **one reschedule point** (:meth:`Scheduler._after`), where whatever was
asked of the job while the step was in flight (a cancel, a webhook, a budget stop, a deadline)
is acted on at once. A job's stages and their allowed moves are in :mod:`._life`.

Jobs wait for one of ``max_concurrency`` slots in a FIFO queue before they are created; a slot is
held from the create until the job ends, and :meth:`Scheduler._close` (the one way a job ends)
gives it back, with the job's budget reservation.

A ledger that cannot be written is an operational failure, not an outcome: the write is retried
with a backoff and creates wait; only when it has stayed unwritable for ``ledger_patience``
seconds does the manager stop, with :class:`~asyncbg.LedgerUnavailable`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from .. import _log
from .._http import Rejected, RequestError
from .._ledgers._base import Claim, Ledger, LedgerError, LedgerUnavailable, Outcome
from .._ledgers._shared import LeaseLost, SharedLedger
from .._policies import PollPolicy, RetryPolicy
from .._providers._base import Answer, Provider
from .._spend._limiter import Limiter
from .._status import JobStatus
from ._callbacks import Callbacks
from ._following import SharedLedgerSteps
from ._hooks import Hooks
from ._job import Job, JobControl
from ._life import CANCEL, FETCH, Entry, Stage, move
from ._meter import Meter, Ticket
from ._steps import Permit, Stop
from ._streaming import run_stream

__all__ = ["Entry", "Notices", "Scheduler"]

T = TypeVar("T")

#: I/O tasks started before the scheduler lets the others run (see ``run``).
BURST = 8
#: Jobs the scheduler looks at (moved into a slot, or taken off the heap) in one pass before
#: it lets the others run: a burst of 100,000 due jobs must not stall the event loop.
SLICE = 256
#: Terminal webhooks remembered for responses whose create answer has not arrived yet.
EARLY_LIMIT = 10_000
#: The longest any job naps, whatever a header or a policy said (an hour).
MAX_DELAY = 3600.0
#: Backoff of ledger writes that failed: from this, doubling, up to LEDGER_BACKOFF_MAX.
LEDGER_BACKOFF = 0.05
LEDGER_BACKOFF_MAX = 2.0


class Notices(Protocol):
    """What the engine asks of ``notify=`` (implemented by asyncbg/_notify): the notification
    written in the same transaction as a terminal outcome, and a nudge once it is committed."""

    #: Called once a terminal outcome with its notification is committed.
    written: Callable[[], object]

    def attach(self, key: str, params: Mapping[str, Any] | None, outcome: Outcome,
               body: bytes | None) -> Outcome: ...


class Scheduler(SharedLedgerSteps):
    """Runs every job of one manager; see the module docstring."""

    def __init__(
        self, provider: Provider, ledger: Ledger | None, *, max_concurrency: int,
        max_requests: int, retry: RetryPolicy, meter: Meter, log_prompts: bool = False,
        ledger_patience: float = 60.0, hooks: tuple[Hooks, ...] = (),
    ) -> None:
        self.provider = provider
        self.meter = meter
        self.ledger = ledger
        self.retry = retry
        self.max_concurrency = max_concurrency
        self.log_prompts = log_prompts
        self.ledger_patience = ledger_patience
        self.hooks = hooks
        self.requests_limiter = Limiter(max_requests)
        meter.on_answer = self._wake_paced
        self._budget_tripped = False
        self._paced: deque[Entry] = deque()
        self._budget_parked: deque[Entry] = deque()
        #: (due, seq, entry): ``seq`` is unique, and an item is current while it equals
        #: ``entry.gen`` (an older item of a rescheduled job is stale, and skipped).
        self._heap: list[tuple[float, int, Entry]] = []
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
        #: Whether the first create that finds the server unreachable says so (an error
        #: event); `asyncbg run` says it itself, in its one summary line.
        self.say_unreachable = True
        self.refused: tuple[str, str] | None = None
        #: Keys whose claim said FOLLOW (shared ledgers), until they end or are taken over.
        self._following: set[str] = set()
        self._shared = isinstance(ledger, SharedLedger)
        #: Shared ledgers: when each key's lease runs out by this process's monotonic clock
        #: (it runs on through a SIGSTOP), from the claim or renewal that last held it.
        self._lease_until: dict[str, float] = {}
        #: The shields of creates in flight (they get a deadline when the manager exits).
        self._shields: set[anyio.CancelScope] = set()
        #: Set by :meth:`close`: no create starts after it; shields and writes end by it.
        self._closing_at: float | None = None
        #: When the ledger started failing (None while it works).
        self._ledger_down: float | None = None
        #: When the ledger's failure was last reported (a warning once a patience period).
        self._ledger_said = 0.0
        self._ledger_backoff = LEDGER_BACKOFF
        #: Where the jobs' done callbacks run (the manager runs its task).
        self.callbacks = Callbacks()
        #: With ``notify=``: builds the notification written with each terminal outcome.
        self.notices: Notices | None = None
        #: Called with every job that ends here (the manager counts outcomes).
        self.on_end: Callable[[Job], None] | None = None
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
                more = self._fill()
                more = await self._start_due(tg) or more
                if more or self._kick.is_set():
                    # Let the others run between two passes: a pass does a bounded amount of
                    # work (see SLICE), and 100,000 jobs submitted at once take many passes.
                    await anyio.lowlevel.checkpoint()
                    continue
                if heap:
                    with anyio.move_on_after(heap[0][0] - anyio.current_time()):
                        await self._kick.wait()
                else:
                    await self._kick.wait()

    async def _start_due(self, tg: TaskGroup) -> bool:
        """Start a step for every job whose time has come, or for SLICE of them; True when
        more are due (a method of its own, so that no finished job stays reachable from the
        loop's locals)."""
        heap = self._heap
        now = anyio.current_time()
        started = 0
        for _ in range(SLICE):
            if not heap or heap[0][0] > now:
                return False
            _, gen, entry = heapq.heappop(heap)
            kind = self._due(entry, gen)
            if kind is None:
                continue
            # A create takes its request slot after its ``sending`` write (see Permit); the
            # other steps take one here, which bounds the tasks a burst of due polls starts.
            permit = Permit(self.requests_limiter, held=kind != "create")
            ticket: Ticket | None = None
            if kind == "create":
                admitted = self._admit(entry)  # a create that must wait starts no task
                if admitted is False:
                    continue
                if isinstance(admitted, Ticket):
                    ticket = admitted
            else:
                await self.requests_limiter.acquire()
                if gen != entry.gen or entry.step is not None or entry.stage is Stage.ENDED:
                    permit.release()  # woken or ended while we waited
                    continue
            entry.step = kind
            tg.start_soon(self._io, entry, permit, ticket)
            started += 1
            if started % BURST == 0:
                # The limiter does not suspend while slots are free: without this a burst of
                # due creates would all run their first steps (each ~1 ms of request building)
                # in one loop iteration, stalling everything else.
                await anyio.lowlevel.checkpoint()
        return bool(heap) and heap[0][0] <= now

    def _due(self, entry: Entry, gen: int) -> str | None:
        """The step to run for a job whose time came, or None (stale, or settled here)."""
        if gen != entry.gen or entry.stage is Stage.ENDED or entry.step is not None:
            return None
        if (entry.deadline is not None and not entry.asked(CANCEL)
                and anyio.current_time() >= entry.deadline):
            entry.ask(CANCEL, ("its deadline passed", "deadline_exceeded"))
        stage = entry.stage
        if stage is Stage.CREATING:
            if entry.asked(CANCEL):
                self._drop_cancelled(entry)
                return None
            if self._closing_at is not None:
                return None  # leaving: nothing new is sent
            return "create"
        if stage is Stage.LIVE:
            return "cancel" if entry.asked(CANCEL) and not entry.cancel_sent else "poll"
        if stage is Stage.FOLLOWING:
            return "follow"
        return None

    async def _io(self, entry: Entry, permit: Permit, ticket: Ticket | None) -> None:
        """Run one step of ``entry``; whatever happens, give the permit back and reschedule."""
        after: float | None = None
        try:
            kind = entry.step
            if kind == "create":
                after = await self._create(entry, permit, ticket)
            elif kind == "cancel":
                after = await self._cancel_live(entry, permit)
            elif kind == "poll":
                after = await self._poll(entry, permit)
            elif kind == "follow":
                after = await self._follow(entry, permit)
        except LeaseLost as exc:
            # A shared ledger refused a write: another process took the job over. It is theirs
            # now: stop here, record nothing, send nothing (see asyncbg/_engine/_following.py).
            self._lease_lost(entry, exc)
        except Stop:
            raise  # the ledger stayed unwritable: the manager stops (see _ledger_failed)
        except Exception as exc:  # noqa: BLE001 - a bug must fail one job, not the manager
            self._bug(entry, exc)
        finally:
            permit.release()
            entry.step = None
            self._after(entry, after)

    def _bug(self, entry: Entry, exc: Exception) -> None:
        """A bug in asyncbg while running ``entry``: end it here, record nothing (the ledger
        keeps what the server last said, so a rerun re-attaches), and say so loudly."""
        _log.exception("job.crashed", key=entry.job.key)
        self._following.discard(entry.job.key)
        self._drop(entry, JobStatus.FAILED, f"asyncbg internal error: {exc!r}", "internal_error")

    # -- the one reschedule point ----------------------------------------------------------------

    def _after(self, entry: Entry, delay: float | None) -> None:
        """A step of ``entry`` ended: act on what was asked meanwhile, else nap ``delay``
        seconds (None: parked, handed to its stream, or ended)."""
        if entry.stage is Stage.ENDED or self._closing_at is not None:
            return
        if self._urgent(entry):
            return
        if delay is not None:
            self._push(entry, delay)

    def _poke(self, entry: Entry) -> None:
        """Something was asked of ``entry``: act now unless a step is in flight (then
        :meth:`_after` will)."""
        if entry.stage is Stage.STREAMING or (entry.step is None
                                               and entry.stage is not Stage.ENDED):
            self._urgent(entry)

    def _urgent(self, entry: Entry) -> bool:
        """Act on ``entry``'s asks; True when it was rescheduled or ended by them."""
        stage = entry.stage
        if entry.asked(CANCEL):
            if stage is Stage.WAITING and entry.job.key in self._following:
                return False  # another process's job: cancelled once it is followed
            if stage is Stage.WAITING or (stage is Stage.CREATING and entry.step is None):
                # Nothing is out for it now (an earlier attempt's create may have reached the
                # server: its ``sending`` record stays, and a rerun counts it).
                self._drop_cancelled(entry)
                return True
            if stage is Stage.STREAMING:
                if entry.stream_scope is not None:
                    entry.stream_scope.cancel()  # no stream event exists for a cancel
                return True
            if not entry.cancel_sent and (stage is Stage.LIVE or (
                    stage is Stage.FOLLOWING and entry.cancel_by_user)):
                self._push(entry, 0.0)
                return True
        if entry.asked(FETCH) and stage is Stage.LIVE:
            self._push(entry, 0.0)
            return True
        return False

    def _drop_cancelled(self, entry: Entry) -> None:
        reason = entry.cancel_reason or ("cancelled before it was sent", "cancelled")
        if reason[1] == "cancelled":
            self._drop(entry, JobStatus.CANCELLED, "cancelled before it was sent", "cancelled")
        else:
            self._drop(entry, JobStatus.CANCELLED, f"{reason[0]} before it was sent", reason[1])

    def _push(self, entry: Entry, delay: float) -> None:
        """Put ``entry`` in the heap, due after ``delay`` seconds (earlier items go stale)."""
        if not delay > 0.0:  # negative, zero or NaN: now
            delay = 0.0
        delay = min(delay, MAX_DELAY)
        if entry.deadline is not None and not entry.asked(CANCEL):
            delay = min(delay, max(entry.deadline - anyio.current_time(), 0.0))
        seq = entry.gen = next(self._seq)
        item = (anyio.current_time() + delay, seq, entry)
        heapq.heappush(self._heap, item)
        if self._heap[0] is item:
            self._kick.set()

    def _fill(self) -> bool:
        """Move waiting jobs into free concurrency slots, at most SLICE of them; True when
        more could move now."""
        pending = self._pending
        for _ in range(SLICE):
            if not pending or self._active >= self.max_concurrency or (
                    self._closing_at is not None):
                return False
            entry = pending.popleft()
            if entry.stage is not Stage.WAITING:
                continue  # cancelled while waiting
            following = entry.job.key in self._following
            # A deadline ends what this process would send, never another process's response
            # that this job follows (however long its claim took to say so).
            if not following and entry.deadline is not None and (
                    anyio.current_time() >= entry.deadline):
                self._drop(entry, JobStatus.CANCELLED, "its deadline passed before it was sent",
                           "deadline_exceeded")
                continue
            self._active += 1
            entry.started = anyio.current_time()
            if following:
                move(entry, Stage.FOLLOWING)  # read the ledger, not the server (see _follow)
                self._push(entry, 0.0 if entry.cancel_by_user else entry.policy.first(entry.scale))
            elif entry.job.response_id is not None:
                # Re-attached (a rerun, or a dead worker's job taken over): it has been
                # running all along, and its result may be retrievable for only minutes.
                move(entry, Stage.LIVE)
                self._push(entry, 0.0)
            else:
                move(entry, Stage.CREATING)
                self._push(entry, 0.0)
        return bool(pending) and self._active < self.max_concurrency and (
            self._closing_at is None)

    # -- ending: the one way out ----------------------------------------------------------------

    def _close(self, entry: Entry, *, settled: bool = False) -> None:
        """``entry`` ended (terminal, or detached): give back its slot and its budget
        reservation, forget it, and wake whoever waits for the scheduler to be idle."""
        if entry.stage is Stage.ENDED:
            return
        if entry.stage is not Stage.WAITING:
            self._active -= 1
        move(entry, Stage.ENDED)
        entry.gen = -1  # whatever is in the heap for it is stale
        job = entry.job
        if not settled:
            if job.response_id is not None or entry.sent:
                self.meter.settle(job.key, entry.params, None)  # paid for, usage unknown
            else:
                self.meter.unsent(job.key)
        self._wake_budget()
        rid = job.response_id
        if rid is not None:
            self._by_response_id.pop(rid, None)
        self._entries.pop(job.key, None)
        self._following.discard(job.key)
        self._lease_until.pop(job.key, None)
        self._kick.set()
        if not self._entries and self._idle is not None:
            self._idle.set()
            self._idle = None
        if self.on_end is not None:
            self.on_end(job)
        for hook in self.hooks:
            try:
                if job.done:
                    hook.job_finished(job)
                else:
                    hook.job_detached(job)
            except Exception:  # noqa: BLE001 - an observer must not break a job
                _log.exception("hook.failed", hook=type(hook).__name__)

    def _detach(self, entry: Entry) -> None:
        """Leave ``entry`` running on the server (its waiters learn so)."""
        entry.control.detach()
        self._close(entry)

    # -- leases (shared ledgers) -----------------------------------------------------------------

    def lease_taken(self, key: str, at: float) -> None:
        """A claim sent at ``at`` (monotonic) took or kept ``key``'s lease."""
        if self._shared:
            assert isinstance(self.ledger, SharedLedger)
            self._lease_until[key] = at + self.ledger.lease

    def leases_renewed(self, keys: Collection[str], at: float) -> None:
        """A renewal sent at ``at`` extended these leases."""
        assert isinstance(self.ledger, SharedLedger)
        until = at + self.ledger.lease
        for key in keys:
            if key in self._entries:
                self._lease_until[key] = until

    def _lease_left(self, entry: Entry) -> bool:
        """Before a create leaves: is enough of this key's lease left, by our own clock, that
        no other process can have taken it over (a third of the lease, one renewal period)?"""
        if not self._shared:
            return True
        assert isinstance(self.ledger, SharedLedger)
        until = self._lease_until.get(entry.job.key)
        return until is not None and until - anyio.current_time() >= self.ledger.lease / 3

    # -- the ledger --------------------------------------------------------------------------------

    async def _write(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a ledger write until it holds; see :meth:`_ledger_failed` for how long."""
        while True:
            try:
                result = await call()
            except LeaseLost:
                raise
            except LedgerError as exc:
                await anyio.sleep(self._ledger_failed(exc))
                continue
            self._ledger_ok()
            return result

    async def claim(self, key: str, digest: str, request: bytes) -> Claim:
        """Claim ``key`` in the ledger for a submit. A ledger that is unavailable (the disk
        full, the database restarting) is waited out as every write is, so a submit waits
        rather than fail; :class:`LedgerUnavailable` once patience runs out."""
        assert self.ledger is not None
        while True:
            claimed_at = anyio.current_time()  # a lease taken by this claim runs from here
            try:
                claim = await self.ledger.claim(key, digest, request)
            except LedgerUnavailable as exc:
                try:
                    delay = self._ledger_failed(exc)
                except Stop as stop:
                    raise stop.error from exc
                await anyio.sleep(delay)
                continue
            self._ledger_ok()
            self.lease_taken(key, claimed_at)
            return claim

    def _ledger_failed(self, exc: LedgerError) -> float:
        """A ledger call failed: seconds to wait before trying again, or :class:`Stop` once the
        ledger has failed for ``ledger_patience`` seconds (or the manager is leaving).

        Patience never runs out while a response the server created is not yet recorded: it
        is paid for, and stopping would leave it for nobody (the next run would create it
        again). The manager holds it, polls it and retries its write, and says so once a
        patience period, until the ledger takes it or the manager is told to leave."""
        now = anyio.current_time()
        if self._ledger_down is None:
            self._ledger_down = self._ledger_said = now
            _log.warning("ledger.unavailable", ledger=getattr(self.ledger, "location", None),
                         error=str(exc), patience=self.ledger_patience,
                         action="creates wait; writes are retried")
        if self._closing_at is not None and now >= self._closing_at:
            raise Stop(self._ledger_stop_error(exc, closing=True))
        if now - self._ledger_down >= self.ledger_patience:
            held = self.unrecorded()
            if not held:
                raise Stop(self._ledger_stop_error(exc, closing=False))
            if now - self._ledger_said >= self.ledger_patience:
                self._ledger_said = now
                _log.warning(
                    "ledger.holding", ledger=getattr(self.ledger, "location", None),
                    error=str(exc), down=round(now - self._ledger_down),
                    unrecorded=", ".join(f"{key} ({rid})" for key, rid in held),
                    action="responses the server created and the ledger has not taken are "
                           "held and polled, and their writes retried; stopping now would "
                           "leave them for nobody")
        delay, self._ledger_backoff = self._ledger_backoff, min(self._ledger_backoff * 2,
                                                                LEDGER_BACKOFF_MAX)
        return delay

    def _ledger_ok(self) -> None:
        if self._ledger_down is not None:
            _log.warning("ledger.available", ledger=getattr(self.ledger, "location", None),
                         after=round(anyio.current_time() - self._ledger_down, 3))
            self._ledger_down = None
            self._ledger_backoff = LEDGER_BACKOFF

    def _ledger_stop_error(self, exc: LedgerError, *, closing: bool) -> LedgerUnavailable:
        location = getattr(self.ledger, "location", "the ledger")
        assert self._ledger_down is not None
        down = anyio.current_time() - self._ledger_down
        if closing:
            text = (f"{location} could not be written ({exc}) in the {round(down, 1):g} s "
                    "before the manager stopped")
        else:
            text = f"{location} could not be written for {round(down, 1):g} s ({exc}); stopped"
        error = LedgerUnavailable(
            f"{text}: live responses are left running and a rerun re-attaches to them")
        error.__cause__ = exc
        return error

    def unrecorded(self) -> list[tuple[str, str]]:
        """Jobs whose response the server created but the ledger never took: (key, id)."""
        return [(e.job.key, e.unrecorded) for e in self._entries.values() if e.unrecorded]

    def _notice(self, entry: Entry, outcome: Outcome, body: bytes | None) -> Outcome:
        notices = self.notices
        if notices is None:
            return outcome
        return notices.attach(entry.job.key, entry.params, outcome, body)

    async def _commit(self, entry: Entry, outcome: Outcome, body: bytes | None) -> None:
        await super()._commit(entry, outcome, body)
        if self.notices is not None and JobStatus(outcome.status).terminal:
            self.notices.written()

    # -- adding, waking, cancelling -----------------------------------------------------------

    def add(self, job: Job, params: dict[str, Any] | None, policy: PollPolicy, *,
            deadline: float | None = None, resubmit: bool = False,
            response_id: str | None = None, status: JobStatus = JobStatus.PENDING) -> Entry:
        """Queue a job: created when a slot frees or, re-attached to ``response_id``, polled."""
        scale = self.provider.poll_scale(params or {}, policy)
        stream = params is not None and self.provider.is_stream(params)
        entry = Entry(job, params, policy, scale, deadline, stream=stream)
        entry.resubmit = resubmit
        if response_id is not None:
            entry.sent = True
            entry.control.update(status if not status.terminal else JobStatus.IN_PROGRESS,
                                 response_id=response_id)
        if stream:
            entry.control.start_stream()
        self._entries[job.key] = entry
        if job.response_id is not None:
            self._known(entry)
        self._pending.append(entry)
        self._kick.set()
        for hook in self.hooks:
            try:
                hook.job_submitted(job, params)
            except Exception:  # noqa: BLE001 - an observer must not break a job
                _log.exception("hook.failed", hook=type(hook).__name__)
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
        entry.ask(FETCH)
        self._poke(entry)
        return True

    def _known(self, entry: Entry) -> None:
        rid = entry.job.response_id
        assert rid is not None
        self._by_response_id[rid] = entry
        if rid in self._early:
            del self._early[rid]
            entry.ask(FETCH)

    async def cancel_job(self, job: Job, *, reason: tuple[str, str] | None = None) -> None:
        """Cancel a job: locally if nothing was sent, else on the server; wait until terminal
        (or, for a job another process owns, until its owner records the end)."""
        entry = self._entries.get(job.key)
        if entry is None or job.done:
            return
        entry.ask(CANCEL, reason)
        self._poke(entry)
        if not job.done and not job.detached:
            await job.wait()

    # -- streams -------------------------------------------------------------------------------

    def _start_stream(self, entry: Entry, ticket: Ticket | None) -> None:
        move(entry, Stage.STREAMING)
        assert self._tg is not None
        entry.step = "stream"
        self._tg.start_soon(self._stream, entry, ticket)

    async def _stream(self, entry: Entry, ticket: Ticket | None) -> None:
        after: float | None = None
        try:
            polled = await run_stream(self, entry, ticket)
            if polled and entry.stage is Stage.STREAMING and not entry.job.done:
                move(entry, Stage.LIVE if entry.job.response_id is not None else Stage.CREATING)
                after = 0.0
        except LeaseLost as exc:  # another process took the job over (see _lease_lost)
            self._lease_lost(entry, exc)
        except Stop:
            raise
        except LedgerError as exc:  # the ``sending`` write: nothing was sent; try again later
            if entry.stage is Stage.STREAMING and entry.job.response_id is None:
                move(entry, Stage.CREATING)
                after = self._ledger_failed(exc)
            else:
                self._bug(entry, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must fail one job, not the manager
            self._bug(entry, exc)
        finally:
            entry.stream_scope = None
            entry.step = None
            self._after(entry, after)

    # -- what a job asks of its owner (JobOwner) -------------------------------------------------

    def parse_result(self, body: bytes) -> Any:
        return self.provider.parse_result(body)

    def parse_event(self, data: dict[str, Any]) -> Any:
        return self.provider.parse_event(data)

    # -- for the stream runner and the manager -------------------------------------------------

    async def take(self, entry: Entry, answer: Answer) -> None:
        await self._take(entry, answer)

    async def sending(self, entry: Entry) -> None:
        """Write ``sending`` for a stream's create (raises LedgerError when it cannot)."""
        assert self.ledger is not None
        await self.ledger.sending(entry.job.key, resubmit=entry.resubmit)
        self._ledger_ok()

    def serve(self, job: Job, answer: Answer) -> None:
        """A job the ledger already holds the outcome of: finish it without any request.

        What it cost counts against the budget: a rerun's ``max_cost`` bounds the whole run.
        """
        _usage, cost = self.meter.settle(job.key, None, answer.body)
        JobControl(job).update(answer.status, body=answer.body, response_id=answer.response_id,
                               error=answer.error, error_code=answer.error_code,
                               request_id=answer.request_id, cost=cost)
        if self.on_end is not None:
            self.on_end(job)

    def jobs_left(self) -> int:
        return len(self._entries)

    async def wait_idle(self) -> None:
        """Return once every job added so far (and any added meanwhile) has ended."""
        while self._entries:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    @property
    def live(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._entries) - self._active

    @property
    def retrying(self) -> int:
        """Jobs napping before another attempt of a request that failed."""
        return sum(1 for e in self._entries.values() if e.attempt and e.step is None)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def in_use(self) -> dict[str, int]:
        """Every slot and counter that must be back to zero once nothing runs (for tests)."""
        return {"active": self._active, "entries": len(self._entries),
                "requests": self.requests_limiter.total - self.requests_limiter.free,
                "pace_in_flight": self.meter.pacer.statistics().in_flight,
                "reserved": self.meter.budget.reservations if self.meter.budget else 0,
                "shields": len(self._shields)}

    # -- leaving ---------------------------------------------------------------------------------

    def close(self, grace: float) -> None:
        """The manager is leaving: send no new create, and give the creates in flight (and
        the writes of their answers) ``grace`` seconds."""
        at = anyio.current_time() + grace
        self._closing_at = at if self._closing_at is None else min(self._closing_at, at)
        for shield in self._shields:
            shield.deadline = min(shield.deadline, self._closing_at)

    async def shutdown(self, *, cancel: bool, cancel_timeout: float) -> list[tuple[str, str]]:
        """The manager is leaving on an error: settle every job that is not terminal.

        Jobs never sent end cancelled locally (nothing recorded: a rerun sends them). A create
        cut off in flight may have started a response: it ends cancelled, and its ``sending``
        record makes the next run count it. Live jobs are cancelled on the server in one
        bounded sweep (``cancel``), or left running for a later run to re-attach (detached).
        A response the server created but the ledger never took is treated the same (it is
        paid for: only the caller's cancel cancels it); those are returned as (key, response
        id), for the manager to keep where the next run finds them.
        """
        self._closing_at = self._closing_at or anyio.current_time()
        sweep: list[Entry] = []
        unrecorded: list[tuple[str, str]] = []
        for entry in list(self._entries.values()):
            if entry.unrecorded is not None:
                # The server said so: the job has this response, whatever the ledger holds.
                entry.control.update(entry.job.status, response_id=entry.unrecorded)
                unrecorded.append((entry.job.key, entry.unrecorded))
                if cancel:
                    sweep.append(entry)
                else:
                    self._detach(entry)
            elif entry.stage in (Stage.WAITING, Stage.CREATING, Stage.STREAMING) and \
                    entry.job.response_id is None:
                if entry.sent:
                    message = ("abandoned while its create was in flight; a response may exist "
                               "on the server")
                else:
                    message = ("cancelled before it was sent" if cancel
                               else "not sent: the manager exited first")
                self._drop(entry, JobStatus.CANCELLED, message, "cancelled")
            elif entry.stage is Stage.FOLLOWING:
                self._detach(entry)  # another process's job: never cancelled from here
            elif cancel:
                sweep.append(entry)
            else:
                self._detach(entry)
        answers: dict[str, Answer] = {}
        if sweep:
            with anyio.move_on_after(cancel_timeout):
                async with anyio.create_task_group() as tg:
                    for entry in sweep:
                        tg.start_soon(self._sweep_one, entry, answers)
        for entry in sweep:
            if entry.stage is Stage.ENDED:
                continue
            answer = answers.get(entry.job.key)
            if answer is not None and answer.status.terminal:
                # The server settled it; the ledger did not take that in time. Say what the
                # server said (the ledger keeps the id: a rerun re-attaches and records it).
                entry.control.update(answer.status, body=answer.body, error=answer.error,
                                     error_code=answer.error_code)
                self._close(entry)
            else:
                self._drop(entry, JobStatus.CANCELLED,
                           "abandoned: the manager exited before the job finished and the "
                           "server did not confirm the cancel", "cancelled")
        return unrecorded

    async def _sweep_one(self, entry: Entry, answers: dict[str, Answer]) -> None:
        rid = entry.job.response_id
        assert rid is not None
        async with self.requests_limiter:
            try:
                if entry.unrecorded is None and not await self._still_ours(entry):
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
        answers[entry.job.key] = answer
        try:
            await self._take(entry, answer)
        except (Stop, LedgerError) as exc:
            # The server settled it; the ledger could not take that. Say what the server said.
            _log.warning("job.unrecorded", key=entry.job.key, response_id=rid,
                         status=answer.status.value, error=str(exc))
            if entry.stage is not Stage.ENDED:
                entry.control.update(answer.status, body=answer.body, error=answer.error,
                                     error_code=answer.error_code)
                self._close(entry)

