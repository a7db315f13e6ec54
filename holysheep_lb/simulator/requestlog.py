"""The gateway's record of requests: attempt counters per model and node, and a bounded log.

A benchmark scores a client from it: attempts on the primary model, the gap
between attempt 1 and 2, whether a prefill was rejected, and so on.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class SimRequest:
    """One request as the gateway saw it.  Times are seconds on the gateway's
    clock since it started or since :meth:`SimulatedGateway.reset_counts`."""

    t_s: float  # arrival (after the body was read, before any queueing)
    node_id: str
    path: str
    model: Optional[str]
    stream: bool
    prefill: bool  # the last message was an assistant message
    attempt: int  # n-th request naming this model on any node (0 without a model)
    outcome: str  # see SimulatedGateway.outcomes(); "pending" until answered, "aborted" on a socket error
    status: int  # HTTP status sent, 0 when none (reset, hang, cut before headers)
    done_s: Optional[float]  # when the answer ended, None while pending


class _Entry:
    __slots__ = ("attempt", "done_s", "model", "node_id", "outcome", "path", "prefill", "status", "stream", "t_s")

    def __init__(self, t_s: float, node_id: str, path: str, model: Optional[str], stream: bool,
                 prefill: bool, attempt: int) -> None:
        self.t_s, self.node_id, self.path, self.model = t_s, node_id, path, model
        self.stream, self.prefill, self.attempt = stream, prefill, attempt
        self.outcome, self.status = "pending", 0
        self.done_s: Optional[float] = None

    def snapshot(self) -> SimRequest:
        return SimRequest(self.t_s, self.node_id, self.path, self.model, self.stream, self.prefill,
                          self.attempt, self.outcome, self.status, self.done_s)


class RequestLog:
    """Thread-safe.  Counters are exact; the log keeps the last ``size`` requests."""

    def __init__(self, clock: Callable[[], float], size: int) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: Deque[_Entry] = deque(maxlen=size)
        self._attempts: Dict[Tuple[str, str], int] = {}  # (node_id, model) -> requests
        self._per_model: Dict[str, int] = {}
        self._epoch = clock()

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()
            self._attempts = {}
            self._per_model = {}
            self._epoch = self._clock()

    def begin(self, node_id: str, path: str, model: Optional[str], stream: bool, prefill: bool) -> _Entry:
        now = self._clock()
        with self._lock:
            attempt = 0
            if model is not None:
                attempt = self._per_model.get(model, 0) + 1
                self._per_model[model] = attempt
                key = (node_id, model)
                self._attempts[key] = self._attempts.get(key, 0) + 1
            entry = _Entry(now - self._epoch, node_id, path, model, stream, prefill, attempt)
            self._entries.append(entry)
        return entry

    def finish(self, entry: _Entry, outcome: str, status: int) -> None:
        now = self._clock()
        with self._lock:
            entry.outcome, entry.status, entry.done_s = outcome, status, now - self._epoch

    def attempts(self, model: Optional[str] = None, node_id: Optional[str] = None) -> int:
        with self._lock:
            return sum(n for (node, m), n in self._attempts.items()
                       if (model is None or m == model) and (node_id is None or node == node_id))

    def entries(self, model: Optional[str] = None, node_id: Optional[str] = None) -> List[SimRequest]:
        with self._lock:
            return [e.snapshot() for e in self._entries
                    if (model is None or e.model == model) and (node_id is None or e.node_id == node_id)]
