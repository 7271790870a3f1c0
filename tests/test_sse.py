"""The raw SSE parser against the standard's rules and the SDK's decoder, split anywhere."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Iterable

import openai
import pytest
from openai._streaming import SSEDecoder

from asyncbg._providers._sse import (
    Event,
    SSEParser,
    iter_events,
    open_create_stream,
    open_raw_stream,
    open_retrieve_stream,
    parse_event,
)
from asyncbg.testing import FakeResponsesServer, LatencyModel, fake_client


def parse(chunks: Iterable[bytes]) -> list[Event]:
    parser = SSEParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def splits(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def every_split(stream: bytes) -> Iterable[list[bytes]]:
    """The stream whole, a byte at a time, cut once at every point, cut twice at many, at random."""
    yield [stream]
    yield [stream[i : i + 1] for i in range(len(stream))]
    for i in range(len(stream) + 1):
        yield splits(stream, [i])
    for i in range(0, len(stream), 3):
        for j in range(i, len(stream), 5):
            yield splits(stream, [i, j])
    rng = random.Random(7)
    for _ in range(200):
        yield splits(stream, rng.sample(range(len(stream)), min(len(stream), rng.randint(1, 12))))


#: Every line ending, comments, multi-line data, a CR right before the LF of a CRLF...
TRICKY = (
    b": a comment first\r\n"
    b"event: response.created\r\n"
    b'data: {"a": 1}\r\n'
    b"\r\n"
    b"event:response.in_progress\n"
    b"data:no-space\n"
    b"data:  two spaces keep one\n"
    b"id: 7\n"
    b"retry: 1000\n"
    b"\n"
    b"data: line one\r"
    b"data: line two\r"
    b":comment\r"
    b"\r"
    b"event: x\r\n"
    b"unknown: field\r\n"
    b"data\r\n"
    b"\r\n"
    b"data: caf\xc3\xa9 \xe2\x9c\x93\n"
    b"\r\n"
    b"data: {\"type\": \"response.completed\"}\n\n"
)
TRICKY_EVENTS: list[Event] = [
    ("response.created", b'{"a": 1}'),
    ("response.in_progress", b"no-space\n two spaces keep one"),
    (None, b"line one\nline two"),
    ("x", b""),
    (None, "café ✓".encode()),
    (None, b'{"type": "response.completed"}'),
]


def test_tricky_stream_in_every_split() -> None:
    for chunks in every_split(TRICKY):
        assert parse(chunks) == TRICKY_EVENTS, chunks


def test_agrees_with_the_sdk_decoder() -> None:
    """Where the standard and the SDK agree (every event has data), so do we."""
    stream = TRICKY.replace(b"event: x\r\nunknown: field\r\ndata\r\n", b"event: x\r\ndata: y\r\n")
    sdk = [(e.event, e.data.encode()) for e in SSEDecoder().iter_bytes(iter([stream]))]
    for chunks in every_split(stream):
        assert parse(chunks) == sdk


@pytest.mark.parametrize(
    ("stream", "events"),
    [
        (b"data: a\r\n\r\ndata: b\n\n", [(None, b"a"), (None, b"b")]),
        (b"data: a\r\rdata: b\r\r", [(None, b"a"), (None, b"b")]),  # CR CR: two line ends
        (b"data: a\r\n\r\n\r\n\n\ndata: b\n\n", [(None, b"a"), (None, b"b")]),
        (b"event: lonely\n\ndata: b\n\n", [(None, b"b")]),  # no data: nothing, type reset
        (b"event:\ndata: b\n\n", [(None, b"b")]),  # empty type is None
        (b"data:\n\n", [(None, b"")]),
        (b"data\ndata\n\n", [(None, b"\n")]),
        (b": only\n:\n\n", []),
        (b"data: kept\n\ndata: never ended\n", [(None, b"kept")]),  # cut off: discarded
        (b"data: no newline at all", []),
        (b"\xef\xbb\xbfdata: bom\n\n", [(None, b"bom")]),
        (b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n", [(None, b"y")]),  # one BOM only
        (b"\xef\xbb", []),
        (b"DATA: case matters\n\nEvent: x\ndata: y\n\n", [(None, b"y")]),
        (b"data: a: b\n\n", [(None, b"a: b")]),
        (b"event: t\xff\ndata: x\n\n", [("t\ufffd", b"x")]),
    ],
)
def test_rules(stream: bytes, events: list[Event]) -> None:
    for chunks in every_split(stream):
        assert parse(chunks) == events, chunks


def test_long_line_in_many_chunks() -> None:
    payload = b'{"delta": "' + b"x" * 100_000 + b'"}'
    chunks = [b"event: big\ndata: "]
    chunks += [payload[i : i + 7] for i in range(0, len(payload), 7)]
    chunks += [b"\n", b"", b"\n"]
    assert parse(chunks) == [("big", payload)]


def test_empty_chunks_change_nothing() -> None:
    # the \n still completes the \r\n begun before the empty chunk: one line end, not two
    chunks = [b"", b"data: a\r", b"", b"\n", b"", b"data: b\n", b"", b"\n", b""]
    assert parse(chunks) == [(None, b"a\nb")]


@pytest.mark.asyncio
async def test_iter_events() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in splits(TRICKY, [5, 17, 60, 61, 62, 100]):
            yield chunk

    assert [event async for event in iter_events(chunks())] == TRICKY_EVENTS


def test_parse_event() -> None:
    assert parse_event(b'{"type": "response.created", "sequence_number": 0}') == {
        "type": "response.created",
        "sequence_number": 0,
    }
    with pytest.raises(ValueError, match="JSON object"):
        parse_event(b"[1]")
    with pytest.raises(ValueError):
        parse_event(b"[DONE]")


# -- raw streams through the SDK -------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_then_resume() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.03), stream_events=6)
    client = fake_client(server)
    try:
        async with open_create_stream(
            client, model="m", input="hi", background=True
        ) as events:
            created = [(kind, parse_event(data)) async for kind, data in events]
        kinds = [kind for kind, _ in created]
        assert kinds[0] == "response.created"
        assert kinds[-1] == "response.completed"
        assert all(kind == data["type"] for kind, data in created)
        numbers = [data["sequence_number"] for _, data in created]
        assert numbers == list(range(len(numbers)))
        rid = created[0][1]["response"]["id"]

        async with open_retrieve_stream(client, rid, starting_after=2) as events:
            resumed = [parse_event(data)["sequence_number"] async for _, data in events]
        assert resumed == numbers[3:]
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_sdk_errors_raise_on_open() -> None:
    client = fake_client(FakeResponsesServer(latency=LatencyModel.fixed(0.03)))
    try:
        with pytest.raises(openai.NotFoundError):
            async with open_retrieve_stream(client, "resp_missing", starting_after=0):
                pass
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_a_dropped_stream_raises_api_connection_error() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.03))
    server.inject("drop", route="create", after=2)
    client = fake_client(server, max_retries=0)
    seen: list[str | None] = []
    try:
        with pytest.raises(openai.APIConnectionError):
            async with open_raw_stream(
                client.responses.with_streaming_response.create(
                    model="m", input="hi", background=True, stream=True
                )
            ) as events:
                async for kind, _ in events:
                    seen.append(kind)
    finally:
        await client.close()
    assert seen == ["response.created", "response.in_progress"]


@pytest.mark.asyncio
async def test_leaving_early_closes_the_stream() -> None:
    server = FakeResponsesServer(latency=LatencyModel.fixed(0.03))
    client = fake_client(server)
    try:
        async with open_create_stream(client, model="m", input="hi", background=True) as events:
            async for kind, _ in events:
                assert kind == "response.created"
                break
    finally:
        await client.close()
