"""Faults the fake server can inject: scripted (the next N requests) or at random rates."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Fault", "FaultRates"]

FaultKind = Literal["429", "500", "503", "reset", "reset_after", "slow", "drop"]
Route = Literal["create", "retrieve", "cancel", "any"]


@dataclass(slots=True)
class Fault:
    """A fault for the next ``times`` matching requests.

    * ``"429"``, ``"500"``, ``"503"``: answered with that status before anything is done, so a
      create that meets one creates nothing. ``retry_after`` sets the ``Retry-After`` header.
    * ``"reset"``: the connection drops before the request is processed.
    * ``"reset_after"``: the request *is* processed, then the connection drops before the answer
      (the case where a retried create starts a second response).
    * ``"slow"``: the answer is delayed by ``delay`` seconds.
    * ``"drop"``: a streamed answer (server-sent events) is cut after ``after`` events.
    """

    kind: FaultKind
    route: Route = "any"
    times: int = 1
    retry_after: float | None = None
    delay: float = 0.0
    after: int = 0


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Random faults: each request meets each fault with the given probability (seeded)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_reset: float = 0.0
    retry_after: float | None = None
    routes: tuple[Route, ...] = ("create", "retrieve", "cancel")
    seed: int = 0
    _rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    def draw(self, route: Route) -> Fault | None:
        if route not in self.routes:
            return None
        roll = self._rng.random()
        for kind, rate in (
            ("429", self.rate_429), ("500", self.rate_500), ("503", self.rate_503),
            ("reset", self.rate_reset),
        ):
            if roll < rate:
                return Fault(kind, route, retry_after=self.retry_after)  # type: ignore[arg-type]
            roll -= rate
        return None
