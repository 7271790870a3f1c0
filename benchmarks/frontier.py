"""The polling frontier: polls per job against detection delay, in virtual time.

Runs the real manager against the in-process fake server under trio's ``MockClock``, which jumps
ahead whenever every task waits, so durations are real, uncompressed seconds and a run of hours
takes seconds of CPU. Compressing real time instead would have the fake server answer thousands
of polls a second, and measure its saturation rather than the policies. A fixed poller is the
manager with a fixed-interval policy: create, then poll every T seconds, which is what the
seeds' loop does. (On trio, asyncbg polls through the SDK: the lean path is asyncio-only. That
changes CPU, not polls or delays.)
"""

from __future__ import annotations

import math
import random
from typing import Any

import asyncbg
from benchmarks.common import fixed, job, pct


def frontier(n: int, seed: int, *, median: float = 120.0,
             longest: float = 3600.0) -> dict[str, Any]:
    """``n`` jobs of lognormal durations (``median``, clamped to 1 s..``longest``)."""
    import trio
    import trio.testing

    from asyncbg.testing import FakeResponsesServer, fake_client

    rng = random.Random(seed)
    real = [min(max(median * math.exp(rng.gauss(0, 1.6)), 1.0), longest) for _ in range(n)]

    async def run(policy: asyncbg.PollPolicy) -> dict[str, float]:
        random.seed(seed)  # the same jitter for every run
        server = FakeResponsesServer(clock=trio.current_time)
        c = fake_client(server)
        try:
            async with asyncbg.BackgroundManager(c, max_concurrency=n,
                                                 poll_policy=policy) as mgr:
                jobs = [await mgr.submit(**job(i, d)) for i, d in enumerate(real)]
        finally:
            await c.close()
        delays = {j.response_id: server.counters.detection_delays[j.response_id or ""]
                  for j in jobs}
        relative = [delays[j.response_id] / d for j, d in zip(jobs, real, strict=True)]
        return {"polls_per_job": round(server.counters.retrieves / n, 1),
                "delay_p50_s": round(pct(list(delays.values()), 0.5), 2),
                "delay_p95_s": round(pct(list(delays.values()), 0.95), 2),
                "relative_delay_p95": round(pct(relative, 0.95), 3)}

    def virtual(policy: asyncbg.PollPolicy) -> dict[str, float]:
        return trio.run(run, policy, clock=trio.testing.MockClock(autojump_threshold=0))

    out: dict[str, Any] = {"jobs": n, "durations_s": {"p50": round(pct(real, 0.5)),
                                                      "p95": round(pct(real, 0.95)),
                                                      "max": round(max(real))},
                           "time": "virtual"}
    out["asyncbg_default"] = virtual(asyncbg.PollPolicy())
    out["fixed_10s"] = virtual(fixed(10.0))
    out["fixed_1s"] = virtual(fixed(1.0))
    ours = out["asyncbg_default"]

    def tuned(measure: str) -> dict[str, Any]:
        """The fixed interval whose p95 ``measure`` matches asyncbg's, by bisection; with the
        final bracket (intervals, and their ``measure``), which holds asyncbg's value."""
        low, high = 0.25, 120.0
        for _ in range(8):
            mid = (low + high) / 2
            if virtual(fixed(mid))[measure] < ours[measure]:
                low = mid
            else:
                high = mid
        below = virtual(fixed(low))
        return {**below, "interval_s": round(low, 2), "bracket_s": [round(low, 2), round(high, 2)],
                "bracket": [below[measure], virtual(fixed(high))[measure]]}

    out["fixed_tuned"] = tuned("delay_p95_s")
    out["fixed_tuned_relative"] = tuned("relative_delay_p95")
    out["polls_ratio_vs_tuned"] = round(
        ours["polls_per_job"] / out["fixed_tuned"]["polls_per_job"], 3)
    out["polls_ratio_vs_tuned_relative"] = round(
        ours["polls_per_job"] / out["fixed_tuned_relative"]["polls_per_job"], 3)
    out["goal"] = "<= 0.333 of fixed_tuned's polls at the same p95 delay"
    return out
