"""What a job uses, in tokens: usage reports of three providers, and estimates from a request.

:func:`usage_tokens` reads the usage of OpenAI (Responses and Chat Completions), Anthropic and
Gemini into one :class:`Tokens`; :func:`estimate_tokens` guesses a create's tokens before it is
sent, for the budget's first reservations and for pacing by tokens per minute. Both run once per
job, so they are written for speed (plain dict reads, no validation models).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["Tokens", "estimate_tokens", "usage_tokens"]

#: Request-size estimate: ~4 characters per token (OpenAI's rule of thumb for English text).
CHARS_PER_TOKEN = 4
#: Tokens counted for each image, audio or file part of an input, whose size is not inspected.
MEDIA_TOKENS = 1_000
#: Expected visible output when the request gives no ``max_output_tokens``.
DEFAULT_OUTPUT_TOKENS = 1_000
#: Expected reasoning tokens by ``reasoning.effort``; no effort given counts as "medium", the
#: default of OpenAI's reasoning models. Rough on purpose: a budget uses this only until the
#: first job of a model has finished, and from then on the mean real cost.
REASONING_TOKENS: Mapping[str, int] = {
    "none": 0, "minimal": 500, "low": 2_000, "medium": 6_000, "high": 20_000, "xhigh": 40_000,
}

_MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio", "image_url", "file"})
_TEXT_FIELDS = ("text", "content", "output", "arguments")
_OUTPUT_BY_EFFORT: dict[object, int] = {
    effort: DEFAULT_OUTPUT_TOKENS + tokens for effort, tokens in REASONING_TOKENS.items()}
_EMPTY: Mapping[str, Any] = {}


class Tokens(NamedTuple):
    """A response's token counts, the same whichever provider reported them."""

    input: int  #: every input token, cached and cache-written ones included
    cached_input: int  #: of ``input``, those read from the prompt cache
    output: int  #: every output token, reasoning included
    reasoning: int  #: of ``output``, the reasoning ("thinking") tokens
    cache_write: int = 0  #: of ``input``, those written to the prompt cache


def _count(value: Any) -> int:
    return value if type(value) is int else int(value or 0)


def usage_tokens(usage: Mapping[str, Any] | Tokens | Any) -> Tokens:
    """Normalise a usage report: OpenAI Responses (or Chat Completions), Anthropic, Gemini.

    Accepts a dict or a pydantic model such as openai's ``ResponseUsage``.
    """
    if type(usage) is not dict:
        if isinstance(usage, Tokens):
            return usage
        if not isinstance(usage, Mapping):
            dump = getattr(usage, "model_dump", None)
            if dump is None:
                raise TypeError(f"a usage report must be a mapping, got {type(usage).__name__}")
            usage = dump()
    get = usage.get
    if "input_tokens" in usage:
        read, write = get("cache_read_input_tokens"), get("cache_creation_input_tokens")
        if read is not None or write is not None:  # Anthropic: input_tokens excludes the cache
            thinking = (get("output_tokens_details") or {}).get("thinking_tokens")
            read, write = _count(read), _count(write)
            return Tokens(_count(get("input_tokens")) + read + write, read,
                          _count(get("output_tokens")), _count(thinking), write)
        details = get("input_tokens_details") or _EMPTY
        reasoning = (get("output_tokens_details") or _EMPTY).get("reasoning_tokens")
        return Tokens(get("input_tokens") or 0, details.get("cached_tokens") or 0,
                      get("output_tokens") or 0, reasoning or 0,
                      details.get("cache_write_tokens") or 0)
    if "usageMetadata" in usage:  # a whole Gemini response
        return usage_tokens(usage["usageMetadata"])
    if "promptTokenCount" in usage or "candidatesTokenCount" in usage:
        thoughts = _count(get("thoughtsTokenCount"))  # Gemini bills thoughts as output
        return Tokens(_count(get("promptTokenCount")), _count(get("cachedContentTokenCount")),
                      _count(get("candidatesTokenCount")) + thoughts, thoughts)
    if "prompt_tokens" in usage:  # Chat Completions
        details = get("prompt_tokens_details") or {}
        reasoning = (get("completion_tokens_details") or {}).get("reasoning_tokens")
        return Tokens(_count(get("prompt_tokens")), _count(details.get("cached_tokens")),
                      _count(get("completion_tokens")), _count(reasoning))
    return Tokens(0, 0, 0, 0)


def _size(items: list[Any]) -> tuple[int, int]:
    """(characters, media parts) of a list of input items or content parts."""
    chars = media = 0
    for item in items:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            if item.get("type") in _MEDIA_PARTS:
                media += 1
                continue
            for field in _TEXT_FIELDS:
                value = item.get(field)
                if isinstance(value, str):
                    chars += len(value)
                elif isinstance(value, list):
                    c, m = _size(value)
                    chars, media = chars + c, media + m
    return chars, media


def estimate_tokens(params: Mapping[str, Any]) -> tuple[int, int]:
    """(input, output) tokens a ``responses.create`` request is expected to use.

    Input: characters / 4 of ``instructions`` and ``input`` (a string or a list of messages and
    content parts), plus :data:`MEDIA_TOKENS` per image, audio or file part; tools and earlier
    turns (``previous_response_id``) are not counted. Output: ``max_output_tokens`` when given
    (an upper bound), else :data:`DEFAULT_OUTPUT_TOKENS` plus :data:`REASONING_TOKENS` for the
    request's ``reasoning.effort``.
    """
    get = params.get
    text, value, media = get("instructions"), get("input"), 0
    chars = len(text) if isinstance(text, str) else 0
    if isinstance(value, str):
        chars += len(value)
    elif isinstance(value, list):
        size, media = _size(value)
        chars += size
    input_tokens = -(-chars // CHARS_PER_TOKEN) + media * MEDIA_TOKENS
    limit = get("max_output_tokens")
    if type(limit) is int and limit > 0:
        return input_tokens, limit
    reasoning = get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    return input_tokens, _OUTPUT_BY_EFFORT.get(effort, _OUTPUT_BY_EFFORT["medium"])
