"""SQLiteLedger: the journal as one SQLite file, created and upgraded on first use.

sqlite3 blocks, so every call runs in a worker thread, one at a time per ledger, and every
write is one ``BEGIN IMMEDIATE`` transaction committed before the call returns. The statements
live in :mod:`._sqlite_queries`, the error messages in :mod:`._sqlite_errors`.
"""

from __future__ import annotations

import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import anyio
import anyio.to_thread

from . import _sqlite_errors as errors
from . import _sqlite_queries as q
from ._base import Claim, ClaimOutcome, LedgerError, Outcome, Record
from ._hops import Hops
from ._outbox import Notice
from ._rescue import Rescue
from ._rules import claim_outcome, state_after, unclaimed
from ._sqlite_busy import BUSY_SLICE as _BUSY_SLICE
from ._sqlite_busy import BUSY_TIMEOUT as _BUSY_TIMEOUT
from ._sqlite_busy import Connection as _Connection
from ._sqlite_busy import begin as _begin
from ._sqlite_outbox import SQLiteOutbox, add_notice

if TYPE_CHECKING:
    from ._lock import ExclusiveLock
    from ._overview import Overview

__all__ = ["SQLiteLedger", "reader_mode", "records_of"]

T = TypeVar("T")


def reader_mode(real: str, *, unwritable: str = "ro") -> str:
    """The ``mode=`` a reader that writes nothing (``PRAGMA query_only``: ``asyncbg status``,
    the dashboard) opens the journal at ``real`` (its real path) with. ``rw`` when nobody is
    on it: the close of the last connection removes the ``-wal`` and ``-shm`` that reading a
    WAL journal makes (a read-only connection leaves them behind); a writer that comes
    meanwhile is served as by any reader, and its files are its own. ``ro`` when a writer is
    there (or a crashed one's log): touch nothing. ``unwritable`` when its directory cannot
    be written (no -wal or -shm can be made there, nor removed)."""
    if not os.access(os.path.dirname(real), os.W_OK):
        return unwritable
    if any(os.path.lexists(real + end) for end in ("-wal", "-shm", "-journal")):
        return "ro"
    return "rw"

#: ``PRAGMA quick_check`` reads the whole file (about 1.5 s per 100 MB from a cold disk), so on
#: open it runs only up to this size; past it, corruption surfaces as a LedgerError on use.
_QUICK_CHECK_MAX_BYTES = 32 << 20
#: A claim that finds its key recorded reads this many records claimed after it, in claim
#: order: a rerun claims its keys in the order of the first run, and the next claims are then
#: answered without a trip to the worker thread (see :meth:`SQLiteLedger.claim`) ...
_READ_AHEAD = 256
#: ... for this many seconds after the read, at most.
_READ_AHEAD_FRESH = 2.0
_AHEAD = f"SELECT {q._COLUMNS} FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?"


class SQLiteLedger(SQLiteOutbox):
    """A :class:`Ledger` in an SQLite file at ``path``, created owner-only (0600) if missing.

    An existing file is never truncated, overwritten or chmod-ed: a file that is not an asyncbg
    journal is refused with a :class:`LedgerError`. ``exclusive=True`` allows one asyncbg run
    per journal at a time (a ``flock`` on ``PATH.lock``, released when the process ends however
    it ends); a ledger opened without it, e.g. to read a journal's status, takes no such lock.

    Responses the server created that the journal could not take before a run had to stop
    are kept in ``PATH.unrecorded`` (:meth:`keep_unrecorded`) and recorded live by the next
    open, so that the next run re-attaches to them (see :mod:`._rescue`).
    """

    #: Whether opens record the ids kept in ``PATH.unrecorded`` (a shared ledger's keys are
    #: fenced by leases instead, and its workers hand back what they could not record). An
    #: exclusive open always does: nothing else is on the journal (``asyncbg cancel`` on a
    #: stopped run's journal then cancels them too).
    _keeps_unrecorded: ClassVar[bool] = True

    __slots__ = ("_ahead", "_ahead_at", "_db", "_exclusive", "_give_up_at", "_hops",
                 "_limiter", "_lock", "_opens", "_path")

    def __init__(self, path: str | os.PathLike[str], *, exclusive: bool = False) -> None:
        if not os.fspath(path):
            raise LedgerError("the journal path is empty; pass the path of a journal file")
        self._path = Path(path)
        self._exclusive = exclusive
        self._db: _Connection | None = None
        #: When waits for another program's write lock end (time.monotonic; see
        #: give_up_waits).
        self._give_up_at = math.inf
        self._lock: ExclusiveLock | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._hops: Hops[sqlite3.Connection] = Hops(self._limiter)
        self._opens = 0
        #: Records read ahead by a claim (key -> record), and when they were read.
        self._ahead: dict[str, Record] = {}
        self._ahead_at = 0.0

    def __repr__(self) -> str:
        return f"SQLiteLedger({str(self._path)!r}, exclusive={self._exclusive})"

    @property
    def location(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        # Opens nest: a caller that opened the ledger (to hold its lock, or read it after a
        # run) can hand it to a manager, which opens and closes it again around its block.
        if self._db is not None:
            self._opens += 1
            return
        await anyio.to_thread.run_sync(self._open_sync, limiter=self._limiter)
        self._opens = 1

    async def close(self) -> None:
        if self._opens > 1:
            self._opens -= 1
            return
        self._opens = 0
        db, self._db = self._db, None
        lock, self._lock = self._lock, None
        try:
            if db is not None:
                await anyio.to_thread.run_sync(db.close, limiter=self._limiter)
                if self._exclusive:
                    await anyio.to_thread.run_sync(Rescue(self._path).release)
        finally:
            if lock is not None:
                lock.release()

    async def claim(self, key: str, digest: str, request: bytes) -> Claim:
        """Claim ``key``. A claim that writes nothing (the key is live, done, or recorded for
        another request) may be answered from records a recent claim read ahead: a rerun of
        10,000 jobs then costs a few dozen trips to the worker thread, not 10,000."""
        old = self._ahead.pop(key, None)
        if old is not None and time.monotonic() - self._ahead_at < _READ_AHEAD_FRESH:
            outcome = claim_outcome(old.state, old.digest, digest)
            if outcome in (ClaimOutcome.RESUME, ClaimOutcome.DONE, ClaimOutcome.MISMATCH) and (
                    old.request or outcome is ClaimOutcome.MISMATCH):
                return Claim(outcome, old)

        def claim(db: sqlite3.Connection) -> tuple[Claim, list[Record]]:
            made = _claim(db, key, digest, bytes(request))
            if made.outcome is ClaimOutcome.NEW:
                return made, []  # a first run: nothing to read ahead
            seq = db.execute("SELECT seq FROM jobs WHERE key = ?", (key,)).fetchone()[0]
            return made, [_record(r) for r in db.execute(_AHEAD, (seq, _READ_AHEAD))]

        made, ahead = await self._call(claim)
        if ahead:
            self._ahead = {r.key: r for r in ahead}
            self._ahead_at = time.monotonic()
        return made

    async def sending(self, key: str, *, resubmit: bool) -> None:
        self._ahead.pop(key, None)
        args = (1 if resubmit else 0, time.time(), key)
        await self._call(lambda db: self._update(db, key, q.SENDING, args))

    async def record(self, key: str, outcome: Outcome) -> None:
        self._ahead.pop(key, None)
        state = state_after(outcome)
        now = time.time()
        o = outcome
        args: tuple[Any, ...]
        if state == "live":
            sql, args = q.RECORD_LIVE, (o.response_id, o.status, now, key)
        else:
            sql = q.RECORD_TERMINAL
            args = (state, o.response_id, o.status, o.body, o.error, o.error_code,
                    o.http_status, o.request_id, now, key)
        await self._call(lambda db: self._update(db, key, sql, args, event=(key, o.status, now),
                                                 notice=o.notification))

    async def get(self, key: str) -> Record | None:
        def get(db: sqlite3.Connection) -> Record | None:
            row = db.execute(q.GET, (key,)).fetchone()
            return None if row is None else _record(row)

        return await self._call(get)

    async def records(self) -> list[Record]:
        return await self._call(records_of)

    async def resubmits(self) -> int:
        return await self._call(lambda db: int(db.execute(q.RESUBMITS).fetchone()[0]))

    async def live_records(self) -> list[Record]:
        """The live records in claim order, through the index of live rows."""
        return await self._call(lambda db: [_record(r) for r in db.execute(q.LIVE_RECORDS)])

    def give_up_waits(self, within: float) -> None:
        """Waits for another program's write lock end within ``within`` seconds from now (0:
        at once), the wait under way included; a write that finds the file locked after that
        fails at once (:class:`~asyncbg.LedgerUnavailable`), one that finds it free goes
        through. For a process that is leaving: SQLite's own wait, 5 s a write in a worker
        thread, cannot be cut short, and a stopping fleet worker made several of them one
        after another."""
        self._give_up_at = time.monotonic() + max(within, 0.0)
        if self._db is not None:
            self._db.give_up_at = self._give_up_at

    @property
    def locked(self) -> bool:
        """Whether the last write found the file locked by another program writing to it (and
        waited, or gave up), and none has got through since."""
        return self._db is not None and self._db.locked

    async def overview(self) -> Overview | None:
        """What ``asyncbg status`` shows, from counters and indexes (see :mod:`._overview`);
        None when the file has no counters."""
        from ._overview import sqlite_overview

        return await self._call(sqlite_overview)

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise RuntimeError(
                f"the ledger {self.location} is not open; call `await ledger.open()` first"
            )

        def run(db: sqlite3.Connection) -> T:
            try:
                return fn(db)
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from exc

        # Calls that arrive while one runs share the next trip to the worker thread.
        return await self._hops.call(db, run)

    def _error(self, exc: sqlite3.Error) -> LedgerError:
        waited = getattr(exc, "asyncbg_waited", _BUSY_TIMEOUT)  # see _begin
        return errors.from_sqlite(exc, self.location, busy_timeout=waited)

    def _update(
        self, db: sqlite3.Connection, key: str, sql: str, args: tuple[Any, ...],
        *, event: tuple[str, str, float] | None = None, notice: Notice | None = None,
    ) -> None:
        with _transaction(db):
            if db.execute(sql, args).rowcount == 0:
                raise unclaimed(key, self.location)
            if event is not None:
                db.execute(q.EVENT, event)
            if notice is not None:  # the outcome and its notification: one transaction
                add_notice(db, key, notice, event[2] if event else time.time())

    def _open_sync(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.from_os(exc, self.location) from exc
        lock = None
        if self._exclusive:
            from ._lock import ExclusiveLock  # fcntl: POSIX only, so imported when asked for

            # Beside the real file: two paths to one journal (a symlink) share one lock.
            lock_path = Path(os.path.realpath(self._path) + ".lock")
            lock = ExclusiveLock.acquire(lock_path, self.location)
        try:
            created = self._make_file()
            try:
                db = sqlite3.connect(
                    self._path, timeout=_BUSY_TIMEOUT, isolation_level=None,
                    check_same_thread=False, factory=_Connection,
                )
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from exc
            try:
                db.give_up_at = self._give_up_at
                self._prepare(db, created)
                if self._keeps_unrecorded or self._exclusive:
                    self._adopt_kept(db)
                # From now on a write waits for the lock in slices (see _begin); the open's
                # own statements (a new file's switch to WAL) had SQLite's whole wait.
                db.execute(f"PRAGMA busy_timeout = {int(_BUSY_SLICE * 1000)}")
            except BaseException:
                db.close()
                raise
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        self._db, self._lock = db, lock

    def _adopt_kept(self, db: sqlite3.Connection) -> None:
        """Record the responses a stopped run kept in ``PATH.unrecorded`` (a create whose
        answer the journal could not take), then clear them; a run reserves the file's space
        for the next time."""
        rescue = Rescue(self._path)
        try:
            # A fleet worker's lines (with an epoch) are for the next worker, which fences them
            # by the leases (SharedSQLiteLedger.adopt_kept): a run leaves them where they are.
            kept = [k for k in rescue.entries() if k.epoch is None]
        except OSError as exc:
            raise errors.from_os(exc, str(rescue.path)) from exc
        if kept:
            now = time.time()
            try:
                with _transaction(db):
                    for key, rid, *_ in kept:
                        if db.execute(q.ADOPT_KEPT, (rid, now, key)).rowcount:
                            db.execute(q.EVENT, (key, "in_progress", now))
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from exc
            try:
                rescue.remove(kept)
            except OSError as exc:
                raise errors.from_os(exc, str(rescue.path)) from exc
        if self._exclusive:
            rescue.reserve()

    async def keep_unrecorded(self, pairs: list[tuple[str, str]]) -> Path:
        """Keep the (key, response id) of responses created but not recorded where the next
        open of this journal records them; the file's path. Raises :class:`LedgerError`."""
        rescue = Rescue(self._path)
        try:
            await anyio.to_thread.run_sync(rescue.keep, pairs)
        except OSError as exc:
            raise LedgerError(f"{rescue.path} could not be written ({exc.strerror or exc})"
                              ) from exc
        return rescue.path

    def _make_file(self) -> bool:
        """Create the file owner-only before SQLite would (with the umask's mode); True if new."""
        try:
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                st = self._path.stat()
            else:
                try:
                    os.fchmod(fd, 0o600)  # ours, just made: owner-only whatever the umask
                finally:
                    os.close(fd)
                return True
        except OSError as exc:
            raise errors.from_os(exc, self.location) from exc
        if not stat.S_ISREG(st.st_mode):
            raise errors.not_a_file(self.location)
        if st.st_size == 0:
            raise errors.empty(self.location)
        return False

    def _prepare(self, db: sqlite3.Connection, created: bool) -> None:
        """Check what the file is, then create or upgrade the schema in one transaction."""
        try:
            self._inspect(db)  # before anything is written: a foreign file stays untouched
            if not created and self._path.stat().st_size <= _QUICK_CHECK_MAX_BYTES:
                problems = [row[0] for row in db.execute(q.QUICK_CHECK)]
                if problems != ["ok"]:
                    raise self._error(sqlite3.DatabaseError(
                        f"database disk image is malformed: {problems[0]}"
                    ))
            for pragma in q.CONNECTION_SETUP:
                db.execute(pragma)
            with _transaction(db):
                kind = self._inspect(db)  # again, under the write lock: another opener may
                if kind == "empty":  # have set it up in the meantime
                    for sql in (*q.CREATE_V2, *q.V2_INDEXES):
                        db.execute(sql)
                elif kind == "v1":
                    _upgrade_v1(db)
                if kind in ("empty", "v1", "v2"):  # v1 is v2 by now: add the leases
                    for sql in q.UPGRADE_V3:
                        db.execute(sql)
                if kind != "current":  # and the outbox
                    for sql in q.UPGRADE_V4:
                        db.execute(sql)
                if db.execute(q.HAS_COUNTS).fetchone() is None:  # counters for readers
                    for sql in q.CREATE_COUNTS:
                        db.execute(sql)
                if db.execute(q.HAS_TALLIES).fetchone() is None:  # and for `asyncbg status`
                    for sql in q.CREATE_TALLIES:
                        db.execute(sql)
                # Written even when already there: a real write, so that a read-only journal
                # is refused now rather than at the first claim.
                for sql in q.V2_MARK:
                    db.execute(sql)
                if self._exclusive:
                    # One run at a time holds this journal: a delivery another sender had taken
                    # is a dead run's (killed mid-post), not one to wait a lease out for. At
                    # worst (`asyncbg notify` on it meanwhile) it is posted twice: deliveries
                    # are at least once, each with its webhook-id for the receiver to dedupe.
                    db.execute(q.OUTBOX_RELEASE_ALL)
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from exc
        except OSError as exc:
            raise errors.from_os(exc, self.location) from exc

    def _inspect(self, db: sqlite3.Connection
                 ) -> Literal["empty", "v1", "v2", "v3", "current"]:
        application_id = int(db.execute(q.READ_APPLICATION_ID).fetchone()[0])
        version = int(db.execute(q.READ_USER_VERSION).fetchone()[0])
        tables = [row[0] for row in db.execute(q.READ_TABLES)]
        if application_id == q.APPLICATION_ID:
            if version > q.SCHEMA_VERSION:
                raise errors.too_new(self.location, version, q.SCHEMA_VERSION)
            if version == q.SCHEMA_VERSION:
                return "current"
            if version in (2, 3):
                return "v2" if version == 2 else "v3"
        elif application_id == 0 and version == 0:
            if not tables:
                return "empty"
            if sorted(tables) == ["events", "jobs"] and (
                _columns(db, "jobs") == q.V1_JOBS_COLUMNS
                and _columns(db, "events") == q.V1_EVENTS_COLUMNS
            ):
                return "v1"
        raise errors.foreign(self.location, tables, application_id, version)


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    _begin(db)
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute(q.ROLLBACK)
        raise
    db.execute(q.COMMIT)


def _claim(db: sqlite3.Connection, key: str, digest: str, request: bytes) -> Claim:
    now = time.time()
    with _transaction(db):
        if db.execute(q.CLAIM_INSERT, (key, digest, request, now, now)).rowcount == 1:
            return Claim(ClaimOutcome.NEW, _record(db.execute(q.GET, (key,)).fetchone()))
        old = _record(db.execute(q.GET, (key,)).fetchone())
        outcome = claim_outcome(old.state, old.digest, digest)
        if outcome is ClaimOutcome.NEW:
            db.execute(q.CLAIM_RESET, (digest, request, now, key))
        elif outcome is ClaimOutcome.RESEND:
            db.execute(q.CLAIM_RESEND, (request, now, key))
        elif outcome is not ClaimOutcome.MISMATCH and not old.request:
            # A record upgraded from a version 1 journal has no request yet: fill it in.
            db.execute(q.CLAIM_FILL_REQUEST, (request, key))
        else:
            return Claim(outcome, old)
        return Claim(outcome, _record(db.execute(q.GET, (key,)).fetchone()))


def _upgrade_v1(db: sqlite3.Connection) -> None:
    for sql in (*q.ADD_V2_COLUMNS, q.BLOB_BODIES):
        db.execute(sql)
    keys = [row[0] for row in db.execute(q.KEYS_IN_CLAIM_ORDER)]
    db.executemany(q.SET_SEQ, ((seq, key) for seq, key in enumerate(keys, 1)))
    for sql in q.V2_INDEXES:
        db.execute(sql)


def _columns(db: sqlite3.Connection, table: str) -> frozenset[str]:
    return frozenset(row[0] for row in db.execute(q.READ_COLUMNS, (table,)))


def _blob(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def records_of(db: sqlite3.Connection) -> list[Record]:
    """Every record of the journal open on ``db``, in claim order."""
    return [_record(r) for r in db.execute(q.RECORDS)]


def _record(row: tuple[Any, ...]) -> Record:
    (key, digest, request, state, response_id, status, body, error, error_code, http_status,
     request_id, resubmits, created, updated) = row
    return Record(
        key=key, digest=digest, request=_blob(request) or b"", state=state,
        response_id=response_id, status=status, body=_blob(body), error=error,
        error_code=error_code, http_status=http_status, request_id=request_id,
        resubmits=resubmits, created=created, updated=updated,
    )
