"""The OpenAI Batch API input file: one request a line, checked before anything is sent."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BadLine", "BatchRequest", "Parsed", "read_lines", "read_requests"]

URL = "/v1/responses"


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


@dataclass(slots=True)
class Parsed:
    requests: list[BatchRequest] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


def read_requests(path: Path) -> Parsed:
    """Parse a Batch API input file; bad lines are collected with their line numbers.

    Raises ``OSError`` when the file cannot be read and ``UnicodeDecodeError`` when it is not
    UTF-8 text.
    """

    def check(item: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
        problem = _check(item)
        return problem if problem else (item["custom_id"], item["body"])

    return read_lines(path, check, "custom_id")


def read_lines(path: Path, check: Callable[[dict[str, Any]], tuple[str, dict[str, Any]] | str],
               id_name: str) -> Parsed:
    """A JSONL file of requests, whichever API's format: ``check`` turns a line into
    (id, request) or the reason it cannot run; a repeated id is a duplicate."""
    parsed = Parsed()
    first_seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except ValueError as exc:
                parsed.bad.append(BadLine(number, f"not valid JSON ({exc})"))
                continue
            got = check(item) if isinstance(item, dict) else "a line must be a JSON object"
            if isinstance(got, str):
                parsed.bad.append(BadLine(number, got))
                continue
            key, body = got
            if key in first_seen:
                parsed.duplicates.append(f"line {number}: {id_name} {key!r} is already used on "
                                         f"line {first_seen[key]}")
                continue
            first_seen[key] = number
            parsed.requests.append(BatchRequest(number, key, body))
    return parsed


def _check(item: object) -> str | None:
    if not isinstance(item, dict):
        return "a line must be a JSON object"
    custom_id = item.get("custom_id")
    if custom_id is None:
        return "missing field 'custom_id'"
    if not isinstance(custom_id, str) or not custom_id:
        return "field 'custom_id' must be a non-empty string"
    if "body" not in item:
        return "missing field 'body'"
    if not isinstance(item["body"], dict):
        return "field 'body' must be a JSON object"
    method = item.get("method", "POST")
    if method != "POST":
        return f"field 'method' must be \"POST\", not {method!r}"
    url = item.get("url")
    if url != URL:
        return f"field 'url' must be {URL!r} (only the Responses API runs here), not {url!r}"
    for name in ("background", "stream"):
        if name in item["body"] and item["body"][name] not in (True, False, None):
            return f"field 'body.{name}' must be a boolean"
    return None
