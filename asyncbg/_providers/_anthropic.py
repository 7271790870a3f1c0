"""Anthropic's Message Batches (``client.messages.batches``) behind the Provider seam.

Each job is one ``messages.create`` request inside a Message Batch; results come back, once the
batch has ended, as ``{"custom_id", "result"}`` lines, kept by custom id (see
:mod:`asyncbg._providers._batching`). The ``anthropic`` SDK is an optional extra, imported when a
provider is made.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._http import RequestError
from .._status import JobStatus
from ._batch_common import Remote, Result, sdk_error
from ._batching import BatchApi

if TYPE_CHECKING:
    import anthropic
    from anthropic.types import Message
    from anthropic.types.messages import MessageBatch

__all__ = ["AnthropicBatches"]

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_LIVE = {"in_progress": JobStatus.IN_PROGRESS, "canceling": JobStatus.IN_PROGRESS}


class AnthropicBatches(BatchApi):
    """Message Batches on an ``anthropic.AsyncAnthropic`` client, at half the price.

    ``submit(**params)`` takes ``messages.create`` parameters (``model``, ``max_tokens``,
    ``messages``, ...); ``job.result()`` is an ``anthropic.types.Message``. Jobs are gathered
    into one batch until ``max_batch_size`` of them wait or ``batch_delay`` seconds have passed
    since the first, within the API's limits (100,000 requests, 256 MB).

    The defaults suit production. ``max_batch_size=1000``: a batch's results come only once all
    of it has ended, so a smaller batch hands back finished work sooner, holds fewer jobs behind
    a straggler or an expiry, and keeps the results held in memory small, while still settling a
    thousand jobs with each poll. ``batch_delay=2.0``: a batch takes minutes to hours, so two
    seconds to gather a burst of submits costs nothing. Batches are polled under the manager's
    ``poll_policy``: the default (every 0.5 s at first, growing to every 30 s) costs one request
    per batch per interval; for batches expected to take hours, pass a slower one such as
    ``PollPolicy(first_poll=30, min_interval=30, max_interval=120)``. Jobs are identified by
    custom ids, their keys where the API accepts them (``^[a-zA-Z0-9_-]{1,64}$``), else a digest.

    A request whose batch expired before it ran (its window ran out) is sent again in a new
    batch, up to ``batch_retries`` times (default 1); a request with a result never is.
    """

    api_max_requests = 100_000
    api_max_bytes = 256_000_000
    api_name = "Anthropic Message Batches API"

    def __init__(self, client: anthropic.AsyncAnthropic, *, max_batch_size: int = 1000,
                 batch_delay: float = 2.0, batch_retries: int = 1) -> None:
        try:
            import anthropic  # noqa: F401 - the SDK is an optional extra
        except ImportError as exc:
            raise ImportError("AnthropicBatches needs the anthropic SDK: "
                              "pip install 'asyncbg[anthropic]'") from exc
        super().__init__(max_batch_size=max_batch_size, batch_delay=batch_delay,
                         batch_retries=batch_retries)
        self.client = client
        self._sdk = client.with_options(max_retries=0)  # the scheduler owns retries

    @property
    def base_url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    def parse_result(self, body: bytes) -> Message:
        from anthropic.types import Message

        # Lenient on purpose, as for OpenAI: construct() builds nested blocks without checks.
        return Message.construct(**json.loads(body))

    # -- the API ---------------------------------------------------------------------------

    def _custom_id(self, key: str) -> str:
        if _CUSTOM_ID.match(key):
            return key
        return "k-" + hashlib.sha256(key.encode()).hexdigest()[:40]

    def _encode(self, cid: str, params: Mapping[str, Any]) -> tuple[Any, int]:
        item = {"custom_id": cid, "params": dict(params)}
        return item, len(json.dumps(item).encode()) + 1

    async def _submit(self, bucket: str, order: list[str], items: list[Any]) -> str:
        batch = await self._call("create", self._sdk.messages.batches.create(requests=items))
        return str(batch.id)

    async def _poll(self, batch_id: str) -> Remote:
        return _remote(await self._call("retrieve",
                                        self._sdk.messages.batches.retrieve(batch_id)))

    async def _cancel_batch(self, batch_id: str) -> Remote | None:
        return _remote(await self._call("cancel", self._sdk.messages.batches.cancel(batch_id)))

    async def _results(self, batch_id: str, remote: Remote,
                       order: list[str] | None) -> dict[str, Result]:
        import anthropic

        results: dict[str, Result] = {}
        self.requests += 2  # the SDK retrieves the batch for its results_url, then reads it
        try:
            async with self._sdk.messages.batches.with_streaming_response.results(
                    batch_id) as answer:
                async for line in answer.iter_lines():
                    if line.strip():
                        data = json.loads(line)
                        results[str(data.get("custom_id"))] = _result(batch_id, data)
        except (anthropic.APIStatusError, anthropic.APIConnectionError) as exc:
            raise sdk_error(exc, "results", self.base_url) from exc
        return results

    async def _call(self, what: str, request: Any) -> Any:
        import anthropic

        self.requests += 1
        try:
            return await request
        except (anthropic.APIStatusError, anthropic.APIConnectionError) as exc:
            error: RequestError = sdk_error(exc, what, self.base_url)
            raise error from exc


def _remote(batch: MessageBatch) -> Remote:
    status = batch.processing_status
    counts = batch.request_counts
    total = (counts.processing + counts.succeeded + counts.errored + counts.canceled
             + counts.expired)
    return Remote(_LIVE.get(status, JobStatus.IN_PROGRESS), status == "ended", status,
                  total or None)


def _result(batch_id: str, line: Mapping[str, Any]) -> Result:
    """One results line as a job's outcome; the body is the ``Message`` or the error."""
    result = line.get("result") or {}
    kind = result.get("type")
    if kind == "succeeded":
        return Result(JobStatus.COMPLETED, json.dumps(result.get("message")).encode())
    body = json.dumps(result).encode()
    if kind == "errored":
        error = (result.get("error") or {}).get("error") or {}
        code = error.get("type") or "errored"
        return Result(JobStatus.FAILED, body,
                      f"{error.get('message') or 'the request failed'} ({code})", code)
    if kind == "canceled":
        return Result(JobStatus.CANCELLED, body,
                      f"cancelled on the server with its batch {batch_id}", "cancelled")
    if kind == "expired":
        return Result(JobStatus.FAILED, body, f"expired: batch {batch_id} reached the end of "
                      "its 24-hour window before this request ran", "expired")
    return Result(JobStatus.FAILED, body, f"unknown result type {kind!r}", "invalid_response")
