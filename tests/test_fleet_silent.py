"""A fleet worker whose PostgreSQL goes silent mid-run: its connections stay open and nothing
comes back (packets dropped on the way), rather than refused (tests/test_fleet_patience.py).

The silence is real: a TCP relay between the worker and the test's server stops forwarding in
both ways without closing anything (what it reads meanwhile is held, as a network that drops
packets holds them in the sender's retransmissions), and lets everything through again when
the test says so. The worker's first call into the silence used to wait its whole per-call
timeout (the pool's 30 s plus a margin) before the outage was even noticed.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import openai
import pytest
from anyio.abc import SocketStream, TaskStatus

from asyncbg._fleet import enqueue_requests, run_worker
from asyncbg._ledgers._postgres import PostgresLedger

from .conftest import FAST_POLL, HttpFake
from .test_fleet_db_down import free_port, on_port
from .test_fleet_rescue import creates_per_line, env_for, finished, until


class SilentRelay:
    """A TCP relay on ``port`` to ``target`` that can go silent (:meth:`silence`): it stops
    forwarding, both ways, and closes nothing; new connections are taken and not forwarded
    either. :meth:`speak` lets what was held through, and everything after it."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.flowing = anyio.Event()
        self.flowing.set()
        #: Chunks that arrived while silent (held until :meth:`speak`).
        self.held = 0

    def silence(self) -> None:
        if self.flowing.is_set():
            self.flowing = anyio.Event()

    def speak(self) -> None:
        self.flowing.set()

    async def _pipe(self, a: SocketStream, b: SocketStream) -> None:
        try:
            async for chunk in a:
                if not self.flowing.is_set():
                    self.held += 1
                    await self.flowing.wait()
                await b.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            await b.aclose()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async def relay(client: SocketStream) -> None:
            async with client, await anyio.connect_tcp(*self.target) as server, \
                    anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, client, server)
                tg.start_soon(self._pipe, server, client)

        async with await anyio.create_tcp_listener(local_host="127.0.0.1",
                                                   local_port=self.port) as lis:
            task_status.started()
            await lis.serve(relay)


async def silent_ledger(pg_dsn: str, lines: int, duration: str) -> tuple[SilentRelay, str]:
    """``lines`` lines enqueued (each running ``duration`` seconds on the fake); the relay to
    the database, and the URL through it."""
    setup = PostgresLedger(pg_dsn)
    await setup.open()
    try:
        await enqueue_requests(setup, [
            (f"r{i}", {"model": "m", "input": f"line {i}",
                       "metadata": {"fake_duration": duration}}) for i in range(lines)])
    finally:
        await setup.close()
    real = urlsplit(pg_dsn)
    port = free_port()
    return (SilentRelay(port, (real.hostname or "127.0.0.1", real.port or 5432)),
            on_port(pg_dsn, port))


@pytest.mark.asyncio
async def test_a_worker_whose_database_goes_silent_leaves_at_its_patience(
    pg_dsn: str, http_fake: HttpFake, tmp_path: Path
) -> None:
    """``--db-patience 2``; two lines live (polled), a third waiting; then silence, to the
    end. The worker leaves by itself, rc 2, with one line whose numbers are true, and nothing
    of psycopg's on its stderr; nothing was created after the silence. It used to stay for
    the pool's timeout (35 s) at its first call into the silence, then the hand-back (42 s
    measured with a patience of 5), and its last line named that timeout ("did not answer
    within 35 s"), with psycopg's warnings above it: what tells before from after is the
    lines, not the time. The hang guard below (120 s) is only a safety net."""
    relay, url = await silent_ledger(pg_dsn, 3, "600")
    env = env_for(http_fake, tmp_path)
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        proc = await anyio.open_process(
            [sys.executable, "-m", "asyncbg", "worker", "--ledger", url, "--concurrency",
             "2", "--db-patience", "2"], env=env, stdout=None, stderr=subprocess.PIPE)
        try:
            await until(lambda: http_fake.server.counters.creates == 2)
            await until(lambda: http_fake.server.counters.retrieves >= 2)  # live, polled
            relay.silence()
            with anyio.fail_after(120):  # a safety net, see above
                code, err = await finished(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
            tg.cancel_scope.cancel()
    assert relay.held, "the database was never asked anything during the silence"
    assert code == 2, err
    lines = err.strip().splitlines()
    last = lines[-1]
    assert last.startswith("asyncbg: ") and "could not be reached for 2 s" in last, err
    assert "no answer for 2 s" in last, err
    assert not [line for line in lines if "psycopg" in line or "cancellation" in line
                or line.startswith((" ", "\t"))], err
    assert sum("worker.ledger_unavailable" in line for line in lines) <= 1, err
    assert creates_per_line(http_fake) == {"r0": 1, "r1": 1}


@pytest.mark.asyncio
async def test_a_database_silent_for_less_than_the_patience_is_waited_out(
    pg_dsn: str, http_fake: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Silence while the creates are out and answered; the worker says the outage (its
    per-call timeout, 600 s here, is not waited for that: the hang guard would stop the
    test); the database answers again, and the worker ends every line, each created once,
    with the outage said once each way."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    lines = 4
    relay, url = await silent_ledger(pg_dsn, lines, "0.3")
    ledger = PostgresLedger(url, timeout=600.0, connect_timeout=600.0)
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=http_fake.base_url)

    def said(event: str) -> int:
        return sum(r.getMessage().startswith(event) for r in caplog.records)

    try:
        with caplog.at_level(logging.DEBUG, logger="asyncbg"), anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                await tg.start(relay.serve)
                http_fake.gate.shut()
                done = anyio.Event()

                async def work() -> None:
                    await run_worker(client, ledger, concurrency=lines, lease=30.0,
                                     exit_when_idle=True, stop=anyio.Event(),
                                     poll_policy=FAST_POLL, idle=0.05, db_patience=120.0)
                    done.set()

                tg.start_soon(work)
                await until(lambda: http_fake.gate.waiting == lines)
                relay.silence()
                http_fake.gate.open()  # answered while nothing can be recorded
                await until(lambda: said("worker.ledger_unavailable") == 1, within=60)
                relay.speak()
                await done.wait()
                tg.cancel_scope.cancel()
    finally:
        await client.close()
    assert said("worker.ledger_available") == 1, caplog.text
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(lines)}
    check = PostgresLedger(pg_dsn)
    await check.open()
    try:
        assert [r.status for r in await check.records()] == ["completed"] * lines
        assert await check.resubmits() == 0
    finally:
        await check.close()
