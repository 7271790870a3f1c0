"""Which way a line runs, and when it must leave it for a faster one.

OpenAI runs the same request three ways: through the Batch API (half price, within its 24 h
window), as a background response with ``service_tier="flex"`` (about half price, slower, and
sometimes short of capacity) and as a plain background response (full price, in minutes). Each
way *needs* some time: a line starts on the cheapest way whose need fits in the time left, and
while it is unfinished it stays there until the time left falls to the need of the next faster
way, then moves. Waiting as long as that is what makes it cheap; moving then is what keeps the
deadline. Flex is chosen only while it keeps its pace: once a flex response has run longer than
flex's need, new lines skip it.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

__all__ = ["DeadlinePolicy", "Way", "parse_by"]


class Way(enum.Enum):
    """A way of running a line, slowest (cheapest) first."""

    BATCH = "batch"
    FLEX = "flex"
    BACKGROUND = "background"


#: Slowest first: a move goes to a later one.
ORDER: tuple[Way, ...] = (Way.BATCH, Way.FLEX, Way.BACKGROUND)


@dataclass(frozen=True, slots=True)
class DeadlinePolicy:
    """The time each way needs, in seconds, and how often the clock is looked at.

    A line starts on the cheapest way whose need is at most the time left; a line still
    unfinished on a way moves to the next faster one when the time left falls to that one's
    need. The defaults: a batch is chosen with 20 hours left (``--by 24h`` allows the Batch
    API's 24 h window; most batches end within hours) and left an hour before the deadline;
    flex is chosen with an hour left and left 15 minutes before it, for background.
    """

    batch_needs: float = 20 * 3600.0
    flex_needs: float = 3600.0
    background_needs: float = 900.0
    #: Seconds between two looks at the clock for lines that must move.
    check_every: float = 30.0

    def __post_init__(self) -> None:
        for name in ("batch_needs", "flex_needs", "background_needs", "check_every"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"DeadlinePolicy.{name} must be a finite number of seconds "
                                 f">= 0, got {value!r}")
        if not self.batch_needs >= self.flex_needs >= self.background_needs:
            raise ValueError("DeadlinePolicy needs batch_needs >= flex_needs >= "
                             "background_needs: a faster way cannot need more time")
        if self.check_every <= 0:
            raise ValueError("DeadlinePolicy.check_every must be more than 0 seconds")

    def needs(self, way: Way) -> float:
        return {Way.BATCH: self.batch_needs, Way.FLEX: self.flex_needs,
                Way.BACKGROUND: self.background_needs}[way]

    def start(self, time_left: float, ways: Collection[Way], *,
              after: Way | None = None) -> Way:
        """The cheapest of ``ways`` (only those faster than ``after``, when given) whose need
        fits in ``time_left``; background when none does: it is the fastest there is."""
        for way in _faster(after):
            if way in ways and self.needs(way) <= time_left:
                return way
        return Way.BACKGROUND

    def must_move(self, way: Way, time_left: float, ways: Collection[Way]) -> bool:
        """Whether a line unfinished on ``way`` must move now: the time left has fallen to the
        need of the next faster way it could move to."""
        nearest = next((w for w in _faster(way) if w in ways), None)
        return nearest is not None and time_left <= self.needs(nearest)


def _faster(than: Way | None) -> tuple[Way, ...]:
    return ORDER if than is None else ORDER[ORDER.index(than) + 1:]


_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>s|m|min|h|d)", re.IGNORECASE)
_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_by(text: str, now: float) -> float:
    """``--by``: ``2h``, ``90m``, ``1h30m``, ``3600s``, ``1d``, or an ISO 8601 timestamp with
    its UTC offset (``2026-12-04T08:00:00Z``), as a Unix time. ``ValueError`` says what is
    wrong, in words for the command line."""
    value = text.strip()
    parts = list(_DURATION.finditer(value))
    if parts and "".join(p.group(0) for p in parts).replace(" ", "") == value.replace(" ", ""):
        seconds = sum(float(p.group("n")) * _UNITS[p.group("unit").lower()] for p in parts)
        if seconds <= 0:
            raise ValueError(f"--by {text!r}: the time left must be more than 0")
        return now + seconds
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"--by {text!r} is neither a duration (2h, 90m, 1h30m, 1d) nor an "
                         "ISO 8601 timestamp (2026-12-04T08:00:00Z)") from None
    if moment.tzinfo is None:
        raise ValueError(f"--by {text!r}: give the timestamp's UTC offset (Z, or +02:00), "
                         "so that it means one moment")
    at = moment.timestamp()
    if at <= now:
        raise ValueError(f"--by {text!r} has already passed")
    return at
