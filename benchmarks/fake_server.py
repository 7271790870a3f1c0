"""The fake Responses server in its own process, for benchmarks: uvicorn on 127.0.0.1.

    python benchmarks/fake_server.py --port 8123 [--webhook-url URL --webhook-secret S]

With a webhook URL it delivers signed webhooks there for as long as it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

from asyncbg.testing import FakeResponsesServer, LatencyModel, asgi_app

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def build(args: argparse.Namespace) -> Callable[..., Awaitable[None]]:
    server = FakeResponsesServer(latency=LatencyModel.fixed(1.0), seed=1)
    http = asgi_app(server)

    async def app(scope: Scope, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "lifespan":
            await http(scope, receive, send)
            return
        await receive()  # startup
        if args.webhook_url:
            async with server.webhooks(args.webhook_url, args.webhook_secret):
                await send({"type": "lifespan.startup.complete"})
                await receive()  # shutdown
        else:
            await send({"type": "lifespan.startup.complete"})
            await receive()
        await send({"type": "lifespan.shutdown.complete"})

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--webhook-url")
    p.add_argument("--webhook-secret")
    args = p.parse_args()
    uvicorn.run(build(args), host="127.0.0.1", port=args.port, log_level="error",
                lifespan="on", backlog=4096, limit_concurrency=None,
                # Clients keep idle connections 5 s (the SDK) or longer: outlive them, so that
                # no request races the server closing its connection.
                timeout_keep_alive=120)


if __name__ == "__main__":
    main()
