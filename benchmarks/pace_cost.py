#!/usr/bin/env python3
"""Client CPU that cost and pacing add to each job, in microseconds.

    .venv/bin/python benchmarks/pace_cost.py [--jobs 100000] [--rounds 5]

Per job, in the order the engine calls them: ``estimate_tokens`` of the create's params,
``Budget.reserve``, ``Pacer.create_delay`` (a user RateLimit and the server's headroom both in
force); then, once answered, ``Pacer.create_answered`` with OpenAI's six x-ratelimit headers,
``PriceBook.cost`` of the response's usage and ``Budget.settle``. The first four are the per-create
path of the brief; the target is <= 5 % of a poll's client CPU (~100-200 us), i.e. <= 5 us.
Each round runs every job through; the median round is reported.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncbg._spend._budget import Budget
from asyncbg._spend._pacing import Pacer, RateLimit
from asyncbg._spend._pricing import PriceBook
from asyncbg._spend._tokens import estimate_tokens

GOAL_US = 5.0
PARAMS = {
    "model": "gpt-5.2",
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "Summarise " * 200}]}],
    "instructions": "Answer in one paragraph.",
    "reasoning": {"effort": "medium"},
    "background": True,
}
USAGE = {
    "input_tokens": 520, "input_tokens_details": {"cached_tokens": 128, "cache_write_tokens": 0},
    "output_tokens": 4_200, "output_tokens_details": {"reasoning_tokens": 3_600},
    "total_tokens": 4_720,
}
HEADERS = {
    "x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9990",
    "x-ratelimit-reset-requests": "6ms", "x-ratelimit-limit-tokens": "30000000",
    "x-ratelimit-remaining-tokens": "29990000", "x-ratelimit-reset-tokens": "20ms",
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def one_round(jobs: int) -> tuple[float, float]:
    """(create path, whole job) in microseconds per job."""
    book = PriceBook()
    budget = Budget(1e9, book)
    clock = Clock()
    pacer = Pacer(RateLimit(requests_per_minute=600_000_000, tokens_per_minute=6e12),
                  max_in_flight=1_000, clock=clock)
    model, params = "gpt-5.2", PARAMS
    # warm up: the dataset lookup, the model's mean, the server's headroom
    for key in range(-100, 0):
        budget.reserve(key, model, params)
        budget.settle(key, book.cost(model, USAGE))
    pacer.create_delay(0)
    pacer.create_answered(200, HEADERS)
    gc.collect()
    create = answer = 0.0
    perf = time.perf_counter
    for key in range(jobs):
        clock.now += 0.001
        t0 = perf()
        tokens = estimate_tokens(params)
        budget.reserve(key, model, params, tokens=tokens)
        if pacer.create_delay(tokens[0] + tokens[1]) != 0.0:
            raise RuntimeError("the pacer held a create back: the limits are too tight")
        t1 = perf()
        pacer.create_answered(200, HEADERS)
        budget.settle(key, book.cost(model, USAGE, service_tier="default"))
        t2 = perf()
        create += t1 - t0
        answer += t2 - t1
    return create / jobs * 1e6, (create + answer) / jobs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = [one_round(args.jobs) for _ in range(args.rounds)]
    create = statistics.median(r[0] for r in results)
    whole = statistics.median(r[1] for r in results)
    print(f"create path (estimate_tokens + reserve + create_delay): {create:.2f} us/job")
    print(f"whole job (+ create_answered with headers, cost, settle): {whole:.2f} us/job")
    print(f"goal: <= {GOAL_US:.0f} us/job for the create path "
          f"({'met' if create <= GOAL_US else 'MISSED'})")


if __name__ == "__main__":
    main()
