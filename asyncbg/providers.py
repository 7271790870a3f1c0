"""Providers: whom a :class:`~asyncbg.BackgroundManager` talks to.

    from asyncbg.providers import OpenAIResponses, OpenAIBatch, AnthropicBatches, GeminiBatches
    async with BackgroundManager(AnthropicBatches(anthropic.AsyncAnthropic())) as mgr: ...

A bare ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``) given to the manager means
``OpenAIResponses(client)``. The batch providers (``OpenAIBatch``, ``AnthropicBatches``,
``GeminiBatches``) group jobs into the discounted batch APIs; the ``anthropic`` and
``google-genai`` SDKs are optional extras (``asyncbg[anthropic]``, ``asyncbg[gemini]``).
``usage_of(result)`` is a result's usage in its provider's own type, ``tokens_of(body)`` its
token counts in one shape for every provider.
"""

from ._providers import (
    AnthropicBatches,
    GeminiBatches,
    OpenAIBatch,
    OpenAIResponses,
    Provider,
)
from ._providers._usage import tokens_of, usage_of

__all__ = ["AnthropicBatches", "GeminiBatches", "OpenAIBatch", "OpenAIResponses", "Provider",
           "tokens_of", "usage_of"]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
