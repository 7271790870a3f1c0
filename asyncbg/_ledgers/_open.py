"""open_ledger: what a ``journal=`` argument names, as a :class:`Ledger`."""

from __future__ import annotations

import os
from collections.abc import Callable

from ._base import Ledger, LedgerError
from ._shared import DEFAULT_LEASE, SharedLedger
from ._sqlite import SQLiteLedger
from ._urls import redacted as _redacted
from ._urls import url_like

__all__ = ["open_ledger", "shared_ledger"]


def open_ledger(
    spec: str | os.PathLike[str] | Ledger, *, exclusive: bool = False, pool: bool = True
) -> Ledger:
    """The ledger ``spec`` names, not yet opened (the manager calls ``await ledger.open()``).

    A :class:`Ledger` passes through as it is (its own settings apply, ``exclusive`` is not
    used); a ``postgresql://`` URL names a PostgreSQL ledger; anything else is the path of an
    SQLite journal. ``exclusive=True`` allows one run per journal at a time. ``pool=False``:
    a PostgreSQL ledger makes no connection pool, one connection serves every call (for a
    short-lived reader; see :class:`~._postgres.PostgresLedger`).

    Text that starts like a URL (``postgresql:/user@host``, one slash; ``mysql://...``) but is
    not one asyncbg can use is a :class:`LedgerError`, never taken as a file path.
    """
    if isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        if not url_like(text):
            return SQLiteLedger(spec, exclusive=exclusive)
        scheme, sep, _ = text.partition("://")
        if not sep or not scheme.isascii() or "/" in scheme:
            raise LedgerError(
                f"{_redacted(text)} is not a URL (a URL starts with scheme://, two slashes); "
                "write postgresql://USER:PASSWORD@HOST/DB, or ./NAME for a file of that name"
            )
        factory = _URL_SCHEMES.get(scheme.lower())
        if factory is None:
            raise LedgerError(
                f"{_redacted(text)}: {scheme}:// ledgers are not supported; pass a file path "
                "(an SQLite journal) or a postgresql:// URL"
            )
        return factory(text, exclusive=exclusive, pool=pool)
    if isinstance(spec, Ledger):
        return spec
    raise TypeError(
        f"a ledger is a path, a postgresql:// URL or a Ledger, not {type(spec).__name__}"
    )


def shared_ledger(spec: str | os.PathLike[str], *, lease: float = DEFAULT_LEASE,
                  pool: bool = True) -> SharedLedger:
    """The shared ledger ``spec`` names, not yet opened: a ``postgresql://`` URL, or the path
    of an SQLite journal that processes on this machine share (``pool`` as for
    :func:`open_ledger`)."""
    ledger = open_ledger(spec, pool=pool)
    if isinstance(ledger, SQLiteLedger):
        from ._sqlite_shared import SharedSQLiteLedger

        return SharedSQLiteLedger(ledger.path, lease=lease)
    assert isinstance(ledger, SharedLedger)
    ledger.lease = lease
    return ledger


def _postgres(url: str, *, exclusive: bool, pool: bool) -> Ledger:
    # Imported here: psycopg is an optional dependency (the `postgres` extra).
    try:
        from ._postgres import PostgresLedger
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("psycopg"):
            raise
        raise LedgerError(
            "PostgreSQL ledgers need psycopg: pip install 'asyncbg[postgres]'"
        ) from exc
    return PostgresLedger(url, exclusive=exclusive, pool=pool)


_URL_SCHEMES: dict[str, Callable[..., Ledger]] = {
    "postgresql": _postgres,
    "postgres": _postgres,
}
