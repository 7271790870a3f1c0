"""The operator's tools over a run's journal: ``asyncbg status`` and ``asyncbg cancel``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import openai

from .. import BackgroundManager, Job
from .._fleet import fleet_status, fleet_status_text, shared_ledger
from .._ledgers import Ledger, LedgerError, Record, SQLiteLedger
from .._ledgers._outbox import Outbox
from .._ledgers._shared import SharedLedger
from .._ledgers._sqlite_shared import SharedSQLiteLedger
from .._ledgers._urls import url_like
from ._deliveries import summary as delivery_summary
from ._deliveries import summary_text as delivery_text
from ._output import body_of, tokens_of
from ._progress import ORDER, counts_text, rows

__all__ = ["cancel", "cancel_live", "open_client", "status", "summarize"]


def say(message: str) -> None:
    print(f"asyncbg: {message}", file=sys.stderr, flush=True)


def open_client(base_url: str | None) -> openai.AsyncOpenAI | None:
    """The OpenAI client (key and base URL from the environment), or None after saying why.

    asyncbg owns every retry, so the SDK's own are off.
    """
    try:
        return openai.AsyncOpenAI(base_url=base_url or None, max_retries=0)
    except openai.OpenAIError as exc:
        say(str(exc))
        return None


async def open_ledger(spec: str | Path, *, exclusive: bool) -> Ledger | None:
    """Open an existing journal or a fleet's ledger (``postgresql://...``), or None after
    saying why (it is missing or refused). Text that starts like a URL is never a path."""
    ledger: Ledger
    if isinstance(spec, str) and url_like(spec):
        try:
            ledger = shared_ledger(spec)
        except LedgerError as exc:
            say(str(exc))
            return None
    else:
        path = Path(spec)
        if not await anyio.Path(path).exists():
            say(f"no journal at {path} (pass the --journal of the run, by default "
                "OUTPUT.jsonl.journal)")
            return None
        # A run's journal or a fleet's: the shared view reads both (and its workers).
        ledger = (SQLiteLedger(path, exclusive=True) if exclusive
                  else SharedSQLiteLedger(path))
    try:
        await ledger.open()
    except LedgerError as exc:
        say(str(exc))
        return None
    return ledger


# -- status -------------------------------------------------------------------------------------


def summarize(records: Sequence[Record], location: str) -> dict[str, Any]:
    """What ``asyncbg status --json`` prints: counts, live response ids, tokens."""
    by_status = Counter(r.status for r in records)
    tokens = {"input": 0, "output": 0, "total": 0}
    for record in records:
        if record.body is not None:
            for name, value in tokens_of(body_of(record)).items():
                tokens[name] += value
    return {
        "journal": location,
        "total": len(records),
        "by_status": {name: by_status[name] for name in sorted(by_status, key=_rank)},
        "by_state": dict(Counter(r.state for r in records)),
        "live_response_ids": [r.response_id for r in records
                              if r.state == "live" and r.response_id],
        "live": [{"key": r.key, "response_id": r.response_id, "status": r.status}
                 for r in records if r.state == "live"],
        "unconfirmed": [r.key for r in records if r.state == "sending"],
        "possible_duplicates": sum(r.resubmits for r in records),
        "tokens": tokens,
    }


def _rank(status: str) -> tuple[int, str]:
    return (ORDER.index(status) if status in ORDER else len(ORDER), status)


def status_text(summary: dict[str, Any]) -> str:
    tokens = summary["tokens"]
    items: list[tuple[str, object]] = [
        ("journal", summary["journal"]),
        ("jobs", f"{summary['total']}  ({counts_text(summary['by_status']) or 'none'})"),
        ("tokens", f"{tokens['total']:,}  (input {tokens['input']:,}, "
                   f"output {tokens['output']:,})"),
    ]
    if summary["possible_duplicates"]:
        items.append(("possible duplicates", summary["possible_duplicates"]))
    live = summary["live"]
    items.append(("live", f"{len(live)} still running on the server" if live else "none"))
    text = rows(items)
    for item in live:
        text += f"\n  {item['response_id']}  {item['status']:<11}  {item['key']}"
    fleet = "fleet" in summary
    if summary["unconfirmed"]:
        text += (f"\n{len(summary['unconfirmed'])} create(s) left without an answer recorded "
                 f"({'a worker' if fleet else 'a rerun'} sends them again): "
                 + ", ".join(summary["unconfirmed"][:10]))
    if live:
        collect = (f"the workers collect them (start `asyncbg worker --ledger "
                   f"{summary['journal']}` if none is running)" if fleet
                   else "run the same `asyncbg run` again to collect them")
        text += f"\n{collect}, or `asyncbg cancel --ledger {summary['journal']}` to cancel them"
    return text


async def status(args: argparse.Namespace) -> int:
    """``asyncbg status --ledger PATH [--json]``: read the journal; no API key, no request."""
    ledger = await open_ledger(args.ledger, exclusive=False)
    if ledger is None:
        return 2
    fleet: dict[str, Any] | None = None
    try:
        records = await ledger.records()
        if isinstance(ledger, SharedLedger):
            fleet = await fleet_status(ledger)
            if not fleet["workers_alive"] and isinstance(ledger, SharedSQLiteLedger) and (
                    not await ledger.used_by_a_fleet()):
                fleet = None  # an `asyncbg run` journal
        # Pending and failed webhook notifications (an outbox: SQLite and PostgreSQL ledgers).
        notes = delivery_summary(await ledger.deliveries() if isinstance(ledger, Outbox) else [])
    except LedgerError as exc:
        say(str(exc))
        return 2
    finally:
        await ledger.close()
    # ledger.location, never args.ledger: it is the URL without its password.
    summary = summarize(records, ledger.location)
    if fleet is not None:
        summary["fleet"] = fleet
    summary["notifications"] = notes
    if args.json:
        del summary["live"]
        print(json.dumps(summary, indent=2))
    else:
        print(status_text(summary))
        if "fleet" in summary:
            print(fleet_status_text(summary["fleet"]))
        if notes["pending"] or notes["failed"]:
            print(delivery_text(notes, ledger=ledger.location))
    return 0


# -- cancel -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What ``cancel_live`` did for one live record."""

    key: str
    response_id: str | None
    status: str
    error: str | None


async def cancel_live(
    client: openai.AsyncOpenAI, ledger: Ledger, *, timeout: float = 30.0
) -> list[Cancelled]:
    """Cancel on the server every response the (open) ledger has as live; the manager records
    each outcome. Returns what happened to each, within ``timeout`` seconds."""
    live = [r for r in await ledger.records() if r.state == "live"]
    jobs: list[Job] = []
    if live:
        with anyio.move_on_after(timeout):
            async with BackgroundManager(client, journal=ledger, cancel_on_exit=False) as mgr:
                for record in live:
                    try:
                        jobs.append(await mgr.attach(record.key))
                    except LookupError:
                        continue
                await mgr.cancel_all()
    return [Cancelled(j.key, j.response_id, j.status.value, j.error) for j in jobs]


async def cancel(args: argparse.Namespace) -> int:
    """``asyncbg cancel --ledger PATH``: cancel every live response recorded there."""
    ledger = await open_ledger(args.ledger, exclusive=True)
    if ledger is None:
        return 2
    try:
        if not any(r.state == "live" for r in await ledger.records()):
            print(f"nothing to cancel: no live response in {ledger.location}")
            return 0
        client = open_client(args.base_url)
        if client is None:
            return 2
        try:
            done = await cancel_live(client, ledger, timeout=args.timeout)
        finally:
            await client.close()
        left = [r for r in await ledger.records() if r.state == "live"]
    except LedgerError as exc:
        say(str(exc))
        return 2
    finally:
        await ledger.close()
    for item in done:
        if item.status == "cancelled":
            outcome = "cancelled"
        elif item.status in ("completed", "failed", "incomplete"):
            outcome = f"{item.status} before the cancel arrived"
        else:
            outcome = f"still {item.status}: the server did not confirm the cancel in time"
        print(f"{item.key}  {item.response_id}  {outcome}")
    stopped = sum(item.status == "cancelled" for item in done)
    print(f"cancelled {stopped} of {len(done)} live responses"
          + (f"; {len(left)} still live (run `asyncbg cancel` again)" if left
             else "; none is left live"))
    return 1 if left else 0
