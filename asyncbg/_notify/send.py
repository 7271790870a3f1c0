"""The sender: posts the pending notifications of one endpoint from the ledger's outbox.

One task (in the manager's task group, or ``asyncbg notify``'s) takes due deliveries from the
outbox under a short lease, two rounds at a time, and ``max_concurrent`` poster tasks post them
over one aiohttp session (a connection limit, a total timeout per attempt). One round trip to
the ledger deletes the deliveries a round got 2xx for and takes the next round. Any other
answer, or none, reschedules a delivery with exponential backoff and jitter (a ``Retry-After``
wins), and a 410 marks every pending delivery to the endpoint failed and stops sending to it.
A failing endpoint is paused as a whole and then probed with one delivery at a time, so that a
receiver that is down costs one attempt per backoff rather than one per notification; its
first 2xx makes the backlog due at once. Deliveries older than ``give_up_after`` are marked
failed, never dropped.

Nothing here touches the jobs: a slow receiver slows only this task. The secret signs the
headers and appears in no log line and no error; URLs are logged without credentials or query.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import sniffio
import yarl
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import _log
from .._ledgers._base import LedgerError
from .._ledgers._outbox import Delivery, Outbox
from .._ledgers._shared import new_owner
from .._policies import parse_retry_after
from ._notify import Notices, Notify, endpoint
from .sign import STATIC_HEADERS, secret_key, signed_headers

if TYPE_CHECKING:
    from .._engine._scheduler import Scheduler

__all__ = ["Sender", "notifying"]

#: Longest nap between looks at the outbox: notifications another process wrote and left.
MAX_NAP = 30.0
#: Nap when a delivery is due but was not ours to take (another sender is taking it).
MIN_NAP = 0.05
#: Nap after the ledger failed.
LEDGER_NAP = 2.0
GONE = "the endpoint answered 410 Gone: no more deliveries are sent to it"
#: Answers (None: none came) that say the endpoint is down or overloaded, not that this
#: notification is bad.
ENDPOINT_DOWN = frozenset({None, 429, 502, 503, 504})


def notifying(notify: Notify, ledger: object, scheduler: Scheduler) -> Sender:
    """Wire ``notify=`` into a manager: its scheduler writes a notification with each terminal
    outcome, and the sender returned (a task of the manager) posts them."""
    if not isinstance(ledger, Outbox):
        raise TypeError(
            f"notify= needs a journal that keeps an outbox (SQLite, PostgreSQL or memory), "
            f"not {type(ledger).__name__}")
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    if library != "asyncio":
        raise RuntimeError(f"notify= posts with aiohttp, which needs asyncio (this is "
                           f"{library or 'no event loop'}); run the manager under asyncio")
    sender = Sender(notify, ledger)
    scheduler.notices = Notices(notify, scheduler.meter, sender.wake)
    return sender


class Sender:
    """Delivers the outbox's notifications to ``notify.url``; see the module docstring."""

    def __init__(self, notify: Notify, outbox: Outbox, *, owner: str | None = None) -> None:
        self.notify = notify
        self.outbox = outbox
        self.owner = owner or new_owner()
        self._key = secret_key(notify.secret)
        self._endpoint = endpoint(notify.url)
        self._url = yarl.URL(notify.url)  # parsed once, not on every post
        self._kick = anyio.Event()
        self._idle: anyio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0
        self._done: list[str] = []
        self._leased: set[str] = set()  # taken, attempt not settled
        self._failures = 0  # in a row, at the endpoint
        self._answered = False  # a 2xx came since this sender started
        self._paused_until = 0.0
        self._gone = False
        #: Counters: deliveries answered 2xx, attempts that failed, deliveries marked failed.
        self.delivered = 0
        self.failed_attempts = 0
        self.gave_up = 0

    def wake(self) -> None:
        """A notification was written: look at the outbox now."""
        self._kick.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled."""
        notify = self.notify
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=notify.max_concurrent),
            timeout=aiohttp.ClientTimeout(total=notify.timeout), headers=STATIC_HEADERS,
            trust_env=False)
        self._session = session
        send, receive = anyio.create_memory_object_stream[Delivery](math.inf)
        try:
            async with anyio.create_task_group() as tg, send, receive:
                for _ in range(notify.max_concurrent):
                    tg.start_soon(self._poster, receive)
                task_status.started()
                while True:
                    self._kick = anyio.Event()
                    try:
                        nap = await self._step(send)
                    except LedgerError as exc:
                        _log.warning("notify.ledger_failed", endpoint=self._endpoint,
                                     error=str(exc))
                        nap = LEDGER_NAP
                    if nap > 0:
                        with anyio.move_on_after(nap):
                            await self._kick.wait()
        finally:
            self._session = None
            with anyio.CancelScope(shield=True):
                await session.close()
                await self._hand_back()

    async def _hand_back(self) -> None:
        """Leaving with attempts cut short: their deliveries are due again at once, for the
        next sender (rather than after the lease). One may have arrived: at least once."""
        leased, self._leased = self._leased, set()
        done, self._done = self._done, []
        with anyio.move_on_after(5.0):
            try:
                await self.outbox.deliveries_done(done)
                await self.outbox.release_deliveries(leased, owner=self.owner)
            except LedgerError as exc:
                _log.warning("notify.ledger_failed", endpoint=self._endpoint, error=str(exc))

    async def flush(self, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds until nothing is pending for the endpoint (delivered,
        or given up); returns what is still pending then."""
        with anyio.move_on_after(timeout):
            self._idle = anyio.Event()
            self.wake()
            await self._idle.wait()
        self._idle = None
        url = self.notify.url
        return [d for d in await self.outbox.deliveries() if d.state == "pending" and d.url == url]

    async def finish(self) -> None:
        """The manager is leaving: wait up to ``notify.wait_on_exit`` for what is pending, then
        name in a warning what is still pending (it stays in the ledger)."""
        try:
            pending = await self.flush(self.notify.wait_on_exit)
        except LedgerError as exc:  # the jobs are done and recorded: say so, don't fail them
            _log.warning("notify.ledger_failed", endpoint=self._endpoint, error=str(exc))
            return
        if pending:
            _log.warning(
                "notify.pending", endpoint=self._endpoint, count=len(pending),
                keys=[d.key for d in pending[:20]],
                hint="not delivered yet; kept in the ledger for the next run or worker "
                     "notifying this URL, or for `asyncbg notify --ledger LEDGER`")

    def counters(self) -> dict[str, int]:
        """For :class:`~asyncbg.ManagerStatistics`."""
        return {"notifications_delivered": self.delivered,
                "notification_failures": self.failed_attempts,
                "notifications_given_up": self.gave_up}

    # -- the loop --------------------------------------------------------------------------------

    async def _step(self, posters: MemoryObjectSendStream[Delivery]) -> float:
        """Start what is due; returns how long to nap unless woken."""
        outbox, url = self.outbox, self.notify.url
        # Up to two rounds are taken at once: ``max_concurrent`` posting, as many queued
        # behind them; more are taken once a round has ended, so that one round trip deletes
        # those answered and takes the next ones (one per round, not one per delivery). A
        # failing endpoint is probed with one at a time.
        cap, low = (1, 0) if self._failures else (2 * self.notify.max_concurrent,
                                                  self.notify.max_concurrent)
        free = cap - self._in_flight
        wait = self._paused_until - anyio.current_time()
        if self._in_flight and (self._in_flight > low or wait > 0 or self._gone):
            return MAX_NAP  # woken as each delivery ends
        done, self._done = self._done, []
        if self._gone:
            await outbox.deliveries_done(done)
            self.gave_up += await outbox.fail_deliveries(url, older_than=None, error=GONE)
            if self._idle is not None:
                self._idle.set()
            return MAX_NAP
        if wait > 0:
            await outbox.deliveries_done(done)
            return wait
        taken = await outbox.take_deliveries(url, free, owner=self.owner,
                                             lease=self.notify.lease, done=done)
        for delivery in taken:
            self._in_flight += 1
            self._leased.add(delivery.id)
            posters.send_nowait(delivery)
        if self._in_flight:
            return MAX_NAP  # the next to end wakes this loop, which looks again
        due = await outbox.next_delivery(url)
        if self._idle is not None and not self._done and (
                due is None or await outbox.next_delivery(url, held=False) is None):
            # Flushing, and nothing left that is ours to send: what others hold is theirs.
            self._idle.set()
        if due is None:
            return MAX_NAP
        return max(min(due, MAX_NAP), 0.0 if taken else MIN_NAP)

    async def _poster(self, deliveries: MemoryObjectReceiveStream[Delivery]) -> None:
        """One of ``max_concurrent`` tasks posting what the loop takes (no task per delivery)."""
        async for delivery in deliveries:
            await self._deliver(delivery)

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            if self._gone:
                # Taken in the same round as the delivery that met the 410, and queued behind
                # it: never posted. The loop marks it failed with every pending one.
                self._leased.discard(delivery.id)
                return
            status, retry_after, error = await self._post(delivery)
            await self._settle(delivery, status, retry_after, error)
            self._leased.discard(delivery.id)
        except LedgerError as exc:
            # Its lease runs out and it is sent again: at least once, never lost.
            _log.warning("notify.ledger_failed", key=delivery.key, webhook_id=delivery.id,
                         error=str(exc))
        finally:
            self._in_flight -= 1
            self._kick.set()

    async def _post(self, delivery: Delivery) -> tuple[int | None, float | None, str | None]:
        """One attempt: the status, the Retry-After, or why no answer came."""
        session = self._session
        assert session is not None
        headers = signed_headers(self._key, delivery.id, delivery.body)
        try:
            async with session.post(self._url, data=delivery.body, headers=headers,
                                    allow_redirects=False) as answer:
                await answer.read()
                status = answer.status
                return status, None if status < 300 else parse_retry_after(answer.headers), None
        except TimeoutError:
            return None, None, f"no answer within {self.notify.timeout:g} s"
        except aiohttp.ClientConnectorError as exc:
            return None, None, f"cannot connect: {exc.os_error.strerror or exc.os_error}"
        except aiohttp.ServerDisconnectedError:
            return None, None, "the receiver closed the connection without answering"
        except aiohttp.ClientError as exc:
            # The class only: some aiohttp messages quote the URL, which may hold a token.
            return None, None, f"request failed ({type(exc).__name__})"

    async def _settle(self, delivery: Delivery, status: int | None,
                      retry_after: float | None, error: str | None) -> None:
        notify, outbox = self.notify, self.outbox
        attempt = delivery.attempts + 1
        if status is not None and 200 <= status < 300:
            self._done.append(delivery.id)
            self.delivered += 1
            if self._failures or not self._answered:
                # The endpoint works (again, or for this sender's first time: a restart): what
                # waits for a retry goes now, not when its backoff ends.
                self._failures = 0
                self._answered = True
                await outbox.deliver_now(notify.url)
            if _log.enabled(logging.DEBUG):
                _log.debug("notify.delivered", key=delivery.key, webhook_id=delivery.id,
                           endpoint=self._endpoint, attempt=attempt, status_code=status)
            return
        fields: dict[str, Any] = dict(key=delivery.key, webhook_id=delivery.id,
                                      endpoint=self._endpoint, attempt=attempt)
        if status == 410:
            self._gone = True
            self.gave_up += 1
            await outbox.delivery_failed(delivery.id, owner=self.owner, retry_in=None,
                                         error=GONE, http_status=410)
            _log.warning("notify.endpoint_gone", **fields)
            return
        error = error or f"HTTP {status}"
        self.failed_attempts += 1
        now = anyio.current_time()
        if now >= self._paused_until:
            # The first failure since the endpoint was last tried (attempts in flight together
            # fail together: one round, one step of the endpoint's backoff).
            self._failures += 1
            pause = retry_after if retry_after is not None else self._backoff(self._failures)
            self._paused_until = now + max(pause, 0.0)
        elif retry_after is not None:
            self._paused_until = max(self._paused_until, now + retry_after)
        left = notify.give_up_after - delivery.age
        if retry_after is not None:
            delay = retry_after
        elif status in ENDPOINT_DOWN:
            # The endpoint failed, not this notification: it is due again with the endpoint's
            # next probe, so that a receiver that comes back gets the backlog at once.
            delay = max(self._paused_until - now, 0.0)
        else:
            delay = self._backoff(attempt)
        if left <= 0:
            self.gave_up += 1
            await outbox.delivery_failed(
                delivery.id, owner=self.owner, retry_in=None, http_status=status,
                error=f"gave up after {attempt} attempts and {notify.give_up_after:g} s: {error}")
            _log.warning("notify.gave_up", status_code=status, error=error, **fields)
        else:
            delay = min(max(delay, 0.0), left)
            await outbox.delivery_failed(delivery.id, owner=self.owner, retry_in=delay,
                                         error=error, http_status=status)
            _log.info("notify.retry", status_code=status, error=error, delay=round(delay, 3),
                      **fields)
        # Those that waited their whole time behind a failing endpoint: failed, not dropped.
        expired = await outbox.fail_deliveries(
            notify.url, older_than=notify.give_up_after,
            error=f"gave up after {notify.give_up_after:g} s: the endpoint kept failing ({error})")
        if expired:
            self.gave_up += expired
            _log.warning("notify.gave_up", endpoint=self._endpoint, count=expired, error=error)

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter (half to all of it), so retries spread out."""
        notify = self.notify
        base = min(notify.backoff * 2.0 ** min(attempt - 1, 62), notify.max_backoff)
        return base * random.uniform(0.5, 1.0)
