"""Outbound webhooks on the command line: ``--notify URL`` for ``run`` and ``worker``, the
``asyncbg notify`` command, and the deliveries ``asyncbg status`` shows.

The secret comes from ``ASYNCBG_NOTIFY_SECRET`` only: a command line is visible to every user
of the machine (``ps``), and asyncbg never prints or logs it.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

import anyio

from .._ledgers import Ledger, LedgerError
from .._ledgers._outbox import Outbox
from ._deliveries import summary, summary_text
from ._ops import emit, open_ledger, say

if TYPE_CHECKING:  # the notifier loads when a command sends (`asyncbg status` does not)
    from .._notify._notify import Notify

__all__ = ["SECRET_ENV", "add_command", "add_options", "notify", "notify_option",
           "summary", "summary_row", "summary_text", "to_deliver"]

SECRET_ENV = "ASYNCBG_NOTIFY_SECRET"


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text}")
    return value


def _wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--notify-wait", type=_seconds, default=60.0, metavar="SECONDS",
                   help="before exiting, wait this long at most for pending notifications; "
                        "what is still pending stays in the ledger for the next run, worker "
                        "or `asyncbg notify` (default: 60)")


def add_options(p: argparse.ArgumentParser) -> None:
    """``--notify URL`` and ``--notify-wait SECONDS``, for ``run`` and ``worker``."""
    p.add_argument("--notify", metavar="URL",
                   help="POST a signed webhook (Standard Webhooks, secret from "
                        f"${SECRET_ENV}) to URL for every job that ends; kept in the ledger "
                        "until the receiver answers 2xx, retried with backoff")
    _wait_option(p)


def notify_option(args: argparse.Namespace) -> Notify | None:
    """The :class:`~asyncbg.Notify` of ``--notify``; ``ValueError`` saying what is wrong."""
    url = getattr(args, "notify", None)
    if not url:
        return None
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise ValueError(f"--notify needs the webhook secret in ${SECRET_ENV} "
                         "(a whsec_... secret the receiver shares)")
    from .._notify._notify import Notify

    return Notify(url, secret=secret, wait_on_exit=args.notify_wait)


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``asyncbg notify --ledger LEDGER [--retry-failed]``."""
    p = sub.add_parser(
        "notify", help="send the notifications still pending in a ledger",
        description="Send every webhook notification still pending in a run's journal or a "
                    "fleet's ledger, to the URL each was written for, signed with "
                    f"${SECRET_ENV}. Exit status 0 when none is left pending or failed, 1 "
                    "otherwise, 2 when the ledger or the secret cannot be used.")
    p.add_argument("--ledger", required=True, metavar="LEDGER",
                   help="a journal path, or a fleet's postgresql:// URL")
    p.add_argument("--retry-failed", action="store_true",
                   help="send the failed ones again too (given up on, or refused with 410)")
    _wait_option(p)
    from ._logging import LEVELS

    p.add_argument("--log-level", default="warning", choices=LEVELS,
                   help="lowest log level shown on stderr (default: warning)")
    p.add_argument("--log-json", action="store_true",
                   help="log one JSON object per line instead of readable text")


async def to_deliver(ledger: Ledger, args: argparse.Namespace) -> bool:
    """Whether a run with ``--notify URL`` has notifications to URL pending in ``ledger`` (a
    killed run's, say): a rerun with no line left to send must still run its sender."""
    url = getattr(args, "notify", None)
    if not url or not isinstance(ledger, Outbox):
        return False
    return any(d.state == "pending" and d.url == url for d in await ledger.deliveries())


async def summary_row(ledger: Ledger, location: object) -> tuple[str, str] | None:
    """The ``notifications`` row of ``asyncbg run``'s summary, when some are still pending or
    failed in ``ledger`` (named ``location`` in the command to run next); None otherwise, and
    when the ledger cannot say (the summary is not the place to fail a finished run)."""
    if not isinstance(ledger, Outbox):
        return None
    try:
        deliveries = await ledger.deliveries()
    except LedgerError:
        return None
    if not deliveries:
        return None
    pending = sum(d.state == "pending" for d in deliveries)
    failed = len(deliveries) - pending
    said = f"{pending} pending, {failed} failed"
    last = min((d for d in deliveries if d.error is not None), key=lambda d: d.age,
               default=None)
    if last is not None:
        said += f" (latest error: {last.error})"
    retry = " --retry-failed" if failed else ""
    return "notifications", f"{said}; send them with `asyncbg notify --ledger {location}{retry}`"


async def notify(args: argparse.Namespace) -> int:
    """``asyncbg notify``: deliver what is pending, for up to ``--notify-wait`` seconds."""
    from .._notify._notify import Notify
    from .._notify.send import Sender  # aiohttp: imported when asked for

    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        say(f"set ${SECRET_ENV} to the webhook secret the receiver shares; nothing was sent")
        return 2
    ledger = await open_ledger(args.ledger, exclusive=False)
    if ledger is None:
        return 2
    try:
        if not isinstance(ledger, Outbox):
            say(f"{ledger.location} keeps no notifications")
            return 2
        if args.retry_failed:
            again = await ledger.retry_failed_deliveries(None)
            say(f"{again} failed notification(s) made pending again")
        urls = sorted({d.url for d in await ledger.deliveries() if d.state == "pending"})
        senders = [Sender(Notify(url, secret=secret), ledger) for url in urls]
        deadline = anyio.current_time() + args.notify_wait
        async with anyio.create_task_group() as tg:
            for sender in senders:
                tg.start_soon(sender.run)
            for sender in senders:
                await sender.flush(max(deadline - anyio.current_time(), 0.0))
            tg.cancel_scope.cancel()
        left = summary(await ledger.deliveries())
    except LedgerError as exc:
        say(str(exc))
        return 2
    except ValueError as exc:  # a secret that is not one
        say(f"{SECRET_ENV}: {exc}")
        return 2
    finally:
        with anyio.CancelScope(shield=True):
            await ledger.close()
    delivered = sum(s.delivered for s in senders)
    emit(f"delivered {delivered} notification(s); {left['pending']} still pending, "
         f"{left['failed']} failed")
    if left["pending"] or left["failed"]:
        say(summary_text(left))
    return 1 if left["pending"] or left["failed"] else 0
