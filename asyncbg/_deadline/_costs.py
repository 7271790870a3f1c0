"""What each way cost, and what the same lines would have cost at full price.

Every job that used tokens is priced by the way it ran (a batch at the Batch API's rates, flex
at flex's, background at full price), moved-from jobs included: a flex response cancelled by a
move may have been paid for some of its tokens. The full-price figure prices only each line's
final answer as a background response: the same run, all of it sent the expensive way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._ledgers import Record
from .._spend._pricing import Price, PriceBook
from ._policy import ORDER, Way

__all__ = ["WayCosts", "journal_costs"]


@dataclass(slots=True)
class WayCosts:
    """Dollars by way, lines by the way they ended on, and the full-price comparison."""

    book: PriceBook = field(default_factory=PriceBook)
    dollars: dict[Way, float] = field(default_factory=lambda: dict.fromkeys(ORDER, 0.0))
    lines: dict[Way, int] = field(default_factory=lambda: dict.fromkeys(ORDER, 0))
    full_price: float = 0.0
    #: Jobs that used tokens of a model with no known price (not in the dollars).
    unpriced: int = 0

    @classmethod
    def with_prices(cls, prices: Mapping[str, Price] | None) -> WayCosts:
        return cls(book=PriceBook(prices))

    def paid(self, way: Way, body: bytes | None, model: str | None = None) -> float | None:
        """Add what one job on ``way`` used (its answer ``body``); its dollars."""
        usage, model = _usage(body, model)
        if usage is None or model is None:
            return None
        cost = self.book.cost(model, usage, batch=way is Way.BATCH,
                              service_tier="flex" if way is Way.FLEX else None)
        if cost is None:
            self.unpriced += 1
            return None
        self.dollars[way] += cost
        return cost

    def ended(self, way: Way, body: bytes | None, model: str | None = None) -> None:
        """A line ended on ``way`` with ``body``: count it, and price it at full price."""
        self.lines[way] += 1
        usage, model = _usage(body, model)
        if usage is not None and model is not None:
            self.full_price += self.book.cost(model, usage) or 0.0

    @property
    def total(self) -> float:
        return sum(self.dollars.values())

    def as_dict(self) -> dict[str, Any]:
        return {"dollars": {w.value: round(d, 6) for w, d in self.dollars.items()},
                "lines": {w.value: n for w, n in self.lines.items()},
                "total": round(self.total, 6), "full_price": round(self.full_price, 6),
                "unpriced": self.unpriced}

    def text(self) -> str:
        """One line for a summary: each way's lines and dollars, then the comparison."""
        ways = "  ".join(f"{w.value} {self.lines[w]} lines ${self.dollars[w]:,.4f}"
                         for w in ORDER if self.lines[w] or self.dollars[w])
        saved = self.full_price - self.total
        tail = (f"; all at full price ${self.full_price:,.4f} (saved ${saved:,.4f})"
                if self.full_price else "")
        unpriced = f"; {self.unpriced} jobs of unpriced models" if self.unpriced else ""
        return f"{ways or 'nothing ran'}{tail}{unpriced}"


def _usage(body: bytes | None, model: str | None) -> tuple[dict[str, Any] | None, str | None]:
    if not body:
        return None, model
    try:
        data = json.loads(body)
    except ValueError:
        return None, model
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
        return None, model
    named = data.get("model")
    return data["usage"], named if isinstance(named, str) else model


def journal_costs(records: Iterable[Record], prices: Mapping[str, Price] | None = None
                  ) -> WayCosts:
    """What a deadline run's journal says was paid on each way, and each line's final answer
    at full price (this run and earlier ones)."""
    from ._journal import latest, split_key

    costs = WayCosts.with_prices(prices)
    records = list(records)
    for record in records:
        parts = split_key(record.key)
        if parts is not None and record.body is not None:
            costs.paid(parts[1], record.body, _model_of(record))
    for way, record in latest(records).values():
        if record.terminal:
            costs.ended(way, record.body, _model_of(record))
    return costs


def _model_of(record: Record) -> str | None:
    try:
        request = json.loads(record.request or b"{}")
    except ValueError:
        return None
    model = request.get("model") if isinstance(request, dict) else None
    return model if isinstance(model, str) else None
