"""Passwords never leave asyncbg: one redaction function (asyncbg/_ledgers/_urls.py) for every
URL shape psycopg accepts, and every place the command line prints a ledger's location."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest
from psycopg.conninfo import conninfo_to_dict

from asyncbg._cli import main
from asyncbg._ledgers import LedgerError, Outcome, canonical, digest, open_ledger
from asyncbg._ledgers._postgres import PostgresLedger
from asyncbg._ledgers._urls import redacted, url_like

SECRET = "S3cr3tPw"

#: URLs psycopg reads a password from: (url, the password psycopg reads).
ACCEPTED = [
    (f"postgresql://user:{SECRET}@host/db", SECRET),
    (f"postgres://user:{SECRET}@host:5432/db", SECRET),
    (f"POSTGRESQL://user:{SECRET}@host/db".replace("POSTGRESQL", "postgresql"), SECRET),
    (f"postgresql://user:{SECRET}@h1:5432,h2:5433/db?target_session_attrs=read-write", SECRET),
    (f"postgresql://user:{SECRET}@[::1]:5432/db", SECRET),
    (f"postgresql://user:{SECRET}@%2Fvar%2Frun%2Fpostgresql/db", SECRET),
    (f"postgresql://:{SECRET}@host/db", SECRET),
    (f"postgresql://user:{SECRET}@host/db?options=-csearch_path%3Dx&sslmode=require", SECRET),
    (f"postgresql://user:{SECRET}@host", SECRET),
    (f"postgresql://user:{SECRET}@/db?host=/tmp", SECRET),
    (f"postgresql://user@host/db?password={SECRET}", SECRET),
    (f"postgresql://host/db?user=u&password={SECRET}&sslmode=require", SECRET),
    (f"postgresql:///db?host=/var/run/postgresql&password={SECRET}", SECRET),
    (f"postgresql://host/db?pass%77ord={SECRET}", SECRET),  # libpq decodes the key too
    (f"postgresql://u:{SECRET}@host/db?sslpassword=Other9Pw", SECRET),
    # Encoded and un-encoded specials: psycopg reads the encoded ones.
    ("postgresql://user:p%40ss%3Aw%2Frd@host/db", "p@ss:w/rd"),
    # key=value connection strings.
    (f"host=h port=5432 dbname=d user=u password={SECRET}", SECRET),
    (f"password='{SECRET} with space' host=h", f"{SECRET} with space"),
    (f"host=h password = {SECRET}", SECRET),
    (f"host=h password='it\\'s{SECRET}'", f"it's{SECRET}"),
]

#: Shapes a user may type that libpq reads otherwise, or refuses: the secret still never shows.
TYPED = [
    f"postgresql://user:p@ss:w/rd{SECRET}@host/db",  # un-encoded @ : / in the password
    f"postgresql://user:pa#{SECRET}@host/db",
    f"postgresql://user:pa?{SECRET}@host/db",
    f"postgresql:/user:{SECRET}@host/db",  # one slash
    f"postgresql:user:{SECRET}@host/db",  # none
    f"postgresql://user@host/db?PassWord={SECRET}",
    f"sslpassword={SECRET} host=h",
    f"https://user:{SECRET}@hooks.example/notify",
]

#: Text that holds such URLs.
MESSAGES = [
    f"cannot use postgresql://u:{SECRET}@h/db (connection refused), try again",
    f"PostgresLedger('postgresql://u:{SECRET}@h/db', exclusive=False)",
    f'missing "=" after "postgresql:/user:{SECRET}@host" in connection info string',
    f"ledgers: postgres://a:{SECRET}@h1/x and postgres://b:{SECRET}@h2/y",
]

UNCHANGED = [
    "/tmp/run/out.jsonl.journal",
    "journal.db",
    "C:/runs/j.db",
    "postgresql://host/db",
    "postgresql://user@host:5432/db?sslmode=require",
    "password authentication failed for user \"u\"",
]


@pytest.mark.parametrize(("url", "password"), ACCEPTED)
def test_every_url_shape_psycopg_accepts_loses_its_password(url: str, password: str) -> None:
    assert conninfo_to_dict(url)["password"] == password  # psycopg does read this secret
    shown = redacted(url)
    assert SECRET not in shown and password not in shown
    assert "***" in shown
    assert redacted(shown) == shown  # idempotent


@pytest.mark.parametrize("text", TYPED + MESSAGES)
def test_urls_typed_wrong_and_messages_quoting_them_lose_the_password(text: str) -> None:
    shown = redacted(text)
    assert SECRET not in shown and "***" in shown
    for part in ("p@ss", "ss:w", "w/rd"):
        assert part not in shown


def test_what_is_kept_is_what_locates_the_database() -> None:
    assert redacted(f"postgresql://user:{SECRET}@h1:5432,h2/db?sslmode=require") == (
        "postgresql://user:***@h1:5432,h2/db?sslmode=require")
    assert redacted(f"postgresql://h/db?user=u&password={SECRET}&sslmode=require") == (
        "postgresql://h/db?user=u&password=***&sslmode=require")
    assert redacted(f"host=h password='{SECRET} x' port=1") == "host=h password=*** port=1"
    assert redacted(f"postgresql://user:p@ss:w/rd{SECRET}@host/db") == (
        "postgresql://user:***@host/db")


@pytest.mark.parametrize("text", UNCHANGED)
def test_text_without_a_password_is_left_alone(text: str) -> None:
    assert redacted(text) == text


# -- ledger arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    f"postgresql:/user:{SECRET}@host/db", f"postgres:user:{SECRET}@host/db",
    f"postgresql:/user:{SECRET}@host/db//x", f"mysql://user:{SECRET}@host/db",
    "postgresql://[bad", "postgresql://host/db?nosuchoption=1",
])
def test_a_ledger_that_looks_like_a_url_but_is_not_one_is_an_error_not_a_path(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert url_like(spec)
    with pytest.raises(LedgerError) as info:
        open_ledger(spec)
    assert SECRET not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no file, no directory named after the password


def test_paths_are_paths() -> None:
    for path in ("j.db", "./postgresql", "runs/postgresql:x", "C:/runs/j.db", "/abs/j.db"):
        assert not url_like(path)


# -- the command line ---------------------------------------------------------------------------


def with_password(dsn: str) -> str:
    """The DSN with a password in it (the test server trusts every local login)."""
    scheme, _, rest = dsn.partition("://")
    user, _, host = rest.partition("@")
    return f"{scheme}://{user}:{SECRET}@{host}"


@pytest.mark.parametrize("shape", ["userinfo", "parameter"])
def test_status_prints_no_password_in_any_line_or_json_field(
    pg_dsn: str, shape: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = (with_password(pg_dsn) if shape == "userinfo"
           else f"{pg_dsn}?password={SECRET}&application_name=asyncbg")

    async def fill() -> None:
        ledger = PostgresLedger(url)
        await ledger.open()
        try:
            params = {"model": "m", "input": "x"}
            await ledger.enqueue([("k1", digest(params), canonical(params))])
            await ledger.acquire(1, 30.0)
            await ledger.record("k1", Outcome("in_progress", "resp_1"))
            await ledger.release(["k1"])
        finally:
            await ledger.close()

    anyio.run(fill)
    assert main(["status", "--ledger", url]) == 0
    text = capsys.readouterr()
    assert "in_progress" in text.out  # the live job is counted (nothing destructive advised)
    assert SECRET not in text.out + text.err
    assert main(["status", "--ledger", url, "--json"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "***" in json.loads(out)["journal"]


@pytest.mark.parametrize("spec", [
    f"postgresql://user:{SECRET}@127.0.0.1:1/db",
    f"postgresql://127.0.0.1:1/db?password={SECRET}",
    f"postgresql:/user:{SECRET}@127.0.0.1/db",
])
@pytest.mark.parametrize("command", ["status", "cancel", "notify", "results"])
def test_errors_name_the_ledger_without_its_password(
    spec: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASYNCBG_NOTIFY_SECRET", "whsec_" + "A" * 32)
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
    argv = [command, "--ledger", spec] + (["-o", "out.jsonl"] if command == "results" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "***" in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert sorted(os.listdir(tmp_path)) == []  # nothing made under a name from the URL
