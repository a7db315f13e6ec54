"""The measuring helpers of benchmarks/ (open-loop pacing, per-second figures, quota spending)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from holysheep_lb.errors import AllAttemptsFailedError
from holysheep_lb.loadgen import LoadResult
from holysheep_lb.simulator import SimulatedGateway

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _loadtools import full_seconds, run_paced, spend_quotas, steady_rps, worst_second_ratio  # noqa: E402
from _simproc import GatewayProcess  # noqa: E402

from .conftest import FakeClock, wait_until  # noqa: E402


def test_run_paced_starts_calls_on_a_fixed_schedule_whatever_the_answers():
    clock = FakeClock()
    started = []

    def call(i: int):
        started.append(i)
        if i % 5 == 4:
            raise AllAttemptsFailedError("every node failed", [])
        return SimpleNamespace(node_id="a" if i % 2 else "b")

    paced = run_paced(call, rate_per_s=10, duration_s=2, max_threads=4, clock=clock, sleep=clock.sleep)

    assert paced.offered == 20
    assert sorted(started) == list(range(20))
    assert clock.sleeps == pytest.approx([0.1] * 19)  # the dispatcher waits for each due time
    assert paced.load.calls == 20
    assert paced.load.errors == Counter({"AllAttemptsFailedError": 4})
    assert sum(paced.load.node_share.values()) == len(paced.load.latencies_ms) == 16
    assert sum(paced.load.per_second.values()) == 20
    assert paced.max_late_ms == 0.0


def test_run_paced_raises_a_bug_in_the_call_instead_of_counting_it():
    clock = FakeClock()

    def call(i: int):
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        run_paced(call, rate_per_s=10, duration_s=1, max_threads=2, clock=clock, sleep=clock.sleep)


@pytest.mark.parametrize("kw", [{"rate_per_s": 0}, {"duration_s": -1}, {"max_threads": 0}])
def test_run_paced_rejects_a_shape_that_sends_nothing(kw):
    args = {"rate_per_s": 1.0, "duration_s": 1.0, "max_threads": 1, **kw}
    with pytest.raises(ValueError, match="rate_per_s"):
        run_paced(lambda i: None, **args)


def test_per_second_figures_leave_out_the_partial_last_second():
    result = LoadResult(label="x", per_second=Counter({0: 100, 1: 50, 2: 100, 3: 7}))

    assert full_seconds(result, 3.4) == [100, 50, 100]
    assert worst_second_ratio([100, 50, 100]) == 0.5
    assert worst_second_ratio([0, 0]) == 0.0
    assert steady_rps(result, 3.4) == pytest.approx(250 / 3)
    assert full_seconds(LoadResult(label="y"), 2.0) == [0, 0]  # seconds without completions count as 0


def test_spend_quotas_leaves_every_node_without_requests_to_spend():
    nodes = [{"id": "a", "requests_per_minute": 30}, {"id": "b", "requests_per_minute": 90}]
    with SimulatedGateway(nodes, seed=1) as gw:
        spend_quotas([gw.base_url(n["id"]) for n in nodes], threads=4, deadline_s=30)
        for n in nodes:
            reply = requests.post(f"{gw.base_url(n['id'])}/chat/completions", timeout=10,
                                  json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 429, n["id"]
            assert gw.quota_stats(n["id"])["limited_requests"] >= 1


def test_gateway_process_answers_old_and_new_commands():
    spec = [{"id": "a", "prompt_cache_entries": 2, "requests_per_minute": 60, "capacity": 3}]
    with GatewayProcess(spec) as gw:
        url = gw.client_nodes[0]["base_url"]
        reply = requests.post(f"{url}/chat/completions", timeout=10,
                              json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.headers["x-ratelimit-remaining-requests"] == "59"
        gw.configure("a", latency_ms=1)
        # the gateway records an answer just after sending it
        assert wait_until(lambda: gw.outcomes("a") == {"ok": 1}, timeout_s=5)
        assert gw.counts() == {"a": 1}
        assert gw.request_count("a", "/v1/chat/completions") == 1
        assert gw.cache_stats("a") == {"hits": 0, "misses": 0, "entries": 0}  # "hi" alone has no prefix
        assert gw.quota_stats("a") == {"limited_requests": 0, "limited_tokens": 0}
        assert gw.max_concurrency_seen("a") == 1
        (entry,) = gw.request_log(last=1)
        assert (entry["node_id"], entry["model"], entry["outcome"], entry["status"]) == ("a", "gpt-4.1", "ok", 200)
        assert gw.request_log(last=0) == []
        gw.reset_counts()
        assert gw.counts() == {"a": 0}
        with pytest.raises(RuntimeError, match="unknown command"):
            gw._command({"no_such_command": None})
        with pytest.raises(RuntimeError, match="unknown node id"):
            gw.cache_stats("zz")
