"""What the fake server remembers: each response's script, and the counters of what it saw."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from ._model import Outcome
from ._usage import TokenPlan

__all__ = ["Counters"]

LIVE = ("queued", "in_progress")


@dataclass(slots=True)
class Counters:
    """What the server saw. Read them in tests and benchmarks; ``reset()`` zeroes them.

    ``rate_limited`` counts the 429s of ``rate_limit``; ``max_live_rejected`` those of
    ``max_live``. Injected faults count in ``faults``. The ``batch_*`` counters are the batch
    APIs' (OpenAI, Anthropic, Gemini): ``batch_polls`` counts retrieves of one batch,
    ``result_fetches`` downloads of results, ``batch_requests`` the requests in each batch.
    """

    creates: int = 0
    retrieves: int = 0
    cancels: int = 0
    stream_requests: int = 0
    faults: int = 0
    rejected: int = 0
    rate_limited: int = 0
    max_live_rejected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    polls: dict[str, int] = field(default_factory=dict)
    detection_delays: dict[str, float] = field(default_factory=dict)
    webhooks_sent: int = 0
    webhooks_dropped: int = 0
    webhooks_failed: int = 0
    batch_creates: int = 0
    batch_polls: int = 0
    batch_cancels: int = 0
    result_fetches: int = 0
    file_uploads: int = 0
    batch_requests: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        in_flight = self.in_flight
        self.__init__()  # type: ignore[misc]
        self.in_flight = self.max_in_flight = in_flight


@dataclass(slots=True, eq=False)
class Resp:
    """One response's script: its request, and when it leaves ``queued`` and ends."""

    id: str
    created: float
    created_wall: int
    start_at: float
    end_at: float
    outcome: Outcome
    model: str
    background: bool
    store: bool
    metadata: dict[str, Any]
    input_text: str
    tokens: TokenPlan
    max_output_tokens: int | None
    extra: dict[str, Any]
    cancelled_at: float | None = None
    seen_terminal: bool = False
    in_heap: bool = False
    webhook_sent: bool = False

    def status(self, now: float) -> str:
        """The status a retrieve answers at ``now``: read off the timeline, never stored."""
        if self.cancelled_at is not None:
            return "cancelled"
        if now < self.start_at:
            return "queued"
        if now < self.end_at:
            return "in_progress"
        return self.outcome

    @property
    def terminal_at(self) -> float:
        return self.cancelled_at if self.cancelled_at is not None else self.end_at


class Timeline:
    """The responses by id, and how many are live: a heap of end times, drained lazily."""

    def __init__(self, counters: Counters) -> None:
        self.responses: dict[str, Resp] = {}
        self.counters = counters
        self._ends: list[tuple[float, str]] = []

    def add(self, r: Resp, now: float) -> None:
        self.responses[r.id] = r
        self.expire(now)
        if r.end_at > now:
            r.in_heap = True
            heapq.heappush(self._ends, (r.end_at, r.id))
            c = self.counters
            c.in_flight += 1
            c.max_in_flight = max(c.max_in_flight, c.in_flight)

    def cancel(self, r: Resp, now: float) -> None:
        r.cancelled_at = now
        if r.in_heap:
            r.in_heap = False
            self.counters.in_flight -= 1

    def expire(self, now: float) -> None:
        """Stop counting the responses that have ended by ``now``."""
        ends = self._ends
        while ends and ends[0][0] <= now:
            _, rid = heapq.heappop(ends)
            r = self.responses.get(rid)
            if r is not None and r.in_heap:
                r.in_heap = False
                self.counters.in_flight -= 1

    def live(self, now: float) -> int:
        self.expire(now)
        return self.counters.in_flight

    def next_end(self) -> float | None:
        """When the next live response ends (``None``: none will by itself)."""
        ends = self._ends
        while ends and not ((r := self.responses.get(ends[0][1])) and r.in_heap):
            heapq.heappop(ends)  # a cancelled response's entry
        return ends[0][0] if ends else None

    def take_webhook(self, rid: str, now: float) -> str | None:
        """The status to announce for ``rid``, once: ``None`` if gone, live or announced."""
        r = self.responses.get(rid)
        if r is None or r.webhook_sent or r.status(now) in LIVE:
            return None  # a live one's entry is stale (it was rescheduled)
        r.webhook_sent = True
        return r.status(now)

    def clear(self) -> None:
        self.responses.clear()
        self._ends.clear()
        self.counters.in_flight = 0
