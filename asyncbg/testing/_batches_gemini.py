"""Gemini's Batch Mode (the Gemini Developer API, not Vertex) on the fake server.

``POST /v1/models/{model}:batchGenerateContent``, ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}:cancel`` and ``GET /v1/batches`` (google-genai's default version is
``v1``; ``v1beta`` is served too), in the shape ``google-genai`` parses (``batches.py``:
``_BatchJob_from_mldev``): a long-running operation whose ``metadata`` holds the batch, its
``state`` as ``BATCH_STATE_*`` (the SDK maps it to ``JOB_STATE_*``) and, once it has ended,
``output.inlinedResponses.inlinedResponses`` in request order.

Batches from an input file are served too, with the Files API they need: a resumable upload
(``POST /upload/v1beta/files``, then the bytes to the ``x-goog-upload-url`` it answered), a
JSONL file of ``{"key", "request"}`` lines named by ``inputConfig.fileName``, and once the
batch has ended ``output.responsesFile``: a JSONL file of ``{"key", "response"}`` or
``{"key", "error"}`` lines, read by ``GET /v1beta/files/{id}:download?alt=media``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Mapping
from typing import Any

from ._batch_core import Batch, Context, Item, echo, new_id, rfc3339, text_of
from ._faults import Route
from ._usage import TokenPlan
from ._wire import FakeAnswer, json_answer

_SUFFIX = ":batchGenerateContent"
_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch"
_NO_TOKENS = TokenPlan(0, 0, 0, 0)
_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
           500: "INTERNAL", 503: "UNAVAILABLE"}
_STATES = {"validating": "PENDING", "in_progress": "RUNNING", "finalizing": "RUNNING",
           "cancelling": "RUNNING", "completed": "SUCCEEDED", "failed": "FAILED",
           "cancelled": "CANCELLED", "expired": "EXPIRED"}
#: How a request that did not succeed is reported: a google.rpc.Status code and message.
_ERRORS = {
    "failed": (13, "Internal error while generating the response."),
    "cancelled": (1, "The batch was cancelled before this request ran."),
    "expired": (4, "The batch expired before this request ran."),
}

Query = Mapping[str, str]


class GeminiBatches:
    """The Gemini API's ``batches`` resource, with inlined requests and responses."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._batches: dict[str, Batch] = {}
        self._files: dict[str, bytes] = {}
        #: Resumable uploads under way: upload id -> (declared size, bytes so far, metadata).
        self._uploads: dict[str, tuple[int, bytearray, dict[str, Any]]] = {}

    def clear(self) -> None:
        self._batches.clear()
        self._files.clear()
        self._uploads.clear()

    def has_file(self, name: str) -> bool:
        """Whether the Files API holds ``name`` (``files/...``)."""
        return name.removeprefix("files/") in self._files

    def owns(self, bid: str) -> bool:
        return bid in self._batches

    def match(
        self, method: str, parts: list[str]
    ) -> tuple[Route, Callable[..., FakeAnswer], tuple[str, ...]] | None:
        match (method, *parts):
            case ("POST", *model) if model and model[-1].endswith(_SUFFIX):
                return "batch_create", self._create, ("/".join(model)[: -len(_SUFFIX)],)
            case ("GET", "batches"):
                return "batch_retrieve", self._list, ()
            case ("POST", "batches", bid) if bid.endswith(":cancel"):
                return "batch_cancel", self._cancel, (bid.removesuffix(":cancel"),)
            case ("GET", "batches", bid):
                return "batch_retrieve", self._retrieve, (bid,)
            case ("POST", "files"):
                return "files", self._upload, ()
            case ("GET", "files", fid) if fid.endswith(":download"):
                return "batch_results", self._download, (fid.removesuffix(":download"),)
        return None

    def fault(self, status: int, message: str, kind: str) -> FakeAnswer:
        return _error(status, message)

    def _create(self, model: str, *, query: Query, body: bytes) -> FakeAnswer:
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return _error(400, "Invalid JSON payload received.")
        batch = req.get("batch") if isinstance(req, dict) else None
        config = batch.get("inputConfig") if isinstance(batch, dict) else None
        if not isinstance(batch, dict) or not isinstance(config, dict):
            return _error(400, "batch.input_config is required.")
        requests: Any
        if "fileName" in config:
            requests = self._file_requests(str(config["fileName"]))
            if isinstance(requests, FakeAnswer):
                return requests
        else:
            holder = config.get("requests")
            requests = holder.get("requests") if isinstance(holder, dict) else None
        if not isinstance(requests, list) or not requests:
            return _error(400, "batch.input_config.requests.requests must not be empty.")
        if not all(isinstance(r, dict) for r in requests):
            return _error(400, "Each inlined request must be an object.")
        ctx = self._ctx
        now = ctx.now()
        start = now + ctx.timing.validating
        items = [self._item(n, r, start) for n, r in enumerate(requests)]
        bid = new_id("", 24, string.ascii_lowercase + string.digits)
        b = Batch(bid, now, ctx.wall(), ctx.timing, items,
                  info={"model": model, "display_name": batch.get("displayName") or bid,
                        "file": "fileName" in config})
        self._batches[bid] = b
        ctx.created(b)
        return json_answer(200, _operation(b, now, self._store))

    def _item(self, n: int, entry: dict[str, Any], start: float) -> Item:
        metadata: dict[str, Any] = entry.get("metadata") or {}
        if not isinstance(metadata, dict):
            return Item(str(n), start, "invalid", _NO_TOKENS, entry,
                        "* InlinedRequest.metadata: must be a map of strings")
        key = str(metadata.get("key", n))
        request = entry.get("request")
        contents = request.get("contents") if isinstance(request, dict) else None
        if not isinstance(contents, list) or not contents:
            return Item(key, start, "invalid", _NO_TOKENS, entry,
                        "* GenerateContentRequest.contents: contents is not specified")
        try:
            end, fate, tokens = self._ctx.plan(key, metadata, len(text_of(contents)), start)
        except ValueError as exc:
            return Item(key, start, "invalid", _NO_TOKENS, entry, str(exc))
        return Item(key, end, fate, tokens, entry)

    def _retrieve(self, bid: str, *, query: Query, body: bytes) -> FakeAnswer:
        b = self._batches.get(bid)
        if b is None:
            return _not_found()
        ctx = self._ctx
        ctx.polled()
        now = ctx.now()
        if b.phase(now) == "ended" and not b.info["file"]:
            ctx.fetched()  # the results come inlined in the batch
        return json_answer(200, _operation(b, now, self._store))

    def _list(self, *, query: Query, body: bytes) -> FakeAnswer:
        try:
            size = min(max(int(query.get("pageSize", "50")), 1), 1000)
            start = int(query.get("pageToken") or 0)
        except ValueError:
            return _error(400, "pageSize and pageToken must be integers.")
        newest = list(reversed(self._batches))
        now = self._ctx.now()
        page: dict[str, Any] = {"operations": [_operation(self._batches[i], now, self._store)
                                               for i in newest[start:start + size]]}
        if start + size < len(newest):
            page["nextPageToken"] = str(start + size)
        return json_answer(200, page)

    # -- the Files API -----------------------------------------------------------------------

    def _upload(self, *, query: Query, body: bytes) -> FakeAnswer:
        """A resumable upload: its start (the file's metadata), then its bytes; the upload
        is final once the declared size has arrived."""
        uid = query.get("upload_id")
        if uid is None:
            try:
                meta = json.loads(body or b"{}").get("file") or {}
                size = int(meta.get("sizeBytes") or 0)
            except (ValueError, AttributeError, TypeError):
                return _error(400, "Invalid file metadata.")
            uid = new_id("", 16, string.ascii_lowercase + string.digits)
            self._uploads[uid] = (size, bytearray(), meta)
            url = f"http://fake-gemini.invalid/upload/v1beta/files?upload_id={uid}"
            return json_answer(200, {}, {"x-goog-upload-url": url,
                                         "x-goog-upload-status": "active"})
        upload = self._uploads.get(uid)
        if upload is None:
            return _not_found()
        size, data, meta = upload
        data += body
        if len(data) < size:
            return json_answer(200, {}, {"x-goog-upload-status": "active"})
        del self._uploads[uid]
        self._ctx.uploaded()
        name = self._store(bytes(data))
        info = {"name": name, "displayName": meta.get("displayName") or name,
                "mimeType": meta.get("mimeType") or "application/octet-stream",
                "sizeBytes": str(len(data)), "state": "ACTIVE", "source": "UPLOADED",
                "createTime": rfc3339(self._ctx.wall())}
        return json_answer(200, {"file": info}, {"x-goog-upload-status": "final"})

    def _store(self, data: bytes) -> str:
        fid = new_id("", 12, string.ascii_lowercase + string.digits)
        self._files[fid] = data
        return f"files/{fid}"

    def _download(self, fid: str, *, query: Query, body: bytes) -> FakeAnswer:
        data = self._files.get(fid)
        if data is None:
            return _not_found()
        self._ctx.fetched()
        return FakeAnswer(200, {"content-type": "application/octet-stream"}, data)

    def _file_requests(self, name: str) -> list[Any] | FakeAnswer:
        """An input file's ``{"key", "request"}`` lines as inlined requests keyed the same."""
        data = self._files.get(name.removeprefix("files/"))
        if data is None:
            return _error(400, f"File {name} was not found.", "INVALID_ARGUMENT")
        requests: list[Any] = []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                return _error(400, f"{name} line {n} is not JSON.")
            if not isinstance(entry, dict):
                return _error(400, f"{name} line {n} is not an object.")
            key = entry.get("key")
            requests.append({"request": entry.get("request"),
                             "metadata": {"key": str(key if key is not None else n - 1)}})
        return requests

    def _cancel(self, bid: str, *, query: Query, body: bytes) -> FakeAnswer:
        b = self._batches.get(bid)
        if b is None:
            return _not_found()
        ctx = self._ctx
        ctx.cancelled()
        now = ctx.now()
        if b.phase(now) == "ended" and ctx.cancel_finished == "error":
            return _error(400, f"Batch batches/{bid} has already ended.", "FAILED_PRECONDITION")
        b.cancel(now)
        return json_answer(200, {})


def _operation(b: Batch, now: float, store: Callable[[bytes], str]) -> dict[str, Any]:
    phase = b.phase(now)
    ended = phase == "ended"
    n = len(b.items)
    if ended:
        tally = b.tally()
        ok = tally["completed"] + tally["incomplete"]
        bad = n - ok
    else:
        ok, bad = b.done(now) if phase != "validating" else (0, 0)
    name = f"batches/{b.id}"
    metadata: dict[str, Any] = {
        "@type": _TYPE, "model": b.info["model"], "displayName": b.info["display_name"],
        "name": name,
        "createTime": rfc3339(b.created_wall),
        "updateTime": rfc3339(b.wall(min(now, b.ended_at))),
        "batchStats": {"requestCount": str(n), "successfulRequestCount": str(ok),
                       "failedRequestCount": str(bad), "pendingRequestCount": str(n - ok - bad)},
        "state": "BATCH_STATE_" + _STATES[b.ending() if ended else phase],
    }
    if ended:
        metadata["endTime"] = rfc3339(b.wall(b.ended_at))
        if b.info["file"]:  # the responses as a file, written once
            if "file" not in b.cache:
                lines = []
                for item in b.items:
                    out = _response(b, item)
                    out.pop("metadata", None)
                    lines.append(json.dumps({"key": item.key, **out}).encode() + b"\n")
                b.cache["file"] = store(b"".join(lines))
            metadata["output"] = {"responsesFile": b.cache["file"]}
        else:
            inlined = b.cache.get("inlined")
            if inlined is None:
                b.cache["inlined"] = inlined = [_response(b, i) for i in b.items]
            metadata["output"] = {"inlinedResponses": {"inlinedResponses": inlined}}
    return {"name": name, "metadata": metadata, "done": ended}


def _response(b: Batch, item: Item) -> dict[str, Any]:
    final = b.final(item)
    entry = item.request
    out: dict[str, Any] = {}
    if isinstance(entry.get("metadata"), dict):
        out["metadata"] = entry["metadata"]
    if final == "invalid":
        out["error"] = {"code": 3, "message": item.problem}
        return out
    if final in _ERRORS:
        code, message = _ERRORS[final]
        out["error"] = {"code": code, "message": message}
        return out
    request = entry["request"]
    config = request.get("generationConfig")
    cap = config.get("maxOutputTokens") if isinstance(config, dict) else None
    plan = item.tokens
    produced = plan.output if cap is None else min(plan.output, cap)
    text = echo(text_of(request["contents"]))
    if final == "incomplete":
        produced = cap if cap is not None else plan.output // 2
        text = text[: max(len(text) // 2, 1)]
    usage = {"promptTokenCount": plan.input, "candidatesTokenCount": produced,
             "totalTokenCount": plan.input + produced + plan.reasoning}
    if plan.reasoning:
        usage["thoughtsTokenCount"] = plan.reasoning
    if plan.cached:
        usage["cachedContentTokenCount"] = plan.cached
    model: str = b.info["model"]
    out["response"] = {
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                        "finishReason": "STOP" if final == "completed" else "MAX_TOKENS",
                        "index": 0}],
        "usageMetadata": usage,
        "modelVersion": model.removeprefix("models/"),
        "responseId": new_id("", 22),
    }
    return out


def _error(status: int, message: str, code: str | None = None) -> FakeAnswer:
    return json_answer(status, {"error": {"code": status, "message": message,
                                          "status": code or _STATUS.get(status, "UNKNOWN")}})


def _not_found() -> FakeAnswer:
    return _error(404, "Requested entity was not found.")
