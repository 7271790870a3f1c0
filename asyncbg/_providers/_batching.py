"""The batch engine that OpenAI's Batch API, Anthropic's Message Batches and Gemini's Batch Mode
share: grouping creates into remote batches, one poll per batch, results matched by custom id.

A job of a batch provider is one request inside one remote batch; its response id is
``"<batch_id>#<custom_id>"``, so a journal that records it can re-attach to the batch after a
crash without sending anything again. Three things happen here, the same for every API:

* **Grouping.** ``create`` adds its request to the open group of its bucket (one model per
  batch where the API asks for it) and waits. The first request of a group leads it: it waits
  until the group is full (``max_batch_size``, or the API's request-count or byte limit) or
  ``batch_delay`` seconds have passed, submits the batch, and wakes the others. Every task is a
  create the scheduler started, so nothing runs unowned; a failed submission raises its error in
  every create of the group, for the scheduler to retry or fail each job.
* **Polling.** ``check`` of any job polls its batch at most once per window (a fifth of the
  batch's age, as the default poll policy spaces a response's polls, between 50 ms and 30 s)
  and never twice at once: however many jobs of a batch are checked, and whenever, the batch
  costs one request per window. Once the batch has ended its results are fetched once, kept by
  custom id, and handed out as each job's check comes. They are kept until every result has
  been handed out (jobs re-attached from a journal arrive one by one), or until nobody has
  asked for one for :data:`KEEP_IDLE` seconds: a re-attach of N jobs costs one download per
  batch, not one per job.
* **Expired requests.** A request that its batch's window (24 hours) ran out on was never run
  and costs nothing: its check answers ``PENDING`` (``error_code="expired"``), which tells the
  engine to send it again, in a new batch, up to ``batch_retries`` times per job in a process
  (counted in :attr:`BatchApi.reruns`); after that it ends ``FAILED`` with code ``expired``.
  A request that has a result is never sent again.
* **Cancelling.** Cancelling a job whose batch still holds other live jobs ends it here
  (``CANCELLED``, saying so; its result is dropped when it comes). Cancelling the last live job
  of a batch cancels the batch on the server; what finished before the cancel took effect is
  kept. A batch met only by id (re-attached after a crash) is cancelled on the server only
  once every request its last poll counted is known here; until then, cancels are local.

Each API's module supplies the requests, the calls and the result lines (:class:`BatchApi`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio

from .._http import NotFound, Rejected, RequestError, Transient
from .._policies import PollPolicy
from .._status import JobStatus
from ._base import Answer, WebhookEvent
from ._batch_common import Remote, Result, status_body
from ._prepare import batch_request

__all__ = ["BatchApi"]

#: A poll of a batch is shared by the checks that come within this share of the batch's age
#: (the default poll policy spaces a response's polls by 0.2 x its age) ...
FRESH_SHARE = 0.2
#: ... and at least within this many seconds, at most within this many.
MIN_FRESH = 0.05
MAX_FRESH = 30.0
#: Seconds an ended batch's results are kept after the last one was handed out, for jobs of it
#: that have not asked yet (a re-attach brings them one by one); a job asking later still gets
#: its result, by a new download.
KEEP_IDLE = 600.0
#: The error codes of a request that its batch's window ran out on, unrun (OpenAI's own, and
#: asyncbg's for Anthropic and Gemini).
EXPIRED = frozenset({"expired", "batch_expired"})


class _Group:
    """Requests gathering for one batch, before it is submitted."""

    __slots__ = ("batch_id", "bucket", "closed", "error", "full", "gone", "items", "settled",
                 "size")

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.items: dict[str, tuple[Any, int]] = {}  # custom id -> (request, its bytes)
        self.size = 0
        self.closed = False
        self.gone: set[str] = set()
        self.full = anyio.Event()
        self.settled = anyio.Event()
        self.batch_id: str | None = None
        self.error: BaseException | None = None


class _Batch:
    """What is known of one remote batch: its jobs, its last poll, its results."""

    __slots__ = ("complete", "dropped", "handed", "id", "inflight", "live", "lost", "members",
                 "missing", "order", "polled_at", "remote", "results", "seen", "used")

    def __init__(self, batch_id: str, order: list[str] | None) -> None:
        self.id = batch_id
        #: Submitted here: every member is known. A batch met by id (re-attached) is not.
        self.complete = order is not None
        self.order = order or []
        self.members: set[str] = set(self.order)
        self.live: set[str] = set(self.order)
        self.dropped: set[str] = set()
        self.remote: Remote | None = None
        self.results: dict[str, Result] | None = None
        #: Jobs whose final answer was handed out (a job asking again gets a new download).
        self.handed: set[str] = set()
        self.seen = self.polled_at = self.used = anyio.current_time()
        self.inflight: anyio.Event | None = None
        self.lost: NotFound | None = None
        self.missing = False  # the last poll answered 404

    def fresh_for(self, now: float) -> float:
        return min(max(FRESH_SHARE * (now - self.seen), MIN_FRESH), MAX_FRESH)

    def spent(self) -> bool:
        """Whether nothing kept here can still be asked for: no live job, no result left."""
        return not self.live and not self.results

    def may_cancel_remote(self) -> bool:
        """Whether every request of the batch is known here (so none is cancelled unseen)."""
        if self.complete:
            return True
        total = self.remote.total if self.remote is not None else None
        return total is not None and len(self.members) >= total


class BatchApi:
    """A batch provider: the :class:`~asyncbg.providers.Provider` verbs over a batch API.

    Subclasses name the API's limits and implement the hooks at the end of this class; they
    raise only the errors of :mod:`asyncbg._http`.
    """

    #: Set on every batch provider: jobs are priced at the batch discount.
    batch = True
    #: The API's own limits on one batch: requests, and bytes of requests.
    api_max_requests: int = 50_000
    api_max_bytes: int = 200_000_000
    api_name: str = "batch API"

    def __init__(self, *, max_batch_size: int, batch_delay: float,
                 batch_retries: int = 1) -> None:
        if not max_batch_size >= 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        if not batch_delay >= 0:
            raise ValueError(f"batch_delay must be >= 0 seconds, got {batch_delay!r}")
        if not (isinstance(batch_retries, int) and batch_retries >= 0):
            raise ValueError(f"batch_retries must be an int >= 0, got {batch_retries!r}")
        self.batch_retries = batch_retries
        #: custom id -> times it was sent again after its batch expired (this process).
        self._expired: dict[str, int] = {}
        #: Requests handed back to be sent again after their batch expired.
        self.reruns = 0
        self.max_batch_size = min(max_batch_size, self.api_max_requests)
        self.batch_delay = float(batch_delay)
        self._open: dict[str, _Group] = {}
        self._batches: dict[str, _Batch] = {}
        self._swept: float | None = None  # when idle results were last looked for
        #: Ended batches whose every result was handed out: their files may go.
        self._spent: list[str] = []
        #: HTTP requests sent to the API (uploads, creates, polls, downloads, cancels): what
        #: the server counts, where the manager counts jobs.
        self.requests = 0

    # -- the Provider verbs ----------------------------------------------------------------

    def prepare(self, params: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
        return batch_request(params, api_name=self.api_name)

    def is_stream(self, params: Mapping[str, Any]) -> bool:
        return False

    def poll_scale(self, params: Mapping[str, Any], policy: PollPolicy) -> float:
        return 1.0

    async def create(self, params: Mapping[str, Any], *, key: str | None = None) -> Answer:
        if key is None:
            raise ValueError(f"the {self.api_name} needs each job's key, as its custom id")
        cid = self._custom_id(key)
        item, size = self._encode(cid, params)
        if size > self.api_max_bytes:
            raise Rejected(f"this request is {size:,} bytes; a batch of the {self.api_name} "
                           f"holds at most {self.api_max_bytes:,}", code="request_too_large")
        bucket = self._bucket(params)
        group = self._open.get(bucket)
        if group is not None and (cid in group.items or group.size + size > self.api_max_bytes):
            group.full.set()  # submit it as it is; this request starts the next group
            group = None
        lead = group is None
        if group is None:
            group = self._open[bucket] = _Group(bucket)
        group.items[cid] = (item, size)
        group.size += size
        if len(group.items) >= self.max_batch_size:
            del self._open[bucket]
            group.full.set()
        if lead:
            await self._lead(group)
        else:
            await self._follow(group, cid)
        assert group.batch_id is not None
        rid = f"{group.batch_id}#{cid}"
        return Answer(JobStatus.QUEUED, rid, status_body(rid, group.batch_id, cid, "queued"))

    async def check(self, response_id: str) -> Answer:
        return await self._answer(response_id, fresh_ok=True)

    async def fetch(self, response_id: str) -> Answer:
        return await self._answer(response_id, fresh_ok=False)

    async def cancel(self, response_id: str) -> Answer:
        b, cid = self._track(response_id)
        if not b.complete and b.remote is None:
            await self._settle(b, fresh_ok=True)  # met by id: learn how many requests it holds
        if b.results is not None or b.lost is not None:
            return await self._answer(response_id, fresh_ok=True)  # it ended first
        others = b.live - {cid}
        if others or not b.may_cancel_remote():
            self.forget(b, cid, drop=True)
            reason = ("keeps running for other jobs" if others else
                      "may hold jobs not attached here, so it keeps running")
            return Answer(JobStatus.CANCELLED, response_id,
                          status_body(response_id, b.id, cid, "cancelled"),
                          error=f"cancelled locally; its batch {b.id} {reason}",
                          error_code="cancelled")
        remote = await self._cancel_batch(b.id)  # the last live job: cancel the batch
        if remote is not None:
            b.remote = remote
        raw = remote.raw_status if remote is not None else "cancelling"
        return Answer(JobStatus.IN_PROGRESS, response_id,
                      status_body(response_id, b.id, cid, raw))

    async def cancel_many(self, response_ids: list[str]) -> list[Answer]:
        """Cancel several jobs at once (a manager's ``cancel_all``), one answer each.

        A batch all of whose live jobs are among ``response_ids`` (and all of whose requests
        are known here) is cancelled on the server with one request, and its jobs answer
        ``IN_PROGRESS`` until their checks bring what the batch says: cancelled, or the
        result of a request that finished first. The others are cancelled as :meth:`cancel`
        does, one by one.
        """
        asked: dict[str, set[str]] = {}
        for rid in response_ids:
            b, cid = self._track(rid)
            asked.setdefault(b.id, set()).add(cid)
        whole: set[str] = set()
        for batch_id, cids in asked.items():
            b = self._batches[batch_id]
            if not b.complete and b.remote is None:
                await self._settle(b, fresh_ok=True)  # met by id: how many requests it holds
            if (b.results is None and b.lost is None and b.live <= cids
                    and b.may_cancel_remote()):
                await self.cancel_batch(batch_id)
                whole.add(batch_id)
        answers = []
        for rid in response_ids:
            batch_id, _, cid = rid.rpartition("#")
            if batch_id in whole:
                answers.append(Answer(JobStatus.IN_PROGRESS, rid,
                                      status_body(rid, batch_id, cid, "cancelling")))
            else:
                answers.append(await self.cancel(rid))
        return answers

    async def cancel_batch(self, batch_id: str) -> None:
        """Cancel a whole batch on the server, whoever sent it: its requests not yet run end
        cancelled, those that had finished keep their results (``asyncbg cancel``). A batch
        that had already ended is left as it is."""
        b = self._batches.get(batch_id)
        try:
            await self._cancel_batch(batch_id)
        except Rejected:  # 400/409 "already ended": a race, not a failure, once confirmed
            remote = await self._poll(batch_id)
            if not remote.ended:
                raise
        if b is not None and b.results is None:
            b.remote = None  # the next check polls: where does the cancel stand

    @asynccontextmanager
    async def stream(
        self, params: Mapping[str, Any] | None = None, *, response_id: str | None = None,
        after: int | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        raise Rejected(f"the {self.api_name} has no streams")
        yield  # pragma: no cover - an async generator, for asynccontextmanager

    def stream_answer(self, event: Mapping[str, Any]) -> Answer | None:
        return None

    def parse_event(self, data: dict[str, Any]) -> Any:
        return data

    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secret: str | None
    ) -> WebhookEvent:
        """A batch event, verified as the API signs it: the batch's live jobs known here are
        in ``response_ids``, and the batch's next check polls at once, whatever its window."""
        event_type, batch_id, terminal = self._unwrap(body, headers, secret)
        b = self._batches.get(batch_id) if batch_id is not None else None
        ids: tuple[str, ...] = ()
        if b is not None and terminal:
            b.polled_at = -math.inf
            ids = tuple(f"{b.id}#{cid}" for cid in b.live)
        return WebhookEvent(event_type, None, terminal, batch_id=batch_id, response_ids=ids)

    async def aclose(self) -> None:
        # Every create and check ran in the scheduler's tasks, which have ended: only state.
        self._open.clear()
        self._batches.clear()

    # -- grouping --------------------------------------------------------------------------

    async def _lead(self, group: _Group) -> None:
        try:
            with anyio.move_on_after(self.batch_delay):
                await group.full.wait()
            if self._open.get(group.bucket) is group:
                del self._open[group.bucket]
            group.closed = True
            order = list(group.items)
            batch_id = await self._submit(group.bucket, order,
                                          [item for item, _ in group.items.values()])
            b = self._batches[batch_id] = _Batch(batch_id, order)
            for cid in group.gone:  # cancelled while the batch was being submitted
                self.forget(b, cid, drop=True)
            group.batch_id = batch_id
        except RequestError as exc:
            group.error = exc
            raise
        except Exception as exc:
            group.error = Rejected(f"the {self.api_name} SDK refused the batch: {exc!r}",
                                   code="invalid_request")
            raise group.error from exc
        except BaseException:  # cancelled: the waiting creates may be sent again
            group.error = Transient(f"the {self.api_name} batch this request was waiting for "
                                    "was not submitted", maybe_sent=group.closed)
            raise
        finally:
            if self._open.get(group.bucket) is group:
                del self._open[group.bucket]
            group.settled.set()

    async def _follow(self, group: _Group, cid: str) -> None:
        try:
            await group.settled.wait()
        except BaseException:
            if not group.closed:
                group.size -= group.items.pop(cid)[1]  # not sent: leave the group
            elif group.batch_id is None:
                group.gone.add(cid)
            elif (b := self._batches.get(group.batch_id)) is not None:
                self.forget(b, cid, drop=True)  # nobody will follow this job
            raise
        if group.error is not None:
            raise copy.copy(group.error) from group.error  # one error, raised in every create

    # -- polling and answers ---------------------------------------------------------------

    def _track(self, response_id: str) -> tuple[_Batch, str]:
        batch_id, sep, cid = response_id.rpartition("#")
        if not sep or not batch_id or not cid:
            raise NotFound(f"{response_id!r} is not a job of the {self.api_name} (expected "
                           "'<batch_id>#<custom_id>')", http_status=404)
        self._sweep()
        b = self._batches.get(batch_id)
        if b is not None and cid in b.handed:  # asked again after its answer: start afresh
            del self._batches[batch_id]
            b = None
        if b is None:  # re-attached from a journal, or asked again after its batch was freed
            b = self._batches[batch_id] = _Batch(batch_id, None)
        if cid not in b.members:
            b.members.add(cid)
            b.live.add(cid)
            b.order.append(cid)
        return b, cid

    async def _answer(self, response_id: str, *, fresh_ok: bool) -> Answer:
        b, cid = self._track(response_id)
        if cid in b.dropped:
            self.forget(b, cid, drop=False)
            return Answer(JobStatus.CANCELLED, response_id,
                          status_body(response_id, b.id, cid, "cancelled"),
                          error=f"cancelled locally; its batch {b.id} keeps running",
                          error_code="cancelled")
        await self._settle(b, fresh_ok=fresh_ok)
        if b.results is None:
            remote = b.remote
            status = remote.status if remote is not None else JobStatus.QUEUED
            raw = remote.raw_status if remote is not None else "queued"
            return Answer(status, response_id, status_body(response_id, b.id, cid, raw))
        result = b.results.get(cid)
        if result is None:
            assert b.remote is not None
            result = self._no_result(b.id, b.remote, cid)
        b.handed.add(cid)
        b.used = anyio.current_time()
        self.forget(b, cid, drop=False)
        if result.error_code in EXPIRED and result.status.terminal and (
                self._expired.get(cid, 0) < self.batch_retries):
            # Never run, never paid for: the engine sends it again, in a new batch.
            self._expired[cid] = self._expired.get(cid, 0) + 1
            self.reruns += 1
            reason = (result.error or "expired").rstrip(".")
            return Answer(JobStatus.PENDING, response_id, result.body, result.http_status,
                          error=f"{reason}: sent again in a new batch "
                          f"({self._expired[cid]} of {self.batch_retries})",
                          error_code=result.error_code)
        return Answer(result.status, response_id, result.body, result.http_status,
                      error=result.error, error_code=result.error_code)

    async def _settle(self, b: _Batch, *, fresh_ok: bool) -> None:
        """Bring ``b`` up to date: share a poll in flight or a fresh one, else poll it (and
        fetch its results once it has ended)."""
        if b.lost is not None:
            raise copy.copy(b.lost) from b.lost
        if b.results is not None:
            return
        if b.inflight is not None:
            await b.inflight.wait()  # a failed poll leaves the last state: the next check retries
            return
        now = anyio.current_time()
        if fresh_ok and b.remote is not None and now - b.polled_at < b.fresh_for(now):
            return
        b.inflight = done = anyio.Event()
        try:
            remote = await self._poll(b.id)
            b.polled_at, b.remote = now, remote
            if remote.ended:
                b.results = await self._results(b.id, remote, b.order if b.complete else None)
                for cid in b.dropped:
                    b.results.pop(cid, None)
        except NotFound as exc:
            # One 404 is not a loss (a replica that has not seen the batch yet): the engine
            # checks again a little later, and this poll must then reach the server.
            if b.missing:
                b.lost = exc  # a second 404 in a row: every job of it is lost
            b.missing, b.polled_at = True, -math.inf
            raise
        else:
            b.missing = False
        finally:
            b.inflight = None
            done.set()

    def forget(self, b: _Batch, cid: str, *, drop: bool) -> None:
        """``cid`` has had its final answer (or is dropped): free what is kept for it."""
        b.live.discard(cid)
        if drop:
            b.dropped.add(cid)
        else:
            b.dropped.discard(cid)
        if b.results is not None:
            b.results.pop(cid, None)
        if b.spent() and self._batches.get(b.id) is b:
            del self._batches[b.id]  # nothing left to answer
            if b.results is not None:
                self._spent.append(b.id)

    async def delete_files(self) -> int:
        """Delete the API's files of the batches whose every result was handed out (OpenAI's
        input, output and error files); how many were deleted. Call it once the results are
        in the journal: a rerun that finds a job unrecorded downloads its result again, from
        these files. A no-op for APIs without files, and for ``keep_files=True``."""
        spent, self._spent = self._spent, []
        return await self._delete_files(spent)

    def _sweep(self) -> None:
        """Free ended batches whose results nobody asked for in :data:`KEEP_IDLE` seconds
        (requests of a batch that no journal holds: looked at once a minute at most)."""
        now = anyio.current_time()
        if self._swept is not None and now - self._swept < min(60.0, KEEP_IDLE):
            return
        self._swept = now
        for batch_id, b in list(self._batches.items()):
            if not b.live and b.results is not None and now - b.used > KEEP_IDLE:
                del self._batches[batch_id]

    # -- what each API supplies ------------------------------------------------------------

    def _custom_id(self, key: str) -> str:
        """The custom id a job's key travels under (the key itself where the API allows)."""
        return key

    def _bucket(self, params: Mapping[str, Any]) -> str:
        """Requests of one bucket share a batch (the model, for APIs with one per batch)."""
        return ""

    def _encode(self, cid: str, params: Mapping[str, Any]) -> tuple[Any, int]:
        """One request as the API's batch holds it, and its size in bytes."""
        raise NotImplementedError

    async def _submit(self, bucket: str, order: list[str], items: list[Any]) -> str:
        """Create a batch of ``items`` (custom ids ``order``); its id."""
        raise NotImplementedError

    async def _poll(self, batch_id: str) -> Remote:
        raise NotImplementedError

    async def _results(self, batch_id: str, remote: Remote,
                       order: list[str] | None) -> dict[str, Result]:
        """The results of an ended batch by custom id (``order``: the ids as submitted, when
        known here, for an API that reports errors by line)."""
        raise NotImplementedError

    def _no_result(self, batch_id: str, remote: Remote, cid: str) -> Result:
        """The outcome of a request that an ended batch has no result for."""
        rid = f"{batch_id}#{cid}"
        return Result(JobStatus.FAILED, status_body(rid, batch_id, cid, remote.raw_status),
                      f"batch {batch_id} ended ({remote.raw_status}) without a result for "
                      f"custom id {cid!r}", "result_missing")

    async def _cancel_batch(self, batch_id: str) -> Remote | None:
        """Ask the server to cancel a batch; where it stands, if the answer says."""
        raise NotImplementedError

    async def _delete_files(self, batch_ids: list[str]) -> int:
        """Delete the files of ``batch_ids`` (see :meth:`delete_files`)."""
        return 0

    def _unwrap(self, body: bytes, headers: Mapping[str, str],
                secret: str | None) -> tuple[str, str | None, bool]:
        """A verified webhook's (type, batch id, whether the batch has ended); ``ValueError``
        for a forged or stale one."""
        raise ValueError(f"asyncbg takes no webhooks for the {self.api_name}; it polls")
