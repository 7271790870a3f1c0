#!/usr/bin/env python3
"""``asyncbg status`` as the user runs it, at a million jobs: the whole command as a subprocess
beside ``python -c pass``, and the command in-process, on each kind of ledger; for the code of
this tree and, with ``--before DIR``, of another tree (a ``git archive`` of an earlier commit)
in the same run, interleaved.

    python benchmarks/status_startup.py --build /tmp/status1m        # build, keep, measure
    python benchmarks/status_startup.py --journal J.db --fleet F.db --postgres postgresql://...
    python benchmarks/status_startup.py --reuse /tmp/status1m --before /tmp/asyncbg-before

The ledgers are those of ``benchmarks/status_scale.py`` (1,000,000 jobs as a long run leaves
them); ``--build DIR`` writes them there (PostgreSQL: a database ``status1m`` on
$ASYNCBG_TEST_POSTGRES, whose DSN is kept in ``DIR/postgres``) and keeps them for later runs
(``--reuse DIR``).

Figures per tree, ledger and round: ``subprocess_ms``, the wall time of ``python -m asyncbg
status --ledger L`` (stdout to a pipe, as a script reads it), and ``python_c_pass_ms`` just
before it (``*_cpu_ms``: their user + system CPU time, which waiting for a core on a busy
machine does not add to); ``inprocess_first_ms``, the command called once (what ``asyncbg
status`` calls after parsing its arguments) in a fresh interpreter that has imported
``asyncbg._cli``: what it imports on the way (psycopg, asyncio), opening the ledger, reading
it, printing; ``inprocess_ms``, the median of 5 more calls in that interpreter; and
``heavy``, the modules of the list below that the command left in ``sys.modules``; medians
of each; for PostgreSQL, ``python -c "import psycopg"`` each round too. Goal
(issue 20):
the subprocess <= 100 ms more than ``python -c pass`` on a quiet machine; in-process <= 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Modules ``asyncbg status`` should not need (tests/test_status_imports.py holds it to that).
HEAVY = ("structlog", "rich", "openai", "httpx", "httpx2", "aiohttp", "psycopg_pool",
         "importlib.metadata")

#: Run in a fresh interpreter with the tree's directory first on sys.path.
_DRIVER = """
import argparse, contextlib, io, json, statistics, sys, time
import anyio
from asyncbg._cli import _ops
args = argparse.Namespace(ledger=sys.argv[1], json=False)
run = getattr(_ops, "run_status", None)  # what `asyncbg status` calls (before: anyio.run)
def once():
    with contextlib.redirect_stdout(io.StringIO()) as out:
        t = time.perf_counter()
        rc = run(args) if run else anyio.run(_ops.status, args)
        took = (time.perf_counter() - t) * 1000
    assert rc == 0 and "jobs" in out.getvalue(), out.getvalue()
    return took
first = once()
heavy = [m for m in sys.argv[2].split(",") if m in sys.modules]
print(json.dumps({"first": first, "median": statistics.median(once() for _ in range(5)),
                  "heavy": heavy}))
"""


def _env(tree: Path) -> dict[str, str]:
    """As a user's shell has it: bytecode cached (an environment with PYTHONDONTWRITEBYTECODE,
    as some containers set, compiles every module of asyncbg again at every start)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _timed(argv: list[str], **kwargs: Any) -> tuple[float, float, bytes]:
    """Wall and CPU (user + system) milliseconds of a child process, and its stdout."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, **kwargs)
    out = child.stdout.read() if child.stdout else b""
    _, status, usage = os.wait4(child.pid, 0)
    wall = (time.perf_counter() - started) * 1000
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0, argv
    return wall, (usage.ru_utime + usage.ru_stime) * 1000, out


def subprocess_ms(tree: Path, spec: str) -> tuple[float, float]:
    wall, cpu, out = _timed([sys.executable, "-m", "asyncbg", "status", "--ledger", spec],
                            cwd=tree, env=_env(tree))
    assert b"jobs" in out
    return wall, cpu


def pass_ms(code: str = "pass") -> tuple[float, float]:
    wall, cpu, _ = _timed([sys.executable, "-c", code])
    return wall, cpu


def inprocess(tree: Path, spec: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _DRIVER, spec, ",".join(HEAVY)],
                          capture_output=True, cwd=tree, env=_env(tree), check=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def build(directory: Path) -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from benchmarks import status_scale as s

    directory.mkdir(parents=True, exist_ok=True)
    specs = {}
    for name in ("journal", "fleet"):
        path = directory / f"{name}.db"
        took = s.build_sqlite(path, 1_000_000, fleet=name == "fleet")
        print(f"built {path} ({took:.1f} s to open first)", file=sys.stderr, flush=True)
        specs[name] = str(path)
    server = os.environ.get("ASYNCBG_TEST_POSTGRES")
    if server:
        import psycopg

        from tests.pg_fixtures import with_database

        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute('DROP DATABASE IF EXISTS "status1m" WITH (FORCE)')
            conn.execute('CREATE DATABASE "status1m"')
        dsn = with_database(server, "status1m")
        took = s.build_postgres(dsn, 1_000_000)
        print(f"built {dsn} ({took:.1f} s to open first)", file=sys.stderr, flush=True)
        (directory / "postgres").write_text(dsn)
        specs["postgres"] = dsn
    return specs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, metavar="DIR", help="build the ledgers there")
    parser.add_argument("--reuse", type=Path, metavar="DIR", help="ledgers --build made")
    parser.add_argument("--journal", help="a run journal (SQLite) of a million jobs")
    parser.add_argument("--fleet", help="a shared SQLite ledger of a million jobs")
    parser.add_argument("--postgres", metavar="DSN", help="a PostgreSQL ledger of a million")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="another source tree to measure in the same run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    specs: dict[str, str] = {}
    if args.build:
        specs = build(args.build)
    elif args.reuse:
        for name in ("journal", "fleet"):
            if (args.reuse / f"{name}.db").exists():
                specs[name] = str(args.reuse / f"{name}.db")
        if (args.reuse / "postgres").exists():
            specs["postgres"] = (args.reuse / "postgres").read_text().strip()
    specs.update({k: v for k in ("journal", "fleet", "postgres")
                  if (v := getattr(args, k)) is not None})
    trees = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    report: dict[str, Any] = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    for name, spec in specs.items():
        for tree in trees.values():
            subprocess_ms(tree, spec)  # warm the page cache and the bytecode once
        for label in trees:
            report.setdefault(name, {})[label] = {
                "subprocess_ms": [], "python_c_pass_ms": [], "subprocess_cpu_ms": [],
                "python_c_pass_cpu_ms": [], "inprocess_first_ms": [], "inprocess_ms": [],
                "heavy": []}
        for _ in range(args.rounds):
            if name == "postgres":  # the floor of any PostgreSQL command: psycopg's import
                wall, cpu = pass_ms("import psycopg")
                report[name].setdefault("import_psycopg_ms", []).append(round(wall, 1))
                report[name].setdefault("import_psycopg_cpu_ms", []).append(round(cpu, 1))
            for label, tree in trees.items():
                r = report[name][label]
                for key, (wall, cpu) in (("python_c_pass", pass_ms()),
                                         ("subprocess", subprocess_ms(tree, spec))):
                    r[f"{key}_ms"].append(round(wall, 1))
                    r[f"{key}_cpu_ms"].append(round(cpu, 1))
                found = inprocess(tree, spec)
                r["inprocess_first_ms"].append(round(found["first"], 1))
                r["inprocess_ms"].append(round(found["median"], 1))
                r["heavy"] = found["heavy"]
        for label in trees:
            r = report[name][label]
            for key in ("subprocess_ms", "python_c_pass_ms", "inprocess_first_ms",
                        "inprocess_ms"):
                r[key.replace("_ms", "_median_ms")] = round(statistics.median(r[key]), 1)
            r["over_python_ms"] = [round(s - p, 1) for s, p in zip(
                r["subprocess_ms"], r["python_c_pass_ms"], strict=True)]
            r["over_python_median_ms"] = round(statistics.median(r["over_python_ms"]), 1)
            r["over_python_cpu_ms"] = [round(s - p, 1) for s, p in zip(
                r["subprocess_cpu_ms"], r["python_c_pass_cpu_ms"], strict=True)]
            r["over_python_cpu_median_ms"] = round(statistics.median(r["over_python_cpu_ms"]), 1)
            print(f"{name} {label}: {json.dumps(r)}", file=sys.stderr, flush=True)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
