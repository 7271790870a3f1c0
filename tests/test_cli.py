"""The command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asyncbg._cli import main


def test_demo_runs_offline_and_prints_a_summary() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "asyncbg", "demo", "--jobs", "30", "--concurrency", "8",
         "--median", "0.05"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": ""},
    )
    assert out.returncode == 0, out.stderr
    assert "jobs        30" in out.stdout
    for word in ("completed", "polls", "tokens", "wall time", "limit 8"):
        assert word in out.stdout
    assert "at most 8 at once" in out.stdout
    assert "no API key" in out.stderr


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--jobs", "--concurrency", "--median", "--seed", "--log-json"):
        assert option in text


def test_run_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("INPUT.jsonl", "--output", "--concurrency", "--journal", "--base-url",
                   "--log-json", "--log-level", "OPENAI_API_KEY", "Exit status"):
        assert option in text


def test_fake_server_command_serves_the_api(tmp_path: object) -> None:
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", "fake-server", "--port",
                             str(port), "--median", "0.01"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                created = httpx.post(f"http://127.0.0.1:{port}/v1/responses",
                                     json={"model": "m", "input": "hi", "background": True})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "fake-server did not start"
                time.sleep(0.1)
        assert created.status_code == 200 and created.json()["status"] == "queued"
        counters = httpx.get(f"http://127.0.0.1:{port}/_fake/counters").json()
        assert counters["creates"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
