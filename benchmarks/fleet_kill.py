#!/usr/bin/env python3
"""kill -9, five times: what a busy worker's death costs in creates, counted per custom_id.

    python benchmarks/fleet_kill.py                 # 1,000 lines, 5 kills, PostgreSQL
    python benchmarks/fleet_kill.py --ledger sqlite # the same on a shared SQLite journal
    python benchmarks/fleet_kill.py --kills 10 --seed 7
    python benchmarks/fleet_kill.py --first-burst   # every kill in a new worker's first burst

Two ``asyncbg worker`` processes (as users start them) share one ledger; one of them is killed
with SIGKILL at a random moment while it is busy (it holds leases of jobs it creates or polls),
and a new one is started in its place at once, five times over; the other worker, and the new
ones, take the dead worker's jobs over when its leases run out. The fake server runs in this
process (uvicorn in a thread), so that every create can be counted by the ``custom_id`` asyncbg
puts in its metadata.

What it reports: creates per ``custom_id`` (a line created twice is a duplicate the takeover
paid for), how many ``sending`` records the dead worker left (its creates in flight at the kill:
the one window a journal admits), and whether ``asyncbg results`` has every line exactly once.
For each duplicate, when its first create reached the server, in ms before the kill it
followed (the time the dead worker had to record the answer, the answer's trip included).
Goal (issue 20): duplicates <= 1 per kill.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.fleet import emit, fresh_database, postgres  # noqa: E402


@contextlib.contextmanager
def fake_in_thread(low: float, high: float, *, nagle: bool = False
                   ) -> Iterator[tuple[Any, str]]:
    """The fake server in this process (its responses readable here), served over HTTP.
    ``nagle``: as served before 2026-12-04, for comparison (see below)."""
    import uvicorn

    from asyncbg.testing import FakeResponsesServer, LatencyModel, asgi_app

    server = FakeResponsesServer(latency=LatencyModel.uniform(low, high), seed=1)
    # IPPROTO_TCP named, so that asyncio sets TCP_NODELAY on the connections it accepts (it
    # checks the socket's proto): with Nagle on, a chunked answer's last piece waited for the
    # client's delayed ACK, 40 ms a create, which a real server does not add.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0 if nagle else socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    web = uvicorn.Server(uvicorn.Config(asgi_app(server), log_level="error", lifespan="off",
                                        timeout_keep_alive=120))
    thread = threading.Thread(target=asyncio.run, args=(web.serve([sock]),), daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        web.should_exit = True
        thread.join(timeout=10)
        sock.close()


def creates_by_custom_id(server: Any) -> collections.Counter[str]:
    return collections.Counter(
        r.metadata.get("asyncbg_custom_id", "?") for r in list(server._responses.values()))


def first_creates_before_kills(server: Any, kills: list[float]) -> list[float | None]:
    """For each line created more than once: how long (ms) before the first kill that
    followed it its first create reached the server (None: no kill between them)."""
    times: dict[str, list[float]] = collections.defaultdict(list)
    for r in list(server._responses.values()):
        times[r.metadata.get("asyncbg_custom_id", "?")].append(r.created)
    leads: list[float | None] = []
    for ts in times.values():
        ts.sort()
        for first, again in itertools.pairwise(ts):
            between = [k for k in kills if first <= k <= again]
            leads.append(round((between[0] - first) * 1000, 1) if between else None)
    return sorted(leads, key=lambda v: -1.0 if v is None else v)


class Store:
    """The ledger, and a look into it the way an operator's SQL would."""

    def __init__(self, kind: str, tmp: Path, server_dsn: str | None) -> None:
        self.kind = kind
        if kind == "postgres":
            assert server_dsn is not None
            self.spec = fresh_database(server_dsn, "bench_fleet_kill")
        else:
            self.spec = str(tmp / "kill.db")

    def rows(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.spec, autocommit=True) as conn:
                return conn.execute(query.replace("?", "%s"), args).fetchall()
        with contextlib.closing(sqlite3.connect(self.spec, timeout=30)) as db:
            return db.execute(query.replace("asyncbg_jobs", "jobs"), args).fetchall()

    def held_by(self, pid: int) -> dict[str, str]:
        """key -> state of the unfinished jobs whose lease the worker ``pid`` holds."""
        return dict(self.rows("SELECT key, state FROM asyncbg_jobs WHERE owner LIKE ? "
                              "AND state IN ('new', 'sending', 'live')", f"%:{pid}:%"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", choices=["postgres", "sqlite"], default="postgres")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--lease", type=float, default=3.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--first-burst", action="store_true",
                   help="kill 0 to lease/2 s after the victim took work (its first burst of "
                        "creates: the hard case) instead of 0 to 2 leases")
    p.add_argument("--kill-within", type=float, metavar="S",
                   help="kill 0 to S seconds after the victim took work (0.3: inside its "
                        "first burst)")
    p.add_argument("--fake-nagle", action="store_true",
                   help="serve the fake as before 2026-12-04: Nagle on, 40 ms more a create")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    seed = random.randrange(2**32) if args.seed is None else args.seed
    rng = random.Random(seed)
    within = (args.kill_within if args.kill_within is not None
              else args.lease / 2 if args.first_burst else 2 * args.lease)
    tmp = Path(tempfile.mkdtemp(prefix="fleet-kill-"))
    with contextlib.ExitStack() as stack:
        server_dsn = stack.enter_context(postgres()) if args.ledger == "postgres" else None
        fake, base = stack.enter_context(fake_in_thread(1.0, 3.0, nagle=args.fake_nagle))
        store = Store(args.ledger, tmp, server_dsn)
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": base}
        source = tmp / "in.jsonl"
        with source.open("w") as f:
            for i in range(args.jobs):
                f.write(json.dumps({"custom_id": f"j{i}", "method": "POST",
                                    "url": "/v1/responses",
                                    "body": {"model": "gpt-4o-mini", "input": f"job {i}"}}) + "\n")
        subprocess.run([sys.executable, "-m", "asyncbg", "submit", str(source), "--ledger",
                        store.spec], env=env, check=True, stdout=subprocess.DEVNULL)
        logs: list[Path] = []

        def worker() -> subprocess.Popen[bytes]:
            log = tmp / f"worker{len(logs)}.log"
            logs.append(log)
            with log.open("wb") as out:
                return subprocess.Popen(
                    [sys.executable, "-m", "asyncbg", "worker", "--ledger", store.spec,
                     "--concurrency", str(args.concurrency), "--lease", str(args.lease),
                     "--exit-when-idle"], env=env, stdout=out, stderr=subprocess.STDOUT)

        started = time.monotonic()
        survivor, victim = worker(), worker()
        kills = []
        for _ in range(args.kills):
            deadline = time.monotonic() + 60
            while not store.held_by(victim.pid):  # busy: it holds jobs
                assert time.monotonic() < deadline, "the victim never took work"
                time.sleep(0.02)
            # A random point of its busy life: its first burst of creates, the takeover of a
            # dead worker's jobs, the creates that follow each completion.
            time.sleep(rng.uniform(0.0, within))
            held = store.held_by(victim.pid)
            before = sum(creates_by_custom_id(fake).values())
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills.append({"at_s": round(time.monotonic() - started, 2), "at": time.monotonic(),
                          "held": len(held),
                          "sending": sum(state == "sending" for state in held.values()),
                          "creates_before": before})
            victim = worker()
        codes = [proc.wait(timeout=600) for proc in (survivor, victim)]  # the living ones
        elapsed = time.monotonic() - started
        out = tmp / "out.jsonl"
        done = subprocess.run([sys.executable, "-m", "asyncbg", "results", "--ledger",
                               store.spec, "-o", str(out)], env=env, capture_output=True,
                              text=True, check=False)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        per_id = collections.Counter(line["custom_id"] for line in lines)
        creates = creates_by_custom_id(fake)
        duplicates = sum(n - 1 for n in creates.values() if n > 1)
        leads = first_creates_before_kills(fake, [k["at"] for k in kills])
        resubmits = store.rows("SELECT COALESCE(sum(resubmits), 0) FROM asyncbg_jobs")[0][0]
    report = {
        "ledger": args.ledger, "seed": seed, "jobs": args.jobs, "kills": len(kills),
        "lease_s": args.lease, "concurrency": args.concurrency, "kill_within_s": within,
        "fake_nagle": args.fake_nagle,
        "elapsed_s": round(elapsed, 1),
        "creates": sum(creates.values()), "lines_created": len(creates),
        "duplicates": duplicates,
        "duplicates_per_kill": round(duplicates / max(len(kills), 1), 2),
        "duplicates_first_create_ms_before_kill": leads,
        "counted_possible_duplicates": int(resubmits),
        "sending_at_kill": [k["sending"] for k in kills],
        "held_at_kill": [k["held"] for k in kills],
        "results_rc": done.returncode,
        "results_lines": len(lines),
        "every_line_exactly_once": (sorted(per_id) == sorted(f"j{i}" for i in range(args.jobs))
                                    and set(per_id.values()) == {1}),
        "worker_exit_codes": codes,
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
