"""Model prices: USD per million tokens, input and output apart.

Costs are computed with exact decimal arithmetic and reported as floats (the nearest
float to the exact value).

Default prices, as listed by the providers' public price pages, taken 2026-11-26
(standard tier, no batch discount). Input tokens read from the provider's prompt cache
are billed at the *cached* rate, tokens written to it at the *cache write* rate
(Anthropic charges extra to write; the others do not, so their write rate is the input
rate):

=====================  =========  ==========  ==========  =============
model                  input/1M   cached/1M   output/1M   cache write/1M
=====================  =========  ==========  ==========  =============
``deepseek-v3.2``      0.28       0.028       0.42        (input)
``gemini-2.5-flash``   0.30       0.03        2.50        (input)
``gpt-4.1``            2.00       0.50        8.00        (input)
``claude-sonnet-4.5``  3.00       0.30        15.00       3.75
=====================  =========  ==========  ==========  =============

A model without a cached rate bills cached tokens at its input rate (no discount is
assumed that the table does not state).

Prices change: pass your own (``Client(prices={...})`` or a JSON file) for billing
that must match an invoice. A model missing from the table costs 0, with one warning
per model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Union

from . import forksafe
from .errors import ConfigError
from .tokens import estimate_prompt_tokens  # re-exported: it lived here

__all__ = ["PRICES_TAKEN_ON", "DEFAULT_PRICES", "PRICE_KEYS", "ModelPrice", "PriceTable", "estimate_prompt_tokens"]

log = logging.getLogger(__name__)

#: The day the default prices were read from the providers' public price pages.
PRICES_TAKEN_ON = "2026-11-26"

_MILLION = Decimal(1_000_000)
_ZERO = Decimal(0)
_MAX_UNKNOWN_WARNINGS = 1000  # bounds the memory of "already warned" model names


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens: input (prompt), output (completion), and the prompt cache.

    ``cached_input_usd_per_mtok`` is the rate of input tokens read from the provider's
    prompt cache, ``cache_write_usd_per_mtok`` of those written to it; None means the
    input rate.
    """

    input_usd_per_mtok: float
    output_usd_per_mtok: float
    cached_input_usd_per_mtok: Optional[float] = None
    cache_write_usd_per_mtok: Optional[float] = None
    # the same prices as exact decimals, parsed once (cost_usd runs on every call)
    _input_exact: Decimal = field(init=False, repr=False, compare=False)
    _output_exact: Decimal = field(init=False, repr=False, compare=False)
    _cached_exact: Decimal = field(init=False, repr=False, compare=False)
    _write_exact: Decimal = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact_input = Decimal(str(self.input_usd_per_mtok))
        cached, write = self.cached_input_usd_per_mtok, self.cache_write_usd_per_mtok
        object.__setattr__(self, "_input_exact", exact_input)
        object.__setattr__(self, "_output_exact", Decimal(str(self.output_usd_per_mtok)))
        object.__setattr__(self, "_cached_exact", exact_input if cached is None else Decimal(str(cached)))
        object.__setattr__(self, "_write_exact", exact_input if write is None else Decimal(str(write)))

    def cost_usd(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
                 cache_write_tokens: int = 0) -> Decimal:
        """The exact cost of these token counts.

        ``input_tokens`` counts every prompt token; ``cached_tokens`` and
        ``cache_write_tokens`` are the parts of it read from and written to the cache.
        """
        plain = input_tokens - cached_tokens - cache_write_tokens
        return (Decimal(plain) * self._input_exact + Decimal(cached_tokens) * self._cached_exact
                + Decimal(cache_write_tokens) * self._write_exact
                + Decimal(output_tokens) * self._output_exact) / _MILLION

    def cache_saving_usd(self, cached_tokens: int, cache_write_tokens: int = 0) -> Decimal:
        """What the prompt cache saved against the input rate (negative when writing cost more)."""
        return (Decimal(cached_tokens) * (self._input_exact - self._cached_exact)
                + Decimal(cache_write_tokens) * (self._input_exact - self._write_exact)) / _MILLION


#: The defaults (see the module docstring for the source and date).
DEFAULT_PRICES: Mapping[str, ModelPrice] = MappingProxyType({
    "deepseek-v3.2": ModelPrice(0.28, 0.42, cached_input_usd_per_mtok=0.028),
    "gemini-2.5-flash": ModelPrice(0.30, 2.50, cached_input_usd_per_mtok=0.03),
    "gpt-4.1": ModelPrice(2.00, 8.00, cached_input_usd_per_mtok=0.50),
    "claude-sonnet-4.5": ModelPrice(3.00, 15.00, cached_input_usd_per_mtok=0.30, cache_write_usd_per_mtok=3.75),
})


def _check_price_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(name, value, "must be a finite number >= 0 (USD per 1M tokens)")
    return float(value)


#: The keys of a price given as a mapping, in the order of a price given as a tuple.
PRICE_KEYS = ("input", "output", "cached_input", "cache_write")
_PRICE_FORMS = ("must be {'input': x, 'output': y} (optional 'cached_input', 'cache_write'), "
                "(input, output[, cached_input[, cache_write]]) or a ModelPrice (USD per 1M tokens)")


def _parse_price(model: Any, value: Any) -> ModelPrice:
    if not isinstance(model, str) or not model:
        raise ConfigError("prices", model, "model names must be non-empty strings")
    where = f"prices[{model}]"
    if isinstance(value, ModelPrice):
        value = (value.input_usd_per_mtok, value.output_usd_per_mtok, value.cached_input_usd_per_mtok,
                 value.cache_write_usd_per_mtok)
    if isinstance(value, Mapping):
        extra = sorted(set(value) - set(PRICE_KEYS))
        if extra or "input" not in value or "output" not in value:
            raise ConfigError(where, dict(value), _PRICE_FORMS)
        value = tuple(value.get(key) for key in PRICE_KEYS)
    if not isinstance(value, (tuple, list)) or not 2 <= len(value) <= len(PRICE_KEYS):
        raise ConfigError(where, value, _PRICE_FORMS)
    rates: List[Optional[float]] = [
        None if (i >= 2 and rate is None) else _check_price_number(f"{where}.{PRICE_KEYS[i]}", rate)
        for i, rate in enumerate(value)]
    rates += [None] * (len(PRICE_KEYS) - len(rates))
    return ModelPrice(float(rates[0] or 0.0), float(rates[1] or 0.0), rates[2], rates[3])


class PriceTable:
    """Model -> :class:`ModelPrice`. Immutable after construction; safe to share.

    ``prices`` (a mapping of model to ``{"input": x, "output": y}`` with optional
    ``"cached_input"`` and ``"cache_write"``, a tuple in that order, or a
    :class:`ModelPrice`) overrides and extends the defaults; ``include_defaults=False``
    uses only ``prices``. A model given without cache rates bills cached tokens at its
    input rate.
    """

    def __init__(self, prices: Optional[Mapping[str, Any]] = None, *, include_defaults: bool = True) -> None:
        if prices is not None and not isinstance(prices, Mapping):
            raise ConfigError("prices", prices, "must be a mapping of model name to price")
        table: Dict[str, ModelPrice] = dict(DEFAULT_PRICES) if include_defaults else {}
        for model, value in (prices or {}).items():
            table[model] = _parse_price(model, value)
        self._prices: Mapping[str, ModelPrice] = MappingProxyType(table)
        self._warned_lock = threading.Lock()
        self._warned: set = set()
        forksafe.register(self)

    @classmethod
    def from_json(cls, path: Union[str, "os.PathLike[str]"], *, include_defaults: bool = True) -> "PriceTable":
        """Load ``{"model": {"input": 2.0, "output": 8.0, "cached_input": 0.5}, ...}`` (USD per 1M tokens)."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError("prices", os.fspath(path), f"must be a readable JSON file ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError("prices", os.fspath(path), "the JSON file must hold an object of model -> price")
        return cls(data, include_defaults=include_defaults)

    @classmethod
    def coerce(cls, value: Any) -> "PriceTable":
        """A PriceTable from None (defaults), a mapping, a JSON file path or a PriceTable."""
        if value is None:
            return cls()
        if isinstance(value, PriceTable):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.from_json(value)
        if isinstance(value, Mapping):
            return cls(value)
        raise ConfigError("prices", value, "must be None, a mapping, a JSON file path or a PriceTable")

    def __contains__(self, model: object) -> bool:
        return model in self._prices

    def __repr__(self) -> str:
        return f"PriceTable({len(self._prices)} models)"

    def models(self) -> List[str]:
        return list(self._prices)

    def price(self, model: str) -> Optional[ModelPrice]:
        """The model's price, or None when the table does not know it."""
        return self._prices.get(model)

    def exact_cost_usd(self, model: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
                       cache_write_tokens: int = 0) -> Decimal:
        """The exact cost; 0 (with one warning per model) for a model not in the table.

        ``cached_tokens`` / ``cache_write_tokens``: the parts of ``input_tokens`` read
        from / written to the provider's prompt cache, billed at the model's cache rates.
        """
        price = self._prices.get(model)
        if price is None:
            self._warn_unknown(model)
            return _ZERO
        return price.cost_usd(input_tokens, output_tokens, cached_tokens, cache_write_tokens)

    def cost_usd(self, model: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
                 cache_write_tokens: int = 0) -> float:
        """The cost in USD as the nearest float; 0 for an unknown model."""
        return float(self.exact_cost_usd(model, input_tokens, output_tokens, cached_tokens, cache_write_tokens))

    def exact_cache_saving_usd(self, model: str, cached_tokens: int, cache_write_tokens: int = 0) -> Decimal:
        """What the prompt cache saved on ``model`` against its input rate (0 for an unknown model)."""
        price = self._prices.get(model)
        return _ZERO if price is None else price.cache_saving_usd(cached_tokens, cache_write_tokens)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """In a child after fork: a fresh lock (a parent thread may have held it at the fork)."""
        self._warned_lock = threading.Lock()

    def _warn_unknown(self, model: str) -> None:
        with self._warned_lock:
            if model in self._warned or len(self._warned) >= _MAX_UNKNOWN_WARNINGS:
                return
            self._warned.add(model)
        log.warning("no price for model %r: its calls are counted at cost 0; pass Client(prices={%r: "
                    "{'input': ..., 'output': ..., 'cached_input': ...}})", model, model)
