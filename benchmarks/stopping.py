"""How long a fleet worker takes to leave, or to come back, when its ledger cannot be used.

Three measurements, each against a real fault (see benchmarks/README.md, 2026-12-05, "leaving
and coming back"):

``locked``: ``asyncbg worker`` on a shared SQLite ledger, four creates answered while another
process holds the ledger's write lock (so their ids cannot be recorded), then SIGTERM (and,
with ``--second S``, SIGTERM again S seconds later): seconds from the first signal to the exit.

``outage SECONDS``: a PostgresLedger behind a TCP relay that cuts every connection and refuses
new ones for SECONDS, called every 0.5 s meanwhile (as a waiting worker or manager does): seconds
from the database's return to the first call that gets through.

``silent PATIENCE``: ``asyncbg worker --db-patience PATIENCE`` on a ledger address that accepts
connections and never answers (a listener that never accepts: packets that go nowhere):
seconds to its exit.

``gone-silent PATIENCE``: ``asyncbg worker --db-patience PATIENCE`` with two live responses,
its PostgreSQL behind a relay that then stops forwarding without closing anything (packets
dropped mid-run; tests/test_fleet_silent.py's relay): seconds from the silence to its exit.

    python benchmarks/stopping.py locked [--second 2]
    python benchmarks/stopping.py outage 150
    python benchmarks/stopping.py silent 3
    python benchmarks/stopping.py gone-silent 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import anyio
from anyio.abc import SocketStream, TaskStatus

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after $PYTHONPATH: another checkout can be measured

from asyncbg._fleet import enqueue_requests  # noqa: E402
from asyncbg._ledgers import LedgerError  # noqa: E402
from asyncbg._ledgers._postgres import PostgresLedger  # noqa: E402
from tests.pg_server import throwaway_postgres  # noqa: E402
from tests.test_fleet_db_down import free_port, on_port, pipe  # noqa: E402


def _fake_server(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "asyncbg", "fake-server", "--port",
                             str(port), *extra], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}/v1"


def locked(second: float | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        # The creates are answered after 3 s: the lock is taken while they are out.
        fake, base_url = _fake_server("--inject", "slow,route=create,times=4,delay=3")
        env = {**os.environ, "OPENAI_API_KEY": "sk-any", "OPENAI_BASE_URL": base_url,
               "XDG_STATE_HOME": f"{tmp}/state"}
        lines = Path(tmp, "in.jsonl")
        lines.write_text("".join(json.dumps({
            "custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
            "body": {"model": "m", "input": f"line {i}", "metadata": {"fake_duration": "600"}},
        }) + "\n" for i in range(4)))
        db = f"{tmp}/ledger.db"
        subprocess.run([sys.executable, "-m", "asyncbg", "submit", str(lines), "--ledger", db],
                       env=env, check=True, capture_output=True)
        worker = subprocess.Popen([sys.executable, "-m", "asyncbg", "worker", "--ledger", db,
                                   "--concurrency", "4"], env=env, stderr=subprocess.PIPE,
                                  text=True)
        try:
            sending = 0
            while sending < 4:
                time.sleep(0.1)
                with sqlite3.connect(db, timeout=5) as con:
                    sending = con.execute(
                        "SELECT count(*) FROM jobs WHERE state = 'sending'").fetchone()[0]
            locker = sqlite3.connect(db, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")  # another program writing
            time.sleep(4)  # the answers arrive: nothing can record them
            started = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            if second is not None:
                time.sleep(second)
                worker.send_signal(signal.SIGTERM)
            assert worker.stderr is not None
            err = worker.stderr.read()
            worker.wait()
            took = time.monotonic() - started
            locker.execute("ROLLBACK")
            locker.close()
        finally:
            if worker.poll() is None:
                worker.kill()
            fake.kill()
        print(err, file=sys.stderr)
        return took


class _Relay:
    """A TCP relay that can be cut (its connections closed, new ones closed at once)."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self.cut = False
        self.scopes: set[anyio.CancelScope] = set()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async def relay(client: SocketStream) -> None:
            async with client:
                if self.cut:
                    return
                with anyio.CancelScope() as scope:
                    self.scopes.add(scope)
                    try:
                        async with await anyio.connect_tcp(*self.target) as server, \
                                anyio.create_task_group() as tg:
                            tg.start_soon(pipe, client, server)
                            tg.start_soon(pipe, server, client)
                    finally:
                        self.scopes.discard(scope)

        async with await anyio.create_tcp_listener(local_host="127.0.0.1",
                                                   local_port=self.port) as listener:
            task_status.started()
            await listener.serve(relay)

    def stop(self) -> None:
        self.cut = True
        for scope in list(self.scopes):
            scope.cancel()


async def _outage(dsn: str, seconds: float) -> float:
    real = urlsplit(dsn)
    relay = _Relay(free_port(), (real.hostname or "127.0.0.1", real.port or 5432))
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        ledger = PostgresLedger(on_port(dsn, relay.port))
        await ledger.open()
        try:
            await ledger.unfinished()
            relay.stop()
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                with contextlib.suppress(LedgerError):
                    await ledger.unfinished()
                await anyio.sleep(0.5)
            relay.cut = False
            back = time.monotonic()
            while True:
                try:
                    await ledger.unfinished()
                    break
                except LedgerError:
                    await anyio.sleep(0.5)
            took = time.monotonic() - back
        finally:
            await ledger.close()
        tg.cancel_scope.cancel()
    return took


def outage(seconds: float) -> float:
    with throwaway_postgres() as dsn:
        return anyio.run(_outage, dsn, seconds)


def silent(patience: float) -> float:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # never accepted: the kernel's handshake, then silence
        url = f"postgresql://asyncbg@127.0.0.1:{listener.getsockname()[1]}/asyncbg"
        env = {**os.environ, "OPENAI_API_KEY": "sk-any",
               "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "asyncbg", "worker", "--ledger", url,
                               "--db-patience", str(patience)], env=env, capture_output=True,
                              text=True, check=False)
        took = time.monotonic() - started
    print(done.stderr, file=sys.stderr)
    return took


class _SilentRelay:
    """A TCP relay that can go silent: it stops forwarding, both ways, and closes nothing (as
    tests/test_fleet_silent.py's, which another checkout's tests may not have)."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self.flowing = anyio.Event()
        self.flowing.set()

    async def _pipe(self, a: SocketStream, b: SocketStream) -> None:
        try:
            async for chunk in a:
                await self.flowing.wait()
                await b.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            await b.aclose()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async def relay(client: SocketStream) -> None:
            async with client, await anyio.connect_tcp(*self.target) as server, \
                    anyio.create_task_group() as tg:
                tg.start_soon(self._pipe, client, server)
                tg.start_soon(self._pipe, server, client)

        async with await anyio.create_tcp_listener(local_host="127.0.0.1",
                                                   local_port=self.port) as listener:
            task_status.started()
            await listener.serve(relay)


async def _gone_silent(dsn: str, patience: float) -> tuple[float, str]:
    setup = PostgresLedger(dsn)
    await setup.open()
    try:
        await enqueue_requests(setup, [
            (f"r{i}", {"model": "m", "input": f"line {i}",
                       "metadata": {"fake_duration": "600"}}) for i in range(3)])
    finally:
        await setup.close()
    real = urlsplit(dsn)
    relay = _SilentRelay(free_port(), (real.hostname or "127.0.0.1", real.port or 5432))
    url = on_port(dsn, relay.port)
    fake, base_url = _fake_server()
    env = {**os.environ, "OPENAI_API_KEY": "sk-any", "OPENAI_BASE_URL": base_url}
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(relay.serve)
            proc = await anyio.open_process(
                [sys.executable, "-m", "asyncbg", "worker", "--ledger", url, "--concurrency",
                 "2", "--db-patience", str(patience)], env=env, stdout=None,
                stderr=subprocess.PIPE)
            await anyio.sleep(4)  # two creates out, recorded live and polled
            relay.flowing = anyio.Event()  # silence
            started = time.monotonic()
            assert proc.stderr is not None
            err = b""
            async for chunk in proc.stderr:
                err += chunk
            await proc.wait()
            took = time.monotonic() - started
            tg.cancel_scope.cancel()
    finally:
        fake.kill()
    return took, err.decode()


def gone_silent(patience: float) -> float:
    with throwaway_postgres() as dsn:
        took, err = anyio.run(_gone_silent, dsn, patience)
    print(err, file=sys.stderr)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("locked")
    p.add_argument("--second", type=float, metavar="S", help="SIGTERM again after S seconds")
    sub.add_parser("outage").add_argument("seconds", type=float)
    sub.add_parser("silent").add_argument("patience", type=float)
    sub.add_parser("gone-silent").add_argument("patience", type=float)
    args = parser.parse_args()
    if args.what == "locked":
        print(f"exit {locked(args.second):.1f} s after the first SIGTERM")
    elif args.what == "outage":
        print(f"a call got through {outage(args.seconds):.1f} s after the database was back "
              f"(outage {args.seconds:g} s)")
    elif args.what == "silent":
        print(f"exit {silent(args.patience):.1f} s after the start (--db-patience "
              f"{args.patience:g})")
    else:
        print(f"exit {gone_silent(args.patience):.1f} s after the database went silent "
              f"(--db-patience {args.patience:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
