"""A job's life in the engine: its stages, the moves allowed between them, and what it was asked.

Every job the scheduler runs has one :class:`Entry`. Its :class:`Stage` says what the engine does
with it next; :data:`MOVES` is the whole table of allowed changes, and :func:`move` is the only
way a stage changes: a move that is not in the table is a bug in asyncbg and raises
:class:`IllegalMove` at once (tests run every path through it).

::

    WAITING ──► CREATING ──► LIVE ──────────► ENDED
       │   │        │  ▲        ▲                ▲
       │   │        ▼  │        │                │
       │   └─────► STREAMING ───┘ (polled instead)│
       │                                          │
       └─────► FOLLOWING ─► CREATING | LIVE ──────┘ (another process's job, until taken over)

    WAITING: queued for one of ``max_concurrency`` slots; nothing sent.
    CREATING: holds a slot; its create is due, parked (pace window, budget, ledger down), or in
        flight. A create retried after a transient error stays here.
    LIVE: the server runs it; it is polled (and cancelled) by its response id.
    STREAMING: read by its stream (created, or resumed) instead of polled.
    FOLLOWING: another live process owns the key (a shared ledger): its record is read.
    ENDED: terminal, or detached (left running on the server). The slot is given back.

At most one I/O step of a job is in flight at a time (:attr:`Entry.step`). What arrives meanwhile
(a cancel, a webhook saying the response is done, a budget stop) is an *ask*
(:attr:`Entry.asks`) and is looked at in one place, when the step ends: the scheduler's
reschedule point (``Scheduler._after``), which acts on it at once instead of after the next
interval. A deadline is looked at there too.
"""

from __future__ import annotations

import enum
from typing import Any

import anyio

from .._policies import PollPolicy
from ._job import Job, JobControl

__all__ = ["CANCEL", "FETCH", "MOVES", "Entry", "IllegalMove", "Stage", "move"]


class Stage(enum.IntEnum):
    """Where a job stands in the engine (see the module docstring)."""

    WAITING = 0
    CREATING = 1
    LIVE = 2
    STREAMING = 3
    FOLLOWING = 4
    ENDED = 5


#: Every allowed change of stage; a job ends (ENDED) from any stage but ENDED.
MOVES: dict[Stage, frozenset[Stage]] = {
    Stage.WAITING: frozenset({Stage.CREATING, Stage.LIVE, Stage.FOLLOWING, Stage.ENDED}),
    Stage.CREATING: frozenset({Stage.LIVE, Stage.STREAMING, Stage.ENDED}),
    # A stream the server refuses, or that ends without a terminal event, is polled from here:
    # by its id when it has one (LIVE), else created plainly (CREATING).
    Stage.STREAMING: frozenset({Stage.CREATING, Stage.LIVE, Stage.ENDED}),
    # A batch request whose batch expired unrun (nothing paid): created again, in a new batch.
    Stage.LIVE: frozenset({Stage.CREATING, Stage.ENDED}),
    # The owner's lease ran out: taken over here, to be created (again) or polled.
    Stage.FOLLOWING: frozenset({Stage.CREATING, Stage.LIVE, Stage.ENDED}),
    Stage.ENDED: frozenset(),
}

#: Asks: what was asked of a job while a step of it may be in flight.
CANCEL = 1  #: cancel it (the user, a deadline, the budget): locally if unsent, else on the server
FETCH = 2  #: a push said its response is terminal: fetch the final body at once


class IllegalMove(AssertionError):
    """A stage change that :data:`MOVES` does not allow: a bug in asyncbg."""


class Entry(JobControl):
    """The scheduler's record of one job: what to send, where it stands, what it was asked.

    It is the job's :class:`JobControl` too (one object per job fewer for the cyclic
    collector to walk: 100,000 napping jobs are 100,000 entries)."""

    __slots__ = (
        "asks", "attempt", "cancel_reason", "cancel_sent", "deadline", "gen", "not_found",
        "params", "policy", "resubmit", "scale", "sent", "sent_epoch", "stage", "started", "step",
        "stream", "stream_scope", "unrecorded",
    )

    def __init__(self, job: Job, params: dict[str, Any] | None, policy: PollPolicy,
                 scale: float, deadline: float | None, *, stream: bool = False) -> None:
        super().__init__(job)
        self.params = params
        self.policy = policy
        self.scale = scale
        #: ``anyio.current_time()`` after which the job is cancelled (None: no deadline).
        self.deadline = deadline
        self.stream = stream
        self.stage = Stage.WAITING
        #: The I/O step in flight ("create", "poll", "cancel", "follow", "stream"), or None.
        self.step: str | None = None
        #: The ``seq`` of its current heap item (see ``Scheduler._heap``); older items are stale.
        self.gen = -1
        #: Attempts of the current request that failed (reset by every answer).
        self.attempt = 0
        self.started = 0.0
        #: The next create is sent again after a crash in the create window (counted).
        self.resubmit = False
        #: A create may have left for this job (its ``sending`` record is written).
        self.sent = False
        #: The lease epoch its ``sending`` record was written at (a shared ledger's; None
        #: otherwise): a create answered after the lease was lost is kept with it.
        self.sent_epoch: int | None = None
        self.asks = 0
        self.cancel_reason: tuple[str, str] | None = None
        self.cancel_sent = False
        #: 404s in a row on status checks: one is confirmed by a second check before "lost".
        self.not_found = 0
        #: The id of a response the server created and the ledger has not taken yet.
        self.unrecorded: str | None = None
        self.stream_scope: anyio.CancelScope | None = None

    @property
    def control(self) -> JobControl:
        """The only way the job's state changes (this entry itself; not an attribute pointing
        back here, which would make every job a reference cycle)."""
        return self

    def ask(self, what: int, reason: tuple[str, str] | None = None) -> None:
        """Ask the job for something (``CANCEL``/``FETCH``); looked at when its step ends."""
        self.asks |= what
        if what & CANCEL and self.cancel_reason is None:
            self.cancel_reason = reason

    def asked(self, what: int) -> bool:
        return bool(self.asks & what)

    @property
    def cancel_by_user(self) -> bool:
        """A cancel was asked by the user (not by a deadline or the budget): the only one
        that reaches a response another process owns."""
        return bool(self.asks & CANCEL) and (self.cancel_reason is None
                                             or self.cancel_reason[1] == "cancelled")

    def __repr__(self) -> str:
        return (f"<Entry {self.job.key!r} {self.stage.name} step={self.step} asks={self.asks} "
                f"sent={self.sent}>")


def move(entry: Entry, to: Stage) -> None:
    """Change ``entry``'s stage, as :data:`MOVES` allows; anything else is a bug."""
    if to not in MOVES[entry.stage]:
        raise IllegalMove(f"job {entry.job.key!r}: {entry.stage.name} -> {to.name} is not an "
                          "allowed move")
    entry.stage = to
