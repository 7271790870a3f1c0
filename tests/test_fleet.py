"""Fleets end to end: `asyncbg submit`, several `asyncbg worker` processes and `asyncbg results`
on one shared ledger (PostgreSQL, and SQLite on one machine), against the fake server over HTTP;
and BackgroundManager processes sharing a PostgreSQL journal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import openai
import psycopg
import pytest

import asyncbg
import asyncbg._manager
from asyncbg import JobStatus, ManagerStateError
from asyncbg._fleet import prepared
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg.providers import OpenAIResponses
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_POLL, HeldClock, HttpFake

LEASE = 1.5


# -- helpers -------------------------------------------------------------------------------------


def write_input(path: Path, n: int, duration: float, *, prefix: str = "q") -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/responses",
                "body": {"model": "gpt-4o-mini", "input": f"line {i}",
                         "metadata": {"fake_duration": str(duration)}},
            }) + "\n")
    return path


class Fleet:
    """Runs the CLI as separate processes against the fake server and one ledger."""

    def __init__(self, http_fake: HttpFake, ledger: str, tmp: Path) -> None:
        self.ledger = ledger
        self.tmp = tmp
        self.env = {**os.environ, "OPENAI_API_KEY": "sk-test",
                    "OPENAI_BASE_URL": http_fake.base_url}
        self.workers: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "asyncbg", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)

    def worker(self, *extra: str, lease: float = LEASE,
               concurrency: int = 16) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"worker{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "asyncbg", "worker", "--ledger", self.ledger,
             "--lease", str(lease), "--concurrency", str(concurrency), "--exit-when-idle",
             *extra], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.workers.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
        code = proc.wait(timeout)
        if code not in (0, -signal.SIGKILL, 128 + signal.SIGTERM):
            index = self.workers.index(proc)
            print((self.tmp / f"worker{index}.log").read_text(), file=sys.stderr)
        return code

    def stop_all(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def results(self) -> dict[str, dict[str, Any]]:
        out = self.tmp / "out.jsonl"
        done = self.cli("results", "--ledger", self.ledger, "-o", str(out))
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        by_id = {line["custom_id"]: line for line in lines}
        assert len(by_id) == len(lines)  # exactly one line per custom_id
        return by_id


@pytest.fixture
def fleet_pg(http_fake: HttpFake, pg_dsn: str, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(http_fake, pg_dsn, tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def rows(dsn: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def owned_live(dsn: str, pid: int) -> dict[str, str]:
    """key -> response id of the live jobs whose lease the worker ``pid`` holds."""
    return dict(rows(dsn, "SELECT key, response_id FROM asyncbg_jobs WHERE owner LIKE %s "
                          "AND state = 'live' AND lease_until > extract(epoch FROM now())",
                     f"%:{pid}:%"))


def sending(dsn: str, pid: int) -> int:
    """How many creates the worker ``pid`` has on their way (``sending`` rows it holds)."""
    return int(rows(dsn, "SELECT count(*) FROM asyncbg_jobs WHERE owner LIKE %s "
                         "AND state = 'sending'", f"%:{pid}:%")[0][0])


def live_count(dsn: str) -> int:
    return int(rows(dsn, "SELECT count(*) FROM asyncbg_jobs WHERE state = 'live'")[0][0])


def resubmits(dsn: str) -> int:
    return int(rows(dsn, "SELECT COALESCE(sum(resubmits), 0) FROM asyncbg_jobs")[0][0])


# -- submit, workers, results ----------------------------------------------------------------------


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_three_workers_run_every_line_exactly_once(
    http_fake: HttpFake, tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    ledger = request.getfixturevalue("pg_dsn") if store == "postgres" else str(tmp_path / "j.db")
    fleet = Fleet(http_fake, ledger, tmp_path)
    source = write_input(tmp_path / "in.jsonl", 60, 0.3)
    try:
        first = fleet.cli("submit", str(source), "--ledger", ledger)
        assert (first.returncode, first.stdout) == (0, "60 new of 60 lines (0 already in the "
                                                       "ledger)\n"), first.stderr
        again = fleet.cli("submit", str(source), "--ledger", ledger)
        assert again.stdout.startswith("0 new of 60 lines")
        changed = tmp_path / "changed.jsonl"
        changed.write_text(json.dumps({"custom_id": "extra", "method": "POST",
                                       "url": "/v1/responses", "body": {"model": "m"}}) + "\n"
                           + source.read_text().replace('"line 7"', '"line seven"'))
        refused = fleet.cli("submit", str(changed), "--ledger", ledger)
        assert refused.returncode == 2
        assert f"{changed}:9: custom_id 'q7' is already in the ledger with a different body; " \
               f"nothing from {changed} was enqueued" in refused.stderr
        procs = [fleet.worker(concurrency=8) for _ in range(3)]
        assert [fleet.wait(p) for p in procs] == [0, 0, 0]
        results = fleet.results()
    finally:
        fleet.stop_all()
    assert sorted(results) == sorted(f"q{i}" for i in range(60))  # not "extra"
    assert {line["response"]["body"]["status"] for line in results.values()} == {"completed"}
    assert all(line["error"] is None for line in results.values())
    counters = http_fake.server.counters
    assert counters.creates == 60 and counters.cancels == 0
    # Every response was polled by one worker at a time: a handful of polls each, no more.
    assert max(counters.polls.values()) <= 3
    body = results["q7"]["response"]["body"]
    assert body["metadata"]["asyncbg_custom_id"] == "q7"  # an orphan could be matched


def test_a_sigkilled_workers_jobs_are_taken_over_and_polled_by_their_ids(
    fleet_pg: Fleet, http_fake: HttpFake, pg_dsn: str, tmp_path: Path
) -> None:
    n = 45
    assert fleet_pg.cli("submit", str(write_input(tmp_path / "in.jsonl", n, 2.5)),
                        "--ledger", pg_dsn).returncode == 0
    http_fake.hold()  # every response stays live until the victim is dead
    victim, *survivors = [fleet_pg.worker() for _ in range(3)]
    # The victim holds live responses, and no create of its is on its way (a kill then would
    # be the journal's admitted window, not what this test is about).
    wait_for(lambda: bool(owned_live(pg_dsn, victim.pid)) and not sending(pg_dsn, victim.pid),
             timeout=120)
    orphans = owned_live(pg_dsn, victim.pid)
    polls_before = {rid: http_fake.server.counters.polls.get(rid, 0) for rid in orphans.values()}
    victim.kill()
    assert fleet_pg.wait(victim) == -signal.SIGKILL
    http_fake.release()
    assert [fleet_pg.wait(p) for p in survivors] == [0, 0]
    results = fleet_pg.results()
    assert sorted(results) == sorted(f"q{i}" for i in range(n))
    assert {line["response"]["body"]["status"] for line in results.values()} == {"completed"}
    counters = http_fake.server.counters
    assert counters.creates == n + resubmits(pg_dsn)
    for key, rid in orphans.items():
        assert results[key]["response"]["body"]["id"] == rid  # the same response, polled on
        assert counters.polls[rid] > polls_before[rid]  # by a survivor, once the lease ran out


def test_a_sigtermed_worker_hands_its_leases_back_at_once(
    fleet_pg: Fleet, http_fake: HttpFake, pg_dsn: str, tmp_path: Path
) -> None:
    n = 30
    assert fleet_pg.cli("submit", str(write_input(tmp_path / "in.jsonl", n, 2.0)),
                        "--ledger", pg_dsn).returncode == 0
    lease = 60.0  # it must not matter: the leases are handed back
    http_fake.hold()  # every response stays live until the victim has stopped
    victim, survivor = (fleet_pg.worker(lease=lease, concurrency=15) for _ in range(2))
    wait_for(lambda: live_count(pg_dsn) == n and bool(owned_live(pg_dsn, victim.pid)),
             timeout=120)
    handed = owned_live(pg_dsn, victim.pid)
    victim.send_signal(signal.SIGTERM)
    assert fleet_pg.wait(victim, timeout=lease / 2) == 128 + signal.SIGTERM  # not the lease
    assert not rows(pg_dsn, "SELECT key FROM asyncbg_jobs WHERE owner LIKE %s",  # handed back
                    f"%:{victim.pid}:%")
    http_fake.release()
    assert fleet_pg.wait(survivor, timeout=lease / 2) == 0  # well before the 60 s lease
    results = fleet_pg.results()
    assert len(results) == n
    counters = http_fake.server.counters
    assert counters.creates == n and counters.cancels == 0  # nothing cancelled, nothing resent
    for key, rid in handed.items():
        assert results[key]["response"]["body"]["id"] == rid


# -- BackgroundManager processes sharing a PostgreSQL journal --------------------------------------


@pytest.mark.asyncio
async def test_two_managers_submitting_one_key_create_it_once(pg_dsn: str) -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.3))
    clients = [fake_client(server), fake_client(server)]
    try:
        async with (
            asyncbg.BackgroundManager(clients[0], journal=pg_dsn, poll_policy=FAST_POLL) as one,
            asyncbg.BackgroundManager(clients[1], journal=pg_dsn, poll_policy=FAST_POLL) as two,
        ):
            owner = await one.submit(key="k", model="m", input="hello")
            await owner.wait_accepted()  # created: the other process follows it
            # A deadline does not cancel another process's response; it is followed on (even
            # one that has passed before the job is first scheduled).
            follower = await two.submit(key="k", model="m", input="hello", deadline=1e-6)
            assert follower.status is JobStatus.PENDING
            with anyio.fail_after(10):
                await follower.wait()
            assert isinstance(two.journal, PostgresLedger)
            assert two.journal.round_trips < 200  # read at the poll policy's pace, not in a loop
        assert owner.status is follower.status is JobStatus.COMPLETED
        assert follower.response_id == owner.response_id
        assert (await follower.result()).output_text == "echo: hello"
        assert server.counters.creates == 1
    finally:
        for c in clients:
            await c.close()


OWNER_SCRIPT = """
import sys, anyio, openai, asyncbg
from asyncbg._ledgers._postgres import PostgresLedger

async def main() -> None:
    client = openai.AsyncOpenAI(base_url=sys.argv[2], api_key="sk-test", max_retries=0)
    ledger = PostgresLedger(sys.argv[1], lease=float(sys.argv[3]))
    async with asyncbg.BackgroundManager(client, journal=ledger) as mgr:
        job = await mgr.submit(key="k", model="m", input="hello",
                               metadata={"fake_duration": "2.0"})
        print(await job.wait_accepted(), flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


@pytest.mark.asyncio
async def test_a_follower_takes_over_when_the_owner_process_dies(
    pg_dsn: str, http_fake: HttpFake
) -> None:
    owner = await anyio.open_process([sys.executable, "-c", OWNER_SCRIPT, pg_dsn,
                                      http_fake.base_url, "1.0"], stderr=None)
    client = openai.AsyncOpenAI(base_url=http_fake.base_url, api_key="sk-test", max_retries=0)
    try:
        assert owner.stdout is not None
        out = b""
        with anyio.fail_after(20):
            while not out.endswith(b"\n"):
                out += await owner.stdout.receive()
        rid = out.decode().strip()
        assert rid.startswith("resp_")
        ledger = PostgresLedger(pg_dsn, lease=1.0)
        async with asyncbg.BackgroundManager(client, journal=ledger,
                                             poll_policy=FAST_POLL) as mgr:
            job = await mgr.submit(key="k", model="m", input="hello",
                                   metadata={"fake_duration": "2.0"})
            await anyio.sleep(0.3)
            assert job.status is JobStatus.PENDING  # following: the owner is alive
            owner.kill()
            with anyio.fail_after(10):
                await job.wait()
        assert job.status is JobStatus.COMPLETED and job.response_id == rid
        assert http_fake.server.counters.creates == 1
    finally:
        if owner.returncode is None:
            owner.kill()
        await owner.wait()
        await owner.aclose()
        await client.close()


@pytest.mark.asyncio
async def test_a_process_that_lost_its_lease_can_neither_record_nor_cancel(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(1.0))
    server.clock = clock = HeldClock()  # nothing ends until the other process has taken over
    clock.hold()
    clients = [fake_client(server), fake_client(server)]
    # A process whose renewals stall (a long pause, a partition) once its creates are out: its
    # leases run out.
    stall = anyio.Event()
    renew = asyncbg._manager.keep_leases

    async def stalling(*args: Any) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(renew, *args)
            await stall.wait()
            tg.cancel_scope.cancel()
        await anyio.sleep_forever()

    monkeypatch.setattr(asyncbg._manager, "keep_leases", stalling)
    stalled = PostgresLedger(pg_dsn, lease=3.0)
    try:
        async with asyncbg.BackgroundManager(clients[0], journal=stalled,
                                             poll_policy=FAST_POLL) as mgr:
            jobs = [await mgr.submit(key=key, model="m", input=key) for key in ("r", "c")]
            for job in jobs:
                await job.wait_accepted()
            stall.set()
            def expired() -> int:
                return int(rows(pg_dsn, "SELECT count(*) FROM asyncbg_jobs WHERE state = 'live' "
                                        "AND lease_until < extract(epoch FROM now())")[0][0])

            with anyio.fail_after(60):  # until the database says both leases ran out
                while expired() < 2:  # noqa: ASYNC110 (the database's clock: no event)
                    await anyio.sleep(0.05)
            monkeypatch.undo()
            taker = PostgresLedger(pg_dsn, lease=30.0)
            async with asyncbg.BackgroundManager(clients[1], journal=taker,
                                                 poll_policy=FAST_POLL) as other:
                taken = [await other.submit(key=j.key, model="m", input=j.key) for j in jobs]
                assert {taker.held()[j.key] for j in jobs} == {2}  # new epochs
                with contextlib.suppress(ManagerStateError):
                    await jobs[1].cancel()  # its lease is gone: no cancel is sent
                clock.release()
                with anyio.fail_after(60):
                    await other.wait_all(taken)
                    for job in jobs:  # detached here, never recorded from here
                        with pytest.raises(ManagerStateError, match="left running"):
                            await job.wait()
        assert [t.status for t in taken] == [JobStatus.COMPLETED] * 2
        assert [t.response_id for t in taken] == [j.response_id for j in jobs]
        assert not jobs[0].done and not jobs[1].done
        assert server.counters.cancels == 0 and server.counters.creates == 2
        records = {r.key: r for r in await _records(pg_dsn)}
        assert {r.state for r in records.values()} == {"done"}
    finally:
        for c in clients:
            await c.close()


async def _records(dsn: str) -> list[asyncbg.Record]:
    ledger = PostgresLedger(dsn)
    await ledger.open()
    try:
        return await ledger.records()
    finally:
        await ledger.close()


# -- small parts -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_submit_prepares_requests_as_the_workers_manager_does() -> None:
    body = {"model": "m", "input": "x", "stream": False, "metadata": {"a": "b"}}
    client = fake_client(FakeResponsesServer())
    try:
        expected = OpenAIResponses(client).prepare(body, stream=False)
    finally:
        await client.close()
    assert prepared(body, "k1") == {**expected, "metadata": {"a": "b", "asyncbg_custom_id": "k1"}}
    full = {"model": "m", "metadata": {f"k{i}": "v" for i in range(16)}}
    assert prepared(full, "k1")["metadata"] == full["metadata"]  # no room: left as it is
    assert "metadata" not in prepared({"model": "m"}, "x" * 513)


def test_a_worker_that_cannot_reach_the_server_hands_everything_back(tmp_path: Path) -> None:
    ledger = str(tmp_path / "j.db")
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    run = [sys.executable, "-m", "asyncbg"]
    subprocess.run([*run, "submit", str(write_input(tmp_path / "in.jsonl", 6, 0.1)),
                    "--ledger", ledger], env=env, check=True, capture_output=True)
    done = subprocess.run([*run, "worker", "--ledger", ledger, "--concurrency", "4",
                           "--base-url", "http://127.0.0.1:1/v1"],
                          env=env, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 2
    assert ("asyncbg: cannot connect to http://127.0.0.1:1/v1: 127.0.0.1:1: connection refused; "
            "the jobs this worker took are handed back\n") in done.stderr, done.stderr
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute("SELECT state, owner FROM jobs").fetchall()
    # Nothing failed for good, nothing is left leased. (A create cut off at the exit stays
    # "sending": the next worker sends it again, counted as a possible duplicate.)
    assert len(rows) == 6 and {owner for _, owner in rows} == {None}
    assert {state for state, _ in rows} <= {"new", "sending"}


def test_results_of_a_missing_sqlite_ledger_is_an_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "asyncbg", "results", "--ledger",
                           str(tmp_path / "none.db"), "-o", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "no ledger at" in done.stderr
    assert not (tmp_path / "none.db").exists()

