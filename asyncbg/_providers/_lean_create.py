"""The body of a lean create: the JSON bytes ``responses.create`` would send, without the SDK.

Through the SDK, a create costs about 2 ms of client CPU before a byte is written: the typed
transform of every param (``async_maybe_transform`` walks the params against their TypedDicts),
the request options, httpx2's request. For params that are plain JSON (dicts with string keys,
lists, strings, numbers, booleans, ``None``), that transform changes nothing (the Responses
params have no aliases), so the body is the SDK's own field order, the fields it does not know
by name after them (its ``extra_body`` merge) and the SDK's encoder settings. Anything else (a
pydantic model, a date, a file object, ``openai.omit``, an enum, a tuple, a non-finite float)
gets ``None`` here, and the caller sends that create through the SDK.

The field order is asked of the SDK itself, once: ``AsyncResponses.create`` is called on a
stand-in whose ``_post`` records the body instead of sending it. If the SDK ever sends a create
somewhere else or with options of its own (headers, a query), the lean path turns itself off.
``tests/test_wire_create.py`` compares both requests on the wire over a corpus of real shapes.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from openai.resources.responses import AsyncResponses

__all__ = ["CREATE_PATH", "create_body", "sdk_field_order"]

_log = logging.getLogger("asyncbg")

#: Where the SDK posts a create, relative to the base URL.
CREATE_PATH: Final = "responses"
#: Values sent as they are by both the SDK's transform and its encoder (exact types only: a
#: ``str`` or ``int`` subclass, an enum say, may be encoded otherwise).
_SCALARS: Final = frozenset({str, int, bool, type(None)})
#: Keyword arguments of ``create`` that are request options, not body fields.
_OPTIONS: Final = frozenset({"self", "extra_headers", "extra_query", "extra_body", "timeout"})
#: Values looked at before giving up on a body (a cycle would otherwise never end; the SDK
#: then raises its own error for it).
_MAX_VALUES: Final = 1_000_000
#: What the SDK passes as request options for a create (checked once by the probe).
_EXPECTED_OPTIONS: Final = {"security": {"bearer_auth": True}}

_order: tuple[str, ...] | None = None
_probed = False


async def sdk_field_order() -> tuple[str, ...] | None:
    """The body fields ``responses.create`` knows by name, in the order it writes them; ``None``
    when the SDK does not post a create the way this module assumes (then no lean creates)."""
    global _order, _probed
    if not _probed:
        _probed = True
        _order = await _probe()
        if _order is None:
            _log.debug("asyncbg: lean creates are off: the SDK's create is not the expected one")
    return _order


async def _probe() -> tuple[str, ...] | None:
    names = [n for n in inspect.signature(AsyncResponses.create).parameters if n not in _OPTIONS]
    seen: dict[str, Any] = {}

    async def record(path: str, *, body: Any = None, options: Any = None, **_: Any) -> None:
        seen.update(path=path, body=body, options=options)

    stand_in: Any = AsyncResponses.__new__(AsyncResponses)
    stand_in._post = record
    # None is a given value for every field: the transform keeps it, so every name shows up.
    await stand_in.create(**dict.fromkeys(names))
    body = seen.get("body")
    if seen.get("path") != "/" + CREATE_PATH or seen.get("options") != _EXPECTED_OPTIONS:
        return None
    if not isinstance(body, dict) or set(body) != set(names):
        return None
    return tuple(name for name in body if name != "stream")


def create_body(params: Mapping[str, Any], order: Sequence[str]) -> bytes | None:
    """The bytes ``responses.create(**known, extra_body=rest)`` would send for ``params``, or
    ``None`` when only the SDK can say (a value that is not plain JSON, or a streamed create).

    ``order`` is :func:`sdk_field_order`'s answer: the fields in it go first, in its order; any
    other field follows in the order given, as the SDK's ``extra_body`` merge places it.
    """
    if params.get("stream"):
        return None
    known = set(order)
    body: dict[str, Any] = {name: params[name] for name in order if name in params}
    for name, value in params.items():
        if name not in known and name != "stream":
            body[name] = value
    if not _plain(body):
        return None
    try:
        # The SDK's openapi_dumps, whose JSONEncoder subclass only adds types refused above.
        return json.dumps(
            body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
    except ValueError:  # NaN or infinity: the SDK raises the same, let it say so
        return None


def _plain(value: object) -> bool:
    """Whether ``value`` is JSON made of dicts with ``str`` keys, lists and exact scalars."""
    stack = [value]
    budget = _MAX_VALUES
    while stack:
        budget -= 1
        if budget < 0:
            return False
        item = stack.pop()
        kind = type(item)
        if kind in _SCALARS or kind is float:
            continue
        if kind is dict:
            assert isinstance(item, dict)
            if any(type(key) is not str for key in item):
                return False
            stack.extend(item.values())
        elif kind is list:
            assert isinstance(item, list)
            stack.extend(item)
        else:
            return False
    return True
