"""The command line: ``python -m asyncbg demo`` and ``python -m asyncbg fake-server``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import structlog

from ._manager import BackgroundManager
from ._policies import PollPolicy, RetryPolicy
from ._progress import Progress
from ._status import JobStatus

__all__ = ["main"]


def configure_logging(*, level: str = "warning", json: bool = False) -> None:
    """Send structlog to stderr: readable by default, one JSON object a line with ``json``."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _add_logging_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="lowest log level shown on stderr (default: warning)")
    p.add_argument("--log-json", action="store_true",
                   help="log one JSON object per line instead of readable text")


async def _demo(args: argparse.Namespace) -> int:
    from .testing import FakeResponsesServer, FaultRates, LatencyModel, Outcomes, fake_client

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
    try:
        async with BackgroundManager(
            client, max_concurrency=args.concurrency, poll_policy=poll, retry_policy=retry
        ) as mgr:
            progress = Progress(mgr)
            jobs = [
                await mgr.submit(key=f"q{i:03d}", model="gpt-5.2", reasoning={"effort": "high"},
                                 input=f"Question {i}: what is {i} squared?")
                for i in range(args.jobs)
            ]
            async with anyio.create_task_group() as tg:
                tg.start_soon(progress.run)
                async for job in mgr.as_completed(jobs):
                    progress.add(job)
                tg.cancel_scope.cancel()
        print(progress.summary(in_flight=f"at most {server.counters.max_in_flight} at once "
                               f"(limit {args.concurrency}; the server's own count)"))
        sample = next((j for j in jobs if j.status.value == "completed"), None)
        if sample is not None and sample.response is not None:
            print(f"sample      {sample.key}: {sample.response.output_text!r}")
    finally:
        await client.close()
    return 0


async def _run(args: argparse.Namespace) -> int:
    import openai

    from ._batch import OutputFile, read_requests
    from ._journal import JournalMismatchError

    source = Path(args.input)
    try:
        parsed = read_requests(source)
    except OSError as exc:
        print(f"asyncbg: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"asyncbg: {source} is not UTF-8 text: {exc}", file=sys.stderr)
        return 2
    if parsed.duplicates:
        for problem in parsed.duplicates:
            print(f"asyncbg: {source}: {problem}", file=sys.stderr)
        print("asyncbg: duplicate custom_id values; nothing was sent", file=sys.stderr)
        return 2
    bad = len(parsed.bad)
    for b in parsed.bad:
        print(f"asyncbg: {source}:{b.line}: {b.reason}; line skipped", file=sys.stderr)
    output = Path(args.output)
    journal = Path(args.journal) if args.journal else output.with_name(output.name + ".journal")
    try:
        client = openai.AsyncOpenAI(
            **({"base_url": args.base_url} if args.base_url else {}), max_retries=0
        )
    except openai.OpenAIError as exc:
        print(f"asyncbg: {exc}", file=sys.stderr)
        return 2
    out = OutputFile(output)
    out.open()
    completed = 0
    try:
        async with BackgroundManager(
            client, max_concurrency=args.concurrency, journal=journal
        ) as mgr:
            progress = Progress(mgr)
            by_job = {}
            for req in parsed.requests:
                try:
                    job = await mgr.submit(key=req.custom_id, **req.body)
                except (JournalMismatchError, ValueError) as exc:
                    print(f"asyncbg: {source}:{req.line}: {exc}; line skipped", file=sys.stderr)
                    bad += 1
                    continue
                by_job[job] = req.custom_id
            async with anyio.create_task_group() as tg:
                tg.start_soon(progress.run)
                async for job in mgr.as_completed(list(by_job)):
                    out.write(by_job[job], job)
                    progress.add(job)
                    completed += job.status is JobStatus.COMPLETED
                tg.cancel_scope.cancel()
        print(progress.summary(output=str(output), journal=str(journal),
                               bad_lines=bad,
                               possible_dups=mgr.statistics().possible_duplicates),
              file=sys.stderr)
    finally:
        out.close()
        await client.close()
    return 0 if bad == 0 and completed == len(by_job) else 1


def _fake_server(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("fake-server needs uvicorn: pip install 'asyncbg[server]'", file=sys.stderr)
        return 2
    from .testing import FakeResponsesServer, LatencyModel, asgi_app

    server = FakeResponsesServer(
        latency=LatencyModel.lognormal(args.median, args.sigma) if args.sigma
        else LatencyModel.fixed(args.median),
        poll_after_ms=args.poll_after_ms,
    )
    print(f"fake Responses API on http://{args.host}:{args.port}/v1 "
          f"(set OPENAI_BASE_URL to that; any API key works)", file=sys.stderr)
    uvicorn.run(asgi_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncbg",
        description="Run many OpenAI background-mode Responses at once.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="fan out ~200 responses against the built-in fake server",
                          description="Fan out background responses against the in-process "
                          "fake server and show live progress and a summary. Needs no API key.")
    demo.add_argument("--jobs", type=int, default=200, help="how many responses (default: 200)")
    demo.add_argument("--concurrency", type=int, default=32,
                      help="most responses in flight at once (default: 32)")
    demo.add_argument("--median", type=float, default=0.7,
                      help="median response time in seconds (default: 0.7)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_logging_options(demo)

    run = sub.add_parser(
        "run", help="run a Batch API input file (JSONL) as background responses",
        description="Run every line of an OpenAI Batch API input file as a background response "
        "and write Batch API output lines as each finishes. Rerunning the same command resumes "
        "from the journal: nothing already done is sent again. The API key and base URL come "
        "from OPENAI_API_KEY and OPENAI_BASE_URL. Exit status: 0 when every line completed, 1 "
        "when a line was bad or a request did not complete, 2 when nothing could run.",
    )
    run.add_argument("input", metavar="INPUT.jsonl",
                     help='Batch API request lines: {"custom_id", "method": "POST", '
                          '"url": "/v1/responses", "body"}')
    run.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl",
                     help="Batch API output lines, appended as each response finishes")
    run.add_argument("--concurrency", type=int, default=16, metavar="N",
                     help="most responses in flight at once (default: 16)")
    run.add_argument("--journal", metavar="PATH",
                     help="SQLite journal for resuming (default: OUTPUT.jsonl.journal)")
    run.add_argument("--base-url", metavar="URL",
                     help="API base URL (default: $OPENAI_BASE_URL, else OpenAI's)")
    _add_logging_options(run)

    fake = sub.add_parser("fake-server", help="serve the fake Responses API over HTTP",
                          description="Serve the fake Responses API with uvicorn.")
    fake.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    fake.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    fake.add_argument("--median", type=float, default=2.0,
                      help="median response time in seconds (default: 2.0)")
    fake.add_argument("--sigma", type=float, default=0.0,
                      help="lognormal spread; 0 means every response takes --median (default)")
    fake.add_argument("--poll-after-ms", type=int, default=None,
                      help="send this openai-poll-after-ms header on live answers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m asyncbg`` and the ``asyncbg`` script."""
    args = build_parser().parse_args(argv)
    if args.command == "fake-server":
        return _fake_server(args)
    configure_logging(level=args.log_level, json=args.log_json)
    if args.command == "run" and args.concurrency < 1:
        print("asyncbg: --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        return anyio.run(_run if args.command == "run" else _demo, args)
    except KeyboardInterrupt:
        return 130
