"""CostsStage: a chat call's cost steps around the model chain: the response cache, the
budget reservation of the first model (where a budget may downgrade the call), and the
actual cost from usage. Each model of the chain is paid for as itself
(:class:`holysheep_lb.costs.CallCosts`)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Tuple

from ..affinity import AffinityRouter
from ..cache import cache_key
from ..costs import CallCosts, cost_info
from ..errors import AllAttemptsFailedError, BudgetExceededError
from ..ledger import SpendLedger
from ..observe import Decision
from ..pricing import Reservation
from ..response import Response
from .chain import ChainStage, request_parts
from .context import CallContext
from .tally import CallTally

__all__ = ["CostsStage", "admit"]

log = logging.getLogger(__name__)


def admit(ctx: CallContext, ledger: SpendLedger, tally: CallTally, model: str,
          is_available: Callable[[str], bool]) -> Reservation:
    """Reserve the call's estimate; a budget's refusal is a failed call in ``stats()``."""
    try:
        return ledger.admit(model, ctx.messages or [], ctx.params, is_available=is_available)
    except BudgetExceededError as exc:
        tally.count(False, type(exc).__name__, ctx.clock())
        if ctx.observers:
            ctx.emit("decided", Decision("budget_refused", {"model": model, "scope": exc.scope}))
        raise


class CostsStage:
    """Cache lookup, budget admission and settlement around ``next`` (the chain)."""

    def __init__(self, *, ledger: SpendLedger, cache: Any, cache_scope: str, default_region: Optional[str],
                 is_available: Callable[[str], bool], tally: CallTally, next: ChainStage,
                 affinity: Optional[AffinityRouter] = None) -> None:
        self.ledger = ledger
        self.cache = cache
        self.cache_scope = cache_scope
        self.default_region = default_region
        self.is_available = is_available
        self.tally = tally
        self.affinity = affinity  # hears each answer's provider-cached tokens, per node
        self.next = next

    def run(self, ctx: CallContext, *, cache: Optional[bool] = None) -> Response:
        """``ctx.model`` is the model asked for; ``ctx.deadline`` the call's deadline."""
        model = ctx.model
        assert model is not None
        cached = self.cache is not None and self.cache.wanted(ctx.params, cache)
        if not cached:
            return self._paid(ctx, cached)[0]
        started = ctx.clock()
        key = cache_key(model, ctx.messages or [], ctx.params,
                        region=ctx.region if ctx.region is not None else self.default_region, scope=self.cache_scope)
        resp, hit = self.cache.get_or_call(key, lambda: self._paid(ctx, cached),
                                           wait_s=max(0.0, ctx.deadline - ctx.clock()))
        if hit:
            self.ledger.record_cache_hit(model)
            resp.cached = True
            resp.attempts = ()
            resp.latency_ms = (ctx.clock() - started) * 1000.0  # > 0 if it waited for an identical call
            resp.extra["cost"] = {**cost_info(None, None), "model": model}
            if ctx.observers:
                ctx.emit("decided", Decision("cache_hit", {"model": model}))
        return resp

    def _paid(self, ctx: CallContext, cached: bool) -> Tuple[Response, bool]:
        model = ctx.model
        assert model is not None
        first = admit(ctx, self.ledger, self.tally, model, self.is_available)
        costs = CallCosts(self.ledger, first, ctx.messages or [], ctx.params)
        try:
            resp = self._send(ctx, first.model, costs, cached)
        finally:
            costs.close()
        if self.affinity is not None:  # a canned fallback_reply (no node) is ignored
            self.affinity.record_usage(resp.node_id, resp.get("usage"))
        if "cost" not in resp.extra:  # a canned fallback_reply: no model answered
            resp.extra["cost"] = cost_info(None, None)
        if first.model != model:
            resp.fallback = True
            resp.extra["cost"]["downgraded_from"] = model
        # only the requested model's own answer is cached (not a fallback's, a canned or downgraded one)
        return resp, not resp.fallback and first.model == model

    def _send(self, ctx: CallContext, chosen: str, costs: CallCosts, cached: bool) -> Response:
        payload = {"model": chosen, "messages": list(ctx.messages or []), **ctx.params}
        # whatever this call spent waiting for an identical one counts against its deadline
        remaining_s = ctx.deadline - ctx.clock()
        if remaining_s <= 0:
            reason = "deadline exceeded before the request was sent"
            if cached:
                reason += " (the call may have waited for an identical call in flight)"
            self.tally.count(False, AllAttemptsFailedError.__name__, ctx.clock())
            raise AllAttemptsFailedError(reason, [])
        body, headers = request_parts(ctx.method, payload, ctx.idempotency_key)
        sent = ctx.for_model(chosen, body, headers)
        sent.payload, sent.costs, sent.deadline = payload, costs, ctx.clock() + remaining_s
        return self.next.run(sent)
