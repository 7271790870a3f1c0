"""What the dashboard reads from a ledger, whatever kind it is: the ``Source`` seam.

One implementation per ledger kind keeps its SQL in one module (:mod:`._sqlite_source`,
:mod:`._pg_source`). Every call is a read on a connection of the dashboard's own (SQLite:
``mode=ro``; PostgreSQL: a small pool with a short statement timeout), so the runs and workers
writing the ledger never wait for it.

Two kinds of read, so that a big ledger costs a bounded amount per live update:

- :meth:`Source.start`, :meth:`Source.window` and :meth:`Source.rows` read indexes only: the
  index of unfinished jobs (with a ``LIMIT`` for the window), the one on ``seq`` (jobs claimed
  since) and primary-key lookups. ``start`` runs once, ``window`` and ``rows`` on every update.
- :meth:`Source.counts` reads the jobs per status from counters the ledger keeps exact with
  triggers (PostgreSQL's ``asyncbg_counts``, an SQLite journal's ``job_counts``): a few dozen
  rows however many jobs there are, read on every update. A ledger without them (an SQLite
  journal no asyncbg of this version has written to yet) says None.
- :meth:`Source.aggregate` and :meth:`Source.usage` scan every job. :class:`~._tally.Tally`
  runs them in the background, at most a fixed share of the time (see there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .._ledgers._shared import WorkerInfo as Worker

__all__ = [
    "LATENCY_EDGES",
    "TERMINAL",
    "Aggregate",
    "AggregateRow",
    "Detail",
    "Endpoint",
    "Row",
    "Source",
    "Start",
    "UsageRow",
    "Worker",
    "from_counters",
    "latency_bucket",
    "row_of",
    "usage_rows",
    "worker_of",
]

TERMINAL = ("completed", "failed", "cancelled", "incomplete")

#: Upper edges (seconds) of the latency histograms' buckets; the last one is open.
LATENCY_EDGES: tuple[float, ...] = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of a duration: the index of the first edge it is below."""
    for index, edge in enumerate(LATENCY_EDGES):
        if seconds < edge:
            return index
    return len(LATENCY_EDGES)


def bucket_sql(expr: str) -> str:
    """:func:`latency_bucket` as an SQL ``CASE`` (the same in SQLite and PostgreSQL)."""
    arms = " ".join(f"WHEN {expr} < {edge} THEN {i}" for i, edge in enumerate(LATENCY_EDGES))
    return f"CASE {arms} ELSE {len(LATENCY_EDGES)} END"


@dataclass(frozen=True, slots=True)
class Row:
    """One job, as the live table and the tally need it (no request, no body)."""

    key: str
    seq: int
    state: str
    status: str
    response_id: str | None
    error_code: str | None
    error: str | None
    http_status: int | None
    created: float
    updated: float
    owner: str | None
    #: The final body, only when asked for (a finished job's usage and timing).
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class AggregateRow:
    """One group of the full scan: jobs by status and state, finished minute, latency."""

    status: str
    state: str
    #: The minute (``updated // 60``) a job finished, for jobs finished in the last hour.
    minute: int | None
    #: :func:`latency_bucket` of submit-to-done, for finished jobs.
    bucket: int | None
    #: The error code of a failed job (``failed``, or ended locally), else None.
    error_code: str | None
    count: int
    resubmits: int
    rate_limited: int  # jobs whose last answer was a 429
    sample_error: str | None


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The full scan, with the window of unfinished jobs read in the same snapshot."""

    rows: Sequence[AggregateRow]
    window: Sequence[Row]
    max_seq: int
    #: The ledger's clock at the snapshot (its newest ``updated``), for usage increments.
    as_of: float


@dataclass(frozen=True, slots=True)
class Start:
    """What indexes alone say at once: how many jobs, the unfinished ones by status, and the
    window (see :meth:`Source.window`), in one snapshot."""

    total: int
    unfinished: Mapping[str, int]
    window: Sequence[Row]
    max_seq: int


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Tokens of finished jobs of one model and service tier, and terminal-to-seen delays."""

    model: str | None
    service_tier: str | None
    jobs: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    #: Jobs by :func:`latency_bucket` of the time between the server finishing a response
    #: (its ``completed_at``) and asyncbg recording it.
    seen: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The notifications waiting for one receiver."""

    url: str
    pending: int
    failed: int
    last_error: str | None
    last_status: int | None


@dataclass(frozen=True, slots=True)
class Detail:
    """Everything the job page shows of one key."""

    row: Row
    request: bytes
    resubmits: int
    #: (status, at) of every change the ledger recorded, oldest first (SQLite journals only).
    history: Sequence[tuple[str, float]]


def row_of(values: Sequence[Any], body: bytes | None = None) -> Row:
    """A :class:`Row` from the columns ``key, seq, state, status, response_id, error_code,
    error, http_status, created, updated, owner`` (the order both backends select)."""
    (key, seq, state, status, response_id, error_code, error, http_status, created, updated,
     owner) = values[:11]
    return Row(key, int(seq), state, status, response_id, error_code, error, http_status,
               float(created), float(updated), owner, body=body)


def from_counters(rows: Iterable[Sequence[Any]]) -> tuple[int, dict[str, int]]:
    """Every job, and the unfinished ones by status, from counter rows ``state, status, n``."""
    total, unfinished = 0, dict[str, int]()
    for state, status, n in rows:
        total += int(n)
        if state in ("new", "sending", "live"):
            unfinished[status] = unfinished.get(status, 0) + int(n)
    return total, unfinished


def worker_of(values: Sequence[Any]) -> Worker:
    """A :class:`Worker` from ``owner, host, pid, started, seen, lease``; ``held`` is filled
    in from the live window."""
    owner, host, pid, started, seen, lease = values
    return Worker(owner, host, int(pid), float(started), float(seen), float(lease), held=0)


def usage_rows(groups: Iterable[Sequence[Any]]) -> list[UsageRow]:
    """Rows of ``model, service_tier, jobs, input, cached, output, reasoning, seen_bucket``
    (the usage scan of either backend) summed by model and tier."""
    sums: dict[tuple[Any, Any], list[int]] = {}
    seen: dict[tuple[Any, Any], list[int]] = {}
    for model, tier, jobs, *tokens, bucket in groups:
        name = (model, tier)
        total = sums.setdefault(name, [0] * 5)
        for i, value in enumerate((jobs, *tokens)):
            total[i] += int(value or 0)
        buckets = seen.setdefault(name, [0] * (len(LATENCY_EDGES) + 1))
        if bucket is not None:  # the body says when the server finished it
            buckets[int(bucket)] += int(jobs)
    return [UsageRow(m, t, jobs, inp, cached, out, reasoning, seen=tuple(seen[(m, t)]))
            for (m, t), (jobs, inp, cached, out, reasoning) in sums.items()]


class Source(Protocol):
    """Read-only access to one ledger; see the module docstring."""

    location: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def now(self) -> float:
        """The ledger's clock (times in the ledger are on it)."""
        ...

    async def start(self, *, window: int) -> Start:
        """Counts from indexes (every job; the unfinished ones by status) and the window."""
        ...

    async def counts(self) -> Mapping[str, int] | None:
        """Every job by status, exact, from the ledger's counters; None when it keeps none."""
        ...

    async def aggregate(self, *, since: float, window: int) -> Aggregate:
        """Scan every job (see :class:`AggregateRow`), and the first ``window`` jobs that
        reached the server and are not finished, in one snapshot."""
        ...

    async def usage(self) -> tuple[Sequence[UsageRow], float]:
        """Scan every finished body for its usage; and the ledger's clock at that snapshot."""
        ...

    async def window(self, *, limit: int, after: int) -> tuple[Sequence[Row], int, int]:
        """The first ``limit`` jobs sent and unfinished (claim order); how many jobs were
        claimed after seq ``after``, and the highest seq."""
        ...

    async def live_keys(self) -> Sequence[str]:
        """Every job live on the server, in claim order (through the indexes of unfinished
        jobs: no body is read), for "cancel every live job"."""
        ...

    async def rows(self, keys: Sequence[str]) -> Sequence[Row]:
        """These jobs as they are now, with their bodies (primary-key lookups)."""
        ...

    async def workers(self) -> Sequence[Worker]: ...

    async def endpoints(self) -> Sequence[Endpoint]: ...

    async def detail(self, key: str) -> Detail | None: ...
