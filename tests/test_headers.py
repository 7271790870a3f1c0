"""Headers parsed defensively: no server's number ever becomes a NaN, infinite or negative wait.

Every parser that turns a header into a number is fuzzed with hypothesis (garbage text, numbers
of every size and sign, NaN, infinity, HTTP dates), and a 429 with ``Retry-After: nan`` and a NaN
``openai-poll-after-ms`` are sent through the fake server to a running manager.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncbg
from asyncbg import JobStatus, PollPolicy, RetryPolicy
from asyncbg._http import NO_RETRY_CODES, NoCredit, Transient, classify_status
from asyncbg._policies import MAX_HINT, RETENTION_GUARD, parse_poll_after, parse_retry_after
from asyncbg._spend._pacing import MAX_COUNT, MAX_RESET, Pacer, _number, parse_duration
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import manager, meta

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None)

#: What a header may say: anything at all, numbers of every kind written as a server might,
#: durations with units, and HTTP dates.
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**30, 10**30)
header_text = st.one_of(
    st.text(max_size=40),
    numbers.map(str),
    numbers.map(lambda n: f"{n}ms"),
    st.sampled_from(["", " ", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999",
                     "-0", "0x10", "1_000", "٣", "soon", "120ms", "6m0s", "1h2m3.5s",
                     "9" * 400 + "h", "1e-300", "Wed, 21 Oct 2015 07:28:00 GMT",
                     "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT"]),
    st.floats(min_value=-4e9, max_value=2.5e11).map(lambda t: formatdate(t, usegmt=True)),
)


def usable(value: float | None, ceiling: float) -> bool:
    return value is None or (math.isfinite(value) and 0.0 <= value <= ceiling)


@FUZZ
@given(ms=st.none() | header_text, seconds=st.none() | header_text)
def test_retry_after_is_never_nan_inf_or_negative(ms: str | None, seconds: str | None) -> None:
    headers = {k: v for k, v in (("retry-after-ms", ms), ("retry-after", seconds))
               if v is not None}
    assert usable(parse_retry_after(headers), MAX_HINT)


@FUZZ
@given(text=header_text)
def test_poll_after_is_never_nan_inf_or_negative(text: str) -> None:
    assert usable(parse_poll_after({"openai-poll-after-ms": text}), RETENTION_GUARD)


@FUZZ
@given(text=header_text)
def test_rate_limit_numbers_and_resets_are_bounded(text: str) -> None:
    assert usable(_number(text), MAX_COUNT)
    assert usable(parse_duration(text), MAX_RESET)


@FUZZ
@given(value=st.none() | st.floats(allow_nan=True, allow_infinity=True),
       attempt=st.integers(1, 100), age=st.floats(min_value=0, max_value=1e9))
def test_policies_turn_any_hint_into_a_finite_delay(value: float | None, attempt: int,
                                                    age: float) -> None:
    retry = RetryPolicy().delay(attempt, value)
    poll = PollPolicy().next_interval(age, poll_after=value)
    assert math.isfinite(retry) and 0 <= retry <= RetryPolicy().max_retry_after
    assert math.isfinite(poll) and 0 <= poll <= RETENTION_GUARD


_RATE_HEADERS = ["x-ratelimit-remaining-requests", "x-ratelimit-limit-requests",
                 "x-ratelimit-reset-requests", "x-ratelimit-remaining-tokens",
                 "x-ratelimit-limit-tokens", "x-ratelimit-reset-tokens", "retry-after",
                 "retry-after-ms"]


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(answers=st.lists(st.tuples(
    st.sampled_from([200, 429, 0]),
    st.dictionaries(st.sampled_from(_RATE_HEADERS), header_text, max_size=8),
    st.floats(min_value=0, max_value=5)), min_size=1, max_size=12),
    hold=st.floats(allow_nan=True, allow_infinity=True))
def test_the_pacer_stays_finite_whatever_the_headers_say(
    answers: list[tuple[int, dict[str, str], float]], hold: float
) -> None:
    now = [1000.0]
    pacer = Pacer(asyncbg.RateLimit(requests_per_minute=600), max_in_flight=8,
                  clock=lambda: now[0])
    pacer.hold_off(hold)
    pacer.poll_hold_off(hold)
    assert 0 <= pacer.poll_delay() <= RETENTION_GUARD
    for status, headers, step in answers:
        delay = pacer.create_delay(tokens=100)
        assert math.isfinite(delay) and delay >= 0
        now[0] += step
        pacer.create_answered(status, headers)
        assert math.isfinite(pacer.poll_delay()) and 0 <= pacer.poll_delay() <= RETENTION_GUARD
    stats = pacer.statistics()
    assert math.isfinite(stats.hold_remaining) and 0 <= stats.hold_remaining <= MAX_HINT + 1e-6
    assert math.isfinite(pacer.create_delay(tokens=100))


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "nan"}, None),
    ({"retry-after": "inf"}, None),
    ({"retry-after": "-3"}, None),
    ({"retry-after": ""}, None),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "1e999"}, None),
    ({"retry-after": "1e300"}, MAX_HINT),
    ({"retry-after": " 2 "}, 2.0),
    ({"retry-after-ms": "nan", "retry-after": "3"}, 3.0),
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
])
def test_retry_after_examples(headers: Mapping[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_an_http_date_in_the_future_is_the_time_until_it() -> None:
    wait = parse_retry_after({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert wait is not None and 25 <= wait <= 31


@pytest.mark.parametrize(("text", "expected"), [
    ("nan", None), ("-5", None), ("inf", None), ("", None), ("1e12", RETENTION_GUARD),
    ("1500", 1.5)])
def test_poll_after_examples(text: str, expected: float | None) -> None:
    assert parse_poll_after({"openai-poll-after-ms": text}) == expected


# -- no credit: a 429 that no retry can help ------------------------------------------------------


def _quota_body(code: str | None, kind: str) -> bytes:
    import json

    return json.dumps({"error": {"message": "You exceeded your current quota.", "type": kind,
                                 "param": None, "code": code}}).encode()


@pytest.mark.parametrize("code", sorted(NO_RETRY_CODES))
def test_a_429_that_says_no_credit_is_rejected_for_good(code: str) -> None:
    err = classify_status(429, {"retry-after": "1", "x-request-id": "req_1"},
                          _quota_body(code, "insufficient_quota"), "create")
    assert isinstance(err, NoCredit) and isinstance(err, asyncbg._http.Rejected)
    assert err.code == code and err.http_status == 429 and err.request_id == "req_1"
    assert "You exceeded your current quota." in err.message and code in err.message


def test_a_quota_named_only_in_the_type_is_no_credit_too() -> None:
    err = classify_status(429, {}, _quota_body(None, "insufficient_quota"), "create")
    assert isinstance(err, NoCredit) and err.code == "insufficient_quota"


def test_an_ordinary_429_is_still_retried() -> None:
    err = classify_status(429, {"retry-after": "nan"}, _quota_body("rate_limit_exceeded",
                                                                   "requests"), "create")
    assert isinstance(err, Transient) and err.retry_after is None


# -- through the fake server ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_nan_retry_after_and_nan_poll_after_neither_raise_nor_end_the_manager() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.03), poll_after_ms="nan")
    server.inject("429", route="create", times=2, retry_after="nan")
    server.inject("429", route="retrieve", retry_after="nan")  # holds polls 1 s
    client = fake_client(server)
    try:
        async with manager(client) as mgr:
            jobs = [await mgr.submit(model="m", input=f"q{i}", metadata=meta(0.03))
                    for i in range(3)]
        server.poll_after_ms = "-inf"
        async with manager(client) as mgr:
            jobs.append(await mgr.submit(model="m", input="late", metadata=meta(0.03)))
    finally:
        await client.close()
    assert [j.status for j in jobs] == [JobStatus.COMPLETED] * 4
    assert server.counters.creates == 4
    assert server.counters.faults == 3


@pytest.mark.anyio
async def test_no_credit_fails_the_job_once_with_the_servers_words() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.03))
    server.inject("quota", route="create")
    client = fake_client(server)
    try:
        async with manager(client) as mgr:
            job = await mgr.submit(key="broke", model="m", input="x")
            await job.wait()
    finally:
        await client.close()
    assert job.status is JobStatus.FAILED
    assert job.error_code == "insufficient_quota"
    assert job.error is not None and "exceeded your current quota" in job.error
    assert server.counters.faults == 1 and server.counters.creates == 0  # not retried
