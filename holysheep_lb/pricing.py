"""Model prices, the spend ledger and budgets.

Prices are USD per million tokens, input and output apart. Costs are computed with
exact decimal arithmetic and reported as floats (the nearest float to the exact value).

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

A call's cost is *estimated* before sending (prompt tokens counted at about 4
characters per token plus 4 per message, output tokens = ``max_tokens`` or the
budget's ``assumed_output_tokens``) and *reserved* against the budgets; the actual
cost, from the answer's ``usage``, replaces the reservation when the call ends. So with
any number of threads, spend passes a cap only by what the answers exceed their
estimates, never by the estimates in flight.

Where the numbers live is a :class:`SpendStore`: in-process by default
(:class:`InMemorySpendStore`); a store shared by many processes implements the same
five methods.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import BudgetExceededError, ConfigError, InvalidRequestError
from .suggest import unknown_option

__all__ = [
    "PRICES_TAKEN_ON",
    "DEFAULT_PRICES",
    "ModelPrice",
    "PriceTable",
    "estimate_prompt_tokens",
    "BudgetCap",
    "Budget",
    "Limit",
    "Refusal",
    "Reservation",
    "SpendRow",
    "SpendStore",
    "InMemorySpendStore",
    "OTHER_MODELS",
    "SpendLedger",
]

log = logging.getLogger(__name__)

#: The day the default prices were read from the providers' public price pages.
PRICES_TAKEN_ON = "2026-11-26"

_EPOCH = _dt.date(1970, 1, 1)
_MILLION = Decimal(1_000_000)
_ZERO = Decimal(0)
_MAX_UNKNOWN_WARNINGS = 1000  # bounds the memory of "already warned" model names

#: The spend row of a day's models past ``InMemorySpendStore.max_models_per_day``.
OTHER_MODELS = "(other models)"


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


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                total += len(part["text"])
        return total
    return 0


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens, estimated: about 4 characters per token plus 4 tokens per message.

    OpenAI's rule of thumb; good to tens of percent for English text, which is what a
    budget reservation needs. The answer's ``usage`` gives the exact count afterwards.
    """
    chars = sum(_content_chars(m.get("content")) for m in messages)
    return math.ceil(chars / 4) + 4 * len(messages)


# -- budgets -----------------------------------------------------------------------------


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


@dataclass
class SpendRow:
    """Spend of one model on one UTC day."""

    day: str
    model: str
    requests: int = 0
    cached_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = _ZERO


# -- storage -----------------------------------------------------------------------------


class SpendStore(ABC):
    """Where spend and in-flight reservations live. Every method must be atomic.

    The in-process default is :class:`InMemorySpendStore`. A store shared by several
    processes (e.g. Redis, with per-day keys that expire) implements the same methods,
    ``try_reserve`` as one atomic check-and-add.
    """

    @abstractmethod
    def try_reserve(self, reservation: Reservation, limits: Sequence[Limit]) -> Optional[Refusal]:
        """Hold ``reservation`` unless spent + reserved + it would pass a limit; then hold nothing."""

    @abstractmethod
    def settle(self, reservation: Reservation, *, input_tokens: int, output_tokens: int, cost_usd: Decimal) -> None:
        """Drop the reservation and record one request with its actual tokens and cost."""

    @abstractmethod
    def cancel(self, reservation: Reservation) -> None:
        """Drop the reservation; nothing was spent (the call failed or was refused)."""

    @abstractmethod
    def record_cache_hit(self, model: str, day: str) -> None:
        """Count one request answered from the cache (no tokens, no cost)."""

    @abstractmethod
    def rows(self) -> List[SpendRow]:
        """A consistent snapshot of every (day, model) row still kept."""

    def reserved_usd(self) -> Decimal:
        """The sum of the reservations in flight."""
        return _ZERO

    def reset_after_fork(self) -> None:
        """Called in a child process after fork: the parent's reservations are not ours."""


class InMemorySpendStore(SpendStore):
    """Spend kept in this process, per (UTC day, model), for ``retain_days`` days.

    Thread-safe: one lock, held for dictionary updates only. Model names come from
    callers, so memory is bounded: a day keeps rows for its first ``max_models_per_day``
    models and counts the others in one :data:`OTHER_MODELS` row; per-model totals are
    kept only for models with a per-model cap (those caps are always enforced exactly).
    """

    def __init__(self, *, retain_days: int = 62, max_models_per_day: int = 256) -> None:
        if isinstance(retain_days, bool) or not isinstance(retain_days, int) or retain_days < 31:
            raise ConfigError("retain_days", retain_days, "must be an integer >= 31 (monthly caps need a month)")
        if isinstance(max_models_per_day, bool) or not isinstance(max_models_per_day, int) or max_models_per_day < 1:
            raise ConfigError("max_models_per_day", max_models_per_day, "must be an integer >= 1")
        self.retain_days = retain_days
        self.max_models_per_day = max_models_per_day
        self._ledger_lock = threading.Lock()
        self._rows: Dict[Tuple[str, str], SpendRow] = {}
        self._models_per_day: Dict[str, int] = {}  # day -> rows of named models
        # (period key, model or None) -> [spent, reserved]; period key is a day or a month;
        # a model's own totals exist only while it has a per-model limit
        self._totals: Dict[Tuple[str, Optional[str]], List[Decimal]] = {}
        self._latest_day = ""

    def try_reserve(self, reservation: Reservation, limits: Sequence[Limit]) -> Optional[Refusal]:
        amount = reservation.amount_usd
        with self._ledger_lock:
            self._roll_to(reservation.day)
            for limit in limits:
                spent, reserved = self._totals.get(_period_key(reservation.day, limit), (_ZERO, _ZERO))
                if spent + reserved + amount > limit.cap_usd:
                    return Refusal(limit, spent, reserved)
            capped = any(limit.model == reservation.model for limit in limits)
            for key in _total_keys(reservation, per_model=capped):
                self._totals.setdefault(key, [_ZERO, _ZERO])[1] += amount
        return None

    def settle(self, reservation: Reservation, *, input_tokens: int, output_tokens: int, cost_usd: Decimal) -> None:
        self._spend(reservation, input_tokens, output_tokens, cost_usd, release_usd=reservation.amount_usd)

    def record_spend(self, reservation: Reservation, *, input_tokens: int, output_tokens: int,
                     cost_usd: Decimal) -> None:
        """Record one request whose reservation was held elsewhere (a shared store): no reservation to drop."""
        self._spend(reservation, input_tokens, output_tokens, cost_usd, release_usd=_ZERO)

    def _spend(self, reservation: Reservation, input_tokens: int, output_tokens: int, cost_usd: Decimal, *,
               release_usd: Decimal) -> None:
        with self._ledger_lock:
            self._roll_to(reservation.day)
            row = self._row(reservation.day, reservation.model)
            row.requests += 1
            row.input_tokens += input_tokens
            row.output_tokens += output_tokens
            row.cost_usd += cost_usd
            for key in _total_keys(reservation):
                # the model's own totals only if try_reserve made them (it has a per-model limit)
                pair = self._totals.get(key) if key[1] is not None else self._totals.setdefault(key, [_ZERO, _ZERO])
                if pair is not None:
                    pair[0] += cost_usd
                    pair[1] -= release_usd

    def cancel(self, reservation: Reservation) -> None:
        with self._ledger_lock:
            for key in _total_keys(reservation):
                pair = self._totals.get(key)
                if pair is not None:
                    pair[1] -= reservation.amount_usd

    def record_cache_hit(self, model: str, day: str) -> None:
        with self._ledger_lock:
            self._roll_to(day)
            self._row(day, model).cached_requests += 1

    def rows(self) -> List[SpendRow]:
        with self._ledger_lock:
            return [SpendRow(**vars(row)) for row in self._rows.values()]

    def reserved_usd(self) -> Decimal:
        with self._ledger_lock:
            return sum((pair[1] for (period, model), pair in self._totals.items()
                        if model is None and len(period) == 10), _ZERO)

    def reset_after_fork(self) -> None:
        self._ledger_lock = threading.Lock()
        for pair in self._totals.values():
            pair[1] = _ZERO

    def _row(self, day: str, model: str) -> SpendRow:
        row = self._rows.get((day, model))
        if row is None:
            named = self._models_per_day.get(day, 0)
            if named >= self.max_models_per_day:
                model = OTHER_MODELS
                row = self._rows.get((day, model))
            else:
                self._models_per_day[day] = named + 1
            if row is None:
                row = self._rows[(day, model)] = SpendRow(day, model)
        return row

    def _roll_to(self, day: str) -> None:
        # On the first call of a new day, forget days (and months) older than retain_days.
        if day <= self._latest_day:
            return
        self._latest_day = day
        cutoff = (_dt.date.fromisoformat(day) - _dt.timedelta(days=self.retain_days)).isoformat()
        for key in [k for k in self._rows if k[0] < cutoff]:
            del self._rows[key]
        for old in [d for d in self._models_per_day if d < cutoff]:
            del self._models_per_day[old]
        for key in [k for k, pair in self._totals.items() if k[0] < cutoff[: len(k[0])] and not pair[1]]:
            del self._totals[key]


def _period_key(day: str, limit: Limit) -> Tuple[str, Optional[str]]:
    return (day if limit.period == "day" else day[:7], limit.model)


def _total_keys(reservation: Reservation, *, per_model: bool = True) -> Tuple[Tuple[str, Optional[str]], ...]:
    day, month, model = reservation.day, reservation.day[:7], reservation.model
    if not per_model:
        return ((day, None), (month, None))
    return ((day, None), (month, None), (day, model), (month, model))


# -- the ledger --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settled:
    """What one call cost: tokens from ``usage`` (or the estimate, when it had none)."""

    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    from_usage: bool


class SpendLedger:
    """Estimates, reserves and records the cost of calls against a :class:`PriceTable`.

    Thread-safe (the store is). ``wall_clock`` (seconds since the epoch) decides the
    UTC day a call is counted on.
    """

    def __init__(
        self,
        prices: PriceTable,
        *,
        store: Optional[SpendStore] = None,
        budget: Optional[Budget] = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.prices = prices
        self.store = store if store is not None else InMemorySpendStore()
        self.budget = budget
        self._wall_clock = wall_clock
        self._day: Tuple[int, str] = (-1, "")

    def today(self) -> str:
        """The current UTC day, ``YYYY-MM-DD``."""
        day_index = int(self._wall_clock() // 86400)
        cached = self._day  # one tuple, replaced whole: safe to read without a lock
        if cached[0] != day_index:
            cached = self._day = (day_index, (_EPOCH + _dt.timedelta(days=day_index)).isoformat())
        return cached[1]

    def estimate(self, model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Reservation:
        """The call's estimated tokens and cost (not yet held against anything)."""
        input_tokens = estimate_prompt_tokens(messages)
        output_tokens = params.get("max_tokens") or params.get("max_completion_tokens")
        if output_tokens is None:
            output_tokens = self.budget.assumed_output_tokens if self.budget else Budget.assumed_output_tokens
        output_tokens *= params.get("n") or 1
        amount = self.prices.exact_cost_usd(model, input_tokens, output_tokens)
        return Reservation(model, self.today(), input_tokens, output_tokens, amount)

    def admit(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        is_available: Callable[[str], bool] = lambda model: True,
        downgrade: bool = True,
    ) -> Reservation:
        """Reserve this call's estimate, downgrading the model if the budget says so.

        Returns the reservation (its ``model`` is the one to send to). Raises
        :class:`BudgetExceededError` when no allowed model fits the caps
        (``downgrade=False``: when ``model`` does not fit them).
        """
        wanted = self.estimate(model, messages, params)
        refusal = self._try(wanted)
        if refusal is None:
            return wanted
        downgrade = downgrade and self.budget is not None and self.budget.on_exceeded == "downgrade"
        if downgrade:
            for candidate in self._cheaper_than(wanted, messages, params):
                if not is_available(candidate.model):
                    continue
                if self._try(candidate) is None:
                    log.debug("budget: %s would pass the %s cap; downgraded to %s (estimate $%s)",
                              model, refusal.limit.period, candidate.model, candidate.amount_usd)
                    return candidate
        raise _budget_error(model, wanted, refusal, downgrade_tried=downgrade)

    def settle(self, reservation: Reservation, usage: Any) -> Settled:
        """Replace the reservation with the actual cost from ``usage`` (the estimate if absent)."""
        tokens = _usage_tokens(usage)
        if tokens is None:
            log.debug("no usable usage in the answer from %s; counting the estimate", reservation.model)
            input_tokens, output_tokens, from_usage = reservation.input_tokens, reservation.output_tokens, False
        else:
            (input_tokens, output_tokens), from_usage = tokens, True
        cost = self.prices.exact_cost_usd(reservation.model, input_tokens, output_tokens)
        self.store.settle(reservation, input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost)
        return Settled(input_tokens, output_tokens, cost, from_usage)

    def cancel(self, reservation: Reservation) -> None:
        self.store.cancel(reservation)

    def record_unreserved(self, model: str, usage: Any) -> Optional[Settled]:
        """Record an answer that was paid for without a reservation: a hedged copy that
        lost the race (the gateway billed it; nobody reads it). Nothing is guessed when
        it reported no usage."""
        tokens = _usage_tokens(usage)
        if tokens is None:
            return None
        input_tokens, output_tokens = tokens
        cost = self.prices.exact_cost_usd(model, input_tokens, output_tokens)
        nothing_held = Reservation(model, self.today(), 0, 0, Decimal(0))
        self.store.settle(nothing_held, input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost)
        return Settled(input_tokens, output_tokens, cost, True)

    def record_cache_hit(self, model: str) -> None:
        self.store.record_cache_hit(model, self.today())

    def reset_after_fork(self) -> None:
        """In a child after fork: fresh locks in the price table and the store, no parent reservations."""
        self.prices.reset_after_fork()
        self.store.reset_after_fork()

    def report(
        self,
        baseline_model: Optional[str] = None,
        *,
        since: Optional[str] = None,
        until: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Totals, per-model and per-day spend, and savings against ``baseline_model``.

        ``since``/``until`` are inclusive UTC days (``"2026-11-26"``); default: every day
        kept. Savings = the same input and output tokens priced at the baseline model,
        minus what was actually spent. Money is in USD (floats).
        """
        baseline = None
        if baseline_model is not None:
            baseline = self.prices.price(baseline_model)
            if baseline is None:
                raise InvalidRequestError("baseline_model", baseline_model,
                                          f"must be a model in the price table: {self.prices.models()}")
        rows = [r for r in self.store.rows()
                if (since is None or r.day >= since) and (until is None or r.day <= until)]
        totals = _sum_rows(rows)
        by_model: Dict[str, Dict[str, Any]] = {}
        for model in sorted({r.model for r in rows}):
            summary = _sum_rows([r for r in rows if r.model == model])
            summary["share_of_requests"] = _share(summary["requests"] + summary["cached_requests"],
                                                  totals["requests"] + totals["cached_requests"])
            summary["share_of_cost"] = _share(summary["cost_usd"], totals["cost_usd"])
            by_model[model] = summary
        report: Dict[str, Any] = {
            "days": sorted({r.day for r in rows}),
            "totals": _floats(totals),
            "by_model": {m: _floats(s) for m, s in by_model.items()},
            "by_day": {d: _floats(_sum_rows([r for r in rows if r.day == d])) for d in sorted({r.day for r in rows})},
            "in_flight_reserved_usd": float(self.store.reserved_usd()),
        }
        if baseline is not None:
            baseline_cost = baseline.cost_usd(totals["input_tokens"], totals["output_tokens"])
            savings = baseline_cost - totals["cost_usd"]
            report["baseline"] = {
                "model": baseline_model,
                "cost_usd": float(baseline_cost),
                "savings_usd": float(savings),
                "savings_share": float(savings / baseline_cost) if baseline_cost else 0.0,
            }
        return report

    def _try(self, reservation: Reservation) -> Optional[Refusal]:
        limits = self.budget.limits_for(reservation.model) if self.budget else ()
        return self.store.try_reserve(reservation, limits)

    def _cheaper_than(self, wanted: Reservation, messages: Sequence[Mapping[str, Any]],
                      params: Mapping[str, Any]) -> List[Reservation]:
        options = [self.estimate(m, messages, params) for m in self.prices.models() if m != wanted.model]
        cheaper = [r for r in options if r.amount_usd < wanted.amount_usd]
        return sorted(cheaper, key=lambda r: r.amount_usd, reverse=True)


def _usage_tokens(usage: Any) -> Optional[Tuple[int, int]]:
    if not isinstance(usage, Mapping):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    for v in (prompt, completion):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return None
    return prompt, completion


def _budget_error(model: str, wanted: Reservation, refusal: Refusal, *, downgrade_tried: bool) -> BudgetExceededError:
    return BudgetExceededError(
        model=model,
        scope=refusal.limit.model or "client",
        period=refusal.limit.period,
        cap_usd=float(refusal.limit.cap_usd),
        spent_usd=float(refusal.spent_usd),
        reserved_usd=float(refusal.reserved_usd),
        estimate_usd=float(wanted.amount_usd),
        downgrade_tried=downgrade_tried,
    )


def _sum_rows(rows: Iterable[SpendRow]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"requests": 0, "cached_requests": 0, "input_tokens": 0, "output_tokens": 0,
                           "cost_usd": _ZERO}
    for r in rows:
        out["requests"] += r.requests
        out["cached_requests"] += r.cached_requests
        out["input_tokens"] += r.input_tokens
        out["output_tokens"] += r.output_tokens
        out["cost_usd"] += r.cost_usd
    return out


def _share(part: Any, whole: Any) -> float:
    return float(part / whole) if whole else 0.0


def _floats(summary: Dict[str, Any]) -> Dict[str, Any]:
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in summary.items()}
