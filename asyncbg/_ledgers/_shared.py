"""Shared ledgers: one ledger, many processes, each key run by one lease holder at a time.

A :class:`SharedLedger` is a :class:`~asyncbg.Ledger` that several processes (fleet workers,
replicas of a service) use at once. Each non-terminal key has at most one *owner*, whose *lease*
runs until ``lease_until``; the owner renews its leases in batches (:func:`keep_leases`), and
when it dies they run out and another process takes the key over. Every takeover bumps the key's
*epoch*, and every write (:meth:`~asyncbg.Ledger.sending`, :meth:`~asyncbg.Ledger.record`) is
checked against the owner and the epoch it was taken with: a process whose lease was taken over
gets :class:`LeaseLost` and writes nothing, so it can neither record a result nor go on as if the
key were its own.

A create leaves only while a safety margin of its lease is left (by the sender's own monotonic
clock), and its ``sending`` record carries the epoch it was sent at. A key whose lease ran out
while its holder's create may be in flight (``sending`` at the holder's epoch) is taken over one
safety margin later than others (:func:`safety_margin`): until then the holder's writes still
match, so a create that left just before the lease ran out has had its answer recorded, or is
known lost, before anyone creates the key again.

:meth:`~asyncbg.Ledger.claim` takes the lease too: a key that another live owner holds comes
back as :attr:`~asyncbg.ClaimOutcome.FOLLOW` (the caller follows the record); a key whose lease
ran out is taken over (epoch + 1) and claimed by the usual rules.

Implementations: :class:`~asyncbg._ledgers._postgres.PostgresLedger` (many machines) and
:class:`~asyncbg._ledgers._sqlite_shared.SharedSQLiteLedger` (processes on one machine).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, runtime_checkable

import anyio

from .. import _log
from .._errors import JournalMismatchError
from ._base import ClaimOutcome, Ledger, LedgerError, Record, RecordState
from ._rescue import Adoption, Rescue
from ._rules import claim_outcome

__all__ = [
    "DEFAULT_LEASE",
    "OPEN_STATES",
    "EnqueueMismatch",
    "Item",
    "LeaseLost",
    "SharedLedger",
    "WorkerInfo",
    "keep_leases",
    "new_owner",
    "safety_margin",
    "shared_claim_outcome",
]

#: Seconds a lease lasts unless told otherwise: a dead owner's keys are taken over after this.
DEFAULT_LEASE = 30.0
#: The shortest lease a fleet worker takes: a create leaves with a third of it left at least.
MIN_LEASE = 1.0
#: The states a lease matters for: the job is not finished.
OPEN_STATES: tuple[RecordState, ...] = ("new", "sending", "live")

#: One job to enqueue: ``(key, digest, request)``, as :meth:`~asyncbg.Ledger.claim` takes them.
Item = tuple[str, str, bytes]


class LeaseLost(LedgerError):
    """This process no longer holds the key's lease: another process took it over.

    Nothing was written. The job is someone else's now: stop running it here, without any
    request to the server.
    """


class EnqueueMismatch(JournalMismatchError):
    """:meth:`SharedLedger.enqueue` found ``key`` already there with another request; nothing
    was enqueued."""

    def __init__(self, key: str, location: str) -> None:
        super().__init__(f"key {key!r} is already in the ledger {location} with a different "
                         "request; nothing was enqueued")
        self.key = key


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A process that renewed its leases within its lease period (one that is alive)."""

    owner: str
    host: str
    pid: int
    #: When it first renewed, and when it last did (seconds since the epoch, the ledger's clock).
    started: float
    seen: float
    lease: float
    #: How many unfinished keys it holds a running lease on.
    held: int


@runtime_checkable
class SharedLedger(Ledger, Protocol):
    """A :class:`~asyncbg.Ledger` that many processes share (see the module docstring)."""

    #: Seconds a lease taken by :meth:`claim` lasts, and the renewal period (``lease / 3``) of
    #: :func:`keep_leases`.
    lease: float

    @property
    def owner(self) -> str:
        """This ledger's identity as a lease holder: ``host:pid:random``, unique per instance."""
        ...

    def held(self) -> dict[str, int]:
        """The keys whose lease this instance holds, each with the epoch it took it at."""
        ...

    def epoch_of(self, key: str) -> int | None:
        """The epoch this instance holds ``key``'s lease at (None: it does not hold it)."""
        ...

    def abandon(self) -> None:
        """Let go of every lease here without writing anything (the database is away): the
        leases run out on their own, and closing says no goodbye that would wait for it."""
        ...

    async def enqueue(self, items: Iterable[Item]) -> int:
        """Add waiting jobs (state ``new``, no owner); returns how many keys were new.

        Idempotent: a key already there with the same digest is left as it is. All or nothing:
        a key already there with another digest raises :class:`EnqueueMismatch` (a
        :class:`~asyncbg.JournalMismatchError`) naming it, and nothing is added.
        """
        ...

    async def acquire(self, limit: int, lease: float, *, live_only: bool = False
                      ) -> list[Record]:
        """Take the leases of up to ``limit`` unfinished keys nobody holds (waiting ones, and
        ones whose lease ran out), oldest first, skipping rows other processes are taking at
        the same moment; each gets this owner, ``lease`` seconds and a new epoch.

        ``live_only``: only responses the server already runs (a dead owner's), which need
        polling rather than a slot for their create."""
        ...

    async def renew(self, keys: Collection[str], lease: float) -> set[str]:
        """Extend the leases on ``keys`` to ``lease`` seconds from now, in one batch, and say
        this process is alive; returns the keys whose lease was lost (they are forgotten)."""
        ...

    async def release(self, keys: Collection[str]) -> None:
        """Hand the leases on ``keys`` back at once, for another process to take now."""
        ...

    async def requeue(self, keys: Collection[str], *,
                      codes: Collection[str] | None = None) -> None:
        """Put ``keys`` that this process ended locally (state ``local``: nothing was paid
        for, e.g. the server could not be reached) back to waiting, for any process to run;
        with ``codes``, only those whose ``error_code`` is one of them (the ledger decides:
        what a write cut short by an exit left there is unknown to the caller)."""
        ...

    async def requeue_unpaid(self, *, code: str | None = None) -> int:
        """Put every key that ended without a paid response (state ``local``, no response id),
        whoever ended it, back to waiting; only those whose ``error_code`` is ``code`` when it
        is given. Returns how many (an operator's ``asyncbg retry``)."""
        ...

    async def workers(self) -> list[WorkerInfo]:
        """The processes alive: those that renewed within their lease period."""
        ...

    async def unfinished(self) -> int:
        """How many keys are waiting, being sent or live, whoever holds them."""
        ...

    async def wait_for_work(self, timeout: float) -> None:
        """Return when work may have arrived (an enqueue, a release, a requeue announced by
        the database), or after ``timeout`` seconds; never raises for a lost connection."""
        ...

    def rescue(self) -> Rescue:
        """The file where a process on this machine keeps the responses it created and could
        not record in this ledger (see :mod:`._rescue`)."""
        ...

    async def keep_unrecorded(self, pairs: list[tuple[str, str]]) -> Path:
        """Keep ``(key, response id)`` pairs, with the epochs they were sent at, in
        :meth:`rescue`'s file; its path. Raises :class:`~asyncbg.LedgerError`."""
        ...

    async def adopt_kept(self, unkept: Sequence[tuple[str, str]] = ()) -> Adoption:
        """Record the responses kept in :meth:`rescue`'s file by the fenced rule of
        :mod:`._rescue`, and remove their lines; with them ``unkept``, this process's own
        ``(key, response id)`` that its file could not take. Raises
        :class:`~asyncbg.LedgerError`."""
        ...


def safety_margin(lease: float) -> float:
    """How much of a lease a create needs left to leave (the worker's fence, by its own clock),
    and how long past a lease's end a takeover of a key whose create may be in flight waits:
    one renewal period, a third of the lease. Between the two, a create that left has had
    two margins for its answer to be recorded by the process that sent it."""
    return lease / 3


def new_owner() -> str:
    """A fresh lease-holder identity: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def shared_claim_outcome(
    state: RecordState, stored_digest: str, digest: str, *, held_elsewhere: bool
) -> ClaimOutcome:
    """What a claim finds in a shared ledger: the usual rules, unless another live owner
    holds an unfinished key, which is followed (or a mismatch, for another request)."""
    if held_elsewhere and state in OPEN_STATES:
        return ClaimOutcome.MISMATCH if stored_digest != digest else ClaimOutcome.FOLLOW
    return claim_outcome(state, stored_digest, digest)


async def keep_leases(
    ledger: SharedLedger, on_lost: Callable[[str], object],
    on_renewed: Callable[[Collection[str], float], object] | None = None,
) -> NoReturn:
    """Renew every lease ``ledger`` holds every ``ledger.lease / 3`` seconds, in one batch.

    The first renewal happens at once, so that the process shows up among the workers. A key
    whose lease was lost goes to ``on_lost`` (stop running it here); the keys renewed go to
    ``on_renewed`` with the monotonic time the renewal was sent (their lease runs from then, by
    this process's own clock). A failed renewal is retried at the next period: the leases then
    run out only if it keeps failing. The first failure of a run of them is a warning, the
    others (a database down for minutes) debug events; the renewal that works again after them
    is an info event.
    """
    failed = 0
    while True:
        keys = list(ledger.held())
        sent_at = anyio.current_time()
        try:
            lost = await ledger.renew(keys, ledger.lease)
        except LedgerError as exc:
            failed += 1
            say = _log.warning if failed == 1 else _log.debug
            say("ledger.renew_failed", ledger=ledger.location, error=str(exc),
                action=f"retried every {ledger.lease / 3:g} s; the leases run out "
                       f"{ledger.lease:g} s after the last renewal")
        else:
            if failed:
                _log.info("ledger.renewed", ledger=ledger.location, after_failures=failed)
                failed = 0
            if on_renewed is not None:
                on_renewed([key for key in keys if key not in lost], sent_at)
            for key in sorted(lost):
                _log.warning("job.lease_lost", key=key, owner=ledger.owner,
                             reason="another process took the lease over")
                on_lost(key)
        await anyio.sleep(ledger.lease / 3)
