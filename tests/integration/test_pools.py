"""Connection pools that fit the load: no "Connection pool is full" churn above the old
default of 32 per node, and sockets bounded by the callers' concurrency (counted at the servers)."""

import logging
import threading

import pytest

from holysheep_lb import Client
from tests.conftest import chat_body
from tests.integration.slow_server import SlowServer, json_answer

MSGS = [{"role": "user", "content": "hi"}]
THREADS, CALLS_EACH = 96, 6


def _hammer(servers, caplog, **options):
    nodes = [{"id": f"n{i}", "base_url": s.base_url} for i, s in enumerate(servers)]
    errors = []
    with Client(nodes=nodes, api_key="sk-pool-test", health_check_interval_s=None, strategy="round_robin",
                deadline_s=30.0, **options) as client:
        start = threading.Barrier(THREADS)

        def worker():
            try:
                start.wait(30)
                for _ in range(CALLS_EACH):
                    client.chat_completion(MSGS, model="m")
            except Exception as exc:  # every failure is reported by the assertion below
                errors.append(exc)

        with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
            pool = [threading.Thread(target=worker) for _ in range(THREADS)]
            for t in pool:
                t.start()
            for t in pool:
                t.join(60)
        assert not any(t.is_alive() for t in pool)
    assert not errors, errors[:3]
    assert sum(sum(s.requests.values()) for s in servers) == THREADS * CALLS_EACH
    full = [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
    return full, [s.accepted for s in servers]


@pytest.fixture
def two_nodes():
    answer = json_answer(chat_body("m"))
    with SlowServer(answer, delay_s=0.05) as a, SlowServer(answer, delay_s=0.05) as b:
        yield [a, b]


def test_96_threads_over_2_nodes_reuse_their_connections_with_the_default_pools(two_nodes, caplog):
    full, accepted = _hammer(two_nodes, caplog)
    assert full == []
    assert all(n <= THREADS for n in accepted), accepted  # at most one socket per concurrent caller
    # Reused, not reopened. The slack is for the split between the nodes, which shifts
    # on a busy machine (each node's pool grows to the most callers it had at once);
    # churn itself is what the log check above catches.
    assert sum(accepted) <= THREADS + THREADS // 2, accepted


def test_the_old_default_of_32_churned_connections(two_nodes, caplog):
    """The same load with 0.1's pool size: what the test above would catch."""
    full, accepted = _hammer(two_nodes, caplog, pool_maxsize=32)
    assert full, "a pool of 32 per node cannot keep 96 concurrent connections"
