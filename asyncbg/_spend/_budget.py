"""A spending cap that holds: each create reserves the job's expected cost before it is sent.

The expected cost of a job is the mean real cost of the finished jobs of its model; until one has
finished, it is priced from the request (:func:`asyncbg._spend._tokens.estimate_tokens`). A
create is sent only while ``spent + reserved + this <= max_cost``; a job that does not fit
waits while live jobs may still leave room for it, and is not run at all once spend alone
leaves none. Once a model's mean is known, the reservations of its live jobs are revalued at
that mean (plus a margin for the spread of their costs, :data:`Z`), so an estimate that was
far off stops counting as soon as the first real cost comes in.

Everything here is synchronous arithmetic, O(1) per call: the engine calls it once per create
and once per finished job.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

from ._pricing import PriceBook
from ._tokens import Tokens, estimate_tokens

__all__ = ["Budget"]


#: Live jobs of a model are covered at about the 95th percentile of their total cost, once two
#: have finished: ``n * mean + Z * sd * sqrt(n)`` (the sum of n varying costs spreads as sqrt(n)).
Z = 1.645


class _Model:
    """Running figures of one model: its finished jobs and the reservations of its live ones."""

    __slots__ = ("done", "estimates", "live", "m2", "mean", "reserved")

    def __init__(self) -> None:
        self.done = 0  # finished jobs with a known cost
        self.mean = self.m2 = 0.0  # their mean cost and sum of squared deviations (Welford)
        self.live = 0  # live reservations
        self.estimates = 0.0  # their sum while no job has finished
        self.reserved = 0.0  # what this model adds to Budget.reserved

    def cover(self, live: int) -> float:
        """Dollars to reserve for ``live`` jobs of this model."""
        if not self.done:
            return self.estimates
        sd = math.sqrt(self.m2 / (self.done - 1)) if self.done > 1 else 0.0
        return live * self.mean + Z * sd * math.sqrt(live)

    def add(self, cost: float) -> None:
        self.done += 1
        delta = cost - self.mean
        self.mean += delta / self.done
        self.m2 += delta * (cost - self.mean)


class Budget:
    """At most ``max_cost`` US dollars, counting finished jobs and reservations of live ones.

    Jobs of a model with no known price reserve 0 and never count.
    """

    __slots__ = ("_book", "_deferred", "_finished", "_keys", "_max_cost", "_models", "_not_run",
                 "_reserved", "_spent")

    def __init__(self, max_cost: float, book: PriceBook) -> None:
        if isinstance(max_cost, bool) or not isinstance(max_cost, int | float):
            raise TypeError(f"max_cost must be a number of US dollars, got {max_cost!r}")
        if not (math.isfinite(max_cost) and max_cost >= 0):
            raise ValueError(f"max_cost must be a finite number >= 0, got {max_cost!r}")
        self._max_cost = float(max_cost)
        self._book = book
        self._spent = 0.0
        self._reserved = 0.0
        self._finished = 0
        self._not_run = 0
        self._deferred = False
        self._models: dict[str, _Model] = {}
        self._keys: dict[Hashable, tuple[_Model | None, float]] = {}

    def reserve(self, key: Hashable, model: str, params: Mapping[str, Any], *,
                tokens: tuple[int, int] | None = None, batch: bool = False) -> float | None:
        """Reserve the expected cost of job ``key`` before its create; None if it does not fit.

        ``params`` are the ``responses.create`` arguments (their size, ``max_output_tokens``,
        ``service_tier`` and ``background_options`` matter until the model has a mean);
        ``tokens`` is an ``estimate_tokens(params)`` the caller already made. Returns the
        reservation in dollars (0.0 for a model with no known price), or None when the job does
        not fit: nothing may be sent for it. Then :attr:`deferred` says whether it may still fit
        once live jobs settle (reserve again after the next :meth:`settle` or :meth:`release`)
        or never will (end it ``BudgetExceeded``; it is counted in :attr:`not_run`).
        """
        if key in self._keys:
            self.release(key)
        m = self._models.get(model)
        if m is None:
            m = self._models[model] = _Model()
        if m.done:
            this = m.cover(m.live + 1) - m.reserved
        else:
            options = params.get("background_options")
            input_tokens, output_tokens = tokens or estimate_tokens(params)
            cost = self._book.cost(
                model, Tokens(input_tokens, 0, output_tokens, 0),
                service_tier=params.get("service_tier"), batch=batch,
                completion_window=(options.get("completion_window")
                                   if isinstance(options, Mapping) else None))
            if cost is None:
                self._keys[key] = (None, 0.0)
                return 0.0
            this = cost
        if self._spent + self._reserved + this > self._max_cost:
            # Live jobs may still come in under their reservations: then it may fit later.
            self._deferred = (self._reserved > 0
                              and self._spent + (m.cover(1) if m.done else this) <= self._max_cost)
            self._not_run += not self._deferred
            return None
        self._deferred = False
        self._keys[key] = (m, this)
        m.live += 1
        m.estimates += this
        self._revalue(m)
        return this

    def settle(self, key: Hashable, cost: float | None) -> None:
        """Job ``key`` finished (in any state): its reservation becomes its real ``cost``.

        ``cost`` None (no usage, or no known price) counts 0 and leaves the model's mean alone.
        """
        m, estimate = self._keys.pop(key, (None, 0.0))
        self._finished += 1
        if cost is not None:
            self._spent += cost
        if m is None:
            return
        m.live -= 1
        m.estimates = m.estimates - estimate if m.live else 0.0
        if cost is not None:
            m.add(cost)
        self._revalue(m)

    def release(self, key: Hashable) -> None:
        """Drop job ``key``'s reservation: nothing was sent for it after all."""
        m, estimate = self._keys.pop(key, (None, 0.0))
        if m is not None:
            m.live -= 1
            m.estimates = m.estimates - estimate if m.live else 0.0
            self._revalue(m)

    def _revalue(self, m: _Model) -> None:
        reserved = m.cover(m.live)
        self._reserved += reserved - m.reserved
        m.reserved = reserved
        if not self._keys:
            self._reserved = 0.0  # no float drift once nothing is live

    @property
    def reservations(self) -> int:
        """Jobs holding a reservation (admitted, not yet settled or released)."""
        return len(self._keys)

    @property
    def max_cost(self) -> float:
        return self._max_cost

    @property
    def spent(self) -> float:
        """Dollars spent by settled jobs."""
        return self._spent

    @property
    def reserved(self) -> float:
        """Dollars reserved for live jobs (covering their models' spread once it is known)."""
        return self._reserved

    @property
    def over(self) -> bool:
        """Whether real spend has passed ``max_cost`` (live jobs should then be cancelled)."""
        return self._spent > self._max_cost

    @property
    def deferred(self) -> bool:
        """Whether the last refusal may fit once live jobs settle (only reservations stand in
        its way); False when spend alone leaves no room for it."""
        return self._deferred

    @property
    def not_run(self) -> int:
        """Jobs refused for good by :meth:`reserve`: nothing was sent for them."""
        return self._not_run

    @property
    def finished(self) -> int:
        """Jobs settled."""
        return self._finished

    def message(self) -> str:
        """What the budget was, what was spent and what was not run (for ``BudgetExceeded``)."""
        verb = "passed" if self.over else "reached"
        text = (f"budget of ${self._max_cost:,.2f} {verb}: ${self._spent:,.2f} spent by "
                f"{self._finished:,} finished job{'' if self._finished == 1 else 's'}")
        if self._not_run:
            text += (f"; {self._not_run:,} job{' was' if self._not_run == 1 else 's were'} not "
                     "run (nothing was sent for them). Raise max_cost to run them")
        return text
