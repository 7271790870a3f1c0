"""FakeResponsesServer: an offline Responses API with background mode, faults and counters.

Time is computed, not scheduled: each response records when it leaves ``queued`` and when it
ends, and a request reads its status off the clock. No timer runs per response, so a request
costs O(1) whatever the number of live responses (the in-flight count keeps a heap of end
times, O(log n)).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc
import httpx2

from ._faults import Fault, FaultRates, Route
from ._model import OUTCOMES, LatencyModel, Outcome, Outcomes
from ._webhooks import WebhookTarget, signed_delivery

__all__ = ["Counters", "FakeAnswer", "FakeResponsesServer"]

LIVE = ("queued", "in_progress")
_FINAL_EVENTS = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "response.cancelled"}
)


@dataclass(slots=True)
class FakeAnswer:
    """What the server answers one request with; ``reset`` means the connection drops."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    reset: bool = False
    reset_after: bool = False
    delay: float = 0.0


@dataclass(slots=True)
class Counters:
    """What the server saw. Read them in tests and benchmarks; ``reset()`` zeroes them."""

    creates: int = 0
    retrieves: int = 0
    cancels: int = 0
    stream_requests: int = 0
    faults: int = 0
    rejected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    polls: dict[str, int] = field(default_factory=dict)
    detection_delays: dict[str, float] = field(default_factory=dict)
    webhooks_sent: int = 0
    webhooks_dropped: int = 0
    webhooks_failed: int = 0

    def reset(self) -> None:
        in_flight = self.in_flight
        self.__init__()  # type: ignore[misc]
        self.in_flight = self.max_in_flight = in_flight


@dataclass(slots=True, eq=False)
class _Resp:
    """One response's script: its request, and when it leaves ``queued`` and ends."""

    id: str
    created: float
    created_wall: int
    start_at: float
    end_at: float
    outcome: Outcome
    model: str
    background: bool
    store: bool
    metadata: dict[str, Any]
    input_text: str
    extra: dict[str, Any]
    cancelled_at: float | None = None
    seen_terminal: bool = False
    in_heap: bool = False
    webhook_sent: bool = False


class FakeResponsesServer:
    """An in-memory Responses API. Use it in-process (:meth:`client`), as ASGI, or via pytest.

    ``latency`` and ``outcomes`` script what responses do; ``faults`` (scripted) and
    ``fault_rates`` (random) script what requests meet; ``counters`` records what happened.
    """

    def __init__(
        self,
        *,
        latency: LatencyModel | None = None,
        outcomes: Outcomes | None = None,
        fault_rates: FaultRates | None = None,
        poll_after_ms: int | None = None,
        cancel_finished: Literal["error", "return"] = "error",
        stream_events: int = 8,
        refuse_background_stream: bool = False,
        stream_resume_window: float = 300.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.latency = latency or LatencyModel()
        self.outcomes = outcomes or Outcomes()
        self.fault_rates = fault_rates
        self.poll_after_ms = poll_after_ms
        self.cancel_finished = cancel_finished
        self.stream_events = stream_events
        self.refuse_background_stream = refuse_background_stream
        self.stream_resume_window = stream_resume_window
        self.clock = clock
        self.counters = Counters()
        self._faults: deque[Fault] = deque()
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._responses: dict[str, _Resp] = {}
        self._ends: list[tuple[float, str]] = []
        self._down_until = -math.inf
        self._hooks: _Hooks | None = None

    # -- scripting -------------------------------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        route: Route = "any",
        times: int = 1,
        retry_after: float | None = None,
        delay: float = 0.0,
        after: int = 0,
    ) -> None:
        """Make the next ``times`` requests on ``route`` meet a fault (see :class:`Fault`)."""
        self._faults.append(
            Fault(kind, route, times, retry_after, delay, after)  # type: ignore[arg-type]
        )

    def restart(self, *, keep_state: bool = True, downtime: float = 0.0) -> None:
        """Simulate a restart: connections are refused for ``downtime`` seconds, and with
        ``keep_state=False`` every response is forgotten (later retrieves answer 404)."""
        self._down_until = self.clock() + downtime
        if not keep_state:
            self._responses.clear()
            self._ends.clear()
            self.counters.in_flight = 0

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
        hooks = _Hooks(self, target, secret, drop_rate, duplicate_rate, delay)
        for r in self._responses.values():
            if r.background and not r.webhook_sent and math.isfinite(self._terminal_at(r)):
                hooks.due(self._terminal_at(r), r.id)
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

    def terminal_times(self) -> dict[str, float]:
        """For each response that has ended: when it ended, on this server's clock."""
        now = self.clock()
        return {
            rid: self._terminal_at(r) for rid, r in self._responses.items()
            if self._terminal_at(r) <= now
        }

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-ready data (served at ``GET /_fake/counters``)."""
        c = self.counters
        return {
            "creates": c.creates, "retrieves": c.retrieves, "cancels": c.cancels,
            "stream_requests": c.stream_requests, "faults": c.faults, "rejected": c.rejected,
            "in_flight": self.live_count(), "max_in_flight": c.max_in_flight,
            "webhooks_sent": c.webhooks_sent, "webhooks_dropped": c.webhooks_dropped,
            "webhooks_failed": c.webhooks_failed, "polls": c.polls,
            "detection_delays": c.detection_delays, "terminal_at": self.terminal_times(),
        }

    def status_of(self, response_id: str) -> str:
        """The status a retrieve would answer now, without counting as a poll."""
        return self._status(self._responses[response_id], self.clock())

    def live_count(self) -> int:
        """How many responses are ``queued`` or ``in_progress`` right now."""
        self._expire(self.clock())
        return self.counters.in_flight

    # -- the timeline ----------------------------------------------------------------------

    def _status(self, r: _Resp, now: float) -> str:
        if r.cancelled_at is not None:
            return "cancelled"
        if now < r.start_at:
            return "queued"
        if now < r.end_at:
            return "in_progress"
        return r.outcome

    def _terminal_at(self, r: _Resp) -> float:
        return r.cancelled_at if r.cancelled_at is not None else r.end_at

    def _expire(self, now: float) -> None:
        ends = self._ends
        while ends and ends[0][0] <= now:
            _, rid = heapq.heappop(ends)
            r = self._responses.get(rid)
            if r is not None and r.in_heap:
                r.in_heap = False
                self.counters.in_flight -= 1

    # -- requests --------------------------------------------------------------------------

    async def handle(
        self, method: str, path: str, query: Mapping[str, str], body: bytes
    ) -> FakeAnswer:
        """Answer one HTTP request. Both the transport and the ASGI app call this."""
        route, rid = _route(method, path)
        if route is None:
            return _error(404, f"Unknown route {method} {path}", "invalid_request_error")
        now = self.clock()
        if now < self._down_until:
            self.counters.faults += 1
            return FakeAnswer(reset=True)
        fault = self._next_fault(route)
        delay = 0.0
        if fault is not None:
            self.counters.faults += 1
            if fault.kind == "slow":
                delay = fault.delay
            elif fault.kind == "reset":
                return FakeAnswer(reset=True)
            elif fault.kind in ("429", "500", "503"):
                answer = _error(
                    int(fault.kind),
                    "Rate limit reached; retry later." if fault.kind == "429"
                    else "The server had an error while processing your request.",
                    "rate_limit_exceeded" if fault.kind == "429" else "server_error",
                )
                if fault.retry_after is not None:
                    answer.headers["retry-after"] = f"{fault.retry_after:g}"
                return answer
        if route == "create":
            answer = await self._create(body)
        elif route == "cancel":
            answer = self._cancel(rid)
        else:
            answer = self._retrieve(rid, query)
        answer.delay = delay
        if fault is not None and fault.kind == "reset_after":
            answer.reset_after = True
        if fault is not None and fault.kind == "drop" and answer.stream is not None:
            answer.stream = _cut(answer.stream, fault.after)
        return answer

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
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return self._reject("We could not parse the JSON body of your request.", None)
        if not isinstance(req, dict):
            return self._reject("The request body must be a JSON object.", None)
        model = req.get("model")
        if not isinstance(model, str) or not model:
            return self._reject(
                "Missing required parameter: 'model'.", "model", "missing_required_parameter"
            )
        background = bool(req.get("background"))
        if background and req.get("stream") and self.refuse_background_stream:
            return self._reject(
                "Streaming is not supported for background responses on this server.", "stream",
                "unsupported_parameter",
            )
        if background and req.get("store") is False:
            return self._reject(
                "Background responses require store=true.", "store", "invalid_value"
            )
        metadata = req.get("metadata") or {}
        if not isinstance(metadata, dict):
            return self._reject("Invalid type for 'metadata': expected an object.", "metadata")
        try:
            duration, queued, outcome = self._script(metadata)
        except ValueError as exc:
            return self._reject(str(exc), "metadata", "invalid_value")
        now = self.clock()
        stuck = outcome == "stuck"
        r = _Resp(
            id=f"resp_{next(self._ids):06d}{secrets.token_hex(6)}",
            created=now,
            created_wall=int(time.time()),
            start_at=math.inf if stuck else now + queued,
            end_at=math.inf if stuck else now + duration,
            outcome=outcome,
            model=model,
            background=background,
            store=req.get("store", True) is not False,
            metadata=metadata,
            input_text=_input_text(req.get("input")),
            extra={k: req[k] for k in ("reasoning", "instructions", "background_options")
                   if k in req},
        )
        self.counters.creates += 1
        self._responses[r.id] = r
        self._expire(now)
        if r.end_at > now:
            r.in_heap = True
            heapq.heappush(self._ends, (r.end_at, r.id))
            c = self.counters
            c.in_flight += 1
            c.max_in_flight = max(c.max_in_flight, c.in_flight)
        if self._hooks is not None and r.background and math.isfinite(r.end_at):
            self._hooks.due(r.end_at, r.id)
        if req.get("stream"):
            self.counters.stream_requests += 1
            return FakeAnswer(200, {"content-type": "text/event-stream"},
                              stream=self._events(r, -1))
        if not background:
            await anyio.sleep(max(r.end_at - now, 0.0) if outcome != "stuck" else 0.0)
        return self._answer(r, self.clock())

    def _script(self, metadata: Mapping[str, Any]) -> tuple[float, float, Outcome]:
        duration = self.latency.sample(self._rng)
        if "fake_duration" in metadata:
            duration = _seconds(metadata["fake_duration"], "fake_duration")
        queued = duration * self.latency.queue_fraction
        if "fake_queue" in metadata:
            queued = min(_seconds(metadata["fake_queue"], "fake_queue"), duration)
        outcome = self.outcomes.sample(self._rng)
        if "fake_outcome" in metadata:
            outcome = metadata["fake_outcome"]
            if outcome not in OUTCOMES:
                raise ValueError(
                    f"metadata.fake_outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}"
                )
        return duration, queued, outcome

    def _retrieve(self, rid: str, query: Mapping[str, str]) -> FakeAnswer:
        r = self._responses.get(rid)
        if r is None:
            return _not_found(rid)
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
            return FakeAnswer(200, {"content-type": "text/event-stream"},
                              stream=self._events(r, after))
        c = self.counters
        c.retrieves += 1
        c.polls[rid] = c.polls.get(rid, 0) + 1
        return self._answer(r, now)

    def _cancel(self, rid: str) -> FakeAnswer:
        r = self._responses.get(rid)
        if r is None:
            return _not_found(rid)
        self.counters.cancels += 1
        now = self.clock()
        if not r.background:
            return self._reject("Only responses created with background=true can be cancelled.",
                                None)
        status = self._status(r, now)
        if status == "cancelled":
            return self._answer(r, now)  # cancel is idempotent
        if status not in LIVE:
            if self.cancel_finished == "return":
                return self._answer(r, now)
            return self._reject(f"Cannot cancel a response with status '{status}'.", None)
        r.cancelled_at = now
        if self._hooks is not None:
            self._hooks.due(now, r.id)
        if r.in_heap:
            r.in_heap = False
            self.counters.in_flight -= 1
        return self._answer(r, now)

    def _reject(self, message: str, param: str | None, code: str | None = None) -> FakeAnswer:
        self.counters.rejected += 1
        return _error(400, message, "invalid_request_error", param, code)

    # -- bodies ----------------------------------------------------------------------------

    def _answer(self, r: _Resp, now: float) -> FakeAnswer:
        status = self._status(r, now)
        if status not in LIVE and not r.seen_terminal:
            r.seen_terminal = True
            self.counters.detection_delays[r.id] = max(now - self._terminal_at(r), 0.0)
        headers = {"content-type": "application/json"}
        if self.poll_after_ms is not None and status in LIVE:
            headers["openai-poll-after-ms"] = str(self.poll_after_ms)
        return FakeAnswer(200, headers, json.dumps(self._body(r, status)).encode())

    def _body(self, r: _Resp, status: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": r.id,
            "object": "response",
            "created_at": r.created_wall,
            "status": status,
            "background": r.background,
            "model": r.model,
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "store": r.store,
            "metadata": r.metadata,
            "error": None,
            "incomplete_details": None,
            "usage": None,
            **r.extra,
        }
        if status == "completed" or status == "incomplete":
            text = _reply(r)
            if status == "incomplete":
                text = text[: max(len(text) // 2, 1)]
                body["incomplete_details"] = {"reason": "max_output_tokens"}
            body["output"] = [_message(r.id, text, status)]
            body["usage"] = _usage(r.input_text, text)
        elif status == "failed":
            body["error"] = {"code": "server_error",
                             "message": "The model failed to generate a response."}
        return body

    async def _events(self, r: _Resp, after: int) -> AsyncIterator[bytes]:
        """A background stream's server-sent events, from ``after + 1``, paced by the timeline."""
        for seq, at, event in self._event_script(r):
            if seq <= after:
                continue
            wait = at - self.clock()
            if wait > 0:
                await anyio.sleep(wait)
            if r.cancelled_at is not None and at > r.cancelled_at:
                return  # no stream event exists for cancellation; the stream just ends
            event["sequence_number"] = seq
            if event["type"] in _FINAL_EVENTS and not r.seen_terminal:
                r.seen_terminal = True
                self.counters.detection_delays[r.id] = max(
                    self.clock() - self._terminal_at(r), 0.0)
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

    def _event_script(self, r: _Resp) -> list[tuple[int, float, dict[str, Any]]]:
        final = r.outcome if r.outcome != "stuck" else "queued"
        text = _reply(r) if final in ("completed", "incomplete") else ""
        n = max(self.stream_events, 1)
        chunks = [text[i * len(text) // n:(i + 1) * len(text) // n] for i in range(n)]
        span = r.end_at - r.start_at if math.isfinite(r.end_at) else 0.0
        events: list[tuple[float, dict[str, Any]]] = [
            (r.created, {"type": "response.created", "response": self._body(r, "queued")}),
        ]
        if final == "queued":
            return [(i, at, e) for i, (at, e) in enumerate(events)]
        events.append((r.start_at, {"type": "response.in_progress",
                                    "response": self._body(r, "in_progress")}))
        item = f"msg_{r.id[5:]}"
        for i, chunk in enumerate(chunks):
            if chunk:
                events.append((r.start_at + span * (i + 1) / (n + 1), {
                    "type": "response.output_text.delta", "item_id": item, "output_index": 0,
                    "content_index": 0, "delta": chunk, "logprobs": [],
                }))
        if text:
            events.append((r.end_at, {"type": "response.output_text.done", "item_id": item,
                                      "output_index": 0, "content_index": 0, "text": text,
                                      "logprobs": []}))
        events.append((r.end_at, {"type": f"response.{final}",
                                  "response": self._body(r, final)}))
        return [(i, at, e) for i, (at, e) in enumerate(events)]


class _Hooks:
    """The webhook delivery loop: one timer for all responses, a heap of due times."""

    def __init__(self, server: FakeResponsesServer, target: WebhookTarget, secret: str,
                 drop_rate: float, duplicate_rate: float, delay: float) -> None:
        self.server = server
        self.target = target
        self.secret = secret
        self.drop_rate = drop_rate
        self.duplicate_rate = duplicate_rate
        self.delay = delay
        self.heap: list[tuple[float, str]] = []
        self.wake = anyio.Event()
        self.http = (
            # TCP_NODELAY: a POST's headers and body go out in two writes, and Nagle's
            # algorithm with a delayed ACK would hold the body back ~40 ms.
            httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]))
            if isinstance(target, str) else None
        )

    def due(self, at: float, rid: str) -> None:
        heapq.heappush(self.heap, (at + self.delay, rid))
        self.wake.set()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    async def run(self) -> None:
        # Deliveries go out concurrently, as a real sender's do: a slow receiver must not
        # delay every other event behind it.
        async with anyio.create_task_group() as tg:
            await self._schedule(tg)

    async def _schedule(self, tg: anyio.abc.TaskGroup) -> None:
        server = self.server
        while True:
            if not self.heap:
                await self.wake.wait()
                self.wake = anyio.Event()
                continue
            at, rid = self.heap[0]
            wait = at - server.clock()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self.wake.wait()
                if self.wake.is_set():
                    self.wake = anyio.Event()
                continue
            heapq.heappop(self.heap)
            r = server._responses.get(rid)
            if r is None or r.webhook_sent:
                continue
            status = server._status(r, server.clock())
            if status in LIVE:
                continue  # a stale entry (it was rescheduled)
            r.webhook_sent = True
            if server._rng.random() < self.drop_rate:
                server.counters.webhooks_dropped += 1
                continue
            body, headers = signed_delivery(self.secret, f"response.{status}", rid)
            copies = 2 if server._rng.random() < self.duplicate_rate else 1
            tg.start_soon(self._send_copies, body, headers, copies)

    async def _send_copies(self, body: bytes, headers: dict[str, str], copies: int) -> None:
        for _ in range(copies):
            await self.send(body, headers)

    async def send(self, body: bytes, headers: dict[str, str]) -> None:
        counters = self.server.counters
        try:
            if self.http is not None:
                assert isinstance(self.target, str)
                answer = await self.http.post(self.target, content=body, headers=headers)
                ok = answer.status_code < 300
            else:
                assert not isinstance(self.target, str)
                result = await self.target(body, headers)
                ok = not isinstance(result, int) or result < 300
        except httpx2.HTTPError:
            ok = False
        if ok:
            counters.webhooks_sent += 1
        else:
            counters.webhooks_failed += 1


# -- helpers ---------------------------------------------------------------------------------


async def _cut(stream: AsyncIterator[bytes], after: int) -> AsyncIterator[bytes]:
    """A stream that drops its connection after ``after`` events."""
    sent = 0
    async for chunk in stream:
        if sent >= after:
            break
        yield chunk
        sent += 1
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
    raise ConnectionResetError("fake server: stream dropped")


def _route(method: str, path: str) -> tuple[Literal["create", "retrieve", "cancel"] | None, str]:
    parts = path.rstrip("/").split("/")
    # ['', 'v1', 'responses', id?, 'cancel'?]; also accept a base URL without /v1.
    if len(parts) > 1 and parts[1] == "v1":
        parts = ["", *parts[2:]]
    if len(parts) < 2 or parts[1] != "responses":
        return None, ""
    if len(parts) == 2 and method == "POST":
        return "create", ""
    if len(parts) == 3 and method == "GET":
        return "retrieve", parts[2]
    if len(parts) == 4 and parts[3] == "cancel" and method == "POST":
        return "cancel", parts[2]
    return None, ""


def _error(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> FakeAnswer:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return FakeAnswer(status, {"content-type": "application/json"}, json.dumps(body).encode())


def _not_found(rid: str) -> FakeAnswer:
    return _error(404, f"Response with id '{rid}' not found.", "invalid_request_error")


def _seconds(value: object, name: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"metadata.{name} must be a number of seconds; got {value!r}") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"metadata.{name} must be a finite number >= 0; got {value!r}")
    return seconds


def _input_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value)[:2000]


def _reply(r: _Resp) -> str:
    return f"echo: {r.input_text[:500]}"


def _message(rid: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{rid[5:]}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _usage(prompt: str, text: str) -> dict[str, Any]:
    inp = max(len(prompt) // 4, 1)
    out = max(len(text) // 4, 1)
    reasoning = 4 * out
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": out + reasoning,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": inp + out + reasoning,
    }
