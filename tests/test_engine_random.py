"""The engine driven at random against the in-process fake with faults (tests/engine_driver.py).

A fixed set of seeds runs here; ``python3 dev.py soak --minutes N`` runs fresh ones for longer.
A failing seed is printed in the assertion: ``anyio.run(engine_driver.run, SEED)`` replays it.
"""

from __future__ import annotations

import pytest

from tests.engine_driver import run

#: Seeds that reached every kind of fault when they were chosen (ledger down and stuck, early
#: webhooks, garbage headers, callbacks that submit, deadlines, exits by an exception).
SEEDS = [0, 2, 4, 7, 11, 42]


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", SEEDS)
async def test_random_faults_never_break_an_invariant(seed: int) -> None:
    report = await run(seed)
    assert not report.problems, str(report)
