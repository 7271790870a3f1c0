"""A seeded random driver of the engine against the in-process fake server, with faults.

One run draws, from its seed: the fake server's faults (429/5xx/resets at random rates, HTML
answers, 404s, garbage ``Retry-After`` and ``openai-poll-after-ms`` headers), a ledger whose
writes fail or hang for random windows, the manager's limits, and a schedule of operations
(submits, cancels, deadlines, callbacks that submit, webhooks that arrive before the create's
answer, exits by an exception). After the run it checks the invariants of the engine issue:

* every job ends, within a stated bound;
* each job's outcome is the server's outcome for its response (a job with a response id that
  completed, failed, was cancelled or is incomplete says what the server says);
* the ledger and the jobs agree;
* creates on the server <= keys + possible duplicates counted;
* every slot and counter is back to zero.

``python3 dev.py soak --minutes N`` runs fresh seeds until the time is up; the test suite runs a
fixed set. A failure prints its seed: ``run(seed)`` replays it exactly (as far as timing allows).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import anyio

import asyncbg
from asyncbg import JobStatus
from asyncbg._ledgers import Claim, LedgerUnavailable, MemoryLedger, Outcome, Record
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client
from asyncbg.testing._faults import FaultRates

#: No run may take longer than this (seconds): every wait in it is bounded well below.
BOUND = 60.0
TERMINAL = {"completed", "failed", "cancelled", "incomplete"}


class ChaosLedger:
    """A MemoryLedger whose writes fail (LedgerUnavailable) or hang while told to."""

    def __init__(self) -> None:
        self.inner = MemoryLedger()
        self.down = False
        self.stuck: anyio.Event | None = None
        self.failures = 0

    @property
    def location(self) -> str:
        return "chaos"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def _gate(self) -> None:
        if self.stuck is not None:
            await self.stuck.wait()
        if self.down:
            self.failures += 1
            raise LedgerUnavailable("chaos: down")

    async def claim(self, key: str, digest: str, request: bytes) -> Claim:
        return await self.inner.claim(key, digest, request)

    async def sending(self, key: str, *, resubmit: bool) -> None:
        await self._gate()
        await self.inner.sending(key, resubmit=resubmit)

    async def record(self, key: str, outcome: Outcome) -> None:
        await self._gate()
        await self.inner.record(key, outcome)

    async def get(self, key: str) -> Record | None:
        return await self.inner.get(key)

    async def records(self) -> list[Record]:
        return await self.inner.records()

    async def resubmits(self) -> int:
        return await self.inner.resubmits()


@dataclass
class Report:
    seed: int
    jobs: int = 0
    creates: int = 0
    possible_duplicates: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    ledger_failures: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"seed {self.seed}: {self.jobs} jobs, {self.creates} creates, "
                f"{self.possible_duplicates} possible duplicates, {self.by_status}, "
                f"{self.ledger_failures} ledger failures"
                + (f"; PROBLEMS: {self.problems}" if self.problems else ""))


async def run(seed: int) -> Report:
    """One seeded run; the report lists every invariant it found broken."""
    rng = random.Random(seed)
    report = Report(seed)
    server = FakeResponsesServer(
        latency=LatencyModel.uniform(0.005, 0.15),
        fault_rates=FaultRates(rate_429=rng.choice([0.0, 0.05, 0.15]),
                               rate_500=rng.choice([0.0, 0.05]),
                               rate_reset=rng.choice([0.0, 0.03]),
                               retry_after=rng.choice([None, 0.01, float("nan"), -3.0, 1e9]),
                               seed=seed),
        seed=seed,
    )
    server.poll_after_ms = rng.choice([None, None, "nan", "-1", "5", "garbage"])  # type: ignore[assignment]
    # One 404 at most: two in a row on one response is what "lost" means.
    for kind in rng.sample(["html", "404", "reset_after", "html"], rng.randint(0, 3)):
        server.inject(kind, route=rng.choice(["create", "retrieve"]), times=1)
    ledger = ChaosLedger()
    client = fake_client(server)
    policy = asyncbg.PollPolicy(first_poll=0.005, min_interval=0.005, max_interval=0.03,
                                jitter=0.1)
    retry = asyncbg.RetryPolicy(max_attempts=rng.choice([2, 6, 30]), base=0.001,
                                max_backoff=0.01, max_retry_after=0.05)
    jobs: list[asyncbg.Job] = []
    exit_early = rng.random() < 0.2
    mgr = asyncbg.BackgroundManager(
        client, journal=ledger, poll_policy=policy, retry_policy=retry,
        max_concurrency=rng.randint(1, 8), max_requests=rng.randint(1, 8),
        ledger_patience=20.0, exit_grace=2.0, cancel_timeout=5.0,
        cancel_on_exit=rng.random() < 0.7,
    )
    try:
        with anyio.fail_after(BOUND):
            try:
                async with mgr:
                    await _drive(rng, mgr, ledger, jobs)
                    if exit_early:
                        raise _Leave
            except _Leave:
                pass
            except LedgerUnavailable as exc:
                report.problems.append(f"ledger stop: {exc}")
            except Stuck as exc:
                report.problems.append(str(exc))
    except TimeoutError:
        report.problems.append(f"the run took more than {BOUND} s")
    finally:
        ledger.down = False
        if ledger.stuck is not None:
            ledger.stuck.set()
        await client.close()
    _check(report, server, ledger, mgr, jobs, exit_early)
    return report


class _Leave(Exception):
    pass


class Stuck(Exception):
    pass


async def _drive(rng: random.Random, mgr: asyncbg.BackgroundManager, ledger: ChaosLedger,
                 jobs: list[asyncbg.Job]) -> None:
    n = rng.randint(5, 40)
    outcomes = ["completed"] * 6 + ["failed", "incomplete"]

    def follow_up(job: asyncbg.Job) -> Any:
        async def submit() -> None:
            jobs.append(await mgr.submit(model="m", input="again", metadata={
                "fake_duration": f"{rng.uniform(0.0, 0.1):.3f}"}))
        return submit() if len(jobs) < 80 else None

    try:
        await _operations(rng, mgr, ledger, jobs, n, outcomes, follow_up)
    except BaseExceptionGroup as group:
        stuck, rest = group.split(Stuck)
        if rest is not None:
            raise
        assert stuck is not None
        raise stuck.exceptions[0] from None


async def _operations(rng: random.Random, mgr: asyncbg.BackgroundManager, ledger: ChaosLedger,
                      jobs: list[asyncbg.Job], n: int, outcomes: list[str],
                      follow_up: Any) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(n):
            params: dict[str, Any] = {"model": "m", "input": f"x{i}", "metadata": {
                "fake_duration": f"{rng.uniform(0.0, 0.4):.3f}",
                "fake_outcome": rng.choice(outcomes)}}
            deadline = rng.uniform(0.05, 0.5) if rng.random() < 0.15 else None
            job = await mgr.submit_request(params, deadline=deadline)
            jobs.append(job)
            roll = rng.random()
            if roll < 0.15:
                tg.start_soon(_cancel_later, job, rng.uniform(0.0, 0.3))
            elif roll < 0.25:
                job.add_done_callback(follow_up)
            elif roll < 0.35:
                tg.start_soon(_early_webhook, mgr, job)
            if rng.random() < 0.1:
                tg.start_soon(_ledger_trouble, ledger, rng.uniform(0.02, 0.4),
                              rng.random() < 0.3)
            if rng.random() < 0.3:
                await anyio.sleep(rng.uniform(0.0, 0.02))
        try:
            await mgr.wait_all(list(jobs), timeout=BOUND / 2)
        except TimeoutError:
            stuck = [repr(e) for e in mgr._scheduler.entries()]
            raise Stuck(f"jobs did not end within {BOUND / 2} s: {stuck[:5]}") from None


async def _cancel_later(job: asyncbg.Job, delay: float) -> None:
    await anyio.sleep(delay)
    await job.cancel()


async def _early_webhook(mgr: asyncbg.BackgroundManager, job: asyncbg.Job) -> None:
    rid = await job.wait_accepted()
    if rid is not None:
        mgr._scheduler.wake(rid)  # what a verified webhook does


async def _ledger_trouble(ledger: ChaosLedger, seconds: float, stuck: bool) -> None:
    event = anyio.Event()
    if stuck:
        ledger.stuck = event
    else:
        ledger.down = True
    await anyio.sleep(seconds)
    ledger.down = False
    event.set()
    if ledger.stuck is event:
        ledger.stuck = None


def _check(report: Report, server: FakeResponsesServer, ledger: ChaosLedger,
           mgr: asyncbg.BackgroundManager, jobs: list[asyncbg.Job], exit_early: bool) -> None:
    problems = report.problems
    stats = mgr.statistics()
    report.jobs = len(jobs)
    report.creates = server.counters.creates
    report.possible_duplicates = stats.possible_duplicates
    report.by_status = stats.by_status
    report.ledger_failures = ledger.failures
    records = {r.key: r for r in ledger.inner._records.values()}
    for job in jobs:
        if not job.done and not (exit_early and job.detached):
            problems.append(f"{job.key} not terminal: {job!r}")
            continue
        rid = job.response_id
        if rid is not None and job.done:
            truth = server.status_of(rid)
            if truth in TERMINAL and job.status.value != truth:
                problems.append(f"{job.key}: job says {job.status.value} ({job.error_code}: "
                                f"{job.error}), server {truth}")
            if truth not in TERMINAL and job.error_code != "internal_error":
                problems.append(f"{job.key}: job says {job.status.value}, server still {truth}")
        record = records.get(job.key)
        if (record is not None and rid is not None and record.state == "done"
                and record.status != job.status.value):
                problems.append(f"{job.key}: ledger {record.status}, job {job.status.value}")
        if job.error_code == "internal_error":
            problems.append(f"{job.key}: internal error: {job.error}")
    keys = len({j.key for j in jobs})
    if server.counters.creates > keys + stats.possible_duplicates:
        problems.append(f"{server.counters.creates} creates for {keys} keys and "
                        f"{stats.possible_duplicates} possible duplicates")
    in_use = {k: v for k, v in mgr._scheduler.in_use().items() if v}
    if in_use:
        problems.append(f"not back to zero: {in_use}")
    if mgr.meter.pacer.statistics().in_flight:
        problems.append(f"pacer in flight: {mgr.meter.pacer.statistics()}")
    if JobStatus.PENDING.value in stats.by_status and not exit_early:
        problems.append(f"pending jobs left: {stats.by_status}")
