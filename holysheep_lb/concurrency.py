"""A per-node concurrency limit learned from latency and queueing (no weights needed).

Each successful answer is a sample: how many requests the node had in flight
(``in_flight``, this one included) and how long this one took. Little's law gives the
node's capacity from it: a node serving ``c`` requests at once, each in ``min_rtt``,
answers ``n`` concurrent requests in about ``min_rtt × n / c`` once ``n > c`` — so
``n × min_rtt / rtt`` estimates ``c`` when the node queues, and is just ``n`` when it
does not (Netflix concurrency-limits' Vegas reads the same ratio as a queue length,
``n × (1 − min_rtt/rtt)``).

Samples are smoothed first (an EWMA over about ``1 / smoothing`` answers of latency and
of in-flight), because single answers jitter; the node's *base* latency is the lowest
smoothed latency over the last two windows of ``window_s`` (so it follows a node that
became slower for good). Then, per sample, with ``ratio = smoothed rtt / base``:

* **queueing** (``ratio`` above ``1 + queue_margin`` plus three times the measured
  noise of the smoothed latency, so a node with a wide latency spread does not look
  saturated): the limit moves part of the way (``gain``) towards
  ``smoothed in-flight / ratio``, never below 1;
* **no queueing while at the limit**: the limit grows by ``1 / limit`` (additive
  increase, about +1 per round trip) so a node keeps its chance to show it can take
  more.

Until a node has queued once, its limit is *unknown* (``limit()`` is None) and routing
treats it as unbounded: nodes that never saturate route exactly as before.

Not locked by itself: the selector's lock guards it, like the rest of ``NodeState``.
Used by ``selection.Adaptive`` and ``selection.LeastConnections`` as Prequal's
hot/cold split: a node at its limit is *hot* and gets a request only when every
comparable node is hot too.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["ConcurrencyLimit"]


class ConcurrencyLimit:
    """One node's learned concurrency limit. O(1) per sample."""

    __slots__ = ("queue_margin", "gain", "smoothing", "window_s", "_limit", "_rtt_ms", "_n", "_noise",
                 "_min_now", "_min_prev", "_window_at", "samples", "queued_samples")

    def __init__(self, *, queue_margin: float = 0.1, gain: float = 0.2, smoothing: float = 0.1,
                 window_s: float = 30.0) -> None:
        self.queue_margin = queue_margin
        self.gain = gain
        self.smoothing = smoothing
        self.window_s = window_s
        self._limit: Optional[float] = None
        self._rtt_ms: Optional[float] = None  # smoothed latency
        self._n = 0.0                          # smoothed in-flight
        self._noise = 0.0                      # smoothed |sample - mean| / mean
        self._min_now: Optional[float] = None  # lowest smoothed latency in this window
        self._min_prev: Optional[float] = None  # ... and in the previous one
        self._window_at: Optional[float] = None
        self.samples = 0
        self.queued_samples = 0

    def base_rtt_ms(self) -> Optional[float]:
        values = [v for v in (self._min_now, self._min_prev) if v is not None]
        return min(values) if values else None

    def limit(self) -> Optional[float]:
        """The learned limit, or None while the node has never been seen queueing."""
        return self._limit

    def is_hot(self, in_flight: int) -> bool:
        """True when one more request would exceed the learned limit."""
        return self._limit is not None and in_flight + 1 > self._limit + 0.5

    def observe(self, in_flight: int, latency_ms: float, now: float) -> None:
        """A successful answer that took ``latency_ms`` with ``in_flight`` requests on the node."""
        if not latency_ms > 0 or in_flight < 1:
            return
        self.samples += 1
        a = self.smoothing
        if self._rtt_ms is None:
            self._rtt_ms, self._n = latency_ms, float(in_flight)
        else:
            self._noise += a * (abs(latency_ms - self._rtt_ms) / self._rtt_ms - self._noise)
            self._rtt_ms += a * (latency_ms - self._rtt_ms)
            self._n += a * (in_flight - self._n)
        if self.samples < 1.0 / a:
            return  # the averages are not averages yet
        if self._window_at is None or now - self._window_at >= self.window_s:
            self._min_prev, self._min_now, self._window_at = self._min_now, None, now
        rtt = self._rtt_ms
        if self._min_now is None or rtt < self._min_now:
            self._min_now = rtt
        base = self.base_rtt_ms()
        assert base is not None
        ratio = rtt / base
        # noise of the smoothed value: per-sample noise × sqrt(a / (2 - a)), three times over
        if ratio > 1.0 + self.queue_margin + 3.0 * self._noise * (a / (2.0 - a)) ** 0.5:
            self.queued_samples += 1
            estimate = max(1.0, self._n / ratio)
            if self._limit is None:
                self._limit = estimate
            else:
                self._limit = max(1.0, self._limit + self.gain * (estimate - self._limit))
        elif self._limit is not None and in_flight >= self._limit - 0.5:
            self._limit += 1.0 / self._limit

    def forget(self) -> None:
        """Drop what was learned (a node re-admitted after an ejection may have changed)."""
        self._limit = self._rtt_ms = None
        self._n = self._noise = 0.0
        self._min_now = self._min_prev = self._window_at = None
        self.samples = 0

    def snapshot(self) -> dict:
        return {
            "limit": None if self._limit is None else round(self._limit, 2),
            "base_latency_ms": None if self.base_rtt_ms() is None else round(self.base_rtt_ms() or 0.0, 3),
            "samples": self.samples,
            "queued_samples": self.queued_samples,
        }
