"""What the Client tells about itself: ``stats()``, ``nodes()``, ``breakers()``,
``cost_report()``... assembled from its components (:class:`holysheep_lb.call.build.Parts`).
:class:`ClientIntrospection` holds these read-only methods; ``Client`` inherits them."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .call.build import Parts
from .health import HealthChecker
from .models import ModelRouter
from .observe import ObserverSet
from .pricing import SpendLedger
from .selection import Selector

__all__ = ["stats", "latency_histograms", "ClientIntrospection"]


def stats(parts: Parts, observers: ObserverSet) -> Dict[str, Any]:
    """A consistent, thread-safe snapshot of counters and latency percentiles."""
    parts.reaper.reap()
    nodes = parts.selector.node_stats()
    tally = parts.tally.snapshot()
    failures = tally["failures"]
    calls, successes = tally["calls"], tally["successes"]
    health = parts.health
    chain = parts.chain
    return {
        "calls": calls,
        "successes": successes,
        "failures": sum(failures.values()),
        "failures_by_error": failures,
        "success_rate": (successes / calls) if calls else None,
        "latency": tally["latency"],
        "in_flight": sum(n["in_flight"] for n in nodes.values()),
        "nodes": nodes,
        "breakers": parts.breakers.stats(),
        "fallbacks": chain.stats(),
        "retry_budget": None if parts.retry_budget is None else parts.retry_budget.snapshot(),
        "hedges": None if parts.hedger is None else parts.hedger.stats(),
        "rate_limits": chain.limits.snapshot() if chain.limits is not None else {},
        "streams": parts.stream_stats.snapshot(),
        "health": None if health is None else {"rounds": health.rounds, "probe_errors_raised": health.loop_errors},
        "cache": parts.cache.stats() if parts.cache is not None else None,
        "affinity": parts.selector.affinity.summary() if parts.selector.affinity is not None else None,
        "observer_errors": observers.errors,
    }


def latency_histograms(parts: Parts) -> Dict[str, Any]:
    """Copies of the fixed-size latency histograms behind ``stats()`` (for exporters)."""
    parts.reaper.reap()
    nodes = parts.selector.latency_histograms()
    calls = parts.tally.latency_copy()
    first_chunk, total = parts.stream_stats.histograms()
    return {"calls": calls, "nodes": nodes, "stream_first_chunk": first_chunk, "stream_total": total}


class ClientIntrospection:
    """The Client's read-only views of its state (thread-safe snapshots)."""

    _parts: Parts
    _observers: ObserverSet
    _selector: Selector
    _router: ModelRouter
    _health: Optional[HealthChecker]

    def stats(self) -> Dict[str, Any]:
        """A consistent, thread-safe snapshot of counters and latency percentiles;
        ``observer_errors`` counts exceptions raised by observers."""
        return stats(self._parts, self._observers)

    def latency_histograms(self) -> Dict[str, Any]:
        """Copies of the fixed-size latency histograms behind ``stats()`` (for exporters).

        ``calls`` (successful calls), ``nodes`` (node id -> successful attempts),
        ``stream_first_chunk`` and ``stream_total`` (completed streams). Each is a
        :class:`~holysheep_lb.stats.LatencyHistogram` taken under its lock in
        microseconds; summarise it (``cumulative_counts``, ``percentile``) afterwards.
        """
        return latency_histograms(self._parts)

    def breakers(self) -> List[Dict[str, Any]]:
        """Each circuit breaker: state, counters, and ``retry_after_s`` until an open one
        lets a trial call through (after which it may close)."""
        return self._parts.breakers.snapshot()

    def breaker_allows(self, model: str) -> bool:
        """Whether ``model``'s breaker would let a call through now (for model routers)."""
        return self._parts.breakers.allows("model", model)

    def cost_report(self, baseline_model: Optional[str] = None, *, since: Optional[str] = None,
                    until: Optional[str] = None) -> Dict[str, Any]:
        """Spend totals, per model and per UTC day, and savings against ``baseline_model``.

        See :meth:`holysheep_lb.pricing.SpendLedger.report`; ``since``/``until`` are
        inclusive days like ``"2026-11-26"``.
        """
        return self._parts.ledger.report(baseline_model, since=since, until=until)

    def nodes(self) -> List[Dict[str, Any]]:
        """Each node's routing state: usable or not and why, in-flight, latency, ejections, probes."""
        self._parts.reaper.reap()
        return self._selector.snapshot()

    @property
    def selector(self) -> Selector:
        return self._selector

    @property
    def router(self) -> ModelRouter:
        return self._router

    @property
    def ledger(self) -> SpendLedger:
        return self._parts.ledger

    @property
    def health_checker(self) -> Optional[HealthChecker]:
        return self._health
