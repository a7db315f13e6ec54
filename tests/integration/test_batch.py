"""``Client.map`` against the simulated gateway: order, failover and exact accounting."""

from __future__ import annotations

import threading

from holysheep_lb import AllAttemptsFailedError, Client
from holysheep_lb.simulator import SimulatedGateway


def test_map_keeps_input_order_while_a_node_is_down_and_counts_add_up():
    with SimulatedGateway([{"id": "a", "latency_ms": 5, "p99_latency_ms": 40}, {"id": "b"},
                           {"id": "c", "fault": "refuse"}], seed=2) as gw:
        with Client(nodes=gw.client_nodes(), health_check_interval_s=None) as client:
            requests = [{"messages": [{"role": "user", "content": f"item {i}"}], "model": "m", "max_tokens": 50}
                        for i in range(64)]
            progress = []
            results = client.map(requests, max_workers=8, on_progress=lambda d, t: progress.append(d))
            assert [r.text for r in results] == [f"[m] Echo: item {i}" for i in range(64)]
            assert sorted(progress) == list(range(1, 65))
            stats = client.stats()
            assert stats["calls"] == stats["successes"] == 64 and stats["in_flight"] == 0
            served = gw.request_count("a", "/v1/chat/completions") + gw.request_count("b", "/v1/chat/completions")
            assert served == 64
            attempts = sum(n["requests"] for n in stats["nodes"].values())
            assert attempts == 64 + stats["nodes"]["c"]["requests"]  # each refused attempt was retried
            assert not [t for t in threading.enumerate() if t.name.startswith("holysheep-batch")]


def test_map_returns_all_attempts_failed_in_the_slots_when_every_node_is_down():
    with SimulatedGateway([{"id": "a", "fault": "refuse"}, {"id": "b", "fault": "refuse"}], seed=2) as gw:
        with Client(nodes=gw.client_nodes(), health_check_interval_s=None, max_retries=1,
                    backoff_base_s=0.0) as client:
            results = client.map([{"messages": [{"role": "user", "content": "x"}], "model": "m"}] * 5,
                                 max_workers=3)
            assert all(isinstance(r, AllAttemptsFailedError) for r in results)
            assert [len(r.attempts) for r in results] == [2] * 5
            assert client.stats()["failures_by_error"] == {"AllAttemptsFailedError": 5}
