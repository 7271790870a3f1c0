"""Fallback across providers: a Responses request as an Anthropic Messages request.

Only what maps without a change of meaning is carried over: plain text in (``input`` as a
string, or messages whose content is text), text out, ``instructions`` as ``system``,
``max_output_tokens`` as ``max_tokens``, ``temperature``, ``top_p``, ``stop``. Anything else
(tools, images, files, reasoning, structured outputs, a previous response) is refused with
the field named, when the job is submitted: never a silent change of the question.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_MAX_TOKENS", "to_provider"]

#: ``max_tokens`` is required by Anthropic: used when the request sets no
#: ``max_output_tokens``.
DEFAULT_MAX_TOKENS = 4096
#: Fields asyncbg or the OpenAI provider adds, or that change nothing of the answer.
_DROPPED = frozenset({"store", "background", "metadata", "user", "service_tier",
                      "truncation", "parallel_tool_calls"})


def to_provider(provider: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` (a Responses request, with the step's own fields) for ``provider``; raises
    ``ValueError`` naming what does not map."""
    if provider != "anthropic":
        raise ValueError(f"an escalation step names provider {provider!r}: only 'anthropic' "
                         "is supported as a fallback")
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in _DROPPED:
            continue
        if name == "model":
            out["model"] = value
        elif name == "input":
            out["messages"] = _messages(value)
        elif name == "instructions":
            if not isinstance(value, str):
                raise ValueError("instructions must be text to fall back to anthropic")
            out["system"] = value
        elif name in ("max_output_tokens", "max_tokens"):
            out["max_tokens"] = value
        elif name in ("temperature", "top_p", "stop_sequences"):
            out[name] = value
        else:
            raise ValueError(f"the request's {name!r} has no plain equivalent in an Anthropic "
                             "message, so it cannot fall back to anthropic; keep such "
                             "requests on one provider")
    if "messages" not in out:
        raise ValueError("a request without input cannot fall back to anthropic")
    out.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    return out


def _messages(value: object) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ValueError("input must be text or a list of messages to fall back to anthropic")
    messages = []
    for item in value:
        if not (isinstance(item, dict) and item.get("role") in ("user", "assistant")
                and set(item) <= {"role", "content", "type"}
                and item.get("type", "message") == "message"):
            raise ValueError(f"input item {item!r} is not a plain user or assistant message, so "
                             "it cannot fall back to anthropic")
        messages.append({"role": item["role"], "content": _text(item.get("content"))})
    return messages


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
            and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError("only text content can fall back to anthropic (no images or files)")
