"""The PostgreSQL test infrastructure itself: a real server, one fresh database per test."""

from __future__ import annotations

import psycopg
import pytest

from .pg_fixtures import TEMPLATE


def test_real_server_and_own_database(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        version, database = conn.execute(
            "SELECT current_setting('server_version_num')::int, current_database()"
        ).fetchone() or (0, "")
        is_template = conn.execute(
            "SELECT datistemplate FROM pg_database WHERE datname = %s", [TEMPLATE]
        ).fetchone()
    assert version >= 130000
    assert database.startswith("test_")
    assert is_template == (True,)


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_gets_an_isolated_writable_database(pg_dsn: str, run: str) -> None:
    """Whichever of the two runs second would see the other's table if databases were shared."""
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT to_regclass('probe')").fetchone() == (None,)
        conn.execute("CREATE TABLE probe (run text PRIMARY KEY)")
        conn.execute("INSERT INTO probe VALUES (%s)", [run])
        conn.commit()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT run FROM probe").fetchall() == [(run,)]


@pytest.mark.asyncio
async def test_async_round_trip(pg_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        async with conn.cursor() as cur:
            await cur.execute("CREATE TABLE jobs (id text PRIMARY KEY, payload jsonb NOT NULL)")
            await cur.executemany(
                "INSERT INTO jobs VALUES (%s, %s::jsonb)",
                [(f"job-{i}", f'{{"n": {i}}}') for i in range(3)],
            )
        await conn.commit()
        cur = await conn.execute("SELECT id, payload FROM jobs ORDER BY id")
        assert await cur.fetchall() == [(f"job-{i}", {"n": i}) for i in range(3)]
