"""What ``Client.stats()`` and ``Client.latency_histograms()`` report, assembled from the
client's components (:class:`holysheep_lb.call.build.Parts`)."""

from __future__ import annotations

from typing import Any, Dict

from .call.build import Parts
from .observe import ObserverSet

__all__ = ["stats", "latency_histograms"]


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
