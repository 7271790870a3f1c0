"""Providers: whom asyncbg talks to (see :mod:`._base`)."""

from ._base import Answer, Provider, WebhookEvent
from ._openai import OpenAIResponses

__all__ = ["Answer", "OpenAIResponses", "Provider", "WebhookEvent"]
