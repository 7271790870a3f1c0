"""Fleet workers: many processes, one shared ledger, each job run by one of them at a time.

``asyncbg submit`` enqueues jobs (:func:`enqueue_requests`); each ``asyncbg worker`` runs
:func:`run_worker`: it takes the leases of waiting jobs (and of live ones whose owner died) up
to its free slots, runs them with the usual engine (a :class:`~asyncbg.BackgroundManager` on
the shared ledger, which renews the leases in batches), and on a stop hands its leases back at
once, leaving every live response running on the server for another worker to poll.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from . import _log
from ._engine._hooks import Hooks
from ._engine._job import Job
from ._errors import DuplicateKeyError, JournalMismatchError
from ._ledgers._base import LedgerError, LedgerUnavailable, Outcome, Record, fingerprint
from ._ledgers._open import shared_ledger
from ._ledgers._overview import fleet_status, fleet_status_text
from ._ledgers._rescue import Adoption, adopt_said
from ._ledgers._shared import MIN_LEASE, SharedLedger
from ._manager import BackgroundManager
from ._notify._notify import Notify
from ._policies import PollPolicy, RetryPolicy

__all__ = [
    "AccountRefused",
    "Leaving",
    "ServerUnreachable",
    "enqueue_requests",
    "fleet_status",
    "fleet_status_text",
    "prepared",
    "run_worker",
    "shared_ledger",
]

T = TypeVar("T")

#: The metadata key that names a job on the server, so that a response left behind by a create
#: whose answer was lost (the one ambiguous case) can be matched to its job later.
METADATA_KEY = "asyncbg_custom_id"
#: The API's limits on ``metadata``: 16 pairs, values up to 512 characters.
_METADATA_PAIRS, _METADATA_VALUE = 16, 512


class ServerUnreachable(Exception):
    """No request of this worker reached the server (a wrong base URL, say)."""


class AccountRefused(ServerUnreachable):
    """The server refused this worker's credentials or account (401/403, no credit): the
    worker stops and hands its jobs back for workers whose keys work."""


class Leaving:
    """A stopping worker's way out, for whoever stops it (``asyncbg worker``'s signals), as
    ``asyncbg run`` has :meth:`~asyncbg.BackgroundManager.unrecorded` and
    :meth:`~asyncbg.BackgroundManager.leave_now`: what the stop waits for, in a line, and a
    way to leave at once. :func:`run_worker` binds it while it runs."""

    __slots__ = ("_ledger", "_mgr", "_until", "hurried")

    def __init__(self) -> None:
        self._ledger: SharedLedger | None = None
        self._mgr: BackgroundManager | None = None
        #: When the stop's waits for the ledger end: for what it has not recorded (the
        #: manager's exit grace), and for the hand-back of the leases.
        self._until: tuple[float, float] | None = None
        #: Whether :meth:`leave_now` was called.
        self.hurried = False

    def waits_for(self) -> str | None:
        """Once the worker was told to stop: what holds its exit up, in a line, when its
        ledger is locked by another program writing to it (an SQLite ledger: its waits run
        in a worker thread that nothing cuts short); else None."""
        ledger, mgr, until = self._ledger, self._mgr, self._until
        if ledger is None or until is None or self.hurried or not getattr(ledger, "locked",
                                                                           False):
            return None
        held = len(mgr.unrecorded()) if mgr is not None else 0
        left = math.ceil(max((until[0] if held else until[1]) - anyio.current_time(), 0.0))
        what = ("" if not held else "1 response the server created and " if held == 1
                else f"{held} responses the server created and ")
        return (f"{ledger.location} is locked by another program writing to it: waiting up "
                f"to {left} s for it to take {what}the leases this worker hands back")

    def kept_in(self) -> str:
        """Where the ids of responses created and not recorded go: the ledger's rescue file
        (known once the worker has opened its ledger, as it has when :meth:`waits_for` says
        anything)."""
        return str(self._ledger.rescue().path) if self._ledger is not None else "a rescue file"

    def leave_now(self) -> None:
        """Leave at once: no more waiting for the ledger. The ids of responses created and
        not recorded go to the rescue file (the next worker on this machine adopts them),
        the leases run out by themselves, and creates still out are given up."""
        self.hurried = True
        if self._mgr is not None:
            self._mgr.leave_now()  # which gives its journal's waits up too: the ledger's
        elif (give_up := getattr(self._ledger, "give_up_waits", None)) is not None:
            give_up(0.0)  # still opening: no manager yet

    def _stopping(self, bound: float) -> None:
        """The worker was told to stop: its waits for a locked ledger end within ``bound``
        (those of the hand-back); those of the manager's exit run their grace all the same
        (a write that finds the ledger free goes through)."""
        now = anyio.current_time()
        grace = 0.0
        if self._mgr is not None:
            # The creates in flight (and the writes of their answers) get the exit's grace
            # from now: not from when the worker's own ledger call under way lets it go.
            grace = self._mgr.exit_grace
            self._mgr._scheduler.close(grace)
        self._until = (now + max(grace, bound), now + bound)
        give_up = getattr(self._ledger, "give_up_waits", None)
        if give_up is not None and not self.hurried:
            give_up(bound)


def prepared(body: Mapping[str, Any], custom_id: str) -> dict[str, Any]:
    """A Batch API line's body as a worker's manager sends it (what ``OpenAIResponses.prepare``
    makes of it, so that its digest is the one the worker's claim compares), with the job's
    ``custom_id`` in its metadata when there is room."""
    request: dict[str, Any] = {**body, "background": True}
    request.setdefault("store", True)
    if not request.get("stream"):
        request.pop("stream", None)
    metadata = request.get("metadata")
    if metadata is None:
        metadata = {}
    if (isinstance(metadata, dict) and METADATA_KEY not in metadata
            and len(metadata) < _METADATA_PAIRS and len(custom_id) <= _METADATA_VALUE):
        request["metadata"] = {**metadata, METADATA_KEY: custom_id}
    return request


async def enqueue_requests(
    ledger: SharedLedger, requests: Iterable[tuple[str, Mapping[str, Any]]]
) -> int:
    """Enqueue ``(custom_id, body)`` pairs as waiting jobs; returns how many were new.

    Idempotent, all or nothing: see :meth:`SharedLedger.enqueue`.
    """
    items = []
    for custom_id, body in requests:
        request = prepared(body, custom_id)
        items.append((custom_id, *fingerprint(request)))
    return await ledger.enqueue(items)


async def run_worker(
    client: Any,
    ledger: SharedLedger,
    *,
    concurrency: int,
    lease: float,
    exit_when_idle: bool,
    stop: anyio.Event,
    poll_policy: PollPolicy | None = None,
    retry_policy: RetryPolicy | None = None,
    idle: float | None = None,
    notify: Notify | None = None,
    db_patience: float = 300.0,
    hooks: Sequence[Hooks] = (),
    leaving: Leaving | None = None,
) -> int:
    """Run the jobs of ``ledger`` until ``stop`` is set (or, with ``exit_when_idle``, until
    nothing is waiting or live in it); returns 0.

    It takes work while it runs fewer than ``concurrency`` jobs; when full, it still adopts
    live responses whose owner died, up to twice ``concurrency``, so that they are polled within
    a lease (plus ``idle``) whatever the load. Leases last ``lease`` seconds and are renewed
    every ``lease / 3``. The ledger is polled for work every ``idle`` seconds (default:
    ``min(1, lease / 4)``) and whenever a job ends. On ``stop`` it takes nothing more, leaves
    its live responses running on the server and hands every lease back at once. Raises
    :class:`ServerUnreachable` when no request reached the server, and
    :class:`~asyncbg.LedgerError` when the ledger cannot be used. ``notify`` posts a webhook
    for every job this worker ends (and delivers what other workers left pending for its URL);
    with ``exit_when_idle`` it waits up to ``notify.wait_on_exit`` for them before returning.

    A ledger that cannot be reached (a dropped connection, a database restarting, or not up yet
    when the worker starts) is waited out with a backoff: live responses go on being polled,
    outcomes are written when it is back, and no create is sent that could not be recorded.
    Only after ``db_patience`` seconds does the worker give up, with
    :class:`~asyncbg.LedgerUnavailable`.

    ``leaving`` says, once the worker was told to stop, what its exit waits for (a ledger
    locked by another program), and makes it leave at once (see :class:`Leaving`).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    if not (MIN_LEASE <= lease < math.inf):
        # A create leaves with a third of its lease left at least (safety_margin): a shorter
        # lease runs out during the ledger's own round trips, and the worker takes its jobs,
        # sends nothing and takes them again, at full CPU.
        raise ValueError(f"lease must be at least {MIN_LEASE:g} s and finite, got {lease!r}")
    ledger.lease = lease
    leaving = leaving or Leaving()
    worker = _Worker(ledger, concurrency=concurrency, lease=lease, stop=stop,
                     idle=min(1.0, lease / 4) if idle is None else idle,
                     exit_when_idle=exit_when_idle, patience=db_patience, leaving=leaving)
    if not await _open_patiently(ledger, patience=db_patience, stop=stop):
        return 0  # stopped before the ledger could be reached: nothing was taken
    rescue = ledger.rescue()
    await anyio.to_thread.run_sync(rescue.reserve)  # room to keep ids on a full disk too
    mgr = BackgroundManager(
        client, journal=ledger, cancel_on_exit=False,
        max_concurrency=2 * concurrency,  # room for adopted responses (see run)
        poll_policy=poll_policy, retry_policy=retry_policy, notify=notify,
        ledger_patience=db_patience, hooks=hooks,
    )
    mgr._say_unrecorded = False  # said below, last: where their ids are kept, or the ids
    leaving._ledger, leaving._mgr = ledger, mgr
    mgr._adopt_kept = False  # the worker adopts them itself, at start and once a lease
    error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.relay_stop)
            try:
                async with mgr:
                    for hook in hooks:
                        observe = getattr(hook, "observe", None)
                        if observe is not None:
                            observe(mgr)  # gauges read from statistics()
                    await worker.run(mgr)
            except _Stopped:
                pass
            except Exception as exc:  # noqa: BLE001 - raised below, as itself, not in a group
                error = exc
            finally:
                tg.cancel_scope.cancel()
    except BaseException as exc:
        error = exc
        raise
    finally:
        said = mgr._unrecorded_said
        adoption = None
        with anyio.CancelScope(shield=True):
            try:
                if leaving.hurried:  # told to leave at once: the leases run out by themselves
                    ledger.abandon()
                else:
                    adoption = await _hand_back(worker, ledger, bound=worker.hand_back,
                                                kept=bool(said), unkept=mgr._unkept)
            finally:
                try:
                    await ledger.close()
                finally:
                    await anyio.to_thread.run_sync(rescue.release)  # removed unless it keeps ids
        # Responses created and not recorded (the database went away): where their ids are
        # kept for the next worker, or the ids themselves. The last word of a worker's exit.
        if adoption is not None and adoption.adopted:
            said += (f"; the ledger came back as the worker left: {len(adoption.adopted)} of "
                     "them recorded, for the fleet to poll")
        if said and isinstance(error, LedgerError):
            if said not in str(error):
                error.args = (f"{error}; {said}",)
        elif said:
            _log.warning("worker.unrecorded", message=said)
    if error is not None:
        raise error
    return 0


#: The longest a stopping worker tries to hand its leases back (or a renewal period, if less).
_HAND_BACK = 5.0
#: Seconds after which a ledger call without an answer is taken for an outage (a database
#: gone silent), counted from the call's start; a call on a live server takes milliseconds.
_SILENT = 5.0


async def _hand_back(worker: _Worker, ledger: SharedLedger, *, bound: float,
                     kept: bool, unkept: Sequence[tuple[str, str]] = ()) -> Adoption | None:
    """Requeue what ended unreached and release every lease, at once rather than after the
    lease runs out; within ``bound`` seconds. With the ledger away (a database down while the
    worker is told to stop) nothing is lost by giving up: every live response's id is
    recorded or kept (``kept``: in the rescue file), and the leases run out by themselves,
    for other workers to take then.

    Ids kept because the ledger was away are adopted first when it is back by now: released
    without them, their ``sending`` rows would be taken and created again at once; so are
    ``unkept``, the ids the rescue file could not take. The adoption when there was one."""
    held = len(ledger.held())
    error = f"no answer within {bound:g} s"
    adoption = None
    with anyio.move_on_after(bound):
        try:
            if kept or unkept:
                adoption = await ledger.adopt_kept(unkept)
            await worker.requeue_unreached()
            await ledger.release(list(ledger.held()))
            return adoption
        except LedgerError as exc:
            error = str(exc)
    _log.warning("worker.leases_not_handed_back", ledger=ledger.location, leases=held,
                 error=error, action=f"they run out within {ledger.lease:g} s; other workers "
                 "take the jobs then")
    ledger.abandon()  # closing does not try again
    return adoption


async def _open_patiently(ledger: SharedLedger, *, patience: float, stop: anyio.Event) -> bool:
    """Open ``ledger``, waiting out a database that cannot be reached yet (starting, restarting,
    a network away) with a backoff, as a running worker does: up to ``patience`` seconds, then
    :class:`~asyncbg.LedgerUnavailable`. False when ``stop`` came first (nothing was opened)."""
    started = anyio.current_time()
    delay = 0.0
    while True:
        try:
            # An attempt ends with the patience: one to an address that answers nothing (its
            # packets dropped) waits the whole connect timeout, and went on past it.
            with anyio.move_on_after(started + patience - anyio.current_time()) as attempt:
                await ledger.open()
            if attempt.cancelled_caught:
                raise LedgerUnavailable(f"{ledger.location}: no answer to the attempt to "
                                        "connect")
        except LedgerUnavailable as exc:
            waited = anyio.current_time() - started
            if waited >= patience:
                raise LedgerUnavailable(
                    f"{ledger.location} could not be reached for {patience:g} s ({exc}); the "
                    "worker stops without having taken any job"
                ) from exc
            if not delay:  # the first failure: say once that it waits
                _log.warning("worker.ledger_unavailable", ledger=ledger.location,
                             error=str(exc), patience=patience,
                             action="waiting for it before taking any job")
            delay = min(delay * 2 or 0.25, 5.0)
            with anyio.move_on_after(min(delay, patience - waited)):
                await stop.wait()
            if stop.is_set():
                return False
            continue
        if delay:
            _log.warning("worker.ledger_available", ledger=ledger.location,
                         after=round(anyio.current_time() - started, 3))
        return True


class _Stopped(Exception):
    """Leaves the manager's block by an exception: live jobs are detached, not awaited."""


class _Worker:
    def __init__(self, ledger: SharedLedger, *, concurrency: int, lease: float,
                 stop: anyio.Event, idle: float, exit_when_idle: bool,
                 patience: float = 300.0, leaving: Leaving | None = None) -> None:
        self.ledger = ledger
        self.leaving = leaving or Leaving()
        #: The longest a stopping worker tries to hand its leases back.
        self.hand_back = min(_HAND_BACK, lease / 3)
        self.patience = patience
        self.down_since: float | None = None
        #: Why the ledger could not be reached, the last time a call said.
        self.down_error = ""
        self.to_requeue: set[str] = set()
        self.to_release: set[str] = set()
        #: (message, code) once the server refused this worker's account (see _collect).
        self.refused: tuple[str, str] | None = None
        self.exit_when_idle = exit_when_idle
        self.concurrency = concurrency
        self.lease = lease
        self.stop = stop
        self.idle = idle
        self.jobs: dict[str, Job] = {}
        self.wake = anyio.Event()
        self.next_adoption = 0.0
        #: When to look again for responses kept by workers that left without recording them
        #: (see adopt_kept): at once, then once a lease, and as soon as the ledger is back.
        self.next_rescue = 0.0
        #: The scope of the ledger call under way, which a stop cuts short.
        self.cut: anyio.CancelScope | None = None

    async def relay_stop(self) -> None:
        await self.stop.wait()
        self.leaving._stopping(self.hand_back)
        self.wake.set()
        if self.cut is not None:
            self.cut.cancel()

    def _woken(self, _job: Job) -> None:
        self.wake.set()

    async def run(self, mgr: BackgroundManager) -> None:
        while True:
            self.wake = anyio.Event()
            began = anyio.current_time()  # the database was reachable before this, at best
            try:
                await self._unless_stopped(lambda: self._collect(mgr), None)
            except LedgerUnavailable as exc:
                self._ledger_down(exc, began)
            if self.stop.is_set():
                raise _Stopped
            try:
                if self.to_requeue or self.to_release:
                    await self._unless_stopped(lambda: self._collect(mgr), None)
                if anyio.current_time() >= self.next_rescue:
                    await self._adopt_kept()
                records = await self._take_work(mgr)
                idle = (self.exit_when_idle and not self.jobs and not records
                        and await self._unless_stopped(self.ledger.unfinished, -1) == 0)
            except LedgerUnavailable as exc:
                # The database is away: what runs goes on (the engine retries its writes);
                # nothing new is taken until it is back.
                self._ledger_down(exc, began)
                with anyio.move_on_after(min(self.idle * 4, 5.0, self._patience_left())):
                    await self.stop.wait()
                continue
            self._ledger_up()
            if idle:
                return  # nothing waiting or live anywhere: the manager's exit has nothing to do
            await self._nap()

    async def _nap(self) -> None:
        """Until a job here ends, work is announced in the ledger (LISTEN/NOTIFY on
        PostgreSQL), or ``idle`` seconds pass: whichever comes first."""
        async with anyio.create_task_group() as tg:
            async def announced() -> None:
                await self.ledger.wait_for_work(self.idle)
                tg.cancel_scope.cancel()

            tg.start_soon(announced)
            with anyio.move_on_after(self.idle):
                await self.wake.wait()
            tg.cancel_scope.cancel()

    async def _unless_stopped(self, call: Callable[[], Awaitable[T]], stopped: T) -> T:
        """``call`` (a ledger call), cut short when the worker is told to stop: then
        ``stopped``. With the database gone such a call may wait up to the ledger's timeout,
        which held a stop up that long.

        A database that goes silent (its packets dropped: nothing refused, nothing answered)
        holds a call for the ledger's whole timeout before anything fails. So the outage is
        counted from the start of a call that has no answer after ``_SILENT`` seconds (said
        then, as any outage is), and the call is cut short when the patience runs out, counted
        from then or from the outage's start before it (:class:`LedgerUnavailable`). Nothing
        was sent for what a cut call may have taken: those leases run out by themselves."""
        if self.stop.is_set():
            return stopped
        began = anyio.current_time()
        since = began if self.down_since is None else self.down_since
        error: Exception | None = None
        with anyio.CancelScope(deadline=since + self.patience) as self.cut:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._silent_after, began)
                    try:
                        result = await call()
                    except Exception as exc:  # noqa: BLE001 - raised below, as itself
                        error = exc
                    tg.cancel_scope.cancel()
            finally:
                self.cut = None
            if error is not None:
                raise error
            return result
        if not self.stop.is_set():  # the patience ran out, the database still away
            waited = anyio.current_time() - began
            if waited >= self.patience or not self.down_error:
                self.down_error = f"{self.ledger.location}: no answer for {waited:.0f} s"
            raise LedgerUnavailable(self.down_error)
        return stopped

    async def _silent_after(self, began: float) -> None:
        """A ledger call begun at ``began`` still has no answer after ``_SILENT`` seconds: the
        database is taken to be away since then, and said so (once an outage)."""
        await anyio.sleep_until(began + _SILENT)
        if self.down_since is None:
            self._went_down(f"{self.ledger.location}: no answer for {_SILENT:g} s", began)

    def _patience_left(self) -> float:
        if self.down_since is None:
            return self.patience
        return max(self.down_since + self.patience - anyio.current_time(), 0.0)

    async def _take_work(self, mgr: BackgroundManager) -> list[Record]:
        free = self.concurrency - len(self.jobs)
        records: list[Record] = []
        if free > 0:
            records = await self._unless_stopped(
                lambda: self.ledger.acquire(free, self.lease), [])
        elif anyio.current_time() >= self.next_adoption:
            # Full, but a dead worker's live responses are adopted all the same: they need
            # polls, not a slot for a create, and the server keeps a result only a while.
            self.next_adoption = anyio.current_time() + self.idle
            records = await self._unless_stopped(
                lambda: self.ledger.acquire(2 * self.concurrency - len(self.jobs), self.lease,
                                            live_only=True), [])
        if self.stop.is_set():
            return []  # taken as it stopped: nothing is started (the hand-back releases them)
        for record in records:
            await self._start(mgr, record.key, record.request, record.digest)
        return records

    def _ledger_down(self, exc: LedgerUnavailable, began: float) -> None:
        """The ledger could not be reached by a call made since ``began``: the outage is
        counted from then (the first call that fails may have waited for a connection)."""
        now = anyio.current_time()
        self.down_error = str(exc)
        if self.down_since is None:
            self._went_down(str(exc), began)
        assert self.down_since is not None
        if now - self.down_since >= self.patience:
            raise LedgerUnavailable(
                f"{self.ledger.location} could not be reached for {self.patience:g} s "
                f"({exc}); the worker stops, leaving its live responses for a later worker"
            ) from exc

    def _went_down(self, error: str, since: float) -> None:
        """The outage began at ``since``: said once, until the ledger is back."""
        self.down_error = error
        self.down_since = since
        _log.warning("worker.ledger_unavailable", ledger=self.ledger.location, error=error,
                     patience=self.patience, action="running jobs go on; nothing new is taken")

    async def _adopt_kept(self) -> None:
        """Record the responses that workers on this machine created and could not record
        before they left (kept in the ledger's rescue file), by the fenced rule of
        ``asyncbg._ledgers._rescue``: those adopted become live rows that this worker, or
        another, takes and polls to their end. Raises :class:`LedgerUnavailable`."""
        self.next_rescue = anyio.current_time() + self.lease
        try:
            await adopt_said(lambda: self._unless_stopped(self.ledger.adopt_kept, None),
                             who="worker")
        except LedgerUnavailable:
            self.next_rescue = 0.0  # again once the ledger is back
            raise

    def _ledger_up(self) -> None:
        if self.down_since is not None:
            self.next_rescue = 0.0  # a worker that left meanwhile may have kept ids
            _log.warning("worker.ledger_available", ledger=self.ledger.location,
                         after=round(anyio.current_time() - self.down_since, 3))
            self.down_since = None

    async def _start(self, mgr: BackgroundManager, key: str, request: bytes,
                     digest: str) -> None:
        # A key this worker ran before and took again (its lease ran out while it still ran
        # it, say): the old handle goes; the claim decides afresh (re-attach, or serve).
        mgr.forget(key)
        self.jobs.pop(key, None)
        try:
            job = await mgr._submit_request(json.loads(request), key=key,
                                            stored=(digest, request))
        except (JournalMismatchError, DuplicateKeyError, ValueError) as exc:
            # A record this worker cannot run as it is: end it, so that no worker loops on it.
            _log.error("job.unrunnable", key=key, error=str(exc))
            outcome = Outcome("failed", error=f"cannot run this job: {exc}",
                              error_code="invalid_request")
            notices = mgr._scheduler.notices  # with notify=: say so, with the outcome
            await self.ledger.record(key, outcome if notices is None else
                                     notices.attach(key, None, outcome, None))
            if notices is not None:
                notices.written()
            return
        self.jobs[key] = job
        job.add_listener(self._woken)

    async def requeue_unreached(self) -> None:
        """On the way out: what ended because the server could not be reached goes back to
        waiting (nothing was paid for).

        The ledger decides, by the code it recorded, not what the jobs say here: a job whose
        write of its outcome was cut short by the exit says "abandoned", yet the write may
        have landed (``local``, ``connection_error``), and would then stay there for good."""
        refused = self.refused
        codes = {"connection_error"} | ({refused[1]} if refused is not None else set())
        keys = sorted({*self.jobs, *self.to_requeue})
        if keys:
            await self.ledger.requeue(keys, codes=codes)

    async def _collect(self, mgr: BackgroundManager) -> None:
        """Forget jobs that ended or were lost. Those that ended without reaching the server
        go back to waiting, for another worker or a later run: the leases of those that
        ended unrecorded are handed back, those recorded ``local`` are requeued."""
        held = self.ledger.held()
        unsent: list[str] = []
        unreached: list[str] = []
        unreachable = None
        refused = self.refused = mgr._scheduler.refused
        for key, job in list(self.jobs.items()):
            if not job.done and key in held:
                continue
            del self.jobs[key]
            mgr.forget(key)
            if _refused(job, refused):
                unreached.append(key)  # nothing was paid for: back to waiting, for others
            elif job.done and key in held:
                unsent.append(key)
                if job.error_code == "connection_error":
                    unreachable = job.error  # the server was never reached: stop
            elif _unreached(job):
                unreached.append(key)
        if unreached:
            _log.warning("jobs.requeued", count=len(unreached),
                         reason="server unreachable" if refused is None else "account refused")
        # Kept until the ledger takes them (it may be away: the next round tries again).
        self.to_requeue.update(unreached)
        self.to_release.update(unsent)
        if self.to_requeue:
            await self.ledger.requeue(sorted(self.to_requeue))
            self.to_requeue.clear()
        if self.to_release:
            await self.ledger.release(sorted(self.to_release))
            self.to_release.clear()
        if refused is not None:
            raise AccountRefused(f"the server refused this worker's account: {refused[0]}")
        if unreachable is not None:
            raise ServerUnreachable(unreachable)


def _refused(job: Job, refused: tuple[str, str] | None) -> bool:
    """Ended unsent because the server refused the account: another worker may run it."""
    return (refused is not None and job.done and job.response_id is None
            and job.error_code == refused[1])


def _unreached(job: Job) -> bool:
    return job.done and job.error_code == "connection_error" and job.response_id is None
