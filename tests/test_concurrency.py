"""The per-node concurrency limit learned from latency by in-flight count."""

from __future__ import annotations

import random

import pytest

from holysheep_lb.concurrency import MAX_TRACKED, ConcurrencyLimit


def _queueing_node(limit: ConcurrencyLimit, capacity: int, service_ms: float, loads, rounds: int = 40) -> None:
    """Feed answers of a FIFO node of ``capacity`` slots: latency = service × max(1, n / capacity)."""
    for _ in range(rounds):
        for n in loads:
            limit.observe(n, service_ms * max(1.0, n / capacity), now=0.0)


def test_unknown_until_the_node_queues():
    limit = ConcurrencyLimit()
    _queueing_node(limit, capacity=16, service_ms=50.0, loads=range(1, 12))
    assert limit.limit() is None
    assert not limit.is_hot(100)
    assert limit.base_latency_ms() == pytest.approx(50.0)


def test_a_queueing_node_is_learned_at_its_capacity():
    limit = ConcurrencyLimit()
    _queueing_node(limit, capacity=4, service_ms=200.0, loads=[2, 3, 4, 5, 6, 7, 8])
    assert limit.limit() == 4.0
    assert limit.is_hot(4) and not limit.is_hot(3)
    assert limit.snapshot()["queued_samples"] > 0


def test_a_big_node_is_learned_although_one_past_its_capacity_barely_queues():
    # at 17 in flight a node of 16 answers 6% slower: inside the jitter margin. The loads
    # that clearly queue (Little's law: n x base / latency) still say 16.
    limit = ConcurrencyLimit()
    _queueing_node(limit, capacity=16, service_ms=50.0, loads=range(8, 25))
    assert limit.limit() == 16.0


@pytest.mark.parametrize("seed", [1, 7, 42])
def test_jitter_alone_is_not_queueing(seed):
    rng = random.Random(seed)
    limit = ConcurrencyLimit()
    for _ in range(3000):  # lognormal latency (p99 ~2.6 x median), independent of load
        limit.observe(rng.randint(1, 30), 35.0 * rng.lognormvariate(0.0, 0.41), now=0.0)
    assert limit.limit() is None


def test_latency_that_grows_with_a_busy_client_is_not_a_limit():
    # A client's own CPU slows every answer a little more at each extra request in
    # flight (here 1% each, 30% at 31), yet the node serves more at once the more it is
    # sent: 31 x base / 1.3 base = 24 at once. That is no queue of this node's.
    limit = ConcurrencyLimit()
    for _ in range(60):
        for n in range(1, 32):
            limit.observe(n, 35.0 * (1.0 + 0.01 * (n - 1)), now=0.0)
    assert limit.limit() is None


def test_a_lucky_handful_of_fast_answers_does_not_set_the_base():
    # Five fast answers at one load, then ordinary jittery ones at another: the fast
    # average is known only to within its few answers' noise, so it cannot make the
    # ordinary load look like queueing (it used to pin the base and a limit of 1).
    rng = random.Random(3)
    limit = ConcurrencyLimit()
    for _ in range(5):
        limit.observe(3, 30.0, now=0.0)
    for _ in range(2000):
        limit.observe(1, 50.0 * rng.lognormvariate(0.0, 0.4), now=0.0)
    assert limit.limit() is None


def test_queueing_older_than_the_horizon_is_forgotten():
    limit = ConcurrencyLimit(horizon_s=30.0)
    for _ in range(40):
        for n in (1, 2, 3, 4, 6, 8):
            limit.observe(n, 100.0 * max(1.0, n / 4), now=0.0)
    assert limit.limit() == 4.0
    for i in range(100):  # held at its limit for a while: no sign of queueing since
        limit.observe(4, 100.0, now=20.0 + i * 0.1)
    assert limit.limit() == 4.0
    limit.observe(4, 100.0, now=31.0)  # the loads that queued were last seen 31 s ago
    assert limit.limit() is None  # unbounded until it queues again


def test_the_limit_grows_when_loads_past_it_stop_queueing():
    limit = ConcurrencyLimit()
    _queueing_node(limit, capacity=4, service_ms=100.0, loads=[1, 2, 3, 4, 6, 8])
    assert limit.limit() == 4.0
    for _ in range(300):  # the node got bigger: loads past the limit now answer at the base
        for n in range(1, 9):
            limit.observe(n, 100.0, now=0.0)
    assert limit.limit() is None or limit.limit() >= 8


def test_a_node_that_queues_at_every_load_seen_gets_a_limit_from_littles_law():
    limit = ConcurrencyLimit()
    for _ in range(3):
        for n in (1, 2):
            limit.observe(n, 100.0, now=0.0)
    for _ in range(40):
        limit.observe(8, 200.0, now=0.0)
    assert limit.limit() == 4.0


def test_bad_samples_are_ignored_and_memory_is_bounded():
    limit = ConcurrencyLimit()
    for value in (0.0, -1.0, float("nan")):
        limit.observe(3, value, now=0.0)
    limit.observe(0, 10.0, now=0.0)
    assert limit.samples == 0
    limit.observe(10 ** 6, 10.0, now=0.0)  # shares the last slot
    assert limit.samples == 1 and len(limit._count) == MAX_TRACKED + 1


def test_forget_drops_what_was_learned():
    limit = ConcurrencyLimit()
    _queueing_node(limit, capacity=2, service_ms=10.0, loads=[1, 2, 4])
    assert limit.limit() is not None
    limit.forget()
    assert limit.limit() is None and limit.base_latency_ms() is None
