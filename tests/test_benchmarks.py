"""A smoke run of the benchmark harness, so that it cannot rot. It checks behaviour, not times."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_benchmark_harness_smoke_run(tmp_path: Path) -> None:
    # ~13 s of CPU for every section: on a loaded 2-core machine it has taken over a minute.
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r["machine"]["cores"] >= 1 and r["command"].endswith("--smoke --json " + str(out))
    # the status check: asyncbg's public check went over the lean path, and every side ran
    p = r["poll_cost"]
    assert p["lean"] is True
    assert p["asyncbg_us"] > 0 and p["sdk_us"] > 0
    assert set(p["us_per_check"]) == {"sdk_retrieve", "asyncbg_check", "httpx2_get+json",
                                      "lean_get+json", "lean_get+read_status"}
    # the overhead run: both sides finished every job, each with a create and a check at
    # least, and no more calls than the schedule makes (each job is polled live a fixed number
    # of times; on a loaded machine a job can end before its last scheduled poll)
    o = r["overhead"]
    assert o["asyncbg"]["completed"] == o["baseline"]["completed"] == o["jobs"]
    for side in ("asyncbg", "baseline"):
        assert o[side]["creates"] == o["jobs"]
        assert 2 * o["jobs"] <= o[side]["http_calls"] <= 1.1 * o["expected_calls"]
    t = r["throughput"]
    assert t["asyncbg"]["creates"] == t["baseline"]["creates"] == t["jobs"]
    f = r["frontier"]
    for name in ("asyncbg_default", "fixed_10s", "fixed_1s", "fixed_tuned",
                 "fixed_tuned_relative"):
        assert f[name]["polls_per_job"] >= 1
    # the tuned pollers really were tuned to asyncbg's p95 delays (bisection, 8 steps): the final
    # bracket of intervals holds asyncbg's value, and is narrow
    for name, measure in (("fixed_tuned", "delay_p95_s"),
                          ("fixed_tuned_relative", "relative_delay_p95")):
        low, high = f[name]["bracket"]
        assert low <= f["asyncbg_default"][measure] <= high, name
        assert f[name]["bracket_s"][1] - f[name]["bracket_s"][0] < 0.5
    pu = r["push"]
    for mode in ("poll_default", "webhook", "stream"):
        assert pu[mode]["completed"] == pu["jobs"], mode
    assert pu["stream"]["retrieves_per_job"] == 0  # streams never poll
    assert pu["stream"]["stream_requests"] >= pu["jobs"]
    assert pu["webhook"]["retrieves_per_job"] == 1  # one fetch of the final Response
    assert pu["seeds_loop"]["retrieves_per_job"] >= 1  # the baseline ran too
    for name in ("scale", "scale_100k"):
        s = r[name]
        assert s["completed"] == s["jobs"], name
        # All at once, unless a loaded machine let the first ones end before the last started.
        assert 0 < s["max_in_flight"] <= s["jobs"], name
        assert s["rss_peak_mb"] > 0 and s["ticks"] > 0
    assert "1 CPU per status check" in done.stdout  # the table
