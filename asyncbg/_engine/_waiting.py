"""Waiting on many jobs: the first to finish, all of them, or each as it finishes.

These work on any jobs, of one manager or several (of different providers too): they only use
the surface of :class:`~asyncbg.Job` (``done``, ``finish_order``, its listeners: synchronous
and immediate, unlike the done callbacks of users).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import anyio

from .._errors import ManagerStateError
from ._job import Job

__all__ = ["as_completed", "wait_all", "wait_any"]


async def wait_any(jobs: Iterable[Job], *, timeout: float | None = None) -> Job:
    """The first of ``jobs`` to reach a terminal status (the earliest, if several have)."""
    jobs = list(jobs)
    if not jobs:
        raise ValueError("wait_any needs at least one job")
    done = [j for j in jobs if j.done]
    if done:
        return min(done, key=lambda j: j.finish_order)
    _check_attached(jobs)
    first: list[Job] = []
    woken = anyio.Event()

    def on_done(job: Job) -> None:
        if not first:
            first.append(job)
            woken.set()

    for j in jobs:
        j.add_listener(on_done)
    try:
        with anyio.fail_after(timeout):
            await woken.wait()
    finally:
        for j in jobs:
            j.remove_listener(on_done)
    _check_attached(first)
    return first[0]


async def wait_all(jobs: Iterable[Job], *, timeout: float | None = None) -> list[Job]:
    """Wait until every one of ``jobs`` is terminal; returns them in the order given."""
    jobs = list(jobs)
    with anyio.fail_after(timeout):
        for j in jobs:
            await j.wait()
    return jobs


async def as_completed(
    jobs: Iterable[Job], *, timeout: float | None = None
) -> AsyncIterator[Job]:
    """Yield ``jobs`` in the order they reach a terminal status.

    ``timeout`` bounds the whole iteration: ``TimeoutError`` is raised when it runs out.
    """
    jobs = list(dict.fromkeys(jobs))
    deadline = anyio.current_time() + timeout if timeout is not None else float("inf")
    finished = sorted((j for j in jobs if j.done), key=lambda j: j.finish_order)
    waiting = [j for j in jobs if not j.done]
    send, receive = anyio.create_memory_object_stream[Job](len(waiting) or 1)
    for j in waiting:
        j.add_listener(send.send_nowait)
    try:
        for j in finished:
            yield j
        _check_attached(waiting)
        for _ in waiting:
            with anyio.fail_at(deadline):
                job = await receive.receive()
            _check_attached([job])
            yield job
    finally:
        for j in waiting:
            j.remove_listener(send.send_nowait)
        send.close()
        receive.close()


def _check_attached(jobs: list[Job]) -> None:
    """Raise as ``job.wait()`` does for a job left running that nothing here follows."""
    for job in jobs:
        if job.detached:
            raise ManagerStateError(
                f"job {job.key!r} was left running on the server when its manager exited "
                "(cancel_on_exit=False) or another process took it over; re-attach to it with "
                "a journal"
            )
