"""The engine's lean side: a paced create runs its step once, whatever it waited for; the CLI
freezes its start-up for the collector."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import pytest

import asyncbg
from asyncbg import JobStatus, _cli
from asyncbg._engine._scheduler import Scheduler
from asyncbg._spend._pacing import Pacer
from asyncbg.testing import FakeRateLimit, FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_POLL, FAST_RETRY


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count calls of ``Scheduler.<name>`` (a one-item list, read after the run)."""
    calls = [0]
    real = getattr(Scheduler, name)

    def counted(self: Scheduler, *args: Any) -> Any:
        calls[0] += 1
        return real(self, *args)

    monkeypatch.setattr(Scheduler, name, counted)
    return calls


async def sixty_at_once(server: FakeResponsesServer) -> list[asyncbg.Job]:
    """60 jobs submitted at once to a manager on ``server``, run to their end."""
    client = fake_client(server)
    try:
        async with asyncbg.BackgroundManager(client, max_concurrency=60, poll_policy=FAST_POLL,
                                             retry_policy=FAST_RETRY) as mgr:
            return [await mgr.submit(model="m", input=str(i), metadata={"fake_duration": "0"})
                    for i in range(60)]
    finally:
        await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("rate", [None, 60.0], ids=["no-limit", "rate-limited"])
async def test_one_create_step_per_create_sent(
    monkeypatch: pytest.MonkeyPatch, rate: float | None
) -> None:
    # 60 jobs at once: the pacer's slow start (and, with a limit, the server's rate) makes most
    # wait. Waiting is decided before a step starts, so each create runs its step once.
    creates = count_calls(monkeypatch, "_create")
    admits = count_calls(monkeypatch, "_admit")
    server = FakeResponsesServer(
        latency=LatencyModel.fixed(0.01),
        rate_limit=None if rate is None else FakeRateLimit.per_second(rate))
    jobs = await sixty_at_once(server)
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    sent = server.counters.creates + server.counters.rate_limited
    assert creates[0] == sent  # a retried create (after a 429) is a step of its own
    assert admits[0] > sent  # and some did wait
    assert server.counters.rate_limited <= 0.02 * sent


def test_the_cli_freezes_its_start_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    frozen: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(len(gc.get_objects())))
    monkeypatch.setattr(gc, "collect", lambda *a: 0)
    # The interpreter keeps its own reference to the real list: this one is never called.
    monkeypatch.setattr(gc, "callbacks", [])
    # A command run in a process it does not own (main() given its arguments: an application,
    # this test) leaves the collector alone.
    _cli.freeze_start_up()
    assert _cli.main(["run", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert frozen == [] and gc.callbacks == []
    monkeypatch.setattr(_cli, "_owns_process", True)  # as main() called with none sets it
    _cli.freeze_start_up()
    assert len(frozen) == 1 and "openai" in sys.modules and "asyncbg._manager" in sys.modules
    _cli.freeze_start_up(load_sdk=False)  # run freezes twice: the hook is added once
    assert gc.callbacks == [_cli._refreeze] and len(frozen) == 2
    # What survives a full collection is frozen too; a young collection freezes nothing.
    for generation in (0, 1):
        _cli._refreeze("stop", {"generation": generation})
    _cli._refreeze("start", {"generation": 2})
    assert len(frozen) == 2
    _cli._refreeze("stop", {"generation": 2})
    assert len(frozen) == 3


@pytest.mark.asyncio
async def test_slow_creates_fill_the_window_as_slow_start_grows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Creates that take a while to answer (no rate-limit headers): the pacer's window starts
    at 4 and doubles per clean window, and the creates waiting for room go as it grows. Before,
    an answer woke one waiting create, so 4 stayed in flight for good (64 creates of 3 s took
    49 s against `asyncbg fake-server`, 16 s since)."""
    peak = [0]
    real = Pacer.create_delay

    def watched(self: Pacer, tokens: int = 0) -> float:
        delay = real(self, tokens)
        peak[0] = max(peak[0], self.statistics().in_flight)
        return delay

    monkeypatch.setattr(Pacer, "create_delay", watched)
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.01))
    server.inject("slow", route="create", times=60, delay=0.05)
    jobs = await sixty_at_once(server)
    assert all(j.status is JobStatus.COMPLETED for j in jobs)
    assert server.counters.creates == 60
    assert peak[0] >= 16, peak  # 4, then 8, 16, 32 as each window comes back clean
