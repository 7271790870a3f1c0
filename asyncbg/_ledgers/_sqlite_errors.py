"""What an SQLite or file error means for a journal, said in one line with what to do."""

from __future__ import annotations

import errno
import sqlite3

from ._base import LedgerError, LedgerUnavailable

__all__ = ["empty", "foreign", "from_os", "from_sqlite", "not_a_file", "read_only", "too_new"]


def from_sqlite(exc: sqlite3.Error, location: str, *, busy_timeout: float) -> LedgerError:
    """The :class:`LedgerError` for an error SQLite raised on ``location``.

    Decided by the SQLite error code (``sqlite_errorname``), the message as a fallback.
    """
    name = getattr(exc, "sqlite_errorname", None) or ""
    text = str(exc)
    if name == "SQLITE_NOTADB" or "file is not a database" in text:
        return LedgerError(
            f"{location} is not an SQLite database, so not an asyncbg journal; pass the path of "
            "a journal, or a new path to start one"
        )
    if name.startswith("SQLITE_CORRUPT") or "malformed" in text:
        return LedgerError(
            f"{location} is corrupt ({text}); restore it from a backup, or delete it to start "
            "over (jobs it recorded as finished would then be sent and paid for again)"
        )
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")) or "readonly" in text:
        return read_only(location, text)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "is locked" in text:
        return LedgerUnavailable(
            f"{location} is locked by another program writing to it (waited {busy_timeout:g} "
            "s); let it finish or stop it, then run again"
        )
    if name.startswith("SQLITE_CANTOPEN"):
        return LedgerError(
            f"{location} cannot be opened ({text}); check that the file and its directory "
            "exist and are readable and writable (SQLite adds -wal and -shm files beside it)"
        )
    if name.startswith("SQLITE_FULL"):
        return LedgerUnavailable(f"{location}: the disk is full; free some space and run again")
    if name.startswith("SQLITE_IOERR"):
        return LedgerUnavailable(
            f"{location}: disk I/O error ({text}); check the disk, then run again"
        )
    return LedgerError(f"{location}: SQLite error {name or type(exc).__name__}: {text}")


def from_os(exc: OSError, location: str) -> LedgerError:
    """The :class:`LedgerError` for an error of the file system around ``location``."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return read_only(location, exc.strerror or str(exc))
    if exc.errno == errno.EISDIR:
        return not_a_file(location)
    return LedgerError(f"{location} cannot be opened ({exc.strerror or exc}); pass another path")


def read_only(location: str, detail: str) -> LedgerError:
    return LedgerError(
        f"{location} is read-only ({detail}): the journal, its directory and its -wal and -shm "
        "files must be writable; fix the permissions, or pass another path"
    )


def not_a_file(location: str) -> LedgerError:
    return LedgerError(
        f"{location} is a directory or a device, not a file; pass the path of a journal file"
    )


def empty(location: str) -> LedgerError:
    return LedgerError(
        f"{location} is empty (0 bytes), maybe truncated; delete it to start over, or restore "
        "it from a backup"
    )


def foreign(location: str, tables: list[str], application_id: int, version: int) -> LedgerError:
    what = f"tables: {', '.join(sorted(tables))}" if tables else (
        f"application_id {application_id}, user_version {version}"
    )
    return LedgerError(
        f"{location} is an SQLite database but not an asyncbg journal ({what}); pass another "
        "path for the journal"
    )


def too_new(location: str, version: int, known: int) -> LedgerError:
    return LedgerError(
        f"{location} was written by a newer asyncbg (journal schema version {version}; this "
        f"one knows up to {known}); upgrade asyncbg to use it"
    )
