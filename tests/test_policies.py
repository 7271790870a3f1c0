import pytest

from asyncbg import JobStatus, PollPolicy, RetryPolicy
from asyncbg._policies import RETENTION_GUARD, parse_poll_after, parse_retry_after


def test_interval_grows_with_age_and_is_capped() -> None:
    p = PollPolicy(first_poll=0.5, min_interval=0.5, max_interval=30, growth=0.2, jitter=0)
    assert p.first() == 0.5
    assert p.next_interval(1) == 0.5
    assert p.next_interval(10) == pytest.approx(2.0)
    assert p.next_interval(100) == pytest.approx(20.0)
    assert p.next_interval(10_000) == 30.0


def test_every_interval_stays_far_below_retention() -> None:
    p = PollPolicy(max_interval=600, window_scale={"8h": 100.0}, jitter=0)
    scale = p.scale_for({"background_options": {"completion_window": "8h"}})
    big = p.next_interval(10**6, scale=scale)
    assert big == RETENTION_GUARD < 600
    assert p.next_interval(1, poll_after=10**6) == RETENTION_GUARD


def test_discounted_windows_relax_polling() -> None:
    p = PollPolicy(jitter=0)
    slow = p.scale_for({"background_options": {"completion_window": "8h"}})
    assert slow > p.scale_for({"background_options": {"completion_window": "2h"}}) > 1.0
    assert p.scale_for({}) == 1.0
    assert p.next_interval(60, scale=slow) > p.next_interval(60)


def test_server_poll_after_hint_replaces_the_schedule() -> None:
    p = PollPolicy(min_interval=5, jitter=0)
    assert p.next_interval(100, poll_after=0.25) == 0.25
    assert PollPolicy(honor_poll_after=False, min_interval=5, jitter=0).next_interval(
        1, poll_after=0.25
    ) == 5


def test_jitter_stays_in_its_band() -> None:
    p = PollPolicy(min_interval=1, max_interval=1, jitter=0.1)
    values = [p.next_interval(1) for _ in range(200)]
    assert all(0.9 <= v <= 1.1 for v in values)
    assert len(set(values)) > 1


@pytest.mark.parametrize(
    "kwargs", [{"min_interval": -1}, {"min_interval": 5, "max_interval": 1}, {"jitter": 1.5},
               {"growth": float("nan")}]
)
def test_bad_poll_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="PollPolicy"):
        PollPolicy(**kwargs)  # type: ignore[arg-type]


def test_policies_are_frozen() -> None:
    with pytest.raises(AttributeError):
        PollPolicy().growth = 1  # type: ignore[misc]


def test_retry_backoff_is_jittered_and_bounded_and_honours_retry_after() -> None:
    r = RetryPolicy(base=1, max_backoff=8)
    assert all(0 <= r.delay(1) <= 1 for _ in range(50))
    assert all(0 <= r.delay(10) <= 8 for _ in range(50))
    assert r.delay(3, retry_after=2.5) == 2.5
    assert r.delay(3, retry_after=10_000) == r.max_retry_after
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_header_parsing() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # past
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_poll_after({"openai-poll-after-ms": "1500"}) == 1.5
    assert parse_poll_after({"openai-poll-after-ms": "x"}) is None


def test_status_mapping() -> None:
    assert JobStatus.from_server("completed") is JobStatus.COMPLETED
    assert JobStatus.from_server("cancelling") is JobStatus.IN_PROGRESS  # unknown: still live
    assert JobStatus.from_server(None) is JobStatus.IN_PROGRESS
    assert JobStatus.from_server("pending") is JobStatus.IN_PROGRESS  # local-only status
    assert {s for s in JobStatus if s.terminal} == {
        JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.INCOMPLETE
    }
    assert JobStatus.IN_PROGRESS == "in_progress" and str(JobStatus.QUEUED) == "queued"
