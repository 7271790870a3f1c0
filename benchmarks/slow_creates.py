#!/usr/bin/env python3
"""Creates that are slow to answer: does ``asyncbg run`` keep more of them in flight as the
pacer's slow start grows its window?

    python benchmarks/slow_creates.py                       # 64 lines, creates of 3 s
    python benchmarks/slow_creates.py --before acf1937      # and another commit, same run
    python benchmarks/slow_creates.py --lines 200 --create-s 1

With no rate-limit headers (none of them here, as on many servers and proxies) the pacer starts
at 4 creates in flight and doubles the window after each window of clean answers, up to
``--concurrency``. Against ``asyncbg fake-server`` with every create's answer delayed by
``--create-s`` seconds (``--inject slow``) and responses of ``--median`` seconds, each side runs
``asyncbg run`` on the same file from scratch, as a user would; reported: the wall time, and the
bound slow start allows (a window of 4, 8, 16, ... creates per ``--create-s``, plus the last
response). ``--before REF`` runs a checkout of REF (git worktree) the same way, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import cli_fake_server  # noqa: E402
from benchmarks.pgqueuer_compare import checkout  # noqa: E402


def slow_start_bound(lines: int, create_s: float, concurrency: int, median: float) -> float:
    """Seconds slow start needs at best: rounds of 4, 8, 16, ... creates (capped at
    ``concurrency``), each round one create's answer long, then the last response's time."""
    rounds, sent, window = 0, 0, 4
    while sent < lines:
        sent += window
        rounds += 1
        window = min(window * 2, concurrency)
    return rounds * create_s + median


def one_run(code: Path | None, base_url: str, lines: int, concurrency: int,
            where: Path) -> dict[str, Any]:
    source = where / "in.jsonl"
    source.write_text("".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
                    "body": {"model": "m", "input": "x"}}) + "\n" for i in range(lines)))
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "x"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "asyncbg", "run", str(source), "-o", str(where / "out.jsonl"),
         "--concurrency", str(concurrency)], env=env, capture_output=True, check=False,
        cwd=code or HERE.parent)  # `-m` puts the working directory first on the path
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"asyncbg run failed (rc {done.returncode}): {done.stderr.decode()}")
    out = (where / "out.jsonl").read_text().splitlines()
    return {"wall_s": round(wall, 2), "lines_out": len(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=64)
    p.add_argument("--create-s", type=float, default=3.0, help="every create's answer delay")
    p.add_argument("--median", type=float, default=0.5, help="each response's time")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--before", metavar="REF", help="also run this commit's asyncbg")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    sides: list[tuple[str, Path | None]] = [("this checkout", None)]
    with contextlib.ExitStack() as stack:
        if args.before:
            sides.append((args.before, stack.enter_context(checkout(args.before))))
        results = []
        slow = f"slow,route=create,times={args.lines},delay={args.create_s}"
        for name, code in sides:
            with (cli_fake_server("--median", str(args.median), "--inject", slow) as url,
                  tempfile.TemporaryDirectory() as where):
                run = one_run(code, url, args.lines, args.concurrency, Path(where))
            results.append({"side": name, **run})
    bound = slow_start_bound(args.lines, args.create_s, args.concurrency, args.median)
    report = {"lines": args.lines, "create_s": args.create_s, "median_s": args.median,
              "concurrency": args.concurrency, "slow_start_bound_s": round(bound, 2),
              "runs": results, "load_after": os.getloadavg()}
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
