"""Budgets, the response cache and the cost-routing example against the simulated gateway."""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from decimal import Decimal

from holysheep_lb import Budget, BudgetExceededError, Client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# 400 chars -> 104 prompt tokens; the echo is longer than 5 words, so usage is 5 completion
# tokens: the gateway's usage equals the client's estimate exactly.
MSGS = [{"role": "user", "content": ("word " * 80).strip().ljust(400, "x")}]
PER_CALL = Decimal(104 * 2 + 5 * 8) / 1_000_000  # gpt-4.1


def test_32_threads_never_pass_the_daily_cap(gateway_factory):
    gw = gateway_factory([{"id": "a"}, {"id": "b"}])
    cap = 0.05
    client = Client(nodes=gw.client_nodes(), health_check_interval_s=None, budget=Budget(daily_usd=cap))
    start = threading.Barrier(32)
    ok = [0] * 32
    refused = [0] * 32

    def worker(k: int) -> None:
        start.wait(timeout=10)
        for _ in range(50):
            try:
                client.chat_completion(MSGS, model="gpt-4.1", max_tokens=5)
                ok[k] += 1
            except BudgetExceededError:
                refused[k] += 1
                return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        report = client.cost_report()
    finally:
        client.close()
    successes = sum(ok)
    assert successes == math.floor(Decimal(str(cap)) / PER_CALL) == 201
    assert sum(refused) == 32  # every thread was stopped by the cap, none by anything else
    assert report["totals"]["cost_usd"] == float(PER_CALL * successes) <= cap
    assert (report["totals"]["input_tokens"], report["totals"]["output_tokens"]) == (104 * 201, 5 * 201)
    assert sum(gw.counts().values()) == 201  # refused calls never reached the gateway


def test_concurrent_identical_calls_reach_the_gateway_once(gateway_factory):
    gw = gateway_factory([{"id": "a", "latency_ms": 300}])
    client = Client(nodes=gw.client_nodes(), health_check_interval_s=None, cache=True)
    start = threading.Barrier(16)
    results = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait(timeout=10)
        resp = client.chat_completion(MSGS, model="gpt-4.1", temperature=0, max_tokens=5)
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        stats = client.stats()["cache"]
        report = client.cost_report()
    finally:
        client.close()
    assert len(results) == 16
    assert gw.request_count("a", "/v1/chat/completions") == 1
    assert sorted(r.cached for r in results) == [False] + [True] * 15
    assert len({r.text for r in results}) == 1
    assert (stats["misses"], stats["hits"]) == (1, 15)
    assert (report["totals"]["requests"], report["totals"]["cached_requests"]) == (1, 15)


def test_cost_routing_example_runs_and_auto_is_cheaper(capsys):
    spec = importlib.util.spec_from_file_location("cost_routing", os.path.join(ROOT, "examples", "cost_routing.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--prompts", "200", "--threads", "8"])
    out = capsys.readouterr().out
    assert "reproduce: python examples/cost_routing.py --prompts 200" in out
    auto, fixed = results["auto"], results["gpt-4.1"]
    assert auto["totals"]["requests"] == fixed["totals"]["requests"] == 200
    assert fixed["by_model"]["gpt-4.1"]["share_of_requests"] == 1.0
    shares = {m: s["share_of_requests"] for m, s in auto["by_model"].items()}
    assert shares == {"deepseek-v3.2": 0.495, "gemini-2.5-flash": 0.24, "gpt-4.1": 0.225, "claude-sonnet-4.5": 0.04}
    # same prompts, same usage: the ledger's baseline is exactly what always-gpt-4.1 spent
    assert auto["totals"]["input_tokens"] == fixed["totals"]["input_tokens"]
    assert auto["baseline"]["cost_usd"] == fixed["totals"]["cost_usd"]
    assert auto["totals"]["cost_usd"] < 0.7 * fixed["totals"]["cost_usd"]
    assert fixed["baseline"]["savings_usd"] == 0.0
