"""PostgresLedger: a ledger in PostgreSQL that many processes on many machines share.

Row leases taken with ``FOR UPDATE SKIP LOCKED``, as procrastinate, pgqueuer and SAQ take jobs;
see :mod:`._shared` for the lease and epoch rules and :mod:`._pg_queries` for every statement.

One connection per ledger, in autocommit, used by one call at a time (an ``anyio.Lock``): every
write is a single statement, so it commits in one round trip, and a transaction (a claim that
finds the key there, an enqueue) cannot interleave with another call's statements. A pool would
buy parallel round trips inside one process, which a worker does not need (its writes are a few
per job, milliseconds apart), at the price of a dependency and of ``pool size x workers``
connections on a server whose connections are often counted (managed PostgreSQL). A connection
that breaks is opened again at the next call; the leases it held stay valid, being rows.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any, TypeVar

import anyio
import psycopg

from .. import _log
from . import _pg_queries as q
from ._base import Claim, ClaimOutcome, LedgerError, Outcome, Record
from ._pg_outbox import PostgresOutbox
from ._rules import claim_outcome, state_after, unclaimed
from ._shared import (
    DEFAULT_LEASE,
    EnqueueMismatch,
    Item,
    LeaseLost,
    WorkerInfo,
    new_owner,
    shared_claim_outcome,
)
from ._urls import redacted as _redacted

__all__ = ["PostgresLedger"]

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
Cursor = psycopg.AsyncCursor[tuple[Any, ...]]
Args = Sequence[Any] | dict[str, Any] | None

#: Rows per statement when enqueuing (one transaction for the whole file all the same).
_CHUNK = 5000
_CLAIM_UPDATES = {
    ClaimOutcome.NEW: q.CLAIM_RESET,
    ClaimOutcome.RESEND: q.CLAIM_RESEND,
    ClaimOutcome.RESUME: q.CLAIM_RESUME,
}


class PostgresLedger(PostgresOutbox):
    """A :class:`~asyncbg._ledgers._shared.SharedLedger` in the PostgreSQL database at ``url``.

    The tables are created (or upgraded) on first use. ``lease`` is how long the leases it
    takes last (seconds; a dead process's keys are taken over after that). ``exclusive=True``
    allows one such ledger per database at a time (a session advisory lock), for runs that
    want the SQLite journal's one-run rule.
    """

    __slots__ = (
        "_acquired", "_conn", "_exclusive", "_held", "_lock", "_opens", "_owner", "_registered",
        "_url", "lease", "round_trips",
    )

    def __init__(self, url: str, *, exclusive: bool = False, lease: float = DEFAULT_LEASE,
                 owner: str | None = None) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be a positive number of seconds, got {lease!r}")
        self._url = url
        self._exclusive = exclusive
        self._owner = owner or new_owner()
        self.lease = lease
        self._conn: Conn | None = None
        self._lock = anyio.Lock()
        self._opens = 0
        self._registered = False
        #: key -> the epoch this instance holds its lease at.
        self._held: dict[str, int] = {}
        #: key -> the record as acquire() took it, until the worker's claim of it (no round
        #: trip: nobody else writes a key whose lease we hold).
        self._acquired: dict[str, Record] = {}
        #: Statements sent (a transaction's BEGIN and COMMIT count): the ledger's cost.
        self.round_trips = 0

    def __repr__(self) -> str:
        return f"PostgresLedger({self.location!r}, exclusive={self._exclusive})"

    @property
    def location(self) -> str:
        return _redacted(self._url)

    @property
    def owner(self) -> str:
        return self._owner

    def held(self) -> dict[str, int]:
        return dict(self._held)

    # -- opening -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            self._opens += 1
            return
        self._conn = await self._connect(prepare=True)
        self._opens = 1

    async def close(self) -> None:
        if self._opens > 1:
            self._opens -= 1
            return
        self._opens = 0
        if self._conn is None:
            return
        try:
            # Hand back what is still held (a worker stopping, a manager leaving live jobs
            # behind): another process takes it now instead of after the lease.
            with anyio.move_on_after(5.0, shield=True):
                await self._goodbye()
        finally:
            conn, self._conn = self._conn, None
            self._held.clear()
            self._acquired.clear()
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    async def _goodbye(self) -> None:
        try:
            if self._held:
                await self.release(list(self._held))
            if self._registered:
                await self._run(lambda c: self._execute(c, q.FORGET_WORKER, (self._owner,)))
        except LedgerError as exc:
            _log.warning("ledger.release_failed", ledger=self.location, error=str(exc))

    async def _connect(self, *, prepare: bool) -> Conn:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        try:
            if prepare:
                await self._prepare(conn)
            if self._exclusive:
                row = await self._fetchone(conn, q.TRY_EXCLUSIVE, (q.EXCLUSIVE_LOCK,))
                if not (row and row[0]):
                    raise LedgerError(
                        f"{self.location} is in use by another asyncbg run (exclusive); wait "
                        "for it to finish or stop it"
                    )
        except psycopg.Error as exc:
            await conn.close()
            raise self._error(exc) from exc
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _prepare(self, conn: Conn) -> None:
        """Create or upgrade the schema, under a transaction-level advisory lock."""
        if await self._version(conn) == q.SCHEMA_VERSION:
            return  # the usual case: one round trip, no lock
        async with conn.transaction():
            self.round_trips += 2
            await self._execute(conn, q.LOCK_SCHEMA, (q.SCHEMA_LOCK,))
            version = await self._version(conn)  # again, under the lock
            if version is None:
                for sql in q.CREATE_V1:
                    await self._execute(conn, sql)
                version = 1
            if version > q.SCHEMA_VERSION:
                raise LedgerError(
                    f"{self.location} was written by a newer asyncbg (ledger schema version "
                    f"{version}; this one knows up to {q.SCHEMA_VERSION}); upgrade asyncbg to "
                    "use it"
                )
            while version < q.SCHEMA_VERSION:
                for sql in q.UPGRADES[version]:
                    await self._execute(conn, sql)
                version += 1
            await self._execute(conn, q.WRITE_SCHEMA_VERSION, (str(version),))

    async def _version(self, conn: Conn) -> int | None:
        """The schema version, None for an empty database; a foreign one is refused."""
        row = await self._fetchone(conn, q.READ_VERSION)
        has_meta, has_jobs = (bool(row[0]), bool(row[1])) if row else (False, False)
        if not has_meta:
            if has_jobs:
                raise LedgerError(
                    f"{self.location} has an asyncbg_jobs table that asyncbg did not make "
                    "(no asyncbg_meta); use another database or schema (options=-csearch_path=)"
                )
            return None
        row = await self._fetchone(conn, q.READ_SCHEMA_VERSION)
        value = row[0] if row else None
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise LedgerError(
                f"{self.location}: asyncbg_meta holds schema_version {value!r}, not a number; "
                "the database was changed by hand"
            ) from None

    # -- the Ledger protocol ----------------------------------------------------------------

    async def claim(self, key: str, digest: str, request: bytes) -> Claim:
        acquired = self._acquired.pop(key, None)
        if acquired is not None and key in self._held and acquired.digest == digest:
            # Ours since acquire(): nobody else wrote it, so the rules need no round trip.
            outcome = claim_outcome(acquired.state, acquired.digest, digest)
            if outcome in (ClaimOutcome.NEW, ClaimOutcome.RESEND, ClaimOutcome.RESUME):
                return Claim(outcome, acquired)
        request = bytes(request)

        async def decide(conn: Conn, sql: str) -> tuple[Record, ClaimOutcome]:
            row = await self._fetchone(conn, sql, (self._owner, key))
            if row is None:
                raise LedgerError(f"{self.location}: key {key!r} vanished during a claim; "
                                  "something else deletes rows of asyncbg_jobs")
            old = _record(row[:-1])
            return old, shared_claim_outcome(old.state, old.digest, digest,
                                             held_elsewhere=bool(row[-1]))

        async def claim(conn: Conn) -> Claim:
            row = await self._fetchone(conn, q.CLAIM_INSERT,
                                       (key, digest, request, self._owner, self.lease))
            if row is not None:
                self._held[key] = row[-1]
                return Claim(ClaimOutcome.NEW, _record(row[:-1]))
            old, outcome = await decide(conn, q.CLAIM_READ)
            if outcome not in _CLAIM_UPDATES:  # DONE, MISMATCH, FOLLOW: nothing changes
                return Claim(outcome, old)
            async with conn.transaction():
                self.round_trips += 2
                old, outcome = await decide(conn, q.CLAIM_LOCK)  # again, with the row locked
                sql = _CLAIM_UPDATES.get(outcome)
                if sql is None:
                    return Claim(outcome, old)
                new = await self._fetchone(conn, sql, {
                    "key": key, "digest": digest, "request": request, "owner": self._owner,
                    "lease": self.lease})
            assert new is not None
            self._held[key] = new[-1]
            return Claim(outcome, _record(new[:-1]))

        return await self._run(claim)

    async def sending(self, key: str, *, resubmit: bool) -> None:
        await self._fenced(key, q.SENDING, (1 if resubmit else 0, key))

    async def record(self, key: str, outcome: Outcome) -> None:
        state = state_after(outcome)
        o = outcome
        if state == "live":
            await self._fenced(key, q.RECORD_LIVE, (o.response_id, o.status, key))
            return
        args = (state, o.response_id, o.status, o.body, o.error, o.error_code, o.http_status,
                o.request_id, key)
        n = o.notification
        if n is None:
            await self._fenced(key, q.RECORD_TERMINAL, args)
        else:  # one statement: the outcome and its notification in one transaction
            await self._fenced(key, q.RECORD_TERMINAL_NOTIFY, (n.id, n.url, n.body, *args))
        self._held.pop(key, None)  # finished: no lease to keep

    async def get(self, key: str) -> Record | None:
        row = await self._run(lambda c: self._fetchone(c, q.GET, (key,)))
        return None if row is None else _record(row)

    async def records(self) -> list[Record]:
        rows = await self._run(lambda c: self._fetchall(c, q.RECORDS))
        return [_record(row) for row in rows]

    async def resubmits(self) -> int:
        row = await self._run(lambda c: self._fetchone(c, q.RESUBMITS))
        return int(row[0]) if row else 0

    # -- the SharedLedger protocol ----------------------------------------------------------

    async def enqueue(self, items: Iterable[Item]) -> int:
        batch = list(items)
        if not batch:
            return 0
        keys = [key for key, _, _ in batch]
        digests = [digest for _, digest, _ in batch]

        async def enqueue(conn: Conn) -> int:
            new = 0
            async with conn.transaction():
                self.round_trips += 2
                for i in range(0, len(batch), _CHUNK):
                    chunk = batch[i:i + _CHUNK]
                    cur = await self._execute(conn, q.ENQUEUE, (
                        [k for k, _, _ in chunk], [d for _, d, _ in chunk],
                        [bytes(r) for _, _, r in chunk]))
                    new += max(cur.rowcount, 0)
                row = await self._fetchone(conn, q.ENQUEUE_MISMATCH, (keys, digests))
                if row is not None:  # leaving the block by this error rolls everything back
                    raise EnqueueMismatch(row[0], self.location)
            return new

        return await self._run(enqueue)

    async def acquire(self, limit: int, lease: float, *, live_only: bool = False
                      ) -> list[Record]:
        if limit < 1:
            return []
        rows = await self._run(lambda c: self._fetchall(c, q.ACQUIRE, {
            "limit": limit, "owner": self._owner, "lease": lease, "live_only": live_only}))
        rows.sort(key=lambda row: row[-1])  # claim order
        records = []
        for row in rows:
            record = _record(row[:-2])
            self._held[record.key] = row[-2]
            self._acquired[record.key] = record
            records.append(record)
        return records

    async def renew(self, keys: Collection[str], lease: float) -> set[str]:
        async def renew(conn: Conn) -> set[str]:
            held = {key: self._held[key] for key in keys if key in self._held}
            if not self._registered:
                await self._execute(conn, q.FORGET_OLD_WORKERS)
            rows = await self._fetchall(conn, q.RENEW, {
                "owner": self._owner, "host": socket.gethostname(), "pid": os.getpid(),
                "lease": lease, "keys": list(held), "epochs": list(held.values())})
            self._registered = True
            lost = set(held) - {row[0] for row in rows}
            self.forget(lost)
            return lost

        return await self._run(renew)

    async def release(self, keys: Collection[str]) -> None:
        async def release(conn: Conn) -> None:
            held = {key: self._held[key] for key in keys if key in self._held}
            if held:
                await self._execute(conn, q.RELEASE, {
                    "keys": list(held), "epochs": list(held.values()), "owner": self._owner})
            self.forget(held)

        await self._run(release)

    async def requeue(self, keys: Collection[str]) -> None:
        if keys:
            await self._run(lambda c: self._execute(
                c, q.REQUEUE, {"keys": list(keys), "owner": self._owner}))

    async def requeue_unpaid(self, *, code: str | None = None) -> int:
        async def requeue(conn: Conn) -> int:
            return max((await self._execute(conn, q.REQUEUE_UNPAID, {"code": code})).rowcount, 0)

        return await self._run(requeue)

    async def workers(self) -> list[WorkerInfo]:
        rows = await self._run(lambda c: self._fetchall(c, q.WORKERS))
        return [WorkerInfo(*row) for row in rows]

    async def unfinished(self) -> int:
        row = await self._run(lambda c: self._fetchone(c, q.UNFINISHED))
        return int(row[0]) if row else 0

    # -- plumbing ------------------------------------------------------------------------------

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._held.pop(key, None)
            self._acquired.pop(key, None)

    async def _fenced(self, key: str, sql: str, args: tuple[Any, ...]) -> None:
        """A write checked against this instance's owner and epoch for ``key``."""
        async def write(conn: Conn) -> None:
            epoch = self._held.get(key)
            if epoch is not None:
                cur = await self._execute(conn, sql, (*args, self._owner, epoch))
                if cur.rowcount == 1:
                    return
            if await self._fetchone(conn, q.EXISTS, (key,)) is None:
                raise unclaimed(key, self.location)
            self.forget((key,))
            raise LeaseLost(
                f"the lease on key {key!r} in {self.location} is held by another process "
                "now; this one wrote nothing and stops running it"
            )

        await self._run(write)

    async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        if self._conn is None:
            raise RuntimeError(
                f"the ledger {self.location} is not open; call `await ledger.open()` first"
            )
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError(f"the ledger {self.location} was closed during a call")
            if conn.broken or conn.closed:
                conn = self._conn = await self._connect(prepare=False)
            try:
                return await fn(conn)
            except psycopg.Error as exc:
                raise self._error(exc) from exc

    async def _execute(self, conn: Conn, sql: str, args: Args = None) -> Cursor:
        self.round_trips += 1
        return await conn.execute(sql, args)

    async def _fetchone(self, conn: Conn, sql: str, args: Args = None) -> tuple[Any, ...] | None:
        return await (await self._execute(conn, sql, args)).fetchone()

    async def _fetchall(self, conn: Conn, sql: str, args: Args = None) -> list[tuple[Any, ...]]:
        return await (await self._execute(conn, sql, args)).fetchall()

    def _error(self, exc: psycopg.Error) -> LedgerError:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, psycopg.OperationalError):
            return LedgerError(
                f"{self.location}: cannot use the PostgreSQL server ({detail}); check that it "
                "is up and that the URL, user and password are right"
            )
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return LedgerError(
                f"{self.location}: permission denied ({detail}); the user needs to create and "
                "write the asyncbg_* tables"
            )
        return LedgerError(f"{self.location}: PostgreSQL error {exc.sqlstate}: {detail}")


def _record(row: Sequence[Any]) -> Record:
    (key, digest, request, state, response_id, status, body, error, error_code, http_status,
     request_id, resubmits, created, updated) = row
    return Record(
        key=key, digest=digest, request=bytes(request), state=state, response_id=response_id,
        status=status, body=None if body is None else bytes(body), error=error,
        error_code=error_code, http_status=http_status, request_id=request_id,
        resubmits=resubmits, created=created, updated=updated,
    )

