"""``asyncbg run --provider``: each API's own batch file format, and whom to send it to.

* ``openai`` (background Responses) and ``openai-batch`` (the Batch API) read and write OpenAI's
  Batch API lines: ``{"custom_id", "method", "url", "body"}`` in, ``{"id", "custom_id",
  "response", "error"}`` out (:mod:`._input`, :mod:`._output`).
* ``anthropic`` (Message Batches) reads ``{"custom_id", "params"}`` and writes the results
  lines of ``messages.batches.results``: ``{"custom_id", "result": {"type", ...}}``.
* ``gemini`` (Batch Mode) reads ``{"key", "request"}`` (a ``GenerateContentRequest``; the model
  comes from ``request.model`` or ``--model``) and writes ``{"key", "response" | "error"}``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._ledgers import Record
from .._providers._prepare import background_request, batch_request
from ._input import BadLine, BatchRequest, Check, Index, check_request, index_lines, iter_lines
from ._ops import open_client, say
from ._output import (
    Existing,
    Line,
    NotOurs,
    OutputFile,
    StdoutOutput,
    body_of,
    output_line,
    read_existing,
)

__all__ = ["FORMATS", "Format"]

#: Jobs in flight for a batch provider when ``--concurrency`` is not given: batches, not
#: responses, are what the server runs, so the cap only bounds memory.
BATCH_CONCURRENCY = 10_000
#: Seconds a batch provider of the CLI waits to fill a batch: the whole file is submitted at
#: once, so half a second gathers it.
BATCH_DELAY = 0.5
#: Fields of a Gemini ``GenerateContentRequest`` that go into ``config`` (besides
#: ``generationConfig``, whose fields are ``config``'s own).
_GEMINI_CONFIG = {"systemInstruction": "system_instruction", "tools": "tools",
                  "toolConfig": "tool_config", "safetySettings": "safety_settings",
                  "cachedContent": "cached_content", "labels": "labels"}



@dataclass(frozen=True)
class Format:
    """One ``--provider``: its file formats, its client and its manager settings."""

    name: str
    #: The line checker for this run's options (``--model``, say).
    checker: Callable[[argparse.Namespace], Check]
    #: What the format calls a line's id, for messages.
    id_name: str
    line: Line
    #: The output line's fields that name it, and must be there (the first is its key).
    fields: tuple[str, ...]
    open: Callable[[argparse.Namespace], Any]
    batch: bool = True

    def prepare(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The request the provider sends for a line's body (what the journal digests), with
        no SDK loaded: a rerun learns from it whether anything is left to send."""
        if self.batch:
            return batch_request(body, api_name=self.name)
        return background_request(body, stream=False)

    def index(self, path: Path, args: argparse.Namespace) -> Index:
        """The first pass over an input file (see :func:`~._input.index_lines`)."""
        return index_lines(path, self.checker(args), self.id_name)

    def requests(self, path: Path, args: argparse.Namespace) -> Iterator[BatchRequest]:
        """The input's valid requests, read as they are needed."""
        for item in iter_lines(path, self.checker(args)):
            if not isinstance(item, BadLine):
                yield item

    def read_existing(self, path: Path) -> Existing:
        if self.fields[0] == "custom_id" and "response" in self.fields:
            return read_existing(path)
        return _read_existing(path, self.fields)

    def output_file(self, path: Path | None) -> OutputFile:
        """The output at ``path`` (already checked), or stdout when None (``-o -``)."""
        return StdoutOutput(self.line) if path is None else OutputFile(path, self.line)

    def manager_options(self, args: argparse.Namespace, target: Any) -> dict[str, Any]:
        if not self.batch:
            return {"max_concurrency": args.concurrency or 16}
        return {"max_concurrency": args.concurrency or BATCH_CONCURRENCY}


async def close(target: Any) -> None:
    """Close the client behind a provider (or a bare client)."""
    client = getattr(target, "client", target)
    aio = getattr(client, "aio", None)
    if aio is not None:
        await aio.aclose()  # google-genai
    else:
        await client.close()


# -- reading -------------------------------------------------------------------------------


def _id(item: Mapping[str, Any], name: str) -> str | None:
    if name not in item:
        return f"missing field {name!r}"
    if not isinstance(item[name], str) or not item[name]:
        return f"field {name!r} must be a non-empty string"
    return None


def _anthropic_check(args: argparse.Namespace) -> Check:
    def check(item: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
        problem = _id(item, "custom_id")
        if problem:
            return problem
        if not isinstance(item.get("params"), dict):
            return "field 'params' must be a JSON object (messages.create parameters)"
        return item["custom_id"], item["params"]

    return check


def _gemini_check(args: argparse.Namespace) -> Check:
    def check(item: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
        problem = _id(item, "key")
        if problem:
            return problem
        request = item.get("request")
        if not isinstance(request, dict):
            return "field 'request' must be a JSON object (a GenerateContentRequest)"
        request = dict(request)
        model = request.pop("model", None) or args.model
        if not model:
            return "no model: give request.model, or pass --model"
        contents = request.pop("contents", None)
        if not contents:
            return "field 'request.contents' is missing"
        config: dict[str, Any] = dict(request.pop("generationConfig", None) or {})
        for name, field in _GEMINI_CONFIG.items():
            if name in request:
                config[field] = request.pop(name)
        if request:
            return f"field 'request.{sorted(request)[0]}' is not supported here"
        body = {"model": model, "contents": contents}
        return item["key"], {**body, "config": config} if config else body

    return check


# -- writing -------------------------------------------------------------------------------


def _anthropic_line(record: Record) -> dict[str, Any] | None:
    """A ``messages.batches.results`` line: succeeded, errored, canceled or expired."""
    if not record.terminal:
        return None
    body = body_of(record)
    result: dict[str, Any]
    if record.status == "completed" and record.state == "done" and body is not None:
        result = {"type": "succeeded", "message": body}
    elif record.status == "cancelled":
        result = {"type": "canceled"}
    elif record.error_code == "expired":
        result = {"type": "expired"}
    elif body is not None and body.get("type") == "errored":
        result = body  # the API's own error, as it came
    else:
        result = {"type": "errored", "error": {"type": "error", "error": {
            "type": record.error_code or "api_error",
            "message": record.error or f"the request ended {record.status}"}}}
    return {"custom_id": record.key, "result": result}


def _gemini_line(record: Record) -> dict[str, Any] | None:
    """A Gemini batch output line: the key and its response, or its error status."""
    if not record.terminal:
        return None
    body = body_of(record)
    if record.status == "completed" and record.state == "done" and body is not None:
        return {"key": record.key, "response": body}
    error = body.get("error") if body is not None else None
    if not isinstance(error, dict):
        error = {"message": record.error or f"the request ended {record.status}"}
    error.setdefault("status", (record.error_code or "UNKNOWN").upper())
    return {"key": record.key, "error": error}


def _read_existing(path: Path, fields: tuple[str, ...]) -> Existing:
    """The keys of an existing output file of this format (see :func:`read_existing`)."""
    found = Existing()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return found
    lines = data.split(b"\n")
    key, *rest = fields
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            if number == len(lines):  # a killed run's last line, cut short
                break
            raise NotOurs(number, "not JSON") from None
        if not (isinstance(item, dict) and isinstance(item.get(key), str)
                and any(name in item for name in rest)):
            raise NotOurs(number, f"not an output line ({key}, {' or '.join(rest)})")
        found.add(item[key])
    return found


# -- clients -------------------------------------------------------------------------------


def _open_openai(args: argparse.Namespace) -> Any:
    return open_client(args.base_url)


def _open_openai_batch(args: argparse.Namespace) -> Any:
    from .._providers import OpenAIBatch

    client = open_client(args.base_url)
    return None if client is None else OpenAIBatch(client, batch_delay=BATCH_DELAY)


def _open_anthropic(args: argparse.Namespace) -> Any:
    """Key and base URL from ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL (or --base-url)."""
    try:
        import anthropic
    except ImportError:
        say("--provider anthropic needs the anthropic SDK: pip install 'asyncbg[anthropic]'")
        return None
    from .._providers import AnthropicBatches

    if not os.environ.get("ANTHROPIC_API_KEY"):
        say("set ANTHROPIC_API_KEY to use --provider anthropic")
        return None
    client = anthropic.AsyncAnthropic(base_url=args.base_url or None, max_retries=0)
    return AnthropicBatches(client, batch_delay=BATCH_DELAY)


def _open_gemini(args: argparse.Namespace) -> Any:
    """Key from GEMINI_API_KEY or GOOGLE_API_KEY; base URL from --base-url, else the SDK's
    GOOGLE_GEMINI_BASE_URL, else Google's."""
    try:
        from google import genai
    except ImportError:
        say("--provider gemini needs the google-genai SDK: pip install 'asyncbg[gemini]'")
        return None
    from .._providers import GeminiBatches

    if not (os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")):
        say("set GEMINI_API_KEY (or GOOGLE_API_KEY) to use --provider gemini")
        return None
    from google.genai import types

    options = types.HttpOptions(base_url=args.base_url) if args.base_url else None
    return GeminiBatches(genai.Client(vertexai=False, http_options=options),
                         batch_delay=BATCH_DELAY)


def _openai_check(args: argparse.Namespace) -> Check:
    return check_request


_OPENAI_FIELDS = ("custom_id", "response", "error")

FORMATS: dict[str, Format] = {
    "openai": Format("openai", _openai_check, "custom_id", output_line, _OPENAI_FIELDS,
                     _open_openai, batch=False),
    "openai-batch": Format("openai-batch", _openai_check, "custom_id", output_line,
                           _OPENAI_FIELDS, _open_openai_batch),
    "anthropic": Format("anthropic", _anthropic_check, "custom_id", _anthropic_line,
                        ("custom_id", "result"), _open_anthropic),
    "gemini": Format("gemini", _gemini_check, "key", _gemini_line,
                     ("key", "response", "error"), _open_gemini),
}
