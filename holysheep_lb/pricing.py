"""Cost control in one import: model prices, budgets, spend stores and the spend ledger.

The pieces live in their own modules and are all importable from here:

==================  ==========================================================
module              holds
==================  ==========================================================
``prices``          :class:`ModelPrice`, :class:`PriceTable`, the defaults
``tokens``          :func:`estimate_prompt_tokens` (the one token estimate)
``budgets``         :class:`Budget`, :class:`BudgetCap`, and the
                    :class:`Reservation`, :class:`Limit` and :class:`Refusal`
                    a store checks caps with
``spend_store``     :class:`SpendStore` (the interface a shared store, e.g.
                    Redis, implements) and :class:`InMemorySpendStore`
``ledger``          :class:`SpendLedger`: estimate, reserve, settle, report
==================  ==========================================================

A call's cost is *estimated* before sending and *reserved* against the budgets; the
actual cost, from the answer's ``usage``, replaces the reservation when the call ends.
An attempt that timed out after its request was sent keeps its estimate as spend,
reported as *unconfirmed* (the gateway may well have answered, and billed, it).
"""

from __future__ import annotations

from .budgets import ON_EXCEEDED, Budget, BudgetCap, Limit, Refusal, Reservation
from .ledger import Settled, SpendLedger
from .prices import DEFAULT_PRICES, PRICES_TAKEN_ON, ModelPrice, PriceTable
from .spend_store import OTHER_MODELS, InMemorySpendStore, SpendRow, SpendStore
from .tokens import estimate_prompt_tokens

__all__ = [
    "PRICES_TAKEN_ON",
    "DEFAULT_PRICES",
    "ModelPrice",
    "PriceTable",
    "estimate_prompt_tokens",
    "BudgetCap",
    "Budget",
    "ON_EXCEEDED",
    "Limit",
    "Refusal",
    "Reservation",
    "SpendRow",
    "SpendStore",
    "InMemorySpendStore",
    "OTHER_MODELS",
    "Settled",
    "SpendLedger",
]
