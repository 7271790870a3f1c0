"""The operator's tools over a journal: ``asyncbg status`` and ``asyncbg cancel``.

Both learn from the journal itself which API each job belongs to, and which batch: the response
ids it records are namespaced by the APIs (:mod:`asyncbg._providers._kinds`). So ``cancel``
talks to the API that holds each job, with that API's own key (``OPENAI_API_KEY``,
``ANTHROPIC_API_KEY``, ``GEMINI_API_KEY``/``GOOGLE_API_KEY``): a background response is
cancelled by its id, a batch as a whole (its finished requests keep their results). It records
what the server says and nothing else: a 404, a timeout or an unreachable server leaves the
journal as it was, and is said in one line.

``cancel`` needs no engine: it claims each live record the way a worker does (on a fleet's
ledger, a record whose lease another worker holds is cancelled on the server and left for that
worker to record), asks the provider, and writes the answer. No internal batch size applies:
every live record is cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._http import NotFound, Rejected, RequestError, Transient, Unreachable
from .._ledgers import Ledger, LedgerError, Record
from .._ledgers._base import ClaimOutcome, Outcome
from .._ledgers._lock import current_holder
from .._ledgers._outbox import Delivery, Outbox
from .._ledgers._overview import (
    BatchGroup,
    Overview,
    fleet_status,
    fleet_status_text,
    fleet_summary,
    from_records,
    live_records,
    overview,
    sqlite_overview,
    unfinished_in,
)
from .._ledgers._rescue import Rescue
from .._ledgers._shared import LeaseLost, SharedLedger, WorkerInfo, keep_leases
from .._ledgers._sqlite import reader_mode, records_of
from .._ledgers._sqlite_outbox import deliveries_of
from .._ledgers._sqlite_shared import SharedSQLiteLedger, used_by_a_fleet, workers_of
from .._ledgers._urls import url_like
from .._providers._base import Answer, Provider
from .._providers._kinds import ProviderName, batch_of, provider_of, window_of

if TYPE_CHECKING:  # the SDKs and the engine load when a command runs, not for `--help`
    import openai

from . import _loop
from ._deliveries import summary as delivery_summary
from ._deliveries import summary_text as delivery_text
from ._progress import ORDER, counts_text, rows

__all__ = ["Cancelled", "cancel", "cancel_live", "emit", "missing_directory", "open_client",
           "run_status", "say", "status", "summarize"]

#: Batches listed one per line by ``status``; more are summed up in one line.
MAX_BATCH_LINES = 20
#: Live background responses listed one per line by ``status``, when there are no more.
MAX_LIVE_LINES = 10
#: Cancels and checks in flight at once while cancelling background responses.
CANCEL_CONCURRENCY = 32


def say(message: str) -> None:
    print(f"asyncbg: {message}", file=sys.stderr, flush=True)


#: Set once a reader went away from stdout: the command still ends with 141 (see main).
PIPE_CLOSED = False
#: Set once stdout could not be written (a full disk, a closed descriptor): said in one line,
#: and the command ends with 2 (see main).
STDOUT_FAILED = False


def emit(text: str, *, end: str = "\n") -> bool:
    """Print ``text`` on stdout; a reader that went away (``| head``) ends the output
    quietly: the rest is dropped, with no traceback, and the command's work goes on (a cancel
    finishes cancelling); the command then exits 141, as every command does on a closed pipe.
    A stdout that cannot be written otherwise (a file on a full disk, a closed descriptor) is
    said in one line, the rest is dropped, and the command exits 2. Every command writes its
    stdout through here. Returns whether stdout still takes what is written."""
    global PIPE_CLOSED, STDOUT_FAILED
    if PIPE_CLOSED or STDOUT_FAILED:
        return False
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "stdout is closed")
        print(text, end=end, flush=True)
        return True
    except BrokenPipeError:
        PIPE_CLOSED = True
    except OSError as exc:
        say(f"cannot write to stdout: {exc.strerror or exc}")
        STDOUT_FAILED = True
    silence_stdout()
    return False


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that later writes and the flush at exit do not fail
    again (what was buffered is dropped)."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()  # the buffer goes to /dev/null now


def missing_directory(path: Path) -> str | None:
    """Why a file cannot be made at ``path`` without making directories (``DIR does not
    exist``, ``DIR is not a directory``), or None. The command line makes the files it is
    given, never their directories: a mistyped path is refused, not built."""
    parent = path.parent
    if parent.is_dir():
        return None
    return f"{parent} {'is not a directory' if parent.exists() else 'does not exist'}"


def no_ledger(path: Path) -> str:
    """The line for a ``--ledger`` path where there is nothing: what the path should be."""
    return (f"no journal or ledger at {path} (a run's is its --journal, by default "
            "OUTPUT.jsonl.journal; a fleet's is the --ledger given to asyncbg submit)")


def open_client(base_url: str | None) -> openai.AsyncOpenAI | None:
    """The OpenAI client (key and base URL from the environment), or None after saying why.

    asyncbg owns every retry, so the SDK's own are off.
    """
    import openai

    try:
        return openai.AsyncOpenAI(base_url=base_url or None, max_retries=0)
    except openai.OpenAIError as exc:
        if not os.environ.get("OPENAI_API_KEY"):  # the SDK's line names its own parameters
            say("no OpenAI API key: set OPENAI_API_KEY (against `asyncbg fake-server`, any "
                "value works)")
        else:
            say(str(exc))
        return None


async def open_ledger(spec: str | Path, *, exclusive: bool, pool: bool = True) -> Ledger | None:
    """Open an existing journal or a fleet's ledger (``postgresql://...``), or None after
    saying why (it is missing or refused). Text that starts like a URL is never a path.

    A journal file opens as a shared one, which reads a run's journal and a fleet's alike and
    respects the workers' leases; ``exclusive`` also takes the run lock, so that no ``asyncbg
    run`` works on it meanwhile. ``pool=False``: a PostgreSQL ledger is read on one connection,
    with no pool (a command that reads a few things and leaves).
    """
    from .._ledgers._open import shared_ledger

    ledger: Ledger
    if isinstance(spec, str) and url_like(spec):
        try:
            ledger = shared_ledger(spec, pool=pool)
        except LedgerError as exc:
            say(str(exc))
            return None
    else:
        path = Path(spec)
        if not await anyio.Path(path).exists():
            say(no_ledger(path))
            return None
        ledger = SharedSQLiteLedger(path, exclusive=exclusive)
    try:
        await ledger.open()
    except LedgerError as exc:
        say(str(exc))
        return None
    return ledger


# -- status -------------------------------------------------------------------------------------


def summarize(records: Sequence[Record] | Overview, location: str, *,
              now: float | None = None) -> dict[str, Any]:
    """What ``asyncbg status --json`` prints: counts, live response ids, batches, tokens; from
    a ledger's :class:`Overview` (or every record, read whole)."""
    now = time.time() if now is None else now
    view = records if isinstance(records, Overview) else from_records(records)
    in_flight = set(view.in_flight)
    by_status: Counter[str] = Counter()
    by_state: Counter[str] = Counter()
    for (state, status_), n in view.counts.items():
        by_status[status_] += n
        by_state[state] += n
    inp, out = view.input_tokens, view.output_tokens
    return {
        "journal": location,
        "total": view.total,
        "by_status": {name: by_status[name] for name in sorted(by_status, key=_rank)},
        "by_state": {name: by_state[name] for name in sorted(by_state, key=_state_rank)},
        "live_response_ids": [r.response_id for r in view.live if r.response_id],
        "live_by_provider": dict(Counter(provider_of(r.response_id) or "unknown"
                                         for r in view.live)),
        "live": [{"key": r.key, "response_id": r.response_id, "status": r.status}
                 for r in view.live if batch_of(r.response_id) is None][:MAX_LIVE_LINES + 1],
        "batches": batches(view.batches, now=now),
        # Sends whose holder is gone (a worker or a rerun sends them again), and those in
        # flight with a running worker, which records their answers.
        "unconfirmed": [key for key in view.sending if key not in in_flight],
        "in_flight": [key for key in view.sending if key in in_flight],
        "possible_duplicates": view.resubmits,
        "tokens": {"input": inp, "output": out, "total": inp + out},
    }


def batches(groups: Iterable[BatchGroup], *, now: float) -> list[dict[str, Any]]:
    """One entry per remote batch the journal knows: its provider, its jobs by status, its
    age and when the API expires what is left of it (estimated from its first job's time)."""
    found: dict[str, dict[str, Any]] = {}
    for g in groups:
        entry = found.get(g.batch_id)
        if entry is None:
            entry = found[g.batch_id] = {
                "id": g.batch_id, "provider": provider_of(f"{g.batch_id}#-"), "jobs": 0,
                "by_status": Counter(), "created": g.created}
        entry["jobs"] += g.count
        entry["by_status"][g.status] += g.count
        entry["created"] = min(entry["created"], g.created)
    out = []
    for entry in found.values():
        counts: Counter[str] = entry["by_status"]
        window = window_of(entry["provider"]) if entry["provider"] else None
        live = sum(n for name, n in counts.items() if name in ("pending", "queued",
                                                                "in_progress"))
        out.append({**entry, "by_status": {n: counts[n] for n in sorted(counts, key=_rank)},
                    "live": live, "age": max(0.0, now - entry["created"]),
                    "expires_in": (None if window is None or not live
                                   else entry["created"] + window - now)})
    return sorted(out, key=lambda e: (e["created"], e["id"]))


_STATES = ("new", "sending", "live", "done", "local")


def _state_rank(state: str) -> tuple[int, str]:
    return (_STATES.index(state) if state in _STATES else len(_STATES), state)


def _rank(status: str) -> tuple[int, str]:
    return (ORDER.index(status) if status in ORDER else len(ORDER), status)


def _span(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d4h``: an age or a time left, at a glance."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600}h"


def _batch_line(b: Mapping[str, Any]) -> str:
    left = b["expires_in"]
    expiry = ("" if left is None else
              f", expires in about {_span(left)}" if left > 0 else ", past its window")
    return (f"  {b['id']}  {b['provider'] or 'unknown API'}  {b['jobs']} jobs "
            f"({counts_text(b['by_status'])}), age {_span(b['age'])}{expiry}")


def status_text(summary: Mapping[str, Any]) -> str:
    tokens = summary["tokens"]
    items: list[tuple[str, object]] = [
        ("journal", summary["journal"]),
        ("jobs", f"{summary['total']}  ({counts_text(summary['by_status']) or 'none'})"),
        ("tokens", f"{tokens['total']:,}  (input {tokens['input']:,}, "
                   f"output {tokens['output']:,})"),
    ]
    if summary.get("held_by"):
        items.append(("run", f"in progress: {summary['held_by']}"))
    if summary["possible_duplicates"]:
        items.append(("possible duplicates", summary["possible_duplicates"]))
    live = len(summary["live_response_ids"])
    by_api = summary["live_by_provider"]
    apis = (f" ({', '.join(f'{name} {n}' for name, n in sorted(by_api.items()))})"
            if len(by_api) > 1 or "openai" not in by_api else "")
    items.append(("live", f"{live} still running on the server{apis}" if live else "none"))
    text = rows(items)
    fleet = "fleet" in summary
    responses = summary.get("live", [])
    if 0 < len(responses) <= MAX_LIVE_LINES:
        for item in responses:
            text += f"\n  {item['response_id']}  {item['status']:<11}  {item['key']}"
    listed = summary["batches"]
    if listed:
        text += f"\nbatches     {len(listed)}"
        for b in listed[:MAX_BATCH_LINES]:
            text += "\n" + _batch_line(b)
        if len(listed) > MAX_BATCH_LINES:
            rest = listed[MAX_BATCH_LINES:]
            text += (f"\n  ... {len(rest)} more batches, {sum(b['jobs'] for b in rest)} jobs "
                     "(--json lists them all)")
    if summary["in_flight"]:
        sender = ("the run that holds the journal, which records" if summary.get("held_by")
                  else "running workers, which record")
        text += (f"\n{len(summary['in_flight'])} create(s) in flight with {sender} the "
                 "answers: " + ", ".join(summary["in_flight"][:10]))
    if summary["unconfirmed"]:
        text += (f"\n{len(summary['unconfirmed'])} create(s) left without an answer recorded "
                 f"({'a worker' if fleet else 'a rerun'} sends them again): "
                 + ", ".join(summary["unconfirmed"][:10]))
    kept = summary.get("unrecorded")
    if kept and kept.get("error"):
        text += f"\ncannot read {kept['file']} ({kept['error']}): response ids kept there wait"
    elif kept:
        n = kept["ids"]
        who = ("the next `asyncbg worker` on this ledger on this machine records them and "
               "polls them" if kept["fleet"] else "the next run on this journal re-attaches "
               "to them")
        text += (f"\n{'1 response id waits' if n == 1 else f'{n} response ids wait'} in "
                 f"{kept['file']} to be adopted (created by a process that could not record "
                 f"them): {who}")
    if live:
        text += "\n" + _advice(summary)
    return text


def kept_summary(rescue: Rescue) -> dict[str, Any] | None:
    """The response ids waiting in ``rescue``'s file to be adopted (see
    ``asyncbg._ledgers._rescue``), read only; None when there are none."""
    try:
        kept = rescue.entries()
    except OSError as exc:
        return {"file": str(rescue.path), "ids": 0, "fleet": True,
                "error": exc.strerror or str(exc)}
    if not kept:
        return None
    return {"file": str(rescue.path), "ids": len(kept),
            "fleet": any(k.epoch is not None for k in kept)}


def _advice(summary: Mapping[str, Any]) -> str:
    """What to do about live jobs: collect them (they are paid for). Nothing destructive."""
    if summary.get("held_by"):
        return "the run that holds the journal collects them as they finish"
    if "fleet" in summary:
        return (f"the workers collect them (start `asyncbg worker --ledger "
                f"{summary['journal']}` if none is running)")
    return ("run the same `asyncbg run` command again to collect them: they are paid for and "
            "their results are kept")


def run_status(args: argparse.Namespace) -> int:
    """``asyncbg status`` as the command line runs it. An SQLite journal is read in this
    thread with no event loop: starting asyncio and anyio's backend is most of the cost of a
    short command, and on a busy machine each trip to a worker thread waits for a core. Any
    other ledger (PostgreSQL) is read by :func:`status`."""
    if url_like(args.ledger):
        return _loop.run(status, args)
    path = Path(args.ledger)
    if not path.exists():
        say(no_ledger(path))
        return 2
    ledger = SharedSQLiteLedger(path)
    try:
        read = _read_only(path, _sqlite_status)
        # Not a current journal (or not one at all): opened as a ledger is, which says what
        # the file is, and upgrades an earlier version's schema once (its first use).
        view, workers, used, deliveries = (
            read if read is not None else ledger.read_once(_sqlite_status))
    except LedgerError as exc:
        say(str(exc))
        return 2
    fleet = fleet_summary(workers, unfinished_in(view)) if workers or used else None
    return _show_status(args, ledger.location, view, fleet, delivery_summary(deliveries),
                        kept_summary(ledger.rescue()))


T = TypeVar("T")


def _read_only(path: Path, fn: Callable[[sqlite3.Connection], T]) -> T | None:
    """``fn`` on a read-only connection to a journal of the current schema: status writes
    nothing, and works on a read-only disk. None when the file is not such a journal (or
    cannot be opened so): the caller opens it as a ledger, to say why or to upgrade it."""
    from urllib.parse import quote

    from .._ledgers import _sqlite_queries as q

    real = os.path.realpath(path)
    # Its directory unwritable: nothing can be writing it, so it reads as an immutable file.
    mode = reader_mode(real, unwritable="ro&immutable=1")
    try:
        db = sqlite3.connect(f"file:{quote(real)}?mode={mode}", uri=True, timeout=5.0,
                             isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        db.execute("PRAGMA query_only = ON")
        current = (int(db.execute(q.READ_APPLICATION_ID).fetchone()[0]) == q.APPLICATION_ID
                   and int(db.execute(q.READ_USER_VERSION).fetchone()[0]) == q.SCHEMA_VERSION
                   and db.execute(q.HAS_COUNTS).fetchone() is not None
                   and db.execute(q.HAS_TALLIES).fetchone() is not None)
        if not current:
            return None
        return fn(db)
    except sqlite3.Error:
        return None
    finally:
        db.close()


def _sqlite_status(db: sqlite3.Connection) -> tuple[Overview, list[WorkerInfo], bool,
                                                    list[Delivery]]:
    """What status reads of an SQLite journal (as :func:`status` reads any ledger)."""
    view = sqlite_overview(db) or from_records(records_of(db))
    return view, workers_of(db), used_by_a_fleet(db), deliveries_of(db)


async def status(args: argparse.Namespace) -> int:
    """``asyncbg status --ledger PATH [--json]``: read the journal; no API key, no request."""
    ledger = await open_ledger(args.ledger, exclusive=False, pool=False)
    if ledger is None:
        return 2
    fleet: dict[str, Any] | None = None
    try:
        view = await overview(ledger)
        if isinstance(ledger, SharedLedger):
            fleet = await fleet_status(ledger, view)
            if not fleet["workers_alive"] and isinstance(ledger, SharedSQLiteLedger) and (
                    not await ledger.used_by_a_fleet()):
                fleet = None  # an `asyncbg run` journal
        # Pending and failed webhook notifications (an outbox: SQLite and PostgreSQL ledgers).
        notes = delivery_summary(await ledger.deliveries() if isinstance(ledger, Outbox) else [])
        kept = (await anyio.to_thread.run_sync(kept_summary, ledger.rescue())
                if isinstance(ledger, SharedLedger) else None)
    except LedgerError as exc:
        say(str(exc))
        return 2
    finally:
        await ledger.close()
    return _show_status(args, ledger.location, view, fleet, notes, kept)


def _show_status(args: argparse.Namespace, location: str, view: Overview,
                 fleet: dict[str, Any] | None, notes: dict[str, Any],
                 kept: dict[str, Any] | None = None) -> int:
    """Print what status read: text, or JSON with ``--json``."""
    summary = summarize(view, location)
    if kept is not None:
        summary["unrecorded"] = kept
    if not url_like(args.ledger):
        real = os.path.realpath(args.ledger)  # the lock is beside the real file
        summary["held_by"] = current_holder(Path(f"{real}.lock"))
        if summary["held_by"]:  # a run holds the journal: its creates are in flight with it
            summary["in_flight"] += summary["unconfirmed"]
            summary["unconfirmed"] = []
    if fleet is not None:
        summary["fleet"] = fleet
    summary["notifications"] = notes
    if args.json:
        del summary["live"]  # live_response_ids has them all
        emit(json.dumps(summary, indent=2))
        return 0
    text = status_text(summary)
    if "fleet" in summary:
        text += "\n" + fleet_status_text(summary["fleet"])
    if notes["pending"] or notes["failed"]:
        text += "\n" + delivery_text(notes, ledger=location)
    emit(text)
    return 0


# -- cancel -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What ``cancel_live`` did for one live record.

    ``status`` is where the server left it (a :class:`~asyncbg.JobStatus` value), or
    ``unknown`` when the server did not say; ``recorded`` whether the journal has it now (a
    fleet worker holding the record's lease records it itself).
    """

    key: str
    response_id: str | None
    status: str
    error: str | None
    batch_id: str | None = None
    recorded: bool = False


@dataclass
class _Sweep:
    """One ``cancel``: the ledger, a provider per API, and what happened so far."""

    ledger: Ledger
    providers: Mapping[str, Provider]
    done: list[Cancelled] = field(default_factory=list)
    #: Keys whose lease this sweep took (to record them); handed back if left live.
    held: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)
    unreachable: str | None = None

    async def take(self, record: Record) -> bool:
        """Claim ``record`` to record its outcome; False when a live worker holds it."""
        claim = await self.ledger.claim(record.key, record.digest, record.request)
        if claim.outcome is ClaimOutcome.RESUME:
            self.held.add(record.key)
            return True
        return False

    async def write(self, record: Record, answer: Answer | None, mine: bool, *,
                    note: str | None = None) -> None:
        status = answer.status.value if answer is not None else "unknown"
        recorded = False
        if mine and answer is not None and answer.status.terminal:
            try:
                await self.ledger.record(record.key, Outcome(
                    status, response_id=record.response_id, body=answer.body,
                    error=answer.error, error_code=answer.error_code,
                    http_status=answer.http_status, request_id=answer.request_id))
            except LeaseLost:  # a worker took it over meanwhile: it records what it sees
                pass
            else:
                recorded = True
            self.held.discard(record.key)
        self.written.add(record.key)
        self.done.append(Cancelled(record.key, record.response_id, status,
                                   note or (answer.error if answer is not None else None),
                                   batch_of(record.response_id), recorded))

    def stop(self, exc: Unreachable, scope: anyio.CancelScope) -> None:
        self.unreachable = exc.message
        scope.cancel()


async def _until_terminal(provider: Provider, rid: str, first: Answer | None) -> Answer | None:
    """Check ``rid`` until it is terminal (the caller bounds the time); a 404 or a refusal
    ends the wait with the last answer, a failed check is tried again."""
    answer, pause = first, 0.05
    while answer is None or not answer.status.terminal:
        if answer is not None:
            await anyio.sleep(pause)
            pause = min(pause * 2, 2.0)
        try:
            answer = await provider.check(rid)
        except (NotFound, Rejected):
            return answer
        except Transient:
            await anyio.sleep(pause)
            pause = min(pause * 2, 2.0)
    return answer


async def _cancel_response(sweep: _Sweep, provider: Provider, record: Record,
                           limiter: anyio.CapacityLimiter) -> None:
    """One background response: cancel it by id, then check until it has ended."""
    assert record.response_id is not None
    rid = record.response_id
    async with limiter:
        mine = await sweep.take(record)
        answer: Answer | None = None
        note = None
        try:
            pause = 0.05
            while True:
                try:
                    answer = await provider.cancel(rid)
                except NotFound:
                    note = ("the server does not know this response (404): left as the journal "
                            "had it")
                    return
                except Rejected:  # e.g. it had finished: a race, not a failure
                    break
                except Transient as exc:  # 429, 5xx: ask again (a cancel is idempotent)
                    note = exc.message
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    continue
                note = None
                break
            answer = await _until_terminal(provider, rid, answer)
        finally:
            with anyio.CancelScope(shield=True):
                await sweep.write(record, answer, mine, note=note)


async def _cancel_batch(sweep: _Sweep, provider: Any, batch_id: str,
                        records: list[Record]) -> None:
    """One remote batch: cancel it on the server once, then check its jobs until it ended."""
    mine = {r.key: await sweep.take(r) for r in records}
    answers: dict[str, Answer] = {}
    try:
        try:
            await provider.cancel_batch(batch_id)
        except NotFound:
            for r in records:
                await sweep.write(r, None, False, note=f"the server does not know batch "
                                  f"{batch_id} (404): left as the journal had it")
            return
        pause = 0.05
        while True:
            for r in records:
                if r.key in answers and answers[r.key].status.terminal:
                    continue
                assert r.response_id is not None
                try:
                    answers[r.key] = await provider.check(r.response_id)
                except Unreachable:
                    raise
                except Rejected:  # lost (a confirmed 404) or refused: nothing more to learn
                    return
                except RequestError:
                    break  # the batch's poll failed: every job of it would; try again later
            if all(a.status.terminal for a in answers.values()) and len(answers) == len(records):
                return
            await anyio.sleep(pause)
            pause = min(pause * 2, 2.0)
    finally:
        with anyio.CancelScope(shield=True):
            for r in records:
                if r.key not in sweep.written:
                    await sweep.write(r, answers.get(r.key), mine[r.key])


async def sweep_live(ledger: Ledger, providers: Mapping[str, Provider], *,
                     timeout: float) -> _Sweep:
    """Cancel every live record of ``ledger`` on its own API (each batch once, as a whole)
    and record what the servers say, within ``timeout`` seconds."""
    sweep = _Sweep(ledger, providers)
    live = [r for r in await live_records(ledger) if r.response_id]
    groups: dict[str, list[Record]] = defaultdict(list)
    responses: list[tuple[Provider, Record]] = []
    for r in live:
        name = provider_of(r.response_id)
        provider = providers.get(name) if name is not None else None
        if provider is None:
            sweep.done.append(Cancelled(r.key, r.response_id, r.status,
                                        "no provider for this id: left as it was"))
        elif (batch_id := batch_of(r.response_id)) is not None:
            groups[batch_id].append(r)
        else:
            responses.append((provider, r))
    limiter = anyio.CapacityLimiter(CANCEL_CONCURRENCY)
    try:
        async with anyio.create_task_group() as tg:
            if isinstance(ledger, SharedLedger):
                tg.start_soon(keep_leases, ledger, sweep.held.discard)
            with anyio.move_on_after(timeout) as scope:
                async with anyio.create_task_group() as work:
                    for provider, record in responses:
                        work.start_soon(_guarded, sweep, scope, _cancel_response(
                            sweep, provider, record, limiter))
                    for batch_id, records in groups.items():
                        provider = providers[provider_of(records[0].response_id) or ""]
                        work.start_soon(_guarded, sweep, scope, _cancel_batch(
                            sweep, provider, batch_id, records))
            tg.cancel_scope.cancel()
    finally:
        if sweep.held and isinstance(ledger, SharedLedger):
            with anyio.CancelScope(shield=True):
                await ledger.release(sweep.held)  # left live: a worker may take them over
    return sweep


async def _guarded(sweep: _Sweep, scope: anyio.CancelScope, work: Any) -> None:
    try:
        await work
    except Unreachable as exc:
        sweep.stop(exc, scope)


async def cancel_live(target: Any, ledger: Ledger, *, timeout: float = 30.0) -> list[Cancelled]:
    """Cancel on the server every live record of the (open) ledger and record each outcome;
    ``target`` is the run's provider or bare OpenAI client. What happened to each."""
    from .._providers import OpenAIResponses

    provider: Provider = target if isinstance(target, Provider) else OpenAIResponses(
        target, lean_polls=False)
    sweep = await sweep_live(ledger, {_kind(provider): provider}, timeout=timeout)
    return sweep.done


def _kind(provider: Provider) -> ProviderName:
    """The name of the API a provider talks to (as ``--provider`` spells it)."""
    from .._providers import AnthropicBatches, GeminiBatches, OpenAIBatch

    if isinstance(provider, OpenAIBatch):
        return "openai-batch"
    if isinstance(provider, AnthropicBatches):
        return "anthropic"
    if isinstance(provider, GeminiBatches):
        return "gemini"
    return "openai"


def _open_providers(names: Iterable[ProviderName],
                    args: argparse.Namespace) -> dict[str, Provider] | None:
    """A provider for each API, each with its own key variable; None after saying which key
    is missing (before anything is sent)."""
    import openai

    from .._providers import OpenAIResponses
    from ._formats import FORMATS  # _formats imports this module

    providers: dict[str, Provider] = {}
    options = argparse.Namespace(base_url=args.base_url, model=None)
    for name in names:
        target = FORMATS[name].open(options)
        if target is None:
            return None
        providers[name] = (OpenAIResponses(target, lean_polls=False)
                           if isinstance(target, openai.AsyncOpenAI) else target)
    return providers


async def _close(providers: Mapping[str, Provider]) -> None:
    from ._formats import close

    for provider in providers.values():
        await provider.aclose()
        await close(provider)


def cancel_report(done: Sequence[Cancelled]) -> tuple[list[str], int]:
    """The lines ``cancel`` prints (one per batch, one per response that did not end
    cancelled, a total), and how many jobs were left live."""
    lines: list[str] = []
    by_batch: dict[str, list[Cancelled]] = defaultdict(list)
    left = 0
    for item in done:
        if item.batch_id is not None:
            by_batch[item.batch_id].append(item)
            continue
        if item.status in ("pending", "queued", "in_progress", "unknown"):
            left += 1
            why = item.error or "the server did not confirm the cancel in time"
            lines.append(f"{item.key}  {item.response_id}  still {item.status}: {why}")
        elif item.status != "cancelled":
            lines.append(f"{item.key}  {item.response_id}  {item.status} before the cancel "
                         "arrived (its result is kept)")
    for batch_id, items in by_batch.items():
        counts = Counter(i.status for i in items)
        finished = counts["completed"] + counts["failed"] + counts["incomplete"]
        live = sum(counts[s] for s in ("pending", "queued", "in_progress", "unknown"))
        left += live
        said = (f"batch {batch_id}: {len(items)} jobs; {counts['cancelled']} cancelled on the "
                f"server, {finished} had already finished and keep their results")
        if live:
            reason = next((i.error for i in items if i.error), None)
            said += f", {live} not confirmed ({reason or 'the batch had not ended in time'})"
        lines.append(said)
    stopped = sum(i.status == "cancelled" for i in done)
    unrecorded = sum(not i.recorded and i.status in ("cancelled", "completed", "failed",
                                                      "incomplete") for i in done)
    noun = "live jobs" if by_batch else "live responses"
    total = (f"cancelled {stopped} of {len(done)} {noun}"
             + (f"; {left} still live (run `asyncbg cancel` again)" if left
                else "; none is left live"))
    if unrecorded:
        total += f"; {unrecorded} are held by running workers, which record them"
    lines.append(total)
    return lines, left


async def cancel(args: argparse.Namespace) -> int:
    """``asyncbg cancel --ledger PATH``: cancel every live job recorded there, on its API."""
    ledger = await open_ledger(args.ledger, exclusive=True)
    if ledger is None:
        return 2
    providers: dict[str, Provider] = {}
    try:
        live = [r for r in await live_records(ledger) if r.response_id]
        if not live:
            emit(f"nothing to cancel: no live job in {ledger.location}")
            return 0
        names = sorted({n for r in live if (n := provider_of(r.response_id)) is not None})
        opened = _open_providers(names, args)
        if opened is None:
            return 2
        providers = opened
        sweep = await sweep_live(ledger, providers, timeout=args.timeout)
    except LedgerError as exc:
        say(str(exc))
        return 2
    finally:
        with anyio.CancelScope(shield=True):
            await _close(providers)
            await ledger.close()
    lines, left = cancel_report(sweep.done)
    for line in lines:
        emit(line)
    if sweep.unreachable is not None:
        say(f"{sweep.unreachable}; the cancels that did not get through left their jobs as "
            "the journal had them")
        return 2
    return 1 if left else 0

