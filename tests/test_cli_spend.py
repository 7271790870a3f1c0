"""``asyncbg run --max-cost/--rpm``: a budget from the command line, and a rerun raising it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncbg.testing import UsageModel

from .conftest import HttpFake
from .test_batch_cli import output, request, run_cli, write_input

pytestmark = pytest.mark.asyncio


async def test_a_budget_leaves_lines_unsent_and_a_larger_one_runs_exactly_those(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    # gpt-5.2 priced by the built-in table; each response reports 100,000 output tokens
    http_fake.server.usage = UsageModel(input_tokens=10, output_tokens=100_000,
                                        reasoning_tokens=0)
    write_input(tmp_path / "in.jsonl",
                [request(f"r{i}", max_output_tokens=100_000) for i in range(12)])
    code, err = await run_cli(http_fake, tmp_path, "--max-cost", "5", "--rpm", "6000")
    assert code == 1, err
    lines = {line["custom_id"]: line for line in output(tmp_path)}
    done = [k for k, v in lines.items() if v["error"] is None]
    assert 0 < len(done) < 12 and "not run" in err and "for the budget" in err
    assert "$" in err and "of $5.00" in err
    creates = http_fake.server.counters.creates
    assert creates == len(done)  # nothing was sent for the lines not run
    code, err = await run_cli(http_fake, tmp_path, "--max-cost", "1000")
    assert code == 0, err
    assert http_fake.server.counters.creates == 12  # exactly the ones not run before
    final = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(final) == 12 and all(line["error"] is None for line in final)


async def test_a_bad_budget_is_a_usage_error(http_fake: HttpFake, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    code, err = await run_cli(http_fake, tmp_path, "--max-cost", "-3")
    assert code == 2 and "--max-cost" in err and "Traceback" not in err
    assert http_fake.server.counters.creates == 0
