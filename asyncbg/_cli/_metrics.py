"""``--metrics-port N`` for the commands that run jobs (``asyncbg run``, ``asyncbg worker``).

    _metrics.add_option(parser)
    ...
    async with _metrics.hooks_for(args) as hooks:        # [] without --metrics-port
        async with BackgroundManager(client, ..., hooks=hooks) as mgr:
            for hook in hooks:
                hook.observe(mgr)     # waiting jobs and notifications, from statistics()
            ...

serves asyncbg's OpenTelemetry metrics in Prometheus text format at
``http://127.0.0.1:N/metrics`` while the command runs (see :func:`asyncbg.serve_metrics`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["MetricsPortError", "add_option", "hooks_for"]


class MetricsPortError(Exception):
    """--metrics-port cannot be served: the port is taken, or the ``otel`` extra is missing.
    The message is one line for the user; the command exits 2 before sending anything."""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, not {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"must be a port between 1 and 65535, not {text}")
    return port


def add_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="serve metrics in Prometheus text format at "
                        "http://127.0.0.1:PORT/metrics while it runs (needs asyncbg[otel])")


@contextlib.asynccontextmanager
async def hooks_for(args: argparse.Namespace, *, provider_name: str = "openai"
                    ) -> AsyncIterator[list[Any]]:
    """The hooks to give the manager: the metrics server's when ``--metrics-port`` was given,
    else none. Raises :class:`MetricsPortError` before the block when it cannot serve."""
    port = getattr(args, "metrics_port", None)
    if port is None:
        yield []
        return
    from .. import serve_metrics

    async with contextlib.AsyncExitStack() as stack:
        try:
            hooks = await stack.enter_async_context(
                serve_metrics(port, provider_name=provider_name))
        except ImportError as exc:
            raise MetricsPortError(
                f"--metrics-port needs {exc.name}: pip install 'asyncbg[otel]'") from exc
        except OSError as exc:
            raise MetricsPortError(f"--metrics-port {port}: cannot listen on 127.0.0.1:{port} "
                                   f"({exc.strerror or exc})") from exc
        yield [hooks]
