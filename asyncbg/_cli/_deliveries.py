"""Pending and failed webhook deliveries, as ``asyncbg status`` and ``asyncbg notify`` show them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._ledgers._outbox import Delivery

__all__ = ["summary", "summary_text"]


def summary(deliveries: Sequence[Delivery]) -> dict[str, Any]:
    """The deliveries, as ``asyncbg status --json`` shows them under ``notifications``."""
    if deliveries:  # the notifier's module (its engine's meter) loads only when there are some
        from .._notify._notify import endpoint

    def item(d: Delivery) -> dict[str, Any]:
        return {"key": d.key, "webhook_id": d.id, "endpoint": endpoint(d.url),
                "attempts": d.attempts, "age": round(d.age, 1), "error": d.error,
                "http_status": d.http_status}

    pending = [item(d) for d in deliveries if d.state == "pending"]
    failed = [item(d) for d in deliveries if d.state == "failed"]
    return {"pending": len(pending), "failed": len(failed), "pending_deliveries": pending,
            "failed_deliveries": failed}


def summary_text(notes: dict[str, Any], *, ledger: str = "LEDGER", limit: int = 10) -> str:
    """The deliveries as lines for ``asyncbg status``."""
    lines = [f"notifications: {notes['pending']} pending, {notes['failed']} failed"]
    for state in ("pending", "failed"):
        items = notes[f"{state}_deliveries"]
        for d in items[:limit]:
            why = f"  ({d['error']})" if d["error"] else ""
            lines.append(f"  {state:<7}  {d['key']}  {d['endpoint']}  "
                         f"attempts {d['attempts']}{why}")
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more {state}")
    if notes["pending"] or notes["failed"]:
        retry = " --retry-failed" if notes["failed"] else ""
        lines.append(f"send them with `asyncbg notify --ledger {ledger}{retry}`")
    return "\n".join(lines)
