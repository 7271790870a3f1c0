"""The live dashboard: ``asyncbg dashboard`` and :func:`asyncbg.dashboard_app`.

Rooms: :mod:`._source` (the seam: what is read from a ledger) with one module of SQL per ledger
kind (:mod:`._sqlite_source`, :mod:`._pg_source`); :mod:`._tally` (the running picture, cheap
per update); :mod:`._app` (the Starlette app, pages and event stream); :mod:`._charts` (SVG);
:mod:`._actions` (cancels and retries, behind a token). Starlette, sse-starlette, Jinja2 and
uvicorn come with ``pip install 'asyncbg[dashboard]'``; importing asyncbg does not need them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["dashboard_app"]


def dashboard_app(
    ledger: str | os.PathLike[str],
    *,
    show_prompts: bool = False,
    allow_actions: bool = False,
    token: str | None = None,
    client: Callable[[], Any] | None = None,
    interval: float = 1.0,
    budget: float | None = None,
) -> Starlette:
    """The live dashboard over ``ledger`` (a journal path or a ``postgresql://`` URL), as an
    ASGI application to serve, or to mount in a Starlette or FastAPI service.

    It is read-only unless ``allow_actions`` and a ``token`` (by default the environment's
    ``ASYNCBG_DASHBOARD_TOKEN``) are given; cancels then go to the provider through
    ``client()`` (by default ``openai.AsyncOpenAI()`` from the environment). Prompts are shown
    only with ``show_prompts``. ``budget`` (dollars) shows the share of it spent. Mounted
    elsewhere, run its lifespan too (``lifespan=app.router.lifespan_context``) to keep it
    updating in the background; without it, it updates when a page asks.
    """
    from ._app import build_app

    return build_app(ledger, show_prompts=show_prompts, allow_actions=allow_actions,
                     token=token, client=client, interval=interval, budget=budget)
