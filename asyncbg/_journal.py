"""The durable journal: an SQLite file that lets a new process re-attach instead of paying twice.

Write order, so that a SIGKILL at any instant never leaves a recorded response unknown:

1. before a create is sent, the job's row is committed in state ``sending``;
2. the create's answer (the response id) is committed before anything else happens;
3. every status change is committed as it is seen; the final Response JSON is committed the
   moment the terminal status is seen, before the job is reported done.

The one window that cannot be closed lies between 1 and 2: the request has left but its id is
not yet written. A job found in ``sending`` on resume is sent again, counted in ``resubmits``
and logged as a possible duplicate.

sqlite3 is blocking, so every call runs in a worker thread, one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ._errors import AsyncbgError

__all__ = ["Journal", "JournalMismatchError", "JournalRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key         TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    state       TEXT NOT NULL,          -- sending | accepted | done | local
    response_id TEXT,
    status      TEXT NOT NULL,
    response    TEXT,                   -- the last Response JSON, as the server sent it
    error       TEXT,
    resubmits   INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL,
    updated     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY,
    key    TEXT NOT NULL,
    status TEXT NOT NULL,
    at     REAL NOT NULL
);
"""


class JournalMismatchError(AsyncbgError, ValueError):
    """A key already in the journal was submitted with a different request."""


@dataclass(frozen=True, slots=True)
class JournalRow:
    """What the journal knows of one key."""

    key: str
    digest: str
    state: str
    response_id: str | None
    status: str
    response: dict[str, Any] | None
    error: str | None
    resubmits: int


def digest(params: dict[str, Any]) -> str:
    """A stable digest of a request: SHA-256 of its canonical JSON."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Journal:
    """An SQLite journal of jobs. Open it with ``await journal.open()`` (the manager does)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open_sync, limiter=self._limiter)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file ourselves, owner-only, before sqlite does with the umask's mode.
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives a killed process (the WAL is in the OS's hands once written); only a
        # power loss could drop the last commits.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await anyio.to_thread.run_sync(db.close, limiter=self._limiter)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the journal is not open")
        return self._db

    async def _run(self, sql: str, *args: Any) -> None:
        db = self._conn()

        def run() -> None:
            with db:  # one transaction, committed on exit
                db.execute(sql, args)

        await anyio.to_thread.run_sync(run, limiter=self._limiter)

    async def get(self, key: str) -> JournalRow | None:
        db = self._conn()

        def fetch() -> tuple[Any, ...] | None:
            cur = db.execute(
                "SELECT key, digest, state, response_id, status, response, error, resubmits "
                "FROM jobs WHERE key = ?",
                (key,),
            )
            row: tuple[Any, ...] | None = cur.fetchone()
            return row

        row = await anyio.to_thread.run_sync(fetch, limiter=self._limiter)
        if row is None:
            return None
        return JournalRow(
            row[0], row[1], row[2], row[3], row[4],
            json.loads(row[5]) if row[5] else None, row[6], row[7],
        )

    async def sending(self, key: str, request_digest: str, *, resubmit: bool) -> None:
        """Step 1: commit that a create is about to be sent."""
        now = time.time()
        await self._run(
            "INSERT INTO jobs (key, digest, state, status, created, updated) "
            "VALUES (?, ?, 'sending', 'pending', ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET state = 'sending', response_id = NULL, "
            "status = 'pending', response = NULL, error = NULL, "
            "resubmits = resubmits + ?, updated = excluded.updated",
            key, request_digest, now, now, 1 if resubmit else 0,
        )

    async def status(
        self, key: str, response_id: str | None, status: str, raw: bytes | None,
        *, terminal: bool, error: str | None = None,
    ) -> None:
        """Steps 2 and 3: commit the response id, a status change, or the final JSON.

        ``raw`` is the final answer's body as the server sent it (kept only when terminal).
        """
        db = self._conn()
        now = time.time()
        state = ("done" if response_id else "local") if terminal else "accepted"
        body = raw.decode() if terminal and raw is not None else None

        def run() -> None:
            with db:
                db.execute(
                    "UPDATE jobs SET state = ?, response_id = ?, status = ?, "
                    "response = COALESCE(?, response), error = ?, updated = ? WHERE key = ?",
                    (state, response_id, status, body, error, now, key),
                )
                db.execute("INSERT INTO events (key, status, at) VALUES (?, ?, ?)",
                           (key, status, now))

        await anyio.to_thread.run_sync(run, limiter=self._limiter)

    async def resubmits(self) -> int:
        """How many creates were sent again after a crash in the create window."""
        db = self._conn()

        def count() -> int:
            return int(db.execute("SELECT COALESCE(SUM(resubmits), 0) FROM jobs").fetchone()[0])

        return await anyio.to_thread.run_sync(count, limiter=self._limiter)
