"""The OpenAI Responses API in background mode: the first provider.

Cancels and final fetches go through the SDK (``max_retries=0``: the scheduler owns retries) as
raw answers, so the body is kept as the server sent it and no model is built on a live poll.
Live status checks and creates go over a lean aiohttp path when the client can be mirrored
exactly (:mod:`asyncbg._providers._lean`; a create's body is the SDK's own, byte for byte,
:mod:`asyncbg._providers._lean_create`), else through the SDK too. Background streams are
read as raw server-sent events; SDK models are built only when ``job.events()`` is read.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from typing import Any, cast

import httpx2
import openai
from openai.resources.responses import AsyncResponses
from openai.types.responses import Response

from .. import _log
from .._http import (
    BadAnswer,
    RequestError,
    Transient,
    Unreachable,
    classify_status,
    rate_limit_headers,
)
from .._policies import PollPolicy, parse_poll_after
from .._status import JobStatus
from ._base import Answer, WebhookEvent
from ._lean import LeanConnectError, LeanError, read_status
from ._lean_create import CREATE_PATH, create_body, sdk_field_order
from ._prepare import background_request
from ._sse import iter_events

__all__ = ["OpenAIResponses"]

#: The body fields the SDK's typed ``responses.create`` takes by name. Any other field of a
#: request (a newer API field, or one named like an SDK option such as ``timeout``) goes out
#: verbatim in ``extra_body``, so that a request is sent exactly as the user wrote it.
_CREATE_FIELDS = frozenset(inspect.signature(AsyncResponses.create).parameters) - {
    "self", "extra_headers", "extra_query", "extra_body", "timeout",
}

#: What ``with_raw_response`` adds to the SDK's request; a lean create sends what it sent.
_RAW_RESPONSE_HEADERS = {"x-stainless-raw-response": "true"}

TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.failed", "response.cancelled", "response.incomplete"}
)


class OpenAIResponses:
    """Background-mode Responses (``client.responses.*``) on an ``AsyncOpenAI`` or
    ``AsyncAzureOpenAI`` client. ``BackgroundManager(client)`` wraps a bare client in this."""

    def __init__(
        self, client: openai.AsyncOpenAI, *, lean_polls: bool = True, lean_creates: bool = True
    ) -> None:
        self.client = client
        plain = client.with_options(max_retries=0)
        self._raw = plain.responses.with_raw_response
        self._lean_polls = lean_polls
        # Azure routes a create by its model to a deployment: the SDK keeps those.
        self._lean_creates = lean_creates and not isinstance(client, openai.AsyncAzureOpenAI)
        self._lean: Any = None  # a LeanPoller once made; False when the client can't be mirrored

    @property
    def base_url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    # -- requests ----------------------------------------------------------------------------

    def prepare(self, params: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
        return background_request(params, stream=stream)

    def is_stream(self, params: Mapping[str, Any]) -> bool:
        return bool(params.get("stream"))

    def poll_scale(self, params: Mapping[str, Any], policy: PollPolicy) -> float:
        return policy.scale_for(params)

    async def create(self, params: Mapping[str, Any], *, key: str | None = None) -> Answer:
        if self._lean_creates:
            lean = self._lean_poller()
            order = await sdk_field_order() if lean is not None else None
            body = create_body(params, order) if order is not None else None
            if body is not None:
                answer = await self._lean_create(lean, body, params)
                if answer is not None:
                    return answer
        try:
            raw = await self._raw.create(**_sdk_kwargs(params, stream=False))
        except openai.APIStatusError as exc:
            raise self._create_error(self._status_error(exc, "create"), params) from exc
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc, "create") from exc
        answer = self._answer(raw.http_response)
        limits = rate_limit_headers(raw.http_response.headers)
        return answer if limits is None else replace(answer, limits=limits)

    async def _lean_create(
        self, lean: Any, body: bytes, params: Mapping[str, Any]
    ) -> Answer | None:
        """The create sent as the SDK would send it, over the status checks' session; ``None``
        for a redirect (the SDK's client follows it: the caller sends the create through it)."""
        try:
            got = await lean.post(CREATE_PATH, body, headers=_RAW_RESPONSE_HEADERS)
        except LeanConnectError as exc:
            raise Unreachable(f"cannot connect to {self.base_url}: {exc.reason}") from exc
        except LeanError as exc:
            _log.debug("request.connection_lost", request="create", error=repr(exc))
            raise Transient(f"create: connection lost: {exc}", maybe_sent=True) from exc
        if 300 <= got.status < 400:
            return None
        if got.status >= 400:
            error = classify_status(got.status, got.headers, got.body, "create")
            raise self._create_error(error, params)
        answer = self._parse(got.body, got.status, got.headers, lean.url(CREATE_PATH))
        limits = rate_limit_headers(got.headers)
        return answer if limits is None else replace(answer, limits=limits)

    def _create_error(self, error: RequestError, params: Mapping[str, Any]) -> RequestError:
        """``error`` with a hint when the server refused ``store=False`` in background mode."""
        if params.get("store") is False and "store" in error.message.lower():
            error.message += (
                " (background mode keeps the response on the server for about 10 minutes "
                "and needs store=true; remove store=False, or run the request without "
                "asyncbg's background mode if you need zero data retention)"
            )
            error.args = (error.message,)
        return error

    async def check(self, response_id: str) -> Answer:
        lean = self._lean_poller() if self._lean_polls else None
        if lean is None:
            return await self.fetch(response_id)
        try:
            got = await lean.get(f"responses/{response_id}")
        except LeanConnectError as exc:
            raise Unreachable(f"cannot connect to {self.base_url}: {exc.reason}") from exc
        except LeanError as exc:
            raise Transient(f"retrieve: {exc}", maybe_sent=True) from exc
        if 300 <= got.status < 400:
            return await self.fetch(response_id)  # a redirect: the SDK's client follows it
        if got.status >= 400:
            raise classify_status(got.status, got.headers, got.body, "retrieve")
        return self._parse(got.body, got.status, got.headers, f"responses/{response_id}",
                           poll=True)

    async def fetch(self, response_id: str) -> Answer:
        try:
            raw = await self._raw.retrieve(response_id)
        except openai.APIStatusError as exc:
            raise self._status_error(exc, "retrieve") from exc
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc, "retrieve") from exc
        return self._answer(raw.http_response)

    async def cancel(self, response_id: str) -> Answer:
        try:
            raw = await self._raw.cancel(response_id)
        except openai.APIStatusError as exc:
            raise self._status_error(exc, "cancel") from exc
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc, "cancel") from exc
        return self._answer(raw.http_response)

    @asynccontextmanager
    async def stream(
        self, params: Mapping[str, Any] | None = None, *, response_id: str | None = None,
        after: int | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        what = "create" if response_id is None else "resume"
        try:
            if response_id is None:
                assert params is not None
                raw: Any = await self._raw.create(**_sdk_kwargs(params, stream=True))
            else:
                raw = await self._raw.retrieve(
                    response_id, stream=True,
                    starting_after=openai.omit if after is None else after,
                )
        except openai.APIStatusError as exc:
            raise self._status_error(exc, what) from exc
        except openai.APIConnectionError as exc:
            raise self._connection_error(exc, what) from exc
        http: httpx2.Response = raw.http_response
        try:
            if http.status_code >= 300:
                await http.aread()
                raise classify_status(http.status_code, http.headers, http.content, what)
            async with aclosing(self._events(http)) as events:
                yield events
        finally:
            await http.aclose()

    async def _events(self, http: httpx2.Response) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async with aclosing(http.aiter_bytes()) as chunks, \
                    aclosing(cast(AsyncGenerator[Any, None], iter_events(chunks))) as sse:
                async for _event_type, data in sse:
                    try:
                        event = json.loads(data)
                    except ValueError:
                        continue  # a keep-alive or a line we do not know: skip it
                    if isinstance(event, dict):
                        yield event
        except (httpx2.HTTPError, OSError) as exc:
            raise Transient(f"stream dropped: {exc!r}", maybe_sent=True) from exc

    def stream_answer(self, event: Mapping[str, Any]) -> Answer | None:
        response = event.get("response")
        if not isinstance(response, dict):
            return None
        status = JobStatus.from_server(response.get("status"))
        rid = response.get("id")
        error, code = _reason(status, response)
        return Answer(status, rid if isinstance(rid, str) else None,
                      json.dumps(response).encode(), error=error, error_code=code)

    # -- results, events, webhooks -----------------------------------------------------------

    def parse_result(self, body: bytes) -> Response:
        # Lenient on purpose: real payloads omit fields strict validation wants.
        return Response.construct(**json.loads(body))

    def parse_event(self, data: dict[str, Any]) -> Any:
        from openai._models import construct_type
        from openai.types.responses import ResponseStreamEvent

        return construct_type(type_=ResponseStreamEvent, value=data)

    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secret: str | None
    ) -> WebhookEvent:
        # Synchronous even on AsyncOpenAI: an HMAC over a small body, cheap enough inline.
        event = self.client.webhooks.unwrap(body, dict(headers), secret=secret)
        event_type = str(getattr(event, "type", ""))
        rid = getattr(getattr(event, "data", None), "id", None)
        return WebhookEvent(event_type, rid if isinstance(rid, str) else None,
                            event_type in TERMINAL_EVENTS)

    def webhook_secret(self) -> str | None:
        return self.client.webhook_secret

    async def aclose(self) -> None:
        if self._lean:
            await self._lean.aclose()
        self._lean = None

    # -- helpers -----------------------------------------------------------------------------

    def _lean_poller(self) -> Any:
        if self._lean is None:
            self._lean = False
            if self._lean_polls or self._lean_creates:
                try:
                    from ._lean import LeanPoller
                except ImportError:  # pragma: no cover - aiohttp is a dependency
                    LeanPoller = None  # type: ignore[assignment,misc]
                poller = LeanPoller.for_client(self.client) if LeanPoller is not None else None
                self._lean = poller if poller is not None else False
        return self._lean or None

    def _answer(self, http: httpx2.Response) -> Answer:
        return self._parse(http.content, http.status_code, http.headers, str(http.url))

    def _parse(
        self, body: bytes, http_status: int, headers: Mapping[str, str], url: str, *,
        poll: bool = False,
    ) -> Answer:
        raw_status = read_status(body) if poll and body[:1] == b"{" else None
        live = JobStatus.from_server(raw_status) if raw_status is not None else None
        if live is not None and not live.terminal:
            # A live status check: only its status matters (the job knows its id), and the body
            # is kept as bytes.
            # Reading the top-level status spares a json.loads of the whole object per poll.
            return Answer(live, None, body, http_status, headers.get("x-request-id"),
                          parse_poll_after(headers))
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            kind = headers.get("content-type") or "no content-type"
            sample = body[:80].decode("utf-8", "replace").strip()
            raise BadAnswer(
                f"the server at {url} answered HTTP {http_status} with {kind}, not a JSON "
                f"object ({sample!r}…); is the base URL right? ({self.base_url})",
                http_status=http_status, request_id=headers.get("x-request-id"),
            )
        status = JobStatus.from_server(data.get("status"))
        rid = data.get("id")
        error, code = _reason(status, data)
        return Answer(
            status, rid if isinstance(rid, str) else None, body, http_status,
            headers.get("x-request-id"), parse_poll_after(headers), error, code,
        )

    def _status_error(self, exc: openai.APIStatusError, what: str) -> RequestError:
        http = exc.response
        try:
            content: Any = http.content
        except httpx2.ResponseNotRead:
            content = exc.body
        return classify_status(exc.status_code, http.headers, content, what)

    def _connection_error(self, exc: openai.APIConnectionError, what: str) -> RequestError:
        cause = exc.__cause__
        reason = str(cause or exc) or type(cause or exc).__name__
        # httpx2's, or legacy httpx's for a client built with http_client=httpx.AsyncClient().
        if type(cause).__name__ in ("ConnectError", "ConnectTimeout"):
            return Unreachable(f"cannot connect to {self.base_url}: {reason}")
        _log.debug("request.connection_lost", request=what, error=repr(cause or exc))
        return Transient(f"{what}: connection lost: {reason}", maybe_sent=True)


def _sdk_kwargs(params: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
    """``params`` as keyword arguments of ``responses.create``: the fields it does not know by
    name travel in ``extra_body``, untouched."""
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in params.items():
        if name == "stream":
            continue
        (known if name in _CREATE_FIELDS else extra)[name] = value
    if stream:
        known["stream"] = True
    if extra:
        known["extra_body"] = extra
    return known


def _reason(status: JobStatus, data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The server's explanation for a terminal status other than completed, and its code."""
    if status is JobStatus.FAILED:
        err = data.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            message = str(err.get("message") or "the server gave no message")
            return (f"{message} ({code})" if code else message), (
                code if isinstance(code, str) else "response_failed")
        return "the server reported failure without an error object", "response_failed"
    if status is JobStatus.INCOMPLETE:
        details = data.get("incomplete_details")
        if isinstance(details, dict) and details.get("reason"):
            return f"incomplete: {details['reason']}", str(details["reason"])
        return "incomplete: the server gave no reason", "incomplete"
    if status is JobStatus.CANCELLED:
        return "cancelled on the server", "cancelled"
    return None, None
