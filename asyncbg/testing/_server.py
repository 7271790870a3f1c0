"""FakeResponsesServer: an offline Responses API with background mode, faults and counters.

Time is computed, not scheduled: each response records when it leaves ``queued`` and when it
ends, and a request reads its status off the clock. No timer runs per response, so a request
costs O(1) whatever the number of live responses (the in-flight count keeps a heap of end
times, O(log n)).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

import anyio

from ._batches import FakeBatches
from ._bodies import events, response_body
from ._faults import Fault, FaultRates, Route, fault_answer
from ._hooks import WebhookSender
from ._limits import FakeRateLimit, RateLimiter, Refusal, retry_headers
from ._model import LatencyModel, Outcomes, script, truncated
from ._requests import Rejection, parse_create
from ._state import LIVE, Counters, Resp, Timeline
from ._usage import UsageModel
from ._webhooks import WebhookTarget
from ._wire import ErrorStyle, FakeAnswer, cut, error_answer, not_found, request_id, route

__all__ = ["FakeResponsesServer"]

_EVENT_STREAM = {"content-type": "text/event-stream"}


class FakeResponsesServer:
    """An in-memory Responses API. Use it in-process (:func:`fake_client`), as ASGI, or via
    pytest.

    ``latency`` and ``outcomes`` script what responses do and ``usage`` what they cost;
    ``faults`` (scripted) and ``fault_rates`` (random) script what requests meet;
    ``rate_limit`` and ``max_live`` (a cap on live responses) answer 429 beyond them;
    ``error_style`` shapes error bodies; ``poll_after_ms`` is sent as ``openai-poll-after-ms`` on
    live answers (any text too, to see what a client makes of garbage); ``counters`` records
    what happened. ``batches`` serves
    the batch APIs of OpenAI, Anthropic and Gemini from the same routes, faults and counters.
    """

    def __init__(
        self,
        *,
        latency: LatencyModel | None = None,
        outcomes: Outcomes | None = None,
        usage: UsageModel | None = None,
        fault_rates: FaultRates | None = None,
        rate_limit: FakeRateLimit | None = None,
        max_live: int | None = None,
        error_style: ErrorStyle = "openai",
        poll_after_ms: float | str | None = None,
        cancel_finished: Literal["error", "return"] = "error",
        stream_events: int = 8,
        refuse_background_stream: bool = False,
        refuse_style: ErrorStyle | None = None,
        stream_resume_window: float = 300.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.latency = latency or LatencyModel()
        self.outcomes = outcomes or Outcomes()
        self.usage = usage or UsageModel()
        self.fault_rates = fault_rates
        self.rate_limit = rate_limit
        self.max_live = max_live
        self.error_style: ErrorStyle = error_style
        self.poll_after_ms = poll_after_ms
        self.cancel_finished = cancel_finished
        self.stream_events = stream_events
        self.refuse_background_stream = refuse_background_stream
        self.refuse_style = refuse_style
        self.stream_resume_window = stream_resume_window
        self.clock = clock
        self.counters = Counters()
        self._faults: deque[Fault] = deque()
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._timeline = Timeline(self.counters)
        self._responses = self._timeline.responses
        self._down_until = -math.inf
        self._hooks: WebhookSender | None = None
        # the batch APIs (OpenAI, Anthropic, Gemini), handed what they may use of this server
        self.batches = FakeBatches(self, draw=self._draw, gate=self._gate)

    @property
    def usage(self) -> UsageModel:
        return self._usage

    @usage.setter
    def usage(self, model: UsageModel) -> None:
        self._usage = model
        self._usage_rng = random.Random(model.seed)

    @property
    def rate_limit(self) -> FakeRateLimit | None:
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, limit: FakeRateLimit | None) -> None:
        """Setting it starts with full buckets."""
        self._rate_limit = limit
        self._limiter = RateLimiter(limit) if limit is not None else None

    # -- scripting -------------------------------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        route: Route = "any",
        times: int = 1,
        retry_after: float | str | None = None,
        delay: float = 0.0,
        after: int = 0,
    ) -> None:
        """Make the next ``times`` requests on ``route`` meet a fault (see :class:`Fault`)."""
        self._faults.append(
            Fault(kind, route, times, retry_after, delay, after)  # type: ignore[arg-type]
        )

    def restart(self, *, keep_state: bool = True, downtime: float = 0.0) -> None:
        """Simulate a restart: connections are refused for ``downtime`` seconds, and with
        ``keep_state=False`` every response, batch and file is forgotten (later retrieves answer
        404)."""
        self._down_until = self.clock() + downtime
        if not keep_state:
            self._timeline.clear()
            self.batches.clear()

    @contextlib.asynccontextmanager
    async def webhooks(
        self,
        target: WebhookTarget,
        secret: str,
        *,
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        delay: float = 0.0,
    ) -> AsyncIterator[None]:
        """Deliver ``response.completed/failed/cancelled/incomplete`` webhooks while inside.

        ``target`` is a URL (POSTed with httpx2) or an async callable ``(body, headers)``.
        ``drop_rate`` loses deliveries, ``duplicate_rate`` sends some twice with the same
        ``webhook-id`` (delivery is at-least-once), ``delay`` postpones each one.
        """
        hooks = WebhookSender(
            target, secret, clock=self.clock, take=self._timeline.take_webhook, rng=self._rng,
            counters=self.counters, drop_rate=drop_rate, duplicate_rate=duplicate_rate,
            delay=delay,
        )
        for r in self._responses.values():
            if r.background and not r.webhook_sent and math.isfinite(r.terminal_at):
                hooks.due(r.terminal_at, r.id)
        self._hooks = hooks
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(hooks.run)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._hooks = None
            await hooks.close()

    # -- reading ---------------------------------------------------------------------------

    def terminal_times(self) -> dict[str, float]:
        """For each response that has ended: when it ended, on this server's clock."""
        now = self.clock()
        return {rid: r.terminal_at for rid, r in self._responses.items() if r.terminal_at <= now}

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-ready data (served at ``GET /_fake/counters``)."""
        c = self.counters
        return {
            "creates": c.creates, "retrieves": c.retrieves, "cancels": c.cancels,
            "stream_requests": c.stream_requests, "faults": c.faults, "rejected": c.rejected,
            "rate_limited": c.rate_limited, "max_live_rejected": c.max_live_rejected,
            "in_flight": self.live_count(), "max_in_flight": c.max_in_flight,
            "webhooks_sent": c.webhooks_sent, "webhooks_dropped": c.webhooks_dropped,
            "webhooks_failed": c.webhooks_failed, "polls": c.polls,
            "detection_delays": c.detection_delays, "terminal_at": self.terminal_times(),
            "batch_creates": c.batch_creates, "batch_polls": c.batch_polls,
            "batch_cancels": c.batch_cancels, "result_fetches": c.result_fetches,
            "file_uploads": c.file_uploads, "batch_requests": c.batch_requests,
        }

    def status_of(self, response_id: str) -> str:
        """The status a retrieve would answer now, without counting as a poll."""
        return self._responses[response_id].status(self.clock())

    def live_count(self) -> int:
        """How many responses are ``queued`` or ``in_progress`` right now."""
        return self._timeline.live(self.clock())

    # -- requests --------------------------------------------------------------------------

    async def handle(
        self, method: str, path: str, query: Mapping[str, str], body: bytes
    ) -> FakeAnswer:
        """Answer one HTTP request. Both the transport and the ASGI app call this."""
        answer = await self._handle(method, path, query, body)
        answer.headers["x-request-id"] = request_id()
        return answer

    async def _handle(
        self, method: str, path: str, query: Mapping[str, str], body: bytes
    ) -> FakeAnswer:
        name, rid = route(method, path)
        if name is None:
            batch_answer = await self.batches.handle(method, path, query, body)
            if batch_answer is not None:
                return batch_answer
            return self._error(404, f"Unknown route {method} {path}", "invalid_request_error")
        down, fault = self._gate(name)
        if down:
            return FakeAnswer(reset=True)
        if fault is not None and (
                early := fault_answer(fault, name, rid, self.error_style)) is not None:
            return early
        if name != "create" and self._limiter is not None:
            refusal = self._limiter.poll(self.clock())
            if refusal is not None:
                return self._refused(refusal, {})
        if name == "create":
            answer = await self._create(body)
        elif name == "cancel":
            answer = self._cancel(rid)
        else:
            answer = self._retrieve(rid, query)
        if fault is not None:
            if fault.kind == "slow":
                answer.delay = fault.delay
            elif fault.kind == "reset_after":
                answer.reset_after = True
            elif fault.kind == "drop" and answer.stream is not None:
                answer.stream = cut(answer.stream, fault.after)
        return answer

    def _gate(self, route: Route) -> tuple[bool, Fault | None]:
        """Whether the server is down (the connection drops), and the fault a request meets."""
        if self.clock() < self._down_until:
            self.counters.faults += 1
            return True, None
        fault = self._next_fault(route)
        if fault is not None:
            self.counters.faults += 1
        return False, fault

    def _draw(self, metadata: Mapping[str, Any], input_chars: int) -> tuple[float, str, Any]:
        """A batch request's duration, outcome and token plan (metadata overrides apply)."""
        duration, _, outcome = script(self.latency, self.outcomes, self._rng, metadata)
        return duration, outcome, self.usage.plan(self._usage_rng, input_chars, metadata)

    def _next_fault(self, route: Route) -> Fault | None:
        faults = self._faults
        for fault in faults:
            if fault.route in ("any", route):
                fault.times -= 1
                if fault.times <= 0:
                    faults.remove(fault)
                return fault
        if self.fault_rates is not None:
            return self.fault_rates.draw(route)
        return None

    async def _create(self, body: bytes) -> FakeAnswer:
        req = parse_create(body, refuse_background_stream=self.refuse_background_stream)
        if isinstance(req, Rejection):
            if not req.stream_refused:
                return self._reject(req.message, req.param, req.code)
            # A refusal, not a malformed field: a FastAPI server says {"detail": "..."}.
            style = self.refuse_style or self.error_style
            return self._reject(req.message, None if style == "detail" else req.param,
                                req.code, style=style)
        try:
            duration, queued, outcome = script(self.latency, self.outcomes, self._rng,
                                               req.metadata)
            tokens = self.usage.plan(self._usage_rng, len(req.input_text), req.metadata)
            outcome = truncated(outcome, req.max_output_tokens, req.metadata)
        except ValueError as exc:
            return self._reject(str(exc), "metadata", "invalid_value")
        now = self.clock()
        limits: dict[str, str] = {}
        if self._limiter is not None:
            cap = req.max_output_tokens
            estimate = tokens.input + (cap if cap is not None else tokens.planned_output)
            limits, refusal = self._limiter.create(estimate, now)
            if refusal is not None:
                return self._refused(refusal, limits)
        if self.max_live is not None and self._timeline.live(now) >= self.max_live:
            return self._over_live(limits)
        stuck = outcome == "stuck"
        r = Resp(
            id=f"resp_{next(self._ids):06d}{secrets.token_hex(6)}",
            created=now,
            created_wall=int(time.time()),
            start_at=math.inf if stuck else now + queued,
            end_at=math.inf if stuck else now + duration,
            outcome=outcome,
            model=req.model,
            background=req.background,
            store=req.store,
            metadata=req.metadata,
            input_text=req.input_text[:2000],
            tokens=tokens,
            max_output_tokens=req.max_output_tokens,
            extra=req.echo,
        )
        self.counters.creates += 1
        self._timeline.add(r, now)
        if self._hooks is not None and r.background and math.isfinite(r.end_at):
            self._hooks.due(r.end_at, r.id)
        if req.stream:
            self.counters.stream_requests += 1
            return FakeAnswer(200, {**_EVENT_STREAM, **limits}, stream=self._events(r, -1))
        if not req.background:
            await anyio.sleep(max(r.end_at - now, 0.0) if not stuck else 0.0)
        answer = self._answer(r, self.clock())
        answer.headers.update(limits)
        return answer

    def _retrieve(self, rid: str, query: Mapping[str, str]) -> FakeAnswer:
        r = self._responses.get(rid)
        if r is None:
            return self._not_found(rid)
        now = self.clock()
        if query.get("stream") == "true":
            self.counters.stream_requests += 1
            try:
                after = int(query.get("starting_after", "-1"))
            except ValueError:
                return self._reject("starting_after must be an integer.", "starting_after")
            if now - r.created > self.stream_resume_window:
                return self._reject(
                    "This response is too old to resume streaming; retrieve it instead.",
                    "stream",
                )
            return FakeAnswer(200, dict(_EVENT_STREAM), stream=self._events(r, after))
        c = self.counters
        c.retrieves += 1
        c.polls[rid] = c.polls.get(rid, 0) + 1
        return self._answer(r, now)

    def _cancel(self, rid: str) -> FakeAnswer:
        r = self._responses.get(rid)
        if r is None:
            return self._not_found(rid)
        self.counters.cancels += 1
        now = self.clock()
        if not r.background:
            return self._reject("Only responses created with background=true can be cancelled.",
                                None)
        status = r.status(now)
        if status == "cancelled":
            return self._answer(r, now)  # cancel is idempotent
        if status not in LIVE:
            if self.cancel_finished == "return":
                return self._answer(r, now)
            return self._reject(f"Cannot cancel a response with status '{status}'.", None)
        self._timeline.cancel(r, now)
        if self._hooks is not None:
            self._hooks.due(now, r.id)
        return self._answer(r, now)

    # -- answers ---------------------------------------------------------------------------

    def _answer(self, r: Resp, now: float) -> FakeAnswer:
        status = r.status(now)
        if status not in LIVE:
            self._seen(r, now)
        headers = {"content-type": "application/json"}
        if self.poll_after_ms is not None and status in LIVE:
            headers["openai-poll-after-ms"] = str(self.poll_after_ms)
        return FakeAnswer(200, headers, json.dumps(response_body(r, status)).encode())

    def _seen(self, r: Resp, now: float) -> None:
        """The client learnt that ``r`` ended: record how late."""
        if not r.seen_terminal:
            r.seen_terminal = True
            self.counters.detection_delays[r.id] = max(now - r.terminal_at, 0.0)

    def _events(self, r: Resp, after: int) -> AsyncIterator[bytes]:
        return events(r, after, self.stream_events, self.clock, self._seen)

    def _error(self, status: int, message: str, type_: str, param: str | None = None,
               code: str | None = None) -> FakeAnswer:
        return error_answer(self.error_style, status, message, type_, param, code)

    def _reject(self, message: str, param: str | None, code: str | None = None, *,
                style: ErrorStyle | None = None) -> FakeAnswer:
        self.counters.rejected += 1
        return error_answer(style or self.error_style, 400, message, "invalid_request_error",
                            param, code)

    def _not_found(self, rid: str) -> FakeAnswer:
        return not_found(self.error_style, rid)

    def _refused(self, refusal: Refusal, limits: dict[str, str]) -> FakeAnswer:
        self.counters.rate_limited += 1
        return refusal.answer(self.error_style, limits)

    def _over_live(self, limits: dict[str, str]) -> FakeAnswer:
        self.counters.max_live_rejected += 1
        answer = self._error(
            429, f"Too many live responses: at most {self.max_live} may be queued or "
            "in progress at once. Retry when one has finished.", "requests", None,
            "too_many_live_responses",
        )
        answer.headers.update(limits)
        # When the next live response ends is known: say so, as a server with a queue would.
        if (end := self._timeline.next_end()) is not None:
            answer.headers.update(retry_headers(end - self.clock()))
        return answer
