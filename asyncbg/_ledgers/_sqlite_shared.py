"""SharedSQLiteLedger: one SQLite journal that several processes on one machine share.

The same leases, epochs and rules as the PostgreSQL ledger (see :mod:`._shared`), kept in the
version 3 columns of the journal and in what a shared journal adds on open (``sent_epoch`` and
the partial indexes claims read: see :mod:`._sqlite_queries`). SQLite has no row locks: a
whole-file write lock taken with ``BEGIN IMMEDIATE`` serialises acquires (and every other
write), which for processes on one machine costs microseconds. The statements are in
:mod:`._sqlite_queries`.

Why not on :class:`SQLiteLedger` itself: with leases, a key claimed by a process that was just
killed is another owner's until the lease runs out, so an ``asyncbg run`` restarted at once would
follow its own dead predecessor for 30 s instead of resuming at once. One run per journal needs
no leases; a fleet does.

The sets of held keys live on the event loop's side: the functions run in a worker thread and
return what they did; the coroutines update the sets.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio

from .. import _log
from . import _sqlite_queries as q
from ._base import Claim, ClaimOutcome, LedgerError, Outcome, Record
from ._outbox import Notice
from ._rescue import Adoption, Rescue, forget_kept, keep_in, to_adopt, verdict
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
from ._sqlite import SQLiteLedger, _record, _transaction
from ._sqlite_outbox import add_notice

__all__ = ["SharedSQLiteLedger", "records_page", "used_by_a_fleet", "workers_of"]

T = TypeVar("T")

#: Workers not seen for this long are deleted from the table when a process registers.
_FORGET_AFTER = 86400.0


class SharedSQLiteLedger(SQLiteLedger):
    """A :class:`~asyncbg._ledgers._shared.SharedLedger` in the SQLite journal at ``path``.

    ``lease`` is how long the leases it takes last (seconds). Everything else is as for
    :class:`SQLiteLedger`; the file is the same kind of journal, and a plain ``SQLiteLedger``
    (``asyncbg status``, say) can read it.
    """

    __slots__ = ("_acquired", "_digests", "_held", "_owner", "_registered", "lease")
    _keeps_unrecorded = False

    def __init__(self, path: str | os.PathLike[str], *, exclusive: bool = False,
                 lease: float = DEFAULT_LEASE, owner: str | None = None) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be a positive number of seconds, got {lease!r}")
        super().__init__(path, exclusive=exclusive)
        self.lease = lease
        self._owner = owner or new_owner()
        self._registered = False
        self._held: dict[str, int] = {}
        #: key -> the digest of the request it was claimed for (kept with its response id).
        self._digests: dict[str, str] = {}
        self._acquired: dict[str, Record] = {}

    def __repr__(self) -> str:
        return f"SharedSQLiteLedger({str(self._path)!r}, exclusive={self._exclusive})"

    @property
    def owner(self) -> str:
        return self._owner

    def held(self) -> dict[str, int]:
        return dict(self._held)

    def epoch_of(self, key: str) -> int | None:
        return self._held.get(key)

    async def open(self) -> None:
        first = self._db is None
        await super().open()
        if first:
            try:
                await self._call(_shared_schema)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await super().close()
                raise

    async def close(self) -> None:
        if self._opens == 1 and self._db is not None:
            # Hand back what is still held: another process takes it now, not after the lease.
            with anyio.move_on_after(5.0, shield=True):
                try:
                    await self.release(list(self._held))
                    if self._registered:
                        await self._call(lambda db: self._write(db, q.FORGET_WORKER,
                                                                (self._owner,)))
                except LedgerError as exc:
                    _log.warning("ledger.release_failed", ledger=self.location, error=str(exc))
            self._held.clear()
            self._digests.clear()
            self._acquired.clear()
            self._registered = False
        await super().close()

    # -- the Ledger protocol, with leases -----------------------------------------------------

    async def claim(self, key: str, digest: str, request: bytes) -> Claim:
        acquired = self._acquired.pop(key, None)
        if acquired is not None and key in self._held and acquired.digest == digest:
            # Ours since acquire(): nobody else wrote it, so the rules need no transaction.
            outcome = claim_outcome(acquired.state, acquired.digest, digest)
            if outcome in (ClaimOutcome.NEW, ClaimOutcome.RESEND, ClaimOutcome.RESUME):
                self._digests[key] = digest
                return Claim(outcome, acquired)
        claim, epoch = await self._call(lambda db: self._claim(db, key, digest, bytes(request)))
        if epoch is not None:
            self._held[key] = epoch
            self._digests[key] = digest
        return claim

    def _claim(self, db: sqlite3.Connection, key: str, digest: str,
               request: bytes) -> tuple[Claim, int | None]:
        now = time.time()
        until = now + self.lease
        with _transaction(db):
            if db.execute(q.SHARED_CLAIM_INSERT,
                          (key, digest, request, now, now, self._owner, until)).rowcount == 1:
                return Claim(ClaimOutcome.NEW, _get(db, key)), 1
            old = _get(db, key)
            owner, taken_over_at = db.execute(
                q.LEASE_OF, {"key": key, "margin": safety_margin(self.lease)}).fetchone()
            elsewhere = owner not in (None, self._owner) and (taken_over_at or 0) > now
            outcome = shared_claim_outcome(old.state, old.digest, digest,
                                           held_elsewhere=elsewhere)
            if outcome is ClaimOutcome.NEW:
                db.execute(q.CLAIM_RESET, (digest, request, now, key))
            elif outcome is ClaimOutcome.RESEND:
                db.execute(q.CLAIM_RESEND, (request, now, key))
            elif outcome is ClaimOutcome.RESUME:
                db.execute(q.CLAIM_FILL_REQUEST, (request, key))
            else:  # DONE, MISMATCH, FOLLOW: nothing changes
                return Claim(outcome, old), None
            epoch = int(db.execute(q.TAKE_LEASE, (self._owner, until, key)).fetchone()[0])
            return Claim(outcome, _get(db, key)), epoch

    async def sending(self, key: str, *, resubmit: bool) -> None:
        await self._fenced(key, q.SHARED_SENDING, (1 if resubmit else 0, time.time(), key))

    async def record(self, key: str, outcome: Outcome) -> None:
        state = state_after(outcome)
        o, now = outcome, time.time()
        if state == "live":
            await self._fenced(key, q.SHARED_RECORD_LIVE, (o.response_id, o.status, now, key),
                               event=(key, o.status, now))
            return
        await self._fenced(key, q.SHARED_RECORD_TERMINAL, (
            state, o.response_id, o.status, o.body, o.error, o.error_code, o.http_status,
            o.request_id, now, key), event=(key, o.status, now), notice=o.notification)
        self.forget((key,))  # finished: no lease to keep

    async def _fenced(self, key: str, sql: str, args: tuple[Any, ...], *,
                      event: tuple[str, str, float] | None = None,
                      notice: Notice | None = None) -> None:
        """A write checked against this instance's owner and epoch for ``key``."""
        epoch = self._held.get(key)

        def write(db: sqlite3.Connection) -> bool | None:
            """True when written; False when the lease is elsewhere; None when unclaimed."""
            with _transaction(db):
                if epoch is not None and db.execute(
                        sql, (*args, self._owner, epoch)).rowcount == 1:
                    if event is not None:
                        db.execute(q.EVENT, event)
                    if notice is not None:  # with its outcome, in one transaction
                        add_notice(db, key, notice, time.time())
                    return True
                return False if db.execute(q.EXISTS, (key,)).fetchone() else None

        written = await self._call(write)
        if written:
            return
        if written is None:
            raise unclaimed(key, self.location)
        self.forget((key,))
        raise LeaseLost(
            f"the lease on key {key!r} in {self.location} is held by another process now; this "
            "one wrote nothing and stops running it"
        )

    # -- the SharedLedger protocol ----------------------------------------------------------

    async def enqueue(self, items: Iterable[Item]) -> int:
        batch = [(key, digest, bytes(request)) for key, digest, request in items]

        def enqueue(db: sqlite3.Connection) -> int:
            now = time.time()
            with _transaction(db):
                # rowcount, not total_changes: the job_counts triggers' writes are not rows
                # of ours.
                new = db.executemany(q.ENQUEUE, ((key, digest, request, now, now)
                                                 for key, digest, request in batch)).rowcount
                if new < len(batch):  # some keys were there: each with the same request?
                    for key, digest, _ in batch:
                        if db.execute(q.DIGEST_OF, (key,)).fetchone()[0] != digest:
                            # Raised inside the transaction: everything is rolled back.
                            raise EnqueueMismatch(key, self.location)
            return new

        return await self._call(enqueue)

    async def acquire(self, limit: int, lease: float, *, live_only: bool = False
                      ) -> list[Record]:
        if limit < 1:
            return []

        def acquire(db: sqlite3.Connection) -> list[tuple[Record, int]]:
            now = time.time()
            taken = []
            with _transaction(db):  # BEGIN IMMEDIATE: the pick and the take are one step
                keys = [row[0] for row in db.execute(
                    q.ACQUIRE_LIVE if live_only else q.ACQUIRE,
                    {"now": now, "limit": limit, "margin": safety_margin(lease)}).fetchall()]
                for key in keys:
                    epoch = int(db.execute(q.TAKE_LEASE,
                                           (self._owner, now + lease, key)).fetchone()[0])
                    taken.append((_get(db, key), epoch))
            return taken

        records = []
        for record, epoch in await self._call(acquire):
            self._held[record.key] = epoch
            self._acquired[record.key] = record
            records.append(record)
        return records

    async def renew(self, keys: Collection[str], lease: float) -> set[str]:
        held = {key: self._held[key] for key in keys if key in self._held}
        first = not self._registered

        def renew(db: sqlite3.Connection) -> set[str]:
            now = time.time()
            kept = set()
            with _transaction(db):
                if first:
                    db.execute(q.FORGET_OLD_WORKERS, (now - _FORGET_AFTER,))
                db.execute(q.HEARTBEAT, (self._owner, socket.gethostname(), os.getpid(), now,
                                         now, lease))
                for key, epoch in held.items():
                    if db.execute(q.RENEW, (now + lease, key, epoch, self._owner)).rowcount:
                        kept.add(key)
            return kept

        kept = await self._call(renew)
        self._registered = True
        # Only keys still held at the same epoch: one recorded finished meanwhile is not lost.
        lost = {key for key in set(held) - kept if self._held.get(key) == held[key]}
        self.forget(lost)
        return lost

    async def release(self, keys: Collection[str]) -> None:
        held = {key: self._held[key] for key in keys if key in self._held}
        if held:
            def release(db: sqlite3.Connection) -> None:
                with _transaction(db):
                    db.executemany(q.RELEASE, [(key, epoch, self._owner)
                                               for key, epoch in held.items()])

            await self._call(release)
        self.forget(held)

    async def requeue(self, keys: Collection[str], *,
                      codes: Collection[str] | None = None) -> None:
        if keys:
            only = None if codes is None else json.dumps(sorted(codes))

            def requeue(db: sqlite3.Connection) -> None:
                now = time.time()
                with _transaction(db):
                    db.executemany(q.REQUEUE, [(now, key, self._owner, only, only)
                                               for key in keys])

            await self._call(requeue)

    async def requeue_unpaid(self, *, code: str | None = None) -> int:
        def requeue(db: sqlite3.Connection) -> int:
            with _transaction(db):
                return int(db.execute(q.REQUEUE_UNPAID, (time.time(), code, code)).rowcount)

        return await self._call(requeue)

    def rescue(self) -> Rescue:
        """Where a worker keeps the responses it could not record: ``PATH.unrecorded``, the
        file a run's journal keeps them in (see :mod:`._rescue`)."""
        return Rescue(self._path)

    async def keep_unrecorded(self, pairs: list[tuple[str, str]]) -> Path:
        """Keep the (key, response id) of responses created but not recorded, each with the
        epoch its create was sent at, for the next worker on this machine to adopt
        (:meth:`adopt_kept`); the file's path. Raises :class:`LedgerError`."""
        return await keep_in(self.rescue(), pairs, epochs=self._held, digests=self._digests,
                             note={"ledger": self.location, "owner": self._owner})

    async def adopt_kept(self, unkept: Sequence[tuple[str, str]] = ()) -> Adoption:
        """Record the responses kept by workers that left without recording them, fenced
        (see :mod:`._rescue`), and remove their lines; ``unkept``: this process's own that it
        could not keep in the file, (key, response id) sent at the epochs it holds. Raises
        :class:`LedgerError`."""
        rescue = self.rescue()
        in_file, kept = await to_adopt(rescue, unkept, self._held, self._digests)
        if not kept:
            return Adoption(rescue.path)

        def adopt(db: sqlite3.Connection) -> Adoption:
            now = time.time()
            adopted, duplicates, recorded = [], [], []
            with _transaction(db):
                for k in kept:
                    if k.epoch is not None and db.execute(q.ADOPT_KEPT_FENCED, {
                            "response_id": k.response_id, "now": now, "key": k.key,
                            "epoch": k.epoch, "digest": k.digest}).rowcount:
                        db.execute(q.EVENT, (k.key, "in_progress", now))
                        adopted.append(k)
                    elif verdict(k, db.execute(q.ROW_OF, (k.key,)).fetchone()) == "recorded":
                        recorded.append(k)
                    else:
                        duplicates.append(k)
            return Adoption(rescue.path, tuple(adopted), tuple(duplicates), tuple(recorded))

        adoption = await self._call(adopt)
        await forget_kept(rescue, in_file)
        return adoption

    async def used_by_a_fleet(self) -> bool:
        """Whether workers run (or ran) this ledger, rather than ``asyncbg run``: a key was
        ever leased."""
        return await self._call(used_by_a_fleet)

    async def workers(self) -> list[WorkerInfo]:
        return await self._call(workers_of)

    async def unfinished(self) -> int:
        """How many jobs are waiting, being sent or live: from the counters the triggers keep
        (a dozen rows at any size), or counted through an index when the file has none."""
        def unfinished(db: sqlite3.Connection) -> int:
            counted = db.execute(q.HAS_COUNTS).fetchone() is not None
            return int(db.execute(q.UNFINISHED_COUNTED if counted else q.UNFINISHED
                                  ).fetchone()[0])

        return await self._call(unfinished)

    async def wait_for_work(self, timeout: float) -> None:
        """As :meth:`PostgresLedger.wait_for_work`, without a wake-up: SQLite has no
        notifications between processes, so this is the timed poll (``timeout`` seconds)."""
        await anyio.sleep(timeout)

    def read_once(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Open the file, run ``fn`` on it in this thread, close it: for a command that reads
        once and leaves (``asyncbg status``), with no event loop to start and no trip to a
        worker thread per read. The file is checked and its schema made or upgraded first, as
        :meth:`open` does; sqlite3's errors come out as :class:`LedgerError`."""
        if self._db is not None:
            raise RuntimeError(f"the ledger {self.location} is open; read_once opens its own")
        self._open_sync()
        db, lock = self._db, self._lock
        assert db is not None
        try:
            try:
                _shared_schema(db)
                return fn(db)
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from exc
        finally:
            self._db = self._lock = None
            try:
                db.close()
            finally:
                if lock is not None:
                    lock.release()

    # -- plumbing ------------------------------------------------------------------------------

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._held.pop(key, None)
            self._digests.pop(key, None)
            self._acquired.pop(key, None)

    def abandon(self) -> None:
        self.forget(list(self._held))
        self._registered = False  # its row in the workers' table ages out

    def _write(self, db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> None:
        with _transaction(db):
            db.execute(sql, args)


async def records_page(ledger: SQLiteLedger, after: int, limit: int
                       ) -> list[tuple[int, Record]]:
    """As :meth:`PostgresLedger.records_page`, for any SQLite journal (shared or not)."""
    def page(db: sqlite3.Connection) -> list[tuple[int, Record]]:
        return [(int(row[0]), _record(row[1:]))
                for row in db.execute(q.RECORDS_PAGE, (after, limit))]

    return await ledger._call(page)


def used_by_a_fleet(db: sqlite3.Connection) -> bool:
    """:meth:`SharedSQLiteLedger.used_by_a_fleet` on the journal open on ``db``."""
    if db.execute(q.HAS_TALLIES).fetchone() is not None:  # counted: read at any size
        return bool(db.execute(q.TALLIES).fetchone()[3])
    return bool(db.execute(q.USED_BY_A_FLEET).fetchone()[0])


def workers_of(db: sqlite3.Connection) -> list[WorkerInfo]:
    """The workers alive on the journal open on ``db`` (:meth:`SharedSQLiteLedger.workers`)."""
    now = time.time()
    return [WorkerInfo(*row) for row in db.execute(q.WORKERS, (now, now))]


def _shared_schema(db: sqlite3.Connection) -> None:
    """Add what a shared journal needs to the file (see :mod:`._sqlite_queries`), once."""
    if int(db.execute(q.SHARED_SCHEMA_THERE).fetchone()[0]) == q.SHARED_SCHEMA_PARTS:
        return
    with _transaction(db):  # under the write lock: another opener may have added some
        if "sent_epoch" not in {row[0] for row in db.execute(q.READ_COLUMNS, ("jobs",))}:
            db.execute(q.ADD_SENT_EPOCH)
        for sql in q.SHARED_INDEXES:
            db.execute(sql)


def _get(db: sqlite3.Connection, key: str) -> Record:
    return _record(db.execute(q.GET, (key,)).fetchone())
