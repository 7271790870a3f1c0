"""What the fake batch APIs share: a batch's timeline, its requests' fates, and their scripts.

As for responses, time is computed, not scheduled: a batch records when validation ends and when
each of its requests ends, and every status, count and result is read off the clock.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ._faults import Route
from ._usage import TokenPlan
from ._wire import ErrorStyle, FakeAnswer

__all__ = ["BatchTiming"]

#: How a request ends if its batch lets it: as scripted, or ``invalid`` (its parameters were
#: refused). A request its batch stops first ends ``cancelled`` or ``expired``.
Fate = Literal["completed", "incomplete", "failed", "invalid", "stuck"]
Final = Literal["completed", "incomplete", "failed", "invalid", "cancelled", "expired"]
Phase = Literal["validating", "in_progress", "finalizing", "cancelling", "ended"]
Ending = Literal["completed", "failed", "cancelled", "expired"]

_OK: frozenset[str] = frozenset({"completed", "incomplete"})
_ID_CHARS = string.ascii_letters + string.digits
_ids = random.Random()


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """How long a fake batch spends outside its requests, in seconds.

    ``validating`` passes before any request starts (OpenAI's ``validating``, Gemini's
    ``PENDING``); ``finalizing`` between the last request's end and the batch's; a cancel takes
    ``cancelling`` seconds, and requests that end within them keep their results; a batch whose
    requests have not all ended ``window`` seconds after its creation expires (24 hours).
    """

    validating: float = 0.01
    finalizing: float = 0.01
    cancelling: float = 0.01
    window: float = 86_400.0

    def __post_init__(self) -> None:
        spans = (self.validating, self.finalizing, self.cancelling, self.window)
        if not all(math.isfinite(s) and s >= 0 for s in spans):
            raise ValueError("BatchTiming durations must be finite numbers of seconds >= 0")


@dataclass(slots=True, eq=False)
class Item:
    """One request of a batch: its key, when it ends, how, and what it would use."""

    key: str
    end_at: float
    fate: Fate
    tokens: TokenPlan
    request: Any  # the API's own request, as its module parsed it
    problem: str = ""  # why an ``invalid`` request was refused


@dataclass(slots=True, eq=False)
class Batch:
    """One batch of any API, on the server's clock."""

    id: str
    created: float
    created_wall: float
    timing: BatchTiming
    items: list[Item]
    info: dict[str, Any] = field(default_factory=dict)  # the API's own fields
    errors: list[dict[str, Any]] | None = None  # refused as a whole: it fails once validated
    cancelled_at: float | None = None
    cache: dict[str, Any] = field(default_factory=dict)  # what was rendered once it ended
    last_end: float = field(init=False)
    _ok_ends: list[float] = field(init=False)
    _bad_ends: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self._ok_ends = sorted(i.end_at for i in self.items if i.fate in _OK)
        self._bad_ends = sorted(i.end_at for i in self.items if i.fate in ("failed", "invalid"))
        stuck = any(i.fate == "stuck" for i in self.items)
        ends = [*self._ok_ends, *self._bad_ends]
        self.last_end = math.inf if stuck else max([self.ready_at, *ends])

    @property
    def ready_at(self) -> float:
        return self.created + self.timing.validating

    @property
    def expires_at(self) -> float:
        return self.created + self.timing.window

    @property
    def ended_at(self) -> float:
        if self.errors is not None:
            return self.ready_at
        cancel_end = math.inf
        if self.cancelled_at is not None:
            cancel_end = self.cancelled_at + self.timing.cancelling
        return min(self.last_end + self.timing.finalizing, self.expires_at, cancel_end)

    @property
    def cut(self) -> float:
        """When the requests still running are stopped (``inf``: none is)."""
        if self.cancelled_at is not None:
            return min(self.last_end, self.cancelled_at + self.timing.cancelling, self.expires_at)
        return min(self.last_end, self.expires_at)

    def phase(self, now: float) -> Phase:
        if now >= self.ended_at:
            return "ended"
        if self.cancelled_at is not None:
            return "cancelling"
        if now < self.ready_at:
            return "validating"
        return "in_progress" if now < self.last_end else "finalizing"

    def ending(self) -> Ending:
        """How the batch ended (read it once :meth:`phase` is ``ended``)."""
        if self.errors is not None:
            return "failed"
        if self.cancelled_at is not None:
            return "cancelled"
        if self.expires_at < self.last_end + self.timing.finalizing:
            return "expired"
        return "completed"

    def final(self, item: Item) -> Final:
        """How ``item`` ended, once the batch has."""
        if item.end_at <= self.cut and item.fate != "stuck":
            return item.fate
        return "cancelled" if self.cancelled_at is not None else "expired"

    def done(self, now: float) -> tuple[int, int]:
        """How many requests have succeeded and failed by ``now``: O(log n)."""
        t = min(now, self.cut)
        return bisect.bisect_right(self._ok_ends, t), bisect.bisect_right(self._bad_ends, t)

    def tally(self) -> dict[Final, int]:
        """How many requests ended each way (once the batch has ended); computed once."""
        tally: dict[Final, int] | None = self.cache.get("tally")
        if tally is None:
            tally = dict.fromkeys(
                ("completed", "incomplete", "failed", "invalid", "cancelled", "expired"), 0)
            for item in self.items:
                tally[self.final(item)] += 1
            self.cache["tally"] = tally
        return tally

    def wall(self, t: float) -> float:
        """Server-clock time ``t`` as a Unix timestamp."""
        return self.created_wall + (t - self.created)

    def cancel(self, now: float) -> None:
        if self.cancelled_at is None and self.phase(now) != "ended":
            self.cancelled_at = now


class Context(Protocol):
    """What an API's module needs from the server: the clock, scripts, counters, settings."""

    @property
    def timing(self) -> BatchTiming: ...
    @property
    def cancel_finished(self) -> Literal["error", "return"]: ...
    @property
    def error_style(self) -> ErrorStyle: ...

    def now(self) -> float: ...
    def wall(self) -> float: ...
    def plan(self, key: str, metadata: Mapping[str, Any], input_chars: int,
             start: float) -> tuple[float, Fate, TokenPlan]: ...
    def created(self, batch: Batch) -> None: ...
    def polled(self) -> None: ...
    def cancelled(self) -> None: ...
    def fetched(self) -> None: ...
    def uploaded(self) -> None: ...


class BatchApi(Protocol):
    """One provider's batch routes."""

    def match(self, method: str, parts: list[str]) -> tuple[Route, Callable[..., FakeAnswer],
                                                          tuple[str, ...]] | None:
        """The route ``parts`` (the path after the version) names, its handler and the ids in it.
        A handler is called as ``handler(*ids, query=..., body=...)``."""
        ...

    def fault(self, status: int, message: str, kind: str) -> FakeAnswer:
        """An error of ``status`` in this API's own shape (``kind``: the status's meaning)."""
        ...

    def clear(self) -> None: ...


def new_id(prefix: str, n: int = 24, alphabet: str = _ID_CHARS) -> str:
    """A fresh id; not a secret, so drawn fast (a batch's results may hold 100,000)."""
    return prefix + "".join(_ids.choices(alphabet, k=n))


def rfc3339(ts: float | None) -> str | None:
    if ts is None or not math.isfinite(ts):
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def page_after(ids: list[str], after: str | None, limit: int) -> tuple[list[str], bool]:
    """Up to ``limit`` of ``ids`` (newest first) after ``after``; and whether more follow."""
    start = ids.index(after) + 1 if after in ids else 0
    return ids[start:start + limit], start + limit < len(ids)


def text_of(value: Any) -> str:
    """The text in a message list or content: the strings in it, joined; or its JSON."""
    parts: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for k in ("content", "parts", "text"):
                if k in v:
                    walk(v[k])

    walk(value)
    return " ".join(p for p in parts if p)


def echo(text: str) -> str:
    """The fake model's answer to ``text``, as the Responses fake answers."""
    return f"echo: {text[:500]}"
