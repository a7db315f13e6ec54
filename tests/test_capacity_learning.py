"""Capacity found without weights: the real selector and strategies over a simulated
closed loop of capacity-limited nodes (tests/capacity_sim.py, fake clock, no sockets)."""

from __future__ import annotations

import pytest

from .capacity_sim import run_closed_loop

CAPACITIES = [4, 4, 8, 16]


@pytest.mark.parametrize("strategy", ["adaptive", "least_connections"])
@pytest.mark.parametrize("service_ms, jitter", [(50.0, 0.02), (200.0, 0.02), (200.0, 0.1)])
def test_unweighted_nodes_get_load_by_their_learned_capacity(strategy, service_ms, jitter):
    # 32 callers for 32 slots: every request sent past a node's capacity queues there
    # while a slot elsewhere idles. Equal shares reach 0.5 of the ideal (round robin).
    # Each answer is judged at the load it was sent into; the small nodes' limits come
    # out exact with steady latency (within one at 10% jitter), the big one's within a
    # request or so.
    run = run_closed_loop(CAPACITIES, service_ms=service_ms, threads=32, seconds=15, strategy=strategy,
                          jitter_sigma=jitter)
    assert run.ratio >= 0.95, (run.ratio, run.limits)
    slack = 0.0 if jitter < 0.05 else 1.0
    for small in ("n0", "n1"):
        assert run.limits[small] is not None and abs(run.limits[small] - 4.0) <= slack, run.limits
    assert run.limits["n2"] is not None and 7.0 <= run.limits["n2"] <= 9.0, run.limits


def test_equal_shares_are_what_learning_improves_on():
    run = run_closed_loop(CAPACITIES, service_ms=200.0, threads=32, seconds=10, strategy="round_robin")
    assert run.ratio == pytest.approx(0.5, abs=0.02)


def test_declared_weights_still_reach_the_ideal():
    run = run_closed_loop(CAPACITIES, service_ms=50.0, threads=32, seconds=10, weights=CAPACITIES)
    assert run.ratio >= 0.97, run.ratio


def test_nodes_that_never_saturate_learn_no_limit():
    run = run_closed_loop([64, 64], service_ms=100.0, threads=16, seconds=10, jitter_sigma=0.1)
    assert run.limits == {"n0": None, "n1": None}
    assert run.ratio * (128 / 0.1) == pytest.approx(16 / 0.1, rel=0.05)  # every caller served without queueing
