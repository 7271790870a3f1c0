"""Providers: whom asyncbg talks to (see :mod:`._base`)."""

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
