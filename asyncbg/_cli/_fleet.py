"""``asyncbg submit``, ``worker``, ``results`` and ``retry``: a fleet sharing one ledger.

The ledger is a ``postgresql://`` URL (workers on many machines) or the path of an SQLite
journal (workers on this machine). ``submit`` enqueues a Batch API file (and creates an SQLite
ledger), every ``worker`` runs jobs from it (:func:`asyncbg._fleet.run_worker`), ``results``
writes the output lines of every finished job, in the ``asyncbg run`` output format, and
``retry`` puts lines that ended without a paid response back in the queue.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from .._ledgers import Ledger, LedgerError, Record, SQLiteLedger, open_ledger
from .._ledgers._shared import DEFAULT_LEASE, MIN_LEASE, EnqueueMismatch
from . import _positive
from ._ops import emit, missing_directory, open_client, say

if TYPE_CHECKING:
    from .._fleet import Leaving

__all__ = ["COMMANDS", "add_commands", "results", "retry", "submit", "worker"]

T = TypeVar("T")
L = TypeVar("L", bound=Ledger)

_LEDGER_HELP = "a postgresql:// URL, or the path of an SQLite journal shared on this machine"

_WORKER = """\
Run jobs from a shared ledger: take the leases of waiting jobs, and of live ones whose worker
died (its lease ran out), up to --concurrency at a time; create or poll them as `asyncbg run`
does; renew the leases in batches every LEASE/3 seconds.

SIGTERM or SIGINT: take nothing more, leave the live responses running on the server, hand every
lease back at once (another worker goes on at once; with the database away, after 5 s it says
so and the leases run out by themselves) and exit 143 or 130. An SQLite ledger locked by another
program makes it say what it waits for (10 s at most); a second signal leaves at once, keeping
the ids of responses not recorded in LEDGER.unrecorded for the next worker. The API key and
base URL come from OPENAI_API_KEY and OPENAI_BASE_URL (or --base-url).
Exit status: 0 after --exit-when-idle found nothing waiting or live; 2 when the ledger or the
server cannot be used.
"""


def _lease(text: str) -> float:
    value = _positive(text)
    if value < MIN_LEASE:
        # A create leaves only with a third of its lease left (see safety_margin): a shorter
        # lease runs out during the ledger's own round trips, and nothing is ever sent.
        raise argparse.ArgumentTypeError(f"must be at least {MIN_LEASE:g} second, not {text}")
    return value


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``submit``, ``worker`` and ``results`` to the ``asyncbg`` parser."""
    p = sub.add_parser(
        "submit", help="enqueue a Batch API input file in a shared ledger",
        description="Enqueue every line of a Batch API input file as a waiting job and print "
                    "how many were new. Submitting the same file again adds nothing; a "
                    "custom_id already there with a different body is an error naming its "
                    "line, and then nothing from the file is enqueued. Needs no API key.")
    p.add_argument("input", metavar="INPUT.jsonl", help="Batch API request lines")
    p.add_argument("--ledger", required=True, metavar="LEDGER", help=_LEDGER_HELP)
    _logging_options(p)

    p = sub.add_parser("worker", help="run jobs from a shared ledger until stopped",
                       description=_WORKER, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", required=True, metavar="LEDGER", help=_LEDGER_HELP)
    p.add_argument("--concurrency", type=_at_least_one, default=16, metavar="N",
                   help="most responses in flight at once in this worker (default: 16)")
    p.add_argument("--lease", type=_lease, default=DEFAULT_LEASE, metavar="SECONDS",
                   help="how long a lease lasts: a dead worker's jobs are taken over after "
                        f"this (default: {DEFAULT_LEASE:g})")
    p.add_argument("--exit-when-idle", action="store_true",
                   help="exit 0 once nothing is waiting or live in the ledger")
    p.add_argument("--base-url", metavar="URL",
                   help="API base URL (default: $OPENAI_BASE_URL, else OpenAI's)")
    p.add_argument("--create", action="store_true",
                   help="create an SQLite ledger that does not exist yet (by default a worker "
                        "refuses a path that `asyncbg submit` did not make: a typo, most "
                        "likely)")
    p.add_argument("--db-patience", type=_positive, default=300.0, metavar="SECONDS",
                   help="how long to wait out a ledger that cannot be reached (a database "
                        "restarting or not up yet, a dropped connection) before stopping "
                        "(default: 300)")
    from . import _metrics
    from ._notify import add_options as add_notify_options

    add_notify_options(p)  # --notify URL, --notify-wait SECONDS
    _metrics.add_option(p)  # --metrics-port PORT
    _logging_options(p)

    p = sub.add_parser(
        "results", help="write the output lines of every finished job of a shared ledger",
        description="Write one Batch API output line per finished custom_id (the `asyncbg run` "
                    "output format), in submission order, replacing OUTPUT atomically. Sends "
                    "no request and needs no API key; works while workers run.")
    p.add_argument("--ledger", required=True, metavar="LEDGER", help=_LEDGER_HELP)
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl",
                   help="the file to write (a regular file, replaced atomically; never the "
                        "ledger), or - for stdout")
    _logging_options(p)

    p = sub.add_parser(
        "retry", help="re-queue the lines of a shared ledger that ended without a response",
        description="Put back in the queue every line that ended without a paid response (it "
                    "was refused, the server could not be reached, the key or the account was "
                    "wrong), for the workers to run again, and print how many. A line that has "
                    "a response id is never re-queued: that response was paid for. Needs no "
                    "API key.")
    p.add_argument("--ledger", required=True, metavar="LEDGER", help=_LEDGER_HELP)
    p.add_argument("--code", metavar="CODE",
                   help="only lines that ended with this error code (as `asyncbg status` "
                        "and the output lines show it, e.g. invalid_api_key)")
    _logging_options(p)


def _logging_options(p: argparse.ArgumentParser) -> None:
    from ._logging import LEVELS

    p.add_argument("--log-level", default="warning", choices=LEVELS,
                   help="lowest log level shown on stderr (default: warning)")
    p.add_argument("--log-json", action="store_true",
                   help="log one JSON object per line instead of readable text")


# -- submit --------------------------------------------------------------------------------------


async def submit(args: argparse.Namespace) -> int:
    """``asyncbg submit INPUT --ledger LEDGER``: enqueue; print how many lines were new."""
    from .._fleet import enqueue_requests, shared_ledger  # the engine: imported when a command runs
    from ._input import read_requests
    source = Path(args.input)
    try:
        parsed = read_requests(source)
    except OSError as exc:
        say(f"cannot read {source}: {exc.strerror or exc}")
        return 2
    except UnicodeDecodeError as exc:  # NotUtf8: FILE:LINE: not UTF-8 text ...
        say(f"{exc}; nothing was enqueued")
        return 2
    problems = [f"{source}:{bad.line}: {bad.reason}"
                for bad in sorted([*parsed.bad, *parsed.duplicates], key=lambda b: b.line)]
    if problems:
        for problem in problems:
            say(problem)
        say(f"nothing from {source} was enqueued")
        return 2
    if not parsed.requests:
        say(f"no requests in {source}; nothing was enqueued")
        return 2
    try:
        ledger = shared_ledger(args.ledger)
    except LedgerError as exc:
        say(f"{exc}; nothing was enqueued")
        return 2
    if isinstance(ledger, SQLiteLedger) and (what := missing_directory(ledger.path)):
        say(f"cannot create the ledger {ledger.path}: {what} (submit makes the ledger's file, "
            "not directories); nothing was enqueued")
        return 2
    try:
        await ledger.open()
    except LedgerError as exc:
        say(f"{exc}; nothing was enqueued")
        return 2
    try:
        new = await enqueue_requests(ledger, ((r.custom_id, r.body) for r in parsed.requests))
    except EnqueueMismatch as exc:
        line = next(r.line for r in parsed.requests if r.custom_id == exc.key)
        say(f"{source}:{line}: custom_id {exc.key!r} is already in the ledger with a different "
            f"body; nothing from {source} was enqueued (give the line a new custom_id)")
        return 2
    except LedgerError as exc:
        say(f"{exc}; nothing was enqueued")
        return 2
    finally:
        with anyio.CancelScope(shield=True):
            await ledger.close()
    total = len(parsed.requests)
    emit(f"{new} new of {total} lines ({total - new} already in the ledger)")
    return 0


# -- worker --------------------------------------------------------------------------------------


async def worker(args: argparse.Namespace) -> int:
    """``asyncbg worker --ledger LEDGER``: run jobs until stopped or, if asked, idle."""
    from .._fleet import (  # the engine: imported when a command runs
        Leaving,
        ServerUnreachable,
        run_worker,
        shared_ledger,
    )
    from . import _metrics
    from ._notify import notify_option

    try:
        notify = notify_option(args)
        ledger = shared_ledger(args.ledger, lease=args.lease)
    except (ValueError, LedgerError) as exc:
        say(str(exc))
        return 2
    if not args.create and await _missing(ledger, args.ledger, hint=" or pass --create"):
        return 2
    if args.create and isinstance(ledger, SQLiteLedger) and (
            what := missing_directory(ledger.path)) is not None:
        say(f"cannot create the ledger {ledger.path}: {what} (--create makes the ledger's "
            "file, not directories)")
        return 2
    client = open_client(args.base_url)
    if client is None:
        return 2
    stop = anyio.Event()
    leaving = Leaving()
    received: list[signal.Signals] = []
    code = 0
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_watch_signals, stop, received, tg.cancel_scope, leaving)
            try:
                async with _metrics.hooks_for(args) as hooks:
                    await run_worker(client, ledger,
                                     concurrency=args.concurrency, lease=args.lease,
                                     exit_when_idle=args.exit_when_idle, stop=stop,
                                     notify=notify, db_patience=args.db_patience, hooks=hooks,
                                     leaving=leaving)
            except _metrics.MetricsPortError as exc:
                say(str(exc))
                code = 2
            except LedgerError as exc:
                say(str(exc))
                code = 2
            except ServerUnreachable as exc:
                say(f"{exc}; the jobs this worker took are handed back")
                code = 2
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()
    return 128 + int(received[0]) if received else code


async def _watch_signals(stop: anyio.Event, received: list[signal.Signals],
                         scope: anyio.CancelScope, leaving: Leaving, *,
                         task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                         ) -> None:
    """The first SIGINT/SIGTERM stops the worker gently (and says so, and what the stop
    waits for if anything holds it up); a second one stops it at once."""
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for number in signals:
                received.append(signal.Signals(number))
                if len(received) == 1:
                    say(f"{received[0].name}: stopping; live responses keep running on the "
                        "server and their leases are handed back to the other workers")
                    stop.set()
                    tg.start_soon(_say_waiting, leaving)
                else:
                    if leaving.waits_for() is not None:
                        say(f"{received[-1].name} again: leaving now; the ids of the responses "
                            f"not recorded go to {leaving.kept_in()}, and the leases run out by "
                            "themselves")
                    leaving.leave_now()
                    scope.cancel()


async def _say_waiting(leaving: Leaving) -> None:
    """Once the worker stops: one line when a ledger locked by another program holds its exit
    up (sampled until the worker is gone, as ``asyncbg run`` does for its journal)."""
    # Sampled: the lock is another program's, and tells no event when it is taken.
    while (waits := leaving.waits_for()) is None:  # noqa: ASYNC110
        await anyio.sleep(0.1)
    say(f"{waits}; interrupt again to leave at once: the ids of responses created and not "
        f"recorded go to {leaving.kept_in()} for the next worker on this machine to adopt, "
        "and the leases run out by themselves")


# -- results -------------------------------------------------------------------------------------


async def results(args: argparse.Namespace) -> int:
    """``asyncbg results --ledger LEDGER -o OUTPUT``: one line per finished custom_id."""
    ledger: Ledger
    try:
        ledger = open_ledger(args.ledger)
    except LedgerError as exc:
        say(str(exc))
        return 2
    refused = _refused_output(args.output, ledger)
    if refused is not None:
        say(f"{refused}; nothing was written")
        return 2
    if await _missing(ledger, args.ledger):
        return 2
    counts = {"lines": 0, "unfinished": 0}
    try:
        await ledger.open()
        try:
            if args.output == "-":  # a reader that goes away (| head) ends it quietly
                from ._output import _dumps

                async for page in _pages(ledger):
                    if not emit("".join(map(_dumps, _lines(page, counts))), end=""):
                        break
                return 0
            await anyio.to_thread.run_sync(_write_file, args.output, _streamed(ledger, counts))
        finally:
            with anyio.CancelScope(shield=True):
                await ledger.close()
    except LedgerError as exc:
        say(str(exc))
        return 2
    except OSError as exc:
        from ._output import count_lines

        held = await anyio.to_thread.run_sync(count_lines, Path(args.output))
        say(f"cannot write {args.output}: {exc.strerror or exc}; it is as it was ("
            f"{'1 line' if held == 1 else f'{held} lines'}) and the ledger is whole: run this "
            "again once it can be written (free some space, or choose another -o)")
        return 2
    unfinished = counts["unfinished"]
    say(f"wrote {counts['lines']} lines to {args.output}"
        + (f"; {unfinished} jobs are not finished yet" if unfinished else ""))
    return 0


#: Records read from the ledger at a time by ``results``: its memory does not grow with the
#: ledger (a million jobs with their bodies would not fit).
_PAGE = 1000


async def _pages(ledger: Ledger) -> AsyncIterator[list[Record]]:
    """Every record of ``ledger`` in claim order, a page at a time."""
    from .._ledgers._postgres import PostgresLedger
    from .._ledgers._sqlite_shared import records_page

    after = 0
    while True:
        if isinstance(ledger, PostgresLedger):
            page = await ledger.records_page(after, _PAGE)
        else:
            assert isinstance(ledger, SQLiteLedger)
            page = await records_page(ledger, after, _PAGE)
        if not page:
            return
        after = page[-1][0]
        yield [record for _, record in page]


def _lines(records: Iterable[Record], counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """The output lines of the finished ``records``, counting lines and unfinished jobs."""
    from ._output import output_line

    for record in records:
        line = output_line(record)
        if line is None:
            counts["unfinished"] += 1
        else:
            counts["lines"] += 1
            yield line


def _streamed(ledger: Ledger, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """The output lines, for a worker thread: each page is read on the event loop."""
    import anyio.from_thread  # concurrent.futures and more: for `results` only

    pages = _pages(ledger)

    async def following() -> list[Record] | None:
        return await anext(pages, None)

    while (page := anyio.from_thread.run(following)) is not None:
        yield from _lines(page, counts)


def _refused_output(output: str, ledger: Ledger) -> str | None:
    """Why ``results`` may not write ``output``, or None: only a regular file (new or
    existing) or ``-`` is written, and never the ledger's own file or its companions."""
    if output == "-":
        return None
    path = Path(output)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        return f"cannot use {output}: {exc.strerror or exc}"
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
                if stat.S_ISSOCK(mode) else "not a regular file")
        return f"{output} is {kind}: -o writes only a regular file (or - for stdout)"
    if isinstance(ledger, SQLiteLedger):
        from ._output import companion_of

        what = companion_of(path, ledger.path)
        if what is not None:
            what = what.replace("the journal", "the ledger")
            return f"{output} is {what} ({ledger.path}): -o must be another file"
    return None


def _write_file(output: str, lines: Iterable[dict[str, Any]]) -> None:
    """Replace the file atomically, through any symbolic link to it (the link stays one)."""
    from ._output import write_atomic

    write_atomic(Path(os.path.realpath(output)), lines)


async def _with_ledger(ledger: L, work: Callable[[L], Awaitable[T]], after: str) -> T | None:
    """``work`` on the opened ``ledger``, closed again whatever happens; None after saying
    why the ledger failed (``after`` is added to that line)."""
    try:
        await ledger.open()
        return await work(ledger)
    except LedgerError as exc:
        say(f"{exc}{after}")
        return None
    finally:
        with anyio.CancelScope(shield=True):
            await ledger.close()


async def _missing(ledger: Ledger, spec: str, *, hint: str = "") -> bool:
    """Whether ``ledger`` is an SQLite path with no file (after saying so): only ``submit``
    creates one, so that a mistyped path makes neither directories nor an empty ledger."""
    if isinstance(ledger, SQLiteLedger) and not await anyio.Path(ledger.path).exists():
        say(f"no ledger at {ledger.path}: pass the --ledger the jobs were submitted to "
            f"(`asyncbg submit --ledger {spec}` creates it){hint}")
        return True
    return False


# -- retry ---------------------------------------------------------------------------------------


async def retry(args: argparse.Namespace) -> int:
    """``asyncbg retry --ledger LEDGER [--code CODE]``: re-queue what ended unpaid."""
    from .._fleet import shared_ledger  # the engine: imported when a command runs
    try:
        ledger = shared_ledger(args.ledger)
    except LedgerError as exc:
        say(str(exc))
        return 2
    if await _missing(ledger, args.ledger):
        return 2
    count = await _with_ledger(ledger, lambda led: led.requeue_unpaid(code=args.code),
                               "; nothing was re-queued")
    if count is None:
        return 2
    which = f" with error code {args.code}" if args.code else ""
    emit(f"re-queued {count} lines that ended without a response{which}")
    if count:
        say(f"workers run them: `asyncbg worker --ledger {args.ledger}`")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "submit": submit,
    "worker": worker,
    "results": results,
    "retry": retry,
}
