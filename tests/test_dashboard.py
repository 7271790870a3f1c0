"""The live dashboard (asyncbg dashboard, asyncbg.dashboard_app) in a real browser.

Debian's chromium driven by Playwright (``executable_path``: no browser download); one browser
for the module. The ledger is written while the page is open by a run in another thread (an
anyio portal) against the fake server, whose clock the tests move: a response finishes when a
test says so. The dashboard is served by uvicorn on 127.0.0.1 in the same portal.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

import asyncbg
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

from .conftest import FAST_RETRY, meta
from .pg_fixtures import in_ci

TOKEN = "s3cret-token"
POLL = asyncbg.PollPolicy(first_poll=0.01, min_interval=0.01, max_interval=0.05, jitter=0)
#: key -> (fake duration, outcome) of the jobs the run submits; the clock starts at 0.
JOBS = {
    **{f"done-{i}": (0.0, None) for i in range(3)},
    "bad": (0.0, "failed"),
    **{f"slow-{i}": (100.0, None) for i in range(2)},  # finish when a test moves the clock
    **{f"keep-{i}": (10_000.0, None) for i in range(2)},  # live until cancelled
}


def _chromium() -> str:
    path = os.environ.get("ASYNCBG_TEST_CHROMIUM") or "/usr/bin/chromium"
    if not Path(path).exists():
        reason = os.environ.get("ASYNCBG_TEST_CHROMIUM_ERROR") or f"no {path}"
        message = f"no browser for the dashboard tests: {reason}"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def wait_for(check: Callable[[], Any], *, timeout: float = 15.0) -> Any:
    """Poll ``check`` (a read of another thread's state) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        time.sleep(0.02)


def ledger_counts(path: Path) -> dict[str, int]:
    """The truth, read straight from the journal."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            rows = db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
        except sqlite3.OperationalError:  # not made yet
            return {}
        return dict(rows)


@dataclass
class World:
    portal: BlockingPortal
    server: FakeResponsesServer
    clock: list[float]
    path: Path
    url: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import uvicorn

    path = tmp_path_factory.mktemp("dash") / "run.journal"
    clock = [0.0]
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.0), clock=lambda: clock[0])
    with start_blocking_portal() as portal:
        stop = portal.call(anyio.Event)

        async def run() -> None:  # an `asyncbg run` writing the journal while the page is open
            client = fake_client(server)
            with anyio.CancelScope() as interrupted:  # like Ctrl-C: live jobs are left running
                async with asyncbg.BackgroundManager(
                        client, journal=path, poll_policy=POLL, retry_policy=FAST_RETRY,
                        cancel_on_exit=False) as mgr:
                    for key, (duration, outcome) in JOBS.items():
                        await mgr.submit(model="gpt-5.2", input=f"secret prompt {key}",
                                         key=key, metadata=meta(duration, outcome))
                    await stop.wait()
                    interrupted.cancel()
            await client.close()

        running = portal.start_task_soon(run)
        wait_for(lambda: path.exists() and sum(ledger_counts(path).values()) == len(JOBS))
        app = asyncbg.dashboard_app(path, allow_actions=True, token=TOKEN,
                                    client=lambda: fake_client(server), interval=0.05)
        web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                            lifespan="on", timeout_graceful_shutdown=1))
        serving = portal.start_task_soon(web.serve)
        wait_for(lambda: web.started)
        port = web.servers[0].sockets[0].getsockname()[1]
        try:
            yield World(portal, server, clock, path, f"http://127.0.0.1:{port}/")
        finally:
            web.should_exit = True
            serving.result(timeout=10)
            portal.call(stop.set)
            running.result(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=20_000)  # a loaded 2-core machine: waits end on the event anyway
    executable = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        context.close()


def shown(page: Any, status: str) -> Any:
    return page.locator(f'#by-status b[data-status="{status}"]')


def test_the_page_shows_the_ledgers_counts_and_a_job_finishing_without_a_reload(
        world: World, page: Any) -> None:
    from playwright.sync_api import expect

    wait_for(lambda: ledger_counts(world.path).get("completed") == 3
             and ledger_counts(world.path).get("failed") == 1)
    page.goto(world.url)
    truth = ledger_counts(world.path)
    for status, count in truth.items():
        expect(shown(page, status)).to_have_text(f"{count:,}")
    expect(page.locator("#total")).to_have_text(str(len(JOBS)))
    expect(page.locator("#failures")).to_contain_text("failed")  # the fake's error code
    expect(page.locator("#live tbody tr[data-key]")).to_have_count(4)
    page.evaluate("window.__same_page = true")

    world.clock[0] = 150.0  # the two slow responses are done on the server now
    expect(shown(page, "completed")).to_have_text("5")
    expect(page.locator("#live tbody tr[data-key]")).to_have_count(2)
    assert page.evaluate("window.__same_page") is True  # updated live, not reloaded
    assert ledger_counts(world.path)["completed"] == 5

    page.fill("#filter", "keep-1")
    expect(page.locator("#live tbody tr[data-key]:visible")).to_have_count(1)


def test_a_jobs_page_hides_its_prompt(world: World, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(world.url + "jobs/done-1")
    expect(page.locator("#job-status")).to_contain_text("completed")
    request = page.locator("section", has=page.locator("h2", has_text="Request"))
    expect(request).to_contain_text("hidden: start the dashboard with --show-prompts")
    assert "secret prompt" not in request.inner_text()
    expect(page.locator(".history li").last).to_contain_text("completed")


def test_cancel_needs_the_token_and_cancels_on_the_server(world: World, page: Any) -> None:
    from playwright.sync_api import expect

    # The slow jobs done on the server, whichever test ran before (or none: xdist spreads a
    # module's tests over workers, each with its own world): only the keep-* jobs are live.
    world.clock[0] = max(world.clock[0], 150.0)
    wait_for(lambda: ledger_counts(world.path).get("completed") == 5)
    page.goto(world.url)
    # The page settled on that state: a live update that still removes rows would move the
    # button between Playwright finding it and its click landing.
    expect(shown(page, "completed")).to_have_text("5")
    expect(page.locator("#live tbody tr[data-key]")).to_have_count(2)
    keep = page.locator('#live tr[data-key="keep-0"]')
    response_id = keep.locator("td.mono").first.inner_text()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Asyncbg-Token": "wrong"}):
        refused = page.request.post(world.url + "actions/cancel", data={"all": True},
                                    headers=headers)
        assert refused.status == 401
    assert world.server.status_of(response_id) == "queued"  # changed nothing
    assert ledger_counts(world.path).get("cancelled") is None

    page.on("dialog", lambda dialog: dialog.accept())
    page.fill("#token", TOKEN)
    with page.expect_response("**/actions/cancel") as answer:
        keep.locator("button[data-action=cancel]").click()
    assert answer.value.status == 200, answer.value.text()
    [cancelled] = answer.value.json()["cancelled"]
    assert (cancelled["key"], cancelled["status"]) == ("keep-0", "cancelled"), cancelled
    expect(shown(page, "cancelled")).to_have_text("1")
    assert world.server.status_of(response_id) == "cancelled"
    assert ledger_counts(world.path)["cancelled"] == 1
    expect(page.locator('#live tr[data-key="keep-1"]')).to_have_count(1)  # only that one

    with page.expect_response("**/actions/cancel") as answer:  # the token is remembered
        page.locator("button[data-action=cancel-all]").click()
    assert [c["key"] for c in answer.value.json()["cancelled"]] == ["keep-1"]
    expect(shown(page, "cancelled")).to_have_text("2")
    expect(page.locator("#live tbody tr[data-key]")).to_have_count(0)


def test_the_page_fits_a_phone(world: World, browser: Any) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True,
                                  has_touch=True)
    try:
        page = context.new_page()
        page.goto(world.url)
        expect(page.locator("#total")).to_have_text(str(len(JOBS)))
        # Nothing wider than the screen but the tables, which scroll inside their panel.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        if os.environ.get("ASYNCBG_DASHBOARD_SHOT"):  # a picture to look at, on request
            page.screenshot(path=os.environ["ASYNCBG_DASHBOARD_SHOT"], full_page=True)
        cards = page.evaluate(
            "[...document.querySelectorAll('#overview .card')].map(c => c.getBoundingClientRect())"
            ".map(r => [r.left, r.right])")
        assert cards and all(left >= 0 and right <= 375 for left, right in cards)
    finally:
        context.close()
