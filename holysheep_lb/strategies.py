"""The routing strategies: which of the candidate nodes one ``Selector.pick()`` takes.

A strategy is a small object with ``choose(candidates, ctx) -> NodeState``, called by
:class:`~holysheep_lb.selection.Selector` with its lock held and a non-empty list of
candidates it already filtered (usable, not yet tried in this call). Adding a strategy
is one class and one line in ``STRATEGIES``; a user may also pass an instance of their
own class.

=================  =================================================================
``round_robin``    a true rotation over the available nodes
``weighted``       smooth weighted round robin (nginx): exact shares in every window
``least_connections``  fewest in-flight per unit of weight; all nodes scored when ≤ 5
``geographic``     caller's region first, then the nearest region by measured latency
``adaptive``       near-fastest nodes by peak-EWMA latency, then least (in-flight+1)/weight
=================  =================================================================

``least_connections`` and ``adaptive`` respect each node's learned concurrency limit
(``concurrency.py``): a node at its limit is *hot* and gets a request only when every
comparable node is hot too. Hung and out-of-quota nodes never reach a strategy: the
selector leaves them out.
"""

from __future__ import annotations

import enum
import logging
from typing import Callable, Dict, Optional, Sequence, Set, Union

from .errors import ConfigError
from .nodes import NodeState

__all__ = [
    "RoutingStrategy",
    "PickContext",
    "Strategy",
    "RoundRobin",
    "SmoothWeighted",
    "LeastConnections",
    "Geographic",
    "Adaptive",
    "make_strategy",
    "STRATEGIES",
]

log = logging.getLogger(__name__)


class RoutingStrategy(str, enum.Enum):
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    LEAST_CONNECTIONS = "least_connections"
    GEOGRAPHIC = "geographic"
    ADAPTIVE = "adaptive"


class PickContext:
    """What a strategy may look at besides the candidates."""

    __slots__ = ("now", "region", "all_nodes", "rand", "slow_start_s")

    def __init__(self, now: float, region: Optional[str], all_nodes: Sequence[NodeState],
                 rand: Callable[[], float], slow_start_s: float) -> None:
        self.now = now
        self.region = region
        self.all_nodes = all_nodes
        self.rand = rand
        self.slow_start_s = slow_start_s

    def weight(self, node: NodeState) -> float:
        return node.effective_weight(self.now, self.slow_start_s)


class Strategy:
    """Base class of strategies. Subclasses implement ``choose``; state lives on the instance."""

    name = "custom"

    def choose(self, candidates: Sequence[NodeState], ctx: PickContext) -> NodeState:
        raise NotImplementedError


def _capacity(node: NodeState, ctx: PickContext) -> float:
    """What to divide a node's load by when every node is at its learned limit."""
    limit = node.concurrency.limit()
    return limit if limit is not None else ctx.weight(node)


def _with_room_ms(node: NodeState, value_ms: float) -> float:
    """A latency estimate (typical or peak) corrected for the node's room now.

    A node's averages are inflated by its own past queueing, which room on it now will
    not repeat: below its learned concurrency limit it answers near its base (low-load)
    latency, scaled by how far past its limit the next request would be. Without this,
    a small node that queued once drops out of the latency band and sits idle while the
    others queue. A hung node keeps its estimate.
    """
    base = node.concurrency.base_latency_ms()
    limit = node.concurrency.limit()
    if base is None or limit is None or node.hung_since is not None:
        # no queueing seen: its averages are what it takes (a far region's are, for one)
        return value_ms
    return min(value_ms, base * max(1.0, (node.in_flight + 1) / limit))


def _rotate(items: Sequence[NodeState], ctx: PickContext) -> Sequence[NodeState]:
    """Start a scan at a random offset so ties do not always favour the first node."""
    if len(items) < 2:
        return items
    k = int(ctx.rand() * len(items)) % len(items)
    return list(items[k:]) + list(items[:k])


class RoundRobin(Strategy):
    """Each pick takes the next node after the previous pick in the configured order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._cursor = 0

    def choose(self, candidates: Sequence[NodeState], ctx: PickContext) -> NodeState:
        allowed = {id(n) for n in candidates}
        order = ctx.all_nodes
        n = len(order)
        for step in range(n):
            index = (self._cursor + step) % n
            node = order[index]
            if id(node) in allowed:
                self._cursor = index + 1
                return node
        return candidates[0]


class SmoothWeighted(Strategy):
    """nginx's smooth weighted round robin: weights 5,1,1 give ``a a b a c a a``."""

    name = "weighted"

    def __init__(self) -> None:
        self._current: Dict[str, float] = {}

    def choose(self, candidates: Sequence[NodeState], ctx: PickContext) -> NodeState:
        total = 0.0
        best: Optional[NodeState] = None
        best_value = 0.0
        current = self._current
        for node in candidates:
            w = ctx.weight(node)
            value = current.get(node.id, 0.0) + w
            current[node.id] = value
            total += w
            if best is None or value > best_value:
                best, best_value = node, value
        assert best is not None
        current[best.id] = best_value - total
        return best


class LeastConnections(Strategy):
    """Fewest in-flight requests per unit of weight.

    With few nodes every one is scored: power-of-two-choices would pick the busier of
    two nodes 25% of the time. Above ``score_all_max`` nodes it samples two.
    """

    name = "least_connections"

    def __init__(self, score_all_max: int = 5) -> None:
        self.score_all_max = score_all_max

    def choose(self, candidates: Sequence[NodeState], ctx: PickContext) -> NodeState:
        if len(candidates) > self.score_all_max:
            i = int(ctx.rand() * len(candidates)) % len(candidates)
            j = int(ctx.rand() * (len(candidates) - 1)) % (len(candidates) - 1)
            if j >= i:
                j += 1
            pool: Sequence[NodeState] = (candidates[i], candidates[j])
        else:
            pool = _rotate(candidates, ctx)
        cold = [n for n in pool if not n.concurrency.is_hot(n.in_flight)]
        if cold:
            return min(cold, key=lambda n: (n.in_flight + 1) / ctx.weight(n))
        return min(pool, key=lambda n: (n.in_flight + 1) / _capacity(n, ctx))


class Adaptive(Strategy):
    """Fastest expected answer: peak-EWMA latency, then load, among the near-fastest nodes.

    Each node's latency estimate is a peak-EWMA of real request latency (streams: time
    to first chunk), raised at once by slow samples, failures and requests that have
    waited long without an answer, and decayed with time so that a node that was slow
    gets tried again. ``explore_rate`` of picks go to the candidate whose last sample
    is oldest (if older than ``explore_after_s``) so a recovered node wins traffic back.

    A pick is made in two steps:

    1. the *band*: candidates whose typical latency (a plain EWMA, robust to jitter)
       is within ``latency_band`` × the best one;
       a node that is in it only because its estimate decayed (time without samples
       lowers it), or whose estimate is stale (no sample for ``explore_after_s``),
       takes one request at a time until a fresh sample arrives, so a slow node whose
       estimate merely decayed into the band gets a trial, not a burst;
    2. within it, the lowest cost = estimate × ((in-flight + 1) / weight) ** load_bias
       (Finagle's and Linkerd's peak-EWMA × load, with Envoy's ``active_request_bias``),
       × (2 − quota headroom) for a node whose quota headers say it is being spent,
       among the band's *cold* nodes (below their learned concurrency limit, Prequal's
       hot/cold rule); when all are hot, the lowest estimate × (in-flight + 1) / limit.

    Exploration sends one request at a time: only to a stale node with nothing in
    flight, so a node that hangs (the one whose sample is oldest) never collects a
    queue of explorers.

    Why the band: multiplying by load alone (bias 1) spreads traffic onto slower regions
    whenever the fast node has many requests in flight, even when it is nowhere near
    saturated; in ``benchmarks/strategies.py`` that sent a third of the traffic to
    slower regions and doubled p99. With the band, slower nodes only get traffic once
    the fast one's measured latency (queueing included) has risen to theirs, while nodes
    of equal latency still share load by in-flight per unit of weight (capacity).
    """

    name = "adaptive"

    def __init__(self, explore_rate: float = 0.02, explore_after_s: float = 2.0,
                 load_bias: float = 1.0, latency_band: float = 1.25) -> None:
        self.explore_rate = explore_rate
        self.explore_after_s = explore_after_s
        self.load_bias = load_bias
        self.latency_band = latency_band

    def cost(self, node: NodeState, ctx: PickContext, estimate_ms: Optional[float] = None) -> float:
        limit = node.concurrency.limit()
        if estimate_ms is None:
            estimate_ms = _with_room_ms(node, node.latency_estimate_ms(ctx.now))
        # load per unit of capacity: the learned limit when there is one, else the weight (a hint)
        load = (node.in_flight + 1) / (limit if limit is not None else ctx.weight(node))
        cost = estimate_ms * (load if self.load_bias == 1.0 else load ** self.load_bias)
        if node.quota.readings:
            cost *= 2.0 - node.quota.headroom(ctx.now)
        return cost

    def choose(self, candidates: Sequence[NodeState], ctx: PickContext) -> NodeState:
        if self.explore_rate > 0 and len(candidates) > 1 and ctx.rand() < self.explore_rate:
            stale = [n for n in candidates if not n.in_flight and not n.awaiting
                     and (n.last_sample_at is None or ctx.now - n.last_sample_at >= self.explore_after_s)]
            if stale:
                return min(stale, key=lambda n: n.last_sample_at or float("-inf"))
        typical = [(n, _with_room_ms(n, n.typical_latency_ms(ctx.now))) for n in _rotate(candidates, ctx)]
        limit = min(t for _, t in typical) * self.latency_band
        band = [n for n, t in typical if t <= limit]
        best: Optional[NodeState] = None
        best_cost = 0.0
        for node in band:
            if node.in_flight and (self._stale(node, ctx.now) or self._decayed_into(node, limit, ctx.now)):
                # Its estimate only decayed into the band: that earns one trial request
                # at a time until a fresh sample says how fast it really is now.
                continue
            if node.concurrency.is_hot(node.in_flight):
                continue  # at its learned concurrency limit: more would only queue there
            c = self.cost(node, ctx)
            if best is None or c < best_cost:
                best, best_cost = node, c
        if best is None:  # every node in the band is hot, or stale and busy: least loaded per capacity
            best = min(band, key=lambda n: self.cost(n, ctx))
        return best

    @staticmethod
    def _decayed_into(node: NodeState, limit_ms: float, now: float) -> bool:
        """In the band only because time without samples lowered its estimate: a slower
        region drifts in this way well before it counts as stale, and a burst sent to it
        then carries its slower tail."""
        return _with_room_ms(node, node.typical_latency_ms(now, decayed=False)) > limit_ms

    def _stale(self, node: NodeState, now: float) -> bool:
        return node.last_sample_at is not None and now - node.last_sample_at >= self.explore_after_s


class Geographic(Strategy):
    """The caller's region first, then the nearest region by measured latency, then any.

    "Measured latency" is the lowest latency estimate (probe latency, else request
    latency) among a region's nodes. Within the chosen region the least-cost node wins,
    as in ``adaptive``.
    """

    name = "geographic"

    def __init__(self, default_region: Optional[str] = None) -> None:
        self.default_region = default_region
        self._within = Adaptive(explore_rate=0.0)
        self._warned: Set[str] = set()

    @staticmethod
    def _distance_ms(node: NodeState, now: float) -> float:
        if node.probe_ewma_ms is not None:
            return node.probe_ewma_ms
        if node.ewma_ms is not None:
            return node.latency_estimate_ms(now)
        return float("inf")

    def choose(self, candidates: Sequence[NodeState], ctx: PickContext) -> NodeState:
        region = ctx.region or self.default_region
        if region is not None:
            local = [n for n in candidates if n.region == region]
            if local:
                return self._within.choose(local, ctx)
            if region not in {n.region for n in ctx.all_nodes} and region not in self._warned:
                if len(self._warned) < 64:  # bounded: regions come from callers
                    self._warned.add(region)
                log.debug("geographic: no node in region %r; using the nearest region", region)
        nearest: Dict[str, float] = {}
        for n in candidates:
            d = self._distance_ms(n, ctx.now)
            if d < nearest.get(n.region, float("inf")) or n.region not in nearest:
                nearest[n.region] = min(d, nearest.get(n.region, float("inf")))
        best_region = min(nearest, key=lambda r: nearest[r])
        if nearest[best_region] == float("inf"):
            # nothing measured yet: spread by load rather than defaulting to the first node
            return self._within.choose(candidates, ctx)
        return self._within.choose([n for n in candidates if n.region == best_region], ctx)


STRATEGIES: Dict[str, Callable[[], Strategy]] = {
    RoutingStrategy.ROUND_ROBIN.value: RoundRobin,
    RoutingStrategy.WEIGHTED.value: SmoothWeighted,
    RoutingStrategy.LEAST_CONNECTIONS.value: LeastConnections,
    RoutingStrategy.GEOGRAPHIC.value: Geographic,
    RoutingStrategy.ADAPTIVE.value: Adaptive,
}


def make_strategy(value: Union[str, RoutingStrategy, Strategy, type]) -> Strategy:
    """A strategy from a name, a ``RoutingStrategy``, a Strategy class or instance."""
    if isinstance(value, RoutingStrategy):
        value = value.value
    if isinstance(value, str):
        factory = STRATEGIES.get(value)
        if factory is None:
            raise ConfigError("strategy", value, f"must be one of {sorted(STRATEGIES)} or a Strategy")
        return factory()
    if isinstance(value, type) and issubclass(value, Strategy):
        return value()
    if callable(getattr(value, "choose", None)):
        return value  # type: ignore[return-value]
    raise ConfigError("strategy", value, f"must be one of {sorted(STRATEGIES)} or a Strategy")
