"""``asyncbg dashboard --ledger LEDGER``: serve the live dashboard with uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .._asgi import listen
from . import _loop

__all__ = ["add_command", "dashboard"]

_DESCRIPTION = """\
Serve a live web page over a ledger (a run's journal, a fleet's shared journal, or a
postgresql:// URL) while runs and workers write to it: jobs by status, throughput, latency,
tokens and dollars, live responses, failures by code, workers and notifications. It reads on
connections of its own and never blocks the writers.

Read-only unless started with --allow-actions and a token in ASYNCBG_DASHBOARD_TOKEN (sent by
the page as a header, entered once there): then it can cancel one job or every live job on the
server (OPENAI_API_KEY and OPENAI_BASE_URL, or --base-url) and retry failed notifications.
It binds to 127.0.0.1 unless --host says otherwise.
"""


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dashboard", help="a live web dashboard over a ledger",
                       description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", required=True, metavar="LEDGER",
                   help="a journal path or a postgresql:// URL")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument("--show-prompts", action="store_true",
                   help="show the requests' prompts on job pages (hidden by default)")
    p.add_argument("--allow-actions", action="store_true",
                   help="allow cancels and notification retries from the page, with the token "
                        "in ASYNCBG_DASHBOARD_TOKEN")
    p.add_argument("--base-url", metavar="URL",
                   help="API base URL for cancels (default: $OPENAI_BASE_URL, else OpenAI's)")
    p.add_argument("--budget", type=float, metavar="DOLLARS",
                   help="show the dollars spent as a share of this budget")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between live updates (default: 1)")


def _say(message: str) -> None:
    print(f"asyncbg: {message}", file=sys.stderr, flush=True)


def dashboard(args: argparse.Namespace) -> int:
    try:
        import jinja2  # noqa: F401 - the extra's packages, checked before anything starts
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        _say(f"the dashboard needs {exc.name}: pip install 'asyncbg[dashboard]'")
        return 2
    from .._dashboard import dashboard_app
    from .._ledgers import LedgerError

    def client() -> object:
        import openai

        return openai.AsyncOpenAI(base_url=args.base_url or None, max_retries=0)

    try:
        app = dashboard_app(args.ledger, show_prompts=args.show_prompts,
                            allow_actions=args.allow_actions, client=client,
                            interval=args.interval, budget=args.budget)
    except (ValueError, LedgerError) as exc:
        _say(str(exc))
        return 2
    if args.allow_actions and "OPENAI_API_KEY" not in os.environ:
        _say("warning: OPENAI_API_KEY is not set; cancels from the page will fail")
    board = app.state.board
    try:  # a missing or foreign ledger is one line now, not a traceback from the lifespan
        _loop.run(_can_read, board.source)
    except LedgerError as exc:
        _say(str(exc))
        return 2
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        _say(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
             "pass another --port")
        return 2
    _say(f"dashboard for {board.source.location} at http://{args.host}:{args.port}/ "
         f"({'actions allowed with the token' if args.allow_actions else 'read-only'})")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
    return 0


async def _can_read(source: Any) -> None:
    await source.open()
    await source.close()
