"""The command line's event loop: uvloop's where it is installed, asyncio's when asked."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

import pytest

from asyncbg._cli import _run_async, main

from . import test_cli_run2
from .conftest import HttpFake
from .test_batch_cli import request, write_input

env = test_cli_run2.env


async def _loop_module(args: argparse.Namespace) -> str:
    return type(asyncio.get_running_loop()).__module__


def test_commands_run_on_uvloop_unless_asyncbg_loop_says_asyncio(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCBG_LOOP", raising=False)
    assert _run_async(_loop_module, argparse.Namespace()).startswith("uvloop")
    monkeypatch.setenv("ASYNCBG_LOOP", "asyncio")
    assert _run_async(_loop_module, argparse.Namespace()).startswith("asyncio")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_run_polls_through_the_lean_path_on_either_loop(
        env: HttpFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, loop: str) -> None:
    # The status checks have a transport of their own (asyncbg/_providers/_lean_wire.py):
    # uvloop's transports are not asyncio.Transport's subclasses, and an assertion that they
    # were failed every poll's connection under uvloop.
    monkeypatch.setenv("ASYNCBG_LOOP", loop)
    write_input(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(6)])
    with caplog.at_level(logging.ERROR):
        rc = test_cli_run2.run(tmp_path)
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"r{i}" for i in range(6)]
    assert all(x["response"]["body"]["status"] == "completed" for x in lines)
    assert env.server.counters.retrieves > 0  # the status checks were made, on this loop
    assert not [r for r in caplog.records if "Exception in callback" in r.getMessage()]
    assert main(["status", "--ledger", str(tmp_path / "out.jsonl.journal")]) == 0
