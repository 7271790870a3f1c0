"""What ``asyncbg run`` tells its user at the end: failed lines, the summary, how to go on."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import Job
from .._ledgers import Record
from ._input import BatchRequest
from ._output import body_of, tokens_of
from ._progress import counts_text, rows

__all__ = ["completed", "connection_failure", "interrupt_message", "name_failures", "summary"]


def completed(record: Record | None) -> bool:
    return record is not None and record.state == "done" and record.status == "completed"


def name_failures(source: Path, lines: Sequence[BatchRequest],
                  records: Mapping[str, Record], *, unfinished: bool) -> int:
    """``FILE:LINE custom_id: reason`` on stderr for each line that did not complete (and, with
    ``unfinished``, for each that has not finished); returns how many were named."""
    named = 0
    for req in lines:
        record = records.get(req.custom_id)
        if completed(record):
            continue
        if record is not None and record.terminal:
            reason = record.error or f"the response ended {record.status}"
        elif unfinished:
            reason = "not finished"
        else:
            continue
        named += 1
        print(f"{source}:{req.line} {req.custom_id}: {reason}", file=sys.stderr)
    return named


def connection_failure(sent: Sequence[Job]) -> str | None:
    """One line for a run whose every create failed to connect; None otherwise."""
    if not sent or any(job.error_code != "connection_error" for job in sent):
        return None
    message = sent[0].error or ""
    url, _, reason = message.removeprefix("cannot connect to ").partition(": ")
    return f"cannot connect to {url} ({reason or 'connection failed'}); nothing was sent"


def summary(lines: Sequence[BatchRequest], records: Mapping[str, Record], *,
            extra: Sequence[tuple[str, object]]) -> str:
    """The closing block: lines by outcome, then ``extra`` rows."""
    counts: dict[str, int] = {}
    tokens = 0
    for req in lines:
        record = records.get(req.custom_id)
        status = record.status if record is not None and record.terminal else "not finished"
        counts[status] = counts.get(status, 0) + 1
        if record is not None and record.body is not None:
            tokens += tokens_of(body_of(record))["total"]
    return rows([("lines", f"{len(lines)}  ({counts_text(counts) or 'none'})"),
                 ("tokens", f"{tokens:,}"), *extra])


def interrupt_message(lines: Sequence[BatchRequest], records: Mapping[str, Record], *,
                      signal_name: str, journal: Path) -> list[str]:
    """How far an interrupted run got, and the two ways on."""
    states = [records[r.custom_id].state if r.custom_id in records else "new" for r in lines]
    finished = sum(state in ("done", "local") for state in states)
    unsent = states.count("new") + states.count("sending")
    # Every live response in the journal, this input's or not: all are still paid for.
    live = sum(r.state == "live" for r in records.values())
    said = [f"interrupted ({signal_name}): {finished} of {len(lines)} lines finished; "
            f"{live} responses still running on the server; {unsent} lines not sent"]
    if live:
        said += ["run the same command again to collect them (nothing finished is sent again),",
                 f"or cancel them on the server: asyncbg cancel --ledger {journal}"]
    elif unsent:
        said.append("run the same command again to send the rest")
    return said
