"""The OpenAI Batch API input file: one request a line, checked before anything is sent.

A run reads its input twice, so that memory follows the concurrency and not the file: a first
pass (:func:`index_lines`) checks every line and keeps only each valid line's number and id (to
refuse duplicates before anything is sent, and to report in input order); the second
(:func:`iter_lines`) streams the requests while they are sent.
"""

from __future__ import annotations

import codecs
import json
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BadLine",
    "BatchRequest",
    "Check",
    "Index",
    "NotUtf8",
    "Parsed",
    "check_request",
    "index_lines",
    "iter_lines",
    "not_a_file",
    "read_lines",
    "read_requests",
]

URL = "/v1/responses"

#: Turns one JSON object into (id, request), or says why it cannot run.
Check = Callable[[dict[str, Any]], tuple[str, dict[str, Any]] | str]


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One valid input line: ``{"custom_id", "method": "POST", "url": "/v1/responses", "body"}``."""

    line: int
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BadLine:
    """An input line that cannot run, with the reason."""

    line: int
    reason: str


class NotUtf8(UnicodeDecodeError):
    """A line of the input is not UTF-8 text; its message is ``FILE:LINE: ...``.

    A ``UnicodeDecodeError`` still, so that callers catching that keep working.
    """

    def __init__(self, path: Path, line: int, exc: UnicodeDecodeError) -> None:
        super().__init__(exc.encoding, exc.object, exc.start, exc.end, exc.reason)
        byte = exc.object[exc.start:exc.start + 1].hex()
        self.message = (f"{path}:{line}: not UTF-8 text (byte 0x{byte} at column "
                        f"{exc.start + 1}); save the file as UTF-8")

    def __str__(self) -> str:
        return self.message


@dataclass(slots=True)
class Parsed:
    """Every line of a file at once (``asyncbg submit`` reads small files this way)."""

    requests: list[BatchRequest] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    duplicates: list[BadLine] = field(default_factory=list)


@dataclass(slots=True)
class Index:
    """What the first pass learned, without keeping any request body."""

    #: custom_id -> line number of every valid line, in input order.
    lines: dict[str, int] = field(default_factory=dict)
    bad: list[BadLine] = field(default_factory=list)
    duplicates: list[BadLine] = field(default_factory=list)
    #: The ``model`` of every valid line (for ``--max-cost``: each must have a known price).
    models: set[str] = field(default_factory=set)


def iter_lines(path: Path, check: Check) -> Iterator[BatchRequest | BadLine]:
    """Each non-blank line of ``path`` as a request or a bad line, read as it goes.

    A UTF-8 byte order mark at the start is skipped. Raises ``OSError`` when the file cannot be
    read and :class:`NotUtf8` naming the line when a line is not UTF-8.
    """
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise NotUtf8(path, number, exc) from None
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except ValueError as exc:
                yield BadLine(number, f"not valid JSON ({exc}): {_start_of(text)}")
                continue
            got = check(item) if isinstance(item, dict) else "a line must be a JSON object"
            if isinstance(got, str):
                yield BadLine(number, got)
            else:
                yield BatchRequest(number, *got)


def _start_of(text: str, width: int = 30) -> str:
    """The start of a line, quoted, to show what a line that is not JSON holds."""
    text = text.strip()
    return repr(text if len(text) <= width else text[:width] + "...")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be an input that is read twice (every line checked before anything
    is sent, then read again as it is sent), or None. Only stat-ed: a FIFO is not opened (an
    open would wait for a writer). A path that cannot be stat-ed is left to the open to say."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return (f"{path} is {kind}: the input is read twice (every line is checked before "
            "anything is sent), so it must be a regular file")


def index_lines(path: Path, check: Check, id_name: str) -> Index:
    """The first pass over an input file (see :func:`iter_lines` for what it raises)."""
    index = Index()
    for item in iter_lines(path, check):
        if isinstance(item, BadLine):
            index.bad.append(item)
        elif item.custom_id in index.lines:
            index.duplicates.append(BadLine(item.line, (
                f"{id_name} {item.custom_id!r} is already used on line "
                f"{index.lines[item.custom_id]}")))
        else:
            index.lines[item.custom_id] = item.line
            model = item.body.get("model")
            if isinstance(model, str):
                index.models.add(model)
    return index


def read_lines(path: Path, check: Check, id_name: str) -> Parsed:
    """A JSONL file of requests, whichever API's format, all at once; a repeated id is a
    duplicate."""
    parsed = Parsed()
    first_seen: dict[str, int] = {}
    for item in iter_lines(path, check):
        if isinstance(item, BadLine):
            parsed.bad.append(item)
        elif item.custom_id in first_seen:
            parsed.duplicates.append(BadLine(item.line, (
                f"{id_name} {item.custom_id!r} is already used on line "
                f"{first_seen[item.custom_id]}")))
        else:
            first_seen[item.custom_id] = item.line
            parsed.requests.append(item)
    return parsed


def read_requests(path: Path) -> Parsed:
    """Parse a Batch API input file; bad lines are collected with their line numbers.

    Raises ``OSError`` when the file cannot be read and :class:`NotUtf8` when it is not UTF-8.
    """
    return read_lines(path, check_request, "custom_id")


def check_request(item: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
    """A Batch API line as (custom_id, body), or the reason it cannot run."""
    custom_id = item.get("custom_id")
    if custom_id is None:
        return "missing field 'custom_id'"
    if not isinstance(custom_id, str) or not custom_id:
        return "field 'custom_id' must be a non-empty string"
    if "body" not in item:
        return "missing field 'body'"
    body = item["body"]
    if not isinstance(body, dict):
        return "field 'body' must be a JSON object"
    method = item.get("method", "POST")
    if method != "POST":
        return f"field 'method' must be \"POST\", not {method!r}"
    url = item.get("url")
    if url != URL:
        return f"field 'url' must be {URL!r} (only the Responses API runs here), not {url!r}"
    for name in ("background", "stream"):
        if name in body and body[name] not in (True, False, None):
            return f"field 'body.{name}' must be a boolean"
    if body.get("background") is False:
        return ("field 'body.background' is false, but asyncbg runs every request as a "
                "background response: remove the field or set it to true")
    return custom_id, body
