"""Hangs, quotas and concurrency limits end to end, against the simulated gateway on 127.0.0.1."""

from __future__ import annotations

import threading
import time

from holysheep_lb.loadgen import run_load

MSGS = [{"role": "user", "content": "ping"}]


def test_calls_stuck_on_a_node_that_hangs_are_rescued_long_before_their_read_timeout(gateway_factory, make_client):
    gw = gateway_factory([{"id": "a", "latency_ms": 5}, {"id": "b", "latency_ms": 5}])
    client = make_client(gw.client_nodes(), strategy="round_robin", read_timeout_s=20.0, deadline_s=30.0,
                         backoff_base_s=0.001)
    for _ in range(60):  # both nodes measured: their hang threshold is the 0.25 s floor
        client.chat_completion(MSGS, model="m")
    gw.configure("b", fault="hang", hang_s=30)
    stop = threading.Event()
    lock = threading.Lock()
    calls = []  # (elapsed_s, response or error)

    def caller() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                outcome = client.chat_completion(MSGS, model="m")
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcome = exc
            with lock:
                calls.append((time.monotonic() - t0, outcome))

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    stop.wait(2.0)  # bounded run; the hung node holds its calls for 30 s, the read timeout is 20 s
    stop.set()
    for t in threads:
        t.join(timeout=15.0)
    gw.configure("b", fault=None)
    assert not any(t.is_alive() for t in threads)
    assert calls and all(not isinstance(outcome, Exception) for _, outcome in calls)
    assert max(elapsed for elapsed, _ in calls) < 5.0
    rescued = [r for _, r in calls if any(a.node_id == "b" and "hung" in a.error for a in r.attempts)]
    assert rescued and all(r.node_id == "a" for r in rescued)
    b = next(n for n in client.nodes() if n["id"] == "b")
    assert b["hung_calls_rescued"] >= 1


def test_quota_headers_show_in_nodes_and_keep_calls_off_a_spent_node(gateway_factory, make_client):
    gw = gateway_factory([{"id": "a", "latency_ms": 1, "requests_per_minute": 5},
                          {"id": "b", "latency_ms": 1, "requests_per_minute": 6000}])
    client = make_client(gw.client_nodes(), strategy="round_robin", max_retries=0)
    for _ in range(40):
        client.chat_completion(MSGS, model="m")  # no 429 reaches us
    a = next(n for n in client.nodes() if n["id"] == "a")
    assert a["quota"]["requests"]["limit"] == 5
    assert a["quota"]["requests"]["remaining"] <= 1
    assert a["reason"] == "quota"
    assert sum(gw.quota_stats("a").values()) == 0  # stopped before the node said 429
    assert gw.counts()["a"] == 4  # 5 in its bucket, one kept in reserve
    assert client.stats()["nodes"]["a"]["quota_garbage_headers"] == 0


def test_adaptive_learns_small_nodes_limits_without_weights(gateway_factory, make_client):
    gw = gateway_factory([{"id": "small", "capacity": 2, "latency_ms": 30},
                          {"id": "big", "capacity": 12, "latency_ms": 30}])
    client = make_client(gw.client_nodes(), strategy="adaptive")
    # 20 callers: more than the big node serves at once, so it queues too and the small one is
    # driven past its capacity whatever its first (cold, maybe slow) answers said
    result = run_load(lambda i: client.chat_completion(MSGS, model="m"), requests=1500, concurrency=20)
    assert result.error_rate == 0
    small = next(n for n in client.nodes() if n["id"] == "small")
    # a limit is learned only once the node has queued, which depends on this machine's
    # timing (tests/test_concurrency.py pins the learning on a fake clock); when it is
    # learned, it is near the real capacity of 2, and the traffic follows capacity anyway
    assert small["concurrency_limit"] is None or small["concurrency_limit"] < 6, small
    counts = gw.counts()
    assert counts["big"] > 2.5 * counts["small"], counts
