"""The one token estimate: budgets, rate limits, the router and the simulator count alike."""

from __future__ import annotations

from decimal import Decimal

import pytest

from holysheep_lb import pricing, prices, ratelimit, tokens
from holysheep_lb.ledger import SpendLedger
from holysheep_lb.models import RoutingRequest
from holysheep_lb.pricing import Budget, PriceTable
from holysheep_lb.simulator.plans import plan_chat
from holysheep_lb.tokens import (
    content_chars,
    estimate_call_tokens,
    estimate_input_tokens,
    estimate_prompt_tokens,
    requested_output_tokens,
    reserved_output_tokens,
)

MSGS = [{"role": "system", "content": "abc"}, {"role": "user", "content": "x" * 400}]


def test_four_characters_a_token_rounded_up_plus_four_a_message():
    assert estimate_prompt_tokens([{"role": "user", "content": "x" * 400}]) == 104
    assert estimate_prompt_tokens([{"role": "user", "content": "x" * 401}]) == 105
    assert estimate_prompt_tokens(MSGS) == 101 + 8  # the characters are summed first: ceil(403 / 4)
    assert estimate_prompt_tokens([{"role": "assistant", "content": None}]) == 4


def test_text_parts_count_and_other_parts_do_not():
    parts = ["ab", {"type": "text", "text": "cdef"}, {"type": "image_url", "image_url": {"url": "x" * 99}},
             {"type": "text", "text": None}, 7]
    assert content_chars(parts) == 6
    assert content_chars(tuple(parts)) == 6
    assert estimate_prompt_tokens([{"role": "user", "content": parts}]) == 2 + 4


@pytest.mark.parametrize("messages", [None, [], "hello", {"role": "user", "content": "hello"}, b"hi"])
def test_what_is_not_a_list_of_messages_counts_nothing(messages):
    assert estimate_prompt_tokens(messages) == 0


def test_a_message_that_is_not_a_mapping_counts_its_framing_only():
    assert estimate_prompt_tokens(["x" * 40, {"role": "user", "content": "abcd"}]) == 1 + 8


def test_embeddings_input_is_a_string_or_a_list_of_strings():
    assert estimate_input_tokens("abcdefgh") == 2
    assert estimate_input_tokens(["abcd", "efgh", 12, None]) == 2
    assert estimate_input_tokens([[1, 2, 3]]) == 0
    assert estimate_input_tokens(None) == 0


def test_the_output_cap_is_max_tokens_then_max_completion_tokens():
    assert requested_output_tokens({}) is None
    assert requested_output_tokens({"max_tokens": 50}) == 50
    assert requested_output_tokens({"max_completion_tokens": 60}) == 60
    assert requested_output_tokens({"max_tokens": 50, "max_completion_tokens": 60}) == 50
    for junk in (0, -3, True, 2.5, "50", None):
        assert requested_output_tokens({"max_tokens": junk}) is None, junk
        assert requested_output_tokens({"max_tokens": junk, "max_completion_tokens": 9}) == 9, junk


def test_the_reservation_is_the_cap_or_the_assumption_times_n():
    assert reserved_output_tokens({}) == 0
    assert reserved_output_tokens({"n": 3}) == 0
    assert reserved_output_tokens({}, assumed_output_tokens=500) == 500
    assert reserved_output_tokens({"n": 3}, assumed_output_tokens=500) == 1500
    assert reserved_output_tokens({"max_tokens": 100, "n": 2}, assumed_output_tokens=500) == 200
    assert reserved_output_tokens({"max_tokens": 100, "n": True}) == 100  # a bool is no count


def test_a_call_is_its_prompt_plus_its_input_plus_its_reservation():
    assert estimate_call_tokens(MSGS, {}) == 109
    assert estimate_call_tokens(MSGS, {"max_tokens": 100, "n": 2}) == 309
    assert estimate_call_tokens(MSGS, {}, assumed_output_tokens=10) == 119
    assert estimate_call_tokens(None, {"input": ["abcd", "efgh"]}) == 2


def test_every_old_name_is_the_one_estimator():
    assert prices.estimate_prompt_tokens is tokens.estimate_prompt_tokens
    assert pricing.estimate_prompt_tokens is tokens.estimate_prompt_tokens


def test_the_rate_limit_estimate_is_the_call_estimate_of_its_payload():
    payload = {"messages": MSGS, "max_tokens": 100, "n": 2}
    assert ratelimit.estimate_tokens(payload) == estimate_call_tokens(MSGS, payload) == 309
    assert ratelimit.estimate_tokens({"input": "abcdefgh"}) == 2
    assert ratelimit.estimate_tokens(None) == 0
    assert ratelimit.estimate_tokens({}) == 0


def test_the_ledger_reserves_the_prompt_and_the_output_rule():
    ledger = SpendLedger(PriceTable({"m": {"input": 1.0, "output": 2.0}}, include_defaults=False),
                         budget=Budget(daily_usd=100, assumed_output_tokens=300))
    held = ledger.estimate("m", MSGS, {"n": 2})
    assert (held.input_tokens, held.output_tokens) == (109, 600)
    assert held.amount_usd == Decimal(109 + 2 * 600) / Decimal(1_000_000)
    capped = ledger.estimate("m", MSGS, {"max_completion_tokens": 40})
    assert (capped.input_tokens, capped.output_tokens) == (109, 40)


def test_the_router_reads_the_same_prompt_and_cap():
    request = RoutingRequest(messages=MSGS, params={"max_completion_tokens": 8000})
    assert request.prompt_tokens == 109
    assert request.max_tokens == 8000


def test_the_simulated_gateway_counts_prompts_like_the_client():
    parts = [{"type": "text", "text": "abcd"}, {"type": "text", "text": "efgh"}]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    assert plan_chat(body).prompt_tokens == estimate_prompt_tokens(body["messages"]) == 2 + 4
