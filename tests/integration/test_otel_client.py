"""contrib.otel against a real Client and the simulated gateway on 127.0.0.1.

Written to the observe.py contract (call_started, attempt_ended, decided, first_chunk,
call_ended); the module is skipped while the Client takes no observers.
"""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed: pip install -e '.[test]'")

from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from holysheep_lb import HolySheepError, StreamInterruptedError  # noqa: E402
from holysheep_lb.contrib.otel import instrument  # noqa: E402
from tests.otel_support import Telemetry  # noqa: E402

MODEL = "gpt-4.1"
PROMPT = "tell me about the quarterly numbers"
MSGS = [{"role": "user", "content": PROMPT}]
KEY = "sk-otel-simulated-but-still-secret-4242"


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory([{"id": "a", "latency_ms": 1}, {"id": "b", "latency_ms": 1}], seed=5)


@pytest.fixture
def traced(make_client):
    """A client on ``nodes`` with an instrumentation on an in-memory SDK pipeline."""
    made = []

    def factory(nodes, *, record_content=False, **kw):
        kw.setdefault("strategy", "round_robin")
        kw.setdefault("backoff_base_s", 0.001)
        client = make_client(nodes, api_key=KEY, **kw)
        telemetry = Telemetry()
        inst = instrument(client, telemetry.tracer_provider, telemetry.meter_provider,
                          record_content=record_content)
        made.append((client, inst))
        return client, telemetry

    yield factory
    for client, inst in made:
        assert client.stats()["observer_errors"] == 0  # the observer never raised
        inst.uninstrument()


def test_a_chat_call_is_one_client_span_with_the_usage_and_the_answering_nodes_address(gw, traced):
    client, t = traced(gw.client_nodes())
    resp = client.chat_completion(MSGS, model=MODEL, max_tokens=50, temperature=0.3)
    span = t.call_span()
    assert (span.name, span.kind, span.status.status_code) == ("chat gpt-4.1", SpanKind.CLIENT, StatusCode.UNSET)
    attrs = span.attributes
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == MODEL
    assert (attrs["gen_ai.request.max_tokens"], attrs["gen_ai.request.temperature"]) == (50, 0.3)
    assert attrs["gen_ai.usage.input_tokens"] == resp.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == resp.usage.completion_tokens
    assert attrs["gen_ai.response.id"] == resp["id"]
    assert attrs["gen_ai.response.model"] == resp["model"]
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert (attrs["server.address"], attrs["server.port"]) == ("127.0.0.1", gw.port(resp.node_id))
    assert attrs["holysheep_lb.node.id"] == resp.node_id
    [attempt] = t.children(span)
    assert attempt.attributes["holysheep_lb.node.id"] == resp.node_id
    assert attempt.attributes["server.port"] == gw.port(resp.node_id)
    assert attempt.attributes["holysheep_lb.attempt.outcome"] == "ok"
    tokens = {p.attributes["gen_ai.token.type"]: p.sum for p in t.points("gen_ai.client.token.usage")}
    assert tokens == {"input": resp.usage.prompt_tokens, "output": resp.usage.completion_tokens}
    [duration] = t.points("gen_ai.client.operation.duration")
    assert duration.count == 1 and 0 < duration.sum <= resp.latency_ms / 1000 + 0.05


def test_a_failover_call_shows_both_nodes_and_reports_the_one_that_answered(gw, traced):
    gw.configure("a", error_rate=1.0)
    client, t = traced(gw.client_nodes())
    resp = client.chat_completion(MSGS, model=MODEL)
    assert [a.node_id for a in resp.attempts] == ["a", "b"]
    span = t.call_span()
    failed, answered = t.children(span)
    assert failed.attributes["holysheep_lb.node.id"] == "a"
    assert failed.attributes["server.port"] == gw.port("a")
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["http.response.status_code"] == resp.attempts[0].status_code
    assert failed.attributes["holysheep_lb.attempt.next_step"] == "retry"
    assert answered.attributes["holysheep_lb.node.id"] == "b"
    assert answered.attributes["server.port"] == gw.port("b")
    assert (span.attributes["server.port"], span.attributes["holysheep_lb.attempts"]) == (gw.port("b"), 2)
    attempts = {(p.attributes["holysheep_lb.node.id"], p.attributes["holysheep_lb.attempt.outcome"] == "ok"): p.value
                for p in t.points("holysheep_lb.client.attempts")}
    assert attempts == {("a", False): 1, ("b", True): 1}
    assert gw.counts() == {"a": 1, "b": 1}
    assert [p.value for p in t.points("holysheep_lb.client.retries")] == [1]


def test_an_attempt_the_policy_did_not_retry_says_stop_and_counts_no_retry(gw, traced):
    gw.configure("a", error_rate=1.0)
    client, t = traced(gw.client_nodes(), max_retries=0)  # a retryable failure, but no retry left
    with pytest.raises(HolySheepError):
        client.chat_completion(MSGS, model=MODEL)
    [failed] = t.children(t.call_span())
    assert failed.attributes["holysheep_lb.node.id"] == "a"
    assert failed.attributes["holysheep_lb.attempt.next_step"] == "stop"
    assert t.points("holysheep_lb.client.retries") == []
    assert gw.counts() == {"a": 1, "b": 0}


def test_a_failing_call_is_an_error_span_with_the_exception_class_as_error_type(gw, traced):
    gw.configure("a", error_rate=1.0)
    gw.configure("b", error_rate=1.0)
    client, t = traced(gw.client_nodes(), max_retries=1)
    with pytest.raises(HolySheepError) as info:
        client.chat_completion(MSGS, model=MODEL)
    error_type = type(info.value).__name__
    span = t.call_span()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == error_type
    assert len(t.children(span)) == len(info.value.attempts) == 2
    assert all(c.status.status_code == StatusCode.ERROR for c in t.children(span))
    [duration] = t.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == error_type
    assert not t.points("gen_ai.client.token.usage")


def test_a_fallback_is_a_span_event_and_the_answering_model_is_the_response_model(gw, traced):
    gw.configure(model=MODEL, fault="server_error")
    client, t = traced(gw.client_nodes(), fallbacks={MODEL: ["gpt-4.1-mini"]})
    resp = client.chat_completion(MSGS, model=MODEL)
    assert resp.model == "gpt-4.1-mini"
    span = t.call_span()
    assert span.name == "chat gpt-4.1"
    assert "holysheep_lb.fallback" in [e.name for e in span.events]
    assert span.attributes["gen_ai.response.model"] == resp["model"]
    assert span.attributes["gen_ai.usage.output_tokens"] == resp.usage.completion_tokens
    assert [p.value for p in t.points("holysheep_lb.client.fallbacks")] == [1]


def test_a_cache_hit_is_marked_counted_and_uses_no_tokens(gw, traced):
    client, t = traced(gw.client_nodes(), cache=True)
    first = client.chat_completion(MSGS, model=MODEL, temperature=0)  # deterministic: cached
    second = client.chat_completion(MSGS, model=MODEL, temperature=0)
    assert second.cached and not first.cached
    miss, hit = t.call_spans()
    assert "holysheep_lb.cached" not in miss.attributes
    assert hit.attributes["holysheep_lb.cached"] is True
    assert "holysheep_lb.cache_hit" in [e.name for e in hit.events]
    assert t.children(hit) == []
    assert [p.value for p in t.points("holysheep_lb.client.cache_hits")] == [1]
    tokens = {p.attributes["gen_ai.token.type"]: (p.count, p.sum) for p in t.points("gen_ai.client.token.usage")}
    assert tokens == {"input": (1, first.usage.prompt_tokens), "output": (1, first.usage.completion_tokens)}
    assert sum(p.count for p in t.points("gen_ai.client.operation.duration")) == 2


def test_a_stream_ends_its_span_when_it_ends_with_time_to_first_chunk_and_time_per_chunk(gw, traced):
    client, t = traced(gw.client_nodes())
    with client.chat_completion(MSGS, model=MODEL, stream=True) as stream:
        assert t.call_spans() == []  # still open while the stream is read
        text = stream.read_text()
    assert text
    span = t.call_span()
    assert span.attributes["holysheep_lb.stream"] is True
    assert span.attributes["holysheep_lb.stream.chunks"] == stream.chunks
    assert span.attributes["server.port"] == gw.port(stream.node_id)
    assert stream.usage  # the simulator ends every stream with a usage chunk
    assert span.attributes["gen_ai.usage.input_tokens"] == stream.usage["prompt_tokens"]
    assert span.attributes["gen_ai.usage.output_tokens"] == stream.usage["completion_tokens"]
    [ttfc] = t.points("gen_ai.client.operation.time_to_first_chunk")
    [duration] = t.points("gen_ai.client.operation.duration")
    assert ttfc.count == 1 and 0 < ttfc.sum <= duration.sum
    [per_chunk] = t.points("gen_ai.client.operation.time_per_output_chunk")
    assert per_chunk.count == 1
    assert per_chunk.sum == pytest.approx((duration.sum - ttfc.sum) / (stream.chunks - 1), rel=1e-6, abs=1e-9)


def test_a_streams_span_carries_the_response_id_and_finish_reasons_of_its_chunks(gw, traced):
    client, t = traced(gw.client_nodes())
    with client.chat_completion(MSGS, model=MODEL, stream=True) as stream:
        ids = {chunk["id"] for chunk in stream}
    span = t.call_span()
    [response_id] = ids
    assert response_id.startswith("chatcmpl-") and span.attributes["gen_ai.response.id"] == response_id
    assert span.attributes["gen_ai.response.finish_reasons"] == (stream.finish_reason,) == ("stop",)
    assert span.attributes["gen_ai.response.model"] == stream.model


def _usage_keys(span):
    return {k for k in span.attributes if k.startswith("gen_ai.usage.")
            or k in ("holysheep_lb.cost_usd", "holysheep_lb.usage.estimated")}


def _token_sums(t):
    """gen_ai.client.token.usage by (token type, estimated): (count, sum) over every series."""
    sums = {}
    for p in t.points("gen_ai.client.token.usage"):
        key = (p.attributes["gen_ai.token.type"], p.attributes.get("holysheep_lb.usage.estimated", False))
        count, total = sums.get(key, (0, 0))
        sums[key] = (count + p.count, total + p.sum)
    return sums


def test_a_stream_records_its_tokens_and_cost_as_a_json_call_does(gw, traced):
    client, t = traced(gw.client_nodes())
    resp = client.chat_completion(MSGS, model=MODEL)
    with client.chat_completion(MSGS, model=MODEL, stream=True) as stream:
        stream.read_text()
    json_span, stream_span = t.call_spans()
    assert stream.usage  # include_usage: the simulator ends the stream with a usage chunk
    assert _usage_keys(stream_span) == _usage_keys(json_span) == {
        "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "holysheep_lb.cost_usd"}
    assert stream_span.attributes["gen_ai.usage.input_tokens"] == stream.usage["prompt_tokens"]
    assert stream_span.attributes["gen_ai.usage.output_tokens"] == stream.usage["completion_tokens"]
    spent = client.cost_report()["totals"]["cost_usd"]
    json_cost = resp.extra["cost"]["cost_usd"]
    assert json_span.attributes["holysheep_lb.cost_usd"] == json_cost > 0
    assert spent > json_cost
    assert stream_span.attributes["holysheep_lb.cost_usd"] == pytest.approx(spent - json_cost)
    assert _token_sums(t) == {
        ("input", False): (2, resp.usage.prompt_tokens + stream.usage["prompt_tokens"]),
        ("output", False): (2, resp.usage.completion_tokens + stream.usage["completion_tokens"])}
    [spend] = t.points("holysheep_lb.client.spend")
    assert spend.value == pytest.approx(spent)  # the counter holds what the ledger holds, streams included


def test_a_stream_without_a_usage_chunk_records_the_estimate_it_was_charged_marked_estimated(gw, traced):
    client, t = traced(gw.client_nodes())
    with client.chat_completion(MSGS, model=MODEL, stream=True, max_tokens=40,
                                stream_options={"include_usage": False}) as stream:
        assert stream.read_text()
    assert stream.usage is None  # the server sent none: the ledger charged its estimate
    estimate = client.ledger.estimate(MODEL, MSGS, {"max_tokens": 40})
    report = client.cost_report()["totals"]
    assert (report["input_tokens"], report["output_tokens"]) == (estimate.input_tokens, 40)
    attrs = t.call_span().attributes
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (estimate.input_tokens, 40)
    assert attrs["holysheep_lb.usage.estimated"] is True
    assert attrs["holysheep_lb.cost_usd"] == pytest.approx(report["cost_usd"]) == float(estimate.amount_usd)
    assert _token_sums(t) == {("input", True): (1, estimate.input_tokens), ("output", True): (1, 40)}
    [spend] = t.points("holysheep_lb.client.spend")
    assert spend.value == pytest.approx(report["cost_usd"])


def test_a_cut_stream_records_the_estimate_it_was_charged_and_stays_an_error(gw, traced):
    client, t = traced(gw.client_nodes(), stream_rescue="off")
    gw.configure(model=MODEL, fault="stream_cut", fault_after_chunks=2)
    with pytest.raises(StreamInterruptedError):
        client.chat_completion(MSGS, model=MODEL, stream=True, max_tokens=40).read_text()
    span = t.call_span()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "StreamInterruptedError"  # what the caller got
    assert "gen_ai.response.finish_reasons" not in span.attributes
    report = client.cost_report()["totals"]
    assert report["cost_usd"] > 0  # a cut stream keeps its estimate as spend
    assert span.attributes["holysheep_lb.usage.estimated"] is True
    assert span.attributes["gen_ai.usage.output_tokens"] == report["output_tokens"] == 40
    assert span.attributes["holysheep_lb.cost_usd"] == pytest.approx(report["cost_usd"])
    [spend] = t.points("holysheep_lb.client.spend")
    assert spend.value == pytest.approx(report["cost_usd"])


def test_an_embeddings_call_is_named_embeddings_with_its_input_tokens(gw, traced):
    client, t = traced(gw.client_nodes())
    resp = client.embeddings("hello there", model="text-embedding-3-small")
    span = t.call_span()
    assert span.name == "embeddings text-embedding-3-small"
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.usage.input_tokens"] == resp.usage.prompt_tokens
    assert span.attributes["server.port"] == gw.port(resp.node_id)


def test_prompts_and_answers_are_not_exported_by_default(gw, traced):
    client, t = traced(gw.client_nodes())
    resp = client.chat_completion(MSGS, model=MODEL)
    text = t.exported_text()
    assert PROMPT not in text and resp.text not in text


def test_the_api_key_is_in_nothing_exported_even_with_content_recording(gw, traced):
    gw.configure("a", error_rate=1.0)
    client, t = traced(gw.client_nodes(), record_content=True, max_retries=0)
    with pytest.raises(HolySheepError):
        client.chat_completion(MSGS, model=MODEL)  # round robin: node a, which fails
    resp = client.chat_completion(MSGS, model=MODEL)
    text = t.exported_text()
    assert PROMPT in text and resp.text in text  # content recording is on
    assert KEY not in text and KEY[-12:] not in text


def test_uninstrument_stops_tracing(gw, make_client):
    client = make_client(gw.client_nodes(), api_key=KEY)
    t = Telemetry()
    inst = instrument(client, t.tracer_provider, t.meter_provider)
    client.chat_completion(MSGS, model=MODEL)
    inst.uninstrument()
    client.chat_completion(MSGS, model=MODEL)
    assert len(t.call_spans()) == 1
