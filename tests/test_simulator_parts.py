"""The simulator's parts without HTTP: texts, plans, fault windows, quotas, the prompt cache."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from holysheep_lb.errors import ConfigError
from holysheep_lb.simulator import (
    SimModel,
    SimNode,
    completion_text,
    format_duration,
    reply_text,
)
from holysheep_lb.simulator.faults import ModelFaults, fault_window_open
from holysheep_lb.simulator.plans import embeddings_answer, plan_chat
from holysheep_lb.simulator.prompt_cache import PromptCache, usage_fields
from holysheep_lb.simulator.quotas import NodeQuota

MSGS = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "one two three four"}]


# -- texts -----------------------------------------------------------------------------


def test_a_prefill_is_continued_to_exactly_the_canonical_text():
    full = reply_text("m", MSGS)
    assert full == "[m] Echo: one two three four"
    for cut in range(len(full) + 1):
        prefill = MSGS + [{"role": "assistant", "content": full[:cut]}]
        assert reply_text("m", prefill) == full  # the canonical text ignores the prefill
        assert full[:cut] + completion_text("m", prefill) == full


def test_a_prefill_from_another_model_completes_that_models_text():
    first = reply_text("primary", MSGS)
    prefill = MSGS + [{"role": "assistant", "content": first[:22]}]
    assert first[:22] + completion_text("fallback", prefill) == first
    tag_only = MSGS + [{"role": "assistant", "content": "[primary] "}]
    assert "[primary] " + completion_text("fallback", tag_only) == first


def test_a_prefill_that_matches_nothing_gets_the_full_text_and_max_tokens_cuts_words():
    odd = MSGS + [{"role": "assistant", "content": "something else"}]
    assert completion_text("m", odd) == reply_text("m", MSGS)
    prefill = MSGS + [{"role": "assistant", "content": "[m] Echo:"}]
    assert completion_text("m", prefill, max_tokens=2) == " one two"
    assert completion_text("m", MSGS, max_tokens=2) == "[m] Echo:"


# -- plans ------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"type": "string", "enum": ["c", "f"]},
    "hourly": {"type": "boolean"}}}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time"}}


def test_tools_give_a_deterministic_tool_call_that_fits_the_schema():
    plan = plan_chat({"model": "gpt-4.1", "messages": MSGS, "tools": [WEATHER, CLOCK_TOOL]})
    call = plan.tool_call
    assert call is not None and call.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "one two three four", "days": 4, "unit": "c", "hourly": True}
    assert plan.text == "" and plan.completion_tokens >= 1
    assert "".join(plan.pieces()) == call.arguments and max(len(p) for p in plan.pieces()) <= 8
    again = plan_chat({"model": "gpt-4.1", "messages": MSGS, "tools": [WEATHER, CLOCK_TOOL]})
    assert again.tool_call == call
    assert plan.prompt_tokens > plan_chat({"model": "gpt-4.1", "messages": MSGS}).prompt_tokens  # tools cost tokens


def test_tool_choice_and_a_tool_result_decide_between_call_and_text():
    named = {"type": "function", "function": {"name": "get_time"}}
    assert plan_chat({"messages": MSGS, "tools": [WEATHER, CLOCK_TOOL], "tool_choice": named}).tool_call.name == "get_time"
    assert plan_chat({"messages": MSGS, "tools": [WEATHER], "tool_choice": "none"}).tool_call is None
    after_tool = MSGS + [{"role": "assistant", "content": None, "tool_calls": []},
                         {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    plan = plan_chat({"model": "m", "messages": after_tool, "tools": [WEATHER]})
    assert plan.tool_call is None and plan.text == reply_text("m", after_tool)
    assert plan_chat({"messages": after_tool, "tools": [WEATHER], "tool_choice": "required"}).tool_call is not None


@pytest.mark.parametrize("body, words", [
    ({"messages": MSGS, "tools": {"x": 1}}, "'tools' must be an array"),
    ({"messages": MSGS, "tools": [{"type": "code"}]}, "tools[0]"),
    ({"messages": MSGS, "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"messages": MSGS, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "'x'"),
])
def test_bad_tools_are_named(body, words):
    from holysheep_lb.simulator.content import _InvalidRequest

    with pytest.raises(_InvalidRequest, match=words.replace("[", r"\[").replace("]", r"\]")):
        plan_chat(body)


def test_the_cache_prefix_is_what_precedes_the_last_user_message():
    long_system = {"role": "system", "content": "x" * 400}
    one = plan_chat({"model": "m", "messages": [long_system, {"role": "user", "content": "a"}]})
    two = plan_chat({"model": "m", "messages": [long_system, {"role": "user", "content": "b"}]})
    other_model = plan_chat({"model": "n", "messages": [long_system, {"role": "user", "content": "a"}]})
    assert one.cache_key == two.cache_key != other_model.cache_key
    assert one.cache_prefix_tokens == 100 + 4
    assert plan_chat({"messages": [{"role": "user", "content": "a"}]}).cache_key is None
    with_tools = plan_chat({"messages": [{"role": "user", "content": "a"}], "tools": [CLOCK_TOOL]})
    assert with_tools.cache_key is not None and with_tools.cache_prefix_tokens > 0


def test_embeddings_in_base64_decode_to_the_float_vectors():
    floats = embeddings_answer({"model": "e", "input": ["hi", "there"]})
    packed = embeddings_answer({"model": "e", "input": ["hi", "there"], "encoding_format": "base64"})
    for f, b in zip(floats["data"], packed["data"]):
        decoded = struct.unpack("<8f", base64.b64decode(b["embedding"]))
        assert decoded == pytest.approx(f["embedding"], abs=1e-6)
    assert packed["usage"] == floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


# -- configuration ------------------------------------------------------------------------


def test_bad_settings_raise_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match="SimModel.fault"):
        SimModel(fault="explode")
    with pytest.raises(ConfigError, match="SimModel.fault_attempts"):
        SimModel(fault="reset", fault_attempts=0)
    with pytest.raises(ConfigError, match="SimModel.fault_status"):
        SimModel(fault="server_error", fault_status=404)
    with pytest.raises(ConfigError, match="SimNode.prompt_cache_usage"):
        SimNode("a", prompt_cache_usage="bedrock")
    with pytest.raises(ConfigError, match="SimNode.requests_per_minute"):
        SimNode("a", requests_per_minute=0)
    with pytest.raises(ConfigError, match="bogus"):
        SimNode("a", models={"m": {"bogus": 1}})
    node = SimNode("a", models={"m": {"fault": "reset", "fault_attempts": 1}})
    assert node.models == {"m": SimModel(fault="reset", fault_attempts=1)}


# -- fault windows ------------------------------------------------------------------------


def test_fault_windows_open_after_the_start_and_a_flap_closes_after_its_duration():
    hang = SimModel(fault="hang", fault_start_s=5)
    assert not fault_window_open(hang, 4.9) and fault_window_open(hang, 5.0) and fault_window_open(hang, 1e6)
    flap = SimModel(fault="flap", fault_duration_s=60)
    assert fault_window_open(flap, 0) and fault_window_open(flap, 59.9) and not fault_window_open(flap, 60)


def test_first_k_attempts_are_counted_where_the_setting_lives(clock):
    faults = ModelFaults({"m": SimModel(fault="reset", fault_attempts=2)}, clock)
    node_models = {"n": SimModel(fault="server_error", fault_attempts=1)}
    seen = [faults.decide({}, "a", "m").fault, faults.decide({}, "b", "m").fault, faults.decide({}, "a", "m").fault]
    assert seen == ["reset", "reset", None]  # gateway-wide: counted over both nodes
    assert [faults.decide(node_models, "a", "n").fault for _ in range(2)] == ["server_error", None]
    assert faults.decide({}, "b", "n") is None  # a node's own setting stays on that node
    faults.set_model(None, "m", SimModel(fault="reset", fault_attempts=1))  # configuring re-arms
    assert [faults.decide({}, "a", "m").fault for _ in range(2)] == ["reset", None]
    faults.reset()
    assert faults.decide({}, "a", "m").fault == "reset"
    assert faults.decide({}, "a", None) is None and faults.decide({}, "a", "other") is None


def test_a_flap_is_timed_by_the_gateway_clock_from_arming(clock):
    faults = ModelFaults({"m": SimModel(fault="flap", fault_duration_s=60)}, clock)
    assert faults.decide({}, "a", "m").fault == "flap"
    clock.advance(59.9)
    assert faults.decide({}, "a", "m").fault == "flap"
    clock.advance(0.1)
    assert faults.decide({}, "a", "m").fault is None
    faults.reset()
    assert faults.decide({}, "a", "m").fault == "flap"


# -- quotas -------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.12, "120ms"), (0.0004, "1ms"), (1, "1s"), (1.5, "1.5s"), (59.999, "59.999s"),
    (60, "1m0s"), (90.5, "1m30.5s"), (360, "6m0s"), (3600, "1h0m0s"), (3723.25, "1h2m3.25s"),
])
def test_durations_are_written_like_openais_headers(seconds, text):
    assert format_duration(seconds) == text


def _headers(decision):
    return dict(decision.headers)


def test_request_quota_refills_continuously(clock):
    quota = NodeQuota(clock)
    quota.configure(SimNode("a", requests_per_minute=60))
    for expected_remaining in (59, 58, 57):
        decision = quota.admit(10)
        assert decision.allowed and _headers(decision)["x-ratelimit-remaining-requests"] == str(expected_remaining)
    assert _headers(decision) == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "57",
                                  "x-ratelimit-reset-requests": "3s"}
    for _ in range(57):
        assert quota.admit(1).allowed
    refused = quota.admit(1)
    assert not refused.allowed and refused.limited_by == "requests" and refused.retry_after_s == pytest.approx(1.0)
    assert "requests per min (RPM): Limit 60, Used 60" in refused.message
    clock.advance(0.5)
    assert not quota.admit(1).allowed
    clock.advance(0.5)
    assert quota.admit(1).allowed  # one request per second comes back
    assert quota.stats() == {"limited_requests": 2, "limited_tokens": 0}


def test_token_quota_refuses_what_does_not_fit_and_a_request_too_large_forever(clock):
    quota = NodeQuota(clock)
    quota.configure(SimNode("a", tokens_per_minute=600))
    assert quota.admit(500).allowed
    refused = quota.admit(200)
    assert not refused.allowed and refused.limited_by == "tokens"
    assert refused.retry_after_s == pytest.approx(10.0)  # 100 tokens short at 10 tokens/s
    assert _headers(refused)["x-ratelimit-remaining-tokens"] == "100"
    assert _headers(refused)["x-ratelimit-reset-tokens"] == "50s"
    too_large = quota.admit(601)
    assert not too_large.allowed and too_large.retry_after_s is None and "too large" in too_large.message
    free = quota.admit(0, charge=False)
    assert free.allowed and _headers(free)["x-ratelimit-remaining-tokens"] == "100"
    quota.configure(SimNode("a", tokens_per_minute=1200))  # a new limit starts full
    assert _headers(quota.admit(0, charge=False))["x-ratelimit-remaining-tokens"] == "1200"
    quota.configure(SimNode("a"))
    assert not quota.active and quota.admit(10**9).allowed


# -- prompt cache -------------------------------------------------------------------------


def test_prompt_cache_counts_hits_expires_after_its_ttl_and_evicts_the_least_recent(clock):
    cfg = SimNode("a", prompt_cache_entries=2, prompt_cache_ttl_s=10, prompt_cache_min_tokens=100)
    cache = PromptCache(clock)
    cache.configure(cfg)
    assert cache.eligible(cfg, "k", 100) and not cache.eligible(cfg, "k", 99) and not cache.eligible(cfg, None, 500)
    assert not cache.contains("k1")
    cache.record("k1", hit=False)
    assert cache.contains("k1")
    clock.advance(9)
    cache.record("k1", hit=True)  # a hit refreshes the TTL
    clock.advance(9)
    assert cache.contains("k1")
    cache.record("k2", hit=False)
    cache.record("k3", hit=False)  # capacity 2: k1, the least recent, goes
    assert not cache.contains("k1") and cache.contains("k3")
    clock.advance(10)
    assert cache.stats() == {"hits": 1, "misses": 3, "entries": 0}
    assert not cache.eligible(SimNode("b"), "k", 10**6)  # no cache on a node by default


def test_cache_usage_forms():
    assert usage_fields("openai", 500, 400, 0) == {"prompt_tokens_details": {"cached_tokens": 400}}
    assert usage_fields("deepseek", 500, 400, 0) == {"prompt_cache_hit_tokens": 400, "prompt_cache_miss_tokens": 100}
    assert usage_fields("anthropic", 500, 0, 400) == {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 400}
