"""HedgeStage: one attempt that gets a hedged copy on another node when it is slow.

The engine is :class:`holysheep_lb.hedging.Hedger` (the race, its threads, the hedge
budget); this stage only tells it how to pick another node, run an attempt and release
a copy whose answer is dropped, from the call's context.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Tuple

from ..breakers import BreakerBoard
from ..errors import NoHealthyNodeError
from ..hedging import Hedger
from ..ledger import SpendLedger
from ..nodes import NodeState
from ..observe import Decision
from ..selection import Selector
from .attempts import NodeAttempt, Timeout
from .context import CallContext

__all__ = ["HedgeStage"]

log = logging.getLogger(__name__)


class HedgeStage:
    """``next`` is the :class:`~holysheep_lb.call.attempts.NodeAttempt` each copy runs."""

    def __init__(self, *, hedger: Hedger, selector: Selector, breakers: BreakerBoard, ledger: SpendLedger,
                 next: NodeAttempt) -> None:
        self.hedger = hedger
        self.selector = selector
        self.breakers = breakers
        self.ledger = ledger
        self.next = next

    def run(self, ctx: CallContext, node: NodeState, timeout: Timeout) -> Tuple[NodeState, Any, float]:
        def attempt(n: NodeState, t: Timeout) -> Tuple[Any, float]:
            return self.next.run(ctx, n, t)

        return self.hedger.run(node, timeout, attempt=attempt, pick_other=lambda: self.pick_other(ctx),
                               release=lambda n, ms, result: self.release_unused(ctx, n, ms, result),
                               deadline=ctx.deadline, drop_failure=self.drop_failure(ctx))

    @staticmethod
    def drop_failure(ctx: CallContext) -> Optional[Callable[[BaseException], None]]:
        """A copy's failure the attempt loop never sees (another copy went on): its attempt
        is reported with no next step, as the retry policy was not asked."""
        if not ctx.observers:
            return None
        return lambda error: ctx.attempt_decided(error, None)

    def pick_other(self, ctx: CallContext) -> Optional[NodeState]:
        """A node for a hedged copy, or None (none fresh, or it is throttled)."""
        selector, clock = self.selector, ctx.clock
        hedge_at = clock()
        avoid = ctx.tried
        if self.breakers.nodes_enabled:
            avoid = avoid + [n.id for n in selector.nodes if not self.breakers.allows("node", n.id)]
        try:
            other = selector.pick(exclude=avoid, region=ctx.region, started=hedge_at, fresh_only=True)
        except NoHealthyNodeError:
            return None
        try:
            ctx.picked[other.id] = hedge_at
            throttled = other.throttled_until > clock()
        except BaseException:
            selector.release_cancelled(other, started=hedge_at)
            raise
        if throttled:
            selector.release_cancelled(other, started=hedge_at)
            return None
        ctx.tried.append(other.id)
        ctx.hedges.add(other.id)
        if ctx.observers:
            ctx.emit("decided", Decision("hedge", {"node_id": other.id, "model": ctx.model}))
        return other

    def release_unused(self, ctx: CallContext, node: NodeState, latency_ms: Optional[float], result: Any) -> None:
        """Free the node of a hedged copy that lost the race (latency given) or was never sent (None)."""
        if latency_ms is None:
            self.selector.release_cancelled(node, started=ctx.picked[node.id])
            return
        self.selector.release_success(node, latency_ms, started=ctx.picked[node.id],
                                      quota_headers=getattr(result, "quota_headers", None))
        data = getattr(result, "data", None)
        if ctx.model is not None and isinstance(data, Mapping):  # billed all the same: record it
            self.ledger.record_unreserved(ctx.model, data.get("usage"))
