"""``asyncbg run`` when the journal's disk fills while creates are out: a real full disk (a
small tmpfs), real creates held at the fake's door until the disk is full, a real Ctrl-C.

The responses created then are paid for and cannot be journaled: they are left running, their
ids kept beside the journal (``JOURNAL.unrecorded``, space reserved when the journal opened),
and the rerun, once there is room, re-attaches to them instead of creating them again.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import HttpFake
from .test_batch_cli import request, write_input


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs of the test's own (the suite runs as root: CI and the dev machine do)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        why = f"cannot mount a tmpfs: {mounted.stderr.strip() or mounted.returncode}"
        if _under_ci():
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk``: the journal's next page has nowhere to go."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        block = b"\0" * 4096
        while True:
            try:
                f.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return filler


def _until(condition: Callable[[], bool], what: str, within: float = 60) -> None:
    """Wait for a state the test makes; the bound only stops a broken run from hanging."""
    stop = time.monotonic() + within
    while not condition():
        assert time.monotonic() < stop, f"still waiting for {what}"
        time.sleep(0.01)


def test_creates_answered_after_the_journals_disk_filled_are_kept_and_not_created_again(
    http_fake: HttpFake, tmp_path: Path, small_disk: Path,
) -> None:
    ids = [f"r{i}" for i in range(4)]
    write_input(tmp_path / "in.jsonl", [request(i) for i in ids])
    journal = small_disk / "j.db"
    argv = [sys.executable, "-m", "asyncbg", "run", str(tmp_path / "in.jsonl"),
            "-o", str(tmp_path / "out.jsonl"), "--journal", str(journal)]
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": http_fake.base_url}
    fake, gate = http_fake.server, http_fake.gate

    gate.shut()
    first = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        # Each line's ``sending`` record is journaled before its create leaves.
        _until(lambda: gate.waiting == len(ids), "every create at the fake's door")
        filler = _fill(small_disk)
        gate.open()
        _until(lambda: fake.counters.creates == len(ids), "the fake to create every response")
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err
    assert "Traceback" not in err
    assert fake.counters.cancels == 0  # paid for: left running, not cancelled
    kept = [json.loads(line) for line in
            (small_disk / "j.db.unrecorded").read_bytes().rstrip(b"\0").splitlines()]
    assert kept, err  # the disk was full: the ids went where room was kept for them
    assert {k["key"] for k in kept} <= set(ids)
    assert "still running" in err and "possible duplicate" not in err, err

    filler.unlink()  # room again
    again = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(x["custom_id"] for x in out) == ids
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert fake.counters.creates == len(ids)  # the kept ones were re-attached, not created
    assert not (small_disk / "j.db.unrecorded").exists()
