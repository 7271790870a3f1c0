"""Anthropic's Message Batches on the fake server: ``/v1/messages/batches``.

Wire formats follow the ``anthropic`` SDK's ``MessageBatch``, ``MessageBatchRequestCounts``,
``MessageBatchIndividualResponse`` and ``Message`` types. As the SDK documents, the counts other
than ``processing`` stay zero, and ``results_url`` null, until the whole batch has ended.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from ._batch_core import Batch, Context, Item, echo, new_id, page_after, rfc3339, text_of
from ._faults import Route
from ._usage import TokenPlan
from ._wire import FakeAnswer, json_answer, request_id

_MAX_REQUESTS = 100_000
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_NO_TOKENS = TokenPlan(0, 0, 0, 0)
_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
          503: "overloaded_error"}
_PHASES = {"validating": "in_progress", "in_progress": "in_progress",
           "finalizing": "in_progress", "cancelling": "canceling", "ended": "ended"}

Query = Mapping[str, str]


class AnthropicBatches:
    """``/v1/messages/batches``: create, retrieve, list, cancel and results."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._batches: dict[str, Batch] = {}

    def clear(self) -> None:
        self._batches.clear()

    def match(
        self, method: str, parts: list[str]
    ) -> tuple[Route, Callable[..., FakeAnswer], tuple[str, ...]] | None:
        match (method, *parts):
            case ("POST", "messages", "batches"):
                return "batch_create", self._create, ()
            case ("GET", "messages", "batches"):
                return "batch_retrieve", self._list, ()
            case ("GET", "messages", "batches", bid):
                return "batch_retrieve", self._retrieve, (bid,)
            case ("POST", "messages", "batches", bid, "cancel"):
                return "batch_cancel", self._cancel, (bid,)
            case ("GET", "messages", "batches", bid, "results"):
                return "batch_results", self._results, (bid,)
        return None

    def fault(self, status: int, message: str, kind: str) -> FakeAnswer:
        return _error(status, message, _TYPES.get(status, "api_error"))

    def _create(self, *, query: Query, body: bytes) -> FakeAnswer:
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return _error(400, "The request body is not valid JSON.")
        requests = req.get("requests") if isinstance(req, dict) else None
        if not isinstance(requests, list) or not requests:
            return _error(400, "requests: Field required and must be a non-empty list.")
        if len(requests) > _MAX_REQUESTS:
            return _error(400, f"requests: A batch holds at most {_MAX_REQUESTS} requests.")
        seen: set[str] = set()
        for n, r in enumerate(requests):
            key = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(key, str) or not _CUSTOM_ID.match(key):
                return _error(400, f"requests.{n}.custom_id: String should match pattern "
                                   "'^[a-zA-Z0-9_-]{1,64}$'")
            if key in seen:
                return _error(400, f"requests.{n}.custom_id: Duplicate custom_id {key!r}; "
                                   "each must be unique within the batch.")
            if not isinstance(r.get("params"), dict):
                return _error(400, f"requests.{n}.params: Field required")
            seen.add(key)
        ctx = self._ctx
        now = ctx.now()
        start = now + ctx.timing.validating
        batch = Batch(new_id("msgbatch_01"), now, ctx.wall(), ctx.timing,
                      [self._item(r["custom_id"], r["params"], start) for r in requests])
        self._batches[batch.id] = batch
        ctx.created(batch)
        return json_answer(200, _body(batch, now))

    def _item(self, key: str, params: dict[str, Any], start: float) -> Item:
        problem = _params_problem(params)
        if problem is not None:
            return Item(key, start, "invalid", _NO_TOKENS, params, problem)
        text = text_of(params.get("messages"))
        try:
            # Message params carry no free-form metadata: scripts come from server.batches.
            end, fate, tokens = self._ctx.plan(key, {}, len(text), start)
        except ValueError as exc:
            return Item(key, start, "invalid", _NO_TOKENS, params, str(exc))
        return Item(key, end, fate, tokens, params)

    def _retrieve(self, bid: str, *, query: Query, body: bytes) -> FakeAnswer:
        batch = self._batches.get(bid)
        if batch is None:
            return _not_found(bid)
        self._ctx.polled()
        return json_answer(200, _body(batch, self._ctx.now()))

    def _list(self, *, query: Query, body: bytes) -> FakeAnswer:
        try:
            limit = min(max(int(query.get("limit", "20")), 1), 1000)
        except ValueError:
            return _error(400, "limit: Input should be a valid integer")
        newest = list(reversed(self._batches))
        if "before_id" in query and query["before_id"] in newest:
            end = newest.index(query["before_id"])
            ids, more = newest[max(end - limit, 0):end], end - limit > 0
        else:
            ids, more = page_after(newest, query.get("after_id"), limit)
        now = self._ctx.now()
        return json_answer(200, {"data": [_body(self._batches[i], now) for i in ids],
                                 "has_more": more, "first_id": ids[0] if ids else None,
                                 "last_id": ids[-1] if ids else None})

    def _cancel(self, bid: str, *, query: Query, body: bytes) -> FakeAnswer:
        batch = self._batches.get(bid)
        if batch is None:
            return _not_found(bid)
        ctx = self._ctx
        ctx.cancelled()
        now = ctx.now()
        if batch.phase(now) == "ended" and ctx.cancel_finished == "error":
            return _error(400, f"Message Batch {bid} has ended and can no longer be canceled.")
        batch.cancel(now)
        return json_answer(200, _body(batch, now))

    def _results(self, bid: str, *, query: Query, body: bytes) -> FakeAnswer:
        batch = self._batches.get(bid)
        if batch is None:
            return _not_found(bid)
        if batch.phase(self._ctx.now()) != "ended":
            return _error(400, f"Results of Message Batch {bid} are not available until it "
                               "has ended; poll it until processing_status is 'ended'.")
        self._ctx.fetched()
        results: bytes | None = batch.cache.get("results")
        if results is None:
            lines = (json.dumps({"custom_id": i.key, "result": _result(batch, i)})
                     for i in batch.items)
            batch.cache["results"] = results = ("\n".join(lines) + "\n").encode()
        return FakeAnswer(200, {"content-type": "application/binary"}, results)


def _body(b: Batch, now: float) -> dict[str, Any]:
    phase = b.phase(now)
    ended = phase == "ended"
    counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
    if ended:
        tally = b.tally()
        counts.update(succeeded=tally["completed"] + tally["incomplete"],
                      errored=tally["failed"] + tally["invalid"], canceled=tally["cancelled"],
                      expired=tally["expired"])
    else:
        counts["processing"] = len(b.items)
    return {
        "id": b.id, "type": "message_batch", "processing_status": _PHASES[phase],
        "request_counts": counts,
        "created_at": rfc3339(b.created_wall),
        "expires_at": rfc3339(b.wall(b.expires_at)),
        "ended_at": rfc3339(b.wall(b.ended_at)) if ended else None,
        "cancel_initiated_at": (rfc3339(b.wall(b.cancelled_at))
                                if b.cancelled_at is not None else None),
        "archived_at": None,
        # Relative, so the SDK joins it to the base URL the client was given.
        "results_url": f"/v1/messages/batches/{b.id}/results" if ended else None,
    }


def _result(b: Batch, item: Item) -> dict[str, Any]:
    final = b.final(item)
    if final == "cancelled":
        return {"type": "canceled"}
    if final == "expired":
        return {"type": "expired"}
    if final == "failed" or final == "invalid":
        kind, message = (("invalid_request_error", item.problem) if final == "invalid" else
                         ("api_error", "Internal server error while processing this request."))
        return {"type": "errored", "error": {"type": "error", "request_id": request_id(),
                                             "error": {"type": kind, "message": message}}}
    params = item.request
    cap: int = params["max_tokens"]
    plan = item.tokens
    thinking = isinstance(params.get("thinking"), dict) and params["thinking"].get(
        "type") in ("enabled", "adaptive")
    planned = plan.output + (plan.reasoning if thinking else 0)
    produced = min(planned, cap) if final == "completed" else cap
    text = echo(text_of(params.get("messages")))
    if final == "incomplete":
        text = text[: max(len(text) // 2, 1)]
    return {"type": "succeeded", "message": {
        "id": new_id("msg_01"), "type": "message", "role": "assistant",
        "model": params["model"],
        "content": [{"type": "text", "text": text, "citations": None}],
        "stop_reason": "max_tokens" if produced >= cap else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": plan.input - plan.cached, "output_tokens": produced,
                  "cache_read_input_tokens": plan.cached, "cache_creation_input_tokens": 0,
                  "service_tier": "batch"},
    }}


def _params_problem(params: dict[str, Any]) -> str | None:
    """Why the Messages API would refuse ``params``; ``None`` if it would not."""
    if not isinstance(params.get("model"), str) or not params["model"]:
        return "model: Field required"
    cap = params.get("max_tokens")
    if type(cap) is not int or cap < 1:
        return "max_tokens: Field required; it must be an integer >= 1"
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required; it must be a non-empty list"
    if params.get("stream"):
        return "stream: Requests in a Message Batch cannot be streamed"
    return None


def _error(status: int, message: str, kind: str = "invalid_request_error") -> FakeAnswer:
    return json_answer(status, {"type": "error", "error": {"type": kind, "message": message},
                                "request_id": request_id()})


def _not_found(bid: str) -> FakeAnswer:
    return _error(404, f"Message Batch {bid} not found.", "not_found_error")
