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

import anyio
import anyio.to_thread
import pytest

from asyncbg._ledgers import Outcome, SQLiteLedger, canonical, digest
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


async def _fill(ledger: SQLiteLedger) -> None:
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


def test_the_check_sees_a_heavy_import(tmp_path: Path) -> None:
    """The same check, on a command that does load the SDK, finds it: the list is not empty
    by accident of how modules are named."""
    done = subprocess.run([sys.executable, "-c", "import openai, rich.console, sys; "
                           "print('\\n'.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, check=True, timeout=120)
    assert {"openai", "rich.console"} <= set(_heavy(done.stdout.split()))
