"""The command line: ``asyncbg run``, ``status``, ``cancel``, ``estimate``, ``demo`` and
``fake-server``.

One module per verb: ``_run`` (a Batch API file, with ``_input`` reading it, ``_output`` the
output view of the journal, ``_signals`` the interrupts, ``_by`` --by), ``_ops`` (``status`` and
``cancel``), ``_estimate`` (``estimate``), ``_demo`` (``demo`` and ``fake-server``),
``_fleet`` (``submit``, ``worker``, ``results``, ``retry``), ``_notify`` (``notify``, and
``--notify``), ``_dashboard`` (``dashboard``); ``_progress`` and ``_logging`` are shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, cast

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

from .._providers._kinds import PROVIDER_NAMES

__all__ = ["build_parser", "freeze_start_up", "main"]

_RUN = """\
Run every line of an OpenAI Batch API input file as a background response and write Batch API
output lines. The journal (SQLite) is the truth: the output file is rebuilt from it at the start
and at the end of every run, with one line per finished input line, its latest outcome. Running
the same command again resumes: nothing finished is sent again, live responses are collected,
lines that did not complete are sent again. One run at a time per journal.

Ctrl-C (or SIGTERM) stops creating, waits a few seconds for the answers of creates already
sent (so that their ids are journaled), leaves live responses running on the server, rewrites
the output and says how to go on (run again to collect them, or `asyncbg cancel --ledger
JOURNAL`); a second Ctrl-C, or --cancel-on-interrupt, cancels them on the server first.

The API key and base URL come from OPENAI_API_KEY and OPENAI_BASE_URL (or --base-url).
-o - streams the finished lines to stdout as they end (with --journal PATH); any other -o
must be a regular file or a new path, and is locked for the run like the journal.

Exit status: 0 when every line completed; 1 when a line was bad or did not complete; 2 when
nothing could run (unreadable or empty input, duplicate custom_id, a refused output or journal,
a budget with unpriced models, no API key, no connection, a journal that stopped working);
130 after SIGINT, 143 after SIGTERM.
"""


def _add_logging_options(p: argparse.ArgumentParser) -> None:
    from ._logging import LEVELS

    p.add_argument("--log-level", default="warning", choices=LEVELS,
                   help="lowest log level shown on stderr (default: warning)")
    p.add_argument("--log-json", action="store_true",
                   help="log one JSON object per line instead of readable text")


# Option types: each error is a sentence about the user's value (argparse would otherwise name
# the function: "invalid _positive value").


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def _rate(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def _at_least_one(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _price(text: str) -> tuple[str, tuple[float, ...]]:
    """``MODEL=INPUT,OUTPUT[,CACHED]``: dollars per million tokens."""
    model, _, numbers = text.rpartition("=")
    parts = numbers.split(",")
    if not model or len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"must be MODEL=INPUT,OUTPUT[,CACHED] in dollars per million tokens (e.g. "
            f"gpt-5.2=1.25,10,0.125), not {text!r}")
    return model, tuple(_non_negative(part.strip()) for part in parts)


def _escalation(path: str) -> object:
    """``--escalate-file``: an :class:`~asyncbg.Escalation` as JSON (``on``, ``steps``,
    ``max_attempts``)."""
    import json

    from .._outcomes._ladder import Escalation

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return Escalation.from_json(data, where=path)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # json.JSONDecodeError is one
        reason = str(exc) if str(exc).startswith(path) else f"{path}: not JSON: {exc}"
        raise argparse.ArgumentTypeError(reason) from None


class _Parser(argparse.ArgumentParser):
    """argparse, with ``--help`` and ``--version`` written to stdout as every command writes
    it (:func:`asyncbg._cli._ops.emit`): argparse itself drops a failed write without a word
    and exits 0."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message and file is sys.stdout:
            from ._ops import emit

            emit(message, end="")
        else:
            super()._print_message(message, file)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        ops = sys.modules.get(f"{__name__}._ops")
        if status == 0 and getattr(ops, "PIPE_CLOSED", False):
            status = 141
        elif status == 0 and getattr(ops, "STDOUT_FAILED", False):
            status = 2
        super().exit(status, message)


def _top() -> tuple[argparse.ArgumentParser,
                    argparse._SubParsersAction[argparse.ArgumentParser]]:
    """The parser's top level, without its commands."""
    parser = _Parser(
        prog="asyncbg", description="Run many OpenAI background-mode Responses at once.")
    parser.add_argument("--version", action=_Version, nargs=0, dest=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, help="show program's version number and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # _Parsers
    return parser, cast("argparse._SubParsersAction[argparse.ArgumentParser]", sub)


#: ``--ledger`` of the commands that read a run's journal or a fleet's ledger alike.
_LEDGER_ARG = ("a run's journal (by default OUTPUT.jsonl.journal), or a fleet's ledger: its "
               "SQLite path or postgresql:// URL")


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status", help="what a journal or ledger holds: counts, live responses, tokens",
        description="Summarize a run's journal or a fleet's ledger: jobs by status, the "
                    "responses still live on the server, tokens used. Sends no request and "
                    "needs no API key; works while the run or the workers go on.")
    status.add_argument("--ledger", required=True, metavar="LEDGER", help=_LEDGER_ARG)
    status.add_argument("--json", action="store_true",
                        help="print one JSON object (by_status, live_response_ids, tokens, ...)")


def _parser_for(argv: Sequence[str] | None) -> argparse.ArgumentParser:
    """The parser for ``argv``: for ``status``, which scripts run again and again, its own
    alone (it parses and reports errors as the whole one does, in a fraction of the time)."""
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["status"]:
        parser, sub = _top()
        _add_status(sub)
        return parser
    return build_parser()


def build_parser() -> argparse.ArgumentParser:
    # Each command's module when the whole parser is built (`status` builds its own alone).
    from . import _dashboard, _demo, _fleet, _metrics, _notify

    parser, sub = _top()

    run = sub.add_parser(
        "run", help="run a Batch API input file (JSONL) as background responses",
        description=_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("input", metavar="INPUT.jsonl",
                     help='Batch API request lines: {"custom_id", "method": "POST", '
                          '"url": "/v1/responses", "body"}')
    run.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl",
                     help="Batch API output lines, appended as each response finishes and "
                          "rebuilt from the journal at the end: a regular file or a new path "
                          "(a symlink's target is rewritten); - streams them to stdout")
    run.add_argument("--concurrency", type=_at_least_one, default=None, metavar="N",
                     help="most responses in flight at once (default: 16; 10000 for the "
                          "batch providers, whose batches the server runs)")
    run.add_argument("--provider", default="openai",
                     choices=("openai", "openai-batch", "anthropic", "gemini"),
                     help="openai: background Responses (default); openai-batch: the OpenAI "
                          "Batch API; anthropic: Message Batches, {custom_id, params} lines; "
                          "gemini: Batch Mode, {key, request} lines. Each reads and writes its "
                          "API's own batch file format, and its key from its SDK's variable "
                          "(ANTHROPIC_API_KEY, GEMINI_API_KEY)")
    run.add_argument("--model", metavar="NAME",
                     help="gemini: the model for lines whose request names none")
    run.add_argument("--journal", metavar="PATH",
                     help="SQLite journal for resuming (default: OUTPUT.jsonl.journal)")
    run.add_argument("--base-url", metavar="URL",
                     help="API base URL (default: $OPENAI_BASE_URL, $ANTHROPIC_BASE_URL or "
                          "$GOOGLE_GEMINI_BASE_URL, else the provider's)")
    run.add_argument("--deadline", type=_positive, metavar="SECONDS",
                     help="cancel a response on the server when it has not finished this many "
                          "seconds after it was submitted (default: no deadline)")
    run.add_argument("--by", metavar="WHEN",
                     help="a deadline: 2h, 8h, 24h, 1h30m or an ISO timestamp with its offset "
                          "(2026-12-04T08:00:00Z). Each line runs the cheapest way expected to "
                          "finish by then: the Batch API (half price) when a batch window fits, "
                          "flex (about half) while flex keeps its pace, background otherwise; "
                          "a line still unfinished moves to a faster way in time, cancelled on "
                          "the first before it is sent on the second. A rerun continues every "
                          "line where it stands; a duration counts from each run's start (a "
                          "timestamp keeps one deadline across reruns)")
    run.add_argument("--dry-run", action="store_true",
                     help="send nothing: print what the file would cost each way (as "
                          "`asyncbg estimate`), and with --by the way its lines would start on")
    run.add_argument("--max-cost", type=_non_negative, metavar="DOLLARS",
                     help="a budget in US dollars for the whole run (journal included): lines "
                          "that cannot fit are not sent; a rerun with a larger budget runs them. "
                          "Every model needs a known price (see --price)")
    run.add_argument("--price", type=_price, action="append", metavar="MODEL=IN,OUT[,CACHED]",
                     help="the price of MODEL in dollars per million input, output and cached "
                          "input tokens, for a model the built-in price table does not know "
                          "(repeat for several models)")
    run.add_argument("--rpm", type=_rate, metavar="N",
                     help="at most N creates per minute (your rate limit, if you know it)")
    run.add_argument("--tpm", type=_rate, metavar="N",
                     help="at most N tokens per minute, estimated from each request")
    run.add_argument("--cancel-on-interrupt", action="store_true",
                     help="on Ctrl-C or SIGTERM, cancel live responses on the server instead "
                          "of leaving them running for a rerun to collect")
    run.add_argument("--progress", action="store_true",
                     help="when stderr is not a terminal, print a progress line every 30 s "
                          "(on a terminal a progress bar is always shown)")
    run.add_argument("--progress-every", type=_positive, default=30.0, help=argparse.SUPPRESS)
    run.add_argument("--escalate-file", type=_escalation, metavar="LADDER.json",
                     help='retry lines that end incomplete, invalid or failed with the steps of '
                          'an escalation ladder: {"on": ["incomplete"], "steps": '
                          '[{"max_output_tokens": 8000}, {"model": "gpt-5.2"}], '
                          '"max_attempts": 3}; each attempt is its own journal entry (KEY#2...)')
    _notify.add_options(run)
    _metrics.add_option(run)  # --metrics-port PORT
    _add_logging_options(run)

    _add_status(sub)

    estimate = sub.add_parser(
        "estimate", help="what a batch file would cost: background, flex or batch",
        description="For each model in a batch file: requests, input tokens (tiktoken where "
                    "it is installed and knows the model, else about 4 characters a token), "
                    "output tokens (each request's limit, else a stated default) and the "
                    "dollars of each way of running them (background, flex, batch), from the "
                    "genai-prices dataset. Sends nothing and needs no API key.")
    estimate.add_argument("input", metavar="INPUT.jsonl",
                          help="a batch file, in the format of --provider")
    estimate.add_argument("--provider", default="openai", choices=PROVIDER_NAMES,
                          help="the file's format and API, as for `asyncbg run`")
    estimate.add_argument("--model", metavar="NAME", help="gemini: the model of lines whose "
                                                          "request names none")
    estimate.add_argument("--json", action="store_true", help="print one JSON object")

    cancel = sub.add_parser(
        "cancel", help="cancel on the server every response a journal has as live",
        description="Cancel on the server every job still live in a run's journal or a "
                    "fleet's ledger, each on the API that runs it (a batch as a whole: its "
                    "finished requests keep their results), record each outcome there, and "
                    "say what happened. Exit status 0 when none is left live, 1 otherwise, 2 "
                    "when the journal cannot be used or the server cannot be reached. Keys "
                    "and base URLs come from each provider's variables: OPENAI_API_KEY, "
                    "ANTHROPIC_API_KEY, GEMINI_API_KEY (or GOOGLE_API_KEY); OPENAI_BASE_URL, "
                    "ANTHROPIC_BASE_URL, GOOGLE_GEMINI_BASE_URL.")
    cancel.add_argument("--ledger", required=True, metavar="LEDGER", help=_LEDGER_ARG)
    cancel.add_argument("--base-url", metavar="URL",
                        help="API base URL (default: the provider's variable, else its own)")
    cancel.add_argument("--timeout", type=_positive, default=60.0, metavar="SECONDS",
                        help="give up waiting for the server's confirmations after this long "
                             "(default: 60)")
    _add_logging_options(cancel)

    demo = sub.add_parser("demo", help="fan out ~200 responses against the built-in fake server",
                          description="Fan out background responses against the in-process "
                          "fake server and show live progress and a summary. Needs no API key.")
    demo.add_argument("--jobs", type=_whole, default=200,
                      help="how many responses (default: 200)")
    demo.add_argument("--concurrency", type=_at_least_one, default=32,
                      help="most responses in flight at once (default: 32)")
    demo.add_argument("--median", type=_positive, default=0.7,
                      help="median response time in seconds (default: 0.7)")
    demo.add_argument("--seed", type=_whole, default=0, help="random seed (default: 0)")
    demo.add_argument("--journal", metavar="PATH",
                      help="record the run in this SQLite journal (watch it with `asyncbg "
                           "dashboard --ledger PATH`); a rerun resumes it")
    _add_logging_options(demo)

    fake = sub.add_parser("fake-server", help="serve the fake Responses API over HTTP",
                          description="Serve the fake Responses API with uvicorn, with the "
                          "latency, outcomes, faults and rate limits of the in-process fake "
                          "(asyncbg.testing.FakeResponsesServer).")
    fake.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    fake.add_argument("--port", type=_whole, default=8080, help="port (default: 8080)")
    fake.add_argument("--median", type=_positive, default=2.0,
                      help="median response time in seconds (default: 2.0)")
    fake.add_argument("--sigma", type=_non_negative, default=0.0,
                      help="lognormal spread; 0 means every response takes --median (default)")
    fake.add_argument("--poll-after-ms", default=None, metavar="MS",
                      help="send this openai-poll-after-ms header on live answers (any text "
                           "is sent as it is)")
    fake.add_argument("--latency", type=_demo.latency, metavar="MODEL",
                      help="how long responses take, in seconds: fixed:S, uniform:LOW,HIGH or "
                           "lognormal:MEDIAN[,SIGMA[,LOW,HIGH]] (instead of --median/--sigma)")
    fake.add_argument("--outcomes", type=_demo.outcomes, metavar="WEIGHTS",
                      help="how responses end: completed=0.9,failed=0.05,incomplete=0.05,"
                           "stuck=0 (default: all complete)")
    fake.add_argument("--fail-rate", type=_demo.fault_rates, metavar="RATES",
                      help="random faults per request: P (spread over 429, 500, 503 and "
                           "connection resets) or 429=P,500=P,503=P,reset=P; options "
                           "retry_after=S (any text too), routes=create+retrieve+cancel, seed=N")
    fake.add_argument("--rate-limit", type=_demo.fake_rate_limit, metavar="LIMITS",
                      help="OpenAI-style token buckets: RPM, or rpm=N,tpm=N,ppm=N,burst=S "
                           "(creates, tokens and polls a minute; burst in seconds, default 60); "
                           "429s with retry-after and x-ratelimit-* headers")
    fake.add_argument("--max-live", type=_at_least_one, metavar="N",
                      help="answer 429 to creates beyond N live responses")
    fake.add_argument("--inject", type=_demo.fault, action="append", default=[],
                      metavar="FAULT",
                      help="a scripted fault for the next requests (repeatable): KIND[,route=R]"
                           "[,times=N][,retry_after=S][,delay=S][,after=N]; KIND is 429, 500, "
                           "503, 404, quota, html, reset, reset_after, slow or drop. It meets the "
                           "next N requests on the route, from the first; delay is a slow "
                           "answer's, after the events a drop keeps")
    fake.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _fleet.add_commands(sub)  # submit, worker, results: a fleet sharing one ledger
    _notify.add_command(sub)  # notify: send what a ledger's outbox holds
    _dashboard.add_command(sub)  # dashboard: a live web page over a ledger
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


class _Version(argparse.Action):
    """``--version``, the version read only when asked for (importlib.metadata is not free)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from ._ops import emit

        emit(f"asyncbg {_version()}")
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m asyncbg`` and the ``asyncbg`` script.

    A reader that goes away (``asyncbg status | head``) ends any command quietly, here, once
    for all of them: no traceback, exit status 141 (128 + SIGPIPE) as a shell reports it.
    """
    global _owns_process
    ops = sys.modules.get(f"{__name__}._ops")
    if ops is not None:  # a command run before in this process (a test) said nothing of ours
        vars(ops).update(PIPE_CLOSED=False, STDOUT_FAILED=False)
    if argv is None:  # the process's own entry point (python -m asyncbg, the asyncbg script)
        _owns_process = True
    try:
        code = _dispatch(argv)
        if sys.stdout is not None:  # None: started with stdout closed (emit says so)
            sys.stdout.flush()  # inside the try: a closed pipe fails here, not at exit
    except KeyboardInterrupt:
        # A Ctrl-C before a command's own handling started (``run`` and ``worker`` handle
        # theirs): while the options are read, the input opened, the journal opened.
        return 130
    except BaseException as exc:
        if not _closed_pipe(exc):
            raise
        _silence_stdout()
        return 141
    ops = sys.modules.get(f"{__name__}._ops")
    if getattr(ops, "PIPE_CLOSED", False):  # emit() saw the reader go and let the work finish
        return 141
    if getattr(ops, "STDOUT_FAILED", False):  # emit() could not write and said so
        return 2
    return code


def _closed_pipe(exc: BaseException) -> bool:
    """A BrokenPipeError, alone or as every member of a group."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_closed_pipe(e) for e in exc.exceptions)
    return isinstance(exc, BrokenPipeError)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit finds no pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


#: Whether the command line owns this process: ``main()`` called with no arguments, as the
#: entry point does. Called with arguments (an application or a test running a command in its
#: own process), the collector is left as the caller set it.
_owns_process = False


def freeze_start_up(*, load_sdk: bool = True, refreeze: bool = True) -> None:
    """Leave what start-up made out of the cyclic collector's view (``gc.freeze()``), and with
    ``refreeze``, what survives each full collection from then on.

    The CLI owns its process. After ``import openai`` and the engine the heap holds about
    100,000 tracked objects (the SDK's types, pydantic) that live as long as the process; every
    full collection would walk them again, a pause of tens of milliseconds each, on top of the
    jobs' own objects (see benchmarks/README.md, issue 23). A library never does this: only the
    application knows when its start-up is over. ``asyncbg run`` calls it without
    ``load_sdk`` first (a rerun with nothing to do loads no SDK), then again once it builds its
    manager.

    ``refreeze``: 100,000 live jobs are some 500,000 tracked objects of their own, and a full
    collection that walks them all pauses the event loop for hundreds of milliseconds. After
    each full collection, what survived it (the live jobs, mostly) is frozen too, so the next
    one walks only what came since. An object frozen this way is still freed when its last
    reference goes (most are); only a reference cycle among frozen objects would stay, and
    ``benchmarks/memory.py --gc refreeze`` shows the engine leaves none to speak of.
    """
    import gc

    if not _owns_process:
        return
    if load_sdk:
        import openai  # noqa: F401 - loaded now, so that its objects are frozen with the rest

        from .. import _manager  # noqa: F401

    gc.collect()
    gc.freeze()
    if refreeze and _refreeze not in gc.callbacks:
        gc.callbacks.append(_refreeze)


def _refreeze(phase: str, info: dict[str, int]) -> None:
    """A ``gc.callbacks`` hook: freeze the survivors of every full collection."""
    if phase == "stop" and info.get("generation") == 2:
        import gc

        gc.freeze()


def _dispatch(argv: Sequence[str] | None) -> int:
    args = _parser_for(argv).parse_args(argv)
    if args.command == "fake-server":
        from ._demo import fake_server

        return fake_server(args)
    if args.command == "dashboard":
        from . import _dashboard

        return _dashboard.dashboard(args)
    if args.command == "status":
        from ._ops import run_status

        return run_status(args)
    if args.command == "estimate":
        from ._estimate import estimate

        return estimate(args)
    from ._logging import configure_logging

    configure_logging(level=args.log_level, json=args.log_json)
    from . import _fleet, _notify

    if args.command in _fleet.COMMANDS:
        freeze_start_up()
        return _run_async(_fleet.COMMANDS[args.command], args)
    if args.command == "notify":
        return _run_async(_notify.notify, args)
    from ._demo import demo
    from ._ops import cancel
    from ._run import run

    command = {"run": run, "cancel": cancel, "demo": demo}[args.command]
    freeze_start_up(load_sdk=args.command != "run")  # run: see _run.py
    return _run_async(command, args)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_async(command: Callable[[argparse.Namespace], Awaitable[int]],
               args: argparse.Namespace) -> int:
    """``anyio.run(command, args)`` (on the loop :mod:`._loop` picks) with Ctrl-C raising
    ``KeyboardInterrupt`` at once, as in any Python program, until a command's own signal
    handling starts (``run``, ``worker``).

    asyncio's runner would take the first SIGINT for itself and only cancel the main task:
    a command blocked in a system call (opening a FIFO it reads its input from, say) would not
    notice, and Ctrl-C would seem to do nothing. main() makes the interrupt exit 130."""
    import signal

    from ._loop import run

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        return run(command, args)  # SIGINT ignored (nohup), or someone else's to take
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        return run(command, args)
    finally:
        signal.signal(signal.SIGINT, previous)
