"""How the fake server decides how long a response takes and how it ends."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["LatencyModel", "Outcomes"]

Outcome = Literal["completed", "failed", "incomplete", "stuck"]
OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "incomplete", "stuck")


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """How long a response takes from create to terminal, in seconds.

    ``kind`` is ``"fixed"`` (always ``median``), ``"uniform"`` (between ``low`` and ``high``) or
    ``"lognormal"`` (median ``median``, shape ``sigma``, clamped to ``[low, high]``). A response
    spends ``queue_fraction`` of its time ``queued`` and the rest ``in_progress``.

    ``tail`` is the share of responses that take ``tail_factor`` times as long (a slow
    replica: drawn per response, so a second copy of the same request is usually quick).

    A request overrides the model through ``metadata``: ``fake_duration`` (seconds) and
    ``fake_queue`` (seconds spent queued).
    """

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    median: float = 0.05
    low: float = 0.0
    high: float = math.inf
    sigma: float = 1.0
    queue_fraction: float = 0.2
    tail: float = 0.0
    tail_factor: float = 10.0

    @classmethod
    def fixed(cls, seconds: float, *, queue_fraction: float = 0.2) -> LatencyModel:
        return cls("fixed", median=seconds, queue_fraction=queue_fraction)

    @classmethod
    def uniform(cls, low: float, high: float, *, queue_fraction: float = 0.2) -> LatencyModel:
        return cls("uniform", median=(low + high) / 2, low=low, high=high,
                   queue_fraction=queue_fraction)

    @classmethod
    def lognormal(
        cls, median: float, sigma: float = 1.0, *, low: float = 0.0, high: float = math.inf,
        queue_fraction: float = 0.2,
    ) -> LatencyModel:
        return cls("lognormal", median=median, sigma=sigma, low=low, high=high,
                   queue_fraction=queue_fraction)

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(
                f"LatencyModel.kind must be fixed, uniform or lognormal: {self.kind!r}"
            )
        if self.median < 0 or self.low < 0 or self.high < self.low:
            raise ValueError("LatencyModel needs 0 <= low <= high and median >= 0")
        if not 0 <= self.queue_fraction <= 1:
            raise ValueError("LatencyModel.queue_fraction must be in [0, 1]")
        if not (0 <= self.tail <= 1 and self.tail_factor >= 0):
            raise ValueError("LatencyModel needs 0 <= tail <= 1 and tail_factor >= 0")

    def sample(self, rng: random.Random) -> float:
        value = self._draw(rng)
        # Drawn only with a tail, so that the sequences of existing seeds stay as they were.
        if self.tail > 0 and rng.random() < self.tail:
            value *= self.tail_factor
        return value

    def _draw(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.median
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        value = self.median * math.exp(rng.gauss(0.0, self.sigma))
        return min(max(value, self.low), self.high)


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Relative weights of how responses end; ``metadata["fake_outcome"]`` overrides per request.

    ``stuck`` responses stay ``queued`` for ever (until cancelled).
    """

    completed: float = 1.0
    failed: float = 0.0
    incomplete: float = 0.0
    stuck: float = 0.0

    def sample(self, rng: random.Random) -> Outcome:
        weights = (self.completed, self.failed, self.incomplete, self.stuck)
        if weights[1:] == (0.0, 0.0, 0.0):
            return "completed"
        return rng.choices(OUTCOMES, weights)[0]


def script(
    latency: LatencyModel, outcomes: Outcomes, rng: random.Random, metadata: Mapping[str, Any]
) -> tuple[float, float, Outcome]:
    """One response's (duration, time queued, outcome): drawn, or set by its ``metadata``.
    Raises ``ValueError`` on malformed metadata."""
    duration = latency.sample(rng)
    if "fake_duration" in metadata:
        duration = _seconds(metadata["fake_duration"], "fake_duration")
    queued = duration * latency.queue_fraction
    if "fake_queue" in metadata:
        queued = min(_seconds(metadata["fake_queue"], "fake_queue"), duration)
    outcome = outcomes.sample(rng)
    if "fake_outcome" in metadata:
        outcome = metadata["fake_outcome"]
        if outcome not in OUTCOMES:
            raise ValueError(
                f"metadata.fake_outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}"
            )
    return duration, queued, outcome


def truncated(outcome: Outcome, cap: int | None, metadata: Mapping[str, Any]) -> Outcome:
    """``incomplete`` for a response that would complete but whose ``max_output_tokens`` is
    below ``metadata["fake_needs_output_tokens"]`` (the answer it needs); else ``outcome``.
    Raises ``ValueError`` on a malformed count."""
    if outcome != "completed" or "fake_needs_output_tokens" not in metadata:
        return outcome
    needs = metadata["fake_needs_output_tokens"]
    try:
        count = int(needs)
    except (TypeError, ValueError):
        raise ValueError("metadata.fake_needs_output_tokens must be a whole number; got "
                         f"{needs!r}") from None
    return "incomplete" if cap is not None and cap < count else outcome


def _seconds(value: object, name: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"metadata.{name} must be a number of seconds; got {value!r}") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"metadata.{name} must be a finite number >= 0; got {value!r}")
    return seconds
