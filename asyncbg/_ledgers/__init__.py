"""Ledgers: where asyncbg records what it sent and what the server said (see :mod:`._base`)."""

from ._base import (
    Claim,
    ClaimOutcome,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    Outcome,
    Record,
    RecordState,
    canonical,
    digest,
    fingerprint,
)
from ._memory import MemoryLedger
from ._open import open_ledger
from ._sqlite import SQLiteLedger

__all__ = [
    "Claim",
    "ClaimOutcome",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "MemoryLedger",
    "Outcome",
    "Record",
    "RecordState",
    "SQLiteLedger",
    "canonical",
    "digest",
    "fingerprint",
    "open_ledger",
]
