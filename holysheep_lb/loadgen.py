"""A bounded load generator: N calls over T threads, with caller-side latency and errors.

Shared by ``holysheep-lb demo``/``bench`` and the scripts in ``benchmarks/``. It
keeps one float per call (N is bounded by the caller), so percentiles are exact.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .errors import HolySheepError

__all__ = ["LoadResult", "run_load", "percentile", "seed_regions"]


def percentile(sorted_values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(len(sorted_values) * q / 100.0))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class LoadResult:
    """What callers saw: latencies of successful calls, errors by type, nodes that answered."""

    label: str
    calls: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_ms: List[float] = field(default_factory=list)
    node_share: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    per_second: Counter = field(default_factory=Counter)  # completed calls per whole second

    @property
    def error_rate(self) -> float:
        return (sum(self.errors.values()) / self.calls) if self.calls else 0.0

    @property
    def throughput(self) -> float:
        return (self.calls / self.wall_s) if self.wall_s > 0 else 0.0

    def pct(self, q: float) -> Optional[float]:
        return percentile(sorted(self.latencies_ms), q)

    def summary(self) -> Dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        total = sum(self.node_share.values()) or 1
        return {
            "label": self.label,
            "calls": self.calls,
            "p50_ms": _round(percentile(ordered, 50)),
            "p95_ms": _round(percentile(ordered, 95)),
            "p99_ms": _round(percentile(ordered, 99)),
            "throughput_rps": round(self.throughput, 1),
            "error_rate": round(self.error_rate, 5),
            "errors": dict(self.errors),
            "node_share": {k: round(v / total, 4) for k, v in sorted(self.node_share.items())},
            "wall_s": round(self.wall_s, 3),
        }


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def run_load(
    call: Callable[[int], Any],
    *,
    requests: int,
    concurrency: int,
    label: str = "",
    on_progress: Optional[Callable[[int, int], None]] = None,
    stop: Optional[threading.Event] = None,
) -> LoadResult:
    """Run ``call(i)`` for i in range(requests) on ``concurrency`` threads.

    ``call`` returns a Response (its ``node_id`` is counted) or raises a HolySheepError
    (counted by type). Any other exception propagates: it is a bug, not a result.
    """
    result = LoadResult(label=label)
    lock = threading.Lock()
    next_index = [0]
    done = [0]
    started = time.perf_counter()

    def worker() -> None:
        while stop is None or not stop.is_set():
            with lock:
                i = next_index[0]
                if i >= requests:
                    return
                next_index[0] = i + 1
            t0 = time.perf_counter()
            node = None
            error = None
            try:
                resp = call(i)
                node = getattr(resp, "node_id", None)
            except HolySheepError as exc:
                error = type(exc).__name__
            t1 = time.perf_counter()
            with lock:
                result.calls += 1
                result.per_second[int(t1 - started)] += 1
                if error is None:
                    result.latencies_ms.append((t1 - t0) * 1000.0)
                    result.node_share[node or "?"] += 1
                else:
                    result.errors[error] += 1
                done[0] += 1
                progress = done[0]
            if on_progress is not None:
                on_progress(progress, requests)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="loadgen") as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        for f in futures:
            f.result()
    result.wall_s = time.perf_counter() - started
    return result


def seed_regions(heavy_tail_error_rate: float = 0.023) -> List[Dict[str, Any]]:
    """The article's four regional nodes, as simulator node specs.

    us-east is fast; ap-northeast has the heavy tail and ~2% 5xx that the article's
    "single node" column shows (p50 142 ms, p99 1,243 ms, 2.3% errors).
    """
    return [
        {"id": "us-east-1", "region": "us-east", "latency_ms": 35, "p99_latency_ms": 90},
        {"id": "eu-west-1", "region": "eu-west", "latency_ms": 60, "p99_latency_ms": 160},
        {"id": "ap-southeast-1", "region": "ap-southeast", "latency_ms": 95, "p99_latency_ms": 260},
        {"id": "ap-northeast-1", "region": "ap-northeast", "latency_ms": 140, "p99_latency_ms": 1250,
         "error_rate": heavy_tail_error_rate},
    ]
