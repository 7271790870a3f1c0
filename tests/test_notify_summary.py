"""``asyncbg run``'s summary says when notifications are left pending or failed (a receiver
answering 500 or 410), with the command to run next; a run whose notifications all arrived says
nothing of them. The command runs in this process (``main(argv)``) against the HTTP fake, and
the receiver is a plain HTTP server on 127.0.0.1 answering what the test sets."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncbg._cli import main
from asyncbg.testing import new_secret

from .test_batch_cli import request, write_input
from .test_cli_run2 import env  # noqa: F401 (a fixture: the fake's URL and a key)


class Receiver:
    """Answers every POST with ``status``; counts them."""

    def __init__(self) -> None:
        self.status = 200
        self.posts = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.posts += 1
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
        thread.join(timeout=5)


def run(tmp: Path, url: str, wait: float = 0.5) -> int:
    write_input(tmp / "in.jsonl", [request(f"r{i}") for i in range(3)])
    return main(["run", str(tmp / "in.jsonl"), "-o", str(tmp / "out.jsonl"), "--notify", url,
                 "--notify-wait", str(wait)])


def notes_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("notifications")]


@pytest.mark.usefixtures("env")
def test_the_summary_names_notifications_left_and_what_to_run(
    receiver: Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASYNCBG_NOTIFY_SECRET", new_secret())
    (tmp_path / "ok").mkdir()
    assert run(tmp_path / "ok", receiver.url) == 0
    assert receiver.posts == 3
    assert notes_of(capsys.readouterr().err) == []  # every one arrived: nothing to say

    receiver.status = 500  # the receiver is broken: they wait for a retry
    (tmp_path / "down").mkdir()
    assert run(tmp_path / "down", receiver.url) == 0  # the lines completed: still 0
    journal = tmp_path / "down" / "out.jsonl.journal"
    [line] = notes_of(capsys.readouterr().err)
    assert line.startswith("notifications 3 pending, 0 failed"), line
    assert "(latest error: HTTP 500)" in line or receiver.posts == 3  # none tried yet
    assert line.endswith(f"; send them with `asyncbg notify --ledger {journal}`"), line

    receiver.status = 410  # the endpoint is gone: failed, kept, sent again only when asked
    (tmp_path / "gone").mkdir()
    assert run(tmp_path / "gone", receiver.url, wait=10) == 0  # ends when none is pending
    journal = tmp_path / "gone" / "out.jsonl.journal"
    [line] = notes_of(capsys.readouterr().err)
    assert line.startswith("notifications 0 pending, 3 failed (latest error: the endpoint "
                           "answered 410 Gone"), line
    assert line.endswith(f"send them with `asyncbg notify --ledger {journal} --retry-failed`")

    receiver.status = 200  # what the summary said to run works
    assert main(["notify", "--ledger", str(journal), "--retry-failed"]) == 0
    assert "delivered 3 notification(s); 0 still pending, 0 failed" in capsys.readouterr().out


@pytest.mark.usefixtures("env")
def test_the_readmes_notification_commands_work_as_written(
    receiver: Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import re
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Completion notifications", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", section, re.S)
    block = block.replace("whsec_...", new_secret()).replace(
        "https://hooks.example.com/asyncbg", receiver.url)
    monkeypatch.chdir(tmp_path)
    write_input(tmp_path / "requests.jsonl", [request(f"r{i}") for i in range(3)])
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    assert [c[0] for c in commands] == ["export", "asyncbg", "asyncbg", "asyncbg"]
    for argv in commands:
        if argv[0] == "export":
            name, _, value = argv[1].partition("=")
            monkeypatch.setenv(name, value)
            continue
        assert argv[0] == "asyncbg", argv
        assert main(argv[1:]) == 0, (argv, capsys.readouterr().err)
    assert receiver.posts == 3  # one notification per line, delivered by the run itself
    out = capsys.readouterr().out
    assert "jobs        3  (completed 3)" in out  # status (it lists notifications left)
    assert "delivered 0 notification(s); 0 still pending, 0 failed" in out  # notify
