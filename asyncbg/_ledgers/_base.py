"""The Ledger seam: where asyncbg records what it sent and what the server said.

A ledger is the truth about a set of jobs; every file asyncbg writes (the ``asyncbg run`` output,
``asyncbg results``) is a view of it. Implementations: :class:`MemoryLedger` (a process's own
manager, no journal), :class:`SQLiteLedger` (one file; the ``journal=`` of today) and, later, a
PostgreSQL ledger shared by several worker processes.

Write order, kept by every implementation, so that a process killed at any instant never loses a
response it paid for:

1. :meth:`Ledger.claim` registers the key (state ``new``) before anything is sent;
2. :meth:`Ledger.sending` commits state ``sending`` just before a create leaves;
3. :meth:`Ledger.record` commits the create's answer (the response id, state ``live``) before
   anything else happens, every status change as it is seen, and the final body the moment a
   terminal status is seen, *before* the job is reported done.

The one window that cannot be closed lies between 2 and 3: the request has left but its id is
not yet written. A key found in ``sending`` by a later claim comes back as
:attr:`ClaimOutcome.RESEND`: it is sent again, counted in ``resubmits`` and logged as a possible
duplicate.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from .._errors import AsyncbgError
from ._outbox import Notice

__all__ = [
    "Claim",
    "ClaimOutcome",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "Outcome",
    "Record",
    "RecordState",
    "canonical",
    "digest",
    "fingerprint",
]

#: ``new``: claimed, nothing sent. ``sending``: a create may have left. ``live``: the server
#: accepted it (``response_id`` known). ``done``: terminal, with the server's final body.
#: ``local``: ended without a server response (rejected, never reached the server, not run for
#: the budget, cancelled before it was sent); nothing was paid for, so a rerun sends it again.
RecordState = Literal["new", "sending", "live", "done", "local"]


def canonical(params: Mapping[str, Any]) -> bytes:
    """A request's parameters as canonical JSON: sorted keys, no spaces."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(params: Mapping[str, Any]) -> str:
    """A stable digest of a request: SHA-256 of its canonical JSON (as the journal always had)."""
    return hashlib.sha256(canonical(params)).hexdigest()


def fingerprint(params: Mapping[str, Any]) -> tuple[str, bytes]:
    """``(digest(params), canonical(params))``, what a claim takes, encoding the JSON once."""
    text = canonical(params)
    return hashlib.sha256(text).hexdigest(), text


class LedgerError(AsyncbgError):
    """A ledger cannot be used: corrupt, locked by another run, unwritable, or too new.

    The message names the ledger and says what to do. Raised by a manager that had to stop,
    ``unrecorded`` lists the responses the server created but the ledger never took, as
    ``(key, response_id)``: they are left running (paid for), and an SQLite journal keeps
    them in ``JOURNAL.unrecorded``, where its next open records them.
    """

    unrecorded: Sequence[tuple[str, str]] = ()


class LedgerUnavailable(LedgerError):
    """An operational failure of a ledger that is otherwise fine: the database is down or did
    not answer in time, the connection dropped, the file is locked by another program, the disk
    is full. Nothing was written; the same call may succeed later.

    The engine never turns this into a job's outcome: it keeps the job as the server says it is
    and retries the write with a backoff (see ``ledger_patience``).
    """


@dataclass(frozen=True, slots=True)
class Record:
    """What a ledger knows of one key."""

    key: str
    digest: str
    #: The request's parameters as canonical JSON (what a worker sends for this key).
    request: bytes
    state: RecordState
    response_id: str | None
    #: A :class:`~asyncbg.JobStatus` value (``pending`` until the server has answered).
    status: str
    #: The final Response JSON exactly as the server sent it (terminal states only).
    body: bytes | None
    error: str | None
    #: A short machine code for ``error`` (the server's ``error.code``, or asyncbg's own, e.g.
    #: ``request_failed``, ``connection_error``, ``response_lost``, ``budget_exceeded``).
    error_code: str | None
    #: The HTTP status of the answer behind ``body`` or ``error`` (None when none came).
    http_status: int | None
    #: The server's ``x-request-id`` for that answer.
    request_id: str | None
    resubmits: int
    created: float
    updated: float

    @property
    def terminal(self) -> bool:
        return self.state in ("done", "local")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One thing the server said (or asyncbg concluded) about a key, for :meth:`Ledger.record`.

    ``status`` is a :class:`~asyncbg.JobStatus` value; a terminal status with a
    ``response_id`` makes the record ``done``, a terminal one without makes it ``local``, any
    other makes it ``live``.

    ``notification``, on a terminal outcome, is a webhook notification that a ledger keeping an
    outbox (:class:`~asyncbg._ledgers._outbox.Outbox`) writes in the same transaction.
    """

    status: str
    response_id: str | None = None
    body: bytes | None = None
    error: str | None = None
    error_code: str | None = None
    http_status: int | None = None
    request_id: str | None = None
    notification: Notice | None = None


class ClaimOutcome(enum.Enum):
    """What :meth:`Ledger.claim` found."""

    #: Nothing was sent for this key yet (or only a ``local`` failure): create it.
    NEW = "new"
    #: A create may have left without its answer being recorded: create again, and count it.
    RESEND = "resend"
    #: The server accepted it: poll ``record.response_id``; do not create.
    RESUME = "resume"
    #: It is terminal with the server's answer: serve ``record`` without any request.
    DONE = "done"
    #: The key is there with a different request (and something was sent for it).
    MISMATCH = "mismatch"
    #: Shared ledgers only: another live process holds the key's lease and runs it. Do not
    #: create or poll: follow the record until it is terminal, or until that lease runs out and
    #: a later claim takes the key over.
    FOLLOW = "follow"


@dataclass(frozen=True, slots=True)
class Claim:
    outcome: ClaimOutcome
    #: The record after the claim (for NEW/RESEND, the fresh or reset record).
    record: Record


@runtime_checkable
class Ledger(Protocol):
    """Where a manager records its jobs. Every method commits before it returns.

    Shared ledgers (several processes) will add an owner and a lease to :meth:`claim`; the
    single-process ones here have one implicit owner.
    """

    @property
    def location(self) -> str:
        """A human-readable name for messages: a path, or a database URL without password."""
        ...

    async def open(self) -> None:
        """Create or upgrade the schema and take whatever lock the ledger needs.

        Opens nest: a ledger opened twice stays open until the second :meth:`close`.

        Raises :class:`LedgerError` when the ledger is corrupt, locked or unwritable.
        """
        ...

    async def close(self) -> None:
        """Release the lock and the connection; safe to call twice."""
        ...

    async def claim(self, key: str, digest: str, request: bytes) -> Claim:
        """Atomically register ``key`` or report what is already there.

        A key whose record is ``new`` or ``local`` (nothing paid for) is claimed afresh even
        with a different digest: the newer request replaces it. A different digest on any
        other state is :attr:`ClaimOutcome.MISMATCH` and changes nothing.
        """
        ...

    async def sending(self, key: str, *, resubmit: bool) -> None:
        """Commit that a create for ``key`` is about to leave (``resubmit`` counts it)."""
        ...

    async def record(self, key: str, outcome: Outcome) -> None:
        """Commit what the server said about ``key`` (see :class:`Outcome`)."""
        ...

    async def get(self, key: str) -> Record | None:
        """The record of ``key``, if any."""
        ...

    async def records(self) -> list[Record]:
        """Every record, in the order the keys were first claimed."""
        ...

    async def resubmits(self) -> int:
        """How many creates were sent again after a crash in the create window."""
        ...
