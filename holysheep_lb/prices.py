"""Model prices: USD per million tokens, input and output apart.

Costs are computed with exact decimal arithmetic and reported as floats (the nearest
float to the exact value).

Default prices, as listed by the providers' public price pages, taken 2026-11-26
(standard tier, no cache discount, no batch discount):

=====================  =========  ==========
model                  input/1M   output/1M
=====================  =========  ==========
``deepseek-v3.2``      0.28       0.42
``gemini-2.5-flash``   0.30       2.50
``gpt-4.1``            2.00       8.00
``claude-sonnet-4.5``  3.00       15.00
=====================  =========  ==========

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

__all__ = ["PRICES_TAKEN_ON", "DEFAULT_PRICES", "ModelPrice", "PriceTable", "estimate_prompt_tokens"]

log = logging.getLogger(__name__)

#: The day the default prices were read from the providers' public price pages.
PRICES_TAKEN_ON = "2026-11-26"

_MILLION = Decimal(1_000_000)
_ZERO = Decimal(0)
_MAX_UNKNOWN_WARNINGS = 1000  # bounds the memory of "already warned" model names


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens, for input (prompt) and output (completion) tokens."""

    input_usd_per_mtok: float
    output_usd_per_mtok: float
    # the same prices as exact decimals, parsed once (cost_usd runs on every call)
    _input_exact: Decimal = field(init=False, repr=False, compare=False)
    _output_exact: Decimal = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_input_exact", Decimal(str(self.input_usd_per_mtok)))
        object.__setattr__(self, "_output_exact", Decimal(str(self.output_usd_per_mtok)))

    def cost_usd(self, input_tokens: int, output_tokens: int) -> Decimal:
        """The exact cost of these token counts."""
        return (Decimal(input_tokens) * self._input_exact + Decimal(output_tokens) * self._output_exact) / _MILLION


#: The defaults (see the module docstring for the source and date).
DEFAULT_PRICES: Mapping[str, ModelPrice] = MappingProxyType({
    "deepseek-v3.2": ModelPrice(0.28, 0.42),
    "gemini-2.5-flash": ModelPrice(0.30, 2.50),
    "gpt-4.1": ModelPrice(2.00, 8.00),
    "claude-sonnet-4.5": ModelPrice(3.00, 15.00),
})


def _check_price_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(name, value, "must be a finite number >= 0 (USD per 1M tokens)")
    return float(value)


def _parse_price(model: Any, value: Any) -> ModelPrice:
    if not isinstance(model, str) or not model:
        raise ConfigError("prices", model, "model names must be non-empty strings")
    where = f"prices[{model}]"
    if isinstance(value, ModelPrice):
        value = (value.input_usd_per_mtok, value.output_usd_per_mtok)
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {"input", "output"})
        if extra or "input" not in value or "output" not in value:
            raise ConfigError(where, dict(value), "must be {'input': USD per 1M, 'output': USD per 1M}")
        value = (value["input"], value["output"])
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(where, value, "must be {'input': x, 'output': y}, (input, output) or a ModelPrice")
    return ModelPrice(_check_price_number(f"{where}.input", value[0]),
                      _check_price_number(f"{where}.output", value[1]))


class PriceTable:
    """Model -> :class:`ModelPrice`. Immutable after construction; safe to share.

    ``prices`` (a mapping of model to ``{"input": x, "output": y}``, ``(x, y)`` or
    :class:`ModelPrice`) overrides and extends the defaults; ``include_defaults=False``
    uses only ``prices``.
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
        """Load ``{"model": {"input": 2.0, "output": 8.0}, ...}`` (USD per 1M tokens) from a file."""
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

    def exact_cost_usd(self, model: str, input_tokens: int, output_tokens: int) -> Decimal:
        """The exact cost; 0 (with one warning per model) for a model not in the table."""
        price = self._prices.get(model)
        if price is None:
            self._warn_unknown(model)
            return _ZERO
        return price.cost_usd(input_tokens, output_tokens)

    def cost_usd(self, model: str, input_tokens: int, output_tokens: int) -> float:
        """The cost in USD as the nearest float; 0 for an unknown model."""
        return float(self.exact_cost_usd(model, input_tokens, output_tokens))

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """In a child after fork: a fresh lock (a parent thread may have held it at the fork)."""
        self._warned_lock = threading.Lock()

    def _warn_unknown(self, model: str) -> None:
        with self._warned_lock:
            if model in self._warned or len(self._warned) >= _MAX_UNKNOWN_WARNINGS:
                return
            self._warned.add(model)
        log.warning("no price for model %r: its calls are counted at cost 0; "
                    "pass Client(prices={%r: {'input': ..., 'output': ...}})", model, model)
