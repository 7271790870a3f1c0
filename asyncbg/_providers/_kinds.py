"""Which API a recorded job belongs to, read from the response id the journal holds.

Every ledger records each job's response id, and the ids are namespaced by the APIs themselves:
a background response is ``resp_...``; a job of a batch provider is ``<batch_id>#<custom_id>``
(see :mod:`._batching`), whose batch id is ``batch_...`` (OpenAI's Batch API), ``msgbatch_...``
(Anthropic's Message Batches) or ``batches/...`` (Gemini's Batch Mode). So the operator's
commands (``status``, ``cancel``) learn the provider and the batch of every live job from the
journal itself, with no schema change and for journals of every earlier version.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["PROVIDER_NAMES", "ProviderName", "batch_of", "provider_of", "window_of"]

ProviderName = Literal["openai", "openai-batch", "anthropic", "gemini"]
#: The names ``asyncbg run --provider`` takes, in its order.
PROVIDER_NAMES: tuple[ProviderName, ...] = ("openai", "openai-batch", "anthropic", "gemini")

#: Batch id prefixes, longest first (``msgbatch_`` before ``batch_`` would not matter, but
#: the order keeps the match unambiguous).
_PREFIXES: tuple[tuple[str, ProviderName], ...] = (
    ("msgbatch_", "anthropic"), ("batches/", "gemini"), ("batch_", "openai-batch"))
#: Seconds a batch may run before the API expires what is left of it: 24 hours for OpenAI and
#: Anthropic; Gemini's batches are expected within 24 hours and expire after 48.
_WINDOWS: dict[ProviderName, float] = {
    "openai-batch": 86_400.0, "anthropic": 86_400.0, "gemini": 172_800.0}


def batch_of(response_id: str | None) -> str | None:
    """The batch id of a batch provider's job (``<batch_id>#<custom_id>``), else None."""
    if not response_id:
        return None
    batch_id, sep, cid = response_id.rpartition("#")
    return batch_id if sep and batch_id and cid else None


def provider_of(response_id: str | None) -> ProviderName | None:
    """The API that ``response_id`` belongs to, or None when there is no id (nothing was
    accepted by a server yet) or a batch id of an API asyncbg does not know."""
    if not response_id:
        return None
    batch_id = batch_of(response_id)
    if batch_id is None:
        return "openai"  # a Responses id: resp_... (or whatever a compatible server uses)
    for prefix, name in _PREFIXES:
        if batch_id.startswith(prefix):
            return name
    return None


def window_of(provider: ProviderName) -> float | None:
    """Seconds after its creation when a batch of ``provider`` expires (None: no batches)."""
    return _WINDOWS.get(provider)
