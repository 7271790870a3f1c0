"""open_ledger: what a ``journal=`` argument names, as a :class:`Ledger`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from ._base import Ledger, LedgerError
from ._sqlite import SQLiteLedger
from ._urls import redacted as _redacted

__all__ = ["open_ledger"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: not C:// on Windows


def open_ledger(
    spec: str | os.PathLike[str] | Ledger, *, exclusive: bool = False
) -> Ledger:
    """The ledger ``spec`` names, not yet opened (the manager calls ``await ledger.open()``).

    A :class:`Ledger` passes through as it is (its own settings apply, ``exclusive`` is not
    used); a ``postgresql://`` URL names a PostgreSQL ledger; anything else is the path of an
    SQLite journal. ``exclusive=True`` allows one run per journal at a time.
    """
    if isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        match = _URL.match(text)
        if match is None:
            return SQLiteLedger(spec, exclusive=exclusive)
        scheme = match.group(1).lower()
        factory = _URL_SCHEMES.get(scheme)
        if factory is None:
            raise LedgerError(
                f"{_redacted(text)}: {scheme}:// ledgers are not supported; pass a file path "
                "(an SQLite journal) or a postgresql:// URL"
            )
        return factory(text, exclusive=exclusive)
    if isinstance(spec, Ledger):
        return spec
    raise TypeError(
        f"a ledger is a path, a postgresql:// URL or a Ledger, not {type(spec).__name__}"
    )


def _postgres(url: str, *, exclusive: bool) -> Ledger:
    # Imported here: psycopg is an optional dependency (the `postgres` extra).
    try:
        from ._postgres import PostgresLedger
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("psycopg"):
            raise
        raise LedgerError(
            "PostgreSQL ledgers need psycopg: pip install 'asyncbg[postgres]'"
        ) from exc
    return PostgresLedger(url, exclusive=exclusive)


_URL_SCHEMES: dict[str, Callable[..., Ledger]] = {
    "postgresql": _postgres,
    "postgres": _postgres,
}
