"""BackgroundManager: the lifecycle, submitting, waiting and statistics of many jobs.

The work itself happens elsewhere: :mod:`asyncbg._engine._scheduler` runs every job from one task,
a :class:`~asyncbg.Provider` talks to the server, and a :class:`~asyncbg.Ledger` records what
happened. The manager wires them together for the length of an ``async with`` block.
"""

from __future__ import annotations

import enum
import itertools
import os
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup

from . import _log
from ._engine import _waiting
from ._engine._following import answer_of as _answer_of
from ._engine._hooks import Hooks
from ._engine._job import Job
from ._engine._meter import Meter
from ._engine._scheduler import Scheduler
from ._engine._steps import Stop
from ._engine._webhooks import WebhookInbox
from ._errors import DuplicateKeyError, JournalMismatchError, ManagerStateError
from ._ledgers import Ledger, MemoryLedger, open_ledger
from ._ledgers._base import ClaimOutcome, LedgerError, fingerprint
from ._ledgers._rescue import adopt_said
from ._ledgers._shared import SharedLedger, keep_leases
from ._notify._notify import Notify
from ._outcomes import Escalation, Hedge, Outcomes
from ._policies import PollPolicy, RetryPolicy
from ._providers import OpenAIResponses, Provider
from ._spend._pacing import RateLimit
from ._spend._pricing import Price
from ._spend._pricing import preload as preload_prices
from ._status import JobStatus

if TYPE_CHECKING:
    from ._notify.send import Sender

__all__ = ["BackgroundManager", "ManagerStatistics"]

#: Submits between two moments where ``submit`` lets the event loop run the others.
SUBMIT_SLICE = 64


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSING = 3
    CLOSED = 4


@dataclass(frozen=True, slots=True)
class ManagerStatistics:
    """A snapshot of a manager's counters, from :meth:`BackgroundManager.statistics`."""

    submitted: int
    pending: int
    live: int
    by_status: dict[str, int]
    requests: int
    polls: int
    retries: int
    possible_duplicates: int
    webhooks_accepted: int
    webhooks_rejected: int
    #: US dollars spent by finished jobs with a known price (jobs served from a journal too).
    cost: float = 0.0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    #: Output tokens, reasoning tokens included.
    output_tokens: int = 0
    reasoning_tokens: int = 0
    #: Creates answered 429 (pacing keeps this near zero).
    rate_limited: int = 0
    #: ``notify=``: notifications answered 2xx, attempts that failed, and notifications marked
    #: failed (given up, or the endpoint answered 410).
    notifications_delivered: int = 0
    notification_failures: int = 0
    notifications_given_up: int = 0
    #: Requests out right now (creates, polls, cancels), and jobs waiting before they try again
    #: (a server's Retry-After, or a backoff after an error): not in flight.
    requests_in_flight: int = 0
    retrying: int = 0
    #: ``hedge=``: copies sent, copies that finished first, and what the losers cost (US
    #: dollars; the extra spend that ``Hedge(max_extra=...)`` caps).
    hedges: int = 0
    hedges_won: int = 0
    hedge_cost: float = 0.0
    #: Batch requests sent again in a new batch because their batch expired before they ran.
    batch_reruns: int = 0


class BackgroundManager:
    """Keeps at most ``max_concurrency`` background jobs in flight and follows them to the end.

    Use it as ``async with BackgroundManager(client) as mgr:``. ``client`` is an
    ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``), or any :class:`~asyncbg.Provider`.
    Leaving the block normally waits for every job. Leaving it by an exception or a
    cancellation sends one bounded, shielded cancel sweep for every live job
    (``cancel_timeout`` seconds), then lets the exception through unchanged; with
    ``cancel_on_exit=False`` live jobs are left running on the server instead, for a later run
    to re-attach through the journal.

    ``max_requests`` bounds the HTTP requests in flight at once (creates, polls, cancels,
    stream opens), which keeps the event loop responsive when thousands of jobs are due
    together.

    ``max_cost`` (US dollars) is a budget over every job: a create is sent only while the spend
    so far plus what the live jobs are expected to cost leaves room for it (a job that cannot fit
    ends :class:`~asyncbg.BudgetExceeded` with nothing sent), and if real spend still passes it,
    every live job is cancelled on the server at once. ``prices`` overrides the built-in price
    table (from the genai-prices dataset) per model name. Creates are paced below the server's
    rate limits: a 429 holds every create back until its ``Retry-After``, the
    ``x-ratelimit-*`` headers spread the remaining headroom, the number of creates in flight
    starts small and grows as answers come back, and ``rate_limit`` caps requests and tokens
    per minute when you know your limits.

    ``on_done`` is called with every job once it is terminal and recorded, as a done callback
    of each (sync or async; see :meth:`Job.add_done_callback`). ``notify`` posts a signed
    webhook for every job outcome (:class:`~asyncbg.Notify`), written to the journal with the
    outcome and kept there until a receiver took it; without a journal the outbox is in memory.

    ``escalate`` (:class:`~asyncbg.Escalation`) and ``hedge`` (:class:`~asyncbg.Hedge`) are
    every job's defaults for the ``submit`` arguments of the same names. ``fallbacks`` names
    the open managers that run an escalation step naming another provider
    (``{"anthropic": BackgroundManager(AnthropicBatches(...))}``), each with its own journal.
    """

    def __init__(
        self,
        client: Any,
        *,
        max_concurrency: int = 16,
        poll_policy: PollPolicy | None = None,
        retry_policy: RetryPolicy | None = None,
        cancel_timeout: float = 10.0,
        cancel_on_exit: bool = True,
        log_prompts: bool = False,
        journal: str | os.PathLike[str] | Ledger | None = None,
        webhooks: bool = False,
        webhook_secret: str | None = None,
        stream: bool = False,
        max_requests: int = 64,
        max_cost: float | None = None,
        prices: Mapping[str, Price] | None = None,
        rate_limit: RateLimit | None = None,
        journal_bodies: bool = True,
        on_done: Callable[[Job], object] | None = None,
        notify: Notify | None = None,
        ledger_patience: float = 60.0,
        exit_grace: float = 10.0,
        hooks: Sequence[Hooks] = (),
        escalate: Escalation | None = None,
        hedge: Hedge | None = None,
        fallbacks: Mapping[str, BackgroundManager] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests!r}")
        for name, value in (("ledger_patience", ledger_patience), ("exit_grace", exit_grace),
                            ("cancel_timeout", cancel_timeout)):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got "
                                 f"{value!r}")
        self.exit_grace = exit_grace
        self.client = client
        self.provider: Provider = (
            client if isinstance(client, Provider) else OpenAIResponses(client)
        )
        if getattr(self.provider, "batch", False):
            # Each create of a batch provider waits for its group to be sent, holding a request
            # slot meanwhile: leave room for a whole batch to gather.
            max_requests = max(max_requests, int(getattr(self.provider, "max_batch_size", 1)))
        self.max_concurrency = max_concurrency
        secret = webhook_secret or getattr(client, "webhook_secret", None)
        if webhooks and secret is None:
            raise ValueError(
                "webhooks=True needs a webhook secret: pass webhook_secret=, set it on the "
                "client, or set OPENAI_WEBHOOK_SECRET"
            )
        #: With webhooks on, polling is only a safety net for a lost delivery.
        self.poll_policy = poll_policy or (PollPolicy.safety_net() if webhooks else PollPolicy())
        self.retry_policy = retry_policy or RetryPolicy()
        self.cancel_timeout = cancel_timeout
        self.cancel_on_exit = cancel_on_exit
        self.stream = stream
        if notify is not None and journal is None:
            # The outbox: as lasting as the manager, and no more; a finished job's row goes
            # once its notification is delivered.
            journal = MemoryLedger(keep_finished=False)
        self.journal: Ledger | None = (
            None if journal is None else
            journal if isinstance(journal, Ledger) else open_ledger(journal)
        )
        #: Prices, the budget and the pace of creates (see ``statistics().cost``).
        self.meter = Meter(prices=prices, max_cost=max_cost, rate_limit=rate_limit,
                           max_concurrency=max_concurrency,
                           batch=bool(getattr(self.provider, "batch", False)),
                           max_hold=self.retry_policy.max_retry_after)
        self._scheduler = Scheduler(
            self.provider, self.journal, max_concurrency=max_concurrency,
            max_requests=max_requests, retry=self.retry_policy, meter=self.meter,
            log_prompts=log_prompts, ledger_patience=ledger_patience, hooks=tuple(hooks),
        )
        self._scheduler.on_end = self._count_end
        # journal_bodies=False: results go only to the caller; the journal keeps no bodies.
        self._scheduler.journal_bodies = journal_bodies
        self._scheduler.callbacks.on_done = on_done
        #: Checked answers, escalation ladders and hedges (asyncbg/_outcomes/).
        self._outcomes = Outcomes(self, escalate=escalate, hedge=hedge, fallbacks=fallbacks,
                                  spawn=lambda *a, **k: self._tg.start_soon(*a, **k)
                                  if self._tg is not None else None,
                                  callbacks=self._scheduler.callbacks)
        if on_done is not None:
            self._scheduler.callbacks.on_done = self._outcomes.users_only(on_done)
        #: Outbound webhooks (None without ``notify=``); see asyncbg/_notify/_notify.py.
        self.notify = notify
        self._sender: Sender | None = None
        if notify is not None:
            from ._notify.send import notifying  # aiohttp: imported when asked for

            self._sender = notifying(notify, self.journal, self._scheduler)
        self._inbox = WebhookInbox(self.provider, webhook_secret, self._scheduler.wake)
        #: Jobs by key: live ones (the scheduler holds them) and finished ones the caller holds.
        self._jobs: weakref.WeakValueDictionary[str, Job] = weakref.WeakValueDictionary()
        self._submitted = 0
        self._ended: Counter[str] = Counter()
        self._auto_key = itertools.count(1)
        self._state = _State.UNOPENED
        self._tg: TaskGroup | None = None
        #: What became of the responses created and not recorded when it last left ("" when
        #: none), and whether it says so itself (a fleet worker says it last, on its way out).
        self._unrecorded_said = ""
        self._say_unrecorded = True
        #: Those of them whose ids nothing could keep: a fleet worker records them itself if
        #: its ledger is back as it leaves.
        self._unkept: list[tuple[str, str]] = []
        #: Whether entering adopts what earlier processes kept in a shared ledger's rescue
        #: file (a fleet worker does so itself, at start and once a lease).
        self._adopt_kept = True

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> BackgroundManager:
        if self._state is not _State.UNOPENED:
            raise ManagerStateError("a BackgroundManager can be entered only once")
        if self.journal is not None:
            await self.journal.open()
            if self._adopt_kept and isinstance(self.journal, SharedLedger):
                try:
                    await _adopt_kept(self.journal)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self.journal.close()
                    raise
        # Prices load once per process, in a worker thread: no finished job stalls the loop.
        await preload_prices()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        tg.start_soon(self._scheduler.run, name="asyncbg scheduler")
        tg.start_soon(self._scheduler.callbacks.run, name="asyncbg callbacks")
        if self._sender is not None:
            tg.start_soon(self._sender.run, name="asyncbg notify")
        if isinstance(self.journal, SharedLedger):
            # A ledger shared by several processes: renew this one's leases in batches, and
            # stop running a job whose lease another process took over.
            tg.start_soon(keep_leases, self.journal, self._scheduler.drop,
                          self._scheduler.leases_renewed, name="asyncbg leases")
        self._tg = tg
        self._state = _State.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """The one way out: wait for the jobs (a normal exit), then, shielded, stop the tasks
        (creates in flight get ``exit_grace``), sweep or detach what is still live, close the
        provider and the ledger, and let the first error through as itself."""
        tg = self._tg
        assert tg is not None
        error = exc
        if error is None:
            try:
                await self._wait_for_everything()
            except BaseException as inner:  # noqa: BLE001 - raised below, after the sweep
                error = inner
        # An internal task that crashed cancelled the group before we did.
        crashed = tg.cancel_scope.cancel_called
        internal: BaseException | None = None
        stop: Stop | None = None
        unrecorded: list[tuple[str, str]] = []
        kept = ""
        self._state = _State.CLOSING
        try:
            self._scheduler.close(self.exit_grace)
            tg.cancel_scope.cancel()
            try:
                # Not shielded (the group was entered outside any shield), but it only waits
                # for the tasks to end: creates in flight are shielded up to ``exit_grace``.
                await tg.__aexit__(None, None, None)
            except anyio.get_cancelled_exc_class() as cancelled:
                error = error or cancelled  # the host is being cancelled: sweep, then go on
            except BaseException as raised:  # noqa: BLE001 - decided below
                internal = _collapse(raised) if isinstance(raised, BaseExceptionGroup) \
                    else raised
            if isinstance(internal, Stop):
                stop, internal = internal, None
            if error is not None or internal is not None or stop is not None:
                with anyio.CancelScope(shield=True):
                    unrecorded = await self._scheduler.shutdown(
                        cancel=self.cancel_on_exit and stop is None,
                        cancel_timeout=self.cancel_timeout)
                    kept = await self._keep_unrecorded(unrecorded)
                    await self._scheduler.callbacks.run_rest(self.cancel_timeout)
        finally:
            self._state = _State.CLOSED
            with anyio.CancelScope(shield=True):
                try:
                    if error is None and internal is None and stop is None:
                        # Every result is in the journal: a batch API's files may go.
                        await _delete_files(self.provider, self.cancel_timeout)
                    await self.provider.aclose()
                finally:
                    if self.journal is not None:
                        await self.journal.close()
        if stop is not None:
            failure = stop.error
            failure.unrecorded = unrecorded
            if unrecorded:
                failure.args = (f"{failure}; {kept}",)
            if error is None or (crashed and _cancelled(error)):
                raise failure from stop.error.__cause__
            _log.error("ledger.stopped", error=str(failure))
        if internal is not None and (error is None or (crashed and _cancelled(error))):
            raise internal
        if error is not None and exc is None:
            raise error  # the block ended normally but waiting for the jobs was cancelled
        return False

    async def _keep_unrecorded(self, unrecorded: list[tuple[str, str]]) -> str:
        """Responses the server created and the journal never took (it stayed unwritable):
        they are paid for and left running, so keep their ids where the next run on this
        journal finds them (an SQLite journal's ``.unrecorded`` file), or a shared ledger's
        next worker on this machine (see ``asyncbg._ledgers._rescue``). What became of them,
        in words ("" when there are none); said at warning level too."""
        if not unrecorded:
            return ""
        named = ", ".join(f"{key} ({rid})" for key, rid in unrecorded)
        text = (f"1 response created but not recorded is left running: {named}"
                if len(unrecorded) == 1 else
                f"{len(unrecorded)} responses created but not recorded are left running: {named}")
        keep = getattr(self.journal, "keep_unrecorded", None)
        fleet = isinstance(self.journal, SharedLedger)
        later = "a later worker" if fleet else "a rerun"
        if keep is None:
            self._unkept = list(unrecorded)
            text += f"; nothing could keep their ids, so {later} would create them again"
        else:
            try:
                where = await keep(unrecorded)
            except LedgerError as exc:
                self._unkept = list(unrecorded)
                text += (f"; their ids could not be kept ({exc}), so {later} would create "
                         "them again")
            else:
                ids = "1 response id" if len(unrecorded) == 1 else \
                    f"{len(unrecorded)} response ids"
                text += (f"; {ids} kept in {where}: the next asyncbg worker or "
                         "BackgroundManager on this ledger on this machine adopts them (records "
                         "them and polls them to their end)"
                         if fleet else f"; their ids are kept in {where}, and the next run on "
                         "this journal re-attaches to them")
        self._unrecorded_said = text
        if self._say_unrecorded:
            _log.warning("ledger.unrecorded", message=text)
        return text

    async def _wait_for_everything(self) -> None:
        """Leaving normally: every job terminal and its callbacks run (they may submit more),
        then the notifications delivered, for up to ``notify.wait_on_exit`` seconds."""
        while True:
            await self._outcomes.wait_idle()
            await self._scheduler.wait_idle()
            await self._scheduler.callbacks.wait_drained()
            if not self._scheduler.jobs_left() and not self._outcomes.ladders:
                break
        if self._sender is not None:
            await self._sender.finish()

    def _require_open(self) -> None:
        if self._state is not _State.OPENED:
            raise ManagerStateError(
                "the BackgroundManager is not open: use it inside `async with "
                "BackgroundManager(client) as mgr:`"
                if self._state is _State.UNOPENED
                else "the BackgroundManager has exited; submit jobs inside its `async with` block"
            )

    # -- submitting ------------------------------------------------------------------------

    async def submit(
        self, *, key: str | None = None, poll_policy: PollPolicy | None = None,
        deadline: float | None = None, text_format: type[Any] | None = None,
        validate: Callable[[Any], object] | None = None,
        escalate: Escalation | bool | None = None, hedge: Hedge | bool | None = None,
        **params: Any,
    ) -> Job:
        """Queue one ``responses.create(**params, background=True)`` and return its job at once.

        The response is created when one of the ``max_concurrency`` slots is free. ``key``
        names the job and must be unique within this manager; one is made up when not given.
        ``store=True`` is sent unless you set ``store``. ``poll_policy`` overrides the
        manager's for this job; ``deadline`` (seconds) cancels it on the server when it has
        not finished by then. With ``stream=True`` (or ``BackgroundManager(stream=True)``) the
        job runs as a background stream: ``job.events()`` and ``job.text`` show it as it
        arrives, a dropped connection resumes where it stopped, and a server that refuses
        background streams is polled instead.

        With a journal, a key already there is never created again: a finished job is served
        from the journal without a request, a live one resumes polling its response id, and a
        different request under the same key raises :class:`JournalMismatchError`.

        ``text_format`` (a pydantic model, as in the SDK's ``responses.parse``) asks for that
        JSON schema and makes ``await job.parsed()`` return an instance; ``validate(response)``
        raises to reject an answer. An answer that does not parse or validate leaves the job
        completed with the reason in ``job.invalid``. ``escalate`` (an
        :class:`~asyncbg.Escalation`) sends further attempts when one ends incomplete,
        invalid or failed; ``hedge`` (a :class:`~asyncbg.Hedge`) sends a copy of a job that
        runs long. Both default to the manager's; ``False`` turns them off for this job.
        """
        return await self.submit_request(params, key=key, poll_policy=poll_policy,
                                         deadline=deadline, text_format=text_format,
                                         validate=validate, escalate=escalate, hedge=hedge)

    async def submit_request(
        self, params: Mapping[str, Any], *, key: str | None = None,
        poll_policy: PollPolicy | None = None, deadline: float | None = None,
        text_format: type[Any] | None = None, validate: Callable[[Any], object] | None = None,
        escalate: Escalation | bool | None = None, hedge: Hedge | bool | None = None,
    ) -> Job:
        """:meth:`submit` with the request as one mapping, so that no request field (``key``,
        say) can collide with asyncbg's own keywords. Batch files use this."""
        return await self._submit_request(
            params, key=key, poll_policy=poll_policy, deadline=deadline,
            text_format=text_format, validate=validate, escalate=escalate, hedge=hedge)

    async def _submit_request(
        self, params: Mapping[str, Any], *, key: str | None = None,
        poll_policy: PollPolicy | None = None, deadline: float | None = None,
        text_format: type[Any] | None = None, validate: Callable[[Any], object] | None = None,
        escalate: Escalation | bool | None = None, hedge: Hedge | bool | None = None,
        stored: tuple[str, bytes] | None = None,
    ) -> Job:
        """:meth:`submit_request`; ``stored``: the ``(digest, canonical JSON)`` a shared ledger
        holds for ``key`` with ``params`` decoded from it (a fleet worker's job). When
        ``params`` are already what the provider sends (the ledger holds the prepared request,
        as :func:`~asyncbg._fleet.enqueue_requests` stores it), the claim compares that
        digest instead of encoding and hashing the request again."""
        self._require_open()
        if self._submitted % SUBMIT_SLICE == SUBMIT_SLICE - 1:
            # Without a journal a submit never waits: a loop submitting 100,000 jobs would hold
            # the event loop for seconds. Let the others run now and then (before anything is
            # queued, so that a cancellation here leaves nothing behind).
            await anyio.lowlevel.checkpoint()
        layered = self._outcomes.wanted(escalate=escalate, hedge=hedge,
                                        text_format=text_format, validate=validate)
        if layered is not None:
            return await self._outcomes.submit(
                params, key=key, escalate=layered[0], hedge=layered[1],
                text_format=text_format, validate=validate, poll_policy=poll_policy,
                deadline=deadline)
        if key is None:
            key = f"job-{next(self._auto_key)}"
            while key in self._jobs:
                key = f"job-{next(self._auto_key)}"
        elif key in self._jobs:
            raise DuplicateKeyError(f"key {key!r} was already submitted to this manager")
        prepared = self.provider.prepare(params, stream=self.stream)
        policy = poll_policy or self.poll_policy
        at = None if deadline is None else anyio.current_time() + deadline
        job = Job(self._scheduler, key)
        # Registered before the first await: a concurrent submit of the same key fails at once
        # instead of racing this one to the server.
        self._jobs[key] = job
        self._submitted += 1
        if self.journal is None:
            self._scheduler.add(job, prepared, policy, deadline=at)
            return job
        try:
            known = stored if stored is not None and prepared == params else None
            claim = await self._scheduler.claim(key, *(known or fingerprint(prepared)))
        except BaseException:
            del self._jobs[key]
            raise
        record = claim.record
        if claim.outcome is ClaimOutcome.MISMATCH:
            del self._jobs[key]
            raise JournalMismatchError(
                f"key {key!r} is already in the journal {self.journal.location} with a "
                "different request; give this request a new key, or use another journal"
            )
        if claim.outcome is ClaimOutcome.DONE:
            self._scheduler.serve(job, _answer_of(record))
            _log.info("job.restored", key=key, response_id=job.response_id,
                      status=job.status.value)
        elif claim.outcome is ClaimOutcome.RESUME:
            self._scheduler.add(job, prepared, policy, deadline=at,
                                response_id=record.response_id,
                                status=JobStatus.from_server(record.status))
            _log.info("job.reattached", key=key, response_id=record.response_id,
                      status=record.status)
        elif claim.outcome is ClaimOutcome.FOLLOW:
            # A shared ledger: another live process runs this key. Follow its record; take
            # the job over if that process's lease runs out (see asyncbg/_engine/_following.py).
            self._scheduler.follow(job, prepared, policy, deadline=at)
            _log.info("job.following", key=key, response_id=record.response_id,
                      status=record.status)
        else:
            resend = claim.outcome is ClaimOutcome.RESEND
            if resend:
                # Killed between sending the create and recording its id: the server may
                # hold a response we cannot find. Send again, and say so.
                self._scheduler.possible_duplicates += 1
                _log.warning("job.possible_duplicate", key=key,
                             reason="create sent but never recorded")
            self._scheduler.add(job, prepared, policy, deadline=at, resubmit=resend)
        return job

    async def attach(self, key: str, *, poll_policy: PollPolicy | None = None) -> Job:
        """Follow a job the journal recorded, without its request: a live one is polled, a
        finished one served. ``LookupError`` when nothing was sent for ``key``."""
        self._require_open()
        if key in self._jobs:
            return self._jobs[key]
        if self.journal is None:
            raise LookupError("attach() needs a journal")
        record = await self.journal.get(key)
        if record is None or record.state in ("new", "sending", "local"):
            raise LookupError(f"the journal {self.journal.location} has no response for key "
                              f"{key!r}")
        job = Job(self._scheduler, key)
        self._jobs[key] = job
        if record.state == "done":
            self._scheduler.serve(job, _answer_of(record))
        else:
            self._scheduler.add(job, None, poll_policy or self.poll_policy,
                                response_id=record.response_id,
                                status=JobStatus.from_server(record.status))
        return job

    @property
    def jobs(self) -> Sequence[Job]:
        """The jobs this manager still knows, in submission order: every live one, and every
        finished one the caller still holds (a finished job nobody holds is forgotten)."""
        return list(self._jobs.values())

    def forget(self, key: str) -> None:
        """Forget ``key``, so that it may be submitted again (fleet workers re-take keys). A job
        still running here is detached first, without any request (its lease went to another
        process)."""
        job = self._jobs.pop(key, None)
        if job is not None and not job.done:
            self._scheduler.drop(key)

    def _count_end(self, job: Job) -> None:
        if job.done:
            self._ended[job.status.value] += 1

    # -- waiting ---------------------------------------------------------------------------

    async def wait_any(self, jobs: Iterable[Job], *, timeout: float | None = None) -> Job:
        """The first of ``jobs`` to reach a terminal status (the earliest, if several have)."""
        return await _waiting.wait_any(jobs, timeout=timeout)

    async def wait_all(self, jobs: Iterable[Job], *, timeout: float | None = None) -> list[Job]:
        """Wait until every one of ``jobs`` is terminal; returns them in the order given."""
        return await _waiting.wait_all(jobs, timeout=timeout)

    def as_completed(
        self, jobs: Iterable[Job], *, timeout: float | None = None
    ) -> AsyncIterator[Job]:
        """Yield ``jobs`` in the order they reach a terminal status.

        ``timeout`` bounds the whole iteration: ``TimeoutError`` is raised when it runs out.
        """
        return _waiting.as_completed(jobs, timeout=timeout)

    # -- cancelling ------------------------------------------------------------------------

    async def cancel_all(self) -> None:
        """Cancel every job that is not yet terminal, and return once all of them are."""
        async with anyio.create_task_group() as tg:
            for job in list(self._jobs.values()):
                if not job.done:
                    tg.start_soon(job.cancel)

    # -- leaving ---------------------------------------------------------------------------

    def unrecorded(self) -> list[tuple[str, str]]:
        """Responses the server created that the journal has not taken (it cannot be written
        now), as ``(key, response_id)``: held, polled and their writes retried; left running
        and kept for the next run when the manager exits first."""
        return self._scheduler.unrecorded()

    def leave_now(self) -> None:
        """End the exit's grace now: the creates still out, and the writes of their answers,
        are given up at once instead of after ``exit_grace`` seconds (responses the journal
        has not taken are left running and kept as :meth:`unrecorded` says). Meant for a
        block that is being left (a second Ctrl-C); no create is sent after it. A journal
        locked by another program is not waited for any longer either (an SQLite journal's
        waits for its write lock end now)."""
        self._scheduler.close(0.0)
        give_up = getattr(self.journal, "give_up_waits", None)
        if give_up is not None:
            give_up(0.0)

    # -- pushes ----------------------------------------------------------------------------

    async def handle_webhook(self, body: bytes, headers: Mapping[str, str]) -> int:
        """Receive one OpenAI webhook delivery; returns the HTTP status to answer with.

        The delivery is verified with ``client.webhooks.unwrap`` (the secret comes from
        ``webhook_secret=``, the client, or ``OPENAI_WEBHOOK_SECRET``). A forged, stale or
        malformed one answers 400 and a replayed ``webhook-id`` 409; these are logged and
        change nothing. A terminal event for one of this manager's jobs makes that job fetch
        its final Response at once; an unknown response id is acknowledged and ignored.
        """
        return await self._inbox.handle(body, headers)

    # -- statistics ------------------------------------------------------------------------

    def statistics(self) -> ManagerStatistics:
        """A frozen snapshot of this manager's counters."""
        s = self._scheduler
        by_status = Counter(self._ended)
        for entry in s.entries():
            by_status[entry.job.status.value] += 1
        spend = self.meter.spend
        return ManagerStatistics(
            submitted=self._submitted,
            pending=by_status[JobStatus.PENDING.value],
            live=s.live,
            by_status=dict(by_status),
            # A batch provider counts the HTTP requests its API received (one per batch, not
            # one per job); the scheduler counts each job's steps.
            requests=_batch_requests(self.provider, s.requests),
            polls=s.polls,
            retries=s.retries,
            possible_duplicates=s.possible_duplicates,
            webhooks_accepted=self._inbox.accepted,
            webhooks_rejected=self._inbox.rejected,
            cost=spend.cost,
            input_tokens=spend.input_tokens,
            cached_input_tokens=spend.cached_input_tokens,
            output_tokens=spend.output_tokens,
            reasoning_tokens=spend.reasoning_tokens,
            rate_limited=self.meter.pacer.statistics().rate_limited,
            requests_in_flight=s.requests_limiter.total - s.requests_limiter.free,
            retrying=s.retrying,
            **self._outcomes.counters(),
            batch_reruns=int(getattr(self.provider, "reruns", 0)),
            **(self._sender.counters() if self._sender is not None else {}),
        )


def _batch_requests(provider: Provider, steps: int) -> int:
    """What a batch provider's API received, or the scheduler's count for any other."""
    counted = getattr(provider, "requests", None)
    return counted if isinstance(counted, int) and getattr(provider, "batch", False) else steps


async def _delete_files(provider: Provider, timeout: float) -> None:
    """A batch provider's files of batches whose results were all handed out (OpenAI's
    input, output and error files), deleted within ``timeout`` seconds; none for others."""
    delete = getattr(provider, "delete_files", None)
    if delete is not None:
        with anyio.move_on_after(timeout):
            await delete()


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())


def _collapse(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, or the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _adopt_kept(ledger: SharedLedger) -> None:
    """Record, fenced, the responses that processes on this machine created and could not
    record in ``ledger`` before they left (its rescue file, see ``asyncbg._ledgers._rescue``):
    the adopted become live rows, which this manager's claims of their keys resume instead of
    creating them again. A ledger that cannot be reached raises :class:`LedgerUnavailable`
    (a claim now would create them again); a file that cannot be read is said and left."""
    adoption = await adopt_said(ledger.adopt_kept, who="ledger")
    if adoption:  # every line decided: the file goes unless another process wrote meanwhile
        await anyio.to_thread.run_sync(ledger.rescue().release)
