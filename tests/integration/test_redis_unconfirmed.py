"""Unconfirmed spend (attempts that timed out after sending) in the Redis spend store:
the same rows and caps as the in-memory store, and kept through an outage."""

from __future__ import annotations

from decimal import Decimal

import pytest

pytest.importorskip("redis", reason="the redis extra is not installed: pip install -e '.[test]'")

from holysheep_lb.contrib.redis import RedisSharedState  # noqa: E402
from holysheep_lb.pricing import InMemorySpendStore, Limit, Reservation, SpendRow  # noqa: E402
from tests.integration.test_redis import prefix  # noqa: E402,F401 - fixture (redis_server: conftest)
from tests.test_contrib_redis import DownRedis, shared_state  # noqa: E402

DAY = "2026-11-26"


def test_unconfirmed_spend_matches_the_in_memory_store_and_counts_against_caps(redis_server, prefix):
    state = RedisSharedState(redis_server.url, prefix=prefix, retain_days=40)
    shared, local = state.spend_store, InMemorySpendStore()
    limits = [Limit(None, "day", Decimal("0.001")), Limit("gpt-4.1", "day", Decimal("0.0006"))]
    call = Reservation("gpt-4.1", DAY, 100, 10, Decimal("0.00028"))
    for store in (shared, local):
        assert store.try_reserve(call, limits) is None
        store.record_unconfirmed(call)  # timed out on one node after sending
        store.settle(call, input_tokens=90, output_tokens=12, cost_usd=Decimal("0.000276"))  # answered on another
    expected = [SpendRow(DAY, "gpt-4.1", requests=1, input_tokens=190, output_tokens=22,
                         cost_usd=Decimal("0.000556"), unconfirmed_calls=1, unconfirmed_usd=Decimal("0.00028"))]
    assert shared.rows() == local.rows() == expected
    assert shared.reserved_usd() == local.reserved_usd() == 0
    # both halves count against the model's cap: 0.000556 + 0.000045 > 0.0006
    for store in (shared, local):
        refused = store.try_reserve(Reservation("gpt-4.1", DAY, 1, 1, Decimal("0.000045")), limits)
        assert refused is not None and refused.spent_usd == Decimal("0.000556")


def test_unconfirmed_spend_made_while_redis_is_away_waits_for_it_like_other_spend(clock):
    state = shared_state(DownRedis(), clock)  # fail open: budgets held in this process meanwhile
    store = state.spend_store
    call = Reservation("gpt-4.1", DAY, 100, 10, Decimal("0.00028"))
    assert store.try_reserve(call, ()) is None
    store.record_unconfirmed(call)
    assert store.pending() == 1  # written to Redis once it is back
    assert [(r.requests, r.unconfirmed_calls, r.unconfirmed_usd, r.cost_usd) for r in store.rows()] == [
        (0, 1, Decimal("0.00028"), Decimal("0.00028"))]
    assert store.reserved_usd() == Decimal("0.00028")  # still held for the call's next attempt
