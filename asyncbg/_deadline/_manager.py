"""DeadlineManager: every line the cheapest way that is expected to finish by a deadline.

Three :class:`~asyncbg.BackgroundManager` share one journal, one per way: background
responses, flex ones (``service_tier="flex"``) and the OpenAI Batch API. Each
line starts on the way :class:`~asyncbg.DeadlinePolicy` picks for the time left; one task looks
at the clock every ``policy.check_every`` seconds and moves the lines that must move.

A move never pays twice. It first claims the faster way's key in the journal without sending
anything (a marker: a rerun that finds it finishes the move), then cancels the line on its way:
a flex response is cancelled on the server; a batch is cancelled as a whole (all its lines move
together) and its lines are followed until the server says how each ended. Only a line that
ended without running (cancelled, expired, no result) is sent on the faster way; one that
finished first keeps its result and is never sent again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import _log
from .._engine._job import Job
from .._errors import AsyncbgError, DuplicateKeyError, ManagerStateError
from .._http import RequestError
from .._ledgers import Ledger, LedgerError, MemoryLedger, Record, fingerprint, open_ledger
from .._manager import BackgroundManager
from .._policies import PollPolicy
from .._providers._kinds import batch_of
from .._spend._pricing import Price
from .._status import JobStatus
from ._costs import WayCosts
from ._journal import latest, not_run, way_key, way_params
from ._policy import ORDER, DeadlinePolicy, Way

__all__ = ["DeadlineLine", "DeadlineManager", "DeadlineStatistics"]

#: Error codes of a batch request its batch never ran (it expired, or lost the result): the
#: line moves on to a faster way, as after a move's cancel.
_EXPIRED = frozenset({"batch_expired", "expired", "result_missing"})
#: Jobs a batch manager keeps in flight: the server runs the batches, this only bounds memory.
BATCH_CONCURRENCY = 10_000


@dataclass(frozen=True, slots=True)
class DeadlineStatistics:
    """A snapshot of a :class:`DeadlineManager`: where lines ended and what each way cost."""

    #: Lines that ended, by the way they ended on (``"batch"``, ``"flex"``, ``"background"``).
    lines: dict[str, int]
    #: US dollars paid on each way (moved-from jobs included).
    dollars: dict[str, float]
    #: The same lines' answers priced as background responses: the run all at full price.
    full_price: float
    #: Lines moved to a faster way.
    moved: int
    flex_kept_pace: bool
    #: HTTP requests, polls and retries of both managers; jobs live on the server.
    requests: int
    polls: int
    retries: int
    live: int

    @property
    def cost(self) -> float:
        return sum(self.dollars.values())


class DeadlineLine:
    """One line of a :class:`DeadlineManager`: the job that runs it now, on the way it is on.

    ``job`` changes when the line moves; ``await line.wait()`` returns its final job.
    """

    __slots__ = ("_final", "accepted", "cancelled", "job", "key", "moves", "moving", "params",
                 "started", "way")

    def __init__(self, key: str, params: Mapping[str, Any]) -> None:
        self.key = key
        self.params = dict(params)
        self.way: Way | None = None
        self.job: Job | None = None
        #: (from, to) for every move, in order.
        self.moves: list[tuple[Way, Way]] = []
        #: The way a move in progress goes to (the line is being cancelled on its own).
        self.moving: Way | None = None
        self.cancelled = False
        self.started = math.nan
        #: When a look first saw the current job accepted by the server (None: not yet).
        self.accepted: float | None = None
        self._final = anyio.Event()

    @property
    def done(self) -> bool:
        """Whether the line has its outcome (no move is coming)."""
        return self._final.is_set()

    @property
    def status(self) -> JobStatus:
        return self.job.status if self.job is not None else JobStatus.PENDING

    @property
    def error(self) -> str | None:
        return self.job.error if self.job is not None else None

    @property
    def error_code(self) -> str | None:
        return self.job.error_code if self.job is not None else None

    @property
    def response_id(self) -> str | None:
        return self.job.response_id if self.job is not None else None

    async def wait(self, timeout: float | None = None) -> Job:
        """Wait for the line's outcome; its final job. ``TimeoutError`` leaves it running."""
        with anyio.fail_after(timeout):
            await self._final.wait()
        assert self.job is not None
        return self.job

    async def cancel(self) -> None:
        """Cancel the line where it runs (no move follows) and return once it has ended."""
        self.cancelled = True
        if self.job is not None:
            await self.job.cancel()

    def __repr__(self) -> str:
        way = self.way.value if self.way is not None else "-"
        return f"<DeadlineLine {self.key!r} {way} {self.status.value}>"


class DeadlineManager:
    """Runs each line the cheapest way expected to finish ``by`` a deadline (OpenAI).

    ``by`` is a ``datetime`` with a time zone, or a Unix time on ``clock`` (``time.time`` by
    default; inject another to control time in tests). ``deadline_mode="cheapest"`` is the
    only mode: a batch (half price) when the time left allows the batch window, flex (about half
    price) while flex keeps its pace, background (full price) otherwise; a line still unfinished
    moves to a faster way when the time left no longer allows the slower one (see
    :class:`~asyncbg.DeadlinePolicy`), cancelled on the first before it is sent on the second.

    ``journal`` (a path or a :class:`~asyncbg.Ledger`; in memory when None) records each line
    under one key per way (``<key>@batch``, ``<key>@flex``, ``<key>@background``): a rerun
    with the same journal continues every line where it stands, creating nothing twice.
    ``ways`` restricts the slower ways (``("flex",)``: no batch; background is always
    allowed). Other keyword arguments (``poll_policy``, ``retry_policy``, ``rate_limit``...)
    go to the :class:`~asyncbg.BackgroundManager` of background responses and to that of flex
    ones (each has its own: ``rate_limit`` caps each of them); ``batch_poll_policy``,
    ``max_batch_size`` and ``batch_delay`` shape the batches.
    """

    def __init__(
        self,
        client: Any,
        *,
        by: float | datetime,
        deadline_mode: str = "cheapest",
        journal: str | Ledger | None = None,
        policy: DeadlinePolicy | None = None,
        ways: Iterable[Way | str] | None = None,
        max_concurrency: int = 16,
        max_batch_size: int = 1000,
        batch_delay: float = 2.0,
        batch_poll_policy: PollPolicy | None = None,
        prices: Mapping[str, Price] | None = None,
        cancel_on_exit: bool = True,
        on_done: Callable[[DeadlineLine], object] | None = None,
        clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        import openai

        if not isinstance(client, openai.AsyncOpenAI):
            raise TypeError("DeadlineManager runs lines on OpenAI's Batch API, flex and "
                            f"background responses: it needs an openai.AsyncOpenAI, not "
                            f"{type(client).__name__}")
        if deadline_mode != "cheapest":
            raise ValueError(f"deadline_mode must be 'cheapest', got {deadline_mode!r}")
        if isinstance(by, datetime):
            if by.tzinfo is None:
                raise ValueError("by= needs a datetime with a time zone (or a Unix time)")
            by = by.timestamp()
        if not math.isfinite(by):
            raise ValueError(f"by= must be a finite time, got {by!r}")
        self.by = float(by)
        self.policy = policy or DeadlinePolicy()
        # Background is always there: the last resort when nothing slower fits.
        self.ways = frozenset(Way(w) for w in (ways if ways is not None else ORDER)) | {
            Way.BACKGROUND}
        self.clock = clock
        self.on_done = on_done
        ledger = journal if isinstance(journal, Ledger) else (
            MemoryLedger() if journal is None else open_ledger(journal))
        self.journal: Ledger = ledger
        self.costs = WayCosts.with_prices(prices)
        self.flex_kept_pace = True
        self.moved = 0
        from .._providers import OpenAIBatch

        def responses() -> BackgroundManager:
            return BackgroundManager(client, journal=ledger, prices=prices,
                                     max_concurrency=max_concurrency,
                                     cancel_on_exit=cancel_on_exit, **options)

        # Always there, even without the batch way: a rerun may find lines live on a batch.
        self._batch_api = OpenAIBatch(client, max_batch_size=max_batch_size,
                                      batch_delay=batch_delay)
        batches = BackgroundManager(
            self._batch_api, journal=ledger, prices=prices, cancel_on_exit=cancel_on_exit,
            max_concurrency=BATCH_CONCURRENCY,
            poll_policy=batch_poll_policy or options.get("poll_policy"),
            retry_policy=options.get("retry_policy"))
        #: One manager per way, fastest first (each outlives the slower ones, whose lines move
        #: to it). Flex has its own: a 429 for want of flex capacity holds back that manager's
        #: creates, and must not hold back the background lines that are the urgent ones.
        self._by_way: dict[Way, BackgroundManager] = {
            Way.BACKGROUND: responses(), Way.FLEX: responses(), Way.BATCH: batches}
        self._lines: dict[str, DeadlineLine] = {}
        #: Batches this manager has cancelled for a move.
        self._cancelled_batches: set[str] = set()
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> DeadlineManager:
        if self._stack is not None:
            raise ManagerStateError("a DeadlineManager can be entered only once")
        stack = AsyncExitStack()
        try:
            for mgr in self._by_way.values():  # background first: it exits last
                await stack.enter_async_context(mgr)
            tg = anyio.create_task_group()
            await tg.__aenter__()
        except BaseException as exc:
            if not await stack.__aexit__(type(exc), exc, exc.__traceback__):
                raise
            raise  # pragma: no cover - the managers never swallow an error
        tg.start_soon(self._watch, name="asyncbg deadline")
        self._stack, self._tg = stack, tg
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        """Leaving normally waits for every line's outcome (moves included), then both
        managers exit as a :class:`~asyncbg.BackgroundManager` does: an error in the block
        comes out as itself, after their cancel sweep (or detach)."""
        stack, tg = self._stack, self._tg
        assert stack is not None and tg is not None
        error = exc
        if error is None:
            try:
                for line in list(self._lines.values()):
                    await line.wait()
            except BaseException as inner:  # noqa: BLE001 - handed to the managers' exit
                error = inner
        # The watcher and the moves in flight stop first; their task group holds no error.
        tg.cancel_scope.cancel()
        self._tg = None
        await tg.__aexit__(None, None, None)
        if error is None:
            return await stack.__aexit__(None, None, None)
        if await stack.__aexit__(type(error), error, error.__traceback__):
            return True
        if error is not exc:
            raise error  # the block ended normally, but waiting for the lines did not
        return False

    def _require_open(self) -> None:
        if self._tg is None:
            raise ManagerStateError("the DeadlineManager is not open: use it inside `async "
                                    "with DeadlineManager(client, by=...) as dm:`")

    # -- submitting ------------------------------------------------------------------------

    async def submit(self, *, key: str, **params: Any) -> DeadlineLine:
        """:meth:`submit_request` with the request as keyword arguments."""
        return await self.submit_request(params, key=key)

    async def submit_request(self, params: Mapping[str, Any], *, key: str) -> DeadlineLine:
        """Run one ``responses.create`` request by the deadline; its :class:`DeadlineLine` at once.

        With a journal that knows ``key``, the line continues where it stands: a live job is
        followed, a finished one served, a move cut short finished, and nothing is created
        twice. A different request under a key already sent raises
        :class:`~asyncbg.JournalMismatchError`.
        """
        self._require_open()
        if key in self._lines:
            raise DuplicateKeyError(f"key {key!r} was already submitted to this manager")
        line = self._lines[key] = DeadlineLine(key, params)
        try:
            way, moving = await self._where(line)
            await self._send(line, way)
        except BaseException:
            del self._lines[key]
            raise
        line.moving = moving
        if moving is not None:  # a rerun found a move begun: finish it
            self._start_moves([line], moving)
        return line

    def forget(self, key: str) -> None:
        """Forget a line that has its outcome (a long run need not keep them all)."""
        line = self._lines.get(key)
        if line is not None and line.done:
            del self._lines[key]
            for way in ORDER:
                self._managers(way).forget(way_key(key, way))

    async def cancel_all(self) -> None:
        """Cancel every line that has no outcome yet, where it runs (no move follows)."""
        async with anyio.create_task_group() as tg:
            for line in list(self._lines.values()):
                if not line.done:
                    tg.start_soon(line.cancel)

    @property
    def lines(self) -> list[DeadlineLine]:
        return list(self._lines.values())

    def time_left(self) -> float:
        return self.by - self.clock()

    def _ways_now(self) -> frozenset[Way]:
        return self.ways if self.flex_kept_pace else self.ways - {Way.FLEX}

    def _managers(self, way: Way) -> BackgroundManager:
        return self._by_way[way]

    async def _where(self, line: DeadlineLine) -> tuple[Way, Way | None]:
        """The way to send ``line`` on now, and the way a move begun by an earlier run goes
        to (None: no move), from what the journal holds for it."""
        found: dict[Way, Record] = {}
        for way in ORDER:
            record = await self.journal.get(way_key(line.key, way))
            if record is not None:
                found[way] = record
        sent = latest(r for r in found.values() if r.state != "new")
        if not sent:  # nothing was sent (a claim without a create is no move): choose now
            return self.policy.start(self.time_left(), self._ways_now()), None
        way, record = sent[line.key]
        # A key claimed and never sent on a faster way: the marker of a move begun.
        marker = next((w for w in reversed(ORDER) if w in found and found[w].state == "new"),
                      None)
        if marker is not None and ORDER.index(marker) <= ORDER.index(way):
            marker = None  # claimed before this way ran: not a move of it
        if not record.terminal:
            return way, marker  # live (or its create may have left): follow it first
        if not_run(record.status, record.error_code) and (
                marker is not None or record.error_code in _EXPIRED):
            return marker or self.policy.start(self.time_left(), self._ways_now(),
                                               after=way), None
        return way, None  # its outcome: served from the journal

    async def _send(self, line: DeadlineLine, way: Way) -> None:
        mgr = self._managers(way)
        job = await mgr.submit_request(way_params(line.params, way), key=way_key(line.key, way))
        line.way, line.job, line.started, line.accepted = way, job, self.clock(), None
        job.add_done_callback(lambda job: self._ended(line, job))

    async def _ended(self, line: DeadlineLine, job: Job) -> None:
        """A line's job ended: move the line on, or give it its outcome."""
        if job is not line.job or line.way is None:
            return
        way = line.way
        model = str(line.params.get("model") or "") or None
        self.costs.paid(way, job.body, model)
        if way is Way.FLEX and line.accepted is not None and (
                self.clock() - line.accepted > self.policy.flex_needs):
            self._flex_lost_pace(line)
        target = line.moving
        if target is None and way is Way.BATCH and (
                job.error_code in _EXPIRED
                or batch_of(job.response_id) in self._cancelled_batches):
            # Expired, or in a batch a move cancelled before this line had its id there.
            target = self.policy.start(self.time_left(), self._ways_now(), after=way)
        line.moving = None
        if target is not None and not line.cancelled and not_run(job.status, job.error_code):
            try:
                await self._mark(line, target)
                await self._send(line, target)
            except AsyncbgError as exc:  # the journal: the line keeps its outcome
                _log.error("deadline.move_failed", key=line.key, to=target.value,
                           error=str(exc))
            else:
                line.moves.append((way, target))
                self.moved += 1
                _log.info("deadline.moved", key=line.key, moved_from=way.value,
                          to=target.value, time_left=round(self.time_left(), 3))
                return
        self.costs.ended(way, job.body, model)
        line._final.set()
        if self.on_done is not None:
            result = self.on_done(line)
            if hasattr(result, "__await__"):
                await result

    # -- moving ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            self._look()
            await anyio.sleep(self.policy.check_every)

    def _look(self) -> None:
        """Start the moves the time left calls for."""
        now = self.clock()
        left = self.by - now
        self._pace(now)
        ways = self._ways_now()
        due: dict[tuple[Way, str | None], list[DeadlineLine]] = {}
        for line in self._lines.values():
            job = line.job
            if (line.way is None or job is None or job.done or line.moving is not None
                    or line.cancelled or not self.policy.must_move(line.way, left, ways)):
                continue
            batch_id = None
            if line.way is Way.BATCH:
                batch_id = batch_of(job.response_id)
                if batch_id is None:
                    continue  # its batch is being sent: it has an id at the next look
            due.setdefault((line.way, batch_id), []).append(line)
        for (way, _), lines in due.items():
            self._start_moves(lines, self.policy.start(left, ways, after=way))

    def _start_moves(self, lines: list[DeadlineLine], target: Way) -> None:
        for line in lines:
            line.moving = target
        assert self._tg is not None
        self._tg.start_soon(self._move, lines, target)

    async def _move(self, lines: list[DeadlineLine], target: Way) -> None:
        """Mark the move in the journal, then cancel ``lines`` where they run (a batch as a
        whole): each is sent on ``target`` when its job has ended without running."""
        try:
            for line in lines:
                await self._mark(line, target)
            job = lines[0].job
            assert job is not None
            batch_id = batch_of(job.response_id)
            if lines[0].way is Way.BATCH and batch_id is not None:
                # Its requests not run end cancelled, those done keep their results: the jobs'
                # own polls bring each one's ending (and _ended moves it on). Lines of it
                # re-attached one by one after it was cancelled need no second request.
                if batch_id in self._cancelled_batches:
                    return
                self._cancelled_batches.add(batch_id)  # before: its lines may end at once
                try:
                    await self._batch_api.cancel_batch(batch_id)
                except BaseException:
                    self._cancelled_batches.discard(batch_id)
                    raise
                _log.info("deadline.batch_cancelled", batch_id=batch_id, lines=len(lines),
                          to=target.value)
            else:
                assert self._tg is not None
                for line in lines:  # at once: each cancel returns when its job has ended
                    if line.job is not None:
                        self._tg.start_soon(line.job.cancel)
        except (RequestError, LedgerError) as exc:
            # Nothing moved: the next look tries again (a marker already written is harmless:
            # it was never sent, and the move it names is the one being retried).
            _log.warning("deadline.move_deferred", keys=[ln.key for ln in lines][:5],
                         to=target.value, error=str(exc))
            for line in lines:
                if line.job is not None and not line.job.done:
                    line.moving = None

    async def _mark(self, line: DeadlineLine, target: Way) -> None:
        """Claim ``line``'s key on ``target`` in the journal, sending nothing."""
        mgr = self._managers(target)
        prepared = mgr.provider.prepare(way_params(line.params, target), stream=mgr.stream)
        await self.journal.claim(way_key(line.key, target), *fingerprint(prepared))

    def _pace(self, now: float) -> None:
        """Whether flex keeps its pace: no flex line has run longer than flex needs, counted
        from when the server accepted it (first seen with its id at a look), or from its
        submit while it waits with a free slot (flex's 429s: no capacity). A line waiting for
        one of this manager's own slots is not flex being slow."""
        flex = self._by_way[Way.FLEX]
        slots_free = flex.statistics().live < flex.max_concurrency
        for line in self._lines.values():
            job = line.job
            if line.way is not Way.FLEX or job is None or job.done:
                continue
            if job.response_id is None:
                since = line.started if slots_free else now
            else:
                if line.accepted is None:
                    line.accepted = now
                since = line.accepted
            if now - since > self.policy.flex_needs:
                self._flex_lost_pace(line)

    def _flex_lost_pace(self, line: DeadlineLine) -> None:
        if self.flex_kept_pace:
            self.flex_kept_pace = False
            _log.warning("deadline.flex_slow", key=line.key, needs=self.policy.flex_needs,
                         reason="a flex response ran longer than flex needs: new lines skip "
                                "flex")

    # -- statistics ------------------------------------------------------------------------

    def statistics(self) -> DeadlineStatistics:
        each = [mgr.statistics() for mgr in self._by_way.values()]
        c = self.costs
        return DeadlineStatistics(
            lines={w.value: n for w, n in c.lines.items()},
            dollars={w.value: d for w, d in c.dollars.items()},
            full_price=c.full_price, moved=self.moved, flex_kept_pace=self.flex_kept_pace,
            requests=sum(m.requests for m in each), polls=sum(m.polls for m in each),
            retries=sum(m.retries for m in each), live=sum(m.live for m in each))
