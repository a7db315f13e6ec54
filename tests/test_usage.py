"""usage.py reads every form of cached tokens; the ledger prices them; bad usage never breaks a call."""

from __future__ import annotations

from decimal import Decimal

import pytest

from holysheep_lb import PriceTable
from holysheep_lb.pricing import SpendLedger
from holysheep_lb.ratelimit import usage_tokens
from holysheep_lb.usage import TokenUsage, read_usage, total_tokens

from .conftest import chat_body

A = "https://a.example/v1"
DAY = 1795651200.0 + 3600  # 2026-11-26T01:00:00Z


def ledger(prices=None) -> SpendLedger:
    return SpendLedger(PriceTable(prices), wall_clock=lambda: DAY)


def msgs(chars: int = 400):
    return [{"role": "user", "content": "x" * chars}]


# -- reading ---------------------------------------------------------------------------------

def test_openai_form_counts_cached_tokens_inside_prompt_tokens():
    u = read_usage({"prompt_tokens": 2000, "completion_tokens": 50, "total_tokens": 2050,
                    "prompt_tokens_details": {"cached_tokens": 1536}})
    assert u == TokenUsage(2000, 50, 1536, 0, True, ())
    assert u.uncached_input_tokens == 464


def test_deepseek_form_hit_and_miss_tokens_with_or_without_prompt_tokens():
    assert read_usage({"prompt_tokens": 1000, "completion_tokens": 9, "prompt_cache_hit_tokens": 768,
                       "prompt_cache_miss_tokens": 232}) == TokenUsage(1000, 9, 768, 0, True, ())
    assert read_usage({"completion_tokens": 9, "prompt_cache_hit_tokens": 768,
                       "prompt_cache_miss_tokens": 232}) == TokenUsage(1000, 9, 768, 0, True, ())


def test_anthropic_style_fields_inside_prompt_tokens_on_a_gateway_beside_input_tokens_natively():
    # an OpenAI-compatible gateway relaying Claude: the cache fields are part of prompt_tokens
    assert read_usage({"prompt_tokens": 5000, "completion_tokens": 10, "cache_read_input_tokens": 3000,
                       "cache_creation_input_tokens": 1500}) == TokenUsage(5000, 10, 3000, 1500, True, ())
    # Anthropic's own form: input_tokens leaves them out
    assert read_usage({"input_tokens": 500, "output_tokens": 10, "cache_read_input_tokens": 3000,
                       "cache_creation_input_tokens": 1500}) == TokenUsage(5000, 10, 3000, 1500, True, ())
    # a gateway whose prompt_tokens leaves them out (they cannot be part of it)
    assert read_usage({"prompt_tokens": 500, "completion_tokens": 10, "cache_read_input_tokens": 3000,
                       "cache_creation_input_tokens": 1500}) == TokenUsage(5000, 10, 3000, 1500, True, ())


@pytest.mark.parametrize("usage, problems", [
    ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": "many"}},
     ("prompt_tokens_details.cached_tokens",)),
    ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": "junk"}, ("prompt_tokens_details",)),
    ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": -3}},
     ("prompt_tokens_details.cached_tokens",)),
    ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 500}},
     ("cached tokens above prompt_tokens",)),
    ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": True}, ("prompt_cache_hit_tokens",)),
    ({"prompt_tokens": 100, "completion_tokens": 5, "cache_read_input_tokens": 1.5}, ("cache_read_input_tokens",)),
])
def test_a_bad_cache_field_is_priced_as_uncached_and_named(usage, problems):
    u = read_usage(usage)
    assert (u.known, u.input_tokens, u.output_tokens, u.cached_tokens, u.cache_write_tokens) == (True, 100, 5, 0, 0)
    assert u.problems == problems


@pytest.mark.parametrize("usage", [None, "junk", 7, [], {}, {"prompt_tokens": "9"}, {"prompt_tokens": None},
                                   {"prompt_tokens": 10, "completion_tokens": "x"}, {"prompt_tokens": float("nan")}])
def test_missing_or_unreadable_prompt_counts_are_not_known(usage):
    u = read_usage(usage)
    assert not u.known and u.problems


def test_total_tokens_for_the_rate_limits_prefers_total_tokens():
    assert total_tokens({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 30}) == 30
    assert total_tokens({"prompt_tokens": 3, "completion_tokens": 4}) == 7
    assert total_tokens({"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 10}) == 17
    assert total_tokens("junk") is None and total_tokens(None) is None
    assert usage_tokens({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == 7  # ratelimit's name reads it too


# -- pricing to the cent, the four models ------------------------------------------------------

@pytest.mark.parametrize("model, usage, cost, saved", [
    # 1M prompt tokens, 800k of them cached, 100k output
    ("gpt-4.1", {"prompt_tokens": 1_000_000, "completion_tokens": 100_000,
                 "prompt_tokens_details": {"cached_tokens": 800_000}},
     "1.60", "1.20"),        # 200k x 2.00 + 800k x 0.50 + 100k x 8.00 = 0.40 + 0.40 + 0.80; saved 800k x 1.50
    ("deepseek-v3.2", {"prompt_tokens": 1_000_000, "completion_tokens": 100_000,
                       "prompt_cache_hit_tokens": 800_000, "prompt_cache_miss_tokens": 200_000},
     "0.1204", "0.2016"),   # 0.056 + 0.0224 + 0.042; saved 800k x 0.252
    ("claude-sonnet-4.5", {"prompt_tokens": 1_000_000, "completion_tokens": 100_000,
                           "cache_read_input_tokens": 600_000, "cache_creation_input_tokens": 200_000},
     "3.03", "1.47"),       # 200k x 3 + 600k x 0.30 + 200k x 3.75 + 100k x 15; saved 1.62 - 0.15 (writing costs more)
    ("gemini-2.5-flash", {"prompt_tokens": 1_000_000, "completion_tokens": 100_000,
                          "prompt_tokens_details": {"cached_tokens": 800_000}},
     "0.334", "0.216"),     # 0.06 + 0.024 + 0.25; saved 800k x 0.27
])
def test_price_of_a_call_with_cached_tokens_to_the_cent(model, usage, cost, saved):
    led = ledger()
    held = led.admit(model, msgs(), {"max_tokens": 10})
    settled = led.settle(held, usage)
    assert settled.cost_usd == Decimal(cost)
    assert round(settled.cost_usd, 2) == round(Decimal(cost), 2)
    assert settled.cache_saved_usd == Decimal(saved)
    totals = led.report()["totals"]
    assert totals["cached_input_tokens"] == settled.cached_tokens > 0
    assert totals["cache_saved_usd"] == float(Decimal(saved))
    assert totals["cost_usd"] == float(Decimal(cost))


def test_reservations_keep_estimating_at_the_full_input_rate():
    led = ledger()
    held = led.admit("gpt-4.1", msgs(4000), {"max_tokens": 100})  # 1004 tokens in, 100 out, full rates
    assert held.amount_usd == Decimal(1004) * Decimal("2.00") / 10**6 + Decimal(100) * Decimal("8.00") / 10**6


def test_cache_rates_come_from_the_price_table_and_can_be_overridden():
    table = PriceTable({"gpt-4.1": {"input": 2.0, "output": 8.0, "cached_input": 1.0},
                        "mine": (1.0, 2.0, 0.1, 1.25), "plain": (1.0, 2.0)})
    assert table.exact_cost_usd("gpt-4.1", 1_000_000, 0, 1_000_000) == Decimal("1.0")
    assert table.exact_cost_usd("mine", 3_000_000, 0, 1_000_000, 1_000_000) == Decimal("2.35")
    assert table.exact_cost_usd("plain", 1_000_000, 0, 1_000_000) == Decimal("1.0")  # no cached rate: input rate
    from holysheep_lb import ConfigError
    with pytest.raises(ConfigError, match=r"prices\[x\]\.cached_input"):
        PriceTable({"x": {"input": 1, "output": 1, "cached_input": -1}})
    with pytest.raises(ConfigError, match=r"prices\[x\]"):
        PriceTable({"x": {"input": 1, "output": 1, "cache_read": 1}})


def test_bad_usage_is_priced_as_uncached_and_counted_in_the_report():
    led = ledger()
    settled = led.settle(led.admit("gpt-4.1", msgs(), {}), {"prompt_tokens": 1000, "completion_tokens": 0,
                                                            "prompt_tokens_details": {"cached_tokens": "lots"}})
    assert settled.cost_usd == Decimal("0.002") and settled.from_usage and settled.cached_tokens == 0
    estimated = led.settle(led.admit("gpt-4.1", msgs(), {"max_tokens": 10}), {"prompt_tokens": "?"})
    assert not estimated.from_usage  # the estimate is counted
    assert led.report()["totals"]["unreadable_usage"] == 2


# -- through the client ----------------------------------------------------------------------------

@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 2000, "completion_tokens": 10, "total_tokens": 2010,
     "prompt_tokens_details": {"cached_tokens": 1024}},
    {"prompt_tokens": 2000, "completion_tokens": 10, "prompt_tokens_details": {"cached_tokens": {"x": 1}}},
    {"prompt_tokens": "2000", "completion_tokens": None, "prompt_cache_hit_tokens": -1},
    "not a usage", None,
])
def test_bad_or_missing_usage_fields_never_break_a_call(rsps, make_client, usage):
    body = chat_body()
    body["usage"] = usage
    rsps.post(A + "/chat/completions", json=body)
    client = make_client([{"id": "a", "base_url": A}])
    resp = client.chat_completion(msgs(), model="gpt-4.1", max_tokens=10)
    cost = resp.extra["cost"]
    assert cost["model"] == "gpt-4.1" and cost["cost_usd"] > 0
    report = client.cost_report()
    assert report["totals"]["requests"] == 1
    if usage is not None and isinstance(usage, dict) and usage.get("prompt_tokens_details", {}).get(
            "cached_tokens") == 1024:
        assert (cost["cached_tokens"], cost["cache_saved_usd"]) == (1024, 1024 * 1.5 / 1e6)
        assert cost["cost_usd"] == (976 * 2.0 + 1024 * 0.5 + 10 * 8.0) / 1e6
        assert report["totals"]["cached_input_tokens"] == 1024
    else:
        assert cost["cached_tokens"] == 0 and report["totals"]["unreadable_usage"] == 1
    assert client.stats()["successes"] == 1
