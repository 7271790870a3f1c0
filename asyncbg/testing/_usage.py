"""How many tokens a fake response uses, reported in the shape of OpenAI's ``ResponseUsage``."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["UsageModel"]


@dataclass(frozen=True, slots=True)
class UsageModel:
    """The tokens each response uses, for cost tracking.

    ``input_tokens=None`` estimates them from the input text (a token per four characters).
    ``output_tokens`` are the visible answer's; the reported ``output_tokens`` add
    ``reasoning_tokens``, as OpenAI's do. ``cached_fraction`` of the input is reported cached.
    ``spread=0.5`` varies each configured count uniformly by ±50 % (seeded by ``seed``).

    A request sets its own counts exactly through ``metadata``: ``fake_input_tokens``,
    ``fake_output_tokens``, ``fake_reasoning_tokens`` and ``fake_cached_tokens``.
    """

    input_tokens: int | None = None
    output_tokens: int = 200
    reasoning_tokens: int = 800
    cached_fraction: float = 0.0
    spread: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        counts = (self.input_tokens or 0, self.output_tokens, self.reasoning_tokens)
        if min(counts) < 0:
            raise ValueError("UsageModel token counts must be >= 0")
        if not 0 <= self.cached_fraction <= 1:
            raise ValueError("UsageModel.cached_fraction must be in [0, 1]")
        if not 0 <= self.spread <= 1:
            raise ValueError("UsageModel.spread must be in [0, 1]")

    def plan(self, rng: random.Random, input_chars: int, metadata: Mapping[str, Any]) -> TokenPlan:
        """One response's counts. Raises ``ValueError`` on a malformed ``fake_*_tokens``."""

        def vary(n: int) -> int:
            return round(n * rng.uniform(1 - self.spread, 1 + self.spread)) if self.spread else n

        inp = _count(metadata, "fake_input_tokens")
        if inp is None:
            inp = vary(self.input_tokens) if self.input_tokens is not None else max(
                input_chars // 4, 1)
        out = _count(metadata, "fake_output_tokens")
        reasoning = _count(metadata, "fake_reasoning_tokens")
        cached = _count(metadata, "fake_cached_tokens")
        return TokenPlan(
            input=inp,
            cached=min(cached if cached is not None else round(inp * self.cached_fraction), inp),
            output=out if out is not None else vary(self.output_tokens),
            reasoning=reasoning if reasoning is not None else vary(self.reasoning_tokens),
        )


@dataclass(frozen=True, slots=True)
class TokenPlan:
    """The counts one response would report if it ran to completion."""

    input: int
    cached: int
    output: int
    reasoning: int

    @property
    def planned_output(self) -> int:
        return self.output + self.reasoning

    def report(self, produced: int) -> dict[str, Any]:
        """``usage`` after ``produced`` output tokens, reasoning and visible in proportion."""
        planned = self.planned_output
        reasoning = round(self.reasoning * produced / planned) if planned else 0
        return {
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": 0},
            "output_tokens": produced,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": self.input + produced,
        }


def _count(metadata: Mapping[str, Any], name: str) -> int | None:
    if name not in metadata:
        return None
    value = metadata[name]
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"metadata.{name} must be a whole number; got {value!r}") from None
    if count < 0:
        raise ValueError(f"metadata.{name} must be >= 0; got {value!r}")
    return count
