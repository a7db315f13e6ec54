"""Hedged requests: when an attempt is slow, a second copy goes to another node; the first
success wins ("The Tail at Scale", Dean & Barroso).

Opt-in (``Client(hedge_delay_s=...)``), non-streaming calls only, and a hedge costs
tokens: hedges are capped at ``hedge_max_ratio`` of calls (default 5%) and each one
also spends a retry from the retry budget. The delay is a fixed number of seconds, or
``"p95"``: the node's observed p95 latency (no hedge until it has 20 samples).

Both copies run on daemon threads, at most ``max_threads`` at a time, and the caller
waits on a condition. A call never queues for a thread: without a free one, or while
the cap and budget leave no room for a hedge, the attempt runs on the caller's thread,
unhedged. The losing copy runs to its end on its own thread, bounded by its own
timeout; its answer is dropped, while its node's bookkeeping (latency, success or
failure) is still recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .errors import HolySheepError
from .nodes import NodeState
from .retry import RetryBudget
from .selection import Selector

__all__ = ["Hedger"]

log = logging.getLogger(__name__)

# release(node, latency_ms, result): frees the node of a copy whose answer is dropped
# (latency_ms None: the copy was never sent); ``result`` is the dropped answer, which
# the gateway billed all the same.
ReleaseFn = Callable[[NodeState, Optional[float], Any], None]

# attempt(node, (connect_s, read_s)) -> (result, latency_ms): the client's single
# attempt. On failure it has released the node and raises; on success the caller owns
# the node's in-flight slot.
AttemptFn = Callable[[NodeState, Tuple[float, float]], Tuple[Any, float]]

_P95_MIN_SAMPLES = 20


class _Outcome:
    __slots__ = ("node", "result", "latency_ms", "error", "hedge")

    def __init__(self, node: NodeState, result: Any, latency_ms: float,
                 error: Optional[BaseException], hedge: bool) -> None:
        self.node = node
        self.result = result
        self.latency_ms = latency_ms
        self.error = error
        self.hedge = hedge


class _Race:
    """The copies of one attempt. ``cond`` guards ``running``, ``done`` and ``decided``."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.running = 0
        self.done: List[_Outcome] = []
        self.decided = False

    def settle(self, outcome: _Outcome) -> bool:
        """Hand a finished copy to the caller; False once the race is decided (dropped)."""
        with self.cond:
            self.running -= 1
            if self.decided:
                return False
            self.done.append(outcome)
            self.cond.notify_all()
            return True


class Hedger:
    """Runs attempts with an optional hedge. Thread-safe; one per client."""

    def __init__(self, *, delay_s: Union[float, str], selector: Selector, max_ratio: float = 0.05,
                 max_threads: int = 64, retry_budget: Optional[RetryBudget] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._delay_s = delay_s
        self._selector = selector
        self._max_threads = max_threads
        self._cap = RetryBudget(max_ratio, min_per_s=0.0, clock=clock)
        self._budget = retry_budget
        self._clock = clock
        self._threads = threading.BoundedSemaphore(max_threads)
        self._counts_lock = threading.Lock()
        self._counts = {"sent": 0, "won": 0, "denied": 0}

    def reset_after_fork(self) -> None:
        """The parent's hedge threads do not exist in a child."""
        self._threads = threading.BoundedSemaphore(self._max_threads)
        self._counts_lock = threading.Lock()
        self._cap.reset_after_fork()

    def deposit(self) -> None:
        """Count one call towards the hedge cap."""
        self._cap.deposit()

    def delay_for(self, node: NodeState) -> Optional[float]:
        """Seconds to wait before hedging an attempt on ``node``; None: do not hedge."""
        if self._delay_s != "p95":
            return float(self._delay_s)
        p95_ms = self._selector.latency_percentile_ms(node, 95, min_samples=_P95_MIN_SAMPLES)
        return None if p95_ms is None else p95_ms / 1000.0

    def run(self, node: NodeState, timeout: Tuple[float, float], *, attempt: AttemptFn,
            pick_other: Callable[[], Optional[NodeState]], release: ReleaseFn, deadline: float
            ) -> Tuple[NodeState, Any, float]:
        """One attempt on ``node``, hedged on ``pick_other()`` if it is slow.

        Returns (node that answered, result, latency_ms); the caller owns that node's
        in-flight slot. When every copy failed, raises the last copy's error (each
        copy's node is already released). ``release(node, latency_ms)`` frees the node
        of a copy whose answer is dropped (``latency_ms`` None: it was never sent).
        """
        delay_s = self.delay_for(node)
        if (delay_s is None or not self._cap.can_withdraw()
                or (self._budget is not None and not self._budget.can_withdraw())
                or not self._threads.acquire(blocking=False)):
            result, latency_ms = attempt(node, timeout)
            return node, result, latency_ms
        race = _Race()
        if not self._start(race, node, timeout, attempt, release, hedge=False):
            result, latency_ms = attempt(node, timeout)
            return node, result, latency_ms
        try:
            with race.cond:
                race.cond.wait_for(lambda: race.done, timeout=delay_s)
                answered = bool(race.done)
            if not answered:
                self._hedge(race, timeout, attempt, pick_other, release, deadline)
            winner = self._await(race, release)
        except BaseException:
            self._abandon(race, release)
            raise
        return winner.node, winner.result, winner.latency_ms

    def _hedge(self, race: _Race, timeout: Tuple[float, float], attempt: AttemptFn,
               pick_other: Callable[[], Optional[NodeState]], release: ReleaseFn,
               deadline: float) -> None:
        remaining = deadline - self._clock()
        if remaining <= 0:
            return
        if not self._cap.try_withdraw():
            self._count("denied")
            return
        if self._budget is not None and not self._budget.try_withdraw():
            self._cap.refund()
            self._count("denied")
            return
        other = None
        got_thread = self._threads.acquire(blocking=False)
        try:
            if got_thread:
                other = pick_other()
        finally:
            if other is None:  # no thread, no other node, or picking raised: nothing spent
                if got_thread:
                    self._threads.release()
                if self._budget is not None:
                    self._budget.refund()
                self._cap.refund()
        if other is None:
            return
        hedge_timeout = (min(timeout[0], remaining), min(timeout[1], remaining))
        if self._start(race, other, hedge_timeout, attempt, release, hedge=True):
            self._count("sent")
            log.debug("hedging a slow attempt: second copy sent to node %s", other.id)
        else:
            release(other, None, None)

    def _start(self, race: _Race, node: NodeState, timeout: Tuple[float, float],
               attempt: AttemptFn, release: ReleaseFn, *, hedge: bool) -> bool:
        """Run one copy on a daemon thread (a thread slot is already taken)."""
        with race.cond:
            race.running += 1
        thread = threading.Thread(target=self._run_copy, args=(race, node, timeout, attempt, release, hedge),
                                  name=f"holysheep-hedge-{node.id}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # cannot start a thread now: go without this copy
            with race.cond:
                race.running -= 1
            self._threads.release()
            return False
        return True

    def _run_copy(self, race: _Race, node: NodeState, timeout: Tuple[float, float],
                  attempt: AttemptFn, release: ReleaseFn, hedge: bool) -> None:
        try:
            try:
                result, latency_ms = attempt(node, timeout)
                outcome = _Outcome(node, result, latency_ms, None, hedge)
            except BaseException as exc:  # handed to the caller, who raises it
                outcome = _Outcome(node, None, 0.0, exc, hedge)
            if race.settle(outcome):
                return
            if outcome.error is None:  # lost the race: drop the answer, free the node
                release(node, outcome.latency_ms, outcome.result)
            elif not isinstance(outcome.error, HolySheepError):
                log.warning("a losing hedged copy on node %s raised", node.id, exc_info=outcome.error)
        finally:
            self._threads.release()

    def _await(self, race: _Race, release: ReleaseFn) -> _Outcome:
        """The first successful copy, once there is one or every copy has failed."""
        with race.cond:
            race.cond.wait_for(lambda: race.running == 0 or any(o.error is None for o in race.done))
            race.decided = True
            outcomes = list(race.done)
        winner = next((o for o in outcomes if o.error is None), None)
        for o in outcomes:
            if o.error is None and o is not winner:  # a second success that also arrived
                release(o.node, o.latency_ms, o.result)
        if winner is None:
            raise outcomes[-1].error  # type: ignore[misc]
        if winner.hedge:
            self._count("won")
        return winner

    def _abandon(self, race: _Race, release: ReleaseFn) -> None:
        """The caller stopped waiting: running copies free their nodes when they end."""
        with race.cond:
            race.decided = True
            handed = [o for o in race.done if o.error is None]
            race.done = []
        for o in handed:
            release(o.node, o.latency_ms, o.result)

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self._counts[name] += 1

    def stats(self) -> Dict[str, Any]:
        with self._counts_lock:
            counts = dict(self._counts)
        counts["max_ratio"] = self._cap.ratio
        return counts
