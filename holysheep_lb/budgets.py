"""Spend caps (:class:`Budget`, :class:`BudgetCap`) and what a store checks them with.

A call's estimate is a :class:`Reservation`; each cap that applies to it is a
:class:`Limit`; a store that refuses a reservation says why with a :class:`Refusal`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ConfigError
from .suggest import unknown_option

__all__ = ["BudgetCap", "Budget", "ON_EXCEEDED", "Limit", "Refusal", "Reservation"]


def _check_cap(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(name, value, "must be None or a finite number of USD >= 0")
    return float(value)


@dataclass(frozen=True)
class BudgetCap:
    """A daily and/or monthly cap in USD (None: no cap). Days and months are UTC."""

    daily_usd: Optional[float] = None
    monthly_usd: Optional[float] = None

    def __post_init__(self) -> None:
        _check_cap("daily_usd", self.daily_usd)
        _check_cap("monthly_usd", self.monthly_usd)


ON_EXCEEDED = ("raise", "downgrade")


@dataclass(frozen=True)
class Budget:
    """Spend caps for one Client: overall and per model, per UTC day and month.

    ``on_exceeded="raise"`` refuses a call whose estimate would pass a cap with
    :class:`~holysheep_lb.errors.BudgetExceededError` before anything is sent;
    ``"downgrade"`` sends it instead to the most expensive cheaper model (by this
    call's estimate) that fits every cap and is available, and raises only when none
    does. ``assumed_output_tokens`` is the output estimate of a call without
    ``max_tokens``.
    """

    daily_usd: Optional[float] = None
    monthly_usd: Optional[float] = None
    per_model: Mapping[str, BudgetCap] = field(default_factory=dict)
    on_exceeded: str = "raise"
    assumed_output_tokens: int = 256
    # the caps as Limits, built once (limits_for runs on every call)
    _client_limits: Tuple["Limit", ...] = field(init=False, repr=False, compare=False)
    _model_limits: Mapping[str, Tuple["Limit", ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_cap("budget.daily_usd", self.daily_usd)
        _check_cap("budget.monthly_usd", self.monthly_usd)
        if self.on_exceeded not in ON_EXCEEDED:
            raise ConfigError("budget.on_exceeded", self.on_exceeded, f"must be one of {ON_EXCEEDED}")
        n = self.assumed_output_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError("budget.assumed_output_tokens", n, "must be an integer >= 0")
        if not isinstance(self.per_model, Mapping):
            raise ConfigError("budget.per_model", self.per_model, "must be a mapping of model -> BudgetCap or dict")
        caps: Dict[str, BudgetCap] = {}
        for model, cap in self.per_model.items():
            if not isinstance(model, str) or not model:
                raise ConfigError("budget.per_model", model, "model names must be non-empty strings")
            if isinstance(cap, Mapping):
                unknown = sorted(set(cap) - {"daily_usd", "monthly_usd"}, key=repr)
                if unknown:
                    raise unknown_option(f"budget.per_model[{model}]", unknown[0], ("daily_usd", "monthly_usd"),
                                         what="budget cap")
                cap = BudgetCap(**cap)
            if not isinstance(cap, BudgetCap):
                raise ConfigError(f"budget.per_model[{model}]", cap, "must be a BudgetCap or a dict")
            caps[model] = cap
        object.__setattr__(self, "per_model", MappingProxyType(caps))
        object.__setattr__(self, "_client_limits", _limits(None, BudgetCap(self.daily_usd, self.monthly_usd)))
        object.__setattr__(self, "_model_limits",
                           MappingProxyType({model: _limits(model, cap) for model, cap in caps.items()}))

    @classmethod
    def coerce(cls, value: Any) -> Optional["Budget"]:
        """A Budget from None, a Budget or a dict of its fields."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, Mapping):
            known = ("daily_usd", "monthly_usd", "per_model", "on_exceeded", "assumed_output_tokens")
            unknown = sorted(set(value) - set(known), key=repr)
            if unknown:
                raise unknown_option("budget", unknown[0], known, what="Budget field")
            return cls(**value)
        raise ConfigError("budget", value, "must be None, a Budget or a dict of its fields")

    def limits_for(self, model: str) -> List["Limit"]:
        """Every cap a call to ``model`` counts against."""
        return [*self._client_limits, *self._model_limits.get(model, ())]


def _limits(scope: Optional[str], cap: BudgetCap) -> Tuple["Limit", ...]:
    limits = []
    if cap.daily_usd is not None:
        limits.append(Limit(scope, "day", Decimal(str(cap.daily_usd))))
    if cap.monthly_usd is not None:
        limits.append(Limit(scope, "month", Decimal(str(cap.monthly_usd))))
    return tuple(limits)


@dataclass(frozen=True)
class Limit:
    """One cap: ``model`` None means the whole client; ``period`` is "day" or "month"."""

    model: Optional[str]
    period: str
    cap_usd: Decimal


@dataclass(frozen=True)
class Refusal:
    """Why a reservation was refused: the cap it would pass and where spend stood."""

    limit: Limit
    spent_usd: Decimal
    reserved_usd: Decimal


@dataclass(frozen=True)
class Reservation:
    """An estimate held against the budgets while a call is in flight."""

    model: str
    day: str  # UTC, YYYY-MM-DD; the month is day[:7]
    input_tokens: int
    output_tokens: int
    amount_usd: Decimal
