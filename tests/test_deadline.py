"""The cheapest way to meet a deadline (``DeadlineManager``): batch, flex and background mixed
in one run, moves that cancel before they send, and reruns that create no line twice.

One fake clock drives both the policy and the fake server, so hours of a deadline pass in a
few milliseconds; each step waits on what the fake server or the jobs say, not on time."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncbg
from asyncbg import DeadlineLine, DeadlineManager, DeadlinePolicy, JobStatus, PollPolicy
from asyncbg._deadline._journal import line_records, split_key, way_key
from asyncbg._deadline._policy import Way, parse_by
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client
from asyncbg.testing._wire import FakeAnswer

POLICY = DeadlinePolicy(batch_needs=500, flex_needs=100, background_needs=10,
                        check_every=0.005)
FAST = PollPolicy(first_poll=0.005, min_interval=0.005, max_interval=0.02)


class Clock:
    """The one clock of a test: the policy's and the fake server's."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Counting(FakeResponsesServer):
    """The fake, counting what was created for each line on each way (a Responses create,
    or a request in an uploaded batch file), with per-way scripts for responses."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(latency=LatencyModel.fixed(0.05), clock=clock)
        self.sent: Counter[tuple[str, str]] = Counter()
        #: Flex short of capacity: its creates are answered 429 with a long Retry-After.
        self.flex_busy = False
        #: (line, "flex" | "background") -> metadata that scripts that response.
        self.scripts: dict[tuple[str, str], dict[str, str]] = {}

    async def handle(self, method: str, path: str, query: Mapping[str, str],
                     body: bytes) -> FakeAnswer:
        if method == "POST" and path.endswith("/responses"):
            data = json.loads(body)
            line = data["metadata"]["line"]
            way = "flex" if data.get("service_tier") == "flex" else "background"
            self.sent[line, way] += 1
            if way == "flex" and self.flex_busy:
                answer = self._error(429, "Resource Unavailable", "rate_limit_error")
                answer.headers["retry-after"] = "100"
                return answer
            script = self.scripts.get((line, way))
            if script:
                data["metadata"] = {**data["metadata"], **script}
                body = json.dumps(data).encode()
        elif method == "POST" and path.endswith("/files"):
            for raw in body.split(b"\n"):
                if raw.startswith(b'{"custom_id"'):
                    key, way = split_key(json.loads(raw)["custom_id"]) or ("?", Way.BATCH)
                    self.sent[key, way.value] += 1
        return await super().handle(method, path, query, body)

    def script_batch(self, *, done: tuple[str, ...] = (), stuck: tuple[str, ...] = ()) -> None:
        """Lines whose batch requests end at once, and lines whose batch requests never do."""
        for line in done:
            self.batches.script(way_key(line, Way.BATCH), duration=0.01)
        for line in stuck:
            self.batches.script(way_key(line, Way.BATCH), outcome="stuck")

    def per_line(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for (line, _way), n in self.sent.items():
            total[line] += n
        return total


def request(line: str) -> dict[str, Any]:
    return {"model": "gpt-5.2", "input": f"question {line}", "metadata": {"line": line}}


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (a few ms at a time, 10 s at most) for ``condition``: an event of the fake."""
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - the fake has no event to wait on
            await anyio.sleep(0.002)


async def accepted(*lines: DeadlineLine) -> None:
    """Wait until each line's current job was created (before the clock moves on)."""
    for line in lines:
        assert line.job is not None
        await line.job.wait_accepted()


def manager(client: Any, clock: Clock, **kw: Any) -> DeadlineManager:
    """Lines submitted in a row share one batch (each submit claims its key in the journal
    first: the group waits 0.1 s for the rest)."""
    return DeadlineManager(client, by=1000.0, clock=clock, policy=POLICY, poll_policy=FAST,
                           batch_poll_policy=FAST, batch_delay=0.1, **kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Counting:
    return Counting(clock)


@pytest.mark.asyncio
async def test_a_late_batch_is_cancelled_and_only_its_unrun_lines_go_to_background(
    server: Counting, clock: Clock
) -> None:
    server.script_batch(done=("a", "b"), stuck=("c", "d"))
    client = fake_client(server)
    async with manager(client, clock) as dm:
        lines = [await dm.submit_request(request(k), key=k) for k in "abcd"]
        assert {ln.way for ln in lines} == {Way.BATCH}  # 1000 s left: a batch window fits
        for ln in lines:
            assert ln.job is not None
            await ln.job.wait_accepted()
        clock.now = 850.0  # 150 s left: flex (100 s) still fits after the batch; nothing moves
        await anyio.sleep(0.05)
        assert not any(ln.moves for ln in lines) and server.counters.batch_cancels == 0
        clock.now = 950.0  # 50 s left: too late for flex, so background; a and b ran by now
        await until(lambda: server.counters.batch_cancels == 1, "the batch cancelled")
        clock.now = 951.0  # the cancel took effect; c and d go to background
        await until(lambda: server.sent["c", "background"] + server.sent["d", "background"] == 2,
                    "c and d sent again")
        await accepted(*lines)
        clock.now = 952.0
        done = [await ln.wait(timeout=10) for ln in lines]
        stats = dm.statistics()
    await client.close()
    assert all(job.status is JobStatus.COMPLETED for job in done)
    assert [ln.way for ln in lines] == [Way.BATCH, Way.BATCH, Way.BACKGROUND, Way.BACKGROUND]
    assert lines[2].moves == [(Way.BATCH, Way.BACKGROUND)] and not lines[0].moves
    assert max(server.sent.values()) == 1  # no line created twice on any way
    assert server.sent["a", "background"] == server.sent["b", "background"] == 0
    assert stats.lines == {"batch": 2, "flex": 0, "background": 2} and stats.moved == 2
    assert stats.dollars["batch"] > 0 and stats.dollars["background"] > 0
    assert stats.full_price > stats.cost  # the batch half was at half price


@pytest.mark.asyncio
async def test_one_run_mixes_batch_flex_and_background_and_creates_no_line_twice(
    server: Counting, clock: Clock
) -> None:
    server.script_batch(done=("b1", "b2"))
    server.scripts["f2", "flex"] = {"fake_outcome": "stuck"}  # flex runs out of pace
    client = fake_client(server)
    async with manager(client, clock) as dm:
        b = [await dm.submit_request(request(k), key=k) for k in ("b1", "b2")]
        await accepted(*b)
        clock.now = 1.0  # the batch ends
        await b[0].wait(timeout=10)
        clock.now = 600.0  # 400 s left: no batch window, flex fits
        f = [await dm.submit_request(request(k), key=k) for k in ("f1", "f2")]
        assert [ln.way for ln in f] == [Way.FLEX, Way.FLEX]
        await accepted(*f)
        clock.now = 601.0
        await f[0].wait(timeout=10)
        clock.now = 800.0  # f2 has been on flex 200 s, twice what flex needs
        await until(lambda: not dm.flex_kept_pace, "flex lost its pace")
        g = await dm.submit_request(request("g1"), key="g1")
        assert g.way is Way.BACKGROUND  # 200 s left would fit flex, but flex is slow today
        clock.now = 995.0  # 5 s left: f2 leaves flex for background
        await until(lambda: server.sent["f2", "background"] == 1, "f2 moved")
        await accepted(f[1], g)
        clock.now = 996.0
        for ln in [*b, *f, g]:
            assert (await ln.wait(timeout=10)).status is JobStatus.COMPLETED
        stats = dm.statistics()
    await client.close()
    assert {k: ln.way for k, ln in dm._lines.items()} == {
        "b1": Way.BATCH, "b2": Way.BATCH, "f1": Way.FLEX, "f2": Way.BACKGROUND,
        "g1": Way.BACKGROUND}
    assert max(server.sent.values()) == 1  # once per way at most ...
    assert server.per_line() == {"b1": 1, "b2": 1, "f1": 1, "f2": 2, "g1": 1}  # f2: moved
    assert server.counters.cancels == 1  # f2's flex response, before it went to background
    assert stats.lines == {"batch": 2, "flex": 1, "background": 2} and stats.moved == 1
    assert not stats.flex_kept_pace


@pytest.mark.asyncio
async def test_an_interrupted_run_rerun_continues_each_line_and_creates_none_twice(
    server: Counting, clock: Clock, tmp_path: Path
) -> None:
    journal = str(tmp_path / "by.journal")
    server.script_batch(done=("x1", "x2"), stuck=("x3", "x4"))
    client = fake_client(server)

    class Interrupt(Exception):
        pass

    with pytest.raises(Interrupt):
        async with manager(client, clock, journal=journal, cancel_on_exit=False) as dm:
            for k in ("x1", "x2", "x3", "x4"):
                ln = await dm.submit_request(request(k), key=k)
                assert ln.job is not None
            for ln in dm.lines:
                assert ln.job is not None
                await ln.job.wait_accepted()
            raise Interrupt  # Ctrl-C: the batch keeps running on the server
    assert server.counters.batch_creates == 1
    # The rerun comes late: the batch must be left for background.
    clock.now = 995.0
    async with manager(client, clock, journal=journal) as dm:
        lines = [await dm.submit_request(request(k), key=k) for k in ("x1", "x2", "x3", "x4")]
        assert {ln.way for ln in lines} == {Way.BATCH}  # followed, not created again
        await until(lambda: server.counters.batch_cancels == 1, "the batch cancelled")
        clock.now = 996.0
        await until(lambda: server.sent["x3", "background"] + server.sent["x4", "background"]
                    == 2, "x3 and x4 moved")
        await accepted(*lines)
        clock.now = 997.0
        done = [await ln.wait(timeout=10) for ln in lines]
    assert all(job.status is JobStatus.COMPLETED for job in done)
    assert server.counters.batch_creates == 1 and max(server.sent.values()) == 1
    # A third run finds every line done: nothing is sent.
    before = Counter(server.sent)
    async with manager(client, clock, journal=journal) as dm:
        again = [await dm.submit_request(request(k), key=k) for k in ("x1", "x2", "x3", "x4")]
        assert [(await ln.wait(timeout=10)).status for ln in again] == [JobStatus.COMPLETED] * 4
    await client.close()
    assert server.sent == before and server.counters.batch_creates == 1
    ledger = asyncbg.SQLiteLedger(journal)
    await ledger.open()
    try:
        view = line_records(await ledger.records())
    finally:
        await ledger.close()
    assert sorted(view) == ["x1", "x2", "x3", "x4"]
    assert {k: r.status for k, r in view.items()} == dict.fromkeys(view, "completed")
    assert view["x3"].response_id is not None and "#" not in view["x3"].response_id


@pytest.mark.asyncio
async def test_a_move_cut_short_is_finished_by_the_rerun_before_anything_is_sent(
    server: Counting, clock: Clock, tmp_path: Path
) -> None:
    """Killed after the journal marked a move but before the batch was cancelled: the rerun
    cancels the batch first, then sends, even though the time left no longer asks for it."""
    journal = str(tmp_path / "by.journal")
    server.script_batch(stuck=("m",))
    client = fake_client(server)
    with pytest.raises(KeyboardInterrupt):
        async with manager(client, clock, journal=journal, cancel_on_exit=False) as dm:
            ln = await dm.submit_request(request("m"), key="m")
            assert ln.job is not None
            await ln.job.wait_accepted()
            await dm._mark(ln, Way.BACKGROUND)  # the marker, and then the kill
            raise KeyboardInterrupt
    clock.now = 10.0  # plenty of time left: only the marker asks for the move
    async with manager(client, clock, journal=journal) as dm:
        ln = await dm.submit_request(request("m"), key="m")
        await until(lambda: server.counters.batch_cancels == 1, "the batch cancelled")
        assert server.sent["m", "background"] == 0  # not before the batch has ended
        clock.now = 10.5
        await until(lambda: server.sent["m", "background"] == 1, "m moved")
        await accepted(ln)
        clock.now = 11.0
        assert (await ln.wait(timeout=10)).status is JobStatus.COMPLETED
    await client.close()
    assert ln.way is Way.BACKGROUND and server.sent == {("m", "batch"): 1,
                                                         ("m", "background"): 1}


@pytest.mark.asyncio
async def test_a_line_that_finished_before_the_cancel_keeps_its_result(
    server: Counting, clock: Clock
) -> None:
    client = fake_client(server)
    async with manager(client, clock, ways=("flex", "background")) as dm:
        clock.now = 100.0
        ln = await dm.submit_request(request("r"), key="r")
        assert ln.way is Way.FLEX and ln.job is not None
        await ln.job.wait_accepted()
        clock.now = 100.5  # its flex response has completed on the server, not yet polled
        server.cancel_finished = "return"
        ln.moving = Way.BACKGROUND
        await ln.job.cancel()  # the move's cancel races the response's end
        assert (await ln.wait(timeout=10)).status is JobStatus.COMPLETED
    await client.close()
    assert ln.way is Way.FLEX and server.sent == {("r", "flex"): 1}


def test_the_policy_picks_the_cheapest_way_that_fits_and_moves_at_the_last_safe_moment(
) -> None:
    p = DeadlinePolicy()
    every = set(Way)
    assert p.start(24 * 3600, every) is Way.BATCH  # --by 24h
    assert p.start(8 * 3600, every) is Way.FLEX and p.start(2 * 3600, every) is Way.FLEX
    assert p.start(1800, every) is Way.BACKGROUND and p.start(60, every) is Way.BACKGROUND
    assert p.start(24 * 3600, {Way.FLEX, Way.BACKGROUND}) is Way.FLEX
    assert p.start(8 * 3600, every, after=Way.FLEX) is Way.BACKGROUND
    assert not p.must_move(Way.BATCH, 3601, every) and p.must_move(Way.BATCH, 3600, every)
    assert p.must_move(Way.BATCH, 1000, every - {Way.FLEX}) is False  # background: 900 s
    assert p.must_move(Way.FLEX, 900, every) and not p.must_move(Way.BACKGROUND, 0, every)
    with pytest.raises(ValueError, match="faster way"):
        DeadlinePolicy(flex_needs=10, background_needs=20)


def test_by_takes_durations_and_timestamps_with_an_offset() -> None:
    assert parse_by("2h", 100.0) == 7300.0 and parse_by("1h30m", 0) == 5400.0
    assert parse_by("90m", 0) == 5400.0 and parse_by("1d", 0) == 86_400.0
    assert parse_by("2026-12-04T08:00:00Z", 0) == 1796371200.0
    for bad, says in (("soon", "neither"), ("2026-12-04T08:00:00", "UTC offset"),
                      ("0h", "more than 0"), ("2020-01-01T00:00:00Z", "passed")):
        with pytest.raises(ValueError, match=says):
            parse_by(bad, 1.9e9)


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_random_lines_clocks_and_stalls_never_create_a_line_twice(
    server: Counting, clock: Clock, seed: int, tmp_path: Path
) -> None:
    """Lines submitted at random moments, batch and flex requests that take random times or
    never end, a clock that jumps, and (for even seeds) a run interrupted at a random moment
    and run again on its journal: every line completes, on no way twice, and never on a way
    after one that gave it a result."""
    import random

    class Interrupt(Exception):
        pass

    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(16)]
    for key in keys:
        if rng.random() < 0.4:
            server.script_batch(stuck=(key,))
        else:
            server.batches.script(way_key(key, Way.BATCH), duration=rng.uniform(0.01, 400))
        if rng.random() < 0.4:
            server.scripts[key, "flex"] = {"fake_outcome": "stuck"}
        else:
            server.scripts[key, "flex"] = {"fake_duration": f"{rng.uniform(0.01, 150):.2f}"}
    client = fake_client(server)
    journal = str(tmp_path / "by.journal")
    stop_at = rng.uniform(300, 1000) if seed % 2 == 0 else None
    interrupted = False
    try:
        async with manager(client, clock, journal=journal, cancel_on_exit=False) as dm:
            lines = []
            for key in keys:
                lines.append(await dm.submit_request(request(key), key=key))
                if rng.random() < 0.3:
                    await accepted(*lines)
                    clock.now += rng.uniform(0, 150)
            with anyio.fail_after(20):
                # Time goes on (past the deadline too) until every line has ended: the engine
                # reacts however slowly it may; the checks below hold all the same.
                while not all(ln.done for ln in lines):
                    await anyio.sleep(0.002)
                    clock.now += rng.uniform(0, 40)
                    if stop_at is not None and clock.now > stop_at:
                        raise Interrupt  # Ctrl-C: live jobs stay on the server
    except Interrupt:
        interrupted = True
        async with manager(client, clock, journal=journal) as dm:
            lines = [await dm.submit_request(request(key), key=key) for key in keys]
            with anyio.fail_after(20):
                while not all(ln.done for ln in lines):
                    await anyio.sleep(0.002)
                    clock.now += rng.uniform(0, 40)
    finals = [await ln.wait() for ln in lines]
    await client.close()
    assert interrupted is (stop_at is not None)  # the even seeds did stop mid-run
    assert [job.status for job in finals] == [JobStatus.COMPLETED] * len(keys)
    assert max(server.sent.values()) == 1, server.sent
    order = [w.value for w in (Way.BATCH, Way.FLEX, Way.BACKGROUND)]
    for ln in lines:
        assert ln.way is not None
        later = order[order.index(ln.way.value) + 1:]
        assert not any(server.sent[ln.key, w] for w in later)  # nothing after its result
        if stop_at is None:
            assert server.per_line()[ln.key] == 1 + len(ln.moves)  # one send per way taken


@pytest.mark.asyncio
async def test_a_deadline_manager_needs_an_openai_client_and_the_cheapest_mode() -> None:
    from datetime import datetime

    client = fake_client(FakeResponsesServer())
    with pytest.raises(TypeError, match=r"openai\.AsyncOpenAI"):
        DeadlineManager(object(), by=1.0)
    with pytest.raises(ValueError, match="deadline_mode"):
        DeadlineManager(client, by=1.0, deadline_mode="fastest")
    with pytest.raises(ValueError, match="time zone"):
        DeadlineManager(client, by=datetime(2030, 1, 1))
    await client.close()


@pytest.mark.asyncio
async def test_flex_short_of_capacity_does_not_hold_back_the_lines_moved_to_background(
    server: Counting, clock: Clock
) -> None:
    """Flex answers 429 with a long Retry-After: its creates wait, and the line that must
    leave flex is cancelled there unsent and created on background at once."""
    server.flex_busy = True
    client = fake_client(server)
    async with manager(client, clock, ways=("flex",)) as dm:
        ln = await dm.submit_request(request("f"), key="f")
        assert ln.way is Way.FLEX
        await until(lambda: server.sent["f", "flex"] == 1, "flex refused it")
        clock.now = 995.0  # 5 s left: it must leave flex, whose creates wait 100 s
        await until(lambda: server.sent["f", "background"] == 1, "f moved")
        await accepted(ln)
        clock.now = 996.0
        with anyio.fail_after(5):  # not the 100 s that flex's creates are held
            assert (await ln.wait()).status is JobStatus.COMPLETED
    await client.close()
    assert ln.way is Way.BACKGROUND and ln.moves == [(Way.FLEX, Way.BACKGROUND)]
    assert server.counters.creates == 1  # flex never created it: nothing was paid there


@pytest.mark.asyncio
async def test_waiting_for_a_slot_of_our_own_is_not_flex_losing_its_pace(
    server: Counting, clock: Clock
) -> None:
    """One flex slot: the second line waits 80 s for the first, then runs 80 s. Each ran
    within flex's 100 s once the server had it, so flex has kept its pace."""
    server.scripts["q1", "flex"] = server.scripts["q2", "flex"] = {"fake_duration": "80"}
    client = fake_client(server)
    async with manager(client, clock, ways=("flex",), max_concurrency=1) as dm:
        clock.now = 500.0  # 500 s left: flex
        q1, q2 = [await dm.submit_request(request(k), key=k) for k in ("q1", "q2")]
        await accepted(q1)
        clock.now = 580.0  # q1 ends; q2 has waited 80 s for the slot
        await q1.wait(timeout=10)
        await accepted(q2)
        await anyio.sleep(0.02)  # a few looks at the clock
        clock.now = 661.0  # q2 has been on the server 81 s, 161 s since it was submitted
        assert (await q2.wait(timeout=10)).status is JobStatus.COMPLETED
        await anyio.sleep(0.02)
        assert dm.flex_kept_pace
        clock.now = 662.0
        q3 = await dm.submit_request(request("q3"), key="q3")
        assert q3.way is Way.FLEX  # flex is still chosen
        await accepted(q3)
        clock.now = 700.0
        await q3.wait(timeout=10)
    await client.close()
