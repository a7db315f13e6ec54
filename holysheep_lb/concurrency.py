"""A per-node concurrency limit learned from latency and queueing (no weights needed).

Each successful answer is a sample: how many requests the node had in flight when it
was *sent* (``in_flight``, this one included) and how long it took. The load a request
was sent into is the one it queues behind; the load found when it returns is not (a
slow answer collects requests while it runs, so judged that way jitter alone reads as
queueing). Little's law gives the node's capacity: a node serving ``c`` requests at
once, each in ``base``, answers ``n`` concurrent requests in about ``base × n / c`` once
``n > c``, so ``n × base / latency`` is ``n`` below its capacity and ``c`` above it
(Netflix concurrency-limits' Vegas reads the same ratio as a queue length,
``n × (1 − base/latency)``).

Single answers jitter, so the comparison is made between *averages by load*: the
latency EWMA of the answers sent at each load ``n`` (up to ``MAX_TRACKED``). Every
comparison allows for the noise in those averages: the node's jitter is measured (the
relative variance of answers around their load's average, at loads that do not queue:
jitter belongs to the node, not to a load), an average of ``k`` answers is known to
within ``z`` standard errors, and each decision takes the cautious end of that range. A
node with steady latency needs one answer at a low load to know its base; a jittery one
needs many. No decision is made before ``min_samples`` answers have measured the jitter.

* The **base** is the average whose upper bound is lowest: what the node takes when it
  does not queue, never one lucky handful of fast answers.
* A load **queued** when even the lower bound of its average is past
  ``(1 + queue_margin)`` × the base's upper bound, and it is above the base's load
  (a lower load cannot queue more than the base's).
* While some load has queued, the **limit** is the most that any load says the node
  serves at once (Little's law with each average's upper bound, rounded), and never
  past the load below the first that queued. Just past a big node's capacity its
  queueing is too small to tell from jitter (one request more on 16 is 6%), but the
  loads that clearly queue say 16 all the same.
* With no queueing within ``horizon_s`` the limit is *unknown* again (``limit()`` is
  None) and routing treats the node as unbounded until it queues again: nodes that never
  saturate route exactly as if this did not exist, and a node that grew is found out
  within ``horizon_s``. Averages slowly forget (``smoothing``) and one not refreshed for
  ``horizon_s`` is dropped, so an old average cannot pin the base.

Not locked by itself: the selector's lock guards it, like the rest of ``NodeState``.
Used by ``selection.Adaptive`` and ``selection.LeastConnections`` as Prequal's
hot/cold split: a node at its limit is *hot* and gets a request only when every
comparable node is hot too.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

__all__ = ["ConcurrencyLimit"]


MAX_TRACKED = 64  # in-flight counts above this share the last average


class ConcurrencyLimit:
    """One node's learned concurrency limit. O(MAX_TRACKED) per sample and in memory."""

    __slots__ = ("queue_margin", "smoothing", "min_samples", "z", "horizon_s", "decide_every", "_decided_at",
                 "_limit", "_avg_ms", "_count", "_seen_at", "_top", "_base_ms", "_base_n", "_rel_var",
                 "_jitter_samples", "samples", "queued_samples")

    def __init__(self, *, queue_margin: float = 0.1, smoothing: float = 0.03, min_samples: int = 10,
                 z: float = 2.0, horizon_s: float = 30.0, decide_every: int = 4) -> None:
        self.queue_margin = queue_margin
        self.smoothing = smoothing
        self.min_samples = min_samples
        self.z = z
        self.horizon_s = horizon_s
        self.decide_every = decide_every
        self._decided_at = float("-inf")
        self._limit: Optional[float] = None
        self._base_ms: Optional[float] = None
        self._base_n = 0
        self._reset_averages()
        self.samples = 0
        self.queued_samples = 0

    def _reset_averages(self) -> None:
        self._avg_ms: List[float] = [0.0] * (MAX_TRACKED + 1)  # latency EWMA by in-flight count
        self._count: List[int] = [0] * (MAX_TRACKED + 1)
        self._seen_at: List[float] = [0.0] * (MAX_TRACKED + 1)
        self._top = 0  # the highest load seen: loops stop there
        self._rel_var = 0.0  # the node's jitter: EWMA of (answer / its load's average - 1) ** 2
        self._jitter_samples = 0

    def base_latency_ms(self) -> Optional[float]:
        return self._base_ms

    def limit(self) -> Optional[float]:
        """The learned limit (a whole number of requests, at least 1), or None while the
        node has not been seen queueing within ``horizon_s``."""
        return self._limit

    def is_hot(self, in_flight: int) -> bool:
        """True when one more request would exceed the learned limit."""
        return self._limit is not None and in_flight + 1 > self._limit

    def _weight(self, count: int) -> float:
        """The variance of an average of ``count`` answers over one answer's: a plain
        mean's, then an EWMA's."""
        alpha = self.smoothing
        return max(1.0 / count, alpha / (2.0 - alpha))

    def observe(self, in_flight: int, latency_ms: float, now: float) -> None:
        """A successful answer that took ``latency_ms``, sent when the node had ``in_flight``
        requests (this one included), at ``now`` (monotonic seconds: averages older than
        ``horizon_s`` are dropped)."""
        if not latency_ms > 0 or in_flight < 1 or latency_ms == float("inf"):
            return
        self.samples += 1
        n = min(in_flight, MAX_TRACKED)
        if n > self._top:
            self._top = n
        if self._count[n] and now - self._seen_at[n] > self.horizon_s:
            self._count[n] = 0
        self._seen_at[n] = now
        count = self._count[n]
        if count == 0:
            self._avg_ms[n] = latency_ms
        else:
            avg = self._avg_ms[n]
            base = self._base_ms
            # a prediction error (the answer's spread plus the average's own), at a load
            # that does not queue (none above the base, or no more loaded than the base's):
            # the node's own jitter, without the spread of waits
            if count >= 2 and (base is None or n <= self._base_n or avg <= (1.0 + self.queue_margin) * base):
                rel = (latency_ms - avg) / avg
                self._jitter_samples += 1
                beta = max(self.smoothing, 1.0 / self._jitter_samples)
                self._rel_var += beta * (rel * rel / (1.0 + self._weight(count)) - self._rel_var)
            # a plain mean for the first answers, then an EWMA
            self._avg_ms[n] = avg + max(self.smoothing, 1.0 / (count + 1)) * (latency_ms - avg)
        self._count[n] = count + 1
        if self._jitter_samples < self.min_samples:
            return
        # Deciding reads every load's average: at most every ``decide_every`` answers (or
        # after a quarter second), since it runs under the selector's lock.
        if self.samples % self.decide_every and now - self._decided_at < 0.25:
            return
        self._decided_at = now
        rows = self._fresh_rows(now)
        # the base: the load whose average has the lowest upper bound
        base_n, base, base_upper = min(((k, avg, avg + margin) for k, avg, margin in rows), key=lambda r: r[2])
        self._base_n, self._base_ms = base_n, base
        threshold = (1.0 + self.queue_margin) * base_upper
        first_queued = 0  # the lowest load at which it surely queued
        serves = 0.0  # how many it serves at once, by Little's law, the cautious way
        for k, avg, margin in rows:
            # only a load above the base's can queue more than it: slower answers at a
            # lower load are something else (other requests, other times)
            if not first_queued and k > base_n and avg - margin > threshold:
                first_queued = k
            served = k * base / (avg + margin)
            if served > serves:
                serves = served
        if first_queued == n:
            self.queued_samples += 1
        if not first_queued or serves >= (first_queued - 1) * (1.0 + self.queue_margin) + 1.0:
            # No queueing seen within horizon_s, or latency that rose with load while the
            # node kept serving more at once than the first slower load allows: not this
            # node's queue (a busy client's own CPU slows every answer as its load grows).
            # Unbounded until it queues again.
            self._limit = None
            return
        # Little's law at each load (k at once, each taking avg instead of the base: it
        # serves k x base / avg at a time) is k below capacity and the capacity above it,
        # so the most any load says is the capacity, even just past it, where a big node's
        # queueing is too small to tell from jitter; and never past the first load that
        # surely queued.
        self._limit = float(max(1, min(first_queued - 1, int(serves + 0.5))))

    def _fresh_rows(self, now: float) -> List[Tuple[int, float, float]]:
        """(load, average, margin) of every load seen within ``horizon_s``: one pass, as
        this runs under the selector's lock at every answer."""
        counts, avgs, seen = self._count, self._avg_ms, self._seen_at
        spread = self.z * self._rel_var ** 0.5
        oldest = now - self.horizon_s
        rows = []
        for k in range(1, self._top + 1):
            count = counts[k]
            if count and seen[k] >= oldest:
                avg = avgs[k]
                rows.append((k, avg, spread * avg * self._weight(count) ** 0.5))
        return rows

    def forget(self) -> None:
        """Drop what was learned (a node re-admitted after an ejection may have changed)."""
        self._limit = self._base_ms = None
        self._base_n = 0
        self._reset_averages()

    def snapshot(self) -> Dict[str, Any]:
        return {
            "limit": None if self._limit is None else round(self._limit, 2),
            "base_latency_ms": None if self._base_ms is None else round(self._base_ms, 3),
            "samples": self.samples,
            "queued_samples": self.queued_samples,
        }
