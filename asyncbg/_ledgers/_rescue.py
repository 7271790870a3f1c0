"""Where a journal keeps the ids of responses it could not take: ``JOURNAL.unrecorded``.

A create's answer is recorded in the journal before anything else happens to it. When the journal
cannot be written (its disk is full, say) and the run has to stop before it can, the responses
the server created are paid for and would be created again by the next run, which finds only
their ``sending`` records. So a run keeps their ``(key, response id)`` here, and the next open of
the journal records them (``live``), and the run re-attaches to them instead of sending again.

A full disk has no room for a new file either, so an exclusive open (a run) reserves the space
first: the file is allocated at :data:`RESERVE` bytes of zeros, its lines are written over the
zeros, and the allocation makes that write need no new blocks. The file is removed when the
journal closes with nothing kept in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["RESERVE", "SUFFIX", "Rescue"]

#: Bytes reserved for kept ids: about 800 lines of a key and a response id.
RESERVE = 64 << 10
SUFFIX = ".unrecorded"


class Rescue:
    """The ``.unrecorded`` file beside a journal (beside the real file, as the lock is)."""

    __slots__ = ("path",)

    def __init__(self, journal: Path) -> None:
        self.path = Path(os.path.realpath(journal) + SUFFIX)

    def reserve(self) -> None:
        """Make sure the file exists with :data:`RESERVE` bytes allocated (best effort: on a
        disk already full it stays as it is, and :meth:`keep` tries to write all the same)."""
        try:
            fd = self._open(create=True)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size < RESERVE:
                os.posix_fallocate(fd, 0, RESERVE)
        except OSError:
            pass
        finally:
            os.close(fd)

    def read(self) -> list[tuple[str, str]]:
        """The ids kept, as (key, response id); [] without a file. A line cut short by a crash
        or not in the format is skipped (its response is then counted a possible duplicate,
        as without this file)."""
        try:
            fd = self._open(create=False)
        except FileNotFoundError:
            return []
        try:
            data = _used(fd)
        finally:
            os.close(fd)
        kept: list[tuple[str, str]] = []
        for line in data.splitlines():
            try:
                item = json.loads(line)
                key, rid = item["key"], item["response_id"]
            except (ValueError, TypeError, KeyError):
                continue
            if isinstance(key, str) and isinstance(rid, str) and rid:
                kept.append((key, rid))
        return kept

    def keep(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Write ``pairs`` after the lines already kept, over the reserved zeros, and sync.
        Raises :class:`OSError` when they could not be written."""
        text = b"".join(json.dumps({"key": key, "response_id": rid}).encode() + b"\n"
                        for key, rid in pairs)
        fd = self._open(create=True)
        try:
            at = len(_used(fd))
            view = memoryview(text)
            while view:
                view = view[os.pwrite(fd, view, at + len(text) - len(view)):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def clear(self) -> None:
        """The ids kept were recorded: zero them, keeping the reservation (and sync)."""
        try:
            fd = self._open(create=False)
        except FileNotFoundError:
            return
        try:
            used = len(_used(fd))
            if used:
                os.pwrite(fd, bytes(used), 0)
                os.fsync(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """The journal closes: remove the file unless it keeps ids."""
        try:
            fd = self._open(create=False)
        except OSError:
            return
        try:
            empty = not _used(fd)
        finally:
            os.close(fd)
        if empty:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _open(self, *, create: bool) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        fd = os.open(self.path, flags, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{self.path} is not a regular file")
        return fd


def _used(fd: int) -> bytes:
    """The file's lines: everything before the first zero byte of the reservation."""
    data = b""
    while chunk := os.pread(fd, 1 << 16, len(data)):
        data += chunk
        if b"\0" in chunk:
            break
    return data.split(b"\0", 1)[0]
