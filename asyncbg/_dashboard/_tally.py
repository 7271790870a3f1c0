"""What the dashboard knows of a ledger between two full scans, kept up to date cheaply.

A full scan of a ledger of a million jobs takes seconds, so it can run neither before the first
page nor on every live update:

- Jobs by status are exact at every update when the ledger keeps counters
  (:meth:`Source.counts`: PostgreSQL ledgers, and SQLite journals written by this version):
  a few dozen rows, read at the start and on every update.
- :meth:`Tally.start` reads what indexes say at once: how many jobs there are, the unfinished
  ones by status, and the window. Without counters, finished jobs are one number until the
  first full scan has sorted them by status.
- :meth:`Tally.scan` (:meth:`Source.aggregate`) runs in the background, first at once and then
  only after ``1 / share`` times what the last one cost has passed (2 % of the time by default;
  on a small ledger, every half second).
- :meth:`Tally.update`, every live update, costs bounded reads: the *window* (the first
  ``window`` jobs that reached the server and are unfinished, through the index of unfinished
  jobs), the jobs claimed since (through the index on ``seq``) and a primary-key lookup of the
  jobs that left the window. The difference between two windows says which jobs were sent,
  changed status or finished. What it cannot see (a job that went from waiting to finished
  between two updates, more live jobs than the window holds) is put right by the next scan.

Tokens and dollars come from the bodies of finished jobs: a scan of every body
(:meth:`Source.usage`, paced the same way, on its own task) plus the bodies of the jobs seen
finishing since that scan.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._spend._pricing import Price, PriceBook
from .._spend._tokens import Tokens, usage_tokens
from ._source import (
    LATENCY_EDGES,
    TERMINAL,
    Aggregate,
    Endpoint,
    Row,
    Source,
    Start,
    Worker,
    latency_bucket,
)

__all__ = ["Failure", "Pace", "Tally", "View"]

ORDER = ("pending", "queued", "in_progress", *TERMINAL)
_BUCKETS = len(LATENCY_EDGES) + 1


@dataclass(slots=True)
class Pace:
    """When a costly read may run again: after ``1 / share`` times its last cost has passed,
    and at most every ``floor`` seconds."""

    share: float
    floor: float
    clock: Callable[[], float] = time.monotonic
    last_start: float = -math.inf
    last_cost: float = 0.0

    def due(self) -> bool:
        wait = max(self.floor, self.last_cost / self.share)
        return self.clock() - self.last_start >= wait

    def ran(self, started: float) -> None:
        self.last_start = started
        self.last_cost = self.clock() - started


@dataclass(frozen=True, slots=True)
class Failure:
    """Failed jobs of one error code, with one of their messages."""

    code: str
    count: int
    message: str | None


@dataclass(frozen=True, slots=True)
class View:
    """Everything the page shows at one instant (what the templates render)."""

    location: str
    total: int
    by_status: Mapping[str, int]
    finished: int
    #: Finished jobs not yet sorted by status (until the first full scan has run).
    unsorted: int
    live: int
    per_minute: Sequence[int]  # finished jobs in each of the last 60 minutes, oldest first
    eta: float | None  # seconds
    input_tokens: int | None  # None: the first usage scan has not finished
    output_tokens: int | None
    cost: float | None
    budget: float | None
    rate_limited: int
    resubmits: int
    latency: Sequence[int]  # jobs by latency_bucket of submit-to-done
    seen: Sequence[int]  # jobs by latency_bucket of server-done-to-recorded
    live_rows: Sequence[Row]
    window_full: bool
    failures: Sequence[Failure]
    workers: Sequence[Worker]
    endpoints: Sequence[Endpoint]
    now: float
    error: str | None = None  # why the last update failed (the view is the one before)


@dataclass(slots=True)
class _Usage:
    tokens: dict[tuple[str | None, str | None], list[int]] = field(default_factory=dict)
    seen: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    as_of: float = math.inf  # bodies recorded after this are added one by one
    known: bool = False

    def add(self, model: str | None, tier: str | None, tokens: Tokens) -> None:
        group = self.tokens.setdefault((model, tier), [0, 0, 0, 0])
        group[0] += tokens.input
        group[1] += tokens.cached_input
        group[2] += tokens.output
        group[3] += tokens.reasoning


class Tally:
    """The dashboard's running picture of one ledger; see the module docstring."""

    def __init__(self, source: Source, *, window: int = 2000, share: float = 0.02,
                 floor: float = 0.5, budget: float | None = None,
                 prices: Mapping[str, Price] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.window_size = window
        self.budget = budget
        self._prices = PriceBook(prices)
        self._scan = Pace(share, floor, clock)
        self._usage_pace = Pace(share, max(floor, 5.0), clock)
        self._clock = clock
        self._counts: Counter[str] = Counter()
        self._minutes: Counter[int] = Counter()
        self._latency = [0] * _BUCKETS
        self._failures: dict[str, list[Any]] = {}
        self._resubmits = self._rate_limited = 0
        self._window: dict[str, Row] = {}
        self._max_seq = 0
        self._usage = _Usage()
        self._workers: list[Worker] = []
        self._endpoints: list[Endpoint] = []
        self._unsorted = 0
        self._generation = 0  # bumped by every full scan: an update begun before is dropped
        self._now = 0.0
        self._error: str | None = None
        self.scans = self.updates = 0  # how many full scans and cheap updates ran
        #: Jobs by status come from the ledger's counters (see the module docstring).
        self.exact = False

    # -- reading --------------------------------------------------------------------------------

    async def start(self) -> None:
        """The first picture, from indexes only (see the module docstring)."""
        self._now = await self.source.now()
        begun = await self.source.start(window=self.window_size)
        self._from_start(begun)
        await self._read_counts()
        await self._small_tables()

    async def update(self) -> None:
        """One live update from bounded reads: the window's difference and the jobs claimed
        since; then the workers and the notifications (small tables)."""
        generation = self._generation
        now = await self.source.now()
        rows, claimed, max_seq = await self.source.window(limit=self.window_size,
                                                          after=self._max_seq)
        seen = {r.key for r in rows}
        left = [key for key in self._window if key not in seen]
        gone = await self.source.rows(left) if left else []
        if generation == self._generation:  # no full scan landed meanwhile
            self._advance(rows, claimed, max_seq, gone)
        await self._read_counts()  # what the window's difference guessed, made exact
        self._now = now
        await self._small_tables()
        self._error = None
        self.updates += 1

    async def scan(self) -> bool:
        """The full scan, when it is due; True if it ran."""
        if not self._scan.due():
            return False
        started = self._clock()
        now = await self.source.now()
        self._rebuild(await self.source.aggregate(since=now - 3600, window=self.window_size))
        self._scan.ran(started)
        self.scans += 1
        return True

    async def _read_counts(self) -> None:
        counts = await self.source.counts()
        self.exact = counts is not None
        if counts is not None:
            self._counts = Counter(counts)
            self._unsorted = 0

    async def _small_tables(self) -> None:
        self._workers = list(await self.source.workers())
        self._endpoints = list(await self.source.endpoints())

    async def update_usage(self) -> bool:
        """The scan of every finished body, when it is due; True if it ran."""
        if not self._usage_pace.due():
            return False
        started = self._clock()
        rows, as_of = await self.source.usage()
        usage = _Usage(as_of=as_of, known=True)
        for row in rows:
            usage.tokens[(row.model, row.service_tier)] = [
                row.input_tokens, row.cached_tokens, row.output_tokens, row.reasoning_tokens]
            usage.seen = [a + b for a, b in zip(usage.seen, row.seen, strict=True)]
        self._usage = usage
        self._usage_pace.ran(started)
        return True

    def failed(self, exc: Exception) -> None:
        """An update could not read the ledger: say so on the page, keep the last view."""
        self._error = str(exc)

    # -- the view -------------------------------------------------------------------------------

    def view(self) -> View:
        # A count the window's guesses took below zero waits for the next scan at zero.
        counts = {name: n for name in ORDER if (n := self._counts[name]) > 0}
        for name in sorted(set(self._counts) - set(ORDER)):
            if self._counts[name] > 0:
                counts[name] = self._counts[name]
        unsorted = max(0, self._unsorted)
        total = sum(counts.values()) + unsorted
        finished = sum(counts.get(name, 0) for name in TERMINAL) + unsorted
        now_minute = int(self._now // 60)
        per_minute = [self._minutes.get(now_minute - 59 + i, 0) for i in range(60)]
        recent = sum(per_minute[-10:])
        eta = (total - finished) / (recent / 600) if recent and total > finished else None
        tokens = self._usage.tokens.values()
        known = self._usage.known
        failures = sorted((Failure(code, n, msg) for code, (n, msg) in self._failures.items()
                           if n > 0), key=lambda f: (-f.count, f.code))
        live_rows = sorted(self._window.values(), key=lambda r: r.seq)
        workers = [Worker(w.owner, w.host, w.pid, w.started, w.seen, w.lease,
                          held=sum(r.owner == w.owner for r in live_rows))
                   for w in self._workers]
        return View(
            location=self.source.location, total=total, by_status=counts, finished=finished,
            unsorted=unsorted,
            live=counts.get("queued", 0) + counts.get("in_progress", 0),
            per_minute=per_minute, eta=eta,
            input_tokens=sum(t[0] for t in tokens) if known else None,
            output_tokens=sum(t[2] for t in tokens) if known else None,
            cost=self._cost() if known else None, budget=self.budget,
            rate_limited=self._rate_limited, resubmits=self._resubmits,
            latency=tuple(self._latency), seen=tuple(self._usage.seen),
            live_rows=live_rows, window_full=len(live_rows) >= self.window_size,
            failures=failures, workers=workers, endpoints=list(self._endpoints),
            now=self._now, error=self._error)

    def _cost(self) -> float | None:
        total, priced = 0.0, False
        for (model, tier), (inp, cached, out, reasoning) in self._usage.tokens.items():
            if model is None:
                continue
            dollars = self._prices.cost(model, Tokens(inp, cached, out, reasoning),
                                        service_tier=tier)
            if dollars is not None:
                total, priced = total + dollars, True
        return total if priced else None

    # -- the bookkeeping ------------------------------------------------------------------------

    def _from_start(self, begun: Start) -> None:
        self._counts = Counter({s: n for s, n in begun.unfinished.items() if n})
        self._unsorted = begun.total - sum(begun.unfinished.values())
        self._window = {r.key: r for r in begun.window}
        self._max_seq = begun.max_seq

    def _rebuild(self, scan: Aggregate) -> None:
        self._generation += 1
        self._unsorted = 0
        self._counts = Counter()
        self._minutes = Counter()
        self._latency = [0] * _BUCKETS
        self._failures = {}
        self._resubmits = self._rate_limited = 0
        for row in scan.rows:
            self._counts[row.status] += row.count
            self._resubmits += int(row.resubmits or 0)
            self._rate_limited += int(row.rate_limited or 0)
            if row.minute is not None:
                self._minutes[int(row.minute)] += row.count
            if row.bucket is not None:
                self._latency[int(row.bucket)] += row.count
            if row.error_code is not None:
                self._fail(row.error_code, row.count, row.sample_error)
        self._window = {r.key: r for r in scan.window}
        self._max_seq = scan.max_seq

    def _advance(self, rows: Sequence[Row], claimed: int, max_seq: int,
                 gone: Sequence[Row]) -> None:
        self._counts["pending"] += claimed  # claimed since: they wait
        self._max_seq = max(self._max_seq, max_seq)
        before, now = self._window, {r.key: r for r in rows}
        # A full window hid the jobs after it: one of those moving into view was counted under
        # its status already (the scan, or the start, saw it), not as waiting.
        hidden_after = (max(r.seq for r in before.values())
                        if len(before) >= self.window_size else math.inf)
        for key, row in now.items():
            old = before.get(key)
            if old is not None:
                self._move(old.status, row.status)
            elif row.seq <= hidden_after:
                self._move("pending", row.status)
        for row in gone:
            if row.key not in before:
                continue
            self._move(before[row.key].status, row.status)
            if row.state in ("done", "local"):
                self._finished(row)
            else:  # back to waiting (a fleet requeued it): the window will see it again
                self._move(row.status, "pending")
        self._window = now

    def _move(self, old: str, new: str) -> None:
        if old != new:
            self._counts[old] -= 1
            self._counts[new] += 1

    def _finished(self, row: Row) -> None:
        if row.updated >= self._now - 3600:
            self._minutes[int(row.updated // 60)] += 1
        self._latency[latency_bucket(row.updated - row.created)] += 1
        if row.http_status == 429:
            self._rate_limited += 1
        if row.status == "failed" or row.state == "local":
            self._fail(row.error_code or "unknown", 1, row.error)
        if row.body is not None and row.updated > self._usage.as_of:
            self._add_usage(row)

    def _fail(self, code: str, count: int, message: str | None) -> None:
        entry = self._failures.setdefault(code, [0, None])
        entry[0] += count
        entry[1] = message or entry[1]

    def _add_usage(self, row: Row) -> None:
        try:
            body = json.loads(row.body or b"")
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        usage = body.get("usage")
        if isinstance(usage, dict):
            self._usage.add(body.get("model"), body.get("service_tier"), usage_tokens(usage))
        done_at = body.get("completed_at")
        if isinstance(done_at, int | float):
            self._usage.seen[latency_bucket(row.updated - done_at)] += 1
