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
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import openai
import psycopg
import pytest
from anyio.abc import SocketStream, TaskStatus

import asyncbg
from asyncbg._fleet import enqueue_requests, run_worker
from asyncbg._ledgers import LedgerError, LedgerUnavailable, Outcome, Record
from asyncbg._ledgers._base import fingerprint
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg._ledgers._rescue import Kept, Rescue, state_file
from asyncbg._ledgers._shared import LeaseLost, SharedLedger
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

from .conftest import FAST_POLL, HttpFake
from .test_fleet_db_down import free_port, on_port, pipe

N = 4


class Relay:
    """A TCP relay on ``port`` to ``target`` that can be stopped (every connection cut, new ones
    refused, as a database that went away) and started again."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.scope: anyio.CancelScope | None = None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
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


@pytest.mark.asyncio
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
        last = err.strip().splitlines()[-1]  # its last word
        assert "worker.unrecorded" in last, err
        assert f"{N} response ids kept in {kept[0]}: the next asyncbg worker" in last, err
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


@pytest.mark.asyncio
async def test_kept_ids_whose_rows_were_requeued_meanwhile_are_adopted_not_created_again(
    http_fake: HttpFake, pg_dsn: str, tmp_path: Path,
) -> None:
    """Worker A keeps its ids and leaves; worker B, on another machine (another state
    directory) whose creates cannot reach the server, takes the jobs over once A's leases run
    out: its creates are refused, so it puts them back to waiting (``new``) and stops. The next
    worker on A's machine adopts A's responses: one create per line, not two (before, every
    line B had put back was created again)."""
    url, target = await pg_ledger(pg_dsn)
    env = env_for(http_fake, tmp_path / "state")
    async with anyio.create_task_group() as tg:
        relay = Relay(urlsplit(url).port or 0, target)
        await tg.start(relay.serve)
        http_fake.gate.shut()
        code, err = await kept_then_stopped(await worker(url, env, "--db-patience", "120"),
                                            http_fake, relay.stop)
        assert code == 128 + signal.SIGTERM, err
        await tg.start(relay.serve)  # the database is back
        elsewhere = {**env_for(http_fake, tmp_path / "elsewhere"),
                     "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}  # refused
        code, err = await finished(await worker(url, elsewhere, "--exit-when-idle"))
        assert code != 0 and "jobs.requeued" in err, err
        # The creates B sent were refused and put back to waiting; those it had not sent
        # when the first was refused are handed back `sending` (at A's epoch, or at B's when
        # B had written its own `sending` before it stopped: adopted all the same).
        rows = await records_of(pg_dsn)
        assert set(rows.values()) <= {("new", None), ("sending", None)}, rows
        assert ("new", None) in rows.values(), rows
        code, err = await finished(await worker(url, env, "--exit-when-idle"))
        assert code == 0, err
        tg.cancel_scope.cancel()
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(N)}, err
    assert f"adopted={N}" in err and "duplicates=0" in err, err
    assert [r.status for r in await records_list(pg_dsn)] == ["completed"] * N


@pytest.mark.asyncio
async def test_kept_ids_are_adopted_by_a_worker_that_spells_the_database_otherwise(
    http_fake: HttpFake, pg_dsn: str, tmp_path: Path,
) -> None:
    """A keeps its ids with the ledger at ``postgresql://...@127.0.0.1:PORT/DB``; the next
    worker is given ``postgres://...@localhost:PORT/DB``: the same database, so the same rescue
    file, and it adopts them (one create per line)."""
    url, target = await pg_ledger(pg_dsn)
    env = env_for(http_fake, tmp_path / "state")
    other = urlsplit(url)._replace(scheme="postgres",
                                   netloc=f"postgres@localhost:{urlsplit(url).port}").geturl()
    async with anyio.create_task_group() as tg:
        relay = Relay(urlsplit(url).port or 0, target)
        await tg.start(relay.serve)
        http_fake.gate.shut()
        code, err = await kept_then_stopped(await worker(url, env, "--db-patience", "120"),
                                            http_fake, relay.stop)
        assert code == 128 + signal.SIGTERM, err
        await tg.start(relay.serve)  # the database is back
        code, err = await finished(await worker(other, env, "--exit-when-idle"))
        assert code == 0, err
        tg.cancel_scope.cancel()
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(N)}, err
    assert f"adopted={N}" in err and "duplicates=0" in err, err
    assert list((tmp_path / "state" / "asyncbg" / "unrecorded").iterdir()) == []


@pytest.mark.asyncio
async def test_a_worker_out_of_db_patience_names_the_file_in_its_error(
    http_fake: HttpFake, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In-process, with a ledger whose calls give up within 1 s (the command line's wait for a
    connection is 30 s): patience runs out, and the error (the exit line) names the file."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    url, target = await pg_ledger(pg_dsn)
    ledger = PostgresLedger(url, timeout=1.0, connect_timeout=1.0)
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=http_fake.base_url)
    caught: list[LedgerUnavailable] = []
    try:
        async with anyio.create_task_group() as tg:
            relay = Relay(urlsplit(url).port or 0, target)
            await tg.start(relay.serve)
            http_fake.gate.shut()

            async def work() -> None:
                with pytest.raises(LedgerUnavailable) as raised:
                    await run_worker(client, ledger, concurrency=N, lease=6.0,
                                     exit_when_idle=False, stop=anyio.Event(),
                                     poll_policy=FAST_POLL, idle=0.05, db_patience=1.0)
                caught.append(raised.value)
                tg.cancel_scope.cancel()

            tg.start_soon(work)
            await until(lambda: http_fake.gate.waiting == N)
            relay.stop()
            http_fake.gate.open()
            await anyio.sleep(120)  # the test's timeout bounds it; work() ends it
    finally:
        await client.close()
    [kept] = (tmp_path / "state" / "asyncbg" / "unrecorded").iterdir()
    said = str(caught[0])
    assert "could not be reached for 1 s" in said, said
    assert f"{N} response ids kept in {kept}: the next asyncbg worker" in said, said
    assert len(kept_lines(kept)) == N
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(N)}


class BackAsItLeaves(PostgresLedger):
    """The database comes back just after the worker kept its ids, before its hand-back."""

    back: Callable[[], Awaitable[object]]

    async def keep_unrecorded(self, pairs: list[tuple[str, str]]) -> Path:
        try:
            return await super().keep_unrecorded(pairs)
        finally:  # kept or not
            await self.back()
            while True:  # until the pool has connected again (its own backoff decides when)
                try:
                    await self.unfinished()
                    break
                except LedgerError:
                    await anyio.sleep(0.1)


@pytest.mark.parametrize("state", ["writable", "not a directory"])
@pytest.mark.asyncio
async def test_kept_ids_are_adopted_before_the_hand_back_when_the_database_is_back(
    http_fake: HttpFake, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, state: str,
) -> None:
    """Released as they were (``sending``, no owner), the jobs would be taken and created
    again at once by any worker: the hand-back adopts the kept ids first, and records those
    the rescue file could not take (a state directory that cannot be written) the same way."""
    if state == "writable":
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    else:
        (tmp_path / "state").write_text("")
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    url, target = await pg_ledger(pg_dsn)
    ledger = BackAsItLeaves(url, timeout=2.0, connect_timeout=2.0)
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=http_fake.base_url)
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            relay = Relay(urlsplit(url).port or 0, target)
            await tg.start(relay.serve)
            ledger.back = partial(tg.start, relay.serve)
            http_fake.gate.shut()

            async def work() -> None:
                await run_worker(client, ledger, concurrency=N, lease=6.0,
                                 exit_when_idle=False, stop=stop, poll_policy=FAST_POLL,
                                 idle=0.05, db_patience=120.0)
                tg.cancel_scope.cancel()

            tg.start_soon(work)
            await until(lambda: http_fake.gate.waiting == N)
            relay.stop()
            http_fake.gate.open()
            await until(lambda: http_fake.server.counters.creates == N)
            await anyio.sleep(0.5)  # the answers reach the worker, whose writes of them fail
            stop.set()
            await anyio.sleep(120)  # the test's timeout bounds it; work() ends it
        assert f"{N} of them recorded, for the fleet to poll" in caplog.text
        rows = await records_of(pg_dsn)
        assert [state for state, rid in rows.values() if rid] == ["live"] * N, rows
        ledger = PostgresLedger(pg_dsn)
        assert await run_worker(client, ledger, concurrency=N, lease=6.0, exit_when_idle=True,
                                stop=anyio.Event(), poll_policy=FAST_POLL, idle=0.05) == 0
    finally:
        await client.close()
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(N)}
    assert [state for state, _ in (await records_of(pg_dsn)).values()] == ["done"] * N


class Leave(Exception):
    """Leaves the manager's block while it holds responses it could not record."""


@pytest.mark.asyncio
async def test_a_background_manager_adopts_what_the_last_one_on_its_ledger_kept(
    http_fake: HttpFake, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A library BackgroundManager on a PostgreSQL ledger leaves (an error in its block) with
    its creates answered and the database away: their ids are kept in the rescue file. The next
    BackgroundManager on the ledger adopts them as it opens, and its submits of the same keys
    resume them: one create per line."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    url, target = await pg_ledger(pg_dsn)
    requests = [(key, {**body, "metadata": {**body["metadata"], "asyncbg_custom_id": key}})
                for key, body in lines()]
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=http_fake.base_url)
    try:
        async with anyio.create_task_group() as tg:
            relay = Relay(urlsplit(url).port or 0, target)
            await tg.start(relay.serve)
            http_fake.gate.shut()
            with pytest.raises(Leave):
                async with asyncbg.BackgroundManager(
                        client, journal=PostgresLedger(url, timeout=2.0, connect_timeout=2.0),
                        cancel_on_exit=False, poll_policy=FAST_POLL) as mgr:
                    for key, body in requests:
                        await mgr.submit_request(body, key=key)
                    await until(lambda: http_fake.gate.waiting == N)
                    relay.stop()
                    http_fake.gate.open()
                    await until(lambda: len(mgr.unrecorded()) == N)  # answered, not recorded
                    raise Leave
            [kept] = (tmp_path / "state" / "asyncbg" / "unrecorded").iterdir()
            assert sorted(k["key"] for k in kept_lines(kept)) == [f"r{i}" for i in range(N)]
            await tg.start(relay.serve)  # the database is back
            async with asyncbg.BackgroundManager(client, journal=PostgresLedger(url),
                                                 poll_policy=FAST_POLL) as mgr:
                jobs = [await mgr.submit_request(body, key=key) for key, body in requests]
                await mgr.wait_all(jobs)
            tg.cancel_scope.cancel()
    finally:
        await client.close()
    assert creates_per_line(http_fake) == {f"r{i}": 1 for i in range(N)}
    assert f"adopted={N}" in caplog.text and "duplicates=0" in caplog.text, caplog.text
    assert [j.status.value for j in jobs] == ["completed"] * N
    assert not kept.exists()  # every line adopted: the file goes


async def records_list(dsn: str) -> list[Record]:
    check = PostgresLedger(dsn)
    await check.open()
    try:
        return await check.records()
    finally:
        await check.close()


async def records_of(dsn: str) -> dict[str, tuple[str, str | None]]:
    return {r.key: (r.state, r.response_id) for r in await records_list(dsn)}


@pytest.mark.asyncio
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
    said = err.strip().splitlines()[-1]
    assert "worker.unrecorded" in said, err
    made = {r.id: r.metadata["asyncbg_custom_id"]
            for r in http_fake.server._timeline.responses.values()}
    assert len(made) == N
    for rid, key in made.items():
        assert f"{key} ({rid})" in said  # the operator has every id
    assert "could not be kept" in said and "Not a directory" in said, said


@pytest.mark.asyncio
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


# -- the fenced rule, on both ledgers -------------------------------------------------------------


def shared(kind: str, where: str, owner: str) -> SharedLedger:
    if kind == "postgres":
        return PostgresLedger(where, owner=owner)
    return SharedSQLiteLedger(where, owner=owner)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.asyncio
async def test_a_kept_id_is_taken_only_by_a_row_not_sent_again_since(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker A sent k1..k4 at epoch 1 and left; B took them over (epoch 2). k1: B has not
    sent: adopted, and B's send is fenced off. k2: B sent again and recorded its own response:
    the kept one was paid twice. k3: B's create is out: the same. k4: the row has the kept id
    already (recorded after all). k5: not in the ledger."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    where = (request.getfixturevalue("pg_dsn") if kind == "postgres"
             else str(tmp_path / "fleet.db"))
    a, b, c = (shared(kind, where, owner) for owner in ("A", "B", "C"))
    for ledger in (a, b, c):
        await ledger.open()
    try:
        keys = ["k1", "k2", "k3", "k4"]
        await enqueue_requests(a, [(k, {"model": "m", "input": k}) for k in keys])
        assert len(await a.acquire(4, 0.2)) == 4
        for k in keys:
            await a.sending(k, resubmit=False)
        with anyio.fail_after(30):
            while len(taken := await b.acquire(4, 0.2)) < 4:  # past the lease and its margin
                assert not taken
                await anyio.sleep(0.05)
        assert set(await b.renew(keys, 30.0)) == set()
        for k in ("k2", "k3", "k4"):
            await b.sending(k, resubmit=True)
        await b.record("k2", Outcome("in_progress", response_id="resp_b2"))
        await b.record("k4", Outcome("in_progress", response_id="resp_a4"))
        path = await a.keep_unrecorded([(k, f"resp_a{k[1]}") for k in [*keys, "k5"]])
        assert path == c.rescue().path
        adoption = await c.adopt_kept()
        assert [k.key for k in adoption.adopted] == ["k1"]
        assert [k.key for k in adoption.duplicates] == ["k2", "k3", "k5"]
        assert [k.key for k in adoption.recorded] == ["k4"]
        assert c.rescue().entries() == []  # every line was decided: removed
        with pytest.raises(LeaseLost):
            await b.sending("k1", resubmit=True)  # taken over meanwhile: it sends nothing
        rows = {r.key: r for r in await c.records()}
        assert (rows["k1"].state, rows["k1"].response_id) == ("live", "resp_a1")
        assert rows["k2"].response_id == "resp_b2" and rows["k3"].response_id is None
        assert [r.key for r in await c.acquire(4, 30.0, live_only=True)] == ["k1"]
        assert (await c.adopt_kept()).adopted == ()  # nothing left: nothing again
    finally:
        for ledger in (a, b, c):
            await ledger.close()


# -- the file itself -----------------------------------------------------------------------------


def test_a_rescue_file_that_is_a_symlink_or_not_a_regular_file_is_refused(
    tmp_path: Path,
) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(json.dumps({"key": "k", "response_id": "resp_x", "epoch": 1}) + "\n")
    link = tmp_path / "link.unrecorded"
    link.symlink_to(target)
    rescue = Rescue.at(link)
    with pytest.raises(OSError):
        rescue.entries()  # not followed
    with pytest.raises(OSError):
        rescue.keep([("k", "resp_y")], epochs={"k": 1})
    with pytest.raises(OSError):
        rescue.remove([Kept("k", "resp_x", 1)])
    assert target.read_text().count("resp_") == 1  # untouched
    fifo = tmp_path / "fifo.unrecorded"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        Rescue.at(fifo).entries()
    with pytest.raises(OSError, match="not a regular file"):
        Rescue.at(fifo).keep([("k", "resp_y")])


@pytest.mark.asyncio
async def test_a_rescue_symlink_is_refused_by_the_worker_and_by_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    db = tmp_path / "fleet.db"
    ledger = SharedSQLiteLedger(db)
    await ledger.open()
    try:
        (tmp_path / "fleet.db.unrecorded").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(LedgerError, match="cannot be read"):
            await ledger.adopt_kept()
    finally:
        await ledger.close()
    from asyncbg._cli._ops import kept_summary

    said = kept_summary(Rescue(db))
    assert said is not None and said["error"] and said["ids"] == 0
    assert not (tmp_path / "elsewhere").exists()


def test_a_torn_last_line_is_skipped_and_the_next_line_starts_afresh(tmp_path: Path) -> None:
    rescue = Rescue.at(tmp_path / "state" / "x.unrecorded")  # its directory is made
    rescue.reserve()
    rescue.keep([("a", "resp_a"), ("b", "resp_b")], epochs={"a": 3, "b": 4},
                note={"ledger": "postgresql://h:5432/db?schema=public"})
    with rescue.path.open("r+b") as f:  # a crash in the middle of a line
        f.seek(len(rescue.path.read_bytes().rstrip(b"\0")))
        f.write(b'{"key": "c", "respo')
    assert rescue.entries() == [Kept("a", "resp_a", 3), Kept("b", "resp_b", 4)]
    rescue.keep([("d", "resp_d")], epochs={"d": 1})  # on a line of its own, not glued on
    assert rescue.entries() == [Kept("a", "resp_a", 3), Kept("b", "resp_b", 4),
                                Kept("d", "resp_d", 1)]
    rescue.remove([Kept("a", "resp_a", 3)])  # the others stay, the torn line goes
    assert rescue.entries() == [Kept("b", "resp_b", 4), Kept("d", "resp_d", 1)]
    assert b"\"key\": \"c\"" not in rescue.path.read_bytes()
    rescue.remove([Kept("b", "resp_b", 4), Kept("d", "resp_d", 1)])
    assert rescue.entries() == [] and rescue.path.exists()  # zeroed, reservation kept
    rescue.release()
    assert not rescue.path.exists()


def test_the_state_file_is_named_from_the_ledger_not_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    one = state_file("postgresql://h:5432/db?schema=public")
    assert one.parent == tmp_path / "asyncbg" / "unrecorded"
    assert one.name.endswith(".unrecorded")
    assert one != state_file("postgresql://h:5432/db?schema=other")
    monkeypatch.setenv("XDG_STATE_HOME", "relative")  # not absolute: ignored (the XDG spec)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state_file("x").parent == tmp_path / "home" / ".local" / "state" / "asyncbg" / \
        "unrecorded"


#: Every state a kept line's row can be in when a worker looks at it, after worker A sent the
#: key's create at epoch 1 (and kept its id), and what the worker makes of the line. B is
#: another worker that took the key over once A's lease ran out.
ROW_STATES: dict[str, tuple[str, str]] = {
    # A handed the lease back as it left: still `sending` at A's epoch, nobody on it.
    "released by A": ("adopted", "live"),
    # B took it over and has not sent: fenced off (its `sending` write finds the lease gone).
    "taken over, not sent": ("adopted", "live"),
    # B's create never reached the server (connection refused): ended `local`, requeued by B.
    "requeued": ("adopted", "live"),
    # B's create failed without a response (`local`) and `asyncbg retry` put it back.
    "retried": ("adopted", "live"),
    # Requeued, then D claimed it and its lease ran out before it wrote `sending`: D is fenced.
    "requeued, lease ran out": ("adopted", "live"),
    # Requeued, then B claimed it again and holds a live lease: B may create at any moment.
    "requeued, held by B": ("duplicate", "new"),
    # Requeued, then claimed for another request (a new digest) and handed back.
    "requeued, another request": ("duplicate", "new"),
    # B sent its own create (its answer not recorded yet, or lost) and holds the lease.
    "sent again by B": ("duplicate", "sending"),
    # B wrote `sending` and left without an answer (stopped before its create left, or its
    # id lost): adopted rather than created a third time, and counted a possible duplicate.
    "sending by B, who left": ("adopted", "live"),
    # B's create was answered and recorded.
    "B's response recorded": ("duplicate", "live"),
    # B's create failed without a response and nobody requeued it: the job ended unpaid, and
    # the kept response is its answer after all (it was reported and lost, and a later
    # `asyncbg retry` created the line again).
    "ended local": ("adopted", "live"),
    # B finished it with its own response.
    "done by B": ("duplicate", "done"),
    # The row holds the kept id already (recorded after all).
    "recorded": ("recorded", "live"),
}


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.asyncio
async def test_a_kept_id_is_adopted_by_every_row_on_which_nothing_was_sent_since(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rule over every state a row can be in (ROW_STATES): adopted when the row has no
    response id and is still `sending` at the kept epoch, or is for the same request with
    nobody holding a live lease on it (put back to waiting, ended unpaid, or `sending` by a
    worker that left), else reported; and the adoption fences whoever held the row
    meanwhile without having sent."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    where = (request.getfixturevalue("pg_dsn") if kind == "postgres"
             else str(tmp_path / "fleet.db"))
    a, b, c = (shared(kind, where, owner) for owner in ("A", "B", "C"))
    d = shared(kind, where, "D")
    d.lease = 0.2
    keys = list(ROW_STATES)
    rid = {k: f"resp_a{n}" for n, k in enumerate(keys)}
    for ledger in (a, b, c, d):
        await ledger.open()
    try:
        await enqueue_requests(a, [(k, {"model": "m", "input": k}) for k in keys])
        records = {r.key: r for r in await a.acquire(len(keys), 0.2)}
        assert set(records) == set(keys)
        for k, r in records.items():
            await a.claim(k, r.digest, r.request)
            await a.sending(k, resubmit=False)
        path = await a.keep_unrecorded([(k, rid[k]) for k in keys])  # A leaves
        await a.release(["released by A"])
        taken: dict[str, Record] = {}
        with anyio.fail_after(30):
            while len(taken) < len(keys):  # past A's lease and its margin
                taken.update((r.key, r) for r in await b.acquire(len(keys), 30.0))
                await anyio.sleep(0.05)
        for k, r in taken.items():
            await b.claim(k, r.digest, r.request)
        await b.release(["released by A"])
        unreached = Outcome("failed", error="refused", error_code="connection_error")
        for k in keys[2:]:
            if k != "recorded":
                await b.sending(k, resubmit=True)
        for k in ("requeued", "requeued, lease ran out", "requeued, held by B",
                  "requeued, another request"):
            await b.record(k, unreached)
            await b.requeue([k])
        await b.release(["sending by B, who left"])
        await b.record("retried", Outcome("failed", error="slow", error_code="rate_limited"))
        assert await b.requeue_unpaid(code="rate_limited") == 1  # asyncbg retry
        await b.record("ended local", Outcome("failed", error="bad", error_code="invalid"))
        await b.record("B's response recorded", Outcome("in_progress", response_id="resp_b"))
        await b.record("done by B", Outcome("completed", response_id="resp_b2"))
        await b.sending("recorded", resubmit=True)
        await b.record("recorded", Outcome("in_progress", response_id=rid["recorded"]))
        r = records["requeued, held by B"]
        await b.claim(r.key, r.digest, r.request)
        r = records["requeued, another request"]
        digest, other = fingerprint({"model": "m", "input": "another"})
        await b.claim(r.key, digest, other)
        await b.release([r.key])
        r = records["requeued, lease ran out"]
        await d.claim(r.key, r.digest, r.request)
        await anyio.sleep(0.5)  # D's lease (0.2 s) runs out; D has not written `sending`

        assert path == c.rescue().path
        adoption = await c.adopt_kept()
        verdicts = {k.key: "adopted" for k in adoption.adopted}
        verdicts |= {k.key: "duplicate" for k in adoption.duplicates}
        verdicts |= {k.key: "recorded" for k in adoption.recorded}
        rows = {r.key: r for r in await c.records()}
        assert {k: (verdicts[k], rows[k].state) for k in keys} == ROW_STATES
        for k, (verdict_, _) in ROW_STATES.items():
            if verdict_ != "duplicate":
                assert rows[k].response_id == rid[k], k
            else:
                assert rows[k].response_id != rid[k], k
        assert c.rescue().entries() == []  # every line was decided: removed
        # B's resends were counted as they were written; adopting over B's `sending` counts
        # one more (B's create may have left), over a row put back to waiting none.
        assert [rows[k].resubmits for k in ("released by A", "requeued", "sent again by B",
                                            "sending by B, who left")] == [0, 1, 1, 2]
        for fenced, k in ((b, "taken over, not sent"), (d, "requeued, lease ran out")):
            with pytest.raises(LeaseLost):
                await fenced.sending(k, resubmit=False)  # adopted meanwhile: it sends nothing
        await b.sending("requeued, held by B", resubmit=False)  # its lease was left alone
        adopted = sorted(k for k, (v, _) in ROW_STATES.items() if v == "adopted")
        assert sorted(r.key for r in await c.acquire(len(keys), 30.0, live_only=True)) == \
            adopted  # handed to the fleet to poll
    finally:
        for ledger in (a, b, c, d):
            await ledger.close()


def spellings(dsn: str) -> list[str]:
    """Ways to name the database of ``dsn`` (a URL with 127.0.0.1 and a port); the last one
    leaves the port to PGPORT (libpq's default port)."""
    parts = urlsplit(dsn)
    user, port, db = parts.username or "postgres", parts.port, parts.path.lstrip("/")
    auth = f"{user}:{parts.password}@" if parts.password else f"{user}@"
    return [
        f"postgresql://{auth}localhost:{port}/{db}",
        f"POSTGRES://{auth}127.0.0.1:{port}/{db}",
        f"host=localhost port={port} dbname={db} user={user}"
        + (f" password={parts.password}" if parts.password else ""),
        f"postgresql://{auth}127.0.0.1/{db}?connect_timeout=5",
    ]


@pytest.mark.asyncio
async def test_every_spelling_of_a_database_names_one_rescue_file(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file is named from what the server says it is (its system identifier, the
    database's OID, the schema), read when the ledger opens: a line kept by a ledger opened
    with one spelling is adopted by a ledger opened with any other."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("PGPORT", str(urlsplit(pg_dsn).port))
    a = PostgresLedger(pg_dsn, owner="A")
    await a.open()
    try:
        await enqueue_requests(a, [(f"k{i}", {"model": "m", "input": "x"}) for i in range(4)])
        for r in await a.acquire(4, 30.0):
            await a.claim(r.key, r.digest, r.request)
            await a.sending(r.key, resubmit=False)
        for n, spelling in enumerate(spellings(pg_dsn)):
            path = await a.keep_unrecorded([(f"k{n}", f"resp_{n}")])
            other = PostgresLedger(spelling, owner=f"C{n}")
            await other.open()
            try:
                assert other.rescue().path == path, spelling
                assert [k.key for k in (await other.adopt_kept()).adopted] == [f"k{n}"]
            finally:
                await other.close()
    finally:
        await a.close()


@pytest.mark.asyncio
async def test_a_user_who_may_not_read_the_control_data_names_the_file_by_address(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pg_control_system() not granted (some managed servers): the file is named from the
    address and port the server sees the connection on, so ``localhost`` and ``127.0.0.1``
    still agree; the password is in no name."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    role = f"asyncbg_plain_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'sekrit-pw'")
        conn.execute(f"GRANT ALL ON SCHEMA public TO {role}")
        conn.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    try:
        parts = urlsplit(pg_dsn)
        paths = []
        for host in ("127.0.0.1", "localhost"):
            ledger = PostgresLedger(parts._replace(
                netloc=f"{role}:sekrit-pw@{host}:{parts.port}").geturl())
            await ledger.open()
            try:
                paths.append(ledger.rescue().path)
                assert "sekrit" not in repr(ledger._identity)
                assert ledger._identity is not None
                assert ledger._identity.startswith("postgresql://127.0.0.1:")
            finally:
                await ledger.close()
        assert paths[0] == paths[1]
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
