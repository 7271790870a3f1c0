"""The handle for one background response."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
from openai.types.responses import Response, ResponseStreamEvent

from ._errors import JobCancelled, JobFailed, JobIncomplete
from ._status import JobStatus

if TYPE_CHECKING:
    from ._manager import BackgroundManager

__all__ = ["Job"]


class Job:
    """One background response managed by a :class:`~asyncbg.BackgroundManager`.

    Returned at once by ``submit``; the response is created on the server when a slot frees.
    """

    __slots__ = (
        "_accepted",
        "_cancel_requested",
        "_create_sent",
        "_done",
        "_error",
        "_event_added",
        "_events",
        "_finish_seq",
        "_listeners",
        "_log",
        "_manager",
        "_nap_scope",
        "_params",
        "_poked",
        "_policy",
        "_raw",
        "_response",
        "_scope",
        "_started",
        "_status",
        "_stream_dropped",
        "_stream_scope",
        "_text",
        "key",
        "last_sequence",
        "response_id",
    )

    def __init__(self, manager: BackgroundManager, key: str, params: dict[str, Any], log: Any):
        #: The job's name, unique within its manager.
        self.key = key
        #: The server's id for the response; None until the server has accepted the job.
        self.response_id: str | None = None
        self._manager = manager
        self._params = params
        self._log = log
        self._status = JobStatus.PENDING
        #: The latest answer's body, as the server sent it (see ``_api.Answer``).
        self._raw: bytes | None = None
        self._response: Response | None = None
        self._error: str | None = None
        self._done = anyio.Event()
        self._accepted = anyio.Event()
        self._poked = False
        self._nap_scope: anyio.CancelScope | None = None
        self._policy = manager.poll_policy
        self._scope = anyio.CancelScope()
        self._listeners: list[Callable[[Job], object]] = []
        self._finish_seq = -1
        self._started = anyio.current_time()
        self._create_sent = False
        self._cancel_requested = False
        #: Background streams only: every event received, in order, and the text so far.
        self._events: list[ResponseStreamEvent] = []
        self._event_added = anyio.Event()
        self._text: list[str] = []
        self._stream_scope: anyio.CancelScope | None = None
        self._stream_dropped = False
        #: The ``sequence_number`` of the last stream event received (None before any).
        self.last_sequence: int | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def status(self) -> JobStatus:
        """The latest known status."""
        return self._status

    @property
    def done(self) -> bool:
        """True once the job is terminal (completed, failed, cancelled or incomplete)."""
        return self._done.is_set()

    @property
    def response(self) -> Response | None:
        """The latest ``Response`` the server sent, or None before the first answer."""
        if self._response is None and self._raw is not None:
            # Built on demand and leniently: real payloads omit fields strict validation wants.
            self._response = Response.construct(**json.loads(self._raw))
        return self._response

    @property
    def _data(self) -> dict[str, Any] | None:
        """The latest answer's JSON, parsed anew (for the rare reader that needs it)."""
        return None if self._raw is None else dict(json.loads(self._raw))

    @property
    def error(self) -> str | None:
        """Why the job did not complete: the server's message, or asyncbg's. None otherwise."""
        return self._error

    @property
    def text(self) -> str:
        """For a stream job, the output text received so far."""
        return "".join(self._text)

    async def events(self) -> AsyncIterator[ResponseStreamEvent]:
        """For a stream job, every event as it arrives (from the first), until the job ends.

        Each caller gets the whole sequence; a resumed stream adds no duplicate and loses none.
        """
        index = 0
        while True:
            while index < len(self._events):
                yield self._events[index]
                index += 1
            if self.done:
                return
            await self._event_added.wait()

    @property
    def elapsed(self) -> float:
        """Seconds since the job was submitted."""
        return anyio.current_time() - self._started

    def __repr__(self) -> str:
        rid = f" response_id={self.response_id!r}" if self.response_id else ""
        return f"<Job key={self.key!r} status={self._status.value}{rid}>"

    # -- waiting ---------------------------------------------------------------------------

    async def wait(self, timeout: float | None = None) -> Job:
        """Wait until the job is terminal; raise ``TimeoutError`` after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            await self._done.wait()
        return self

    async def wait_accepted(self, timeout: float | None = None) -> str | None:
        """Wait until the server has accepted the job (or it ended without being accepted).

        Returns the response id, or None for a job that was rejected or cancelled while pending.
        """
        with anyio.fail_after(timeout):
            await self._accepted.wait()
        return self.response_id

    async def result(self, timeout: float | None = None) -> Response:
        """The final ``Response`` once completed; raises :class:`~asyncbg.JobFailed` otherwise."""
        await self.wait(timeout)
        status = self._status
        if status is JobStatus.COMPLETED:
            response = self.response
            assert response is not None
            return response
        message = f"job {self.key!r}"
        if self.response_id:
            message += f" ({self.response_id})"
        message += f" {status.value}: {self._error or 'no reason given'}"
        if status is JobStatus.CANCELLED:
            raise JobCancelled(self, message)
        if status is JobStatus.INCOMPLETE:
            raise JobIncomplete(self, message)
        raise JobFailed(self, message)

    async def cancel(self) -> None:
        """Cancel the job on the server and return once it is terminal.

        A pending job is cancelled locally and nothing is sent. A finished job is left as it is.
        """
        if self.done:
            return
        if not self._create_sent:
            self._finish(JobStatus.CANCELLED, "cancelled before it was sent")
            self._scope.cancel()
            return
        self._cancel_requested = True
        self._wake()
        if self._stream_scope is not None:
            self._stream_scope.cancel()  # no stream event exists for a cancel: stop reading
        await self._done.wait()

    # -- driven by the manager -------------------------------------------------------------

    def _update(self, data: dict[str, Any], raw: bytes | None = None) -> None:
        """Take a server answer: keep its body, move the status, finish if terminal."""
        if self.done:
            return
        self._raw = raw if raw is not None else json.dumps(data).encode()
        self._response = None
        if self.response_id is None:
            rid = data.get("id")
            self.response_id = rid if isinstance(rid, str) else None
            self._log = self._log.bind(response_id=self.response_id)
            if self.response_id is not None:
                self._manager._known(self)
            self._accepted.set()
        status = JobStatus.from_server(data.get("status"))
        if status is self._status:
            return
        self._log.debug(
            "job.status_changed",
            status=status.value,
            previous=self._status.value,
            elapsed=round(self.elapsed, 3),
        )
        if status.terminal:
            self._finish(status, _reason(status, data))
        else:
            self._status = status

    def _reattach(self, response_id: str, status: JobStatus) -> None:
        """Resume a job whose response the journal knows: no create will be sent."""
        self.response_id = response_id
        self._create_sent = True
        self._status = status
        self._log = self._log.bind(response_id=response_id)
        self._manager._known(self)
        self._accepted.set()

    def _add_event(self, event: ResponseStreamEvent) -> bool:
        """Keep one stream event; False for one already seen (a resume replays nothing twice)."""
        seq = event.sequence_number
        if self.last_sequence is not None and seq <= self.last_sequence:
            return False
        self.last_sequence = seq
        self._events.append(event)
        if event.type == "response.output_text.delta":
            self._text.append(event.delta)
        added, self._event_added = self._event_added, anyio.Event()
        added.set()
        return True

    def _finish(self, status: JobStatus, error: str | None = None) -> None:
        if self.done:
            return
        self._status = status
        self._error = error
        self._finish_seq = self._manager._next_seq()
        self._done.set()
        self._accepted.set()
        self._event_added.set()
        self._log.info(
            "job.terminal", status=status.value, elapsed=round(self.elapsed, 3), error=error
        )
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener(self)

    def _wake(self) -> None:
        """Cut the job's current nap short (a cancel, a webhook): it polls at once."""
        self._poked = True
        if self._nap_scope is not None:
            self._nap_scope.cancel()

    async def _nap(self, seconds: float) -> None:
        """Sleep until the next poll, unless :meth:`_wake` cuts it short.

        A timed nap ends as a plain sleep, not as a cancelled timeout: a timeout ends by raising
        inside the task, and each such exception leaves a traceback cycle that only the cyclic
        garbage collector frees. At one per poll, across thousands of jobs, those collections
        stall the event loop for hundreds of milliseconds. Only a wake-up, which is rare,
        cancels.
        """
        if not self._poked:
            with anyio.CancelScope() as scope:
                self._nap_scope = scope
                await anyio.sleep(seconds)
            self._nap_scope = None
        self._poked = False

def _reason(status: JobStatus, data: dict[str, Any]) -> str | None:
    """The server's explanation for a terminal status other than completed."""
    if status is JobStatus.FAILED:
        err = data.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            message = str(err.get("message") or "the server gave no message")
            return f"{message} ({code})" if code else message
        return "the server reported failure without an error object"
    if status is JobStatus.INCOMPLETE:
        details = data.get("incomplete_details")
        if isinstance(details, dict) and details.get("reason"):
            return f"incomplete: {details['reason']}"
        return "incomplete: the server gave no reason"
    if status is JobStatus.CANCELLED:
        return "cancelled on the server"
    return None
