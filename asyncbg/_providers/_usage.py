"""A job's usage in the provider's own terms, and in one shape for every provider.

``Job.usage`` is the provider's own usage object: OpenAI's ``ResponseUsage``, Anthropic's
``Usage``, Gemini's ``GenerateContentResponseUsageMetadata`` (:func:`usage_of`). ``Job.tokens``
is the same for all of them: input, cached input, output, reasoning (:func:`tokens_of`).
"""

from __future__ import annotations

import json
from typing import Any

from .._spend._tokens import Tokens, usage_tokens

__all__ = ["Tokens", "tokens_of", "usage_of"]

#: Where each provider's result keeps its usage: OpenAI and Anthropic ``usage``, Gemini
#: ``usage_metadata`` (a parsed SDK object) or ``usageMetadata`` (the wire's camelCase).
_USAGE_FIELDS = ("usage", "usage_metadata", "usageMetadata")


def usage_of(result: Any) -> Any:
    """The usage object of a provider's result (an SDK model or a dict), or None."""
    for name in _USAGE_FIELDS:
        usage = result.get(name) if isinstance(result, dict) else getattr(result, name, None)
        if usage is not None:
            return usage
    return None


def tokens_of(body: bytes | None) -> Tokens | None:
    """The tokens a final body reports, whichever provider sent it; None without a usage
    report (a request that failed before it ran, a body that is not a JSON object)."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    usage = usage_of(data)
    if not isinstance(usage, dict):
        return None
    return usage_tokens(usage)
