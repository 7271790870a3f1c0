"""What each API is sent for a request's parameters, without importing any SDK.

The providers prepare every request through these functions, and ``asyncbg run`` uses the same
ones to tell, before it loads an SDK, whether a rerun has anything left to send: a journal's
record matches a line only if the digest of the prepared request does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["background_request", "batch_request", "plain"]


def background_request(params: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
    """A Responses API request in background mode: ``store`` on unless the caller set it, and
    ``stream`` only when asked for."""
    prepared = {**params, "background": True}
    prepared.setdefault("store", True)
    if stream:
        prepared.setdefault("stream", True)
    if not prepared.get("stream"):
        prepared.pop("stream", None)
    return prepared


def batch_request(params: Mapping[str, Any], *, api_name: str) -> dict[str, Any]:
    """One request of a batch, as plain JSON data (SDK models dumped), so it journals and
    digests the same whichever form the caller used. Batches cannot stream."""
    if params.get("stream"):
        raise ValueError(f"requests of the {api_name} cannot stream; drop stream=True")
    return {name: plain(value) for name, value in params.items()}


def plain(value: Any) -> Any:
    """``value`` with SDK models turned into plain JSON data, so requests journal and digest
    stably whichever form the caller used."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
