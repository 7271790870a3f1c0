"""The outbox of an SQLite journal (schema version 4): see :mod:`._outbox` for the rules.

Mixed into :class:`~asyncbg._ledgers._sqlite.SQLiteLedger` (and so into the shared one). Every
write is one statement, or one ``BEGIN IMMEDIATE`` transaction: taking deliveries picks and
leases them in one statement under the file's write lock, so two senders (two workers on one
machine, a run and ``asyncbg notify``) never take the same one. Times are ``time.time()``: one
machine, one clock.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from . import _sqlite_queries as q
from ._outbox import Delivery, Notice
from ._sqlite_busy import begin, waiting

__all__ = ["SQLiteOutbox", "add_notice", "deliveries_of"]

T = TypeVar("T")


def add_notice(db: sqlite3.Connection, key: str, notice: Notice, now: float) -> None:
    """Write ``notice`` inside the caller's transaction (the outcome's own)."""
    db.execute(q.OUTBOX_ADD, (notice.id, key, notice.url, notice.body, now, now))


class SQLiteOutbox:
    """The :class:`~asyncbg._ledgers._outbox.Outbox` methods of an SQLite journal."""

    __slots__ = ()

    if TYPE_CHECKING:
        async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    async def take_deliveries(self, url: str | None, limit: int, *, owner: str,
                              lease: float, done: Collection[str] = ()) -> list[Delivery]:
        if limit < 1 and not done:
            return []

        def take(db: sqlite3.Connection) -> list[Delivery]:
            # Two statements, each its own transaction: the deletes need not wait for the take,
            # and each statement is one hand-over of the GIL, which a busy event loop makes
            # dear (hence no executemany either).
            if done:
                ids = json.dumps(list(done))
                waiting(db, lambda: db.execute(q.OUTBOX_DONE, (ids,)))
            if limit < 1:
                return []
            sql = q.OUTBOX_TAKE_ANY if url is None else q.OUTBOX_TAKE
            rows = waiting(db, lambda: db.execute(
                sql, (time.time(), url, owner, lease, limit)).fetchall())
            rows.sort(key=lambda row: row[-1])  # due first
            return [_delivery(row[:-1]) for row in rows]

        return await self._call(take)

    async def deliveries_done(self, ids: Collection[str]) -> None:
        if ids:
            ids_json = json.dumps(list(ids))
            await self._call(lambda db: waiting(db, lambda: db.execute(q.OUTBOX_DONE,
                                                                        (ids_json,))))

    async def release_deliveries(self, ids: Collection[str], *, owner: str) -> None:
        if ids:
            ids_json = json.dumps(list(ids))
            await self._call(lambda db: waiting(db, lambda: db.execute(
                q.OUTBOX_RELEASE, (ids_json, owner))))

    async def delivery_failed(self, id: str, *, owner: str, retry_in: float | None,
                              error: str, http_status: int | None) -> None:
        def failed(db: sqlite3.Connection) -> None:
            now = time.time()
            state, next_at = ("failed", now) if retry_in is None else ("pending", now + retry_in)
            with _write(db):
                db.execute(q.OUTBOX_FAILED, (state, next_at, error, http_status, id, owner))

        await self._call(failed)

    async def deliver_now(self, url: str) -> int:
        return await self._call(lambda db: waiting(db, lambda: int(
            db.execute(q.OUTBOX_DELIVER_NOW, (time.time(), url)).rowcount)))

    async def fail_deliveries(self, url: str, *, older_than: float | None, error: str) -> int:
        def fail(db: sqlite3.Connection) -> int:
            cutoff = None if older_than is None else time.time() - older_than
            with _write(db):
                return int(db.execute(q.OUTBOX_FAIL_ALL, (error, url, cutoff)).rowcount)

        return await self._call(fail)

    async def retry_failed_deliveries(self, url: str | None) -> int:
        def retry(db: sqlite3.Connection) -> int:
            now = time.time()
            with _write(db):
                return int(db.execute(q.OUTBOX_RETRY_FAILED, (now, now, url)).rowcount)

        return await self._call(retry)

    async def next_delivery(self, url: str | None, *, held: bool = True) -> float | None:
        def next_(db: sqlite3.Connection) -> float | None:
            now = time.time()
            sql = q.OUTBOX_NEXT_ANY if url is None else q.OUTBOX_NEXT
            at = db.execute(sql, (url, 1 if held else 0, now)).fetchone()[0]
            return None if at is None else max(float(at) - now, 0.0)

        return await self._call(next_)

    async def deliveries(self) -> list[Delivery]:
        return await self._call(deliveries_of)


def deliveries_of(db: sqlite3.Connection) -> list[Delivery]:
    """The outbox of the journal open on ``db`` (what :meth:`SQLiteOutbox.deliveries` reads)."""
    return [_delivery(row) for row in db.execute(q.OUTBOX_ALL, (time.time(),))]


@contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction (as ``_sqlite._transaction``, which imports this)."""
    begin(db)
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute(q.ROLLBACK)
        raise
    db.execute(q.COMMIT)


def _delivery(row: tuple[Any, ...]) -> Delivery:
    id_, key, url, body, state, attempts, age, error, http_status = row
    return Delivery(id=id_, key=key, url=url, body=bytes(body), state=state, attempts=attempts,
                    age=float(age), error=error, http_status=http_status)
