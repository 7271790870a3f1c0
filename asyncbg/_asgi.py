"""The little of ASGI that asyncbg's apps (webhook receiver, fake server, dashboard, metrics)
need."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["ASGIApp", "Receive", "Scope", "Send", "listen", "read_body"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def read_body(receive: Receive) -> bytes:
    """The whole request body, however many messages it came in."""
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn's ``sockets=``, whose connections send at once.

    asyncio turns Nagle's algorithm off only on sockets made with ``IPPROTO_TCP`` named, which
    ``socket.create_server`` does not: an answer written in two pieces then waited for the
    client's delayed ACK, 40 ms each. Accepted connections inherit ``TCP_NODELAY``.
    """
    sock = socket.create_server((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
