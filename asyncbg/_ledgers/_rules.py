"""The claim and record rules of :mod:`._base`, in one place for every ledger to share."""

from __future__ import annotations

from .._status import JobStatus
from ._base import ClaimOutcome, Outcome, RecordState

__all__ = ["claim_outcome", "state_after", "unclaimed"]


def claim_outcome(state: RecordState, stored_digest: str, digest: str) -> ClaimOutcome:
    """What a claim of a key already recorded as ``state``/``stored_digest`` finds.

    ``new`` and ``local`` records were never paid for, so any request may take them over.
    """
    if state in ("new", "local"):
        return ClaimOutcome.NEW
    if stored_digest != digest:
        return ClaimOutcome.MISMATCH
    if state == "sending":
        return ClaimOutcome.RESEND
    if state == "live":
        return ClaimOutcome.RESUME
    return ClaimOutcome.DONE


def state_after(outcome: Outcome) -> RecordState:
    """The state :meth:`Ledger.record` moves a key to (see :class:`Outcome`)."""
    try:
        terminal = JobStatus(outcome.status).terminal
    except ValueError:
        raise ValueError(
            f"Outcome.status must be a JobStatus value, not {outcome.status!r}"
        ) from None
    if not terminal:
        return "live"
    return "done" if outcome.response_id is not None else "local"


def unclaimed(key: str, location: str) -> KeyError:
    """The error for writing to a key that was never claimed: a bug in the caller."""
    return KeyError(f"key {key!r} was never claimed in the ledger {location}")
