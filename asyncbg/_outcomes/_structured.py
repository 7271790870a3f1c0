"""Structured outputs: the request a ``text_format`` model asks for, and the answer checked.

``text_format`` is the SDK's own ``responses.parse`` argument: the request carries the strict
json_schema ``text.format`` the SDK builds from the model, and the answer's text is parsed into
an instance of it. ``validate(response)`` is any other check; it raises to reject the answer.
An answer that does not parse or validate is ``invalid``: the job stays completed (the server
completed it, and it was paid for), with the reason in ``job.invalid``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Checks", "output_text", "with_text_format"]


def with_text_format(params: Mapping[str, Any], text_format: type[Any]) -> dict[str, Any]:
    """``params`` with the ``text.format`` that ``responses.parse(text_format=...)`` sends."""
    from openai.lib._parsing._responses import type_to_text_format_param

    text = dict(params.get("text") or {})
    text["format"] = type_to_text_format_param(text_format)
    return {**params, "text": text}


def output_text(body: bytes | None) -> str:
    """The answer's text: every ``output_text`` part of an OpenAI Response, or every ``text``
    block of an Anthropic message, joined."""
    if body is None:
        return ""
    data = json.loads(body)
    if not isinstance(data, dict):
        return ""
    parts: list[str] = []
    for item in data.get("output") or ():
        if isinstance(item, dict) and item.get("type") == "message":
            parts.extend(c.get("text", "") for c in item.get("content") or ()
                         if isinstance(c, dict) and c.get("type") == "output_text")
    for block in data.get("content") or ():  # an Anthropic message
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
    return "".join(parts)


class Checks:
    """What makes a completed answer usable: parsed into ``text_format``, accepted by
    ``validate``."""

    __slots__ = ("text_format", "validate")

    def __init__(self, *, text_format: type[Any] | None,
                 validate: Callable[[Any], object] | None) -> None:
        self.text_format = text_format
        self.validate = validate

    def parse(self, body: bytes | None) -> Any:
        """The answer as an instance of ``text_format``; raises ``ValueError`` (pydantic's
        ``ValidationError`` is one) when it does not parse."""
        assert self.text_format is not None
        return self.text_format.model_validate_json(output_text(body))

    def judge(self, body: bytes | None, response: Any) -> str | None:
        """Why a completed answer is not usable, or None when it is."""
        if self.text_format is not None:
            try:
                self.parse(body)
            except ValueError as exc:
                return f"the answer does not parse as {self.text_format.__name__}: " + \
                    _parse_error(exc)
        if self.validate is not None:
            try:
                self.validate(response)
            except Exception as exc:  # noqa: BLE001 - the user's check rejected the answer
                return f"validate rejected the answer: {type(exc).__name__}: {_first_line(exc)}"
        return None


def _parse_error(exc: ValueError) -> str:
    """Pydantic's first error, where and what (``answer: Field required``), or the first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "the answer"
        return f"{where}: {first.get('msg', exc)}"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
