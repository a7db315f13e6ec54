"""The Prometheus collector on recorded HTTP (``responses``) and a fake clock: names, types,
units, label sets, breaker states, counters that never go down, bounded labels, no key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

prometheus_client = pytest.importorskip("prometheus_client",
                                        reason="the prometheus extra is not installed: pip install -e '.[test]'")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.openmetrics import exposition as openmetrics  # noqa: E402
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from holysheep_lb import AllAttemptsFailedError, AuthenticationError, ConfigError, RateLimitExceeded  # noqa: E402
from holysheep_lb.contrib.prometheus import (  # noqa: E402
    DURATION_BUCKETS_S,
    METRICS,
    HolySheepCollector,
    families_as_json,
)
from holysheep_lb.pricing import OTHER_MODELS, InMemorySpendStore  # noqa: E402
from tests.conftest import API_KEY, chat_body, wait_until  # noqa: E402

A = "https://a.example/v1"
B = "https://b.example/v1"
NODES = [{"id": "a", "base_url": A}, {"id": "b", "base_url": B}]
MSGS = [{"role": "user", "content": "hello"}]
DAY_S = 86400.0
# families whose series appear with their first event (an error class, a stream break reason)
EVENT_ONLY = {"holysheep_lb_call_failures_total", "holysheep_lb_stream_interruptions_total"}


class WallClock:
    def __init__(self, now: float = 20_000 * DAY_S + 3600) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scrape(collector):
    """The text exposition of one registry holding ``collector``, and its samples by (name, labels)."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples, metric, /, **labels):
    labels.setdefault("client", "default")
    return samples[(metric, tuple(sorted(labels.items())))]


def _client(make_client, clock, **kw):
    kw.setdefault("strategy", "round_robin")
    kw.setdefault("retry_budget_ratio", None)
    return make_client(NODES, clock=clock, sleep=clock.sleep, rand=lambda: 0.0, **kw)


# -- names, types, units, labels ---------------------------------------------------------------


def test_every_family_follows_the_naming_rules_and_declares_its_labels(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=chat_body())
    rsps.post(B + "/chat/completions", json=chat_body())
    client = _client(make_client, clock, retry_budget_ratio=0.2, hedge_delay_s=5.0, requests_per_minute=600,
                     cache={"maxsize": 10, "ttl_s": 30}, health_check_interval_s=30.0)
    for _ in range(3):
        client.chat_completion(MSGS, model="gpt-4.1")
    text, samples = scrape(HolySheepCollector(client))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, help_text, labels) in METRICS.items():
        assert name.startswith("holysheep_lb_")
        family_name = name[: -len("_total")] if kind == "counter" else name
        family = families[family_name]
        assert family.type == kind and family.documentation == help_text and help_text
        if kind == "counter":
            assert name.endswith("_total")
        if kind == "histogram" or "seconds" in name:
            assert "_seconds" in name  # base unit, never ms
        if name not in EVENT_ONLY:
            assert family.samples, f"{name} has no sample in a fully configured client"
        for s in family.samples:
            assert set(s.labels) - {"le"} == set(labels), (name, s.labels)
            if kind == "counter":
                assert s.name == name
    # histograms carry the OpenTelemetry GenAI boundaries, reaching LLM times
    les = [s.labels["le"] for s in families["holysheep_lb_call_duration_seconds"].samples
           if s.name.endswith("_bucket")]
    assert les == [repr(b) for b in DURATION_BUCKETS_S] + ["+Inf"]
    assert DURATION_BUCKETS_S[0] == 0.01 and DURATION_BUCKETS_S[-1] == 81.92
    assert value(samples, "holysheep_lb_calls_total") == 3.0
    assert value(samples, "holysheep_lb_info", version=prometheus_version(), strategy="round_robin") == 1.0


def prometheus_version():
    from holysheep_lb import __version__
    return __version__


def test_the_openmetrics_exposition_is_valid_and_declares_units(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=chat_body())
    client = _client(make_client, clock)
    client.chat_completion(MSGS, model="gpt-4.1")
    registry = CollectorRegistry()
    registry.register(HolySheepCollector(client))
    text = openmetrics.generate_latest(registry).decode("utf-8")
    families = {f.name: f for f in parse_openmetrics(text)}  # raises on an invalid exposition
    assert families["holysheep_lb_call_duration_seconds"].unit == "seconds"
    assert families["holysheep_lb_calls"].type == "counter"


def test_custom_buckets_are_used_and_bad_ones_are_refused(make_client, clock):
    client = _client(make_client, clock)
    _, samples = scrape(HolySheepCollector(client, buckets_s=[0.5, 30]))
    assert value(samples, "holysheep_lb_call_duration_seconds_bucket", le="30.0") == 0.0
    for bad in ([], [1.0, 0.5], [0.0, 1.0], [float("nan")], "1,2", [True]):
        with pytest.raises(ConfigError) as info:
            HolySheepCollector(client, buckets_s=bad)
        assert info.value.field == "buckets_s"


# -- the numbers ------------------------------------------------------------------------------------


def test_node_outcomes_add_up_to_the_requests_sent_and_histograms_match_stats(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=500)
    rsps.post(B + "/chat/completions", json=chat_body())
    client = _client(make_client, clock, max_retries=1, eject_after_failures=100)
    for _ in range(4):
        client.chat_completion(MSGS, model="gpt-4.1")
    with pytest.raises(AuthenticationError):
        rsps.replace("POST", B + "/chat/completions", status=401)
        client.chat_completion(MSGS, model="gpt-4.1")
    stats = client.stats()
    _, samples = scrape(HolySheepCollector(client))
    for node in ("a", "b"):
        ended = sum(v for (name, labels), v in samples.items()
                    if name == "holysheep_lb_node_requests_total" and ("node", node) in labels)
        assert ended == stats["nodes"][node]["requests"]
        assert value(samples, "holysheep_lb_node_request_duration_seconds_count", node=node) == \
            stats["nodes"][node]["successes"]
    assert value(samples, "holysheep_lb_node_requests_total", node="a", outcome="status_5xx") == \
        stats["nodes"]["a"]["failures"]["status_5xx"] >= 2
    assert value(samples, "holysheep_lb_node_requests_total", node="b", outcome="status_4xx") == 1
    assert value(samples, "holysheep_lb_calls_total") == stats["calls"] == 5
    assert value(samples, "holysheep_lb_call_failures_total", error="AuthenticationError") == 1
    assert value(samples, "holysheep_lb_call_duration_seconds_count") == stats["successes"] == 4
    assert value(samples, "holysheep_lb_call_duration_seconds_bucket", le="+Inf") == 4


def test_a_tripped_breaker_shows_open_then_closed(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=500)
    rsps.post(B + "/chat/completions", status=500)
    client = _client(make_client, clock, breaker={"fail_max": 2, "reset_timeout_s": 20}, max_retries=0,
                     eject_after_failures=100)
    collector = HolySheepCollector(client)
    for model in ("gpt-4.1", "gpt-4.1", "someone-elses-model", "someone-elses-model"):
        with pytest.raises(AllAttemptsFailedError):
            client.chat_completion(MSGS, model=model)
    text, samples = scrape(collector)
    for state, expected in (("open", 1), ("closed", 0), ("half_open", 0), ("unknown", 0)):
        assert value(samples, "holysheep_lb_breaker_state", kind="model", name="gpt-4.1", state=state) == expected
    assert "someone-elses-model" not in text  # not a configured model: counted, not named
    assert value(samples, "holysheep_lb_breakers", state="open") == 2
    assert value(samples, "holysheep_lb_breaker_transitions_total", state="open") == 2

    clock.advance(20)
    rsps.replace("POST", A + "/chat/completions", json=chat_body())
    rsps.replace("POST", B + "/chat/completions", json=chat_body())
    client.chat_completion(MSGS, model="gpt-4.1")
    _, samples = scrape(collector)
    assert value(samples, "holysheep_lb_breaker_state", kind="model", name="gpt-4.1", state="closed") == 1
    assert value(samples, "holysheep_lb_breaker_state", kind="model", name="gpt-4.1", state="open") == 0
    assert value(samples, "holysheep_lb_breakers", state="open") == 1
    assert value(samples, "holysheep_lb_breaker_transitions_total", state="half_open") == 1
    assert value(samples, "holysheep_lb_breaker_transitions_total", state="closed") == 1


def test_an_ejected_node_is_unusable_with_its_reason(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=503)
    rsps.post(B + "/chat/completions", json=chat_body())
    client = _client(make_client, clock, eject_after_failures=1, max_retries=1)
    client.chat_completion(MSGS, model="gpt-4.1")
    _, samples = scrape(HolySheepCollector(client))
    assert value(samples, "holysheep_lb_node_usable", node="a") == 0
    assert value(samples, "holysheep_lb_node_usable", node="b") == 1
    reasons = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
               if name == "holysheep_lb_node_unusable_reason" and ("node", "a") in labels}
    assert reasons == {"down": 0, "ejected": 1, "half_open_trial": 0, "throttled": 0}
    assert value(samples, "holysheep_lb_node_ejections_total", node="a") == 1


def test_rate_limit_waits_and_refusals_are_counted(rsps, make_client):
    rsps.post(A + "/chat/completions", json=chat_body())
    client = make_client([{"id": "a", "base_url": A}], requests_per_minute=2)
    client.chat_completion(MSGS, model="gpt-4.1")  # the burst of one request; the next is due in 60 s
    began = time.monotonic()
    with pytest.raises(RateLimitExceeded):
        client.chat_completion(MSGS, model="gpt-4.1", deadline_s=0.05)  # waits, then is refused
    waited = time.monotonic() - began
    _, samples = scrape(HolySheepCollector(client))
    assert value(samples, "holysheep_lb_rate_limit_waits_total", limit="requests") == 1
    assert value(samples, "holysheep_lb_rate_limit_rejections_total", limit="requests") == 1
    assert 0.0 < value(samples, "holysheep_lb_rate_limit_wait_seconds_total", limit="requests") <= waited
    assert value(samples, "holysheep_lb_call_failures_total", error="RateLimitExceeded") == 1


# -- spend per model: bounded labels, counters that never go down ------------------------------


def test_spend_per_model_uses_configured_models_and_lumps_the_others(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=chat_body(prompt_tokens=100, completion_tokens=50))
    client = make_client([{"id": "a", "base_url": A}], prices={"gpt-4.1": (2.0, 8.0)}, wall_clock=WallClock())
    client.chat_completion(MSGS, model="gpt-4.1")
    for i in range(3):
        client.chat_completion(MSGS, model=f"user-typed-{i}")
    text, samples = scrape(HolySheepCollector(client))
    assert value(samples, "holysheep_lb_model_requests_total", model="gpt-4.1") == 1
    assert value(samples, "holysheep_lb_model_tokens_total", model="gpt-4.1", type="input") == 100
    assert value(samples, "holysheep_lb_model_tokens_total", model="gpt-4.1", type="output") == 50
    assert value(samples, "holysheep_lb_model_cost_usd_total", model="gpt-4.1") == pytest.approx(0.0006)
    assert value(samples, "holysheep_lb_model_requests_total", model=OTHER_MODELS) == 3
    assert "user-typed" not in text


def test_spend_counters_keep_the_days_the_ledger_forgets(rsps, make_client):
    rsps.post(A + "/chat/completions", json=chat_body(prompt_tokens=1000, completion_tokens=0))
    wall = WallClock()
    client = make_client([{"id": "a", "base_url": A}], prices={"gpt-4.1": (1.0, 1.0)}, wall_clock=wall,
                         spend_store=InMemorySpendStore(retain_days=31))
    collector = HolySheepCollector(client)
    shown = []
    for _ in range(3):  # one call on each of three days, 20 days apart
        client.chat_completion(MSGS, model="gpt-4.1")
        _, samples = scrape(collector)
        shown.append(value(samples, "holysheep_lb_model_requests_total", model="gpt-4.1"))
        wall.now += 20 * DAY_S
    client.chat_completion(MSGS, model="gpt-4.1")  # day 60: the ledger keeps days 40 and 60 only
    assert client.cost_report()["totals"]["requests"] == 2
    _, samples = scrape(collector)
    shown.append(value(samples, "holysheep_lb_model_requests_total", model="gpt-4.1"))
    assert shown == [1, 2, 3, 4]
    assert value(samples, "holysheep_lb_model_cost_usd_total", model="gpt-4.1") == pytest.approx(0.004)


def test_a_counter_that_drops_at_the_source_is_shown_at_its_highest(make_client, clock, monkeypatch):
    client = _client(make_client, clock, retry_budget_ratio=0.2)
    collector = HolySheepCollector(client)
    real_stats = client.stats
    retries = iter([5, 4, 6])  # a refunded retry takes one back

    def stats():
        snap = real_stats()
        snap["retry_budget"]["retries"] = next(retries)
        return snap

    monkeypatch.setattr(client, "stats", stats)
    shown = [value(scrape(collector)[1], "holysheep_lb_retry_budget_retries_total") for _ in range(3)]
    assert shown == [5, 5, 6]


def test_error_labels_are_library_exception_names_only(make_client, clock, monkeypatch):
    client = _client(make_client, clock)
    real_stats = client.stats

    def stats():
        snap = real_stats()
        snap["failures_by_error"] = {"AuthenticationError": 2, "MyAppError": 1, "KeyError": 1}
        return snap

    monkeypatch.setattr(client, "stats", stats)
    text, samples = scrape(HolySheepCollector(client))
    assert value(samples, "holysheep_lb_call_failures_total", error="AuthenticationError") == 2
    assert value(samples, "holysheep_lb_call_failures_total", error="other") == 2
    assert "MyAppError" not in text


# -- secrets, several clients, bad arguments ----------------------------------------------------


def test_the_api_key_appears_nowhere_in_any_exposition(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=401, json={"error": {"message": f"bad key {API_KEY}"}})
    rsps.post(B + "/chat/completions", json=chat_body())
    client = _client(make_client, clock, breaker={"fail_max": 1}, requests_per_minute=100,
                     rate_limit_burst_s=30)  # a burst of 50: the three calls go at once
    for _ in range(3):
        try:
            client.chat_completion(MSGS, model="gpt-4.1")
        except AuthenticationError:
            pass
    collector = HolySheepCollector(client)
    registry = CollectorRegistry()
    registry.register(collector)
    texts = [generate_latest(registry).decode(), openmetrics.generate_latest(registry).decode(),
             json.dumps(families_as_json(collector.collect())), repr(collector)]
    for text in texts:
        for fragment in (API_KEY, API_KEY[3:], "SECRET-never-log-me"):
            assert fragment not in text


def test_one_collector_labels_several_clients_and_a_second_collector_is_refused(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=chat_body())
    chat, batch = _client(make_client, clock), _client(make_client, clock)
    chat.chat_completion(MSGS, model="gpt-4.1")
    collector = HolySheepCollector({"chat": chat, "batch": batch})
    registry = CollectorRegistry()
    registry.register(collector)
    _, samples = scrape(HolySheepCollector({"chat": chat, "batch": batch}))
    assert value(samples, "holysheep_lb_calls_total", client="chat") == 1
    assert value(samples, "holysheep_lb_calls_total", client="batch") == 0
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(HolySheepCollector(batch, client_name="batch"))
    _, samples = scrape(HolySheepCollector(chat, client_name="chat-api"))
    assert value(samples, "holysheep_lb_calls_total", client="chat-api") == 1


@pytest.mark.parametrize("args, kwargs, field", [
    ((None,), {}, "clients"),
    (({},), {}, "clients"),
    (("client",), {}, "clients"),
    (({"x": object()},), {}, "clients[x]"),
    ((), {"client_name": ""}, "client_name"),
    ((), {"client_name": 3}, "client_name"),
])
def test_bad_arguments_name_the_field(make_client, clock, args, kwargs, field):
    if not args:
        args = (_client(make_client, clock),)
    with pytest.raises(ConfigError) as info:
        HolySheepCollector(*args, **kwargs)
    assert info.value.field == field


def test_a_client_name_with_a_mapping_is_refused(make_client, clock):
    with pytest.raises(ConfigError) as info:
        HolySheepCollector({"a": _client(make_client, clock)}, client_name="b")
    assert info.value.field == "client_name"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_during_a_scrape_can_scrape(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=chat_body())
    client = _client(make_client, clock)
    client.chat_completion(MSGS, model="gpt-4.1")
    collector = HolySheepCollector(client)
    with collector._totals_lock:  # as if another thread were scraping at fork time
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if value(scrape(collector)[1], "holysheep_lb_calls_total") == 1 else 2
            finally:
                os._exit(code)
    ended = []
    if not wait_until(lambda: ended.append(os.waitpid(pid, os.WNOHANG)) or ended[-1][0] == pid, 10.0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child's scrape blocked on a lock held at fork time")
    assert os.WEXITSTATUS(ended[-1][1]) == 0


# -- the core does not need the extra ------------------------------------------------------------


def test_importing_the_library_and_its_cli_never_imports_prometheus_client():
    code = ("import sys, holysheep_lb, holysheep_lb.cli, holysheep_lb.contrib; "
            "assert 'prometheus_client' not in sys.modules, sorted(m for m in sys.modules if 'prom' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_the_extra_the_library_works_and_the_collector_says_what_to_install():
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import holysheep_lb\n"
            "holysheep_lb.Client(api_key='k', nodes=[{'id': 'a', 'base_url': 'https://a.example/v1'}],"
            " health_check_interval_s=None).close()\n"
            "try:\n"
            "    import holysheep_lb.contrib.prometheus\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    assert "pip install 'holysheep-lb[prometheus]'" in out.stdout
