"""``python3 dev.py soak --minutes N``: the random engine driver on fresh seeds until time is up.

Prints one line per run and, at the end, a summary (recorded in benchmarks/README.md); exits 1
when any run broke an invariant, naming its seed.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time

import anyio

from tests.engine_driver import run


async def soak(minutes: float, first_seed: int | None) -> int:
    end = time.monotonic() + minutes * 60
    seed = first_seed if first_seed is not None else secrets.randbelow(1_000_000) * 1000
    runs = bad = jobs = creates = 0
    while time.monotonic() < end:
        report = await run(seed)
        runs += 1
        jobs += report.jobs
        creates += report.creates
        print(report, flush=True)
        if report.problems:
            bad += 1
        seed += 1
    print(f"soak: {runs} runs, {jobs} jobs, {creates} creates, {bad} with problems, "
          f"{minutes:g} min", flush=True)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="dev.py soak")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None, help="the first seed (default: random)")
    args = parser.parse_args()
    import logging

    logging.getLogger("asyncbg").setLevel(logging.ERROR)  # a run's warnings are expected
    return anyio.run(soak, args.minutes, args.seed)


if __name__ == "__main__":
    sys.exit(main())
