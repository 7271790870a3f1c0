"""Gemini's Batch Mode (the Gemini Developer API) behind the Provider seam.

A group of jobs of one model (the API takes one model per batch) becomes one batch of inlined
requests, each tagged ``metadata={"key": <custom id>}``; once the batch has ended, its inlined
responses come with the batch itself and are handed to the jobs by that key (see
:mod:`asyncbg._providers._batching`). A group past the API's 20 MB for inlined requests goes
as an input file instead: a JSONL file of ``{"key", "request"}`` lines uploaded through the
Files API, and its results read from the batch's responses file. ``google-genai`` is an
optional extra, imported when a provider is made; calls go through ``client.aio``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx2

from .._http import Rejected, RequestError, Transient, Unreachable, classify_status
from .._status import JobStatus
from ._batch_common import Remote, Result, verify_standard_webhook
from ._batching import BatchApi

if TYPE_CHECKING:
    from google import genai
    from google.genai import types

__all__ = ["GeminiBatches"]

_FIELDS = frozenset({"model", "contents", "config"})
_QUEUED = frozenset({"JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_UNSPECIFIED"})
_ENDED = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
                    "JOB_STATE_EXPIRED", "JOB_STATE_PARTIALLY_SUCCEEDED"})
#: Gemini's batch webhook events that say a batch has ended.
_BATCH_EVENTS = frozenset({"batch.succeeded", "batch.failed", "batch.completed",
                           "batch.cancelled", "batch.expired"})
#: google.rpc.Code names, for a request's error code.
_RPC = {1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
        5: "NOT_FOUND", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
        9: "FAILED_PRECONDITION", 13: "INTERNAL", 14: "UNAVAILABLE"}


class GeminiBatches(BatchApi):
    """Gemini Batch Mode on a ``google.genai.Client`` (Gemini Developer API), at half the price.

    ``submit(model=..., contents=..., config=...)`` takes ``generate_content``'s parameters;
    ``job.result()`` is a ``google.genai.types.GenerateContentResponse``. Jobs of one model are
    gathered into one batch until ``max_batch_size`` of them wait or ``batch_delay`` seconds
    have passed since the first. A batch of up to ``inline_limit`` bytes (the API's documented
    20 MB for inlined requests) is sent inlined; a bigger one is uploaded as a JSONL input file
    (the Files API takes up to 2 GB) and its results are read from its responses file.

    The defaults suit production. ``max_batch_size=1000``: a batch's responses come only once
    all of it has ended, so a smaller batch hands back finished work sooner, holds fewer jobs
    behind a straggler or an expiry, and keeps the responses held in memory small, while still
    settling a thousand jobs with each poll. ``batch_delay=2.0``: a batch takes minutes to hours,
    so two seconds to gather a burst of submits costs nothing. Batches are polled under the
    manager's ``poll_policy``; for batches expected to take hours, pass a slower one such as
    ``PollPolicy(first_poll=30, min_interval=30, max_interval=120)``.

    A request whose batch expired before it ran (its window ran out) is sent again in a new
    batch, up to ``batch_retries`` times (default 1); a request with a result never is.
    """

    api_max_requests = 1_000_000
    api_max_bytes = 2_000_000_000  # an input file; inlined requests stop at inline_limit
    api_name = "Gemini Batch API"

    def __init__(self, client: genai.Client, *, max_batch_size: int = 1000,
                 batch_delay: float = 2.0, batch_retries: int = 1,
                 inline_limit: int = 20_000_000) -> None:
        try:
            from google.genai import types  # noqa: F401 - the SDK is an optional extra
        except ImportError as exc:  # pragma: no cover - the test extra installs it
            raise ImportError("GeminiBatches needs the google-genai SDK: "
                              "pip install 'asyncbg[gemini]'") from exc
        super().__init__(max_batch_size=max_batch_size, batch_delay=batch_delay,
                         batch_retries=batch_retries)
        if not inline_limit >= 0:
            raise ValueError(f"inline_limit must be a number of bytes >= 0, got {inline_limit!r}")
        self.inline_limit = inline_limit
        self.client = client
        self._aio = client.aio

    @property
    def base_url(self) -> str:
        options = getattr(getattr(self.client, "_api_client", None), "_http_options", None)
        url = getattr(options, "base_url", None) or "https://generativelanguage.googleapis.com"
        return str(url).rstrip("/")

    def prepare(self, params: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
        unknown = sorted(set(params) - _FIELDS)
        if unknown:
            raise ValueError(f"a Gemini batch request takes model, contents and config; not "
                             f"{', '.join(unknown)} (put generation settings in config)")
        if not params.get("model") or not params.get("contents"):
            raise ValueError("a Gemini batch request needs model= and contents=")
        return super().prepare(params, stream=stream)

    def parse_result(self, body: bytes) -> types.GenerateContentResponse:
        import pydantic
        from google.genai import types

        data = json.loads(body)
        try:
            return types.GenerateContentResponse.model_validate(data)
        except pydantic.ValidationError:  # a field this SDK does not know: keep what it does
            return types.GenerateContentResponse.model_construct(**data)

    # -- the API ---------------------------------------------------------------------------

    def _bucket(self, params: Mapping[str, Any]) -> str:
        return str(params.get("model") or "")

    def _encode(self, cid: str, params: Mapping[str, Any]) -> tuple[Any, int]:
        import pydantic
        from google.genai import types

        item: dict[str, Any] = {"contents": params.get("contents"), "metadata": {"key": cid}}
        if params.get("config") is not None:
            item["config"] = params["config"]
        try:
            types.InlinedRequest.model_validate(item)  # one bad request must not sink a batch
        except pydantic.ValidationError as exc:
            raise Rejected(f"google-genai refused this request: {exc}",
                           code="invalid_request") from exc
        return item, len(json.dumps(item, default=str).encode()) + 1

    async def _submit(self, bucket: str, order: list[str], items: list[Any]) -> str:
        from google.genai import types

        config = types.CreateBatchJobConfig(http_options=_one_attempt(),
                                            display_name=f"asyncbg-{len(items)}-requests")
        src: Any = items
        if sum(len(json.dumps(item, default=str)) + 1 for item in items) > self.inline_limit:
            src = await self._upload(order, items)
        job = await self._call("create", self._aio.batches.create(model=bucket, src=src,
                                                                  config=config))
        if not job.name:
            raise Transient("create: the batch came back without a name", maybe_sent=True)
        return str(job.name)

    async def _upload(self, order: list[str], items: list[Any]) -> str:
        """Upload ``items`` as an input file of ``{"key", "request"}`` lines, each request as
        the SDK itself writes an inlined one; the file's name."""
        from google.genai import batches, types

        api = self.client._api_client
        lines = [json.dumps({"key": cid,
                             "request": batches._InlinedRequest_to_mldev(api, item)["request"]},
                            default=str).encode() + b"\n"
                 for cid, item in zip(order, items, strict=True)]
        config = types.UploadFileConfig(mime_type="jsonl", http_options=_one_attempt(),
                                        display_name=f"asyncbg-{len(items)}-requests")
        uploaded = await self._call("upload", self._aio.files.upload(
            file=io.BytesIO(b"".join(lines)), config=config))
        if not uploaded.name:
            raise Transient("upload: the file came back without a name", maybe_sent=True)
        return str(uploaded.name)

    async def _poll(self, batch_id: str) -> Remote:
        from google.genai import types

        config = types.GetBatchJobConfig(http_options=_one_attempt())
        job = await self._call("retrieve", self._aio.batches.get(name=batch_id, config=config))
        state = str(getattr(job.state, "value", job.state) or "JOB_STATE_UNSPECIFIED")
        live = JobStatus.QUEUED if state in _QUEUED else JobStatus.IN_PROGRESS
        return Remote(live, state in _ENDED, state, None, job)

    async def _cancel_batch(self, batch_id: str) -> Remote | None:
        from google.genai import types

        config = types.CancelBatchJobConfig(http_options=_one_attempt())
        await self._call("cancel", self._aio.batches.cancel(name=batch_id, config=config))
        return None

    async def _results(self, batch_id: str, remote: Remote,
                       order: list[str] | None) -> dict[str, Result]:
        job: types.BatchJob = remote.handle
        if job.dest is not None and job.dest.file_name:
            return await self._file_results(batch_id, remote.raw_status, job.dest.file_name)
        responses = job.dest.inlined_responses if job.dest is not None else None
        results: dict[str, Result] = {}
        for n, r in enumerate(responses or []):
            cid = (r.metadata or {}).get("key")
            if cid is None:  # responses come in request order
                cid = order[n] if order is not None and n < len(order) else str(n)
            results[cid] = _result(batch_id, remote.raw_status, r)
        return results

    async def _file_results(self, batch_id: str, state: str, name: str) -> dict[str, Result]:
        """The results of a batch from an input file: its responses file, one line a job."""
        import pydantic
        from google.genai import types

        config = types.DownloadFileConfig(http_options=_one_attempt())
        content = await self._call("results", self._aio.files.download(file=name,
                                                                       config=config))
        results: dict[str, Result] = {}
        for line in bytes(content).splitlines():
            if not line.strip():
                continue
            data = json.loads(line)
            cid = str(data.get("key"))
            try:
                r = types.InlinedResponse.model_validate(
                    {k: data[k] for k in ("response", "error") if k in data})
            except pydantic.ValidationError as exc:
                rid = f"{batch_id}#{cid}"
                results[cid] = Result(JobStatus.FAILED, json.dumps(data).encode(),
                                      f"{rid}: a results line google-genai cannot read: {exc}",
                                      "invalid_response")
                continue
            results[cid] = _result(batch_id, state, r)
        return results

    def _no_result(self, batch_id: str, remote: Remote, cid: str) -> Result:
        job: types.BatchJob = remote.handle
        state = remote.raw_status
        body = json.dumps({"batch": batch_id, "state": state}).encode()
        if state == "JOB_STATE_CANCELLED":
            return Result(JobStatus.CANCELLED, body,
                          f"cancelled on the server with its batch {batch_id}", "cancelled")
        if state == "JOB_STATE_EXPIRED":
            return Result(JobStatus.FAILED, body, f"expired: batch {batch_id} reached the end "
                          "of its window before this request ran", "expired")
        if state == "JOB_STATE_FAILED":
            reason = job.error.message if job.error is not None else None
            return Result(JobStatus.FAILED, body,
                          f"batch {batch_id} failed: {reason or 'no reason given'}",
                          "batch_failed")
        return super()._no_result(batch_id, remote, cid)

    @property
    def webhook_secret(self) -> str | None:
        """The signing secret of the project's static webhook (``GEMINI_WEBHOOK_SECRET``),
        for ``BackgroundManager(webhooks=True)``."""
        return os.environ.get("GEMINI_WEBHOOK_SECRET") or None

    def _unwrap(self, body: bytes, headers: Mapping[str, str],
                secret: str | None) -> tuple[str, str | None, bool]:
        # A static webhook: Standard Webhooks HMAC. (Per-job webhook_config deliveries are
        # signed with RS256 JWTs instead, which asyncbg does not verify.)
        data = verify_standard_webhook(body, headers, secret)
        event_type = str(data.get("type") or "")
        if not event_type.startswith("batch."):
            return event_type, None, False
        inner = data.get("data")
        about: dict[str, Any] = inner if isinstance(inner, dict) else data
        name = next((about[f] for f in ("name", "id", "batch") if isinstance(about.get(f), str)),
                    None)
        if name is not None and not name.startswith("batches/"):
            name = f"batches/{name}"
        return event_type, name, event_type in _BATCH_EVENTS

    async def _call(self, what: str, request: Any) -> Any:
        from google.genai import errors

        self.requests += 1
        try:
            return await request
        except errors.APIError as exc:
            headers = getattr(exc.response, "headers", None) or {}
            raise classify_status(exc.code, headers, exc.details, what) from exc
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
            raise Unreachable(f"cannot connect to {self.base_url}: {exc}") from exc
        except (httpx2.TransportError, TimeoutError) as exc:
            raise Transient(f"{what}: connection lost: {exc!r}", maybe_sent=True) from exc
        except Exception as exc:
            error = _aiohttp_error(exc, what, self.base_url)
            if error is None:
                raise
            raise error from exc


def _one_attempt() -> types.HttpOptions:
    """One attempt per call: the scheduler owns retries (the SDK's own would hide them)."""
    from google.genai import types

    return types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=1))


def _aiohttp_error(exc: Exception, what: str, base_url: str) -> RequestError | None:
    """google-genai sends through aiohttp when it is installed and no transport was given."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorError):
        return Unreachable(f"cannot connect to {base_url}: {exc}")
    if isinstance(exc, aiohttp.ClientError):
        return Transient(f"{what}: connection lost: {exc!r}", maybe_sent=True)
    return None


def _result(batch_id: str, state: str, r: types.InlinedResponse) -> Result:
    """One inlined response as a job's outcome; the body is the GenerateContentResponse (as
    the API writes it, camelCase) or the error."""
    if r.error is None and r.response is not None:
        data = r.response.model_dump(mode="json", by_alias=True, exclude_none=True)
        return Result(JobStatus.COMPLETED, json.dumps(data).encode())
    error = r.error
    code = error.code if error is not None else None
    message = (error.message if error is not None else None) or "no response and no error"
    body = json.dumps({"error": error.model_dump(mode="json", exclude_none=True)
                       if error is not None else None}).encode()
    if code == 1 or (state == "JOB_STATE_CANCELLED" and code is None):
        return Result(JobStatus.CANCELLED, body,
                      f"cancelled on the server with its batch {batch_id}: {message}",
                      "cancelled")
    if state == "JOB_STATE_EXPIRED" and code in (4, None):
        return Result(JobStatus.FAILED, body, f"expired: {message}", "expired")
    name = _RPC.get(code, f"code_{code}") if code is not None else "request_failed"
    return Result(JobStatus.FAILED, body, f"{message} ({name})", name)
