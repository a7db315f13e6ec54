"""Model fallback chains: order, flags, no loops, breakers, canned replies, one deadline."""

import json
from decimal import Decimal

import pytest
import responses

from holysheep_lb import (
    AllAttemptsFailedError,
    BadRequestError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigError,
)
from holysheep_lb.fallbacks import ModelChain

A = "https://a.example/v1"
MSGS = [{"role": "user", "content": "hello"}]


def _answer(model):
    return {"id": "x", "model": model, "usage": {"total_tokens": 7},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {model}"}}]}


class Gateway:
    """A mocked node whose answer depends on the requested model."""

    def __init__(self, rsps, statuses, clock=None, advance_s=0.0, usage=None, on_request=None):
        self.statuses = statuses  # model -> HTTP status (200 if absent)
        self.sent = []            # (model, Idempotency-Key) per request
        self.clock = clock
        self.advance_s = advance_s
        self.usage = usage        # the answers' usage, if not {"total_tokens": 7}
        self.on_request = on_request  # called with the model of each request
        rsps.add_callback(responses.POST, A + "/chat/completions", callback=self)

    def __call__(self, request):
        model = json.loads(request.body)["model"]
        self.sent.append((model, request.headers["Idempotency-Key"]))
        if self.on_request is not None:
            self.on_request(model)
        if self.clock is not None:
            self.clock.advance(self.advance_s)
        status = self.statuses.get(model, 200)
        body = _answer(model) if status == 200 else {"error": {"message": f"{model} is down"}}
        if status == 200 and self.usage is not None:
            body["usage"] = self.usage
        return status, {"Content-Type": "application/json"}, json.dumps(body)

    @property
    def models(self):
        return [m for m, _ in self.sent]


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as r:
        yield r


def _client(make_client, clock, **kw):
    kw.setdefault("retry_budget_ratio", None)
    return make_client([{"id": "a", "base_url": A}], clock=clock, sleep=clock.sleep, rand=lambda: 0.0, **kw)


def test_chain_tries_models_in_order_and_flags_the_fallback_answer(rsps, make_client, clock):
    gw = Gateway(rsps, {"gpt-4.1": 503, "gemini-2.5-flash": 500})
    client = _client(make_client, clock, max_retries=1, eject_after_failures=100,
                     fallbacks={"gpt-4.1": ["gemini-2.5-flash", "deepseek-v3.2"]})
    resp = client.chat_completion(MSGS, model="gpt-4.1")
    assert gw.models == ["gpt-4.1", "gpt-4.1", "gemini-2.5-flash", "gemini-2.5-flash", "deepseek-v3.2"]
    assert resp.text == "from deepseek-v3.2"
    assert (resp.model, resp.fallback, resp.extra["requested_model"]) == ("deepseek-v3.2", True, "gpt-4.1")
    keys = {}
    for model, key in gw.sent:
        keys.setdefault(model, set()).add(key)
    assert all(len(k) == 1 for k in keys.values()), "one Idempotency-Key per model's retry cycle"
    assert len(set.union(*keys.values())) == 3, "a fallback model never reuses another model's key"
    stats = client.stats()
    assert stats["fallbacks"]["fallback_answers"] == 1
    # one user call, answered (by a fallback): counted once, as a success
    assert (stats["calls"], stats["successes"], stats["failures"]) == (1, 1, 0)
    assert stats["success_rate"] == 1.0


def test_an_answer_from_the_requested_model_is_not_flagged(rsps, make_client, clock):
    Gateway(rsps, {})
    client = _client(make_client, clock, fallbacks={"gpt-4.1": ["deepseek-v3.2"]})
    resp = client.chat_completion(MSGS, model="gpt-4.1")
    assert (resp.model, resp.fallback) == ("gpt-4.1", False)


def test_cyclic_fallbacks_never_loop_or_retry_a_model_twice(rsps, make_client, clock):
    gw = Gateway(rsps, {"a": 500, "b": 500, "c": 500})
    client = _client(make_client, clock, max_retries=0,
                     fallbacks={"a": ["b"], "b": ["a", "c"], "c": ["a", "b"]})
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="a")
    assert gw.models == ["a", "b", "c"]
    assert sorted(info.value.model_errors) == ["a", "b", "c"]
    assert "c is down" in str(info.value)


def test_chain_expands_breadth_first_without_repeats():
    chain = ModelChain(fallbacks={"a": ["b", "c"], "b": ["d", "a"], "c": ["b", "e"], "d": ["a"]})
    assert chain.chain("a") == ["a", "b", "c", "d", "e"]
    assert chain.chain("d") == ["d", "a", "b", "c", "e"]
    assert chain.chain("z") == ["z"]


def test_an_open_breaker_goes_straight_to_the_fallback(rsps, make_client, clock):
    gw = Gateway(rsps, {"gpt-4.1": 500})
    client = _client(make_client, clock, max_retries=0, model_breakers={"gpt-4.1": {"fail_max": 1}},
                     fallbacks={"gpt-4.1": ["deepseek-v3.2"]})
    assert client.chat_completion(MSGS, model="gpt-4.1").fallback
    assert gw.models == ["gpt-4.1", "deepseek-v3.2"]
    resp = client.chat_completion(MSGS, model="gpt-4.1")
    assert gw.models[2:] == ["deepseek-v3.2"], "the open model was skipped without a request"
    assert (resp.model, resp.fallback) == ("deepseek-v3.2", True)
    assert client.stats()["fallbacks"]["circuit_open_skips"] == 1


def test_every_breaker_open_raises_the_soonest_retry(rsps, make_client, clock):
    Gateway(rsps, {"x": 500, "y": 500})
    client = _client(make_client, clock, max_retries=0, fallbacks={"x": ["y"]},
                     model_breakers={"x": {"fail_max": 1, "reset_timeout_s": 50, "trial_interval_s": 50},
                                     "y": {"fail_max": 1, "reset_timeout_s": 20, "trial_interval_s": 20}})
    with pytest.raises(AllAttemptsFailedError):
        client.chat_completion(MSGS, model="x")
    with pytest.raises(CircuitOpenError) as info:
        client.chat_completion(MSGS, model="x")
    assert info.value.breaker == "model:y" and info.value.retry_after_s == pytest.approx(20)
    assert sorted(info.value.model_errors) == ["x", "y"]


def test_a_callers_error_is_raised_without_fallback(rsps, make_client, clock):
    gw = Gateway(rsps, {"gpt-4.1": 400})
    client = _client(make_client, clock, fallbacks={"gpt-4.1": ["deepseek-v3.2"]})
    with pytest.raises(BadRequestError):
        client.chat_completion(MSGS, model="gpt-4.1")
    assert gw.models == ["gpt-4.1"]


def test_fallbacks_share_the_calls_deadline(rsps, make_client, clock):
    gw = Gateway(rsps, {"slow": 500}, clock=clock, advance_s=11.0)
    client = _client(make_client, clock, max_retries=0, fallbacks={"slow": ["other"]})
    with pytest.raises(AllAttemptsFailedError):
        client.chat_completion(MSGS, model="slow", deadline_s=10)
    assert gw.models == ["slow"], "no time was left for the fallback"


def test_a_canned_reply_comes_only_from_the_users_callable_and_is_flagged(rsps, make_client, clock):
    Gateway(rsps, {"gpt-4.1": 500, "deepseek-v3.2": 500})
    seen = []

    def canned(model, payload, error):
        seen.append((model, payload["messages"], type(error).__name__))
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "try again later"}}]}

    client = _client(make_client, clock, max_retries=0, fallbacks={"gpt-4.1": ["deepseek-v3.2"]},
                     fallback_reply=canned)
    resp = client.chat_completion(MSGS, model="gpt-4.1")
    assert resp.text == "try again later"
    assert resp.fallback is True and resp.model is None and resp.node_id is None
    assert resp.extra["canned"] is True and resp.extra["requested_model"] == "gpt-4.1"
    assert sorted(resp.extra["model_errors"]) == ["deepseek-v3.2", "gpt-4.1"]
    assert seen == [("gpt-4.1", MSGS, "AllAttemptsFailedError")]
    assert client.stats()["fallbacks"]["canned_replies"] == 1


def test_a_canned_reply_with_the_cache_on_is_returned_and_keeps_only_error_strings(rsps, make_client, clock):
    Gateway(rsps, {"gpt-4.1": 500})
    client = _client(make_client, clock, max_retries=0, cache=True, deadline_s=2,
                     fallback_reply=lambda *a: {"choices": [{"message": {"content": "SORRY"}}]})
    resp = client.chat_completion(MSGS, model="gpt-4.1", temperature=0)
    assert resp.text == "SORRY" and resp.extra["canned"] is True
    assert list(resp.extra["model_errors"]) == ["gpt-4.1"]
    error = resp.extra["model_errors"]["gpt-4.1"]
    assert isinstance(error, str) and error.startswith("AllAttemptsFailedError: ")
    json.dumps(resp.extra["model_errors"])  # JSON-safe
    assert client._cache._pending == {}
    again = client.chat_completion(MSGS, model="gpt-4.1", temperature=0)  # not stuck behind the first
    assert again.text == "SORRY" and client._cache._pending == {}


def test_a_canned_reply_must_be_a_dict(rsps, make_client, clock):
    Gateway(rsps, {"m": 500})
    client = _client(make_client, clock, max_retries=0, fallback_reply=lambda *a: "sorry")
    with pytest.raises(ConfigError) as info:
        client.chat_completion(MSGS, model="m")
    assert info.value.field == "fallback_reply"


@pytest.mark.parametrize("fallbacks, field", [
    ({"a": ["a"]}, "fallbacks[a]"),
    ({"a": "b"}, "fallbacks[a]"),
    ({"a": [""]}, "fallbacks[a]"),
    (["a"], "fallbacks"),
])
def test_fallback_settings_are_validated(make_client, fallbacks, field):
    with pytest.raises(ConfigError) as info:
        make_client([{"id": "a", "base_url": A}], fallbacks=fallbacks)
    assert info.value.field == field


# -- costs and the cache with fallbacks ----------------------------------------------------

USAGE = {"prompt_tokens": 1000, "completion_tokens": 1000}
# MSGS is 6 prompt tokens by estimate; no max_tokens: 256 output tokens assumed
GPT_ESTIMATE = Decimal(6 * 2 + 256 * 8) / 1_000_000
DEEPSEEK_ESTIMATE = Decimal(6 * 28 + 256 * 42) / 100_000_000


def test_a_fallback_answer_is_paid_and_recorded_as_the_model_that_gave_it(rsps, make_client, clock):
    held = []  # the estimates held while each request is sent
    gw = Gateway(rsps, {"gpt-4.1": 500}, usage=USAGE,
                 on_request=lambda model: held.append(client.ledger.store.reserved_usd()))
    client = _client(make_client, clock, max_retries=0, fallbacks={"gpt-4.1": ["deepseek-v3.2"]})
    resp = client.chat_completion(MSGS, model="gpt-4.1")
    assert gw.models == ["gpt-4.1", "deepseek-v3.2"]
    assert held == [GPT_ESTIMATE, DEEPSEEK_ESTIMATE], "each model holds its own estimate while it is sent to"
    assert resp.extra["cost"] == {"model": "deepseek-v3.2", "estimated_usd": float(DEEPSEEK_ESTIMATE),
                                  "cost_usd": 0.0007, "input_tokens": 1000, "output_tokens": 1000,
                                  "from_usage": True,  # 1000*0.28 + 1000*0.42 micro-USD, not gpt-4.1's 0.01
                                  "cached_tokens": 0, "cache_write_tokens": 0, "cache_saved_usd": 0.0}
    report = client.cost_report()
    assert list(report["by_model"]) == ["deepseek-v3.2"]
    assert report["by_model"]["deepseek-v3.2"]["requests"] == 1
    assert report["totals"]["cost_usd"] == 0.0007 and report["in_flight_reserved_usd"] == 0.0


def test_a_fallback_models_own_cap_is_checked_before_it_is_sent(rsps, make_client, clock):
    gw = Gateway(rsps, {"gpt-4.1": 500}, usage=USAGE)
    cap = float(DEEPSEEK_ESTIMATE) / 2
    client = _client(make_client, clock, max_retries=0, fallbacks={"gpt-4.1": ["deepseek-v3.2"]},
                     budget={"per_model": {"deepseek-v3.2": {"daily_usd": cap}}})
    with pytest.raises(AllAttemptsFailedError) as info:  # the requested model's failure, not the refusal
        client.chat_completion(MSGS, model="gpt-4.1")
    assert gw.models == ["gpt-4.1"], "the fallback over its cap was never sent"
    refusal = info.value.model_errors["deepseek-v3.2"]
    assert isinstance(refusal, BudgetExceededError) and refusal.scope == "deepseek-v3.2"
    report = client.cost_report()
    assert report["totals"]["requests"] == 0 and report["in_flight_reserved_usd"] == 0.0


def test_the_first_models_estimate_is_released_when_its_breaker_skips_it(rsps, make_client, clock):
    held = []  # the estimates held while each request is sent
    gw = Gateway(rsps, {"gpt-4.1": 500}, usage=USAGE,
                 on_request=lambda model: held.append(client.ledger.store.reserved_usd()))
    client = _client(make_client, clock, max_retries=0, model_breakers={"gpt-4.1": {"fail_max": 1}},
                     fallbacks={"gpt-4.1": ["deepseek-v3.2"]})
    client.chat_completion(MSGS, model="gpt-4.1")  # opens gpt-4.1's breaker
    del held[:]
    assert client.chat_completion(MSGS, model="gpt-4.1").extra["cost"]["model"] == "deepseek-v3.2"
    assert gw.models[2:] == ["deepseek-v3.2"]
    assert held == [DEEPSEEK_ESTIMATE] and client.ledger.store.reserved_usd() == 0


def test_a_canned_reply_costs_nothing(rsps, make_client, clock):
    Gateway(rsps, {"gpt-4.1": 500, "deepseek-v3.2": 500})
    client = _client(make_client, clock, max_retries=0, fallbacks={"gpt-4.1": ["deepseek-v3.2"]},
                     fallback_reply=lambda *a: {"choices": [{"message": {"content": "SORRY"}}]})
    resp = client.chat_completion(MSGS, model="gpt-4.1")
    assert resp.extra["cost"] == {"model": None, "estimated_usd": 0.0, "cost_usd": 0.0, "input_tokens": 0,
                                  "output_tokens": 0, "from_usage": False,
                                  "cached_tokens": 0, "cache_write_tokens": 0, "cache_saved_usd": 0.0}
    report = client.cost_report()
    assert (report["totals"]["requests"], report["totals"]["cost_usd"]) == (0, 0.0)
    assert report["in_flight_reserved_usd"] == 0.0


def test_fallback_and_canned_answers_are_not_cached_for_the_requested_model(rsps, make_client, clock):
    gw = Gateway(rsps, {"gpt-4.1": 500, "deepseek-v3.2": 500})
    client = _client(make_client, clock, max_retries=0, cache=True, fallbacks={"gpt-4.1": ["deepseek-v3.2"]},
                     fallback_reply=lambda *a: {"choices": [{"message": {"content": "SORRY"}}]})
    assert client.chat_completion(MSGS, model="gpt-4.1", temperature=0).text == "SORRY"
    gw.statuses["deepseek-v3.2"] = 200
    assert client.chat_completion(MSGS, model="gpt-4.1", temperature=0).text == "from deepseek-v3.2"
    gw.statuses["gpt-4.1"] = 200  # the primary is back: its own answer, not the fallback's
    resp = client.chat_completion(MSGS, model="gpt-4.1", temperature=0)
    assert (resp.text, resp.cached, resp.fallback) == ("from gpt-4.1", False, False)
    assert client.chat_completion(MSGS, model="gpt-4.1", temperature=0).cached is True
    assert gw.models == ["gpt-4.1", "deepseek-v3.2"] * 2 + ["gpt-4.1"]
    assert client.stats()["cache"]["stores"] == 1


@pytest.mark.parametrize("field", ["defer_outcome", "stream", "read_text"])
def test_an_answer_whose_json_has_a_field_named_like_a_stream_method_is_an_answer(rsps, make_client, clock, field):
    def answer(request):
        body = _answer(json.loads(request.body)["model"])
        body[field] = "not a method"  # a gateway's extra field: data, never called
        return 200, {"Content-Type": "application/json"}, json.dumps(body)

    rsps.add_callback(responses.POST, A + "/chat/completions", callback=answer)
    client = _client(make_client, clock)
    resp = client.chat_completion(MSGS, model="gpt-4.1")
    assert resp[field] == "not a method" and resp.model == "gpt-4.1"
    assert client.stats()["successes"] == 1 and client.breakers()[0]["state"] == "closed"
