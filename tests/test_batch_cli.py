"""``asyncbg run``: the Batch API file format, resume, bad input, exit codes, SIGKILL safety."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import sys
from pathlib import Path

import anyio
import pytest

from asyncbg.testing import LatencyModel

from .conftest import HttpFake

pytestmark = pytest.mark.asyncio


def request(custom_id: str, **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
                       "body": {"model": "gpt-5.2", "input": f"q {custom_id}", **body}})


def write_input(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


async def run_cli(
    fake: HttpFake, tmp: Path, *args: str, input_name: str = "in.jsonl"
) -> tuple[int, str]:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.base_url}
    done = await anyio.run_process(
        [sys.executable, "-m", "asyncbg", "run", str(tmp / input_name), "-o",
         str(tmp / "out.jsonl"), *args],
        check=False, env=env, cwd=tmp,
    )
    return done.returncode, done.stderr.decode() + done.stdout.decode()


def output(tmp: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]


async def test_round_trip_with_bad_lines(http_fake: HttpFake, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", [
        request("a"),
        "{this is not json",
        json.dumps({"method": "POST", "url": "/v1/responses", "body": {"model": "m"}}),
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m"}}),
        json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/responses"}),
        "",
        request("b"),
        request("failing", metadata={"fake_outcome": "failed"}),
        request("rejected", model=""),
    ])
    code, err = await run_cli(http_fake, tmp_path)
    assert code == 1
    assert "in.jsonl:2: not valid JSON" in err
    assert "in.jsonl:3: missing field 'custom_id'" in err
    assert "in.jsonl:4: field 'url' must be '/v1/responses'" in err
    assert "in.jsonl:5: missing field 'body'" in err
    lines = {line["custom_id"]: line for line in output(tmp_path)}
    assert set(lines) == {"a", "b", "failing", "rejected"}  # one per valid line, whatever happened
    a = lines["a"]
    assert a["error"] is None and str(a["id"]).startswith("batch_req_")
    assert a["response"]["status_code"] == 200  # type: ignore[index]
    assert a["response"]["body"]["status"] == "completed"  # type: ignore[index]
    assert a["response"]["body"]["output"][0]["content"][0]["text"] == "echo: q a"  # type: ignore[index]
    assert lines["failing"]["response"]["body"]["status"] == "failed"  # type: ignore[index]
    assert lines["rejected"]["response"] is None
    assert "Missing required parameter: 'model'" in lines["rejected"]["error"]["message"]  # type: ignore[index]
    assert "bad lines   4" in err and "tokens" in err and "wall time" in err
    assert "\r" not in err  # progress stays quiet when stderr is not a terminal


async def test_exit_zero_when_everything_completed(http_fake: HttpFake, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", [request(str(i)) for i in range(10)])
    code, err = await run_cli(http_fake, tmp_path, "--concurrency", "3")
    assert code == 0, err
    assert http_fake.server.counters.max_in_flight == 3
    assert len(output(tmp_path)) == 10
    assert (tmp_path / "out.jsonl.journal").exists()  # beside the output by default


async def test_duplicate_custom_ids_stop_the_run_before_anything_is_sent(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a"), request("b"), request("a")])
    code, err = await run_cli(http_fake, tmp_path)
    assert code == 2
    assert "in.jsonl:3: custom_id 'a' is already used on line 1\n" in err
    assert http_fake.server.counters.creates == 0


async def test_missing_input_file(http_fake: HttpFake, tmp_path: Path) -> None:
    code, err = await run_cli(http_fake, tmp_path, input_name="nope.jsonl")
    assert code == 2 and "cannot read" in err and "nope.jsonl" in err


async def test_a_rerun_resumes_and_sends_nothing_done(http_fake: HttpFake, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", [request(str(i)) for i in range(8)])
    assert (await run_cli(http_fake, tmp_path))[0] == 0
    counters = http_fake.server.counters
    before = (counters.creates, counters.retrieves)
    code, _ = await run_cli(http_fake, tmp_path)
    assert code == 0
    assert (counters.creates, counters.retrieves) == before
    assert sorted(line["custom_id"] for line in output(tmp_path)) == [str(i) for i in range(8)]


async def test_a_changed_body_under_the_same_custom_id_is_reported(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a"), request("b")])
    assert (await run_cli(http_fake, tmp_path))[0] == 0
    write_input(tmp_path / "in.jsonl", [request("a", input="changed"), request("b")])
    code, err = await run_cli(http_fake, tmp_path)
    assert code == 1
    assert "in.jsonl:1: key 'a' is already in the journal" in err


async def test_json_logs(http_fake: HttpFake, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    code, err = await run_cli(http_fake, tmp_path, "--log-json", "--log-level", "info")
    assert code == 0
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["event"] == "job.terminal" and e["key"] == "a" for e in events)
    assert "sk-test" not in err


async def test_sigkill_at_random_points_then_rerun_loses_nothing_and_pays_once(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    http_fake.server.latency = LatencyModel.uniform(0.3, 1.0)  # ~3 s of work: kills land
    n = 40
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(n)])
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": http_fake.base_url}
    argv = [sys.executable, "-m", "asyncbg", "run", str(tmp_path / "in.jsonl"), "-o",
            str(tmp_path / "out.jsonl"), "--concurrency", "8"]
    rng = random.Random(1234)
    kills = 0
    for _ in range(5):
        async with await anyio.open_process(argv, env=env) as proc:
            await anyio.sleep(rng.uniform(0.4, 1.4))
            if proc.returncode is None:
                proc.kill()  # SIGKILL: no cleanup runs
                kills += 1
            await proc.wait()
    final = await anyio.run_process(argv, env=env, check=False)
    assert final.returncode == 0, final.stderr.decode()
    assert kills >= 3  # the run really was interrupted

    ids = [line["custom_id"] for line in output(tmp_path)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # every result, each written once
    assert all(line["response"]["body"]["status"] == "completed"  # type: ignore[index]
               for line in output(tmp_path))
    con = sqlite3.connect(tmp_path / "out.jsonl.journal")
    resubmits = con.execute("SELECT COALESCE(SUM(resubmits), 0) FROM jobs").fetchone()[0]
    con.close()
    # Every create beyond one per line is one the journal counted as a possible duplicate
    # (a kill inside the send-to-record window); none is silent. A counted one may also be a
    # false alarm: the kill came after the journal said "sending" but before the create left.
    print(f"kills={kills} creates={http_fake.server.counters.creates} resubmits={resubmits}")
    assert n <= http_fake.server.counters.creates <= n + resubmits
