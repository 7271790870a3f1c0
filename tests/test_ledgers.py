"""Ledgers: the same rules for MemoryLedger and SQLiteLedger, then the SQLite file's own cases."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

import asyncbg._ledgers as ledgers
from asyncbg._ledgers import (
    ClaimOutcome,
    Ledger,
    LedgerError,
    MemoryLedger,
    Outcome,
    SQLiteLedger,
    _sqlite,
    _sqlite_errors,
    canonical,
    digest,
    fingerprint,
    open_ledger,
)


def req(**kw: object) -> tuple[str, bytes]:
    params = {"model": "m", "input": "x", **kw}
    return digest(params), canonical(params)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(), inner, max_size=3), max_leaves=10)


@given(st.dictionaries(st.text(), _JSON, max_size=5))
def test_a_fingerprint_is_the_digest_and_the_canonical_text_of_one_request(
        params: dict[str, object]) -> None:
    # What a claim takes, made with one encoding of the JSON; the digest of its text is the
    # digest every journal has stored, whatever the keys' order.
    assert fingerprint(params) == (digest(params), canonical(params))
    assert fingerprint(dict(reversed(list(params.items())))) == fingerprint(params)


A, A_BYTES = req()
B, B_BYTES = req(input="other")
DONE = Outcome("completed", "resp_1", body=b'{"id":"resp_1"}', http_status=200, request_id="rq")


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    led: Ledger = MemoryLedger() if request.param == "memory" else SQLiteLedger(tmp_path / "j.db")
    await led.open()
    try:
        yield led
    finally:
        await led.close()


# -- the rules, for every ledger ------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_first_claim_is_new_with_the_request(ledger: Ledger) -> None:
    assert isinstance(ledger, Ledger)
    claim = await ledger.claim("k", A, A_BYTES)
    assert claim.outcome is ClaimOutcome.NEW
    r = claim.record
    assert (r.key, r.digest, r.request, r.state, r.status) == ("k", A, A_BYTES, "new", "pending")
    assert (r.response_id, r.body, r.error, r.resubmits, r.terminal) == (None, None, None, 0, False)
    assert await ledger.get("k") == r
    assert await ledger.get("missing") is None


@pytest.mark.asyncio
async def test_new_and_local_records_are_claimed_afresh_even_with_another_request(
    ledger: Ledger,
) -> None:
    first = (await ledger.claim("k", A, A_BYTES)).record
    again = await ledger.claim("k", B, B_BYTES)  # claimed, never sent: the newer one wins
    assert again.outcome is ClaimOutcome.NEW
    assert (again.record.digest, again.record.request) == (B, B_BYTES)
    assert again.record.created == first.created
    await ledger.sending("k", resubmit=False)
    await ledger.record("k", Outcome("failed", error="rejected", error_code="request_failed",
                                     http_status=400, request_id="rq"))
    local = await ledger.get("k")
    assert local is not None and local.state == "local" and local.terminal
    assert (local.error_code, local.http_status, local.request_id) == ("request_failed", 400, "rq")
    fresh = await ledger.claim("k", A, A_BYTES)
    assert fresh.outcome is ClaimOutcome.NEW
    r = fresh.record
    assert (r.state, r.status, r.digest, r.request) == ("new", "pending", A, A_BYTES)
    assert (r.error, r.error_code, r.http_status, r.request_id, r.body) == (None,) * 5


@pytest.mark.asyncio
async def test_a_key_in_sending_is_resent_and_counted(ledger: Ledger) -> None:
    await ledger.claim("k", A, A_BYTES)
    await ledger.sending("k", resubmit=False)
    assert (await ledger.claim("k", B, B_BYTES)).outcome is ClaimOutcome.MISMATCH
    claim = await ledger.claim("k", A, A_BYTES)
    assert claim.outcome is ClaimOutcome.RESEND
    assert claim.record.state == "sending"  # a create may have left: a crash now is RESEND again
    await ledger.sending("k", resubmit=True)
    await ledger.claim("j", A, A_BYTES)
    await ledger.sending("j", resubmit=True)
    assert await ledger.resubmits() == 2
    record = await ledger.get("k")
    assert record is not None and (record.state, record.resubmits) == ("sending", 1)


@pytest.mark.asyncio
async def test_a_live_key_resumes_and_keeps_no_body(ledger: Ledger) -> None:
    await ledger.claim("k", A, A_BYTES)
    await ledger.sending("k", resubmit=False)
    await ledger.record("k", Outcome("queued", "resp_1", body=b"{}", http_status=200))
    await ledger.record("k", Outcome("in_progress"))  # no id: the known one stays
    claim = await ledger.claim("k", A, A_BYTES)
    assert claim.outcome is ClaimOutcome.RESUME
    r = claim.record
    assert (r.state, r.response_id, r.status, r.body, r.http_status) == (
        "live", "resp_1", "in_progress", None, None
    )
    mismatch = await ledger.claim("k", B, B_BYTES)
    assert mismatch.outcome is ClaimOutcome.MISMATCH and mismatch.record == r
    assert await ledger.get("k") == r


@pytest.mark.asyncio
async def test_a_finished_key_is_served_with_the_servers_answer(ledger: Ledger) -> None:
    await ledger.claim("k", A, A_BYTES)
    await ledger.sending("k", resubmit=False)
    await ledger.record("k", Outcome("queued", "resp_1"))
    await ledger.record("k", DONE)
    claim = await ledger.claim("k", A, A_BYTES)
    assert claim.outcome is ClaimOutcome.DONE
    r = claim.record
    assert (r.state, r.response_id, r.status, r.body) == ("done", "resp_1", "completed", DONE.body)
    assert (r.http_status, r.request_id, r.terminal) == (200, "rq", True)
    assert r.updated >= r.created
    assert (await ledger.claim("k", B, B_BYTES)).outcome is ClaimOutcome.MISMATCH


@pytest.mark.asyncio
async def test_a_terminal_outcome_without_a_response_id_is_local(ledger: Ledger) -> None:
    await ledger.claim("k", A, A_BYTES)
    await ledger.sending("k", resubmit=False)
    await ledger.record("k", Outcome("in_progress", "resp_1"))
    await ledger.record("k", Outcome("failed", error="gone", error_code="response_lost"))
    r = await ledger.get("k")
    assert r is not None and (r.state, r.response_id, r.error_code) == (
        "local", "resp_1", "response_lost"
    )  # the id stays known; the rerun creates it again, as Outcome says
    assert (await ledger.claim("k", A, A_BYTES)).outcome is ClaimOutcome.NEW


@pytest.mark.asyncio
async def test_records_come_in_claim_order(ledger: Ledger) -> None:
    for key in ("c", "a", "b"):
        await ledger.claim(key, A, A_BYTES)
    await ledger.record("a", Outcome("cancelled"))
    await ledger.claim("a", B, B_BYTES)  # a local record claimed afresh keeps its place
    assert [r.key for r in await ledger.records()] == ["c", "a", "b"]


@pytest.mark.asyncio
async def test_writing_an_unclaimed_key_or_an_unknown_status_is_a_bug(ledger: Ledger) -> None:
    with pytest.raises(KeyError, match="never claimed"):
        await ledger.sending("nope", resubmit=False)
    with pytest.raises(KeyError, match="never claimed"):
        await ledger.record("nope", DONE)
    await ledger.claim("k", A, A_BYTES)
    with pytest.raises(ValueError, match="JobStatus value, not 'finished'"):
        await ledger.record("k", Outcome("finished"))


@pytest.mark.asyncio
async def test_close_is_idempotent(ledger: Ledger) -> None:
    await ledger.close()
    await ledger.close()


# -- SQLite: the file ----------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.asyncio
async def test_a_journal_survives_its_process(tmp_path: Path) -> None:
    first = SQLiteLedger(tmp_path / "j.db")
    await first.open()
    await first.claim("k", A, A_BYTES)
    await first.sending("k", resubmit=False)
    await first.record("k", DONE)
    await first.close()
    second = SQLiteLedger(tmp_path / "j.db")
    await second.open()
    try:
        assert (await second.claim("k", A, A_BYTES)).record.body == DONE.body
    finally:
        await second.close()
    with sqlite3.connect(tmp_path / "j.db") as db:
        assert db.execute("SELECT key, status FROM events").fetchall() == [("k", "completed")]


@pytest.mark.asyncio
async def test_a_new_journal_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "j.db"
    old = os.umask(0)
    try:
        led = SQLiteLedger(path)
        await led.open()
        try:
            await led.claim("k", A, A_BYTES)
            assert [mode(p) for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))] == [
                0o600, 0o600, 0o600
            ]
        finally:
            await led.close()
    finally:
        os.umask(old)


@pytest.mark.asyncio
async def test_an_existing_journal_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    led = SQLiteLedger(path)
    await led.open()
    await led.close()
    path.chmod(0o644)
    again = SQLiteLedger(path)
    await again.open()
    await again.claim("k", A, A_BYTES)
    await again.close()
    assert mode(path) == 0o644


def test_opens_nest_and_a_closed_ledger_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        led = SQLiteLedger(tmp_path / "j.db")
        with pytest.raises(RuntimeError, match="not open"):
            await led.get("k")
        await led.open()
        await led.open()  # e.g. the CLI holds it open and a manager opens it again
        await led.close()
        await led.claim("k", A, A_BYTES)  # still open: one close per open
        await led.close()
        with pytest.raises(RuntimeError, match="not open"):
            await led.records()

    anyio.run(main)


# -- SQLite: upgrading a journal written by asyncbg 0.1 -------------------------------------

#: The schema of asyncbg 0.1's asyncbg/_journal.py, copied: that module is going away.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key         TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    state       TEXT NOT NULL,          -- sending | accepted | done | local
    response_id TEXT,
    status      TEXT NOT NULL,
    response    TEXT,                   -- the last Response JSON, as the server sent it
    error       TEXT,
    resubmits   INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL,
    updated     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY,
    key    TEXT NOT NULL,
    status TEXT NOT NULL,
    at     REAL NOT NULL
);
"""


def v1_journal(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA)
    rows = [  # key, state, response_id, status, response, error, resubmits, created
        ("z-sent", "sending", None, "pending", None, None, 1, 1.0),
        ("y-live", "accepted", "resp_y", "in_progress", None, None, 0, 2.0),
        ("x-done", "done", "resp_x", "completed", '{"id":"resp_x"}', None, 0, 3.0),
        ("w-local", "local", None, "failed", None, "rejected", 0, 4.0),
    ]
    for key, state, rid, status, body, error, resubmits, created in rows:
        db.execute(
            "INSERT INTO jobs (key, digest, state, response_id, status, response, error, "
            "resubmits, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, A, state, rid, status, body, error, resubmits, created, created),
        )
        db.execute("INSERT INTO events (key, status, at) VALUES (?, ?, ?)", (key, status, created))
    db.close()
    path.chmod(0o644)


@pytest.mark.asyncio
async def test_a_version_1_journal_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.journal"
    v1_journal(path)
    led = SQLiteLedger(path)
    await led.open()
    try:
        records = await led.records()
        assert [(r.key, r.state, r.request) for r in records] == [
            ("z-sent", "sending", b""), ("y-live", "live", b""),
            ("x-done", "done", b""), ("w-local", "local", b""),
        ]
        assert records[2].body == b'{"id":"resp_x"}' and await led.resubmits() == 1
        outcomes = [(await led.claim(r.key, A, A_BYTES)).outcome for r in records]
        assert outcomes == [ClaimOutcome.RESEND, ClaimOutcome.RESUME, ClaimOutcome.DONE,
                            ClaimOutcome.NEW]
        done = await led.get("x-done")
        assert done is not None and done.request == A_BYTES  # filled in by the claim
        assert done.response_id == "resp_x" and done.body == b'{"id":"resp_x"}'
        await led.claim("v-new", A, A_BYTES)
        assert [r.key for r in await led.records()][-1] == "v-new"
    finally:
        await led.close()
    assert mode(path) == 0o644
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (4,)
        assert db.execute("SELECT count(*) FROM events").fetchone() == (4,)
    again = SQLiteLedger(path)  # and it opens again as a current journal
    await again.open()
    assert len(await again.records()) == 5
    await again.close()


# -- SQLite: refusals ----------------------------------------------------------------------

async def refusal(path: Path) -> str:
    """Open ``path``; return the LedgerError's message, checking it is one line."""
    led = SQLiteLedger(path)
    with pytest.raises(LedgerError) as info:
        await led.open()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def foreign_db(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.execute("INSERT INTO invoices (total) VALUES (12.5)")
    sqlite3.connect(path).close()


def v5_journal(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA application_id = 1633838954")
        db.execute("PRAGMA user_version = 5")
        db.execute("CREATE TABLE jobs (key TEXT)")
    sqlite3.connect(path).close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p.write_text("key,value\nk,1\n"), "is not an SQLite database"),
    (foreign_db, r"is an SQLite database but not an asyncbg journal \(tables: invoices\)"),
    (lambda p: p.touch(), r"is empty \(0 bytes\), maybe truncated; delete it to start over"),
    (v5_journal, "written by a newer asyncbg .*version 5; this one knows up to 4"),
    (lambda p: p.mkdir(), "is a directory"),
], ids=["text", "foreign", "empty", "too-new", "directory"])
async def test_a_file_that_is_not_a_journal_is_refused_and_left_alone(
    tmp_path: Path, make: Callable[[Path], object], expected: str
) -> None:
    path = tmp_path / "j.db"
    make(path)
    path.chmod(0o640)
    before = path.read_bytes() if path.is_file() else None
    assert re.search(expected, await refusal(path))
    assert mode(path) == 0o640
    if before is not None:
        assert path.read_bytes() == before


async def journal_of(path: Path, n: int) -> None:
    led = SQLiteLedger(path)
    await led.open()
    for i in range(n):
        d, r = req(i=i)
        await led.claim(f"k{i}", d, r)
        await led.sending(f"k{i}", resubmit=False)
        await led.record(f"k{i}", Outcome("completed", f"r{i}", body=b"x" * 2000))
    await led.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_a_corrupt_journal_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "j.db"
    await journal_of(path, 100)
    size = path.stat().st_size
    if damage == "truncated":
        os.truncate(path, size // 2)
    else:
        with path.open("r+b") as f:
            f.seek(size // 2)
            f.write(b"\xff" * 8192)
    assert "is corrupt" in await refusal(path)


@pytest.mark.asyncio
async def test_a_journal_locked_by_another_writer_is_refused_after_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.db"
    await journal_of(path, 1)
    monkeypatch.setattr(_sqlite, "_BUSY_TIMEOUT", 0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        message = await refusal(path)
    finally:
        other.close()
    assert "is locked by another program writing to it (waited 0.05 s)" in message


def test_read_only_errors_are_named(tmp_path: Path) -> None:
    """The mapping itself, on a real SQLITE_READONLY error (root writes through chmod)."""
    path = tmp_path / "j.db"
    anyio.run(journal_of, path, 1)
    with (
        sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db,
        pytest.raises(sqlite3.OperationalError) as info,
    ):
        db.execute("DELETE FROM jobs")
    error = _sqlite_errors.from_sqlite(info.value, str(path), busy_timeout=5)
    assert str(error).startswith(f"{path} is read-only (attempt to write a readonly database)")
    denied = _sqlite_errors.from_os(PermissionError(13, "Permission denied"), str(path))
    assert str(denied).startswith(f"{path} is read-only (Permission denied)")


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv")
@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_read_only_journal_is_refused(tmp_path: Path, where: str) -> None:
    """As root, chmod does not stop writes; a child without CAP_DAC_OVERRIDE obeys it."""
    path = tmp_path / "ro" / "j.db"
    path.parent.mkdir()
    anyio.run(journal_of, path, 1)
    (path if where == "file" else path.parent).chmod(0o500 if where == "directory" else 0o400)
    try:
        out = run_child(OPEN_AND_REPORT, str(path), cap_drop=True)
    finally:
        path.parent.chmod(0o700)
        path.chmod(0o600)
    assert out.startswith("LedgerError:") and "\n" not in out.strip()
    assert "is read-only" in out or "cannot be opened" in out


# -- SQLite: one run per journal -----------------------------------------------------------

OPEN_AND_REPORT = """
import sys, anyio
from asyncbg._ledgers import SQLiteLedger, LedgerError
async def main() -> None:
    led = SQLiteLedger(sys.argv[1], exclusive=len(sys.argv) > 2)
    try:
        await led.open()
    except LedgerError as exc:
        print(f"LedgerError: {exc}", flush=True)
        return
    print("ready", flush=True)
    sys.stdin.readline()
    await led.close()
anyio.run(main)
"""


def run_child(script: str, *args: str, cap_drop: bool = False) -> str:
    prefix = [SETPRIV or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    cmd = [*(prefix if cap_drop else []), sys.executable, "-c", script, *args]
    return subprocess.run(cmd, input="", capture_output=True, text=True, check=True).stdout


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A second process holding ``tmp_path / "j.db"`` exclusively until told to stop."""
    proc = subprocess.Popen(
        [sys.executable, "-c", OPEN_AND_REPORT, str(tmp_path / "j.db"), "exclusive"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()


def test_a_journal_in_use_by_another_run_is_refused_at_once(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    path = tmp_path / "j.db"
    out = run_child(OPEN_AND_REPORT, str(path), "exclusive")
    assert out.startswith(
        f"LedgerError: {path} is in use by another asyncbg run (pid {holder.pid} on "
        f"{os.uname().nodename}, since "
    )
    assert out.rstrip().endswith("); wait for it to finish or stop it")
    assert run_child(OPEN_AND_REPORT, str(path)) == "ready\n"  # a reader takes no lock


def test_a_killed_runs_lock_does_not_block(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = tmp_path / "j.db.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid  # stale text, no lock
    assert run_child(OPEN_AND_REPORT, str(tmp_path / "j.db"), "exclusive") == "ready\n"
    assert mode(lock) == 0o600 and lock.read_text() == ""  # the sidecar stays, emptied


def test_exclusive_ledgers_exclude_each_other_in_one_process(tmp_path: Path) -> None:
    async def main() -> None:
        first = SQLiteLedger(tmp_path / "j.db", exclusive=True)
        await first.open()
        with pytest.raises(LedgerError, match=rf"in use .*\(pid {os.getpid()} on "):
            await SQLiteLedger(tmp_path / "j.db", exclusive=True).open()
        await first.close()
        second = SQLiteLedger(tmp_path / "j.db", exclusive=True)
        await second.open()
        await second.close()

    anyio.run(main)


@pytest.mark.asyncio
async def test_a_foreign_file_where_the_lock_goes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "j.db.lock").write_text("my notes\n")
    with pytest.raises(LedgerError, match=r"is in the way of .* lock file and is not one"):
        await SQLiteLedger(tmp_path / "j.db", exclusive=True).open()
    assert (tmp_path / "j.db.lock").read_text() == "my notes\n"
    assert not (tmp_path / "j.db").exists()


# -- SQLite: two ledgers on one file -------------------------------------------------------

@pytest.mark.asyncio
async def test_claims_racing_from_two_ledgers_insert_the_key_once(tmp_path: Path) -> None:
    pair = [SQLiteLedger(tmp_path / "j.db"), SQLiteLedger(tmp_path / "j.db")]
    for led in pair:
        await led.open()
    claims: dict[str, list[tuple[ClaimOutcome, float]]] = {}

    async def claim(led: SQLiteLedger, key: str) -> None:
        c = await led.claim(key, A, A_BYTES)
        claims.setdefault(key, []).append((c.outcome, c.record.created))

    try:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(claim, pair[i % 2], "same")
                tg.start_soon(claim, pair[i % 2], f"k{i}")
        # One insert: every claim of "same" found the record the first one made and, as it was
        # never sent, claimed it afresh (NEW, by the protocol) with the same creation time.
        same = claims.pop("same")
        assert len(same) == 50 and {c for c, _ in same} == {ClaimOutcome.NEW}
        assert len({created for _, created in same}) == 1
        assert all(c == [(ClaimOutcome.NEW, c[0][1])] for c in claims.values())
        orders = [[r.key for r in await led.records()] for led in pair]
        assert orders[0] == orders[1] and sorted(orders[0]) == sorted(
            ["same", *(f"k{i}" for i in range(50))]
        )
        await pair[0].sending("same", resubmit=False)
        outcomes: list[ClaimOutcome] = []

        async def reclaim(led: SQLiteLedger) -> None:
            outcomes.append((await led.claim("same", A, A_BYTES)).outcome)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(reclaim, pair[i % 2])
        assert outcomes == [ClaimOutcome.RESEND] * 50
    finally:
        for led in pair:
            await led.close()


# -- open_ledger and the package -----------------------------------------------------------

def test_open_ledger_names_a_ledger(tmp_path: Path) -> None:
    mem = MemoryLedger()
    assert open_ledger(mem) is mem
    led = open_ledger(tmp_path / "j.db", exclusive=True)
    assert isinstance(led, SQLiteLedger) and led.location == str(tmp_path / "j.db")
    assert repr(led).endswith("exclusive=True)")
    assert isinstance(open_ledger("relative.db"), SQLiteLedger)
    for url in ("postgresql://u:secret@db/asyncbg", "POSTGRES://db/x"):
        pg = open_ledger(url)  # not connected until opened
        assert type(pg).__name__ == "PostgresLedger" and "secret" not in pg.location
    with pytest.raises(LedgerError, match="mysql:// ledgers are not supported"):
        open_ledger("mysql://db/x")
    with pytest.raises(LedgerError, match="path is empty"):
        open_ledger("")
    with pytest.raises(TypeError, match="not int"):
        open_ledger(3)  # type: ignore[arg-type]


def test_all_is_sorted_and_complete() -> None:
    public = {
        name for name, value in vars(ledgers).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert ledgers.__all__ == sorted(ledgers.__all__)
    assert public - {"annotations"} == set(ledgers.__all__)
