"""pytest fixtures for tests against a real PostgreSQL server (loaded by ``tests/conftest.py``).

- ``pg_server_dsn`` (session): the server. ``$ASYNCBG_TEST_POSTGRES`` when set (``dev.py test``
  starts a throwaway server and sets it); otherwise this session starts its own throwaway server
  (``tests/pg_server.py``). When there is none, tests that need it fail under CI (``CI=true``)
  and are skipped, with the reason, elsewhere.
- ``pg_schema_sql`` (session): SQL run once in the template database; empty here, override it
  in a conftest to give every test database a schema.
- ``pg_template`` (session): the template database, ``asyncbg_template``, created once.
- ``pg_dsn`` (function): a fresh database ``test_<uuid>`` cloned from the template (a file copy,
  tens of milliseconds); yields its DSN and drops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

from .pg_server import PostgresError, throwaway_postgres

if TYPE_CHECKING:
    import psycopg

ENV_DSN = "ASYNCBG_TEST_POSTGRES"
#: Set by dev.py when it could not start the server: the reason, so that pytest does not retry.
ENV_ERROR = "ASYNCBG_TEST_POSTGRES_ERROR"
#: One template per pytest-xdist worker (they run side by side on one server).
TEMPLATE = "asyncbg_template_" + os.environ.get("PYTEST_XDIST_WORKER", "main")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (a missing server must not go unnoticed there); skip elsewhere."""
    message = f"PostgreSQL is not available: {reason}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def with_database(dsn: str, database: str) -> str:
    """The same server DSN, pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def _connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    try:
        import psycopg
    except ImportError as exc:
        unavailable(f"psycopg is not installed ({exc}); pip install -e '.[postgres]'")
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    if dsn := os.environ.get(ENV_DSN):
        yield dsn
        return
    if reason := os.environ.get(ENV_ERROR):
        unavailable(reason)
    with contextlib.ExitStack() as stack:
        try:
            dsn = stack.enter_context(throwaway_postgres())
        except PostgresError as exc:
            unavailable(str(exc))
        yield dsn


@pytest.fixture(scope="session")
def pg_schema_sql() -> str:
    """SQL to run in the template database; override in a conftest to add a schema."""
    return ""


def _drop(conn: psycopg.Connection[tuple[object, ...]], name: str) -> None:
    from psycopg import sql

    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_template(pg_server_dsn: str, pg_schema_sql: str) -> Iterator[str]:
    """The name of the template database, created (afresh) once per session."""
    from psycopg import sql

    name = sql.Identifier(TEMPLATE)
    with _connect(pg_server_dsn) as conn:
        # A leftover from an earlier run on a long-lived server: a template cannot be dropped.
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [TEMPLATE]).fetchone():
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(name))
            _drop(conn, TEMPLATE)
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(name))
        if pg_schema_sql.strip():
            with _connect(with_database(pg_server_dsn, TEMPLATE)) as tconn:
                tconn.execute(pg_schema_sql.encode())
        # No connections: CREATE DATABASE ... TEMPLATE needs the template to have none.
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(name)
        )
    yield TEMPLATE
    with _connect(pg_server_dsn) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(name))
        _drop(conn, TEMPLATE)


@pytest.fixture
def pg_dsn(pg_server_dsn: str, pg_template: str) -> Iterator[str]:
    """A fresh, empty (but for the template's schema) database of its own for this test."""
    from psycopg import sql

    name = f"test_{uuid.uuid4().hex}"
    with _connect(pg_server_dsn) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(pg_template)
            )
        )
    try:
        yield with_database(pg_server_dsn, name)
    finally:
        with _connect(pg_server_dsn) as conn:
            _drop(conn, name)


def make_old_schema(conn: psycopg.Connection[tuple[object, ...]], version: int) -> None:
    """The tables as the asyncbg of PostgreSQL schema ``version`` made them (whatever the
    database had of asyncbg's goes first), for tests of the upgrades from it."""
    from asyncbg._ledgers import _pg_queries as q

    conn.execute("DROP TABLE IF EXISTS asyncbg_meta, asyncbg_jobs, asyncbg_workers, "
                 "asyncbg_outbox, asyncbg_counts, asyncbg_tallies CASCADE")
    conn.execute("DROP FUNCTION IF EXISTS asyncbg_count_rows, asyncbg_count_change, "
                 "asyncbg_count_moves, asyncbg_tokens, asyncbg_token_count, "
                 "asyncbg_tally_rows, asyncbg_tally_change, asyncbg_tally_moves")
    with conn.transaction():
        for sql in q.CREATE_V1:
            conn.execute(sql)
        for step in range(1, version):
            for sql in q.UPGRADES[step]:
                conn.execute(sql)
        conn.execute(q.WRITE_SCHEMA_VERSION, (str(version),))
