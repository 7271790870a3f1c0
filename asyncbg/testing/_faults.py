"""Faults the fake server can inject: scripted (the next N requests) or at random rates."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from ._wire import ErrorStyle, FakeAnswer, error_answer, html_page, not_found

__all__ = ["Fault", "FaultRates"]

FaultKind = Literal["429", "500", "503", "404", "quota", "html", "reset", "reset_after", "slow",
                    "drop"]
#: The Responses routes, and the batch APIs' (every provider's): ``batch_retrieve`` is a get or
#: a list of batches, ``batch_results`` a download of results, ``files`` OpenAI's file routes.
Route = Literal[
    "create", "retrieve", "cancel", "batch_create", "batch_retrieve", "batch_cancel",
    "batch_results", "files", "any",
]


@dataclass(slots=True)
class Fault:
    """A fault for the next ``times`` matching requests.

    * ``"429"``, ``"500"``, ``"503"``, ``"404"``: answered with that status before anything is
      done, so a create that meets one creates nothing. ``retry_after`` sets the
      ``Retry-After`` header of a 429 or 5xx: a number of seconds, or any text (``"nan"``,
      ``"soon"``) to see what a client makes of a garbage header.
    * ``"quota"``: a 429 with code ``insufficient_quota``, OpenAI's answer to an account
      without credit (retrying cannot help).
    * ``"html"``: answered 200 with an HTML page, as a misconfigured proxy does.
    * ``"reset"``: the connection drops before the request is processed.
    * ``"reset_after"``: the request *is* processed, then the connection drops before the answer
      (the case where a retried create starts a second response).
    * ``"slow"``: the answer is delayed by ``delay`` seconds.
    * ``"drop"``: a streamed answer (server-sent events) is cut after ``after`` events.

    Every kind meets the next ``times`` matching requests, from the first: ``after`` counts
    events of a drop, not requests, and is refused (``ValueError``) on another kind, as
    ``delay`` is on a kind other than ``"slow"``: ignored, either would mislead.
    """

    kind: FaultKind
    route: Route = "any"
    times: int = 1
    retry_after: float | str | None = None
    delay: float = 0.0
    after: int = 0

    def __post_init__(self) -> None:
        for name, value, owner, what in (
                ("after", self.after, "drop", "the events a stream keeps before it is cut"),
                ("delay", self.delay, "slow", "how long the answer waits")):
            if value and self.kind != owner:
                raise ValueError(
                    f"{name}={value:g} is for a {owner} fault ({what}); a {self.kind} fault "
                    f"meets the next {self.times} matching request(s) from the first")


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Random faults: each request meets each fault with the given probability (seeded)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_reset: float = 0.0
    retry_after: float | str | None = None
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


def fault_answer(fault: Fault, route: str, rid: str, style: ErrorStyle) -> FakeAnswer | None:
    """The answer of a fault met before any work is done; ``None`` for the other kinds."""
    kind = fault.kind
    if kind == "reset":
        return FakeAnswer(reset=True)
    if kind == "html":
        return html_page()
    if kind == "404":
        if route != "create":
            return not_found(style, rid)
        return error_answer(style, 404, "The model does not exist or you do not have access "
                            "to it.", "invalid_request_error", "model", "model_not_found")
    if kind == "quota":
        return error_answer(style, 429, QUOTA_MESSAGE, "insufficient_quota", None,
                            "insufficient_quota")
    if kind not in ("429", "500", "503"):
        return None
    answer = error_answer(
        style, int(kind),
        "Rate limit reached; retry later." if kind == "429"
        else "The server had an error while processing your request.",
        "rate_limit_exceeded" if kind == "429" else "server_error",
    )
    set_retry_after(answer, fault.retry_after)
    return answer


#: OpenAI's words for a 429 that no retry can help.
QUOTA_MESSAGE = ("You exceeded your current quota, please check your plan and billing details.")


def set_retry_after(answer: FakeAnswer, value: float | str | None) -> None:
    """Give ``answer`` a Retry-After header: seconds as a number, or any text as it is."""
    if value is not None:
        answer.headers["retry-after"] = value if isinstance(value, str) else f"{value:g}"
