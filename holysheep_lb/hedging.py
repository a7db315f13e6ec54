"""Hedged requests: when an attempt is slow, a second copy goes to another node; the first
success wins ("The Tail at Scale", Dean & Barroso).

Opt-in (``Client(hedge_delay_s=...)``), non-streaming calls only, and a hedge costs
tokens: hedges are capped at ``hedge_max_ratio`` of calls (default 5%) and each one
also spends a retry from the retry budget. The delay is a fixed number of seconds, or
``"p95"``: the node's observed p95 latency (no hedge until it has 20 samples).

Both copies run on threads of their own, at most ``max_threads`` at a time
(``stats()["threads_busy"]``), and the caller waits for the first to finish. A call
never queues for a thread: without a free one, or while
the cap and budget leave no room for a hedge, the attempt runs on the caller's thread,
unhedged. The losing copy runs to its end on its own thread, bounded by its own
timeout; its answer is dropped, while its node's bookkeeping (latency, success or
failure) is still recorded.
"""

from __future__ import annotations

import _thread
import functools
import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from . import forksafe
from .cleanup import call_each
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

# drop_failure(error): a copy failed and run() does not raise its error (another copy
# answered, or failed last, or the caller stopped waiting); nothing decides what follows it.
DropFailureFn = Callable[[BaseException], None]

_P95_MIN_SAMPLES = 20


class _Copy:
    """One copy of an attempt. Its fields are guarded by its race's lock.

    ``state``: "pending" (its thread has not begun), "running", "done", or "dropped"
    (never ran: the caller gave its node back). ``handed``: its node's slot has been
    given over, to the caller (the winner) or back to the selector; exactly once.
    """

    __slots__ = ("node", "hedge", "state", "handed", "result", "latency_ms", "error")

    def __init__(self, node: NodeState, hedge: bool) -> None:
        self.node = node
        self.hedge = hedge
        self.state = "pending"
        self.handed = False
        self.result: Any = None
        self.latency_ms = 0.0
        self.error: Optional[BaseException] = None


class _Race:
    """The copies of one attempt.

    ``lock`` guards every copy's fields, ``finished`` and ``decided``; it is a plain
    lock, held for a few assignments and never while anything runs: an interrupt cannot
    leave it held (a ``threading.Condition``'s Python-level ``__enter__`` can, if the
    interrupt lands between its acquire and the ``with`` block: that deadlocked callers).
    The caller sleeps on ``wakeups``, a C-level queue with one token per finished copy.
    """

    def __init__(self, drop_failure: Optional[DropFailureFn] = None) -> None:
        self.lock = threading.Lock()
        self.drop_failure = drop_failure
        self.wakeups: "queue.SimpleQueue[None]" = queue.SimpleQueue()
        self.copies: List[_Copy] = []
        self.finished: List[_Copy] = []  # in the order they finished
        self.decided = False

    def add(self, node: NodeState, *, hedge: bool) -> _Copy:
        copy = _Copy(node, hedge)
        with self.lock:
            self.copies.append(copy)
        return copy

    def begin(self, copy: _Copy) -> bool:
        """The copy's thread starts it; False if the caller dropped it meanwhile."""
        with self.lock:
            if copy.state != "pending":
                return False
            copy.state = "running"
            return True

    def finish(self, copy: _Copy, result: Any, latency_ms: float, error: Optional[BaseException]) -> bool:
        """Hand a finished copy to the caller; False once the race is decided (the copy
        then frees its own node)."""
        with self.lock:
            copy.result, copy.latency_ms, copy.error = result, latency_ms, error
            copy.state = "done"
            if self.decided:
                copy.handed = True
                return False
            self.finished.append(copy)
        self.wakeups.put(None)
        return True

    def has_answer(self) -> bool:
        with self.lock:
            return bool(self.finished)

    def wait(self, timeout_s: Optional[float]) -> None:
        """Sleep until a copy finishes (or ``timeout_s``); interruptible, holds no lock."""
        try:
            self.wakeups.get(timeout=timeout_s)
        except queue.Empty:
            pass


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
        # A counter under a plain lock, not a BoundedSemaphore: a semaphore is built on a
        # Condition, whose lock an interrupt can leave held.
        self._threads_lock = threading.Lock()
        self._threads_busy = 0
        self._counts_lock = threading.Lock()
        self._counts = {"sent": 0, "won": 0, "denied": 0}
        forksafe.register(self, phase=forksafe.PHASE_THREADS)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """The parent's hedge threads do not exist in a child."""
        self._threads_lock = threading.Lock()
        self._threads_busy = 0
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

    def _take_thread(self) -> bool:
        with self._threads_lock:
            if self._threads_busy >= self._max_threads:
                return False
            self._threads_busy += 1
            return True

    def _give_thread(self) -> None:
        with self._threads_lock:
            self._threads_busy -= 1

    def run(self, node: NodeState, timeout: Tuple[float, float], *, attempt: AttemptFn,
            pick_other: Callable[[], Optional[NodeState]], release: ReleaseFn, deadline: float,
            drop_failure: Optional[DropFailureFn] = None) -> Tuple[NodeState, Any, float]:
        """One attempt on ``node``, hedged on ``pick_other()`` if it is slow.

        Takes over ``node``'s in-flight slot. Returns (node that answered, result,
        latency_ms); the caller owns that node's slot. When every copy failed, raises the
        last copy's error (each copy's node is already released). Whatever interrupts
        it (KeyboardInterrupt...), every node it took is released, now or when its copy
        ends. ``release(node, latency_ms, result)`` frees the node of a copy whose
        answer is dropped (``latency_ms`` None: it was never sent); ``drop_failure(error)``
        hears, once each, the failures of copies whose error it does not raise.
        """
        try:
            delay_s = self.delay_for(node)
            hedgeable = (delay_s is not None and self._cap.can_withdraw()
                         and (self._budget is None or self._budget.can_withdraw()))
            threaded = hedgeable and self._take_thread()
        except BaseException:
            release(node, None, None)  # nothing was sent: nobody else would free the node
            raise
        if not threaded:
            result, latency_ms = attempt(node, timeout)
            return node, result, latency_ms
        race = _Race(drop_failure)
        primary = race.add(node, hedge=False)
        try:
            started = self._start(race, primary, timeout, attempt, release)
            if started:
                race.wait(delay_s)
                if not race.has_answer():
                    self._hedge(race, timeout, attempt, pick_other, release, deadline)
                winner = self._await(race, release)
                winner.handed = True  # the caller's from here: nothing that can raise comes after
        except BaseException:
            self._abandon(race, release)
            raise
        if not started:  # no thread could be started: the primary runs here, unhedged
            result, latency_ms = attempt(node, timeout)
            return node, result, latency_ms
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
        budget_taken = got_thread = False
        other = None
        try:
            if self._budget is not None:
                budget_taken = self._budget.try_withdraw()
                if not budget_taken:
                    self._count("denied")
                    return
            got_thread = self._take_thread()
            if got_thread:
                other = pick_other()
            if other is not None:
                copy = race.add(other, hedge=True)  # from here an interrupt's _abandon frees the node
        finally:
            if other is None:  # no budget, no thread, no other node, or an error: nothing spent
                if got_thread:
                    self._give_thread()
                if budget_taken:
                    self._budget.refund()  # type: ignore[union-attr]
                self._cap.refund()
        if other is None:
            return
        hedge_timeout = (min(timeout[0], remaining), min(timeout[1], remaining))
        if self._start(race, copy, hedge_timeout, attempt, release):
            self._count("sent")
            log.debug("hedging a slow attempt: second copy sent to node %s", other.id)
        else:
            release(other, None, None)

    def _start(self, race: _Race, copy: _Copy, timeout: Tuple[float, float],
               attempt: AttemptFn, release: ReleaseFn) -> bool:
        """Run one copy on a thread of its own (its thread slot is already taken).

        False when no thread can be started: the copy is dropped, its thread slot given
        back, and its node is the caller's again.
        """
        try:
            # _thread, not threading.Thread: Thread.start() waits on an Event whose
            # Condition an interrupt of the caller can leave locked, and the new thread
            # would then hang before it ran the copy, its node never released. Like a
            # daemon thread, it does not hold up the interpreter's exit.
            _thread.start_new_thread(self._run_copy, (race, copy, timeout, attempt, release))
        except RuntimeError:  # cannot start a thread now: go without this copy
            with race.lock:
                copy.state = "dropped"
                copy.handed = True
            self._give_thread()
            return False
        return True

    def _run_copy(self, race: _Race, copy: _Copy, timeout: Tuple[float, float],
                  attempt: AttemptFn, release: ReleaseFn) -> None:
        error: Optional[BaseException] = None
        try:
            if not race.begin(copy):
                return  # dropped before it began: the caller freed its node
            try:
                result, latency_ms = attempt(copy.node, timeout)
            except BaseException as exc:  # handed to the caller, who raises it
                result, latency_ms, error = None, 0.0, exc
            if race.finish(copy, result, latency_ms, error):
                return
            if error is None:  # lost the race: drop the answer, free the node
                release(copy.node, latency_ms, result)
            else:
                if not isinstance(error, HolySheepError):
                    log.warning("a losing hedged copy on node %s raised", copy.node.id, exc_info=error)
                if race.drop_failure is not None:
                    race.drop_failure(error)
        finally:
            self._give_thread()
            error = None  # its traceback holds this frame: no cycle through the locals

    def _await(self, race: _Race, release: ReleaseFn) -> _Copy:
        """The first successful copy, once there is one or every copy has failed.

        The winner is not marked handed: if anything interrupts the caller before it
        takes the winner, :meth:`_abandon` frees the winner's node too.
        """
        while True:
            with race.lock:
                winner = next((c for c in race.finished if c.error is None), None)
                if winner is not None or all(c.state in ("done", "dropped") for c in race.copies):
                    race.decided = True
                    seconds = [c for c in race.finished if c.error is None and c is not winner]
                    last = race.finished[-1] if race.finished else None
                    # failures not raised: all of them when a copy won, else all but the last
                    dropped = [c.error for c in race.finished
                               if c.error is not None and (winner is not None or c is not last)]
                    break
            race.wait(None)
        for c in seconds:  # a second success that also arrived: drop it
            if not c.handed:
                c.handed = True  # before the release, which frees the node before it can raise
                release(c.node, c.latency_ms, c.result)
        if race.drop_failure is not None:
            for error in dropped:
                race.drop_failure(error)
        dropped = []  # their tracebacks hold frames: no cycle through the locals
        if winner is None:
            if last is None or last.error is None:  # cannot happen: every copy ran and failed
                raise HolySheepError("a hedged attempt ended without an outcome")
            raise last.error
        if winner.hedge:
            self._count("won")
        return winner

    def _abandon(self, race: _Race, release: ReleaseFn) -> None:
        """The caller stopped waiting: frees what no copy will free itself.

        Finished successes and copies that never began are freed here; running copies
        free their nodes when they end.
        """
        with race.lock:
            # not decided yet: the caller stopped waiting, and no failure so far will be raised
            dropped = [] if race.decided else [c.error for c in race.finished if c.error is not None]
            race.decided = True
            mine = [c for c in race.copies
                    if not c.handed and (c.state == "pending" or (c.state == "done" and c.error is None))]
            for c in mine:
                c.handed = True
                if c.state == "pending":
                    c.state = "dropped"
        drop = race.drop_failure
        call_each([functools.partial(release, c.node, None if c.state == "dropped" else c.latency_ms, c.result)
                   for c in mine] + ([functools.partial(drop, e) for e in dropped] if drop is not None else []))

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self._counts[name] += 1

    def stats(self) -> Dict[str, Any]:
        with self._counts_lock:
            counts: Dict[str, Any] = dict(self._counts)
        counts["max_ratio"] = self._cap.ratio
        counts["threads_busy"] = self._threads_busy
        return counts
