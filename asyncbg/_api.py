"""The three requests asyncbg makes (create, retrieve, cancel) and the retries around them.

Every call goes through the SDK with ``max_retries=0``: asyncbg owns retries (see
:class:`~asyncbg.RetryPolicy`). Answers are kept as the JSON the server sent; the full
``Response`` model is built once, when a job ends, never on a live poll.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import openai
import structlog
from openai import AsyncStream
from openai.types.responses import ResponseStreamEvent

from ._limiter import Limiter
from ._policies import RetryPolicy, parse_poll_after, parse_retry_after

__all__ = ["Answer", "Api", "Rejected"]

_log = structlog.get_logger("asyncbg")
T = TypeVar("T")


@dataclass(slots=True)
class Answer:
    """One server answer: the body as sent, its parsed JSON, and ``openai-poll-after-ms``.

    Keep ``raw``, not ``data``: bytes are invisible to the cyclic garbage collector, while a
    parsed dict kept between polls ages into its oldest generation and, across thousands of
    jobs, sets off full collections that stall the event loop.
    """

    data: dict[str, Any]
    raw: bytes
    poll_after: float | None


class Rejected(Exception):
    """The server refused a request for good (a 4xx other than 408/429); ``status`` is the code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class GaveUp(Exception):
    """Retries ran out; the message says what the last error was."""


def _error_message(exc: openai.APIStatusError) -> tuple[str, str | None]:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            code = err.get("code")
            return err["message"], code if isinstance(code, str) else None
    return exc.message, None


def _retryable(exc: BaseException) -> tuple[bool, float | None]:
    """Whether a failed request may be retried, and the server's Retry-After if it gave one."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True, None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429 or status == 408 or status >= 500:
            return True, parse_retry_after(exc.response.headers)
    return False, None


def _answer(raw: Any) -> Answer:
    http = raw.http_response
    raw = http.content
    return Answer(json.loads(raw), raw, parse_poll_after(http.headers))


class Api:
    """The manager's view of the server: three requests, each with retries and logging."""

    def __init__(
        self, client: openai.AsyncOpenAI, retry: RetryPolicy, max_requests: int = 64
    ) -> None:
        plain = client.with_options(max_retries=0).responses
        self._responses = plain.with_raw_response
        self._streams = plain
        self.retry = retry
        # Bounds the requests in flight at once. Without it, thousands of jobs submitted or
        # due together all become ready in the same loop iteration, and every other task (a
        # web server's, a progress bar's) waits behind all of their CPU work.
        self._requests = Limiter(max_requests)
        self.requests = 0
        self.retries = 0
        self.possible_duplicates = 0

    async def _call(
        self, what: str, send: Callable[[], Awaitable[T]], log: Any, *, create: bool = False
    ) -> T:
        attempt = 1
        while True:
            self.requests += 1
            try:
                async with self._requests:
                    return await send()
            except (openai.APIStatusError, openai.APIConnectionError) as exc:
                retry, retry_after = _retryable(exc)
                if not retry:
                    assert isinstance(exc, openai.APIStatusError)
                    message, code = _error_message(exc)
                    raise Rejected(exc.status_code, message, code) from exc
                if attempt >= self.retry.max_attempts:
                    raise GaveUp(
                        f"{what} failed after {attempt} attempts; last error: {exc}"
                    ) from exc
                if create and isinstance(exc, openai.APIConnectionError):
                    # A create whose answer was lost may have reached the server; resending it
                    # can start a second paid response. There is no idempotency key to prevent
                    # that, so count it and say so.
                    self.possible_duplicates += 1
                delay = self.retry.delay(attempt, retry_after)
                self.retries += 1
                log.info(
                    "request.retry",
                    request=what,
                    attempt=attempt,
                    delay=round(delay, 3),
                    error=type(exc).__name__,
                    status_code=getattr(exc, "status_code", None),
                    possible_duplicate=create and isinstance(exc, openai.APIConnectionError),
                )
                attempt += 1
                await anyio.sleep(delay)

    async def create(self, params: dict[str, Any], log: Any) -> Answer:
        raw = await self._call(
            "create", lambda: self._responses.create(**params), log, create=True
        )
        return _answer(raw)

    async def retrieve(self, response_id: str, log: Any) -> Answer:
        raw = await self._call("retrieve", lambda: self._responses.retrieve(response_id), log)
        return _answer(raw)

    async def create_stream(
        self, params: dict[str, Any], log: Any
    ) -> AsyncStream[ResponseStreamEvent]:
        """Create a background response as a stream of server-sent events."""
        return await self._call(
            "create", lambda: self._streams.create(**{**params, "stream": True}), log,
            create=True,
        )

    async def resume_stream(
        self, response_id: str, after: int | None, log: Any
    ) -> AsyncStream[ResponseStreamEvent]:
        """Resume a background stream after sequence number ``after``."""
        starting_after: int | openai.Omit = openai.omit if after is None else after
        return await self._call(
            "resume",
            lambda: self._streams.retrieve(
                response_id, stream=True, starting_after=starting_after
            ),
            log,
        )

    async def cancel(self, response_id: str, log: Any) -> Answer:
        raw = await self._call("cancel", lambda: self._responses.cancel(response_id), log)
        return _answer(raw)
