"""``asyncbg run``, second pass (issue 19): no path it is given is destroyed, big files stream,
budgets are real, inputs are read as people write them, every command ends quietly on a
closed pipe.

Most cases run the command in this process (``main(argv)``, against the HTTP fake): Python's
start-up is paid once, not per case.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncbg._cli import main
from asyncbg._cli._output import OutputFile, RefusedPath, output_target
from asyncbg._cli._progress import Live, Tally, plain_line
from asyncbg._ledgers import LedgerError, SQLiteLedger
from asyncbg.testing import LatencyModel, UsageModel

from .conftest import HttpFake
from .test_batch_cli import request, write_input
from .test_cli_integrity import undo_cli_logging


@pytest.fixture
def env(http_fake: HttpFake, monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpFake]:
    """An API key and the fake's URL in the environment; the CLI's logging undone after."""
    for name in [n for n in os.environ if n.startswith("OPENAI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", http_fake.base_url)
    try:
        yield http_fake
    finally:
        undo_cli_logging()


def run(tmp: Path, *extra: str, output: str | None = None) -> int:
    out = output if output is not None else str(tmp / "out.jsonl")
    return main(["run", str(tmp / "in.jsonl"), "-o", out, *extra])


def lines_of(path: Path) -> dict[str, dict[str, Any]]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    ids = [x["custom_id"] for x in lines]
    assert len(ids) == len(set(ids)), f"a custom_id written twice: {ids}"
    return {x["custom_id"]: x for x in lines}


# -- output paths --------------------------------------------------------------------------


def test_an_output_path_must_be_a_regular_file_or_new(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        for name, kind in (("fifo", "FIFO"), ("dir", "directory"), ("sock", "socket")):
            with pytest.raises(RefusedPath, match=kind):
                output_target(tmp_path / name)
    finally:
        sock.close()
    (tmp_path / "target.jsonl").write_text("")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "target.jsonl")
    assert output_target(tmp_path / "link.jsonl") == (tmp_path / "target.jsonl").resolve()
    assert output_target(tmp_path / "new.jsonl") == (tmp_path / "new.jsonl").resolve()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_a_device_output_is_refused_before_anything_is_sent(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    assert run(tmp_path, output=str(null)) == 2
    err = capsys.readouterr().err
    assert "character device" in err and "nothing was sent" in err and "Traceback" not in err
    assert stat.S_ISCHR(null.lstat().st_mode)  # still the device
    assert env.server.counters.creates == 0
    assert not (tmp_path / "null.journal").exists()


def test_a_fifo_output_is_refused_at_once_not_read(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    os.mkfifo(tmp_path / "fifo")  # reading it would hang: nobody writes to it
    assert run(tmp_path, output=str(tmp_path / "fifo")) == 2
    assert "FIFO" in capsys.readouterr().err
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode)
    assert env.server.counters.creates == 0


def test_a_symlinked_output_keeps_its_link_and_its_target_is_rewritten(
    env: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(3)])
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "results.jsonl"
    (tmp_path / "out.jsonl").symlink_to(target)
    assert run(tmp_path) == 0
    assert (tmp_path / "out.jsonl").is_symlink()
    assert sorted(lines_of(target)) == ["r0", "r1", "r2"]
    assert run(tmp_path) == 0  # the rerun rewrites the target again; the link stays
    assert (tmp_path / "out.jsonl").is_symlink() and len(lines_of(target)) == 3


def test_dash_streams_finished_lines_to_stdout(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(5)])
    journal = str(tmp_path / "j.db")
    assert run(tmp_path, "--journal", journal, output="-") == 0
    out = capsys.readouterr().out
    assert sorted(json.loads(x)["custom_id"] for x in out.splitlines()) == [
        f"r{i}" for i in range(5)]
    assert run(tmp_path, "--journal", journal, output="-") == 0  # a rerun: served, once each
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert env.server.counters.creates == 5
    assert run(tmp_path, output="-") == 2  # no journal to resume from: refused
    assert "--journal" in capsys.readouterr().err


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    holder = OutputFile((tmp_path / "out.jsonl").resolve())
    holder.lock()  # another run, with another journal, writing this output
    try:
        assert run(tmp_path, "--journal", str(tmp_path / "other.db")) == 2
    finally:
        holder.unlock()
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "in use" in err
    assert env.server.counters.creates == 0
    assert run(tmp_path, "--journal", str(tmp_path / "other.db")) == 0  # once it is free


# -- big files stream ------------------------------------------------------------------------


def test_lines_are_written_while_later_lines_are_still_unsent(
    env: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.server.latency = LatencyModel.fixed(0.01)
    n = 120
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(n)])
    creates_at_first_write: list[int] = []
    real = OutputFile.append_many

    def append_many(self: OutputFile, records: Any) -> int:
        creates_at_first_write.append(env.server.counters.creates)
        return real(self, records)

    monkeypatch.setattr(OutputFile, "append_many", append_many)
    assert run(tmp_path, "--concurrency", "16") == 0
    # The window is 64 submitted-not-collected lines: the first line was written before the
    # last one was sent.
    assert creates_at_first_write[0] < n
    assert len(lines_of(tmp_path / "out.jsonl")) == n


def test_a_rerun_with_nothing_to_do_claims_nothing(
    env: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env.server.latency = LatencyModel.fixed(0.01)
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(40)])
    assert run(tmp_path, "--concurrency", "8") == 0
    before = (tmp_path / "out.jsonl").read_bytes()
    claims = 0
    real = SQLiteLedger.claim

    async def claim(self: SQLiteLedger, *args: Any) -> Any:
        nonlocal claims
        claims += 1
        return await real(self, *args)

    monkeypatch.setattr(SQLiteLedger, "claim", claim)
    capsys.readouterr()
    assert run(tmp_path) == 0
    assert claims == 0 and env.server.counters.creates == 40
    assert (tmp_path / "out.jsonl").read_bytes() == before
    assert "completed 40" in capsys.readouterr().err
    # A changed line is claimed (and refused: its key has another request in the journal).
    write_input(tmp_path / "in.jsonl", [request("r0", input="changed"),
                                        *(request(f"r{i}") for i in range(1, 40))])
    assert run(tmp_path) == 1
    assert claims == 1 and env.server.counters.creates == 40


def test_progress_shows_a_hold_on_the_servers_word_apart() -> None:
    line = plain_line(Tally(total=10, started=0.0), Live(in_flight=0, held=3600, retrying=5),
                      2.0)
    assert ("0 in flight, 5 waiting to retry, creates held 1h00m by the server's Retry-After"
            in line)
    assert "waiting" not in plain_line(Tally(total=10, started=0.0), Live(in_flight=5), 2.0)


# -- budgets ---------------------------------------------------------------------------------


def test_a_budget_with_an_unpriced_model_exits_2_naming_it(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a", model="my-model"), request("b")])
    assert run(tmp_path, "--max-cost", "5") == 2
    err = capsys.readouterr().err
    assert "my-model" in err and "--price" in err and "gpt-5.2" not in err
    assert len(err.strip().splitlines()) == 1 and env.server.counters.creates == 0
    assert run(tmp_path, "--max-cost", "5", "--price", "my-model=1,2") == 0
    capsys.readouterr()
    # Without a budget the run goes on, and its one warning says what a CLI user can pass.
    write_input(tmp_path / "in.jsonl", [request("c", model="other-model")])
    assert run(tmp_path, output=str(tmp_path / "other.jsonl")) == 0
    err = capsys.readouterr().err
    assert "price.unknown" in err and "--price MODEL=INPUT,OUTPUT" in err, err


def test_lines_not_run_for_the_budget_say_budget_exceeded(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.server.usage = UsageModel(input_tokens=10, output_tokens=100_000, reasoning_tokens=0)
    write_input(tmp_path / "in.jsonl",
                [request(f"r{i}", model="m", max_output_tokens=100_000) for i in range(6)])
    assert run(tmp_path, "--max-cost", "0.25", "--price", "m=1,1", "--concurrency", "1") == 1
    err = capsys.readouterr().err
    named = [x for x in err.splitlines() if x.startswith(f"{tmp_path / 'in.jsonl'}:")]
    assert named and all("budget_exceeded" in x for x in named), err
    assert "$0.25" in named[0]
    assert "not finished" not in err


# -- inputs ----------------------------------------------------------------------------------


def test_a_bom_is_accepted(env: HttpFake, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(
        b"\xef\xbb\xbf" + (request("a") + "\n" + request("b") + "\n").encode())
    assert run(tmp_path) == 0
    assert sorted(lines_of(tmp_path / "out.jsonl")) == ["a", "b"]


def test_non_utf8_input_names_its_line(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl").write_bytes(
        (request("a") + "\n").encode() + request("b").encode().replace(b"q b", b"q \xe9") + b"\n")
    assert run(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'in.jsonl'}:2: not UTF-8" in err and "Traceback" not in err
    assert env.server.counters.creates == 0


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_an_empty_input_exits_2(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    (tmp_path / "in.jsonl").write_text(text)
    assert run(tmp_path) == 2
    assert f"no requests in {tmp_path / 'in.jsonl'}" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.journal").exists()


def test_background_false_is_refused_for_that_line(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a"), request("fg", background=False)])
    assert run(tmp_path) == 1
    err = capsys.readouterr().err
    assert "in.jsonl:2: field 'body.background' is false" in err and "background" in err
    assert sorted(lines_of(tmp_path / "out.jsonl")) == ["a"]
    assert env.server.counters.creates == 1


# -- failing fast ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_long_retry_after_is_said_when_it_starts(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(3)])
    http_fake.server.inject("429", route="create", retry_after=3600)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
           "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": http_fake.base_url}
    async with await anyio.open_process(
        [sys.executable, "-m", "asyncbg", "run", str(tmp_path / "in.jsonl"), "-o",
         str(tmp_path / "out.jsonl")], env=env,
    ) as proc:
        assert proc.stderr is not None
        said = ""
        with anyio.fail_after(20):
            async for chunk in proc.stderr:
                said += chunk.decode()
                if "Retry-After" in said:
                    break
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(20):
            await proc.wait()
    assert re.search(r"creates wait (1[01]\d|120)s \(the most asyncbg waits at a time", said), said


def test_a_base_url_that_is_not_a_url_is_a_usage_error(
    env: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    assert run(tmp_path, "--base-url", "notaurl") == 2
    assert "--base-url 'notaurl' is not an http:// or https:// URL" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_BASE_URL", "ftp://example.com")
    assert run(tmp_path) == 2
    assert "OPENAI_BASE_URL" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.journal").exists()


def test_a_journal_that_fails_says_what_became_of_what_was_sent() -> None:
    from asyncbg._cli._run import _Run

    this = _Run.__new__(_Run)
    this.requests = 0
    assert _Run._ledger_failure(this, LedgerError("j.db: bad row")).endswith("nothing was sent")
    exc = LedgerError("j.db: disk full")
    exc.unrecorded = [("k1", "resp_1"), ("k2", "resp_2")]  # type: ignore[attr-defined]
    this.requests = 5
    said = _Run._ledger_failure(this, exc)
    assert "k1 (resp_1), k2 (resp_2)" in said and "left running on the server" in said


def test_a_corrupt_journal_before_anything_was_sent_says_so(
    env: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])

    async def records(self: SQLiteLedger) -> Any:
        raise LedgerError(f"{self.location} is corrupt (malformed row); restore it")

    monkeypatch.setattr(SQLiteLedger, "records", records)
    assert run(tmp_path) == 2
    err = capsys.readouterr().err
    assert "is corrupt" in err and "nothing was sent" in err
    assert "leaving" not in err and "Traceback" not in err
    assert env.server.counters.creates == 0


# -- every command ---------------------------------------------------------------------------


def test_version_and_option_errors_in_the_users_words(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncbg import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"asyncbg {__version__}\n"
    for argv in (["run", "in", "-o", "out", "--concurrency", "x"],
                 ["run", "in", "-o", "out", "--deadline", "soon"],
                 ["run", "in", "-o", "out", "--price", "gpt"],
                 ["demo", "--jobs", "many"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert "must be" in err and "invalid" not in err and "_" not in err.split(":")[-1], err


def test_a_closed_pipe_ends_a_command_quietly(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"

    async def make() -> None:  # an empty journal: status has a few lines to say about it
        ledger = SQLiteLedger(journal)
        await ledger.open()
        await ledger.close()

    anyio.run(make)
    with subprocess.Popen(
        [sys.executable, "-m", "asyncbg", "status", "--ledger", str(journal)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader went away before a byte was read
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=30) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.asyncio
async def test_a_reader_that_goes_away_from_dash_loses_nothing(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(3)])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
           "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": http_fake.base_url}
    journal = str(tmp_path / "j.db")
    argv = [sys.executable, "-m", "asyncbg", "run", str(tmp_path / "in.jsonl"), "--journal",
            journal]
    read, write = os.pipe()
    os.close(read)  # `asyncbg run ... -o - | head -0`: the reader is gone
    try:
        async with await anyio.open_process([*argv, "-o", "-"], env=env, stdout=write) as proc:
            assert proc.stderr is not None
            with anyio.fail_after(30):
                code = await proc.wait()
            err = b"".join([chunk async for chunk in proc.stderr]).decode()
    finally:
        os.close(write)
    assert code == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
    done = await anyio.run_process([*argv, "-o", str(tmp_path / "out.jsonl")], env=env,
                                   check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(lines_of(tmp_path / "out.jsonl")) == ["r0", "r1", "r2"]
    assert http_fake.server.counters.creates == 3  # nothing was paid for twice


def test_the_library_imports_no_sdk_until_it_is_used() -> None:
    code = ("import sys, asyncbg; "
            "assert 'openai' not in sys.modules, 'openai'; asyncbg.BackgroundManager; "
            "assert 'openai' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_stdout_output_writes_only_final_lines_at_the_start() -> None:
    from asyncbg._cli._output import StdoutOutput

    from .test_cli_integrity import record

    buffer = io.StringIO()
    real, sys.stdout = sys.stdout, buffer
    out = StdoutOutput()  # it keeps the stdout of its start: a progress bar swaps sys.stdout
    sys.stdout = io.StringIO()
    try:
        records = {"a": record("a"), "b": record("b", state="local", status="failed",
                                                  error="refused")}
        out.rewrite(records, ["a", "b"])  # the start: b runs again, so it waits
        assert [json.loads(x)["custom_id"] for x in buffer.getvalue().splitlines()] == ["a"]
        out.append_many([record("b")])
        out.rewrite({**records, "b": record("b")}, ["a", "b"])  # the end: nothing new
    finally:
        sys.stdout = real
    assert [json.loads(x)["custom_id"] for x in buffer.getvalue().splitlines()] == ["a", "b"]


def test_metrics_port_in_use_exits_2_before_anything_is_sent(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl").write_text(request("a") + "\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert run(tmp_path, "--metrics-port", str(port)) == 2
    err = capsys.readouterr().err
    assert f"--metrics-port {port}" in err and "Traceback" not in err
    assert env.server.counters.creates == 0


def test_a_run_serves_its_metrics_while_it_works(env: HttpFake, tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env.server.latency = LatencyModel.fixed(1.5)
    env.hold()  # the responses stay live until the metrics have been read
    (tmp_path / "in.jsonl").write_text("".join(request(f"r{i}") + "\n" for i in range(3)))
    env_vars = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", "run", str(tmp_path / "in.jsonl"),
                             "-o", str(tmp_path / "out.jsonl"), "--metrics-port", str(port)],
                            env=env_vars, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with proc:
        text = scrape(proc, port, then=env.release)
    assert proc.returncode == 0
    assert "asyncbg" in text or "gen_ai" in text, text[:500]


def scrape(proc: subprocess.Popen[bytes], port: int,
           then: Callable[[], None] = lambda: None) -> str:
    """GET /metrics of a running command, once it serves; ``then()``; wait for it to end."""
    import urllib.request

    try:
        text = ""
        deadline = time.monotonic() + 120  # until the run serves (a second or two, unloaded)
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    text = r.read().decode()
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
        then()
        proc.wait(timeout=120)
        return text
    finally:
        if proc.poll() is None:
            proc.kill()


def test_help_imports_no_sdk_and_no_engine() -> None:
    """``asyncbg --help`` (every command's parser) loads neither the SDKs nor the engine: what
    made it take seconds."""
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom asyncbg._cli import build_parser\nbuild_parser().format_help()\n"
         "heavy = [m for m in ('openai', 'anthropic', 'google.genai', 'asyncbg._manager', "
         "'asyncbg._engine._scheduler', 'starlette', 'opentelemetry') if m in sys.modules]\n"
         "print(heavy)"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_rerun_with_nothing_to_do_loads_no_sdk_and_needs_no_key(
    env: HttpFake, tmp_path: Path
) -> None:
    """The no-op rerun of a big file was seconds of importing the SDK and building a manager it
    never used: now it counts the journal's lines and rewrites the output, nothing more."""
    env.server.latency = LatencyModel.fixed(0.01)
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(12)])
    assert run(tmp_path, "--concurrency", "4") == 0
    before = (tmp_path / "out.jsonl").read_bytes()
    argv = ["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]
    script = (
        f"import sys\nfrom asyncbg._cli import main\nrc = main({argv!r})\n"
        "heavy = [m for m in ('openai', 'asyncbg._manager') if m in sys.modules]\n"
        "sys.stderr.write(f'RESULT {rc} {heavy}\\n')\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=clean)
    assert "RESULT 0 []" in done.stderr, done.stderr
    assert "completed 12" in done.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == before
    assert env.server.counters.creates == 12
    # One line changed: now there is something to do, and without a key the run says so.
    write_input(tmp_path / "in.jsonl", [request("r0", input="changed"),
                                        *(request(f"r{i}") for i in range(1, 12))])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=clean)
    assert "RESULT 2" in done.stderr and "OPENAI_API_KEY" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == before  # the output stands as it was


def test_an_interrupt_counts_one_line_in_the_singular(tmp_path: Path) -> None:
    from asyncbg._cli._report import interrupt_message

    said = interrupt_message({"a": 1}, {}, signal_name="SIGINT", journal=tmp_path / "j")
    assert "0 of 1 lines finished" in said[0] and "; 1 line not sent" in said[0], said
