"""What every benchmark section shares: the fake server's process, clients, requests, percentiles.

Clients are built the way a user builds one, ``openai.AsyncOpenAI(api_key=..., base_url=...)``,
with the SDK's own http client: that is the client asyncbg's lean status check mirrors (a custom
``http_client`` makes it poll through the SDK instead). ``max_retries=0`` on every side, so no
side retries behind the counters' back.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import asyncbg  # noqa: E402

__all__ = [
    "GcPauses",
    "cli_fake_server",
    "counters",
    "fixed",
    "job",
    "pct",
    "quiet_logs",
    "reset",
    "rss_kib",
    "sdk_client",
    "server_process",
    "wait_ready",
]


def quiet_logs() -> None:
    """Errors only from asyncbg's logger (stdlib: structlog stays unconfigured, as it is for most
    applications); a job that crashes still prints its traceback, plainly."""
    logging.getLogger("asyncbg").setLevel(logging.ERROR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(*extra: str, wait: bool = True) -> Iterator[str]:
    """Start benchmarks/fake_server.py and yield its base URL (once it accepts connections,
    unless ``wait`` is false: then the caller waits, see :func:`wait_ready`)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_server.py"), "--port", str(port),
                             *extra])
    url = f"http://127.0.0.1:{port}/v1"
    try:
        if wait:
            wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def cli_fake_server(*options: str) -> Iterator[str]:
    """Start ``asyncbg fake-server`` with ``options`` (as a user starts it: ``--median``,
    ``--inject``, ...), quiet, on a free port; yield its base URL once it accepts connections."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", "fake-server", "--port", str(port),
                             *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_ready(base_url: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until the fake server at ``base_url`` accepts connections (30 s at most)."""
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise RuntimeError("the fake server did not start")
        time.sleep(0.02)


async def counters(base_url: str) -> dict[str, Any]:
    async with httpx2.AsyncClient() as http:
        answer = await http.get(base_url.removesuffix("/v1") + "/_fake/counters", timeout=300)
        return dict(answer.json())


async def reset(base_url: str) -> None:
    async with httpx2.AsyncClient() as http:
        await http.post(base_url.removesuffix("/v1") + "/_fake/reset", timeout=300)


def sdk_client(base_url: str, **kw: Any) -> openai.AsyncOpenAI:
    """A client as users build one: the SDK's own http client, no retries."""
    return openai.AsyncOpenAI(api_key="sk-bench", base_url=base_url, max_retries=0, **kw)


def roomy_client(base_url: str, connections: int, **kw: Any) -> openai.AsyncOpenAI:
    """A raw-SDK baseline's client given enough keep-alive connections for its concurrency.

    The SDK's default pool keeps 100 idle connections; a baseline with 200 requests in flight
    would reconnect constantly and look worse than careful code is. asyncbg needs no such help:
    it sends at most ``max_requests`` (64) requests at once.
    """
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=600)
    return openai.AsyncOpenAI(api_key="sk-bench", base_url=base_url, max_retries=0,
                              http_client=http, **kw)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def job(i: int, duration: float, **extra: Any) -> dict[str, Any]:
    return {"model": "bench", "input": f"request {i}",
            "metadata": {"fake_duration": f"{duration:.6f}", "fake_queue": "0"}, **extra}


def fixed(interval: float, *, first: float | None = None,
          jitter: float = 0.0) -> asyncbg.PollPolicy:
    """Poll every ``interval`` seconds (the first poll after ``first``), no growth."""
    return asyncbg.PollPolicy(first_poll=interval if first is None else first,
                              min_interval=interval, max_interval=interval, growth=0.0,
                              jitter=jitter)


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class GcPauses:
    """Times every collection of the cyclic garbage collector, by generation."""

    def __init__(self) -> None:
        #: (generation, start, end) on the ``time.monotonic`` clock.
        self.pauses: list[tuple[int, float, float]] = []
        self._t = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.monotonic()
        else:
            self.pauses.append((info["generation"], self._t, time.monotonic()))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self, stalls: list[tuple[float, float]] | None = None) -> dict[str, Any]:
        """Counts and pauses per generation; with ``stalls`` (start, end) of event-loop stalls,
        how many of them overlapped a collection of generation 2 or of generation 1."""
        out: dict[str, Any] = {}
        for g in (0, 1, 2):
            spans = [end - start for gen, start, end in self.pauses if gen == g]
            out[f"gen{g}"] = {"count": len(spans),
                              "max_ms": round(max(spans, default=0.0) * 1000, 1),
                              "total_ms": round(sum(spans) * 1000, 1)}
        if stalls is not None:
            def overlaps(gens: tuple[int, ...]) -> int:
                spans = [(a, b) for gen, a, b in self.pauses if gen in gens]
                return sum(any(a < end and start < b for a, b in spans)
                           for start, end in stalls)
            out["stalls"] = len(stalls)
            out["stalls_during_gen2"] = overlaps((2,))
            out["stalls_during_gen1_or_2"] = overlaps((1, 2))
        return out
