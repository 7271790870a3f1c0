"""The command line when what it writes or reads at the edges misbehaves: a disk that fills up
under the output, an output path that is one of the journal's own files, malformed input, a
Ctrl-C while it starts, a server that goes away, a stdout that cannot be written."""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from asyncbg._cli import main
from asyncbg._cli._output import OutputFile, companion_of

from . import test_cli_run2
from .conftest import HttpFake
from .io_faults import STALL_ENV, command, disk_limit
from .test_batch_cli import request, write_input
from .test_cli_integrity import env_for, record, undo_cli_logging

#: An API key and the fake's URL in the environment; the CLI's logging undone after.
env = test_cli_run2.env


def creates_by_line(fake: HttpFake) -> collections.Counter[str]:
    """How many responses the fake created for each input line (its input is ``q KEY``)."""
    return collections.Counter(r.input_text.removeprefix("q ")
                               for r in fake.server._responses.values())


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def whole_lines(path: Path) -> list[str]:
    """The custom_ids of a file that must hold whole JSON lines only (fails otherwise)."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"a line cut short: {data[-80:]!r}"
    return [json.loads(line)["custom_id"] for line in data.splitlines()]


def finished_journal(tmp_path: Path, keys: list[str]) -> Path:
    """A journal (``tmp_path/j.db``) where ``keys`` ran to completion (output ``out.jsonl``)."""
    write_input(tmp_path / "in.jsonl", [request(k) for k in keys])
    journal = tmp_path / "j.db"
    assert main(["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                 "--journal", str(journal)]) == 0
    return journal


# -- a full disk under the output ----------------------------------------------------------


def test_a_full_disk_under_the_output_exits_2_with_whole_lines_and_a_rerun_completes_it(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 30
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(n)])
    disk = tmp_path / "disk"
    disk.mkdir()
    out, journal = disk / "out.jsonl", tmp_path / "j.db"
    argv = ["run", str(tmp_path / "in.jsonl"), "-o", str(out), "--journal", str(journal),
            "--concurrency", "2"]  # lines end a few at a time
    with disk_limit(disk, 8000):  # a few lines fit: the one that fills it is cut back
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    held = whole_lines(out)
    assert 0 < len(held) < n, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"asyncbg: cannot write {out}: No space left on device; it holds "
                           f"{len(held)} of its {n} lines"), last
    assert str(journal) in last and "run the same command again" in last
    assert creates_by_line(env) == {f"r{i}": 1 for i in range(n)}  # every line ran once

    undo_cli_logging()
    assert main(argv) == 0  # space freed: the rerun completes the output from the journal
    assert sorted(whole_lines(out)) == sorted(f"r{i}" for i in range(n))
    assert creates_by_line(env) == {f"r{i}": 1 for i in range(n)}  # nothing created again


def test_results_on_a_full_disk_leave_the_old_file_and_say_so(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = finished_journal(tmp_path, [f"r{i}" for i in range(12)])
    disk = tmp_path / "disk"
    disk.mkdir()
    old = disk / "res.jsonl"
    old.write_bytes((tmp_path / "out.jsonl").read_bytes().split(b"\n", 2)[0] + b"\n")
    capsys.readouterr()
    undo_cli_logging()
    with disk_limit(disk, old.stat().st_size + 3000):
        code = main(["results", "--ledger", str(journal), "-o", str(old)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"asyncbg: cannot write {old}: No space left on device; it is as "
                             "it was (1 line)"), err
    assert whole_lines(old) == ["r0"]
    assert [p.name for p in disk.iterdir()] == ["res.jsonl"]  # no temporary file left


def test_an_append_cut_short_is_cut_back_to_whole_lines(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    out = OutputFile(disk / "out.jsonl")
    out.rewrite({"a": record("a")}, ["a"])
    size = (disk / "out.jsonl").stat().st_size
    with disk_limit(disk, size + 100), pytest.raises(OSError, match="No space left"):
        out.append_many([record("b"), record("c")])  # 100 bytes of them, then the disk is full
    assert whole_lines(disk / "out.jsonl") == ["a"] and out.lines == 1
    assert out.append_many([record("b")]) == 1  # not taken for written: written once it fits
    out.close()
    assert whole_lines(disk / "out.jsonl") == ["a", "b"] and out.lines == 2


@pytest.mark.asyncio
async def test_the_collector_frees_its_slots_only_once_the_lines_are_written(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    """While the output cannot be written, at most the window (4 x concurrency, at least 64)
    is submitted and not written: results do not pile up behind a stalled write."""
    n = 100
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(n)])
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out.jsonl"
    argv = command("run", str(tmp_path / "in.jsonl"), "-o", str(out), "--journal",
                   str(tmp_path / "j.db"), "--concurrency", "16")
    env = {**env_for(http_fake), STALL_ENV: str(disk)}
    async with await anyio.open_process(argv, env=env, cwd=tmp_path) as proc:
        try:
            with anyio.fail_after(60):
                while not (disk / ".stalled").exists() or http_fake.server.counters.creates < 64:
                    assert proc.returncode is None
                    await anyio.sleep(0.02)
            await anyio.sleep(1.0)  # time to go past the window, if it could
            creates = http_fake.server.counters.creates
        finally:
            (disk / ".go").touch()
        with anyio.fail_after(60):
            code = await proc.wait()
    assert creates == 64
    assert code == 0
    assert sorted(whole_lines(out)) == sorted(f"r{i}" for i in range(n))


# -- the journal's own files are never an output -------------------------------------------


COMPANIONS = ["", "-wal", "-shm", "-journal", ".lock", ".unrecorded"]


@pytest.mark.parametrize("suffix", COMPANIONS)
def test_run_refuses_an_output_that_is_a_file_of_the_journal(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    journal = tmp_path / "j.db"
    link = tmp_path / "link.db"
    link.symlink_to(journal)  # the lock and the kept ids are beside the real file
    target = tmp_path / f"j.db{suffix}"
    if suffix:
        target.write_bytes(b"")
    for given in (journal, link):
        code = main(["run", str(tmp_path / "in.jsonl"), "-o", str(target), "--journal",
                     str(given)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert "nothing was sent" in err[0] and "journal" in err[0], err
    assert target.read_bytes() == b"" if suffix else not target.exists()
    assert env.server.counters.creates == 0


@pytest.mark.parametrize("option", ["--journal", "-o"])
def test_run_refuses_a_database_url_for_a_file_in_one_line_without_its_password(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It was taken as a path: "postgresql:/u:pw@host does not exist", password and all."""
    write_input(tmp_path / "in.jsonl", [request("a")])
    url = "postgresql://u:secretpw@127.0.0.1:5432/db"
    argv = ["run", str(tmp_path / "in.jsonl")]
    argv += ["-o", str(tmp_path / "out.jsonl"), "--journal", url] if option == "--journal" \
        else ["-o", url, "--journal", str(tmp_path / "j.db")]
    monkeypatch.chdir(tmp_path)  # a relative path made of the URL would be made here
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"asyncbg: {option} takes a file path, not a database URL: a run keeps its "
                   "journal in an SQLite file (a fleet on PostgreSQL: `asyncbg submit FILE "
                   "--ledger URL`, then `asyncbg worker --ledger URL`); nothing was sent"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert env.server.counters.creates == 0


@pytest.mark.parametrize("suffix", COMPANIONS)
def test_results_refuse_an_output_that_is_a_file_of_the_ledger(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    journal = finished_journal(tmp_path, ["a"])
    target = tmp_path / f"j.db{suffix}"
    before = target.read_bytes() if target.exists() else None
    capsys.readouterr()
    assert main(["results", "--ledger", str(journal), "-o", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the ledger" in err[0] and "nothing was written" in err[0], err
    assert (target.read_bytes() if target.exists() else None) == before


def test_companion_of_names_what_a_path_is() -> None:
    j = Path("/x/j.db")
    assert companion_of(Path("/x/j.db"), j) == "the journal itself"
    assert companion_of(Path("/x/./j.db-wal"), j) == "the journal's write-ahead log"
    assert companion_of(Path("/x/j.db.unrecorded"), j) is not None
    assert companion_of(Path("/x/j.db.journal"), j) is None
    assert companion_of(Path("/x/out.jsonl"), j) is None


# -- worker --create -----------------------------------------------------------------------


def test_worker_create_makes_no_directories(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    for ledger, what in ((tmp_path / "no" / "such" / "l.db", "does not exist"),
                         (tmp_path / "file" / "l.db", "is not a directory")):
        code = main(["worker", "--create", "--ledger", str(ledger), "--exit-when-idle"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"cannot create the ledger {ledger}: {ledger.parent} {what}" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert env.server.counters.creates == 0


def test_submit_makes_no_directories(tmp_path: Path) -> None:
    """A mistyped --ledger is refused, as by ``worker --create``: no directory, no ledger."""
    write_input(tmp_path / "in.jsonl", [request("a")])
    (tmp_path / "file").write_text("")
    for ledger, what in ((tmp_path / "no" / "such" / "l.db", "does not exist"),
                         (tmp_path / "file" / "l.db", "is not a directory")):
        done = subprocess.run([sys.executable, "-m", "asyncbg", "submit", "--ledger",
                               str(ledger), str(tmp_path / "in.jsonl")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and not done.stdout, done
        assert done.stderr.splitlines() == [
            f"asyncbg: cannot create the ledger {ledger}: {ledger.parent} {what} (submit makes "
            "the ledger's file, not directories); nothing was enqueued"], done.stderr
    assert names(tmp_path) == ["file", "in.jsonl"]


def test_demo_makes_no_directories_for_its_journal(tmp_path: Path) -> None:
    """``demo --journal`` with a mistyped directory: one line, exit 2, nothing created (the
    library's SQLiteLedger would have made the directories)."""
    (tmp_path / "file").write_text("")
    for journal, what in ((tmp_path / "no" / "such" / "j.db", "does not exist"),
                          (tmp_path / "file" / "j.db", "is not a directory")):
        done = subprocess.run([sys.executable, "-m", "asyncbg", "demo", "--jobs", "2",
                               "--journal", str(journal)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and not done.stdout, done
        assert done.stderr.splitlines() == [
            f"asyncbg: cannot create the journal {journal}: {journal.parent} {what} (demo "
            "makes files, not directories); nothing was sent"], done.stderr
    assert names(tmp_path) == ["file"]

def test_run_makes_no_directories_for_its_journal_or_output(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    (tmp_path / "file").write_text("")
    missing = tmp_path / "no" / "such"
    for journal, output, named in (
            (missing / "j.db", tmp_path / "out.jsonl", f"the journal {missing / 'j.db'}"),
            (tmp_path / "j.db", missing / "out.jsonl", str(missing / "out.jsonl")),
            (None, missing / "out.jsonl", f"the journal {missing / 'out.jsonl.journal'}"),
            (tmp_path / "file" / "j.db", tmp_path / "out.jsonl",
             f"the journal {tmp_path / 'file' / 'j.db'}")):
        argv = ["run", str(tmp_path / "in.jsonl"), "-o", str(output)]
        argv += ["--journal", str(journal)] if journal is not None else []
        done = subprocess.run([sys.executable, "-m", "asyncbg", *argv], capture_output=True,
                              text=True, timeout=60, env=env_for(http_fake))
        path = Path(named.removeprefix("the journal "))
        what = "is not a directory" if path.parent.exists() else "does not exist"
        assert done.returncode == 2, done
        assert done.stderr.splitlines() == [
            f"asyncbg: cannot create {named}: {path.parent} {what} (run makes files, not "
            "directories); nothing was sent"], done.stderr
    assert names(tmp_path) == ["file", "in.jsonl"]
    assert http_fake.server.counters.creates == 0


# -- malformed input -----------------------------------------------------------------------


@pytest.mark.parametrize(("data", "said"), [
    (b"/home/me/data/requests.jsonl", "in.jsonl:1: not valid JSON (Expecting value: line 1 "
                                      "column 1 (char 0)): '/home/me/data/requests.jsonl'"),
    (b"", "no requests in"),
    (b"\n  \r\n\n", "no requests in"),
    (b"\x00" * 300, "in.jsonl:1: not valid JSON"),
    (b"\x7fELF\x02\x01\x01\xff\xfe\x00", "in.jsonl:1: not UTF-8 text (byte 0xff at column 8)"),
    (b"\xff\xfe{\x00}\x00", "in.jsonl:1: not UTF-8 text (byte 0xff at column 1)"),  # UTF-16
])
def test_an_input_with_nothing_that_can_run_is_a_usage_error(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, said: str
) -> None:
    (tmp_path / "in.jsonl").write_bytes(data)
    out = tmp_path / "out.jsonl"
    assert main(["run", str(tmp_path / "in.jsonl"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith("nothing was sent"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no journal, no output
    undo_cli_logging()
    assert main(["submit", str(tmp_path / "in.jsonl"), "--ledger", str(tmp_path / "l.db")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].endswith("nothing was enqueued") or lines[-1].endswith("was enqueued"), err
    assert said.replace("in.jsonl:1: ", "") in err and "Traceback" not in err, err
    assert not (tmp_path / "l.db").exists()


def test_many_bad_lines_are_named_up_to_ten(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in.jsonl").write_bytes(b"\x00\n" * 25)
    assert main(["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 11 and err[9].startswith(f"asyncbg: {tmp_path / 'in.jsonl'}:10: "), err
    assert err[-1].startswith("asyncbg: ... and 15 more bad lines; no requests in"), err


def test_a_bom_and_crlf_line_ends_run(env: HttpFake, tmp_path: Path) -> None:
    lines = [request("a"), request("b")]
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(x + "\r\n" for x in lines)
                                        .encode())
    assert main(["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 0
    assert sorted(whole_lines(tmp_path / "out.jsonl")) == ["a", "b"]


def test_a_fifo_input_to_run_or_estimate_is_refused_unopened(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They read their input twice (checked, then sent): a FIFO would be read once, then wait
    for ever. It is refused without being opened (an open would wait for a writer)."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    for argv in (["run", str(fifo), "-o", str(tmp_path / "out.jsonl")], ["estimate", str(fifo)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{fifo} is a FIFO (named pipe)" in err[0], err
        undo_cli_logging()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# -- Ctrl-C while starting -----------------------------------------------------------------


async def reader_waiting(fifo: Path, proc: anyio.abc.Process) -> int:
    """Open ``fifo`` for writing once the command has it open for reading (it then waits for
    the first line): the write end, which the caller closes."""
    with anyio.fail_after(60):
        while True:
            assert proc.returncode is None
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:  # ENXIO: no reader yet
                await anyio.sleep(0.02)
        # Until it waits inside read(): a signal that lands just before the call starts would
        # be seen only once the call returns (so in any program; a second Ctrl-C ends it).
        while "pipe" not in await blocked_in(proc.pid):
            assert proc.returncode is None
            await anyio.sleep(0.02)
    return fd


async def blocked_in(pid: int) -> str:
    """Where in the kernel a process waits (Linux); "pipe" where that cannot be known."""
    try:
        wchan = await anyio.Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "pipe"
    return "" if "partner" in wchan else wchan  # wait_for_partner: still opening


@pytest.mark.parametrize("command", ["submit", "escalate-file"])
@pytest.mark.asyncio
async def test_ctrl_c_while_reading_the_input_exits_130_quietly(
    http_fake: HttpFake, tmp_path: Path, command: str
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    write_input(tmp_path / "in.jsonl", [request("a")])
    argv = (["submit", str(fifo), "--ledger", str(tmp_path / "l.db")] if command == "submit"
            else ["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                  "--escalate-file", str(fifo)])
    env = {**env_for(http_fake), "PYTHONFAULTHANDLER": "1"}  # SIGABRT shows where it hangs
    async with await anyio.open_process([sys.executable, "-m", "asyncbg", *argv],
                                        env=env, cwd=tmp_path) as proc:
        fd = await reader_waiting(fifo, proc)
        try:
            proc.send_signal(signal.SIGINT)
            with anyio.move_on_after(30):
                await proc.wait()
        finally:
            os.close(fd)
            if proc.returncode is None:
                proc.send_signal(signal.SIGABRT)
        code = await proc.wait()
        assert proc.stderr is not None
        err = b"".join([chunk async for chunk in proc.stderr]).decode()
    assert code == 130, err
    assert not err, err  # quiet: no traceback, nothing to say
    assert names(tmp_path) == ["fifo", "in.jsonl"]  # no journal, no ledger, no output
    assert http_fake.server.counters.creates == 0


# -- a server that goes away ---------------------------------------------------------------


def test_what_the_end_says_when_the_server_went_away() -> None:
    from asyncbg._cli._report import connection_failure, interrupt_message, unreached_message

    lines = {f"r{i}": i + 1 for i in range(20)}
    records = {f"r{i}": record(f"r{i}") for i in range(16)}
    records |= {f"r{i}": record(f"r{i}", state="local", status="failed",
                                error="cannot connect to http://x/v1: refused",
                                error_code="connection_error") for i in (16, 17)}
    records["r18"] = record("r18", state="live", status="in_progress")
    said = unreached_message(lines, records)
    assert said is not None and said.startswith(
        "2 lines could not reach the server: the output has 16 of its 20 lines; run the same "
        "command again once the server answers to complete it"), said
    assert unreached_message(lines, {k: records[k] for k in list(records)[:16]}) is None
    first = interrupt_message(lines, records, signal_name="SIGINT", journal=Path("j.db"),
                              output=Path("out.jsonl"))[0]
    assert first.endswith("; the output has 16 of its 20 lines"), first
    assert "output" not in interrupt_message(lines, records, signal_name="SIGINT",
                                             journal=Path("j.db"))[0]
    # every create failed once the server had gone: not "nothing was sent", nor a garbled URL
    gone = connection_failure(4, 4, "create failed after 8 attempts; last error (reset)")
    assert gone is not None and "nothing was sent" not in gone and "cannot connect to" not in gone
    assert connection_failure(4, 4, "cannot connect to http://x/v1: refused") == (
        "cannot connect to http://x/v1 (refused); nothing was sent")


# -- status: a stdout that cannot be written, a journal it must not write ------------------


def test_status_writes_nothing_to_the_journal_and_says_when_stdout_fails(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = finished_journal(tmp_path, [f"r{i}" for i in range(3)])
    before = journal.read_bytes()
    status = [sys.executable, "-m", "asyncbg", "status", "--ledger", str(journal)]
    done = subprocess.run([*status, "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["by_status"] == {"completed": 3}
    assert journal.read_bytes() == before  # read-only: no schema mark, no upgrade
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            done = subprocess.run([*status, "--json"], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            "asyncbg: cannot write to stdout: No space left on device"]
    done = subprocess.run(status, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=60, preexec_fn=lambda: os.close(1))  # closed before exec
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["asyncbg: cannot write to stdout: stdout is closed"]


def stdout_that(fails: str) -> int:
    """A descriptor for a command's stdout that cannot be written: ``/dev/full`` (a disk that
    is full) or the write end of a pipe whose reader went away (``| head -c0``)."""
    if fails == "full":
        return os.open("/dev/full", os.O_WRONLY)
    read, write = os.pipe()
    os.close(read)
    return write


STDOUT_COMMANDS = [
    ["submit", "in.jsonl", "--ledger", "new.db"],
    ["status", "--ledger", "j.db"],
    ["status", "--ledger", "j.db", "--json"],
    ["results", "--ledger", "j.db", "-o", "-"],
    ["retry", "--ledger", "l.db"],
    ["estimate", "in.jsonl"],
    ["cancel", "--ledger", "j.db"],
    ["run", "in.jsonl", "-o", "out.jsonl", "--journal", "j.db", "--dry-run"],
    ["demo", "--jobs", "3", "--median", "0.01"],
    ["--version"],
    ["--help"],
    ["results", "--help"],
]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("fails", ["full", "closed pipe"])
def test_every_command_says_one_line_on_a_full_stdout_and_nothing_on_a_closed_pipe(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str], fails: str
) -> None:
    """A full stdout: one line, exit 2, what the command did stays done (``submit``'s lines
    are in the ledger). A reader that went away: nothing said, exit 141, the same."""
    finished_journal(tmp_path, ["a", "b"])
    assert main(["submit", str(tmp_path / "in.jsonl"), "--ledger", str(tmp_path / "l.db")]) == 0
    for argv in STDOUT_COMMANDS:
        fd = stdout_that(fails)
        try:
            done = subprocess.run([sys.executable, "-m", "asyncbg", *argv], stdout=fd,
                                  stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path,
                                  env=env_for(env))
        finally:
            os.close(fd)
        said = [line for line in done.stderr.strip().splitlines()
                if not line.startswith("asyncbg demo: ")]  # what the demo is: not an error
        if fails == "full":
            assert (done.returncode, said) == (
                2, ["asyncbg: cannot write to stdout: No space left on device"]), (argv, done)
        else:
            assert (done.returncode, said) == (141, []), (argv, done)
    capsys.readouterr()
    assert main(["status", "--ledger", str(tmp_path / "new.db"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_status"] == {"pending": 2}  # submitted



def test_status_leaves_no_wal_files_beside_a_journal_and_does_not_disturb_a_writer(
    env: HttpFake, tmp_path: Path
) -> None:
    """A fleet's journal is in WAL mode: a read-only connection makes its -wal and -shm and
    cannot remove them. With nobody else on the journal, status leaves it as it found it;
    with a writer there, it reads beside it (and the files are the writer's)."""
    write_input(tmp_path / "in.jsonl", [request("a"), request("b")])
    ledger = tmp_path / "l.db"
    assert main(["submit", str(tmp_path / "in.jsonl"), "--ledger", str(ledger)]) == 0
    status = [sys.executable, "-m", "asyncbg", "status", "--ledger", str(ledger), "--json"]
    with sqlite3.connect(ledger) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    assert names(tmp_path) == ["in.jsonl", "l.db"]
    before = ledger.read_bytes()
    done = subprocess.run(status, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["total"] == 2, done
    assert names(tmp_path) == ["in.jsonl", "l.db"]  # no -wal, no -shm left behind
    assert ledger.read_bytes() == before

    writer = sqlite3.connect(ledger, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # a writer in the middle of its transaction
        writer.execute("UPDATE jobs SET status = status")
        done = subprocess.run(status, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and json.loads(done.stdout)["total"] == 2, done
        writer.execute("COMMIT")  # undisturbed
    finally:
        writer.close()
