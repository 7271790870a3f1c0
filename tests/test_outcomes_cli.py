"""``asyncbg run --escalate-file``: a ladder per line, the output showing the final answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncbg._cli import main
from asyncbg._ledgers import Record
from asyncbg._outcomes._journal import attempts_field, final_view

from .conftest import HttpFake
from .test_batch_cli import request, write_input
from .test_cli_run2 import env  # noqa: F401 - the fixture: an API key and the fake's URL


@pytest.mark.usefixtures("env")
def test_escalate_file_runs_a_ladder_per_line_and_a_rerun_sends_nothing(
    http_fake: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    server = http_fake.server
    server.latency = server.latency.fixed(0.02)
    write_input(tmp_path / "in.jsonl", [
        request("short", max_output_tokens=100, metadata={"fake_needs_output_tokens": "500"}),
        request("fine"),
    ])
    ladder = tmp_path / "ladder.json"
    ladder.write_text(json.dumps({"on": ["incomplete"], "steps": [{"max_output_tokens": 900}]}))
    out = tmp_path / "out.jsonl"
    argv = ["run", str(tmp_path / "in.jsonl"), "-o", str(out), "--escalate-file", str(ladder)]
    assert main(argv) == 0
    lines = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"short", "fine"}
    short = lines["short"]
    assert short["error"] is None and short["response"]["body"]["status"] == "completed"
    assert short["response"]["body"]["max_output_tokens"] == 900
    assert lines["fine"]["response"]["body"]["max_output_tokens"] is None
    assert server.counters.creates == 3
    assert [a["status"] for a in short["attempts"]] == ["incomplete", "completed"]
    assert "attempts" not in lines["fine"]  # one attempt: the line as it always was
    capsys.readouterr()

    assert main(argv) == 0  # the rerun: every attempt served from the journal
    assert server.counters.creates == 3
    again = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert again == lines


def test_a_bad_escalate_file_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    write_input(tmp_path / "in.jsonl", [request("a")])
    ladder = tmp_path / "ladder.json"
    for text, said in (('{"on": ["sometimes"]}', "got 'sometimes'"), ("{", "not JSON"),
                       ('{"steps": [{}]}', "non-empty mapping")):
        ladder.write_text(text)
        with pytest.raises(SystemExit) as exited:
            main(["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                  "--escalate-file", str(ladder)])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --escalate-file: {ladder}" in err and said in err
        assert "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def _record(key: str, status: str, usage: int) -> Record:
    body = json.dumps({"status": status, "usage": {"total_tokens": usage}}).encode()
    return Record(key=key, digest="d", request=b"{}", state="done", response_id=f"resp_{key}",
                  status=status, body=body, error=None, error_code=None, http_status=200,
                  request_id=None, resubmits=0, created=1.0, updated=2.0)


def test_the_journal_view_folds_each_ladder_under_its_key() -> None:
    records = {r.key: r for r in (
        _record("k", "incomplete", 10), _record("k#2", "cancelled", 5),
        _record("k#2#hedge", "completed", 20), _record("a#2", "completed", 1),
        _record("plain", "completed", 3))}
    view = final_view(records)
    assert set(view) == {"k", "a#2", "plain"}  # "a" is not in the journal: a#2 is a user key
    folded = view["k"]
    assert (folded.key, folded.response_id, folded.status) == ("k", "resp_k#2#hedge",
                                                             "completed")
    assert [a["custom_id"] for a in attempts_field(folded)["attempts"]] == [
        "k", "k#2", "k#2#hedge"]
    assert attempts_field(view["plain"]) == {} and view["plain"] is records["plain"]


@pytest.mark.usefixtures("env")
def test_a_users_own_hash_keys_are_never_folded_and_clash_with_a_ladder(
    http_fake: HttpFake, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``a`` and ``a#2`` are two lines of the user's: without a ladder each keeps its own
    answer; with one, ``a#2`` would be the name of ``a``'s second attempt, so it is refused."""
    http_fake.server.latency = http_fake.server.latency.fixed(0.02)
    write_input(tmp_path / "in.jsonl", [request("a", input="first"),
                                        request("a#2", input="second")])
    out = tmp_path / "out.jsonl"
    argv = ["run", str(tmp_path / "in.jsonl"), "-o", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # the rerun reads the journal back: still two lines of their own
    lines = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"a", "a#2"} and "attempts" not in lines["a"]
    assert lines["a"]["response"]["body"]["id"] != lines["a#2"]["response"]["body"]["id"]
    ladder = tmp_path / "ladder.json"
    ladder.write_text(json.dumps({"on": ["incomplete"], "steps": [{"max_output_tokens": 9}]}))
    capsys.readouterr()
    assert main([*argv[:2], "-o", str(tmp_path / "o2.jsonl"), "--escalate-file",
                 str(ladder)]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:2: custom_id 'a#2'" in err and "nothing was sent" in err, err
    assert http_fake.server.counters.creates == 2
