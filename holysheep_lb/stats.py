"""Counters and bounded latency histograms, with percentile snapshots.

Memory is fixed: a histogram is an array of log-spaced buckets (about 4% wide, from
0.1 ms to about 17 minutes), so any number of samples costs the same few KiB. The
classes here are not locked themselves; their owner (a node, the client) holds its
own lock around ``record``/``snapshot``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

# What a failure means is decided in policy/classify.py; these names stay importable here.
from .policy.classify import FAILURE_KINDS, SYSTEM_FAILURE_KINDS, failure_kind

__all__ = ["LatencyHistogram", "FAILURE_KINDS", "SYSTEM_FAILURE_KINDS", "failure_kind"]

_MIN_MS = 0.1
_GROWTH = 1.04
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = 420  # 0.1 ms * 1.04**420 ≈ 14 min; slower samples land in the last bucket
# Bucket i holds samples below _UPPER_EDGES_MS[i]; the last (overflow) bucket has no edge.
_UPPER_EDGES_MS = tuple(_MIN_MS * _GROWTH ** i for i in range(_BUCKETS - 1))


class LatencyHistogram:
    """Log-bucketed latency histogram: O(1) record, fixed memory, ~2% percentile error."""

    __slots__ = ("_counts", "count", "total_ms", "max_ms")

    def __init__(self) -> None:
        self._counts: List[int] = [0] * _BUCKETS
        self.count = 0
        self.total_ms = 0.0
        self.max_ms = 0.0

    def record(self, latency_ms: float) -> None:
        if latency_ms <= _MIN_MS:
            index = 0
        else:
            index = min(_BUCKETS - 1, int(math.log(latency_ms / _MIN_MS) / _LOG_GROWTH) + 1)
        self._counts[index] += 1
        self.count += 1
        self.total_ms += latency_ms
        if latency_ms > self.max_ms:
            self.max_ms = latency_ms

    def copy(self) -> "LatencyHistogram":
        """A snapshot to summarise outside the owner's lock (a list copy: microseconds)."""
        other = LatencyHistogram.__new__(LatencyHistogram)
        other._counts = self._counts[:]
        other.count = self.count
        other.total_ms = self.total_ms
        other.max_ms = self.max_ms
        return other

    def percentile(self, q: float) -> Optional[float]:
        """The q-th percentile (0..100) in ms, as the bucket's upper bound; None when empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(self.count * q / 100.0))
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                if index == _BUCKETS - 1:  # the overflow bucket has no upper bound
                    return self.max_ms
                return min(_MIN_MS * (_GROWTH ** index), self.max_ms)
        return self.max_ms

    def cumulative_counts(self, bounds_s: Sequence[float]) -> List[int]:
        """How many samples lie at or below each bound (seconds, strictly ascending).

        For exporting as a Prometheus/OpenTelemetry histogram with the caller's bounds.
        A bucket counts under a bound only when its whole range does, so a sample within
        one bucket width (about 4%) below a bound may be counted under the next bound
        up; never under a bound it exceeds. Bounds at or above ``max_ms`` count every
        sample. O(buckets + bounds): call it on a :meth:`copy`, outside the owner's lock.
        """
        previous = 0.0
        for bound in bounds_s:
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) \
                    or bound <= previous:
                raise ValueError(f"bounds_s must be finite numbers > 0 in ascending order, got {list(bounds_s)!r}")
            previous = bound
        out: List[int] = []
        seen = 0
        index = 0
        for bound in bounds_s:
            bound_ms = bound * 1000.0
            if bound_ms >= self.max_ms:
                out.append(self.count)  # every sample is at most max_ms: exact
                continue
            while index < len(_UPPER_EDGES_MS) and _UPPER_EDGES_MS[index] <= bound_ms:
                seen += self._counts[index]
                index += 1
            out.append(seen)
        return out

    def summary(self) -> Dict[str, Optional[float]]:
        return {
            "count": self.count,
            "mean_ms": (self.total_ms / self.count) if self.count else None,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "max_ms": self.max_ms if self.count else None,
        }
