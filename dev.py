#!/usr/bin/env python3
"""One entry point for the quick start: it builds `.venv` on first use, then runs the task.

    python3 dev.py demo    # fan out ~200 background responses against the built-in fake server
    python3 dev.py test    # ruff, mypy --strict and the test suite
    python3 dev.py bench   # the benchmark harness (pass --quick for a short run)

Only the standard library is used here, so it runs on a fresh clone with nothing but python3.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".asyncbg-installed"


def ensure_venv() -> None:
    """Create the virtual environment and install the package with its dev extras, once per pyproject."""
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


def run(*argv: str) -> int:
    return subprocess.run([str(PY), *argv], cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    task, *rest = argv or ["help"]
    if task not in {"demo", "test", "bench", "lint"}:
        print(__doc__)
        return 0 if task == "help" else 2
    ensure_venv()
    if task == "demo":
        return run("-m", "asyncbg", "demo", *rest)
    if task == "bench":
        return run("benchmarks/run.py", *rest)
    paths = [p for p in ("asyncbg", "tests", "benchmarks") if (ROOT / p).is_dir()]
    lint = run("-m", "ruff", "check", *paths) or run(
        "-m", "mypy", "--strict", "asyncbg"
    )
    if task == "lint" or lint:
        return lint
    return run("-m", "pytest", *rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
