"""A worker started while its PostgreSQL cannot be reached waits for it, as a running one does.

The database "comes up" as a TCP relay to the test's server that starts listening late (before
that, connections are refused, as when PostgreSQL is down): no server is stopped or restarted.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
from anyio.abc import SocketStream

import asyncbg._cli
from asyncbg._fleet import enqueue_requests, run_worker
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_POLL, FAST_RETRY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_port(dsn: str, port: int, *, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    auth = f"{user}:{password}" if password else user
    return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}"))


async def pipe(a: SocketStream, b: SocketStream) -> None:
    """Copy ``a`` to ``b`` until ``a`` ends or breaks; then close ``b`` (one way of a relay)."""
    try:
        async for chunk in a:
            await b.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        await b.aclose()


async def relay(port: int, target: tuple[str, int], after: float) -> None:
    """Listen on ``port`` from ``after`` seconds on, relaying every connection to ``target``."""
    await anyio.sleep(after)

    async def serve(client: SocketStream) -> None:
        async with client, await anyio.connect_tcp(*target) as server, \
                anyio.create_task_group() as tg:
            tg.start_soon(pipe, client, server)
            tg.start_soon(pipe, server, client)

    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port) as lis:
        await lis.serve(serve)


def test_a_worker_started_while_the_database_is_down_waits_then_exits_2(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    url = on_port(pg_dsn, free_port(), password="hunter2")  # nothing listens there
    code = asyncbg._cli.main(["worker", "--ledger", url, "--db-patience", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # one line that it waits, one that it gave up
    assert "worker.ledger_unavailable" in lines[0] and "waiting for it" in lines[0]
    assert "could not be reached for 1 s" in lines[1] and "without having taken any job" \
        in lines[1]
    assert "hunter2" not in err and ":***@" in lines[1]


@pytest.mark.asyncio
async def test_a_worker_started_before_its_database_runs_every_job_once_it_is_up(
    pg_dsn: str,
) -> None:
    setup = PostgresLedger(pg_dsn)
    await setup.open()
    try:
        await enqueue_requests(setup, [(f"r{i}", {"model": "m", "input": f"line {i}",
                                                  "metadata": {"fake_duration": "0.05"}})
                                       for i in range(12)])
    finally:
        await setup.close()
    real = urlsplit(pg_dsn)
    port = free_port()
    ledger = PostgresLedger(on_port(pg_dsn, port), timeout=2.0, connect_timeout=2.0)
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    client = fake_client(server)
    outcome: dict[str, Any] = {}
    try:
        with anyio.fail_after(45):
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay, port, (real.hostname or "127.0.0.1", real.port or 5432),
                              0.6)

                async def work() -> None:
                    outcome["code"] = await run_worker(
                        client, ledger, concurrency=4, lease=5.0, exit_when_idle=True,
                        stop=anyio.Event(), poll_policy=FAST_POLL, retry_policy=FAST_RETRY,
                        idle=0.05, db_patience=30.0)
                    tg.cancel_scope.cancel()

                tg.start_soon(work)
    finally:
        await client.close()
    assert outcome == {"code": 0}
    check = PostgresLedger(pg_dsn)
    await check.open()
    try:
        records = await check.records()
    finally:
        await check.close()
    assert [r.status for r in records] == ["completed"] * 12
    assert server.counters.creates == 12
