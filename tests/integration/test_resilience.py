"""Breakers and hedging against the simulated gateway (loopback only)."""

from __future__ import annotations

import threading
import time

import pytest

from holysheep_lb import Client, Strategy
from holysheep_lb.simulator import SimulatedGateway

MSGS = [{"role": "user", "content": "hello there"}]


def wait_until(predicate, timeout_s=3.0):
    """Bounded polling (no bare sleeps): True once predicate() holds."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        if predicate():
            return True
        pause.wait(0.01)
    return predicate()


@pytest.fixture
def client_for():
    made = []

    def make(gw, **kw):
        kw.setdefault("health_check_interval_s", None)
        client = Client(nodes=gw.client_nodes(), **kw)
        made.append(client)
        return client

    yield make
    for c in made:
        c.close()


def test_sixteen_threads_share_one_breaker_without_being_serialised(client_for):
    with SimulatedGateway([{"id": "only", "latency_ms": 200}], seed=1) as gw:
        client = client_for(gw, breaker={"fail_max": 3}, pool_maxsize=16)
        start = threading.Barrier(17)
        done = []

        def call():
            start.wait()
            done.append(client.chat_completion(MSGS, model="gpt-4.1").model)

        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        start.wait()
        began = time.perf_counter()
        for t in threads:
            t.join(5)
        wall_s = time.perf_counter() - began
        assert done == ["gpt-4.1"] * 16
        assert wall_s < 0.6, f"16 calls of 200 ms took {wall_s:.2f} s: the breaker serialised them"
        assert gw.max_concurrency_seen("only") == 16
        [breaker] = client.breakers()
        assert (breaker["name"], breaker["state"]) == ("model:gpt-4.1", "closed")


class TailFirst(Strategy):
    """Always try the heavy-tail node first, so that every hedge goes to the steady one."""

    name = "tail_first"

    def choose(self, candidates, ctx):
        return next((n for n in candidates if n.id == "tail"), candidates[0])


def test_a_slow_answer_is_hedged_to_another_node_and_the_faster_answer_wins(client_for):
    nodes = [{"id": "tail", "latency_ms": 10}, {"id": "steady", "latency_ms": 20}]
    with SimulatedGateway(nodes, seed=1) as gw:
        client = client_for(gw, strategy=TailFirst(), hedge_delay_s=0.15, hedge_max_ratio=1.0)
        slow_calls = {1, 4}  # the tail: two calls in six take a second there
        results = []
        for i in range(6):
            gw.configure("tail", latency_ms=1000 if i in slow_calls else 10)
            began = time.perf_counter()
            resp = client.chat_completion(MSGS, model="gpt-4.1")
            results.append((resp.node_id, time.perf_counter() - began))
        for i, (node_id, wall_s) in enumerate(results):
            if i in slow_calls:
                assert node_id == "steady"
                assert 0.15 <= wall_s < 0.6, "hedged after the delay; not after the tail's full second"
            else:
                assert node_id == "tail" and wall_s < 0.15, "a fast answer is never hedged"
        hedges = client.stats()["hedges"]
        assert (hedges["sent"], hedges["won"]) == (2, 2)
        assert client.stats()["retry_budget"]["retries"] == 2, "hedges spend the retry budget"
        # the losers finish on their own threads; their answers are dropped
        assert wait_until(lambda: client.stats()["in_flight"] == 0 and gw.in_flight("tail") == 0)
        assert gw.counts() == {"tail": 6, "steady": 2}
        assert client.stats()["nodes"]["tail"]["successes"] == 6


def test_hedges_stay_within_their_default_cap(client_for):
    nodes = [{"id": "tail", "latency_ms": 10}, {"id": "steady", "latency_ms": 20}]
    with SimulatedGateway(nodes, seed=1) as gw:
        client = client_for(gw, strategy=TailFirst(), hedge_delay_s=0.001)
        for _ in range(20):
            client.chat_completion(MSGS, model="gpt-4.1")
        hedges = client.stats()["hedges"]
        assert hedges["max_ratio"] == 0.05
        assert hedges["sent"] == 1, "5% of 20 calls"


def test_a_losing_hedged_copy_is_recorded_in_the_spend_ledger(gateway_factory, make_client):
    """The gateway bills both copies of a hedged call: the ledger must see both."""
    import time as _time
    gw = gateway_factory([{"id": "a", "latency_ms": 200}, {"id": "b", "latency_ms": 200}])
    client = make_client(gw.client_nodes(), hedge_delay_s=0.02, hedge_max_ratio=1.0,
                         retry_budget_ratio=None, strategy="round_robin")
    for _ in range(6):
        client.chat_completion([{"role": "user", "content": "hi"}], model="gpt-4.1", max_tokens=50)
    served = gw.request_count("a", "/v1/chat/completions") + gw.request_count("b", "/v1/chat/completions")
    assert client.stats()["hedges"]["sent"] == 6 and served == 12
    deadline = _time.monotonic() + 5  # losing copies finish on their own threads
    while client.cost_report()["totals"]["requests"] < served and _time.monotonic() < deadline:
        threading.Event().wait(0.02)
    assert client.cost_report()["totals"]["requests"] == served
    assert client.stats()["in_flight"] == 0
