"""The pytest plugin asyncbg registers: the ``fake_server`` and ``fake_openai`` fixtures.

``fake_openai`` yields a :class:`FakeOpenAI`: ``.client`` (an ``AsyncOpenAI`` connected
in-process), ``.server`` and ``.counters``. It needs pytest-asyncio; the client is closed for you.
Configure the server by overriding ``fake_server`` in your conftest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import pytest

from ._server import FakeResponsesServer
from ._state import Counters
from ._transport import fake_client

__all__ = ["FakeOpenAI"]


@dataclass(frozen=True, slots=True)
class FakeOpenAI:
    """What the ``fake_openai`` fixture yields."""

    client: openai.AsyncOpenAI
    server: FakeResponsesServer

    @property
    def counters(self) -> Counters:
        return self.server.counters


@pytest.fixture
def fake_server() -> FakeResponsesServer:
    """A fresh fake Responses server; override this fixture to configure it."""
    return FakeResponsesServer()


async def _fake_openai(fake_server: FakeResponsesServer) -> AsyncIterator[FakeOpenAI]:
    """An ``AsyncOpenAI`` wired in-process to ``fake_server``, closed after the test."""
    client = fake_client(fake_server)
    try:
        yield FakeOpenAI(client, fake_server)
    finally:
        await client.close()


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs an async plugin

    @pytest.fixture(name="fake_openai")
    def _missing_plugin() -> None:
        pytest.fail("the fake_openai fixture needs pytest-asyncio: pip install pytest-asyncio")

else:
    fake_openai = pytest_asyncio.fixture(_fake_openai, name="fake_openai")
