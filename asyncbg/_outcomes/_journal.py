"""A ladder as the journal shows it: the user's key and its attempts' keys, folded into one.

Every attempt is a record of its own (``KEY``, ``KEY#2``, ``KEY#2#hedge``...); a view that
shows one line per user key (``asyncbg run``'s output) shows the final attempt's answer under
the user's key, with the attempts listed beside it. A ``KEY#n`` counts as an attempt of
``KEY`` only when ``KEY`` itself is in the journal and ``KEY#n`` is not one of the caller's own
keys (an input line's ``custom_id``), so a user's own key with a ``#`` stays what it is.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._engine._job import decode
from .._ledgers import Record

if TYPE_CHECKING:
    from .._engine._job import Job
    from .._ledgers import Ledger

__all__ = ["LadderRecord", "attempt_of", "attempts_field", "final_record", "final_view"]

_ATTEMPT = re.compile(r"^(?P<key>.+?)(?:#(?P<n>[2-9]|[1-9][0-9]+))?(?P<hedge>#hedge)?$")


@dataclass(frozen=True, slots=True)
class LadderRecord(Record):
    """The final attempt's record under the user's key, with every attempt's record."""

    attempts: tuple[Record, ...] = ()


def final_view(records: Mapping[str, Record],
               own: Container[str] = ()) -> dict[str, Record]:
    """``records`` with each ladder folded under its user's key (the attempts' own keys
    removed); a key without further attempts, and every key in ``own``, is left as it is."""
    chains: dict[str, list[tuple[int, bool, Record]]] = {}
    for key, record in records.items():
        if key in own:
            continue  # the user's own key, whatever it looks like
        m = _ATTEMPT.match(key)
        if m is None or (m["n"] is None and m["hedge"] is None) or m["key"] not in records:
            continue
        chains.setdefault(m["key"], []).append((int(m["n"] or 1), bool(m["hedge"]), record))
    view = dict(records)
    for key, attempts in chains.items():
        attempts.append((1, False, records[key]))
        attempts.sort(key=lambda a: (a[0], a[1]))
        for _, _, record in attempts:
            if record.key != key:
                view.pop(record.key, None)
        view[key] = _fold(key, attempts)
    return view


def attempt_of(key: str) -> str | None:
    """The user's key ``key`` would be an attempt of (``a`` for ``a#2`` or ``a#hedge``), or
    None: an input whose keys include both cannot run a ladder (their records would be one)."""
    m = _ATTEMPT.match(key)
    if m is None or (m["n"] is None and m["hedge"] is None):
        return None
    return m["key"]


def _fold(key: str, attempts: list[tuple[int, bool, Record]]) -> Record:
    last = attempts[-1][0]
    pair = [r for n, _, r in attempts if n == last]
    final = next((r for r in pair if r.status == "completed"), pair[0])
    fields = {f.name: getattr(final, f.name) for f in dataclasses.fields(Record)}
    fields["key"] = key
    return LadderRecord(**fields, attempts=tuple(r for _, _, r in attempts))


async def final_record(ledger: Ledger, job: Job) -> Record | None:
    """The record that shows ``job``'s outcome: its final attempt's, under its own key."""
    attempts = job.attempts
    if len(attempts) == 1 and attempts[0].key == job.key:
        return await ledger.get(job.key)
    records = {a.key: r for a in attempts if (r := await ledger.get(a.key)) is not None}
    return final_view(records).get(job.key)


def attempts_field(record: Record) -> dict[str, Any]:
    """For an output line: ``{"attempts": [...]}`` naming each attempt of a folded record
    (its key, status, response id and token usage), or nothing for a single attempt."""
    if not isinstance(record, LadderRecord):
        return {}
    return {"attempts": [{"custom_id": r.key, "status": r.status, "response_id": r.response_id,
                          "usage": _usage(r)} for r in record.attempts]}


def _usage(record: Record) -> Any:
    if record.body is None:
        return None
    try:
        return decode(record.body).get("usage")
    except ValueError:
        return None
