"""Creates paced below the rate limit, so that no job learns about a limit by hitting it.

A :class:`Pacer` answers one question before each create: "send now, or ask again in how many
seconds?". It combines four things, each O(1) per call, with time from an injected clock:

* **One hold-off for everyone.** A 429 on any create pauses every create until its Retry-After.
  Polls have a separate hold-off (:meth:`Pacer.poll_hold_off`).
* **The user's limits** (:class:`RateLimit`) as token buckets. OpenAI enforces per-minute limits
  over shorter periods ("quantized": 60,000 RPM may be enforced as 1,000 requests a second), so a
  bucket holds one second's worth, not a minute's: at most a second's burst at the start.
* **The server's headroom.** Every answer's ``x-ratelimit-remaining-*`` and ``-reset-*`` headers
  re-sync a local model of the server's bucket: its level is ``remaining`` less what is still in
  flight, it refills at ``(limit - remaining) / reset`` (or spreads ``remaining`` over ``reset``
  when the limit is not sent), and the last few percent are kept in reserve. Creates spend the
  headroom while there is plenty and are spread at the refill rate once it runs low.
* **Slow start.** Until limits are known (no headers seen and no RateLimit), at most
  :data:`INITIAL_WINDOW` creates are in flight; the window doubles each time a full window of
  answers comes back without a 429, up to ``max_in_flight``, and halves on a 429 (then grows by
  one per window: AIMD, as TCP does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .._policies import MAX_HINT, RETENTION_GUARD, parse_retry_after

__all__ = ["Pacer", "PacerStatistics", "RateLimit", "parse_duration"]

INITIAL_WINDOW = 4
#: Seconds of a user's per-minute limit that may be sent as one burst.
BURST_SECONDS = 1.0
#: Share of the server's bucket kept in reserve (against answers that arrive out of order).
HEADROOM_RESERVE = 0.05
#: Share of the gap by which an answer reporting more headroom than the local model raises it.
CATCH_UP = 0.2
#: Hold-off after a 429 that says neither when to retry nor anything about the limits.
DEFAULT_HOLD = 1.0

#: The largest rate-limit count (requests or tokens) and reset a header is taken to say.
MAX_COUNT = 1e12
MAX_RESET = 86_400.0

_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_durations: dict[str, float | None] = {}
_HEADERS = {kind: (f"x-ratelimit-remaining-{name}", f"x-ratelimit-limit-{name}",
                   f"x-ratelimit-reset-{name}")
            for kind, name in ((False, "requests"), (True, "tokens"))}


def parse_duration(text: str) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: ``120ms``, ``6m0s``, ``1m30.5s``, ``2``."""
    if text in _durations:  # the same few values recur: parse each once
        return _durations[text]
    if len(_durations) >= 4_096:
        _durations.clear()
    seconds = _durations[text] = _parse_duration(text.strip())
    return seconds


def _parse_duration(text: str) -> float | None:
    try:
        total = float(text)
    except ValueError:
        total, end = 0.0, 0
        for part in _PART.finditer(text):
            if part.start() != end:
                return None
            total += float(part[1]) * _UNITS[part[2]]
            end = part.end()
        if not end or end != len(text):
            return None
    if not (math.isfinite(total) and total >= 0):
        return None
    # Bounded both ways so that a rate computed from it stays finite: below a microsecond is 0
    # ("the bucket is full"), and no window is taken to be longer than a day.
    return 0.0 if total < 1e-6 else min(total, MAX_RESET)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Limits the user knows: creates per minute and (estimated) tokens per minute."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"RateLimit.{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"RateLimit.{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class PacerStatistics:
    """A snapshot of a :class:`Pacer`."""

    window: int  #: creates allowed in flight
    in_flight: int  #: creates booked and not yet answered
    limits_known: bool  #: whether a RateLimit was given or rate-limit headers were seen
    sent: int  #: creates booked by ``create_delay``
    answered: int  #: answers to creates
    rate_limited: int  #: of those, 429s
    holds: int  #: create hold-offs started
    poll_holds: int  #: poll hold-offs started
    hold_remaining: float  #: seconds left of the current create hold-off


class _Bucket:
    """A token bucket: ``level`` at time ``at``, refilled at ``rate`` a second up to ``cap``."""

    __slots__ = ("at", "cap", "level", "rate", "reserve")

    def __init__(self, rate: float, cap: float, level: float, at: float, reserve: float) -> None:
        self.rate, self.cap, self.level, self.at, self.reserve = rate, cap, level, at, reserve

    def take(self, cost: float, now: float) -> None:
        self.level = min(self.cap, self.level + self.rate * (now - self.at)) - cost
        self.at = now


def _number(value: str | None) -> float | None:
    """A count from an ``x-ratelimit-limit-*`` or ``-remaining-*`` header, if usable: garbage,
    NaN, infinite and negative values count as absent, huge ones are clamped."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return min(number, MAX_COUNT) if math.isfinite(number) and number >= 0 else None


def _finite_wait(seconds: float) -> float:
    """A hold-off that cannot poison the clock arithmetic: NaN and negative are 0, and
    infinity is the longest hint a server is believed (its Retry-After is parsed likewise)."""
    if math.isnan(seconds) or seconds <= 0:
        return 0.0
    return min(seconds, MAX_HINT)


class Pacer:
    """Decides when each create may be sent; see the module docstring. Not thread-safe."""

    __slots__ = ("_answered", "_buckets", "_clean", "_clock", "_gap", "_hold_until", "_holds",
                 "_in_flight", "_known", "_last_answer", "_max", "_poll_holds", "_poll_until",
                 "_rate_limited", "_recover", "_sent", "_server", "_ssthresh", "_tokens_in_flight",
                 "_window")

    def __init__(self, rate_limit: RateLimit | None, *, max_in_flight: int,
                 clock: Callable[[], float]) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight!r}")
        self._clock = clock
        self._max = max_in_flight
        now = clock()
        # (bucket, counts tokens?) for the user's limits, then the server's requests and tokens.
        self._buckets: list[tuple[_Bucket, bool]] = []
        for per_minute, tokens in ((rate_limit and rate_limit.requests_per_minute, False),
                                   (rate_limit and rate_limit.tokens_per_minute, True)):
            if per_minute:
                rate = per_minute / 60.0
                cap = max(rate * BURST_SECONDS, 1.0)
                self._buckets.append((_Bucket(rate, cap, cap, now, 0.0), tokens))
        self._server: dict[bool, _Bucket] = {}
        self._known = bool(self._buckets)
        self._ssthresh = float(max_in_flight)
        self._window = self._ssthresh if self._known else float(min(INITIAL_WINDOW, max_in_flight))
        self._clean = self._recover = 0
        self._in_flight = 0
        self._tokens_in_flight = 0.0
        self._hold_until = self._poll_until = -math.inf
        self._last_answer: float | None = None
        self._gap = 0.05
        self._sent = self._answered = self._rate_limited = self._holds = self._poll_holds = 0

    def create_delay(self, tokens: int = 0) -> float:
        """0.0: send now (one request and ``tokens`` are booked); else ask again in so many s.

        A booked create must end with :meth:`create_answered` or :meth:`create_abandoned`.
        When the in-flight window is full the delay is the expected time to the next answer;
        an engine may as well ask again as soon as :meth:`create_answered` is called.
        """
        now = self._clock()
        wait = self._hold_until - now
        if wait > 0:
            return wait
        if self._in_flight >= self._window:
            return min(max(self._gap, 0.001), 1.0)
        for bucket, counts_tokens in self._buckets:  # inlined: this runs once per create
            level = bucket.level + bucket.rate * (now - bucket.at)
            if level > bucket.cap:
                level = bucket.cap
            bucket.level, bucket.at = level, now  # a refill holds whether or not we send
            need = (tokens if counts_tokens else 1) + bucket.reserve
            if need > bucket.cap:
                need = bucket.cap  # a create larger than the bucket waits for it to be full
            if level < need - 1e-9:
                w = (need - level) / bucket.rate
                if w > wait:
                    wait = w
        if wait > 0:
            return wait
        for bucket, counts_tokens in self._buckets:
            bucket.level -= tokens if counts_tokens else 1
        self._in_flight += 1
        self._tokens_in_flight += tokens
        self._sent += 1
        return 0.0

    def create_sent(self) -> None:
        """The booked create went out. Bookkeeping only: ``create_delay`` already booked it."""

    def create_abandoned(self, tokens: int = 0) -> None:
        """A create booked by ``create_delay`` was not sent after all: give its slot back."""
        now = self._clock()
        self._in_flight = max(self._in_flight - 1, 0)
        self._tokens_in_flight = max(self._tokens_in_flight - tokens, 0.0)
        self._sent -= 1
        for bucket, counts_tokens in self._buckets:
            bucket.take(-(tokens if counts_tokens else 1), now)

    def create_answered(self, status: int, headers: Mapping[str, str], *,
                        tokens: int | None = None) -> None:
        """A create was answered (``status`` 0 for a transport error, with no headers).

        ``headers`` must be case-insensitive or lower-case (httpx's ``Headers`` are).
        """
        now = self._clock()
        if self._in_flight:
            share = self._tokens_in_flight / self._in_flight if tokens is None else tokens
            self._tokens_in_flight = max(self._tokens_in_flight - share, 0.0)
            self._in_flight -= 1
        if self._last_answer is not None:
            self._gap = 0.8 * self._gap + 0.2 * (now - self._last_answer)
        self._last_answer = now
        self._answered += 1
        self._read_headroom(headers, now, tokens=False)
        self._read_headroom(headers, now, tokens=True)
        if status == 429:
            self._rate_limited += 1
            delay = parse_retry_after(headers)
            if delay is None:
                delay = 0.0 if self._server else DEFAULT_HOLD  # the headroom model paces
            if delay > 0:
                self.hold_off(delay)
            if self._recover <= 0:  # one halving per flight: not for the creates in flight now
                self._ssthresh = max(self._window / 2, 1.0)
                self._window = self._ssthresh
                self._recover, self._clean = self._in_flight, 0
            else:
                self._recover -= 1
        else:
            self._recover = max(self._recover - 1, 0)
            self._clean += 1
            if self._clean >= self._window:
                grown = self._window * 2 if self._window < self._ssthresh else self._window + 1
                self._window, self._clean = min(grown, float(self._max)), 0

    def _read_headroom(self, headers: Mapping[str, str], now: float, *, tokens: bool) -> None:
        remaining_name, limit_name, reset_name = _HEADERS[tokens]
        remaining = _number(headers.get(remaining_name))
        if remaining is None:
            return
        limit = _number(headers.get(limit_name))
        reset_text = headers.get(reset_name)
        reset = parse_duration(reset_text) if reset_text else None
        bucket = self._server.get(tokens)
        if reset:
            rate = (limit - remaining) / reset if limit and limit > remaining else \
                max(remaining, 1.0) / reset
            if bucket is not None:
                rate = 0.75 * bucket.rate + 0.25 * rate  # answers are rounded: smooth them
        elif reset is not None and bucket is not None:
            rate = bucket.rate  # "0s": the bucket is full, which says nothing of its rate
        else:  # no reset header: a per-minute limit is assumed; each answer's level is taken
            rate = (limit or max(remaining, 1.0)) / 60.0
        cap = limit or max(remaining, bucket.cap if bucket is not None else 1.0)
        level = remaining - (self._tokens_in_flight if tokens else self._in_flight)
        if bucket is None:
            self._server[tokens] = bucket = _Bucket(rate, cap, level, now, HEADROOM_RESERVE * cap)
            self._buckets.append((bucket, tokens))
            if not self._known:  # limits known: slow start is over
                self._known, self._window = True, self._ssthresh
        else:
            # Lower the local model at once, raise it slowly: an answer that overtook older ones
            # on the way back reports a level from before creates answered since (too high by
            # those), while a model that is too low (token estimates above the server's count)
            # still catches up within a few answers. The model itself refills at the rate.
            if reset is not None:
                modelled = min(bucket.cap, bucket.level + bucket.rate * (now - bucket.at))
                if level > modelled:
                    level = modelled + CATCH_UP * (level - modelled)
            bucket.rate, bucket.cap, bucket.level, bucket.at = rate, cap, min(level, cap), now
            bucket.reserve = HEADROOM_RESERVE * cap

    def hold_off(self, seconds: float) -> None:
        """Pause every create for ``seconds`` (a 429's Retry-After)."""
        seconds = _finite_wait(seconds)
        self._hold_until = max(self._hold_until, self._clock() + seconds)
        self._holds += 1

    def poll_hold_off(self, seconds: float) -> None:
        """Pause every poll for ``seconds`` (a 429 on a poll), at most
        :data:`~asyncbg._policies.RETENTION_GUARD`: a result may be kept only about ten minutes
        after it finished, so no server's hint may hold polls longer than any interval may."""
        seconds = min(_finite_wait(seconds), RETENTION_GUARD)
        self._poll_until = max(self._poll_until, self._clock() + seconds)
        self._poll_holds += 1

    def poll_delay(self) -> float:
        """Seconds before the next poll may be sent (0.0: now)."""
        return max(self._poll_until - self._clock(), 0.0)

    def statistics(self) -> PacerStatistics:
        return PacerStatistics(
            window=int(self._window), in_flight=self._in_flight, limits_known=self._known,
            sent=self._sent, answered=self._answered, rate_limited=self._rate_limited,
            holds=self._holds, poll_holds=self._poll_holds,
            hold_remaining=max(self._hold_until - self._clock(), 0.0))
