"""What ``asyncbg run`` tells its user at the end: failed lines, the summary, how to go on."""

from __future__ import annotations

import sys
from collections.abc import Collection, Container, Mapping, Sequence
from pathlib import Path

from .._ledgers import Record
from ._output import body_of, tokens_of
from ._progress import counts_text, rows

__all__ = ["answered", "completed", "connection_failure", "interrupt_message", "name_failures",
           "summary", "unreached_message"]


def completed(record: Record | None) -> bool:
    return record is not None and record.state == "done" and record.status == "completed"


def name_failures(source: Path, lines: Mapping[str, int],
                  records: Mapping[str, Record], *, unfinished: bool,
                  reasons: Mapping[str, str] | None = None) -> int:
    """``FILE:LINE custom_id: reason`` on stderr for each line that did not complete (and, with
    ``unfinished``, for each that has not finished); returns how many were named.

    ``lines`` maps each input line's custom_id to its line number; ``reasons`` says why a line
    that the journal has as unfinished did not run (the budget, say).
    """
    named = 0
    for custom_id, line in lines.items():
        record = records.get(custom_id)
        if completed(record):
            continue
        if record is not None and record.terminal:
            reason = record.error or f"the response ended {record.status}"
            if record.error_code == "budget_exceeded" and "budget_exceeded" not in reason:
                reason = f"budget_exceeded: {reason}"
        elif reasons and custom_id in reasons:
            reason = reasons[custom_id]
            if "budget" in reason and "budget_exceeded" not in reason:
                reason = f"budget_exceeded: {reason}"
        elif unfinished:
            reason = "not finished"
        else:
            continue
        named += 1
        print(f"{source}:{line} {custom_id}: {reason}", file=sys.stderr)
    return named


def connection_failure(sent: int, refused: int, message: str | None) -> str | None:
    """One line for a run whose every one of ``sent`` creates failed to connect (``refused``
    of them did, the first saying ``message``); None otherwise."""
    if not sent or refused < sent:
        return None
    if not (message or "").startswith("cannot connect to "):  # the server went away mid-way
        return (f"the server could not be reached ({message or 'connection failed'}); every "
                f"one of the {sent} lines sent failed: run the same command again once it "
                "answers (nothing finished is sent again)")
    url, _, reason = (message or "").removeprefix("cannot connect to ").partition(": ")
    return f"cannot connect to {url} ({reason or 'connection failed'}); nothing was sent"


#: Error codes of a line that never reached the server: a rerun sends it again.
UNREACHED = frozenset({"connection_error"})


def answered(lines: Collection[str], records: Mapping[str, Record]) -> int:
    """How many of ``lines`` have their final answer in the output: finished, and not for
    want of a server (those a rerun sends again)."""
    return sum((r := records.get(c)) is not None and r.terminal
               and r.error_code not in UNREACHED for c in lines)


def unreached_message(lines: Collection[str], records: Mapping[str, Record]) -> str | None:
    """One line when some lines could not reach the server: how much of the output is there
    and how to complete it; None when none."""
    unreached = sum((r := records.get(c)) is not None and r.terminal
                    and r.error_code in UNREACHED for c in lines)
    if not unreached:
        return None
    what = "1 line" if unreached == 1 else f"{unreached} lines"
    return (f"{what} could not reach the server: the output has {answered(lines, records)} "
            f"of its {len(lines)} lines; run the same command again once the server answers "
            "to complete it (nothing finished is sent again)")


def summary(lines: Mapping[str, int], records: Mapping[str, Record], *,
            extra: Sequence[tuple[str, object]], not_run: Container[str] = (),
            tokens_by_key: Mapping[str, int] | None = None) -> str:
    """The closing block: lines by outcome, then ``extra`` rows. ``not_run``: lines the
    budget kept from being sent (their records may say nothing of it); ``tokens_by_key``:
    token counts already known, so that a big run does not parse every body again."""
    known = tokens_by_key or {}
    counts: dict[str, int] = {}
    tokens = 0
    for custom_id in lines:
        record = records.get(custom_id)
        status = (record.status if record is not None and record.terminal
                  else "not run (budget)" if custom_id in not_run else "not finished")
        counts[status] = counts.get(status, 0) + 1
        if custom_id in known:
            tokens += known[custom_id]
        elif record is not None and record.body is not None:
            tokens += tokens_of(body_of(record))["total"]
    return rows([("lines", f"{len(lines)}  ({counts_text(counts) or 'none'})"),
                 ("tokens", f"{tokens:,}"), *extra])


def interrupt_message(lines: Mapping[str, int], records: Mapping[str, Record], *,
                      signal_name: str, journal: Path,
                      kept: Collection[str] = (), output: Path | None = None) -> list[str]:
    """How far an interrupted run got, and the two ways on. ``kept``: keys whose response
    id the journal could not take, kept in ``JOURNAL.unrecorded`` (running, and re-attached
    by the next run); ``output``: the run's output file, said how many of its lines it has."""
    states = {c: records[c].state if c in records else "new" for c in lines}
    finished = sum(state in ("done", "local") for state in states.values())
    unsent = sum(state == "new" for state in states.values())
    cut = sum(state == "sending" and c not in kept for c, state in states.items())
    # Every response the journal has an id for and no end, this input's or not: all are still
    # paid for (creates answered while the run stopped included: their ids were recorded).
    live = sum(r.response_id is not None and not r.terminal for r in records.values()) + sum(
        r.response_id is None and r.state == "sending"
        for c in kept if (r := records.get(c)) is not None)
    running = "1 response still running" if live == 1 else f"{live} responses still running"
    said = [f"interrupted ({signal_name}): {finished} of {len(lines)} lines finished; "
            f"{running} on the server; {unsent} line{'' if unsent == 1 else 's'} not sent"]
    if output is not None:
        said[0] += f"; the output has {answered(lines, records)} of its {len(lines)} lines"
    if cut:
        said[0] += (f"; {cut} create{'' if cut == 1 else 's'} cut off before the server "
                    "answered (the server may "
                    "have started them: a rerun sends them again and counts each as a "
                    "possible duplicate)")
    if live:
        said += ["run the same command again to collect them (nothing finished is sent again),",
                 f"or cancel them on the server: asyncbg cancel --ledger {journal}"]
    elif unsent or cut:
        said.append("run the same command again to send the rest")
    return said
