"""CallTally: the client's call counters (calls, successes, failures by error, latency)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional

from .. import forksafe
from ..stats import LatencyHistogram

__all__ = ["CallTally"]


class CallTally:
    """Thread-safe counts of finished calls; ``_tally_lock`` guards the counters only."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tally_lock = threading.Lock()
        self.calls = 0
        self.successes = 0
        self.failures: Dict[str, int] = {}
        self.latency = LatencyHistogram()
        forksafe.register(self)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        self._tally_lock = threading.Lock()

    def count(self, ok: bool, error_name: Optional[str], started: float) -> float:
        """Count one call that started at ``started``; returns its duration in ms."""
        total_ms = (self._clock() - started) * 1000.0
        with self._tally_lock:
            self.calls += 1
            if ok:
                self.successes += 1
                self.latency.record(total_ms)
            else:
                name = error_name or "error"
                self.failures[name] = self.failures.get(name, 0) + 1
        return total_ms

    def snapshot(self) -> Dict[str, Any]:
        with self._tally_lock:
            return {"calls": self.calls, "successes": self.successes, "failures": dict(self.failures),
                    "latency": self.latency.summary()}

    def latency_copy(self) -> LatencyHistogram:
        with self._tally_lock:
            return self.latency.copy()
