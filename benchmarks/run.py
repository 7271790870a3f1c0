#!/usr/bin/env python3
"""The asyncbg benchmark harness. It reports; it does not pass or fail.

    python3 dev.py bench                      # the full run (about 20 minutes on 2 cores)
    python3 dev.py bench --quick              # a smaller run
    python benchmarks/run.py --smoke --json out.json   # seconds; what the test suite runs
    python benchmarks/run.py --only scale,push --repeat 3   # heavy sections again, for spreads

The fake server runs in its own process (uvicorn on 127.0.0.1), so the client CPU measured here
is asyncbg's or the baseline's alone; except for the frontier, which runs in virtual time
against the in-process fake. Every comparison runs both sides in this same run. Sections:
``poll_cost`` (benchmarks/poll_cost.py), ``overhead`` and ``throughput``
(benchmarks/overhead.py), ``frontier`` (benchmarks/frontier.py), ``push``
(benchmarks/push.py), ``scale`` and ``scale_100k`` (benchmarks/scale.py, each a fresh process).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import frontier, overhead, poll_cost, push, scale  # noqa: E402
from benchmarks.common import quiet_logs, server_process, wait_ready  # noqa: E402

SECTIONS = ("poll_cost", "overhead", "throughput", "frontier", "push", "scale", "scale_100k")

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "poll_cost": {"n": 1000, "rounds": 5},
        "overhead": {"n": 2000, "interval": 1.5, "live_polls": 3, "concurrency": 200},
        "throughput": {"n": 2000},
        "frontier": {"n": 500, "seed": 1, "median": 120.0, "longest": 3600.0},
        "push": {"n": 300, "shortest": 1.0, "longest": 6.0},
        # 120 s jobs: creates are paced and share the request slots with polls, so sending
        # 10,000 takes about a minute; every job must still be live when the last is sent.
        "scale": {"n": 10_000, "duration": 120.0, "interval": None},
        # Every job lives long enough that all are live at once after the ~3 minute submit;
        # polled every ~120 s (the longest interval asyncbg allows) the server sees under
        # 1,000 polls/s, which it can answer.
        "scale_100k": {"n": 100_000, "duration": 300.0, "interval": 120.0},
    },
    "quick": {
        "poll_cost": {"n": 500, "rounds": 3},
        "overhead": {"n": 400, "interval": 1.5, "live_polls": 3, "concurrency": 200},
        "throughput": {"n": 500},
        "frontier": {"n": 200, "seed": 1, "median": 120.0, "longest": 3600.0},
        "push": {"n": 100, "shortest": 1.0, "longest": 6.0},
        "scale": {"n": 2_000, "duration": 15.0, "interval": None},
        "scale_100k": {"n": 20_000, "duration": 60.0, "interval": 30.0},
    },
    "smoke": {
        "poll_cost": {"n": 10, "rounds": 2},
        "overhead": {"n": 10, "interval": 0.3, "live_polls": 1, "concurrency": 10},
        "throughput": {"n": 20},
        "frontier": {"n": 8, "seed": 1, "median": 5.0, "longest": 20.0},
        "push": {"n": 8, "shortest": 0.1, "longest": 0.4},
        "scale": {"n": 50, "duration": 0.7, "interval": None},
        "scale_100k": {"n": 100, "duration": 0.9, "interval": 0.3},
    },
}

# The figures whose spread across repeats is reported: (section, label, path into the result).
SPREAD = (
    ("poll_cost", "check/SDK", ("ratio",)),
    ("overhead", "CPU ratio", ("cpu_ratio",)),
    ("overhead", "per-call ratio", ("per_call_ratio",)),
    ("throughput", "ratio", ("ratio",)),
    ("push", "stream p95 ms", ("stream", "delay_p95_ms")),
    ("push", "webhook p95 ms", ("webhook", "delay_p95_ms")),
    ("scale", "lag p99 ms", ("loop_lag_p99_ms",)),
    ("scale", "RSS peak MB", ("rss_peak_mb",)),
    ("scale_100k", "lag p99 ms", ("loop_lag_p99_ms",)),
    ("scale_100k", "RSS peak MB", ("rss_peak_mb",)),
)


#: Sections that share one fake server process (started once per run, reset between runs).
SHARED_SERVER = ("poll_cost", "overhead", "throughput")


def run_section(name: str, size: dict[str, Any], smoke: bool, base_url: str | None = None,
                push_server: tuple[str, socket.socket] | None = None) -> dict[str, Any]:
    p = size[name]
    if name in SHARED_SERVER:
        assert base_url is not None
        if name == "poll_cost":
            return anyio.run(poll_cost.measure, base_url, p["n"], p["rounds"])
        if name == "overhead":
            return anyio.run(functools.partial(
                overhead.overhead, base_url, p["n"], interval=p["interval"],
                live_polls=p["live_polls"], concurrency=p["concurrency"]))
        return anyio.run(overhead.throughput, base_url, p["n"])
    if name == "frontier":
        return frontier.frontier(p["n"], p["seed"], median=p["median"], longest=p["longest"])
    if name == "push":
        return anyio.run(functools.partial(push.push, p["n"], shortest=p["shortest"],
                                           longest=p["longest"], server=push_server,
                                           seeds_interval=0.2 if smoke else 1.0))
    return scale.scale(p["n"], p["duration"], p["interval"])


def _shared_scale(names: list[str], size: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    with server_process(wait=False) as base_url:
        for name in names:
            start = time.monotonic()
            result = scale.scale(size[name]["n"], size[name]["duration"], size[name]["interval"],
                                 base_url=base_url)
            result["section_wall_s"] = round(time.monotonic() - start, 1)
            out.append((name, result))
    return out


def _dig(result: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        result = result[key]
    return result


def spreads(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, label, path in SPREAD:
        values = [_dig(r, path) for r in runs.get(section, [])]
        if len(values) > 1:
            out[f"{section}: {label}"] = {"values": values, "min": min(values),
                                          "median": statistics.median(values),
                                          "max": max(values)}
    return out


def table(r: dict[str, Any]) -> str:
    rows = [("measure", "asyncbg", "baseline", "ratio", "goal")]
    if "poll_cost" in r:
        p = r["poll_cost"]
        rows.append(("1 CPU per status check", f"{p['asyncbg_us']} us",
                     f"{p['sdk_us']} us (retrieve)", str(p["ratio"]), p["goal"]))
        us = p["us_per_check"]
        rows.append(("  layers", f"lean GET+json {us['lean_get+json']} us",
                     f"httpx2 GET+json {us['httpx2_get+json']} us", "", ""))
    if "overhead" in r:
        o = r["overhead"]
        a, b = o["asyncbg"], o["baseline"]
        rows.append((f"2 CPU for {o['jobs']} jobs",
                     f"{a['cpu_s']} s ({a['http_calls']} calls, {a['cpu_us_per_call']} us/call)",
                     f"{b['cpu_s']} s ({b['http_calls']} calls, {b['cpu_us_per_call']} us/call)",
                     f"{o['cpu_ratio']} ({o['per_call_ratio']}/call)", o["goal"]))
    for name in ("scale", "scale_100k"):
        if name in r:
            s = r[name]
            rows.append((f"3 scale, {s['jobs']} jobs ({s['max_in_flight']} live at once)",
                         f"RSS peak {s['rss_peak_mb']} MB ({s['rss_per_job_kb']} KB/job); "
                         f"lag p99 {s['loop_lag_p99_ms']} ms, max {s['loop_lag_max_ms']} ms; "
                         f"{s['polls_per_s']} polls/s", f"polls {s['poll_policy']}", "",
                         "<= 150 MB, <= 50 ms" if name == "scale" else "runs"))
    if "frontier" in r:
        f = r["frontier"]
        ratios = {"fixed_tuned": (str(f["polls_ratio_vs_tuned"]), "<=0.333"),
                  "fixed_tuned_relative": (str(f["polls_ratio_vs_tuned_relative"]), "")}
        for name in ("asyncbg_default", "fixed_10s", "fixed_1s", "fixed_tuned",
                     "fixed_tuned_relative"):
            v = f[name]
            every = f" (every {v['interval_s']} s)" if "interval_s" in v else ""
            rows.append((f"4 frontier {name}", f"{v['polls_per_job']} polls/job{every}",
                         f"delay p50 {v['delay_p50_s']} s p95 {v['delay_p95_s']} s, "
                         f"relative p95 {v['relative_delay_p95']}",
                         *ratios.get(name, ("", ""))))
    if "push" in r:
        pu = r["push"]
        for mode in ("seeds_loop", "poll_default", "webhook", "stream"):
            v = pu[mode]
            every = f" every {v['interval_s']} s" if "interval_s" in v else ""
            rows.append((f"5 push {mode}{every}", f"delay p50 {v['delay_p50_ms']} ms "
                         f"p95 {v['delay_p95_ms']} ms", f"{v['retrieves_per_job']} retrieves/job",
                         "", "p95<=50 ms" if mode in ("webhook", "stream") else ""))
    if "throughput" in r:
        t = r["throughput"]
        rows.append(("6 submission", f"{t['asyncbg']['jobs_per_s']} jobs/s",
                     f"{t['baseline']['jobs_per_s']} jobs/s", str(t["ratio"]), t["goal"]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _revision() -> dict[str, Any]:
    """The commit measured, and whether asyncbg/ had uncommitted changes (read-only git)."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(HERE.parent), *argv], capture_output=True,
                              text=True, check=False)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "asyncbg_dirty": bool(git("status", "--porcelain", "--", "asyncbg"))}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    size_group = p.add_mutually_exclusive_group()
    size_group.add_argument("--quick", action="store_true", help="a smaller, faster run")
    size_group.add_argument("--smoke", action="store_true", help="a tiny run for the test suite")
    p.add_argument("--only", help=f"comma-separated sections (default: all of {SECTIONS})")
    p.add_argument("--repeat", type=int, default=1, help="run each section this many times")
    p.add_argument("--json", default=str(HERE / "results" / "latest.json"),
                   help="where to write the results (default: benchmarks/results/latest.json)")
    args = p.parse_args()
    quiet_logs()
    kind = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[kind]
    chosen = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    argv = " ".join(sys.argv[1:])
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "size": kind,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "command": f"python3 dev.py bench {argv}".rstrip(),
        "load_at_start": _load(), "revision": _revision(), "sections": {},
    }
    began = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {}
    todo = [name for _ in range(args.repeat) for name in chosen]
    later: list[Future[list[tuple[str, dict[str, Any]]]]] = []
    pool = ThreadPoolExecutor(max_workers=1)
    scales: list[str] = []
    if args.smoke:
        # Times are not looked at in a smoke run: the scale sections (fresh client processes,
        # mostly waiting) run beside the rest, one after the other against one server, from
        # the moment the other servers are up.
        scales = [name for name in todo if name.startswith("scale")]
        todo = [name for name in todo if not name.startswith("scale")]
    with contextlib.ExitStack() as stack:
        # Servers start together, and start while the first section runs where they can.
        pushing = (stack.enter_context(push.push_server()) if "push" in todo else None)
        base_url = (stack.enter_context(server_process())
                    if set(todo) & set(SHARED_SERVER) else None)
        if pushing is not None:
            wait_ready(pushing[0])
        if scales:
            later.append(pool.submit(_shared_scale, scales, size))
        for i, name in enumerate(todo, 1):
            print(f"{i}/{len(todo)} {name} at {time.monotonic() - began:.1f} s "
                  f"(load {_load()})", file=sys.stderr)
            start = time.monotonic()
            # A repeat of push gets a fresh server (the pushed one's responses are spent).
            result = run_section(name, size, args.smoke, base_url,
                                 pushing if name == "push" and name not in runs else None)
            result["section_wall_s"] = round(time.monotonic() - start, 1)
            result["load_after"] = _load()
            runs.setdefault(name, []).append(result)
    for future in later:
        for name, result in future.result():
            runs.setdefault(name, []).append(result)
    pool.shutdown()
    print(f"done at {time.monotonic() - began:.1f} s", file=sys.stderr)
    for name, section_runs in runs.items():
        results[name] = section_runs[0]
        if len(section_runs) > 1:
            results["sections"][name] = section_runs
    results["spreads"] = spreads(runs)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    for label, s in results["spreads"].items():
        print(f"spread {label}: {s['values']} (min {s['min']}, median {s['median']}, "
              f"max {s['max']})")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
