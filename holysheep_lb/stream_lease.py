"""What an open stream holds, and what happens when it ends: lease, reaper, outcome, stats.

Each stream holds one node pick and one pooled connection. :class:`StreamLease`
releases both exactly once, whether the stream completes, breaks, is closed, or is
garbage-collected; in the last case the release is handed to a :class:`StreamReaper`
and done by the client's next call, never inside the garbage collector (which may run
while any lock of that thread is held).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import forksafe
from .cleanup import call_each
from .errors import APIError
from .nodes import NodeState
from .selection import Selector
from .sse import OpenedStream, close_response
from .stats import LatencyHistogram

__all__ = ["StreamOutcome", "StreamLease", "StreamReaper", "StreamStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamOutcome:
    """How a stream ended, passed once to the client's ``on_end`` hook.

    ``status`` is ``"completed"`` ([DONE] received), ``"interrupted"`` (broke after the
    first chunk; ``error`` is the cause, ``reason`` as in StreamInterruptedError) or
    ``"cancelled"`` (closed early, or dropped). ``model`` is the model asked for;
    ``usage`` is the server's token usage when it reported one. Times are from the start
    of the call, failed attempts and backoff included. ``skipped_events``: events that
    did not parse and were skipped. ``ends_call`` is False for a stream that broke and
    was rescued by another (which reports the call's end); ``reason`` is then still set.
    ``response_id`` is the chunks' ``id`` (the first non-empty one) and ``finish_reasons``
    each choice's ``finish_reason``, by choice index, as far as the stream got.
    """

    model: str
    node_id: str
    status: str
    usage: Optional[Dict[str, Any]]
    chunks: int
    ttft_ms: float
    total_ms: float
    started: float
    error: Optional[APIError] = None
    reason: Optional[str] = None
    skipped_events: int = 0
    ends_call: bool = True
    response_id: Optional[str] = None
    finish_reasons: Tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status != "interrupted"


class StreamLease:
    """What an open stream holds: a node pick and a connection. Settled exactly once.

    It does not reference its :class:`ChatStream`, so a dropped stream can be
    garbage-collected while its lease waits in the reaper.
    """

    def __init__(
        self,
        opened: OpenedStream,
        *,
        selector: Selector,
        node: NodeState,
        model: str,
        started: float,
        picked_at: float,
        clock: Callable[[], float],
        classify: Callable[[APIError], str],
        on_end: Callable[[StreamOutcome], None],
    ) -> None:
        # The first chunk is here: the node answered. It stays in flight until the
        # stream ends, but no longer counts as a request waiting for its answer.
        self._sent_load = selector.answered(node, picked_at)
        self.response = opened.response
        self.reader = opened.reader
        self.node = node
        self.model = model
        self.started = started
        self.node_ttft_ms = opened.ttft_ms
        self.attempt_started = opened.first_chunk_at - opened.ttft_ms / 1000.0
        self.ttft_ms = (opened.first_chunk_at - started) * 1000.0
        self.usage: Optional[Dict[str, Any]] = None
        self.response_id: Optional[str] = None
        self.finish_reasons: Dict[int, str] = {}  # choice index -> finish_reason
        self.chunks = 0
        self.abandoned_at: Optional[float] = None
        self._selector = selector
        self._clock = clock
        self._classify = classify
        self._on_end = on_end
        self._pid = os.getpid()
        self._settle_lock = threading.Lock()
        self._settled = False
        self._final: Optional[Tuple[str, Optional[APIError]]] = None
        self._outcome_hooks: List[Callable[[str, Optional[APIError]], None]] = []

    @property
    def settled(self) -> bool:
        return self._settled

    def defer_outcome(self, hook: Callable[[str, Optional[APIError]], None]) -> None:
        """Call ``hook(status, error)`` once the stream has ended (at once if it has)."""
        with self._settle_lock:
            final = self._final
            if final is None:
                self._outcome_hooks.append(hook)
                return
        hook(*final)

    def settle(self, status: str, error: Optional[APIError] = None, reason: Optional[str] = None, *,
               ends_call: bool = True) -> bool:
        """Close the connection, release the pick, report the outcome; False if already done.

        Each step runs even if one before it raised (an interrupt, a failing hook), so the
        connection, the node, the cost (``on_end``) and the breaker permits (outcome
        hooks) are each released once; the first error is raised afterwards.
        """
        if os.getpid() != self._pid:
            return False  # inherited across fork(): the pick, socket and outcome are the parent's
        with self._settle_lock:
            if self._settled:
                return False
            self._settled = True
        ended = self.abandoned_at
        try:
            if ended is None:
                ended = self._clock()
        finally:
            if ended is None:  # the clock read was interrupted: the first chunk's time does for stats
                ended = self.attempt_started + self.node_ttft_ms / 1000.0
            end_s: float = ended
            outcome = StreamOutcome(self.model, self.node.id, status, self.usage, self.chunks, self.ttft_ms,
                                    (end_s - self.started) * 1000.0, self.started, error, reason,
                                    getattr(self.reader, "skipped_events", 0), ends_call, self.response_id,
                                    tuple(self.finish_reasons[i] for i in sorted(self.finish_reasons)))
            call_each([
                lambda: close_response(self.response),  # fully read: back to the pool for reuse; else the socket closes
                self.reader.close,
                lambda: self._release_node(status, error, end_s),
                lambda: self._on_end(outcome),
                lambda: self._run_hooks(status, error),
            ])
        return True

    def _release_node(self, status: str, error: Optional[APIError], ended: float) -> None:
        if status == "completed":
            self._selector.release_success(self.node, self.node_ttft_ms, started=None, sent_load=self._sent_load)
        elif status == "interrupted" and error is not None:
            self._selector.release_failure(self.node, self._classify(error),
                                           (ended - self.attempt_started) * 1000.0, started=None)
        else:
            self._selector.release_cancelled(self.node, started=None)

    def _run_hooks(self, status: str, error: Optional[APIError]) -> None:
        with self._settle_lock:
            self._final = (status, error)
            hooks, self._outcome_hooks = self._outcome_hooks, []
        call_each([functools.partial(hook, status, error) for hook in hooks])


class StreamReaper:
    """Settles leases of streams that were garbage-collected without being closed.

    :meth:`adopt` runs inside the garbage collector, where taking any lock could
    deadlock: it only records the time and puts the lease on a lock-free queue.
    :meth:`reap` settles them; the client calls it at the start of every call and in
    ``stats()``/``close()``. Thread-safe.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._orphans: "queue.SimpleQueue[StreamLease]" = queue.SimpleQueue()

    def adopt(self, lease: StreamLease) -> None:
        lease.abandoned_at = self._clock()
        self._orphans.put(lease)

    def reap(self) -> int:
        """Settle every orphaned lease as cancelled; returns how many."""
        reaped = 0
        while True:
            try:
                lease = self._orphans.get_nowait()
            except queue.Empty:
                return reaped
            try:
                if lease.settle("cancelled"):
                    reaped += 1
            except Exception:  # noqa: BLE001 - one bad hook must not strand the other leases
                log.exception("error while releasing an abandoned stream on node %s", lease.node.id)


class StreamStats:
    """Counts of stream outcomes, time-to-first-chunk and total-time histograms, tokens.

    Thread-safe (its own lock); fixed memory.
    """

    def __init__(self) -> None:
        self._stats_lock = threading.Lock()
        self._by_status = {"completed": 0, "interrupted": 0, "cancelled": 0}
        self._interrupted_by_reason: Dict[str, int] = {}
        self._ttft = LatencyHistogram()
        self._total = LatencyHistogram()
        self._tokens = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self._with_usage = 0
        self._skipped_events = 0
        self._rescued = 0
        forksafe.register(self)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """A lock held by another thread at fork time would stay held in the child."""
        self._stats_lock = threading.Lock()

    def record(self, outcome: StreamOutcome) -> None:
        usage = outcome.usage if isinstance(outcome.usage, dict) else None
        reason = outcome.reason or "other"
        with self._stats_lock:
            self._by_status[outcome.status] = self._by_status.get(outcome.status, 0) + 1
            if outcome.status == "interrupted" and len(self._interrupted_by_reason) < 16:
                self._interrupted_by_reason[reason] = self._interrupted_by_reason.get(reason, 0) + 1
            self._skipped_events += outcome.skipped_events
            if not outcome.ends_call:
                self._rescued += 1
            self._ttft.record(outcome.ttft_ms)
            if outcome.status == "completed":
                self._total.record(outcome.total_ms)
            if usage is not None:
                self._with_usage += 1
                for key in self._tokens:
                    value = usage.get(key)
                    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                        self._tokens[key] += value

    def histograms(self) -> Tuple[LatencyHistogram, LatencyHistogram]:
        """Copies of the time-to-first-chunk and total-time (completed streams) histograms."""
        with self._stats_lock:
            return self._ttft.copy(), self._total.copy()

    def snapshot(self) -> Dict[str, Any]:
        with self._stats_lock:
            return {
                **self._by_status,
                "interrupted_by_reason": dict(self._interrupted_by_reason),
                "time_to_first_chunk": self._ttft.summary(),
                "total_time": self._total.summary(),
                "streams_with_usage": self._with_usage,
                "skipped_events": self._skipped_events,
                "rescued": self._rescued,
                "usage": dict(self._tokens),
            }
