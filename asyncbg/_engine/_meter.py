"""What every job costs, the budget that bounds them, and the pace of creates.

The scheduler asks the meter before each create (:meth:`Meter.admit`: send now, wait, or not at
all for the budget) and tells it what each answer said (:meth:`Meter.answered`) and what each
finished job used (:meth:`Meter.settle`). Prices come from :mod:`asyncbg._spend._pricing`, the
budget's arithmetic from :mod:`asyncbg._spend._budget` and the pacing from
:mod:`asyncbg._spend._pacing`; this module only wires them to the jobs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from .._policies import parse_retry_after
from .._spend._budget import Budget
from .._spend._pacing import Pacer, RateLimit
from .._spend._pricing import Price, PriceBook, estimate_tokens, usage_tokens

__all__ = ["PARK", "Meter", "Spend", "Ticket"]

#: What :meth:`Meter.admit` answers for a job that may fit once live jobs have settled.
PARK = -1.0


class Spend:
    """Running totals of tokens and dollars over finished jobs."""

    __slots__ = ("cached_input_tokens", "cost", "input_tokens", "output_tokens",
                 "reasoning_tokens")

    def __init__(self) -> None:
        self.cost = 0.0
        self.input_tokens = 0
        self.cached_input_tokens = 0
        self.output_tokens = 0
        self.reasoning_tokens = 0


class Ticket:
    """One create that :meth:`Meter.admit` let through: it holds a place in the pacer's window
    until :meth:`answered`, and gives it back on every other way out of its ``with`` block
    (an error, a cancellation, a create that was not sent after all)."""

    __slots__ = ("_booked", "_meter", "_tokens")

    def __init__(self, meter: Meter, tokens: int, *, booked: bool) -> None:
        self._meter = meter
        self._tokens = tokens
        self._booked = booked

    def answered(self, http_status: int, limits: Mapping[str, str] | None) -> None:
        """The create came back (``http_status`` 0 when no answer came at all)."""
        if self._booked:
            self._booked = False
            self._meter.answered(http_status, limits)
            if self._meter.on_answer is not None:
                self._meter.on_answer()  # one more create may go now

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._booked:
            self._booked = False
            self._meter.pacer.create_abandoned(self._tokens)
            if self._meter.on_answer is not None:
                self._meter.on_answer()  # its place is free again: a waiting create may go


class Meter:
    """Cost, budget and pacing for one manager (see the module docstring)."""

    def __init__(
        self, *, prices: Mapping[str, Price] | None, max_cost: float | None,
        rate_limit: RateLimit | None, max_concurrency: int, batch: bool = False,
        max_hold: float = 120.0,
    ) -> None:
        if max_cost is not None and not max_cost >= 0:
            raise ValueError(f"max_cost must be a number of dollars >= 0, got {max_cost!r}")
        self.book = PriceBook(prices)
        self.budget = Budget(max_cost, self.book) if max_cost is not None else None
        self.pacer = Pacer(rate_limit, max_in_flight=max_concurrency, clock=anyio.current_time)
        self.batch = batch
        self.max_hold = max_hold
        self.spend = Spend()
        #: Called when a create is answered (the scheduler wakes a create waiting for the
        #: pacer's window).
        self.on_answer: Callable[[], object] | None = None

    # -- before and after a create -------------------------------------------------------------

    def admit(self, key: str, params: Mapping[str, Any]) -> Ticket | float | None:
        """A :class:`Ticket` to send ``key``'s create now, seconds to wait before asking again,
        :data:`PARK` to wait until a live job settles (the budget may have room then), or None:
        over budget for good."""
        tokens = estimate_tokens(params)
        if self.budget is not None:
            model = str(params.get("model") or "")
            if self.budget.reserve(key, model, params, tokens=tokens, batch=self.batch) is None:
                return PARK if self.budget.deferred else None
        if self.batch:
            # A batch provider's create only adds the job to a group sent as one request:
            # there is no per-job rate to pace (the remote batch is the unit).
            return Ticket(self, 0, booked=False)
        delay = self.pacer.create_delay(tokens[0] + tokens[1])
        if delay > 0:
            if self.budget is not None:
                self.budget.release(key)  # reserved again when it is admitted
            return delay
        return Ticket(self, tokens[0] + tokens[1], booked=True)

    def window_full(self) -> bool:
        """Whether creates wait for an answer to come back (rather than for a time)."""
        stats = self.pacer.statistics()
        return stats.hold_remaining <= 0 and stats.in_flight >= stats.window

    def room(self) -> int:
        """How many more creates the pacer's window takes now (0 while a hold-off lasts)."""
        stats = self.pacer.statistics()
        return 0 if stats.hold_remaining > 0 else max(stats.window - stats.in_flight, 0)

    def answered(self, http_status: int, limits: Mapping[str, str] | None) -> None:
        """A create came back (``http_status`` 0 when no answer came at all)."""
        if self.batch:
            return  # not paced (see admit)
        headers = dict(limits or {})
        wait = parse_retry_after(headers) if http_status == 429 else None
        if wait is not None:
            # Every create waits out a 429's Retry-After, up to the retry policy's cap (the
            # job's own retry is capped the same way); a value that is not a number is absent.
            headers.pop("retry-after", None)
            headers.pop("retry-after-ms", None)
            if math.isfinite(wait):
                headers["retry-after"] = f"{min(max(wait, 0.0), self.max_hold):.3f}"
        self.pacer.create_answered(http_status, headers)

    def unsent(self, key: str) -> None:
        """Nothing was created for ``key`` after all (rejected, unreachable): free its share."""
        if self.budget is not None:
            self.budget.release(key)

    def settle(self, key: str, params: Mapping[str, Any] | None, body: bytes | None
               ) -> tuple[dict[str, Any] | None, float | None]:
        """``key`` is terminal with ``body``: its usage and cost (None when unknown)."""
        usage, cost = self.price(params, body)
        if self.budget is not None:
            self.budget.settle(key, cost)
        if usage is not None:
            t = usage_tokens(usage)
            s = self.spend
            s.input_tokens += t.input
            s.cached_input_tokens += t.cached_input
            s.output_tokens += t.output
            s.reasoning_tokens += t.reasoning
        if cost is not None:
            self.spend.cost += cost
        return usage, cost

    def price(self, params: Mapping[str, Any] | None, body: bytes | None
              ) -> tuple[dict[str, Any] | None, float | None]:
        """The usage in ``body`` and what it cost, by the model and tier that served it."""
        if body is None:
            return None, None
        try:
            data = json.loads(body)
        except ValueError:
            return None, None
        if not isinstance(data, dict):
            return None, None
        # OpenAI and Anthropic say "usage" and "model"; Gemini "usageMetadata", "modelVersion".
        usage = data.get("usage") or data.get("usageMetadata") or data.get("usage_metadata")
        if not isinstance(usage, dict):
            return None, None
        params = params or {}
        model = (data.get("model") or data.get("modelVersion") or data.get("model_version")
                 or params.get("model"))
        if not isinstance(model, str):
            return usage, None
        tier = data.get("service_tier") or params.get("service_tier")
        options = data.get("background_options") or params.get("background_options")
        window = options.get("completion_window") if isinstance(options, dict) else None
        cost = self.book.cost(model, usage, service_tier=tier if isinstance(tier, str) else None,
                              completion_window=window if isinstance(window, str) else None,
                              batch=self.batch)
        return usage, cost

    @property
    def over_budget(self) -> bool:
        return self.budget is not None and self.budget.over

    def budget_message(self) -> str:
        return self.budget.message() if self.budget is not None else ""

    # -- polls -----------------------------------------------------------------------------------

    def poll_delay(self) -> float:
        """Seconds every poll must still wait after a 429 on a poll (0 when none)."""
        return self.pacer.poll_delay()

    def poll_limited(self, retry_after: float | None) -> None:
        """A poll was answered 429: every poll waits (``retry_after`` clamped to the cap)."""
        wait = retry_after if retry_after is not None and math.isfinite(retry_after) else 1.0
        self.pacer.poll_hold_off(min(max(wait, 0.0), self.max_hold))
