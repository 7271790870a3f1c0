"""Live progress and the closing summary, shared by the command line's verbs."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

import anyio

from ._job import Job
from ._manager import BackgroundManager

__all__ = ["Progress"]

ORDER = ("pending", "queued", "in_progress", "completed", "failed", "cancelled", "incomplete")


def tokens_of(job: Job) -> int:
    """Total tokens the server reported for a finished job (0 when it reported none)."""
    usage = (job._data or {}).get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) else 0


class Progress:
    """Counts by status, tokens and elapsed time: a live line on a TTY, quiet otherwise."""

    def __init__(self, mgr: BackgroundManager, *, stream: TextIO = sys.stderr,
                 live: bool | None = None, every: float = 0.2) -> None:
        self.mgr = mgr
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.every = every
        self.tokens = 0
        self.started = anyio.current_time()

    def add(self, job: Job) -> None:
        self.tokens += tokens_of(job)

    def counts(self, jobs: Iterable[Job]) -> Counter[str]:
        return Counter(j.status.value for j in jobs)

    def line(self) -> str:
        counts = self.counts(self.mgr.jobs)
        parts = [f"{name} {counts[name]}" for name in ORDER if counts[name]]
        elapsed = anyio.current_time() - self.started
        return f"{elapsed:6.1f}s  " + "  ".join(parts) + f"  tokens {self.tokens:,}"

    async def run(self) -> None:
        """Redraw until cancelled (run it in a task group and cancel it when done)."""
        if not self.live:
            await anyio.sleep_forever()
        try:
            while True:
                self.stream.write("\r\x1b[K" + self.line())
                self.stream.flush()
                await anyio.sleep(self.every)
        finally:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def summary(self, **extra: Any) -> str:
        counts = self.counts(self.mgr.jobs)
        stats = self.mgr.statistics()
        wall = anyio.current_time() - self.started
        lines = [
            f"jobs        {sum(counts.values())}  ("
            + ", ".join(f"{name} {counts[name]}" for name in ORDER if counts[name]) + ")",
            f"polls       {stats.polls}  ({stats.polls / max(len(self.mgr.jobs), 1):.1f} per job)"
            f"  requests {stats.requests}  retries {stats.retries}",
            f"tokens      {self.tokens:,}",
            f"wall time   {wall:.1f}s",
        ]
        lines += [f"{k.replace('_', ' '):<11} {v}" for k, v in extra.items()]
        return "\n".join(lines)
