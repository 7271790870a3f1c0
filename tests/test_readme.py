"""The README's example is real code: run it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    out = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "first: row-" in out.stdout
    assert out.stdout.count("echo: Question") == 10


def test_readme_quick_start_is_the_two_commands_ci_runs() -> None:
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^python3 dev\.py (\w+)", quick, re.M)
    assert commands == ["demo", "test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 dev.py test" in ci


BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("number", range(2, len(BLOCKS) + 1))
def test_every_python_block_of_the_readme_runs(number: int) -> None:
    # One test per block: each starts an interpreter and imports the SDK, so they spread over
    # the suite's workers, and a slow machine does not push them all past one test's timeout.
    block = BLOCKS[number - 1]
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                         timeout=120, cwd=README.parent)
    assert out.returncode == 0, f"README python block {number}:\n{block}\n{out.stderr}"
    assert "Traceback" not in out.stderr, f"README python block {number}: {out.stderr}"
    if "ledger_patience" in block:
        assert out.stdout.strip() == "completed {'completed': 1} 1", out.stdout
