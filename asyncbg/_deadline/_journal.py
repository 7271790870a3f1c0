"""How a deadline run names its jobs in the journal, and reads them back one per line.

A line has one key per way it was sent on: ``<key>@batch``, ``<key>@flex``,
``<key>@background``. A move never rewrites a record: the job on the slower way ends
(cancelled, recorded), and the faster way's job is a new key, claimed after that. So the journal
shows every way a line took, a rerun finds exactly where each line stands (the latest of its
records), and the ledgers' one rule (a key is never created twice) is what keeps a line from
being paid for twice on the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .._ledgers import Record
from .._status import JobStatus
from ._policy import ORDER, Way

__all__ = ["line_records", "not_run", "split_key", "way_key", "way_params"]

#: Error codes of a job that ended without running: its batch was cancelled or expired, or
#: its result never came. Such a line moves on; any other ending is the line's outcome.
NOT_RUN_CODES = frozenset({"cancelled", "batch_cancelled", "batch_expired", "expired",
                           "result_missing"})


def way_key(key: str, way: Way) -> str:
    """The journal key of ``key``'s job on ``way``."""
    return f"{key}@{way.value}"


def split_key(journal_key: str) -> tuple[str, Way] | None:
    """The line key and way of a journal key, or None for a key of no deadline run."""
    key, sep, name = journal_key.rpartition("@")
    if not sep or not key:
        return None
    try:
        return key, Way(name)
    except ValueError:
        return None


def way_params(params: Mapping[str, Any], way: Way) -> dict[str, Any]:
    """The request of a line on ``way``: flex asks for ``service_tier="flex"``; a batch and a
    background response send the line's own request."""
    if way is Way.FLEX:
        return {**params, "service_tier": "flex"}
    return dict(params)


def not_run(status: JobStatus | str, error_code: str | None) -> bool:
    """Whether a job with this ending never ran: cancelled (by a move, or its batch), expired
    or without a result. Completed, failed and incomplete jobs ran, and were paid for."""
    status = JobStatus(status) if isinstance(status, str) else status
    if status is JobStatus.CANCELLED:
        return True
    return status is JobStatus.FAILED and error_code in NOT_RUN_CODES


def latest(records: Iterable[Record]) -> dict[str, tuple[Way, Record]]:
    """Each line's latest record and its way: the one a rerun continues from (a move claims
    the faster way after the slower one ended, so the latest is the newest). A record only
    claimed (``new``: a move's marker, nothing sent) counts only for a line with no other."""
    found: dict[str, tuple[Way, Record]] = {}
    for record in records:
        parts = split_key(record.key)
        if parts is None:
            continue
        key, way = parts
        held = found.get(key)
        if held is None or _rank(record, way) > _rank(held[1], held[0]):
            found[key] = (way, record)
    return found


def _rank(record: Record, way: Way) -> tuple[bool, float, int]:
    return record.state != "new", record.created, ORDER.index(way)


def line_records(records: Iterable[Record]) -> dict[str, Record]:
    """The journal as one record per line, under the line's own key (what ``asyncbg run``
    writes to its output and reports on)."""
    return {key: dataclasses.replace(record, key=key)
            for key, (_way, record) in latest(records).items()}
