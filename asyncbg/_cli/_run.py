"""``asyncbg run``: a Batch API input file as background responses, with the journal as truth.

A run checks everything it can before sending anything (paths, input, output, API key, the
journal and its lock), rebuilds the output file from the journal, sends what is not done,
appends lines as jobs end, and rebuilds the output again at the end, also after an interrupt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console

from .. import BackgroundManager, Job, JournalMismatchError, RateLimit
from .._ledgers import Ledger, LedgerError, Record, SQLiteLedger
from ._formats import FORMATS, close
from ._input import BatchRequest, Parsed
from ._notify import notify_option
from ._ops import cancel_live, say
from ._output import Existing, NotOurs, body_of, same_path, tokens_of
from ._progress import Display, Live, Tally
from ._report import connection_failure, interrupt_message, name_failures, summary
from ._signals import Interrupts

__all__ = ["run"]

#: Seconds a cancel of the live responses may take after an interrupt.
CANCEL_TIMEOUT = 10.0
#: Seconds after an interrupt in which a second one still asks for a cancel.
GRACE = 1.0


async def run(args: argparse.Namespace) -> int:
    """The ``run`` command; returns the exit status (see ``asyncbg run --help``)."""
    source = Path(args.input)
    output = Path(args.output)
    journal = Path(args.journal) if args.journal else output.with_name(output.name + ".journal")
    for a, b, what in ((source, output, "the input and the output"),
                       (source, journal, "the input and the journal"),
                       (output, journal, "the output and the journal")):
        if same_path(a, b):
            say(f"{what} are the same file ({a}); nothing was sent")
            return 2
    try:
        parsed = FORMATS[args.provider].read(source, args)
    except OSError as exc:
        say(f"cannot read {source}: {exc.strerror or exc}")
        return 2
    except UnicodeDecodeError as exc:
        say(f"{source} is not UTF-8 text: {exc}")
        return 2
    if parsed.duplicates:
        for problem in parsed.duplicates:
            say(f"{source}: {problem}")
        say("duplicate custom_id values; nothing was sent")
        return 2
    try:
        existing = FORMATS[args.provider].read_existing(output)
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
    client = FORMATS[args.provider].open(args)
    if client is None:
        return 2
    try:
        return await _Run(args, source, output, journal, parsed, existing).main(client)
    finally:
        with anyio.CancelScope(shield=True):
            await close(client)


class _Run:
    """One ``asyncbg run``, from its checks to its report."""

    def __init__(self, args: argparse.Namespace, source: Path, output: Path, journal: Path,
                 parsed: Parsed, existing: Existing) -> None:
        self.args = args
        self.source = source
        self.journal = journal
        self.parsed = parsed
        self.existing = existing
        self.out = FORMATS[args.provider].output_file(output)
        ids = {r.custom_id for r in parsed.requests}
        #: The output's lines, in this order: the input's, then any others it already had.
        self.order = [r.custom_id for r in parsed.requests] + [
            c for c in existing.custom_ids if c not in ids]
        #: Keys the journal had finished with the server's answer when the run started.
        self.served: set[str] = set()
        #: custom_id -> why its line was skipped (its key is journaled with another request).
        self.skipped: dict[str, str] = {}
        self.jobs: list[Job] = []
        self.tally = Tally(total=len(parsed.requests))
        self.stats = Live()
        self.requests = self.polls = self.possible_duplicates = 0
        self.output_failed = False

    async def main(self, client: Any) -> int:
        interrupts = Interrupts(cancel_live=self.args.cancel_on_interrupt,
                                cancel_timeout=CANCEL_TIMEOUT)
        try:
            async with anyio.create_task_group() as tg:
                work = anyio.CancelScope()
                await tg.start(interrupts.watch, work)
                try:
                    code = await self._journaled(client, work, interrupts)
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Only the run itself can fail here (the watcher never raises): show its own error.
            raise group.exceptions[0] if len(group.exceptions) == 1 else group from None
        return code

    async def _journaled(self, client: Any, work: anyio.CancelScope,
                         interrupts: Interrupts) -> int:
        try:
            self.out.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            say(f"cannot create {self.out.path.parent}: {exc.strerror or exc}; nothing was sent")
            return 2
        ledger = SQLiteLedger(self.journal, exclusive=True)
        try:
            await ledger.open()
        except LedgerError as exc:
            say(f"{exc}; nothing was sent")
            return 2
        try:
            return await self._run(client, ledger, work, interrupts)
        except LedgerError as exc:
            say(f"{exc}; the run stopped, leaving what it had created running on the server: "
                "run the same command again once the journal works, to collect it")
            return 1
        finally:
            with anyio.CancelScope(shield=True):
                await ledger.close()

    async def _run(self, client: Any, ledger: Ledger, work: anyio.CancelScope,
                   interrupts: Interrupts) -> int:
        records = await _records(ledger)
        self.served = {key for key, r in records.items() if r.state == "done"}
        unknown = [c for c in self.existing.custom_ids if c not in records]
        if unknown:
            say(f"{self.out.path} has lines the journal {self.journal} does not know "
                f"({len(unknown)}, e.g. custom_id {unknown[0]!r}): it was written with another "
                "journal. Pass that --journal, or choose another -o; nothing was sent")
            return 2
        try:
            self.out.rewrite(records, self.order)
        except OSError as exc:
            say(f"cannot write {self.out.path}: {exc.strerror or exc}; nothing was sent")
            return 2
        for bad in self.parsed.bad:
            say(f"{self.source}:{bad.line}: {bad.reason}; line skipped")
        try:
            with work:
                await self._send(client, ledger, interrupts)
        finally:
            self.out.close()
        if interrupts.interrupted:
            return await self._interrupted(client, ledger, interrupts)
        records = await self._rewrite(ledger)
        return self._report(records)

    async def _send(self, client: Any, ledger: Ledger,
                    interrupts: Interrupts) -> None:
        args = self.args
        options = FORMATS[args.provider].manager_options(args, client)
        if args.max_cost is not None:
            options["max_cost"] = args.max_cost
        if args.rpm is not None or args.tpm is not None:
            options["rate_limit"] = RateLimit(requests_per_minute=args.rpm,
                                              tokens_per_minute=args.tpm)
        if (notify := notify_option(args)) is not None:  # --notify URL: see _notify.py
            options["notify"] = notify
        async with BackgroundManager(client, journal=ledger, **options,
                                     cancel_on_exit=False) as mgr:
            interrupts.on_cancel = mgr.cancel_all

            def live() -> Live:
                stats = mgr.statistics()
                self.stats = Live(in_flight=stats.live, retries=stats.retries,
                                  cost=stats.cost, budget=args.max_cost)
                self.requests, self.polls = stats.requests, stats.polls
                self.possible_duplicates = stats.possible_duplicates
                return self.stats

            mode = Display.mode_for(Console(file=sys.stderr), progress=args.progress)
            display = Display(self.tally, live, mode=mode, every=args.progress_every)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(display.run)
                    failure: LedgerError | None = None
                    try:
                        await self._feed(mgr, ledger, interrupts)
                    except LedgerError as exc:
                        failure = exc  # raised below, outside the task group: not in a group
                    tg.cancel_scope.cancel()
                if failure is not None:
                    raise failure
            finally:
                interrupts.on_cancel = None
                live()

    async def _feed(self, mgr: BackgroundManager, ledger: Ledger,
                    interrupts: Interrupts) -> None:
        """Submit every line, then write each line's outcome as its job ends."""
        by_job: dict[Job, BatchRequest] = {}
        for req in self.parsed.requests:
            if interrupts.interrupted:
                break  # stop creating (--cancel-on-interrupt cancels before the work stops)
            try:
                job = await mgr.submit_request(req.body, key=req.custom_id,
                                               deadline=self.args.deadline)
            except (JournalMismatchError, ValueError) as exc:
                say(f"{self.source}:{req.line}: {exc}; line skipped")
                self.skipped[req.custom_id] = str(exc)
                self.tally.total -= 1
                continue
            by_job[job] = req
        self.jobs = list(by_job)
        async for job in mgr.as_completed(self.jobs):
            record = await ledger.get(job.key)
            tokens = 0
            if record is not None:
                self._append(record)
                tokens = tokens_of(body_of(record))["total"]
            self.tally.add(job.status.value, tokens)

    def _append(self, record: Record) -> None:
        if self.output_failed:
            return
        try:
            self.out.append(record)
        except OSError as exc:
            self.output_failed = True
            say(f"cannot append to {self.out.path}: {exc.strerror or exc}; it is rewritten "
                "from the journal at the end")

    async def _rewrite(self, ledger: Ledger) -> dict[str, Record]:
        records = await _records(ledger)
        try:
            self.out.rewrite(records, self.order)
        except OSError as exc:
            say(f"cannot write {self.out.path}: {exc.strerror or exc}; the results are in the "
                f"journal {self.journal}: run again once it can be written")
        return records

    # -- endings ---------------------------------------------------------------------------

    def _lines(self) -> list[BatchRequest]:
        return [r for r in self.parsed.requests if r.custom_id not in self.skipped]

    async def _interrupted(self, client: Any, ledger: Ledger,
                           interrupts: Interrupts) -> int:
        await interrupts.settle(GRACE)
        if interrupts.cancel_live:
            # Whatever the run's own cancel_all left live (or a second signal asked for).
            with interrupts.cleanup:
                await cancel_live(client, ledger, timeout=CANCEL_TIMEOUT)
        records = await self._rewrite(ledger)
        name_failures(self.source, self._lines(), records, unfinished=False)
        for line in interrupt_message(self._lines(), records, signal_name=interrupts.name,
                                      journal=self.journal):
            say(line)
        return interrupts.exit_code

    def _report(self, records: dict[str, Record]) -> int:
        failure = connection_failure([j for j in self.jobs if j.key not in self.served])
        if failure is not None:
            say(failure)  # one line, not one per job: the server could not be reached at all
            return 2
        problems = name_failures(self.source, self._lines(), records, unfinished=True)
        bad = len(self.parsed.bad) + len(self.skipped)
        extra: list[tuple[str, object]] = [
            ("bad lines", bad),
            ("requests", f"{self.requests}  polls {self.polls}  retries {self.stats.retries}"),
        ]
        if self.possible_duplicates:
            extra.append(("possible duplicates", self.possible_duplicates))
        extra.append(("cost", f"{self.stats.dollars()} (priced jobs, this run and earlier ones)"
                      if self.args.max_cost is not None else self.stats.dollars()))
        not_run = sum(j.error_code == "budget_exceeded" and j.response_id is None
                      for j in self.jobs)
        if not_run:
            extra.append(("not run", f"{not_run} lines, for the budget: rerun with a larger "
                                      "--max-cost to run exactly those"))
        extra += [("wall time", f"{self.tally.elapsed():.1f}s"), ("output", self.out.path),
                  ("journal", self.journal)]
        print(summary(self._lines(), records, extra=extra), file=sys.stderr)
        return 0 if bad == 0 and problems == 0 else 1


async def _records(ledger: Ledger) -> dict[str, Record]:
    return {r.key: r for r in await ledger.records()}
