"""Where spend lives: the :class:`SpendStore` interface and the in-process default.

A store keeps, per UTC day and model, what calls spent (:class:`SpendRow`) and the
estimates held by calls in flight; ``try_reserve`` checks a reservation against the
budget's limits and holds it in one atomic step.
"""

from __future__ import annotations

import datetime as _dt
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Dict, List, Optional, Sequence, Tuple

from . import forksafe
from .budgets import Limit, Refusal, Reservation
from .errors import ConfigError

__all__ = ["SpendRow", "SpendStore", "InMemorySpendStore", "OTHER_MODELS"]

_ZERO = Decimal(0)

#: The spend row of a day's models past ``InMemorySpendStore.max_models_per_day``.
OTHER_MODELS = "(other models)"


@dataclass
class SpendRow:
    """Spend of one model on one UTC day.

    ``cost_usd`` and the token counts include the estimates of ``unconfirmed_calls``:
    attempts that timed out after their request was sent, which the gateway may have
    answered (and billed) all the same; ``unconfirmed_usd`` is their part of the cost.
    """

    day: str
    model: str
    requests: int = 0
    cached_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = _ZERO
    unconfirmed_calls: int = 0
    unconfirmed_usd: Decimal = _ZERO
    # the provider's prompt cache: input tokens read from / written to it (part of
    # input_tokens), what that saved against the input rate, and the answers whose
    # usage could not be read in full (priced as uncached, or at the estimate)
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_saved_usd: Decimal = _ZERO
    unreadable_usage: int = 0


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

    def record_unconfirmed(self, reservation: Reservation) -> None:
        """Count ``reservation``'s estimate as spent by an attempt that timed out after its
        request was sent; the reservation stays held for the call's next attempt.

        Stores that predate this method record it as one request of that cost.
        """
        self.settle(replace(reservation, amount_usd=_ZERO), input_tokens=reservation.input_tokens,
                    output_tokens=reservation.output_tokens, cost_usd=reservation.amount_usd)

    def reserved_usd(self) -> Decimal:
        """The sum of the reservations in flight."""
        return _ZERO

    def record_usage_details(self, model: str, day: str, *, cached_input_tokens: int, cache_write_tokens: int,
                             cache_saved_usd: Decimal, unreadable_usage: int) -> None:
        """Count a settled answer's prompt-cache tokens and saving, and whether its usage was
        unreadable (reported only: caps see the cost given to :meth:`settle`).

        Optional: a store that does not keep them reports zeros.
        """

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
        forksafe.register(self)

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

    def record_unconfirmed(self, reservation: Reservation) -> None:
        self._spend(reservation, reservation.input_tokens, reservation.output_tokens, reservation.amount_usd,
                    release_usd=_ZERO, unconfirmed=True)

    def _spend(self, reservation: Reservation, input_tokens: int, output_tokens: int, cost_usd: Decimal, *,
               release_usd: Decimal, unconfirmed: bool = False) -> None:
        with self._ledger_lock:
            self._roll_to(reservation.day)
            row = self._row(reservation.day, reservation.model)
            if unconfirmed:
                row.unconfirmed_calls += 1
                row.unconfirmed_usd += cost_usd
            else:
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

    def record_usage_details(self, model: str, day: str, *, cached_input_tokens: int, cache_write_tokens: int,
                             cache_saved_usd: Decimal, unreadable_usage: int) -> None:
        with self._ledger_lock:
            self._roll_to(day)
            row = self._row(day, model)
            row.cached_input_tokens += cached_input_tokens
            row.cache_write_tokens += cache_write_tokens
            row.cache_saved_usd += cache_saved_usd
            row.unreadable_usage += unreadable_usage

    def rows(self) -> List[SpendRow]:
        with self._ledger_lock:
            return [SpendRow(**vars(row)) for row in self._rows.values()]

    def reserved_usd(self) -> Decimal:
        with self._ledger_lock:
            return sum((pair[1] for (period, model), pair in self._totals.items()
                        if model is None and len(period) == 10), _ZERO)

    @forksafe.once_per_process
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
        for total in [k for k, pair in self._totals.items() if k[0] < cutoff[: len(k[0])] and not pair[1]]:
            del self._totals[total]


def _period_key(day: str, limit: Limit) -> Tuple[str, Optional[str]]:
    return (day if limit.period == "day" else day[:7], limit.model)


def _total_keys(reservation: Reservation, *, per_model: bool = True) -> Tuple[Tuple[str, Optional[str]], ...]:
    day, month, model = reservation.day, reservation.day[:7], reservation.model
    if not per_model:
        return ((day, None), (month, None))
    return ((day, None), (month, None), (day, model), (month, model))
