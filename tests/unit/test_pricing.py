"""Price table lookups and usage → cost arithmetic."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest

from tokyo_ia.accounting import FREE, Price, PriceSettings, PriceTable, shipped_prices, usage_cost

M = Decimal(1_000_000)


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


def test_shipped_table_covers_the_three_providers_and_is_sane() -> None:
    prices = shipped_prices()
    for model in (
        "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
        "text-embedding-3-small", "claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5",
        "claude-3-5-haiku", "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
        "gemini-embedding-001", "demo",
    ):  # fmt: skip
        assert model in prices, model
    for model, p in prices.items():
        assert p.cached_input <= p.input, model
        assert p.output >= 0 and p.input >= 0, model


def test_known_request_cost_is_the_table_arithmetic(table: PriceTable) -> None:
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 1000},
    }
    # gpt-4o-mini: input 0.15, cached 0.075, output 0.60 per million
    expected = (200 * Decimal("0.15") + 1000 * Decimal("0.075") + 300 * Decimal("0.60")) / M
    assert table.cost("gpt-4o-mini", usage) == expected
    assert table.cost("gpt-4o-mini", usage) == Decimal("0.000285")


def test_anthropic_cache_reads_and_writes_each_have_their_price(table: PriceTable) -> None:
    # As providers/anthropic_translate.convert_usage builds it: prompt includes reads and writes.
    usage = {
        "prompt_tokens": 100 + 2000 + 500,
        "completion_tokens": 50,
        "prompt_tokens_details": {"cached_tokens": 2000},
        "cache_read_input_tokens": 2000,
        "cache_creation_input_tokens": 500,
    }
    p = table.lookup("claude-sonnet-4-5-20250929")
    assert p == Price(Decimal("3"), Decimal("15"), Decimal("0.3"), Decimal("3.75"))
    expected = (100 * Decimal(3) + 2000 * Decimal("0.3") + 500 * Decimal("3.75") + 50 * Decimal(15)) / M
    assert table.cost("claude-sonnet-4-5-20250929", usage) == expected


def test_embeddings_usage_has_no_completion_tokens(table: PriceTable) -> None:
    usage = {"prompt_tokens": 5000, "total_tokens": 5000}
    assert table.cost("text-embedding-3-small", usage) == Decimal("0.0001")


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # an exact entry beats its prefix
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("gemini-2.5-flash-lite-preview-06-17", "gemini-2.5-flash-lite"),
        ("models/gemini-2.5-pro", "gemini-2.5-pro"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("demo-echo", "demo"),
    ],
)
def test_prefix_lookup_takes_the_longest_family(table: PriceTable, model: str, family: str) -> None:
    assert table.lookup(model) == shipped_prices()[family]


@pytest.mark.parametrize("model", ["o3x", "gpt-4oo", "llama-3-70b", "", "demonstration"])
def test_no_match_across_a_word_boundary(table: PriceTable, model: str) -> None:
    assert table.lookup(model) is None


def test_demo_costs_nothing(table: PriceTable) -> None:
    assert table.lookup("demo") == FREE
    assert table.cost("demo", {"prompt_tokens": 10**6, "completion_tokens": 10**6}) == 0


def test_unknown_model_costs_zero_and_warns_once(table: PriceTable, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tokyo_ia.accounting"):
        assert table.cost("mystery-model", {"prompt_tokens": 10}) == 0
        assert table.cost("mystery-model", {"prompt_tokens": 10}) == 0
    assert [r.getMessage() for r in caplog.records].count(
        "no price for model 'mystery-model'; its requests cost 0 - add it under prices:"
    ) == 1


def test_config_overrides_replace_and_extend() -> None:
    table = PriceTable.load(
        {
            "gpt-4o": PriceSettings(input=Decimal(1), output=Decimal(2)),
            "my-finetune": PriceSettings.model_validate({"input": "0.5", "output": 1, "cached_input": 0.25}),
        }
    )
    assert table.lookup("gpt-4o-2024-11-20") == Price(Decimal(1), Decimal(2), Decimal(1), Decimal(1))
    assert table.cost(
        "my-finetune-v2", {"prompt_tokens": 2_000_000, "prompt_tokens_details": {"cached_tokens": 10**6}}
    ) == (Decimal("0.5") + Decimal("0.25"))
    assert table.lookup("gpt-4o-mini") == shipped_prices()["gpt-4o-mini"]  # untouched


def test_price_settings_reject_unknown_keys_and_negatives() -> None:
    with pytest.raises(ValueError, match="extra"):
        PriceSettings.model_validate({"input": 1, "output": 1, "cache_read": 1})
    with pytest.raises(ValueError, match="greater than or equal"):
        PriceSettings.model_validate({"input": -1, "output": 1})


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"prompt_tokens": None, "completion_tokens": "7"},
        {"prompt_tokens": 10, "prompt_tokens_details": None},
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}},  # more cached than prompt
    ],
)
def test_odd_usage_never_goes_negative_or_raises(usage: dict[str, object]) -> None:
    price = Price(Decimal(1), Decimal(2), Decimal("0.5"), Decimal(3))
    assert usage_cost(price, usage) >= 0
