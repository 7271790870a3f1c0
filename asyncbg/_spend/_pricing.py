"""What a job costs: token prices from a maintained dataset, overrides, and discounts.

Prices come from `genai-prices <https://github.com/pydantic/genai-prices>`_, a price dataset
maintained by Pydantic for OpenAI, Anthropic, Google and some thirty other providers. Its data
ships inside the wheel (``genai_prices/data.py``), so lookups never touch the network; an
application that runs ``genai_prices.UpdatePrices`` gets fresher prices for models it has not
looked up yet. The dataset also knows each model's aliases and dated snapshots, long-context
price tiers, and its own flex, priority and batch prices, which asyncbg uses wherever it has them.

A lookup of the dataset costs tens of microseconds, so a :class:`PriceBook` resolves each model
(and each discount) once into plain floats; pricing a finished job is then a few multiplications.
Loading the dataset itself (importing genai-prices and building its snapshot) takes a few hundred
milliseconds, once per process: :func:`preload` does it in a worker thread, so that the event
loop does not stall at the first finished job; without it the first lookup loads it inline.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio.to_thread

from .. import _log
from ._tokens import Tokens, estimate_tokens, usage_tokens

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, ModelPrice

# Tokens, estimate_tokens and usage_tokens live in ._tokens and are re-exported here.
__all__ = ["Price", "PriceBook", "Tokens", "estimate_tokens", "preload", "usage_tokens"]

# Discounts applied where the dataset has no price of its own for the request's processing mode.
# Batch API: 50 % of standard (developers.openai.com/api/docs/guides/batch; Anthropic and Gemini
# batch pricing likewise). Flex: "priced at Batch API rates"
# (developers.openai.com/api/docs/guides/flex-processing; Gemini Flex is also 50 %).
BATCH_FACTOR = 0.5
FLEX_FACTOR = 0.5
# Background ``completion_window``: "2h" is 30 % and "8h" 40 % below Standard model token rates;
# "soonest" (the default) has no discount (developers.openai.com/api/docs/guides/background).
# The windows require Standard processing, so they are not combined with flex, priority or batch.
WINDOW_FACTORS: Mapping[str, float] = {"soonest": 1.0, "2h": 0.7, "8h": 0.6}

_STANDARD_TIERS = frozenset({None, "auto", "default"})
_DATE_SUFFIX = re.compile(r"[-@](?:\d{4}-\d{2}-\d{2}|\d{8})$")


class _Dataset:
    """Whether genai-prices' data is loaded in this process; loaded once, under a lock."""

    lock = threading.Lock()
    ready = False


def _build() -> None:
    """Import genai-prices and build its bundled snapshot: the slow part, a few hundred ms."""
    import genai_prices.types  # noqa: F401  (imported here so that later lookups are cheap)
    from genai_prices.data_snapshot import get_snapshot

    get_snapshot()


def _load() -> None:
    """Load the dataset unless it is loaded; threads that ask at once wait for one load."""
    if _Dataset.ready:
        return
    with _Dataset.lock:
        if not _Dataset.ready:
            _build()
            _Dataset.ready = True


async def preload() -> None:
    """Load the price dataset in a worker thread, once per process (idempotent, and safe to
    await from many tasks at once): afterwards no price lookup stalls the event loop."""
    if not _Dataset.ready:
        await anyio.to_thread.run_sync(_load)


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million tokens. ``cached_input`` and ``cache_write`` default to ``input``."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input", "cache_write"):
            value = getattr(self, name)
            if value is None and name in ("cached_input", "cache_write"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Price.{name} must be a number of dollars, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Price.{name} must be a finite number >= 0, got {value!r}")


class _Rates(NamedTuple):
    """Resolved dollars per token; ``tiers`` reprice all tokens once input exceeds their start."""

    base: tuple[float, float, float, float]  # input, cached input, cache write, output
    tiers: tuple[tuple[int, tuple[float, float, float, float]], ...] = ()

    def dollars(self, t: Tokens) -> float:
        rate = self.base
        if self.tiers:
            for start, tier in reversed(self.tiers):
                if t.input > start:
                    rate = tier
                    break
        plain = max(t.input - t.cached_input - t.cache_write, 0)
        return (plain * rate[0] + t.cached_input * rate[1] + t.cache_write * rate[2]
                + t.output * rate[3])


def _per_token(price: Price, factor: float = 1.0) -> tuple[float, float, float, float]:
    scale = factor / 1_000_000
    cached = price.input if price.cached_input is None else price.cached_input
    write = price.input if price.cache_write is None else price.cache_write
    return (price.input * scale, cached * scale, write * scale, price.output * scale)


def _dataset_price(model_price: ModelPrice, tier_start: int | None = None) -> Price | None:
    """The dataset's token prices at a long-context tier (``None``: below the first tier)."""
    from genai_prices.types import TieredPrices

    def at(key: str) -> float | None:
        value = getattr(model_price, key, None)
        if isinstance(value, TieredPrices):
            chosen = value.base
            for tier in value.tiers:
                if tier_start is not None and tier.start <= tier_start:
                    chosen = tier.price
            return float(chosen)
        return None if value is None else float(value)

    input_price = at("input_mtok")
    if input_price is None:
        return None  # not priced by the token (images, audio seconds, ...)
    return Price(input=input_price, output=at("output_mtok") or 0.0,
                 cached_input=at("cache_read_mtok"), cache_write=at("cache_write_mtok"))


def _has_variant(info: ModelInfo, context: Mapping[str, str], now: datetime) -> bool:
    return any(
        variant.when == context
        and (variant.constraint is None or variant.constraint.active(now))
        and any(v is not None for v in vars(variant.prices).values())
        for variant in info.price_variants or ()
    )


class PriceBook:
    """Token prices by model name: ``overrides`` first, then the genai-prices dataset."""

    __slots__ = ("_entries", "_overrides", "_rates")

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self._overrides: dict[str, Price] = dict(overrides or {})
        for name, price in self._overrides.items():
            if not isinstance(price, Price):
                raise TypeError(f"the price of {name!r} must be an asyncbg.Price, got {price!r}")
        self._entries: dict[str, Price | ModelInfo | None] = {}
        self._rates: dict[tuple[str, str | None, str | None, bool], _Rates | None] = {}

    def price(self, model: str) -> Price | None:
        """The standard price of ``model`` (below any long-context tier); None if unknown.

        An unknown model is logged once (``price.unknown``); its jobs have no cost.
        """
        entry = self._entry(model)
        if entry is None or isinstance(entry, Price):
            return entry
        return _dataset_price(entry.get_prices(datetime.now(UTC)))

    def cost(self, model: str, usage: Mapping[str, Any] | Tokens | Any, *,
             service_tier: str | None = None, completion_window: str | None = None,
             batch: bool = False) -> float | None:
        """US dollars for ``usage`` (a usage dict of OpenAI, Anthropic or Gemini, or Tokens).

        ``service_tier="flex"``, a background ``completion_window`` of "2h"/"8h" and ``batch``
        apply their discounts; None when the model has no known price.
        """
        key = (model, service_tier, completion_window, batch)
        try:
            rates = self._rates[key]
        except KeyError:
            rates = self._rates[key] = self._resolve(model, service_tier, completion_window, batch)
        if rates is None:
            return None
        return rates.dollars(usage if isinstance(usage, Tokens) else usage_tokens(usage))

    def _entry(self, model: str) -> Price | ModelInfo | None:
        try:
            return self._entries[model]
        except KeyError:
            entry = self._entries[model] = self._lookup(model)
            if entry is None:  # cached: one warning per model
                _log.warning("price.unknown", model=model,
                             hint="pass prices={model: asyncbg.Price(...)} to count its cost "
                                  "(asyncbg run: --price MODEL=INPUT,OUTPUT)")
        return entry

    def _lookup(self, model: str) -> Price | ModelInfo | None:
        # A name as the API echoes it may carry a path ("models/gemini-2.5-flash") or a snapshot
        # date the dataset does not list yet ("gpt-5.2-2026-01-15"): such a snapshot is priced
        # as its alias. The dataset's own matching (aliases, listed snapshots, compact dates
        # such as -20251211) is tried first, so a snapshot priced differently keeps its price.
        names = [model]
        for name in (model.rsplit("/", 1)[-1], _DATE_SUFFIX.sub("", model.rsplit("/", 1)[-1])):
            if name not in names:
                names.append(name)
        for name in names:
            if name in self._overrides:
                return self._overrides[name]
        _load()
        from genai_prices.data_snapshot import get_snapshot

        snapshot = get_snapshot()  # a snapshot set by genai_prices.UpdatePrices wins
        for name in names:
            try:
                _provider, info = snapshot.find_provider_model(name, None, None, None)
            except LookupError:
                continue
            if _dataset_price(info.get_prices(datetime.now(UTC))) is not None:
                return info
        return None

    def _resolve(self, model: str, service_tier: str | None, completion_window: str | None,
                 batch: bool) -> _Rates | None:
        entry = self._entry(model)
        if entry is None:
            return None
        context: dict[str, str] | None = None
        factor = fallback = 1.0
        if batch:
            context, fallback = {"processing": "batch"}, BATCH_FACTOR
        elif service_tier == "flex":
            context, fallback = {"service_tier": "flex"}, FLEX_FACTOR
        elif service_tier not in _STANDARD_TIERS:
            context, fallback = {"service_tier": str(service_tier)}, 1.0
        else:
            factor = WINDOW_FACTORS.get(completion_window or "soonest", 1.0)
        if isinstance(entry, Price):
            return _Rates(_per_token(entry, fallback if context else factor))
        now = datetime.now(UTC)
        if context is not None:
            if _has_variant(entry, context, now):
                model_price = entry.get_prices(now, context)
            else:
                model_price, factor = entry.get_prices(now), fallback
        else:
            model_price = entry.get_prices(now)
        base = _dataset_price(model_price)
        if base is None:
            return None
        starts = sorted({tier.start for key in ("input_mtok", "cache_read_mtok",
                                                "cache_write_mtok", "output_mtok")
                         for tier in getattr(getattr(model_price, key, None), "tiers", ())})
        tiers = tuple((s, _per_token(p, factor)) for s in starts
                      if (p := _dataset_price(model_price, s)) is not None)
        return _Rates(_per_token(base, factor), tiers)
