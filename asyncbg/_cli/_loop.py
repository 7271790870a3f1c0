"""The event loop the command line runs on: uvloop's where it is installed.

uvloop is a dependency on Linux and macOS (not on Windows, where it does not exist). A worker or
a run spends most of its CPU in the event loop's own machinery (tasks, futures, sockets): under
uvloop the same work takes less (benchmarks/README.md, 2026-12-05). ``ASYNCBG_LOOP=asyncio``
runs the standard loop instead, e.g. to rule uvloop out when chasing a problem. The library
itself runs on whatever loop its caller runs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple

import anyio

__all__ = ["backend_options", "run"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def backend_options() -> dict[str, bool]:
    """anyio's ``backend_options`` for the command line's loop."""
    if os.environ.get("ASYNCBG_LOOP", "").strip().lower() == "asyncio":
        return {}
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def run(fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
    """``anyio.run(fn, *args)`` on the command line's loop."""
    return anyio.run(fn, *args, backend_options=backend_options())
