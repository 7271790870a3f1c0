#!/usr/bin/env python3
"""Fleet figures: 3 workers against 1 on one PostgreSQL ledger, a SIGKILLed worker, ledger cost.

    python benchmarks/fleet.py            # 3,000 jobs (about 2 minutes on 2 cores)
    python benchmarks/fleet.py --quick    # 600 jobs

The fake server runs in its own process (every response takes ``--duration`` seconds) and each
worker in its own process, as ``asyncbg worker`` does; PostgreSQL is $ASYNCBG_TEST_POSTGRES or a
throwaway server (tests/pg_server.py). Each worker reports its own counters when it exits: the
ledger's round trips (every statement sent) and how many of them were lease renewals.

What limits a worker here is its concurrency (slots x job duration), not the CPU: the comparison
gives each worker the same ``--concurrency``, so 3 workers have 3 times the slots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def fake_server(duration: float) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", "fake-server", "--port",
                             str(port), "--median", str(duration)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/_fake/counters", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def counters(base: str, *, reset: bool = False) -> dict[str, Any]:
    if reset:
        urllib.request.urlopen(urllib.request.Request(f"{base}/_fake/reset", method="POST"))
        return {}
    return dict(json.loads(urllib.request.urlopen(f"{base}/_fake/counters").read()))


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    if dsn := os.environ.get("ASYNCBG_TEST_POSTGRES"):
        yield dsn
        return
    from tests.pg_server import throwaway_postgres

    with throwaway_postgres() as dsn:
        yield dsn


def fresh_database(server_dsn: str, name: str) -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    from tests.pg_fixtures import with_database

    return with_database(server_dsn, name)


def submit(dsn: str, n: int, duration: float, tmp: Path) -> None:
    source = tmp / "fleet-input.jsonl"
    with source.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"j{i}", "method": "POST", "url": "/v1/responses",
                                "body": {"model": "gpt-4o-mini", "input": f"job {i}",
                                         "metadata": {"fake_duration": str(duration)}}}) + "\n")
    subprocess.run([sys.executable, "-m", "asyncbg", "submit", str(source), "--ledger", dsn],
                   check=True, stdout=subprocess.DEVNULL)


def start_worker(dsn: str, base: str, concurrency: int, lease: float) -> subprocess.Popen[str]:
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"{base}/v1"}
    return subprocess.Popen([sys.executable, __file__, "--worker", dsn, "--concurrency",
                             str(concurrency), "--lease", str(lease)],
                            env=env, stdout=subprocess.PIPE, text=True)


def rows(dsn: str, query: str, *args: object) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, args).fetchall()


def run_fleet(server_dsn: str, base: str, *, name: str, workers: int, n: int, duration: float,
              concurrency: int, lease: float, tmp: Path, kill_after: float | None = None
              ) -> dict[str, Any]:
    dsn = fresh_database(server_dsn, name)
    submit(dsn, n, duration, tmp)
    counters(base, reset=True)
    started = time.monotonic()
    procs = [start_worker(dsn, base, concurrency, lease) for _ in range(workers)]
    victim: dict[str, Any] = {}
    if kill_after is not None:
        # Mid-run: once the victim holds live jobs, and `kill_after` seconds into them.
        pid = procs[0].pid
        query = ("SELECT key, response_id FROM asyncbg_jobs WHERE owner LIKE %s "
                 "AND state IN ('live', 'sending')")
        while not rows(dsn, query, f"%:{pid}:%"):
            time.sleep(0.05)
        time.sleep(kill_after)
        held = dict(rows(dsn, query, f"%:{pid}:%"))
        procs[0].send_signal(signal.SIGKILL)
        victim = {"killed_at": time.time(), "held": held}
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if out.strip():
            reports.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.monotonic() - started
    c = counters(base)
    records = rows(dsn, "SELECT key, state, status, response_id, resubmits, updated "
                        "FROM asyncbg_jobs")
    polls = sum(c["polls"].values())
    # Jobs finished per second while the fleet ran: from the first worker's start to the last
    # result (the workers' imports, a second each, and their idle exit are left out).
    window = max(r[5] for r in records) - min(r["started"] for r in reports)
    result: dict[str, Any] = {
        "workers": workers, "concurrency": concurrency, "jobs": n, "duration": duration,
        "lease": lease, "elapsed_s": round(elapsed, 2), "run_window_s": round(window, 2),
        "jobs_per_s": round(n / window, 1),
        "creates": c["creates"], "polls": polls, "polls_per_job": round(polls / n, 3),
        "resubmits": sum(r[4] for r in records),
        "completed": sum(r[2] == "completed" for r in records),
        "finished_once": len({r[0] for r in records if r[1] == "done"}) == n,
    }
    round_trips = sum(r["round_trips"] for r in reports)
    renewals = sum(r["renewals"] for r in reports)
    # Lease periods that jobs spent held: each job is live about `duration` seconds.
    periods = n * duration / lease
    result.update(
        round_trips_per_job=round(round_trips / n, 2),
        renewals=renewals,
        renewal_round_trips_per_job_per_lease_period=round(renewals / periods, 3),
    )
    if victim:
        by_key = {r[0]: r for r in records}
        live = {k: rid for k, rid in victim["held"].items() if rid is not None}
        late = [by_key[k][5] - victim["killed_at"] for k in live]
        result["sigkill"] = {
            "victim_live": len(live),
            "victim_sending": len(victim["held"]) - len(live),
            "same_response_ids": all(by_key[k][3] == rid for k, rid in live.items()),
            # A counted resend is a *possible* duplicate: the dead worker may have died after
            # recording "sending" but before its create left. So lines <= creates <= lines +
            # possible duplicates, with equality on the right when every one had left.
            "creates": c["creates"], "lines_plus_possible_duplicates": n + result["resubmits"],
            "victim_live_finished_s_after_kill_max": round(max(late), 2) if late else None,
            # The lease, then the idle poll for work (min(1, lease/4)), then the first poll.
            "bound_s": lease + min(1.0, lease / 4) + 0.5,
        }
    return result


def emit(report: dict[str, Any], path: str | None) -> None:
    """Print ``report`` as JSON, and write it to ``path`` when one is given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)


def worker_main(args: argparse.Namespace) -> None:
    """One worker process: run_worker until idle, then print its counters as JSON."""
    import anyio
    import openai

    from asyncbg._fleet import run_worker
    from asyncbg._ledgers._postgres import PostgresLedger

    class Counted(PostgresLedger):
        __slots__ = ("renewals",)

        async def renew(self, keys: Any, lease: float) -> set[str]:
            self.renewals += 1
            return await super().renew(keys, lease)

    async def main() -> None:
        ledger = Counted(args.worker, lease=args.lease)
        ledger.renewals = 0
        client = openai.AsyncOpenAI(max_retries=0)
        started = time.time()
        try:
            await run_worker(client, ledger, concurrency=args.concurrency, lease=args.lease,
                             exit_when_idle=True, stop=anyio.Event())
        finally:
            await client.close()
        print(json.dumps({"round_trips": ledger.round_trips, "renewals": ledger.renewals,
                          "started": started}), flush=True)

    anyio.run(main)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int)
    p.add_argument("--duration", type=float, default=1.25)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--lease", type=float, default=3.0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", metavar="DSN", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return
    n = args.jobs or (600 if args.quick else 3000)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    out: dict[str, Any] = {}
    with postgres() as server_dsn, fake_server(args.duration) as base:
        common = dict(n=n, duration=args.duration, concurrency=args.concurrency,
                      lease=args.lease, tmp=tmp)
        out["one"] = run_fleet(server_dsn, base, name="bench_fleet_1", workers=1, **common)
        out["three"] = run_fleet(server_dsn, base, name="bench_fleet_3", workers=3, **common)
        long = dict(common, duration=args.duration * 4, n=n // 3)
        out["sigkill"] = run_fleet(server_dsn, base, name="bench_fleet_kill", workers=3,
                                   kill_after=args.duration, **long)
    one, three = out["one"], out["three"]
    out["summary"] = {
        "polls_per_job_ratio": round(three["polls_per_job"] / one["polls_per_job"], 3),
        "jobs_per_s_ratio": round(three["jobs_per_s"] / one["jobs_per_s"], 2),
        "cpus": os.cpu_count(),
    }
    emit(out, args.json)


if __name__ == "__main__":
    main()
