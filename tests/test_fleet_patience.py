"""``asyncbg worker --db-patience`` is kept during an outage, and the outage is said once.

The outage is real: PostgreSQL goes away behind a TCP relay that cuts every connection and
then refuses new ones (it accepts each and closes it at once, and counts them), until the test
restores it. The worker is the CLI, in a process of its own, with live responses to poll.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import openai
import pytest
from anyio.abc import SocketStream, TaskStatus

from asyncbg._fleet import enqueue_requests, run_worker
from asyncbg._ledgers._postgres import PostgresLedger

from .conftest import FAST_POLL, HttpFake
from .test_fleet_db_down import free_port, on_port, pipe
from .test_fleet_rescue import N as LINES
from .test_fleet_rescue import creates_per_line, env_for, finished, pg_ledger, until

N = 2


class CuttableRelay:
    """A TCP relay to ``target``: while ``cut`` it closes every connection it has and every
    new one at once (``refused`` counts those), as a database that went away; it is restored
    by itself after ``restore_after`` of them."""

    def __init__(self, port: int, target: tuple[str, int], *,
                 restore_after: int | None = None) -> None:
        self.port = port
        self.target = target
        self.restore_after = restore_after
        self.restored = anyio.Event()
        self.cut = False
        self.refused = 0
        self.relayed = 0
        self.scopes: set[anyio.CancelScope] = set()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async def relay(client: SocketStream) -> None:
            async with client:
                if self.cut:
                    self.refused += 1
                    if self.refused == self.restore_after:
                        self.restore()
                    return
                self.relayed += 1
                with anyio.CancelScope() as scope:
                    self.scopes.add(scope)
                    try:
                        async with await anyio.connect_tcp(*self.target) as server, \
                                anyio.create_task_group() as tg:
                            tg.start_soon(pipe, client, server)
                            tg.start_soon(pipe, server, client)
                    finally:
                        self.scopes.discard(scope)

        async with await anyio.create_tcp_listener(local_host="127.0.0.1",
                                                   local_port=self.port) as lis:
            task_status.started()
            await lis.serve(relay)

    def stop(self) -> None:
        self.cut = True
        for scope in list(self.scopes):
            scope.cancel()

    def restore(self) -> None:
        self.cut = False
        self.restored.set()


async def relayed_ledger(pg_dsn: str) -> tuple[str, tuple[str, int]]:
    setup = PostgresLedger(pg_dsn)
    await setup.open()
    try:
        await enqueue_requests(setup, [
            (f"r{i}", {"model": "m", "input": f"line {i}",
                       "metadata": {"fake_duration": "600"}}) for i in range(N)])
    finally:
        await setup.close()
    real = urlsplit(pg_dsn)
    return on_port(pg_dsn, free_port()), (real.hostname or "127.0.0.1", real.port or 5432)


@pytest.mark.asyncio
async def test_a_worker_keeps_a_small_db_patience(pg_dsn: str, http_fake: HttpFake,
                                                  tmp_path: Path) -> None:
    """``--db-patience 3``: the worker leaves (rc 2, one line) while the database is still
    cut, within a few of the pool's attempts to reconnect (9 measured; it waited the pool's
    30 s timeout at each ledger call, and left after 69 s and 27 attempts). The database is
    restored after 20: a worker still there then has not kept the patience."""
    url, target = await relayed_ledger(pg_dsn)
    relay = CuttableRelay(int(urlsplit(url).port or 0), target, restore_after=20)
    env = env_for(http_fake, tmp_path)
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        proc = await anyio.open_process(
            [sys.executable, "-m", "asyncbg", "worker", "--ledger", url, "--concurrency",
             str(N), "--db-patience", "3"], env=env, stdout=None, stderr=subprocess.PIPE)
        try:
            await until(lambda: http_fake.server.counters.creates == N)
            await anyio.sleep(1.0)  # their ids recorded: live, polled
            relay.stop()
            async with anyio.create_task_group() as watch:
                async def stop_when_restored() -> None:
                    await relay.restored.wait()
                    proc.send_signal(signal.SIGTERM)  # it stayed: it would run on

                watch.start_soon(stop_when_restored)
                still_cut = False
                with anyio.fail_after(180):  # a hang guard only
                    code, err = await finished(proc)
                    still_cut = relay.cut
                watch.cancel_scope.cancel()
        finally:
            if proc.returncode is None:
                proc.kill()
            tg.cancel_scope.cancel()
    assert still_cut, f"the worker stayed after {relay.refused} connection attempts:\n{err}"
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("asyncbg: ") and "could not be reached for 3 s" in last, err
    assert "cannot connect to the PostgreSQL server" in last, err


@pytest.mark.asyncio
async def test_an_outage_is_said_once_without_psycopg_pool_lines(
    pg_dsn: str, http_fake: HttpFake, tmp_path: Path
) -> None:
    """The worker's stderr across a short outage, at the default level: asyncbg's line when it
    starts and when it ends, and none of psycopg_pool's (one a failed attempt to connect, they
    were), which go to asyncbg's log at debug level."""
    url, target = await relayed_ledger(pg_dsn)
    relay = CuttableRelay(int(urlsplit(url).port or 0), target)
    env = env_for(http_fake, tmp_path)
    err = ""
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        proc = await anyio.open_process(
            [sys.executable, "-m", "asyncbg", "worker", "--ledger", url, "--concurrency",
             str(N)], env=env, stdout=None, stderr=subprocess.PIPE)

        async def read() -> None:
            nonlocal err
            assert proc.stderr is not None
            async for chunk in proc.stderr:
                err += chunk.decode()

        tg.start_soon(read)
        try:
            await until(lambda: http_fake.server.counters.creates == N)
            relay.stop()
            await until(lambda: "worker.ledger_unavailable" in err)
            await until(lambda: relay.refused >= 5)  # the pools' attempts, several of them
            relay.restore()
            await until(lambda: "worker.ledger_available" in err)
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(60):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
            tg.cancel_scope.cancel()
    assert code == 128 + signal.SIGTERM, err  # stopped as asked
    lines = err.strip().splitlines()
    assert not [line for line in lines if "psycopg" in line or "connecting" in line
                or "discarding" in line or line.startswith((" ", "\t"))], err
    assert sum("worker.ledger_unavailable" in line for line in lines) == 1, err
    assert sum("worker.ledger_available" in line for line in lines) == 1, err


def test_the_pool_logs_of_others_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    """psycopg_pool's records outside asyncbg's pools go on as they were."""
    from asyncbg._ledgers._postgres import _ours, _relay_pool_logs

    _relay_pool_logs()
    pool_logger = logging.getLogger("psycopg.pool")
    with caplog.at_level(logging.DEBUG):
        pool_logger.warning("error connecting in %r: %s", "app-pool", "refused")
        with _ours():
            pool_logger.warning("error connecting in %r: %s", "asyncbg-ledger", "refused")
    by_logger = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("psycopg.pool", "WARNING", "error connecting in 'app-pool': refused") in by_logger
    assert not [r for r in by_logger if r[0] == "psycopg.pool" and "asyncbg-ledger" in r[2]]
    assert ("asyncbg", "DEBUG", "ledger.pool level='warning' message=\"error connecting in "
            "'asyncbg-ledger': refused\"") in by_logger


def test_psycopg_own_warnings_in_our_calls_go_to_asyncbg_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """psycopg's own logger (``psycopg``, where a call cut short on a silent server says that
    it closes its connection) is relayed as psycopg_pool's is, in asyncbg's dealings only."""
    from asyncbg._ledgers._postgres import _ours, _relay_pool_logs

    _relay_pool_logs()
    logger = logging.getLogger("psycopg")
    said = "query cancellation interrupted (%s): closing connection"
    with caplog.at_level(logging.DEBUG):
        logger.warning(said, "KeyboardInterrupt")
        with _ours():
            logger.warning(said, "CancelledError")
    by_logger = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("psycopg", "WARNING", said % "KeyboardInterrupt") in by_logger
    assert not [r for r in by_logger if r[0] == "psycopg" and "CancelledError" in r[2]]
    assert ("asyncbg", "DEBUG", "ledger.psycopg level='warning' message='query cancellation "
            "interrupted (CancelledError): closing connection'") in by_logger


@pytest.mark.asyncio
async def test_a_busy_pool_on_a_live_server_is_waited_for_not_reported_down(pg_dsn: str) -> None:
    """The short wait for a connection is only for a pool whose attempts to connect fail: a
    call that waits behind a long statement on a live server (the pool's one connection
    busy for 2 s, four of the outage's waits) gets the connection when it is free."""
    ledger = PostgresLedger(pg_dsn, max_connections=1, timeout=20)
    await ledger.open()
    try:
        busy = anyio.Event()

        async def long_statement() -> None:
            async def sleep(conn: Any) -> None:
                busy.set()
                await conn.execute("SELECT pg_sleep(2)")

            await ledger._run(sleep)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_statement)
            await busy.wait()
            assert await ledger.unfinished() == 0  # waited behind it; no LedgerUnavailable
            assert not ledger._down
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_ledger_address_that_answers_nothing_is_given_the_patience_not_more(
    http_fake: HttpFake, tmp_path: Path
) -> None:
    """A database address whose packets go nowhere (here a listener that never accepts: the
    handshake done by the kernel, then silence) is waited for --db-patience, then one line
    and exit 2. An attempt to connect used to run its whole connect timeout past the patience
    (10 s by default; 60 here, in the URL, so that the hang guard tells them apart)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        url = f"postgresql://asyncbg@127.0.0.1:{port}/asyncbg?connect_timeout=60"
        env = env_for(http_fake, tmp_path)
        with anyio.fail_after(30):  # a hang guard: the patience is 1 s
            proc = await anyio.open_process(
                [sys.executable, "-m", "asyncbg", "worker", "--ledger", url,
                 "--db-patience", "1"], env=env, stdout=None, stderr=subprocess.PIPE)
            try:
                code, err = await finished(proc)
            finally:
                if proc.returncode is None:
                    proc.kill()
    assert code == 2, err
    assert err.splitlines() == [
        "asyncbg: postgresql://asyncbg@127.0.0.1:" f"{port}/asyncbg?connect_timeout=60 could "
        "not be reached for 1 s (postgresql://asyncbg@127.0.0.1:" f"{port}/asyncbg?"
        "connect_timeout=60: no answer to the attempt to connect); the worker stops without "
        "having taken any job"], err
    assert creates_per_line(http_fake) == {}  # no line was taken, nothing was created


@pytest.mark.asyncio
async def test_after_an_outage_of_any_length_a_waiting_worker_resumes_at_once(
    pg_dsn: str, http_fake: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """psycopg_pool waits out an outage with a backoff (1, 2, 4... s between its attempts to
    connect) that grew to minutes: the database was back for that long before the worker's
    calls could use it. The pool now gives its backoff up after ``_RECONNECT`` seconds, and
    the next call that wants a connection makes it try at once; an outage of any length ends
    in that state. Time is controlled, not waited: ``_RECONNECT`` is 0.2 s here, and the
    outage lasts until the pool has given up three times. The creates are answered while
    the database is away; the worker records them when it is back and ends every line, each
    created once."""
    from asyncbg._ledgers import _postgres

    monkeypatch.setattr(_postgres, "_RECONNECT", 0.2, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    url, target = await pg_ledger(pg_dsn)
    relay = CuttableRelay(int(urlsplit(url).port or 0), target)
    ledger = PostgresLedger(url, timeout=2.0, connect_timeout=2.0)
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=http_fake.base_url)

    def given_up() -> int:  # psycopg_pool's line, relayed to asyncbg's log (debug)
        return sum("reconnection attempt in pool" in r.getMessage() for r in caplog.records)

    try:
        with caplog.at_level(logging.DEBUG, logger="asyncbg"), anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(relay.serve)
                http_fake.gate.shut()
                done = anyio.Event()

                async def work() -> None:
                    await run_worker(client, ledger, concurrency=LINES, lease=6.0,
                                     exit_when_idle=True, stop=anyio.Event(),
                                     poll_policy=FAST_POLL, idle=0.05, db_patience=120.0)
                    done.set()

                tg.start_soon(work)
                await until(lambda: http_fake.gate.waiting == LINES)
                relay.stop()
                http_fake.gate.open()  # answered while nothing can be recorded
                await until(lambda: given_up() >= 3, within=30)  # it took 5 min
                relay.restore()
                with anyio.fail_after(20):  # a hang guard: the worker ends every line
                    await done.wait()
                tg.cancel_scope.cancel()
    finally:
        await client.close()
    said = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("worker.ledger_available") for m in said) == 1, said
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(LINES)}
    check = PostgresLedger(pg_dsn)
    await check.open()
    try:
        assert [r.status for r in await check.records()] == ["completed"] * LINES
        assert await check.resubmits() == 0
    finally:
        await check.close()
