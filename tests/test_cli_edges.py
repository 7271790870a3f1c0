"""The command line when what it writes or reads at the edges misbehaves: a disk that fills up
under the output, an output path that is one of the journal's own files, malformed input, a
Ctrl-C while it starts, a server that goes away, a stdout that cannot be written."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from asyncbg._cli import main
from asyncbg._cli._output import OutputFile, companion_of

from .conftest import HttpFake
from .io_faults import STALL_ENV, command, disk_limit
from .test_batch_cli import request, write_input
from .test_cli_integrity import env_for, record, undo_cli_logging


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


def creates_by_line(fake: HttpFake) -> collections.Counter[str]:
    """How many responses the fake created for each input line (its input is ``q KEY``)."""
    return collections.Counter(r.input_text.removeprefix("q ")
                               for r in fake.server._responses.values())


def whole_lines(path: Path) -> list[str]:
    """The custom_ids of a file that must hold whole JSON lines only (fails otherwise)."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"a line cut short: {data[-80:]!r}"
    return [json.loads(line)["custom_id"] for line in data.splitlines()]


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
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(12)])
    journal = tmp_path / "j.db"
    assert main(["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                 "--journal", str(journal)]) == 0
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


@pytest.mark.parametrize("suffix", COMPANIONS)
def test_results_refuse_an_output_that_is_a_file_of_the_ledger(
    env: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    journal = tmp_path / "j.db"
    assert main(["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                 "--journal", str(journal)]) == 0
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
