"""The dashboard without a browser: read-only by default, a bounded cost per update, and the
same picture from a PostgreSQL ledger as from an SQLite journal."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncbg
from asyncbg._dashboard._source import Aggregate, AggregateRow, Row, Start
from asyncbg._dashboard._tally import Tally
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

TOKEN = "s3cret-token"
POLL = asyncbg.PollPolicy(first_poll=0.01, min_interval=0.01, max_interval=0.05, jitter=0)


def test_read_only_unless_allowed(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    path = tmp_path / "j.db"
    anyio.run(_one_finished, path)
    with TestClient(asyncbg.dashboard_app(path, token=TOKEN)) as web:
        assert "read-only" in web.get("/").text
        refused = web.post("/actions/cancel", json={"all": True},
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 403
    with pytest.raises(ValueError, match="ASYNCBG_DASHBOARD_TOKEN"):
        asyncbg.dashboard_app(path, allow_actions=True, token="")


async def _one_finished(path: Path) -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.0))
    client = fake_client(server)
    async with asyncbg.BackgroundManager(client, journal=path, poll_policy=POLL) as mgr:
        await (await mgr.submit(model="gpt-5.2", input="x", key="one")).wait()
    await client.close()


def _row(i: int, state: str = "live", status: str = "in_progress") -> Row:
    return Row(f"k{i}", i, state, status, f"r{i}", None, None, 200, 0.0, 5.0, None)


class CountingSource:
    """A Source whose full scan costs ``scan_cost`` seconds of a fake clock; it records what
    each call reads."""

    location = "memory"

    def __init__(self, clock: list[float], scan_cost: float) -> None:
        self.clock, self.scan_cost = clock, scan_cost
        self.calls: list[str] = []

    async def now(self) -> float:
        return 1e9

    async def start(self, *, window: int) -> Start:
        self.calls.append("start")  # 10 jobs: 7 finished, 3 live
        return Start(10, {"in_progress": 3}, [_row(i) for i in range(3)], 10)

    async def counts(self) -> dict[str, int] | None:
        return None  # a journal no asyncbg of this version wrote to: no counters

    async def aggregate(self, *, since: float, window: int) -> Aggregate:
        self.calls.append("aggregate")
        self.clock[0] += self.scan_cost
        return Aggregate([AggregateRow("in_progress", "live", None, None, None, 3, 0, 0, None),
                          AggregateRow("completed", "done", None, 0, None, 7, 0, 0, None)],
                         [_row(i) for i in range(3)], 10, 0.0)

    async def window(self, *, limit: int, after: int) -> tuple[list[Row], int, int]:
        self.calls.append("window")  # k0 finished, seq 11 was claimed
        return [_row(1), _row(2)], 11 - after, 11

    async def rows(self, keys: Any) -> list[Row]:
        self.calls.append(f"rows:{len(keys)}")
        return [_row(int(k[1:]), "done", "completed") for k in keys]

    async def workers(self) -> list[Any]:
        return []

    async def endpoints(self) -> list[Any]:
        return []


@pytest.mark.asyncio
async def test_updates_read_indexes_and_the_full_scan_runs_a_bounded_share_of_the_time() -> None:
    clock = [0.0]
    source = CountingSource(clock, scan_cost=1.0)  # a big ledger: 1 s a scan
    tally = Tally(source, share=0.02, floor=0.5, clock=lambda: clock[0])  # type: ignore[arg-type]
    await tally.start()  # the first page: indexes only
    view = tally.view()
    assert (view.total, view.unsorted, dict(view.by_status)) == (10, 7, {"in_progress": 3})
    assert await tally.scan()
    assert dict(tally.view().by_status) == {"in_progress": 3, "completed": 7}
    for _ in range(48):  # the scan started at 0 and cost 1 s: the next one is due at 50 s
        clock[0] += 1.0
        assert not await tally.scan()
        await tally.update()
    assert source.calls[:4] == ["start", "aggregate", "window", "rows:1"]  # k0 left: 1 lookup
    assert set(source.calls[4:]) == {"window"}  # no other read, whatever the ledger's size
    # k0 finished, and seq 11 was claimed and waits.
    assert dict(tally.view().by_status) == {"pending": 1, "in_progress": 2, "completed": 8}
    clock[0] += 1.0
    assert await tally.scan()


class FullWindowSource(CountingSource):
    """Five live jobs k0..k4 of ten; the window holds three. Then k0 finishes."""

    async def start(self, *, window: int) -> Start:
        return Start(10, {"in_progress": 5}, [_row(i) for i in range(window)], 10)

    async def window(self, *, limit: int, after: int) -> tuple[list[Row], int, int]:
        return [_row(i) for i in range(1, 1 + limit)], 0, 10


@pytest.mark.asyncio
async def test_a_full_window_does_not_count_the_jobs_after_it_twice() -> None:
    tally = Tally(FullWindowSource([0.0], 0.0), window=3,  # type: ignore[arg-type]
                  clock=lambda: 0.0)
    await tally.start()
    await tally.update()  # k3 comes into view: it was live all along, not waiting
    view = tally.view()
    assert dict(view.by_status) == {"in_progress": 4, "completed": 1}
    assert view.unsorted == 5


class CountedSource(CountingSource):
    """A ledger with counters: k0 finished and seq 11 went from waiting to finished between two
    updates (the window never saw it)."""

    def __init__(self) -> None:
        super().__init__([0.0], 0.0)
        self.truth = {"in_progress": 3, "completed": 7}

    async def counts(self) -> dict[str, int] | None:
        self.calls.append("counts")
        return dict(self.truth)


@pytest.mark.asyncio
async def test_counters_make_the_counts_exact_from_the_first_page_on() -> None:
    source = CountedSource()
    tally = Tally(source, clock=lambda: 0.0)  # type: ignore[arg-type]
    await tally.start()
    view = tally.view()
    assert (view.total, view.unsorted, view.finished) == (10, 0, 7)
    assert dict(view.by_status) == {"in_progress": 3, "completed": 7}
    source.truth = {"in_progress": 2, "completed": 9}
    await tally.update()
    assert dict(tally.view().by_status) == {"in_progress": 2, "completed": 9}
    assert source.calls == ["start", "counts", "window", "rows:1", "counts"]


# -- the same picture from either kind of ledger --------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "run.journal")
    return str(request.getfixturevalue("pg_dsn"))


async def _records(spec: str) -> list[asyncbg.Record]:
    from asyncbg._ledgers._open import open_ledger

    ledger = open_ledger(spec)
    await ledger.open()
    try:
        return await ledger.records()
    finally:
        await ledger.close()


def _truth(records: list[asyncbg.Record]) -> tuple[dict[str, int], int, set[str]]:
    import json

    from asyncbg._spend._tokens import usage_tokens

    counts: dict[str, int] = {}
    tokens = 0
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
        if r.body is not None:
            t = usage_tokens(json.loads(r.body).get("usage") or {})
            tokens += t.input + t.output
    return counts, tokens, {r.key for r in records if r.state == "live"}


@pytest.mark.asyncio
async def test_the_tally_matches_the_ledger_and_follows_it(ledger_spec: str) -> None:
    from asyncbg._dashboard._app import open_source

    clock = [0.0]
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.0), clock=lambda: clock[0])
    scripts = {**{f"done-{i}": {} for i in range(6)}, "bad": {"fake_outcome": "failed"},
               **{f"live-{i}": {"fake_duration": "100"} for i in range(2)}}

    async def run(keys: list[str], *, leave_live: bool) -> None:
        client = fake_client(server)
        with anyio.CancelScope() as interrupted:
            async with asyncbg.BackgroundManager(client, journal=ledger_spec, poll_policy=POLL,
                                                 cancel_on_exit=False) as mgr:
                jobs = [await mgr.submit(model="gpt-5.2", input=k, key=k, metadata=scripts[k])
                        for k in keys]
                for job in jobs:
                    await (job.wait_accepted() if leave_live else job.wait())
                if leave_live:
                    await mgr.wait_all([j for j in jobs if j.key not in live_keys])
                    interrupted.cancel()  # like Ctrl-C: the live ones stay live
        await client.close()

    live_keys = {"live-0", "live-1"}
    await run(list(scripts), leave_live=True)
    source = open_source(ledger_spec)
    tally = Tally(source, clock=lambda: 0.0)  # one full scan, then only cheap updates
    await source.open()
    try:
        await tally.start()
        counts, tokens, live = _truth(await _records(ledger_spec))
        view = tally.view()  # exact at once: the ledger's counters, no scan
        assert (view.total, view.unsorted, dict(view.by_status)) == (len(scripts), 0, counts)
        assert await tally.scan() and await tally.update_usage()
        view = tally.view()
        assert dict(view.by_status) == counts
        assert view.input_tokens is not None and view.output_tokens is not None
        assert view.input_tokens + view.output_tokens == tokens
        assert {r.key for r in view.live_rows} == live == live_keys
        assert [f.code for f in view.failures] == ["server_error"]

        clock[0] = 150.0  # the live ones finish; a rerun collects them
        await run(sorted(live_keys), leave_live=False)
        await tally.update()
        assert tally.scans == 1 and tally.updates == 1
        view = tally.view()
        counts, tokens, live = _truth(await _records(ledger_spec))
        assert dict(view.by_status) == counts == {"completed": 8, "failed": 1}
        assert view.input_tokens + view.output_tokens == tokens  # type: ignore[operator]
        assert not view.live_rows and not live
        detail = await source.detail("done-3")
        assert detail is not None and detail.row.status == "completed"
        assert b'"done-3"' in detail.request
    finally:
        await source.close()


def test_the_command_says_what_is_wrong_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from asyncbg._cli import main

    assert main(["dashboard", "--ledger", str(tmp_path / "missing.journal")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.journal: no journal there" in err[0]

    (tmp_path / "notes.txt").write_text("not a journal")
    assert main(["dashboard", "--ledger", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt" in capsys.readouterr().err

    path = tmp_path / "j.db"
    anyio.run(_one_finished, path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert main(["dashboard", "--ledger", str(path), "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]

    monkeypatch.delenv("ASYNCBG_DASHBOARD_TOKEN", raising=False)
    assert main(["dashboard", "--ledger", str(path), "--allow-actions"]) == 2
    assert "ASYNCBG_DASHBOARD_TOKEN" in capsys.readouterr().err


def test_workers_notifications_and_retrying_the_failed_ones(tmp_path: Path) -> None:
    import sqlite3
    import time

    from starlette.testclient import TestClient

    path = tmp_path / "j.db"
    anyio.run(_one_finished, path)
    now = time.time()
    with sqlite3.connect(path) as db:  # what a fleet and its notification sender leave behind
        db.execute("INSERT INTO workers VALUES ('w-1', 'box', 42, ?, ?, 30)", (now - 90, now))
        db.executemany(
            "INSERT INTO outbox (id, key, url, body, state, attempts, created, next_at, error,"
            " http_status) VALUES (?, 'one', 'https://hooks.example/in', x'7b7d', ?, 3, ?, ?, ?,"
            " ?)", [("n1", "failed", now, now, "gone", 410), ("n2", "pending", now, now, None,
                                                             None)])
    db.close()
    app = asyncbg.dashboard_app(path, allow_actions=True, token=TOKEN,
                                client=lambda: pytest.fail("no client for a retry"))
    with TestClient(app) as web:
        page = web.get("/").text
        assert "w-1" in page and "box · 42" in page
        assert "https://hooks.example/in" in page and "HTTP 410: gone" in page
        assert web.post("/actions/retry-notifications").status_code == 401
        retried = web.post("/actions/retry-notifications",
                           headers={"X-Asyncbg-Token": TOKEN})
        assert retried.json() == {"retried": 1}
    with sqlite3.connect(path) as db:
        states = sorted(r[0] for r in db.execute("SELECT state FROM outbox"))
    db.close()
    assert states == ["pending", "pending"]


def test_mounted_in_another_app(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    path = tmp_path / "j.db"
    anyio.run(_one_finished, path)
    for lifespan in (True, False):  # with the host running its lifespan, and without
        dash = asyncbg.dashboard_app(path)
        host = Starlette(routes=[Mount("/asyncbg", dash)],
                         lifespan=dash.router.lifespan_context if lifespan else None)
        with TestClient(host) as web:
            page = web.get("/asyncbg/").text
            assert 'href="/asyncbg/static/dash.css"' in page
            assert 'href="/asyncbg/jobs/one"' not in page  # finished: not in the live table
            # Exact on the first read: the journal's counters, not a background scan.
            assert web.get("/asyncbg/summary.json").json()["by_status"] == {"completed": 1}
            assert "completed" in web.get("/asyncbg/jobs/one").text
            assert web.get("/asyncbg/static/dash.js").status_code == 200


def _journal_without_counters(tmp_path: Path) -> Path:
    """A journal with one finished job, as asyncbg 0.2 left it: no counters."""
    import sqlite3

    path = tmp_path / "j.db"
    anyio.run(_one_finished, path)
    with sqlite3.connect(path) as db:
        for trigger in ("insert", "update", "delete"):
            db.execute(f"DROP TRIGGER job_counts_{trigger}")
        db.execute("DROP TABLE job_counts")
    db.close()
    return path


def test_a_journal_from_before_the_counters_gains_them_when_next_opened(tmp_path: Path) -> None:
    from asyncbg._dashboard._sqlite_source import SQLiteSource

    path = _journal_without_counters(tmp_path)

    async def picture() -> tuple[dict[str, int] | None, int, dict[str, int]]:
        source = SQLiteSource(path)
        await source.open()
        try:
            tally = Tally(source, clock=lambda: 0.0)
            await tally.start()
            view = tally.view()
            return await source.counts(), view.unsorted, dict(view.by_status)
        finally:
            await source.close()

    # Read-only, the dashboard cannot add them: finished jobs wait for the scan, as before.
    assert anyio.run(picture) == (None, 1, {})
    anyio.run(_one_finished, path)  # the next run opens it for writing: counters, filled
    assert anyio.run(picture) == ({"completed": 1}, 0, {"completed": 1})


def test_counters_added_while_the_dashboard_runs_are_used_from_the_next_update(
        tmp_path: Path) -> None:
    from asyncbg._dashboard._sqlite_source import SQLiteSource

    path = _journal_without_counters(tmp_path)

    async def main() -> None:
        source = SQLiteSource(path)
        await source.open()
        try:
            tally = Tally(source, clock=lambda: 0.0)
            await tally.start()
            assert not tally.exact and tally.view().unsorted == 1
            await _one_finished(path)  # a run of this version writes to it meanwhile
            await tally.update()
            assert tally.exact and dict(tally.view().by_status) == {"completed": 1}
        finally:
            await source.close()

    anyio.run(main)


def test_cancel_on_a_postgres_ledger_needs_the_token_and_is_recorded(pg_dsn: str) -> None:
    from starlette.testclient import TestClient

    server = FakeResponsesServer(latency=LatencyModel.fixed(0.0))

    async def leave_live() -> None:  # a fleet's jobs, left running (like a worker's SIGTERM)
        client = fake_client(server)
        with anyio.CancelScope() as interrupted:
            async with asyncbg.BackgroundManager(client, journal=pg_dsn, poll_policy=POLL,
                                                 cancel_on_exit=False) as mgr:
                jobs = [await mgr.submit(model="gpt-5.2", input=k, key=k,
                                         metadata={"fake_duration": "10000"})
                        for k in ("keep-0", "keep-1")]
                for job in jobs:
                    await job.wait_accepted()
                interrupted.cancel()
        await client.close()

    async def hold(key: str) -> None:  # a live worker's lease on it (for a minute)
        from asyncbg._fleet import shared_ledger
        from asyncbg._ledgers import ClaimOutcome

        worker = shared_ledger(pg_dsn, lease=60.0)
        await worker.open()
        record = await worker.get(key)
        assert record is not None
        assert (await worker.claim(key, record.digest, record.request)).outcome is \
            ClaimOutcome.RESUME

    anyio.run(leave_live)
    anyio.run(hold, "keep-1")  # closed without a release, as if its worker were busy
    ids = {r.key: r.response_id for r in anyio.run(_records, pg_dsn)}
    app = asyncbg.dashboard_app(pg_dsn, allow_actions=True, token=TOKEN,
                                client=lambda: fake_client(server))
    with TestClient(app) as web:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Asyncbg-Token": "wrong"}):
            refused = web.post("/actions/cancel", json={"keys": ["keep-0"]}, headers=headers)
            assert refused.status_code == 401
        assert server.status_of(ids["keep-0"]) == "queued"  # nothing was sent
        assert web.get("/summary.json").json()["by_status"] == {"queued": 2}

        answer = web.post("/actions/cancel", json={"keys": ["keep-0"]},
                          headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200, answer.text
        assert [(c["key"], c["response_id"], c["status"]) for c in answer.json()["cancelled"]
                ] == [("keep-0", ids["keep-0"], "cancelled")]
        assert server.status_of(ids["keep-0"]) == "cancelled"
        assert server.status_of(ids["keep-1"]) == "queued"  # only that one
        assert web.get("/summary.json").json()["by_status"] == {"queued": 1, "cancelled": 1}

        # keep-1's worker holds its lease: cancelled on the server, the worker records it.
        answer = web.post("/actions/cancel", json={"all": True},
                          headers={"X-Asyncbg-Token": TOKEN})
        assert answer.status_code == 200, answer.text
        [held] = answer.json()["cancelled"]
        assert (held["key"], held["status"]) == ("keep-1", "cancelled"), held
        assert "the worker that holds it" in held["error"]
        assert server.status_of(ids["keep-1"]) == "cancelled"
    records = {r.key: r for r in anyio.run(_records, pg_dsn)}
    assert (records["keep-0"].state, records["keep-0"].status) == ("done", "cancelled")
    assert records["keep-1"].state == "live"  # not this process's to write


def test_terminal_to_seen_shows_the_bodies_times_or_says_why_it_is_empty(tmp_path: Path) -> None:
    import sqlite3

    from starlette.testclient import TestClient

    path = tmp_path / "j.db"
    anyio.run(_one_finished, path)

    def page() -> str:
        with TestClient(asyncbg.dashboard_app(path)) as web:
            for _ in range(200):  # the bodies are read by a background scan: wait for it
                if web.get("/summary.json").json()["output_tokens"] is not None:
                    break
                time.sleep(0.05)
            return web.get("/").text

    assert "the fake server's do not" in page()  # the fake's bodies carry no completed_at
    with sqlite3.connect(path) as db:  # as OpenAI's do: recorded 3 s after the server ended it
        db.execute("UPDATE jobs SET response = CAST(json_set(CAST(response AS TEXT), "
                   "'$.completed_at', updated - 3) AS BLOB)")
    db.close()
    shown = page()
    assert 'id="seen-empty"' not in shown
    assert "time from terminal to seen" in shown


@pytest.mark.asyncio
async def test_an_sqlite_journals_counters_stay_exact_through_every_kind_of_write(
    tmp_path: Path,
) -> None:
    """What the dashboard reads as jobs by status is the truth, however the rows were written:
    enqueues, claims, sends, outcomes (the server's and local ones), requeues, releases and
    resends, by two processes' ledgers on one file."""
    import contextlib
    import random
    import sqlite3

    from asyncbg._dashboard._sqlite_source import SQLiteSource
    from asyncbg._ledgers import LedgerError, Outcome, canonical, digest
    from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

    def items(n: int, prefix: str) -> list[tuple[str, str, bytes]]:
        params = [{"model": "m", "input": f"{prefix}{i}"} for i in range(n)]
        return [(f"{prefix}{i}", digest(p), canonical(p)) for i, p in enumerate(params)]

    def truth() -> dict[str, int]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return {s: int(n) for s, n in db.execute(
                "SELECT status, count(*) FROM jobs GROUP BY status")}

    path = tmp_path / "shared.journal"
    ledgers = [SharedSQLiteLedger(path, lease=30.0), SharedSQLiteLedger(path, lease=30.0)]
    for led in ledgers:
        await led.open()
    source = SQLiteSource(path)
    await source.open()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    statuses = ["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
    try:
        await ledgers[0].enqueue(items(300, "big"))
        for step in range(150):
            led = rng.choice(ledgers)
            held = list(led.held())
            action = rng.randrange(8)
            try:
                if action == 0:
                    await led.enqueue(items(rng.randrange(1, 10), f"s{step}-"))
                elif action == 1:
                    await led.acquire(rng.randrange(1, 20), 30.0)
                elif action == 2 and held:
                    await led.sending(rng.choice(held), resubmit=rng.random() < 0.5)
                elif action == 3 and held:
                    key = rng.choice(held)
                    status = rng.choice(statuses)
                    await led.record(key, Outcome(status, f"resp_{key}", body=b"{}"))
                elif action == 4 and held:
                    await led.record(rng.choice(held), Outcome("failed", error="x"))  # local
                elif action == 5:
                    await led.requeue(held)
                elif action == 6 and held:
                    await led.release(rng.sample(held, k=min(len(held), 5)))
                elif action == 7:
                    key, dig, req = items(1, f"c{step}-")[0]
                    await led.claim(key, dig, req)
            except LedgerError:  # a lease another one took, a key in another state: the
                pass  # write did not happen, and the counters must say so too
            if step % 25 == 24:
                assert await source.counts() == truth(), f"seed {seed}, step {step}"
        assert await source.counts() == truth(), f"seed {seed}"
    finally:
        await source.close()
        for led in ledgers:
            await led.close()



def test_the_dashboard_leaves_no_wal_files_beside_a_journal_nobody_is_on(tmp_path: Path) -> None:
    """A WAL journal (a fleet's) read with nobody else on it: the dashboard's connections
    leave no -wal/-shm behind (read-only ones made and kept them), and change nothing. With a
    writer there, it reads beside it, read-only, and the writer goes on."""
    import sqlite3

    from asyncbg._dashboard._sqlite_source import SQLiteSource
    from asyncbg._fleet import enqueue_requests
    from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger

    path = tmp_path / "l.db"

    async def submit() -> None:
        ledger = SharedSQLiteLedger(path)
        await ledger.open()
        await enqueue_requests(ledger, [("a", {"model": "m", "input": "x"})])
        await ledger.close()

    async def total() -> int:
        source = SQLiteSource(path)
        await source.open()
        try:
            return (await source.start(window=60)).total
        finally:
            await source.close()

    anyio.run(submit)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.db"]
    before = path.read_bytes()
    assert anyio.run(total) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.db"]  # no -wal, no -shm
    assert path.read_bytes() == before

    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # a writer in the middle of its transaction
        writer.execute("UPDATE jobs SET status = status")
        assert anyio.run(total) == 1
        writer.execute("COMMIT")  # undisturbed
    finally:
        writer.close()
