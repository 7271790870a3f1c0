"""The status checks' own transport: keep-alive connections that write a prebuilt GET.

A live job is polled many times and each poll is the same small GET. Through aiohttp's
``ClientSession`` most of a poll's client CPU is per-request machinery (a ``ClientRequest``,
the session's default headers merged into a new multidict, timers re-armed per chunk, a
response object): measured at about 100 µs of the 150 µs a poll costs. :class:`Wire` writes the
request line and the header block built once (:class:`~._lean.LeanPoller` mirrors the SDK's
headers), and reads the answer with httptools' C parser (uvicorn's), on a small pool of
keep-alive connections. TLS is asyncio's, with the SDK's own ``SSLContext``.

It is only ever used where :class:`~._lean.LeanPoller` is (no proxy, no custom transport), and
only for GETs whose answer it can decode (identity, gzip, deflate; the header block advertises
no other). Errors are :class:`~._lean.LeanConnectError` (nothing was sent) and
:class:`~._lean.LeanTransportError` (sent, then the connection failed or timed out).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Mapping
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["DECODES", "Wire", "WireClosed", "WireConnectError", "WireError", "WireTimeout"]

#: Codings this transport decodes (httptools hands over the body as sent).
DECODES: Final = frozenset({"gzip", "x-gzip", "deflate", "identity"})


class WireError(Exception):
    """The request was sent (or may have been), then the connection failed or timed out."""


class WireConnectError(WireError):
    """No connection was made: nothing was sent. ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"could not connect: {reason}")
        self.reason = reason


class WireClosed(WireConnectError):
    """The wire was closed (``aclose``)."""


class WireTimeout(WireError):
    """No (whole) answer within the read timeout."""


class _Answer:
    """One HTTP answer being read: httptools' callbacks write here."""

    __slots__ = ("body", "done", "headers", "keep_alive", "status", "until_eof")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.keep_alive = False
        self.done = False
        #: The headers are in and name no length: the body runs until the server hangs up.
        self.until_eof = False


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    __slots__ = ("answer", "closed", "idle_since", "parser", "received", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer = _Answer()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.received = False  # any byte of the current answer arrived
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport's subclasses, but alike).
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(WireError(f"bad HTTP answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is None and self.answer.until_eof and not self.answer.done:
            self.on_message_complete()  # the end of the connection was the end of the body
            return
        self._fail(WireError(f"the connection was closed{f' ({exc!r})' if exc else ''}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers.append((name, value))

    def on_headers_complete(self) -> None:
        answer = self.answer
        status = self.parser.get_status_code()
        names = {name.lower() for name, _ in answer.headers}
        answer.until_eof = (not ({b"content-length", b"transfer-encoding"} & names)
                            and status >= 200 and status not in (204, 304))

    def on_body(self, body: bytes) -> None:
        self.answer.body.append(body)

    def on_message_complete(self) -> None:
        answer = self.answer
        answer.status = self.parser.get_status_code()
        answer.keep_alive = self.parser.should_keep_alive() and not answer.until_eof
        answer.done = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: WireError) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Wire:
    """GETs to one origin over a few keep-alive connections (see the module docstring)."""

    __slots__ = ("_closed", "_connect_timeout", "_head", "_host", "_idle", "_keepalive",
                 "_port", "_read_timeout", "_server_hostname", "_ssl", "opened")

    def __init__(
        self, *, host: str, port: int, host_header: str, headers: Mapping[str, str],
        ssl_context: ssl.SSLContext | None, connect_timeout: float | None,
        read_timeout: float | None, keepalive: float | None,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._server_hostname = host if ssl_context is not None else None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        lines = [f"Host: {host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        #: Everything after the request target: the version, then every header, then the end.
        self._head = (" HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._idle: list[_Connection] = []
        self._closed = False
        #: A connection was made at least once.
        self.opened = False

    async def get(self, target: str) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """GET ``target`` (path and query, already encoded): status, headers, decoded body."""
        request = b"GET " + target.encode("ascii") + self._head
        conn = self._reuse()
        if conn is not None:
            try:
                return await self._exchange(conn, request)
            except WireError as exc:
                if conn.received or isinstance(exc, WireTimeout):
                    raise
                # The server closed an idle connection as we wrote to it (a keep-alive race):
                # nothing was read, and a GET may be sent again, once, on a new connection.
        conn = await self._connect()
        return await self._exchange(conn, request)

    def _reuse(self) -> _Connection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if self._keepalive is not None and now - conn.idle_since > self._keepalive:
                conn.close()
                continue
            return conn
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise WireClosed("closed")
        loop = asyncio.get_running_loop()
        self.opened = True
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._server_hostname),
                self._connect_timeout)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            from ._lean import connect_reason

            raise WireConnectError(connect_reason(exc, self._host, self._port)) from exc
        return conn

    async def _exchange(
        self, conn: _Connection, request: bytes
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        loop = asyncio.get_running_loop()
        waiter = conn.waiter = loop.create_future()
        conn.received = False
        timer = None if self._read_timeout is None else loop.call_later(
            self._read_timeout, _time_out, waiter)
        transport = conn.transport
        assert transport is not None
        try:
            transport.write(request)
            await waiter
        except BaseException:
            conn.close()  # a half-read answer (or a cancelled wait) leaves it unusable
            raise
        finally:
            conn.waiter = None
            if timer is not None:
                timer.cancel()
        answer, conn.answer = conn.answer, _Answer()
        if answer.keep_alive and not conn.closed and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in answer.headers:
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        body = b"".join(answer.body)
        coding = headers.get("content-encoding")
        if coding is not None and body:
            body = _decode(coding, body)
        return answer.status, CIMultiDictProxy(headers), body

    @property
    def connections(self) -> int:
        """Idle keep-alive connections (for tests)."""
        return sum(not c.closed for c in self._idle)

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(WireTimeout("no answer within the read timeout"))


def _decode(coding: str, body: bytes) -> bytes:
    """The body decoded from ``Content-Encoding`` (gzip, deflate, identity; in order applied)."""
    for step in reversed([c.strip().lower() for c in coding.split(",") if c.strip()]):
        try:
            if step == "gzip" or step == "x-gzip":
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            elif step == "deflate":
                try:
                    body = zlib.decompress(body)
                except zlib.error:
                    body = zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate, as some send
            elif step != "identity":
                raise WireError(f"cannot decode Content-Encoding {coding!r}")
        except zlib.error as exc:
            raise WireError(f"bad {step} body: {exc}") from exc
    return body
