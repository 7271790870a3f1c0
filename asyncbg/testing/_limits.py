"""Rate limits for the fake server: OpenAI's token buckets, and its ``x-ratelimit-*`` headers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._wire import ErrorStyle, FakeAnswer, error_answer

__all__ = ["FakeRateLimit"]

_MORE = "Visit https://platform.openai.com/account/rate-limits to learn more."


@dataclass(frozen=True, slots=True)
class FakeRateLimit:
    """Token-bucket limits in OpenAI's manner; ``None`` leaves a dimension unlimited.

    Each bucket holds ``burst_seconds`` of its rate (OpenAI's hold a minute) and refills
    continuously. A create takes one request and its estimated tokens: the input's plus
    ``max_output_tokens`` when the request sets it, else the usage model's output. Over the
    limit it is answered 429 with ``retry-after`` and ``retry-after-ms``; every create answer
    carries the ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers.
    ``polls_per_minute`` limits retrieves and cancels in a bucket of their own.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    polls_per_minute: float | None = None
    burst_seconds: float = 60.0

    @classmethod
    def per_second(
        cls, creates: float | None, *, tokens: float | None = None, polls: float | None = None,
        burst_seconds: float = 1.0,
    ) -> FakeRateLimit:
        """Admit ``creates`` creates (and ``tokens`` tokens, ``polls`` polls) a second, after
        a first burst of ``burst_seconds`` worth."""
        def per_minute(rate: float | None) -> float | None:
            return None if rate is None else rate * 60

        return cls(per_minute(creates), per_minute(tokens), per_minute(polls), burst_seconds)

    def __post_init__(self) -> None:
        rates = (self.requests_per_minute, self.tokens_per_minute, self.polls_per_minute)
        if any(r is not None and not r > 0 for r in rates):
            raise ValueError("FakeRateLimit rates must be > 0 (or None for no limit)")
        if not self.burst_seconds > 0:
            raise ValueError("FakeRateLimit.burst_seconds must be > 0")


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes ``x-ratelimit-reset-*``: ``120ms``, ``1s``, ``1m30.5s``,
    ``6m0s``, ``1h0m0s``. Rounded up to the millisecond, so that waiting that long suffices."""
    ms = max(math.ceil(seconds * 1000 - 1e-6), 0)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused, and how long until it would be admitted (``inf``: never)."""

    kind: str  # the error type: "requests" or "tokens"
    message: str
    wait: float

    def answer(self, style: ErrorStyle, limits: dict[str, str]) -> FakeAnswer:
        """The 429, carrying the ``x-ratelimit-*`` headers ``limits`` too."""
        answer = error_answer(style, 429, self.message, self.kind, None, "rate_limit_exceeded")
        answer.headers.update({**limits, **self.headers()})
        return answer

    def headers(self) -> dict[str, str]:
        return retry_headers(self.wait) if math.isfinite(self.wait) else {}


def retry_headers(wait: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, at least 1) and ``retry-after-ms``, rounded up."""
    return {"retry-after": str(max(math.ceil(wait), 1)),
            "retry-after-ms": str(max(math.ceil(wait * 1000), 1))}


class _Bucket:
    __slots__ = ("at", "capacity", "label", "level", "rate")

    def __init__(self, per_minute: float, burst_seconds: float, label: str) -> None:
        self.rate = per_minute / 60
        self.capacity = max(self.rate * burst_seconds, 1.0)
        self.level = self.capacity
        self.at: float | None = None
        self.label = label

    def refill(self, now: float) -> None:
        if self.at is not None:
            self.level = min(self.capacity, self.level + max(now - self.at, 0.0) * self.rate)
        self.at = now

    def refusal(self, cost: float, kind: str) -> Refusal | None:
        if cost <= self.level + 1e-9:  # float noise must not refuse a bucket refilled just so
            return None
        limit = math.floor(self.capacity)
        if cost > self.capacity:
            return Refusal(kind, f"Request too large for {self.label}: Limit {limit}, "
                           f"Requested {cost:g}. {_MORE}", math.inf)
        wait = (cost - self.level) / self.rate
        return Refusal(kind, f"Rate limit reached for {self.label}: Limit {limit}, "
                       f"Used {limit - math.floor(self.level)}, Requested {cost:g}. "
                       f"Please try again in {format_duration(wait)}. {_MORE}", wait)

    def headers(self, kind: str) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(math.floor(self.capacity)),
            f"x-ratelimit-remaining-{kind}": str(max(math.floor(self.level), 0)),
            f"x-ratelimit-reset-{kind}": format_duration((self.capacity - self.level) / self.rate),
        }


class RateLimiter:
    """The buckets of one :class:`FakeRateLimit`, read on the server's clock."""

    def __init__(self, limit: FakeRateLimit) -> None:
        def bucket(per_minute: float | None, label: str) -> _Bucket | None:
            return None if per_minute is None else _Bucket(per_minute, limit.burst_seconds, label)

        self.requests = bucket(limit.requests_per_minute, "requests per min (RPM)")
        self.tokens = bucket(limit.tokens_per_minute, "tokens per min (TPM)")
        self.polls = bucket(limit.polls_per_minute, "requests per min (RPM)")

    def create(self, tokens: int, now: float) -> tuple[dict[str, str], Refusal | None]:
        """Take one request and ``tokens`` if both buckets have them: the headers, and the
        refusal when they have not (then nothing is taken)."""
        refusals = []
        for bucket, cost, kind in ((self.requests, 1, "requests"), (self.tokens, tokens, "tokens")):
            if bucket is not None:
                bucket.refill(now)
                if (refused := bucket.refusal(cost, kind)) is not None:
                    refusals.append(refused)
        # Admitted only when both buckets admit: say the longer wait.
        refusal = max(refusals, key=lambda r: r.wait, default=None)
        if refusal is None:
            if self.requests is not None:
                self.requests.level -= 1
            if self.tokens is not None:
                self.tokens.level -= tokens
        headers: dict[str, str] = {}
        for bucket, kind in ((self.requests, "requests"), (self.tokens, "tokens")):
            if bucket is not None:
                headers.update(bucket.headers(kind))
        return headers, refusal

    def poll(self, now: float) -> Refusal | None:
        """Take one retrieve or cancel; the refusal when the poll bucket is empty."""
        if self.polls is None:
            return None
        self.polls.refill(now)
        refusal = self.polls.refusal(1, "requests")
        if refusal is None:
            self.polls.level -= 1
        return refusal
