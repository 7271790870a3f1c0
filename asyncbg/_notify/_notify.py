"""Outbound webhooks: a signed notification for every job outcome, kept until it is delivered.

``BackgroundManager(client, journal=..., notify=Notify(url, secret=...))`` writes, with every
terminal outcome it records, a notification into the ledger's outbox, in the same transaction
(:class:`Notices` builds it); a sender task (:mod:`asyncbg._notify.send`) posts it, signed the
Standard Webhooks way (:mod:`asyncbg._notify.sign`), and deletes it only after a 2xx. Failures are
retried with exponential backoff and jitter, a ``Retry-After`` is honoured, a 410 stops
deliveries to the endpoint, and what cannot be delivered within ``give_up_after`` is marked
failed: shown by ``asyncbg status``, sent again by ``asyncbg notify --retry-failed``. A process
that dies leaves its notifications pending: the next manager, run or worker notifying the same
URL (or ``asyncbg notify``) sends them.

The body::

    {"type": "job.completed" | "job.failed" | "job.cancelled" | "job.incomplete",
     "timestamp": "2025-01-01T12:00:00.000000Z",
     "data": {"key", "custom_id", "response_id", "status", "error": {"code", "message"} | null,
              "created_at", "completed_at", "usage", "cost", ["result"]}}

``created_at`` and ``completed_at`` are the response's (Unix seconds); ``completed_at`` falls back
to when the outcome was recorded. ``result`` (the final Response JSON) is there only with
``include_result=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .._engine._meter import Meter
from .._ledgers._base import Outcome
from .._ledgers._outbox import Notice
from .sign import secret_key

__all__ = ["Notices", "Notify", "endpoint"]

#: The metadata key holding a Batch API line's custom_id (see asyncbg/_fleet.py).
CUSTOM_ID = "asyncbg_custom_id"


@dataclass(frozen=True, slots=True)
class Notify:
    """Where and how to post a signed webhook for every job outcome (see the module docstring).

    ``secret`` is a ``whsec_...`` secret the receiver shares (``asyncbg.testing.new_secret()``
    makes one); it signs every delivery and is never logged. ``timeout`` bounds one attempt,
    ``max_concurrent`` the attempts in flight (and connections), so that a slow receiver never
    slows the jobs. Retries wait ``backoff`` seconds, doubling up to ``max_backoff``, with
    jitter; after ``give_up_after`` seconds a notification is marked failed. Leaving the
    manager waits up to ``wait_on_exit`` seconds for the pending ones; the rest stay in the
    ledger for the next run.
    """

    url: str
    _: KW_ONLY
    secret: str = field(repr=False)
    include_result: bool = False
    timeout: float = 10.0
    max_concurrent: int = 8
    give_up_after: float = 86400.0
    backoff: float = 1.0
    max_backoff: float = 600.0
    wait_on_exit: float = 60.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Notify needs an http:// or https:// URL, not {endpoint(self.url)!r}")
        secret_key(self.secret)
        for name in ("timeout", "give_up_after", "backoff", "max_backoff"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Notify.{name} must be a positive number of seconds, "
                                 f"got {value!r}")
        if not self.wait_on_exit >= 0:
            raise ValueError(f"Notify.wait_on_exit must be >= 0 seconds, got "
                             f"{self.wait_on_exit!r}")
        if self.max_concurrent < 1:
            raise ValueError(f"Notify.max_concurrent must be >= 1, got {self.max_concurrent!r}")

    @property
    def lease(self) -> float:
        """Seconds a sender holds a delivery it takes: queued behind one attempt, its own
        attempt, and room to record it."""
        return 2 * self.timeout + 5.0


class Notices:
    """Builds the notification of each terminal outcome, to be written with it."""

    __slots__ = ("meter", "notify", "written")

    def __init__(self, notify: Notify, meter: Meter,
                 written: Callable[[], object] = lambda: None) -> None:
        self.notify = notify
        self.meter = meter
        #: Called once a notification is committed (wakes the sender).
        self.written = written

    def attach(self, key: str, params: Mapping[str, Any] | None, outcome: Outcome,
               body: bytes | None) -> Outcome:
        """``outcome`` with its notification; ``body`` is the server's final answer, if any
        (the outcome may not carry it: ``journal_bodies=False``)."""
        return dataclasses.replace(outcome, notification=self.notice(key, params, outcome, body))

    def notice(self, key: str, params: Mapping[str, Any] | None, outcome: Outcome,
               body: bytes | None) -> Notice:
        now = time.time()
        body = body if body is not None else outcome.body
        response = _object(body)
        usage, cost = self.meter.price(params, body) if response else (None, None)
        error = None
        if outcome.error is not None or outcome.error_code is not None:
            error = {"code": outcome.error_code, "message": outcome.error}
        metadata = (params or {}).get("metadata")
        custom_id = metadata.get(CUSTOM_ID) if isinstance(metadata, Mapping) else None
        data: dict[str, Any] = {
            "key": key,
            "custom_id": custom_id if isinstance(custom_id, str) else key,
            "response_id": outcome.response_id,
            "status": outcome.status,
            "error": error,
            "created_at": response.get("created_at"),
            "completed_at": response.get("completed_at") or int(now),
            "usage": usage,
            "cost": cost,
        }
        if self.notify.include_result:
            data["result"] = response or None
        payload = {
            "type": f"job.{outcome.status}",
            "timestamp": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "data": data,
        }
        return Notice(webhook_id(key, outcome.response_id, outcome.status, now),
                      self.notify.url, json.dumps(payload, separators=(",", ":")).encode())


def webhook_id(key: str, response_id: str | None, status: str, now: float) -> str:
    """Unique per job outcome. A server's outcome is one per (key, response id): a rerun serves
    it from the journal and writes nothing. One without a response id (it never reached the
    server) may happen again to the same key in a later run, so its time is part of it."""
    parts = [key, response_id or f"local@{now!r}", status]
    return "msg_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def endpoint(url: str) -> str:
    """``url`` as logs show it: no user, password, query or fragment (they may hold tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _object(body: bytes | None) -> dict[str, Any]:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
