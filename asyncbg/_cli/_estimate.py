"""``asyncbg estimate FILE``: what a batch file would cost, each way it can run, sending nothing.

For each model of the file: the number of requests, their input tokens (counted with
``tiktoken`` when it is installed and knows the model's encoding; else estimated at four
characters a token of the request's text, as the budget does), their output tokens (each
request's own limit, ``max_output_tokens``, ``max_tokens`` or Gemini's ``maxOutputTokens``,
else asyncbg's default expectation for its reasoning effort), and the dollars of running them
as background responses (full price), with ``service_tier="flex"`` (OpenAI), and through the
provider's batch API, from the genai-prices dataset (:class:`~asyncbg._spend._pricing.PriceBook`).
Output limits are upper bounds, so the dollars are too, as far as the output goes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._spend._pricing import PriceBook
from .._spend._tokens import CHARS_PER_TOKEN, Tokens, estimate_tokens
from ._logging import configure_logging
from ._ops import emit, say
from ._progress import rows

__all__ = ["estimate"]

#: The ways a request can run, and whether the provider offers it.
WAYS = ("background", "flex", "batch")
#: Fields whose strings are not text the model reads (names, ids, settings).
_NOT_TEXT = frozenset({"model", "role", "type", "custom_id", "id", "service_tier",
                       "mime_type", "mimeType", "reasoning", "metadata"})


@dataclass(slots=True)
class _Model:
    """What the file asks of one model."""

    requests: int = 0
    input: int = 0
    output: int = 0
    dollars: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(WAYS, 0.0))


def _text_chars(value: Any) -> int:
    """Characters of the text a request carries (messages, contents, instructions, system)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_text_chars(v) for k, v in value.items() if k not in _NOT_TEXT)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0


def _output_limit(body: Mapping[str, Any]) -> int | None:
    config = body.get("config") if isinstance(body.get("config"), Mapping) else {}
    assert isinstance(config, Mapping)
    for value in (body.get("max_output_tokens"), body.get("max_tokens"),
                  config.get("max_output_tokens"), config.get("maxOutputTokens")):
        if type(value) is int and value > 0:
            return value
    return None


def _counter(model: str) -> tuple[Callable[[str], int] | None, str]:
    """A tokenizer for ``model`` and how input tokens are counted, in words for the table."""
    guess = f"estimated at {CHARS_PER_TOKEN} characters a token"
    try:
        import tiktoken  # type: ignore[import-not-found, unused-ignore] # optional
    except ImportError:
        return None, f"{guess}: tiktoken is not installed"
    try:
        encoding = tiktoken.encoding_for_model(model)
    except (KeyError, ValueError):
        return None, f"{guess}: tiktoken does not know {model}"
    except OSError as exc:  # its encodings are downloaded on first use
        return None, f"{guess}: tiktoken could not load its encoding ({exc})"
    return (lambda text: len(encoding.encode(text))), f"counted with tiktoken {encoding.name}"


def _strings(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return "\n".join(_strings(v) for k, v in value.items() if k not in _NOT_TEXT)
    if isinstance(value, list):
        return "\n".join(_strings(v) for v in value)
    return ""


def summarize(requests: list[tuple[str, Mapping[str, Any]]], provider: str,
              prices: PriceBook | None = None) -> dict[str, Any]:
    """The estimate of ``requests`` ((custom id, body) pairs) as ``estimate --json`` prints
    it: per model, and in total."""
    prices = prices or PriceBook()
    models: dict[str, _Model] = {}
    methods: dict[str, str] = {}
    counters: dict[str, Callable[[str], int] | None] = {}
    defaulted = 0
    for _cid, body in requests:
        model = str(body.get("model") or "unknown")
        m = models.setdefault(model, _Model())
        if model not in counters:
            counters[model], methods[model] = _counter(model)
        count = counters[model]
        tokens_in = (count(_strings(body)) if count is not None
                     else -(-_text_chars(body) // CHARS_PER_TOKEN))
        limit = _output_limit(body)
        if limit is None:
            defaulted += 1
            limit = estimate_tokens(body)[1]
        m.requests += 1
        m.input += tokens_in
        m.output += limit
        usage = Tokens(tokens_in, 0, limit, 0)
        ways = {"background": prices.cost(model, usage),
                "flex": (prices.cost(model, usage, service_tier="flex")
                         if provider in ("openai", "openai-batch") else None),
                "batch": prices.cost(model, usage, batch=True)}
        for way, dollars in ways.items():
            so_far = m.dollars[way]
            m.dollars[way] = None if dollars is None or so_far is None else so_far + dollars
    out: dict[str, Any] = {"provider": provider, "models": {}, "total": {}}
    for name, m in models.items():
        out["models"][name] = {"requests": m.requests, "input_tokens": m.input,
                               "input_counted_by": methods[name], "output_tokens": m.output,
                               "dollars": {w: _round(d) for w, d in m.dollars.items()}}
    out["output_defaulted"] = defaulted
    for way in WAYS:
        values = [m.dollars[way] for m in models.values() if m.dollars[way] is not None]
        out["total"][way] = _round(sum(v for v in values if v is not None)) if values else None
    out["unpriced"] = sorted(n for n, m in models.items() if m.dollars["background"] is None)
    return out


def _round(dollars: float | None) -> float | None:
    return None if dollars is None else round(dollars, 6)


def _money(dollars: float | None, way: str, provider: str) -> str:
    if dollars is not None:
        return f"${dollars:,.2f}"
    if way == "flex" and provider not in ("openai", "openai-batch"):
        return "n/a"
    return "no price"


def text(summary: Mapping[str, Any]) -> str:
    provider = summary["provider"]
    blocks = []
    for name, m in summary["models"].items():
        d = m["dollars"]
        blocks.append(rows([
            ("model", name),
            ("requests", f"{m['requests']:,}"),
            ("input", f"{m['input_tokens']:,} tokens ({m['input_counted_by']})"),
            ("output", f"{m['output_tokens']:,} tokens at most"),
            ("dollars", "  ".join(f"{way} {_money(d[way], way, provider)}" for way in WAYS)),
        ]))
    t = summary["total"]
    tail = [rows([("total", "  ".join(f"{way} {_money(t[way], way, provider)}"
                                      for way in WAYS))])]
    if summary["unpriced"]:
        tail.append(f"no known price for {', '.join(summary['unpriced'])}: not in the total")
    if summary["output_defaulted"]:
        tail.append(f"{summary['output_defaulted']} request(s) set no output limit: counted at "
                    "asyncbg's default expectation for their reasoning effort")
    tail.append("background: full price, in minutes; flex: about half, slower (OpenAI only); "
                "batch: half, within 24 hours. Nothing was sent.")
    return "\n\n".join(blocks) + "\n\n" + "\n".join(tail)


def estimate(args: argparse.Namespace) -> int:
    """``asyncbg estimate FILE [--provider P] [--json]``: sends nothing, needs no key."""
    configure_logging(level="error", json=False)  # an unknown price is said in the table
    summary = _estimate(Path(args.input), args, counted="counted")
    if summary is None:
        return 2
    emit(json.dumps(summary, indent=2) if args.json else text(summary))
    return 0


def dry_run(args: argparse.Namespace, source: Path) -> int:
    """``asyncbg run --dry-run``: the estimate of what the run would send, and with ``--by``
    the way its lines would start on; sends nothing (the input was checked already)."""
    from .._deadline._policy import Way
    from . import _by

    if (problem := _by.by_problem(args)) is not None:
        say(f"{problem}; nothing was sent")
        return 2
    summary = _estimate(source, args, counted="skipped")
    if summary is None:
        return 2
    out = text(summary)
    if getattr(args, "by", None) is not None:
        way = _by.POLICY.start(args.by_at - _by.CLOCK(), set(Way))
        dollars = summary["total"][way.value]
        out += (f"\n--by {args.by}: lines would start on {way.value} "
                f"({_money(dollars, way.value, args.provider)}); those still unfinished near "
                "the deadline move to a faster way")
    emit(out)
    return 0


def _estimate(source: Path, args: argparse.Namespace, *, counted: str) -> dict[str, Any] | None:
    """The file's estimate, or None after saying why it cannot be read (``counted``: what
    becomes of a bad line, in words)."""
    from ._formats import FORMATS
    from ._input import not_a_file

    fmt = FORMATS[args.provider]
    if (problem := not_a_file(source)) is not None:
        say(problem)
        return None
    try:
        index = fmt.index(source, args)
        requests = list(fmt.requests(source, args))
    except OSError as exc:
        say(f"{source} cannot be read: {exc.strerror or exc}")
        return None
    except ValueError as exc:  # a line that is not UTF-8: the message names FILE:LINE
        say(str(exc))
        return None
    for bad in index.bad:
        say(f"{source}:{bad.line}: {bad.reason}; line not {counted}")
    if not requests:
        say(f"no requests in {source}")
        return None
    return summarize([(r.custom_id, r.body) for r in requests], args.provider)
