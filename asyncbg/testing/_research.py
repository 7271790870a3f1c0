"""Deep-research-style responses on the fake server: reasoning, web searches, then an answer.

A request whose ``tools`` hold a web search tool (``web_search``, ``web_search_preview``...)
is answered as a research run: ``min(max_tool_calls, 3)`` rounds (3 when no cap is given, or
``fake_tool_calls`` in its metadata) of a reasoning item with a summary followed by a
``web_search_call``, then the final message. The stream carries each step as the real API
does (``response.output_item.added``/``done``, ``response.reasoning_summary_text.delta``/
``done``, ``response.web_search_call.in_progress``/``searching``/``completed``), spread over
the first two thirds of the response's time; the message's text follows.
"""

from __future__ import annotations

from typing import Any

from ._state import Resp

__all__ = ["research_output", "weave"]

#: How the research rounds and the answer share a response's time.
_RESEARCH_SHARE = 2 / 3
_DEFAULT_CALLS = 3
_TOPICS = ("background and definitions", "recent results", "open questions",
           "conflicting sources", "numbers to check")


def _calls(r: Resp) -> int:
    """How many web searches ``r`` makes: 0 unless it has a web search tool."""
    tools = r.extra.get("tools") or []
    if not any(isinstance(t, dict) and str(t.get("type", "")).startswith("web_search")
               for t in tools):
        return 0
    scripted = r.metadata.get("fake_tool_calls")
    if scripted is not None:
        try:
            return max(int(scripted), 0)
        except ValueError:
            return 0
    cap = r.extra.get("max_tool_calls")
    return min(cap, _DEFAULT_CALLS) if type(cap) is int and cap >= 0 else _DEFAULT_CALLS


def _steps(r: Resp) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each round's (reasoning item, web search call), as they are once done."""
    topic = " ".join(r.input_text.split()[:8]).rstrip("?,.") or "the question"
    out = []
    for n in range(_calls(r)):
        aspect = _TOPICS[n % len(_TOPICS)]
        reasoning = {"type": "reasoning", "id": f"rs_{n}_{r.id[5:]}", "status": "completed",
                     "summary": [{"type": "summary_text",
                                  "text": f"Looking into {aspect} of {topic}."}]}
        search = {"type": "web_search_call", "id": f"ws_{n}_{r.id[5:]}", "status": "completed",
                  "action": {"type": "search", "query": f"{topic} {aspect}",
                             "sources": [{"type": "url",
                                          "url": f"https://example.org/{n}"}]}}
        out.append((reasoning, search))
    return out


def research_output(r: Resp, body: dict[str, Any]) -> None:
    """Put ``r``'s research items before its message in a final ``body`` (in place)."""
    items = [item for pair in _steps(r) for item in pair]
    if items:
        body["output"][:0] = items


def weave(r: Resp, events: list[tuple[float, dict[str, Any]]]
          ) -> list[tuple[float, dict[str, Any]]]:
    """``r``'s stream events with its research steps woven in after ``response.in_progress``;
    the message's events move to the last third of its time, at its new output index."""
    steps = _steps(r)
    if not steps or len(events) < 2:
        return events
    head, tail = events[:2], events[2:]
    start, end = r.start_at, r.end_at
    span = end - start
    cut = start + span * _RESEARCH_SHARE
    woven: list[tuple[float, dict[str, Any]]] = []
    for n, (reasoning, search) in enumerate(steps):
        at = start + (cut - start) * (n + 0.5) / len(steps)
        index = 2 * n
        text = reasoning["summary"][0]["text"]
        rid, sid = reasoning["id"], search["id"]
        woven += [
            (at, {"type": "response.output_item.added", "output_index": index,
                  "item": {**reasoning, "status": "in_progress", "summary": []}}),
            (at, {"type": "response.reasoning_summary_part.added", "item_id": rid,
                  "output_index": index, "summary_index": 0,
                  "part": {"type": "summary_text", "text": ""}}),
            (at, {"type": "response.reasoning_summary_text.delta", "item_id": rid,
                  "output_index": index, "summary_index": 0, "delta": text}),
            (at, {"type": "response.reasoning_summary_text.done", "item_id": rid,
                  "output_index": index, "summary_index": 0, "text": text}),
            (at, {"type": "response.reasoning_summary_part.done", "item_id": rid,
                  "output_index": index, "summary_index": 0,
                  "part": {"type": "summary_text", "text": text}}),
            (at, {"type": "response.output_item.done", "output_index": index,
                  "item": reasoning}),
            (at, {"type": "response.output_item.added", "output_index": index + 1,
                  "item": {**search, "status": "in_progress"}}),
            (at, {"type": "response.web_search_call.in_progress", "item_id": sid,
                  "output_index": index + 1}),
            (at, {"type": "response.web_search_call.searching", "item_id": sid,
                  "output_index": index + 1}),
            (at, {"type": "response.web_search_call.completed", "item_id": sid,
                  "output_index": index + 1}),
            (at, {"type": "response.output_item.done", "output_index": index + 1,
                  "item": search}),
        ]
    message_index = 2 * len(steps)
    for at, event in tail:
        if "output_index" in event:
            event["output_index"] = message_index
        if at < end and span > 0:
            at = cut + (at - start) * (1 - _RESEARCH_SHARE)
        woven.append((at, event))
    return head + woven
