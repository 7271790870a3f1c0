"""``asyncbg run --by`` and ``--dry-run`` from the command line, against the fake over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from asyncbg._cli import build_parser
from asyncbg._cli._run import run

from .conftest import HttpFake
from .test_batch_cli import output, request, write_input

pytestmark = pytest.mark.asyncio


async def run_here(fake: HttpFake, tmp: Path, monkeypatch: pytest.MonkeyPatch,
                   *options: str) -> int:
    """``asyncbg run`` in this process (no interpreter to start): its exit status."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    args = build_parser().parse_args(["run", str(tmp / "in.jsonl"), "-o",
                                      str(tmp / "out.jsonl"), *options])
    return await run(args)


async def run_ok(fake: HttpFake, tmp: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str], lines: list[str], *options: str) -> str:
    """Run ``lines`` with ``options``; the run's stderr, once it exited 0."""
    write_input(tmp / "in.jsonl", [request(line) for line in lines])
    code = await run_here(fake, tmp, monkeypatch, *options)
    err = capsys.readouterr().err
    assert code == 0, err
    return err


async def test_by_24h_runs_the_lines_as_one_batch_and_a_rerun_sends_nothing(
    http_fake: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    err = await run_ok(http_fake, tmp_path, monkeypatch, capsys, ["r0", "r1", "r2", "r3", "r4",
                                                                  "r5"], "--by", "24h")
    c = http_fake.server.counters
    assert c.batch_creates == 1 and c.creates == 0  # a batch window fits: no response
    lines = output(tmp_path)
    assert sorted(str(line["custom_id"]) for line in lines) == [f"r{i}" for i in range(6)]
    assert all(line["error"] is None for line in lines)
    ways = next(row for row in err.splitlines() if row.lstrip().startswith("ways"))
    assert "batch 6 lines $" in ways and "all at full price $" in ways and "saved $" in ways
    code = await run_here(http_fake, tmp_path, monkeypatch, "--by", "24h")
    assert code == 0, capsys.readouterr().err
    assert c.batch_creates == 1 and c.creates == 0 and c.file_uploads == 1  # nothing again
    assert len(output(tmp_path)) == 6


async def test_by_2h_runs_flex_responses(
    http_fake: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    err = await run_ok(http_fake, tmp_path, monkeypatch, capsys, ["f0", "f1", "f2"], "--by", "2h")
    assert http_fake.server.counters.creates == 3 and http_fake.server.counters.batch_creates == 0
    assert "flex 3 lines $" in err
    journal = tmp_path / "out.jsonl.journal"
    import sqlite3

    with sqlite3.connect(journal) as db:
        keys = sorted(k for (k,) in db.execute("SELECT key FROM jobs"))
    assert keys == ["f0@flex", "f1@flex", "f2@flex"]  # one key per way in the journal


async def test_dry_run_prints_the_estimate_and_sends_nothing(
    http_fake: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.jsonl",
                [request(f"d{i}", max_output_tokens=1000) for i in range(4)])
    code = await run_here(http_fake, tmp_path, monkeypatch, "--dry-run", "--by", "24h")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "requests" in out and "batch $" in out and "Nothing was sent" in out
    assert "lines would start on batch" in out
    c = http_fake.server.counters
    assert c.creates == c.batch_creates == c.file_uploads == 0
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.journal").exists()


@pytest.mark.parametrize(("options", "says"), [
    (["--by", "soon"], "neither a duration"),
    (["--by", "2h", "--provider", "anthropic"], "needs --provider openai"),
    (["--by", "2h", "--max-cost", "5"], "--by and --max-cost"),
])
async def test_a_bad_by_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], says: str
) -> None:
    source = write_input(tmp_path / "in.jsonl", [request("a")])
    if "anthropic" in options:
        source.write_text(json.dumps({"custom_id": "a", "params": {"model": "m"}}) + "\n")
    args = build_parser().parse_args(["run", str(source), "-o", str(tmp_path / "o.jsonl"),
                                      *options])
    assert await run(args) == 2
    err = capsys.readouterr().err
    assert says in err and "nothing was sent" in err and len(err.strip().splitlines()) == 1


async def test_an_interrupted_by_run_rerun_moves_the_late_batch_and_creates_no_line_twice(
    http_fake: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncbg import DeadlinePolicy
    from asyncbg._cli import _by

    clock = [0.0]
    monkeypatch.setattr(_by, "CLOCK", lambda: clock[0])
    monkeypatch.setattr(_by, "POLICY", DeadlinePolicy(batch_needs=500, flex_needs=100,
                                                      background_needs=10, check_every=0.01))
    server = http_fake.server
    for i in range(4):
        server.batches.script(f"s{i}@batch", duration=0.01 if i < 2 else None,
                              outcome=None if i < 2 else "stuck")
    write_input(tmp_path / "in.jsonl", [request(f"s{i}") for i in range(4)])
    async with anyio.create_task_group() as tg:  # the first run stops abruptly, mid-batch
        tg.start_soon(run_here, http_fake, tmp_path, monkeypatch, "--by", "1000s")
        with anyio.fail_after(20):
            while server.counters.batch_polls == 0:  # noqa: ASYNC110 - the fake's counters
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert server.counters.batch_creates == 1 and server.counters.creates == 0
    # The rerun has 5 s left (a duration --by counts from each run's start): too little for
    # the batch, so it is cancelled and its two stuck lines go to background, once each.
    code = await run_here(http_fake, tmp_path, monkeypatch, "--by", "5s")
    err = capsys.readouterr().err
    assert code == 0, err
    c = server.counters
    assert c.batch_creates == 1 and c.batch_cancels == 1 and c.creates == 2
    lines = {str(line["custom_id"]): line for line in output(tmp_path)}
    assert sorted(lines) == ["s0", "s1", "s2", "s3"]
    assert all(line["error"] is None for line in lines.values())
    assert "batch 2 lines $" in err and "background 2 lines $" in err
    code = await run_here(http_fake, tmp_path, monkeypatch, "--by", "5s")
    assert code == 0 and (c.batch_creates, c.creates) == (1, 2)  # a third run sends nothing
