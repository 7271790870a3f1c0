"""``asyncbg demo`` (the README's quick start) and ``asyncbg fake-server``."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the commands import what they run when they run (`--help` stays fast)
    from .. import Job
    from ..testing import FakeRateLimit, Fault, FaultRates, LatencyModel, Outcomes

__all__ = ["demo", "fake_rate_limit", "fake_server", "fault", "fault_rates", "latency",
           "outcomes"]


def _tokens(job: Job) -> int:
    """Total tokens the server reported for a finished job (0 when it reported none)."""
    usage: Any = getattr(job.response, "usage", None)
    total = usage.get("total_tokens") if isinstance(usage, dict) else getattr(
        usage, "total_tokens", None)
    return total if isinstance(total, int) else 0


async def demo(args: argparse.Namespace) -> int:
    """Fan out ``--jobs`` responses against the in-process fake server; summary on stdout."""
    import anyio
    from rich.console import Console

    from .. import BackgroundManager, PollPolicy, RetryPolicy
    from .._ledgers import Ledger, LedgerError, SQLiteLedger, open_ledger
    from ..testing import FakeResponsesServer, FaultRates, LatencyModel, Outcomes, fake_client
    from ._ops import emit, missing_directory, say
    from ._progress import Display, Live, Tally, counts_text, rows

    journal: Ledger | None = None
    if args.journal is not None:
        try:
            journal = open_ledger(args.journal)
        except LedgerError as exc:
            say(f"{exc}; nothing was sent")
            return 2
        if isinstance(journal, SQLiteLedger) and (
                where := missing_directory(journal.path)) is not None:
            say(f"cannot create the journal {journal.path}: {where} (demo makes files, not "
                "directories); nothing was sent")
            return 2
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
            journal=journal,
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
        emit(rows([
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
            emit(f"sample      {sample.key}: {sample.response.output_text!r}")
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

    model = args.latency or (LatencyModel.lognormal(args.median, args.sigma) if args.sigma
                             else LatencyModel.fixed(args.median))
    server = FakeResponsesServer(
        latency=model, outcomes=args.outcomes, fault_rates=args.fail_rate,
        rate_limit=args.rate_limit, max_live=args.max_live, poll_after_ms=args.poll_after_ms,
        seed=args.seed,
    )
    for scripted in args.inject:
        server.inject(scripted.kind, route=scripted.route, times=scripted.times,
                      retry_after=scripted.retry_after, delay=scripted.delay,
                      after=scripted.after)
    print(f"fake Responses API on http://{args.host}:{args.port}/v1 "
          f"(set OPENAI_BASE_URL to that; any API key works)", file=sys.stderr)
    uvicorn.run(asgi_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


# -- the fake server's flags: each value is one spec, parsed into the in-process fake's objects --


def _fields(text: str, known: tuple[str, ...], *, first: str | None = None) -> dict[str, str]:
    """``a=1,b=2`` as a dict of ``known`` names; with ``first``, a leading item without ``=``
    is that field."""
    fields: dict[str, str] = {}
    for i, item in enumerate(part.strip() for part in text.split(",")):
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq and i == 0 and first is not None:
            name, value = first, item
        elif not eq or not name or not value:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {item!r}")
        elif name not in known:
            raise argparse.ArgumentTypeError(f"unknown {name!r} (known: {', '.join(known)})")
        if name in fields:
            raise argparse.ArgumentTypeError(f"{name} given twice")
        fields[name] = value
    return fields


def _number(value: str, what: str, *, low: float = 0.0, high: float = math.inf,
            open_low: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number, not {value!r}") from None
    if not (math.isfinite(number) and (number > low if open_low else number >= low)
            and number <= high):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        upper = f" and <= {high:g}" if math.isfinite(high) else ""
        raise argparse.ArgumentTypeError(f"{what} must be a finite number {bound}{upper}, "
                                         f"not {value}")
    return number


def latency(text: str) -> LatencyModel:
    """``fixed:S``, ``uniform:LOW,HIGH`` or ``lognormal:MEDIAN[,SIGMA[,LOW,HIGH]]`` seconds."""
    from ..testing import LatencyModel

    kind, _, rest = text.partition(":")
    values = [_number(v, "each value") for v in rest.split(",")] if rest else []
    shapes = {"fixed": (1, 1), "uniform": (2, 2), "lognormal": (1, 4)}
    if kind not in shapes:
        raise argparse.ArgumentTypeError(
            f"expected fixed:S, uniform:LOW,HIGH or lognormal:MEDIAN[,SIGMA[,LOW,HIGH]], "
            f"not {text!r}")
    fewest, most = shapes[kind]
    if not fewest <= len(values) <= most or (kind == "lognormal" and len(values) == 3):
        raise argparse.ArgumentTypeError(f"wrong number of values in {text!r}")
    try:
        if kind == "fixed":
            return LatencyModel.fixed(values[0])
        if kind == "uniform":
            return LatencyModel.uniform(values[0], values[1])
        low, high = (values[2], values[3]) if len(values) == 4 else (0.0, math.inf)
        return LatencyModel.lognormal(values[0], values[1] if len(values) > 1 else 1.0,
                                      low=low, high=high)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from None


_FAULT_KINDS = ("429", "500", "503", "reset")


def fault_rates(text: str) -> FaultRates:
    """``P`` (spread evenly over 429, 500, 503 and reset) or ``429=P,503=P,...``, with optional
    ``retry_after=S`` (the faults' Retry-After: seconds, or any text) and ``routes=a+b``."""
    from ..testing import FaultRates

    fields = _fields(text, (*_FAULT_KINDS, "retry_after", "routes", "seed"), first="all")
    rates = dict.fromkeys(_FAULT_KINDS, 0.0)
    if "all" in fields:
        share = _number(fields["all"], "the rate", high=1.0) / len(_FAULT_KINDS)
        rates = dict.fromkeys(_FAULT_KINDS, share)
    for kind in _FAULT_KINDS:
        if kind in fields:
            rates[kind] = _number(fields[kind], f"the rate of {kind}", high=1.0)
    if sum(rates.values()) > 1.0:
        raise argparse.ArgumentTypeError("the rates add up to more than 1")
    routes = tuple(fields.get("routes", "create+retrieve+cancel").split("+"))
    known = ("create", "retrieve", "cancel", "batch_create", "batch_retrieve", "batch_cancel",
             "batch_results", "files")
    if not set(routes) <= set(known):
        raise argparse.ArgumentTypeError(f"routes are {'+'.join(known)}")
    return FaultRates(rate_429=rates["429"], rate_500=rates["500"], rate_503=rates["503"],
                      rate_reset=rates["reset"], retry_after=_retry_after(fields),
                      routes=routes,  # type: ignore[arg-type]
                      seed=int(_number(fields.get("seed", "0"), "seed")))


def _retry_after(fields: dict[str, str]) -> float | str | None:
    """A number of seconds stays a number; any other text is sent as it is (garbage on
    purpose)."""
    value = fields.get("retry_after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


def outcomes(text: str) -> Outcomes:
    """Weights of how responses end: ``completed=0.9,failed=0.05,incomplete=0.05,stuck=0``."""
    from ..testing import Outcomes

    names = ("completed", "failed", "incomplete", "stuck")
    fields = _fields(text, names)
    weights = {n: _number(fields.get(n, "0"), n) for n in names}
    if not sum(weights.values()) > 0:
        raise argparse.ArgumentTypeError("at least one weight must be > 0")
    return Outcomes(**weights)


def fake_rate_limit(text: str) -> FakeRateLimit:
    """``RPM`` or ``rpm=N,tpm=N,ppm=N,burst=S`` (creates, tokens and polls a minute; seconds
    of burst)."""
    from ..testing import FakeRateLimit

    fields = _fields(text, ("rpm", "tpm", "ppm", "burst"), first="rpm")

    def rate(name: str) -> float | None:
        value = fields.get(name)
        return None if value is None else _number(value, name, open_low=True)

    burst = rate("burst")
    return FakeRateLimit(rate("rpm"), rate("tpm"), rate("ppm"),
                         60.0 if burst is None else burst)


def fault(text: str) -> Fault:
    """``KIND[,route=R][,times=N][,retry_after=S][,delay=S][,after=N]``: one scripted fault."""
    from ..testing import Fault

    fields = _fields(text, ("route", "times", "retry_after", "delay", "after"), first="kind")
    kinds = ("429", "500", "503", "404", "quota", "html", "reset", "reset_after", "slow", "drop")
    kind = fields.get("kind", "")
    if kind not in kinds:
        raise argparse.ArgumentTypeError(f"the kind is one of {', '.join(kinds)}, not {kind!r}")
    routes = ("any", "create", "retrieve", "cancel", "batch_create", "batch_retrieve",
              "batch_cancel", "batch_results", "files")
    route = fields.get("route", "any")
    if route not in routes:
        raise argparse.ArgumentTypeError(f"route is one of {', '.join(routes)}, not {route!r}")
    times = _number(fields.get("times", "1"), "times", low=1)
    after = _number(fields.get("after", "0"), "after")
    if times != int(times) or after != int(after):
        raise argparse.ArgumentTypeError("times and after are whole numbers")
    try:
        return Fault(kind, route, int(times), _retry_after(fields),  # type: ignore[arg-type]
                     _number(fields.get("delay", "0"), "delay"), int(after))
    except ValueError as exc:  # after= on a kind other than drop, delay= other than slow
        raise argparse.ArgumentTypeError(str(exc)) from None
