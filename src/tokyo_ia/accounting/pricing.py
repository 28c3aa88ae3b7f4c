"""Prices per model and the cost of one request's usage.

The shipped table (``prices.yaml`` next to this module) is a dated snapshot of the providers'
public price pages; the config file's ``prices:`` section overrides or extends it, because
prices change more often than releases and negotiated rates differ from list prices.

Lookups are by *upstream* model name (what the provider bills), never the public alias: exact
name first, then the longest known name that prefixes it at a boundary, so dated snapshots
(``gpt-4o-mini-2024-07-18``, ``claude-sonnet-4-5-20250929``) find their family's price. A
``provider/`` or ``models/`` prefix is ignored. Money is :class:`~decimal.Decimal` so the spend
ledger adds up exactly; convert to ``float`` only for metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("tokyo_ia.accounting")

_MILLION = Decimal(1_000_000)
_ZERO = Decimal(0)
_BOUNDARY = frozenset("-@:._")
_MAX_CACHED_LOOKUPS = 4096  # model names come from config, but never let a cache grow unbounded


class PriceSettings(BaseModel):
    """One model's price in the config file, USD per million tokens.

    ``cached_input`` and ``cache_write`` default to the input price when left out.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    cache_write: Decimal | None = Field(None, ge=0)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens, every rate resolved (no ``None``)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal

    @classmethod
    def from_settings(cls, s: PriceSettings) -> Price:
        return cls(
            input=s.input,
            output=s.output,
            cached_input=s.input if s.cached_input is None else s.cached_input,
            cache_write=s.input if s.cache_write is None else s.cache_write,
        )


FREE = Price(_ZERO, _ZERO, _ZERO, _ZERO)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def usage_cost(price: Price, usage: Mapping[str, Any]) -> Decimal:
    """The cost of OpenAI-shaped usage at ``price``.

    ``prompt_tokens`` includes cache reads (``prompt_tokens_details.cached_tokens``) and, for
    Anthropic, cache writes (``cache_creation_input_tokens``); each part is billed at its own
    rate and only the remainder at the input price.
    """
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    written = _int(usage.get("cache_creation_input_tokens"))
    cached = min(cached, prompt)
    written = min(written, prompt - cached)
    fresh = prompt - cached - written
    total = (
        fresh * price.input
        + cached * price.cached_input
        + written * price.cache_write
        + completion * price.output
    )
    return total / _MILLION


class PriceTable:
    """Model name → :class:`Price`, with prefix lookup and a bounded memo of answers."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._exact = dict(prices)
        self._by_length = sorted(self._exact, key=len, reverse=True)
        self._memo: dict[str, Price | None] = {}
        self._warned: set[str] = set()

    @classmethod
    def load(cls, overrides: Mapping[str, PriceSettings] | None = None) -> PriceTable:
        """The shipped table with the config's ``prices:`` entries layered on top."""
        prices = shipped_prices()
        for model, settings in (overrides or {}).items():
            prices[model] = Price.from_settings(settings)
        return cls(prices)

    def lookup(self, model: str) -> Price | None:
        """The price for an upstream model name, or ``None`` if nothing in the table matches."""
        try:
            return self._memo[model]
        except KeyError:
            pass
        found = self._find(model)
        if found is None and "/" in model:
            found = self._find(model.rsplit("/", 1)[1])
        if len(self._memo) < _MAX_CACHED_LOOKUPS:
            self._memo[model] = found
        return found

    def _find(self, model: str) -> Price | None:
        price = self._exact.get(model)
        if price is not None:
            return price
        for known in self._by_length:
            if len(model) > len(known) and model.startswith(known) and model[len(known)] in _BOUNDARY:
                return self._exact[known]
        return None

    def cost(self, model: str, usage: Mapping[str, Any] | None) -> Decimal:
        """USD for one request; an unpriced model costs 0 and is logged once."""
        if not usage:
            return _ZERO
        price = self.lookup(model)
        if price is None:
            if model not in self._warned and len(self._warned) < _MAX_CACHED_LOOKUPS:
                self._warned.add(model)
                log.warning("no price for model %r; its requests cost 0 - add it under prices:", model)
            return _ZERO
        return usage_cost(price, usage)

    def __contains__(self, model: str) -> bool:
        return self.lookup(model) is not None


def shipped_prices() -> dict[str, Price]:
    """Parse the ``prices.yaml`` that ships with the package (fresh dict on each call)."""
    text = resources.files(__package__ or "tokyo_ia.accounting").joinpath("prices.yaml").read_text("utf-8")
    data = yaml.safe_load(text)
    out: dict[str, Price] = {}
    for model, entry in data["models"].items():
        # str() first: YAML floats like 0.075 must become Decimal("0.075"), not the binary float.
        fields = {k: None if v is None else Decimal(str(v)) for k, v in entry.items()}
        out[str(model)] = Price.from_settings(PriceSettings.model_validate(fields))
    return out
