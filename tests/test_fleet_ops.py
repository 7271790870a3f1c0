"""The fleet's operator commands, in-process, on an SQLite ledger (and PostgreSQL for retry):
``results -o`` writes only a regular file and never the ledger, a worker does not create a
mistyped ledger, ``retry`` re-queues what ended unpaid (never a paid response), and ``status``
speaks to a fleet operator.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from asyncbg import Outcome
from asyncbg._cli import main
from asyncbg._fleet import shared_ledger

#: custom_id -> what becomes of it. "local+id": live, then ended without the server's answer
#: (it has a response id: paid for, never re-queued).
FATES = {
    "q0": "completed", "q1": "invalid_api_key", "q2": "request_failed", "q3": "failed",
    "q4": "live", "q5": "local+id", "q6": "waiting",
}


def fleet_ledger(tmp: Path, spec: str) -> None:
    """A ledger ``asyncbg submit`` made, and a worker's outcomes recorded by hand."""
    source = tmp / "in.jsonl"
    source.write_text("".join(json.dumps({
        "custom_id": key, "method": "POST", "url": "/v1/responses",
        "body": {"model": "gpt-4o-mini", "input": key}}) + "\n" for key in FATES))
    assert main(["submit", str(source), "--ledger", spec]) == 0

    async def work() -> None:
        ledger = shared_ledger(spec)
        await ledger.open()
        try:
            taken = await ledger.acquire(len(FATES) - 1, 60.0)  # oldest first: not q6
            for record in taken:
                key, fate = record.key, FATES[record.key]
                await ledger.sending(key, resubmit=False)
                if fate in ("invalid_api_key", "request_failed"):
                    await ledger.record(key, Outcome("failed", error="refused", error_code=fate,
                                                     http_status=401))
                    continue
                await ledger.record(key, Outcome("queued", response_id=f"resp_{key}"))
                if fate in ("completed", "failed"):
                    body = json.dumps({"id": f"resp_{key}", "status": fate}).encode()
                    await ledger.record(key, Outcome(fate, response_id=f"resp_{key}", body=body))
                elif fate == "local+id":
                    await ledger.record(key, Outcome("failed", error="lost",
                                                     error_code="response_lost"))
        finally:
            await ledger.close()

    anyio.run(work)


def states(spec: str | Path) -> dict[str, tuple[str, str | None]]:
    async def read() -> dict[str, tuple[str, str | None]]:
        ledger = shared_ledger(spec)
        await ledger.open()
        try:
            return {r.key: (r.state, r.response_id) for r in await ledger.records()}
        finally:
            await ledger.close()

    return anyio.run(read)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    fleet_ledger(tmp_path, str(tmp_path / "fleet.db"))
    return tmp_path / "fleet.db"


def test_the_ledger_is_as_the_tests_below_expect(db: Path) -> None:
    assert states(db) == {
        "q0": ("done", "resp_q0"), "q1": ("local", None), "q2": ("local", None),
        "q3": ("done", "resp_q3"), "q4": ("live", "resp_q4"), "q5": ("local", "resp_q5"),
        "q6": ("new", None),
    }


# -- results -o ----------------------------------------------------------------------------------


def test_results_onto_the_ledger_itself_is_refused_and_changes_nothing(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = db.read_bytes()
    for target in (db, db.parent / "." / db.name, db.with_name(db.name + "-wal")):
        assert main(["results", "--ledger", str(db), "-o", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is the ledger" in err[0], err
    assert db.read_bytes() == before
    assert states(db)["q0"] == ("done", "resp_q0")


def test_results_onto_a_file_that_is_not_regular_is_refused(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    for target, kind in ((fifo, "a FIFO"), (tmp_path / "dir", "a directory"),
                         (Path(os.devnull), "a device")):
        assert main(["results", "--ledger", str(db), "-o", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is {kind}" in err[0], err
    assert fifo.is_fifo() and (tmp_path / "dir").is_dir() and not any((tmp_path / "dir").iterdir())


def test_results_replace_a_regular_file_through_a_link_or_go_to_stdout(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert main(["results", "--ledger", str(db), "-o", str(link)]) == 0
    assert link.is_symlink() and (target.stat().st_mode & 0o777) == 0o640
    written = [json.loads(line)["custom_id"] for line in target.read_text().splitlines()]
    assert written == ["q0", "q1", "q2", "q3", "q5"]  # the finished ones, in submission order
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp
    capsys.readouterr()
    assert main(["results", "--ledger", str(db), "-o", "-"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["custom_id"] for line in out] == written


def test_results_read_the_ledger_a_page_at_a_time(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger of a million jobs does not fit in memory: ``results`` streams it in pages, in
    submission order, to a file or to stdout, and never reads every record at once."""
    import asyncbg._cli._fleet
    from asyncbg._ledgers import SQLiteLedger

    async def everything(self: SQLiteLedger) -> None:
        raise AssertionError("results read every record at once")

    monkeypatch.setattr(SQLiteLedger, "records", everything)
    monkeypatch.setattr(asyncbg._cli._fleet, "_PAGE", 2)
    out = tmp_path / "out.jsonl"
    assert main(["results", "--ledger", str(db), "-o", str(out)]) == 0
    assert "wrote 5 lines" in capsys.readouterr().err
    written = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    assert written == ["q0", "q1", "q2", "q3", "q5"]
    assert main(["results", "--ledger", str(db), "-o", "-"]) == 0
    assert [json.loads(line)["custom_id"] for line in capsys.readouterr().out.splitlines()] \
        == written


# -- a worker on a mistyped path -----------------------------------------------------------------


def test_a_worker_on_a_missing_sqlite_ledger_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    typo = tmp_path / "typo" / "fleet.db"
    assert main(["worker", "--ledger", str(typo), "--exit-when-idle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no ledger at {typo}" in err[0] and "--create" in err[0]
    assert not (tmp_path / "typo").exists()
    # --create says it is meant: an empty ledger is made (in a directory that exists: it makes
    # none, see test_cli_edges.py), and an idle worker exits at once
    (tmp_path / "typo").mkdir()
    assert main(["worker", "--ledger", str(typo), "--create", "--exit-when-idle"]) == 0
    assert typo.is_file()


# -- retry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_retry_requeues_lines_that_ended_unpaid_and_never_a_paid_one(
    store: str, tmp_path: Path, request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "fleet.db") if store == "sqlite" else request.getfixturevalue("pg_dsn")
    fleet_ledger(tmp_path, db)
    capsys.readouterr()
    before = states(db)
    assert main(["retry", "--ledger", db, "--code", "invalid_api_key"]) == 0
    assert capsys.readouterr().out.strip() == (
        "re-queued 1 lines that ended without a response with error code invalid_api_key")
    assert states(db) == {**before, "q1": ("new", None)}
    assert main(["retry", "--ledger", db]) == 0
    assert capsys.readouterr().out.strip() == "re-queued 1 lines that ended without a response"
    after = states(db)
    assert after == {**before, "q1": ("new", None), "q2": ("new", None)}
    assert after["q5"] == ("local", "resp_q5")  # it had a response id: paid for, left alone
    assert main(["retry", "--ledger", db]) == 0
    assert capsys.readouterr().out.startswith("re-queued 0 lines")


def test_retry_on_a_missing_ledger_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["retry", "--ledger", str(tmp_path / "none.db")]) == 2
    assert "no ledger at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- status --------------------------------------------------------------------------------------


def test_status_of_a_fleet_ledger_says_what_a_fleet_operator_runs(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--ledger", str(db)]) == 0
    out = capsys.readouterr().out
    assert "asyncbg run" not in out
    assert f"asyncbg worker --ledger {db}" in out
    assert "asyncbg cancel" not in out  # nothing that destroys paid work (issue 22)
    assert "workers alive: 0" in out


def test_results_to_stdout_end_quietly_when_the_reader_goes_away(tmp_path: Path) -> None:
    """``asyncbg results -o - | head -1``: no traceback, no error, exit 0."""
    import subprocess
    import sys

    db = str(tmp_path / "big.db")

    async def fill() -> None:
        ledger = shared_ledger(db)
        await ledger.open()
        try:
            await ledger.enqueue((f"k{i}", f"d{i}", b"{}") for i in range(400))
            for record in await ledger.acquire(400, 60.0):
                rid = f"resp_{record.key}"
                await ledger.sending(record.key, resubmit=False)
                body = json.dumps({"id": rid, "status": "completed", "output_text": "y" * 400})
                await ledger.record(record.key, Outcome("completed", response_id=rid,
                                                        body=body.encode()))
        finally:
            await ledger.close()

    anyio.run(fill)  # about 300 KB of output lines: more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", "results", "--ledger", db,
                             "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0 and err == ""
    assert json.loads(first)["custom_id"] == "k0"


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_status_tells_a_create_in_flight_from_one_whose_sender_is_gone(
    store: str, tmp_path: Path, request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``sending`` row held by a lease that has not run out is a create in flight with a
    running worker, which records its answer; only one whose lease ran out (its worker was
    killed) is sent again by a worker. Status said "sent again" of both."""
    db = str(tmp_path / "fleet.db") if store == "sqlite" else request.getfixturevalue("pg_dsn")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({
        "custom_id": f"s{i}", "method": "POST", "url": "/v1/responses",
        "body": {"model": "gpt-4o-mini", "input": f"s{i}"}}) + "\n" for i in range(3)))
    assert main(["submit", str(source), "--ledger", db]) == 0

    def status() -> tuple[dict[str, Any], str]:
        capsys.readouterr()
        assert main(["status", "--ledger", db, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert main(["status", "--ledger", db]) == 0
        return summary, capsys.readouterr().out

    async def worker() -> None:
        ledger = shared_ledger(db)  # a running worker: its leases held while status reads
        await ledger.open()
        try:
            for record in await ledger.acquire(2, 60.0):
                await ledger.sending(record.key, resubmit=False)
            summary, out = await anyio.to_thread.run_sync(status)
            assert (summary["in_flight"], summary["unconfirmed"]) == (["s0", "s1"], [])
            assert ("2 create(s) in flight with running workers, which record the answers: "
                    "s0, s1") in out
            assert "sends them again" not in out

            # s1's worker is gone (killed): its lease runs out.
            if store == "sqlite":
                with sqlite3.connect(db) as conn:
                    conn.execute("UPDATE jobs SET lease_until = 1 WHERE key = 's1'")
                conn.close()
            else:
                with psycopg.connect(db, autocommit=True) as pg:
                    pg.execute("UPDATE asyncbg_jobs SET lease_until = 1 WHERE key = 's1'")
            summary, out = await anyio.to_thread.run_sync(status)
            assert (summary["in_flight"], summary["unconfirmed"]) == (["s0"], ["s1"])
            assert ("1 create(s) in flight with running workers, which record the answers: "
                    "s0") in out
            assert ("1 create(s) left without an answer recorded (a worker sends them again): "
                    "s1") in out
        finally:
            await ledger.close()

    anyio.run(worker)


def test_submit_names_each_bad_or_repeated_line_as_file_and_line_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    good = {"method": "POST", "url": "/v1/responses", "body": {"model": "m", "input": "x"}}
    source.write_text("\n".join([
        json.dumps({"custom_id": "a", **good}),
        json.dumps({"custom_id": "a", **good}),
        json.dumps({"custom_id": "b", **good, "url": "/v1/chat/completions"}),
    ]) + "\n")
    db = tmp_path / "fleet.db"
    assert main(["submit", str(source), "--ledger", str(db)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"asyncbg: {source}:2: custom_id 'a' is already used on line 1",
        f"asyncbg: {source}:3: field 'url' must be '/v1/responses' (only the Responses API "
        "runs here), not '/v1/chat/completions'",
        f"asyncbg: nothing from {source} was enqueued",
    ]
    assert not db.exists()


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--lease", "0.001", "must be at least 1 second, not 0.001"),
    ("--lease", "inf", "must be a finite number, not 'inf'"),
    ("--db-patience", "inf", "must be a finite number, not 'inf'"),
    ("--db-patience", "nan", "must be a finite number, not 'nan'"),
])
def test_a_worker_refuses_a_lease_or_patience_it_cannot_keep(
    option: str, value: str, said: str, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lease shorter than a second ran out during the ledger's own round trips: the worker
    took its jobs, sent nothing and took them again, at full CPU, forever; an infinite
    patience ended in a traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(["worker", "--ledger", str(db), option, value, "--exit-when-idle"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"asyncbg worker: error: argument {option}: {said}")
