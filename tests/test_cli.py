"""The command line as a user runs it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog
from rich.console import Console

from asyncbg._cli import main
from asyncbg._cli._logging import configure_logging
from asyncbg._cli._progress import Display, Live, Tally, plain_line
from asyncbg._cli._signals import Interrupts
from asyncbg._ledgers import Outcome, SQLiteLedger


@pytest.fixture(autouse=True)
def _unconfigure_logging() -> Iterator[None]:
    """``main()`` configures logging for the process; undo it for the tests that follow."""
    yield
    structlog.reset_defaults()
    std = logging.getLogger("asyncbg")
    std.handlers.clear()
    std.setLevel(logging.NOTSET)
    std.propagate = True


def test_demo_runs_offline_and_prints_a_summary() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "asyncbg", "demo", "--jobs", "30", "--concurrency", "8",
         "--median", "0.05"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": ""},
    )
    assert out.returncode == 0, out.stderr
    assert "jobs        30" in out.stdout
    for word in ("completed", "polls", "tokens", "wall time", "limit 8"):
        assert word in out.stdout
    assert "at most 8 at once" in out.stdout
    assert "no API key" in out.stderr


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--jobs", "--concurrency", "--median", "--seed", "--log-json"):
        assert option in text


def test_run_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("INPUT.jsonl", "--output", "--concurrency", "--journal", "--base-url",
                   "--log-json", "--log-level", "OPENAI_API_KEY", "Exit status"):
        assert option in text


@contextlib.contextmanager
def fake_server_process(*flags: str) -> Iterator[str]:
    """``asyncbg fake-server`` with ``flags`` in a subprocess; yields its base URL once it
    answers (the wait is on the server, not a fixed sleep)."""
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", "fake-server", "--port",
                             str(port), *flags], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/_fake/counters")
                break
            except httpx.ConnectError:
                assert proc.poll() is None, "fake-server exited"
                assert time.monotonic() < deadline, "fake-server did not start"
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_fake_server_command_serves_the_api_with_faults_limits_latency_and_outcomes() -> None:
    """One server process for both (starting one costs seconds on a loaded machine)."""
    import httpx

    flags = ("--inject", "503,route=create,times=2,retry_after=nan", "--inject", "quota",
             "--rate-limit", "rpm=600,burst=1", "--latency", "fixed:30", "--outcomes", "failed=1",
             "--poll-after-ms", "nan")
    with fake_server_process(*flags) as base:
        body = {"model": "m", "input": "hi", "background": True}
        answers = [httpx.post(f"{base}/v1/responses", json=body) for _ in range(4)]
        assert [a.status_code for a in answers] == [503, 503, 429, 200]
        assert answers[0].headers["retry-after"] == "nan"
        assert answers[2].json()["error"]["code"] == "insufficient_quota"
        assert "x-ratelimit-remaining-requests" in answers[3].headers  # --rate-limit
        rid = answers[3].json()["id"]
        live = httpx.get(f"{base}/v1/responses/{rid}")
        assert live.json()["status"] in ("queued", "in_progress")  # 30 s: still running
        assert live.headers["openai-poll-after-ms"] == "nan"
        finished = httpx.post(f"{base}/v1/responses",
                              json={**body, "metadata": {"fake_duration": "0"}})
        done = httpx.get(f"{base}/v1/responses/{finished.json()['id']}").json()
        assert done["status"] == "failed"  # --outcomes failed=1
        counters = httpx.get(f"{base}/_fake/counters").json()
        assert counters["creates"] == 2 and counters["faults"] == 3


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--latency", "bogus", "expected fixed:S"),
    ("--fail-rate", "429=2", "the rate of 429 must be"),
    ("--fail-rate", "0.5,x=1", "unknown 'x'"),
    ("--rate-limit", "rpm=-1", "rpm must be a finite number > 0"),
    ("--inject", "boom", "the kind is one of"),
    # after= counts a drop's events, not requests: a reset meets the next creates at once
    ("--inject", "reset,route=create,times=4,after=16",
     "after=16 is for a drop fault (the events a stream keeps before it is cut); a reset fault "
     "meets the next 4 matching request(s) from the first"),
    ("--inject", "503,delay=2", "delay=2 is for a slow fault"),
    ("--outcomes", "completed=0", "at least one weight"),
])
def test_fake_server_flags_refuse_bad_values_in_one_line(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fake-server", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"asyncbg fake-server: error: argument {flag}:") and says in err


# -- status over a journal filled by hand ------------------------------------------------------


def fill_journal(path: Path) -> None:
    async def fill() -> None:
        ledger = SQLiteLedger(path)
        await ledger.open()
        try:
            for key in ("done", "failed", "live1", "live2", "rejected", "unsent"):
                await ledger.claim(key, f"d-{key}", b"{}")
            for key in ("done", "failed", "live1", "live2", "rejected"):
                await ledger.sending(key, resubmit=False)
            usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
            await ledger.record("done", Outcome(
                "completed", "resp_done", json.dumps({"status": "completed",
                                                      "usage": usage}).encode(),
                http_status=200, request_id="req_1"))
            await ledger.record("failed", Outcome(
                "failed", "resp_failed", b'{"status": "failed"}', error="boom",
                error_code="server_error", http_status=200))
            await ledger.record("live1", Outcome("queued", "resp_live1"))
            await ledger.record("live2", Outcome("in_progress", "resp_live2"))
            await ledger.record("rejected", Outcome(
                "failed", error="bad model", error_code="invalid_request", http_status=400))
        finally:
            await ledger.close()

    anyio.run(fill)


def test_status_json_counts_live_ids_and_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_journal(tmp_path / "j.db")
    assert main(["status", "--ledger", str(tmp_path / "j.db"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["by_status"] == {"pending": 1, "queued": 1, "in_progress": 1,
                                   "completed": 1, "failed": 2}
    assert status["live_response_ids"] == ["resp_live1", "resp_live2"]
    assert status["tokens"] == {"input": 10, "output": 5, "total": 15}
    assert status["total"] == 6


def test_status_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill_journal(tmp_path / "j.db")
    assert main(["status", "--ledger", str(tmp_path / "j.db")]) == 0
    text = capsys.readouterr().out
    assert "jobs        6  (pending 1, queued 1, in_progress 1, completed 1, failed 2)" in text
    assert "2 still running on the server" in text
    assert "resp_live1" in text and "resp_live2" in text
    assert "tokens      15  (input 10, output 5)" in text
    assert "run the same `asyncbg run` command again to collect them" in text
    assert "asyncbg cancel" not in text  # it recommends nothing that destroys paid work


def test_status_reports_a_refused_journal_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not a journal\n" * 100)
    assert main(["status", "--ledger", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "not a journal\n" * 100


def test_cancel_with_nothing_live_needs_no_api_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = tmp_path / "j.db"

    async def empty() -> None:
        ledger = SQLiteLedger(path)
        await ledger.open()
        await ledger.close()

    anyio.run(empty)
    assert main(["cancel", "--ledger", str(path)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out


def test_a_run_without_an_api_key_says_which_variable_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/responses",
                                  "body": {"model": "m", "input": "a"}}) + "\n")
    assert main(["run", str(source), "-o", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == ("asyncbg: no OpenAI API key: set OPENAI_API_KEY (against `asyncbg "
                   "fake-server`, any value works)\n")


def test_status_and_cancel_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("status", "cancel"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--ledger" in capsys.readouterr().out


def test_run_help_names_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--deadline", "--cancel-on-interrupt", "--progress", "130", "143",
                   "asyncbg cancel --ledger"):
        assert option in text
    assert "--progress-every" not in text


# -- progress ----------------------------------------------------------------------------------


def test_plain_progress_line() -> None:
    tally = Tally(total=10, started=0.0)
    for status in ("completed", "completed", "failed", "completed"):
        tally.add(status, tokens=1000)
    line = plain_line(tally, Live(in_flight=3, retries=2), elapsed=8.0)
    assert line == ("asyncbg: 4/10 done (completed 3, failed 1), 3 in flight, 0.5/s, ETA 12s, "
                    "retries 2, tokens 4,000, $0.00, 8s elapsed")
    assert "ETA -" in plain_line(Tally(total=5, started=0.0), Live(), elapsed=1.0)


async def _show_bar_and_log(console: Console, tally: Tally) -> None:
    display = Display(tally, lambda: Live(in_flight=2, retries=1), mode="bar", console=console)
    async with anyio.create_task_group() as tg:
        tg.start_soon(display.run)
        await anyio.sleep(0.05)
        tally.add("completed", tokens=1234)
        structlog.get_logger("asyncbg").warning("request.retry", attempt=2)
        logging.getLogger("asyncbg").warning("stdlib says hello")
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()


def test_the_bar_shows_counts_and_log_lines_never_glue_onto_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = io.StringIO()
    monkeypatch.setattr(sys, "stderr", real)
    configure_logging(level="info")
    console = Console(file=real, force_terminal=True, width=150, color_system=None)
    tally = Tally(total=4, started=0.0)
    anyio.run(_show_bar_and_log, console, tally)
    screen = real.getvalue()
    assert "1/4" in screen and "2 in flight" in screen and "retries 1" in screen
    assert "tokens 1,234" in screen and "ETA" in screen and "/s" in screen
    # Each log line starts on a line of its own: rich printed it above the bar.
    rows = screen.replace("\r", "\n").split("\n")
    retry = [r for r in rows if "request.retry" in r]
    hello = [r for r in rows if "stdlib says hello" in r]
    assert retry and hello
    for row in retry + hello:
        assert "responses" not in row and "in flight" not in row
    assert sys.stderr is real  # the redirection was undone


def test_logging_writes_to_the_stderr_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging(level="warning", json=True)
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    structlog.get_logger("asyncbg").warning("job.lost", key="k1")
    structlog.get_logger("asyncbg").info("job.quiet")  # below the level
    logging.getLogger("asyncbg").warning("from stdlib")
    events = [json.loads(line) for line in later.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["job.lost", "from stdlib"]
    assert events[0]["key"] == "k1" and events[0]["level"] == "warning"


def test_progress_modes() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    pipe = Console(file=io.StringIO(), force_terminal=False)
    assert Display.mode_for(terminal, progress=False) == "bar"
    assert Display.mode_for(pipe, progress=False) == "off"
    assert Display.mode_for(pipe, progress=True) == "lines"


# -- interrupts --------------------------------------------------------------------------------


def test_the_first_signal_detaches_the_second_cancels_the_third_gives_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def scenario() -> None:
        interrupts = Interrupts()
        work = anyio.CancelScope()
        await interrupts.receive(signal.SIGINT, work)
        assert work.cancel_called and interrupts.exit_code == 130
        assert not interrupts.cancel_live
        await interrupts.receive(signal.SIGINT, work)
        assert interrupts.cancel_live and not interrupts.cleanup.cancel_called
        await interrupts.receive(signal.SIGINT, work)
        assert interrupts.cleanup.cancel_called

    anyio.run(scenario)
    err = capsys.readouterr().err
    assert "live responses are left running" in err and "will be cancelled" in err


def test_cancel_on_interrupt_cancels_before_it_stops_the_work() -> None:
    order: list[str] = []

    async def scenario() -> None:
        interrupts = Interrupts(cancel_live=True, cancel_timeout=0.2)
        work = anyio.CancelScope()

        async def cancel_all() -> None:
            order.append(f"cancel_all, work cancelled: {work.cancel_called}")
            await anyio.sleep(5)  # a server that never answers: bounded by cancel_timeout

        interrupts.on_cancel = cancel_all
        await interrupts.receive(signal.SIGTERM, work)
        order.append(f"work cancelled: {work.cancel_called}")
        assert interrupts.exit_code == 143

    anyio.run(scenario)
    assert order == ["cancel_all, work cancelled: False", "work cancelled: True"]
