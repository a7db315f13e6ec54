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


def test_past_a_learned_limit_a_small_rise_is_queueing_but_not_before_one():
    fresh = ConcurrencyLimit()
    for _ in range(40):  # 15% slower at 11 in flight: within jitter for a node never seen to saturate
        for n, ms in ((1, 100.0), (2, 100.0), (11, 115.0)):
            fresh.observe(n, ms, now=0.0)
    assert fresh.limit() is None
    learned = ConcurrencyLimit()
    _queueing_node(learned, capacity=4, service_ms=100.0, loads=[1, 2, 8])
    assert learned.limit() is not None
    learned._limit = 10.0  # as if the node had grown to 10; then 11 in flight answer 15% slower
    queued_before = learned.snapshot()["queued_samples"]
    for _ in range(20):
        learned.observe(11, 115.0, now=0.0)
    assert learned.snapshot()["queued_samples"] - queued_before >= 15
    assert learned.limit() == pytest.approx(11 / 1.15, abs=0.3)


def test_the_limit_admits_its_nearest_whole_request_count():
    limit = ConcurrencyLimit()
    limit._limit = 4.4
    assert limit.is_hot(4) and not limit.is_hot(3)
    limit._limit = 4.5
    assert not limit.is_hot(4) and limit.is_hot(5)


def test_no_queueing_at_the_limit_creeps_up_about_one_request_per_probe_rounds_round_trips():
    limit = ConcurrencyLimit(probe_rounds=12.0)
    _queueing_node(limit, capacity=4, service_ms=100.0, loads=[1, 2, 3, 4, 6])
    start = limit.limit()
    assert start is not None
    for _ in range(int(12 * start)):  # ~12 round trips of 4 answers at the limit, none queued
        limit.observe(int(limit.limit() + 0.5), 100.0, now=0.0)
    assert start + 0.8 <= limit.limit() <= start + 1.2
