#!/usr/bin/env python3
"""The fleet under a random mix of the faults fleets meet, counted per custom_id at the end.

    python benchmarks/fleet_chaos.py                    # PostgreSQL, 600 lines, 12 faults
    python benchmarks/fleet_chaos.py --ledger sqlite --faults 20 --seed 7

Three ``asyncbg worker`` processes (as users start them) share one ledger while the faults come,
one every 0.5 to 2.5 s, each drawn at random: a worker killed (SIGKILL) or stopped (SIGTERM) and
a new one started in its place; a worker frozen (SIGSTOP) past its lease, then woken; every
worker's database connection terminated (``pg_terminate_backend``); PostgreSQL restarted (down
1 to 6 s); an operator's ``asyncbg retry`` and ``asyncbg status`` mid-run. The fake server runs
in this process, so every create and cancel is counted by the ``custom_id`` asyncbg puts in its
metadata.

What must hold, whatever the draw (printed as ``violations``, empty when it all held):
``asyncbg results`` has every line exactly once, each ``completed``; no response was cancelled
(no one asked for a cancel); every line created more than once is counted in the ledger's
possible duplicates (``resubmits``), never paid twice unsaid; no kept id is left in a rescue
file; the workers still running at the end exit 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.fleet import emit, fresh_database  # noqa: E402
from benchmarks.fleet_kill import creates_by_custom_id, fake_in_thread  # noqa: E402

FAULTS = ("kill", "term", "freeze", "terminate", "restart", "retry", "status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", choices=["postgres", "sqlite"], default="postgres")
    p.add_argument("--jobs", type=int, default=600)
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--lease", type=float, default=3.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    seed = random.randrange(2**32) if args.seed is None else args.seed
    rng = random.Random(seed)
    kinds = [f for f in FAULTS if args.ledger == "postgres" or f not in ("terminate", "restart")]
    tmp = Path(tempfile.mkdtemp(prefix="fleet-chaos-"))
    with contextlib.ExitStack() as stack:
        pg = None
        if args.ledger == "postgres":
            from tests.pg_server import restartable_postgres

            pg = stack.enter_context(restartable_postgres())
            spec = fresh_database(pg.dsn, "bench_fleet_chaos")
        else:
            spec = str(tmp / "chaos.db")
        fake, base = stack.enter_context(fake_in_thread(0.5, 2.0))
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": base,
               "XDG_STATE_HOME": str(tmp / "state")}
        source = tmp / "in.jsonl"
        with source.open("w") as f:
            for i in range(args.jobs):
                f.write(json.dumps({"custom_id": f"j{i}", "method": "POST",
                                    "url": "/v1/responses",
                                    "body": {"model": "gpt-4o-mini", "input": f"job {i}"}}) + "\n")
        subprocess.run([sys.executable, "-m", "asyncbg", "submit", str(source), "--ledger",
                        spec], env=env, check=True, stdout=subprocess.DEVNULL)
        logs: list[Path] = []

        def worker() -> subprocess.Popen[bytes]:
            log = tmp / f"worker{len(logs)}.log"
            logs.append(log)
            with log.open("wb") as out:
                return subprocess.Popen(
                    [sys.executable, "-m", "asyncbg", "worker", "--ledger", spec,
                     "--concurrency", str(args.concurrency), "--lease", str(args.lease),
                     "--exit-when-idle"], env=env, stdout=out, stderr=subprocess.STDOUT)

        def command(*argv: str) -> int:
            return subprocess.run([sys.executable, "-m", "asyncbg", *argv, "--ledger", spec],
                                  env=env, capture_output=True, check=False).returncode

        started = time.monotonic()
        workers = [worker() for _ in range(args.workers)]
        ended: list[int] = []  # exit codes of the workers a fault ended
        done_faults: list[dict[str, Any]] = []
        for _ in range(args.faults):
            time.sleep(rng.uniform(0.5, 2.5))
            running = [w for w in workers if w.poll() is None]
            if not running:
                break  # the work is done
            kind = rng.choice(kinds)
            at = round(time.monotonic() - started, 2)
            victim = rng.choice(running)
            if kind in ("kill", "term"):
                victim.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
                ended.append(victim.wait(timeout=120))
                workers[workers.index(victim)] = worker()
            elif kind == "freeze":
                victim.send_signal(signal.SIGSTOP)
                time.sleep(args.lease + 1.0)
                victim.send_signal(signal.SIGCONT)
            elif kind == "terminate":
                import psycopg

                assert pg is not None
                with psycopg.connect(pg.dsn, autocommit=True) as conn:
                    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = 'bench_fleet_chaos' AND pid <> "
                                 "pg_backend_pid()")
            elif kind == "restart":
                assert pg is not None
                pg.stop()
                time.sleep(rng.uniform(1.0, 6.0))
                pg.start()
            elif kind == "retry":
                command("retry")
            else:
                command("status")
            done_faults.append({"at_s": at, "fault": kind})
        codes = [w.wait(timeout=900) for w in workers]
        elapsed = time.monotonic() - started
        out = tmp / "out.jsonl"
        results = subprocess.run([sys.executable, "-m", "asyncbg", "results", "--ledger", spec,
                                  "-o", str(out)], env=env, capture_output=True, text=True,
                                 check=False)
        lines = [json.loads(line) for line in out.read_text().splitlines()] \
            if out.exists() else []
        per_id = collections.Counter(line["custom_id"] for line in lines)
        statuses = collections.Counter(
            (line.get("response") or {}).get("body", {}).get("status", "?")
            if line.get("response") else "error" for line in lines)
        creates = creates_by_custom_id(fake)
        duplicates = sum(n - 1 for n in creates.values() if n > 1)
        counted = _counted(args.ledger, spec)
        rescue = tmp / "state" / "asyncbg" / "unrecorded"
        kept = sum(len(f.read_text().splitlines()) for f in rescue.iterdir()) \
            if rescue.is_dir() else 0
        cancels = fake.counters.cancels
    violations = []
    if results.returncode != 0:
        violations.append(f"asyncbg results exited {results.returncode}: {results.stderr}")
    if sorted(per_id) != sorted(f"j{i}" for i in range(args.jobs)) or set(per_id.values()) != {1}:
        violations.append(f"results: {len(per_id)} lines of {args.jobs}, not each once")
    if set(statuses) != {"completed"}:
        violations.append(f"results: not all completed: {dict(statuses)}")
    if cancels:
        violations.append(f"{cancels} responses cancelled, none asked for")
    if duplicates > counted:
        violations.append(f"{duplicates} lines paid twice, {counted} counted")
    if kept:
        violations.append(f"{kept} ids left in rescue files")
    if any(codes):
        violations.append(f"workers at the end exited {codes}")
    emit({"ledger": args.ledger, "seed": seed, "jobs": args.jobs,
          "elapsed_s": round(elapsed, 1), "faults": done_faults,
          "ended_by_faults": ended, "final_exit_codes": codes,
          "creates": sum(creates.values()), "duplicates": duplicates,
          "counted_possible_duplicates": counted, "cancels": cancels,
          "violations": violations, "logs": str(tmp)}, args.json)
    sys.exit(1 if violations else 0)


def _counted(kind: str, spec: str) -> int:
    """The ledger's count of possible duplicates (creates sent again for a key)."""
    if kind == "postgres":
        import psycopg

        with psycopg.connect(spec, autocommit=True) as conn:
            row = conn.execute("SELECT COALESCE(sum(resubmits), 0) FROM asyncbg_jobs").fetchone()
    else:
        import sqlite3

        with contextlib.closing(sqlite3.connect(spec, timeout=30)) as db:
            row = db.execute("SELECT COALESCE(sum(resubmits), 0) FROM jobs").fetchone()
    return int(row[0]) if row else 0


if __name__ == "__main__":
    main()
