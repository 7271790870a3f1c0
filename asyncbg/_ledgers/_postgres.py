"""PostgresLedger: a ledger in PostgreSQL that many processes on many machines share.

Row leases taken with ``FOR UPDATE SKIP LOCKED``, as procrastinate, pgqueuer and SAQ take jobs;
see :mod:`._shared` for the lease and epoch rules and :mod:`._pg_queries` for every statement.

Connections come from a :class:`psycopg_pool.AsyncConnectionPool` (as procrastinate takes
them), in autocommit: every write is a single statement, so it commits in one round trip, and a
transaction (a claim that finds the key there, an enqueue) holds its connection to itself. Lease
renewal has a pool of its own (one connection), so that it never waits behind other calls.
A short-lived command that sends a few statements and leaves (``asyncbg status``) opens the
ledger with ``pool=False``: one connection, the one that checked the schema, for every call in
turn; no pool, no connection made for nothing (each is a server process forked, and a machine
under load makes a caller wait for it).
The fenced writes of many jobs (``sending``, a response id, an outcome) that arrive while one is
on its way go out together in the next statement (:meth:`PostgresLedger._grouped`), each still
checked against its own owner and epoch: a worker running hundreds of jobs does not queue them
one by one on the pool's few connections.

Every call is bounded in time: ``connect_timeout`` to connect, the pool's ``timeout`` to get a
connection, ``statement_timeout`` (and ``idle_in_transaction_session_timeout``) on the server,
and a deadline a little past it in the client for a network that stops answering; TCP
keepalives find a dead peer. A call that is cancelled mid-statement (a cancel scope, a
deadline) never hands its connection back half-used: psycopg cancels the statement or closes the
connection, and the pool replaces it.

Failures are :class:`~asyncbg.LedgerUnavailable` when they may pass (the server is down,
restarting or overloaded, the connection dropped, a timeout), :class:`~asyncbg.LedgerError`
otherwise (permissions, a schema too new); never a raw psycopg error. A connection the server
dropped (a restart, ``pg_terminate_backend``) is replaced and the call tried once more on a
fresh one: every write here is fenced by owner and epoch, so running it twice records nothing
twice. The ledger object goes on working once the server is back.

psycopg_pool logs a warning at each failed attempt to connect and each dropped connection
(``error connecting in 'asyncbg-ledger': ...``), straight to stderr in a program that has not
set logging up: a worker riding out an outage would print one a second, in no format of ours.
What its logger ``psycopg.pool`` says on behalf of this ledger's pools (in their tasks, or in
a call of ours) goes instead to asyncbg's log as the debug event ``ledger.pool``
(:class:`_PoolLogs`); so does what psycopg's own logger ``psycopg`` says there (``query
cancellation interrupted (CancelledError): closing connection`` when a call cut short on a
silent server closes its connection), as ``ledger.psycopg``. What the outage means is said
once, by whoever waits it out (the worker's ``worker.ledger_unavailable`` and
``worker.ledger_available``). Pools and connections of the application's own are left alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import socket
import sys
from base64 import b64encode
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from .. import _log
from . import _pg_queries as q
from ._base import Claim, ClaimOutcome, LedgerError, LedgerUnavailable, Outcome, Record
from ._overview import column_tokens
from ._pg_outbox import PostgresOutbox
from ._rescue import Adoption, Rescue, forget_kept, keep_in, state_file, to_adopt, verdict
from ._rules import claim_outcome, state_after, unclaimed
from ._shared import (
    DEFAULT_LEASE,
    EnqueueMismatch,
    Item,
    LeaseLost,
    WorkerInfo,
    new_owner,
    safety_margin,
    shared_claim_outcome,
)
from ._urls import redacted as _redacted

if TYPE_CHECKING:
    import psycopg_pool  # imported when a pool is made: pool=False does without it

    from ._overview import Overview

__all__ = ["PostgresLedger"]

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
Cursor = psycopg.AsyncCursor[tuple[Any, ...]]
Pool: TypeAlias = "psycopg_pool.AsyncConnectionPool[Conn] | _OneConnection"
Args = Sequence[Any] | dict[str, Any] | None

#: Rows per statement when enqueuing (one transaction for the whole file all the same).
_CHUNK = 5000
_CLAIM_UPDATES = {
    ClaimOutcome.NEW: q.CLAIM_RESET,
    ClaimOutcome.RESEND: q.CLAIM_RESEND,
    ClaimOutcome.RESUME: q.CLAIM_RESUME,
}
#: Seconds (at most; no more than the timeout itself) the client waits past the server's
#: statement timeout before it gives up on a call: the server's own timeout normally ends a
#: stuck statement first, and leaves the connection usable; the client's deadline is for a
#: server or network that stopped answering.
_MARGIN = 5.0
#: Seconds a call waits for a connection from the pool while the pool's attempts to connect
#: fail (the server is down), rather than the whole timeout: see PostgresLedger._getconn.
_OUTAGE_WAIT = 0.5
#: Seconds a pool goes on trying to replace a connection, with its backoff (1, 2, 4... s),
#: before it gives up; the next call that wants a connection starts again at once. The pool's
#: own default (5 min) let the backoff grow to minutes: after a long outage the database was
#: back for up to that long before a ledger call could use it. With this, its attempts are at
#: most a few seconds apart while calls come, whatever the outage's length.
_RECONNECT = 5.0
#: How long a schema upgrade may take (server and client side), and an opener waits for one
#: another process runs: filling new counters from every row of a big ledger takes minutes.
_UPGRADE_TIMEOUT = 1800.0
#: The server ended the session (a restart, pg_terminate_backend, starting up): the statement
#: did not run, or was rolled back; a fresh connection may run it.
_DROPPED = frozenset({"57P01", "57P02", "57P03"})
#: SQLSTATE classes that may pass: connection exception, transaction rollback (deadlock,
#: serialization), insufficient resources (disk full, too many connections), operator
#: intervention (shutdown, statement timeout), system error (I/O).
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
#: And single states: lock not available; read-only transaction (a standby after a failover).
_TRANSIENT_STATES = frozenset({"55P03", "25006"})


#: True in asyncbg's own dealings with its pools, and in their tasks (which copy the context
#: they are started in): what psycopg_pool logs there is ours to relay (see _PoolLogs).
_OURS: contextvars.ContextVar[bool] = contextvars.ContextVar("asyncbg_pool", default=False)


class _PoolLogs(logging.Filter):
    """On psycopg's loggers: a warning (or worse) logged for asyncbg's pools and connections
    goes to asyncbg's log at debug level (``ledger.pool`` from ``psycopg.pool``,
    ``ledger.psycopg`` from psycopg itself: "query cancellation interrupted
    (CancelledError): closing connection" when a call cut short closes its connection), and
    not on; any other record goes on as it was (the pool's info records, seen only where the
    application asks psycopg for them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not _OURS.get():
            return True
        event = "ledger.pool" if record.name == "psycopg.pool" else "ledger.psycopg"
        _log.debug(event, level=record.levelname.lower(), message=record.getMessage())
        return False


#: psycopg's loggers (a logger's filters see only the records logged on it, not its children's).
_PSYCOPG_LOGGERS = ("psycopg", "psycopg.pool", "psycopg.pq")


def _relay_pool_logs() -> None:
    """Install :class:`_PoolLogs` on psycopg's loggers (once)."""
    for name in _PSYCOPG_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PoolLogs) for f in logger.filters):
            logger.addFilter(_PoolLogs())


@contextlib.contextmanager
def _ours() -> Iterator[None]:
    """What psycopg_pool logs in this block (and in the tasks started in it) is relayed."""
    token = _OURS.set(True)
    try:
        yield
    finally:
        _OURS.reset(token)


def _pool_error(exc: BaseException) -> bool:
    """No connection from the pool in time, or the pool closed (never without a pool)."""
    pool = sys.modules.get("psycopg_pool")
    return pool is not None and isinstance(
        exc, (pool.PoolTimeout, pool.PoolClosed, pool.TooManyRequests))


class PostgresLedger(PostgresOutbox):
    """A :class:`~asyncbg._ledgers._shared.SharedLedger` in the PostgreSQL database at ``url``.

    The tables are created (or upgraded) on first use. ``lease`` is how long the leases it
    takes last (seconds; a dead process's keys are taken over after that). ``exclusive=True``
    allows one such ledger per database at a time (a session advisory lock), for runs that
    want the SQLite journal's one-run rule.

    ``timeout`` bounds every statement on the server (``statement_timeout``) and the wait for
    a connection from the pool; ``connect_timeout`` bounds opening a connection;
    ``max_connections`` is the pool's size (lease renewal has one more of its own);
    ``pool=False`` makes no pool: the connection ``open`` makes serves every call in turn
    (made again when the server dropped it), for a short-lived reader (``asyncbg status``);
    with ``exclusive=True`` the pools are made all the same. Settings the URL gives itself
    (``keepalives_idle=``, ``connect_timeout=``...) win over the defaults.
    """

    __slots__ = (
        "_acquired", "_connect_timeout", "_digests", "_down", "_exclusive", "_group", "_held",
        "_holder",
        "_identity", "_kwargs",
        "_listener", "_max_connections", "_opens", "_owner", "_pool", "_pooled",
        "_registered", "_renewals", "_url", "lease", "round_trips", "timeout",
    )

    def __init__(self, url: str, *, exclusive: bool = False, lease: float = DEFAULT_LEASE,
                 owner: str | None = None, timeout: float = 30.0,
                 connect_timeout: float = 10.0, max_connections: int = 4,
                 pool: bool = True) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be a positive number of seconds, got {lease!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (connect_timeout > 0 and math.isfinite(connect_timeout)):
            raise ValueError("connect_timeout must be a positive number of seconds, got "
                             f"{connect_timeout!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections!r}")
        scheme, sep, rest = url.partition("://")
        url = self._url = scheme.lower() + sep + rest  # libpq knows the scheme in lower case
        try:
            given = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise LedgerError(
                f"{_redacted(url)} is not a PostgreSQL URL psycopg can read "
                f"({_detail(exc)}); write postgresql://USER:PASSWORD@HOST:PORT/DB"
            ) from None
        self._kwargs = _connection_kwargs(given, timeout=timeout,
                                          connect_timeout=connect_timeout)
        self._exclusive = exclusive
        self._owner = owner or new_owner()
        self.lease = lease
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._pooled = pool or exclusive
        self._pool: Pool | None = None
        self._renewals: Pool | None = None
        #: The connection that holds the exclusive lock (``exclusive=True`` only).
        self._holder: Conn | None = None
        #: The connection that LISTENs for work (wait_for_work), opened at its first call.
        self._listener: Conn | None = None
        self._opens = 0
        self._registered = False
        #: key -> the epoch this instance holds its lease at.
        self._held: dict[str, int] = {}
        #: key -> the digest of the request it was claimed for (kept with its response id).
        self._digests: dict[str, str] = {}
        #: key -> the record as acquire() took it, until the worker's claim of it (no round
        #: trip: nobody else writes a key whose lease we hold).
        self._acquired: dict[str, Record] = {}
        #: Server, database and schema, once opened (see _read_identity): what names the file
        #: a worker keeps responses it could not record in (see rescue()).
        self._identity: str | None = None
        #: Statements sent (a transaction's BEGIN and COMMIT count): the ledger's cost.
        self.round_trips = 0
        #: The fenced writes waiting to go out together (see _grouped).
        self._group = _Group()
        #: The server could not be reached at the last call (no call has reached it since):
        #: a call waits for a connection from the pool only briefly then (see _getconn).
        self._down = False

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

    def epoch_of(self, key: str) -> int | None:
        return self._held.get(key)

    # -- opening -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            self._opens += 1
            return
        _relay_pool_logs()
        # The schema is made on a connection of its own, opened here rather than by the pool:
        # a wrong URL, user or password is one clear error now, not a pool timeout later.
        try:
            with anyio.fail_after(self._connect_timeout + self._bound()):
                conn = await self._connect()
            try:
                await self._prepare(conn)  # bounded on its own: an upgrade may take minutes
                if self._exclusive:
                    with anyio.fail_after(self._bound()):
                        row = await self._fetchone(conn, q.TRY_EXCLUSIVE, (q.EXCLUSIVE_LOCK,))
                    if not (row and row[0]):
                        raise LedgerError(
                            f"{self.location} is in use by another asyncbg run "
                            "(exclusive); wait for it to finish or stop it"
                        )
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.close()
                raise
        except TimeoutError as exc:
            raise self._timed_out(self._connect_timeout + self._bound()) from exc
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        if self._exclusive:
            self._holder = conn  # the session lock lasts as long as this connection
        elif not self._pooled:  # one connection for every call: this one
            self._pool = self._renewals = _OneConnection(self._connect, conn)
            self._opens = 1
            return
        else:
            await conn.close()
        pools = (self._new_pool("asyncbg-ledger", self._max_connections),
                 self._new_pool("asyncbg-renewals", 1))
        try:  # each with its first connection ready, as the first calls expect (together)
            try:
                with _ours():  # the pools' tasks are started here, and keep the context
                    async with anyio.create_task_group() as tg:
                        for pool in pools:
                            tg.start_soon(partial(pool.open, wait=True,
                                                  timeout=self._connect_timeout + self._bound()))
            except BaseExceptionGroup as group:  # one pool's failure, as it was
                raise group.exceptions[0] from None
        except BaseException as exc:
            with _ours(), anyio.CancelScope(shield=True):
                for pool in pools:
                    await pool.close(timeout=1.0)
                if self._holder is not None:
                    await self._holder.close()
                    self._holder = None
            if isinstance(exc, psycopg.Error):
                raise self._error(exc) from exc
            raise
        self._pool, self._renewals = pools
        self._opens = 1

    def _new_pool(self, name: str, size: int) -> psycopg_pool.AsyncConnectionPool[Conn]:
        import psycopg_pool

        return psycopg_pool.AsyncConnectionPool(
            self._url, kwargs=self._kwargs, min_size=1, max_size=size, open=False,
            configure=self._configure, name=name, timeout=self.timeout,
            num_workers=min(size, 2), reconnect_timeout=_RECONNECT,
        )

    async def close(self) -> None:
        if self._opens > 1:
            self._opens -= 1
            return
        self._opens = 0
        if self._pool is None:
            return
        try:
            # Hand back what is still held (a worker stopping, a manager leaving live jobs
            # behind): another process takes it now instead of after the lease.
            with anyio.move_on_after(5.0, shield=True):
                await self._goodbye()
        finally:
            pools = (self._pool, self._renewals)
            holder, self._holder = self._holder, None
            self._pool = self._renewals = None
            self._held.clear()
            self._digests.clear()
            self._acquired.clear()
            with _ours(), anyio.CancelScope(shield=True):
                for pool in pools:
                    if pool is not None:
                        await pool.close(timeout=1.0)
                if holder is not None:
                    await holder.close()
                await self._drop_listener()

    async def _goodbye(self) -> None:
        try:
            if self._held:
                await self.release(list(self._held))
            if self._registered:
                await self._run(lambda c: self._execute(c, q.FORGET_WORKER, (self._owner,)))
        except LedgerError as exc:
            _log.warning("ledger.release_failed", ledger=self.location, error=str(exc))

    async def _connect(self) -> Conn:
        conn = await psycopg.AsyncConnection.connect(self._url, **self._kwargs)
        try:
            await self._configure(conn)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    async def _configure(self, conn: Conn) -> None:
        """Every new connection: the server ends any statement (and any transaction left
        idle) that runs past the timeout, which leaves the connection usable."""
        ms = str(max(int(self.timeout * 1000), 1))
        await conn.execute(q.SET_TIMEOUTS, (ms, ms))

    async def _prepare(self, conn: Conn) -> None:
        """Create or upgrade the schema, under a transaction-level advisory lock."""
        with anyio.fail_after(self._bound()):
            await self._read_identity(conn)
            if await self._version(conn) == q.SCHEMA_VERSION:
                return  # the usual case: one round trip more, no lock
        # An upgrade runs once, however long it takes (filling counters from every row of a
        # big ledger: a minute or more at a million jobs), within its own bound.
        with anyio.fail_after(_UPGRADE_TIMEOUT + _MARGIN):
            await self._upgrade(conn)

    async def _upgrade(self, conn: Conn) -> None:
        async with conn.transaction():
            self.round_trips += 2
            await self._execute(conn, q.SET_LOCAL_TIMEOUT, (str(int(_UPGRADE_TIMEOUT * 1000)),))
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

    async def _read_identity(self, conn: Conn) -> None:
        """What names the file a worker keeps responses it could not record in (see
        :meth:`rescue`): the server's system identifier, the database's OID and the schema,
        read on the connection, so that every spelling of the URL (``localhost`` or
        ``127.0.0.1``, the default port or 5432, a keyword DSN) names one file. A server that
        does not let this user read its control data: the address and port the server sees
        the connection on (the URL's host over a Unix socket), the database's name and the
        schema."""
        try:
            row = await self._fetchone(conn, q.IDENTITY)
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction):
            row = None
        if row is not None and row[0] is not None:
            self._identity = f"postgresql-system:{row[0]}/{row[1]}?schema={row[2]}"
            return
        row = await self._fetchone(conn, q.DATABASE_AND_SCHEMA)
        info = conn.info
        host, port, name, schema = row if row is not None else (None, None, info.dbname, None)
        self._identity = (f"postgresql://{host or info.host}:{port or info.port}/{name}"
                          f"?schema={schema}")

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
                self._digests[key] = digest
                return Claim(outcome, acquired)
        request = bytes(request)

        async def decide(conn: Conn, sql: str) -> tuple[Record, ClaimOutcome]:
            row = await self._fetchone(conn, sql, {
                "owner": self._owner, "key": key, "margin": safety_margin(self.lease)})
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
                self._digests[key] = digest
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
            self._digests[key] = digest
            return Claim(outcome, _record(new[:-1]))

        return await self._run(claim)

    async def sending(self, key: str, *, resubmit: bool) -> None:
        await self._grouped("sending", key, (key, 1 if resubmit else 0))

    async def record(self, key: str, outcome: Outcome) -> None:
        state = state_after(outcome)
        o = outcome
        if state == "live":
            await self._grouped("live", key, (key, o.response_id, o.status))
            return
        n = o.notification
        tokens = column_tokens(o.body)  # parsed here, not by the server all workers share
        if n is None:
            body = None if o.body is None else b64encode(o.body).decode("ascii")
            await self._grouped("terminal", key, (
                key, state, o.response_id, o.status, body, *tokens, o.error, o.error_code,
                o.http_status, o.request_id))
        else:  # one statement: the outcome and its notification in one transaction
            await self._fenced(key, q.RECORD_TERMINAL_NOTIFY, (
                n.id, n.url, n.body, state, o.response_id, o.status, o.body, *tokens, o.error,
                o.error_code, o.http_status, o.request_id, key))
        self.forget((key,))  # finished: no lease to keep

    async def get(self, key: str) -> Record | None:
        row = await self._run(lambda c: self._fetchone(c, q.GET, (key,)))
        return None if row is None else _record(row)

    async def records(self) -> list[Record]:
        rows = await self._run(lambda c: self._fetchall(c, q.RECORDS))
        return [_record(row) for row in rows]

    async def records_page(self, after: int, limit: int) -> list[tuple[int, Record]]:
        """Up to ``limit`` records after the one at ``after`` (0: from the start), in claim
        order, each with its place: :meth:`records` a page at a time, for a reader that
        streams a ledger of any size (``asyncbg results``)."""
        rows = await self._run(lambda c: self._fetchall(c, q.RECORDS_PAGE, (after, limit)))
        return [(int(row[0]), _record(row[1:])) for row in rows]

    async def resubmits(self) -> int:
        row = await self._run(lambda c: self._fetchone(c, q.RESUBMITS))
        return int(row[0]) if row else 0

    # -- the SharedLedger protocol ----------------------------------------------------------

    async def enqueue(self, items: Iterable[Item]) -> int:
        batch = list(items)
        if not batch:
            return 0
        # Bounded all the same: the server's statement timeout and the client's deadline grow
        # with the file (a million lines is a few statements of tens of seconds each).
        timeout = self.timeout * (1 + len(batch) // _CHUNK)

        async def enqueue(conn: Conn) -> int:
            async with conn.transaction():
                self.round_trips += 2
                if len(batch) > _CHUNK:
                    await self._execute(conn, q.SET_LOCAL_TIMEOUT,
                                        (str(int(timeout * 1000)),))
                    new, row = await self._copy_in(conn, batch)
                else:
                    keys, digests = [k for k, _, _ in batch], [d for _, d, _ in batch]
                    cur = await self._execute(conn, q.ENQUEUE, (
                        keys, digests, [bytes(r) for _, _, r in batch]))
                    new = max(cur.rowcount, 0)
                    row = None if new == len(batch) else await self._fetchone(
                        conn, q.ENQUEUE_MISMATCH, (keys, digests))
                if row is not None:  # leaving the block by this error rolls everything back
                    raise EnqueueMismatch(row[0], self.location)
                if new:
                    await self._execute(conn, q.WORK_ARRIVED)  # delivered at commit
            return new

        # Not tried twice: a commit whose answer was lost would then count every key as known.
        return await self._run(enqueue, retry=False, timeout=timeout)

    async def _copy_in(self, conn: Conn, batch: list[Item]
                       ) -> tuple[int, tuple[Any, ...] | None]:
        """A big file: COPY into a temporary table, then one INSERT ... SELECT (and one check
        for keys already there with another request); returns (new keys, mismatch row)."""
        await self._execute(conn, q.ENQUEUE_TABLE)
        cur = conn.cursor()
        self.round_trips += 1
        async with cur.copy(q.ENQUEUE_COPY) as copy:
            for n, (key, digest_, request) in enumerate(batch):
                await copy.write_row((n, key, digest_, bytes(request)))
        new = max((await self._execute(conn, q.ENQUEUE_FROM_TABLE)).rowcount, 0)
        if new == len(batch):  # every key was new: none can be there with another request
            return new, None
        return new, await self._fetchone(conn, q.ENQUEUE_TABLE_MISMATCH)

    async def acquire(self, limit: int, lease: float, *, live_only: bool = False
                      ) -> list[Record]:
        if limit < 1:
            return []
        sql = q.acquire(limit, live_only=live_only)
        rows = await self._run(lambda c: self._fetchall(c, sql, {
            "owner": self._owner, "lease": lease, "margin": safety_margin(lease)}))
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
            kept = {row[0] for row in rows}
            # Only keys still held at the same epoch: one recorded finished while the renewal
            # was on its way (its lease ended with it) is not lost.
            lost = {key for key in set(held) - kept if self._held.get(key) == held[key]}
            self.forget(lost)
            return lost

        return await self._run(renew, renewal=True)

    async def release(self, keys: Collection[str]) -> None:
        async def release(conn: Conn) -> None:
            held = {key: self._held[key] for key in keys if key in self._held}
            if held:
                await self._execute(conn, q.RELEASE, {
                    "keys": list(held), "epochs": list(held.values()), "owner": self._owner})
            self.forget(held)

        await self._run(release)

    async def requeue(self, keys: Collection[str], *,
                      codes: Collection[str] | None = None) -> None:
        if keys:
            await self._run(lambda c: self._execute(
                c, q.REQUEUE, {"keys": list(keys), "owner": self._owner,
                               "codes": None if codes is None else list(codes)}))

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

    async def wait_for_work(self, timeout: float) -> None:
        """Return as soon as work may be waiting (another process enqueued, released or
        requeued jobs: PostgreSQL's ``LISTEN``/``NOTIFY``), or after ``timeout`` seconds.

        For a worker's loop in place of a sleep between two :meth:`acquire` calls: the timed
        poll stays the fallback (leases that run out send no notification). A wake-up may be
        spurious; one that comes while nobody waits is kept for the next call, so none is lost
        once the first call has started listening (that first call returns at once, for the
        caller to look again). Never raises for the database: when the listening connection
        cannot be used, it waits out ``timeout`` and listens again at the next call.
        """
        if self._pool is None:
            raise RuntimeError(
                f"the ledger {self.location} is not open; call `await ledger.open()` first"
            )
        with _ours():  # what psycopg logs for the listening connection is relayed
            await self._wait_for_work(timeout)

    async def _wait_for_work(self, timeout: float) -> None:
        deadline = anyio.current_time() + timeout
        if self._listener is None or self._listener.closed:
            try:  # within its own bound (connecting), not the wait's: it returns at once
                self._listener = await self._listen()
                return  # listening now: what came before was not heard, so look again
            except (psycopg.Error, TimeoutError) as exc:
                _log.info("ledger.listen_failed", ledger=self.location, error=_detail(exc))
            await anyio.sleep(max(deadline - anyio.current_time(), 0.0))  # the timed poll
            return
        with anyio.move_on_after(timeout):
            try:
                async for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                    pass
                return
            except psycopg.Error as exc:
                _log.info("ledger.listen_failed", ledger=self.location, error=_detail(exc))
                await self._drop_listener()
            await anyio.sleep_forever()  # the timed poll, until the deadline

    async def _listen(self) -> Conn:
        with anyio.fail_after(self._connect_timeout + self._bound()):
            conn = await self._connect()
            try:
                await conn.execute(q.LISTEN)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.close()
                raise
        return conn

    async def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with anyio.CancelScope(shield=True):
                await listener.close()

    async def overview(self) -> Overview:
        """What ``asyncbg status`` shows, from counters and indexes (see :mod:`._overview`),
        in one snapshot."""
        from ._overview import BatchGroup, LiveRow, Overview

        async def read(conn: Conn) -> Overview:
            # Sent together (a pipeline): one wait for the server, not one per statement.
            async with conn.pipeline(), conn.transaction():
                self.round_trips += 2
                await self._execute(conn, q.SNAPSHOT)
                found = [await self._execute(conn, sql) for sql in (
                    q.COUNTS, q.TALLIES, q.LIVE_ROWS, q.SENDING_KEYS, q.BATCH_GROUPS)]
            counts, tallies_, live, sending, groups = [await c.fetchall() for c in found]
            tallies = tallies_[0]
            return Overview(
                {(state, status): int(n) for state, status, n in counts},
                int(tallies[0]), int(tallies[1]), int(tallies[2]),
                [LiveRow(*row) for row in live], [row[0] for row in sending],
                [BatchGroup(b, st, int(n), float(c)) for b, st, n, c in groups if b],
                in_flight=[key for key, held in sending if held])

        return await self._run(read)

    async def live_records(self) -> list[Record]:
        """The live records in claim order, through the released rows' index and the lease
        index (schema 8)."""
        rows = await self._run(lambda c: self._fetchall(c, q.LIVE_RECORDS))
        return [_record(row) for row in rows]

    async def counts(self) -> dict[tuple[str, str], int]:
        """How many jobs are in each ``(state, status)``: read from counters the triggers
        keep, so that it costs the same at a million jobs as at ten."""
        rows = await self._run(lambda c: self._fetchall(c, q.COUNTS))
        return {(state, status): int(n) for state, status, n in rows}

    # -- what a worker could not record -------------------------------------------------------

    def rescue(self) -> Rescue:
        """Where a worker on this machine keeps the responses it could not record: a file in
        the user's state directory named from a hash of the server's identity (its system
        identifier), the database's OID and the schema, which is what names the ledger's
        tables, however the URL spells them (the user and the password are not part of it:
        see :func:`._rescue.state_file`). Known once opened, as a process has connected
        before it can have kept anything."""
        if self._identity is None:
            raise LedgerError(f"the ledger {self.location} was never opened; nothing of it "
                              "can have been kept")
        return Rescue.at(state_file(self._identity))

    async def keep_unrecorded(self, pairs: list[tuple[str, str]]) -> Path:
        """As :meth:`SharedSQLiteLedger.keep_unrecorded`, in :meth:`rescue`'s file."""
        return await keep_in(self.rescue(), pairs, epochs=self._held, digests=self._digests,
                             note={"ledger": self.location, "owner": self._owner})

    async def adopt_kept(self, unkept: Sequence[tuple[str, str]] = ()) -> Adoption:
        """As :meth:`SharedSQLiteLedger.adopt_kept`: record, fenced, the responses workers on
        this machine kept, and remove their lines. Raises :class:`LedgerError`."""
        rescue = self.rescue()
        in_file, kept = await to_adopt(rescue, unkept, self._held, self._digests)
        if not kept:
            return Adoption(rescue.path)

        async def adopt(conn: Conn) -> Adoption:
            adopted, duplicates, recorded = [], [], []
            for k in kept:
                if k.epoch is not None and (await self._execute(conn, q.ADOPT_KEPT, {
                        "response_id": k.response_id, "key": k.key, "epoch": k.epoch,
                        "digest": k.digest})).rowcount == 1:
                    adopted.append(k)
                    continue
                row = await self._fetchone(conn, q.ROW_OF, (k.key,))
                if verdict(k, None if row is None else (row[0], row[1])) == "recorded":
                    recorded.append(k)
                else:
                    duplicates.append(k)
            if adopted:
                await self._execute(conn, q.WORK_ARRIVED)  # waiting workers look now
            return Adoption(rescue.path, tuple(adopted), tuple(duplicates), tuple(recorded))

        adoption = await self._run(adopt)
        await forget_kept(rescue, in_file)
        return adoption

    # -- plumbing ------------------------------------------------------------------------------

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._held.pop(key, None)
            self._digests.pop(key, None)
            self._acquired.pop(key, None)

    def abandon(self) -> None:
        self.forget(list(self._held))
        self._registered = False  # its row in the workers' table ages out

    async def _fenced(self, key: str, sql: str, args: tuple[Any, ...]) -> None:
        """A write checked against this instance's owner and epoch for ``key``."""
        async def write(conn: Conn) -> bool:
            epoch = self._held.get(key)
            if epoch is None:
                return False
            return (await self._execute(conn, sql, (*args, self._owner, epoch))).rowcount == 1

        if not await self._run(write):
            await self._not_written(key)

    async def _grouped(self, kind: str, key: str, row: tuple[Any, ...]) -> None:
        """A fenced write (see :meth:`_fenced`) that goes out together with the others that
        wait at the same moment: while one statement is on its way, the writes arriving queue,
        and the first of them sends them all in the next one (one round trip and one commit
        for hundreds of jobs, not one each on the pool's few connections).

        Every write here may run twice (a retry after a dropped connection): they set values.
        """
        group = self._group
        # A key's writes reach the server in the order they were made: its next write waits
        # for the one before to be back (in one statement the server would apply one of two
        # updates of a row, and the other would read as a lost lease).
        while (ahead := group.keys.get(key)) is not None:
            await ahead.written.wait()
        epoch = self._held.get(key)
        if epoch is None:
            await self._not_written(key)
        write = _Write(kind, key, (*row, epoch))
        batch = group.waiting
        if not batch.writes:
            batch.leader = write  # the first to wait sends the batch when its turn comes
        batch.writes.append(write)
        group.keys[key] = batch
        try:
            # Each waiting task is woken once: when its batch is written, or (its leader) when
            # a statement on its way is back.
            while not write.done:
                if not batch.sent and not group.busy:
                    await self._write_group(group)
                elif batch.leader is write and not batch.sent:
                    await batch.turn.wait()
                else:
                    await batch.written.wait()
        finally:
            if not write.done and not batch.sent:  # cancelled before it was sent
                batch.writes.remove(write)
                if group.keys.get(key) is batch:
                    del group.keys[key]
                if batch.leader is write:
                    batch.leader = batch.writes[0] if batch.writes else None
                # Every waiter looks again, once: another may lead, or make this key's next write.
                woken, batch.written = batch.written, anyio.Event()
                woken.set()
        if write.error is not None:
            raise type(write.error)(str(write.error)) from write.error
        if not write.written:
            await self._not_written(key)

    async def _write_group(self, group: _Group) -> None:
        batch, group.waiting = group.waiting, _Batch()
        batch.sent = True
        group.busy = True
        try:
            parts: dict[str, list[tuple[Any, ...]]] = {kind: [] for kind in _GROUPED}
            for w in batch.writes:
                parts[w.kind].append(w.row)
            args = {"owner": self._owner, **{
                name: _dumps(parts[kind]) for kind, name in _GROUPED.items()}}
            refused = {row[0] for row in await self._run(
                lambda c: self._fetchall(c, q.WRITE_MANY, args, prepare=True))}
            for w in batch.writes:
                w.written = w.key not in refused
        except LedgerError as exc:
            for w in batch.writes:
                w.error = exc
        except BaseException:
            # Cancelled on its way (the one who sent it was): whether it committed is not
            # known, so the others are told it may not have, and write again.
            for w in batch.writes:
                w.error = LedgerUnavailable(
                    f"{self.location}: a write was interrupted on its way; try again")
            raise
        finally:
            for w in batch.writes:
                w.done = True
                if group.keys.get(w.key) is batch:
                    del group.keys[w.key]
            group.busy = False
            batch.written.set()
            group.waiting.turn.set()  # the next batch's leader sends it

    async def _not_written(self, key: str) -> NoReturn:
        """Why a fenced write changed nothing: the key is missing (a bug) or its lease is
        elsewhere now (it is forgotten here)."""
        if await self._run(lambda c: self._fetchone(c, q.EXISTS, (key,))) is None:
            raise unclaimed(key, self.location)
        self.forget((key,))
        raise LeaseLost(
            f"the lease on key {key!r} in {self.location} is held by another process now; "
            "this one wrote nothing and stops running it"
        )

    async def _run(self, fn: Callable[[Conn], Awaitable[T]], *, renewal: bool = False,
                   retry: bool = True, timeout: float | None = None) -> T:
        """``fn`` on a connection of the pool (the renewals' own with ``renewal``), within
        ``timeout`` (default: the ledger's) plus a margin; psycopg's errors become ours.

        ``retry``: when the server had dropped the connection (a restart, a terminated
        backend), check the pool's other connections and run ``fn`` once more on a fresh one.
        """
        pool = self._renewals if renewal else self._pool
        if pool is None:
            raise RuntimeError(
                f"the ledger {self.location} is not open; call `await ledger.open()` first"
            )
        limit = self._bound(timeout)
        errors = _connect_errors(pool)
        # anyio.fail_after without its generator: the only thing that can cancel this scope
        # is its deadline, so leaving it without returning means the call timed out.
        try:
            with _ours(), anyio.CancelScope(deadline=anyio.current_time() + limit):
                try:
                    result = await self._on_connection(pool, fn, errors)
                except psycopg.Error as exc:
                    if not (retry and _dropped(exc)):
                        raise
                    _log.info("ledger.reconnecting", ledger=self.location, error=_detail(exc))
                    await pool.check()  # the others are likely gone too: replace them now
                    result = await self._on_connection(pool, fn, errors)
                self._down = False
                return result
        except TimeoutError as exc:
            raise self._timed_out(limit) from exc
        except LedgerUnavailable:
            self._down = True  # raised by _getconn: the pool cannot connect
            raise
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        raise self._timed_out(limit)

    async def _on_connection(self, pool: Pool, fn: Callable[[Conn], Awaitable[T]],
                             errors: int) -> T:
        """``fn`` on a connection of ``pool``, handed back on every way out. One left
        mid-statement or mid-transaction (a cancellation, an error) is closed, never reused:
        the pool replaces it."""
        conn = await self._getconn(pool, errors)
        try:
            return await fn(conn)
        finally:
            with anyio.CancelScope(shield=True):
                if conn.pgconn.transaction_status != TransactionStatus.IDLE:
                    await conn.close()  # local: frees the socket without waiting for the server
                await pool.putconn(conn)

    async def _getconn(self, pool: Pool, errors: int) -> Conn:
        """A connection from ``pool``, waited for up to the timeout while the pool is busy or
        slow to connect (a healthy server under load is not down), but only about
        ``_OUTAGE_WAIT`` seconds once its attempts to connect fail: since the call began
        (``errors`` is the pool's count of failed attempts then), or at the ledger's previous
        call. Then :class:`LedgerUnavailable` at once, so that whoever waits out an outage
        (a worker's ``--db-patience``) is not held a whole timeout at each call."""
        if isinstance(pool, _OneConnection):
            return await pool.getconn()  # connects itself: a refusal is an error at once
        deadline = anyio.current_time() + self.timeout
        while True:
            left = deadline - anyio.current_time()
            try:
                return await pool.getconn(timeout=max(min(left, _OUTAGE_WAIT), 0.001))
            except psycopg.Error as exc:
                if not _pool_error(exc) or left <= _OUTAGE_WAIT:
                    raise
                if self._down or _connect_errors(pool) > errors:
                    raise LedgerUnavailable(
                        f"{self.location}: cannot connect to the PostgreSQL server (the "
                        "attempts fail); it is down, restarting or unreachable"
                    ) from exc

    async def _execute(self, conn: Conn, sql: str, args: Args = None, *,
                       prepare: bool | None = None) -> Cursor:
        self.round_trips += 1
        return await conn.execute(sql, args, prepare=prepare)

    async def _fetchone(self, conn: Conn, sql: str, args: Args = None) -> tuple[Any, ...] | None:
        return await (await self._execute(conn, sql, args)).fetchone()

    async def _fetchall(self, conn: Conn, sql: str, args: Args = None, *,
                        prepare: bool | None = None) -> list[tuple[Any, ...]]:
        return await (await self._execute(conn, sql, args, prepare=prepare)).fetchall()

    def _bound(self, timeout: float | None = None) -> float:
        """The client's deadline for a call whose statements have ``timeout`` on the server."""
        return (timeout or self.timeout) + min(_MARGIN, self.timeout)

    def _timed_out(self, seconds: float) -> LedgerUnavailable:
        return LedgerUnavailable(
            f"{self.location}: the PostgreSQL server did not answer within {seconds:g} s; "
            "check that it is up and reachable"
        )

    def _error(self, exc: psycopg.Error) -> LedgerError:
        """What a psycopg error means for the caller: may it pass, or must someone act?"""
        detail = _detail(exc)
        state = exc.sqlstate or ""
        if _pool_error(exc):
            return LedgerUnavailable(
                f"{self.location}: no connection to the PostgreSQL server within "
                f"{self.timeout:g} s ({detail}); it is down, restarting or out of connections"
            )
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return LedgerUnavailable(
                f"{self.location}: a statement did not finish within {self.timeout:g} s "
                f"({detail}); the server is overloaded, or another session holds a lock on "
                "the asyncbg_* tables"
            )
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return LedgerError(
                f"{self.location}: permission denied ({detail}); the user needs to create and "
                "write the asyncbg_* tables"
            )
        if state.startswith("28"):
            return LedgerError(
                f"{self.location}: the server refused the login ({detail}); check the user and "
                "password in the URL"
            )
        if ((isinstance(exc, psycopg.OperationalError) and not state)
                or state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES):
            return LedgerUnavailable(
                f"{self.location}: cannot use the PostgreSQL server ({detail}); check that it "
                "is up and that the URL, user and password are right"
            )
        return LedgerError(f"{self.location}: PostgreSQL error {state}: {detail}")


#: The grouped writes: each kind's parameter of q.WRITE_MANY (its rows, as JSON).
_GROUPED = {"sending": "sent", "live": "live", "terminal": "ended"}
_dumps = json.JSONEncoder(separators=(",", ":")).encode


class _Write:
    """One grouped write: its row, and what became of it."""

    __slots__ = ("done", "error", "key", "kind", "row", "written")

    def __init__(self, kind: str, key: str, row: tuple[Any, ...]) -> None:
        self.kind = kind
        self.key = key
        self.row = row
        self.done = False
        self.written = False
        self.error: LedgerError | None = None


class _Batch:
    """Writes that go out in one statement: ``turn`` is set when the statement before it is
    back (its leader sends it then), ``written`` when its own is."""

    __slots__ = ("leader", "sent", "turn", "writes", "written")

    def __init__(self) -> None:
        self.writes: list[_Write] = []
        self.leader: _Write | None = None
        self.sent = False
        self.turn = anyio.Event()
        self.written = anyio.Event()


class _Group:
    """The writes waiting to go out, whether a statement is on its way (one at a time: a
    second beside it carried fewer rows for more CPU per job and no more jobs/s, and a lane of
    their own for response ids did not shorten a create's unrecorded window; see
    benchmarks/README.md, 2026-12-04), and the batch each key's write is in until it is back."""

    __slots__ = ("busy", "keys", "waiting")

    def __init__(self) -> None:
        self.waiting = _Batch()
        self.busy = False
        self.keys: dict[str, _Batch] = {}


class _OneConnection:
    """In place of the pools with ``pool=False``: one connection, lent to one call at a time,
    and made again at the next call when the server dropped it or a call left it mid-statement
    (closed, as :func:`_on_connection` closes one)."""

    __slots__ = ("_conn", "_connect", "_lock")

    def __init__(self, connect: Callable[[], Awaitable[Conn]], conn: Conn) -> None:
        self._connect = connect
        self._conn: Conn | None = conn
        self._lock = anyio.Lock()

    async def getconn(self) -> Conn:
        await self._lock.acquire()
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            return self._conn
        except BaseException:
            self._lock.release()
            raise

    async def putconn(self, conn: Conn) -> None:
        if conn.closed:
            self._conn = None
        self._lock.release()

    async def check(self) -> None:
        """As the pool's: a connection the server dropped is not lent again."""
        conn = self._conn
        if conn is not None and conn.broken:
            await conn.close()
            self._conn = None

    async def close(self, timeout: float = 0.0) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _connect_errors(pool: Pool) -> int:
    """How many of the pool's attempts to connect have failed (none without a pool)."""
    if isinstance(pool, _OneConnection):
        return 0
    return pool.get_stats().get("connections_errors", 0)


def _dropped(exc: psycopg.Error) -> bool:
    """The server had dropped the connection: the statement did not run (or was rolled back)."""
    if _pool_error(exc):
        return False
    return exc.sqlstate in _DROPPED or (
        isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None)


def _detail(exc: BaseException) -> str:
    """The first line of an error, without any password it may quote."""
    return _redacted((str(exc).strip().splitlines() or [type(exc).__name__])[0])


def _connection_kwargs(given: dict[str, Any], *, timeout: float,
                       connect_timeout: float) -> dict[str, Any]:
    """psycopg's connection arguments: autocommit, and libpq settings the URL leaves out."""
    defaults: dict[str, Any] = {
        # libpq counts whole seconds, and 2 at least.
        "connect_timeout": max(2, math.ceil(connect_timeout)),
        # A peer that vanished (a machine that died, a dropped route) is found within about a
        # minute when idle, and within the timeout when data is unacknowledged.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": int((timeout + min(_MARGIN, timeout)) * 1000),
    }
    return {"autocommit": True, **{k: v for k, v in defaults.items() if k not in given}}


def _record(row: Sequence[Any]) -> Record:
    (key, digest, request, state, response_id, status, body, error, error_code, http_status,
     request_id, resubmits, created, updated) = row
    return Record(
        key=key, digest=digest, request=bytes(request), state=state, response_id=response_id,
        status=status, body=None if body is None else bytes(body), error=error,
        error_code=error_code, http_status=http_status, request_id=request_id,
        resubmits=resubmits, created=created, updated=updated,
    )

