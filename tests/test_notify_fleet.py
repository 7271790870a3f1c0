"""Notifications across processes: a ``kill -9`` of ``asyncbg run`` and the rerun that delivers
what it left, two ``asyncbg worker`` processes sharing one PostgreSQL outbox, and the operator's
``asyncbg notify`` and ``asyncbg status``; each against a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
import pytest_asyncio
from anyio.abc import Process
from openai import AsyncOpenAI

from asyncbg.testing import WebhookReceiver, new_secret

from .conftest import HttpFake, manager, meta
from .test_fleet import write_input

SECRET = new_secret()


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(SECRET) as r:
        yield r


def environ(http_fake: HttpFake | None) -> dict[str, str]:
    env = {**os.environ, "ASYNCBG_NOTIFY_SECRET": SECRET, "OPENAI_API_KEY": "sk-test"}
    if http_fake is not None:
        env["OPENAI_BASE_URL"] = http_fake.base_url
    return env


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-m", "asyncbg", *args], env=env,
                                       check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def start(env: dict[str, str], *args: str) -> Process:
    return await anyio.open_process([sys.executable, "-m", "asyncbg", *args], env=env)


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):  # another process's state: nothing to wait on but time
        while True:
            if check():
                return
            await anyio.sleep(0.05)


def pending_in(journal: Path) -> int:
    if not journal.exists():
        return 0  # connecting would make an empty file, which asyncbg refuses
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute(
                "SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0])
    except sqlite3.OperationalError:  # not made yet
        return 0


async def output_of(proc: Process) -> str:
    assert proc.stderr is not None
    chunks = []
    async for chunk in proc.stderr:
        chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.mark.asyncio
async def test_a_killed_run_leaves_its_notifications_and_the_rerun_delivers_them(
    http_fake: HttpFake, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    n = 30
    source = write_input(tmp_path / "in.jsonl", n, 0.05)
    out, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.journal"
    argv = ["run", str(source), "-o", str(out), "--notify", receiver.url, "--concurrency", "32"]
    env = environ(http_fake)
    await receiver.down()
    proc = await start(env, *argv)
    try:
        await until(lambda: pending_in(journal) == n)  # every job done, nothing delivered
        assert proc.returncode is None  # waiting for the receiver (--notify-wait 60)
    finally:
        proc.kill()  # SIGKILL: no cleanup at all
        await proc.wait()
    assert http_fake.server.counters.creates == n
    await receiver.up()
    code, _, err = await cli(env, *argv)
    assert code == 0, err
    assert sorted(receiver.by_key()) == sorted(f"q{i}" for i in range(n)), err  # 0 lost
    assert receiver.duplicates == 0 and receiver.rejected == 0
    assert http_fake.server.counters.creates == n  # the rerun sent nothing but notifications
    assert pending_in(journal) == 0


@pytest.mark.asyncio
async def test_a_run_names_what_is_still_pending_when_it_gives_up_waiting(
    http_fake: HttpFake, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    source = write_input(tmp_path / "in.jsonl", 3, 0.02)
    await receiver.down()
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--notify", receiver.url,
            "--notify-wait", "0.5"]
    code, _, err = await cli(environ(http_fake), *argv)
    assert code == 0, err
    assert "notify.pending" in err and "count=3" in err and "'q0'" in err
    assert SECRET not in err and SECRET[6:] not in err
    missing = {k: v for k, v in environ(http_fake).items() if k != "ASYNCBG_NOTIFY_SECRET"}
    code, _, err = await cli(missing, *argv)
    assert code == 2 and "ASYNCBG_NOTIFY_SECRET" in err and "nothing was sent" in err


@pytest.mark.asyncio
async def test_two_workers_share_the_postgres_outbox_and_send_each_once(
    http_fake: HttpFake, receiver: WebhookReceiver, pg_dsn: str, tmp_path: Path
) -> None:
    n = 40
    env = environ(http_fake)
    code, _, err = await cli(env, "submit", str(write_input(tmp_path / "in.jsonl", n, 0.1)),
                             "--ledger", pg_dsn)
    assert code == 0, err
    await receiver.down()
    workers = [await start(env, "worker", "--ledger", pg_dsn, "--exit-when-idle",
                           "--lease", "1.5", "--concurrency", "16", "--notify", receiver.url,
                           "--notify-wait", "30", "--log-level", "debug") for _ in range(2)]

    def pending() -> int:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM asyncbg_outbox WHERE state = 'pending'").fetchone()
            return int(row[0]) if row else 0

    try:
        # Most jobs done, their notifications waiting in the one outbox that both workers
        # deliver from: they compete for the same rows.
        await until(lambda: pending() >= n // 2)
        receiver.answer(200, delay=0.05)  # slow enough for the two to overlap
        await receiver.up()
        async with anyio.create_task_group() as tg:
            logs = [""] * 2
            for i, proc in enumerate(workers):
                async def collect(i: int = i, proc: Process = proc) -> None:
                    logs[i] = await output_of(proc)
                tg.start_soon(collect)
        with anyio.fail_after(40):
            codes = [await proc.wait() for proc in workers]
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    print("\n=====\n".join(logs))
    assert codes == [0, 0], logs
    assert sorted(receiver.by_key()) == sorted(f"q{i}" for i in range(n)), err  # 0 lost
    assert receiver.duplicates == 0  # each was posted by one worker at a time
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM asyncbg_outbox").fetchone() == (0,)


@pytest.mark.asyncio
async def test_asyncbg_notify_sends_what_is_pending_and_status_shows_it(
    client: AsyncOpenAI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    from asyncbg import Notify

    journal = tmp_path / "j.db"
    notify = Notify(receiver.url, secret=SECRET, backoff=0.02, wait_on_exit=5.0)
    receiver.gone()  # these three are refused for good: failed
    async with manager(client, journal=journal, notify=notify) as mgr:
        for i in range(3):
            await mgr.submit(key=f"gone{i}", model="m", input="x", metadata=meta(0.01))
    await receiver.down()  # these three wait: pending
    notify = Notify(receiver.url, secret=SECRET, backoff=0.02, wait_on_exit=0.0)
    async with manager(client, journal=journal, notify=notify) as mgr:
        for i in range(3):
            await mgr.submit(key=f"wait{i}", model="m", input="x", metadata=meta(0.01))
    env = environ(None)

    code, out, err = await cli(env, "status", "--ledger", str(journal), "--json")
    assert code == 0, err
    notes: dict[str, Any] = json.loads(out)["notifications"]
    assert (notes["pending"], notes["failed"]) == (3, 3)
    assert sorted(d["key"] for d in notes["failed_deliveries"]) == ["gone0", "gone1", "gone2"]
    assert {d["http_status"] for d in notes["failed_deliveries"]} <= {410, None}
    code, out, err = await cli(env, "status", "--ledger", str(journal))
    assert code == 0, err
    assert "notifications: 3 pending, 3 failed" in out
    assert f"asyncbg notify --ledger {journal} --retry-failed" in out

    await receiver.up()
    receiver.recover()
    code, _, err = await cli({**env, "ASYNCBG_NOTIFY_SECRET": ""}, "notify", "--ledger",
                             str(journal))
    assert code == 2 and "ASYNCBG_NOTIFY_SECRET" in err
    code, out, err = await cli(env, "notify", "--ledger", str(journal))
    assert code == 1, err  # the failed ones are left
    assert out == "delivered 3 notification(s); 0 still pending, 3 failed\n"
    assert sorted(receiver.by_key()) == ["wait0", "wait1", "wait2"]
    code, out, err = await cli(env, "notify", "--ledger", str(journal), "--retry-failed")
    assert code == 0, err
    assert out == "delivered 3 notification(s); 0 still pending, 0 failed\n"
    assert sorted(receiver.by_key()) == sorted([*(f"gone{i}" for i in range(3)),
                                                *(f"wait{i}" for i in range(3))])
    assert receiver.duplicates == 0
    code, out, _ = await cli(env, "status", "--ledger", str(journal), "--json")
    assert json.loads(out)["notifications"] | {"pending_deliveries": [],
                                                "failed_deliveries": []} == {
        "pending": 0, "failed": 0, "pending_deliveries": [], "failed_deliveries": []}
