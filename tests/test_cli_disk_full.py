"""``asyncbg run`` when the journal's disk fills while creates are out: a real full disk (a
small tmpfs), real creates held at the fake's door until the disk is full, a real Ctrl-C.

The responses created then are paid for and cannot be journaled: they are left running, their
ids kept beside the journal (``JOURNAL.unrecorded``, space reserved when the journal opened),
and the rerun, once there is room, re-attaches to them instead of creating them again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asyncbg.testing import LatencyModel

from .conftest import HttpFake
from .io_faults import GRACE_ENV, command
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


def _answered_on_a_full_disk(http_fake: HttpFake, disk: Path, creates: int) -> Path:
    """With ``creates`` creates held at the fake's door (their ``sending`` records journaled),
    fill ``disk``, then let them through and wait for the server to make every response:
    answers the journal has no room for. The filler, to unlink for room again."""
    _until(lambda: http_fake.gate.waiting == creates, "every create at the fake's door")
    filler = _fill(disk)
    http_fake.gate.open()
    _until(lambda: http_fake.server.counters.creates == creates,
           "the fake to create every response")
    return filler


def _kept_keys(rescue: Path) -> set[str]:
    return {json.loads(line)["key"] for line in rescue.read_bytes().rstrip(b"\0").splitlines()}


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
        filler = _answered_on_a_full_disk(http_fake, small_disk, len(ids))
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


def test_ctrl_c_says_it_waits_for_the_journal_and_a_second_one_leaves_at_once(
    http_fake: HttpFake, tmp_path: Path, small_disk: Path,
) -> None:
    """The stop waits up to the exit grace for a journal that cannot take the responses the
    server created: one line says so, and a second Ctrl-C ends the wait with their ids kept.
    The grace is ten minutes here: only the second Ctrl-C can end the run in time."""
    ids = [f"r{i}" for i in range(4)]
    write_input(tmp_path / "in.jsonl", [request(i) for i in ids])
    journal = small_disk / "j.db"
    argv = ["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
            "--journal", str(journal)]
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": http_fake.base_url,
           GRACE_ENV: "600"}
    fake, gate = http_fake.server, http_fake.gate

    gate.shut()
    first = subprocess.Popen(command(*argv), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    assert first.stderr is not None
    reader = threading.Thread(target=lambda: said.extend(first.stderr or ()), daemon=True)
    reader.start()

    def lines(part: str) -> list[str]:
        return [line for line in list(said) if part in line]

    try:
        filler = _answered_on_a_full_disk(http_fake, small_disk, len(ids))
        first.send_signal(signal.SIGINT)
        _until(lambda: bool(lines("waiting up to")), "the line saying what the stop waits for")
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)  # a hang guard: the grace alone would take 600 s
    finally:
        first.kill()
        reader.join(timeout=60)
        first.stderr.close()
    assert first.returncode == 130, said
    assert "Traceback" not in "".join(said)
    rescue = small_disk / "j.db.unrecorded"
    kept = _kept_keys(rescue)
    assert kept and kept <= set(ids), said
    waiting = lines("waiting up to")
    assert len(waiting) == 1, said
    shown = re.fullmatch(
        r"asyncbg: waiting up to (\d+) s for the journal to take (\d) responses? the server "
        r"created \(it cannot be written now\); interrupt again to leave at once: their ids "
        rf"are kept in {re.escape(str(rescue))} and the next run re-attaches to them\n",
        waiting[0])
    assert shown is not None, waiting
    assert 590 <= int(shown[1]) <= 600  # the manager's exit grace, not a constant
    assert 1 <= int(shown[2]) <= len(kept)  # held then; the kept are those held at the exit
    assert lines("SIGINT again") == [f"asyncbg: SIGINT again: leaving now; the ids of the "
                                     f"responses the journal has not taken go to {rescue}\n"], said
    assert not lines("cancelled on the server")  # a second Ctrl-C here cancels nothing
    assert fake.counters.cancels == 0

    filler.unlink()  # room again: the rerun re-attaches to every one, creating nothing
    argv = [sys.executable, "-m", "asyncbg", *argv]
    env.pop(GRACE_ENV)
    again = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    # The kept ones re-attached; a create whose answer had not come back when the run left
    # (none, as a rule) is sent again, as its `sending` record says.
    assert fake.counters.creates == 2 * len(ids) - len(kept)
    assert not rescue.exists()


def test_cancel_after_such_a_stop_cancels_the_responses_kept_beside_the_journal(
    http_fake: HttpFake, tmp_path: Path, small_disk: Path,
) -> None:
    """The stop's last lines offer `asyncbg cancel --ledger JOURNAL`: it takes the ids kept in
    JOURNAL.unrecorded as a rerun would (it said "nothing to cancel" before)."""
    ids = [f"r{i}" for i in range(3)]
    write_input(tmp_path / "in.jsonl", [request(i) for i in ids])
    journal = small_disk / "j.db"
    argv = ["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
            "--journal", str(journal)]
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": http_fake.base_url,
           GRACE_ENV: "0"}  # no wait for the journal: what this test looks at comes after
    fake, gate = http_fake.server, http_fake.gate
    fake.latency = LatencyModel.fixed(600)  # still running when cancelled

    gate.shut()
    first = subprocess.Popen(command(*argv), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        filler = _answered_on_a_full_disk(http_fake, small_disk, len(ids))
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err
    assert f"asyncbg cancel --ledger {journal}" in err
    rescue = small_disk / "j.db.unrecorded"
    kept = _kept_keys(rescue)
    assert kept and kept <= set(ids), err

    filler.unlink()
    done = subprocess.run([sys.executable, "-m", "asyncbg", "cancel", "--ledger", str(journal)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done
    assert f"cancelled {len(kept)} of {len(kept)} live responses; none is left live" in done.stdout
    assert fake.counters.cancels == len(kept)
    with contextlib.closing(sqlite3.connect(journal)) as db:
        rows = dict(db.execute("SELECT key, status FROM jobs").fetchall())
    assert {rows[k] for k in kept} == {"cancelled"}, rows
    assert not rescue.exists()
