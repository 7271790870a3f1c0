"""Fleet workers under faults, in-process: a ledger that goes away, a worker whose key is refused.

Two workers share one SQLite ledger (the same rules as PostgreSQL's, see tests/test_fleet.py for
the processes and PostgreSQL itself); the fake server counts creates per request.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncbg
from asyncbg._fleet import AccountRefused, enqueue_requests, run_worker
from asyncbg._http import Rejected
from asyncbg._ledgers import LedgerUnavailable, Outcome, Record
from asyncbg._ledgers._sqlite_shared import SharedSQLiteLedger
from asyncbg.providers import OpenAIResponses
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_POLL, FAST_RETRY

pytestmark = pytest.mark.asyncio


class Outage(SharedSQLiteLedger):
    """A shared SQLite ledger that answers LedgerUnavailable while ``down``."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise LedgerUnavailable(f"{self.location}: connection lost")

    async def acquire(self, limit: int, lease: float, *, live_only: bool = False
                      ) -> list[Record]:
        self._check()
        return await super().acquire(limit, lease, live_only=live_only)

    async def record(self, key: str, outcome: Outcome) -> None:
        self._check()
        await super().record(key, outcome)

    async def sending(self, key: str, *, resubmit: bool) -> None:
        self._check()
        await super().sending(key, resubmit=resubmit)

    async def renew(self, keys: Collection[str], lease: float) -> set[str]:
        self._check()
        return await super().renew(keys, lease)

    async def unfinished(self) -> int:
        self._check()
        return await super().unfinished()


def lines(n: int, duration: float) -> list[tuple[str, dict[str, Any]]]:
    return [(f"r{i}", {"model": "m", "input": f"line {i}",
                       "metadata": {"fake_duration": str(duration)}}) for i in range(n)]


async def test_a_worker_rides_out_a_ledger_outage_and_creates_each_line_once(
    tmp_path: Path,
) -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.1))
    db = tmp_path / "fleet.db"
    setup = SharedSQLiteLedger(db)
    await setup.open()
    await enqueue_requests(setup, lines(40, 0.3))
    await setup.close()
    ledger = Outage(db, lease=5.0)
    client = fake_client(server)

    async def outage() -> None:
        await anyio.sleep(0.3)
        ledger.down = True  # mid-run: creates answered, completions arriving
        await anyio.sleep(1.0)
        ledger.down = False

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(outage)
                code = await run_worker(client, ledger, concurrency=8, lease=5.0,
                                        exit_when_idle=True, stop=anyio.Event(),
                                        poll_policy=FAST_POLL, retry_policy=FAST_RETRY,
                                        idle=0.05, db_patience=30.0)
    finally:
        await client.close()
    assert code == 0
    check = SharedSQLiteLedger(db)
    await check.open()
    records = await check.records()
    await check.close()
    assert {r.status for r in records} == {"completed"} and len(records) == 40
    assert server.counters.creates == 40  # nothing created twice, nothing recorded failed


class RefusedKey(OpenAIResponses):
    """A provider whose every create is refused, as a server refuses a bad API key."""

    async def create(self, params: Any, *, key: str | None = None) -> Any:
        raise Rejected("Incorrect API key provided", http_status=401, code="invalid_api_key")


async def test_a_worker_with_a_refused_key_stops_and_leaves_its_jobs_to_the_others(
    tmp_path: Path,
) -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05))
    db = tmp_path / "fleet.db"
    setup = SharedSQLiteLedger(db)
    await setup.open()
    await enqueue_requests(setup, lines(30, 0.05))
    await setup.close()
    good_client, bad_client = fake_client(server), fake_client(server)
    stop = anyio.Event()
    outcome: dict[str, object] = {}

    async def bad() -> None:
        try:
            await run_worker(RefusedKey(bad_client), SharedSQLiteLedger(db, lease=5.0),
                             concurrency=8, lease=5.0, exit_when_idle=True, stop=stop,
                             poll_policy=FAST_POLL, retry_policy=FAST_RETRY, idle=0.02)
        except AccountRefused as exc:
            outcome["bad"] = exc

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bad)
                await anyio.sleep(0.2)  # the bad worker takes its share first
                outcome["good"] = await run_worker(
                    good_client, SharedSQLiteLedger(db, lease=5.0), concurrency=8, lease=5.0,
                    exit_when_idle=True, stop=anyio.Event(), poll_policy=FAST_POLL,
                    retry_policy=FAST_RETRY, idle=0.02)
    finally:
        await good_client.close()
        await bad_client.close()
    assert isinstance(outcome["bad"], AccountRefused)
    assert "Incorrect API key" in str(outcome["bad"]) and outcome["good"] == 0
    check = SharedSQLiteLedger(db)
    await check.open()
    records = await check.records()
    await check.close()
    assert {r.status for r in records} == {"completed"}, [
        (r.key, r.error_code) for r in records if r.status != "completed"]
    assert len(records) == 30
    assert server.counters.creates == 30


async def test_the_refused_codes_are_the_accounts() -> None:
    from asyncbg._engine._steps import ACCOUNT_CODES

    assert "insufficient_quota" in ACCOUNT_CODES and "invalid_api_key" in ACCOUNT_CODES
    assert isinstance(asyncbg.LedgerUnavailable("x"), asyncbg.LedgerError)
