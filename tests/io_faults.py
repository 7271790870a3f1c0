"""Faults at the edges where a command writes its files, for tests: a disk that fills up, a
write that stalls.

Every output file asyncbg writes goes through ``os.write`` (``asyncbg._cli._output.write_all``),
so a fault here is the one the program would meet on a real disk: ``os.write`` writes what fits,
then fails with ``ENOSPC``. The "disk" is a directory: the files in it (not below) count against
its size, so deleting one frees space, as on a small tmpfs. SQLite's own writes (a journal) are
not affected: put the journal elsewhere, or the disk is only the output's.

In a test's own process::

    with disk_limit(tmp_path / "disk", 4096):
        ...

For a command as a user runs it (the suite runs commands in subprocesses)::

    python tests/io_faults.py run in.jsonl -o disk/out.jsonl --journal j.db

with ``ASYNCBG_TEST_DISK=DIR:BYTES`` (a disk of BYTES) and/or ``ASYNCBG_TEST_STALL=DIR`` (each
write to a file in DIR waits until ``DIR/.go`` exists; ``DIR/.stalled`` is created while one
waits), then the same arguments as ``python -m asyncbg``. Linux: a descriptor's file is found
through ``/proc/self/fd``. ``ASYNCBG_TEST_EXIT_GRACE=SECONDS`` gives the command's manager that
``exit_grace`` (a wait a test can tell from one cut short: ten minutes, say).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["DISK_ENV", "GRACE_ENV", "STALL_ENV", "command", "disk_limit", "stalled_writes",
           "write_hook"]

DISK_ENV = "ASYNCBG_TEST_DISK"
STALL_ENV = "ASYNCBG_TEST_STALL"
GRACE_ENV = "ASYNCBG_TEST_EXIT_GRACE"

_real_write = os.write
Hook = Callable[[int, bytes | memoryview], int | None]


def _path_of(fd: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _on(directory: Path, fd: int) -> bool:
    path = _path_of(fd)
    return path is not None and path.parent == directory


def _used(directory: Path) -> int:
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def disk_hook(directory: Path, size: int) -> Hook:
    """A hook for :func:`write_hook`: files in ``directory`` share ``size`` bytes."""
    directory = Path(os.path.realpath(directory))

    def hook(fd: int, data: bytes | memoryview) -> int | None:
        if not _on(directory, fd):
            return None
        room = size - _used(directory)
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real_write(fd, data[:room])  # what fits; the next write fails

    return hook


def stall_hook(directory: Path) -> Hook:
    """A hook for :func:`write_hook`: a write to a file in ``directory`` waits for
    ``directory/.go``, and says it is waiting with ``directory/.stalled``."""
    directory = Path(os.path.realpath(directory))

    def hook(fd: int, data: bytes | memoryview) -> int | None:
        if _on(directory, fd) and not (directory / ".go").exists():
            (directory / ".stalled").touch()
            while not (directory / ".go").exists():
                time.sleep(0.01)  # a test double's own thread: the program's loop goes on
        return None

    return hook


@contextlib.contextmanager
def write_hook(*hooks: Hook) -> Iterator[None]:
    """Route ``os.write`` through ``hooks`` (the first to answer, with bytes written or an
    error, decides; none answering means a plain write)."""

    def write(fd: int, data: bytes | memoryview, /) -> int:
        for hook in hooks:
            done = hook(fd, data)
            if done is not None:
                return done
        return _real_write(fd, data)

    os.write = write  # type: ignore[assignment]
    try:
        yield
    finally:
        os.write = _real_write


@contextlib.contextmanager
def disk_limit(directory: Path, size: int) -> Iterator[None]:
    """Files written in ``directory`` (through ``os.write``) share ``size`` bytes."""
    with write_hook(disk_hook(directory, size)):
        yield


@contextlib.contextmanager
def stalled_writes(directory: Path) -> Iterator[None]:
    """Writes to files in ``directory`` wait until ``directory/.go`` exists."""
    with write_hook(stall_hook(directory)):
        yield


def command(*argv: str) -> list[str]:
    """The argv of ``asyncbg ARGV`` run through this module's faults (see the docstring)."""
    return [sys.executable, str(Path(__file__).resolve()), *argv]


def main() -> int:
    hooks: list[Hook] = []
    if spec := os.environ.get(DISK_ENV):
        directory, _, size = spec.rpartition(":")
        hooks.append(disk_hook(Path(directory), int(size)))
    if directory := os.environ.get(STALL_ENV):
        hooks.append(stall_hook(Path(directory)))
    if grace := os.environ.get(GRACE_ENV):
        from asyncbg._manager import BackgroundManager

        defaults = BackgroundManager.__init__.__kwdefaults__
        assert defaults is not None and "exit_grace" in defaults
        defaults["exit_grace"] = float(grace)
    from asyncbg._cli import main as asyncbg_main

    with write_hook(*hooks):
        return asyncbg_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
