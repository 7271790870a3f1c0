"""Running one job as a background stream: read it, resume it after a drop, or fall back.

The stream is opened through the same request slots as polls (held only while opening), read as
raw JSON events, and resumed with ``starting_after`` when the connection drops, losing and
repeating no event. When the server refuses background streams, refuses to resume, or the stream
ends without a terminal event (a cancel), the job goes back to the scheduler to be polled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, nullcontext
from typing import Any, Protocol

import anyio

from .. import _log
from .._http import Rejected, RequestError, Transient
from .._ledgers._base import Ledger
from .._policies import RetryPolicy
from .._providers._base import Answer, Provider
from .._spend._limiter import Limiter
from ._life import CANCEL, Entry
from ._meter import Ticket

__all__ = ["run_stream"]


class Scheduler(Protocol):
    """What running a stream needs of the scheduler."""

    provider: Provider
    ledger: Ledger | None
    retry: RetryPolicy
    requests_limiter: Limiter
    requests: int

    async def take(self, entry: Entry, answer: Answer) -> None: ...

    async def sending(self, entry: Entry) -> None: ...


async def run_stream(s: Scheduler, entry: Entry, ticket: Ticket | None) -> bool:
    """Carry ``entry`` by its stream; True when it must be polled from here instead.

    ``ticket`` is the create's place in the pacer (its open is the create): answered when the
    stream opens or fails, given back on any other way out.
    """
    job = entry.job
    with ticket if ticket is not None else nullcontext():
        if job.response_id is None:
            assert entry.params is not None
            if s.ledger is not None:
                await s.sending(entry)
            entry.resubmit = False
            entry.sent = True
            settled, _dropped, fallback = await _open_and_read(s, entry, entry.params, None,
                                                               ticket)
            if settled:
                return False
            if fallback:
                return True
    resumes = 0
    while not job.done and not entry.asked(CANCEL) and job.response_id is not None:
        if resumes >= s.retry.max_attempts:
            _log.warning("job.stream_gave_up", key=job.key, resumes=resumes, fallback="polling")
            return True
        resumes += 1
        _log.info("job.stream_resume", key=job.key, response_id=job.response_id,
                  starting_after=job.last_sequence, attempt=resumes)
        settled, dropped, fallback = await _open_and_read(s, entry, None, job.response_id, None)
        if settled:
            return False
        if fallback or not dropped:
            return True  # refused, or ended cleanly without a terminal event (a cancel)
        await anyio.sleep(s.retry.delay(resumes) / 4)
    return not job.done


async def _open_and_read(
    s: Scheduler, entry: Entry, params: dict[str, Any] | None, response_id: str | None,
    ticket: Ticket | None,
) -> tuple[bool, bool, bool]:
    """Open (create or resume) and read one stream: (settled, dropped, fall back to polling)."""
    job = entry.job
    async with AsyncExitStack() as stack:
        await s.requests_limiter.acquire()
        s.requests += 1
        try:
            events = await stack.enter_async_context(
                s.provider.stream(params, response_id=response_id, after=job.last_sequence))
        except Rejected as exc:
            if ticket is not None:
                ticket.answered(exc.http_status or 0, exc.limits)
            _log.warning("job.stream_refused" if response_id is None
                         else "job.stream_resume_refused", key=job.key,
                         status_code=exc.http_status, error=exc.message, fallback="polling")
            if params is not None:
                # Some servers refuse background together with stream: create it plainly.
                entry.params = {k: v for k, v in params.items() if k != "stream"}
                entry.stream = False
            return False, False, True
        except RequestError as exc:
            if ticket is not None:
                ticket.answered(exc.http_status or 0, exc.limits)
            _log.info("job.stream_open_failed", key=job.key, error=exc.message,
                      fallback="polling")
            if params is not None:
                entry.stream = False  # created plainly from here (and polled)
            return False, False, True
        finally:
            s.requests_limiter.release()
        if ticket is not None:
            ticket.answered(200, None)
        return await _read(s, entry, events)
    raise AssertionError("unreachable")  # pragma: no cover


async def _read(
    s: Scheduler, entry: Entry, events: AsyncIterator[dict[str, Any]]
) -> tuple[bool, bool, bool]:
    job = entry.job
    with anyio.CancelScope() as scope:
        entry.stream_scope = scope if job.response_id is not None else None
        try:
            async for event in events:
                if not entry.control.add_event(event):
                    continue
                answer = s.provider.stream_answer(event)
                if answer is None:
                    continue
                if (job.response_id is None or answer.status.terminal
                        or answer.status is not job.status):
                    await s.take(entry, answer)
                    entry.stream_scope = scope
                if job.done:
                    return True, False, False
                if entry.asked(CANCEL):
                    return False, False, True  # the id is known now: cancel it by polling
        except Transient as exc:
            _log.info("job.stream_dropped", key=job.key, error=exc.message,
                      last_sequence=job.last_sequence)
            return job.done, True, False
        finally:
            entry.stream_scope = None
    return job.done, False, False
