"""Strategies under real concurrency against the simulated gateway."""

from __future__ import annotations

from holysheep_lb.loadgen import run_load

MSGS = [{"role": "user", "content": "ping"}]


def test_least_connections_sends_more_to_bigger_nodes(gateway_factory, make_client):
    gw = gateway_factory([{"id": "a", "capacity": 2, "latency_ms": 20},
                          {"id": "b", "capacity": 2, "latency_ms": 20},
                          {"id": "c", "capacity": 8, "latency_ms": 20},
                          {"id": "d", "capacity": 8, "latency_ms": 20}])
    client = make_client(gw.client_nodes(), strategy="least_connections")
    result = run_load(lambda i: client.chat_completion(MSGS, model="m"), requests=600, concurrency=20)
    assert result.error_rate == 0
    counts = gw.counts()
    small = max(counts["a"], counts["b"])
    big = min(counts["c"], counts["d"])
    assert big > 1.5 * small, counts
    assert client.stats()["in_flight"] == 0
