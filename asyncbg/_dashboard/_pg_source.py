"""The dashboard's reads of a PostgreSQL ledger (a fleet's).

A small pool of its own (two connections), every session read-only with a short
``statement_timeout``, so that a slow dashboard query is cut off instead of holding anything the
workers need. The statements are here, to be reviewed together; the tables are
:mod:`asyncbg._ledgers._pg_queries`'. Times are the database's clock, as the ledger's are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._ledgers import LedgerError, LedgerUnavailable
from .._ledgers._urls import redacted
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

__all__ = ["PostgresSource"]

#: Statements that run longer than this (milliseconds) are cancelled by the server; the full
#: scans, which read every job, get ``SCAN_TIMEOUT_MS``.
STATEMENT_TIMEOUT_MS = 5_000
SCAN_TIMEOUT_MS = 300_000

_NOW = "extract(epoch FROM now())::float8"
_ROW = ("key, seq, state, status, response_id, error_code, error, http_status, created, "
        "updated, owner")
_FINISHED = "state IN ('done', 'local')"
_FAILED = "(status = 'failed' OR state = 'local')"
NOW = f"SELECT {_NOW}"
AGGREGATE = f"""
    SELECT status, state,
           CASE WHEN {_FINISHED} AND updated >= %(since)s THEN floor(updated / 60)::bigint END,
           CASE WHEN {_FINISHED} THEN {bucket_sql("updated - created")} END,
           CASE WHEN {_FAILED} THEN COALESCE(error_code, 'unknown') END,
           count(*), sum(resubmits), count(*) FILTER (WHERE http_status = 429),
           max(error) FILTER (WHERE {_FAILED})
    FROM asyncbg_jobs GROUP BY 1, 2, 3, 4, 5
"""
NEWEST = "SELECT COALESCE(max(updated), 0), COALESCE(max(seq), 0) FROM asyncbg_jobs"
# Two partial indexes of schema version 3 serve this, each bounded whatever the ledger's size:
# live jobs no one holds (asyncbg_jobs_waiting_live, in claim order), and the jobs workers hold
# (asyncbg_jobs_leased: as many as the fleet runs at once). A `sending` row without a lease (its
# process died before the create's answer) runs nowhere: it is left out, and counted by the
# counters.
WINDOW = f"""
    SELECT {_ROW} FROM (
        (SELECT {_ROW} FROM asyncbg_jobs WHERE lease_until IS NULL AND state = 'live'
         ORDER BY seq LIMIT %(limit)s)
        UNION ALL
        (SELECT {_ROW} FROM asyncbg_jobs
         WHERE lease_until IS NOT NULL AND state IN ('new', 'sending', 'live')
           AND state <> 'new'
         ORDER BY seq LIMIT %(limit)s)
    ) AS sent ORDER BY seq LIMIT %(limit)s
"""
# The same two partial indexes as the window.
LIVE_KEYS = """
    SELECT key FROM (
        SELECT key, seq FROM asyncbg_jobs WHERE lease_until IS NULL AND state = 'live'
        UNION ALL
        SELECT key, seq FROM asyncbg_jobs
        WHERE lease_until IS NOT NULL AND state IN ('new', 'sending', 'live') AND state = 'live'
    ) AS live ORDER BY seq
"""
# Schema version 8 made those indexes on generated columns (``waiting``: the state of a row
# nobody holds; ``leased``: the lease of an unfinished one), so that the state is in no index;
# the same reads through them. A ledger of an older version (the dashboard upgrades nothing)
# keeps the two statements above.
WINDOW_8 = f"""
    SELECT {_ROW} FROM (
        (SELECT {_ROW} FROM asyncbg_jobs WHERE waiting = 'live' ORDER BY seq LIMIT %(limit)s)
        UNION ALL
        (SELECT {_ROW} FROM asyncbg_jobs WHERE leased IS NOT NULL AND state <> 'new'
         ORDER BY seq LIMIT %(limit)s)
    ) AS sent ORDER BY seq LIMIT %(limit)s
"""
LIVE_KEYS_8 = """
    SELECT key FROM (
        SELECT key, seq FROM asyncbg_jobs WHERE waiting = 'live'
        UNION ALL
        SELECT key, seq FROM asyncbg_jobs WHERE leased IS NOT NULL AND state = 'live'
    ) AS live ORDER BY seq
"""
# Params: after, after. Walks the unique index on seq from ``after``.
CLAIMED_SINCE = "SELECT count(*), COALESCE(max(seq), %s) FROM asyncbg_jobs WHERE seq > %s"
TOTAL = "SELECT count(*), COALESCE(max(seq), 0) FROM asyncbg_jobs"
# With counters: the highest seq from its unique index, the counts from the counters.
MAX_SEQ = "SELECT COALESCE(max(seq), 0) FROM asyncbg_jobs"
STATES = """
    SELECT state, status, sum(n)::bigint FROM asyncbg_counts GROUP BY state, status
    HAVING sum(n) <> 0
"""
# The partial index of unfinished jobs serves this.
UNFINISHED = """
    SELECT status, count(*) FROM asyncbg_jobs WHERE state IN ('new', 'sending', 'live')
    GROUP BY status
"""
ROWS = f"SELECT {_ROW}, body FROM asyncbg_jobs WHERE key = ANY(%(keys)s::text[])"
# OFFSET 0 keeps the subquery apart, so that each body is parsed once, not once per use.
USAGE = f"""
    SELECT b ->> 'model', b ->> 'service_tier', count(*),
           sum((b -> 'usage' ->> 'input_tokens')::bigint),
           sum((b -> 'usage' -> 'input_tokens_details' ->> 'cached_tokens')::bigint),
           sum((b -> 'usage' ->> 'output_tokens')::bigint),
           sum((b -> 'usage' -> 'output_tokens_details' ->> 'reasoning_tokens')::bigint),
           CASE WHEN jsonb_typeof(b -> 'completed_at') = 'number'
                THEN {bucket_sql("updated - (b ->> 'completed_at')::float8")} END
    FROM (SELECT convert_from(body, 'UTF8')::jsonb AS b, updated FROM asyncbg_jobs
          WHERE state = 'done' AND body IS NOT NULL OFFSET 0) finished
    GROUP BY 1, 2, 8
"""
WORKERS = f"""
    SELECT owner, host, pid, started, seen, lease FROM asyncbg_workers
    WHERE seen + lease > {_NOW} ORDER BY started, owner
"""
HAS_TABLES = """
    SELECT to_regclass('asyncbg_outbox') IS NOT NULL, to_regclass('asyncbg_counts') IS NOT NULL,
           EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('asyncbg_jobs')
                   AND attname = 'waiting' AND NOT attisdropped)
"""
# The counters the ledger's triggers keep (schema version 3): at most 64 slots per status.
COUNTS = """
    SELECT status, sum(n)::bigint FROM asyncbg_counts GROUP BY status HAVING sum(n) <> 0
"""
ENDPOINTS = """
    SELECT url, count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'failed'),
           (array_agg(error ORDER BY next_at DESC) FILTER (WHERE error IS NOT NULL))[1],
           (array_agg(http_status ORDER BY next_at DESC) FILTER (WHERE error IS NOT NULL))[1]
    FROM asyncbg_outbox GROUP BY url ORDER BY url
"""
DETAIL = f"SELECT {_ROW}, body, request, resubmits FROM asyncbg_jobs WHERE key = %(key)s"



class PostgresSource:
    """Reads the PostgreSQL ledger at ``url``; see the module docstring."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.location = redacted(url)
        self._pool: Any = None
        self._outbox = self._counters = False
        #: The statements for the ledger's schema: WINDOW_8 and LIVE_KEYS_8 from version 8 on.
        self._window, self._live_keys = WINDOW, LIVE_KEYS

    async def open(self) -> None:
        try:
            from psycopg_pool import AsyncConnectionPool
        except ImportError as exc:
            raise LedgerError("the dashboard reads PostgreSQL ledgers with psycopg-pool: "
                              "pip install 'asyncbg[dashboard,postgres]'") from exc
        options = (f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
                   "-c default_transaction_read_only=on")
        pool = AsyncConnectionPool(
            self._url, min_size=1, max_size=2, open=False, timeout=10.0,
            kwargs={"autocommit": True, "options": options, "connect_timeout": 10,
                    "application_name": "asyncbg-dashboard"})
        try:
            await pool.open(wait=True, timeout=15.0)
        except Exception as exc:  # the pool's own error type, or psycopg's
            await pool.close()
            raise LedgerUnavailable(f"{self.location}: cannot connect ({exc})") from exc
        self._pool = pool
        await self._look_at_schema()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def now(self) -> float:
        return float((await self._fetch(NOW))[0][0])

    async def start(self, *, window: int) -> Start:
        async def read(cur: Any) -> Start:
            if self._counters:  # a dozen rows and an index, not a count of every job
                await cur.execute(MAX_SEQ)
                [max_seq] = await cur.fetchone()
                await cur.execute(STATES)
                total, unfinished = from_counters(await cur.fetchall())
            else:
                await cur.execute(TOTAL)
                total, max_seq = await cur.fetchone()
                await cur.execute(UNFINISHED)
                unfinished = {status: int(n) for status, n in await cur.fetchall()}
            await cur.execute(self._window, {"limit": window})
            live = [row_of(r) for r in await cur.fetchall()]
            return Start(int(total), unfinished, live, int(max_seq))

        return await self._snapshot(read)  # type: ignore[no-any-return]

    async def counts(self) -> dict[str, int] | None:
        if self._window is WINDOW:  # a writer of this version upgrades the schema
            await self._look_at_schema()
        if not self._counters:
            return None
        return {status: int(n) for status, n in await self._fetch(COUNTS)}

    async def _look_at_schema(self) -> None:
        [(outbox, counters, hot)] = await self._fetch(HAS_TABLES)
        self._outbox, self._counters = bool(outbox), bool(counters)
        if hot:
            self._window, self._live_keys = WINDOW_8, LIVE_KEYS_8

    async def aggregate(self, *, since: float, window: int) -> Aggregate:
        async def scan(cur: Any) -> Aggregate:
            await cur.execute(AGGREGATE, {"since": since})
            rows = [AggregateRow(*r) for r in await cur.fetchall()]
            await cur.execute(NEWEST)
            as_of, max_seq = await cur.fetchone()
            await cur.execute(self._window, {"limit": window})
            live = [row_of(r) for r in await cur.fetchall()]
            return Aggregate(rows, live, int(max_seq), float(as_of))

        scanned = await self._snapshot(scan, timeout_ms=SCAN_TIMEOUT_MS)
        return scanned  # type: ignore[no-any-return]

    async def usage(self) -> tuple[list[UsageRow], float]:
        async def scan(cur: Any) -> tuple[list[UsageRow], float]:
            await cur.execute(NEWEST)
            as_of = float((await cur.fetchone())[0])
            await cur.execute(USAGE)
            return usage_rows(await cur.fetchall()), as_of

        scanned = await self._snapshot(scan, timeout_ms=SCAN_TIMEOUT_MS)
        return scanned  # type: ignore[no-any-return]

    async def window(self, *, limit: int, after: int) -> tuple[list[Row], int, int]:
        async def read(cur: Any) -> tuple[list[Row], int, int]:
            await cur.execute(self._window, {"limit": limit})
            rows = [row_of(r) for r in await cur.fetchall()]
            await cur.execute(CLAIMED_SINCE, (after, after))
            claimed, max_seq = await cur.fetchone()
            return rows, int(claimed), int(max_seq)

        return await self._snapshot(read)  # type: ignore[no-any-return]

    async def live_keys(self) -> list[str]:
        return [key for (key,) in await self._fetch(self._live_keys)]

    async def rows(self, keys: Sequence[str]) -> list[Row]:
        if not keys:
            return []
        found = await self._fetch(ROWS, {"keys": list(keys)})
        return [row_of(r, None if r[11] is None else bytes(r[11])) for r in found]

    async def workers(self) -> list[Worker]:
        return [worker_of(r) for r in await self._fetch(WORKERS)]

    async def endpoints(self) -> list[Endpoint]:
        if not self._outbox:
            return []
        return [Endpoint(url, int(p), int(f), err, status)
                for url, p, f, err, status in await self._fetch(ENDPOINTS)]

    async def detail(self, key: str) -> Detail | None:
        found = await self._fetch(DETAIL, {"key": key})
        if not found:
            return None
        r = found[0]
        body = None if r[11] is None else bytes(r[11])
        return Detail(row_of(r, body), bytes(r[12] or b""), int(r[13]), [])

    # -- plumbing ---------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Any = None) -> list[Any]:
        async def read(cur: Any) -> list[Any]:
            await cur.execute(sql, params)
            return list(await cur.fetchall())

        return await self._with_cursor(read, transaction=False)  # type: ignore[no-any-return]

    async def _snapshot(self, fn: Any, *, timeout_ms: int = STATEMENT_TIMEOUT_MS) -> Any:
        return await self._with_cursor(fn, transaction=True, timeout_ms=timeout_ms)

    async def _with_cursor(self, fn: Any, *, transaction: bool,
                           timeout_ms: int = STATEMENT_TIMEOUT_MS) -> Any:
        import psycopg
        from psycopg_pool import PoolTimeout

        if self._pool is None:
            raise RuntimeError("the dashboard's ledger reader is not open")
        try:
            async with self._pool.connection() as conn:
                if transaction:
                    # One snapshot for every statement of the read.
                    async with conn.transaction():
                        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, "
                                           "READ ONLY")
                        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
                        async with conn.cursor() as cur:
                            return await fn(cur)
                async with conn.cursor() as cur:
                    return await fn(cur)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise LedgerUnavailable(f"{self.location}: cannot read the ledger now ({exc}); "
                                    "the dashboard tries again") from exc
        except psycopg.Error as exc:
            raise LedgerError(f"{self.location}: {exc}") from exc
