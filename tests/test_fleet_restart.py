"""Two worker processes on PostgreSQL while PostgreSQL is stopped and started again.

The fleet issue's headline case: a restart (``pg_ctl stop -m fast``, a few seconds down, start)
under busy workers. They wait it out: live responses go on being polled, nothing new is created
that could not be recorded, outcomes seen meanwhile are written once the database is back. Every
line ends once, no worker exits early, and no response is created twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import HttpFake
from .pg_server import PostgresError, RestartableServer, restartable_postgres
from .test_fleet import Fleet, write_input


@pytest.fixture
def restartable() -> Iterator[RestartableServer]:
    try:
        with restartable_postgres() as server:
            yield server
    except PostgresError as exc:  # pragma: no cover - the shared server's fixture says why
        pytest.skip(f"no PostgreSQL server of its own: {exc}")


# Two worker processes, jobs of 4 s and a database restart: about 20 s on an idle machine, over a
# minute on a loaded one (process start-ups and pg_ctl slow down, not the fleet's logic). The
# test bounds its own waits (30 s for the workers to be busy, 120 s for them to finish); the
# suite's 60 s per test would cut it short under load.
@pytest.mark.timeout(240)
def test_busy_workers_ride_out_a_postgresql_restart(
    http_fake: HttpFake, restartable: RestartableServer, tmp_path: Path
) -> None:
    n = 40
    fleet = Fleet(http_fake, restartable.dsn, tmp_path)
    try:
        submitted = fleet.cli("submit", str(write_input(tmp_path / "in.jsonl", n, 4.0)),
                              "--ledger", restartable.dsn)
        assert submitted.returncode == 0, submitted.stderr
        http_fake.hold()  # no response ends until the database is down
        procs = [fleet.worker(concurrency=8, lease=6.0) for _ in range(2)]
        deadline = time.monotonic() + 120
        # Both workers busy: each holds 8 live responses, none of which can end yet.
        while http_fake.server.counters.creates < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http_fake.server.counters.creates == 16
        restartable.stop()
        http_fake.clock.advance(5.0)  # down: the 16 responses finish on the server meanwhile
        time.sleep(3.0)  # and the workers see them end while they cannot record it
        restartable.start()
        http_fake.release()
        assert [fleet.wait(p, timeout=120) for p in procs] == [0, 0]
        results = fleet.results()
    finally:
        fleet.stop_all()
    assert sorted(results) == sorted(f"q{i}" for i in range(n))
    assert {line["response"]["body"]["status"] for line in results.values()} == {"completed"}
    assert http_fake.server.counters.creates == n  # nothing created twice
