"""Waiting for another program's write lock on a journal: up to ``BUSY_TIMEOUT`` seconds, in
slices of SQLite's own wait (``BUSY_SLICE``, the connection's busy timeout, which nothing can cut
short), between which the wait looks whether its ledger gave it up (a process that is leaving:
see ``SQLiteLedger.give_up_waits``). Every write of a journal waits here: its transactions'
``BEGIN IMMEDIATE`` (:func:`begin`) and the outbox's single statements (:func:`waiting`)."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from . import _sqlite_queries as q

#: How long a write waits for another connection's write transaction before giving up ...
BUSY_TIMEOUT = 5.0
#: ... in waits of this many seconds, SQLite's own.
BUSY_SLICE = 0.1

T = TypeVar("T")


class Connection(sqlite3.Connection):
    """A journal's connection: its waits for another program's write lock can be given up
    from the event loop's thread."""

    #: When such waits end (time.monotonic()).
    give_up_at = math.inf
    #: Whether the last write found the file locked (and none got through since).
    locked = False


def waiting(db: sqlite3.Connection, run: Callable[[], T]) -> T:
    """``run()`` (one write statement), again while another program holds the write lock, up
    to ``BUSY_TIMEOUT`` and no longer than the connection's ``give_up_at``. A wait given up
    raises SQLite's "database is locked", with how long it waited as ``asyncbg_waited``."""
    if not isinstance(db, Connection):
        return run()
    started = time.monotonic()
    while True:
        try:
            result = run()
        except sqlite3.OperationalError as exc:
            if not (getattr(exc, "sqlite_errorname", "") or "").startswith("SQLITE_BUSY"):
                raise
            db.locked = True
            now = time.monotonic()
            if now - started >= BUSY_TIMEOUT:
                raise
            if now >= db.give_up_at:
                exc.asyncbg_waited = round(now - started, 1)  # type: ignore[attr-defined]
                raise
            continue
        db.locked = False
        return result


def begin(db: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``: take the write lock, waiting for it as :func:`waiting` does."""
    waiting(db, lambda: db.execute(q.BEGIN))
