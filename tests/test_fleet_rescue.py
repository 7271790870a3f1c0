"""A worker that leaves holding responses it could not record keeps their ids; the next adopts them.

The faults are real: PostgreSQL goes away as a TCP relay in front of the test's server that
stops (its connections cut, new ones refused) and comes back; an SQLite ledger is locked by
another process holding its write lock. The creates are held at the fake server's door
(``CreateGate``) until the database is gone, so that they are answered while nothing can be
recorded. The fake counts creates per ``custom_id``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from anyio.abc import SocketStream, TaskStatus

from asyncbg._fleet import enqueue_requests
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

from .conftest import HttpFake
from .test_fleet_db_down import free_port, on_port

pytestmark = pytest.mark.asyncio

N = 4


class Relay:
    """A TCP relay on ``port`` to ``target`` that can be stopped (every connection cut, new ones
    refused, as a database that went away) and started again."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.scope: anyio.CancelScope | None = None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async def pipe(a: SocketStream, b: SocketStream) -> None:
            try:
                async for chunk in a:
                    await b.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            finally:
                await b.aclose()

        async def relay(client: SocketStream) -> None:
            async with client, await anyio.connect_tcp(*self.target) as server, \
                    anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, server)
                tg.start_soon(pipe, server, client)

        with anyio.CancelScope() as self.scope:
            async with await anyio.create_tcp_listener(local_host="127.0.0.1",
                                                       local_port=self.port) as lis:
                task_status.started()
                await lis.serve(relay)

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


async def until(check: Callable[[], bool], within: float = 60.0) -> None:
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110 - the fake's counters have no event to wait on
            await anyio.sleep(0.02)


def lines() -> list[tuple[str, dict[str, Any]]]:
    return [(f"r{i}", {"model": "m", "input": f"line {i}",
                       "metadata": {"fake_duration": "0.3"}}) for i in range(N)]


def creates_per_line(http_fake: HttpFake) -> Counter[str]:
    return Counter(r.metadata.get("asyncbg_custom_id")
                   for r in http_fake.server._timeline.responses.values())


def env_for(http_fake: HttpFake, state: Path) -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": http_fake.base_url,
            "XDG_STATE_HOME": str(state)}


async def worker(ledger: str, env: dict[str, str], *extra: str) -> anyio.abc.Process:
    return await anyio.open_process(
        [sys.executable, "-m", "asyncbg", "worker", "--ledger", ledger, "--concurrency", str(N),
         "--lease", "6", *extra], env=env, stdout=None, stderr=subprocess.PIPE)


async def finished(proc: anyio.abc.Process) -> tuple[int, str]:
    assert proc.stderr is not None
    err = b""
    async for chunk in proc.stderr:
        err += chunk
    return await proc.wait(), err.decode()


async def kept_then_stopped(proc: anyio.abc.Process, http_fake: HttpFake,
                            cut: Callable[[], None]) -> tuple[int, str]:
    """Creates held at the door, the database cut, the creates answered; then SIGTERM."""
    await until(lambda: http_fake.gate.waiting == N)
    cut()
    http_fake.gate.open()
    await until(lambda: http_fake.server.counters.creates == N)
    await anyio.sleep(0.5)  # the answers reach the worker, whose writes of them fail
    proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(60):
        return await finished(proc)


async def pg_ledger(pg_dsn: str) -> tuple[str, tuple[str, int]]:
    """The lines enqueued; the URL of a relay port to the database, and the real address."""
    setup = PostgresLedger(pg_dsn)
    await setup.open()
    try:
        await enqueue_requests(setup, lines())
    finally:
        await setup.close()
    real = urlsplit(pg_dsn)
    port = free_port()
    return on_port(pg_dsn, port), (real.hostname or "127.0.0.1", real.port or 5432)


def kept_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().rstrip(b"\0").splitlines()]


async def test_a_postgres_worker_keeps_what_it_could_not_record_and_the_next_adopts_it(
    http_fake: HttpFake, pg_dsn: str, tmp_path: Path,
) -> None:
    url, target = await pg_ledger(pg_dsn)
    env = env_for(http_fake, tmp_path / "state")
    async with anyio.create_task_group() as tg:
        relay = Relay(urlsplit(url).port or 0, target)
        await tg.start(relay.serve)
        http_fake.gate.shut()
        proc = await worker(url, env, "--db-patience", "120")
        code, err = await kept_then_stopped(proc, http_fake, relay.stop)
        assert code == 128 + signal.SIGTERM, err
        kept = list((tmp_path / "state" / "asyncbg" / "unrecorded").iterdir())
        assert len(kept) == 1, err
        assert f"{N} response ids kept in {kept[0]}: the next asyncbg worker" in err, err
        lines_kept = kept_lines(kept[0])
        assert sorted(k["key"] for k in lines_kept) == [f"r{i}" for i in range(N)]
        assert all(k["epoch"] == 1 and k["response_id"].startswith("resp_")
                   for k in lines_kept)
        assert "postgres" not in kept[0].name  # named by a hash: nothing of the URL
        await tg.start(relay.serve)  # the database is back
        status = await anyio.run_process(
            [sys.executable, "-m", "asyncbg", "status", "--ledger", url], env=env, check=False)
        assert status.returncode == 0, status.stderr
        assert f"{N} response ids wait in {kept[0]} to be adopted" in status.stdout.decode()
        assert len(kept_lines(kept[0])) == N  # status reads, never adopts
        code, err = await finished(await worker(url, env, "--exit-when-idle"))
        assert code == 0, err
        assert f"adopted={N}" in err and "duplicates=0" in err, err
        tg.cancel_scope.cancel()
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(N)}
    check = PostgresLedger(pg_dsn)
    await check.open()
    try:
        records = await check.records()
        assert await check.resubmits() == 0  # no possible duplicate was counted
    finally:
        await check.close()
    assert [r.status for r in records] == ["completed"] * N
    assert not kept[0].exists()


async def test_a_state_directory_that_cannot_be_written_puts_the_ids_on_stderr(
    http_fake: HttpFake, pg_dsn: str, tmp_path: Path,
) -> None:
    url, target = await pg_ledger(pg_dsn)
    (tmp_path / "not-a-dir").write_text("")
    env = env_for(http_fake, tmp_path / "not-a-dir")
    async with anyio.create_task_group() as tg:
        relay = Relay(urlsplit(url).port or 0, target)
        await tg.start(relay.serve)
        http_fake.gate.shut()
        proc = await worker(url, env, "--db-patience", "120")
        code, err = await kept_then_stopped(proc, http_fake, relay.stop)
        tg.cancel_scope.cancel()
    assert code == 128 + signal.SIGTERM, err
    [said] = [line for line in err.splitlines() if "ledger.unrecorded" in line]
    made = {r.id: r.metadata["asyncbg_custom_id"]
            for r in http_fake.server._timeline.responses.values()}
    assert len(made) == N
    for rid, key in made.items():
        assert f"{key} ({rid})" in said  # the operator has every id
    assert "could not be kept" in said and "Not a directory" in said, said


async def test_a_sqlite_worker_keeps_what_it_could_not_record_beside_the_ledger(
    http_fake: HttpFake, tmp_path: Path,
) -> None:
    db = tmp_path / "fleet.db"
    setup = SharedSQLiteLedger(db)
    await setup.open()
    await enqueue_requests(setup, lines())
    await setup.close()
    env = env_for(http_fake, tmp_path / "state")
    locker = sqlite3.connect(db, isolation_level=None, timeout=30)

    def lock() -> None:  # another program writing: the worker's writes time out
        locker.execute("BEGIN IMMEDIATE")

    try:
        http_fake.gate.shut()
        proc = await worker(str(db), env, "--db-patience", "120")
        code, err = await kept_then_stopped(proc, http_fake, lock)
        assert code == 128 + signal.SIGTERM, err
        companion = tmp_path / "fleet.db.unrecorded"
        assert f"{N} response ids kept in {companion}" in err, err
        assert len(kept_lines(companion)) == N
        status = await anyio.run_process(
            [sys.executable, "-m", "asyncbg", "status", "--ledger", str(db)], env=env,
            check=False)
        assert status.returncode == 0, status.stderr
        assert f"{N} response ids wait in {companion}" in status.stdout.decode()
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
    assert not (tmp_path / "state").exists()  # beside the ledger, not in the state directory
    code, err = await finished(await worker(str(db), env, "--exit-when-idle"))
    assert code == 0, err
    assert f"adopted={N}" in err, err
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(N)}
    check = SharedSQLiteLedger(db)
    await check.open()
    records = await check.records()
    await check.close()
    assert [r.status for r in records] == ["completed"] * N
    assert not companion.exists()
