"""A deep-research-style request in background mode, with live progress from its stream.

    python examples/deep_research.py            # on the built-in fake server, in seconds
    python examples/deep_research.py --real     # on OpenAI (OPENAI_API_KEY), for real

Deep research runs for tens of minutes, calls web search many times, and costs real money, so
the request is built to be left alone: ``max_tool_calls`` caps the searches (and the bill),
and the poll policy is one for a job of half an hour or more (a status check every minute or
two: the stream brings progress and the end, the polls are only a safety net should it drop).
The background stream shows what the model is doing while it works: each reasoning summary as
it is written, and the web searches made so far.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
import openai

from asyncbg import BackgroundManager, PollPolicy
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client

#: A policy for a job of 30 minutes or more: the first check after a minute, then every two
#: (asyncbg's longest interval, well inside the ~10 minutes a result is retained).
RESEARCH_POLLS = PollPolicy(first_poll=60.0, min_interval=60.0, max_interval=120.0, jitter=0.1)

QUESTION = ("How have the costs of grid-scale battery storage changed since 2015, and what "
            "drives them? Cite sources.")


def request(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "input": QUESTION,
        "tools": [{"type": "web_search_preview"}],
        "max_tool_calls": 3,
        "reasoning": {"summary": "auto"},
    }


async def research(client: openai.AsyncOpenAI, model: str) -> str:
    """Run the request; print its progress as it streams; return the final report."""
    started = time.monotonic()
    searches = 0
    async with BackgroundManager(client, stream=True, poll_policy=RESEARCH_POLLS) as mgr:
        job = await mgr.submit(key="battery-costs", **request(model))
        async for event in job.events():
            elapsed = f"[{time.monotonic() - started:6.1f}s]"
            if event.type == "response.reasoning_summary_text.done":
                print(f"{elapsed} thinking: {event.text}")
            elif event.type == "response.output_item.done" and \
                    event.item.type == "web_search_call":
                searches += 1
                query = getattr(event.item.action, "query", None) or "(page visit)"
                print(f"{elapsed} web search {searches}: {query}")
            elif event.type == "response.in_progress":
                print(f"{elapsed} started ({job.response_id})")
        response = await job.result()
    print(f"done after {searches} web searches, {time.monotonic() - started:.1f}s; "
          f"cost ${job.cost or 0:.4f}")
    return str(response.output_text)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true",
                        help="send the request to OpenAI (needs OPENAI_API_KEY; costs money)")
    parser.add_argument("--model", default="o4-mini-deep-research")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="how long the fake's run takes (default: 6)")
    args = parser.parse_args()
    if args.real:
        client = openai.AsyncOpenAI(max_retries=0)  # asyncbg owns the retries
    else:
        # A few seconds' stand-in for a half-hour run: the fake answers a request with a web
        # search tool with reasoning summaries and web searches, then its report.
        client = fake_client(FakeResponsesServer(latency=LatencyModel.fixed(args.seconds)))
    try:
        report = await research(client, args.model)
    finally:
        await client.close()
    print("\n" + report)


if __name__ == "__main__":
    anyio.run(main)
