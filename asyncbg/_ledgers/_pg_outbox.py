"""The outbox of a PostgreSQL ledger (schema version 2): see :mod:`._outbox` for the rules.

Mixed into :class:`~asyncbg._ledgers._postgres.PostgresLedger`. Taking deliveries is one
statement that picks due rows ``FOR UPDATE SKIP LOCKED`` and leases them, as workers take jobs:
two workers never post one notification together. Times are the database's clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import _pg_queries as q
from ._outbox import Delivery

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresOutbox"]

T = TypeVar("T")


class PostgresOutbox:
    """The :class:`~asyncbg._ledgers._outbox.Outbox` methods of a PostgreSQL ledger."""

    __slots__ = ()

    if TYPE_CHECKING:
        Conn = psycopg.AsyncConnection[tuple[Any, ...]]

        async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T: ...

        async def _execute(self, conn: Conn, sql: str, args: Any = None
                           ) -> psycopg.AsyncCursor[tuple[Any, ...]]: ...

        async def _fetchone(self, conn: Conn, sql: str, args: Any = None
                            ) -> tuple[Any, ...] | None: ...

        async def _fetchall(self, conn: Conn, sql: str, args: Any = None
                            ) -> list[tuple[Any, ...]]: ...

    async def take_deliveries(self, url: str | None, limit: int, *, owner: str,
                              lease: float, done: Collection[str] = ()) -> list[Delivery]:
        if limit < 1 and not done:
            return []
        sql = q.OUTBOX_TAKE_ANY if url is None else q.OUTBOX_TAKE
        rows = await self._run(lambda c: self._fetchall(c, sql, {
            "url": url, "limit": max(limit, 0), "owner": owner, "lease": lease,
            "done": list(done)}))
        rows.sort(key=lambda row: row[-1])  # due first
        return [_delivery(row[:-1]) for row in rows]

    async def deliveries_done(self, ids: Collection[str]) -> None:
        if ids:
            await self._run(lambda c: self._execute(c, q.OUTBOX_DONE, (list(ids),)))

    async def release_deliveries(self, ids: Collection[str], *, owner: str) -> None:
        if ids:
            await self._run(lambda c: self._execute(c, q.OUTBOX_RELEASE, (list(ids), owner)))

    async def delivery_failed(self, id: str, *, owner: str, retry_in: float | None,
                              error: str, http_status: int | None) -> None:
        await self._run(lambda c: self._execute(c, q.OUTBOX_FAILED, {
            "state": "failed" if retry_in is None else "pending", "retry_in": retry_in or 0.0,
            "error": error, "http_status": http_status, "id": id, "owner": owner}))

    async def deliver_now(self, url: str) -> int:
        cur = await self._run(lambda c: self._execute(c, q.OUTBOX_DELIVER_NOW, {"url": url}))
        return max(cur.rowcount, 0)

    async def fail_deliveries(self, url: str, *, older_than: float | None, error: str) -> int:
        cur = await self._run(lambda c: self._execute(c, q.OUTBOX_FAIL_ALL, {
            "error": error, "url": url, "older_than": older_than}))
        return max(cur.rowcount, 0)

    async def retry_failed_deliveries(self, url: str | None) -> int:
        cur = await self._run(lambda c: self._execute(c, q.OUTBOX_RETRY_FAILED, {"url": url}))
        return max(cur.rowcount, 0)

    async def next_delivery(self, url: str | None, *, held: bool = True) -> float | None:
        sql = q.OUTBOX_NEXT_ANY if url is None else q.OUTBOX_NEXT
        row = await self._run(lambda c: self._fetchone(c, sql, {"url": url, "held": held}))
        return None if row is None or row[0] is None else max(float(row[0]), 0.0)

    async def deliveries(self) -> list[Delivery]:
        return [_delivery(row) for row in await self._run(
            lambda c: self._fetchall(c, q.OUTBOX_ALL))]


def _delivery(row: Sequence[Any]) -> Delivery:
    id_, key, url, body, state, attempts, age, error, http_status = row
    return Delivery(id=id_, key=key, url=url, body=bytes(body), state=state, attempts=attempts,
                    age=float(age), error=error, http_status=http_status)
