#!/usr/bin/env python3
"""``asyncbg run`` on a big Batch API file, as a user runs it, against the out-of-process fake.

    python benchmarks/run_big.py                       # 20,000 lines, --concurrency 256
    python benchmarks/run_big.py --lines 2000 --json out.json
    python benchmarks/run_big.py --lines 1000000 --stop-after 120   # memory on a huge file

It starts ``asyncbg fake-server`` and then ``asyncbg run`` as separate processes and reports,
for the run: wall time, the time to the first output line, peak RSS (the run's process alone,
from ``wait4``), and the same for a rerun with nothing left to do. It reports; it does not
pass or fail (the goals are in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
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


def _body(i: int) -> dict[str, Any]:
    return {"model": "gpt-5.2", "input": f"question {i}: " + "x" * 200}


def write_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            body = _body(i)
            f.write(json.dumps({"custom_id": f"row-{i}", "method": "POST",
                                "url": "/v1/responses", "body": body}) + "\n")


async def build_journal(path: Path, n: int) -> None:
    """A journal with every line of :func:`write_input` done, written through the ledger API
    as a run writes it (claim, sending, the final record): for ``--noop-only``."""
    import asyncbg
    from asyncbg._ledgers import canonical, digest

    ledger = asyncbg.SQLiteLedger(path)
    await ledger.open()
    try:
        for i in range(n):
            prepared = {**_body(i), "background": True, "store": True}
            key = f"row-{i}"
            await ledger.claim(key, digest(prepared), canonical(prepared))
            await ledger.sending(key, resubmit=False)
            answer = {"id": f"resp_{i}", "object": "response", "status": "completed",
                      "model": "gpt-5.2", "output": [{"type": "message", "content": [
                          {"type": "output_text", "text": "answer " * 40}]}],
                      "usage": {"input_tokens": 60, "output_tokens": 300,
                                "total_tokens": 360}}
            await ledger.record(key, asyncbg.Outcome(
                status="completed", response_id=f"resp_{i}", body=json.dumps(answer).encode(),
                http_status=200, request_id="req_bench"))
    finally:
        await ledger.close()


def timed_run(argv: list[str], env: dict[str, str], output: Path) -> dict[str, Any]:
    """Run ``asyncbg ARGV`` to its end: wall time, first output line, peak RSS, exit status."""
    size_before = output.stat().st_size if output.exists() else 0
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first: float | None = None
    while proc.poll() is None:
        if first is None and size_before == 0:
            try:
                if output.stat().st_size > 0:
                    first = time.monotonic() - t0
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    wall = time.monotonic() - t0
    # poll() reaped it; its rusage is in RUSAGE_CHILDREN only, which would mix in other
    # children, so read the peak from wait4 instead: run it again the same way if needed.
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    return {"rc": proc.returncode, "wall_s": round(wall, 2),
            "first_line_s": None if first is None else round(first, 2),
            "stderr_tail": err.strip().splitlines()[-3:]}


def peak_rss_run(argv: list[str], env: dict[str, str]) -> tuple[int, float, int]:
    """Run ``asyncbg ARGV`` and return (exit status, wall seconds, peak RSS in MiB)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - t0, usage.ru_maxrss // 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--median", type=float, default=0.5,
                   help="the fake's response time in seconds (default: 0.5)")
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    p.add_argument("--noop-only", action="store_true",
                   help="only the rerun with nothing to do, on a journal written directly "
                        "(seconds instead of minutes; no server is asked anything)")
    p.add_argument("--stop-after", type=float, metavar="SECONDS",
                   help="interrupt the run (Ctrl-C) after this long, sampling its RSS every few "
                        "seconds: memory on a file too big to finish here")
    args = p.parse_args()
    if args.noop_only:
        noop_only(args)
        return
    if args.stop_after:
        stopped(args)
        return

    results: dict[str, Any] = {"lines": args.lines, "concurrency": args.concurrency,
                               "median_s": args.median}
    with cli_fake_server("--median", str(args.median)) as url:
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": url}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            write_input(work / "in.jsonl", args.lines)
            out = work / "out.jsonl"
            argv = ["run", str(work / "in.jsonl"), "-o", str(out),
                    "--concurrency", str(args.concurrency)]
            # The run itself: first line and wall time (polled), then its peak RSS on a second
            # identical run from scratch (wait4 gives this child's own peak).
            results["run"] = timed_run(argv, env, out)
            results["run"]["output_lines"] = sum(1 for _ in out.open())
            for name in ("out.jsonl", "out.jsonl.journal", "out.jsonl.lock",
                         "out.jsonl.journal.lock"):
                (work / name).unlink(missing_ok=True)
            rc, wall, rss = peak_rss_run(argv, env)
            results["run"].update(peak_rss_mib=rss, rss_run_wall_s=round(wall, 2), rss_rc=rc)
            rc, wall, rss = peak_rss_run(argv, env)  # nothing left to do
            results["noop_rerun"] = {"rc": rc, "wall_s": round(wall, 2), "peak_rss_mib": rss}
            help_t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "asyncbg", "--help"], check=True,
                           stdout=subprocess.DEVNULL)
            results["help_s"] = round(time.monotonic() - help_t0, 2)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def stopped(args: argparse.Namespace) -> None:
    """A run on ``--lines`` lines, interrupted after ``--stop-after`` seconds: its RSS over
    time (is it bounded while the file is not?), the lines it wrote, and the interrupt's exit."""
    import signal

    results: dict[str, Any] = {"lines": args.lines, "concurrency": args.concurrency,
                               "median_s": args.median, "stop_after_s": args.stop_after}
    with cli_fake_server("--median", str(args.median)) as url:
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": url}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            t0 = time.monotonic()
            write_input(work / "in.jsonl", args.lines)
            results["input_mib"] = round((work / "in.jsonl").stat().st_size / 2**20)
            results["write_input_s"] = round(time.monotonic() - t0, 1)
            out = work / "out.jsonl"
            proc = subprocess.Popen(
                [sys.executable, "-m", "asyncbg", "run", str(work / "in.jsonl"), "-o", str(out),
                 "--concurrency", str(args.concurrency)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            t0 = time.monotonic()
            samples: list[tuple[float, float | None, int]] = []
            while time.monotonic() - t0 < args.stop_after and proc.poll() is None:
                time.sleep(5)
                written = sum(1 for _ in out.open()) if out.exists() else 0
                samples.append((round(time.monotonic() - t0), _rss_mib(proc.pid), written))
            proc.send_signal(signal.SIGINT)
            _, status, usage = os.wait4(proc.pid, 0)
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
            results.update(
                rc=os.waitstatus_to_exitcode(status), peak_rss_mib=usage.ru_maxrss // 1024,
                samples_s_rss_mib_lines=[(t, None if r is None else round(r), n)
                                         for t, r, n in samples],
                output_lines=sum(1 for _ in out.open()) if out.exists() else 0,
                stderr_tail=err.strip().splitlines()[-4:])
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def noop_only(args: argparse.Namespace) -> None:
    import anyio

    env = {**os.environ, "OPENAI_API_KEY": "sk-bench",
           "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # never asked: nothing is left to send
    results: dict[str, Any] = {"lines": args.lines}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_input(work / "in.jsonl", args.lines)
        anyio.run(build_journal, work / "out.jsonl.journal", args.lines)
        argv = ["run", str(work / "in.jsonl"), "-o", str(work / "out.jsonl")]
        runs = [peak_rss_run(argv, env) for _ in range(3)]  # the first writes the output
        results["noop_rerun"] = [{"rc": rc, "wall_s": round(wall, 2), "peak_rss_mib": rss}
                                 for rc, wall, rss in runs]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
