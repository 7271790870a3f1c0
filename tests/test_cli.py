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
