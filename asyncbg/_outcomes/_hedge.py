"""Hedged requests: one more copy of a job that runs longer than most of its kind.

When an attempt has run (since the server accepted it) longer than the chosen quantile of the
finished attempts of the same shape (model and request size), one copy is sent; the first to
complete wins and the other is cancelled on the server at once. The copy is an engine job of
its own (``KEY#hedge``), so a budget reserves for it like for any create. The extra spend, what
the losers cost, is capped as a share of the run's spend.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

__all__ = ["Hedge", "Tails", "shape_of"]


@dataclass(frozen=True, slots=True)
class Hedge:
    """Send one more copy of a job once it has run longer than ``after``.

    ``after`` is a quantile of the finished jobs of the same model and shape (``"p95"``), or
    seconds (``30.0``). ``max_extra`` caps what the losing copies cost, as a share of the run's
    spend (without known prices: as a share of the finished attempts' count). No copy is sent
    before ``min_samples`` jobs of that shape have finished.
    """

    after: str | float = "p95"
    max_extra: float = 0.05
    min_samples: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.after, str):
            _quantile(self.after)
        elif not (isinstance(self.after, (int, float)) and math.isfinite(self.after)
                  and self.after >= 0):
            raise ValueError(f"Hedge(after=...) is 'pNN' or seconds >= 0; got {self.after!r}")
        if not (isinstance(self.max_extra, (int, float)) and 0 <= self.max_extra <= 1):
            raise ValueError(f"Hedge(max_extra=...) is a share in [0, 1]; got {self.max_extra!r}")
        if self.min_samples < 1:
            raise ValueError(f"Hedge(min_samples=...) must be >= 1; got {self.min_samples!r}")


def _quantile(after: str) -> float:
    text = after.strip().lower()
    try:
        q = float(text[1:]) / 100 if text.startswith("p") else math.nan
    except ValueError:
        q = math.nan
    if not 0 < q < 1:
        raise ValueError(f"Hedge(after=...) is a quantile such as 'p95', or seconds; got "
                         f"{after!r}")
    return q


def shape_of(params: Mapping[str, Any]) -> tuple[str, int]:
    """Jobs that should take alike: the same model and the same order of input size."""
    size = len(str(params.get("input", "")))
    return str(params.get("model", "")), size.bit_length()


class Tails:
    """How long the attempts of each shape took, and the hedges' counters and cap."""

    __slots__ = ("_costs", "_durations", "_ready", "extra_pending", "finished", "hedge",
                 "hedge_cost", "hedges", "hedges_won")

    #: Durations kept per shape: the quantile follows the recent ones.
    KEEP = 1000

    def __init__(self, hedge: Hedge | None) -> None:
        self.hedge = hedge
        self._durations: dict[tuple[str, int], deque[float]] = {}
        self._costs: dict[tuple[str, int], deque[float]] = {}
        #: Waiters for a shape's first quantile (a job that began before there was one).
        self._ready: dict[tuple[str, int], list[anyio.Event]] = {}
        self.finished = 0
        self.hedges = 0
        self.hedges_won = 0
        self.hedge_cost = 0.0
        #: What the hedges still running are expected to waste.
        self.extra_pending = 0.0

    def record(self, shape: tuple[str, int], seconds: float, cost: float | None) -> None:
        """One attempt of ``shape`` completed after ``seconds`` (since it was accepted)."""
        self.finished += 1
        durations = self._durations.setdefault(shape, deque(maxlen=self.KEEP))
        durations.append(seconds)
        if cost is not None:
            self._costs.setdefault(shape, deque(maxlen=self.KEEP)).append(cost)
        hedge = self.hedge
        if hedge is not None and len(durations) >= hedge.min_samples:
            for event in self._ready.pop(shape, ()):
                event.set()

    def threshold(self, hedge: Hedge, shape: tuple[str, int]) -> float | None:
        """Seconds after which an attempt of ``shape`` gets a copy; None while too few of that
        shape have finished."""
        if not isinstance(hedge.after, str):
            return float(hedge.after)
        durations = self._durations.get(shape)
        if durations is None or len(durations) < hedge.min_samples:
            return None
        ordered = sorted(durations)
        return ordered[min(int(_quantile(hedge.after) * len(ordered)), len(ordered) - 1)]

    def when_ready(self, shape: tuple[str, int], event: anyio.Event) -> None:
        """Set ``event`` once ``shape`` has a quantile."""
        self._ready.setdefault(shape, []).append(event)

    def forget(self, shape: tuple[str, int], event: anyio.Event) -> None:
        waiting = self._ready.get(shape)
        if waiting is not None and event in waiting:
            waiting.remove(event)

    def expected_cost(self, shape: tuple[str, int]) -> float | None:
        costs = self._costs.get(shape)
        return sum(costs) / len(costs) if costs else None

    def may_hedge(self, hedge: Hedge, shape: tuple[str, int], spend: float) -> float | None:
        """What one more copy is expected to waste, when the cap leaves room for it; else
        None. Without a known price, the cap counts copies against finished attempts."""
        expected = self.expected_cost(shape)
        if expected is None:
            return 0.0 if self.hedges + 1 <= hedge.max_extra * self.finished else None
        if self.hedge_cost + self.extra_pending + expected <= hedge.max_extra * spend:
            return expected
        return None
