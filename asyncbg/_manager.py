"""BackgroundManager: runs many background responses at once, each job owned by its task group."""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import httpx2
import openai
import structlog
from anyio.abc import TaskGroup
from openai import AsyncStream
from openai.types.responses import ResponseStreamEvent

from ._api import Api, GaveUp, Rejected
from ._errors import DuplicateKeyError, ManagerStateError
from ._job import Job, _reason
from ._journal import Journal, JournalMismatchError, digest
from ._limiter import Limiter
from ._policies import PollPolicy, RetryPolicy
from ._status import JobStatus
from ._webhooks import WebhookInbox

__all__ = ["BackgroundManager", "ManagerStatistics"]

_log = structlog.get_logger("asyncbg")
#: Seconds between polls of a job whose cancel was sent but not yet confirmed terminal.
_AFTER_CANCEL = 0.25


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSING = 3
    CLOSED = 4


@dataclass(frozen=True, slots=True)
class ManagerStatistics:
    """A snapshot of a manager's counters, from :meth:`BackgroundManager.statistics`."""

    submitted: int
    pending: int
    live: int
    by_status: dict[str, int]
    requests: int
    polls: int
    retries: int
    possible_duplicates: int
    webhooks_accepted: int
    webhooks_rejected: int


class BackgroundManager:
    """Keeps at most ``max_concurrency`` background responses in flight and polls them.

    Use it as ``async with BackgroundManager(client) as mgr:``. Leaving the block normally
    waits for every job; leaving it by an exception or a cancellation first cancels every live
    job on the server (shielded, within ``cancel_timeout`` seconds), then lets the exception
    through unchanged.

    ``max_requests`` bounds the HTTP requests in flight at once (creates, polls, cancels;
    streams being read do not count), which keeps the event loop responsive when thousands of
    jobs are due together.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        max_concurrency: int = 16,
        poll_policy: PollPolicy | None = None,
        retry_policy: RetryPolicy | None = None,
        cancel_timeout: float = 10.0,
        log_prompts: bool = False,
        journal: str | os.PathLike[str] | Journal | None = None,
        webhooks: bool = False,
        webhook_secret: str | None = None,
        stream: bool = False,
        max_requests: int = 64,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        self.client = client
        self.max_concurrency = max_concurrency
        if webhooks and (webhook_secret or client.webhook_secret) is None:
            raise ValueError(
                "webhooks=True needs a webhook secret: pass webhook_secret=, set it on the "
                "client, or set OPENAI_WEBHOOK_SECRET"
            )
        #: With webhooks on, polling is only a safety net for a lost delivery.
        self.poll_policy = poll_policy or (PollPolicy.safety_net() if webhooks else PollPolicy())
        self.stream = stream
        self._inbox = WebhookInbox(self, webhook_secret)
        self._by_response_id: dict[str, Job] = {}
        self.retry_policy = retry_policy or RetryPolicy()
        self.cancel_timeout = cancel_timeout
        self.log_prompts = log_prompts
        self.journal = (
            journal if isinstance(journal, Journal) or journal is None else Journal(journal)
        )
        self._api = Api(client, self.retry_policy, max_requests)
        self._slots = Limiter(max_concurrency)
        self._jobs: dict[str, Job] = {}
        self._live = 0
        self._polls = 0
        self._seq = itertools.count()
        self._auto_key = itertools.count(1)
        self._state = _State.UNOPENED
        self._tg: TaskGroup | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> BackgroundManager:
        if self._state is not _State.UNOPENED:
            raise ManagerStateError("a BackgroundManager can be entered only once")
        if self.journal is not None:
            await self.journal.open()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._state = _State.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._tg is not None
        self._state = _State.CLOSING
        if exc is not None:
            # Each job's runner, once cancelled, cancels its response on the server (shielded,
            # within cancel_timeout); all of them do so at once.
            self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # Jobs never raise (the runner turns every error into a failed job), so a group here
            # holds only the block's own exception: let that through unchanged.
            if exc is not None:
                return False
            raise _collapse(group) from None
        finally:
            self._state = _State.CLOSED
            if self.journal is not None:
                with anyio.CancelScope(shield=True):
                    await self.journal.close()
        return False

    def _require_open(self) -> TaskGroup:
        if self._state is not _State.OPENED or self._tg is None:
            raise ManagerStateError(
                "the BackgroundManager is not open: use it inside `async with "
                "BackgroundManager(client) as mgr:`"
                if self._state is _State.UNOPENED
                else "the BackgroundManager has exited; submit jobs inside its `async with` block"
            )
        return self._tg

    # -- submitting ------------------------------------------------------------------------

    async def submit(
        self, *, key: str | None = None, poll_policy: PollPolicy | None = None, **params: Any
    ) -> Job:
        """Queue one ``responses.create(**params, background=True)`` and return its job at once.

        The response is created when one of the ``max_concurrency`` slots is free. ``key``
        names the job and must be unique within this manager; one is made up when not given.
        ``store=True`` is sent unless you set ``store``. ``poll_policy`` overrides the
        manager's for this job. With ``stream=True`` (or ``BackgroundManager(stream=True)``)
        the job runs as a background stream: ``job.events()`` and ``job.text`` show it as it
        arrives, a dropped connection resumes where it stopped, and a server that refuses
        background streams is polled instead.

        With a journal, a key already there is never created again: a finished job is served
        from the journal without a request, a live one resumes polling its response id, and a
        different request under the same key raises :class:`JournalMismatchError`.
        """
        tg = self._require_open()
        if key is None:
            key = f"job-{next(self._auto_key)}"
            while key in self._jobs:
                key = f"job-{next(self._auto_key)}"
        elif key in self._jobs:
            raise DuplicateKeyError(f"key {key!r} was already submitted to this manager")
        params = {**params, "background": True}
        params.setdefault("store", True)
        if self.stream:
            params.setdefault("stream", True)
        if not params.get("stream"):
            params.pop("stream", None)
        log = _log.bind(key=key)
        job = Job(self, key, params, log)
        job._policy = poll_policy or self.poll_policy
        resubmit = False
        if self.journal is not None:
            row = await self.journal.get(key)
            if row is not None:
                if row.digest != digest(params):
                    raise JournalMismatchError(
                        f"key {key!r} is already in the journal {self.journal.path} with a "
                        "different request; give this request a new key, or use another journal"
                    )
                if row.state == "done" and row.response is not None:
                    self._jobs[key] = job
                    job._create_sent = True
                    job._update(row.response)
                    log.info("job.restored", response_id=job.response_id, status=job.status.value)
                    return job
                if row.state == "accepted" and row.response_id:
                    job._reattach(row.response_id, JobStatus.from_server(row.status))
                    log.info("job.reattached", response_id=row.response_id, status=row.status)
                elif row.state == "sending":
                    # Killed between sending the create and recording its id: the server may
                    # hold a response we cannot find. Send again, and say so.
                    resubmit = True
                    self._api.possible_duplicates += 1
                    log.warning("job.possible_duplicate", reason="create sent but never recorded")
        self._jobs[key] = job
        tg.start_soon(self._run, job, resubmit, name=f"asyncbg job {key}")
        return job

    @property
    def jobs(self) -> Sequence[Job]:
        """Every job submitted so far, in submission order."""
        return list(self._jobs.values())

    # -- waiting ---------------------------------------------------------------------------

    async def wait_any(self, jobs: Iterable[Job], *, timeout: float | None = None) -> Job:
        """The first of ``jobs`` to reach a terminal status (the earliest, if several have)."""
        jobs = list(jobs)
        if not jobs:
            raise ValueError("wait_any needs at least one job")
        done = [j for j in jobs if j.done]
        if done:
            return min(done, key=lambda j: j._finish_seq)
        first: list[Job] = []
        woken = anyio.Event()

        def on_done(job: Job) -> None:
            if not first:
                first.append(job)
                woken.set()

        for j in jobs:
            j._listeners.append(on_done)
        try:
            with anyio.fail_after(timeout):
                await woken.wait()
        finally:
            _unlisten(jobs, on_done)
        return first[0]

    async def wait_all(self, jobs: Iterable[Job], *, timeout: float | None = None) -> list[Job]:
        """Wait until every one of ``jobs`` is terminal; returns them in the order given."""
        jobs = list(jobs)
        with anyio.fail_after(timeout):
            for j in jobs:
                await j._done.wait()
        return jobs

    async def as_completed(
        self, jobs: Iterable[Job], *, timeout: float | None = None
    ) -> AsyncIterator[Job]:
        """Yield ``jobs`` in the order they reach a terminal status.

        ``timeout`` bounds the whole iteration: ``TimeoutError`` is raised when it runs out.
        """
        jobs = list(dict.fromkeys(jobs))
        deadline = anyio.current_time() + timeout if timeout is not None else float("inf")
        finished = sorted((j for j in jobs if j.done), key=lambda j: j._finish_seq)
        waiting = [j for j in jobs if not j.done]
        send, receive = anyio.create_memory_object_stream[Job](len(waiting) or 1)
        for j in waiting:
            j._listeners.append(send.send_nowait)
        try:
            for j in finished:
                yield j
            for _ in waiting:
                with anyio.fail_at(deadline):
                    job = await receive.receive()
                yield job
        finally:
            _unlisten(waiting, send.send_nowait)
            send.close()
            receive.close()

    # -- cancelling ------------------------------------------------------------------------

    async def cancel_all(self) -> None:
        """Cancel every job that is not yet terminal, and return once all of them are."""
        async with anyio.create_task_group() as tg:
            for job in list(self._jobs.values()):
                if not job.done:
                    tg.start_soon(job.cancel)

    # -- pushes ----------------------------------------------------------------------------

    async def handle_webhook(self, body: bytes, headers: Mapping[str, str]) -> int:
        """Receive one OpenAI webhook delivery; returns the HTTP status to answer with.

        The delivery is verified with ``client.webhooks.unwrap`` (the secret comes from
        ``webhook_secret=``, the client, or ``OPENAI_WEBHOOK_SECRET``). A forged or stale one
        answers 400 and a replayed ``webhook-id`` 409; these are logged and change nothing. A
        terminal event for one of this manager's jobs makes that job fetch its final Response at
        once; an unknown response id is acknowledged and ignored.
        """
        return await self._inbox.handle(body, headers)

    def _known(self, job: Job) -> None:
        """Called when a job learns its response id."""
        assert job.response_id is not None
        self._by_response_id[job.response_id] = job
        if self._inbox.claim_early(job.response_id):
            job._wake()

    # -- statistics ------------------------------------------------------------------------

    def statistics(self) -> ManagerStatistics:
        """A frozen snapshot of this manager's counters."""
        by_status = Counter(job.status.value for job in self._jobs.values())
        return ManagerStatistics(
            submitted=len(self._jobs),
            pending=by_status[JobStatus.PENDING.value],
            live=self._live,
            by_status=dict(by_status),
            requests=self._api.requests,
            polls=self._polls,
            retries=self._api.retries,
            possible_duplicates=self._api.possible_duplicates,
            webhooks_accepted=self._inbox.accepted,
            webhooks_rejected=self._inbox.rejected,
        )

    # -- the runner: one task per job --------------------------------------------------------

    async def _run(self, job: Job, resubmit: bool = False) -> None:
        try:
            with job._scope:
                async with self._slots:
                    if job.done:  # cancelled while pending
                        return
                    self._live += 1
                    try:
                        await self._drive(job, resubmit)
                    finally:
                        self._live -= 1
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._abandon(job)
            raise
        except (Rejected, GaveUp) as exc:
            await self._fail(job, _explain(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must fail one job, not the manager
            job._log.exception("job.crashed")
            await self._fail(job, f"asyncbg internal error: {exc!r}")

    async def _fail(self, job: Job, error: str) -> None:
        """Finish a job that failed on our side (rejected, retries exhausted), journal first."""
        if self.journal is not None and job._create_sent:
            await self.journal.status(job.key, job.response_id, JobStatus.FAILED.value, None,
                                      terminal=True, error=error)
        job._finish(JobStatus.FAILED, error)

    async def _take(self, job: Job, data: dict[str, Any], raw: bytes | None = None) -> None:
        """Apply a server answer to a job; with a journal, commit it first.

        Committing before the job changes means a job is never reported done (and its result
        never handed out) before its final JSON is on disk.
        """
        if self.journal is not None and not job.done:
            status = JobStatus.from_server(data.get("status"))
            if status is not job.status or job.response_id is None:
                rid = job.response_id or data.get("id")
                body = (raw or json.dumps(data).encode()) if status.terminal else None
                await self.journal.status(
                    job.key, rid if isinstance(rid, str) else None, status.value, body,
                    terminal=status.terminal,
                    error=_reason(status, data) if status.terminal else None,
                )
        job._update(data, raw)

    async def _drive(self, job: Job, resubmit: bool) -> None:
        """Create the job's response (unless re-attached), then poll it until it is terminal."""
        params = job._params
        policy = job._policy
        scale = policy.scale_for(params)
        delay = policy.first(scale)
        if params.get("stream"):
            if await self._stream(job, resubmit):
                return
            if job.done:
                return
            # The stream could not carry the job to its end: poll it from here.
            params = job._params
        if job.response_id is None:
            if self.journal is not None:
                await self.journal.sending(job.key, digest(params), resubmit=resubmit)
            job._create_sent = True
            answer = await self._api.create(params, job._log)
            await self._take(job, answer.data, answer.raw)
            if job.response_id is None:
                await self._fail(job, "the server's answer to create carried no response id")
                return
            job._log.info(
                "job.submitted",
                status=job.status.value,
                elapsed=round(job.elapsed, 3),
                **({"input": params.get("input")} if self.log_prompts else {}),
            )
            if answer.poll_after is not None and policy.honor_poll_after:
                delay = answer.poll_after
        created = anyio.current_time()
        cancel_sent = False
        while not job.done:
            await job._nap(delay)
            if job._cancel_requested and not cancel_sent:
                cancel_sent = True
                if await self._send_cancel(job):
                    continue
            self._polls += 1
            answer = await self._api.retrieve(job.response_id, job._log)
            await self._take(job, answer.data, answer.raw)
            if cancel_sent:
                # A cancelled response settles within moments; don't wait a long interval.
                delay = min(policy.min_interval, _AFTER_CANCEL)
            else:
                delay = policy.next_interval(
                    anyio.current_time() - created, scale=scale, poll_after=answer.poll_after
                )

    async def _stream(self, job: Job, resubmit: bool) -> bool:
        """Run a job as a background stream; True when the stream carried it to its end.

        False means: poll from here (the server refused streaming, refused to resume, or the
        stream ended without a terminal event, as it does for a cancellation).
        """
        if job.response_id is None:
            if self.journal is not None:
                await self.journal.sending(job.key, digest(job._params), resubmit=resubmit)
            job._create_sent = True
            try:
                stream = await self._api.create_stream(job._params, job._log)
            except Rejected as exc:
                if exc.status != 400 or "stream" not in exc.message.lower():
                    raise
                # Some servers refuse background together with stream: poll instead.
                job._log.warning("job.stream_refused", error=exc.message,
                                 fallback="polling")
                job._params = {k: v for k, v in job._params.items() if k != "stream"}
                return False
            if await self._read(job, stream):
                return True
        resumes = 0
        while not job.done and not job._cancel_requested:
            assert job.response_id is not None
            if resumes >= self.retry_policy.max_attempts:
                job._log.warning("job.stream_gave_up", resumes=resumes, fallback="polling")
                return False
            resumes += 1
            job._log.info("job.stream_resume", starting_after=job.last_sequence,
                          attempt=resumes)
            try:
                stream = await self._api.resume_stream(
                    job.response_id, job.last_sequence, job._log)
            except (Rejected, GaveUp) as exc:
                # e.g. the response is older than the server keeps streams resumable.
                job._log.warning("job.stream_resume_refused", error=str(exc),
                                 fallback="polling")
                return False
            if await self._read(job, stream):
                return True
            if not job._stream_dropped:
                return False  # ended cleanly without a terminal event (e.g. cancelled)
        return job.done

    async def _read(self, job: Job, stream: AsyncStream[ResponseStreamEvent]) -> bool:
        """Read a stream into the job; True once a terminal event settled it."""
        job._stream_dropped = False
        with anyio.CancelScope() as scope:
            job._stream_scope = scope
            try:
                async for event in stream:
                    if not job._add_event(event):
                        continue
                    response = getattr(event, "response", None)
                    if response is None:
                        continue
                    status = JobStatus.from_server(response.status)
                    if job.response_id is None or status.terminal:
                        await self._take(job, response.to_dict())
                    if job.done:
                        return True
            except (openai.APIError, httpx2.HTTPError, OSError) as exc:
                job._stream_dropped = True
                job._log.info("job.stream_dropped", error=repr(exc),
                              last_sequence=job.last_sequence)
            finally:
                job._stream_scope = None
                with anyio.CancelScope(shield=True):
                    await stream.close()
        return job.done

    async def _abandon(self, job: Job) -> None:
        """The runner was cancelled (an error or a cancellation left the manager's block):
        cancel the job's response on the server so that nobody pays for an orphan."""
        if job.done:
            return
        if not job._create_sent:
            job._finish(JobStatus.CANCELLED, "cancelled before it was sent")
            return
        if job.response_id is None:
            job._finish(
                JobStatus.CANCELLED,
                "abandoned while its create was in flight; a response may exist on the server",
            )
            return
        with anyio.move_on_after(self.cancel_timeout):
            job._log.info("job.cancel_sent", reason="manager exiting")
            try:
                answer = await self._api.cancel(job.response_id, job._log)
                if not JobStatus.from_server(answer.data.get("status")).terminal:
                    answer = await self._api.retrieve(job.response_id, job._log)
            except Rejected:
                # Most likely it finished first (the cancel race): keep what the server says.
                try:
                    answer = await self._api.retrieve(job.response_id, job._log)
                except (Rejected, GaveUp) as exc:
                    job._log.warning("job.cancel_failed", error=str(exc))
                else:
                    await self._take(job, answer.data, answer.raw)
            except GaveUp as exc:
                job._log.warning("job.cancel_failed", error=str(exc))
            else:
                await self._take(job, answer.data, answer.raw)
        job._finish(
            JobStatus.CANCELLED,
            "abandoned: the manager exited before the job finished and the server did not "
            "confirm the cancel",
        )

    async def _send_cancel(self, job: Job) -> bool:
        """Cancel on the server; True when the answer settled the job."""
        assert job.response_id is not None
        job._log.info("job.cancel_sent")
        try:
            answer = await self._api.cancel(job.response_id, job._log)
        except Rejected as exc:
            # The response finished before the cancel arrived. Servers answer that race
            # differently (400, 409, or the final object); poll to learn the real outcome.
            job._log.info("job.cancel_raced", status_code=exc.status, error=exc.message)
            return False
        await self._take(job, answer.data, answer.raw)
        return job.done

    # -- bookkeeping -----------------------------------------------------------------------

    def _next_seq(self) -> int:
        return next(self._seq)



def _explain(exc: Rejected | GaveUp) -> str:
    if isinstance(exc, Rejected):
        code = f", {exc.code}" if exc.code else ""
        return f"rejected by the server (HTTP {exc.status}{code}): {exc.message}"
    return str(exc)


def _unlisten(jobs: Iterable[Job], listener: Any) -> None:
    for j in jobs:
        # A listener that already fired was dropped by its job.
        with contextlib.suppress(ValueError):
            j._listeners.remove(listener)


def _collapse(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, or the group itself."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]  # type: ignore[assignment]
    return group
