"""A discrete-event model of a closed loop over capacity-limited nodes, on a fake clock.

``threads`` callers each send a request, wait for the answer and send the next one at
once. Each node serves at most ``capacity`` requests at a time, first come first served,
each taking ``service_ms`` (times a lognormal jitter factor): the simulated gateway's
``capacity``, without sockets or threads, so a run of thousands of calls takes a fraction
of a second and always gives the same answer. The real :class:`Selector` and strategy
choose the nodes, and learn from the latencies this model produces.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from holysheep_lb import Node
from holysheep_lb.nodes import EjectionPolicy, NodeState
from holysheep_lb.selection import Selector, make_strategy


class _NoTransport:
    def close(self) -> None:
        pass


@dataclass
class _Server:
    capacity: int
    service_ms: float
    busy: int = 0
    queue: Deque[Tuple[int, float]] = field(default_factory=deque)  # (caller, sent at)


@dataclass
class CapacityRun:
    calls: int
    seconds: float
    ideal_per_s: float
    share: Dict[str, int]
    limits: Dict[str, Optional[float]]
    max_in_flight: Dict[str, int]

    @property
    def ratio(self) -> float:
        return self.calls / self.seconds / self.ideal_per_s


def run_closed_loop(capacities: Sequence[int], *, service_ms: float, threads: int, seconds: float,
                    strategy: str = "adaptive", weights: Optional[Sequence[float]] = None,
                    jitter_sigma: float = 0.0, warmup_s: float = 2.0, seed: int = 1) -> CapacityRun:
    """Run the loop for ``warmup_s`` (not counted) then ``seconds``; throughput vs the ideal
    ``sum(capacities) / service`` (reachable when ``threads >= sum(capacities)``)."""
    rng = random.Random(seed)
    now = [0.0]
    states = [NodeState(Node(id=f"n{i}", base_url=f"http://127.0.0.1:1/n{i}",
                             weight=(weights[i] if weights else 1.0)), _NoTransport())  # type: ignore[arg-type]
              for i in range(len(capacities))]
    sel = Selector(states, make_strategy(strategy), ejection=EjectionPolicy(jitter=0.0),
                   clock=lambda: now[0], rand=rng.random)
    servers = {s.id: _Server(c, service_ms) for s, c in zip(states, capacities)}
    events: List[Tuple[float, int, int, NodeState, float]] = []  # (done at, seq, caller, node, sent at)
    seq = itertools.count()
    calls = 0
    share: Counter = Counter()
    end_warmup, end = warmup_s, warmup_s + seconds
    max_seen: Counter = Counter()

    def start_service(caller: int, node: NodeState, sent: float) -> None:
        server = servers[node.id]
        server.busy += 1
        took = server.service_ms / 1000.0 * (rng.lognormvariate(0.0, jitter_sigma) if jitter_sigma else 1.0)
        heapq.heappush(events, (now[0] + took, next(seq), caller, node, sent))

    def send(caller: int) -> None:
        sent = now[0]
        node = sel.pick(started=sent)
        max_seen[node.id] = max(max_seen[node.id], node.in_flight)
        server = servers[node.id]
        if server.busy < server.capacity:
            start_service(caller, node, sent)
        else:
            server.queue.append((caller, sent))

    for caller in range(threads):
        send(caller)
    while events:
        done, _, caller, node, sent = heapq.heappop(events)
        if done > end:
            break
        now[0] = done
        server = servers[node.id]
        server.busy -= 1
        if server.queue:
            waiting, waiting_sent = server.queue.popleft()
            start_service(waiting, node, waiting_sent)
        sel.release_success(node, (done - sent) * 1000.0, started=sent)
        if done >= end_warmup:
            calls += 1
            share[node.id] += 1
        send(caller)
    ideal = sum(capacities) / (service_ms / 1000.0)
    return CapacityRun(calls=calls, seconds=seconds, ideal_per_s=ideal, share=dict(share),
                       limits={s.id: s.concurrency.limit() for s in states}, max_in_flight=dict(max_seen))
