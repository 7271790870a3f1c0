"""The handle for one background job, and the one door through which its state changes.

A :class:`Job` is what users hold: status, result, wait, cancel. It never changes itself: its
owner (the manager's scheduler) moves it through :class:`JobControl`, made once per job, so a
reader finds every state change in one method, :meth:`JobControl.update`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .. import _log
from .._errors import (
    AsyncbgError,
    BudgetExceeded,
    JobCancelled,
    JobFailed,
    JobIncomplete,
    ManagerStateError,
)
from .._status import JobStatus

if TYPE_CHECKING:
    from .._spend._tokens import Tokens

__all__ = ["Job", "JobControl", "JobOwner"]

#: Finish order across every manager in the process (``wait_any`` across managers needs it).
_finish_order = itertools.count()


class CallbackRunner(Protocol):
    """Where a job's done callbacks run (asyncbg/_engine/_callbacks.py)."""

    def finished(self, job: Job, callbacks: Iterable[Callable[[Job], object]]) -> None: ...

    def late(self, job: Job, fn: Callable[[Job], object]) -> None: ...


class JobOwner(Protocol):
    """What a job asks of whoever runs it."""

    @property
    def callbacks(self) -> CallbackRunner:
        """Where the job's done callbacks run."""
        ...

    async def cancel_job(self, job: Job) -> None:
        """Cancel ``job`` (locally if unsent, else on the server); return once it is terminal."""
        ...

    def parse_result(self, body: bytes) -> Any:
        """Build the provider's result type (an OpenAI ``Response``) from a saved body."""
        ...

    def parse_event(self, data: dict[str, Any]) -> Any:
        """Build the provider's stream event type from one event's JSON."""
        ...


class _Stream:
    """A stream job's events as raw JSON dicts, and its text so far (models built on read)."""

    __slots__ = ("added", "events", "last_sequence", "text")

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.text: list[str] = []
        self.last_sequence: int | None = None
        self.added: anyio.Event | None = None


class Job:
    """One background job of a :class:`~asyncbg.BackgroundManager`.

    Returned at once by ``submit``; the request is sent when one of the manager's slots frees.
    """

    __slots__ = (
        "__weakref__",
        "_accepted",
        "_body",
        "_callbacks",
        "_cost",
        "_detached",
        "_done",
        "_error",
        "_error_code",
        "_finish_seq",
        "_listeners",
        "_outcome",
        "_owner",
        "_response",
        "_started",
        "_status",
        "_stream",
        "key",
        "request_id",
        "response_id",
    )

    def __init__(self, owner: JobOwner, key: str) -> None:
        #: The job's name, unique within its manager (the ``custom_id`` of a batch line).
        self.key = key
        #: The server's id for the response; None until the server has accepted the job.
        self.response_id: str | None = None
        #: The server's ``x-request-id`` for the latest answer that changed this job.
        self.request_id: str | None = None
        self._owner = owner
        self._status = JobStatus.PENDING
        self._body: bytes | None = None
        self._response: Any = None
        self._error: str | None = None
        self._error_code: str | None = None
        self._cost: float | None = None
        # Events are made on first wait: most jobs of a large fan-out are never awaited alone.
        self._done: anyio.Event | None = None
        self._accepted: anyio.Event | None = None
        self._callbacks: list[Callable[[Job], object]] | None = None
        self._listeners: list[Callable[[Job], object]] | None = None
        self._finish_seq = -1
        self._started = anyio.current_time()
        self._stream: _Stream | None = None
        self._detached = False
        #: The ladder of a job submitted with checks, escalation or hedging (asyncbg/_outcomes/).
        self._outcome: Any = None

    # -- state -----------------------------------------------------------------------------

    @property
    def status(self) -> JobStatus:
        """The latest known status."""
        return self._status

    @property
    def done(self) -> bool:
        """True once the job is terminal (completed, failed, cancelled or incomplete)."""
        return self._status.terminal

    @property
    def detached(self) -> bool:
        """True when the job was left running on the server without this process following it
        any further (its manager exited with ``cancel_on_exit=False``, or another process took
        it over); re-attach to it through the journal."""
        return self._detached and not self.done

    @property
    def response(self) -> Any:
        """The final result the server sent (an OpenAI ``Response``) once the job is terminal;
        None while it is live (a live job keeps no body, see :attr:`body`)."""
        if self._response is None and self._body is not None:
            # Built on demand and leniently: real payloads omit fields strict validation wants.
            self._response = self._owner.parse_result(self._body)
        return self._response

    @property
    def body(self) -> bytes | None:
        """The final answer's JSON exactly as the server sent it, once the job is terminal.

        None while the job is live: a live job keeps only its id and status (100,000 live
        jobs would otherwise hold 100,000 answers, each echoing its request). None also for a
        job that ended without a final answer (never sent, lost, given up)."""
        return self._body

    @property
    def error(self) -> str | None:
        """Why the job did not complete: the server's message, or asyncbg's. None otherwise."""
        return self._error

    @property
    def error_code(self) -> str | None:
        """A short code for :attr:`error`: the server's, or asyncbg's own (e.g.
        ``connection_error``, ``response_lost``, ``deadline_exceeded``, ``request_failed``)."""
        return self._error_code

    @property
    def usage(self) -> Any:
        """The usage the provider reported, in its own shape (OpenAI's ``ResponseUsage``,
        Anthropic's ``Usage``, Gemini's ``usage_metadata``), once known; else None."""
        from .._providers._usage import usage_of

        return usage_of(self.response) if self._body is not None else None

    @property
    def tokens(self) -> Tokens | None:
        """The tokens the job used, in one shape for every provider (input, cached input,
        output, reasoning), once its final answer says; else None."""
        from .._providers._usage import tokens_of

        return tokens_of(self._body)

    @property
    def cost(self) -> float | None:
        """US dollars this job cost, once it is terminal with a known usage and price."""
        return self._cost

    @property
    def invalid(self) -> str | None:
        """Why a completed answer is not usable (it does not parse as ``text_format``, or
        ``validate`` rejected it), or None. Such a job stays completed: it was paid for."""
        return self._outcome.invalid if self._outcome is not None else None

    @property
    def attempts(self) -> tuple[Job, ...]:
        """Every attempt sent for this job, in order (escalation steps and hedge copies, each
        its own job with its own key and cost); a job without a ladder is its own one."""
        return tuple(self._outcome.attempts) if self._outcome is not None else (self,)

    async def parsed(self, timeout: float | None = None) -> Any:
        """The final answer as an instance of the ``text_format`` given to ``submit``; raises
        :class:`~asyncbg.JobFailed` when the job did not complete or its answer is
        :attr:`invalid`."""
        await self.result(timeout)
        if self._outcome is None:
            raise AsyncbgError(f"job {self.key!r} was submitted without text_format=")
        if self.invalid is not None:
            raise JobFailed(self, f"job {self.key!r} ({self.response_id}) completed, but its "
                            f"answer is invalid: {self.invalid}")
        return self._outcome.parsed()

    @property
    def text(self) -> str:
        """For a stream job, the output text received so far."""
        return "".join(self._stream.text) if self._stream is not None else ""

    @property
    def last_sequence(self) -> int | None:
        """For a stream job, the ``sequence_number`` of the last event received."""
        return self._stream.last_sequence if self._stream is not None else None

    async def events(self) -> AsyncIterator[Any]:
        """For a stream job, every event as it arrives (from the first), until the job ends.

        Each caller gets the whole sequence; a resumed stream adds no duplicate and loses none.
        Events are the SDK's ``ResponseStreamEvent`` models, built as they are read.
        """
        index = 0
        while True:
            stream = self._stream
            if stream is not None:
                while index < len(stream.events):
                    yield self._owner.parse_event(stream.events[index])
                    index += 1
            if self.done or self._detached:
                return
            if stream is None:
                await self._wait_done()
                continue
            if stream.added is None:
                stream.added = anyio.Event()
            await stream.added.wait()

    @property
    def elapsed(self) -> float:
        """Seconds since the job was submitted."""
        return anyio.current_time() - self._started

    def __repr__(self) -> str:
        rid = f" response_id={self.response_id!r}" if self.response_id else ""
        return f"<Job key={self.key!r} status={self._status.value}{rid}>"

    # -- waiting ---------------------------------------------------------------------------

    async def _wait_done(self) -> None:
        if self.done:
            return
        if self._detached:
            raise ManagerStateError(
                f"job {self.key!r} was left running on the server when its manager exited "
                "(cancel_on_exit=False); re-attach to it with a journal"
            )
        if self._done is None:
            self._done = anyio.Event()
        await self._done.wait()
        if not self.done:
            await self._wait_done()  # detached while waiting: raise as above

    async def wait(self, timeout: float | None = None) -> Job:
        """Wait until the job is terminal; raise ``TimeoutError`` after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            await self._wait_done()
        return self

    async def wait_accepted(self, timeout: float | None = None) -> str | None:
        """Wait until the server has accepted the job (or it ended without being accepted).

        Returns the response id, or None for a job that was rejected or cancelled while pending.
        """
        with anyio.fail_after(timeout):
            if self.response_id is None and not self.done and not self._detached:
                if self._accepted is None:
                    self._accepted = anyio.Event()
                await self._accepted.wait()
        return self.response_id

    async def result(self, timeout: float | None = None) -> Any:
        """The final result once completed; raises :class:`~asyncbg.JobFailed` otherwise."""
        await self.wait(timeout)
        status = self._status
        if status is JobStatus.COMPLETED:
            return self.response
        message = f"job {self.key!r}"
        if self.response_id:
            message += f" ({self.response_id})"
        message += f" {status.value}: {self._error or 'no reason given'}"
        if self._error_code == "budget_exceeded":
            raise BudgetExceeded(self, message)
        if status is JobStatus.CANCELLED:
            raise JobCancelled(self, message)
        if status is JobStatus.INCOMPLETE:
            raise JobIncomplete(self, message)
        raise JobFailed(self, message)

    async def cancel(self) -> None:
        """Cancel the job and return once it is terminal.

        A job not yet sent is cancelled locally and nothing is sent. A finished job is left as
        it is (a cancel racing the job's own end keeps the server's final status).
        """
        if not self.done:
            await self._owner.cancel_job(self)

    def add_done_callback(self, fn: Callable[[Job], object]) -> None:
        """Call ``fn(job)`` once, after the job's outcome is recorded; ``fn`` may be async.

        Callbacks run in the manager's task group, one at a time, in the order the jobs
        finished; one that raises is logged with the job's key and stops nothing. Added to a
        job already terminal, ``fn`` runs at once (an async one is scheduled).
        """
        if self.done:
            self._owner.callbacks.late(self, fn)
            return
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(fn)

    def remove_done_callback(self, fn: Callable[[Job], object]) -> None:
        """Forget a callback added with :meth:`add_done_callback` (no error if it is gone)."""
        if self._callbacks is not None and fn in self._callbacks:
            self._callbacks.remove(fn)

    def add_listener(self, fn: Callable[[Job], object]) -> None:
        """Call ``fn(job)`` synchronously the moment the job ends (at once if it has ended).

        For waiting on jobs (``wait_any``, ``as_completed`` use it): unlike
        :meth:`add_done_callback`, it runs inline, before the job's callbacks, and must be quick.
        """
        if self.done:
            fn(self)
            return
        if self._listeners is None:
            self._listeners = []
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Job], object]) -> None:
        """Forget a listener added with :meth:`add_listener` (no error if it is gone)."""
        if self._listeners is not None and fn in self._listeners:
            self._listeners.remove(fn)

    @property
    def finish_order(self) -> int:
        """A number that orders finished jobs by when they finished (-1 while live)."""
        return self._finish_seq


class JobControl:
    """The owner's handle on a job: the only way its state changes."""

    __slots__ = ("job",)

    def __init__(self, job: Job) -> None:
        self.job = job

    def update(
        self,
        status: JobStatus,
        *,
        body: bytes | None = None,
        response_id: str | None = None,
        error: str | None = None,
        error_code: str | None = None,
        request_id: str | None = None,
        cost: float | None = None,
    ) -> bool:
        """Move the job to ``status``; True when the status changed. A terminal job stays put."""
        job = self.job
        if job.done:
            return False
        if body is not None and status.terminal:
            # A live job keeps no body (it is the bulk of a live job's memory, and a real
            # create answer echoes the whole request): the engine needs only its id and status.
            # The final body is kept: it is what ``result()`` returns.
            job._body = body
            job._response = None
        if request_id is not None:
            job.request_id = request_id
        if response_id is not None and job.response_id is None:
            job.response_id = response_id
            if job._accepted is not None:
                job._accepted.set()
        changed = status is not job._status
        if not changed:
            return False
        previous = job._status
        job._status = status
        if not status.terminal:
            _log.debug("job.status_changed", key=job.key, response_id=job.response_id,
                       status=status.value, previous=previous.value,
                       elapsed=round(job.elapsed, 3))
            return True
        job._error = error
        job._error_code = error_code
        job._cost = cost
        job._finish_seq = next(_finish_order)
        _log.debug("job.status_changed", key=job.key, response_id=job.response_id,
                   status=status.value, previous=previous.value, elapsed=round(job.elapsed, 3))
        _log.info("job.terminal", key=job.key, response_id=job.response_id,
                  status=status.value, elapsed=round(job.elapsed, 3), error=error)
        self._wake_all()
        self._call_listeners()
        callbacks, job._callbacks = job._callbacks, None
        job._owner.callbacks.finished(job, callbacks or ())
        return True

    def forget_response(self) -> None:
        """The server holds no response for the job after all (a batch request whose batch
        expired unrun): it is created again, under a new response id."""
        self.job.response_id = None

    def start_stream(self) -> None:
        """Mark the job as a stream job, so that :meth:`Job.events` waits for its events."""
        if self.job._stream is None:
            self.job._stream = _Stream()

    def add_event(self, data: dict[str, Any]) -> bool:
        """Keep one stream event; False for one already seen (a resume replays nothing twice)."""
        job = self.job
        stream = job._stream
        if stream is None:
            stream = job._stream = _Stream()
        seq = data.get("sequence_number")
        if isinstance(seq, int):
            if stream.last_sequence is not None and seq <= stream.last_sequence:
                return False
            stream.last_sequence = seq
        stream.events.append(data)
        if data.get("type") == "response.output_text.delta":
            delta = data.get("delta")
            if isinstance(delta, str):
                stream.text.append(delta)
        added, stream.added = stream.added, None
        if added is not None:
            added.set()
        return True

    def detach(self) -> None:
        """The manager exited leaving this live job running on the server: wake its waiters
        and listeners (``wait_any`` and ``as_completed`` then raise ManagerStateError)."""
        job = self.job
        if not job.done:
            job._detached = True
            self._wake_all()
            self._call_listeners()

    def _call_listeners(self) -> None:
        """Each listener once (the job ended, or was detached), in the order added."""
        job = self.job
        listeners, job._listeners = job._listeners, None
        for fn in listeners or ():
            try:
                fn(job)
            except Exception:  # noqa: BLE001 - one bad listener must not stop the others
                _log.exception("job.callback_failed", key=job.key)

    def _wake_all(self) -> None:
        job = self.job
        for event in (job._done, job._accepted):
            if event is not None:
                event.set()
        if job._stream is not None and job._stream.added is not None:
            job._stream.added.set()
            job._stream.added = None


def decode(body: bytes) -> dict[str, Any]:
    """A saved body as a dict (an empty one if it is not a JSON object)."""
    data = json.loads(body)
    return data if isinstance(data, dict) else {}
