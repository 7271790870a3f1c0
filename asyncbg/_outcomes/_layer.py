"""The user's job for a request with checks, a ladder or hedging, and the task that runs it.

The user's :class:`~asyncbg.Job` is a handle of its own, never run by the engine: its
attempts are. :class:`Ladder` (one per such job, and its owner) sends attempt 1 under the
user's key while ``submit`` waits (so a journal mismatch or a duplicate key raises there), then,
in a task of the manager's group, waits for each attempt, judges it, asks
:func:`~asyncbg._outcomes._ladder.next_attempt` what comes next, and at the end moves the
user's job to the final attempt's outcome with the attempts' summed cost. A rerun sends the
same attempts under the same keys: the journal serves the finished ones and resumes the live
one, so no attempt is sent twice.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .. import _log
from .._engine._job import Job, JobControl
from .._errors import AsyncbgError, DuplicateKeyError, JournalMismatchError, ManagerStateError
from .._policies import PollPolicy
from .._status import JobStatus
from ._fallback import to_provider
from ._hedge import Hedge, Tails, shape_of
from ._ladder import Escalation, attempt_key, kind_of, next_attempt
from ._structured import Checks, with_text_format

if TYPE_CHECKING:
    from .._engine._callbacks import Callbacks
    from .._manager import BackgroundManager

__all__ = ["Ladder", "Outcomes"]


class Outcomes:
    """The manager's side of this layer: its defaults, its running ladders, its counters."""

    __slots__ = ("_attempts", "_idle", "_spawn", "callbacks", "escalate", "fallbacks", "hedge",
                 "ladders", "manager", "tails")

    def __init__(self, manager: BackgroundManager, *, escalate: Escalation | None,
                 hedge: Hedge | None, spawn: Callable[..., object], callbacks: Callbacks,
                 fallbacks: Mapping[str, BackgroundManager] | None = None) -> None:
        self.manager = manager
        #: Where the user's jobs' done callbacks run: the manager's queue.
        self.callbacks = callbacks
        #: The managers that run the attempts of a step naming another provider.
        self.fallbacks = dict(fallbacks or {})
        self._spawn = spawn
        self.escalate = escalate
        self.hedge = hedge
        self.tails = Tails(hedge)
        #: Ladders whose user job is not terminal yet.
        self.ladders = 0
        self._idle: anyio.Event | None = None
        #: The attempts of every ladder: engine jobs that the user's callbacks do not see.
        self._attempts: weakref.WeakSet[Job] = weakref.WeakSet()

    def users_only(self, on_done: Callable[[Job], object]) -> Callable[[Job], object]:
        """``on_done`` for the user's jobs only: an attempt is seen through its ladder's job."""
        attempts = self._attempts
        return lambda job: None if job in attempts else on_done(job)

    def sent(self, attempt: Job) -> Job:
        self._attempts.add(attempt)
        return attempt

    def wanted(self, *, escalate: Escalation | bool | None, hedge: Hedge | bool | None,
               text_format: type[Any] | None, validate: Callable[[Any], object] | None,
               ) -> tuple[Escalation | None, Hedge | None] | None:
        """The ladder and hedge for one submit (None meaning the manager's, False none), or
        None when the request needs none of this layer."""
        ladder = self.escalate if escalate is None or escalate is True else escalate or None
        copy = self.hedge if hedge is None or hedge is True else hedge or None
        if ladder is None and copy is None and text_format is None and validate is None:
            return None
        return ladder, copy

    async def submit(self, params: Mapping[str, Any], *, key: str | None,
                     escalate: Escalation | None, hedge: Hedge | None,
                     text_format: type[Any] | None, validate: Callable[[Any], object] | None,
                     poll_policy: PollPolicy | None, deadline: float | None) -> Job:
        """Send attempt 1 now and return the user's job; the rest runs in a task."""
        if text_format is not None:
            params = with_text_format(params, text_format)
        if escalate is not None:
            for number in range(2, escalate.max_attempts + 1):
                self.target(escalate.params_for(params, number))  # refused now, if at all
        first = self.sent(await self.manager.submit_request(
            params, key=key, poll_policy=poll_policy, deadline=deadline, escalate=False,
            hedge=False))
        ladder = Ladder(self, first, params, escalate=escalate, hedge=hedge,
                        checks=Checks(text_format=text_format, validate=validate),
                        poll_policy=poll_policy,
                        deadline=None if deadline is None else anyio.current_time() + deadline)
        self.ladders += 1
        self._spawn(ladder.run, first, name=f"asyncbg ladder {first.key}")
        return ladder.job

    def target(self, params: Mapping[str, Any]) -> tuple[BackgroundManager, dict[str, Any]]:
        """The manager that runs an attempt, and its request: a step naming a ``provider``
        goes to that provider's manager, mapped (``ValueError`` when it does not map)."""
        request = dict(params)
        provider = request.pop("provider", None)
        if provider is None:
            return self.manager, request
        manager = self.fallbacks.get(provider)
        if manager is None:
            raise ValueError(
                f"an escalation step names provider {provider!r}, but this manager has no "
                f"manager for it: pass fallbacks={{{provider!r}: BackgroundManager(...)}}")
        return manager, to_provider(provider, request)

    def ended(self) -> None:
        self.ladders -= 1
        if not self.ladders and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Return once every ladder has ended (the manager is leaving normally)."""
        while self.ladders:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    def counters(self) -> dict[str, Any]:
        """The hedges' counters, for ``statistics()``."""
        t = self.tails
        return {"hedges": t.hedges, "hedges_won": t.hedges_won, "hedge_cost": t.hedge_cost}


class Ladder:
    """One user job: its attempts, and the owner the job asks to cancel or parse."""

    __slots__ = ("_cancelled", "_final", "attempts", "checks", "deadline", "escalate", "hedge",
                 "invalid", "job", "layer", "params", "poll_policy")

    def __init__(self, layer: Outcomes, first: Job, params: Mapping[str, Any], *,
                 escalate: Escalation | None, hedge: Hedge | None, checks: Checks,
                 poll_policy: PollPolicy | None, deadline: float | None) -> None:
        self.layer = layer
        self.params = dict(params)
        self.escalate = escalate
        self.hedge = hedge
        self.checks = checks
        self.poll_policy = poll_policy
        self.deadline = deadline
        #: Every attempt sent or served, hedge copies included, in the order sent.
        self.attempts: list[Job] = [first]
        #: Why the final answer is not usable (it does not parse or validate), or None.
        self.invalid: str | None = None
        self._final: Job | None = None
        self._cancelled = False
        self.job = Job(self, first.key)
        self.job._outcome = self

    # -- JobOwner: what the user's job asks ------------------------------------------------

    @property
    def callbacks(self) -> Callbacks:
        return self.layer.callbacks

    async def cancel_job(self, job: Job) -> None:
        """The user's cancel: no further attempt; the live ones are cancelled on the server."""
        self._cancelled = True
        async with anyio.create_task_group() as tg:
            for attempt in self.attempts:
                if not attempt.done:
                    tg.start_soon(attempt.cancel)
        await job.wait()

    def parse_result(self, body: bytes) -> Any:
        owner = (self._final or self.attempts[0])._owner
        return owner.parse_result(body)

    def parse_event(self, data: dict[str, Any]) -> Any:
        return self.attempts[0]._owner.parse_event(data)

    def parsed(self) -> Any:
        """The final answer as an instance of ``text_format``."""
        if self.checks.text_format is None:
            raise AsyncbgError(f"job {self.job.key!r} was submitted without text_format=")
        return self.checks.parse(self.job.body)

    # -- the ladder ------------------------------------------------------------------------

    async def run(self, first: Job) -> None:
        """Attempt after attempt until one is final, then the user's job ends as it did."""
        control = JobControl(self.job)
        try:
            attempt: Job | None = first
            kinds: list[str] = []
            number = 1
            while attempt is not None:
                final = await self._race(attempt, number)
                invalid = self._judge(final)
                kinds.append(kind_of(final.status, final.error_code, invalid))
                following = None if self._cancelled else next_attempt(self.escalate, kinds)
                if following is None:
                    self._finish(control, final, invalid)
                    return
                _log.info("job.escalated", key=self.job.key, attempt=following,
                          reason=invalid or final.error_code or final.status.value)
                number = following
                attempt = await self._send(number)
        except ManagerStateError:
            pass  # the manager is leaving: no further attempt (the job detaches below)
        except (JournalMismatchError, DuplicateKeyError, ValueError) as exc:
            # The next attempt could not be sent (its key is in the journal with another
            # request: the ladder changed between runs, say; or its provider refused the
            # request). The attempts so far stand. A ledger failure is not caught: it stops
            # the manager, as it does for any create.
            control.update(JobStatus.FAILED, error=f"attempt {len(self.attempts) + 1} could "
                           f"not be sent: {exc}", error_code="escalation_failed",
                           cost=self._cost())
        finally:
            if not self.job.done:
                control.detach()  # the manager is leaving: its attempts detach with it
            self.layer.ended()

    async def _send(self, number: int, *, hedge: bool = False) -> Job:
        assert self.escalate is not None or hedge
        manager, params = self.layer.target(
            self.escalate.params_for(self.params, number) if self.escalate is not None
            else self.params)
        remaining = None if self.deadline is None else max(
            self.deadline - anyio.current_time(), 0.0)
        attempt = self.layer.sent(await manager.submit_request(
            params, key=attempt_key(self.job.key, number, hedge=hedge),
            poll_policy=self.poll_policy, deadline=remaining, escalate=False, hedge=False))
        self.attempts.append(attempt)
        if self._cancelled:  # the user cancelled while it was being submitted
            await attempt.cancel()
        return attempt

    def _judge(self, attempt: Job) -> str | None:
        if attempt.status is not JobStatus.COMPLETED:
            return None
        return self.checks.judge(attempt.body, attempt.response)

    def _mirror(self, attempt: Job) -> None:
        """The user's job shows the attempt under way: its status and, the first time, its
        response id (so that ``wait_accepted`` returns)."""
        status = attempt.status if not attempt.done else self.job.status
        JobControl(self.job).update(status, response_id=attempt.response_id)

    def _finish(self, control: JobControl, final: Job, invalid: str | None) -> None:
        self._final = final
        self.invalid = invalid
        # The user's job shows the final attempt: its response id, body and request id.
        self.job.response_id = final.response_id
        control.update(final.status, body=final.body, response_id=final.response_id,
                       error=final.error, error_code=final.error_code,
                       request_id=final.request_id, cost=self._cost())

    def _cost(self) -> float | None:
        costs = [a.cost for a in self.attempts if a.cost is not None]
        return sum(costs) if costs else None

    # -- hedging ---------------------------------------------------------------------------

    async def _race(self, attempt: Job, number: int) -> Job:
        """Wait for ``attempt``; past the hedge's threshold, send one copy and keep the first
        to complete (the other is cancelled on the server at once)."""
        hedge = self.hedge
        tails = self.layer.tails
        params = (self.escalate.params_for(self.params, number) if self.escalate is not None
                  else self.params)
        shape = shape_of(params)
        if hedge is not None and await self._hedged_before(params, number):
            # An earlier run sent a copy of this attempt: follow both again (the journal
            # serves or resumes each); nothing new is decided.
            tails.hedges += 1
            return await self._settle(attempt, await self._send(number, hedge=True), 0.0)
        if await attempt.wait_accepted() is None or attempt.done:
            await attempt.wait()
            return attempt
        self._mirror(attempt)
        started = anyio.current_time()
        expected = None
        if hedge is not None and await self._outlived(attempt, hedge, shape, started):
            expected = tails.may_hedge(hedge, shape, self.layer.manager.meter.spend.cost)
        if expected is None:
            await attempt.wait()
            self._record(shape, attempt, started)
            return attempt
        tails.hedges += 1
        tails.extra_pending += expected
        try:
            copy = await self._send(number, hedge=True)
        except (JournalMismatchError, DuplicateKeyError, ValueError) as exc:
            tails.extra_pending -= expected
            tails.hedges -= 1
            _log.warning("job.hedge_refused", key=self.job.key, error=str(exc))
            await attempt.wait()  # no copy: the original goes on alone
            self._record(shape, attempt, started)
            return attempt
        except BaseException:
            tails.extra_pending -= expected
            raise
        winner = await self._settle(attempt, copy, expected)
        self._record(shape, winner, started)
        return winner

    async def _settle(self, attempt: Job, copy: Job, expected: float) -> Job:
        """The first of ``attempt`` and its ``copy`` to complete; the other is cancelled at
        once, and what it cost is the hedge's extra spend."""
        tails = self.layer.tails
        try:
            winner = await _first_completed(attempt, copy)
        finally:
            tails.extra_pending -= expected
        loser = copy if winner is attempt else attempt
        if not loser.done:
            await loser.cancel()
        if winner is copy:
            tails.hedges_won += 1
        tails.hedge_cost += loser.cost or 0.0
        _log.info("job.hedged", key=self.job.key, won=winner is copy, extra_cost=loser.cost)
        return winner

    async def _hedged_before(self, params: Mapping[str, Any], number: int) -> bool:
        """Whether the journal holds a copy of attempt ``number`` (a rerun after a hedge)."""
        manager, _ = self.layer.target(params)
        journal = manager.journal
        return journal is not None and await journal.get(
            attempt_key(self.job.key, number, hedge=True)) is not None

    async def _outlived(self, attempt: Job, hedge: Hedge, shape: tuple[str, int],
                        started: float) -> bool:
        """Wait until ``attempt`` ends (False) or outlives the threshold of its shape (True)."""
        tails = self.layer.tails
        while not attempt.done:
            threshold = tails.threshold(hedge, shape)
            wake = anyio.Event()
            attempt.add_listener(_setter(wake))
            if threshold is None:
                tails.when_ready(shape, wake)
                try:
                    await wake.wait()
                finally:
                    tails.forget(shape, wake)
                continue
            left = started + threshold - anyio.current_time()
            if left <= 0:
                return True
            with anyio.move_on_after(left):
                await wake.wait()
        return False

    def _record(self, shape: tuple[str, int], attempt: Job, started: float) -> None:
        if attempt.status is JobStatus.COMPLETED:
            self.layer.tails.record(shape, anyio.current_time() - started, attempt.cost)


async def _first_completed(a: Job, b: Job) -> Job:
    """The first of ``a`` and ``b`` to complete; when neither does, ``a`` (the original)."""
    while True:
        for job in (a, b):
            if job.status is JobStatus.COMPLETED:
                return job
        if a.done and b.done:
            return a
        changed = anyio.Event()
        for job in (a, b):
            if not job.done:
                job.add_listener(_setter(changed))
        await changed.wait()


def _setter(event: anyio.Event) -> Callable[[Job], None]:
    """A job listener that sets ``event``."""
    return lambda _: event.set()
