"""One run per journal: ``flock`` on a sidecar file, ``PATH.lock``, that dies with its process.

- ``flock(2)`` locks belong to the open file, so the kernel drops them when the process dies,
  however it dies: a killed run never leaves a lock that blocks the next one.
- flock and SQLite's POSIX byte-range locks are independent on Linux, so the database itself
  could carry it; but on NFS Linux emulates flock with POSIX locks, which would collide with
  SQLite's, and the sidecar holds the holder's pid, host and start time, which the next run
  reads for its message without opening the database.
- The sidecar stays after the run (emptied): deleting it would race with a run that has just
  opened it, and two runs could then each lock a different file of the same name.

POSIX only (``fcntl``); imported only when ``exclusive=True`` is asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ._base import LedgerError

__all__ = ["ExclusiveLock", "current_holder"]

_MARK = "asyncbg journal lock"


class ExclusiveLock:
    """An exclusive flock on ``path``, held until :meth:`release` or the process's end."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, journal: str) -> ExclusiveLock:
        """Lock ``path`` for the journal ``journal`` or raise :class:`LedgerError` at once."""
        try:
            fd = _open(path)
        except OSError as exc:
            raise LedgerError(
                f"cannot create the lock file {path} of {journal}: {exc.strerror}; make its "
                "directory writable, or pass another journal path"
            ) from exc
        try:
            _lock(fd, path, journal)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Unlock; safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        # Emptying the file is only tidiness: the lock, not the text, is what excludes.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock


def _open(path: Path) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    while True:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            os.fchmod(fd, 0o600)  # ours, just made: owner-only whatever the umask
            return fd
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            continue  # removed between the two calls: create it after all


def _lock(fd: int, path: Path, journal: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LedgerError(
            f"{journal} is in use by another asyncbg run ({_holder(_read(fd))}); "
            "wait for it to finish or stop it"
        ) from None
    except OSError as exc:  # e.g. ENOLCK: a file system without locks
        raise LedgerError(
            f"cannot lock {path} for {journal}: {exc.strerror}; put the journal on a local "
            "disk, or run without exclusive=True"
        ) from exc
    text = _read(fd)
    if text.strip() and _parse(text) is None:
        raise LedgerError(
            f"{path} is in the way of {journal}'s lock file and is not one; move it away, or "
            "pass another journal path"
        )
    holder = {"lock": _MARK, "pid": os.getpid(), "host": socket.gethostname(),
              "since": time.time()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
    except OSError as exc:
        raise LedgerError(
            f"cannot write the lock file {path} of {journal}: {exc.strerror}; free some space"
        ) from exc


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")


def _parse(text: str) -> dict[str, object] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    if not isinstance(holder, dict) or holder.get("lock") != _MARK:
        return None
    return holder


def _holder(text: str) -> str:
    """``pid 1234 on host, since 15:02:11`` from the lock file's text, as far as it says."""
    holder = _parse(text)
    if holder is None:  # locked, but the holder has not written itself down yet
        return "holder unknown"
    since = holder.get("since")
    when = ""
    if isinstance(since, int | float):
        fmt = "%H:%M:%S" if time.localtime(since)[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M"
        when = f", since {time.strftime(fmt, time.localtime(since))}"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{when}"


def current_holder(path: Path) -> str | None:
    """Who holds the lock ``path`` now (``pid 1234 on host, since 15:02:11``), read without
    taking it (a run starting meanwhile must not find it taken), or None when nobody does.

    A holder writes itself into the file and the file is emptied when it lets go; one killed
    on this host left its text behind, so a pid of this host that no longer runs is nobody.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    holder = _parse(text)
    if holder is None:
        return None
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
    return _holder(text)
