"""Progress while a run goes, and the summary at its end.

On a terminal: a rich progress bar on stderr (done/total, rate, ETA, in flight, retries,
tokens). While it shows, rich routes ``sys.stderr`` through its console, so log lines print
above the bar instead of gluing onto it. Elsewhere: quiet, or with ``--progress`` one plain line
every 30 seconds.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TextIO

import anyio

if TYPE_CHECKING:  # rich loads with the bar: `asyncbg status` prints with this module's rows
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["ORDER", "Display", "Live", "Tally", "counts_text", "plain_line", "rows"]

#: Statuses in the order people read them.
ORDER = ("pending", "queued", "in_progress", "completed", "failed", "cancelled", "incomplete")

Mode = Literal["bar", "lines", "off"]


@dataclass(frozen=True, slots=True)
class Live:
    """What the manager is doing right now: responses in flight and retries so far."""

    in_flight: int = 0
    retries: int = 0
    #: US dollars spent so far, and the budget (None: no --max-cost).
    cost: float = 0.0
    budget: float | None = None
    #: Seconds left of a hold-off the server asked for (Retry-After): creates wait meanwhile.
    held: float = 0.0
    #: Jobs waiting before they try again (a Retry-After, or a backoff after an error): not
    #: counted in ``in_flight``.
    retrying: int = 0

    def waiting(self) -> str:
        """``, 3 waiting to retry, creates held 42s by the server's Retry-After``, as far as
        either is true; else empty."""
        said = f", {self.retrying} waiting to retry" if self.retrying else ""
        if self.held >= 1:
            said += f", creates held {_duration(self.held)} by the server's Retry-After"
        return said

    def dollars(self) -> str:
        """``$1.23``, or ``$1.23 of $25.00`` with a budget."""
        spent = f"${self.cost:,.2f}"
        return spent if self.budget is None else f"{spent} of ${self.budget:,.2f}"


@dataclass(slots=True)
class Tally:
    """What has finished so far in a run: counts by final status and tokens."""

    total: int
    done: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    started: float = field(default_factory=anyio.current_time)

    def add(self, status: str, tokens: int = 0) -> None:
        self.done += 1
        self.by_status[status] += 1
        self.tokens += tokens

    def elapsed(self) -> float:
        return anyio.current_time() - self.started


def counts_text(counts: Counter[str] | dict[str, int]) -> str:
    """``completed 8, failed 1`` in the usual order; unknown statuses last."""
    names = [n for n in ORDER if counts.get(n)] + sorted(
        n for n in counts if n not in ORDER and counts[n])
    return ", ".join(f"{name} {counts[name]}" for name in names)


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def plain_line(tally: Tally, live: Live, elapsed: float) -> str:
    """One progress line for a log file or a pipe."""
    rate = tally.done / elapsed if elapsed > 0 else 0.0
    left = tally.total - tally.done
    eta = _duration(left / rate) if rate > 0 and left > 0 else "-"
    counts = counts_text(tally.by_status)
    return (
        f"asyncbg: {tally.done}/{tally.total} done" + (f" ({counts})" if counts else "")
        + f", {live.in_flight} in flight{live.waiting()}, {rate:.1f}/s, ETA {eta}, "
        f"retries {live.retries}, "
        f"tokens {tally.tokens:,}, {live.dollars()}, {_duration(elapsed)} elapsed"
    )


def _bar(console: Console) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f}/s" if speed else "-/s", style="progress.data.speed")

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[in_flight]} in flight{task.fields[waiting]}  "
                   "retries {task.fields[retries]}  "
                   "tokens {task.fields[tokens]:,}  {task.fields[dollars]}"),
        console=console,
        auto_refresh=False,  # refreshed from the event loop below: no thread of its own
        redirect_stderr=True,
        redirect_stdout=True,
    )


class Display:
    """Shows a run's progress until cancelled: ``tg.start_soon(display.run)``."""

    def __init__(
        self,
        tally: Tally,
        live: Callable[[], Live],
        *,
        mode: Mode,
        every: float = 30.0,
        console: Console | None = None,
        stream: TextIO | None = None,
        label: str = "responses",
    ) -> None:
        self.tally = tally
        self.live = live
        self.mode = mode
        self.every = every
        self.console = console
        self.stream = stream
        self.label = label

    @staticmethod
    def mode_for(console: Console, *, progress: bool) -> Mode:
        """A bar on a terminal; plain lines elsewhere only when asked for."""
        if console.is_terminal and not console.is_dumb_terminal:
            return "bar"
        return "lines" if progress else "off"

    async def run(self) -> None:
        if self.mode == "bar":
            await self._bar()
        elif self.mode == "lines":
            await self._lines()
        else:
            await anyio.sleep_forever()

    async def _lines(self) -> None:
        while True:
            await anyio.sleep(self.every)
            stream = self.stream or sys.stderr
            stream.write(plain_line(self.tally, self.live(), self.tally.elapsed()) + "\n")
            stream.flush()

    async def _bar(self) -> None:
        from rich.console import Console

        console = self.console or Console(file=sys.stderr)
        bar = _bar(console)
        with bar:
            task = bar.add_task(self.label, total=self.tally.total, in_flight=0, retries=0,
                                tokens=0, dollars="$0.00", waiting="")
            try:
                while True:
                    self._update(bar, task)
                    await anyio.sleep(0.2)
            finally:
                self._update(bar, task)

    def _update(self, bar: Progress, task: TaskID) -> None:
        live = self.live()
        bar.update(task, total=self.tally.total, completed=self.tally.done,
                   in_flight=live.in_flight, retries=live.retries, tokens=self.tally.tokens,
                   dollars=live.dollars(), waiting=live.waiting())
        bar.refresh()


def rows(items: Iterable[tuple[str, object]]) -> str:
    """A summary block: one ``name  value`` row per item, names padded to one column."""
    return "\n".join(f"{name:<11} {value}" for name, value in items)
