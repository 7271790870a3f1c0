"""``asyncbg run --by 2h|8h|24h|TIMESTAMP``: each line the cheapest way expected to finish by
then (a :class:`~asyncbg.DeadlineManager`), written and reported like any run.

The journal keeps one key per way a line took (``<custom_id>@batch``, ``@flex``,
``@background``); the output and the summary read it as one record per line
(:func:`~asyncbg._deadline._journal.line_records`), so a rerun with ``--by`` continues every
line where it stands. The summary adds what each way cost and what the same lines would have
cost all at full price.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import anyio

from .. import JournalMismatchError
from .._deadline._costs import journal_costs
from .._deadline._manager import DeadlineLine, DeadlineManager
from .._deadline._policy import DeadlinePolicy, parse_by
from .._ledgers import Ledger, LedgerError
from ._formats import BATCH_DELAY
from ._ops import say
from ._progress import Display, Live

if TYPE_CHECKING:
    from ._run import _Run
    from ._signals import Interrupts

__all__ = ["by_problem", "send_by"]

#: What the command line runs by (tests replace them to control time).
POLICY = DeadlinePolicy()
CLOCK: Callable[[], float] = time.time


def by_problem(args: argparse.Namespace) -> str | None:
    """Why ``--by`` cannot run with these options (None when it can); sets ``args.by_at``."""
    if getattr(args, "by", None) is None:
        return None
    if args.provider != "openai":
        return ("--by runs OpenAI lines on the Batch API, flex or background responses: it "
                "needs --provider openai (the default)")
    for option, value in (("--max-cost", args.max_cost), ("--notify", args.notify),
                          ("--metrics-port", getattr(args, "metrics_port", None)),
                          ("--escalate-file", getattr(args, "escalate_file", None))):
        if value:
            return f"--by and {option} cannot be used together yet"
    try:
        args.by_at = parse_by(args.by, CLOCK())
    except ValueError as exc:
        return str(exc)
    return None


async def send_by(run: _Run, client: Any, ledger: Ledger, interrupts: Interrupts,
                  options: dict[str, Any]) -> None:
    """Submit the input's lines to a :class:`DeadlineManager` and write each as it ends."""
    args = run.args
    collected = anyio.Semaphore(0)
    send, receive = anyio.create_memory_object_stream[DeadlineLine](max_buffer_size=math.inf)
    dm = DeadlineManager(client, by=args.by_at, journal=ledger, policy=POLICY, clock=CLOCK,
                         max_concurrency=options["max_concurrency"], batch_delay=BATCH_DELAY,
                         prices=options.get("prices"), rate_limit=options.get("rate_limit"),
                         cancel_on_exit=False, on_done=send.send_nowait)

    def live() -> Live:
        s = dm.statistics()
        run.stats = Live(in_flight=s.live, retries=s.retries, cost=s.cost)
        run.requests, run.polls = s.requests, s.polls
        return run.stats

    from rich.console import Console

    mode = Display.mode_for(Console(file=sys.stderr), progress=args.progress)
    display = Display(run.tally, live, mode=mode, every=args.progress_every)
    failure: LedgerError | None = None
    with send, receive:
        async with dm:
            interrupts.on_cancel = dm.cancel_all
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(display.run)
                    try:
                        async with anyio.create_task_group() as work:
                            work.start_soon(_collect, run, dm, ledger, receive, collected)
                            sent = await _submit(run, dm, interrupts)
                            for _ in range(sent):  # every line written
                                await collected.acquire()
                            work.cancel_scope.cancel()
                    except* LedgerError as group:
                        failure = cast(LedgerError, group.exceptions[0])
                    tg.cancel_scope.cancel()
            finally:
                interrupts.on_cancel = None
                live()
            if failure is not None:
                raise failure  # as itself, not in a group: the run says it in one line
    run.by_summary = journal_costs(await ledger.records(), options.get("prices")).text()


async def _submit(run: _Run, dm: DeadlineManager, interrupts: Interrupts) -> int:
    """Submit the lines; how many were."""
    sent = 0
    for n, req in enumerate(run.fmt.requests(run.source, run.args)):
        if n % 64 == 0:
            await anyio.lowlevel.checkpoint()
        if interrupts.interrupted:
            break
        if run.index.lines.get(req.custom_id) != req.line:
            continue  # the file changed since it was checked: only checked lines run
        try:
            await dm.submit_request(req.body, key=req.custom_id)
            run.submitted += 1
            sent += 1
        except (JournalMismatchError, ValueError) as exc:
            say(f"{run.source}:{req.line}: {exc}; line skipped")
            run.skipped[req.custom_id] = str(exc)
            del run.lines[req.custom_id]
            run.tally.total -= 1
    return sent


async def _collect(run: _Run, dm: DeadlineManager, ledger: Ledger,
                   ended: anyio.abc.ObjectReceiveStream[DeadlineLine],
                   collected: anyio.Semaphore) -> None:
    from .._deadline._journal import way_key

    async for line in ended:
        assert line.way is not None
        record = await ledger.get(way_key(line.key, line.way))
        if record is not None:
            record = dataclasses.replace(record, key=line.key)  # the output's custom_id
        run._count(cast(Any, line), record)  # a line reads as a job: key, status, error
        dm.forget(line.key)
        await run._append([record] if record is not None else [])
        collected.release()
