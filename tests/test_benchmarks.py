"""A smoke run of the benchmark harness, so that it cannot rot. It checks behaviour, not times."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_harness_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r["machine"]["cores"] >= 1 and r["command"].endswith("--smoke")
    # every comparison ran both sides, and they did the same work
    assert r["poll_cost"]["asyncbg_us"] > 0 and r["poll_cost"]["sdk_us"] > 0
    o = r["overhead"]
    assert o["asyncbg"]["completed"] == o["baseline"]["completed"] == o["jobs"]
    assert o["asyncbg"]["http_calls"] > o["jobs"]
    assert r["throughput"]["asyncbg"]["jobs_per_s"] > 0
    f = r["frontier"]
    for name in ("asyncbg_default", "fixed_10s", "fixed_1s", "fixed_tuned",
                 "fixed_tuned_relative"):
        assert f[name]["polls_per_job"] >= 1
    # the tuned poller really was tuned to asyncbg's p95 delay (bisection, 8 steps)
    assert abs(f["fixed_tuned"]["delay_p95_s"] - f["asyncbg_default"]["delay_p95_s"]) < max(
        0.2 * f["asyncbg_default"]["delay_p95_s"], 1.0)
    assert r["push"]["stream"]["retrieves_per_job"] == 0  # streams never poll
    assert r["push"]["seeds_loop_1s"]["retrieves_per_job"] >= 1  # the baseline ran too
    assert r["push"]["webhook"]["retrieves_per_job"] == 1  # one fetch of the final Response
    s = r["scale"]
    assert s["completed"] == s["jobs"] == s["max_in_flight"]
    assert s["rss_peak_mb"] > 0
    assert "1 CPU per status check" in done.stdout  # the table
