"""The dashboard's reads of an SQLite journal (a run's, or a fleet's shared one).

Connections of its own, which write nothing (``PRAGMA query_only``): in WAL mode readers never
block the writer and the writer never blocks them. With nobody on the journal when it opens (no
``-wal``, ``-shm`` or ``-journal`` beside it) they are read-write connections, so that the last
one's close removes the ``-wal`` and ``-shm`` that reading a WAL journal makes (a read-only
connection leaves them behind), as ``asyncbg status`` does; with a writer there (or a crashed
one's log), or a directory it cannot write, they are opened ``mode=ro``, touching nothing.
Each read runs in a worker thread, one at a time; a read that needs one snapshot (the full
scan and the window) runs in one read transaction. The statements are here, to be reviewed
together; the tables are :mod:`asyncbg._ledgers._sqlite_queries`'.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import anyio

from .._ledgers import LedgerError, LedgerUnavailable
from .._ledgers._sqlite import reader_mode
from ._source import (
    Aggregate,
    AggregateRow,
    Detail,
    Endpoint,
    Row,
    Start,
    UsageRow,
    Worker,
    bucket_sql,
    from_counters,
    row_of,
    usage_rows,
    worker_of,
)

__all__ = ["SQLiteSource"]

T = TypeVar("T")

_ROW = ("key, seq, state, status, response_id, error_code, error, http_status, created, "
        "updated, owner")
_FINISHED = "state IN ('done', 'local')"
_FAILED = "(status = 'failed' OR state = 'local')"
# Params: since. One pass over every job.
AGGREGATE = f"""
    SELECT status, state,
           CASE WHEN {_FINISHED} AND updated >= ?1 THEN CAST(updated / 60 AS INTEGER) END,
           CASE WHEN {_FINISHED} THEN {bucket_sql("updated - created")} END,
           CASE WHEN {_FAILED} THEN COALESCE(error_code, 'unknown') END,
           count(*), sum(resubmits), sum(http_status = 429),
           CASE WHEN {_FAILED} THEN max(error) END
    FROM jobs GROUP BY 1, 2, 3, 4, 5
"""
NEWEST = "SELECT COALESCE(max(updated), 0), COALESCE(max(seq), 0) FROM jobs"
# The partial index jobs_open (claim order, unfinished rows only) serves this; SQLite uses a
# partial index only when the query repeats its condition.
WINDOW = f"""
    SELECT {_ROW} FROM jobs
    WHERE state IN ('new', 'sending', 'live') AND state <> 'new'
    ORDER BY seq LIMIT ?
"""
LIVE_KEYS = """
    SELECT key FROM jobs WHERE state IN ('new', 'sending', 'live') AND state = 'live'
    ORDER BY seq
"""
# Params: after, after. Walks the index on seq from ``after``.
CLAIMED_SINCE = "SELECT count(*), COALESCE(max(seq), ?) FROM jobs WHERE seq > ?"
# The smallest index serves count(*); the partial index the unfinished ones.
TOTAL = "SELECT count(*), COALESCE(max(seq), 0) FROM jobs"
UNFINISHED = """
    SELECT status, count(*) FROM jobs WHERE state IN ('new', 'sending', 'live') GROUP BY status
"""
# The counters the ledger's triggers keep (see _sqlite_queries.CREATE_COUNTS): a dozen rows.
COUNTS = "SELECT status, sum(n) FROM job_counts GROUP BY status HAVING sum(n) <> 0"
STATES = "SELECT state, status, n FROM job_counts WHERE n <> 0"
MAX_SEQ = "SELECT COALESCE(max(seq), 0) FROM jobs"
ROWS = f"SELECT {_ROW}, response FROM jobs WHERE key IN (SELECT value FROM json_each(?))"
# Each body is parsed once (one json_extract of every path, into a small array).
USAGE = f"""
    WITH b AS MATERIALIZED (
        SELECT json_extract(CAST(response AS TEXT), '$.model', '$.service_tier',
                            '$.usage.input_tokens', '$.usage.input_tokens_details.cached_tokens',
                            '$.usage.output_tokens',
                            '$.usage.output_tokens_details.reasoning_tokens',
                            '$.completed_at') AS v,
               updated
        FROM jobs WHERE state = 'done' AND response IS NOT NULL
    )
    SELECT v ->> 0, v ->> 1, count(*), sum(v ->> 2), sum(v ->> 3), sum(v ->> 4), sum(v ->> 5),
           CASE WHEN v ->> 6 IS NOT NULL THEN {bucket_sql("updated - (v ->> 6)")} END
    FROM b GROUP BY 1, 2, 8
"""
HAS_TABLE = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
WORKERS = ("SELECT owner, host, pid, started, seen, lease FROM workers "
           "WHERE seen + lease > ? ORDER BY started, owner")
ENDPOINTS = """
    SELECT url, sum(state = 'pending'), sum(state = 'failed'),
           (SELECT o2.error FROM outbox o2 WHERE o2.url = o.url AND o2.error IS NOT NULL
            ORDER BY o2.next_at DESC LIMIT 1),
           (SELECT o2.http_status FROM outbox o2 WHERE o2.url = o.url AND o2.error IS NOT NULL
            ORDER BY o2.next_at DESC LIMIT 1)
    FROM outbox o GROUP BY url ORDER BY url
"""
DETAIL = f"SELECT {_ROW}, response, request, resubmits FROM jobs WHERE key = ?"
HISTORY = "SELECT status, at FROM events WHERE key = ? ORDER BY at, id"



class _Connection:
    """One read-only connection and the thread limiter that keeps its reads one at a time."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.limiter = anyio.CapacityLimiter(1)


class SQLiteSource:
    """Reads the SQLite journal at ``path``; see the module docstring.

    Two connections: the full scans (seconds on a big journal) run on one, so that the live
    updates on the other never wait behind them.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self.location = str(path)
        self._fast: _Connection | None = None
        self._slow: _Connection | None = None
        self._tables: set[str] = set()

    async def open(self) -> None:
        if not await anyio.Path(self._path).is_file():
            raise LedgerError(f"{self.location}: no journal there (pass the --journal of the "
                              "run, by default OUTPUT.jsonl.journal)")
        real = str(self._path.resolve())
        uri = f"file:{quote(real)}?mode={reader_mode(real)}"

        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(uri, uri=True, timeout=2.0, check_same_thread=False,
                                 isolation_level=None)
            try:
                db.execute("PRAGMA query_only = 1")
                self._tables = {
                    name for name in ("jobs", "events", "workers", "outbox", "job_counts")
                    if db.execute(HAS_TABLE, (name,)).fetchone()}
            except BaseException:
                db.close()
                raise
            return db

        limiter = anyio.CapacityLimiter(1)
        self._fast = _Connection(await self._run_sync(connect, limiter))
        self._slow = _Connection(await self._run_sync(connect, limiter))
        if "jobs" not in self._tables:
            await self.close()
            raise LedgerError(f"{self.location}: not an asyncbg journal (no jobs table)")

    async def close(self) -> None:
        for conn in (self._fast, self._slow):
            if conn is not None:
                conn.db.close()
        self._fast = self._slow = None

    async def now(self) -> float:
        return time.time()  # the writers' clock: SQLite journals are shared on one machine

    async def start(self, *, window: int) -> Start:
        def read(db: sqlite3.Connection) -> Start:
            with _snapshot(db):
                if "job_counts" in self._tables:  # a dozen rows, not a count of every job
                    [max_seq] = db.execute(MAX_SEQ).fetchone()
                    total, unfinished = from_counters(db.execute(STATES))
                else:
                    total, max_seq = db.execute(TOTAL).fetchone()
                    unfinished = dict(db.execute(UNFINISHED).fetchall())
                live = [row_of(r) for r in db.execute(WINDOW, (window,))]
            return Start(int(total), unfinished, live, int(max_seq))

        return await self._read(read)

    async def counts(self) -> dict[str, int] | None:
        def read(db: sqlite3.Connection) -> dict[str, int] | None:
            if "job_counts" not in self._tables:  # a writer of this version may add them
                if db.execute(HAS_TABLE, ("job_counts",)).fetchone() is None:
                    return None
                self._tables.add("job_counts")
            return {s: int(n) for s, n in db.execute(COUNTS)}

        return await self._read(read)

    async def aggregate(self, *, since: float, window: int) -> Aggregate:
        def scan(db: sqlite3.Connection) -> Aggregate:
            with _snapshot(db):  # one snapshot for the scan and the window
                rows = [AggregateRow(*r) for r in db.execute(AGGREGATE, (since,))]
                as_of, max_seq = db.execute(NEWEST).fetchone()
                live = [row_of(r) for r in db.execute(WINDOW, (window,))]
            return Aggregate(rows, live, int(max_seq), float(as_of))

        return await self._read(scan, slow=True)

    async def usage(self) -> tuple[list[UsageRow], float]:
        def scan(db: sqlite3.Connection) -> tuple[list[UsageRow], float]:
            with _snapshot(db):
                as_of = float(db.execute(NEWEST).fetchone()[0])
                return usage_rows(db.execute(USAGE)), as_of

        return await self._read(scan, slow=True)

    async def window(self, *, limit: int, after: int) -> tuple[list[Row], int, int]:
        def read(db: sqlite3.Connection) -> tuple[list[Row], int, int]:
            with _snapshot(db):
                rows = [row_of(r) for r in db.execute(WINDOW, (limit,))]
                claimed, max_seq = db.execute(CLAIMED_SINCE, (after, after)).fetchone()
            return rows, int(claimed), int(max_seq)

        return await self._read(read)

    async def live_keys(self) -> list[str]:
        return await self._read(lambda db: [key for (key,) in db.execute(LIVE_KEYS)])

    async def rows(self, keys: Sequence[str]) -> list[Row]:
        if not keys:
            return []
        return await self._read(lambda db: [
            row_of(r, r[11]) for r in db.execute(ROWS, (json.dumps(list(keys)),))])

    async def workers(self) -> list[Worker]:
        if "workers" not in self._tables:
            return []
        now = time.time()
        return await self._read(lambda db: [worker_of(r) for r in db.execute(WORKERS, (now,))])

    async def endpoints(self) -> list[Endpoint]:
        if "outbox" not in self._tables:
            return []
        return await self._read(lambda db: [
            Endpoint(url, int(p or 0), int(f or 0), err, status)
            for url, p, f, err, status in db.execute(ENDPOINTS)])

    async def detail(self, key: str) -> Detail | None:
        def read(db: sqlite3.Connection) -> Detail | None:
            found = db.execute(DETAIL, (key,)).fetchone()
            if found is None:
                return None
            history = ([(s, float(at)) for s, at in db.execute(HISTORY, (key,))]
                       if "events" in self._tables else [])
            return Detail(row_of(found, found[11]), bytes(found[12] or b""), int(found[13]),
                          history)

        return await self._read(read)

    # -- plumbing ---------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, slow: bool = False) -> T:
        conn = self._slow if slow else self._fast
        if conn is None:
            raise RuntimeError("the dashboard's journal reader is not open")
        return await self._run_sync(lambda: fn(conn.db), conn.limiter)

    async def _run_sync(self, fn: Callable[[], T], limiter: anyio.CapacityLimiter) -> T:
        def run() -> T:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                raise LedgerUnavailable(f"{self.location}: cannot read the journal now "
                                        f"({exc}); the dashboard tries again") from exc
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"{self.location}: {exc}") from exc

        return await anyio.to_thread.run_sync(run, limiter=limiter)


@contextlib.contextmanager
def _snapshot(db: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every statement inside sees the same state of the file."""
    db.execute("BEGIN")
    try:
        yield
    finally:
        db.execute("COMMIT")
