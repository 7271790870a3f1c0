"""The escalation ladder: what the next attempt is, as a pure function of the outcomes so far.

Attempt 1 is the request as submitted. Attempt ``n`` (``n >= 2``) is that request with the
first ``n - 1`` steps applied in order (the last step repeats when ``max_attempts`` outruns
the steps), so ``[{"max_output_tokens": 8000}, {"model": "gpt-5.2"}]`` makes the third attempt
a bigger budget on a stronger model. A step that names a ``provider`` sends that attempt to
another provider. Because :func:`next_attempt` reads only the recorded outcomes, a rerun
replays the finished attempts from the journal and decides exactly as the first run did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._status import JobStatus

__all__ = ["KINDS", "Escalation", "attempt_key", "kind_of", "next_attempt"]

#: What an attempt's outcome can be, for ``Escalation(on=...)``. ``completed`` (usable),
#: ``cancelled`` (the user's cancel or deadline) and ``budget_exceeded`` never escalate.
KINDS = ("incomplete", "invalid", "server_error", "rate_limited", "failed")


@dataclass(frozen=True, slots=True, init=False)
class Escalation:
    """When an attempt ends in one of ``on``, try again with the next of ``steps``.

    ``steps`` are request fields to override (``{"max_output_tokens": 8000}``,
    ``{"model": "gpt-5.2"}``; ``{"provider": "anthropic", "model": ...}`` falls back to another
    provider); ``max_attempts`` counts the first attempt too (default: one per step, plus the
    first). Each attempt is a job of its own in the journal, under ``KEY``, ``KEY#2``, ...
    """

    on: tuple[str, ...]
    steps: tuple[Mapping[str, Any], ...]
    max_attempts: int

    def __init__(self, *, on: Sequence[str] = ("incomplete", "invalid", "server_error",
                                                "rate_limited"),
                 steps: Sequence[Mapping[str, Any]] = (), max_attempts: int | None = None) -> None:
        if isinstance(on, str):
            on = (on,)
        unknown = [k for k in on if k not in KINDS]
        if unknown:
            raise ValueError(f"Escalation(on=...) takes {', '.join(KINDS)}; got "
                             f"{', '.join(map(repr, unknown))}")
        for step in steps:
            if not isinstance(step, Mapping) or not step:
                raise ValueError(f"each Escalation step is a non-empty mapping of request "
                                 f"fields; got {step!r}")
        attempts = len(steps) + 1 if max_attempts is None else max_attempts
        if not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"Escalation(max_attempts=...) must be >= 1; got {max_attempts!r}")
        object.__setattr__(self, "on", tuple(on))
        object.__setattr__(self, "steps", tuple(dict(s) for s in steps))
        object.__setattr__(self, "max_attempts", attempts)

    @classmethod
    def from_json(cls, data: object, *, where: str) -> Escalation:
        """An escalation from its JSON form (``{"on": [...], "steps": [...],
        "max_attempts": 3}``); ``ValueError`` naming ``where`` when it is malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: an escalation is a JSON object with on, steps and "
                             "max_attempts")
        extra = set(data) - {"on", "steps", "max_attempts"}
        if extra:
            raise ValueError(f"{where}: unknown field {sorted(extra)[0]!r} (on, steps, "
                             "max_attempts)")
        try:
            if "on" in data:
                return cls(on=data["on"], steps=data.get("steps", ()),
                           max_attempts=data.get("max_attempts"))
            return cls(steps=data.get("steps", ()), max_attempts=data.get("max_attempts"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def params_for(self, params: Mapping[str, Any], attempt: int) -> dict[str, Any]:
        """The request of attempt number ``attempt`` (1 is ``params`` itself)."""
        merged = dict(params)
        for step in self.steps[:attempt - 1]:
            merged.update(step)
        if attempt - 1 > len(self.steps) and self.steps:
            merged.update(self.steps[-1])
        return merged


def next_attempt(escalation: Escalation | None, kinds: Sequence[str]) -> int | None:
    """The number of the attempt to send after attempts that ended as ``kinds`` (in order),
    or None when the last one is final. A pure function: a rerun decides as the run did."""
    if not kinds or escalation is None:
        return None if kinds else 1
    if kinds[-1] not in escalation.on or len(kinds) >= escalation.max_attempts:
        return None
    return len(kinds) + 1


def kind_of(status: JobStatus, error_code: str | None, invalid: str | None) -> str:
    """What an attempt's outcome is, in the words of ``Escalation(on=...)``."""
    if status is JobStatus.COMPLETED:
        return "invalid" if invalid is not None else "completed"
    if status is JobStatus.INCOMPLETE:
        return "incomplete"
    if status is JobStatus.CANCELLED:
        return "cancelled"
    if error_code in ("server_error", "rate_limited", "budget_exceeded"):
        return error_code
    if error_code == "rate_limit_exceeded":
        return "rate_limited"
    return "failed"


def attempt_key(key: str, attempt: int, *, hedge: bool = False) -> str:
    """The journal key of an attempt: ``KEY``, ``KEY#2``...; a hedge copy adds ``#hedge``."""
    base = key if attempt == 1 else f"{key}#{attempt}"
    return f"{base}#hedge" if hedge else base
