"""Prices (genai-prices, overrides, dated names, discounts), usage of three providers, estimates."""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Iterator
from decimal import Decimal

import pytest
from genai_prices import data_snapshot
from genai_prices.types import (
    ClauseEquals,
    ClauseStartsWith,
    ModelInfo,
    ModelPrice,
    PriceVariant,
    Provider,
)
from openai.types.responses import ResponseUsage

from asyncbg._spend import _pricing
from asyncbg._spend._pricing import Price, PriceBook
from asyncbg._spend._tokens import (
    DEFAULT_OUTPUT_TOKENS,
    MEDIA_TOKENS,
    REASONING_TOKENS,
    Tokens,
    estimate_tokens,
    usage_tokens,
)

#: 10,000 input tokens of which 4,000 cached; 2,000 output tokens of which 1,500 reasoning.
USAGE = {
    "input_tokens": 10_000, "input_tokens_details": {"cached_tokens": 4_000},
    "output_tokens": 2_000, "output_tokens_details": {"reasoning_tokens": 1_500},
    "total_tokens": 12_000,
}
M = 1_000_000


def test_the_token_helpers_are_reexported() -> None:
    assert (_pricing.Tokens, _pricing.estimate_tokens, _pricing.usage_tokens) == (
        Tokens, estimate_tokens, usage_tokens)


# ---------------------------------------------------------------------------------- Price
def test_price_is_a_frozen_slotted_hashable_value() -> None:
    price = Price(input=1.25, output=10.0, cached_input=0.125)
    assert price == Price(1.25, 10.0, 0.125)
    assert len({price, Price(1.25, 10.0, 0.125)}) == 1
    assert not hasattr(price, "__dict__")
    with pytest.raises(AttributeError):
        price.input = 2.0  # type: ignore[misc]
    assert Price(1, 2).cached_input is None


@pytest.mark.parametrize("bad", [-0.01, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("field", ["input", "output", "cached_input", "cache_write"])
def test_price_rejects_negative_or_non_finite(field: str, bad: float) -> None:
    kwargs: dict[str, float] = {"input": 1.0, "output": 1.0, field: bad}
    with pytest.raises(ValueError, match=field):
        Price(**kwargs)


@pytest.mark.parametrize("bad", [True, "1.0", None])
def test_price_rejects_non_numbers(bad: object) -> None:
    with pytest.raises(TypeError, match="input"):
        Price(input=bad, output=1.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- the dataset
@pytest.mark.parametrize(("model", "price"), [
    # published prices, US dollars per million tokens
    ("gpt-5.2", Price(input=1.75, output=14.0, cached_input=0.175)),
    ("o3", Price(input=2.0, output=8.0, cached_input=0.5)),
    ("claude-sonnet-4-5", Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)),
    ("gemini-2.5-pro", Price(input=1.25, output=10.0, cached_input=0.125)),
    ("gemini-2.5-flash", Price(input=0.3, output=2.5, cached_input=0.03)),
])
def test_real_models_are_priced_from_the_dataset(model: str, price: Price) -> None:
    assert PriceBook().price(model) == price


@pytest.mark.parametrize(("model", "alias"), [
    ("gpt-5.2-2025-12-11", "gpt-5.2"),  # a snapshot the dataset lists
    ("gpt-5.2-20251211", "gpt-5.2"),  # compact date, normalised by the dataset
    ("gpt-5.2-2026-01-15", "gpt-5.2"),  # a snapshot the dataset does not list: its alias
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("models/gemini-2.5-flash", "gemini-2.5-flash"),  # a name as Gemini's API writes it
    ("GPT-5.2", "gpt-5.2"),
])
def test_dated_and_decorated_names(model: str, alias: str) -> None:
    book = PriceBook()
    assert book.price(model) is not None
    assert book.price(model) == book.price(alias)


def test_a_snapshot_with_its_own_price_keeps_it() -> None:
    book = PriceBook()
    assert book.price("gpt-4o-2024-05-13") == Price(input=5.0, output=15.0)
    assert book.price("gpt-4o") == Price(input=2.5, output=10.0, cached_input=1.25)


def test_the_dataset_is_bundled_and_read_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("genai-prices tried to use the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    data_snapshot._bundled_snapshot.cache_clear()
    assert data_snapshot.get_snapshot().from_auto_update is False
    assert PriceBook().price("gpt-5.2") == Price(1.75, 14.0, 0.175)


# ---------------------------------------------------------------------------------- overrides
def test_overrides_come_first_and_price_unknown_models() -> None:
    mine = Price(input=1.25, cached_input=0.125, output=10.0)
    book = PriceBook({"my-model": mine, "gpt-5.2": Price(input=1.0, output=2.0)})
    assert book.price("my-model") == mine
    assert book.price("my-model-2026-01-01") == mine  # the API echoes dated names
    assert book.price("gpt-5.2") == Price(input=1.0, output=2.0)
    assert book.price("gpt-5.2-2025-12-11") == Price(input=1.0, output=2.0)
    assert book.price("o3") == Price(input=2.0, output=8.0, cached_input=0.5)  # untouched


def test_overrides_must_be_prices() -> None:
    with pytest.raises(TypeError, match=r"asyncbg\.Price"):
        PriceBook({"m": (1.0, 2.0)})  # type: ignore[dict-item]


# ---------------------------------------------------------------------------------- arithmetic
def test_cached_tokens_priced_as_cached_and_reasoning_as_output() -> None:
    book = PriceBook()
    # gpt-5.2: 6,000 plain input x $1.75 + 4,000 cached x $0.175 + 2,000 output x $14
    expected = (6_000 * 1.75 + 4_000 * 0.175 + 2_000 * 14.0) / M
    assert expected == pytest.approx(0.0392)
    assert book.cost("gpt-5.2", USAGE) == pytest.approx(expected)
    # reasoning tokens are already among the output tokens: counted once
    no_reasoning = {**USAGE, "output_tokens_details": {"reasoning_tokens": 0}}
    assert book.cost("gpt-5.2", no_reasoning) == pytest.approx(expected)


def test_cached_input_falls_back_to_the_input_price() -> None:
    book = PriceBook({"plain": Price(input=2.0, output=4.0)})
    assert book.cost("plain", USAGE) == pytest.approx((10_000 * 2.0 + 2_000 * 4.0) / M)


def test_the_openai_usage_object_is_accepted() -> None:
    details = {"cached_tokens": 4_000, "cache_write_tokens": 0}
    usage = ResponseUsage.model_validate({**USAGE, "input_tokens_details": details})
    assert PriceBook().cost("gpt-5.2", usage) == pytest.approx(0.0392)
    assert usage_tokens(usage) == Tokens(10_000, 4_000, 2_000, 1_500)


def test_openai_cache_writes_are_priced_as_such() -> None:
    usage = {**USAGE, "input_tokens_details": {"cached_tokens": 4_000, "cache_write_tokens": 1_000}}
    assert usage_tokens(usage) == Tokens(10_000, 4_000, 2_000, 1_500, 1_000)
    book = PriceBook({"w": Price(input=2.0, output=8.0, cached_input=0.2, cache_write=2.5),
                      "v": Price(input=2.0, output=8.0, cached_input=0.2)})
    assert book.cost("w", usage) == pytest.approx(
        (5_000 * 2.0 + 4_000 * 0.2 + 1_000 * 2.5 + 2_000 * 8.0) / M)
    assert book.cost("v", usage) == pytest.approx(  # no cache-write price: the input price
        (6_000 * 2.0 + 4_000 * 0.2 + 2_000 * 8.0) / M)


def test_anthropic_usage() -> None:
    usage = {"input_tokens": 100, "cache_read_input_tokens": 1_000,
             "cache_creation_input_tokens": 200, "output_tokens": 50}
    assert usage_tokens(usage) == Tokens(1_300, 1_000, 50, 0, 200)
    # claude-sonnet-4-5: $3 input, $0.30 cache reads, $3.75 cache writes, $15 output
    expected = (100 * 3.0 + 1_000 * 0.3 + 200 * 3.75 + 50 * 15.0) / M
    assert PriceBook().cost("claude-sonnet-4-5", usage) == pytest.approx(expected)


def test_gemini_usage_metadata() -> None:
    meta = {"promptTokenCount": 1_000, "cachedContentTokenCount": 400,
            "candidatesTokenCount": 200, "thoughtsTokenCount": 300, "totalTokenCount": 1_500}
    assert usage_tokens(meta) == Tokens(1_000, 400, 500, 300)
    assert usage_tokens({"usageMetadata": meta}) == Tokens(1_000, 400, 500, 300)
    # gemini-2.5-flash: $0.30 input, $0.03 cached, $2.50 output (thoughts included)
    expected = (600 * 0.3 + 400 * 0.03 + 500 * 2.5) / M
    assert PriceBook().cost("gemini-2.5-flash", meta) == pytest.approx(expected)


def test_other_usage_shapes() -> None:
    chat = {"prompt_tokens": 50, "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 10},
            "completion_tokens_details": {"reasoning_tokens": 5}}
    assert usage_tokens(chat) == Tokens(50, 10, 20, 5)
    assert usage_tokens({"input_tokens": 5, "output_tokens": 7, "input_tokens_details": None,
                         "output_tokens_details": None}) == Tokens(5, 0, 7, 0)
    assert usage_tokens({}) == Tokens(0, 0, 0, 0)
    assert usage_tokens(Tokens(1, 0, 1, 0)) == Tokens(1, 0, 1, 0)
    with pytest.raises(TypeError, match="mapping"):
        usage_tokens(42)


def test_long_context_tiers_reprice_every_token() -> None:
    book = PriceBook()
    small = {"input_tokens": 200_000, "output_tokens": 1_000}
    large = {"input_tokens": 200_001, "output_tokens": 1_000}
    # gemini-2.5-pro: $1.25 / $10 up to 200k prompt tokens, $2.50 / $15 above
    assert book.cost("gemini-2.5-pro", small) == pytest.approx((200_000 * 1.25 + 10_000) / M)
    assert book.cost("gemini-2.5-pro", large) == pytest.approx(
        (200_001 * 2.5 + 1_000 * 15.0) / M)


# ---------------------------------------------------------------------------------- discounts
def test_flex_window_and_batch_discounts() -> None:
    book = PriceBook()
    standard = book.cost("gpt-5.2", USAGE)
    assert standard is not None
    assert book.cost("gpt-5.2", USAGE, service_tier="default") == pytest.approx(standard)
    assert book.cost("gpt-5.2", USAGE, service_tier="auto") == pytest.approx(standard)
    assert book.cost("gpt-5.2", USAGE, service_tier="flex") == pytest.approx(standard * 0.5)
    assert book.cost("gpt-5.2", USAGE, completion_window="soonest") == pytest.approx(standard)
    assert book.cost("gpt-5.2", USAGE, completion_window="2h") == pytest.approx(standard * 0.7)
    assert book.cost("gpt-5.2", USAGE, completion_window="8h") == pytest.approx(standard * 0.6)
    assert book.cost("gpt-5.2", USAGE, batch=True) == pytest.approx(standard * 0.5)
    # the dataset's own priority price (twice standard for gpt-5.2)
    assert book.cost("gpt-5.2", USAGE, service_tier="priority") == pytest.approx(standard * 2)


def test_the_datasets_own_batch_price_beats_the_flat_factor() -> None:
    # o3 batch halves input and output but keeps cached input at $0.50 (flex halves it too)
    book = PriceBook()
    assert book.cost("o3", USAGE, batch=True) == pytest.approx(
        (6_000 * 1.0 + 4_000 * 0.5 + 2_000 * 4.0) / M)
    assert book.cost("o3", USAGE, service_tier="flex") == pytest.approx(
        (6_000 * 1.0 + 4_000 * 0.25 + 2_000 * 4.0) / M)


def test_the_flat_factor_where_the_dataset_has_no_price() -> None:
    book = PriceBook({"mine": Price(input=2.0, output=8.0, cached_input=0.5)})
    full = (6_000 * 2.0 + 4_000 * 0.5 + 2_000 * 8.0) / M
    assert book.cost("mine", USAGE) == pytest.approx(full)
    assert book.cost("mine", USAGE, service_tier="flex") == pytest.approx(full * 0.5)
    assert book.cost("mine", USAGE, batch=True) == pytest.approx(full * 0.5)
    assert book.cost("mine", USAGE, completion_window="8h") == pytest.approx(full * 0.6)
    assert book.cost("mine", USAGE, service_tier="priority") == pytest.approx(full)
    # windows require standard processing: never stacked on flex or batch
    assert book.cost("mine", USAGE, service_tier="flex",
                     completion_window="8h") == pytest.approx(full * 0.5)
    # gemini-2.5-pro has no flex price in the dataset: Gemini Flex is 50 %
    standard = book.cost("gemini-2.5-pro", USAGE)
    assert standard is not None
    assert book.cost("gemini-2.5-pro", USAGE, service_tier="flex") == pytest.approx(
        standard * 0.5)


@pytest.fixture
def acme() -> Iterator[None]:
    """A dataset with one model whose flex price is 30 % of standard, not 50 %."""
    model = ModelInfo(
        id="acme-1", match=ClauseEquals(equals="acme-1"),
        prices=ModelPrice(input_mtok=Decimal("10"), output_mtok=Decimal("20")),
        price_variants=[PriceVariant(when={"service_tier": "flex"},
                                     prices=ModelPrice(input_mtok=Decimal("3"),
                                                       output_mtok=Decimal("6")))])
    provider = Provider(id="acme", name="Acme", api_pattern="https://acme", models=[model],
                        model_match=ClauseStartsWith(starts_with="acme-"))
    data_snapshot.set_custom_snapshot(
        data_snapshot.DataSnapshot(providers=[provider], from_auto_update=False))
    try:
        yield
    finally:
        data_snapshot.set_custom_snapshot(None)


@pytest.mark.usefixtures("acme")
def test_a_dataset_flex_price_is_used_as_published() -> None:
    book = PriceBook()
    usage = {"input_tokens": 1_000, "output_tokens": 1_000}
    assert book.cost("acme-1", usage) == pytest.approx(30_000 / M)
    assert book.cost("acme-1", usage, service_tier="flex") == pytest.approx(9_000 / M)
    assert book.cost("acme-1", usage, batch=True) == pytest.approx(15_000 / M)  # no batch: 50 %


# ---------------------------------------------------------------------------------- unknown
def test_an_unknown_model_has_no_price_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook()
    with caplog.at_level(logging.WARNING, logger="asyncbg"):
        assert book.price("my-finetune") is None
        assert book.cost("my-finetune", USAGE) is None
        assert book.cost("my-finetune", USAGE, service_tier="flex") is None
        assert book.price("my-finetune") is None
        assert book.cost("another-one", USAGE) is None
        assert book.price("whisper-1") is None  # known, but not priced by the token
    events = [(r.asyncbg_event, r.asyncbg_context["model"])  # type: ignore[attr-defined]
              for r in caplog.records]
    assert events == [("price.unknown", "my-finetune"), ("price.unknown", "another-one"),
                      ("price.unknown", "whisper-1")]


# ---------------------------------------------------------------------------------- estimates
def test_estimate_tokens_from_a_string_input() -> None:
    params = {"model": "gpt-5.2", "input": "x" * 4_001, "instructions": "y" * 400}
    assert estimate_tokens(params) == (1_101, DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["medium"])


def test_estimate_tokens_from_messages_and_parts() -> None:
    params = {
        "model": "gpt-5.2",
        "input": [
            {"role": "developer", "content": "a" * 40},
            {"role": "user", "content": [
                {"type": "input_text", "text": "b" * 80},
                {"type": "input_image", "image_url": "https://example.invalid/x.png"},
                {"type": "input_file", "file_id": "file-1"},
            ]},
            {"type": "function_call", "name": "f", "arguments": "c" * 20, "call_id": "1"},
            {"type": "function_call_output", "call_id": "1", "output": "d" * 60},
            "e" * 4,
        ],
        "max_output_tokens": 500,
    }
    assert estimate_tokens(params) == ((40 + 80 + 20 + 60 + 4) // 4 + 2 * MEDIA_TOKENS, 500)


@pytest.mark.parametrize(("reasoning", "output"), [
    (None, DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["medium"]),
    ({"effort": "none"}, DEFAULT_OUTPUT_TOKENS),
    ({"effort": "low"}, DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["low"]),
    ({"effort": "high"}, DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["high"]),
    ({"effort": "xhigh"}, DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["xhigh"]),
    ({"summary": "auto"}, DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["medium"]),
    ({"effort": "unheard-of"}, DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["medium"]),
])
def test_estimate_output_by_reasoning_effort(reasoning: object, output: int) -> None:
    params: dict[str, object] = {"input": ""}
    if reasoning is not None:
        params["reasoning"] = reasoning
    assert estimate_tokens(params) == (0, output)


def test_max_output_tokens_is_the_output_estimate_when_valid() -> None:
    assert estimate_tokens({"input": "", "max_output_tokens": 123})[1] == 123
    for bad in (0, -5, True, "100", None):
        assert estimate_tokens({"input": "", "max_output_tokens": bad})[1] > 1_000


def test_estimate_tokens_tolerates_odd_inputs() -> None:
    assert estimate_tokens({}) == (0, DEFAULT_OUTPUT_TOKENS + REASONING_TOKENS["medium"])
    assert estimate_tokens({"input": [None, 3, {"content": None}], "instructions": None})[0] == 0


@pytest.fixture
def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread id of every load of the dataset, from a process where it was never loaded."""
    import threading

    loads: list[int] = []
    build = _pricing._build

    def counted() -> None:
        loads.append(threading.get_ident())
        build()

    monkeypatch.setattr(_pricing, "_build", counted)
    monkeypatch.setattr(_pricing._Dataset, "ready", False)
    return loads


@pytest.mark.anyio
async def test_preload_loads_the_dataset_once_off_the_event_loop(count_loads: list[int]) -> None:
    import threading

    import anyio

    async with anyio.create_task_group() as tg:
        for _ in range(5):  # many managers opening at once
            tg.start_soon(_pricing.preload)
    await _pricing.preload()
    assert len(count_loads) == 1
    assert count_loads[0] != threading.get_ident()  # a worker thread, not the event loop's
    book = PriceBook()
    assert book.cost("gpt-4o", USAGE) is not None  # the first lookup loads nothing more
    assert len(count_loads) == 1


def test_without_preload_the_first_lookup_loads_it_once(count_loads: list[int]) -> None:
    book = PriceBook()
    assert book.cost("gpt-4o", USAGE) is not None
    assert PriceBook().cost("gpt-4o-mini", USAGE) is not None
    assert len(count_loads) == 1
