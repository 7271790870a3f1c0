"""What a create asks for: its body, checked as the Responses API checks it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: Request fields a response echoes back when the request set them.
_ECHOED = ("background_options", "include", "instructions", "max_tool_calls", "reasoning",
           "text", "tools")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is answered 400, and the parameter at fault."""

    message: str
    param: str | None = None
    code: str | None = None
    stream_refused: bool = False  # the server's refusal to stream a background response


@dataclass(frozen=True, slots=True)
class CreateRequest:
    model: str
    background: bool
    stream: bool
    store: bool
    metadata: dict[str, Any]
    input_text: str
    max_output_tokens: int | None
    echo: dict[str, Any]  # what the response object repeats of the request


def parse_create(body: bytes, *, refuse_background_stream: bool) -> CreateRequest | Rejection:
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        return Rejection("We could not parse the JSON body of your request.")
    if not isinstance(req, dict):
        return Rejection("The request body must be a JSON object.")
    model = req.get("model")
    if not isinstance(model, str) or not model:
        return Rejection("Missing required parameter: 'model'.", "model",
                         "missing_required_parameter")
    background = bool(req.get("background"))
    if background and req.get("stream") and refuse_background_stream:
        return Rejection("Streaming is not supported for background responses on this server.",
                         "stream", "unsupported_parameter", stream_refused=True)
    if background and req.get("store") is False:
        return Rejection("Background responses require store=true.", "store", "invalid_value")
    metadata = req.get("metadata") or {}
    if not isinstance(metadata, dict):
        return Rejection("Invalid type for 'metadata': expected an object.", "metadata")
    cap = req.get("max_output_tokens")
    if cap is not None and (type(cap) is not int or cap < 1):
        return Rejection("max_output_tokens must be an integer >= 1.", "max_output_tokens",
                         "invalid_value")
    return CreateRequest(
        model=model,
        background=background,
        stream=bool(req.get("stream")),
        store=req.get("store", True) is not False,
        metadata=metadata,
        input_text=_text(req.get("input")),
        max_output_tokens=cap,
        echo={"service_tier": _tier(req.get("service_tier")),
              **{k: req[k] for k in _ECHOED if k in req}},
    )


def _text(value: object) -> str:
    """The request's ``input`` as text (a structured input as its JSON)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value)


def _tier(requested: object) -> str:
    """The tier that served the request: ``auto`` and unknown tiers run on ``default``."""
    return requested if requested == "flex" or requested == "priority" else "default"
