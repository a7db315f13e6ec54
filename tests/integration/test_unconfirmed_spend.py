"""Spend the gateway bills but the client never heard of: an attempt that timed out after
its request was sent keeps its estimate as (unconfirmed) spend."""

from __future__ import annotations

import socket

import pytest

from holysheep_lb import BudgetExceededError, Client
from holysheep_lb.errors import AllAttemptsFailedError, APIConnectionError, APITimeoutError

from ..conftest import API_KEY, chat_body
from .slow_server import SlowServer, json_answer

MSGS = [{"role": "user", "content": "hi"}]  # 1 + 4 = 5 prompt tokens
ESTIMATE_USD = 0.00081  # gpt-4.1: 5 * $2 + 100 * $8 per million (max_tokens=100)
ANSWER = json_answer(chat_body("gpt-4.1", 5, 50))  # 5 * 2 + 50 * 8 = $0.00041


def _client(nodes, **kw):
    kw.setdefault("health_check_interval_s", None)
    kw.setdefault("max_retries", 0)
    kw.setdefault("read_timeout_s", 0.2)
    kw.setdefault("stream_first_chunk_timeout_s", 0.2)
    return Client(api_key=API_KEY, nodes=nodes, strategy="round_robin", breaker=None, **kw)


@pytest.mark.parametrize("stream", [False, True])
def test_a_read_timeout_keeps_the_estimate_as_unconfirmed_spend(stream):
    with SlowServer(ANSWER, delay_s=0.3) as slow:
        with _client([{"id": "slow", "base_url": slow.base_url}]) as client:
            with pytest.raises(AllAttemptsFailedError) as info:
                client.chat_completion(MSGS, model="gpt-4.1", max_tokens=100, stream=stream)
            report = client.cost_report()
    assert isinstance(info.value.last_error, APITimeoutError) and info.value.last_error.request_sent
    assert report["totals"] == {"requests": 0, "cached_requests": 0, "input_tokens": 5, "output_tokens": 100,
                                "cost_usd": ESTIMATE_USD, "unconfirmed_calls": 1, "unconfirmed_usd": ESTIMATE_USD,
                                "cached_input_tokens": 0, "cache_write_tokens": 0, "cache_saved_usd": 0.0,
                                "unreadable_usage": 0, "cached_input_share": 0.0}
    assert report["in_flight_reserved_usd"] == 0.0


def test_an_answer_from_another_node_is_settled_as_well():
    with SlowServer(ANSWER, delay_s=0.3) as slow, SlowServer(ANSWER) as fast:
        nodes = [{"id": "slow", "base_url": slow.base_url}, {"id": "fast", "base_url": fast.base_url}]
        with _client(nodes, max_retries=1) as client:
            resp = client.chat_completion(MSGS, model="gpt-4.1", max_tokens=100)
            totals = client.cost_report()["totals"]
    assert resp.node_id == "fast" and [a.node_id for a in resp.attempts] == ["slow", "fast"]
    assert resp.extra["cost"]["cost_usd"] == 0.00041
    assert (totals["requests"], totals["unconfirmed_calls"]) == (1, 1)
    assert totals["cost_usd"] == pytest.approx(0.00041 + ESTIMATE_USD, abs=1e-12)
    assert totals["unconfirmed_usd"] == ESTIMATE_USD


def test_a_refused_connection_costs_nothing():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        with _client([{"id": "down", "base_url": f"http://127.0.0.1:{port}/v1"}]) as client:
            with pytest.raises(AllAttemptsFailedError) as info:
                client.chat_completion(MSGS, model="gpt-4.1", max_tokens=100)
            totals = client.cost_report()["totals"]
    assert isinstance(info.value.last_error, APIConnectionError)
    assert not isinstance(info.value.last_error, APITimeoutError)
    assert (totals["cost_usd"], totals["unconfirmed_calls"]) == (0.0, 0)


def test_a_cap_counts_unconfirmed_spend_so_it_errs_on_the_safe_side():
    with SlowServer(ANSWER, delay_s=0.3) as slow:
        with _client([{"id": "slow", "base_url": slow.base_url}], budget={"daily_usd": 0.0012}) as client:
            with pytest.raises(AllAttemptsFailedError):
                client.chat_completion(MSGS, model="gpt-4.1", max_tokens=100)
            with pytest.raises(BudgetExceededError) as info:  # 0.00081 spent + 0.00081 > 0.0012
                client.chat_completion(MSGS, model="gpt-4.1", max_tokens=100)
    assert info.value.spent_usd == ESTIMATE_USD
    assert sum(slow.requests.values()) == 1
