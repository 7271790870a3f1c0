"""``asyncbg run``: a Batch API input file as background responses, with the journal as truth.

A run checks everything it can before sending anything (paths, input, output, API key, prices
for a budget, the output's and the journal's locks), rebuilds the output file from the
journal, then streams: one task reads the input and submits its lines (at most ``WINDOW`` times
the concurrency submitted and not yet collected), another collects each job as it ends and
appends its line, so memory follows the concurrency, not the file. Lines the journal already
has done with the same request are counted without a claim each. At the end, also after an
interrupt, the output is rebuilt again.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .._errors import JournalMismatchError
from .._ledgers import Ledger, LedgerError, Record, SQLiteLedger, digest
from .._ledgers._rescue import Rescue
from .._ledgers._urls import url_like
from .._outcomes._journal import attempt_of, final_record, final_view
from . import _metrics
from ._formats import FORMATS, Format, close
from ._input import BatchRequest, Index, NotUtf8, not_a_file
from ._notify import notify_option, to_deliver
from ._notify import summary_row as notes_row
from ._ops import cancel_live, missing_directory, say
from ._output import (
    Existing,
    NotOurs,
    OutputFile,
    RefusedPath,
    StdoutOutput,
    body_of,
    companion_of,
    count_lines,
    output_target,
    same_path,
    tokens_of,
)
from ._progress import Display, Live, Tally
from ._report import (
    connection_failure,
    interrupt_message,
    name_failures,
    summary,
    unreached_message,
)
from ._signals import Interrupts

if TYPE_CHECKING:  # the manager loads the SDK: only a run with something to send needs it
    from .. import BackgroundManager, Job, Price

__all__ = ["run"]

#: Seconds a cancel of the live responses may take after an interrupt.
CANCEL_TIMEOUT = 10.0
#: Seconds after an interrupt in which a second one still asks for a cancel.
GRACE = 1.0
#: Lines submitted and not yet collected, as a multiple of the concurrency (at least
#: ``MIN_WINDOW``): enough that a slot never waits for the reader, few enough that memory does
#: not follow the file.
WINDOW = 4
MIN_WINDOW = 64
#: Jobs collected per output write (one write and one fsync each, off the event loop).
BATCH = 256
#: Bad lines named when not one line of the input can run (a binary file has many).
_SHOWN = 10
#: The variable each provider's SDK reads its base URL from.
_BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "openai-batch": "OPENAI_BASE_URL",
                 "anthropic": "ANTHROPIC_BASE_URL", "gemini": "GOOGLE_GEMINI_BASE_URL"}


async def run(args: argparse.Namespace) -> int:
    """The ``run`` command; returns the exit status (see ``asyncbg run --help``)."""
    fmt = FORMATS[args.provider]
    source = Path(args.input)
    output = None if args.output == "-" else Path(args.output)
    for given, option in ((args.journal, "--journal"), (args.output, "-o")):
        if given and url_like(given):  # never a path, nor echoed: it may hold a password
            say(f"{option} takes a file path, not a database URL: a run keeps its journal in an "
                "SQLite file (a fleet on PostgreSQL: `asyncbg submit FILE --ledger URL`, then "
                "`asyncbg worker --ledger URL`); nothing was sent")
            return 2
    if args.journal:
        journal = Path(args.journal)
    elif output is None:
        say("-o - needs --journal PATH: the journal is what a rerun resumes from; nothing "
            "was sent")
        return 2
    else:
        journal = output.with_name(output.name + ".journal")
    if (problem := _bad_base_url(args)) is not None:
        say(f"{problem}; nothing was sent")
        return 2
    pairs = [(source, journal, "the input and the journal")]
    if output is not None:
        pairs += [(source, output, "the input and the output"),
                  (output, journal, "the output and the journal")]
    for a, b, what in pairs:
        if same_path(a, b):
            say(f"{what} are the same file ({a}); nothing was sent")
            return 2
    if output is not None and (part := companion_of(output, journal)) is not None:
        say(f"{output} is {part} ({journal}): -o must be another file; nothing was sent")
        return 2
    for path, what in ((journal, "the journal "), (output, "")):
        if path is not None and (where := missing_directory(path)) is not None:
            say(f"cannot create {what}{path}: {where} (run makes files, not directories); "
                "nothing was sent")
            return 2
    target = None
    if output is not None:
        try:
            target = output_target(output)
        except RefusedPath as exc:
            say(f"{exc}; nothing was sent")
            return 2
    if (problem := not_a_file(source)) is not None:
        say(f"{problem}; nothing was sent")
        return 2
    try:
        index = fmt.index(source, args)
    except OSError as exc:
        say(f"cannot read {source}: {exc.strerror or exc}")
        return 2
    except NotUtf8 as exc:
        say(f"{exc}; nothing was sent")
        return 2
    if index.duplicates:
        for repeated in index.duplicates:
            say(f"{source}:{repeated.line}: {repeated.reason}")
        say(f"duplicate {fmt.id_name} values; nothing was sent")
        return 2
    if getattr(args, "escalate_file", None) is not None and (
            clash := next((k for k in index.lines if (base := attempt_of(k)) is not None
                           and base in index.lines), None)):
        say(f"{source}:{index.lines[clash]}: {fmt.id_name} {clash!r} is the name an escalation "
            f"gives to a later attempt of {attempt_of(clash)!r}: rename it to run with "
            "--escalate-file; nothing was sent")
        return 2
    if not index.lines:  # empty, blank, or not one line that can run (a path, say)
        for bad in index.bad[:_SHOWN]:
            say(f"{source}:{bad.line}: {bad.reason}")
        more = len(index.bad) - _SHOWN
        say((f"... and {more} more bad lines; " if more > 0 else "")
            + f"no requests in {source}{' that can run' if index.bad else ''}; nothing was "
            "sent")
        return 2
    if (problem := _unpriced(args, index)) is not None:
        say(problem)
        return 2
    if getattr(args, "dry_run", False):  # --dry-run: the estimate, nothing sent (_estimate.py)
        from ._estimate import dry_run

        return dry_run(args, source)
    if getattr(args, "by", None) is not None and (
            problem := _by().by_problem(args)) is not None:  # --by: see _by.py
        say(f"{problem}; nothing was sent")
        return 2
    existing = Existing()
    if target is not None:
        try:
            existing = fmt.read_existing(target)
        except NotOurs as exc:
            say(f"{output} exists and is not an asyncbg output file ({exc}); nothing was sent. "
                "Choose another -o, or move that file away")
            return 2
        except OSError as exc:
            say(f"cannot read {output}: {exc.strerror or exc}; nothing was sent")
            return 2
    try:
        notify_option(args)  # --notify: its secret is checked before anything is sent
    except ValueError as exc:
        say(f"{exc}; nothing was sent")
        return 2
    session = _Run(args, fmt, source, fmt.output_file(target), journal, index, existing)
    if not journal.exists() and session.open_client() is None:
        return 2  # a first run: the client's own checks (the API key) come before the journal
    return await session.main()


def _by() -> Any:
    """``--by`` (asyncbg/_cli/_by.py), loaded only when asked for: it loads the manager."""
    from . import _by

    return _by


def _bad_base_url(args: argparse.Namespace) -> str | None:
    """Why the base URL (``--base-url``, else the provider's variable) is not an http(s) URL."""
    name = _BASE_URL_ENV[args.provider]
    url, where = ((args.base_url, "--base-url") if args.base_url
                  else (os.environ.get(name), name))
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return None
    return f"{where} {url!r} is not an http:// or https:// URL"


def _unpriced(args: argparse.Namespace, index: Index) -> str | None:
    """With ``--max-cost``: a line naming every model with no known price (and no --price)."""
    if args.max_cost is None:
        return None
    import structlog.testing

    from .._spend._pricing import PriceBook

    book = PriceBook(prices_of(args))
    with structlog.testing.capture_logs():  # our one line says it, not a log line per model
        unknown = sorted(m for m in index.models if book.price(m) is None)
    if not unknown:
        return None
    names = ", ".join(unknown)
    return (f"--max-cost cannot be kept: no price is known for {names}. Give each one with "
            f"--price MODEL=INPUT,OUTPUT[,CACHED] (dollars per million tokens), e.g. --price "
            f"{unknown[0]}=1.25,10; nothing was sent")


def prices_of(args: argparse.Namespace) -> dict[str, Price]:
    """``--price`` options as ``BackgroundManager(prices=...)``."""
    from .._spend._pricing import Price

    return {model: Price(input=p[0], output=p[1], cached_input=p[2] if len(p) > 2 else None)
            for model, p in (getattr(args, "price", None) or [])}


@dataclass(frozen=True, slots=True)
class _Done:
    """A line the journal had finished when the run started: enough to serve it unclaimed."""

    digest: str
    status: str
    tokens: int


class _Run:
    """One ``asyncbg run``, from its checks to its report."""

    def __init__(self, args: argparse.Namespace, fmt: Format, source: Path, out: OutputFile,
                 journal: Path, index: Index, existing: Existing) -> None:
        self.args = args
        self.fmt = fmt
        self.source = source
        self.journal = journal
        self.index = index
        self.out = out
        #: custom_id -> line number of every input line that runs (skipped ones leave it).
        self.lines = dict(index.lines)
        #: Lines the output already had that are not in this input: kept, after the input's.
        self.others = [c for c in existing.custom_ids if c not in index.lines]
        self.existing = existing
        #: Keys the journal had finished with the server's answer when the run started.
        self.done: dict[str, _Done] = {}
        #: custom_id -> tokens of its final body, for the lines this run has seen end.
        self.tokens: dict[str, int] = {}
        #: custom_id -> why its line was skipped (its key is journaled with another request).
        self.skipped: dict[str, str] = {}
        #: custom_id -> why a line was not run for the budget, when its record does not say.
        self.not_run: dict[str, str] = {}
        self.tally = Tally(total=len(index.lines))
        self.stats = Live()
        self.requests = self.polls = self.possible_duplicates = 0
        #: Batch requests sent again in a new batch after theirs expired unrun.
        self.batch_reruns = 0
        #: Lines handed to the manager (a rerun with nothing to do hands it none).
        self.submitted = 0
        #: Jobs collected that the journal had not already finished, and how many of them
        #: could not connect (the first one's message kept).
        self.sent = self.refused = 0
        self.refusal: str | None = None
        #: Why the output could not be written (then the end's rewrite tries again), and how
        #: many lines it would hold when the end's rewrite failed.
        self.output_error: OSError | None = None
        self.output_total = 0
        #: The provider's client, opened once there is something to send (a rerun with
        #: nothing left to do loads no SDK).
        self.client: Any = None
        #: --by: the journal holds a key per way; what each way cost, for the summary.
        self.by_mode = getattr(args, "by", None) is not None
        self.by_summary: str | None = None

    def _order(self) -> Iterator[str]:
        return itertools.chain(self.index.lines, self.others)

    async def main(self) -> int:
        interrupts = Interrupts(cancel_live=self.args.cancel_on_interrupt,
                                cancel_timeout=CANCEL_TIMEOUT)
        try:
            async with anyio.create_task_group() as tg:
                work = anyio.CancelScope()
                await tg.start(interrupts.watch, work)
                try:
                    code = await self._journaled(work, interrupts)
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Only the run itself can fail here (the watcher never raises): show its own error.
            raise group.exceptions[0] if len(group.exceptions) == 1 else group from None
        finally:
            if self.client is not None:
                with anyio.CancelScope(shield=True):
                    await close(self.client)
        return code

    def open_client(self) -> Any:
        """The provider's client, opened on first use; None after saying why it cannot be."""
        if self.client is None:
            self.client = self.fmt.open(self.args)
        return self.client

    async def _journaled(self, work: anyio.CancelScope, interrupts: Interrupts) -> int:
        ledger = SQLiteLedger(self.journal, exclusive=True)
        try:
            self.out.lock()
            await ledger.open()
        except LedgerError as exc:
            self.out.unlock()
            say(f"{exc}; nothing was sent")
            return 2
        try:
            return await self._run(ledger, work, interrupts)
        except LedgerError as exc:
            say(self._ledger_failure(exc))
            return 2
        finally:
            with anyio.CancelScope(shield=True):
                await ledger.close()
                self.out.unlock()

    def _ledger_failure(self, exc: LedgerError) -> str:
        """One line for a journal that failed during the run: what became of what was sent."""
        unrecorded: list[tuple[str, str]] = list(getattr(exc, "unrecorded", None) or [])
        text = str(exc)
        if unrecorded:
            named = ", ".join(f"{key} ({rid})" for key, rid in unrecorded)
            if unrecorded[0][1] not in text:
                text += (f"; {len(unrecorded)} responses created but never recorded were "
                         f"left running on the server: {named}")
            return f"{text}; the run stopped: run the same command again once the journal works"
        if self.requests:
            return (f"{text}; the run stopped, leaving what it had created running on the "
                    "server: run the same command again once the journal works, to collect it")
        return f"{text}; nothing was sent"

    async def _run(self, ledger: Ledger, work: anyio.CancelScope,
                   interrupts: Interrupts) -> int:
        records = await _records(ledger, self.index.lines, by=self.by_mode)
        unknown = [c for c in self.existing.custom_ids if c not in records]
        if unknown:
            say(f"{self.out.path} has lines the journal {self.journal} does not know "
                f"({len(unknown)}, e.g. custom_id {unknown[0]!r}): it was written with another "
                "journal. Pass that --journal, or choose another -o; nothing was sent")
            return 2
        self.done = {key: _Done(r.digest, r.status, tokens_of(body_of(r))["total"])
                     for key, r in records.items() if r.state == "done" and key in self.lines}
        try:
            await anyio.to_thread.run_sync(self.out.rewrite, records, self._order())
        except BrokenPipeError:
            raise  # -o - and the reader went away: main() exits quietly
        except OSError as exc:
            held = await anyio.to_thread.run_sync(count_lines, self.out.path)
            say(f"cannot write {self.out.path}: {exc.strerror or exc} (it holds "
                f"{_lines(held)}, as it did); nothing was sent")
            return 2
        del records  # the bodies: from here on memory follows the concurrency
        for bad in self.index.bad:
            say(f"{self.source}:{bad.line}: {bad.reason}; line skipped")
        if await anyio.to_thread.run_sync(self._all_served) and not await to_deliver(
                ledger, self.args):  # nor a notification for --notify (see _notify.py)
            # nothing to send: no SDK, no manager
            return self._report(await _records(ledger, self.index.lines, by=self.by_mode),
                                await notes_row(ledger, self.journal))
        if self.open_client() is None:
            return 2  # it said why (no API key, say); the output stands as the journal has it
        try:
            with work:
                await self._send(self.client, ledger, interrupts)
        except _metrics.MetricsPortError as exc:
            say(f"{exc}; nothing was sent")
            return 2
        finally:
            self.out.close()
        if interrupts.interrupted:
            return await self._interrupted(ledger, interrupts)
        if self.submitted == 0:  # nothing changed: the output written at the start stands
            return self._report(await _records(ledger, self.index.lines, by=self.by_mode),
                                await notes_row(ledger, self.journal))
        return self._report(await self._rewrite(ledger), await notes_row(ledger, self.journal))

    async def _send(self, client: Any, ledger: Ledger, interrupts: Interrupts) -> None:
        from .. import Job, RateLimit

        args = self.args
        options = self.fmt.manager_options(args, client)
        if args.max_cost is not None:
            options["max_cost"] = args.max_cost
        if prices := prices_of(args):
            options["prices"] = prices
        if args.rpm is not None or args.tpm is not None:
            options["rate_limit"] = RateLimit(requests_per_minute=args.rpm,
                                              tokens_per_minute=args.tpm)
        if (notify := notify_option(args)) is not None:  # --notify URL: see _notify.py
            options["notify"] = notify
        if getattr(args, "escalate_file", None) is not None:  # an Escalation (asyncbg/_outcomes)
            options["escalate"] = args.escalate_file
        if getattr(args, "by", None) is not None:  # --by: the cheapest way in time (_by.py)
            await _by().send_by(self, client, ledger, interrupts, options)
            return
        provider = {"anthropic": "anthropic", "gemini": "gcp.gemini"}.get(
            getattr(args, "provider", None) or "openai", "openai")
        async with _metrics.hooks_for(args, provider_name=provider) as hooks:
            options["hooks"] = hooks
            send, receive = anyio.create_memory_object_stream[Job](max_buffer_size=math.inf)
            with send, receive:
                try:
                    await self._manage(client, ledger, interrupts, options, send.send_nowait,
                                       receive)
                finally:  # the manager has closed: nothing is held, no grace to end
                    interrupts.held = interrupts.leave = None

    async def _manage(self, client: Any, ledger: Ledger, interrupts: Interrupts,
                      options: dict[str, Any], on_done: Callable[[Job], None],
                      receive: MemoryObjectReceiveStream[Job]) -> None:
        from .. import BackgroundManager
        from . import freeze_start_up

        freeze_start_up()  # the SDK and the engine are loaded now: out of the collector's view
        args = self.args
        async with BackgroundManager(client, journal=ledger, **options, cancel_on_exit=False,
                                     on_done=on_done) as mgr:
            interrupts.on_cancel = mgr.cancel_all
            # A server never reached is said by the run's last line (connection_failure, or
            # the summary's unreached lines), once: not by the engine's error event as well.
            mgr._scheduler.say_unreachable = False
            # Responses the journal could not take make a stop wait for it (exit_grace): said,
            # and a second Ctrl-C ends the wait (asyncbg/_cli/_signals.py).
            interrupts.held = lambda: len(mgr.unrecorded())
            interrupts.leave = mgr.leave_now
            interrupts.exit_grace = mgr.exit_grace
            interrupts.kept_in = str(Rescue(self.journal).path)
            for hook in options.get("hooks", ()):
                hook.observe(mgr)  # gauges read from statistics(), for --metrics-port

            def live() -> Live:
                stats = mgr.statistics()
                pacer = _pacer(mgr)
                held = pacer.statistics().hold_remaining if pacer is not None else 0.0
                retrying = getattr(stats, "retrying", 0)  # engines before it counted none
                self.stats = Live(in_flight=max(stats.live - retrying, 0), retries=stats.retries,
                                  cost=stats.cost, budget=args.max_cost, held=held,
                                  retrying=retrying)
                self.requests, self.polls = stats.requests, stats.polls
                self.possible_duplicates = stats.possible_duplicates
                self.batch_reruns = stats.batch_reruns
                return self.stats

            from rich.console import Console

            mode = Display.mode_for(Console(file=sys.stderr), progress=args.progress)
            display = Display(self.tally, live, mode=mode, every=args.progress_every)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(display.run)
                    tg.start_soon(_say_holds, mgr)
                    failure: LedgerError | None = None
                    try:
                        await self._feed(mgr, ledger, receive, interrupts)
                    except LedgerError as exc:
                        failure = exc  # raised below, outside the task group: not in a group
                    tg.cancel_scope.cancel()
                if failure is not None:
                    raise failure
            finally:
                interrupts.on_cancel = None
                live()

    async def _feed(self, mgr: BackgroundManager, ledger: Ledger,
                    jobs_done: MemoryObjectReceiveStream[Job], interrupts: Interrupts) -> None:
        """Submit the input's lines while a collector writes each one's outcome as it ends."""
        window = max(WINDOW * mgr.max_concurrency, MIN_WINDOW)
        slots = anyio.Semaphore(window)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._collect, mgr, ledger, jobs_done, slots)
                await self._submit(mgr, slots, window, interrupts)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _collapse(group) from None

    async def _submit(self, mgr: BackgroundManager, slots: anyio.Semaphore, window: int,
                      interrupts: Interrupts) -> None:
        """Read and submit the lines, then wait until every submitted one was collected."""
        # Served without a claim only when no budget needs the journal's spend counted.
        unclaimed = self.args.max_cost is None
        for n, req in enumerate(self.fmt.requests(self.source, self.args)):
            if n % 64 == 0:
                await anyio.lowlevel.checkpoint()  # a big file never starves the loop
            if interrupts.interrupted:
                break  # stop creating (--cancel-on-interrupt cancels before the work stops)
            if self.index.lines.get(req.custom_id) != req.line:
                continue  # the file changed since it was checked: only checked lines run
            if unclaimed and (done := self._served(req)) is not None:
                self.tally.add(done.status, done.tokens)
                self.tokens[req.custom_id] = done.tokens
                continue
            await slots.acquire()
            try:
                await mgr.submit_request(req.body, key=req.custom_id,
                                         deadline=self.args.deadline)
                self.submitted += 1
            except (JournalMismatchError, ValueError) as exc:
                slots.release()
                say(f"{self.source}:{req.line}: {exc}; line skipped")
                self.skipped[req.custom_id] = str(exc)
                del self.lines[req.custom_id]
                self.tally.total -= 1
        for _ in range(window):  # every submitted job collected
            await slots.acquire()

    def _served(self, req: BatchRequest) -> _Done | None:
        """The journal's finished record of a line, if it ran the very request the line asks
        for now: such a line is counted, not submitted."""
        done = self.done.get(req.custom_id)
        if done is None:
            return None
        try:
            prepared = self.fmt.prepare(req.body)
        except ValueError:
            return None  # the provider refuses it: submitting says why
        return done if done.digest == digest(prepared) else None

    def _all_served(self) -> bool:
        """Whether every line is one the journal has finished with its very request: then the
        run counts them all (in a thread: it reads the input once more) and sends nothing.
        Runs that ask the manager for more than the lines (a budget, which counts the journal's
        spend; metrics) always go through it; so do notifications left pending (see
        ``to_deliver``)."""
        args = self.args
        if (args.max_cost is not None or getattr(args, "metrics_port", None) is not None
                or len(self.done) != len(self.lines)):
            return False
        if self.by_mode:
            return False  # --by: the summary says what each way cost (asyncbg/_cli/_by.py)
        served: list[tuple[str, _Done]] = []
        for req in self.fmt.requests(self.source, self.args):
            if self.index.lines.get(req.custom_id) != req.line:
                continue  # the file changed since it was checked: only checked lines count
            if (done := self._served(req)) is None:
                return False
            served.append((req.custom_id, done))
        if len(served) != len(self.lines):
            return False
        for key, done in served:
            self.tally.add(done.status, done.tokens)
            self.tokens[key] = done.tokens
        return True

    async def _collect(self, mgr: BackgroundManager, ledger: Ledger,
                       jobs_done: MemoryObjectReceiveStream[Job], slots: anyio.Semaphore) -> None:
        """Count and write each job as it ends, in batches: one write and fsync per batch."""
        async for job in jobs_done:
            batch = [job]
            while len(batch) < BATCH:
                try:
                    batch.append(jobs_done.receive_nowait())
                except anyio.WouldBlock:
                    break
            records = []
            for job in batch:
                record = await final_record(ledger, job)  # a ladder shows its final attempt
                self._count(job, record)
                if record is not None:
                    records.append(record)
                mgr.forget(job.key)  # the manager need not keep what the journal has
            await self._append(records)
            # Only now: while a write is slow (or stalled) no more work is taken on than
            # the window, and the results waiting to be written stay the window's.
            for _ in batch:
                slots.release()

    def _count(self, job: Job, record: Record | None) -> None:
        tokens = tokens_of(body_of(record))["total"] if record is not None else 0
        self.tally.add(job.status.value, tokens)
        self.tokens[job.key] = tokens
        if job.key in self.done:
            return  # served from the journal: nothing was sent for it
        self.sent += 1
        if job.error_code == "connection_error":
            self.refused += 1
            self.refusal = self.refusal or job.error
        if job.error_code == "budget_exceeded" and job.response_id is None and (
                record is None or not record.terminal):
            self.not_run[job.key] = job.error or "not run: the budget was spent"

    async def _append(self, records: list[Record]) -> None:
        if self.output_error is not None or not records:
            return
        try:
            await anyio.to_thread.run_sync(self.out.append_many, records)
        except BrokenPipeError:
            raise  # -o - and the reader went away: main() exits quietly
        except OSError as exc:
            self.output_error = exc
            say(f"cannot write {self.out.path}: {exc.strerror or exc} (it holds "
                f"{_lines(self.out.lines)}); the run goes on, the journal keeps every result, "
                "and the output is rewritten from it at the end")

    async def _rewrite(self, ledger: Ledger) -> dict[str, Record]:
        """Rewrite the output from the journal at the end; on failure :attr:`output_error`
        says why (the file is left as it was, whole lines only)."""
        records = await _records(ledger, self.index.lines, by=self.by_mode)
        try:
            await anyio.to_thread.run_sync(self.out.rewrite, records, self._order())
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.output_error = exc
            self.output_total = sum(
                (r := records.get(key)) is not None and self.fmt.line(r) is not None
                for key in self._order())
        else:
            self.output_error = None
        return records

    def _output_failure(self) -> str | None:
        """One line for an output the end's rewrite could not write, or None."""
        exc = self.output_error
        if exc is None:
            return None
        return (f"cannot write {self.out.path}: {exc.strerror or exc}; it holds "
                f"{self.out.lines} of its {_lines(self.output_total)}, and the journal "
                f"{self.journal} has every result: once it can be written (free some space, "
                "or choose another -o), run the same command again to complete it; nothing "
                "is sent again")

    # -- endings ---------------------------------------------------------------------------

    async def _interrupted(self, ledger: Ledger, interrupts: Interrupts) -> int:
        await interrupts.settle(GRACE)
        if interrupts.cancel_live and self.open_client() is not None:
            # Whatever the run's own cancel_all left live (or a second signal asked for).
            with interrupts.cleanup:
                await cancel_live(self.client, ledger, timeout=CANCEL_TIMEOUT)
        records = await self._rewrite(ledger)
        name_failures(self.source, self.lines, records, unfinished=False)
        try:  # responses the journal could not take, kept for the next run (see _rescue.py)
            kept = {key for key, _ in Rescue(self.journal).read()}
        except OSError:
            kept = set()
        output = None if isinstance(self.out, StdoutOutput) else self.out.path
        for line in interrupt_message(self.lines, records, signal_name=interrupts.name,
                                      journal=self.journal, kept=kept, output=output):
            say(line)
        if (failure := self._output_failure()) is not None:
            say(failure)
        return interrupts.exit_code

    def _report(self, records: dict[str, Record],
                notes: tuple[str, str] | None = None) -> int:
        failure = connection_failure(self.sent, self.refused, self.refusal)
        if failure is not None:
            say(failure)  # one line, not one per job: the server could not be reached at all
            return 2
        problems = name_failures(self.source, self.lines, records, unfinished=True,
                                 reasons=self.not_run)
        bad = len(self.index.bad) + len(self.skipped)
        extra: list[tuple[str, object]] = [
            ("bad lines", bad),
            ("requests", f"{self.requests}  polls {self.polls}  retries {self.stats.retries}"),
        ]
        if self.possible_duplicates:
            extra.append(("possible duplicates", self.possible_duplicates))
        if self.batch_reruns:
            extra.append(("re-sent", f"{self.batch_reruns} batch requests whose batch expired "
                                     "before they ran"))
        if self.by_summary is not None:
            extra.append(("ways", self.by_summary))
        extra.append(("cost", f"{self.stats.dollars()} (priced jobs, this run and earlier ones)"
                      if self.args.max_cost is not None else self.stats.dollars()))
        not_run = sum(r.error_code == "budget_exceeded" and r.response_id is None
                      for c in self.lines if (r := records.get(c)) is not None) + sum(
            c not in records or not records[c].terminal for c in self.not_run)
        if not_run:
            extra.append(("not run", f"{not_run} lines, for the budget: rerun with a larger "
                                      "--max-cost to run exactly those"))
        if notes is not None:  # notifications still pending or failed: see _notify.py
            extra.append(notes)
        extra += [("wall time", f"{self.tally.elapsed():.1f}s"), ("output", self.out.path),
                  ("journal", self.journal)]
        print(summary(self.lines, records, extra=extra, not_run=self.not_run,
                      tokens_by_key=self.tokens), file=sys.stderr)
        if (failure := self._output_failure()) is not None:
            say(failure)
            return 2
        if (unreached := unreached_message(self.lines, records)) is not None:
            say(unreached)
        return 0 if bad == 0 and problems == 0 else 1


def _lines(count: int) -> str:
    return "1 line" if count == 1 else f"{count} lines"


def _pacer(mgr: BackgroundManager) -> Any:
    """The manager's create pacer (for its hold-off), if this engine has one."""
    return getattr(getattr(mgr, "meter", None), "pacer", None)


async def _say_holds(mgr: BackgroundManager) -> None:
    """One line when the server's Retry-After starts holding creates back, saying how long:
    a run that waits is not a run that hangs. Sampled like the progress display."""
    pacer = _pacer(mgr)
    if pacer is None:
        return
    cap = mgr.retry_policy.max_retry_after
    seen = pacer.statistics().holds
    while True:
        await anyio.sleep(0.25)
        stats = pacer.statistics()
        if stats.holds > seen and stats.hold_remaining >= 1:
            capped = (" (the most asyncbg waits at a time: the server may have asked for "
                      "longer)" if stats.hold_remaining >= cap - 1 else "")
            say(f"the server answered 429 with a Retry-After: creates wait "
                f"{stats.hold_remaining:.0f}s{capped}; responses already created go on")
        seen = stats.holds


def _collapse(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, or the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _records(ledger: Ledger, own: Container[str], *, by: bool = False
                   ) -> dict[str, Record]:
    """The journal's records, each escalation ladder folded under its line's key
    (asyncbg/_outcomes/_journal.py); ``own``, the input's custom_ids, are never attempts.
    With ``--by``, one record per line: its latest way (asyncbg/_deadline/_journal.py)."""
    if by:
        from .._deadline._journal import line_records

        return line_records(await ledger.records())
    return final_view({r.key: r for r in await ledger.records()}, own)
