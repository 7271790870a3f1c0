"""The JSON the fake server answers with: a response object at a status, and its stream events."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from ._research import research_output, weave
from ._state import Resp

_FINAL_EVENTS = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "response.cancelled"}
)


def response_body(r: Resp, status: str) -> dict[str, Any]:
    """``r`` as a Responses API object with status ``status``."""
    body: dict[str, Any] = {
        "id": r.id,
        "object": "response",
        "created_at": r.created_wall,
        "status": status,
        "background": r.background,
        "model": r.model,
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "store": r.store,
        "metadata": r.metadata,
        "error": None,
        "incomplete_details": None,
        "max_output_tokens": r.max_output_tokens,
        "usage": usage(r, status),
        **r.extra,
    }
    if status == "completed" or status == "incomplete":
        text = reply(r)
        if status == "incomplete":
            text = text[: max(len(text) // 2, 1)]
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        body["output"] = [_message(r.id, text, status)]
        if "reasoning.encrypted_content" in (r.extra.get("include") or ()):
            # What a zero-data-retention caller asks for: the reasoning, opaque, to pass back.
            body["output"].insert(0, {
                "type": "reasoning", "id": f"rs_{r.id[5:]}", "summary": [],
                "encrypted_content": base64.b64encode(f"enc:{r.id}".encode()).decode(),
            })
        research_output(r, body)  # a request with a web search tool: its searches first
    elif status == "failed":
        body["error"] = {"code": "server_error",
                         "message": "The model failed to generate a response."}
    return body


def usage(r: Resp, status: str) -> dict[str, Any] | None:
    """What ``r`` has used by ``status``: all of it when completed, up to the cap when
    incomplete, the share of its ``in_progress`` time when cancelled; nothing when failed or
    cancelled before it started."""
    plan = r.tokens
    cap = r.max_output_tokens
    planned = plan.planned_output if cap is None else min(plan.planned_output, cap)
    if status == "completed":
        return plan.report(planned)
    if status == "incomplete":
        return plan.report(cap if cap is not None else planned // 2)
    if status == "cancelled" and r.cancelled_at is not None and r.cancelled_at >= r.start_at:
        span = r.end_at - r.start_at
        share = min((r.cancelled_at - r.start_at) / span, 1.0) if span > 0 else 1.0
        return plan.report(round(planned * share))
    return None


async def events(
    r: Resp, after: int, n_deltas: int, clock: Callable[[], float],
    seen: Callable[[Resp, float], None],
) -> AsyncIterator[bytes]:
    """A background stream's server-sent events, from ``after + 1``, paced by the timeline.
    ``seen`` is told when the final event goes out."""
    for seq, at, event in event_script(r, n_deltas):
        if seq <= after:
            continue
        wait = at - clock()
        if wait > 0:
            await anyio.sleep(wait)
        if r.cancelled_at is not None and at > r.cancelled_at:
            return  # no stream event exists for cancellation; the stream just ends
        event["sequence_number"] = seq
        if event["type"] in _FINAL_EVENTS:
            seen(r, clock())
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def event_script(r: Resp, n_deltas: int) -> list[tuple[int, float, dict[str, Any]]]:
    """A background stream's events: (sequence number, when it is due, event)."""
    final = r.outcome if r.outcome != "stuck" else "queued"
    text = reply(r) if final in ("completed", "incomplete") else ""
    n = max(n_deltas, 1)
    chunks = [text[i * len(text) // n:(i + 1) * len(text) // n] for i in range(n)]
    span = r.end_at - r.start_at if math.isfinite(r.end_at) else 0.0
    events: list[tuple[float, dict[str, Any]]] = [
        (r.created, {"type": "response.created", "response": response_body(r, "queued")}),
    ]
    if final == "queued":
        return [(i, at, e) for i, (at, e) in enumerate(events)]
    events.append((r.start_at, {"type": "response.in_progress",
                                "response": response_body(r, "in_progress")}))
    item = f"msg_{r.id[5:]}"
    for i, chunk in enumerate(chunks):
        if chunk:
            events.append((r.start_at + span * (i + 1) / (n + 1), {
                "type": "response.output_text.delta", "item_id": item, "output_index": 0,
                "content_index": 0, "delta": chunk, "logprobs": [],
            }))
    if text:
        events.append((r.end_at, {"type": "response.output_text.done", "item_id": item,
                                  "output_index": 0, "content_index": 0, "text": text,
                                  "logprobs": []}))
    events.append((r.end_at, {"type": f"response.{final}", "response": response_body(r, final)}))
    events = weave(r, events)  # a request with a web search tool: its searches' events
    return [(i, at, e) for i, (at, e) in enumerate(events)]


def reply(r: Resp) -> str:
    """The answer's text: ``metadata["fake_reply.MODEL"]`` for this model, else
    ``metadata["fake_reply"]``, else an echo of the input (a ladder test scripts a bad answer
    from one model and a good one from the next)."""
    for name in (f"fake_reply.{r.model}", "fake_reply"):
        text = r.metadata.get(name)
        if isinstance(text, str):
            return text
    return f"echo: {r.input_text[:500]}"


def _message(rid: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{rid[5:]}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }
