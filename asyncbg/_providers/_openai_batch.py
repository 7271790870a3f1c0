"""OpenAI's Batch API (``/v1/files`` and ``/v1/batches``) for ``/v1/responses`` requests.

A group of jobs is uploaded as one JSONL input file and run as one batch; once it has ended, its
output and error files are read once and each line handed to its job by ``custom_id`` (see
:mod:`asyncbg._providers._batching`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import openai
from openai.types import Batch
from openai.types.responses import Response

from .. import _log
from .._http import RequestError, error_text
from .._status import JobStatus
from ._batch_common import Remote, Result, sdk_error, status_body
from ._batching import BatchApi
from ._openai import _reason

__all__ = ["OpenAIBatch"]

ENDPOINT = "/v1/responses"
_ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
#: OpenAI's batch webhook events: each says the batch has ended.
_BATCH_EVENTS = frozenset({"batch.completed", "batch.failed", "batch.expired",
                           "batch.cancelled"})
_NOT_RUN = {"batch_cancelled": JobStatus.CANCELLED, "batch_expired": JobStatus.FAILED}


class OpenAIBatch(BatchApi):
    """The Batch API for Responses on an ``openai.AsyncOpenAI`` client, at half the price.

    ``submit(**params)`` takes ``responses.create`` parameters; ``job.result()`` is an
    ``openai.types.responses.Response``. Jobs of one model (the API takes one model per batch)
    are gathered into one batch until ``max_batch_size`` of them wait or ``batch_delay`` seconds
    have passed since the first, within the API's limits (50,000 requests, a 200 MB file).

    The defaults suit production. ``max_batch_size=1000``: a batch's output file exists only
    once all of it has ended, so a smaller batch hands back finished work sooner, holds fewer
    jobs behind a straggler or an expiry, and keeps the results held in memory small, while
    still settling a thousand jobs with each poll. ``batch_delay=2.0``: a batch takes minutes
    to hours (its window is 24 h), so two seconds to gather a burst of submits costs nothing.
    Batches are polled under the manager's ``poll_policy``: the default (every 0.5 s at first,
    growing to every 30 s) costs one request per batch per interval; for batches expected to
    take hours, pass a slower one such as
    ``PollPolicy(first_poll=30, min_interval=30, max_interval=120)``.

    A batch's input, output and error files stay on OpenAI's storage until deleted:
    :meth:`delete_files` deletes those of batches whose results were all handed out (call it
    once they are in the journal); ``keep_files=True`` keeps them.

    A request whose batch expired before it ran (its window ran out) is sent again in a new
    batch, up to ``batch_retries`` times (default 1); a request with a result never is.
    """

    api_max_requests = 50_000
    api_max_bytes = 200_000_000
    api_name = "OpenAI Batch API"

    def __init__(self, client: openai.AsyncOpenAI, *, max_batch_size: int = 1000,
                 batch_delay: float = 2.0, keep_files: bool = False,
                 batch_retries: int = 1) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_delay=batch_delay,
                         batch_retries=batch_retries)
        self.client = client
        self.keep_files = keep_files
        self._sdk = client.with_options(max_retries=0)  # the scheduler owns retries
        #: batch id -> its input, output and error file ids, once its results were read.
        self._files: dict[str, list[str]] = {}

    @property
    def base_url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    def parse_result(self, body: bytes) -> Response:
        return Response.construct(**json.loads(body))

    # -- the API ---------------------------------------------------------------------------

    def _bucket(self, params: Mapping[str, Any]) -> str:
        return str(params.get("model") or "")

    def _encode(self, cid: str, params: Mapping[str, Any]) -> tuple[Any, int]:
        line = json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT,
                           "body": dict(params)}).encode() + b"\n"
        return line, len(line)

    async def _submit(self, bucket: str, order: list[str], items: list[Any]) -> str:
        content = b"".join(items)
        self.requests += 1
        try:
            f = await self._sdk.files.create(file=("asyncbg-batch.jsonl", content),
                                             purpose="batch")
        except (openai.APIStatusError, openai.APIConnectionError) as exc:
            raise sdk_error(exc, "upload", self.base_url) from exc
        batch = await self._call("create", self._sdk.batches.create(
            input_file_id=f.id, endpoint="/v1/responses", completion_window="24h"))
        return str(batch.id)

    async def _poll(self, batch_id: str) -> Remote:
        return _remote(await self._call("retrieve", self._sdk.batches.retrieve(batch_id)))

    async def _cancel_batch(self, batch_id: str) -> Remote | None:
        return _remote(await self._call("cancel", self._sdk.batches.cancel(batch_id)))

    async def _results(self, batch_id: str, remote: Remote,
                       order: list[str] | None) -> dict[str, Result]:
        batch: Batch = remote.handle
        self._files[batch_id] = [f for f in (batch.input_file_id, batch.output_file_id,
                                             batch.error_file_id) if f]
        results: dict[str, Result] = {}
        if batch.status == "failed":
            results.update(_refused(batch, order))
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = await self._call("results", self._sdk.files.content(file_id))
                for line in content.content.splitlines():
                    if line.strip():
                        data = json.loads(line)
                        results[str(data.get("custom_id"))] = _result(batch_id, data)
        return results

    def _no_result(self, batch_id: str, remote: Remote, cid: str) -> Result:
        if remote.raw_status == "failed":  # met again after a re-attach: lines unknown here
            return _whole(remote.handle)
        if remote.raw_status == "expired":  # in neither file: it never ran either
            rid = f"{batch_id}#{cid}"
            return Result(JobStatus.FAILED, status_body(rid, batch_id, cid, "expired"),
                          f"expired: batch {batch_id} reached the end of its window before "
                          "this request ran", "batch_expired")
        return super()._no_result(batch_id, remote, cid)

    async def _delete_files(self, batch_ids: list[str]) -> int:
        deleted = 0
        for batch_id in batch_ids:
            for file_id in self._files.pop(batch_id, []):
                if self.keep_files:
                    continue
                try:
                    await self._call("delete", self._sdk.files.delete(file_id))
                except RequestError as exc:  # storage only: say so, lose nothing
                    _log.warning("batch.file_not_deleted", batch_id=batch_id, file_id=file_id,
                                 error=exc.message)
                else:
                    deleted += 1
        return deleted

    @property
    def webhook_secret(self) -> str | None:
        """The client's (``OPENAI_WEBHOOK_SECRET``), for ``BackgroundManager(webhooks=True)``."""
        return self.client.webhook_secret

    def _unwrap(self, body: bytes, headers: Mapping[str, str],
                secret: str | None) -> tuple[str, str | None, bool]:
        # The SDK verifies (signature, 300 s tolerance) and parses the event.
        event = self.client.webhooks.unwrap(body, dict(headers), secret=secret)
        event_type = str(getattr(event, "type", ""))
        batch_id = getattr(getattr(event, "data", None), "id", None)
        if not event_type.startswith("batch."):
            return event_type, None, False
        return event_type, batch_id if isinstance(batch_id, str) else None, (
            event_type in _BATCH_EVENTS)

    async def _call(self, what: str, request: Any) -> Any:
        self.requests += 1
        try:
            return await request
        except (openai.APIStatusError, openai.APIConnectionError) as exc:
            raise sdk_error(exc, what, self.base_url) from exc


def _remote(batch: Batch) -> Remote:
    status = batch.status
    live = JobStatus.QUEUED if status == "validating" else JobStatus.IN_PROGRESS
    total = batch.request_counts.total if batch.request_counts is not None else 0
    return Remote(live, status in _ENDED, status, total or None, batch)


def _result(batch_id: str, line: Mapping[str, Any]) -> Result:
    """One output or error line as a job's outcome; the body is the Response or the error."""
    response = line.get("response")
    if isinstance(response, dict):
        body = response.get("body")
        if response.get("status_code") == 200 and isinstance(body, dict):
            status = JobStatus.from_server(body.get("status"))
            if not status.terminal:
                status = JobStatus.COMPLETED
            error, code = _reason(status, body)
            return Result(status, json.dumps(body).encode(), error, code)
        message, code = error_text(body if body is not None else b"")
        http = response.get("status_code")
        return Result(JobStatus.FAILED, json.dumps(body).encode(),
                      f"HTTP {http}: {message or 'no message'}", code or "request_failed",
                      http if isinstance(http, int) else 200)
    problem: dict[str, Any] = line.get("error") or {}
    code = str(problem.get("code") or "request_failed")
    message = str(problem.get("message") or f"no response in batch {batch_id}")
    return Result(_NOT_RUN.get(code, JobStatus.FAILED), json.dumps(problem).encode(),
                  message, "cancelled" if code == "batch_cancelled" else code)


def _refused(batch: Batch, order: list[str] | None) -> dict[str, Result]:
    """A batch that failed validation: each request fails, with its own line's error where the
    errors name its line."""
    errors = batch.errors.data if batch.errors is not None and batch.errors.data else []
    results = {cid: _whole(batch) for cid in order or []}
    for e in errors:
        if order and e.line and 1 <= e.line <= len(order):
            results[order[e.line - 1]] = Result(
                JobStatus.FAILED, json.dumps(e.model_dump()).encode(),
                f"batch {batch.id} refused this request: {e.message}",
                e.code or "batch_failed")
    return results


def _whole(batch: Batch) -> Result:
    """The outcome of a request of a batch that failed as a whole."""
    errors = batch.errors.data if batch.errors is not None and batch.errors.data else []
    summary = "; ".join(f"line {e.line}: {e.message}" if e.line else str(e.message)
                        for e in errors[:5]) or "no reason given"
    return Result(JobStatus.FAILED,
                  json.dumps({"errors": [e.model_dump() for e in errors[:5]]}).encode(),
                  f"batch {batch.id} failed validation: {summary}", "batch_failed")
