"""The ``asyncbg run`` output file: Batch API output lines, a view of the journal.

The journal (a :class:`~asyncbg._ledgers.Ledger`) is the truth. The output file is rebuilt from
it at the start and at the end of every run, atomically, so that each finished line has exactly
one output line with its latest outcome; in between, lines are appended as jobs end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._ledgers import Record
from .._ledgers._rescue import SUFFIX as UNRECORDED
from .._spend._tokens import usage_tokens

__all__ = [
    "Existing",
    "Line",
    "NotOurs",
    "OutputFile",
    "RefusedPath",
    "StdoutOutput",
    "body_of",
    "companion_of",
    "count_lines",
    "error_of",
    "line_id",
    "output_line",
    "output_target",
    "read_existing",
    "same_path",
    "tokens_of",
    "write_all",
    "write_atomic",
]

#: The error code of a line whose status says why, when the journal recorded no code.
_STATUS_CODES = {
    "failed": "response_failed",
    "incomplete": "response_incomplete",
    "cancelled": "cancelled",
}


def line_id(record: Record) -> str:
    """The output line's ``id``: the same for a record on every rewrite, new for a new claim."""
    seed = f"{record.key}\0{record.created!r}".encode()
    return "batch_req_" + hashlib.sha256(seed).hexdigest()[:32]


def body_of(record: Record) -> dict[str, Any] | None:
    if record.body is None:
        return None
    try:
        body = json.loads(record.body)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def error_of(record: Record, body: Mapping[str, Any] | None = None) -> dict[str, str] | None:
    """The Batch API ``error`` of a finished record: None when it completed."""
    if record.status == "completed" and record.state == "done":
        return None
    body = body_of(record) if body is None else body
    code = record.error_code
    if code is None and body is not None:
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            code = err["code"]
    if code is None:
        code = _STATUS_CODES.get(record.status, "request_failed")
    message = record.error
    if not message:
        message = (f"the response ended {record.status}" if record.state == "done"
                   else "the request was not completed")
    return {"code": code, "message": message}


def output_line(record: Record) -> dict[str, Any] | None:
    """The Batch API output line of a finished record; None while it is not finished.

    ``response`` carries the server's final body (with the HTTP status it came with) whenever
    the server created a response; ``error`` is set on every line that did not complete. A
    line that took several attempts (``--escalate-file``) shows the final one's answer and
    lists them all under ``attempts`` (custom_id, status, response id, usage).
    """
    if not record.terminal:
        return None
    body = body_of(record)
    response = None
    if record.state == "done" and body is not None:
        response = {
            "status_code": record.http_status or 200,
            "request_id": record.request_id,
            "body": body,
        }
    line = {
        "id": line_id(record),
        "custom_id": record.key,
        "response": response,
        "error": error_of(record, body),
    }
    if getattr(record, "attempts", None):  # an escalation ladder folded under its key
        from .._outcomes._journal import attempts_field

        line.update(attempts_field(record))
    return line


def tokens_of(body: Mapping[str, Any] | None) -> dict[str, int]:
    """The token counts of a final body, whichever provider's (zeros when it reported none)."""
    usage = None
    if body is not None:
        usage = body.get("usage") or body.get("usageMetadata") or body.get("usage_metadata")
    if not isinstance(usage, dict):
        return {"input": 0, "output": 0, "total": 0}
    t = usage_tokens(usage)
    return {"input": t.input, "output": t.output, "total": t.input + t.output}


# -- the existing file -------------------------------------------------------------------------


class NotOurs(Exception):
    """The existing output file holds something that is not a Batch API output line."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass(slots=True)
class Existing:
    """What an existing output file holds: the custom_ids of its lines, in file order."""

    custom_ids: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set, repr=False)

    def add(self, custom_id: str) -> None:
        """Note a line's custom_id (once, however often the file repeats it)."""
        if custom_id not in self._seen:
            self._seen.add(custom_id)
            self.custom_ids.append(custom_id)


def read_existing(path: Path) -> Existing:
    """Read an existing output file, or raise :class:`NotOurs` if any line is not an output line.

    Blank lines are ignored. A last line cut short (no newline, not JSON) is what a killed run
    leaves behind: it is dropped, not a reason to refuse. A missing file is empty.
    """
    found = Existing()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return found
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            if number == len(lines):  # the last line, without its newline: a killed run's
                break
            raise NotOurs(number, "not JSON") from None
        if not (isinstance(item, dict) and isinstance(item.get("custom_id"), str)
                and "response" in item and "error" in item):
            raise NotOurs(number, "not a Batch API output line (custom_id, response, error)")
        found.add(item["custom_id"])
    return found


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths name one file (the same resolved path, or the same inode)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


#: The files of a journal besides itself, and what each one is: SQLite's (beside the path as
#: given, or the real file), the lock of its run and the ids it keeps (beside the real file).
_COMPANIONS = (("-wal", "write-ahead log"), ("-shm", "shared-memory index"),
               ("-journal", "rollback journal"), (".lock", "lock file"),
               (UNRECORDED, "file of responses created but not recorded"))


def companion_of(output: Path, journal: Path) -> str | None:
    """What ``output`` is of ``journal`` ("the journal itself", "the journal's lock file"
    ...), when it names the journal or one of the files that go with it; None otherwise."""
    if same_path(output, journal):
        return "the journal itself"
    bases = {str(journal), os.path.realpath(journal)}
    for suffix, what in _COMPANIONS:
        if any(same_path(output, Path(base + suffix)) for base in bases):
            return f"the journal's {what}"
    return None


# -- writing -----------------------------------------------------------------------------------


def _dumps(line: Mapping[str, Any]) -> str:
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n"


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than it is given: a disk
    filling up writes what fits, then fails). Every output file asyncbg writes goes through
    here."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


#: Bytes gathered before each write of :func:`write_atomic`.
_CHUNK = 1 << 16


def write_atomic(path: Path, lines: Iterable[Mapping[str, Any] | str]) -> int:
    """Replace ``path`` with ``lines`` (objects, or JSON text ending in a newline): a temporary
    file beside it, fsync, then a rename; returns how many lines it holds.

    A reader (or a crash) sees either the old file or the new one, never a mix: when a write
    fails (a full disk), the temporary file is removed and ``path`` is as it was. The file
    keeps its permissions.
    """
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        try:
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                data = (line if isinstance(line, str) else _dumps(line)).encode()
                chunk.append(data)
                size += len(data)
                count += 1
                if size >= _CHUNK:
                    write_all(fd, b"".join(chunk))
                    chunk, size = [], 0
            write_all(fd, b"".join(chunk))
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable, where supported
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return count


def count_lines(path: Path) -> int:
    """How many whole lines (ending in a newline, not blank) a file holds; 0 without one."""
    count = 0
    try:
        with path.open("rb") as f:
            for raw in f:
                count += raw.endswith(b"\n") and bool(raw.strip())
    except OSError:
        return 0
    return count


#: Makes the output line of a finished record (None while it is not finished).
Line = Callable[[Record], "dict[str, Any] | None"]


class RefusedPath(Exception):
    """An output path that asyncbg must not write: not a regular file, or unusable."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"))


def output_target(path: Path) -> Path:
    """The regular file an output path names: the path itself, or a symlink's final target
    (which is then what gets rewritten, in its own directory).

    Raises :class:`RefusedPath` for anything else: a directory, a device, a FIFO, a socket.
    Nothing is opened, so a FIFO or a terminal is never read or waited on.
    """
    try:
        st = path.stat()  # follows symlinks: /dev/stdout is what it points to
    except FileNotFoundError:
        return Path(os.path.realpath(path))  # a new file, or a dangling link's target
    except OSError as exc:
        raise RefusedPath(f"cannot use {path} as the output: {exc.strerror or exc}") from exc
    if stat.S_ISREG(st.st_mode):
        return Path(os.path.realpath(path))
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    raise RefusedPath(
        f"{path} is {kind}: asyncbg rewrites its output file as a whole, so -o must be a "
        "regular file or a new path (or - to stream the lines to stdout)")


def _fingerprint(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class OutputFile:
    """The output file of one run: rewritten from the journal, appended to as jobs end.

    Its methods block (they write and fsync): a run calls them through
    ``anyio.to_thread.run_sync``. Only a fingerprint of each written line is kept, so memory
    does not grow with the bodies. A write that fails (a full disk) leaves the file holding
    whole lines only: an append cut short is cut back, a rewrite leaves the old file.
    """

    def __init__(self, path: Path, line: Line = output_line) -> None:
        self.path = path
        self._line = line
        #: custom_id -> fingerprint of the line last written for it.
        self._written: dict[str, bytes] = {}
        #: The file, open for appending, and its size in bytes (whole lines only).
        self._fd: int | None = None
        self._size = 0
        #: How many lines the file holds (counted as they are written).
        self.lines = 0
        self._lock: Any = None

    def lock(self) -> None:
        """Hold ``PATH.lock`` for the run: a second run on this output exits naming this one.

        Raises :class:`~asyncbg.LedgerError` with the holder's pid, host and start time.
        """
        from .._ledgers._lock import ExclusiveLock  # fcntl: POSIX only

        self._lock = ExclusiveLock.acquire(Path(f"{self.path}.lock"), str(self.path))

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def rewrite(self, records: Mapping[str, Record], order: Iterable[str]) -> None:
        """Rewrite the whole file from ``records``: one line per finished key, in ``order``.

        When it fails the file is as it was (and :attr:`lines` with it)."""
        self.close()
        written: dict[str, bytes] = {}

        def lines() -> Iterator[str]:
            for key in order:
                record = records.get(key)
                line = self._line(record) if record is not None and key not in written else None
                if line is not None:
                    text = _dumps(line)
                    written[key] = _fingerprint(text)
                    yield text

        self.lines = write_atomic(self.path, lines())
        self._written = written

    def append(self, record: Record) -> bool:
        """Append a finished record's line; see :meth:`append_many`."""
        return self.append_many([record]) > 0

    def append_many(self, records: Iterable[Record]) -> int:
        """Append the lines of finished records, each unless that exact outcome is already
        written, then fsync once; returns how many lines were written.

        Raises ``OSError`` when the file cannot take them, after cutting the file back to the
        whole lines it held (a disk that filled up mid-line leaves no half line)."""
        marks = self._new_lines(records)
        if not marks:
            return 0
        data = "".join(text for _, text, _ in marks).encode()
        if self._fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o666)
            self._fd, self._size = fd, os.fstat(fd).st_size
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):  # a rerun forgives a cut last line all the same
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)
        self.lines += len(marks)
        for key, _, mark in marks:
            self._written[key] = mark
        return len(marks)

    def _new_lines(self, records: Iterable[Record]) -> list[tuple[str, str, bytes]]:
        """(key, text, fingerprint) of each line to write: not noted as written until it is."""
        new: dict[str, tuple[str, str, bytes]] = {}
        for record in records:
            line = self._line(record)
            if line is None:
                continue
            text = _dumps(line)
            mark = _fingerprint(text)
            if self._written.get(record.key) != mark:
                new.pop(record.key, None)  # the later outcome of a key given twice
                new[record.key] = (record.key, text, mark)
        return list(new.values())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StdoutOutput(OutputFile):
    """``-o -``: finished lines stream to stdout as they end, each key once; nothing is
    rewritten (a pipe cannot be), so a line is written only when it is final for this run."""

    def __init__(self, line: Line = output_line) -> None:
        super().__init__(Path("-"), line)
        self._started = False
        # Taken now: while a progress bar shows, rich replaces sys.stdout with a proxy that
        # prints to the terminal (stderr), and the lines must still go down the pipe.
        self._stream = sys.stdout

    def lock(self) -> None:
        return None

    def rewrite(self, records: Mapping[str, Record], order: Iterable[str]) -> None:
        """At the start, the journal's final answers (lines that will not run again); at the
        end, whatever finished line has not been written yet."""
        chosen = []
        for key in order:
            record = records.get(key)
            if record is None or key in self._written:
                continue
            if self._started or record.state == "done":
                chosen.append(record)
        self._started = True
        self.append_many(chosen)

    def append_many(self, records: Iterable[Record]) -> int:
        marks = self._new_lines(records)
        if marks:
            self._stream.write("".join(text for _, text, _ in marks))
            self._stream.flush()
            self.lines += len(marks)
            for key, _, mark in marks:
                self._written[key] = mark
        return len(marks)
