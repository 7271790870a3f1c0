"""``asyncbg status`` and ``asyncbg cancel`` on every provider's journal and every ledger kind.

Journals are filled by a manager in this process talking to the fake over HTTP through each
official SDK, then the commands run as the operator runs them: a new process, with the
provider's own key only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI

import asyncbg
from asyncbg._cli import main
from asyncbg._fleet import shared_ledger
from asyncbg._ledgers._base import Outcome, canonical, digest
from asyncbg._ledgers._lock import ExclusiveLock
from asyncbg.providers import AnthropicBatches, GeminiBatches, OpenAIBatch
from asyncbg.testing import BatchTiming, LatencyModel

from .conftest import FAST_POLL, FAST_RETRY, HttpFake

pytestmark = pytest.mark.asyncio

KEYS = {"openai": "OPENAI_API_KEY", "openai-batch": "OPENAI_API_KEY",
        "anthropic": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY"}


class Boom(Exception):
    pass


def _provider(name: str, fake: HttpFake, batch_of: int | None = None) -> Any:
    """The provider ``name`` on the real SDK, over HTTP to ``fake``; with ``batch_of``, a
    batch API's batch goes out when that many requests wait (however slowly they came), not
    after 0.05 s."""
    gather: dict[str, Any] = ({"batch_delay": 0.05} if batch_of is None else
                              {"batch_delay": 120.0, "max_batch_size": batch_of})
    root = fake.base_url.removesuffix("/v1")
    if name == "openai":
        return AsyncOpenAI(api_key="sk-test", base_url=fake.base_url, max_retries=0)
    if name == "openai-batch":
        return OpenAIBatch(AsyncOpenAI(api_key="sk-test", base_url=fake.base_url,
                                       max_retries=0), **gather)
    if name == "anthropic":
        import anthropic

        return AnthropicBatches(anthropic.AsyncAnthropic(api_key="sk-ant", base_url=root,
                                                         max_retries=0), **gather)
    import httpx2
    from google import genai
    from google.genai import types

    # An httpx transport: google-genai's aiohttp session warns (an error under pytest).
    options = types.HttpOptions(base_url=root,
                                async_client_args={"transport": httpx2.AsyncHTTPTransport()})
    return GeminiBatches(genai.Client(api_key="gm", vertexai=False, http_options=options),
                         **gather)


def _request(name: str, key: str) -> dict[str, Any]:
    if name in ("openai", "openai-batch"):
        return {"model": "gpt-5", "input": f"question {key}"}
    if name == "anthropic":
        return {"model": "claude-sonnet-4-5", "max_tokens": 256,
                "messages": [{"role": "user", "content": f"question {key}"}]}
    return {"model": "gemini-2.5-flash", "contents": f"question {key}"}


async def _close(target: Any) -> None:
    from asyncbg._cli._formats import close

    await close(target)


async def leave_live(name: str, fake: HttpFake, journal: str | Path, keys: list[str],
                     *, wait: float = 0.0, one_batch: bool = False) -> None:
    """Submit ``keys`` with a journal, wait ``wait`` seconds, and leave them running; with
    ``one_batch``, a batch API's requests all go in one batch."""
    target = _provider(name, fake, len(keys) if one_batch else None)
    try:
        with pytest.raises(Boom):
            async with asyncbg.BackgroundManager(
                    target, journal=journal, cancel_on_exit=False, poll_policy=FAST_POLL,
                    retry_policy=FAST_RETRY, max_concurrency=1000) as mgr:
                jobs = [await mgr.submit(key=k, **_request(name, k)) for k in keys]
                for job in jobs:
                    await job.wait_accepted()
                    assert job.response_id is not None, (job.status, job.error)
                await anyio.sleep(wait)
                raise Boom
    finally:
        await _close(target)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``asyncbg ARGS`` as the operator would (in a thread of this process, with its own
    event loop); with ``only``, only that provider's key is set."""

    async def call(fake: HttpFake | None, *args: str,
                   only: str | None = None) -> tuple[int, str, str]:
        for name in list(os.environ):
            if name.endswith(("_API_KEY", "_BASE_URL")):
                monkeypatch.delenv(name)
        if fake is not None:
            root = fake.base_url.removesuffix("/v1")
            monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
            monkeypatch.setenv("ANTHROPIC_BASE_URL", root)
            monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", root)
            for key in [KEYS[only]] if only else sorted(set(KEYS.values())):
                monkeypatch.setenv(key, "k-test")
        capsys.readouterr()
        code = await anyio.to_thread.run_sync(main, list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return call


Cli = Callable[..., Awaitable[tuple[int, str, str]]]


def journal_rows(path: Path) -> dict[str, tuple[str, str, str | None]]:
    con = sqlite3.connect(path)
    try:
        return {k: (state, status, code) for k, state, status, code in con.execute(
            "SELECT key, state, status, error_code FROM jobs")}
    finally:
        con.close()


@pytest.fixture
def batch_fake(http_fake: HttpFake) -> HttpFake:
    http_fake.server.latency = LatencyModel.fixed(0.05)
    http_fake.server.batches.timing = BatchTiming(validating=0.01, finalizing=0.01,
                                                  cancelling=0.01)
    return http_fake


# -- cancel --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["openai-batch", "anthropic", "gemini"])
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
async def test_cancel_cancels_each_api_s_batch_whole_and_keeps_finished_results(
    name: str, batch_fake: HttpFake, tmp_path: Path, cli: Cli
) -> None:
    fake = batch_fake.server
    for i in range(4):
        fake.batches.script(f"slow{i}", duration=60)
    journal = tmp_path / "run.journal"
    await leave_live(name, batch_fake, journal, ["quick", *(f"slow{i}" for i in range(4))],
                     wait=0.3, one_batch=True)  # "quick" has finished; its batch has not
    assert fake.counters.batch_creates == 1 and fake.counters.batch_cancels == 0

    code, out, err = await cli(batch_fake, "status", "--ledger", str(journal), only=name)
    assert code == 0, err
    assert "batches     1" in out and name in out and "5 jobs" in out and "expires in" in out
    assert "asyncbg cancel" not in out  # no destructive advice

    polls = fake.counters.batch_polls
    code, out, err = await cli(batch_fake, "cancel", "--ledger", str(journal), only=name)
    assert code == 0, out + err
    # The cancel ended the batch and was seen at once: a few checks of it (2 or 3 here), not
    # checks spaced out until the command's --timeout (60 s: dozens of them).
    assert fake.counters.batch_polls - polls <= 6
    assert fake.counters.batch_cancels == 1  # the batch, once, on its own API
    assert fake.counters.cancels == 0  # never the Responses API
    assert "4 cancelled on the server, 1 had already finished and keep their results" in out
    assert "cancelled 4 of 5 live jobs; none is left live" in out
    assert len(out.splitlines()) == 2  # one line per batch and a total, not one per job
    rows = journal_rows(journal)
    assert rows["quick"] == ("done", "completed", None)  # the paid result is kept
    assert {rows[f"slow{i}"][1] for i in range(4)} == {"cancelled"}
    assert not any(code == "response_lost" for _, _, code in rows.values())


async def test_cancel_with_only_the_provider_s_key_says_which_key_is_missing(
    batch_fake: HttpFake, tmp_path: Path, cli: Cli
) -> None:
    batch_fake.server.batches.script("slow", duration=60)
    journal = tmp_path / "run.journal"
    await leave_live("anthropic", batch_fake, journal, ["slow"])
    code, _, err = await cli(batch_fake, "cancel", "--ledger", str(journal), only="openai")
    assert code == 2 and "ANTHROPIC_API_KEY" in err and "Traceback" not in err
    assert batch_fake.server.counters.batch_cancels == 0
    assert journal_rows(journal)["slow"][0] == "live"  # nothing recorded


async def test_cancel_against_an_unreachable_server_says_so_at_once_and_records_nothing(
    http_fake: HttpFake, tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncbg._providers._openai import OpenAIResponses

    http_fake.server.latency = LatencyModel.fixed(60)
    journal = tmp_path / "run.journal"
    await leave_live("openai", http_fake, journal, ["a", "b", "c"])
    tries: list[str] = []
    real_cancel = OpenAIResponses.cancel

    async def counted(self: OpenAIResponses, response_id: str) -> Any:
        tries.append(response_id)
        return await real_cancel(self, response_id)

    monkeypatch.setattr(OpenAIResponses, "cancel", counted)  # the real cancel, counted
    with socket_closed() as dead:
        env_url = f"http://127.0.0.1:{dead}/v1"
        code, out, err = await cli(http_fake, "cancel", "--ledger", str(journal), "--base-url",
                                   env_url, only="openai")
    # Each cancel tried once, and the first refusal ended the sweep: not tried again and again
    # until --timeout (it waited the whole 60 s before).
    assert 1 <= len(tries) <= 3 and len(set(tries)) == len(tries), tries
    assert code == 2, out + err
    assert "cannot connect to" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert {state for state, _, _ in journal_rows(journal).values()} == {"live"}
    assert http_fake.server.counters.cancels == 0


class socket_closed:
    """A localhost port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = int(s.getsockname()[1])
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        return None


async def seed_live(fake: HttpFake, spec: str, n: int) -> None:
    """``n`` live background responses on the fake, recorded in the shared ledger ``spec``
    as a worker records them (then its leases handed back, as a stopped worker does)."""
    client = AsyncOpenAI(api_key="sk-test", base_url=fake.base_url, max_retries=0)
    ledger = shared_ledger(spec)
    await ledger.open()
    async def one(i: int, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            request = {"model": "gpt-5", "input": f"q{i}", "background": True}
            await ledger.claim(f"r{i}", digest(request), canonical(request))
            await ledger.sending(f"r{i}", resubmit=False)
            response = await client.responses.create(**request)  # type: ignore[call-overload]
            await ledger.record(f"r{i}", Outcome(response.status or "queued",
                                                 response_id=response.id))

    try:
        limiter = anyio.CapacityLimiter(8)
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i, limiter)
        await ledger.release([f"r{i}" for i in range(n)])
    finally:
        await ledger.close()
        await client.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_cancel_on_a_shared_ledger_cancels_and_records_every_live_response(
    kind: str, http_fake: HttpFake, tmp_path: Path, request: pytest.FixtureRequest,
    cli: Cli,
) -> None:
    http_fake.server.latency = LatencyModel.fixed(60)
    n = 80  # more than any batch size inside the engine (64 requests in flight)
    ledger = (str(tmp_path / "fleet.db") if kind == "sqlite"
              else request.getfixturevalue("pg_dsn"))
    await seed_live(http_fake, ledger, n)
    code, out, err = await cli(http_fake, "cancel", "--ledger", ledger, only="openai")
    assert code == 0, out + err
    assert f"cancelled {n} of {n} live responses; none is left live" in out
    assert http_fake.server.counters.cancels == n
    code, out, err = await cli(None, "status", "--ledger", ledger, "--json")
    status = json.loads(out)
    assert status["by_status"] == {"cancelled": n} and status["live_response_ids"] == []
    assert "password" not in out


# -- status ----------------------------------------------------------------------------------


async def test_status_names_the_run_that_holds_the_journal(
    http_fake: HttpFake, tmp_path: Path, cli: Cli
) -> None:
    http_fake.server.latency = LatencyModel.fixed(60)
    journal = tmp_path / "run.journal"
    await leave_live("openai", http_fake, journal, ["a"])
    code, out, _ = await cli(None, "status", "--ledger", str(journal))
    assert code == 0 and "in progress" not in out
    lock = ExclusiveLock.acquire(Path(f"{journal.resolve()}.lock"), str(journal))
    try:
        code, out, _ = await cli(None, "status", "--ledger", str(journal))
        assert code == 0
        assert f"in progress: pid {os.getpid()} on " in out and "since" in out
        assert "the run that holds the journal collects them" in out
    finally:
        lock.release()


async def test_status_says_a_run_in_progress_has_its_creates_in_flight(
    tmp_path: Path, cli: Cli
) -> None:
    """A create being sent in a run's journal is sent again by a rerun only when no run holds
    the journal; while one does, it is in flight with that run, which records the answer."""
    from asyncbg._ledgers._sqlite import SQLiteLedger

    journal = tmp_path / "run.journal"
    ledger = SQLiteLedger(journal)
    await ledger.open()
    params = {"model": "m", "input": "a"}
    await ledger.claim("a", digest(params), canonical(params))
    await ledger.sending("a", resubmit=False)
    await ledger.close()
    code, out, _ = await cli(None, "status", "--ledger", str(journal))
    assert code == 0
    assert "1 create(s) left without an answer recorded (a rerun sends them again): a" in out
    lock = ExclusiveLock.acquire(Path(f"{journal.resolve()}.lock"), str(journal))
    try:
        code, out, _ = await cli(None, "status", "--ledger", str(journal), "--json")
        status = json.loads(out)
        assert (status["in_flight"], status["unconfirmed"]) == (["a"], [])
        code, out, _ = await cli(None, "status", "--ledger", str(journal))
        assert ("1 create(s) in flight with the run that holds the journal, which records "
                "the answers: a") in out
        assert "sends them again" not in out
    finally:
        lock.release()


async def test_status_many_live_responses_are_summed_up_not_listed(
    http_fake: HttpFake, tmp_path: Path, cli: Cli
) -> None:
    http_fake.server.latency = LatencyModel.fixed(60)
    journal = tmp_path / "run.journal"
    await leave_live("openai", http_fake, journal, [f"r{i}" for i in range(30)])
    code, out, _ = await cli(None, "status", "--ledger", str(journal))
    assert code == 0 and "30 still running on the server" in out
    assert "resp_" not in out and len(out.splitlines()) < 10


async def test_status_and_cancel_end_quietly_on_a_closed_pipe(tmp_path: Path) -> None:
    journal = tmp_path / "run.journal"
    ledger = asyncbg.SQLiteLedger(journal)
    await ledger.open()
    for i in range(20):
        await ledger.claim(f"k{i}", "d", b"{}")
    await ledger.close()
    reader, writer = os.pipe()
    os.close(reader)  # the reader went away before a line was written (`| head -0`)
    try:
        done = await anyio.run_process(
            [sys.executable, "-m", "asyncbg", "status", "--ledger", str(journal), "--json"],
            stdout=writer, stderr=subprocess.PIPE, check=False)
    finally:
        os.close(writer)
    assert done.returncode == 141  # quietly, as a shell reports a closed pipe (128 + SIGPIPE)
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr



# -- estimate --------------------------------------------------------------------------------


def _estimate_lines(provider: str) -> list[dict[str, Any]]:
    text = "x" * 400  # 100 tokens at 4 characters a token
    if provider == "openai":
        return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
                 "body": {"model": "gpt-5", "input": text, "max_output_tokens": 1000}}
                for i in range(3)]
    return [{"custom_id": f"r{i}", "params": {
        "model": "claude-sonnet-4-5", "max_tokens": 1000,
        "messages": [{"role": "user", "content": text}]}} for i in range(3)]


@pytest.mark.parametrize(("provider", "vendor", "model"), [
    ("openai", "openai", "gpt-5"), ("anthropic", "anthropic", "claude-sonnet-4-5")])
async def test_estimate_prices_each_way_as_genai_prices_does_and_sends_nothing(
    provider: str, vendor: str, model: str, tmp_path: Path, cli: Cli
) -> None:
    from genai_prices import Usage, calc_price

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in _estimate_lines(provider)))
    code, out, err = await cli(None, "estimate", str(path), "--provider", provider, "--json")
    assert code == 0, err
    got = json.loads(out)["models"][model]
    assert got["requests"] == 3 and got["output_tokens"] == 3000
    assert 300 <= got["input_tokens"] <= 330  # the text, give or take the role's characters
    one = calc_price(Usage(input_tokens=got["input_tokens"] // 3, output_tokens=1000),
                     model_ref=model, provider_id=vendor).total_price
    assert got["dollars"]["background"] == pytest.approx(3 * float(one), rel=0.02)
    assert got["dollars"]["batch"] == pytest.approx(got["dollars"]["background"] / 2, rel=0.02)
    if provider == "openai":
        assert got["dollars"]["flex"] == pytest.approx(got["dollars"]["batch"], rel=0.02)
    else:
        assert got["dollars"]["flex"] is None  # no flex tier outside OpenAI
    code, out, err = await cli(None, "estimate", str(path), "--provider", provider)
    assert code == 0 and "batch $" in out and "Nothing was sent." in out and not err
