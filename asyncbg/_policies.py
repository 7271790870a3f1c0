"""The two policies that decide timing: when to poll a live job, and when to retry a request.

Both are small frozen value objects (in the manner of ``httpx.Timeout``): build one, pass it to
:class:`~asyncbg.BackgroundManager`, share it freely. Durations are seconds as floats.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from time import time as _wall

__all__ = ["PollPolicy", "RetryPolicy"]

#: Background results may be retrievable for only about ten minutes after they finish, so no
#: interval, however scaled, may come near that: every policy is clamped to this.
RETENTION_GUARD = 120.0
#: The longest wait a server's hint (Retry-After and the like) is taken to ask for, in seconds:
#: a larger value is clamped to it before a policy clamps it to its own bound.
MAX_HINT = 3600.0


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """When to poll a live background response.

    The interval grows in proportion to the job's age (``age * growth``), between ``min_interval``
    and ``max_interval``. Checking a job that has run for ``t`` seconds about every
    ``growth * t`` seconds keeps the *relative* detection delay bounded while the number of polls
    grows only with the logarithm of the duration: a 10 s job and a 1 h job both cost a few dozen
    polls, where a fixed interval is either slow for short jobs or wasteful for long ones.

    * ``first_poll``: delay before the first status check after the create is accepted.
    * ``min_interval`` / ``max_interval``: the bounds of every later interval. ``max_interval``
      is clamped to 120 s, far below the server's ~10 minute result retention.
    * ``growth``: interval as a fraction of the job's age.
    * ``jitter``: each interval is scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so
      that jobs submitted together do not poll in lockstep.
    * ``window_scale``: a multiplier on every interval for jobs created with
      ``background_options={"completion_window": ...}``; discounted windows are served slowly,
      so polling them at interactive rates only burns requests.
    * ``honor_poll_after``: use a server's ``openai-poll-after-ms`` header as the next interval.
    """

    first_poll: float = 0.5
    min_interval: float = 0.5
    max_interval: float = 30.0
    growth: float = 0.2
    jitter: float = 0.1
    # Left out of the hash (a dict has none) so that policies stay hashable.
    window_scale: Mapping[str, float] = field(
        default_factory=lambda: {"2h": 4.0, "8h": 8.0}, hash=False
    )
    honor_poll_after: bool = True

    def __post_init__(self) -> None:
        for name in ("first_poll", "min_interval", "max_interval", "growth"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PollPolicy.{name} must be a finite number >= 0, got {value!r}")
        if self.min_interval > self.max_interval:
            raise ValueError(
                f"PollPolicy.min_interval ({self.min_interval}) exceeds max_interval "
                f"({self.max_interval})"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"PollPolicy.jitter must be in [0, 1), got {self.jitter!r}")

    @classmethod
    def safety_net(cls, interval: float = 120.0) -> PollPolicy:
        """A slow fixed schedule for jobs that expect a push (webhook or stream).

        The poll exists only so that a lost delivery never strands a job; ``interval`` is
        clamped, like every interval, to stay far below the server's result retention.
        """
        return cls(first_poll=interval, min_interval=interval, max_interval=interval,
                   growth=0.0, jitter=0.1)

    def scale_for(self, params: Mapping[str, object]) -> float:
        """The interval multiplier for a job created with these ``responses.create`` params."""
        options = params.get("background_options")
        if isinstance(options, Mapping):
            window = options.get("completion_window")
            if isinstance(window, str):
                return self.window_scale.get(window, 1.0)
        return 1.0

    def first(self, scale: float = 1.0) -> float:
        """The delay before the first poll."""
        return min(self.first_poll * scale, RETENTION_GUARD)

    def next_interval(
        self, age: float, *, scale: float = 1.0, poll_after: float | None = None
    ) -> float:
        """The delay before the next poll of a job that is ``age`` seconds old.

        ``poll_after`` is the server's own hint in seconds, if it sent one.
        """
        if poll_after is not None and self.honor_poll_after and math.isfinite(poll_after):
            return min(max(poll_after, 0.0), RETENTION_GUARD)
        base = min(max(age * self.growth, self.min_interval), self.max_interval) * scale
        if self.jitter:
            base *= 1.0 + self.jitter * (2.0 * random.random() - 1.0)
        return min(base, RETENTION_GUARD)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How asyncbg retries a request that met a 429, a 5xx, a timeout or a dropped connection.

    asyncbg owns every retry: it calls the SDK with ``max_retries=0``. The SDK sends no
    idempotency key, so its own retry of a create that reached the server could start a second
    paid response; owning retries lets asyncbg treat creates, polls and cancels differently and
    log each attempt.

    Backoff is "full jitter": a random delay in ``[0, min(max_backoff, base * 2**attempt)]``. A
    server's ``Retry-After`` (or ``retry-after-ms``) replaces that delay, up to ``max_retry_after``.
    """

    max_attempts: int = 8
    base: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts!r}")
        for name in ("base", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0, got {value!r}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None and math.isfinite(retry_after):
            return min(max(retry_after, 0.0), self.max_retry_after)
        return random.uniform(0.0, min(self.max_backoff, self.base * 2.0 ** (attempt - 1)))


def _seconds(raw: str | None, *, scale: float = 1.0) -> float | None:
    """A header's number of seconds (``raw * scale``), or None when it is not a usable one.

    Servers and proxies send garbage: empty values, words, ``nan``, ``inf``, negative or
    absurdly large numbers. None of them may reach a sleep (anyio refuses a NaN deadline and
    ends the run), so anything that is not a finite number >= 0 counts as absent, and a huge one
    is clamped to :data:`MAX_HINT`; the policies then clamp it to their own bounds.
    """
    if raw is None:
        return None
    try:
        value = float(raw.strip()) * scale
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(value) and value >= 0):
        return None
    return min(value, MAX_HINT)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), if usable.

    Never NaN, infinite or negative: garbage counts as absent, a date in the past is 0 and
    anything longer than :data:`MAX_HINT` is clamped to it.
    """
    seconds = _seconds(headers.get("retry-after-ms"), scale=1e-3)
    if seconds is not None:
        return seconds
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = _seconds(raw)
    if seconds is not None or not raw.strip() or _looks_numeric(raw):
        return seconds
    from email.utils import parsedate_to_datetime  # rare (an HTTP date), and not free

    try:
        at = parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    wait = at - _wall()
    return min(max(wait, 0.0), MAX_HINT) if math.isfinite(wait) else None


def _looks_numeric(raw: str) -> bool:
    """Whether a value is a (possibly unusable) number rather than a date: ``-5``, ``nan``."""
    try:
        float(raw)
    except ValueError:
        return False
    return True


def parse_poll_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a server's ``openai-poll-after-ms`` header, if usable.

    Never NaN, infinite or negative; clamped to :data:`RETENTION_GUARD`, the longest interval
    any poll may wait.
    """
    seconds = _seconds(headers.get("openai-poll-after-ms"), scale=1e-3)
    return None if seconds is None else min(seconds, RETENTION_GUARD)
