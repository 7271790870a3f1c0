"""Server-sent events as raw bytes, for background streams.

``responses.create(stream=True, background=True)`` and ``responses.retrieve(id, stream=True,
starting_after=N)`` answer with an event stream. Iterating the SDK's ``AsyncStream`` builds a
pydantic model for every event, most of which (text deltas) a background job manager never
reads. Here the stream stays bytes: :func:`iter_events` splits it into ``(event_type, data)``
pairs, and :func:`parse_event` decodes only the events the caller wants.

How the raw stream is reached: the SDK's ``with_streaming_response`` wrapper sends the request
through the client's full machinery (auth, retries on connect and status, error mapping) and
returns an ``AsyncAPIResponse`` without reading the body; its ``.http_response`` is the httpx2
response, whose ``aiter_bytes()`` is the decoded body. :func:`open_raw_stream` wraps that, and
maps a connection lost mid-stream to ``openai.APIConnectionError``/``APITimeoutError`` as the
SDK's own ``AsyncStream`` does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import openai

if TYPE_CHECKING:
    import httpx2
    from openai._response import AsyncAPIResponse, AsyncResponseContextManager

__all__ = [
    "Event",
    "SSEParser",
    "iter_events",
    "open_create_stream",
    "open_raw_stream",
    "open_retrieve_stream",
    "parse_event",
]

#: ``(event_type, data)``: the ``event:`` field (``None`` when absent or empty) and the ``data:``
#: lines joined with ``\n``, as bytes.
Event = tuple[str | None, bytes]

_BOM: Final = b"\xef\xbb\xbf"


class SSEParser:
    """An incremental ``text/event-stream`` parser over bytes (the WHATWG algorithm).

    Lines end in ``\\r\\n``, ``\\n`` or ``\\r``, split anywhere across chunks; a leading BOM is
    dropped; ``:`` lines are comments; one space after the colon is dropped; ``data:`` lines
    accumulate, joined by ``\\n``; a blank line dispatches an event if it has any ``data:``
    line. ``id:``, ``retry:`` and unknown fields are ignored. An event not ended by a blank line
    when the stream ends is discarded, as the standard (and the SDK) does.
    """

    __slots__ = ("_data", "_event", "_parts", "_skip_lf", "_started")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # an unfinished line, in pieces (joined once, when it ends)
        self._skip_lf = False  # the last chunk ended in \r: a \n next belongs to it
        self._started = False  # past the point where a BOM may be
        self._event: str | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """Take the next chunk; return the events it completes, in order."""
        if not self._started:
            head = b"".join(self._parts) + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._parts = [head] if head else []
                return []
            self._started = True
            self._parts = []
            chunk = head[len(_BOM) :] if head.startswith(_BOM) else head
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            if chunk:
                self._parts.append(chunk)
            return []
        if self._parts:
            self._parts.append(chunk[: end + 1])
            block = b"".join(self._parts)
        else:
            block = chunk[: end + 1]
        rest = chunk[end + 1 :]
        self._parts = [rest] if rest else []
        self._skip_lf = not rest and chunk[end] == 0x0D
        return self._lines(block.splitlines())  # bytes split only on \r\n, \n and \r

    def _lines(self, lines: list[bytes]) -> list[Event]:
        out: list[Event] = []
        for line in lines:
            if not line:
                if self._data:
                    data = self._data
                    out.append((self._event, data[0] if len(data) == 1 else b"\n".join(data)))
                    self._data = []
                self._event = None
            elif line[0] != 0x3A:  # not a ":" comment
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    self._data.append(value)
                elif name == b"event":
                    self._event = value.decode("utf-8", "replace") or None
        return out


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    """Yield ``(event_type, data)`` for each event in a byte stream cut into arbitrary chunks."""
    parser = SSEParser()
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event


def parse_event(data: bytes) -> dict[str, Any]:
    """Decode one event's data as a JSON object; ``ValueError`` if it is not one."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object in the event data, got {type(value).__name__}")
    return value


@asynccontextmanager
async def open_raw_stream(
    request: AsyncResponseContextManager[AsyncAPIResponse[Any]],
) -> AsyncIterator[AsyncIterator[Event]]:
    """Send a streaming request made with ``with_streaming_response`` and yield its events raw.

    ``request`` is what e.g. ``client.responses.with_streaming_response.retrieve(rid,
    stream=True, starting_after=n)`` returns. Entering sends it: SDK errors (status, connection)
    raise here, as they would from the SDK. The connection is closed on exit, read or not.
    """
    async with request as response:
        events = _events(response.http_response)
        try:
            yield events
        finally:
            await events.aclose()


def open_create_stream(
    client: openai.AsyncOpenAI, /, **params: Any
) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
    """``responses.create(**params, stream=True)`` with raw events; pass ``background=True``."""
    return open_raw_stream(
        client.responses.with_streaming_response.create(**params, stream=True)
    )


def open_retrieve_stream(
    client: openai.AsyncOpenAI,
    response_id: str,
    /,
    *,
    starting_after: int | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
    """Resume a background response's stream after event ``starting_after`` (all when None)."""
    kwargs: dict[str, Any] = {"stream": True, "extra_headers": extra_headers}
    if starting_after is not None:
        kwargs["starting_after"] = starting_after
    return open_raw_stream(
        client.responses.with_streaming_response.retrieve(response_id, **kwargs)
    )


async def _events(response: httpx2.Response) -> AsyncGenerator[Event, None]:
    from openai._httpx2 import request_exceptions, timeout_exceptions

    parser = SSEParser()
    chunks = response.aiter_bytes()
    try:
        async for chunk in chunks:
            for event in parser.feed(chunk):
                yield event
    except timeout_exceptions() as exc:
        raise openai.APITimeoutError(request=response.request) from exc
    except request_exceptions() as exc:
        raise openai.APIConnectionError(request=response.request) from exc
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
