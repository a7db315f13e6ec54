"""The spend ledger: estimates, reserves and records the cost of calls.

A call's cost is *estimated* before sending (prompt tokens counted at about 4
characters per token plus 4 per message, output tokens = ``max_tokens`` or the
budget's ``assumed_output_tokens``) and *reserved* against the budgets; the actual
cost, from the answer's ``usage``, replaces the reservation when the call ends. So with
any number of threads, spend passes a cap only by what the answers exceed their
estimates, never by the estimates in flight.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import forksafe
from .budgets import Budget, Refusal, Reservation
from .errors import BudgetExceededError, InvalidRequestError
from .prices import PriceTable
from .spend_store import InMemorySpendStore, SpendRow, SpendStore
from .tokens import estimate_prompt_tokens, reserved_output_tokens
from .usage import TokenUsage, read_usage

__all__ = ["Settled", "SpendLedger"]

log = logging.getLogger(__name__)

_EPOCH = _dt.date(1970, 1, 1)
_ZERO = Decimal(0)


@dataclass(frozen=True)
class Settled:
    """What one call cost: tokens from ``usage`` (or the estimate, when it had none).

    ``cached_tokens`` / ``cache_write_tokens`` are the parts of ``input_tokens`` read from
    / written to the provider's prompt cache; ``cache_saved_usd`` what that saved against
    the input rate; ``usage_problems`` the usage fields that could not be read.
    """

    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    from_usage: bool
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_saved_usd: Decimal = _ZERO
    usage_problems: Tuple[str, ...] = ()


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
        forksafe.register(self)

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
        assumed = self.budget.assumed_output_tokens if self.budget else Budget.assumed_output_tokens
        output_tokens = reserved_output_tokens(params, assumed_output_tokens=assumed)
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
        """Replace the reservation with the actual cost from ``usage`` (the estimate if absent).

        Cached input tokens are billed at the model's cached rate; the reservation was
        made at the full rate, so a cache hit only ever gives money back.
        """
        reading = read_usage(usage)
        from_usage = reading.known
        if not from_usage:
            log.debug("no usable usage in the answer from %s (%s); counting the estimate", reservation.model,
                      ", ".join(reading.problems))
            reading = TokenUsage(reservation.input_tokens, reservation.output_tokens, problems=reading.problems)
        elif reading.problems:
            log.debug("unreadable usage fields in the answer from %s (%s): priced as uncached",
                      reservation.model, ", ".join(reading.problems))
        settled = self._price(reservation.model, reading, from_usage=from_usage)
        self.store.settle(reservation, input_tokens=settled.input_tokens, output_tokens=settled.output_tokens,
                          cost_usd=settled.cost_usd)
        self._record_details(reservation.model, reservation.day, settled)
        return settled

    def _price(self, model: str, reading: TokenUsage, *, from_usage: bool) -> Settled:
        cost = self.prices.exact_cost_usd(model, reading.input_tokens, reading.output_tokens,
                                          reading.cached_tokens, reading.cache_write_tokens)
        saved = self.prices.exact_cache_saving_usd(model, reading.cached_tokens, reading.cache_write_tokens)
        return Settled(reading.input_tokens, reading.output_tokens, cost, from_usage, reading.cached_tokens,
                       reading.cache_write_tokens, saved, reading.problems)

    def _record_details(self, model: str, day: str, settled: Settled) -> None:
        if settled.cached_tokens or settled.cache_write_tokens or settled.usage_problems:
            self.store.record_usage_details(model, day, cached_input_tokens=settled.cached_tokens,
                                            cache_write_tokens=settled.cache_write_tokens,
                                            cache_saved_usd=settled.cache_saved_usd,
                                            unreadable_usage=1 if settled.usage_problems else 0)

    def cancel(self, reservation: Reservation) -> None:
        self.store.cancel(reservation)

    def record_unreserved(self, model: str, usage: Any) -> Optional[Settled]:
        """Record an answer that was paid for without a reservation: a hedged copy that
        lost the race (the gateway billed it; nobody reads it). Nothing is guessed when
        it reported no usage."""
        reading = read_usage(usage)
        if not reading.known:
            return None
        settled = self._price(model, reading, from_usage=True)
        nothing_held = Reservation(model, self.today(), 0, 0, Decimal(0))
        self.store.settle(nothing_held, input_tokens=settled.input_tokens, output_tokens=settled.output_tokens,
                          cost_usd=settled.cost_usd)
        self._record_details(model, nothing_held.day, settled)
        return settled

    def record_unconfirmed(self, reservation: Reservation) -> None:
        """An attempt for ``reservation`` timed out after its request was sent: the gateway
        may still answer and bill it, so its estimate counts as spend now, reported as
        unconfirmed (caps err on the safe side). The reservation stays held: the call's
        next attempt settles or cancels it as usual."""
        log.debug("an attempt for %s timed out after sending; its estimate $%s counts as unconfirmed spend",
                  reservation.model, reservation.amount_usd)
        self.store.record_unconfirmed(reservation)

    def record_cache_hit(self, model: str) -> None:
        self.store.record_cache_hit(model, self.today())

    @forksafe.once_per_process
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
        minus what was actually spent. Money is in USD (floats). ``cost_usd`` and the
        tokens include ``unconfirmed_usd``: the estimates of ``unconfirmed_calls``,
        attempts that timed out after their request was sent (see :meth:`record_unconfirmed`).
        ``cached_input_tokens`` (and ``cached_input_share`` of ``input_tokens``) were read
        from the provider's prompt cache, ``cache_write_tokens`` written to it, and
        ``cache_saved_usd`` is what the cache saved against the input rate;
        ``unreadable_usage`` counts answers whose usage could not be read in full.
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
                           "cost_usd": _ZERO, "unconfirmed_calls": 0, "unconfirmed_usd": _ZERO,
                           "cached_input_tokens": 0, "cache_write_tokens": 0, "cache_saved_usd": _ZERO,
                           "unreadable_usage": 0}
    for r in rows:
        out["cached_input_tokens"] += r.cached_input_tokens
        out["cache_write_tokens"] += r.cache_write_tokens
        out["cache_saved_usd"] += r.cache_saved_usd
        out["unreadable_usage"] += r.unreadable_usage
        out["requests"] += r.requests
        out["cached_requests"] += r.cached_requests
        out["input_tokens"] += r.input_tokens
        out["output_tokens"] += r.output_tokens
        out["cost_usd"] += r.cost_usd
        out["unconfirmed_calls"] += r.unconfirmed_calls
        out["unconfirmed_usd"] += r.unconfirmed_usd
    out["cached_input_share"] = _share(out["cached_input_tokens"], out["input_tokens"])
    return out


def _share(part: Any, whole: Any) -> float:
    return float(part / whole) if whole else 0.0


def _floats(summary: Dict[str, Any]) -> Dict[str, Any]:
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in summary.items()}
