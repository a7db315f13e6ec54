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


def test_a_queueing_node_is_learned_near_its_capacity():
    limit = ConcurrencyLimit()
    _queueing_node(limit, capacity=4, service_ms=200.0, loads=[2, 3, 4, 5, 6, 7, 8])
    assert limit.limit() == pytest.approx(4.0, abs=1.0)
    assert limit.is_hot(5) and not limit.is_hot(2)
    assert limit.snapshot()["queued_samples"] > 0


def test_jitter_alone_is_not_queueing():
    rng = random.Random(7)
    limit = ConcurrencyLimit()
    for _ in range(3000):  # lognormal latency (p99 ~2.6 x median), independent of load
        limit.observe(rng.randint(1, 30), 35.0 * rng.lognormvariate(0.0, 0.41), now=0.0)
    # bucket averages still differ by chance: at worst a limit well above half the load seen
    assert limit.limit() is None or limit.limit() > 15


def test_the_limit_grows_back_when_the_node_stops_queueing():
    limit = ConcurrencyLimit()
    _queueing_node(limit, capacity=4, service_ms=100.0, loads=[1, 2, 3, 4, 6, 8])
    learned = limit.limit()
    assert learned is not None
    for _ in range(3000):  # the node got bigger: no queueing, load up to the limit (as picks allow)
        n = int((limit.limit() or 1) + 0.5)
        limit.observe(n, 100.0, now=0.0)
    assert limit.limit() > learned + 3


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
