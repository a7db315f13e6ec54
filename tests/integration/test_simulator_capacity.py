"""Prompt caches, quotas and a hang under load on the simulated gateway."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from holysheep_lb.simulator import SimNode, SimulatedGateway

from ..conftest import FakeClock, wait_until
from .sim_helpers import TIMEOUT, body, chat_url, parse, read_stream

LONG_SYSTEM = {"role": "system", "content": "You answer questions about load balancers. " * 30}  # 1,290 chars


def cached_chat(user: str, model: str = "gpt-4.1"):
    return body(model, messages=[LONG_SYSTEM, {"role": "user", "content": user}])


@pytest.fixture
def clock():
    return FakeClock()


# -- prompt cache -------------------------------------------------------------------------------


def test_a_repeated_prefix_hits_the_cache_of_the_node_that_served_it(clock):
    with SimulatedGateway([SimNode("a", prompt_cache_entries=8, prompt_cache_min_tokens=256), SimNode("b")],
                          clock=clock) as gw:
        with requests.Session() as s:
            first = s.post(chat_url(gw, "a"), json=cached_chat("q1"), timeout=TIMEOUT).json()["usage"]
            second = s.post(chat_url(gw, "a"), json=cached_chat("q2"), timeout=TIMEOUT).json()["usage"]
            elsewhere = s.post(chat_url(gw, "b"), json=cached_chat("q3"), timeout=TIMEOUT).json()["usage"]
            short = s.post(chat_url(gw, "a"), json=body("gpt-4.1"), timeout=TIMEOUT).json()["usage"]
        assert first["prompt_tokens_details"] == {"cached_tokens": 0}
        assert second["prompt_tokens_details"] == {"cached_tokens": 327}  # the system message: 1,290 / 4 + 4
        assert second["prompt_tokens"] == first["prompt_tokens"]
        assert "prompt_tokens_details" not in elsewhere  # node b has no cache: usage as before
        assert short["prompt_tokens_details"] == {"cached_tokens": 0}  # below the minimum prefix
        assert gw.cache_stats("a") == {"hits": 1, "misses": 1, "entries": 1}
        clock.advance(300)  # the default TTL
        assert gw.cache_stats("a")["entries"] == 0
        gw.reset_counts()
        assert gw.cache_stats("a") == {"hits": 0, "misses": 0, "entries": 0}


@pytest.mark.parametrize("form, miss, hit", [
    ("deepseek", {"prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 331},
     {"prompt_cache_hit_tokens": 327, "prompt_cache_miss_tokens": 4}),
    ("anthropic", {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 327},
     {"cache_read_input_tokens": 327, "cache_creation_input_tokens": 0}),
])
def test_cache_usage_in_other_providers_forms(clock, form, miss, hit):
    with SimulatedGateway([SimNode("a")], clock=clock) as gw:
        gw.configure("a", prompt_cache_entries=4, prompt_cache_min_tokens=100, prompt_cache_usage=form)
        stream = dict(cached_chat("q1"), stream=True, stream_options={"include_usage": True})
        payloads, _ = read_stream(requests.post(chat_url(gw), json=stream, timeout=TIMEOUT, stream=True))
        usage = parse(payloads)[-2]["usage"]
        assert {k: usage[k] for k in miss} == miss and usage["prompt_tokens"] == 331
        usage = requests.post(chat_url(gw), json=cached_chat("q2"), timeout=TIMEOUT).json()["usage"]
        assert {k: usage[k] for k in hit} == hit


def test_a_cache_hit_is_answered_faster(clock):
    with SimulatedGateway([SimNode("a", latency_ms=300, prompt_cache_entries=4, prompt_cache_min_tokens=100,
                                   prompt_cache_latency_factor=0.1)], clock=clock) as gw:
        timings = []
        for user in ("q1", "q2"):
            t0 = time.monotonic()
            assert requests.post(chat_url(gw), json=cached_chat(user), timeout=TIMEOUT).status_code == 200
            timings.append(time.monotonic() - t0)
        assert timings[0] >= 0.29 and timings[1] < 0.2


# -- quotas -------------------------------------------------------------------------------------

QUOTA_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                 "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def test_quota_headers_on_every_answer_and_a_429_when_spent(clock):
    with SimulatedGateway([SimNode("a", requests_per_minute=3, tokens_per_minute=10_000)], clock=clock) as gw:
        with requests.Session() as s:
            answers = [s.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT) for _ in range(3)]
            tokens = answers[0].json()["usage"]["total_tokens"]
            assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
            assert [r.headers["x-ratelimit-remaining-tokens"] for r in answers] == [
                str(10_000 - tokens * n) for n in (1, 2, 3)]
            assert answers[-1].headers["x-ratelimit-reset-requests"] == "1m0s"  # 3 requests at 1 per 20 s
            assert answers[-1].headers["x-ratelimit-limit-tokens"] == "10000"
            refused = s.post(chat_url(gw), json=body("gpt-4.1", stream=True), timeout=TIMEOUT)
            assert refused.status_code == 429
            assert refused.headers["Retry-After"] == "20" and refused.headers["retry-after-ms"] == "20000"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert all(h in refused.headers for h in QUOTA_HEADERS)
            probe = s.get(gw.base_url("a") + "/models", timeout=TIMEOUT)  # free, but it shows the state
            assert probe.status_code == 200 and probe.headers["x-ratelimit-remaining-requests"] == "0"
            clock.advance(20)  # replenished continuously: one request back
            assert s.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT).status_code == 200
            assert s.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT).status_code == 429
            gw.configure("a", quota_retry_after=False)
            refused = s.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT)
            assert refused.status_code == 429 and "Retry-After" not in refused.headers
        assert gw.quota_stats("a") == {"limited_requests": 3, "limited_tokens": 0}
        assert wait_until(lambda: gw.outcomes("a").get("rate_limited") == 3), gw.outcomes("a")


def test_token_quota_counts_prompt_and_answer(clock):
    with SimulatedGateway([SimNode("a", tokens_per_minute=70)], clock=clock) as gw:
        first = requests.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT)
        tokens = first.json()["usage"]["total_tokens"]
        assert tokens == 32 and first.headers["x-ratelimit-remaining-tokens"] == "38"
        assert "x-ratelimit-limit-requests" not in first.headers
        assert requests.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT).status_code == 200
        refused = requests.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
        embed = requests.post(gw.base_url("a") + "/embeddings", json={"input": "abcd"}, timeout=TIMEOUT)
        assert embed.status_code == 200 and embed.headers["x-ratelimit-remaining-tokens"] == "5"
        assert gw.quota_stats("a") == {"limited_requests": 0, "limited_tokens": 1}


def test_quotas_and_caches_leave_the_seeded_5xx_sequence_unchanged():
    def statuses(**extra):
        with SimulatedGateway([SimNode("x", error_rate=0.5, **extra)], seed=9) as g, requests.Session() as s:
            return [s.post(chat_url(g, "x"), json=cached_chat(str(i)), timeout=TIMEOUT).status_code for i in range(30)]

    plain = statuses()
    assert statuses(requests_per_minute=10_000, tokens_per_minute=10**7, prompt_cache_entries=4,
                    prompt_cache_min_tokens=10, models={"gpt-4.1": {"context_window_tokens": 10**6}}) == plain
    assert 200 in plain and max(plain) >= 500


# -- hang under load ----------------------------------------------------------------------------


def test_a_node_hangs_after_n_requests_holding_its_capacity_until_released():
    gw = SimulatedGateway([SimNode("a", capacity=2, hang_after_requests=2, hang_s=30)]).start()
    try:
        with requests.Session() as s:
            for _ in range(2):
                assert s.post(chat_url(gw), json=body("gpt-4.1"), timeout=TIMEOUT).status_code == 200
        results = []
        lock = threading.Lock()

        def one():
            try:
                requests.post(chat_url(gw), json=body("gpt-4.1"), timeout=(2.0, 10.0))
                outcome = "answered"
            except requests.exceptions.ConnectionError:
                outcome = "dropped"
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=one, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        assert wait_until(lambda: gw.in_flight("a") == 3, 3.0)  # two hang holding both slots, one queued
        assert gw.max_concurrency_seen("a") == 2
        gw.configure("a", hang_after_requests=None)  # releases the held requests
        for t in threads:
            t.join(5.0)
        assert sorted(results) == ["answered", "dropped", "dropped"]
        assert wait_until(lambda: gw.outcomes("a") == {"ok": 3, "hang": 2}), gw.outcomes("a")
        gw.configure("a", hang_after_requests=0, hang_s=0.2)  # from now on, every request hangs for 0.2 s
        t0 = time.monotonic()
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(gw.base_url("a") + "/models", timeout=TIMEOUT)
        assert 0.15 <= time.monotonic() - t0 < 3.0
    finally:
        t0 = time.monotonic()
        gw.stop(timeout_s=2.0)
        assert time.monotonic() - t0 < 3.0
