"""The Provider seam: whom asyncbg talks to.

A provider turns the scheduler's four verbs (create, check, cancel, fetch) into one HTTP attempt
each and its answer into an :class:`Answer`; it never retries (the scheduler does, for every
provider alike) and raises only the errors of :mod:`asyncbg._http`. Its *poll unit* is what one
check settles: one response for the OpenAI Responses API; one remote batch, settling many jobs at
once, for the batch APIs that come next.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .._policies import PollPolicy
from .._status import JobStatus

__all__ = ["Answer", "Provider", "WebhookEvent"]


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer from the server about one job."""

    status: JobStatus
    response_id: str | None
    #: The body exactly as the server sent it (a JSON object).
    body: bytes
    http_status: int = 200
    request_id: str | None = None
    #: The server's hint for the next poll, in seconds (``openai-poll-after-ms``).
    poll_after: float | None = None
    #: For a terminal status other than completed: the server's reason, and its code.
    error: str | None = None
    error_code: str | None = None
    #: A create's rate-limit headers (``x-ratelimit-*``), for pacing; None on polls.
    limits: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A verified webhook delivery: its type and the response it is about.

    An event about a remote batch (``batch.completed``...) names the batch and, in
    ``response_ids``, the live jobs of it that this provider knows: each is woken as a
    response's event wakes its job (their fetches share one poll of the batch).
    """

    type: str
    response_id: str | None
    terminal: bool
    batch_id: str | None = None
    response_ids: tuple[str, ...] = ()


@runtime_checkable
class Provider(Protocol):
    """Whom a manager talks to. See :class:`~asyncbg.providers.OpenAIResponses`."""

    @property
    def base_url(self) -> str:
        """Where requests go, for messages (``cannot connect to <base_url>``)."""
        ...

    def prepare(self, params: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
        """The request as it will be sent (defaults applied); its digest names it in ledgers."""
        ...

    def is_stream(self, params: Mapping[str, Any]) -> bool:
        """Whether a prepared request runs as a background stream."""
        ...

    def poll_scale(self, params: Mapping[str, Any], policy: PollPolicy) -> float:
        """A multiplier on the poll intervals of this request (slow, discounted windows)."""
        ...

    async def create(self, params: Mapping[str, Any], *, key: str | None = None) -> Answer:
        """Start one job; ``key`` is its key (a batch API's custom id), which others ignore."""
        ...

    async def check(self, response_id: str) -> Answer:
        """A status check of a live job (the cheap path; the answer may be the final body)."""
        ...

    async def fetch(self, response_id: str) -> Answer:
        """The full, final result (after a push said it is done)."""
        ...

    async def cancel(self, response_id: str) -> Answer: ...

    def stream(
        self, params: Mapping[str, Any] | None = None, *, response_id: str | None = None,
        after: int | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        """Open a background stream (create it, or resume ``response_id`` after ``after``)."""
        ...

    def stream_answer(self, event: Mapping[str, Any]) -> Answer | None:
        """The job's state carried by a stream event, if it carries one."""
        ...

    def parse_result(self, body: bytes) -> Any:
        """The provider's own result type, built leniently from a saved body."""
        ...

    def parse_event(self, data: dict[str, Any]) -> Any:
        """The provider's own stream-event type, from one event's JSON."""
        ...

    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secret: str | None
    ) -> WebhookEvent:
        """Verify a signed delivery; raises ``ValueError`` for a forged or stale one."""
        ...

    async def aclose(self) -> None:
        """Close what the provider opened (not the client it was given)."""
        ...
