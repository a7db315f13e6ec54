"""Prompt-cache affinity and cached-token pricing against the simulated gateway on 127.0.0.1."""

from __future__ import annotations

from holysheep_lb import Client


def _prompt(i: int) -> str:
    return f"You are assistant #{i}. " + "Follow the house rules carefully. " * 160  # ~1,400 tokens


def test_long_prefixes_keep_to_their_nodes_and_cached_tokens_are_priced_and_shown(gateway_factory):
    spec = [{"id": n, "latency_ms": 5, "prompt_cache_entries": 4, "prompt_cache_usage": form}
            for n, form in (("a", "openai"), ("b", "deepseek"), ("c", "anthropic"), ("d", "openai"))]
    gw = gateway_factory(spec)
    with Client(nodes=gw.client_nodes(), health_check_interval_s=None) as client:
        last = None
        for round_ in range(4):
            for i in range(8):  # 8 prefixes over 4 nodes caching 4 each: fits only if each keeps to a node
                messages = [{"role": "system", "content": _prompt(i)}, {"role": "user", "content": f"q{round_}"}]
                last = client.chat_completion(messages, model="gpt-4.1", max_tokens=5)
        hits = sum(gw.cache_stats(n)["hits"] for n in "abcd")
        assert hits == 24  # every call after the first of its prefix was a hit
        cost = last.extra["cost"]
        assert cost["cached_tokens"] > 1000 and cost["cache_saved_usd"] > 0
        assert cost["cost_usd"] < cost["estimated_usd"]
        report = client.cost_report()["totals"]
        assert report["cached_input_tokens"] > 24 * 1000 and report["cache_saved_usd"] > 0
        assert report["unreadable_usage"] == 0
        stats = client.stats()
        assert stats["affinity"]["keyed_calls"] == 32 and stats["affinity"]["hit_rate"] == 1.0
        shares = [row["prompt_cache"]["cached_share"] for row in client.nodes()
                  if row["prompt_cache"]["answers_with_usage"]]
        assert shares and all(s > 0.5 for s in shares)


def test_with_affinity_off_the_same_load_misses_the_caches(gateway_factory):
    spec = [{"id": n, "latency_ms": 5, "prompt_cache_entries": 4} for n in "abcd"]
    gw = gateway_factory(spec)
    with Client(nodes=gw.client_nodes(), health_check_interval_s=None, strategy="round_robin",
                affinity=False) as client:
        for round_ in range(4):
            for i in range(10):  # 10 prefixes: round robin sends each to every node in turn
                messages = [{"role": "system", "content": _prompt(i)}, {"role": "user", "content": f"q{round_}"}]
                client.chat_completion(messages, model="gpt-4.1", max_tokens=5)
        assert sum(gw.cache_stats(n)["hits"] for n in "abcd") < 15  # of 30 possible
        assert client.stats()["affinity"]["keyed_calls"] == 0
