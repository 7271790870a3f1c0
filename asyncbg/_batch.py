"""The OpenAI Batch API file format: read request lines, write output lines."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ._job import Job
from ._status import JobStatus

__all__ = ["BadLine", "BatchRequest", "OutputFile", "read_requests"]

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
    """Parse a Batch API input file; bad lines are collected with their line numbers."""
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
            problem = _check(item)
            if problem:
                parsed.bad.append(BadLine(number, problem))
                continue
            custom_id = item["custom_id"]
            if custom_id in first_seen:
                parsed.duplicates.append(
                    f"line {number}: custom_id {custom_id!r} is already used on line "
                    f"{first_seen[custom_id]}"
                )
                continue
            first_seen[custom_id] = number
            parsed.requests.append(BatchRequest(number, custom_id, item["body"]))
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


def output_line(custom_id: str, job: Job) -> dict[str, Any]:
    """A Batch API output line for a finished job."""
    data = job._data
    line: dict[str, Any] = {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": custom_id,
        "response": None,
        "error": None,
    }
    if data is not None and job.response_id is not None:
        line["response"] = {"status_code": 200, "request_id": None, "body": data}
    else:
        code = "cancelled" if job.status is JobStatus.CANCELLED else "request_failed"
        line["error"] = {"code": code, "message": job.error or "no reason given"}
    return line


class OutputFile:
    """The output JSONL, append-only, one line per custom_id, flushed as each job ends.

    Reopening it after a crash keeps every complete line, drops a half-written last line,
    and remembers which custom_ids are already written, so a resumed run writes each once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: set[str] = set()
        self._f: TextIO | None = None

    def open(self) -> None:
        keep = 0
        if self.path.exists():
            with self.path.open("rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break  # the run died mid-write
                    try:
                        self.written.add(json.loads(raw)["custom_id"])
                    except (ValueError, KeyError, TypeError):
                        break
                    keep += len(raw)
            with self.path.open("r+b") as f:
                f.truncate(keep)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, custom_id: str, job: Job) -> None:
        if custom_id in self.written:
            return
        assert self._f is not None
        self._f.write(json.dumps(output_line(custom_id, job), separators=(",", ":")) + "\n")
        # flush, not fsync: a killed process loses nothing the OS already has.
        self._f.flush()
        self.written.add(custom_id)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
