"""Node selection: ``Selector.pick()`` filters the usable nodes and asks the routing
strategy (:mod:`holysheep_lb.strategies`) which one takes the attempt.

The selector owns the one lock that guards all routing state (``_state_lock``): a pick
and the bookkeeping after an attempt each hold it for microseconds, never across I/O.

A strategy's ``choose(candidates, ctx)`` is called with the lock held and a non-empty
list of candidates the selector already filtered (usable, not yet tried in this call).
The strategies (``round_robin``, ``weighted``, ``least_connections``, ``geographic``,
``adaptive``) live in :mod:`holysheep_lb.strategies` and are re-exported here.

Whatever the strategy, the selector leaves out a node that is *hung* (its requests wait
far past its usual latency and it answers nothing: ``nodes.HangPolicy``) and one out of
quota (``quota.py``) like a throttled one. ``least_connections`` and ``adaptive`` also
respect each node's learned concurrency limit (``concurrency.py``): a node at its limit
is *hot* and gets a request only when every comparable node is hot too.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import forksafe
from .affinity import AffinityRouter, annotate
from .errors import ConfigError, NoHealthyNodeError
from .hangs import DEFAULT_HANG_POLICY, HangPolicy, HangWatcher
from .nodes import EjectionPolicy, NodeState
from .stats import LatencyHistogram
from .strategies import (STRATEGIES, Adaptive, Geographic, LeastConnections, PickContext, RoundRobin,
                         RoutingStrategy, SmoothWeighted, Strategy, make_strategy)

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
        hang: HangPolicy = DEFAULT_HANG_POLICY,
        affinity: Optional[AffinityRouter] = None,
    ) -> None:
        if not nodes:
            raise ConfigError("nodes", [], "must contain at least one node")
        self.nodes: Tuple[NodeState, ...] = tuple(nodes)
        self.by_id: Dict[str, NodeState] = {n.id: n for n in self.nodes}
        self.strategy = strategy
        self.ejection = ejection
        self.panic_threshold = panic_threshold
        self.hang = hang
        self.clock = clock
        self.rand = rand or random.Random().random
        self._state_lock = threading.Lock()
        self.panicking = False
        self._watcher = HangWatcher(hang.watch_interval_s)  # guarded by _state_lock
        forksafe.register(self)
        self.affinity = affinity  # prompt-cache affinity (affinity.py): a preference tried before the strategy

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """A lock held by another thread at fork time would stay held forever in the child.
        (The nodes and the hang watcher reset themselves: they are in the fork registry.)"""
        self._state_lock = threading.Lock()
        if self.affinity is not None:
            self.affinity.reset_after_fork()

    def close(self) -> None:
        """Stop the hang watcher thread (it also ends by itself once idle)."""
        self._watcher.close()

    # -- the hang watcher ---------------------------------------------------------------

    def _start_watcher(self) -> None:
        """After a pick that claimed the watcher: start its thread (outside the lock)."""
        if not self._watcher.start(self):
            self._watcher_failed()  # no thread now: picks still check, the next pick tries again

    def _watcher_failed(self) -> None:
        with self._state_lock:
            self._watcher.running = False

    def _watch_once(self) -> bool:
        """One round of the watcher: cut what hangs; False when it should end (idle)."""
        with self._state_lock:
            now = self.clock()
            to_cut = [n for n in self.nodes if n.awaiting and n.check_hung(now, self.hang)
                      and n.due_for_cut(now, self.hang)]
            if not self._watcher.idle(busy=any(n.awaiting for n in self.nodes)):
                return False
        if to_cut:
            self._rescue(to_cut)
        return True

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
            hang = self.hang
            to_cut = None
            for n in nodes:
                n.refresh_quota(now)
                if n.awaiting and n.check_hung(now, hang) and n.due_for_cut(now, hang):
                    to_cut = [n] if to_cut is None else to_cut + [n]
            usable = [n for n in nodes if n.unusable_reason(now) is None]
            pool: List[NodeState] = usable
            panic = len(usable) < self.panic_threshold * len(nodes)
            if panic:
                # Too few survivors: spreading over everything beats crushing them
                # (Envoy's panic mode). Throttled nodes stay out while others exist.
                pool = [n for n in nodes if now >= n.throttled_until and not n.trial_in_flight
                        and not (n.hung_since is not None and n.awaiting)]
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
            start_watcher = self._watcher.claim()
            node.in_flight += 1
            node.start_waiting(started)
            node.sent()
            node.attempts += 1
            if excluded:
                node.retries += 1
            if node.is_half_open(now) and not node.trial_in_flight:
                node.trial_in_flight = True
                node.trial_started = started
        if to_cut is not None:  # after the lock: cutting sockets is I/O
            self._rescue(to_cut)
        if start_watcher:
            self._start_watcher()
        if panic_changed:  # logged after the lock: a slow handler must not stall routing
            log.warning("panic mode %s: %d of %d nodes usable", "on" if panic else "off",
                        n_usable, len(nodes))
        return node

    def _rescue(self, hung: List[NodeState]) -> None:
        """Cut the calls stuck on nodes just found hung: their attempts fail over now."""
        for node in hung:
            cut_exchanges = getattr(node.transport, "cut_exchanges", None)  # a custom transport may lack it
            cut = cut_exchanges() if cut_exchanges is not None else 0
            with self._state_lock:
                node.hung_rescued += cut
            log.warning("node %s is hung (no answer for %.2f s); cut %d call(s) waiting on it to retry elsewhere",
                        node.id, node.hang_threshold_s(self.hang), cut)

    @staticmethod
    def _is_trial(node: NodeState, started: Optional[float]) -> bool:
        return started is not None and node.trial_in_flight and node.trial_started == started

    def _free(self, node: NodeState, started: Optional[float]) -> Tuple[bool, int]:
        """Give back an attempt's slot, awaiting mark and trial (under the lock, calling
        nothing); returns whether it was the node's half-open trial, and the node's
        in-flight count when the attempt was sent (when unknown, as after ``answered``:
        the count now, this attempt included)."""
        node.in_flight -= 1
        is_trial = self._is_trial(node, started)
        if is_trial:
            node.end_trial()  # record_* below ends it too; done first in case they raise
        sent_load = node.stop_waiting(started) if started is not None else None
        return is_trial, (sent_load if sent_load is not None else node.in_flight + 1)

    def answered(self, node: NodeState, started: float) -> Optional[int]:
        """The attempt got its first byte (a stream): it stays in flight but no longer waits.

        A half-open trial that answers re-admits its node here. Pass ``started=None``
        to the later ``release_*`` of that attempt, and the load this returns (how many
        requests the node had in flight when the attempt was sent) as its ``sent_load``.
        """
        with self._state_lock:
            now = self.clock()
            sent_load = node.stop_waiting(started)
            node.mark_answered(now)
            readmitted = self._is_trial(node, started) and node.ejected_until is not None
            if readmitted:
                node.readmit(now)
        if readmitted:
            log.info("node %s re-admitted after a successful trial request", node.id)
        return sent_load

    def release_success(self, node: NodeState, latency_ms: float, *,
                        started: Optional[float], quota_headers: Optional[Mapping[str, str]] = None,
                        sent_load: Optional[int] = None) -> None:
        """``quota_headers``: the answer's ``x-ratelimit-*`` headers, if any (``quota.py``).
        ``sent_load``: what ``answered`` returned, for an attempt released with ``started=None``."""
        with self._state_lock:
            is_trial, load = self._free(node, started)
            sent_load = sent_load if sent_load is not None else load
            now = self.clock()
            readmitted = node.record_success(latency_ms, now, is_trial, in_flight=sent_load)
            if quota_headers:
                node.observe_quota(quota_headers, now)
        if readmitted:
            log.info("node %s re-admitted after a successful trial request", node.id)

    def release_failure(self, node: NodeState, kind: str, latency_ms: float, *,
                        started: Optional[float], retry_after_s: Optional[float] = None) -> None:
        with self._state_lock:
            is_trial, _ = self._free(node, started)
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

    def is_hung(self, node: NodeState) -> bool:
        """Whether ``node`` is hung now (its unanswered requests are past the threshold)."""
        with self._state_lock:
            return node.check_hung(self.clock(), self.hang)

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
