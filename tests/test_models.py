"""The cost-aware model router: classification rules, tiers, availability and fallbacks."""

from __future__ import annotations

import json
import re
import time

import pytest

from holysheep_lb import AUTO, ConfigError, ModelRouter, RoutingDecision, RoutingRequest
from holysheep_lb.models import DEFAULT_TIER_MODELS, classify_request, has_code

from .conftest import chat_body

PROSE = "The committee met on Tuesday to review the budget and the hiring plan for next year. "
LONG_SYSTEM = "You are a support agent for ACME. Follow these rules carefully. " * 22  # ~1400 chars


def user(text, system=None):
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user", "content": text}]


# (messages, params, expected tier): the rules of holysheep_lb/models.py, row by row
CLASSIFICATION_TABLE = [
    (user("hi"), {}, "simple"),
    (user("Tell me a fun fact about otters."), {}, "simple"),
    (user("Write a haiku about autumn leaves."), {}, "simple"),
    (user("What is the capital of France?"), {}, "simple"),
    (user("Translate 'good night' into German."), {}, "simple"),
    (user("Is this review positive? Answer yes or no: 'great product'"), {}, "simple"),
    (user("Classify the sentiment: 'meh'"), {"max_tokens": 5}, "simple"),
    (user("What colour is grass?"), {"max_tokens": 3}, "simple"),
    (user([{"type": "text", "text": "hello there"}]), {}, "simple"),
    (user("Explain why the sky is blue."), {}, "standard"),
    (user("Compare Python lists and tuples."), {}, "standard"),
    (user("Give me a recipe for pancakes."), {"max_tokens": 3000}, "standard"),
    (user("Summarise this:\n" + PROSE * 80), {}, "standard"),                   # ~1700 tokens
    (user("hello", system=LONG_SYSTEM), {}, "standard"),
    (user("Design the architecture of a URL shortener."), {}, "standard"),
    (user("Design the architecture of a URL shortener."), {"max_tokens": 4000}, "complex"),
    (user("Debug this:\n```js\nconsole.log(x)\n```"), {}, "complex"),
    (user("Refactor:\ndef f(x):\n    return x+1\n"), {}, "complex"),
    (user("Explain why this fails:\n```\nSELECT * FROM t WHERE\n```"), {}, "complex"),
    (user("Analyze the risks in this report:\n" + PROSE * 80), {}, "complex"),
    (user("Prove that there are infinitely many primes."), {}, "complex"),
    (user("What is the legal difference between a contract and an agreement?"), {}, "complex"),
    (user("Write the next chapter of my novel."), {"max_tokens": 10000}, "complex"),
    (user("Prove step by step that sqrt(2) is irrational."), {"max_tokens": 2000}, "expert"),
    (user("Do a security audit of this code:\n```python\nos.system(input())\n```"), {}, "expert"),
    (user("Analyze this contract:\n" + PROSE * 400), {}, "expert"),              # ~8500 tokens
]


@pytest.mark.parametrize("messages, params, tier", CLASSIFICATION_TABLE)
def test_classification_table(messages, params, tier):
    got, reason = classify_request(RoutingRequest(messages, params))
    assert got == tier, reason


def test_table_covers_every_tier_and_at_least_twenty_prompts():
    assert len(CLASSIFICATION_TABLE) >= 20
    assert {t for _, _, t in CLASSIFICATION_TABLE} == {"simple", "standard", "complex", "expert"}


def test_short_unremarkable_prompt_goes_to_the_cheapest_model():
    decision = ModelRouter().route(user("Say something nice."))
    assert (decision.tier, decision.model) == ("simple", "deepseek-v3.2")
    assert decision.reason == "score 0: short prompt, no signals"


def test_reason_names_each_rule_that_fired():
    decision = ModelRouter().route(user("Refactor:\n```py\nx = 1\n```"), {"max_tokens": 2500})
    assert decision.tier == "expert"
    assert decision.reason == "score 3: code +1; reasoning keyword 'refactor' +1; max_tokens 2500 +1"


def test_has_code():
    assert has_code("```\nanything\n```")
    assert has_code("import os\nprint(os.getcwd())")
    assert not has_code("What is f(x)? I think it is x squared.")
    assert not has_code("one line only: print(x)")


def test_pinned_tiers_and_custom_tiers():
    router = ModelRouter(tiers={"expert": "gpt-4.1", "simple": "my-small-model"})
    assert router.route(user("hi")).model == "my-small-model"
    assert router.route(user("Prove step by step X."), {"max_tokens": 2000}).model == "gpt-4.1"
    assert router.tiers["standard"] == DEFAULT_TIER_MODELS["standard"]


def test_custom_classifier_replaces_the_rules():
    router = ModelRouter(classify=lambda req: ("complex", "all French goes to the big model")
                         if "bonjour" in req.user_text else "simple")
    d = router.route(user("bonjour"))
    assert (d.tier, d.model, d.reason) == ("complex", "gpt-4.1", "all French goes to the big model")
    assert router.route(user("hello")).reason == "custom rule"
    with_tier = ModelRouter(tiers={"vision": "gpt-4.1"}, classify=lambda req: "vision")
    assert with_tier.route(user("x")).tier == "vision"


def test_classifier_returning_an_unknown_tier_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        ModelRouter(classify=lambda req: "gigantic").route(user("x"))
    assert info.value.field == "classify" and info.value.value == "gigantic"


@pytest.mark.parametrize("kwargs, field", [
    ({"tiers": {"simple": ""}}, "tiers"),
    ({"classify": "rules"}, "classify"),
    ({"is_available": True}, "is_available"),
    ({"fallbacks": {"gpt-4.1": "claude-sonnet-4.5"}}, "fallbacks[gpt-4.1]"),
])
def test_bad_router_settings(kwargs, field):
    with pytest.raises(ConfigError) as info:
        ModelRouter(**kwargs)
    assert info.value.field == field


def test_default_fallback_chain_goes_up_a_tier_first_then_down():
    router = ModelRouter()
    assert router.chain("deepseek-v3.2") == ("deepseek-v3.2", "gemini-2.5-flash", "gpt-4.1", "claude-sonnet-4.5")
    assert router.chain("gpt-4.1") == ("gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2")
    assert router.chain("unknown") == ("unknown", "claude-sonnet-4.5", "gpt-4.1", "gemini-2.5-flash",
                                       "deepseek-v3.2")


def test_unavailable_models_are_skipped_along_the_chain():
    open_breakers = {"deepseek-v3.2", "gemini-2.5-flash"}
    router = ModelRouter(is_available=lambda m: m not in open_breakers)
    d = router.route(user("hi"))
    assert (d.model, d.primary_model, d.skipped, d.fallback) == (
        "gpt-4.1", "deepseek-v3.2", ("deepseek-v3.2", "gemini-2.5-flash"), True)
    assert "skipped unavailable deepseek-v3.2, gemini-2.5-flash" in d.reason


def test_explicit_fallbacks_are_respected():
    router = ModelRouter(fallbacks={"deepseek-v3.2": ["claude-sonnet-4.5"]},
                         is_available=lambda m: m != "deepseek-v3.2")
    assert router.route(user("hi")).model == "claude-sonnet-4.5"


def test_is_available_can_be_wired_after_construction():
    router = ModelRouter()
    router.is_available = lambda m: m != "deepseek-v3.2"
    assert router.route(user("hi")).model == "gemini-2.5-flash"


def test_nothing_available_sends_to_the_tier_model():
    d = ModelRouter(is_available=lambda m: False).route(user("hi"))
    assert (d.model, d.fallback) == ("deepseek-v3.2", False)
    assert "no model of the chain is available" in d.reason


def test_decision_is_logged_at_debug(debug_logs):
    ModelRouter().route(user("Explain why ice floats."))
    lines = [r.getMessage() for r in debug_logs.records if r.name == "holysheep_lb.models"]
    assert lines == ["routing: tier standard -> model gemini-2.5-flash (score 1: reasoning keyword "
                     "'explain why' +1)"]


# -- through the Client ---------------------------------------------------------------------

A = "https://a.example/v1"
OK = chat_body("deepseek-v3.2", 6, 1)


def test_auto_model_routes_and_puts_the_decision_in_metadata(rsps, make_client):
    rsps.post(A + "/chat/completions", json=OK)
    client = make_client([{"id": "a", "base_url": A}])
    resp = client.chat_completion(user("hi"), model=AUTO)
    assert json.loads(rsps.calls[0].request.body)["model"] == "deepseek-v3.2"
    decision = resp.extra["routing"]
    assert isinstance(decision, RoutingDecision)
    assert (decision.tier, decision.model, resp.fallback) == ("simple", "deepseek-v3.2", False)
    assert resp.extra["cost"]["cost_usd"] == 0.00000210  # 6*0.28 + 1*0.42 micro-USD


def test_router_option_makes_auto_the_default_model(rsps, make_client):
    rsps.post(A + "/chat/completions", json=OK)
    router = ModelRouter(tiers={"simple": "gemini-2.5-flash"}, is_available=lambda m: True)
    client = make_client([{"id": "a", "base_url": A}], router=router)
    assert client.router is router
    resp = client.chat_completion(user("hi"))
    assert json.loads(rsps.calls[0].request.body)["model"] == "gemini-2.5-flash"
    assert resp.extra["routing"].tier == "simple"
    explicit = client.chat_completion(user("hi"), model="gpt-4.1")
    assert "routing" not in explicit.extra
    assert json.loads(rsps.calls[1].request.body)["model"] == "gpt-4.1"


def test_router_option_must_be_a_model_router(make_client):
    with pytest.raises(ConfigError) as info:
        make_client(router=lambda messages: "gpt-4.1")
    assert info.value.field == "router"


# Prompts built to make a backtracking regex work quadratically (runs of blank lines,
# whitespace, brackets), each a function of its size in characters.
ADVERSARIAL_PROMPTS = {
    "newlines": lambda n: "\n" * n,
    "space-newline": lambda n: " \n" * (n // 2),
    "tabs": lambda n: "\t" * n,
    "tab-newline": lambda n: "\t\n" * (n // 2),
    "backticks": lambda n: "`" * n,
    "long-line": lambda n: "x" * n,
    "call-then-spaces": lambda n: "f()" + " " * n + "x",
    "brace-then-spaces": lambda n: "{" + " " * n + "x",
    "open-calls": lambda n: "a(" * (n // 2),
    "closing-parens": lambda n: "f(" + ") " * (n // 2) + "x",
    "code-then-blank-lines": lambda n: "def f():\n" + "\n" * n + "    return 1\n",
}


_LINEAR_PASS_RE = re.compile(r"\bnowhere-to-be-found\b", re.IGNORECASE)


def _linear_pass(text):
    """Reference work that is linear in the text and reads it all, like the router does."""
    return _LINEAR_PASS_RE.search(text), text.count("\n"), text.split()


def _relative_cost(fn, text, *, runs: int, give_up_after_s: float) -> float:
    """fn's time over the linear reference's, on the same text: the fastest of ``runs``
    interleaved timings of each (noise only ever adds time, and a loaded machine slows
    both alike), stopping early once fn alone is so slow that the answer is clear."""
    best_fn = best_ref = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(text)
        t1 = time.perf_counter()
        _linear_pass(text)
        t2 = time.perf_counter()
        best_fn, best_ref = min(best_fn, t1 - t0), min(best_ref, t2 - t1)
        if best_fn > give_up_after_s:
            break
    return best_fn / max(best_ref, 1e-7)


@pytest.mark.parametrize("shape", sorted(ADVERSARIAL_PROMPTS))
def test_routing_cost_grows_linearly_with_adversarial_prompts_up_to_200k_characters(shape):
    make = ADVERSARIAL_PROMPTS[shape]

    def classify(text):
        return classify_request(RoutingRequest(user(text), {}))

    # Each step is 10x the input. Relative to linear reference work, linear routing costs
    # about the same at every size; a quadratic scan costs 10x more per step, and fails
    # at the first step in about a second instead of running for minutes.
    previous = None
    for size in (2_000, 20_000, 200_000):
        text = make(size)
        cost = _relative_cost(classify, text, runs=5,
                              give_up_after_s=float("inf") if previous is None else 1.0)
        if previous is not None:
            assert cost <= 3 * previous, f"{shape}: at {size} characters routing costs {cost:.1f}x a linear " \
                                         f"pass, up from {previous:.1f}x at a tenth of the size"
        previous = cost


def test_code_detection_reads_lines_like_before():
    assert has_code("x = 1\n\n\n  foo(bar)\n\n\n}\n")
    assert has_code("SELECT a FROM t\r\nreturn x\r\n")
    assert has_code("\t\tcall(x) ;   \nother(y)  {\n")
    assert not has_code("just prose (with an aside) and more.\nAnother line (aside) here.\n")
    assert not has_code("\n" * 1000 + "def")  # "def" without its space is a word, not code
    assert not has_code("one line()\n" + " \n" * 100)  # one code-like line is not enough
