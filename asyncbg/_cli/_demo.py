"""``asyncbg demo`` (the README's quick start) and ``asyncbg fake-server``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio
from rich.console import Console

from .. import BackgroundManager, Job, PollPolicy, RetryPolicy
from ._progress import Display, Live, Tally, counts_text, rows

__all__ = ["demo", "fake_server"]


def _tokens(job: Job) -> int:
    """Total tokens the server reported for a finished job (0 when it reported none)."""
    usage: Any = getattr(job.response, "usage", None)
    total = usage.get("total_tokens") if isinstance(usage, dict) else getattr(
        usage, "total_tokens", None)
    return total if isinstance(total, int) else 0


async def demo(args: argparse.Namespace) -> int:
    """Fan out ``--jobs`` responses against the in-process fake server; summary on stdout."""
    from ..testing import FakeResponsesServer, FaultRates, LatencyModel, Outcomes, fake_client

    server = FakeResponsesServer(
        latency=LatencyModel.lognormal(args.median, 0.7, low=0.2, high=6.0),
        outcomes=Outcomes(completed=0.95, failed=0.03, incomplete=0.02),
        fault_rates=FaultRates(rate_429=0.03, rate_503=0.01, retry_after=0.05, seed=args.seed),
        seed=args.seed,
    )
    client = fake_client(server)
    poll = PollPolicy(first_poll=0.25, min_interval=0.25, max_interval=2.0)
    retry = RetryPolicy(base=0.05, max_backoff=1.0)
    print(f"asyncbg demo: {args.jobs} background responses, at most {args.concurrency} "
          "in flight, against the built-in fake server (no network, no API key)",
          file=sys.stderr)
    tally = Tally(total=args.jobs)
    try:
        async with BackgroundManager(
            client, max_concurrency=args.concurrency, poll_policy=poll, retry_policy=retry,
            journal=args.journal,
        ) as mgr:

            def live() -> Live:
                stats = mgr.statistics()
                return Live(in_flight=stats.live, retries=stats.retries)

            mode = Display.mode_for(Console(file=sys.stderr), progress=False)
            display = Display(tally, live, mode=mode)
            async with anyio.create_task_group() as tg:
                tg.start_soon(display.run)
                jobs = [
                    await mgr.submit(key=f"q{i:03d}", model="gpt-5.2",
                                     reasoning={"effort": "high"},
                                     input=f"Question {i}: what is {i} squared?")
                    for i in range(args.jobs)
                ]
                async for job in mgr.as_completed(jobs):
                    tally.add(job.status.value, _tokens(job))
                tg.cancel_scope.cancel()
        stats = mgr.statistics()
        print(rows([
            ("jobs", f"{tally.done}  ({counts_text(tally.by_status)})"),
            ("polls", f"{stats.polls}  ({stats.polls / max(tally.done, 1):.1f} per job)"
                      f"  requests {stats.requests}  retries {stats.retries}"),
            ("tokens", f"{tally.tokens:,}"),
            ("wall time", f"{tally.elapsed():.1f}s"),
            ("in flight", f"at most {server.counters.max_in_flight} at once "
                          f"(limit {args.concurrency}; the server's own count)"),
        ]))
        sample = next((j for j in jobs if j.status.value == "completed"), None)
        if sample is not None and sample.response is not None:
            print(f"sample      {sample.key}: {sample.response.output_text!r}")
    finally:
        await client.close()
    return 0


def fake_server(args: argparse.Namespace) -> int:
    """Serve the fake Responses API over HTTP with uvicorn."""
    try:
        import uvicorn
    except ImportError:
        print("fake-server needs uvicorn: pip install 'asyncbg[server]'", file=sys.stderr)
        return 2
    from ..testing import FakeResponsesServer, LatencyModel, asgi_app

    server = FakeResponsesServer(
        latency=LatencyModel.lognormal(args.median, args.sigma) if args.sigma
        else LatencyModel.fixed(args.median),
        poll_after_ms=args.poll_after_ms,
    )
    print(f"fake Responses API on http://{args.host}:{args.port}/v1 "
          f"(set OPENAI_BASE_URL to that; any API key works)", file=sys.stderr)
    uvicorn.run(asgi_app(server), host=args.host, port=args.port, log_level="warning")
    return 0
