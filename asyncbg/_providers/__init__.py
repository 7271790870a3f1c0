"""Providers: whom asyncbg talks to (see :mod:`._base`).

Names load on first use, so that a module of this package that needs no SDK (``_kinds``, which
``asyncbg --help`` reads) does not pull in openai, anthropic and google-genai.
"""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from ._anthropic import AnthropicBatches
    from ._base import Answer, Provider, WebhookEvent
    from ._gemini import GeminiBatches
    from ._openai import OpenAIResponses
    from ._openai_batch import OpenAIBatch

__all__ = [
    "Answer",
    "AnthropicBatches",
    "GeminiBatches",
    "OpenAIBatch",
    "OpenAIResponses",
    "Provider",
    "WebhookEvent",
]

_LAZY = {
    "Answer": "._base",
    "AnthropicBatches": "._anthropic",
    "GeminiBatches": "._gemini",
    "OpenAIBatch": "._openai_batch",
    "OpenAIResponses": "._openai",
    "Provider": "._base",
    "WebhookEvent": "._base",
}


def __getattr__(name: str) -> typing.Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
