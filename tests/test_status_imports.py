"""``asyncbg status`` imports only what it uses: no logging renderer, no progress bar, no SDK,
no HTTP client, no connection pool. Each costs tens of milliseconds at every start (see
benchmarks/README.md, "status, second pass"); this is a check on what is imported, not on time.

Each case runs the command in a fresh interpreter and lists the modules it left loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest

from asyncbg._ledgers import Ledger, Outcome, SQLiteLedger, canonical, digest
from asyncbg._ledgers._overview import overview
from asyncbg._ledgers._postgres import PostgresLedger, _OneConnection
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

#: Modules `status` on an SQLite ledger must not load (nor any of their submodules).
HEAVY = ("structlog", "rich", "openai", "httpx", "httpx2", "aiohttp", "psycopg", "psycopg_pool",
         "importlib.metadata", "asyncbg._notify._notify", "asyncbg._engine",
         "asyncbg._manager")

_RUN = """
import json, sys
from asyncbg._cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _loaded(*argv: str) -> tuple[str, list[str]]:
    """Run ``asyncbg ARGV`` in a fresh interpreter: its output and the modules it loaded."""
    done = subprocess.run([sys.executable, "-c", _RUN, *argv], capture_output=True, text=True,
                          check=False, timeout=120)
    found = json.loads(done.stderr.strip().splitlines()[-1])
    assert found["code"] == 0, done.stderr
    return done.stdout, found["modules"]


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(f"{h}.") for h in HEAVY)]


def _request(n: int) -> tuple[str, bytes]:
    params = {"model": "gpt-5-nano", "input": f"question {n}"}
    return digest(params), canonical(params)


async def _fill(ledger: Ledger) -> None:
    """Jobs in every state status lists: done with tokens, live, in a remote batch, being
    sent, failed locally, waiting."""
    await ledger.open()
    try:
        for n, outcome in enumerate([
                Outcome("completed", response_id="resp_1", body=json.dumps(
                    {"usage": {"input_tokens": 3, "output_tokens": 4}}).encode()),
                Outcome("in_progress", response_id="resp_2"),
                Outcome("in_progress", response_id="batch_1#line-3"),
                None, Outcome("failed", error="x", error_code="e")]):
            d, request = _request(n)
            await ledger.claim(f"line-{n}", d, request)
            if outcome is None:
                await ledger.sending(f"line-{n}", resubmit=False)
            else:
                await ledger.record(f"line-{n}", outcome)
    finally:
        await ledger.close()


@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("kind", ["journal", "fleet"])
def test_status_loads_nothing_heavy(tmp_path: Path, kind: str, json_out: bool) -> None:
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path) if kind == "journal" else SharedSQLiteLedger(path)
    anyio.run(_fill, ledger)
    if kind == "fleet":
        async def worker() -> None:
            """status while a worker is alive and holds a lease (the fleet's lines)."""
            shared = SharedSQLiteLedger(path)
            await shared.open()
            try:
                d, request = _request(9)
                await shared.enqueue([("line-9", d, request)])
                assert await shared.acquire(1, 60.0)
                await shared.renew(["line-9"], 60.0)  # registers the worker
                out, modules = await anyio.to_thread.run_sync(
                    _loaded, "status", "--ledger", str(path))
            finally:
                await shared.close()
            assert "workers alive: 1" in out
            assert not _heavy(modules), _heavy(modules)

        anyio.run(worker)
    out, modules = _loaded("status", "--ledger", str(path), *(["--json"] if json_out else []))
    assert ("\"total\": 6" if kind == "fleet" else "\"total\": 5") in out if json_out else (
        "1 still running" not in out and "2 still running on the server" in out)
    # What this test holds the command to: the summary is read, and nothing heavy came with it.
    assert "asyncbg._ledgers._overview" in modules
    assert not _heavy(modules), _heavy(modules)


def _both(spec: str, *, json_out: bool) -> list[tuple[int, str, str]]:
    """``status`` as the command line runs it on an SQLite journal (in this thread, no event
    loop) and through the async reader every other ledger takes: code, stdout, stderr."""
    import argparse
    import contextlib
    import io

    from asyncbg._cli import _ops

    found = []
    for read in (_ops.run_status, lambda a: anyio.run(_ops.status, a)):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = read(argparse.Namespace(ledger=spec, json=json_out))
        text = out.getvalue()
        if json_out and code == 0:
            summary = json.loads(text)
            for b in summary["batches"]:
                b.pop("age"), b.pop("expires_in")
            text = json.dumps(summary)
        found.append((code, text, err.getvalue()))
    return found


@pytest.mark.parametrize("kind", ["journal", "fleet", "missing", "not a journal"])
def test_the_command_line_reader_says_what_the_async_one_says(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ledger.db"
    if kind in ("journal", "fleet"):
        anyio.run(_fill, SQLiteLedger(path) if kind == "journal" else SharedSQLiteLedger(path))
    if kind == "fleet":
        async def lease() -> None:  # a key was leased once: the fleet's lines are shown
            shared = SharedSQLiteLedger(path)
            await shared.open()
            try:
                d, request = _request(9)
                await shared.enqueue([("line-9", d, request)])
                assert await shared.acquire(1, 60.0)
            finally:
                await shared.close()

        anyio.run(lease)
    if kind == "not a journal":
        path.write_bytes(b"not an SQLite file, " * 100)
    for json_out in (False, True):
        fast, slow = _both(str(path), json_out=json_out)
        assert fast == slow
        code, out, err = fast
        if kind in ("journal", "fleet"):
            assert code == 0 and not err and (("workers alive" in out) is (
                kind == "fleet" and not json_out))
        else:
            assert code == 2 and not out and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["status", "--ledger", "x.db"], ["status", "--ledger=x.db", "--json"], ["status"],
    ["status", "--ledger"], ["status", "--bogus"], ["status", "-h"], ["status", "x", "y"],
    ["status", "--ledger", "x", "--ledger", "y"], ["status", "--json", "--ledger", "-"]])
def test_status_parses_alone_as_among_every_command(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``status`` builds only its own parser: same namespace, same errors, same help."""
    from asyncbg._cli import _parser_for, build_parser

    said = []
    for parser in (_parser_for(argv), build_parser()):
        try:
            result: object = vars(parser.parse_args(argv))
        except SystemExit as exc:
            result = exc.code
        said.append((result, capsys.readouterr()))
    assert said[0] == said[1]
    assert len(_parser_for(argv)._subparsers._group_actions[0].choices) == 1  # type: ignore[union-attr]


def test_the_check_sees_a_heavy_import(tmp_path: Path) -> None:
    """The same check, on a command that does load the SDK, finds it: the list is not empty
    by accident of how modules are named."""
    done = subprocess.run([sys.executable, "-c", "import openai, rich.console, sys; "
                           "print('\\n'.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, check=True, timeout=120)
    assert {"openai", "rich.console"} <= set(_heavy(done.stdout.split()))


# -- PostgreSQL: one plain connection, no pool ---------------------------------------------------


def _backends(admin: psycopg.Connection[tuple[Any, ...]]) -> list[int]:
    """The server processes of the other sessions on this database."""
    return [int(pid) for pid, in admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()").fetchall()]


async def _fill_postgres(dsn: str) -> None:
    ledger = PostgresLedger(dsn)
    await ledger.open()
    try:
        await _fill(ledger)
    finally:
        await ledger.close()


def test_status_on_postgres_loads_no_pool(pg_dsn: str) -> None:
    anyio.run(_fill_postgres, pg_dsn)
    out, modules = _loaded("status", "--ledger", pg_dsn)
    assert "2 still running on the server" in out
    # psycopg, and importlib.metadata that psycopg_binary reads its version with: nothing else.
    assert "psycopg" in modules
    assert not [m for m in _heavy(modules) if not m.startswith(("psycopg.", "importlib."))
                and m != "psycopg"]


@pytest.mark.asyncio
async def test_a_ledger_without_a_pool_uses_one_connection_and_makes_it_again(
    pg_dsn: str
) -> None:
    await _fill_postgres(pg_dsn)
    admin = psycopg.connect(pg_dsn, autocommit=True)
    ledger = PostgresLedger(pg_dsn, pool=False)
    await ledger.open()
    try:
        [first] = _backends(admin)  # the connection that checked the schema, kept
        async with anyio.create_task_group() as tg:  # calls at once take turns on it
            for _ in range(4):
                tg.start_soon(overview, ledger)
            tg.start_soon(ledger.workers)
            tg.start_soon(ledger.deliveries)
        assert _backends(admin) == [first]
        assert isinstance(ledger._pool, _OneConnection)
        # The server drops it: the next call makes another, and answers.
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        view = await overview(ledger)
        assert view.total == 5 and view.read_from == "counters"
        [second] = _backends(admin)
        assert second != first
        # A call cancelled mid-statement: that connection is not lent again.
        scope = anyio.CancelScope()

        async def sleep() -> None:
            with scope:
                await ledger._run(lambda c: c.execute("SELECT pg_sleep(30)"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(sleep)
            while not admin.execute(  # noqa: ASYNC110 - the server has no event for it
                    "SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
                    "state = 'active' AND query LIKE 'SELECT pg_sleep%%'").fetchone():
                await anyio.sleep(0.01)
            scope.cancel()
        assert (await overview(ledger)).total == 5
        assert len(set(_backends(admin)) - {second}) == 1
    finally:
        await ledger.close()
        admin.close()
