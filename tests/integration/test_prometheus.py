"""The Prometheus collector, the Grafana dashboard and ``holysheep-lb metrics`` against the
simulated gateway on 127.0.0.1."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="the prometheus extra is not installed: pip install -e '.[test]'")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from holysheep_lb import Client, HolySheepError  # noqa: E402
from holysheep_lb import cli  # noqa: E402
from holysheep_lb.contrib.prometheus import HolySheepCollector  # noqa: E402
from holysheep_lb.pricing import InMemorySpendStore  # noqa: E402
from tests.conftest import wait_until  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "holysheep_lb_dashboard.json"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hello"}]
KEY = "sk-simulated-but-still-secret-4242"
JOIN_S = 30.0


def scrape(collector):
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def total(samples, metric, **labels):
    """The sum of ``metric`` over the series that carry ``labels``."""
    wanted = set(labels.items())
    return sum(v for (name, series), v in samples.items() if name == metric and wanted <= set(series))


def _run_threads(target, count):
    threads = [threading.Thread(target=target, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    return threads


def _join(threads):
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a caller thread did not finish in time"


# -- the numbers agree with the gateway's own ------------------------------------------------------


def test_per_node_counters_equal_what_each_node_received(gateway_factory):
    gw = gateway_factory([{"id": "a", "latency_ms": 2}, {"id": "b", "latency_ms": 2, "error_rate": 0.3},
                          {"id": "c", "latency_ms": 2, "rate_limit_rate": 0.2, "retry_after_s": 0.05}], seed=11)
    with Client(api_key=KEY, nodes=gw.client_nodes(), health_check_interval_s=None, strategy="round_robin",
                eject_after_failures=1000) as client:
        errors = []

        def call(k):
            for _ in range(15):
                try:
                    client.chat_completion(MSGS, model="gpt-4.1")
                except HolySheepError as exc:  # counted by the client too; kept to compare
                    errors.append(type(exc).__name__)

        _join(_run_threads(call, 4))
        text, samples = scrape(HolySheepCollector(client))
        stats = client.stats()
    for node in ("a", "b", "c"):
        answered = gw.outcomes(node, CHAT)
        assert total(samples, "holysheep_lb_node_requests_total", node=node) == gw.request_count(node, CHAT)
        assert total(samples, "holysheep_lb_node_requests_total", node=node, outcome="success") == \
            answered.get("ok", 0)
        assert total(samples, "holysheep_lb_node_requests_total", node=node, outcome="status_5xx") == \
            answered.get("error_5xx", 0)
        assert total(samples, "holysheep_lb_node_requests_total", node=node, outcome="status_429") == \
            answered.get("rate_limited", 0)
    assert gw.outcomes("b", CHAT).get("error_5xx") and gw.outcomes("c", CHAT).get("rate_limited")
    assert total(samples, "holysheep_lb_calls_total") == 60
    assert total(samples, "holysheep_lb_call_failures_total") == len(errors)
    # the histograms hold the same samples as stats() and are cumulative
    assert total(samples, "holysheep_lb_call_duration_seconds_count") == stats["successes"] == 60 - len(errors)
    for node in ("a", "b", "c"):
        buckets = sorted(((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                          if name == "holysheep_lb_node_request_duration_seconds_bucket"
                          and ("node", node) in labels))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == stats["nodes"][node]["successes"]
        mean_ms = stats["nodes"][node]["latency"]["mean_ms"]
        assert total(samples, "holysheep_lb_node_request_duration_seconds_sum", node=node) == \
            pytest.approx(mean_ms * counts[-1] / 1000.0)
    assert KEY not in text and KEY[3:] not in text


def test_stream_outcomes_and_time_to_first_chunk(gateway_factory):
    gw = gateway_factory([{"id": "a", "latency_ms": 2}])
    with Client(api_key=KEY, nodes=gw.client_nodes(), health_check_interval_s=None) as client:
        for _ in range(3):
            with client.chat_completion(MSGS, model="gpt-4.1", stream=True) as stream:
                stream.read_text()
        gw.configure("a", stream_fault="reset_midstream", stream_fault_after_chunks=1)
        with pytest.raises(HolySheepError):
            client.chat_completion(MSGS, model="gpt-4.1", stream=True).read_text()
        _, samples = scrape(HolySheepCollector(client))
        streams = client.stats()["streams"]
    assert total(samples, "holysheep_lb_streams_total", outcome="completed") == streams["completed"] == 3
    assert total(samples, "holysheep_lb_streams_total", outcome="interrupted") == streams["interrupted"] == 1
    [(reason, n)] = streams["interrupted_by_reason"].items()
    assert total(samples, "holysheep_lb_stream_interruptions_total", reason=reason) == n == 1
    assert total(samples, "holysheep_lb_stream_time_to_first_chunk_seconds_count") == 4
    assert total(samples, "holysheep_lb_stream_duration_seconds_count") == 3


def test_streams_spend_and_tokens_are_counted_with_or_without_a_usage_chunk_and_when_cut(gateway_factory):
    # the collector reads the spend ledger, which settles a stream when it ends: a usage
    # chunk's tokens, else (none sent, or cut) the estimate it charged
    gw = gateway_factory([{"id": "a", "latency_ms": 2}])
    with Client(api_key=KEY, nodes=gw.client_nodes(), health_check_interval_s=None, stream_rescue="off") as client:
        with client.chat_completion(MSGS, model="gpt-4.1", stream=True) as stream:
            stream.read_text()
        with client.chat_completion(MSGS, model="gpt-4.1", stream=True, max_tokens=30,
                                    stream_options={"include_usage": False}) as quiet:
            quiet.read_text()
        gw.configure(model="gpt-4.1", fault="stream_cut", fault_after_chunks=2)
        with pytest.raises(HolySheepError):
            client.chat_completion(MSGS, model="gpt-4.1", stream=True, max_tokens=20).read_text()
        _, samples = scrape(HolySheepCollector(client))
        report = client.cost_report()["totals"]
    assert stream.usage and quiet.usage is None
    assert report["output_tokens"] == stream.usage["completion_tokens"] + 30 + 20  # two estimates
    assert total(samples, "holysheep_lb_model_requests_total", model="gpt-4.1") == report["requests"] == 3
    assert total(samples, "holysheep_lb_model_tokens_total", model="gpt-4.1", type="input") == report["input_tokens"]
    assert total(samples, "holysheep_lb_model_tokens_total", model="gpt-4.1", type="output") == report["output_tokens"]
    assert total(samples, "holysheep_lb_model_cost_usd_total", model="gpt-4.1") == pytest.approx(report["cost_usd"])


# -- scraping while calls run ------------------------------------------------------------------------


def test_scrapes_while_eight_threads_call_never_fail_and_counters_only_grow(gateway_factory):
    gw = gateway_factory([{"id": n, "latency_ms": 1} for n in "abcd"], seed=2)
    with Client(api_key=KEY, nodes=gw.client_nodes(), health_check_interval_s=None, pool_maxsize=16) as client:
        collector = HolySheepCollector(client)
        done = threading.Event()
        left = [8]
        lock = threading.Lock()

        def call(k):
            try:
                for _ in range(25):
                    client.chat_completion(MSGS, model="gpt-4.1")
            finally:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        threads = _run_threads(call, 8)
        seen = []
        while not done.is_set() and len(seen) < 10_000:  # bounded either way
            _, samples = scrape(collector)
            seen.append(total(samples, "holysheep_lb_calls_total"))
        _join(threads)
        _, samples = scrape(collector)
    assert seen == sorted(seen)
    assert total(samples, "holysheep_lb_calls_total") == 200
    assert total(samples, "holysheep_lb_node_requests_total") == sum(gw.request_count(n, CHAT) for n in "abcd")
    assert total(samples, "holysheep_lb_node_in_flight") == 0


class _SlowRowsStore(InMemorySpendStore):
    """A spend store whose first ``rows()`` blocks, as a shared store's network read might."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self._first = True

    def rows(self):
        if self._first:
            self._first = False
            self.entered.set()
            self.release.wait(JOIN_S)
        return super().rows()


def test_a_scrape_waiting_on_io_holds_no_lock_that_calls_or_other_scrapes_need(gateway_factory):
    gw = gateway_factory([{"id": "a", "latency_ms": 1}, {"id": "b", "latency_ms": 1}])
    store = _SlowRowsStore()
    with Client(api_key=KEY, nodes=gw.client_nodes(), health_check_interval_s=None, spend_store=store) as client:
        collector = HolySheepCollector(client)
        outcome = {}
        slow = threading.Thread(target=lambda: outcome.setdefault("text", scrape(collector)[0]))
        slow.start()
        try:
            assert store.entered.wait(JOIN_S)
            _join(_run_threads(lambda k: [client.chat_completion(MSGS, model="gpt-4.1") for _ in range(5)], 8))
            _, samples = scrape(collector)  # a second scrape goes through meanwhile
            assert total(samples, "holysheep_lb_calls_total") == 40
            assert slow.is_alive(), "the first scrape is still waiting on its read"
        finally:
            store.release.set()
            slow.join(JOIN_S)
    assert not slow.is_alive() and "holysheep_lb_calls_total" in outcome["text"]


# -- the Grafana dashboard ----------------------------------------------------------------------------


def _dashboard_exprs():
    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))))


def test_every_metric_the_dashboard_queries_exists_in_a_real_exposition(gateway_factory):
    gw = gateway_factory([{"id": "a", "latency_ms": 2}, {"id": "b", "latency_ms": 2, "error_rate": 0.5}], seed=4)
    with Client(api_key=KEY, nodes=gw.client_nodes(), health_check_interval_s=0.05, retry_budget_ratio=0.5,
                hedge_delay_s=0.5, requests_per_minute=6000, cache={"maxsize": 8, "ttl_s": 60},
                strategy="round_robin") as client:
        for _ in range(12):
            try:
                client.chat_completion(MSGS, model="gpt-4.1", temperature=0)
            except HolySheepError:
                pass
        gw.configure("a", stream_fault="reset_midstream", stream_fault_after_chunks=1)
        gw.configure("b", error_rate=0.0, stream_fault="reset_midstream", stream_fault_after_chunks=1)
        try:
            client.chat_completion(MSGS, model="gpt-4.1", stream=True).read_text()
        except HolySheepError:
            pass
        assert wait_until(lambda: all(n["probes"] for n in client.nodes()), 5.0)
        _, samples = scrape(HolySheepCollector(client))
    exposed = {name for name, _ in samples}
    exprs = _dashboard_exprs()
    queried = {m for e in exprs for m in re.findall(r"\bholysheep_lb_[a-z0-9_]+", e)}
    assert len(queried) >= 20
    assert queried <= exposed, f"queried but not exposed: {sorted(queried - exposed)}"
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("request rate by node and outcome", "p50 / p95 / p99", "in-flight", "node usable",
                  "breaker states", "retries and hedges", "tokens per model", "spend per model"):
        assert topic in titles
    for e in exprs:  # each query keeps to the dashboard's client selection
        if "holysheep_lb_" in e and not e.startswith("label_values"):
            assert all('client=~"$client"' in sel for sel in re.findall(r"holysheep_lb_[a-z0-9_]+\{[^}]*\}", e)), e


# -- holysheep-lb metrics ----------------------------------------------------------------------------


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_simulate_prints_the_exposition_after_a_few_calls(capsys):
    code, out, err = run(["metrics", "--simulate", "--requests", "12"], capsys)
    assert code == 0
    samples = _samples(out)
    assert total(samples, "holysheep_lb_calls_total") == 12
    assert total(samples, "holysheep_lb_node_requests_total") >= 12
    assert {dict(labels)["node"] for name, labels in samples if name == "holysheep_lb_node_usable"} == \
        {"us-east-1", "eu-west-1", "ap-southeast-1", "ap-northeast-1"}
    assert cli.SIM_API_KEY not in out + err


def test_metrics_json_lists_the_families(capsys):
    code, out, _ = run(["metrics", "--simulate", "--requests", "3", "--json"], capsys)
    assert code == 0
    families = {f["name"]: f for f in json.loads(out)["metrics"]}
    [calls] = families["holysheep_lb_calls"]["samples"]
    assert (calls["name"], calls["labels"], calls["value"]) == ("holysheep_lb_calls_total",
                                                                {"client": "default"}, 3.0)
    assert families["holysheep_lb_call_duration_seconds"]["type"] == "histogram"


def test_metrics_uses_the_configured_nodes_and_sends_nothing_by_default(gateway_factory, monkeypatch, capsys):
    gw = gateway_factory([{"id": "a"}, {"id": "b"}])
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    monkeypatch.delenv("HOLYSHEEP_BASE_URL", raising=False)
    monkeypatch.setenv("HOLYSHEEP_NODES", json.dumps(gw.client_nodes()))
    code, out, _ = run(["metrics"], capsys)
    assert code == 0 and gw.counts() == {"a": 0, "b": 0}
    assert total(_samples(out), "holysheep_lb_calls_total") == 0
    code, out, _ = run(["metrics", "--requests", "5", "--model", "m"], capsys)
    assert code == 0
    samples = _samples(out)
    for node in ("a", "b"):
        assert total(samples, "holysheep_lb_node_requests_total", node=node) == gw.request_count(node, CHAT)
    assert total(samples, "holysheep_lb_calls_total") == 5


def test_metrics_usage_errors_are_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.json"
    path.write_text("{}")
    code, _, err = run(["metrics", "--simulate", "--config", str(path)], capsys)
    assert code == 1 and err.count("\n") == 1 and "--simulate and --config" in err
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "holysheep_lb.contrib.prometheus", raising=False)
    code, _, err = run(["metrics", "--simulate"], capsys)
    assert code == 1 and "pip install 'holysheep-lb[prometheus]'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        cli.main(["metrics", "--requests", "-1"])
