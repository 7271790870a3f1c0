"""What ``asyncbg status`` reads of a ledger: counts, sums and the rows it lists, never every
record.

A ledger of a million jobs is read in milliseconds: jobs by state and status and the sums
(possible duplicates, tokens of the final bodies) come from counters that the database's own
triggers keep in the transaction of every write (SQLite: ``job_counts`` and ``job_tallies``,
:mod:`._sqlite_queries`; PostgreSQL: ``asyncbg_counts`` and ``asyncbg_tallies``,
:mod:`._pg_queries`), whoever writes; the rows ``status`` lists (live, being sent, the jobs of
remote batches) each through a partial index that holds only them.

A ledger without counters (a :class:`~._memory.MemoryLedger`, or an SQLite file whose counters
are missing) is read whole, by :func:`from_records`: the same answer, the slow way. Tests hold
the fast answer to it.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._providers._kinds import batch_of
from .._spend._tokens import usage_tokens
from . import _sqlite_queries as sq
from ._base import Ledger, Record
from ._shared import SharedLedger, WorkerInfo

__all__ = ["BatchGroup", "LiveRow", "Overview", "body_tokens", "fleet_status",
           "fleet_status_text", "fleet_summary", "from_records", "live_records", "overview",
           "unfinished_in"]


@dataclass(frozen=True, slots=True)
class LiveRow:
    """A live record, as ``status`` lists it."""

    key: str
    response_id: str | None
    status: str
    created: float


@dataclass(frozen=True, slots=True)
class BatchGroup:
    """The jobs of one remote batch that have one status."""

    batch_id: str
    status: str
    count: int
    #: The earliest ``created`` of these jobs.
    created: float


@dataclass(frozen=True, slots=True)
class Overview:
    """A ledger at a glance (see the module docstring)."""

    #: Jobs per ``(state, status)``; no zero counts.
    counts: Mapping[tuple[str, str], int]
    resubmits: int
    input_tokens: int
    output_tokens: int
    #: Live records in claim order.
    live: Sequence[LiveRow]
    #: Keys in state ``sending``, in claim order.
    sending: Sequence[str]
    batches: Sequence[BatchGroup]
    #: ``counters`` when read from counters and indexes, ``records`` when read whole.
    read_from: str = "counters"
    #: The keys of ``sending`` that a lease which has not run out holds: their creates are in
    #: flight with a running worker, which records the answers (the others' holders are gone).
    in_flight: Sequence[str] = ()

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def overview(ledger: Ledger) -> Overview:
    """The overview of an open ledger: from its counters when it keeps them, else read whole."""
    read = getattr(ledger, "overview", None)
    if read is not None:
        found: Overview | None = await read()
        if found is not None:
            return found
    return from_records(await ledger.records())


async def live_records(ledger: Ledger) -> list[Record]:
    """The live records of an open ledger in claim order, through the index of live rows when
    the ledger has one (``asyncbg cancel`` and the live sweep read nothing else)."""
    read = getattr(ledger, "live_records", None)
    if read is not None:
        found: list[Record] = await read()
        return found
    return [r for r in await ledger.records() if r.state == "live"]


def from_records(records: Iterable[Record]) -> Overview:
    """The overview computed from every record (the reference the counters are held to)."""
    counts: dict[tuple[str, str], int] = {}
    resubmits = inp = out = 0
    live: list[LiveRow] = []
    sending: list[str] = []
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in records:
        counts[(r.state, r.status)] = counts.get((r.state, r.status), 0) + 1
        resubmits += r.resubmits
        i, o = body_tokens(r.body)
        inp, out = inp + i, out + o
        if r.state == "live":
            live.append(LiveRow(r.key, r.response_id, r.status, r.created))
        elif r.state == "sending":
            sending.append(r.key)
        batch_id = batch_of(r.response_id)
        if batch_id is not None:
            group = groups.setdefault((batch_id, r.status), [0, r.created])
            group[0] += 1
            group[1] = min(group[1], r.created)
    return Overview(counts, resubmits, inp, out, live, sending,
                    [BatchGroup(b, s, n, c) for (b, s), (n, c) in groups.items()],
                    read_from="records")


#: What reading a body's usage may raise: not JSON (or nested past the parser's depth), or a
#: usage of an odd shape (a list where an object was expected, a count that is a string).
_ODD_BODY = (ValueError, TypeError, AttributeError, RecursionError)


def body_tokens(body: bytes | None) -> tuple[int, int]:
    """(input, output) tokens of a final body, whichever provider's (as ``asyncbg status`` and
    ``asyncbg results`` count them); none for a body that is not JSON or whose usage has an
    odd shape."""
    try:
        return _tokens(body)
    except _ODD_BODY:
        return 0, 0


def _tokens(body: bytes | None) -> tuple[int, int]:
    if body is None:
        return 0, 0
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        return 0, 0
    usage = parsed.get("usage") or parsed.get("usageMetadata") or parsed.get("usage_metadata")
    if not isinstance(usage, dict):
        return 0, 0
    t = usage_tokens(usage)
    return _whole(t.input), _whole(t.output)


def _whole(count: Any) -> int:
    """A count as the ledgers' triggers read it: a number's integer part, anything else 0."""
    if type(count) is int:
        return count
    if type(count) is float and math.isfinite(count):
        return int(count)
    return 0


_INT64 = range(-(2**63), 2**63)


def column_tokens(body: bytes | None) -> tuple[int, int] | tuple[None, None]:
    """A final body's tokens as a PostgreSQL ledger writes them beside it (schema 7), so that
    its triggers add two columns and the server parses no body: :func:`body_tokens`, or
    ``(None, None)`` (the trigger then parses the body, as before) when a count is not a plain
    integer that fits a ``bigint`` (the few bodies on which the two might differ)."""
    if body is None:
        return None, None
    if b"usage" not in body and b"\\u" not in body:
        # The only ways to write a key named usage*: as is, or with \u escapes.
        return 0, 0
    try:
        i, o = _tokens(body)
    except _ODD_BODY:  # a body is never refused for its usage: the server parses it
        return None, None
    if type(i) is int and type(o) is int and i in _INT64 and o in _INT64:
        return i, o
    return None, None


#: The states of jobs not finished: waiting, being sent, live.
_UNFINISHED = ("new", "sending", "live")


async def fleet_status(ledger: SharedLedger, view: Overview | None = None) -> dict[str, Any]:
    """What ``asyncbg status`` adds for a shared ledger: the workers alive, with how many
    leases each holds, and how many jobs are not finished (waiting, being sent or live): from
    ``view``, the ledger's overview just read, when given (no second read)."""
    workers = await ledger.workers()
    unfinished = await ledger.unfinished() if view is None else unfinished_in(view)
    return fleet_summary(workers, unfinished)


def unfinished_in(view: Overview) -> int:
    """How many jobs of ``view`` are not finished (waiting, being sent or live)."""
    return sum(n for (state, _), n in view.counts.items() if state in _UNFINISHED)


def fleet_summary(workers: Sequence[WorkerInfo], unfinished: int) -> dict[str, Any]:
    """:func:`fleet_status` from what was read."""
    return {
        "unfinished": unfinished,
        "workers_alive": len(workers),
        "workers": [
            {"owner": w.owner, "host": w.host, "pid": w.pid, "held": w.held,
             "last_seen": w.seen, "lease": w.lease}
            for w in workers
        ],
    }


def fleet_status_text(status: Mapping[str, Any]) -> str:
    """``fleet_status`` as lines for ``asyncbg status``."""
    lines = [f"workers alive: {status['workers_alive']}"]
    for w in status["workers"]:
        lines.append(f"  {w['owner']}  pid {w['pid']} on {w['host']}  holding {w['held']}")
    return "\n".join(lines)


# -- SQLite ---------------------------------------------------------------------------------------


def sqlite_overview(db: sqlite3.Connection) -> Overview | None:
    """The overview of an SQLite journal in one read transaction (one snapshot), or None when
    the file has no counters (then the caller reads it whole)."""
    db.execute("BEGIN")
    try:
        if db.execute(sq.HAS_TALLIES).fetchone() is None or db.execute(
                sq.HAS_COUNTS).fetchone() is None:
            return None
        counts = {(state, status): int(n)
                  for state, status, n in db.execute(sq.STATE_COUNTS)}
        resubmits, inp, out, _ = db.execute(sq.TALLIES).fetchone()
        live = [LiveRow(*row) for row in db.execute(sq.LIVE_ROWS)]
        sending_rows = db.execute(sq.SENDING_KEYS).fetchall()
        batches = _batches(db.execute(sq.BATCH_GROUPS))
    finally:
        db.execute("COMMIT")
    now = time.time()  # a shared SQLite ledger's leases are this machine's clock
    return Overview(counts, int(resubmits), int(inp), int(out), live,
                    [key for key, _ in sending_rows], batches,
                    in_flight=[key for key, lease in sending_rows
                               if lease is not None and lease > now])


def _batches(rows: Iterable[tuple[Any, ...]]) -> list[BatchGroup]:
    # An id that begins with '#' has no batch (as batch_of says).
    return [BatchGroup(b, s, int(n), float(c)) for b, s, n, c in rows if b]
