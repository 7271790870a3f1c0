"""Budget: reservations before each create, real costs after, and a cap that holds."""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

import pytest

from asyncbg._spend._budget import Budget, Z
from asyncbg._spend._pricing import Price, PriceBook
from asyncbg._spend._tokens import DEFAULT_OUTPUT_TOKENS, REASONING_TOKENS

M = 1_000_000
#: 1,000 input tokens (4,000 characters) and at most 1,000 output tokens.
PARAMS = {"model": "gpt-5.2", "input": "x" * 4_000, "max_output_tokens": 1_000}
#: gpt-5.2 at $1.75 / $14 per million: 1,000 x 1.75 + 1,000 x 14
ESTIMATE = (1_000 * 1.75 + 1_000 * 14.0) / M


@pytest.fixture
def book() -> PriceBook:
    return PriceBook({"mine": Price(input=1.0, output=2.0)})


def test_max_cost_is_validated(book: PriceBook) -> None:
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_cost"):
            Budget(bad, book)
    for wrong in (True, "25"):
        with pytest.raises(TypeError, match="max_cost"):
            Budget(wrong, book)  # type: ignore[arg-type]
    assert Budget(0, book).max_cost == 0.0


def test_a_first_job_reserves_its_estimate(book: PriceBook) -> None:
    budget = Budget(1.0, book)
    assert budget.reserve("a", "gpt-5.2", PARAMS) == pytest.approx(ESTIMATE)
    assert budget.reserved == pytest.approx(ESTIMATE)
    assert budget.spent == 0.0
    # the discounts the request asks for apply to the estimate
    flex = {**PARAMS, "service_tier": "flex"}
    assert budget.reserve("b", "gpt-5.2", flex) == pytest.approx(ESTIMATE / 2)
    window = {**PARAMS, "background_options": {"completion_window": "8h"}}
    assert budget.reserve("c", "gpt-5.2", window) == pytest.approx(ESTIMATE * 0.6)
    assert budget.reserve("d", "gpt-5.2", PARAMS, batch=True) == pytest.approx(ESTIMATE / 2)
    # an estimate the caller already made is not made again
    assert budget.reserve("e", "mine", {}, tokens=(1_000, 500)) == pytest.approx(2_000 / M)


def test_without_max_output_tokens_the_estimate_counts_reasoning(book: PriceBook) -> None:
    budget = Budget(1.0, book)
    params = {"input": "x" * 4_000, "reasoning": {"effort": "high"}}
    output = DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["high"]
    assert budget.reserve("a", "mine", params) == pytest.approx((1_000 + 2 * output) / M)


def test_a_job_that_does_not_fit_waits_while_live_jobs_may_leave_room(book: PriceBook) -> None:
    budget = Budget(ESTIMATE * 2.5, book)
    assert budget.reserve("a", "gpt-5.2", PARAMS) is not None
    assert budget.reserve("b", "gpt-5.2", PARAMS) is not None
    assert budget.reserve("c", "gpt-5.2", PARAMS) is None
    assert budget.deferred  # "a" and "b" may cost less than reserved
    assert (budget.not_run, budget.reserved) == (0, pytest.approx(ESTIMATE * 2))
    budget.settle("a", ESTIMATE * 0.4)
    budget.settle("b", ESTIMATE * 0.4)
    assert budget.reserve("c", "gpt-5.2", PARAMS) == pytest.approx(ESTIMATE * 0.4)  # the mean
    assert not budget.deferred


def test_a_job_that_can_no_longer_fit_is_not_run(book: PriceBook) -> None:
    budget = Budget(ESTIMATE * 1.5, book)
    assert budget.reserve("a", "gpt-5.2", PARAMS) is not None
    budget.settle("a", ESTIMATE)
    assert budget.reserve("b", "gpt-5.2", PARAMS) is None  # spend alone leaves no room
    assert (budget.deferred, budget.not_run) == (False, 1)
    assert budget.reserve("c", "gpt-5.2", {**PARAMS, "max_output_tokens": 10}) is None
    assert (budget.deferred, budget.not_run) == (False, 2)  # the mean, not the estimate, counts
    fresh = Budget(ESTIMATE / 2, book)
    assert fresh.reserve("a", "gpt-5.2", PARAMS) is None  # nothing live to wait for
    assert (fresh.deferred, fresh.not_run) == (False, 1)
    # exactly at the cap still fits
    exact = Budget(ESTIMATE, book)
    assert exact.reserve("a", "gpt-5.2", PARAMS) == pytest.approx(ESTIMATE)


def test_settle_replaces_the_reservation_and_sets_the_mean(book: PriceBook) -> None:
    budget = Budget(10.0, book)
    budget.reserve("a", "gpt-5.2", PARAMS)
    budget.reserve("b", "gpt-5.2", PARAMS)
    budget.settle("a", 0.5)
    assert budget.spent == 0.5
    # the live job is revalued at the model's mean as soon as one job has finished
    assert budget.reserved == pytest.approx(0.5)
    assert budget.reserve("c", "gpt-5.2", PARAMS) == pytest.approx(0.5)
    budget.settle("b", 1.5)
    # from two costs on, live jobs are covered with a margin for their spread:
    # n * mean + Z * sd * sqrt(n), here mean 1.0 and sd 0.707 ("c" is live)
    sd = math.sqrt(0.5)
    assert budget.reserved == pytest.approx(1.0 + Z * sd)
    assert budget.reserve("d", "gpt-5.2", PARAMS) == pytest.approx(
        1.0 + Z * sd * (math.sqrt(2) - 1))  # the margin grows as sqrt(n), not n
    assert budget.reserved == pytest.approx(2.0 + Z * sd * math.sqrt(2))
    budget.settle("c", 1.0)
    budget.settle("d", 1.0)
    assert (budget.spent, budget.reserved, budget.finished) == (4.0, 0.0, 4)


def test_jobs_of_equal_cost_reserve_exactly_the_mean(book: PriceBook) -> None:
    budget = Budget(100.0, book)
    for key in range(3):
        budget.reserve(key, "gpt-5.2", PARAMS)
        budget.settle(key, 2.0)
    assert [budget.reserve(key, "gpt-5.2", PARAMS) for key in range(3, 6)] == pytest.approx(
        [2.0, 2.0, 2.0])
    assert budget.reserved == pytest.approx(6.0)


def test_models_keep_their_own_means(book: PriceBook) -> None:
    budget = Budget(10.0, book)
    budget.reserve("a", "gpt-5.2", PARAMS)
    budget.settle("a", 2.0)
    assert budget.reserve("b", "mine", {}, tokens=(1_000, 0)) == pytest.approx(1_000 / M)
    assert budget.reserve("c", "gpt-5.2", PARAMS) == pytest.approx(2.0)


def test_release_drops_a_reservation_and_reserving_again_replaces_it(book: PriceBook) -> None:
    budget = Budget(1.0, book)
    budget.reserve("a", "gpt-5.2", PARAMS)
    budget.reserve("a", "gpt-5.2", PARAMS)  # a retried create: one reservation, not two
    assert budget.reserved == pytest.approx(ESTIMATE)
    budget.release("a")
    assert budget.reserved == 0.0
    budget.release("a")  # twice, or a key never reserved: nothing to do
    budget.release("never")
    assert (budget.spent, budget.finished, budget.not_run) == (0.0, 0, 0)


def test_unpriced_models_reserve_nothing_and_never_count(book: PriceBook) -> None:
    budget = Budget(0.0, book)
    assert budget.reserve("a", "my-finetune", PARAMS) == 0.0
    assert budget.reserve("b", "my-finetune", PARAMS) == 0.0
    assert budget.reserved == 0.0
    budget.settle("a", None)
    budget.release("b")
    assert (budget.spent, budget.finished, budget.over, budget.not_run) == (0.0, 1, False, 0)


def test_a_job_without_a_cost_spends_nothing_and_leaves_the_mean(book: PriceBook) -> None:
    budget = Budget(10.0, book)
    budget.reserve("a", "gpt-5.2", PARAMS)
    budget.settle("a", None)  # e.g. failed before any usage was reported
    assert (budget.spent, budget.reserved) == (0.0, 0.0)
    assert budget.reserve("b", "gpt-5.2", PARAMS) == pytest.approx(ESTIMATE)  # still estimated


def test_a_cost_for_a_key_never_reserved_still_counts(book: PriceBook) -> None:
    budget = Budget(1.0, book)
    budget.settle("adopted", 1.5)  # e.g. a job created by an earlier run
    assert (budget.spent, budget.over, budget.finished) == (1.5, True, 1)


def test_the_message_says_budget_spend_and_what_was_not_run(book: PriceBook) -> None:
    budget = Budget(25.0, book)
    budget.reserve("a", "gpt-5.2", PARAMS)
    budget.settle("a", 24.5)
    for key in ("b", "c"):
        assert budget.reserve(key, "gpt-5.2", PARAMS) is None
        assert not budget.deferred
    assert budget.message() == (
        "budget of $25.00 reached: $24.50 spent by 1 finished job; 2 jobs were not run "
        "(nothing was sent for them). Raise max_cost to run them")
    budget.settle("late", 1.0)
    assert budget.over
    assert budget.message().startswith("budget of $25.00 passed: $25.50 spent by 2 finished jobs")
    assert "not run" not in Budget(1_234.5, book).message()
    assert "$1,234.50" in Budget(1_234.5, book).message()


# ---------------------------------------------------------------------------------- simulation
@dataclass
class Outcome:
    max_cost: float
    spent: float
    run: int
    allowed: float
    not_run: int
    cancelled: int

    def __str__(self) -> str:
        return (f"spent ${self.spent:.2f} of ${self.max_cost:.2f} "
                f"({self.spent / self.max_cost:.1%}), ran {self.run} jobs of "
                f"{self.allowed:.0f} the budget allows ({self.run / self.allowed:.1%}), "
                f"{self.not_run} not run, {self.cancelled} cancelled")


def simulate(*, jobs: int = 500, concurrency: int = 50, budget_jobs: float = 300,
             estimate_ratio: float = 1.0, seed: int = 0) -> Outcome:
    """``jobs`` jobs, at most ``concurrency`` at once, each costing its mean +-50 %.

    The first jobs reserve an estimate ``estimate_ratio`` times the mean cost; ``max_cost``
    allows ``budget_jobs`` jobs at the mean. Jobs last 10-60 s; when real spend passes the
    budget, every live job is cancelled and costs the share of its usage it had reached.
    """
    rng = random.Random(seed)
    book = PriceBook({"m": Price(input=1.0, output=1.0)})
    mean = 1.0
    params = {"input": "", "max_output_tokens": int(mean * M * estimate_ratio)}
    costs = [mean * rng.uniform(0.5, 1.5) for _ in range(jobs)]
    budget = Budget(mean * budget_jobs, book)
    live: dict[int, tuple[float, float]] = {}  # job: (start, end)
    ends: list[tuple[float, int]] = []
    queue = deque(range(jobs))
    now, run, cancelled = 0.0, 0, 0

    def start() -> None:  # called at the start and after every settle
        nonlocal run
        while len(live) < concurrency and queue:
            if budget.reserve(queue[0], "m", params) is None:
                if budget.deferred:
                    return  # wait for the next settle
                queue.popleft()  # BudgetExceeded, nothing sent
                continue
            job = queue.popleft()
            run += 1
            live[job] = (now, now + rng.uniform(10, 60))
            heapq.heappush(ends, (live[job][1], job))

    start()
    while ends:
        now, job = heapq.heappop(ends)
        if job not in live:
            continue
        del live[job]
        budget.settle(job, costs[job])
        if budget.over:  # cancel every live job at once: each costs what it had used
            for other, (began, end) in live.items():
                budget.settle(other, costs[other] * (now - began) / (end - began))
                cancelled += 1
            live.clear()
            break
        start()
    while queue:  # what is left after a cancellation is not run
        assert budget.reserve(queue.popleft(), "m", params) is None
    allowed = budget.max_cost / (sum(costs) / jobs)
    return Outcome(budget.max_cost, budget.spent, run, allowed, budget.not_run, cancelled)


@pytest.mark.parametrize("seed", range(5))
def test_a_budget_holds_over_500_jobs_whose_cost_varies(seed: int) -> None:
    outcome = simulate(seed=seed)
    print(f"\nseed {seed}: {outcome}")
    assert outcome.spent <= outcome.max_cost * 1.05
    assert outcome.run >= 0.9 * outcome.allowed
    assert outcome.run + outcome.not_run == 500
    assert outcome.cancelled <= 1


@pytest.mark.parametrize(("concurrency", "estimate_ratio", "budget_jobs"), [
    (10, 1.0, 300), (100, 1.0, 300), (50, 0.5, 300), (50, 3.0, 300), (200, 1.5, 300),
    (200, 3.0, 300), (50, 1.0, 60), (20, 2.0, 30),
])
def test_a_budget_holds_across_concurrency_and_estimates(
        concurrency: int, estimate_ratio: float, budget_jobs: float) -> None:
    outcome = simulate(concurrency=concurrency, estimate_ratio=estimate_ratio,
                       budget_jobs=budget_jobs)
    print(f"\nconcurrency {concurrency}, estimate x{estimate_ratio}, budget for "
          f"{budget_jobs}: {outcome}")
    assert outcome.spent <= outcome.max_cost * 1.05
    assert outcome.run >= 0.9 * outcome.allowed


def test_a_budget_larger_than_the_work_runs_everything() -> None:
    outcome = simulate(budget_jobs=1_000)
    assert (outcome.run, outcome.not_run, outcome.cancelled) == (500, 0, 0)
