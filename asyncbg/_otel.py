"""OpenTelemetry for asyncbg: a span per job and GenAI metrics, through the engine's Hooks seam.

``asyncbg.OpenTelemetry()`` implements :class:`asyncbg._engine._hooks.Hooks`; pass it as
``BackgroundManager(..., hooks=[asyncbg.OpenTelemetry()])``. It follows the OpenTelemetry GenAI
semantic conventions as of schema 1.44.0 (status: development) where they fit:

- a span per job, ``{gen_ai.operation.name} {gen_ai.request.model}`` (``chat gpt-5.2``), kind
  CLIENT, from submit to done, with ``gen_ai.operation.name``, ``gen_ai.provider.name``,
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.response.id``,
  ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, ``openai.request.service_tier``,
  ``openai.response.service_tier`` and ``error.type``; and asyncbg's own where no convention
  covers it: ``asyncbg.job.key``, ``asyncbg.job.status``, ``asyncbg.poll.count``,
  ``asyncbg.cost.usd``, ``asyncbg.batch.id``. Creates and cancels are span events
  (``asyncbg.create``, ``asyncbg.cancel``) with their HTTP status and duration; polls are
  counted, not one span each.
- metrics: the conventions' ``gen_ai.client.token.usage`` and
  ``gen_ai.client.operation.duration`` histograms, and asyncbg's ``asyncbg.jobs.live``
  (up-down counter), ``asyncbg.jobs.finished``, ``asyncbg.requests`` (by kind and HTTP status),
  ``asyncbg.rate_limited`` (429s), ``asyncbg.cost`` (US dollars) and the
  ``asyncbg.request.duration`` histogram; and, for the managers given to
  :meth:`OpenTelemetry.observe`, ``asyncbg.jobs.waiting`` and the notifications delivered,
  failed and given up, read from ``statistics()`` at each collection.

It uses only ``opentelemetry-api``: with no SDK configured every call is a no-op, and asyncbg
does no work to fill in a span that nobody records. :func:`serve_metrics` serves the same
metrics in Prometheus text format on a port (``asyncbg run --metrics-port``).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._asgi import listen

if TYPE_CHECKING:
    from ._engine._job import Job

__all__ = ["OpenTelemetry", "serve_metrics"]

SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
#: Bucket boundaries the conventions advise for the two GenAI histograms.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92, 163.84, 327.68, 655.36, 1310.72, 2621.44)


#: What :meth:`OpenTelemetry.observe` reports: (instrument, statistics field, kind, description).
_OBSERVED = (
    ("asyncbg.jobs.waiting", "pending", "up_down",
     "Jobs submitted and waiting for a slot (not sent yet)."),
    ("asyncbg.notifications.delivered", "notifications_delivered", "counter",
     "Completion notifications answered 2xx."),
    ("asyncbg.notifications.failed", "notification_failures", "counter",
     "Notification attempts that failed (each is tried again)."),
    ("asyncbg.notifications.given_up", "notifications_given_up", "counter",
     "Notifications marked failed: given up, or the endpoint answered 410."),
)


@dataclass(slots=True)
class _Track:
    """What is kept of a job while it runs: its span and what its metrics are labelled with."""

    span: Any
    started: float
    attributes: dict[str, str]
    polls: int = 0


class OpenTelemetry:
    """Spans and metrics for every job of the managers it is given to; see the module docstring.

    ``tracer_provider`` and ``meter_provider`` default to the global ones (set by the
    application, or by ``opentelemetry-instrument``). ``provider_name`` is the
    ``gen_ai.provider.name`` of the jobs (``openai``, ``anthropic``, ``gcp.gemini``) and
    ``operation`` their ``gen_ai.operation.name``.
    """

    def __init__(self, *, tracer_provider: Any = None, meter_provider: Any = None,
                 provider_name: str = "openai", operation: str = "chat") -> None:
        from opentelemetry import metrics, trace

        from . import __version__

        self.provider_name = provider_name
        self.operation = operation
        self._span_kind = trace.SpanKind.CLIENT
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self._tracer = trace.get_tracer("asyncbg", __version__, tracer_provider=tracer_provider,
                                        schema_url=SCHEMA_URL)
        meter = metrics.get_meter("asyncbg", __version__, meter_provider=meter_provider,
                                  schema_url=SCHEMA_URL)
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="GenAI operation duration (a background job: submit to done).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._live = meter.create_up_down_counter(
            "asyncbg.jobs.live", unit="{job}", description="Jobs submitted and not finished.")
        self._finished = meter.create_counter(
            "asyncbg.jobs.finished", unit="{job}", description="Jobs finished, by status.")
        self._requests = meter.create_counter(
            "asyncbg.requests", unit="{request}",
            description="Requests sent for jobs, by kind and HTTP status.")
        self._rate_limited = meter.create_counter(
            "asyncbg.rate_limited", unit="{response}", description="Requests answered 429.")
        self._cost = meter.create_counter(
            "asyncbg.cost", unit="USD", description="US dollars of the finished jobs' usage.")
        self._request_duration = meter.create_histogram(
            "asyncbg.request.duration", unit="s", description="Duration of one request.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._managers: list[weakref.ref[Any]] = []
        observation = metrics.Observation
        for name, field, kind, description in _OBSERVED:
            create = (meter.create_observable_counter if kind == "counter"
                      else meter.create_observable_up_down_counter)
            create(name, callbacks=[self._observer(field, observation)],
                   unit="{job}" if name.startswith("asyncbg.jobs") else "{notification}",
                   description=description)
        self._jobs: dict[Job, _Track] = {}
        #: Where :func:`serve_metrics` serves these metrics (None when it does not).
        self.metrics_url: str | None = None

    def __repr__(self) -> str:
        return f"OpenTelemetry(provider_name={self.provider_name!r}, jobs={len(self._jobs)})"

    def observe(self, manager: Any) -> None:
        """Also report ``manager.statistics()`` at every collection: jobs waiting for a slot and
        the notifications delivered, failed and given up (``asyncbg.jobs.waiting``,
        ``asyncbg.notifications.*``). The manager is held weakly."""
        self._managers.append(weakref.ref(manager))

    def _observer(self, field: str, observation: Any) -> Any:
        def observe(_options: Any) -> list[Any]:
            total, alive = 0, []
            for ref in self._managers:
                manager = ref()
                if manager is not None:
                    alive.append(ref)
                    total += getattr(manager.statistics(), field)
            self._managers[:] = alive
            return [observation(total, {"gen_ai.provider.name": self.provider_name})]

        return observe

    # -- the Hooks protocol ----------------------------------------------------------------------

    def job_submitted(self, job: Job, params: Mapping[str, Any] | None) -> None:
        model = str((params or {}).get("model") or "")
        attributes = {"gen_ai.operation.name": self.operation,
                      "gen_ai.provider.name": self.provider_name}
        if model:
            attributes["gen_ai.request.model"] = model
        name = f"{self.operation} {model}" if model else self.operation
        span = self._tracer.start_span(name, kind=self._span_kind, attributes=attributes)
        if span.is_recording():
            span.set_attribute("asyncbg.job.key", job.key)
            tier = (params or {}).get("service_tier")
            if tier:
                span.set_attribute("openai.request.service_tier", str(tier))
            if params is None:
                span.set_attribute("asyncbg.job.attached", True)
        self._jobs[job] = _Track(span, time.monotonic(), attributes)
        self._live.add(1, attributes)

    def request_done(self, job: Job, kind: str, http_status: int | None,
                     seconds: float) -> None:
        track = self._jobs.get(job)
        labels: dict[str, Any] = {"asyncbg.request.kind": kind,
                                  "gen_ai.provider.name": self.provider_name}
        if http_status is not None:
            labels["http.response.status_code"] = http_status
        self._requests.add(1, labels)
        self._request_duration.record(seconds, labels)
        if http_status == 429:
            self._rate_limited.add(1, labels)
        if track is None:
            return
        if kind == "poll":
            track.polls += 1
        elif kind in ("create", "cancel") and track.span.is_recording():
            track.span.add_event(f"asyncbg.{kind}", {
                "http.response.status_code": -1 if http_status is None else http_status,
                "asyncbg.request.seconds": seconds})

    def job_finished(self, job: Job) -> None:
        track = self._jobs.pop(job, None)
        if track is None:
            return
        status = job.status.value
        attributes = dict(track.attributes)
        error = None if status == "completed" else (job.error_code or status)
        if error is not None:
            attributes["error.type"] = error
        response_model = _response_field(job, "model")
        if response_model:
            attributes["gen_ai.response.model"] = response_model
        self._live.add(-1, track.attributes)
        self._finished.add(1, {**track.attributes, "asyncbg.job.status": status})
        self._duration.record(time.monotonic() - track.started, attributes)
        tokens = _tokens(job)
        if tokens is not None:
            for kind, count in (("input", tokens.input), ("output", tokens.output)):
                self._tokens.record(count, {**attributes, "gen_ai.token.type": kind})
        cost = job.cost
        if cost:
            self._cost.add(cost, track.attributes)
        span = track.span
        if span.is_recording():
            span.set_attributes({key: value for key, value in attributes.items()
                                 if key != "gen_ai.operation.name"})
            span.set_attribute("asyncbg.job.status", status)
            span.set_attribute("asyncbg.poll.count", track.polls)
            if job.response_id:
                span.set_attribute("gen_ai.response.id", job.response_id)
                batch, sep, _custom_id = job.response_id.rpartition("#")
                if sep and batch:  # a batch provider's job: "<batch_id>#<custom_id>"
                    span.set_attribute("asyncbg.batch.id", batch)
            tier = _response_field(job, "service_tier")
            if tier:
                span.set_attribute("openai.response.service_tier", tier)
            if tokens is not None:
                span.set_attribute("gen_ai.usage.input_tokens", tokens.input)
                span.set_attribute("gen_ai.usage.output_tokens", tokens.output)
            if cost is not None:
                span.set_attribute("asyncbg.cost.usd", cost)
            if error is not None:
                span.set_status(self._status(self._error, job.error or error))
        span.end()

    def job_detached(self, job: Job) -> None:
        track = self._jobs.pop(job, None)
        if track is None:
            return
        self._live.add(-1, track.attributes)
        if track.span.is_recording():
            track.span.set_attribute("asyncbg.poll.count", track.polls)
            track.span.add_event("asyncbg.detached")
        track.span.end()


def _response_field(job: Job, name: str) -> str | None:
    value = getattr(job.response, name, None) if job.done else None
    return value if isinstance(value, str) and value else None


def _tokens(job: Job) -> Any:
    usage = job.usage if job.done else None
    if usage is None:
        return None
    from ._spend._tokens import usage_tokens

    try:
        return usage_tokens(usage)
    except TypeError:
        return None


# -- Prometheus ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_metrics(port: int, *, host: str = "127.0.0.1",
                        provider_name: str = "openai") -> AsyncIterator[OpenTelemetry]:
    """Serve asyncbg's metrics in Prometheus text format at ``http://host:port/metrics`` while
    the block runs, and yield the :class:`OpenTelemetry` hooks that feed them (pass them to the
    manager: ``BackgroundManager(..., hooks=[hooks])``).

    The port is bound before the block starts: a port in use raises ``OSError`` at once (port
    0 takes a free one; ``hooks.metrics_url`` says which). The server runs on the caller's
    event loop and leaves the process's signals and logging alone.
    """
    import anyio
    import uvicorn
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, make_asgi_app

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    sock = listen(host, port)
    try:
        class QuietServer(uvicorn.Server):
            """uvicorn without its signal handlers: the program serving metrics owns them."""

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        server = QuietServer(uvicorn.Config(make_asgi_app(registry=registry), log_config=None,
                                             log_level="warning", lifespan="off",
                                             access_log=False))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                hooks = OpenTelemetry(meter_provider=provider, provider_name=provider_name)
                bound_host, bound_port = sock.getsockname()[:2]
                hooks.metrics_url = f"http://{bound_host}:{bound_port}/metrics"
                yield hooks
            finally:
                server.should_exit = True
    finally:
        sock.close()
        provider.shutdown()
