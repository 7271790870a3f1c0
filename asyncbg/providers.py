"""Providers: whom a :class:`~asyncbg.BackgroundManager` talks to.

    from asyncbg.providers import OpenAIResponses
    async with BackgroundManager(OpenAIResponses(AsyncOpenAI())) as mgr: ...

A bare ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``) given to the manager means
``OpenAIResponses(client)``.
"""

from ._providers import OpenAIResponses, Provider

__all__ = ["OpenAIResponses", "Provider"]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
