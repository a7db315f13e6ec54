"""Node selection: the routing strategies behind one ``Selector.pick()``.

The selector owns the one lock that guards all routing state (``_state_lock``): a pick
and the bookkeeping after an attempt each hold it for microseconds, never across I/O.

A strategy is a small object with ``choose(candidates, ctx) -> NodeState``, called
with the lock held and a non-empty list of candidates the selector already filtered
(usable, not yet tried in this call). Adding a strategy is one class and one line in
``STRATEGIES``; a user may also pass an instance of their own class.

=================  =================================================================
``round_robin``    a true rotation over the available nodes
``weighted``       smooth weighted round robin (nginx): exact shares in every window
``least_connections``  fewest in-flight per unit of weight; all nodes scored when ≤ 5
``geographic``     caller's region first, then the nearest region by measured latency
``adaptive``       near-fastest nodes by peak-EWMA latency, then least (in-flight+1)/weight
=================  =================================================================
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from . import forksafe
from .affinity import AffinityRouter, annotate
from .errors import ConfigError, NoHealthyNodeError
from .nodes import EjectionPolicy, NodeState
from .stats import LatencyHistogram

__all__ = [
    "RoutingStrategy",
    "PickContext",
    "Strategy",
    "RoundRobin",
    "SmoothWeighted",
    "LeastConnections",
    "Geographic",
    "Adaptive",
    "Selector",
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
        return min(pool, key=lambda n: (n.in_flight + 1) / ctx.weight(n))


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
       a node whose estimate is stale (no sample for ``explore_after_s``) takes one
       request at a time until a fresh sample arrives, so a slow node whose estimate
       merely decayed into the band gets a trial, not a burst;
    2. within it, the lowest cost = estimate × ((in-flight + 1) / weight) ** load_bias
       (Finagle's and Linkerd's peak-EWMA × load, with Envoy's ``active_request_bias``).

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
        if estimate_ms is None:
            estimate_ms = node.latency_estimate_ms(ctx.now)
        load = (node.in_flight + 1) / ctx.weight(node)
        return estimate_ms * (load if self.load_bias == 1.0 else load ** self.load_bias)

    def choose(self, candidates: Sequence[NodeState], ctx: PickContext) -> NodeState:
        if self.explore_rate > 0 and len(candidates) > 1 and ctx.rand() < self.explore_rate:
            stale = [n for n in candidates
                     if n.last_sample_at is None or ctx.now - n.last_sample_at >= self.explore_after_s]
            if stale:
                return min(stale, key=lambda n: n.last_sample_at or float("-inf"))
        typical = [(n, n.typical_latency_ms(ctx.now)) for n in _rotate(candidates, ctx)]
        limit = min(t for _, t in typical) * self.latency_band
        band = [n for n, t in typical if t <= limit]
        best: Optional[NodeState] = None
        best_cost = 0.0
        for node in band:
            if node.in_flight and self._stale(node, ctx.now):
                # Its estimate only decayed into the band: that earns one trial request
                # at a time until a fresh sample says how fast it really is now.
                continue
            c = self.cost(node, ctx)
            if best is None or c < best_cost:
                best, best_cost = node, c
        if best is None:  # every node in the band is stale and busy: least loaded of them
            best = min(band, key=lambda n: self.cost(n, ctx))
        return best

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


class Selector:
    """Picks a node per attempt and records what happened. Thread-safe.

    ``pick`` increments the chosen node's in-flight count; every pick must be paired
    with exactly one ``release_*``, given the same ``started`` as the pick (or None
    after ``answered``).

    Interrupt-safe: ``pick`` and ``answered`` change nothing if the clock (or whatever
    interrupts it) raises; a ``release_*`` frees the slot (in flight, awaiting, half-open
    trial) before it calls anything, so once called it never strands the node.
    """

    def __init__(
        self,
        nodes: Sequence[NodeState],
        strategy: Strategy,
        *,
        ejection: EjectionPolicy,
        panic_threshold: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        rand: Optional[Callable[[], float]] = None,
        affinity: Optional[AffinityRouter] = None,
    ) -> None:
        if not nodes:
            raise ConfigError("nodes", [], "must contain at least one node")
        self.nodes: Tuple[NodeState, ...] = tuple(nodes)
        self.by_id: Dict[str, NodeState] = {n.id: n for n in self.nodes}
        self.strategy = strategy
        self.ejection = ejection
        self.panic_threshold = panic_threshold
        self.clock = clock
        self.rand = rand or random.Random().random
        self._state_lock = threading.Lock()
        self.panicking = False
        forksafe.register(self)
        self.affinity = affinity  # prompt-cache affinity (affinity.py): a preference tried before the strategy

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """A lock held by another thread at fork time would stay held forever in the child."""
        self._state_lock = threading.Lock()
        if self.affinity is not None:
            self.affinity.reset_after_fork()

    reset_lock_after_fork = reset_after_fork  # the name the Client calls

    def pick(self, *, exclude: Iterable[str] = (), region: Optional[str] = None,
             started: Optional[float] = None, fresh_only: bool = False,
             affinity_key: Optional[int] = None) -> NodeState:
        """Choose a node for one attempt (never one in ``exclude`` while another is usable).

        ``started`` (default: now, on the selector's clock) marks the attempt as awaiting
        an answer; pass the same value to the matching ``release_*`` or ``answered``.
        With ``fresh_only`` (a hedge) raise NoHealthyNodeError rather than reuse an
        excluded node. ``affinity_key`` (a ring position, the call's ``CallContext.affinity_key``;
        none for a hedged copy) names the node the call prefers, tried before the strategy
        (see :mod:`holysheep_lb.affinity`).
        """
        with self._state_lock:
            now = self.clock()
            if started is None:
                started = now
            nodes = self.nodes
            usable = [n for n in nodes if n.unusable_reason(now) is None]
            pool: List[NodeState] = usable
            panic = len(usable) < self.panic_threshold * len(nodes)
            if panic:
                # Too few survivors: spreading over everything beats crushing them
                # (Envoy's panic mode). Throttled nodes stay out while others exist.
                pool = [n for n in nodes if now >= n.throttled_until and not n.trial_in_flight]
            panic_changed = panic != self.panicking
            if panic_changed:
                self.panicking = panic
                n_usable = len(usable)
            if not pool:
                # Every node is throttled or waiting for its trial: the soonest one,
                # the caller waits for its Retry-After within the deadline.
                pool = [min(nodes, key=lambda n: n.throttled_until)]
            excluded = set(exclude)
            candidates = [n for n in pool if n.id not in excluded] if excluded else pool
            if not candidates:
                if fresh_only:
                    raise NoHealthyNodeError("no usable node outside those excluded")
                candidates = pool
            ctx = PickContext(now, region, nodes, self.rand, self.ejection.slow_start_s)
            node = None
            if affinity_key is not None and self.affinity is not None:
                node = self.affinity.choose(affinity_key, candidates, ctx, first_attempt=not excluded)
            if node is None:
                node = self.strategy.choose(candidates, ctx)
            if node is None:
                raise NoHealthyNodeError("the routing strategy returned no node")
            node.in_flight += 1
            node.start_waiting(started)
            node.attempts += 1
            if excluded:
                node.retries += 1
            if node.is_half_open(now) and not node.trial_in_flight:
                node.trial_in_flight = True
                node.trial_started = started
        if panic_changed:  # logged after the lock: a slow handler must not stall routing
            log.warning("panic mode %s: %d of %d nodes usable", "on" if panic else "off",
                        n_usable, len(nodes))
        return node

    @staticmethod
    def _is_trial(node: NodeState, started: Optional[float]) -> bool:
        return started is not None and node.trial_in_flight and node.trial_started == started

    def _free(self, node: NodeState, started: Optional[float]) -> bool:
        """Give back an attempt's slot, awaiting mark and trial (under the lock, calling
        nothing); returns whether it was the node's half-open trial."""
        node.in_flight -= 1
        is_trial = self._is_trial(node, started)
        if is_trial:
            node.end_trial()  # record_* below ends it too; done first in case they raise
        if started is not None:
            node.stop_waiting(started)
        return is_trial

    def answered(self, node: NodeState, started: float) -> None:
        """The attempt got its first byte (a stream): it stays in flight but no longer waits.

        A half-open trial that answers re-admits its node here. Pass ``started=None``
        to the later ``release_*`` of that attempt.
        """
        with self._state_lock:
            now = self.clock()
            node.stop_waiting(started)
            readmitted = self._is_trial(node, started) and node.ejected_until is not None
            if readmitted:
                node.readmit(now)
        if readmitted:
            log.info("node %s re-admitted after a successful trial request", node.id)

    def release_success(self, node: NodeState, latency_ms: float, *,
                        started: Optional[float]) -> None:
        with self._state_lock:
            is_trial = self._free(node, started)
            readmitted = node.record_success(latency_ms, self.clock(), is_trial)
        if readmitted:
            log.info("node %s re-admitted after a successful trial request", node.id)

    def release_failure(self, node: NodeState, kind: str, latency_ms: float, *,
                        started: Optional[float], retry_after_s: Optional[float] = None) -> None:
        with self._state_lock:
            is_trial = self._free(node, started)
            ejected_for = node.record_failure(kind, latency_ms, self.clock(), self.ejection,
                                              self.rand(), retry_after_s, is_trial)
            streak = node.times_ejected
        if ejected_for is not None:
            log.warning("node %s ejected for %.1f s (ejection #%d) after %s", node.id, ejected_for,
                        streak, kind)

    def release_cancelled(self, node: NodeState, *, started: Optional[float]) -> None:
        """The attempt ended without an outcome about the node (caller stopped reading)."""
        with self._state_lock:
            self._free(node, started)

    def record_probe(self, node: NodeState, ok: bool, latency_ms: Optional[float],
                     unhealthy_threshold: int, healthy_threshold: int,
                     error: Optional[str] = None) -> Optional[str]:
        with self._state_lock:
            change = node.record_probe(ok, latency_ms, self.clock(), unhealthy_threshold,
                                       healthy_threshold, error)
        if change == "down":
            log.warning("node %s marked down after %d failed probes (%s)", node.id,
                        unhealthy_threshold, error)
        elif change == "up":
            log.info("node %s marked up after %d good probes", node.id, healthy_threshold)
        return change

    def snapshot(self) -> List[Dict[str, Any]]:
        with self._state_lock:
            now = self.clock()
            rows = [n.snapshot(now) for n in self.nodes]
            annotate(rows, self.affinity)
        return rows

    def latency_percentile_ms(self, node: NodeState, q: float, *, min_samples: int = 1) -> Optional[float]:
        """A node's q-th percentile of successful request latency; None below ``min_samples``."""
        with self._state_lock:
            if node.latency.count < min_samples:
                return None
            histogram = node.latency.copy()
        return histogram.percentile(q)

    def latency_histograms(self) -> Dict[str, LatencyHistogram]:
        """Each node's histogram of successful request latency, copied under the lock."""
        with self._state_lock:
            return {n.id: n.latency.copy() for n in self.nodes}

    def node_stats(self) -> Dict[str, Dict[str, Any]]:
        with self._state_lock:
            raw = {n.id: n.stats() for n in self.nodes}
            if self.affinity is not None:
                for node_id, entry in raw.items():
                    entry.update(self.affinity.node_stats(node_id))
        for entry in raw.values():  # percentiles are computed after the lock is released
            entry["latency"] = entry["latency"].summary()
        return raw

    def total_in_flight(self) -> int:
        with self._state_lock:
            return sum(n.in_flight for n in self.nodes)
