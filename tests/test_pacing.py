"""Pacing: durations, rate limits, hold-offs, slow start, and a simulated rate-limited server.

The simulation runs in simulated time: a token-bucket server that admits ``rate`` creates a
second (bucket of one second's worth) and answers 429 + Retry-After + x-ratelimit headers above
it, creates with 50-250 ms of latency, and either a Pacer in front (one dispatcher that asks
``create_delay`` when woken) or a raw fan-out whose every job retries on its own after its
Retry-After, as the SDK does.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from asyncbg._spend._pacing import (
    DEFAULT_HOLD,
    INITIAL_WINDOW,
    Pacer,
    PacerStatistics,
    RateLimit,
    parse_duration,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def go_duration(seconds: float) -> str:
    """Format like OpenAI's reset headers: ``120ms`` under a second, else ``1m30.5s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


# ---------------------------------------------------------------------------------- durations
@pytest.mark.parametrize(("text", "seconds"), [
    ("120ms", 0.12), ("1s", 1.0), ("6m0s", 360.0), ("1m30.5s", 90.5), ("2h0m0s", 7200.0),
    ("0.5s", 0.5), ("3", 3.0), ("0", 0.0), ("2.25", 2.25), ("17ms", 0.017), ("1h", 3600.0),
    ("20m", 1200.0), ("1m", 60.0), ("1.5ms", 0.0015), ("250us", 0.00025), (" 1s ", 1.0),
    ("1h2m3s", 3723.0), ("", None), ("s", None), ("1x", None), ("-1s", None), ("1s2", None),
    ("abc", None), ("nan", None), ("inf", None), ("-3", None), ("1 s", None), ("ms", None),
])
def test_parse_duration(text: str, seconds: float | None) -> None:
    result = parse_duration(text)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


@pytest.mark.parametrize("seconds", [0.001, 0.12, 0.999, 1.0, 1.5, 59.25, 90.5, 360.0])
def test_parse_duration_reads_the_simulated_headers(seconds: float) -> None:
    assert parse_duration(go_duration(seconds)) == pytest.approx(seconds, abs=0.001)


# ---------------------------------------------------------------------------------- RateLimit
def test_rate_limit_is_a_frozen_hashable_value() -> None:
    limit = RateLimit(requests_per_minute=500, tokens_per_minute=200_000)
    assert limit == RateLimit(requests_per_minute=500, tokens_per_minute=200_000)
    assert len({limit, RateLimit(requests_per_minute=500, tokens_per_minute=200_000)}) == 1
    assert RateLimit() == RateLimit(None, None)
    with pytest.raises(AttributeError):
        limit.requests_per_minute = 1  # type: ignore[misc]


@pytest.mark.parametrize("bad", [0, -1, math.inf, math.nan])
def test_rate_limit_rejects_non_positive_or_infinite_values(bad: float) -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        RateLimit(requests_per_minute=bad)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        RateLimit(tokens_per_minute=bad)


@pytest.mark.parametrize("bad", [True, "500"])
def test_rate_limit_rejects_non_numbers(bad: object) -> None:
    with pytest.raises(TypeError):
        RateLimit(requests_per_minute=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- the Pacer
def make(rate_limit: RateLimit | None = None, max_in_flight: int = 500) -> tuple[Pacer, Clock]:
    clock = Clock()
    return Pacer(rate_limit, max_in_flight=max_in_flight, clock=clock), clock


def send(pacer: Pacer, n: int, tokens: int = 0) -> int:
    """Book up to ``n`` creates now; return how many were allowed."""
    sent = 0
    while sent < n and pacer.create_delay(tokens) == 0.0:
        pacer.create_sent()
        sent += 1
    return sent


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        make(max_in_flight=0)


def test_slow_start_doubles_per_clean_window_then_halves_on_a_429() -> None:
    pacer, _ = make(max_in_flight=40)
    assert send(pacer, 100) == INITIAL_WINDOW
    assert pacer.create_delay() > 0  # the window is full: ask again later
    for expected in (8, 16, 32, 40):
        for _ in range(pacer.statistics().in_flight):
            pacer.create_answered(200, {})
        assert pacer.statistics().window == expected
        assert send(pacer, 100) == expected
    pacer.create_answered(429, {"retry-after-ms": "0"})
    stats = pacer.statistics()
    assert (stats.window, stats.rate_limited, stats.limits_known) == (20, 1, False)
    # more 429s from the same flight of creates do not halve it again ...
    for _ in range(39):
        pacer.create_answered(429, {"retry-after-ms": "0"})
    assert pacer.statistics().window == 20
    # ... but one from the next flight does
    assert send(pacer, 100) == 20
    pacer.create_answered(429, {"retry-after-ms": "0"})
    assert pacer.statistics().window == 10


def test_after_slow_start_the_window_grows_by_one_per_window() -> None:
    pacer, _ = make(max_in_flight=64)
    send(pacer, 4)
    for _ in range(3):
        pacer.create_answered(200, {})
    pacer.create_answered(429, {"retry-after-ms": "0"})  # window 4 -> 2, threshold 2
    assert pacer.statistics().window == 2
    for expected in (3, 4, 5):
        send(pacer, 100)
        for _ in range(pacer.statistics().in_flight):
            pacer.create_answered(200, {})
        assert pacer.statistics().window == expected


def test_a_429_holds_every_create_until_its_retry_after() -> None:
    pacer, clock = make()
    send(pacer, 2)
    pacer.create_answered(429, {"retry-after-ms": "1500"})
    assert pacer.create_delay() == pytest.approx(1.5)
    clock.now = 1.0
    assert pacer.create_delay() == pytest.approx(0.5)
    stats = pacer.statistics()
    assert (stats.holds, stats.hold_remaining) == (1, pytest.approx(0.5))
    clock.now = 1.5
    assert pacer.create_delay() == 0.0
    # a shorter hold-off never shortens a longer one
    pacer.hold_off(10)
    pacer.hold_off(1)
    assert pacer.create_delay() == pytest.approx(10)


def test_a_429_without_retry_after_or_limits_holds_for_the_default() -> None:
    pacer, _ = make()
    send(pacer, 1)
    pacer.create_answered(429, {})
    assert pacer.create_delay() == pytest.approx(DEFAULT_HOLD)


def test_polls_have_their_own_hold_off() -> None:
    pacer, clock = make()
    assert pacer.poll_delay() == 0.0
    pacer.poll_hold_off(2.0)
    assert pacer.poll_delay() == pytest.approx(2.0)
    assert pacer.create_delay() == 0.0  # creates are not held by a poll's 429
    clock.now = 2.5
    assert pacer.poll_delay() == 0.0
    assert pacer.statistics().poll_holds == 1


def test_requests_per_minute_allow_one_seconds_burst_then_pace() -> None:
    pacer, clock = make(RateLimit(requests_per_minute=120))
    assert pacer.statistics().window == 500  # limits known: no slow start
    assert send(pacer, 10) == 2  # 2 a second, a burst of one second's worth
    assert pacer.create_delay() == pytest.approx(0.5)
    clock.now = 0.5
    assert send(pacer, 10) == 1


def test_tokens_per_minute_and_a_create_larger_than_the_bucket() -> None:
    pacer, clock = make(RateLimit(tokens_per_minute=60_000))  # 1,000 tokens a second
    assert send(pacer, 10, tokens=400) == 2
    assert pacer.create_delay(400) == pytest.approx(0.2)
    clock.now = 1.0
    assert pacer.create_delay(5_000) == 0.0  # larger than the bucket: sent once it is full
    assert pacer.create_delay(100) == pytest.approx(4.1)  # ... and its debt is paid first


def test_abandoning_a_booked_create_gives_its_slot_back() -> None:
    pacer, _ = make(RateLimit(requests_per_minute=60), max_in_flight=1)
    assert pacer.create_delay() == 0.0
    assert pacer.create_delay() > 0
    pacer.create_abandoned()
    assert pacer.statistics().in_flight == 0
    assert pacer.create_delay() == 0.0


def test_server_headroom_is_spent_while_plenty_and_spread_when_low() -> None:
    pacer, clock = make()
    send(pacer, 1)
    # limit 100, 10 left, full again in 9 s: refills at (100 - 10) / 9 = 10 a second
    pacer.create_answered(200, {"x-ratelimit-limit-requests": "100",
                                "x-ratelimit-remaining-requests": "10",
                                "x-ratelimit-reset-requests": "9s"})
    stats = pacer.statistics()
    assert (stats.limits_known, stats.window) == (True, 500)  # slow start is over
    assert send(pacer, 100) == 5  # 10 left, 5 % of the limit (5) kept in reserve
    assert pacer.create_delay() == pytest.approx(0.1)
    clock.now = 0.1
    assert send(pacer, 100) == 1


def test_without_a_limit_header_the_remaining_creates_are_spread_over_the_reset() -> None:
    pacer, clock = make()
    send(pacer, 1)
    pacer.create_answered(200, {"x-ratelimit-remaining-requests": "4",
                                "x-ratelimit-reset-requests": "2s"})
    assert send(pacer, 100) == 3  # 4 left, less a reserve of 5 % (0.2)
    for _ in range(3):  # then 4 over 2 s: one every half second
        clock.now += pacer.create_delay()
        assert send(pacer, 100) == 1
        assert pacer.create_delay() == pytest.approx(0.5)


def test_in_flight_creates_count_against_the_reported_headroom() -> None:
    pacer, _ = make(RateLimit(requests_per_minute=6_000))
    assert send(pacer, 30) == 30  # 100 a second: a burst of 100
    pacer.create_answered(200, {"x-ratelimit-limit-requests": "1000",
                                "x-ratelimit-remaining-requests": "40",
                                "x-ratelimit-reset-requests": "1s"})
    # 29 still in flight were not counted by the server yet: 40 - 29 = 11, 50 kept in reserve
    assert send(pacer, 100) == 0


def test_token_headroom_uses_the_tokens_in_flight() -> None:
    pacer, _ = make(RateLimit(requests_per_minute=60_000))
    assert send(pacer, 3, tokens=1_000) == 3
    pacer.create_answered(200, {"x-ratelimit-limit-tokens": "100000",
                                "x-ratelimit-remaining-tokens": "10000",
                                "x-ratelimit-reset-tokens": "1s"}, tokens=1_000)
    # 10,000 left less 2,000 in flight less a 5,000 reserve: room for 3 more of 1,000
    assert send(pacer, 100, tokens=1_000) == 3


def test_garbage_headers_are_ignored() -> None:
    pacer, _ = make()
    send(pacer, 2)
    pacer.create_answered(200, {"x-ratelimit-remaining-requests": "many",
                                "x-ratelimit-reset-requests": "soon"})
    pacer.create_answered(503, {"x-ratelimit-remaining-requests": "-4"})
    assert pacer.statistics().limits_known is False


def test_statistics_is_a_frozen_snapshot() -> None:
    pacer, _ = make()
    send(pacer, 3)
    pacer.create_answered(200, {})
    stats = pacer.statistics()
    assert stats == PacerStatistics(window=4, in_flight=2, limits_known=False, sent=3,
                                    answered=1, rate_limited=0, holds=0, poll_holds=0,
                                    hold_remaining=0.0)
    with pytest.raises(AttributeError):
        stats.window = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------- simulation
class Server:
    """Admits ``rate`` creates a second (and ``token_rate`` tokens), with one second's burst.

    Above it: 429 with Retry-After; every answer carries OpenAI's x-ratelimit headers.
    """

    def __init__(self, rate: float, *, headers: bool = True, token_rate: float | None = None,
                 cost: int = 1_000) -> None:
        self.rate, self.cap, self.level = rate, max(rate, 1.0), max(rate, 1.0)
        self.token_rate = token_rate
        self.token_cap = self.tokens = token_rate or 0.0
        self.cost, self.headers, self.at = cost, headers, 0.0
        self.admitted: list[float] = []

    def arrive(self, now: float) -> tuple[int, dict[str, str]]:
        elapsed, self.at = now - self.at, now
        self.level = min(self.cap, self.level + self.rate * elapsed)
        ok = self.level >= 1
        wait = (1 - self.level) / self.rate
        if self.token_rate:
            self.tokens = min(self.token_cap, self.tokens + self.token_rate * elapsed)
            ok = ok and self.tokens >= self.cost
            wait = max(wait, (self.cost - self.tokens) / self.token_rate)
        if ok:
            self.level -= 1
            self.tokens -= self.cost
            self.admitted.append(now)
        headers: dict[str, str] = {}
        if self.headers:
            headers["x-ratelimit-limit-requests"] = str(int(self.cap))
            headers["x-ratelimit-remaining-requests"] = str(max(int(self.level), 0))
            headers["x-ratelimit-reset-requests"] = go_duration((self.cap - self.level) / self.rate)
            if self.token_rate:
                headers["x-ratelimit-limit-tokens"] = str(int(self.token_cap))
                headers["x-ratelimit-remaining-tokens"] = str(max(int(self.tokens), 0))
                headers["x-ratelimit-reset-tokens"] = go_duration(
                    (self.token_cap - self.tokens) / self.token_rate)
        if not ok:
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        return (200 if ok else 429), headers


@dataclass
class Run:
    rate: float
    answers: int = 0
    rate_limited: int = 0
    failed_by_sdk: int = 0  # jobs whose third attempt was a 429 (the SDK's max_retries=2)
    admitted: list[float] = field(default_factory=list)

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.answers

    @property
    def throughput(self) -> float:
        """Creates admitted a second, over the whole run."""
        return len(self.admitted) / self.admitted[-1]

    @property
    def steady_throughput(self) -> float:
        """Creates admitted a second after the server's initial burst was spent."""
        burst = int(max(self.rate, 1.0))  # one second's worth
        return (len(self.admitted) - burst) / (self.admitted[-1] - self.admitted[burst - 1])

    def __str__(self) -> str:
        return (f"{self.answers:>7,} answers, {self.rate_limited:>7,} 429 "
                f"({self.share_429:6.1%}), throughput {self.throughput / self.rate:.2f} R "
                f"(steady {self.steady_throughput / self.rate:.2f} R), "
                f"{self.failed_by_sdk} jobs would fail after the SDK's 2 retries")


def simulate(rate: float, *, paced: bool = True, jobs: int = 1_000, concurrency: int = 500,
             headers: bool = True, rate_limit: RateLimit | None = None,
             token_rate: float | None = None, cost: int = 1_000, estimate: int = 1_000,
             latency: tuple[float, float] = (0.025, 0.125), seed: int = 1) -> Run:
    """``jobs`` creates at ``concurrency``: paced by one dispatcher, or raw (each job retries)."""
    rng = random.Random(seed)
    clock = Clock()
    server = Server(rate, headers=headers, token_rate=token_rate, cost=cost)
    pacer = Pacer(rate_limit, max_in_flight=concurrency, clock=clock)
    events: list[tuple[float, int, str, int, int, dict[str, str]]] = []
    order = itertools.count()
    run = Run(min(rate, token_rate / cost) if token_rate else rate)  # the binding limit
    pending, attempts = deque(range(jobs)), [0] * jobs
    next_pump = math.inf

    def at(when: float, kind: str, job: int = -1, status: int = 0,
           hdrs: dict[str, str] | None = None) -> None:
        heapq.heappush(events, (when, next(order), kind, job, status, hdrs or {}))

    def send(job: int) -> None:
        attempts[job] += 1
        at(clock.now + rng.uniform(*latency), "arrive", job)

    def pump() -> None:  # the one waker: send while the pacer says "now"
        nonlocal next_pump
        while pending:
            delay = pacer.create_delay(estimate)
            if delay > 0:
                if clock.now + delay < next_pump:
                    next_pump = clock.now + delay
                    at(next_pump, "pump")
                return
            send(pending.popleft())

    if paced:
        pump()
    else:
        for _ in range(min(concurrency, jobs)):
            send(pending.popleft())
    while events:
        clock.now, _, kind, job, status, hdrs = heapq.heappop(events)
        if kind == "pump" and clock.now == next_pump:
            next_pump = math.inf
            pump()
        elif kind == "arrive":
            status, hdrs = server.arrive(clock.now)
            at(clock.now + rng.uniform(*latency), "answer", job, status, hdrs)
        elif kind == "answer":
            run.answers += 1
            if status == 429:
                run.rate_limited += 1
                run.failed_by_sdk += attempts[job] == 3
            if paced:
                pacer.create_answered(status, hdrs)
                if status == 429:
                    pending.appendleft(job)
                pump()
            elif status == 429:
                at(clock.now + float(hdrs["retry-after-ms"]) / 1000, "retry", job)
            elif pending:
                send(pending.popleft())
        elif kind == "retry":
            send(job)
    run.admitted = server.admitted
    assert len(run.admitted) == jobs
    return run


@pytest.mark.parametrize("rate", [5, 20, 100])
def test_paced_creates_stay_below_the_limit_at_full_speed(rate: float) -> None:
    paced = simulate(rate)
    print(f"\nR={rate}/s  paced: {paced}")
    assert paced.share_429 <= 0.02
    assert paced.throughput >= 0.9 * rate
    assert paced.steady_throughput >= 0.9 * rate
    assert paced.failed_by_sdk == 0


@pytest.mark.parametrize("rate", [20, 100])
def test_raw_fan_out_for_comparison(rate: float) -> None:
    raw, paced = simulate(rate, paced=False), simulate(rate)
    print(f"\nR={rate}/s  raw:   {raw}\nR={rate}/s  paced: {paced}")
    assert raw.share_429 > 0.5 > paced.share_429
    assert raw.failed_by_sdk > 100


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("latency", [(0.1, 0.1), (0.01, 0.4)])
def test_pacing_holds_with_other_latencies(latency: tuple[float, float], seed: int) -> None:
    run = simulate(50, latency=latency, seed=seed)
    assert run.share_429 <= 0.02
    assert run.throughput >= 0.9 * 50


@pytest.mark.parametrize("estimate", [1_000, 700, 1_500])
def test_a_token_limit_is_paced_even_when_the_estimate_is_off(estimate: int) -> None:
    # 100 creates/s allowed, but only 20,000 tokens/s: 20 creates of 1,000 tokens
    run = simulate(100, token_rate=20_000, cost=1_000, estimate=estimate)
    print(f"\n20,000 tokens/s, estimate {estimate} for 1,000: {run}")
    assert run.share_429 <= 0.02
    assert run.throughput >= 0.9 * 20
    assert run.steady_throughput >= 0.9 * 20


@pytest.mark.parametrize("rate", [5, 20, 100])
def test_a_known_rate_limit_paces_a_server_without_headers(rate: float) -> None:
    run = simulate(rate, headers=False, rate_limit=RateLimit(requests_per_minute=60 * rate))
    print(f"\nR={rate}/s  RateLimit, no headers: {run}")
    assert run.share_429 <= 0.02
    assert run.throughput >= 0.9 * rate


def test_slow_start_alone_beats_a_raw_fan_out() -> None:
    # No headers and no RateLimit: only slow start, AIMD and the shared hold-off.
    raw, paced = simulate(20, paced=False, headers=False), simulate(20, headers=False)
    print(f"\nno headers  raw:   {raw}\nno headers  paced: {paced}")
    assert paced.rate_limited * 20 < raw.rate_limited
    assert paced.failed_by_sdk * 10 < raw.failed_by_sdk


def test_the_simulated_server_is_a_faithful_bucket() -> None:
    server = Server(10)
    statuses = [server.arrive(0.0)[0] for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    status, headers = server.arrive(0.05)
    assert status == 429
    assert headers["retry-after-ms"] == "50"
    assert headers["x-ratelimit-reset-requests"] == "950ms"
    assert server.arrive(0.1)[0] == 200
