"""The Anthropic and Gemini SDK clients, wired in-process to a :class:`FakeResponsesServer`.

Both SDKs are optional extras (``asyncbg[anthropic]``, ``asyncbg[gemini]``), imported only when
a helper is called. Both send through httpx2, so the server's :class:`FakeTransport` serves
them as it serves ``openai``: no sockets, no ports, no API key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx2

from ._server import FakeResponsesServer
from ._transport import FakeTransport

if TYPE_CHECKING:
    import anthropic
    from google import genai

__all__ = ["fake_anthropic_client", "fake_genai_client"]


def fake_anthropic_client(server: FakeResponsesServer, **kwargs: Any) -> anthropic.AsyncAnthropic:
    """An ``AsyncAnthropic`` wired to ``server`` in-process (``messages.batches`` is served).
    Close it with ``await client.close()``."""
    import anthropic

    kwargs.setdefault("api_key", "sk-ant-fake-asyncbg")
    kwargs.setdefault("base_url", "http://fake-anthropic.invalid")
    return anthropic.AsyncAnthropic(
        http_client=httpx2.AsyncClient(transport=FakeTransport(server)), **kwargs
    )


def fake_genai_client(server: FakeResponsesServer, **kwargs: Any) -> genai.Client:
    """A ``google.genai.Client`` for the Gemini Developer API, wired to ``server`` in-process.

    Use its async side, ``client.aio`` (``client.aio.batches`` is served), and close it with
    ``await client.aio.aclose()``. The transport goes in ``http_options.async_client_args``,
    so the SDK builds its async httpx2 client around it and closes that client itself.
    """
    from google import genai
    from google.genai import types

    kwargs.setdefault("api_key", "fake-gemini-key-asyncbg")
    kwargs.setdefault("vertexai", False)  # whatever GOOGLE_GENAI_USE_VERTEXAI says
    options = types.HttpOptions(
        base_url="http://fake-gemini.invalid",
        async_client_args={"transport": FakeTransport(server)},
    )
    return genai.Client(http_options=options, **kwargs)
