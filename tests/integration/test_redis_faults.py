"""Shared state against a Redis that misbehaves on 127.0.0.1: garbage answers, a broken
handshake, and a server that answers every command late.

A caller gets an answer or a typed error from holysheep_lb.errors, never a redis-py,
TypeError or IndexError; a slow Redis does not stretch a call past its deadline.
"""

from __future__ import annotations

import logging
import time

import pytest

redis = pytest.importorskip("redis", reason="the redis extra is not installed: pip install -e '.[test]'")

from holysheep_lb import Client, HolySheepError  # noqa: E402
from holysheep_lb.contrib.redis import RedisSharedState  # noqa: E402
from holysheep_lb.errors import CircuitOpenError, SharedStateUnavailableError  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.fake_redis import Err, FakeRedisServer, SlowRedisProxy, healthy_handshake, resp  # noqa: E402
from tests.integration.test_cost_control import MSGS  # noqa: E402

# What a client needs from Redis in one call: a budget, two rate limits, a model breaker.
LIMITS = {"requests_per_minute": 600, "tokens_per_minute": 1_000_000, "budget": {"daily_usd": 100}}


def redis_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("holysheep_lb") and r.levelno >= logging.WARNING]


# -- garbage --------------------------------------------------------------------------------

# answers a redis-server never gives to these commands
WIRE_GARBAGE = {
    "status": b"+OK\r\n",
    "integer": resp(7),
    "empty array": resp([]),
    "short array": resp([1]),
    "strings": resp([b"x", b"y", b"z"]),
    "not a number": resp([1, b"nan", b"1"]),
    "bytes": resp(b"\xff\xfe"),
    "map": resp({b"a": 1}),
    "error": resp(Err("ERR something odd")),
}


def answering(garbage: bytes):
    return lambda args: healthy_handshake(args) or garbage


@pytest.mark.parametrize("garbage", list(WIRE_GARBAGE.values()), ids=list(WIRE_GARBAGE))
def test_garbage_from_redis_never_reaches_the_caller(garbage, gateway_factory, caplog):
    gw = gateway_factory([{"id": "a"}])
    with FakeRedisServer(answering(garbage)) as fake:
        state = RedisSharedState(fake.url, prefix="g:", retry_interval_s=0.001)
        with Client(nodes=gw.client_nodes(), health_check_interval_s=None, **LIMITS,
                    **state.client_options()) as client:
            for _ in range(3):
                assert client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)["choices"]
            # the calls' answers were refused (an empty array is a fair answer to the report's
            # ZRANGE below, which may then find Redis reachable again)
            assert state.status()["reachable"] is False
            client.stats()
            client.cost_report()
        assert len(fake.commands) > 3  # Redis was asked each time, and each answer was refused
    warnings = redis_warnings(caplog)
    assert len(warnings) == 1, warnings  # one per warn_interval_s
    assert "shared state: Redis" in warnings[0]


HANDSHAKES = {"integer": resp(5), "array": resp([1, 2]), "bytes": resp(b"zz"), "status": b"+OK\r\n",
              "closed": None}


@pytest.mark.parametrize("hello", list(HANDSHAKES.values()), ids=list(HANDSHAKES))
@pytest.mark.parametrize("fail_open", [True, False])
def test_a_broken_handshake_is_redis_unreachable(hello, fail_open, gateway_factory):
    gw = gateway_factory([{"id": "a"}])

    def answer(args):
        return hello if args[0].upper() == b"HELLO" else healthy_handshake(args) or resp(1)

    with FakeRedisServer(answer) as fake:
        state = RedisSharedState(fake.url, prefix="h:", fail_open=fail_open)
        with Client(nodes=gw.client_nodes(), health_check_interval_s=None, **LIMITS,
                    **state.client_options()) as client:
            if fail_open:
                assert client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)["choices"]
            else:
                with pytest.raises((SharedStateUnavailableError, CircuitOpenError)):
                    client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)
        assert "HELLO" in fake.commands
    assert state.status()["reachable"] is False


# -- slow -----------------------------------------------------------------------------------


def _timed_call(client: Client, **kw) -> float:
    started = time.monotonic()
    client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5, **kw)
    return time.monotonic() - started


@pytest.mark.parametrize("made_from", ["url", "client"])
def test_a_slow_redis_does_not_stretch_a_call_past_its_deadline(made_from, redis_server, gateway_factory,
                                                                  caplog):
    caplog.set_level(logging.INFO, logger="holysheep_lb")
    gw = gateway_factory([{"id": "a"}])
    with SlowRedisProxy(redis_server.port, delay_s=0.0) as proxy:
        # 1 s socket timeouts: each late answer (0.8 s) still comes in time for redis-py
        target = proxy.url if made_from == "url" else redis.Redis.from_url(proxy.url, socket_timeout=1.0)
        state = RedisSharedState(target, prefix=f"slow-{made_from}:", socket_timeout_s=1.0, retry_interval_s=1.0)
        with Client(nodes=gw.client_nodes(), health_check_interval_s=None, deadline_s=1.0, **LIMITS,
                    **state.client_options()) as client:
            _timed_call(client)  # connected, scripts loaded
            proxy.delay_s = 0.8
            first_s = _timed_call(client)
            # the URL's connections give up after op_timeout_s (0.25 s); a client passed in
            # waits for its answer (0.8 s), which marks Redis as degraded all the same
            assert first_s < (0.6 if made_from == "url" else 1.4), first_s  # 2.4 s or more before
            assert state.status()["reachable"] is False
            later_s = [_timed_call(client) for _ in range(3)]
            assert max(later_s) < 0.2, later_s  # nobody pays for the slow Redis again
            proxy.delay_s = 0.0  # fast again: a probe after retry_interval_s finds out
            assert wait_until(lambda: _timed_call(client) >= 0 and state.status()["reachable"], timeout_s=10)
    messages = redis_warnings(caplog)
    assert len(messages) == 1 and "Redis is too slow" in messages[0], messages


def test_a_slow_redis_fails_closed_within_the_operation_budget(redis_server, gateway_factory):
    gw = gateway_factory([{"id": "a"}])
    with SlowRedisProxy(redis_server.port, delay_s=0.8) as proxy:
        state = RedisSharedState(proxy.url, prefix="slow-closed:", fail_open=False, op_timeout_s=0.2)
        with Client(nodes=gw.client_nodes(), health_check_interval_s=None, deadline_s=1.0, **LIMITS,
                    **state.client_options()) as client:
            started = time.monotonic()
            with pytest.raises(HolySheepError) as refused:
                client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)
            took_s = time.monotonic() - started
    assert isinstance(refused.value, (SharedStateUnavailableError, CircuitOpenError))
    assert took_s < 0.6, took_s
    assert gw.request_count("a") == 0


def test_answers_slower_than_half_the_budget_three_times_in_a_row_mark_redis_degraded(redis_server,
                                                                                     gateway_factory):
    gw = gateway_factory([{"id": "a"}])
    with SlowRedisProxy(redis_server.port, delay_s=0.0) as proxy:
        state = RedisSharedState(proxy.url, prefix="slowish:", op_timeout_s=0.25, retry_interval_s=60)
        with Client(nodes=gw.client_nodes(), health_check_interval_s=None, deadline_s=5.0, **LIMITS,
                    **state.client_options()) as client:
            _timed_call(client)  # connected, scripts loaded
            proxy.delay_s = 0.15
            first_s = _timed_call(client)
            assert state.status()["reachable"] is False
            assert state.status()["slow_answers"] == 3
            assert first_s < 0.9, first_s  # three slow answers (0.45 s), then no more Redis; 1.2 s before
            assert _timed_call(client) < 0.2
