"""Providers: whom a :class:`~asyncbg.BackgroundManager` talks to.

    from asyncbg.providers import OpenAIResponses, OpenAIBatch, AnthropicBatches, GeminiBatches
    async with BackgroundManager(AnthropicBatches(anthropic.AsyncAnthropic())) as mgr: ...

A bare ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``) given to the manager means
``OpenAIResponses(client)``. The batch providers (``OpenAIBatch``, ``AnthropicBatches``,
``GeminiBatches``) group jobs into the discounted batch APIs; the ``anthropic`` and
``google-genai`` SDKs are optional extras (``asyncbg[anthropic]``, ``asyncbg[gemini]``).
"""

from ._providers import (
    AnthropicBatches,
    GeminiBatches,
    OpenAIBatch,
    OpenAIResponses,
    Provider,
)

__all__ = ["AnthropicBatches", "GeminiBatches", "OpenAIBatch", "OpenAIResponses", "Provider"]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
