"""The fake Responses server as a product: timeline, faults, counters, transports, fixture."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import openai
import pytest
import pytest_asyncio

import asyncbg
from asyncbg._asgi import listen
from asyncbg.testing import (
    FakeOpenAI,
    FakeResponsesServer,
    FaultRates,
    LatencyModel,
    Outcomes,
    asgi_app,
    fake_client,
)

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> FakeResponsesServer:
    return FakeResponsesServer(latency=LatencyModel.fixed(10.0, queue_fraction=0.2), clock=clock)


@pytest_asyncio.fixture
async def client(server: FakeResponsesServer) -> AsyncIterator[openai.AsyncOpenAI]:
    c = fake_client(server, max_retries=0)
    try:
        yield c
    finally:
        await c.close()


async def test_status_timeline_follows_the_clock(
    client: openai.AsyncOpenAI, server: FakeResponsesServer, clock: Clock
) -> None:
    r = await client.responses.create(model="m", input="hello", background=True)
    assert r.status == "queued" and r.background is True and r.output == []
    clock.now += 1.9
    assert (await client.responses.retrieve(r.id)).status == "queued"
    clock.now += 0.2
    assert (await client.responses.retrieve(r.id)).status == "in_progress"
    clock.now += 8.0
    done = await client.responses.retrieve(r.id)
    assert done.status == "completed" and done.output_text == "echo: hello"
    assert done.usage is not None and done.usage.total_tokens > 0
    assert done.usage.output_tokens_details.reasoning_tokens > 0


@pytest.mark.parametrize(
    ("outcome", "check"),
    [
        ("failed", lambda r: r.error.code == "server_error" and r.error.message),
        ("incomplete", lambda r: r.incomplete_details.reason == "max_output_tokens"),
        ("stuck", lambda r: r.status == "queued"),
    ],
)
async def test_outcomes_by_metadata(
    client: openai.AsyncOpenAI, clock: Clock, outcome: str, check: object
) -> None:
    r = await client.responses.create(model="m", input="x", background=True,
                                      metadata={"fake_outcome": outcome, "fake_duration": "1"})
    clock.now += 10_000
    final = await client.responses.retrieve(r.id)
    assert final.status == ("queued" if outcome == "stuck" else outcome)
    assert check(final)  # type: ignore[operator]


async def test_latency_models_and_outcome_weights() -> None:
    import random
    rng = random.Random(1)
    assert LatencyModel.fixed(2).sample(rng) == 2
    assert all(1 <= LatencyModel.uniform(1, 3).sample(rng) <= 3 for _ in range(100))
    logn = [LatencyModel.lognormal(5, 1.0, low=1, high=60).sample(rng) for _ in range(2000)]
    assert all(1 <= v <= 60 for v in logn)
    assert 4 < sorted(logn)[1000] < 6  # the median
    mix = [Outcomes(completed=1, failed=1).sample(rng) for _ in range(400)]
    assert 150 < mix.count("failed") < 250
    with pytest.raises(ValueError, match="kind"):
        LatencyModel(kind="bogus")  # type: ignore[arg-type]


async def test_bad_metadata_is_rejected_with_the_sdks_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="fake_duration") as info:
        await client.responses.create(model="m", input="x", background=True,
                                      metadata={"fake_duration": "soon"})
    assert info.value.body["param"] == "metadata"  # type: ignore[index]


async def test_error_bodies_have_openais_shape(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="", input="x")
    err = info.value.body
    assert set(err) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    assert err["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError, match="resp_nope"):
        await client.responses.retrieve("resp_nope")
    with pytest.raises(openai.BadRequestError, match="store"):
        await client.responses.create(model="m", input="x", background=True, store=False)


async def test_cancel_live_then_finished(
    client: openai.AsyncOpenAI, server: FakeResponsesServer, clock: Clock
) -> None:
    r = await client.responses.create(model="m", input="x", background=True)
    assert (await client.responses.cancel(r.id)).status == "cancelled"
    assert (await client.responses.cancel(r.id)).status == "cancelled"  # idempotent
    done = await client.responses.create(model="m", input="x", background=True)
    clock.now += 100
    with pytest.raises(openai.BadRequestError, match="Cannot cancel"):
        await client.responses.cancel(done.id)
    server.cancel_finished = "return"
    assert (await client.responses.cancel(done.id)).status == "completed"
    sync = await client.responses.create(model="m", input="x", metadata={"fake_duration": "0"})
    assert sync.status == "completed"
    with pytest.raises(openai.BadRequestError, match="background"):
        await client.responses.cancel(sync.id)


async def test_non_background_create_waits_for_the_answer(server: FakeResponsesServer) -> None:
    real = FakeResponsesServer(latency=LatencyModel.fixed(0.02))
    c = fake_client(real)
    try:
        r = await c.responses.create(model="m", input="now")
    finally:
        await c.close()
    assert r.status == "completed" and r.output_text == "echo: now"


async def test_counters(client: openai.AsyncOpenAI, server: FakeResponsesServer,
                        clock: Clock) -> None:
    a = await client.responses.create(model="m", input="x", background=True)
    b = await client.responses.create(model="m", input="x", background=True,
                                      metadata={"fake_duration": "2"})
    assert server.counters.in_flight == 2 and server.counters.max_in_flight == 2
    clock.now += 3  # b ended at +2
    assert server.live_count() == 1
    await client.responses.retrieve(b.id)
    await client.responses.retrieve(b.id)
    assert server.counters.detection_delays[b.id] == pytest.approx(1.0)  # seen 1 s after it ended
    await client.responses.cancel(a.id)
    assert server.live_count() == 0 and server.counters.max_in_flight == 2
    c = server.counters
    assert (c.creates, c.retrieves, c.cancels) == (2, 2, 1)
    assert c.polls == {b.id: 2}
    assert c.detection_delays[a.id] == 0.0
    c.reset()
    assert (c.creates, c.retrieves, c.max_in_flight) == (0, 0, 0)


@pytest.mark.parametrize(
    ("kind", "exc"),
    [("429", openai.RateLimitError), ("500", openai.InternalServerError),
     ("503", openai.InternalServerError), ("reset", openai.APIConnectionError)],
)
async def test_each_fault_happens_before_any_work(
    client: openai.AsyncOpenAI, server: FakeResponsesServer, kind: str, exc: type[Exception]
) -> None:
    server.inject(kind, route="create", retry_after=7)
    with pytest.raises(exc) as info:
        await client.responses.create(model="m", input="x", background=True)
    if kind == "429":
        assert info.value.response.headers["retry-after"] == "7"  # type: ignore[attr-defined]
    assert server.counters.creates == 0 and server.counters.faults == 1
    await client.responses.create(model="m", input="x", background=True)  # once only
    assert server.counters.creates == 1


async def test_reset_after_processing_creates_the_response(
    client: openai.AsyncOpenAI, server: FakeResponsesServer
) -> None:
    server.inject("reset_after", route="create")
    with pytest.raises(openai.APIConnectionError):
        await client.responses.create(model="m", input="x", background=True)
    assert server.counters.creates == 1


async def test_faults_match_their_route_and_count(
    client: openai.AsyncOpenAI, server: FakeResponsesServer
) -> None:
    r = await client.responses.create(model="m", input="x", background=True)
    server.inject("500", route="retrieve", times=2)
    await client.responses.create(model="m", input="x", background=True)  # not a retrieve
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await client.responses.retrieve(r.id)
    await client.responses.retrieve(r.id)


async def test_after_and_delay_are_refused_where_they_mean_nothing(
    client: openai.AsyncOpenAI, server: FakeResponsesServer
) -> None:
    """``after`` counts a drop's events: on a reset it used to be ignored, and the reset met
    the first create, not the 17th, as it was read."""
    with pytest.raises(ValueError, match="after=16 is for a drop fault"):
        server.inject("reset", route="create", after=16)
    with pytest.raises(ValueError, match="delay=1 is for a slow fault"):
        server.inject("503", delay=1)
    await client.responses.create(model="m", input="x", background=True)  # nothing queued
    assert server.counters.faults == 0


async def test_slow_answer(server: FakeResponsesServer) -> None:
    c = fake_client(server)
    server.inject("slow", delay=0.05)
    try:
        start = anyio.current_time()
        await c.responses.create(model="m", input="x", background=True)
        assert anyio.current_time() - start >= 0.05
    finally:
        await c.close()


async def test_random_fault_rates_are_seeded(client: openai.AsyncOpenAI,
                                             server: FakeResponsesServer) -> None:
    def run() -> list[str]:
        rates = FaultRates(rate_429=0.3, rate_reset=0.2, seed=3)
        return [str(f.kind) if (f := rates.draw("create")) else "-" for _ in range(50)]
    assert run() == run()
    assert 5 < run().count("429") < 25 and "reset" in run()
    assert FaultRates(rate_429=1.0, routes=("retrieve",)).draw("create") is None


async def test_restart_keeping_or_losing_state(
    client: openai.AsyncOpenAI, server: FakeResponsesServer, clock: Clock
) -> None:
    r = await client.responses.create(model="m", input="x", background=True)
    server.restart(keep_state=True, downtime=5)
    with pytest.raises(openai.APIConnectionError):
        await client.responses.retrieve(r.id)
    clock.now += 6
    assert (await client.responses.retrieve(r.id)).status == "in_progress"
    server.restart(keep_state=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    assert server.live_count() == 0


async def test_poll_after_header_only_on_live_answers(
    client: openai.AsyncOpenAI, server: FakeResponsesServer, clock: Clock
) -> None:
    server.poll_after_ms = 1500
    raw = await client.responses.with_raw_response.create(model="m", input="x", background=True)
    assert raw.headers["openai-poll-after-ms"] == "1500"
    clock.now += 100
    raw = await client.responses.with_raw_response.retrieve(raw.parse().id)
    assert "openai-poll-after-ms" not in raw.headers


async def test_background_stream_replays_from_starting_after() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.05), stream_events=4)
    c = fake_client(server)
    try:
        stream = await c.responses.create(model="m", input="abcdefgh", background=True,
                                          stream=True)
        events = [e async for e in stream]
        seqs = [e.sequence_number for e in events]
        assert seqs == list(range(len(events)))
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "echo: abcdefgh"
        rid = events[0].response.id
        replay = await c.responses.retrieve(rid, stream=True, starting_after=2)
        again = [e async for e in replay]
        assert [e.sequence_number for e in again] == seqs[3:]
    finally:
        await c.close()


async def test_served_by_uvicorn_on_loopback_end_to_end() -> None:
    import uvicorn

    server = FakeResponsesServer(latency=LatencyModel.fixed(0.03))
    # Bound and listening before uvicorn starts, so clients can connect at once.
    sock = listen("127.0.0.1", 0)  # its connections send at once (TCP_NODELAY)
    port = sock.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(asgi_app(server), log_level="error", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(web.serve, [sock])
        client = openai.AsyncOpenAI(api_key="sk-x", base_url=f"http://127.0.0.1:{port}/v1")
        try:
            policy = asyncbg.PollPolicy(first_poll=0.01, min_interval=0.01, max_interval=0.02)
            async with asyncbg.BackgroundManager(client, max_concurrency=4,
                                                 poll_policy=policy) as mgr:
                jobs = [await mgr.submit(model="m", input=f"q{i}") for i in range(12)]
            assert all(j.status is asyncbg.JobStatus.COMPLETED for j in jobs)
            stream = await client.responses.retrieve(jobs[0].response_id,  # type: ignore[arg-type]
                                                     stream=True, starting_after=0)
            assert [e.sequence_number async for e in stream][:1] == [1]
        finally:
            await client.close()
            web.should_exit = True
    sock.close()
    assert server.counters.creates == 12 and server.counters.max_in_flight == 4


async def test_the_pytest_fixture(fake_openai: FakeOpenAI) -> None:
    r = await fake_openai.client.responses.create(model="m", input="hi", background=True)
    assert r.status == "queued"
    assert fake_openai.counters.creates == 1 and fake_openai.server.counters is fake_openai.counters


@pytest.fixture
def fake_server() -> FakeResponsesServer:
    """Overriding the plugin's fixture configures the server fake_openai talks to."""
    return FakeResponsesServer(outcomes=Outcomes(completed=0, failed=1))


async def test_the_fixture_uses_an_overridden_server(fake_openai: FakeOpenAI) -> None:
    policy = asyncbg.PollPolicy(first_poll=0.01, min_interval=0.01, max_interval=0.02)
    async with asyncbg.BackgroundManager(fake_openai.client, poll_policy=policy) as mgr:
        job = await mgr.submit(model="m", input="x")
    assert job.status is asyncbg.JobStatus.FAILED
    assert json.dumps(fake_openai.counters.polls)


async def test_the_listening_socket_s_connections_send_at_once() -> None:
    """The socket the dashboard, the metrics server and the tests hand to uvicorn: its accepted
    connections have Nagle's algorithm off (asyncio leaves it on for a socket not made with
    IPPROTO_TCP named, and an answer in two writes then waited 40 ms for a delayed ACK)."""
    import socket

    with listen("127.0.0.1", 0) as sock, \
            socket.create_connection(sock.getsockname()[:2]):
        conn, _ = sock.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    with socket.create_server(("127.0.0.1", 0)) as plain, \
            socket.create_connection(plain.getsockname()[:2]):
        conn, _ = plain.accept()
        with conn:  # what it was before
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
