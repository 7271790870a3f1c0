"""``asyncbg run`` never loses or misreports a result (issue 10).

The output file is a view of the journal: unit tests of that view first, then the command as a
user runs it against the HTTP fake: refusals, reruns that repair, interrupts that detach, one
run per journal, ``status`` and ``cancel``, a server that cannot be reached.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import stat
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from anyio.abc import Process

from asyncbg._cli._output import (
    NotOurs,
    OutputFile,
    line_id,
    output_line,
    read_existing,
    same_path,
    write_atomic,
)
from asyncbg._ledgers import Record
from asyncbg.testing import LatencyModel

from .conftest import HttpFake
from .test_batch_cli import request, write_input


def record(key: str, state: str = "done", status: str = "completed", **fields: Any) -> Record:
    body = fields.pop("body", None)
    if body is None and state == "done":
        body = {"id": f"resp_{key}", "status": status,
                "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}
    values: dict[str, Any] = {
        "key": key, "digest": "d", "request": b"{}", "state": state,
        "response_id": f"resp_{key}" if state in ("done", "live") else None,
        "status": status, "body": json.dumps(body).encode() if body is not None else None,
        "error": None, "error_code": None, "http_status": 200 if state == "done" else None,
        "request_id": "req_1" if state == "done" else None, "resubmits": 0,
        "created": 1700000000.25, "updated": 1700000001.0,
    }
    values.update(fields)
    return Record(**values)


# -- the output view -----------------------------------------------------------------------


def test_a_completed_line_has_its_body_status_code_and_request_id() -> None:
    line = output_line(record("a", http_status=200, request_id="req_abc"))
    assert line is not None
    assert line["custom_id"] == "a" and line["error"] is None
    assert line["response"] == {"status_code": 200, "request_id": "req_abc",
                                "body": json.loads(record("a").body or b"")}
    assert line["id"].startswith("batch_req_") and line["id"] == line_id(record("a"))


def test_a_failed_response_carries_both_its_body_and_the_error() -> None:
    body = {"id": "resp_f", "status": "failed",
            "error": {"code": "server_error", "message": "the model crashed"}}
    line = output_line(record("f", status="failed", body=body, error="the model crashed"))
    assert line is not None
    assert line["response"]["body"] == body
    assert line["error"] == {"code": "server_error", "message": "the model crashed"}


def test_a_rejected_or_unsent_line_has_no_response_and_an_error() -> None:
    rejected = output_line(record("r", state="local", status="failed", http_status=400,
                                  error="Missing required parameter: 'model'",
                                  error_code="missing_required_parameter"))
    assert rejected is not None and rejected["response"] is None
    assert rejected["error"] == {"code": "missing_required_parameter",
                                 "message": "Missing required parameter: 'model'"}
    unsent = output_line(record("c", state="local", status="failed",
                                error="cannot connect to http://x/v1: refused",
                                error_code="connection_error"))
    assert unsent is not None and unsent["error"]["code"] == "connection_error"


def test_a_deadline_or_incomplete_line_is_an_error_not_a_success() -> None:
    line = output_line(record("d", status="cancelled", error="deadline of 5 s exceeded",
                              error_code="deadline_exceeded"))
    assert line is not None and line["error"]["code"] == "deadline_exceeded"
    line = output_line(record("i", status="incomplete"))
    assert line is not None and line["error"]["code"] == "response_incomplete"


def test_an_unfinished_record_has_no_line() -> None:
    for state, status in (("new", "pending"), ("sending", "pending"), ("live", "in_progress")):
        assert output_line(record("x", state=state, status=status)) is None


def test_line_ids_are_stable_for_a_record_and_new_for_a_new_claim() -> None:
    assert line_id(record("a")) == line_id(record("a", status="failed"))
    assert line_id(record("a")) != line_id(record("b"))
    assert line_id(record("a")) != line_id(record("a", created=1800000000.0))


def test_read_existing_keeps_lines_after_a_blank_one_and_forgives_a_cut_last_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.jsonl"
    a, b = (json.dumps(output_line(record(k))) for k in "ab")
    path.write_text(f"{a}\n\n   \n{b}\n" + b[:20])
    assert read_existing(path).custom_ids == ["a", "b"]
    assert read_existing(tmp_path / "missing.jsonl").custom_ids == []


@pytest.mark.parametrize("text", [
    "hello world\n",
    '{"custom_id": "a"}\n',                                  # JSON, but not an output line
    '[1, 2]\n',
    '{"custom_id": "a", "response": null, "error": null}\nnot json\n{"x": 1}\n',
])
def test_read_existing_refuses_a_file_that_is_not_ours(tmp_path: Path, text: str) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(text)
    with pytest.raises(NotOurs):
        read_existing(path)


def test_rewrite_keeps_one_latest_line_per_key_in_order_and_the_files_mode(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    path.chmod(0o640)
    out = OutputFile(path)
    out.rewrite({"a": record("a", state="local", status="failed", error="boom")}, ["a"])
    out.append(record("a"))  # the repaired outcome, appended
    out.append(record("a"))  # the same outcome again: written once
    assert [json.loads(x)["error"] is None for x in path.read_text().splitlines()] == [
        False, True]
    records = {"a": record("a"), "b": record("b", state="live", status="in_progress"),
               "c": record("c")}
    out.rewrite(records, ["c", "a", "b", "a"])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["c", "a"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left


def test_write_atomic_leaves_the_old_file_whole_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("kept\n")

    def lines() -> Any:
        yield {"custom_id": "a"}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, lines())
    assert path.read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_same_path_sees_through_links_and_relative_names(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text("x")
    (tmp_path / "link.jsonl").symlink_to(a)
    os.link(a, tmp_path / "hard.jsonl")
    assert same_path(a, tmp_path / "link.jsonl")
    assert same_path(a, tmp_path / "hard.jsonl")
    assert same_path(a, tmp_path / "sub" / ".." / "a.jsonl")
    assert not same_path(a, tmp_path / "b.jsonl")


# -- the command, as a user runs it ---------------------------------------------------------


def undo_cli_logging() -> None:
    """Undo what ``main()`` configured (structlog, the ``asyncbg`` logger's handler)."""
    structlog.reset_defaults()
    std = logging.getLogger("asyncbg")
    std.handlers.clear()
    std.setLevel(logging.NOTSET)
    std.propagate = True


def env_for(fake: HttpFake | None, base_url: str | None = None) -> dict[str, str]:
    """The environment of a command: with an API key and a server, or (``status``) neither."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    url = base_url or (fake.base_url if fake is not None else None)
    return env if url is None else {**env, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": url}


async def cli(fake: HttpFake | None, tmp: Path, *argv: str,
              base_url: str | None = None) -> tuple[int, str, str]:
    """``python -m asyncbg ARGV`` in ``tmp``; returns (exit status, stdout, stderr)."""
    done = await anyio.run_process([sys.executable, "-m", "asyncbg", *argv], check=False,
                                   env=env_for(fake, base_url), cwd=tmp)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def run_argv(tmp: Path, *extra: str) -> list[str]:
    return ["run", str(tmp / "in.jsonl"), "-o", str(tmp / "out.jsonl"), *extra]


def lines_of(path: Path) -> dict[str, dict[str, Any]]:
    """The output's lines by custom_id; fails on a custom_id written twice."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    ids = [x["custom_id"] for x in lines]
    assert len(ids) == len(set(ids)), f"a custom_id written twice: {ids}"
    return {x["custom_id"]: x for x in lines}


async def started(proc: Process, fake: HttpFake, creates: int, timeout: float = 30.0) -> None:
    """Wait until the fake has seen ``creates`` creates (the run is under way)."""
    with anyio.fail_after(timeout):
        while fake.server.counters.creates < creates:
            assert proc.returncode is None, "the run ended before it was interrupted"
            await anyio.sleep(0.02)


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.02)


async def ended(proc: Process, timeout: float = 20.0) -> tuple[int, str]:
    """The exit status and stderr of ``proc``, which has been told to stop; ``timeout`` is
    only a safety net: a process still there after it has hung, and the test says so."""
    with anyio.move_on_after(timeout):
        code = await proc.wait()
    if proc.returncode is None:
        proc.kill()
        pytest.fail(f"the process was still running {timeout:g} s after it was told to stop: "
                    "it hangs")
    assert proc.stderr is not None
    err = b""
    async for chunk in proc.stderr:
        err += chunk
    return code, err.decode()


@pytest.mark.asyncio
async def test_a_rerun_repairs_a_rejected_line_and_replaces_its_error_line(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a"), request("bad", model=""), request("c")])
    code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path))
    assert code == 1
    assert "in.jsonl:2 bad: " in err and "Missing required parameter" in err  # named
    first = lines_of(tmp_path / "out.jsonl")
    assert first["bad"]["response"] is None and first["bad"]["error"]["message"]
    write_input(tmp_path / "in.jsonl", [request("a"), request("bad"), request("c")])
    code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path))
    assert code == 0, err
    lines = lines_of(tmp_path / "out.jsonl")
    assert list(lines) == ["a", "bad", "c"]
    assert lines["bad"]["error"] is None
    assert lines["bad"]["response"]["body"]["status"] == "completed"
    assert lines["a"]["id"] == first["a"]["id"]  # a line's id survives rewrites
    assert http_fake.server.counters.creates == 3  # a and c were not sent again


@pytest.mark.asyncio
async def test_output_lines_say_what_happened(http_fake: HttpFake, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", [
        request("ok"), request("failing", metadata={"fake_outcome": "failed"})])
    code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path))
    assert code == 1
    lines = lines_of(tmp_path / "out.jsonl")
    ok, failing = lines["ok"], lines["failing"]
    assert ok["error"] is None and ok["response"]["status_code"] == 200
    assert str(ok["response"]["request_id"]).startswith("req_")  # from x-request-id
    assert failing["response"]["body"]["status"] == "failed"
    assert failing["error"]["code"] and failing["error"]["message"]
    assert "in.jsonl:2 failing: " in err
    assert "in.jsonl:1 ok" not in err


@pytest.mark.asyncio
async def test_deadline_cancels_a_slow_response_on_the_server(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [
        request("fast", metadata={"fake_duration": "0.05"}),
        request("slow", metadata={"fake_duration": "30"})])
    with anyio.fail_after(15):
        code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path, "--deadline", "1"))
    assert code == 1
    lines = lines_of(tmp_path / "out.jsonl")
    assert lines["fast"]["error"] is None
    assert lines["slow"]["error"]["code"] == "deadline_exceeded"
    assert http_fake.server.counters.cancels == 1
    assert "in.jsonl:2 slow: " in err


@pytest.mark.parametrize("case", ["output is input", "journal is input", "journal is output",
                                  "output is a link to input"])
@pytest.mark.asyncio
async def test_paths_that_name_one_file_are_refused(
    http_fake: HttpFake, tmp_path: Path, case: str
) -> None:
    source = write_input(tmp_path / "in.jsonl", [request("a")])
    source.chmod(0o644)
    before = source.read_bytes()
    out, journal = str(tmp_path / "out.jsonl"), str(tmp_path / "j.db")
    if case == "output is input":
        out = str(source)
    elif case == "journal is input":
        journal = str(tmp_path / "." / "in.jsonl")
    elif case == "journal is output":
        journal = out
    else:
        (tmp_path / "link.jsonl").symlink_to(source)
        out = str(tmp_path / "link.jsonl")
    code, _, err = await cli(http_fake, tmp_path, "run", str(source), "-o", out,
                             "--journal", journal)
    assert code == 2 and "same file" in err and "Traceback" not in err
    assert source.read_bytes() == before and stat.S_IMODE(source.stat().st_mode) == 0o644
    assert http_fake.server.counters.creates == 0
    assert not (tmp_path / "j.db").exists() and not (tmp_path / "out.jsonl").exists()


@pytest.mark.asyncio
async def test_an_output_that_is_not_ours_is_left_alone(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    (tmp_path / "out.jsonl").write_text("my notes\nmore notes\n")
    code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path))
    assert code == 2 and "not an asyncbg output file" in err and "Traceback" not in err
    assert (tmp_path / "out.jsonl").read_text() == "my notes\nmore notes\n"
    assert http_fake.server.counters.creates == 0
    assert not (tmp_path / "out.jsonl.journal").exists()


@pytest.mark.asyncio
async def test_blank_lines_in_an_existing_output_lose_nothing(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request(str(i)) for i in range(4)])
    assert (await cli(http_fake, tmp_path, *run_argv(tmp_path)))[0] == 0
    out = tmp_path / "out.jsonl"
    text = out.read_text().splitlines()
    out.write_text(text[0] + "\n\n" + "\n".join(text[1:]) + "\n")
    code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path))
    assert code == 0, err
    assert sorted(lines_of(out)) == ["0", "1", "2", "3"]


@pytest.mark.asyncio
async def test_a_journal_the_ledger_refuses_is_one_line_and_rc_2(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    (tmp_path / "j.db").write_bytes(b"SQLite format 3\x00" + b"\x07" * 200)  # corrupt
    code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path, "--journal", "j.db"))
    assert code == 2 and "j.db" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert http_fake.server.counters.creates == 0


# -- interrupts detach -----------------------------------------------------------------------


async def open_run(fake: HttpFake, tmp: Path, *extra: str) -> Process:
    return await anyio.open_process(
        [sys.executable, "-m", "asyncbg", *run_argv(tmp, *extra)], env=env_for(fake), cwd=tmp)


@pytest.mark.parametrize(("signum", "rc"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.asyncio
async def test_an_interrupt_leaves_live_responses_running_and_a_rerun_collects_them(
    http_fake: HttpFake, tmp_path: Path, signum: int, rc: int
) -> None:
    http_fake.server.latency = LatencyModel.fixed(1.2)
    n = 8
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(n)])
    async with await open_run(http_fake, tmp_path, "--concurrency", "4") as proc:
        await started(proc, http_fake, 4)
        await anyio.sleep(0.2)  # every create answered and journaled
        os.kill(proc.pid, signum)
        code, err = await ended(proc)
    assert code == rc, err
    assert "Traceback" not in err
    # It left at the signal, not when the responses ended: they are still running.
    assert "4 responses still running on the server" in err
    assert "run the same command again" in err
    assert f"asyncbg cancel --ledger {tmp_path / 'out.jsonl.journal'}" in err
    assert http_fake.server.counters.cancels == 0  # nothing was cancelled on the server
    assert http_fake.server.counters.creates == 4  # and nothing more created
    assert lines_of(tmp_path / "out.jsonl") == {}  # nothing had finished
    if signum == signal.SIGTERM:
        return  # the same from here on

    code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path))
    assert code == 0, err
    lines = lines_of(tmp_path / "out.jsonl")
    assert sorted(lines) == sorted(f"r{i}" for i in range(n))  # every result, once
    assert all(x["error"] is None for x in lines.values())
    assert http_fake.server.counters.creates == n  # the live ones were collected, not redone


@pytest.mark.asyncio
async def test_a_second_ctrl_c_cancels_the_live_responses_on_the_server(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    http_fake.server.latency = LatencyModel.fixed(30)
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(6)])
    async with await open_run(http_fake, tmp_path, "--concurrency", "3") as proc:
        await started(proc, http_fake, 3)
        await anyio.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        await anyio.sleep(0.3)  # a double Ctrl-C, as a hand does it
        os.kill(proc.pid, signal.SIGINT)
        code, err = await ended(proc, timeout=15)
    assert code == 130, err
    assert http_fake.server.counters.cancels == 3
    assert "0 responses still running" in err
    lines = lines_of(tmp_path / "out.jsonl")
    assert sorted(lines) == ["r0", "r1", "r2"]
    assert all(x["error"]["code"] == "cancelled" for x in lines.values())


@pytest.mark.asyncio
async def test_cancel_on_interrupt_cancels_at_the_first_signal(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    http_fake.server.latency = LatencyModel.fixed(30)
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(5)])
    async with await open_run(http_fake, tmp_path, "--concurrency", "2",
                              "--cancel-on-interrupt") as proc:
        await started(proc, http_fake, 2)
        await anyio.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        code, err = await ended(proc, timeout=15)
    assert code == 130, err
    assert http_fake.server.counters.cancels == 2
    assert http_fake.server.counters.creates == 2
    assert "0 responses still running" in err and "3 lines not sent" in err


# -- one run per journal -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_second_run_on_a_journal_in_use_exits_2_naming_the_first(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    http_fake.server.latency = LatencyModel.fixed(30)
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(4)])
    journal = str(tmp_path / "out.jsonl.journal")
    async with await open_run(http_fake, tmp_path) as first:
        await started(first, http_fake, 4)
        code, err = -1, "the second run did not exit within 25 s"
        with anyio.move_on_after(25):  # a safety net: the first's responses take 30 s
            code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path))
        assert first.returncode is None, "the second run waited for the first to end"
        assert code == 2 and f"pid {first.pid}" in err and "Traceback" not in err
        code, _, err = await cli(http_fake, tmp_path, "cancel", "--ledger", journal)
        assert code == 2 and f"pid {first.pid}" in err  # cancel, too, waits its turn
        code, out, err = await cli(None, tmp_path, "status", "--ledger", journal, "--json")
        assert code == 0, err  # status only reads: it works while the run goes on
        assert len(json.loads(out)["live_response_ids"]) == 4
        assert first.returncode is None  # the first held the journal all along
        os.kill(first.pid, signal.SIGINT)
        code, err = await ended(first)
    assert code == 130, err
    assert http_fake.server.counters.creates == 4  # the second run sent nothing
    assert http_fake.server.counters.cancels == 0


# -- the operator's tools --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_status_and_cancel_over_an_interrupted_runs_journal(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [
        request("done", metadata={"fake_duration": "0.05"}),
        *(request(f"slow{i}", metadata={"fake_duration": "600"}) for i in range(3))])
    async with await open_run(http_fake, tmp_path) as proc:
        await started(proc, http_fake, 4)
        await until(lambda: bool((tmp_path / "out.jsonl").read_text()))  # "done" finished
        http_fake.hold()  # the slow ones stay live however slow the rest of the test is
        os.kill(proc.pid, signal.SIGINT)
        code, err = await ended(proc)
    assert code == 130, err
    journal = str(tmp_path / "out.jsonl.journal")

    code, out, err = await cli(None, tmp_path, "status", "--ledger", journal, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["by_status"]["completed"] == 1
    assert status["by_status"].get("queued", 0) + status["by_status"].get("in_progress", 0) == 3
    assert len(status["live_response_ids"]) == 3
    assert status["tokens"]["total"] > 0

    code, out, err = await cli(http_fake, tmp_path, "cancel", "--ledger", journal)
    assert code == 0, err
    assert "cancelled 3 of 3 live responses; none is left live" in out
    assert http_fake.server.counters.cancels == 3
    code, out, _ = await cli(None, tmp_path, "status", "--ledger", journal, "--json")
    status = json.loads(out)
    assert status["live_response_ids"] == []
    assert status["by_status"] == {"completed": 1, "cancelled": 3}


@pytest.mark.asyncio
async def test_status_of_a_missing_journal(tmp_path: Path) -> None:
    code, _, err = await cli(None, tmp_path, "status", "--ledger", str(tmp_path / "nope"))
    assert code == 2 and "no journal or ledger at" in err and "asyncbg submit" in err
    assert not (tmp_path / "nope").exists()


# -- failing fast and clear ------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio
async def test_a_server_that_refuses_connections_is_one_line_and_rc_2(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(20)])
    port = closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    code, err = -1, ""
    with anyio.move_on_after(60):  # a safety net: it retried each line for 47 s before
        code, _, err = await cli(None, tmp_path, *run_argv(tmp_path, "--log-level", "debug",
                                                           "--log-json"), base_url=url)
    assert code == 2, "no exit within 60 s" if code == -1 else err
    events = Counter(json.loads(line)["event"] for line in err.splitlines()
                     if line.startswith("{"))
    # Given up as a whole at the first creates that could not connect: no line was retried
    # with a backoff on its own, and every line ended unsent. Said once, by the summary: no
    # error event of the engine's as well (server.unreachable).
    assert events["server.unreachable"] == 0 and events["request.retry"] == 0, events
    assert events["job.terminal"] == 20, events
    said = [line for line in err.splitlines() if not line.startswith("{")]
    # host:port and the OS's reason, not the HTTP library's reprs
    assert said == [f"asyncbg: cannot connect to {url} (127.0.0.1:{port}: connection "
                    "refused); nothing was sent"], err
    # Nothing reached a server, so nothing counts as a possible duplicate, and the rerun
    # against a server that answers sends each line once.
    con = sqlite3.connect(tmp_path / "out.jsonl.journal")
    assert con.execute("SELECT COALESCE(SUM(resubmits), 0) FROM jobs").fetchone()[0] == 0
    con.close()
    code, _, err = await cli(http_fake, tmp_path, *run_argv(tmp_path))
    assert code == 0, err
    assert len(lines_of(tmp_path / "out.jsonl")) == 20
    sent = Counter(r.input_text for r in http_fake.server._timeline.responses.values())
    assert sent == {f"q r{i}": 1 for i in range(20)}  # one create per line


@pytest.mark.asyncio
async def test_progress_lines_when_asked_for_on_a_pipe(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    http_fake.server.latency = LatencyModel.fixed(0.6)
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(4)])
    code, _, err = await cli(http_fake, tmp_path,
                             *run_argv(tmp_path, "--progress", "--progress-every", "0.2"))
    assert code == 0, err
    progress = [line for line in err.splitlines() if " done" in line and "in flight" in line]
    assert progress and progress[0].startswith("asyncbg: 0/4 done")
    assert "\r" not in err and "\x1b" not in err


def test_a_journal_that_fails_mid_run_is_one_clear_line(
    http_fake: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from asyncbg._cli import main
    from asyncbg._ledgers import LedgerError, SQLiteLedger

    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(5)])
    real_claim = SQLiteLedger.claim
    calls = 0

    async def failing_claim(self: SQLiteLedger, key: str, digest: str, body: bytes) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise LedgerError(f"{self.location}: disk I/O error; check the disk")
        return await real_claim(self, key, digest, body)

    monkeypatch.setattr(SQLiteLedger, "claim", failing_claim)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", http_fake.base_url)
    try:
        code = main(run_argv(tmp_path))
    finally:
        undo_cli_logging()
    err = capsys.readouterr().err
    assert code == 2, err  # the journal stopped working: nothing more could run
    assert "disk I/O error; check the disk" in err and "Traceback" not in err
    assert http_fake.server.counters.creates <= 2
