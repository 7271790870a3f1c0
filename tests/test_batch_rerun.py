"""Expired batch requests run again through the manager: a request whose batch expired before
it ran is created again in a new batch (``batch_retries``, default 1), the journal follows it
to its new batch, and ``statistics().batch_reruns`` counts it; a request with a result is never
sent again. Each provider through its official SDK, on the fake."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

import asyncbg
from asyncbg import JobStatus
from asyncbg._cli import main
from asyncbg._ledgers._sqlite import SQLiteLedger
from asyncbg._providers._kinds import batch_of
from asyncbg.testing import BatchTiming, FakeResponsesServer, LatencyModel

from . import test_providers
from .conftest import HttpFake
from .test_batch_cli import request, write_input
from .test_cli_run2 import env  # noqa: F401 - the fixture: an API key and the fake's URL
from .test_providers import BATCHING, Api

api = test_providers.api
server = test_providers.server


#: A batch expires 0.15 s after its creation.
EXPIRING = BatchTiming(validating=0.01, finalizing=0.01, cancelling=0.01, window=0.15)


@pytest.mark.asyncio
async def test_an_expired_request_runs_again_in_a_new_batch_once(
    api: Api, server: FakeResponsesServer, tmp_path: Path
) -> None:
    server.batches.timing = EXPIRING
    server.batches.script("late", outcome="stuck", times=1)  # only its first batch expires
    server.batches.script("never", outcome="stuck")  # every batch of it expires
    journal = tmp_path / "run.journal"
    with anyio.fail_after(20):
        # One first batch, all three joined within a second whatever the machine's load.
        provider = api.provider(batch_delay=1.0)
        async with asyncbg.BackgroundManager(provider, journal=journal, **BATCHING) as mgr:
            jobs = {k: await mgr.submit(key=k, **api.request(k)) for k in ("ok", "late",
                                                                             "never")}
            first = {k: batch_of(str((await j.wait_accepted()) or j.response_id))
                     for k, j in jobs.items()}
            await mgr.wait_all(list(jobs.values()))
            stats = mgr.statistics()
    assert jobs["ok"].status is JobStatus.COMPLETED
    assert jobs["late"].status is JobStatus.COMPLETED  # in its second batch
    assert batch_of(str(jobs["late"].response_id)) != first["late"]
    assert jobs["never"].status is JobStatus.FAILED
    assert jobs["never"].error_code in ("expired", "batch_expired")
    assert stats.batch_reruns == 2  # late and never, once each
    # The request with a result was sent once; the others twice (never more).
    sent = server.counters.batch_requests
    assert sum(sent.values()) == 5 and server.counters.batch_creates == 2  # both in one
    ledger = SQLiteLedger(journal)
    await ledger.open()
    try:
        late = await ledger.get("late")
        assert late is not None and late.response_id == jobs["late"].response_id
        assert late.state == "done"
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_rerun_after_a_crash_follows_the_request_to_its_new_batch(
    api: Api, server: FakeResponsesServer, tmp_path: Path
) -> None:
    server.batches.timing = EXPIRING
    server.batches.script("late", outcome="stuck", times=1)
    journal = tmp_path / "run.journal"

    class Leave(Exception):
        pass

    with anyio.fail_after(20), pytest.raises(Leave):
        async with asyncbg.BackgroundManager(api.provider(), journal=journal,
                                             cancel_on_exit=False, **BATCHING) as mgr:
            job = await mgr.submit(key="late", **api.request("late"))
            first = await job.wait_accepted() or job.response_id
            # Sent again: leave with the new batch running (no event says a job moved).
            while job.response_id == first or job.response_id is None:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            await anyio.sleep(0.05)  # its new id is in the journal
            raise Leave
    creates = server.counters.batch_creates
    assert creates == 2
    with anyio.fail_after(20):
        async with asyncbg.BackgroundManager(api.provider(), journal=journal,
                                             **BATCHING) as mgr:
            job = await mgr.submit(key="late", **api.request("late"))
            await job.wait()
    assert job.status is JobStatus.COMPLETED
    assert server.counters.batch_creates == creates  # re-attached: nothing sent again


@pytest.mark.usefixtures("env")
def test_the_run_summary_counts_requests_sent_again(
    http_fake: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``asyncbg run --provider openai-batch``: a request whose batch expired unrun is sent
    again, its line completes, and the summary says how many were re-sent."""
    http_fake.server.batches.timing = EXPIRING
    http_fake.server.batches.script("late", outcome="stuck", times=1)
    http_fake.server.latency = LatencyModel.fixed(0.01)  # what is not scripted runs at once
    write_input(tmp_path / "in.jsonl", [request("ok"), request("late")])
    out = tmp_path / "out.jsonl"
    assert main(["run", str(tmp_path / "in.jsonl"), "-o", str(out),
                 "--provider", "openai-batch"]) == 0
    lines = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert lines["late"]["error"] is None and lines["ok"]["error"] is None
    err = capsys.readouterr().err
    assert "re-sent" in err and "1 batch requests whose batch expired" in err, err
