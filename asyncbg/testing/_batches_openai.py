"""OpenAI's Batch API on the fake server: ``/v1/files`` and ``/v1/batches`` for ``/v1/responses``.

Wire formats follow the ``openai`` SDK's ``Batch``, ``BatchRequestCounts``, ``BatchUsage`` and
``FileObject`` types. Each line of the output and error files is
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``; a request
that never ran (its batch was cancelled or expired) has ``response: null`` and an ``error``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from typing import Any

from ._batch_core import Batch, Context, Item, new_id, page_after
from ._bodies import response_body
from ._faults import Route
from ._requests import CreateRequest, Rejection, parse_create
from ._state import Resp
from ._usage import TokenPlan
from ._wire import FakeAnswer, error_answer, json_answer, request_id

_ENDPOINT = "/v1/responses"
_MAX_REQUESTS = 50_000
_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_NO_TOKENS = TokenPlan(0, 0, 0, 0)
_FAILED_BODY: dict[str, Any] = {"error": {"message": "The model failed to generate a response.",
                          "type": "server_error", "param": None, "code": "server_error"}}
_NOT_RUN = {
    "cancelled": ("batch_cancelled",
                  "This request was not executed because the batch was cancelled."),
    "expired": ("batch_expired",
                "This request could not be executed before the completion window expired."),
}

Query = Mapping[str, str]


@dataclass(slots=True)
class _File:
    id: str
    filename: str
    purpose: str
    created_at: int
    content: bytes


class OpenAIBatches:
    """``/v1/files`` and ``/v1/batches``."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._files: dict[str, _File] = {}
        self._batches: dict[str, Batch] = {}

    def clear(self) -> None:
        self._files.clear()
        self._batches.clear()

    def match(
        self, method: str, parts: list[str]
    ) -> tuple[Route, Callable[..., FakeAnswer], tuple[str, ...]] | None:
        match (method, *parts):
            case ("POST", "files"):
                return "files", self._upload, ()
            case ("GET", "files", fid):
                return "files", self._file, (fid,)
            case ("DELETE", "files", fid):
                return "files", self._delete, (fid,)
            case ("GET", "files", fid, "content"):
                return "batch_results", self._content, (fid,)
            case ("POST", "batches"):
                return "batch_create", self._create, ()
            case ("GET", "batches"):
                return "batch_retrieve", self._list, ()
            case ("GET", "batches", bid):
                return "batch_retrieve", self._retrieve, (bid,)
            case ("POST", "batches", bid, "cancel"):
                return "batch_cancel", self._cancel, (bid,)
        return None

    def fault(self, status: int, message: str, kind: str) -> FakeAnswer:
        return error_answer(self._ctx.error_style, status, message, kind)

    # -- files -----------------------------------------------------------------------------

    def _upload(self, *, query: Query, body: bytes) -> FakeAnswer:
        fields = _multipart(body)
        if "file" not in fields:
            return self._invalid("Missing required parameter: 'file'.", "file")
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if purpose not in _PURPOSES:
            return self._invalid(f"Invalid value for 'purpose': {purpose!r}.", "purpose")
        filename, content = fields["file"]
        f = _File(new_id("file-", 22), filename or "upload", purpose, int(self._ctx.wall()),
                  content)
        self._files[f.id] = f
        self._ctx.uploaded()
        return json_answer(200, _file_body(f))

    def _file(self, fid: str, *, query: Query, body: bytes) -> FakeAnswer:
        f = self._files.get(fid)
        return json_answer(200, _file_body(f)) if f else self._no_file(fid)

    def _delete(self, fid: str, *, query: Query, body: bytes) -> FakeAnswer:
        if self._files.pop(fid, None) is None:
            return self._no_file(fid)
        return json_answer(200, {"id": fid, "object": "file", "deleted": True})

    def _content(self, fid: str, *, query: Query, body: bytes) -> FakeAnswer:
        f = self._files.get(fid)
        if f is None:
            return self._no_file(fid)
        if f.purpose == "batch_output":
            self._ctx.fetched()
        return FakeAnswer(200, {"content-type": "application/octet-stream"}, f.content)

    # -- batches ---------------------------------------------------------------------------

    def _create(self, *, query: Query, body: bytes) -> FakeAnswer:
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return self._invalid("We could not parse the JSON body of your request.", None)
        if not isinstance(req, dict):
            return self._invalid("The request body must be a JSON object.", None)
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(req.get(name), str):
                return self._invalid(f"Missing required parameter: '{name}'.", name,
                                     "missing_required_parameter")
        if req["endpoint"] != _ENDPOINT:
            return self._invalid(f"This fake serves batches of {_ENDPOINT} only; got "
                                 f"{req['endpoint']!r}.", "endpoint", "invalid_value")
        if req["completion_window"] != "24h":
            return self._invalid("Invalid value for 'completion_window': only '24h' is "
                                 "supported.", "completion_window", "invalid_value")
        metadata = req.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            return self._invalid("Invalid type for 'metadata': expected an object.", "metadata")
        f = self._files.get(req["input_file_id"])
        if f is None:
            return self._no_file(req["input_file_id"])
        if f.purpose != "batch":
            return self._invalid("The input file must be uploaded with purpose 'batch'.",
                                 "input_file_id", "invalid_value")
        ctx = self._ctx
        now = ctx.now()
        items, errors = self._items(f.content, now + ctx.timing.validating)
        model = next((i.request.model for i in items if isinstance(i.request, CreateRequest)),
                     None)
        batch = Batch(new_id("batch_", 32, "0123456789abcdef"), now, ctx.wall(), ctx.timing,
                      items, errors=errors or None,
                      info={"input_file_id": f.id, "metadata": metadata, "model": model})
        self._batches[batch.id] = batch
        ctx.created(batch)
        return json_answer(200, self._body(batch, now))

    def _items(self, content: bytes, start: float) -> tuple[list[Item], list[dict[str, Any]]]:
        """The file's requests, and what makes the batch fail validation (errors by line)."""
        items: list[Item] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                errors.append(_line_error(n, "invalid_json_line", "This line is not valid JSON."))
                continue
            problem = _line_problem(obj, seen)
            if problem is not None:
                errors.append(_line_error(n, *problem))
                continue
            key: str = obj["custom_id"]
            seen.add(key)
            parsed = parse_create(json.dumps(obj["body"]).encode(),
                                  refuse_background_stream=False)
            if isinstance(parsed, Rejection):
                items.append(Item(key, start, "invalid", _NO_TOKENS, parsed, parsed.message))
                continue
            try:
                end, fate, tokens = self._ctx.plan(key, parsed.metadata, len(parsed.input_text),
                                                   start)
            except ValueError as exc:
                items.append(Item(key, start, "invalid", _NO_TOKENS,
                                  Rejection(str(exc), "metadata", "invalid_value"), str(exc)))
                continue
            items.append(Item(key, end, fate, tokens, parsed))
        if not items and not errors:
            errors.append(_line_error(None, "empty_file", "The input file has no requests."))
        if len(items) > _MAX_REQUESTS:
            errors.append(_line_error(None, "too_many_requests",
                                      f"A batch holds at most {_MAX_REQUESTS} requests."))
        return items, errors

    def _retrieve(self, bid: str, *, query: Query, body: bytes) -> FakeAnswer:
        batch = self._batches.get(bid)
        if batch is None:
            return self._no_batch(bid)
        self._ctx.polled()
        return json_answer(200, self._body(batch, self._ctx.now()))

    def _list(self, *, query: Query, body: bytes) -> FakeAnswer:
        try:
            limit = min(max(int(query.get("limit", "20")), 1), 100)
        except ValueError:
            return self._invalid("limit must be an integer.", "limit")
        ids, more = page_after(list(reversed(self._batches)), query.get("after"), limit)
        now = self._ctx.now()
        data = [self._body(self._batches[i], now) for i in ids]
        return json_answer(200, {"object": "list", "data": data, "has_more": more,
                                 "first_id": ids[0] if ids else None,
                                 "last_id": ids[-1] if ids else None})

    def _cancel(self, bid: str, *, query: Query, body: bytes) -> FakeAnswer:
        batch = self._batches.get(bid)
        if batch is None:
            return self._no_batch(bid)
        ctx = self._ctx
        ctx.cancelled()
        now = ctx.now()
        if batch.phase(now) == "ended" and ctx.cancel_finished == "error":
            return self._invalid(f"Cannot cancel a batch with status '{batch.ending()}'.", None)
        batch.cancel(now)
        return json_answer(200, self._body(batch, now))

    # -- answers ---------------------------------------------------------------------------

    def _body(self, b: Batch, now: float) -> dict[str, Any]:
        phase = b.phase(now)
        status = b.ending() if phase == "ended" else phase
        ended = phase == "ended"

        def at(t: float | None, when: bool = True) -> int | None:
            return int(b.wall(t)) if when and t is not None else None

        started = b.errors is None and phase != "validating"
        ok, bad = b.done(now) if started else (0, 0)
        body: dict[str, Any] = {
            "id": b.id, "object": "batch", "endpoint": _ENDPOINT,
            "errors": {"object": "list", "data": b.errors} if b.errors and ended else None,
            "input_file_id": b.info["input_file_id"], "completion_window": "24h",
            "status": status, "output_file_id": None, "error_file_id": None,
            "created_at": int(b.created_wall), "in_progress_at": at(b.ready_at, started),
            "expires_at": at(b.expires_at), "finalizing_at": at(
                b.last_end, started and now >= b.last_end and b.cancelled_at is None),
            "completed_at": at(b.ended_at, status == "completed"),
            "failed_at": at(b.ended_at, status == "failed"),
            "expired_at": at(b.ended_at, status == "expired"),
            "cancelling_at": at(b.cancelled_at),
            "cancelled_at": at(b.ended_at, status == "cancelled"),
            "request_counts": {"total": len(b.items) if started else 0,
                               "completed": ok, "failed": bad},
            "metadata": b.info["metadata"], "model": b.info["model"], "usage": None,
        }
        if ended and b.errors is None:
            self._seal(b)
            body.update(output_file_id=b.info["output_file_id"],
                        error_file_id=b.info["error_file_id"], usage=b.cache["usage"])
        return body

    def _seal(self, b: Batch) -> None:
        """Write an ended batch's output and error files, once."""
        if "usage" in b.cache:
            return
        out: list[str] = []
        err: list[str] = []
        usage: dict[str, Any] = {
            "input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0}
        for item in b.items:
            line = self._line(b, item)
            response = line["response"]
            if response is not None and response["status_code"] == 200:
                out.append(json.dumps(line))
                used = response["body"]["usage"] or {}
                for k in ("input_tokens", "output_tokens", "total_tokens"):
                    usage[k] += used.get(k, 0)
                usage["input_tokens_details"]["cached_tokens"] += (
                    used.get("input_tokens_details") or {}).get("cached_tokens", 0)
                usage["output_tokens_details"]["reasoning_tokens"] += (
                    used.get("output_tokens_details") or {}).get("reasoning_tokens", 0)
            else:
                err.append(json.dumps(line))
        for kind, lines in (("output", out), ("error", err)):
            fid = None
            if lines:
                f = _File(new_id("file-", 22), f"{b.id}_{kind}.jsonl", "batch_output",
                          int(b.wall(b.ended_at)), ("\n".join(lines) + "\n").encode())
                self._files[fid := f.id] = f
            b.info[f"{kind}_file_id"] = fid
        b.cache["usage"] = usage

    def _line(self, b: Batch, item: Item) -> dict[str, Any]:
        final = b.final(item)
        line: dict[str, Any] = {"id": f"batch_req_{secrets.token_hex(16)}",
                                "custom_id": item.key, "response": None, "error": None}
        if final in _NOT_RUN:
            code, message = _NOT_RUN[final]
            line["error"] = {"code": code, "message": message}
            return line
        status, body = 500, _FAILED_BODY
        if final == "invalid":
            rej: Rejection = item.request
            status, body = 400, {"error": {"message": rej.message, "type":
                                           "invalid_request_error", "param": rej.param,
                                           "code": rej.code}}
        elif final == "completed" or final == "incomplete":
            req: CreateRequest = item.request
            start = b.ready_at
            r = Resp(id=f"resp_{secrets.token_hex(24)}", created=start,
                     created_wall=int(b.wall(start)), start_at=start, end_at=item.end_at,
                     outcome=final, model=req.model, background=False, store=req.store,
                     metadata=req.metadata, input_text=req.input_text[:2000], tokens=item.tokens,
                     max_output_tokens=req.max_output_tokens, extra=req.echo)
            status, body = 200, response_body(r, final)
            # openai's ResponseUsage requires it; the Responses fake's usage predates it.
            body["usage"]["input_tokens_details"].setdefault("cache_write_tokens", 0)
        line["response"] = {"status_code": status, "request_id": request_id(), "body": body}
        return line

    def _invalid(self, message: str, param: str | None, code: str | None = None) -> FakeAnswer:
        return error_answer(self._ctx.error_style, 400, message, "invalid_request_error", param,
                            code)

    def _no_file(self, fid: str) -> FakeAnswer:
        return error_answer(self._ctx.error_style, 404, f"No such File object: {fid}",
                            "invalid_request_error", "id")

    def _no_batch(self, bid: str) -> FakeAnswer:
        return error_answer(self._ctx.error_style, 404, f"No batch found with id '{bid}'.",
                            "invalid_request_error")


def _line_problem(obj: object, seen: set[str]) -> tuple[str, str] | None:
    if not isinstance(obj, dict):
        return "invalid_json_line", "Each line must be a JSON object."
    key = obj.get("custom_id")
    if not isinstance(key, str) or not key:
        return "missing_custom_id", "Each request needs a non-empty string 'custom_id'."
    if key in seen:
        return "duplicate_custom_id", f"The custom_id {key!r} is used more than once."
    if obj.get("method") != "POST":
        return "invalid_method", "The method of each request must be 'POST'."
    if obj.get("url") != _ENDPOINT:
        return "mismatched_url", f"The url of each request must be the batch's {_ENDPOINT}."
    if not isinstance(obj.get("body"), dict):
        return "missing_body", "Each request needs a JSON object 'body'."
    return None


def _line_error(line: int | None, code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _file_body(f: _File) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": len(f.content), "created_at": f.created_at,
            "filename": f.filename, "purpose": f.purpose, "status": "processed",
            "expires_at": None, "status_details": None}


def _multipart(body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A ``multipart/form-data`` body's fields: name -> (filename, content). The boundary is
    read off the body's first line, which is all the server is handed."""
    first = body.split(b"\r\n", 1)[0]
    if not first.startswith(b"--") or len(first) < 3:
        return {}
    head = b'Content-Type: multipart/form-data; boundary="' + first[2:] + b'"\r\n\r\n'
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.walk():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields
