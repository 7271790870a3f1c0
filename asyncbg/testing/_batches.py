"""The batch APIs a FakeResponsesServer also serves, behind its one ``handle()``.

OpenAI's Batch API (``/v1/files``, ``/v1/batches``), Anthropic's Message Batches
(``/v1/messages/batches``) and Gemini's Batch Mode (``/v1/models/{m}:batchGenerateContent``,
``/v1/batches``; ``/v1beta`` too) meet the server's restarts, injected faults (in each API's own
error shape) and counters, and script their requests with its latency, outcome and usage models.
The server's ``rate_limit`` and ``max_live`` apply to responses only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, cast

from ._batch_core import Batch, BatchApi, BatchTiming, Fate
from ._batches_anthropic import AnthropicBatches
from ._batches_gemini import GeminiBatches
from ._batches_openai import OpenAIBatches
from ._faults import QUOTA_MESSAGE, Fault, set_retry_after
from ._model import Outcome
from ._state import Counters
from ._usage import TokenPlan
from ._wire import ErrorStyle, FakeAnswer, html_page, json_answer


class Host(Protocol):
    """What the batch APIs use of the server that serves them."""

    cancel_finished: Literal["error", "return"]
    error_style: ErrorStyle
    counters: Counters

    def clock(self) -> float: ...

__all__ = ["FakeBatches"]

_FAULTS = {
    "429": (429, "Rate limit reached; retry later.", "rate_limit_exceeded"),
    "500": (500, "The server had an error while processing your request.", "server_error"),
    "503": (503, "The server is overloaded; retry later.", "server_error"),
    "404": (404, "Not found.", "invalid_request_error"),
    "quota": (429, QUOTA_MESSAGE, "insufficient_quota"),
}


class FakeBatches:
    """The batch APIs of a :class:`FakeResponsesServer`; reach them as ``server.batches``.

    Each request of a batch is scripted like a response: its duration by the server's
    ``latency``, its ending by ``outcomes`` (``failed`` is a per-request error, ``incomplete``
    a truncated answer, ``stuck`` a request that never ends, so that its batch expires or is
    cancelled) and its tokens by ``usage``. A request overrides them through
    :meth:`script`, or through its own metadata where its API has free-form metadata
    (``fake_duration``, ``fake_outcome``, ``fake_*_tokens`` in an OpenAI body's ``metadata`` or
    a Gemini inlined request's ``metadata``). ``timing`` sets the time a batch spends
    validating, finalizing and cancelling, and its expiry window.

    A batch ends when its last request does (plus ``timing.finalizing``); results exist only
    once it has ended, and a cancelled batch keeps the results of the requests that ended
    before the cancel took effect.
    """

    def __init__(
        self, server: Host, *,
        draw: Callable[[Mapping[str, Any], int], tuple[float, str, Any]],
        gate: Callable[[Any], tuple[bool, Fault | None]],
    ) -> None:
        self._server = server
        self._draw = draw
        self._gate = gate
        self.timing = BatchTiming()
        self._scripts: dict[str, dict[str, Any]] = {}
        self._uses: dict[str, int] = {}  # scripts good for so many more requests
        self._gemini = GeminiBatches(self)
        self._apis: dict[str, BatchApi] = {
            "openai": OpenAIBatches(self), "anthropic": AnthropicBatches(self),
            "gemini": self._gemini,
        }

    # -- scripting -------------------------------------------------------------------------

    def script(
        self,
        custom_id: str,
        *,
        duration: float | None = None,
        outcome: Outcome | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        cached_tokens: int | None = None,
        times: int | None = None,
    ) -> None:
        """Script every later batch request keyed ``custom_id`` (a Gemini request's key is
        its ``metadata["key"]``, else its index): how long it takes from the end of
        validation, how it ends, what it uses. Overrides the request's own ``fake_*``
        metadata; calling it again replaces the script. ``times=n`` scripts only the next
        ``n`` such requests (``outcome="stuck", times=1``: the request's first batch expires,
        a batch that runs it again completes it)."""
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1, got {times!r}")
        values = {"fake_duration": duration, "fake_outcome": outcome,
                  "fake_input_tokens": input_tokens, "fake_output_tokens": output_tokens,
                  "fake_reasoning_tokens": reasoning_tokens, "fake_cached_tokens": cached_tokens}
        self._scripts[custom_id] = {k: v for k, v in values.items() if v is not None}
        self._uses.pop(custom_id, None)
        if times is not None:
            self._uses[custom_id] = times

    def clear(self) -> None:
        """Forget every batch and file (scripts stay)."""
        for api in self._apis.values():
            api.clear()

    # -- what the API modules ask of the server (batch_core.Context) -----------------------

    @property
    def cancel_finished(self) -> Literal["error", "return"]:
        return self._server.cancel_finished

    @property
    def error_style(self) -> ErrorStyle:
        return self._server.error_style

    def now(self) -> float:
        return self._server.clock()

    def wall(self) -> float:
        return time.time()

    def plan(self, key: str, metadata: Mapping[str, Any], input_chars: int,
             start: float) -> tuple[float, Fate, TokenPlan]:
        """When request ``key`` ends, how, and its tokens. Raises ``ValueError`` on a
        malformed ``fake_*`` value."""
        meta = {**metadata, **self._scripts.get(key, {})}
        if key in self._uses:
            self._uses[key] -= 1
            if not self._uses[key]:
                del self._uses[key], self._scripts[key]
        duration, outcome, tokens = self._draw(meta, input_chars)
        return ((math.inf if outcome == "stuck" else start + duration),
                cast(Fate, outcome), tokens)

    def created(self, batch: Batch) -> None:
        c = self._server.counters
        c.batch_creates += 1
        c.batch_requests[batch.id] = len(batch.items)

    def polled(self) -> None:
        self._server.counters.batch_polls += 1

    def cancelled(self) -> None:
        self._server.counters.batch_cancels += 1

    def fetched(self) -> None:
        self._server.counters.result_fetches += 1

    def uploaded(self) -> None:
        self._server.counters.file_uploads += 1

    # -- requests --------------------------------------------------------------------------

    async def handle(
        self, method: str, path: str, query: Mapping[str, str], body: bytes
    ) -> FakeAnswer | None:
        """Answer a request on a batch route; ``None`` if ``path`` is none of them."""
        parts = [p for p in path.split("/") if p]
        upload = parts[:1] == ["upload"]  # Gemini's resumable uploads: /upload/v1beta/files
        if upload:
            parts.pop(0)
        version = parts.pop(0) if parts[:1] in (["v1"], ["v1beta"], ["v1alpha"]) else "v1"
        name = "gemini" if upload else self._api_of(version, method, parts, query)
        api = self._apis["openai" if name == "both" else name]
        hit = api.match(method, parts)
        if hit is None:
            return None
        route, handler, ids = hit
        if name == "both":
            handler = self._list_both
        down, fault = self._gate(route)
        if down:
            return FakeAnswer(reset=True)
        if fault is not None and (early := _fault_answer(api, fault)) is not None:
            return early
        answer = handler(*ids, query=query, body=body)
        if fault is not None:
            if fault.kind == "slow":
                answer.delay = fault.delay
            elif fault.kind == "reset_after":
                answer.reset_after = True
        return answer

    def _api_of(self, version: str, method: str, parts: list[str],
                query: Mapping[str, str]) -> str:
        """Which API a path is. google-genai calls the Gemini API's ``v1`` by default, where
        ``/batches`` is OpenAI's too: Gemini's are told apart by their ``:verb`` suffixes, their
        ids, and their list's page parameters; a bare ``GET /v1/batches`` answers both."""
        if version != "v1":
            return "gemini"
        if parts[:1] == ["messages"]:
            return "anthropic"
        if parts[-1:] and parts[-1].endswith((":batchGenerateContent", ":cancel", ":download")):
            return "gemini"
        if parts[:1] == ["batches"] and len(parts) == 2 and (
            self._gemini.owns(parts[1]) or not parts[1].startswith("batch_")
        ):
            return "gemini"  # OpenAI's batch ids start with batch_
        if parts == ["batches"] and method == "GET":
            if query.keys() & {"pageSize", "pageToken"}:
                return "gemini"
            if not query.keys() & {"after", "limit"}:
                return "both"
        return "openai"

    def _list_both(self, *, query: Mapping[str, str], body: bytes) -> FakeAnswer:
        """OpenAI's list and Gemini's in one body: each SDK reads its own fields."""
        merged: dict[str, Any] = {}
        for name in ("openai", "gemini"):
            hit = self._apis[name].match("GET", ["batches"])
            assert hit is not None
            merged.update(json.loads(hit[1](query=query, body=body).body))
        return json_answer(200, merged)


def _fault_answer(api: BatchApi, fault: Fault) -> FakeAnswer | None:
    """The answer of a fault met before any work is done, in ``api``'s error shape."""
    if fault.kind == "reset":
        return FakeAnswer(reset=True)
    if fault.kind == "html":
        return html_page()
    if fault.kind not in _FAULTS:
        return None  # slow, reset_after (applied to the answer) and drop (streams only)
    status, message, kind = _FAULTS[fault.kind]
    answer = api.fault(status, message, kind)
    set_retry_after(answer, fault.retry_after)
    return answer
