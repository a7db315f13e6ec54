"""holysheep_lb.contrib.redis without a server: Redis unreachable, on a fake clock.

(The Lua scripts and many processes run against a real redis-server in
tests/integration/test_redis.py.)
"""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest

redis = pytest.importorskip("redis", reason="the redis extra is not installed: pip install -e '.[test]'")

from holysheep_lb import (  # noqa: E402
    Budget,
    BudgetExceededError,
    CircuitOpenError,
    ConfigError,
    RateLimitExceeded,
    SharedStateUnavailableError,
)
from holysheep_lb.breakers import BreakerBoard  # noqa: E402
from holysheep_lb.config import BreakerSettings  # noqa: E402
from holysheep_lb.contrib.redis import RedisSharedState  # noqa: E402
from holysheep_lb.errors import NoHealthyNodeError  # noqa: E402
from holysheep_lb.pricing import PriceTable, Reservation, SpendLedger  # noqa: E402
from tests.conftest import chat_body  # noqa: E402

MSGS = [{"role": "user", "content": "x" * 40}]  # 10 + 4 prompt tokens


class DownRedis(redis.Redis):
    """A redis-py client whose every command fails as if the server were gone."""

    def __init__(self, **kw) -> None:
        super().__init__(host="127.0.0.1", port=1, **kw)
        self.commands = []

    def execute_command(self, *args, **options):
        self.commands.append(args[0])
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


@pytest.fixture
def down():
    return DownRedis()


def shared_state(client, clock, **kw) -> RedisSharedState:
    kw.setdefault("retry_interval_s", 1.0)
    kw.setdefault("warn_interval_s", 60.0)
    return RedisSharedState(client, prefix="app:", clock=clock, sleep=clock.sleep, **kw)


def redis_warnings(caplog):
    return [r for r in caplog.records if r.name == "holysheep_lb.contrib.redis" and r.levelno == logging.WARNING]


def test_fail_open_limits_are_held_in_the_process_with_one_warning_per_interval(down, clock, caplog):
    state = shared_state(down, clock)
    bucket = state.rate_limiter_factory("requests", 1.0, 3)
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]  # the local bucket's 3
    assert down.commands == ["EVALSHA"]  # one try; then Redis is left alone for retry_interval_s
    clock.advance(1.0)
    bucket.acquire(1, timeout=5)  # tries Redis once more, then the local bucket has its token
    assert down.commands == ["EVALSHA"] * 2
    for _ in range(50):
        clock.advance(1.0)
        bucket.acquire(1, timeout=5)
    assert len(down.commands) == 52
    warnings = redis_warnings(caplog)
    assert len(warnings) == 1  # one per warn_interval_s, not one per call
    assert "Redis is unreachable (ConnectionError" in warnings[0].getMessage()
    clock.advance(10.0)  # past the warning interval
    bucket.acquire(1, timeout=5)
    warnings = redis_warnings(caplog)
    assert len(warnings) == 2
    assert "52 failure(s) since the last warning" in warnings[1].getMessage()
    assert state.status() == {"reachable": False, "down_for_s": 61.0, "failures": 53, "outages": 1,
                              "slow_answers": 0, "fail_open": True, "pending_spend_records": 0}


def test_fail_open_limits_count_the_refusals_of_the_local_bucket(down, clock):
    bucket = shared_state(down, clock).rate_limiter_factory("requests", 1.0, 1)
    bucket.acquire(1, timeout=0)
    with pytest.raises(RateLimitExceeded):
        bucket.acquire(1, timeout=0)
    snap = bucket.snapshot()
    assert (snap["shared"], snap["waits"], snap["rejections"]) == (False, 0, 1)


def test_fail_open_breakers_trip_in_the_process_and_pybreaker_logs_nothing(down, clock, caplog):
    state = shared_state(down, clock)
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=2, reset_timeout_s=30, trial_interval_s=30),
                         storage_factory=state.breaker_storage)
    for _ in range(2):
        board.admit("model", "gpt-4.1").record(NoHealthyNodeError("down"))
    with pytest.raises(CircuitOpenError) as opened:
        board.admit("model", "gpt-4.1")
    assert opened.value.retry_after_s == pytest.approx(30, abs=1)
    assert [b["state"] for b in board.snapshot()] == ["open"]
    assert not [r for r in caplog.records if r.name.startswith("pybreaker")]
    assert len(redis_warnings(caplog)) == 1


def test_fail_open_budgets_are_held_in_the_process_and_spend_waits_for_redis(down, clock):
    state = shared_state(down, clock)
    prices = PriceTable({"m": {"input": 1.0, "output": 1.0}}, include_defaults=False)
    ledger = SpendLedger(prices, store=state.spend_store, budget=Budget(daily_usd=0.0001),
                         wall_clock=lambda: 1.78e9)
    spent = 0
    with pytest.raises(BudgetExceededError):
        for _ in range(100):
            reservation = ledger.admit("m", MSGS, {"max_tokens": 10})  # 24 tokens: $0.000024
            ledger.settle(reservation, {"prompt_tokens": 14, "completion_tokens": 10})
            spent += 1
    assert spent == 4  # 4 x $0.000024 fit under $0.0001, held by this process alone
    assert state.spend_store.pending() == 4  # to be written to Redis when it is back
    rows = state.spend_store.rows()
    assert [(r.model, r.requests, r.cost_usd) for r in rows] == [("m", 4, Decimal("0.000096"))]
    assert state.spend_store.reserved_usd() == 0


def test_fail_closed_refuses_calls_and_never_raises_when_recording(down, clock):
    state = shared_state(down, clock, fail_open=False)
    bucket = state.rate_limiter_factory("tokens:gpt-4.1", 100.0, 1000)
    with pytest.raises(SharedStateUnavailableError) as refused:
        bucket.acquire(10, timeout=1)
    assert refused.value.what == "rate limit 'tokens:gpt-4.1'"
    assert isinstance(refused.value.__cause__, redis.ConnectionError)
    with pytest.raises(SharedStateUnavailableError):
        bucket.try_acquire(1)
    bucket.adjust(-10)  # correcting an estimate after a call never raises

    reservation = Reservation("gpt-4.1", "2026-11-26", 10, 10, Decimal("0.0001"))
    with pytest.raises(SharedStateUnavailableError) as no_budget:
        state.spend_store.try_reserve(reservation, [])
    assert no_budget.value.what == "budget"
    state.spend_store.settle(reservation, input_tokens=10, output_tokens=10, cost_usd=Decimal("0.0001"))
    state.spend_store.cancel(reservation)
    assert state.spend_store.pending() == 2

    board = BreakerBoard(storage_factory=state.breaker_storage)
    with pytest.raises(CircuitOpenError):  # breakers read as open while Redis is away
        board.admit("model", "gpt-4.1")


def test_a_client_keeps_answering_with_redis_down(down, rsps, make_client):
    rsps.post("https://a.example/v1/chat/completions", json=chat_body())
    state = RedisSharedState(down)  # real clocks: the local bucket blocks on a Condition
    client = make_client([{"id": "a", "base_url": "https://a.example/v1"}], requests_per_minute=2,
                         deadline_s=0.1, budget={"daily_usd": 10}, **state.client_options())
    assert client.chat_completion(MSGS, model="gpt-4.1")["choices"]
    with pytest.raises(RateLimitExceeded):  # the local bucket of 2 per minute holds: a burst of 1
        client.chat_completion(MSGS, model="gpt-4.1")
    assert client.cost_report()["totals"]["requests"] == 1


@pytest.mark.parametrize("kwargs, field", [
    ({"prefix": ""}, "prefix"),
    ({"prefix": "my app:"}, "prefix"),
    ({"fail_open": "yes"}, "fail_open"),
    ({"warn_interval_s": 0}, "warn_interval_s"),
    ({"retry_interval_s": float("nan")}, "retry_interval_s"),
    ({"retain_days": 7}, "retain_days"),
    ({"redis_time": 5}, "redis_time"),
])
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ConfigError) as bad:
        RedisSharedState("redis://127.0.0.1:1/0", **kwargs)
    assert bad.value.field == field


def test_the_redis_client_is_checked_and_a_password_never_shown():
    with pytest.raises(ConfigError, match="decode_responses"):
        RedisSharedState(redis.Redis(decode_responses=True))
    with pytest.raises(ConfigError) as bad_url:
        RedisSharedState("http://user:hunter2@cache:6379/0")
    assert "hunter2" not in str(bad_url.value)
    with pytest.raises(ConfigError):
        RedisSharedState(object())
    state = RedisSharedState("rediss://user:hunter2@cache:6379/3", prefix="p:")
    assert repr(state) == "<RedisSharedState cache:6379/3 prefix='p:' fail_open=True>"
    state.close()


# -- Redis answering garbage ------------------------------------------------------------------

GARBAGE = [b"OK", 7, None, [], [5], [b"x", b"y", b"z"], [1, b"nan", b"1"], [2, b"0", b"0"], {"a": 1},
           b"\xff\xfe", [b"1", b"0", b"inf"], 1.5]


class GarbageRedis(redis.Redis):
    """A redis-py client whose every command returns ``garbage`` (pipelines too)."""

    def __init__(self, garbage, **kw) -> None:
        super().__init__(host="127.0.0.1", port=1, **kw)
        self.garbage = garbage
        self.commands = []

    def execute_command(self, *args, **options):
        self.commands.append(args[0])
        return self.garbage

    def pipeline(self, transaction=True, shard_hint=None):
        return _GarbagePipeline(self)


class _GarbagePipeline:
    def __init__(self, client: GarbageRedis) -> None:
        self._client = client

    def __getattr__(self, name):
        return lambda *args, **kw: self  # queues nothing: execute() answers garbage anyway

    def execute(self):
        self._client.commands.append("EXEC")
        return self._client.garbage


def _every_operation(state):
    """Each public operation of the shared state once; what they returned."""
    bucket = state.rate_limiter_factory("requests", 1.0, 3)
    out = [bucket.try_acquire(), bucket.acquire(1, timeout=5), bucket.adjust(1), bucket.available(),
           bucket.snapshot()["shared"]]
    store = state.spend_store
    reservation = Reservation("gpt-4.1", "2026-11-26", 10, 10, Decimal("0.0001"))
    out += [store.try_reserve(reservation, []),
            store.settle(reservation, input_tokens=10, output_tokens=10, cost_usd=Decimal("0.0001")),
            store.cancel(Reservation("gpt-4.1", "2026-11-26", 1, 1, Decimal("0.0001"))),
            store.record_cache_hit("gpt-4.1", "2026-11-26"), store.rows(), store.reserved_usd()]
    board = BreakerBoard(model_settings=BreakerSettings(fail_max=2, reset_timeout_s=30),
                         storage_factory=state.breaker_storage)
    board.admit("model", "gpt-4.1").record(NoHealthyNodeError("down"))
    out += [board.allows("model", "gpt-4.1"), [b["state"] for b in board.snapshot()]]
    return out


@pytest.mark.parametrize("garbage", GARBAGE, ids=repr)
def test_garbage_answers_count_as_redis_unreachable_and_fail_open(garbage, clock, caplog):
    client = GarbageRedis(garbage)
    state = shared_state(client, clock, retry_interval_s=0.5)
    for _ in range(2):
        out = _every_operation(state)
        clock.advance(1.0)  # past the retry interval: Redis is asked again, and answers garbage again
    assert out[:5] == [True, None, None, 0.0, False]  # the local bucket of 3 decided
    assert client.commands  # Redis was asked, and its answers were refused
    warnings = redis_warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert "unexpected answer" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.name == "holysheep_lb.breakers" and r.levelno >= logging.WARNING]
    assert state.status()["reachable"] is False


@pytest.mark.parametrize("garbage", GARBAGE, ids=repr)
def test_garbage_answers_fail_closed_with_typed_errors_only(garbage, clock):
    state = shared_state(GarbageRedis(garbage), clock, fail_open=False)
    bucket = state.rate_limiter_factory("requests", 1.0, 3)
    with pytest.raises(SharedStateUnavailableError) as refused:
        bucket.try_acquire()
    assert "unexpected answer" in str(refused.value)
    clock.advance(2.0)
    with pytest.raises(SharedStateUnavailableError):
        state.spend_store.try_reserve(Reservation("gpt-4.1", "2026-11-26", 10, 10, Decimal("0.0001")), [])
    clock.advance(2.0)
    if garbage is not None:  # None is what GET answers for a breaker never written: closed
        with pytest.raises(CircuitOpenError):
            BreakerBoard(storage_factory=state.breaker_storage).admit("model", "gpt-4.1")
    bucket.adjust(-1)  # recording never raises
    state.spend_store.record_cache_hit("gpt-4.1", "2026-11-26")


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_client_call_gets_an_answer_or_a_typed_error_from_a_garbage_redis(fail_open, rsps, make_client):
    rsps.post("https://a.example/v1/chat/completions", json=chat_body())
    state = RedisSharedState(GarbageRedis([b"x", 3]), fail_open=fail_open)
    client = make_client([{"id": "a", "base_url": "https://a.example/v1"}], requests_per_minute=60,
                         tokens_per_minute=100_000, budget={"daily_usd": 10}, **state.client_options())
    if fail_open:
        assert client.chat_completion(MSGS, model="gpt-4.1")["choices"]
    else:
        with pytest.raises((SharedStateUnavailableError, CircuitOpenError)):
            client.chat_completion(MSGS, model="gpt-4.1")


# -- the per-minute rule (ratelimit branch) ---------------------------------------------------


def test_a_shared_minute_limit_may_hold_more_than_its_burst_while_idle_but_not_more_than_a_minute(clock):
    # factory(name, rate, burst): the bucket admits at most burst + 60 * rate in any minute,
    # so Redis may report up to that much (an idle bucket), never more
    idle = shared_state(GarbageRedis([1, b"0", b"63"]), clock).rate_limiter_factory("requests", 1.0, 3)
    assert idle.max_take == 63.0
    assert idle.try_acquire() is True
    assert idle.snapshot()["shared"] is True
    over = shared_state(GarbageRedis([1, b"0", b"63.5"]), clock).rate_limiter_factory("requests", 1.0, 3)
    assert over.try_acquire() is True  # refused as garbage: the local bucket decided
    assert over.snapshot()["shared"] is False
