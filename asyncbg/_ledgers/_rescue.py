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

A fleet worker (:mod:`asyncbg._fleet`) keeps the same lines, with the lease epoch each create
was sent at, when it leaves holding responses its shared ledger could not take: for a shared
SQLite ledger in the same ``.unrecorded`` file, for PostgreSQL in a per-user state directory
(:func:`state_file`), a file named from a hash of the ledger's identity. Several workers on a
machine share such a file, so every change to it is made under an exclusive ``flock`` on it,
and the lines a worker adopted are removed atomically (a new file renamed over it, or the
lines zeroed from the first byte when none is left). Adopting a line twice is harmless: the
second finds the row already holding its response id.

The fleet's rule for a kept line ``(key, epoch, response id, digest)``: its row takes the id
only while it has no response id and one of these holds:

- it is ``sending`` *at that epoch* (``sent_epoch``): the kept create is the last one sent;
- it was put back to waiting (``new``: a later create that never reached the server ended
  ``local`` and was requeued, or ``asyncbg retry`` took it back), or it ended without a
  response (``local``: nothing was paid for it), or it is ``sending`` at a later epoch by a
  worker that has gone (its lease handed back or run out: most often it was stopped before
  its create left; if the create did leave, its answer was never recorded, and the row counts
  one more possible duplicate), still for the same request (``digest``, the request's
  fingerprint when the create was sent), and nobody holds a live lease on it (a holder may
  write ``sending`` and create at any moment). Creating the line again instead could only add
  a create, never save one.

The row then becomes ``live`` with no owner and its epoch is bumped, in one statement that
checks the rule again on the row as it is when locked: a worker that took the key over meanwhile
and has not sent yet is fenced off (its ``sending`` write finds the lease gone, and it sends
nothing); any worker then takes the live row and polls it. Any other row (another response id,
a row someone holds a live lease on, a row that now has another request, a finished job, a key
not in the ledger) keeps what it has: the kept response was paid
for twice and is reported as a duplicate, left running (only a user's cancel cancels a
response). A line kept without a digest (by an older asyncbg) is taken only by the first rule.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import anyio.to_thread

from .. import _log
from ._base import LedgerError, LedgerUnavailable

__all__ = [
    "RESERVE",
    "SUFFIX",
    "Adoption",
    "Kept",
    "Rescue",
    "adopt_said",
    "forget_kept",
    "keep_in",
    "read_kept",
    "say_adoption",
    "state_file",
    "to_adopt",
    "verdict",
]

#: Bytes reserved for kept ids: about 800 lines of a key and a response id.
RESERVE = 64 << 10
SUFFIX = ".unrecorded"


class Kept(NamedTuple):
    """One kept response: its key, its id, the lease epoch its create was sent at and the
    fingerprint of the request it was created for (a fleet worker's; None for a run's journal,
    which has no leases)."""

    key: str
    response_id: str
    epoch: int | None = None
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class Adoption:
    """What a fleet worker made of the lines kept in ``path`` (``adopt_kept`` of a shared
    ledger, by the rule in the module docstring)."""

    path: Path
    #: Recorded live and handed to the fleet to poll: the create that was paid is used.
    adopted: tuple[Kept, ...] = ()
    #: The row has another response id, was sent again since, is held by a live lease or has
    #: another request, or ended, or is gone: this response was paid for twice. Left running
    #: (only a user's cancel cancels one).
    duplicates: tuple[Kept, ...] = ()
    #: The row already has this response id (recorded after all, or adopted before).
    recorded: tuple[Kept, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.adopted or self.duplicates or self.recorded)

    def verdict_of(self, response_id: str) -> str | None:
        """``adopted``, ``duplicate`` or ``recorded`` for a response looked at; None if not."""
        for name, kept in (("adopted", self.adopted), ("duplicate", self.duplicates),
                           ("recorded", self.recorded)):
            if any(k.response_id == response_id for k in kept):
                return name
        return None


def verdict(kept: Kept, row: tuple[str, str | None] | None) -> str:
    """A kept line that the adopting write did not take: ``recorded`` when its row (state,
    response id) already holds its id, else ``duplicate``."""
    return "recorded" if row is not None and row[1] == kept.response_id else "duplicate"


def state_file(identity: str) -> Path:
    """Where a fleet worker keeps what it could not record in a ledger that has no file of its
    own (PostgreSQL): ``$XDG_STATE_HOME/asyncbg/unrecorded/`` (by default
    ``~/.local/state/...``), in a file named from a hash of ``identity`` (never a password)."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    if os.path.isabs(base):  # a relative one is ignored, as the XDG base directory spec says
        root = Path(base)
    else:
        try:
            root = Path.home() / ".local" / "state"
        except RuntimeError:  # no home directory to be found: still somewhere of this user's
            root = Path(tempfile.gettempdir()) / f"asyncbg-{os.getuid()}"
    name = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return root / "asyncbg" / "unrecorded" / f"{name}{SUFFIX}"


class Rescue:
    """The ``.unrecorded`` file beside a journal (beside the real file, as the lock is), or at
    a path of its own (:meth:`at`)."""

    __slots__ = ("path",)

    def __init__(self, journal: Path) -> None:
        self.path = Path(os.path.realpath(journal) + SUFFIX)

    @classmethod
    def at(cls, path: Path) -> Rescue:
        """The file at ``path`` itself (a fleet's state file, see :func:`state_file`)."""
        rescue = cls.__new__(cls)
        rescue.path = path
        return rescue

    def reserve(self) -> None:
        """Make sure the file exists with :data:`RESERVE` bytes allocated (best effort: on a
        disk already full it stays as it is, and :meth:`keep` tries to write all the same)."""
        try:
            with self._locked(create=True) as fd, contextlib.suppress(OSError):
                if os.fstat(fd).st_size < RESERVE:
                    os.posix_fallocate(fd, 0, RESERVE)
        except OSError:
            return

    def read(self) -> list[tuple[str, str]]:
        """The ids kept, as (key, response id); [] without a file. A line cut short by a crash
        or not in the format is skipped (its response is then counted a possible duplicate,
        as without this file)."""
        return [(kept.key, kept.response_id) for kept in self.entries()]

    def entries(self) -> list[Kept]:
        """The responses kept, with their epochs; [] without a file. Raises :class:`OSError`
        for a file that cannot be read or is not a regular file (never followed)."""
        try:
            fd = self._open(create=False, write=False)
        except FileNotFoundError:
            return []
        try:
            data = _used(fd)
        finally:
            os.close(fd)
        return [kept for line in data.splitlines() if (kept := _parse(line)) is not None]

    def keep(self, pairs: Iterable[tuple[str, str]], *, epochs: Mapping[str, int] | None = None,
             digests: Mapping[str, str] | None = None,
             note: Mapping[str, str] | None = None) -> None:
        """Write ``pairs`` after the lines already kept, over the reserved zeros, and sync;
        each with its key's epoch from ``epochs`` and request digest from ``digests`` when
        there are, and ``note``'s fields (for whoever reads the file). Raises :class:`OSError`
        when they could not be written."""
        epochs = epochs or {}
        digests = digests or {}
        text = b"".join(json.dumps({
            "key": key, "response_id": rid,
            **({"epoch": epochs[key]} if key in epochs else {}),
            **({"digest": digests[key]} if key in digests else {}), **(note or {}),
        }).encode() + b"\n" for key, rid in pairs)
        if not text:
            return
        with self._locked(create=True) as fd:
            used = _used(fd)
            if used and not used.endswith(b"\n"):  # a line torn by a crash: start a new one
                text = b"\n" + text
            at = len(used)
            view = memoryview(text)
            while view:
                view = view[os.pwrite(fd, view, at + len(text) - len(view)):]
            os.fsync(fd)

    def clear(self) -> None:
        """The ids kept were recorded: zero them, keeping the reservation (and sync)."""
        try:
            with self._locked(create=False) as fd:
                _zero(fd)
        except FileNotFoundError:
            return

    def remove(self, done: Collection[Kept], *, unlink: bool = False) -> None:
        """Remove the lines of ``done`` (adopted, or found to be duplicates), keeping any other
        (another worker's, written meanwhile): the file is replaced by one without them (a
        rename), or, when nothing is left, zeroed from its first byte (or removed, with
        ``unlink``). Raises :class:`OSError`; the lines then stay, and adopting them again
        changes nothing."""
        gone = set(done)
        try:
            with self._locked(create=False) as fd:
                lines = _used(fd).splitlines()
                # Under the lock no line is being written: one that does not parse was torn
                # by a crash, and goes too.
                rest = [line for line in lines if (kept := _parse(line)) is not None
                        and kept not in gone]
                if len(rest) == len(lines):
                    return
                if not rest:
                    if unlink:
                        self.path.unlink()
                    else:
                        _zero(fd)
                    return
                self._replace(b"".join(line + b"\n" for line in rest))
        except FileNotFoundError:
            return

    def release(self) -> None:
        """The journal closes: remove the file unless it keeps ids."""
        try:
            with self._locked(create=False) as fd:
                if not _used(fd):
                    self.path.unlink()
        except OSError:
            return

    def _replace(self, text: bytes) -> None:
        """Put ``text`` in place of the file, atomically: a new file (with the reservation)
        renamed over it. Called under the old file's lock: a writer waiting for that lock
        finds it renamed over, and opens the new one (see :meth:`_locked`)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, max(RESERVE, len(text)))
            view = memoryview(text)
            while view:
                view = view[os.pwrite(fd, view, len(text) - len(view)):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.contextmanager
    def _locked(self, *, create: bool) -> Iterator[int]:
        """The file open, under an exclusive ``flock``: several workers on a machine share
        it. A file renamed over or removed while this waited for the lock is opened again."""
        while True:
            fd = self._open(create=create)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                mine = os.fstat(fd)
                try:
                    now = os.lstat(self.path)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                    yield fd
                    return
            finally:
                os.close(fd)  # the lock goes with it
            if now is None and not create:
                raise FileNotFoundError(f"{self.path} was removed")

    def _open(self, *, create: bool, write: bool = True) -> int:
        flags = ((os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
                 | os.O_NONBLOCK | (os.O_CREAT if create else 0))
        if create:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, flags, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{self.path} is not a regular file")
        return fd


async def keep_in(rescue: Rescue, pairs: list[tuple[str, str]], *,
                  epochs: Mapping[str, int], digests: Mapping[str, str],
                  note: Mapping[str, str]) -> Path:
    """Keep ``pairs`` in ``rescue`` (a shared ledger's keep_unrecorded); its path. Raises
    :class:`LedgerError` naming the file when it cannot be written."""
    try:
        await anyio.to_thread.run_sync(partial(rescue.keep, pairs, epochs=dict(epochs),
                                               digests=dict(digests), note=note))
    except OSError as exc:
        raise LedgerError(f"{rescue.path} could not be written ({exc.strerror or exc})"
                          ) from exc
    return rescue.path


async def read_kept(rescue: Rescue) -> list[Kept]:
    """The lines a worker kept in ``rescue`` (a shared ledger's adopt_kept). Raises
    :class:`LedgerError` for a file that cannot be read or is not a regular file."""
    try:
        return await anyio.to_thread.run_sync(rescue.entries)
    except OSError as exc:
        raise LedgerError(f"{rescue.path} cannot be read ({exc.strerror or exc}); the "
                          "responses kept in it are not adopted") from exc


async def to_adopt(rescue: Rescue, unkept: Sequence[tuple[str, str]],
                   held: Mapping[str, int], digests: Mapping[str, str]
                   ) -> tuple[list[Kept], list[Kept]]:
    """What a shared ledger's adopt_kept looks at: the lines of ``rescue``, and those with
    ``unkept``, this process's own ``(key, response id)`` that the file could not take, sent
    at the epochs it ``held`` for the requests of ``digests``. A file that cannot be read
    raises :class:`LedgerError`, unless there are such ids of its own: they are recorded all
    the same."""
    try:
        in_file = await read_kept(rescue)
    except LedgerError:
        if not unkept:
            raise
        in_file = []
    return in_file, in_file + [Kept(key, rid, held.get(key), digests.get(key))
                               for key, rid in unkept]


async def forget_kept(rescue: Rescue, kept: list[Kept]) -> None:
    """Remove the lines ``kept`` from ``rescue`` once the ledger has them; a file that cannot
    be rewritten is said once, and its lines are adopted again (which changes nothing)."""
    try:
        await anyio.to_thread.run_sync(rescue.remove, kept)
    except OSError as exc:
        _log.warning("ledger.kept_not_removed", file=str(rescue.path),
                     error=exc.strerror or str(exc),
                     action="its lines are looked at again by the next worker (no change)")


async def adopt_said(adopt: Callable[[], Awaitable[Adoption | None]], *,
                     who: str) -> Adoption | None:
    """``adopt()`` (a shared ledger's ``adopt_kept``, called as the caller must), and what it
    made of the lines said (:func:`say_adoption`). A file that cannot be read (not a regular
    one, say) is said as ``{who}.kept_unreadable`` and left: None. A ledger that cannot be
    reached raises :class:`LedgerUnavailable` (a claim now would create them again)."""
    try:
        adoption = await adopt()
    except LedgerUnavailable:
        raise
    except LedgerError as exc:
        _log.warning(f"{who}.kept_unreadable", error=str(exc))
        return None
    if adoption is not None:
        say_adoption(adoption, who=who)
    return adoption


def say_adoption(adoption: Adoption, *, who: str) -> None:
    """Log what ``who`` (``worker``, ``ledger``) made of the lines it looked at: one warning
    when there were any, and one naming the duplicates (paid for twice) when there are."""
    if not adoption:
        return
    _log.warning(f"{who}.kept_adopted", file=str(adoption.path),
                 adopted=len(adoption.adopted), already_recorded=len(adoption.recorded),
                 duplicates=len(adoption.duplicates),
                 action="the adopted are polled to their end instead of created again")
    if adoption.duplicates:
        named = ", ".join(f"{k.key} ({k.response_id})" for k in adoption.duplicates)
        _log.warning(f"{who}.kept_duplicates", file=str(adoption.path), responses=named,
                     reason="their lines were created again (or ended) before these could be "
                            "adopted: paid for twice",
                     action="left running on the server; nothing cancels them")


def _parse(line: bytes) -> Kept | None:
    """A kept line, or None for one torn by a crash or not in the format."""
    try:
        item = json.loads(line)
        key, rid, epoch = item["key"], item["response_id"], item.get("epoch")
        digest = item.get("digest")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not (isinstance(key, str) and isinstance(rid, str) and rid):
        return None
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        return None
    if digest is not None and not isinstance(digest, str):
        return None
    return Kept(key, rid, epoch, digest)


def _zero(fd: int) -> None:
    """Zero the file's lines (from its first byte: a crash part-way leaves it empty all the
    same, as a read stops at the first zero), keeping the reservation; and sync."""
    used = len(_used(fd))
    if used:
        os.pwrite(fd, bytes(used), 0)
        os.fsync(fd)


def _used(fd: int) -> bytes:
    """The file's lines: everything before the first zero byte of the reservation."""
    data = b""
    while chunk := os.pread(fd, 1 << 16, len(data)):
        data += chunk
        if b"\0" in chunk:
            break
    return data.split(b"\0", 1)[0]
