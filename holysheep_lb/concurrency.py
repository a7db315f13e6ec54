"""A per-node concurrency limit learned from latency and queueing (no weights needed).

Each successful answer is a sample: how many requests the node had in flight
(``in_flight``, this one included) and how long this one took. Little's law gives the
node's capacity from it: a node serving ``c`` requests at once, each in ``min_rtt``,
answers ``n`` concurrent requests in about ``min_rtt × n / c`` once ``n > c`` — so
``n × min_rtt / rtt`` estimates ``c`` when the node queues, and is just ``n`` when it
does not (Netflix concurrency-limits' Vegas reads the same ratio as a queue length,
``n × (1 − min_rtt/rtt)``).

Single answers jitter, and a node's fastest answer is an outlier, so the comparison is
made between *averages by load*: the latency EWMA of the answers that came back with
``n`` requests in flight, one per ``n`` (up to ``MAX_TRACKED``). The node's *base*
latency is the lowest of those averages (with at least ``min_samples`` answers each):
what it takes when it does not queue. Then, per sample at ``n`` in flight, with
``ratio = average at n / base``:

* **queueing** (``ratio > 1 + queue_margin``): the limit moves part of the way
  (``gain``) towards ``n / ratio``, never below 1;
* **no queueing while at the limit**: the limit grows by ``1 / limit`` (additive
  increase, about +1 per round trip) so a node keeps its chance to show it can take
  more.

A node whose latency merely jitters has the same average at every load and is never
taken for a queueing one. Until a node has queued once its limit is *unknown*
(``limit()`` is None) and routing treats it as unbounded: nodes that never saturate
route exactly as before. Averages slowly forget (``smoothing``), so a node that became
slower for good is relearned.

Not locked by itself: the selector's lock guards it, like the rest of ``NodeState``.
Used by ``selection.Adaptive`` and ``selection.LeastConnections`` as Prequal's
hot/cold split: a node at its limit is *hot* and gets a request only when every
comparable node is hot too.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["ConcurrencyLimit"]


MAX_TRACKED = 64  # in-flight counts above this share the last average


class ConcurrencyLimit:
    """One node's learned concurrency limit. O(1) per sample, O(MAX_TRACKED) memory."""

    __slots__ = ("queue_margin", "gain", "smoothing", "min_samples", "_limit", "_avg_ms", "_count",
                 "_base_ms", "samples", "queued_samples")

    def __init__(self, *, queue_margin: float = 0.25, gain: float = 0.2, smoothing: float = 0.03,
                 min_samples: int = 5) -> None:
        self.queue_margin = queue_margin
        self.gain = gain
        self.smoothing = smoothing
        self.min_samples = min_samples
        self._limit: Optional[float] = None
        self._avg_ms: List[float] = [0.0] * (MAX_TRACKED + 1)  # latency EWMA by in-flight count
        self._count: List[int] = [0] * (MAX_TRACKED + 1)
        self._base_ms: Optional[float] = None
        self.samples = 0
        self.queued_samples = 0

    def base_latency_ms(self) -> Optional[float]:
        return self._base_ms

    def limit(self) -> Optional[float]:
        """The learned limit, or None while the node has never been seen queueing."""
        return self._limit

    def is_hot(self, in_flight: int) -> bool:
        """True when one more request would exceed the learned limit."""
        return self._limit is not None and in_flight + 1 > max(1.0, self._limit)

    def observe(self, in_flight: int, latency_ms: float, now: float) -> None:
        """A successful answer that took ``latency_ms`` with ``in_flight`` requests on the node
        (this one included). ``now`` is unused today: averages forget by count, not time."""
        if not latency_ms > 0 or in_flight < 1:
            return
        self.samples += 1
        n = min(in_flight, MAX_TRACKED)
        count = self._count[n] + 1
        self._count[n] = count
        avg = self._avg_ms[n]
        # a plain mean for the first answers, then an EWMA
        avg = latency_ms if count == 1 else avg + max(self.smoothing, 1.0 / count) * (latency_ms - avg)
        self._avg_ms[n] = avg
        if count < self.min_samples:
            return
        base = self._base_ms
        if base is None or avg < base:
            self._base_ms = base = avg
        elif n <= 2 or (self._limit is not None and n <= self._limit * 0.5):
            # a low-load average is the base itself: let it follow the node when it rises
            self._base_ms = base = min(
                a for a, c in zip(self._avg_ms, self._count) if c >= self.min_samples)
        ratio = avg / base
        if ratio > 1.0 + self.queue_margin:
            self.queued_samples += 1
            estimate = max(1.0, n / ratio)
            if self._limit is None:
                self._limit = estimate
            else:
                self._limit = max(1.0, self._limit + self.gain * (estimate - self._limit))
        elif self._limit is not None and in_flight >= int(self._limit):
            self._limit += 1.0 / self._limit

    def forget(self) -> None:
        """Drop what was learned (a node re-admitted after an ejection may have changed)."""
        self._limit = self._base_ms = None
        self._avg_ms = [0.0] * (MAX_TRACKED + 1)
        self._count = [0] * (MAX_TRACKED + 1)

    def snapshot(self) -> Dict[str, Any]:
        return {
            "limit": None if self._limit is None else round(self._limit, 2),
            "base_latency_ms": None if self._base_ms is None else round(self._base_ms, 3),
            "samples": self.samples,
            "queued_samples": self.queued_samples,
        }
