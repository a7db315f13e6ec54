"""contrib.otel: call events in, GenAI spans and metrics out (the SDK's in-memory exporter and reader).

The events are fed straight to the observer, as the client fires them (holysheep_lb.observe
is the contract), with the client's clock values chosen so every duration is exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed: pip install -e '.[test]'")

from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from holysheep_lb.contrib import otel  # noqa: E402
from holysheep_lb.contrib.otel import (  # noqa: E402
    DURATION_BUCKETS_S,
    TIME_PER_CHUNK_BUCKETS_S,
    TOKEN_BUCKETS,
    OTelObserver,
    instrument,
)
from holysheep_lb.errors import AllAttemptsFailedError, Attempt, ConfigError  # noqa: E402
from holysheep_lb.observe import AttemptEvent, CallEnd, CallInfo, CallObserver, Decision  # noqa: E402
from holysheep_lb.response import Response  # noqa: E402
from tests.otel_support import Telemetry as SDKTelemetry  # noqa: E402

URL_A = "http://127.0.0.1:8101/v1"
URL_B = "https://eu.gateway.example/v1"
PROMPT = "what is the secret plan for tuesday"
ANSWER = "the plan is to have lunch"
KEY = "sk-test-SECRET-never-log-me-1234567890"
T0 = 1000.0


class Telemetry(SDKTelemetry):
    def __init__(self, **kw):
        super().__init__()
        self.observer = OTelObserver(self.tracer_provider, self.meter_provider, **kw)

    def attempt_spans(self):
        return [s for s in self.spans() if s.name.startswith("attempt ")]


def chat_call(model="gpt-4.1", stream=False, **params):
    return CallInfo(operation="chat", model=model, stream=stream,
                    params=params or {"max_tokens": 64, "temperature": 0.2, "top_p": 0.9},
                    messages=[{"role": "user", "content": PROMPT}], started_at=T0)


def answer(model="gpt-4.1-2025-04-14"):
    return Response({"id": "chatcmpl-42", "object": "chat.completion", "model": model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 17, "completion_tokens": 9, "total_tokens": 26}},
                    node_id="b", model=model)


def ok_end(base_url=URL_B, node_id="b", **kw):
    fields = dict(result=answer(), node_id=node_id, base_url=base_url, response_model="gpt-4.1-2025-04-14",
                  response_id="chatcmpl-42", finish_reasons=("stop",), input_tokens=17, output_tokens=9,
                  ended_at=T0 + 1.5)
    fields.update(kw)
    return CallEnd(**fields)


def attempt(node_id="b", base_url=URL_B, outcome="ok", latency_s=0.25, **kw):
    return AttemptEvent(node_id=node_id, base_url=base_url, model="gpt-4.1", outcome=outcome,
                        latency_s=latency_s, **kw)


def run_ok_call(t, call=None, end=None):
    call = call or chat_call()
    t.observer.call_started(call)
    t.observer.attempt_ended(call, attempt(status_code=200, next_step=None))
    t.observer.call_ended(call, end or ok_end())
    return call


# -- the call span ---------------------------------------------------------------------------------


def test_a_chat_call_is_one_client_span_named_after_the_operation_and_model_with_the_genai_attributes():
    t = Telemetry()
    run_ok_call(t)
    span = t.call_span()
    assert span.name == "chat gpt-4.1"
    assert span.kind == SpanKind.CLIENT
    assert span.status.status_code == StatusCode.UNSET
    assert dict(span.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "holysheep",
        "gen_ai.request.model": "gpt-4.1",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.response.model": "gpt-4.1-2025-04-14",
        "gen_ai.response.id": "chatcmpl-42",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 17,
        "gen_ai.usage.output_tokens": 9,
        "server.address": "eu.gateway.example",
        "server.port": 443,
        "holysheep_lb.node.id": "b",
        "holysheep_lb.attempts": 1,
    }


def test_the_answering_nodes_explicit_port_is_reported():
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.call_ended(call, ok_end(base_url=URL_A, node_id="a"))
    assert t.call_span().attributes["server.address"] == "127.0.0.1"
    assert t.call_span().attributes["server.port"] == 8101


def test_without_a_base_url_on_call_ended_the_answering_nodes_address_comes_from_its_attempt():
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.attempt_ended(call, attempt("a", URL_A, outcome="connect", next_step="retry"))
    t.observer.attempt_ended(call, attempt("b", URL_B))
    t.observer.call_ended(call, ok_end(base_url=None, node_id="b"))
    assert (t.call_span().attributes["server.address"], t.call_span().attributes["server.port"]) == (
        "eu.gateway.example", 443)
    [duration] = t.points("gen_ai.client.operation.duration")
    assert duration.attributes["server.address"] == "eu.gateway.example"


def test_an_embeddings_call_is_named_embeddings_and_carries_its_dimensions():
    t = Telemetry()
    call = CallInfo(operation="embeddings", model="text-embedding-3-small",
                    params={"dimensions": 256, "encoding_format": "float"}, started_at=T0)
    t.observer.call_started(call)
    t.observer.call_ended(call, CallEnd(node_id="a", base_url=URL_A, input_tokens=5, ended_at=T0 + 0.1))
    span = t.call_span()
    assert span.name == "embeddings text-embedding-3-small"
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.embeddings.dimension.count"] == 256
    assert span.attributes["gen_ai.request.encoding_formats"] == ("float",)
    [point] = t.points("gen_ai.client.token.usage")
    assert dict(point.attributes)["gen_ai.token.type"] == "input" and point.sum == 5


def test_other_operations_get_a_span_but_no_genai_metrics():
    t = Telemetry()
    call = CallInfo(operation="models", model=None, started_at=T0)
    t.observer.call_started(call)
    t.observer.call_ended(call, CallEnd(node_id="a", base_url=URL_A, ended_at=T0 + 0.05))
    span = t.call_span()
    assert span.name == "holysheep_lb models"
    assert span.attributes["holysheep_lb.operation"] == "models"
    assert "gen_ai.operation.name" not in span.attributes
    assert not t.points("gen_ai.client.operation.duration")


def test_request_parameters_of_the_wrong_type_are_left_out_and_n_of_one_is_not_reported():
    attrs = otel.request_attributes({"max_tokens": True, "temperature": "hot", "top_p": 1, "n": 1,
                                     "seed": 7, "stop": ["\n", "END"], "frequency_penalty": 0.5,
                                     "max_completion_tokens": 32, "user": "alice"})
    assert attrs == {"gen_ai.request.top_p": 1.0, "gen_ai.request.seed": 7,
                     "gen_ai.request.stop_sequences": ["\n", "END"], "gen_ai.request.frequency_penalty": 0.5,
                     "gen_ai.request.max_tokens": 32}
    expected = {"gen_ai.request.choice.count": 3, "gen_ai.request.stop_sequences": ["x"]}
    assert otel.request_attributes({"n": 3, "stop": "x"}) == expected


@pytest.mark.parametrize("url, expected", [
    ("https://a.example/v1", (("server.address", "a.example"), ("server.port", 443))),
    ("http://a.example/v1", (("server.address", "a.example"), ("server.port", 80))),
    ("http://[::1]:9000/v1", (("server.address", "::1"), ("server.port", 9000))),
    ("http://127.0.0.1:8101", (("server.address", "127.0.0.1"), ("server.port", 8101))),
    ("not a url", ()),
    ("http://a.example:notaport/v1", ()),
    (None, ()),
])
def test_server_address_and_port_are_parsed_from_the_base_url(url, expected):
    assert otel.server_of(url) == expected


# -- failures --------------------------------------------------------------------------------------


def failed_call_error():
    return AllAttemptsFailedError("every attempt failed", attempts=[
        Attempt(node_id="a", error="HTTP 503", status_code=503, latency_ms=100.0)])


def test_a_failing_call_has_status_error_and_error_type_on_its_span_and_duration_metric():
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.attempt_ended(call, attempt("a", URL_A, outcome="status_5xx", status_code=503,
                                           error_type="ServiceUnavailableError", next_step="stop"))
    t.observer.call_ended(call, CallEnd(error=failed_call_error(), ended_at=T0 + 0.5))
    span = t.call_span()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "AllAttemptsFailedError"
    assert span.attributes["error.type"] == "AllAttemptsFailedError"
    assert "gen_ai.usage.input_tokens" not in span.attributes
    [attempt_span] = t.attempt_spans()
    assert attempt_span.status.status_code == StatusCode.ERROR
    assert attempt_span.attributes["error.type"] == "ServiceUnavailableError"
    assert attempt_span.attributes["http.response.status_code"] == 503
    [point] = t.points("gen_ai.client.operation.duration")
    assert dict(point.attributes) == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "holysheep",
                                      "gen_ai.request.model": "gpt-4.1", "error.type": "AllAttemptsFailedError"}
    assert point.count == 1 and point.sum == pytest.approx(0.5)
    assert not t.points("gen_ai.client.token.usage")


def test_an_errors_message_is_not_recorded_unless_content_recording_is_on():
    error = AllAttemptsFailedError(f"the gateway said: {PROMPT}", attempts=[])
    for record, expect_message in ((False, False), (True, True)):
        t = Telemetry(record_content=record)
        call = chat_call()
        t.observer.call_started(call)
        t.observer.call_ended(call, CallEnd(error=error, ended_at=T0 + 0.5))
        assert (PROMPT in t.exported_text()) is expect_message
        assert t.call_span().attributes["error.type"] == "AllAttemptsFailedError"


# -- attempts --------------------------------------------------------------------------------------


def test_a_failover_call_shows_both_nodes_as_child_spans_and_reports_the_node_that_answered():
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.attempt_ended(call, attempt("a", URL_A, outcome="connect", latency_s=0.125,
                                           error_type="APIConnectionError", next_step="retry"))
    t.observer.attempt_ended(call, attempt("b", URL_B, outcome="ok", latency_s=0.5, status_code=200))
    t.observer.call_ended(call, ok_end())
    span = t.call_span()
    first, second = t.attempt_spans()
    assert (first.name, second.name) == ("attempt a", "attempt b")
    for child in (first, second):
        assert child.parent.span_id == span.context.span_id
        assert child.context.trace_id == span.context.trace_id
        assert child.kind == SpanKind.INTERNAL
    assert dict(first.attributes) == {
        "holysheep_lb.node.id": "a", "holysheep_lb.attempt.outcome": "connect",
        "holysheep_lb.attempt.latency_s": 0.125, "holysheep_lb.attempt.hedge": False,
        "holysheep_lb.attempt.next_step": "retry", "gen_ai.request.model": "gpt-4.1",
        "server.address": "127.0.0.1", "server.port": 8101, "error.type": "APIConnectionError"}
    assert first.status.status_code == StatusCode.ERROR
    assert second.attributes["server.address"] == "eu.gateway.example"
    assert second.status.status_code == StatusCode.UNSET
    assert first.end_time - first.start_time == 125_000_000
    assert second.end_time - second.start_time == 500_000_000
    assert (span.attributes["server.address"], span.attributes["holysheep_lb.attempts"]) == ("eu.gateway.example", 2)
    attempts = {(p.attributes["holysheep_lb.node.id"], p.attributes["holysheep_lb.attempt.outcome"]): p.value
                for p in t.points("holysheep_lb.client.attempts")}
    assert attempts == {("a", "connect"): 1, ("b", "ok"): 1}
    [retry] = t.points("holysheep_lb.client.retries")
    assert (retry.attributes["holysheep_lb.node.id"], retry.value) == ("a", 1)


def test_hedged_attempts_from_two_threads_both_become_children_of_the_call():
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.decided(call, Decision("hedge", {"node": "b", "after_s": 0.2}))
    threads = [threading.Thread(target=t.observer.attempt_ended,
                                args=(call, attempt(node, url, hedge=(node == "b"))))
               for node, url in (("a", URL_A), ("b", URL_B))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert not any(th.is_alive() for th in threads)
    t.observer.call_ended(call, ok_end())
    span = t.call_span()
    assert sorted((s.name, s.attributes["holysheep_lb.attempt.hedge"]) for s in t.attempt_spans()) == [
        ("attempt a", False), ("attempt b", True)]
    assert all(s.parent.span_id == span.context.span_id for s in t.attempt_spans())
    assert span.attributes["holysheep_lb.attempts"] == 2
    [event] = span.events
    assert event.name == "holysheep_lb.hedge"
    assert dict(event.attributes) == {"holysheep_lb.node": "b", "holysheep_lb.after_s": 0.2}
    assert [p.value for p in t.points("holysheep_lb.client.hedges")] == [1]


# -- decisions -------------------------------------------------------------------------------------


def test_decisions_are_span_events_and_counted():
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.decided(call, Decision("fallback", {"from_model": "gpt-4.1", "to_model": "gpt-4.1-mini",
                                                   "reason": "CircuitOpenError"}))
    t.observer.decided(call, Decision("budget_refused", {"model": "gpt-4.1", "caps": ["daily", "hourly"]}))
    t.observer.decided(call, Decision("retry_budget_exhausted", {"node": "a"}))
    t.observer.decided(call, Decision("rate_limited", {"wait_s": 0.5, "what": object()}))
    t.observer.call_ended(call, ok_end(response_model="gpt-4.1-mini"))
    span = t.call_span()
    assert [e.name for e in span.events] == ["holysheep_lb.fallback", "holysheep_lb.budget_refused",
                                             "holysheep_lb.retry_budget_exhausted", "holysheep_lb.rate_limited"]
    assert dict(span.events[0].attributes) == {"holysheep_lb.from_model": "gpt-4.1",
                                               "holysheep_lb.to_model": "gpt-4.1-mini",
                                               "holysheep_lb.reason": "CircuitOpenError"}
    assert span.events[1].attributes["holysheep_lb.caps"] == ("daily", "hourly")
    assert span.events[3].attributes["holysheep_lb.wait_s"] == 0.5
    assert span.events[3].attributes["holysheep_lb.what"].startswith("<object object")
    assert [p.value for p in t.points("holysheep_lb.client.fallbacks")] == [1]
    refusals = {p.attributes["holysheep_lb.decision"]: p.value for p in t.points("holysheep_lb.client.budget_refusals")}
    assert refusals == {"budget_refused": 1, "retry_budget_exhausted": 1}


def test_a_cache_hit_is_marked_and_counted_but_uses_no_tokens():
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.decided(call, Decision("cache_hit"))
    t.observer.call_ended(call, ok_end(cached=True, node_id=None, base_url=None, ended_at=T0 + 0.001))
    span = t.call_span()
    assert span.attributes["holysheep_lb.cached"] is True
    assert [e.name for e in span.events] == ["holysheep_lb.cache_hit"]
    assert span.attributes["gen_ai.usage.input_tokens"] == 17  # what the answer says
    assert "server.address" not in span.attributes
    assert [p.value for p in t.points("holysheep_lb.client.cache_hits")] == [1]
    assert not t.points("gen_ai.client.token.usage")
    [duration] = t.points("gen_ai.client.operation.duration")
    assert duration.sum == pytest.approx(0.001)


# -- metrics ---------------------------------------------------------------------------------------


def test_duration_and_token_usage_histograms_have_the_conventions_names_units_buckets_and_values():
    t = Telemetry()
    run_ok_call(t)
    metrics = t.metrics()
    duration = metrics["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    [point] = duration.data.data_points
    assert tuple(point.explicit_bounds) == DURATION_BUCKETS_S
    assert point.count == 1 and point.sum == pytest.approx(1.5)
    assert dict(point.attributes) == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "holysheep",
                                      "gen_ai.request.model": "gpt-4.1", "gen_ai.response.model": "gpt-4.1-2025-04-14",
                                      "server.address": "eu.gateway.example", "server.port": 443}
    tokens = metrics["gen_ai.client.token.usage"]
    assert tokens.unit == "{token}"
    by_type = {p.attributes["gen_ai.token.type"]: p for p in tokens.data.data_points}
    assert (by_type["input"].sum, by_type["input"].count) == (17, 1)
    assert (by_type["output"].sum, by_type["output"].count) == (9, 1)
    assert tuple(by_type["input"].explicit_bounds) == TOKEN_BUCKETS
    assert "gen_ai.client.operation.time_to_first_chunk" not in metrics  # not a stream


def test_a_stream_reports_time_to_first_chunk_and_the_mean_time_per_later_chunk():
    t = Telemetry()
    call = chat_call(stream=True)
    t.observer.call_started(call)
    t.observer.attempt_ended(call, attempt())
    t.observer.first_chunk(call, T0 + 0.25)
    t.observer.first_chunk(call, T0 + 0.5)  # only the first counts
    t.observer.call_ended(call, ok_end(chunks=11, ended_at=T0 + 1.25))
    assert t.call_span().attributes["holysheep_lb.stream"] is True
    assert t.call_span().attributes["holysheep_lb.stream.chunks"] == 11
    metrics = t.metrics()
    [ttfc] = metrics["gen_ai.client.operation.time_to_first_chunk"].data.data_points
    assert metrics["gen_ai.client.operation.time_to_first_chunk"].unit == "s"
    assert ttfc.sum == pytest.approx(0.25) and tuple(ttfc.explicit_bounds) == DURATION_BUCKETS_S
    [tpoc] = metrics["gen_ai.client.operation.time_per_output_chunk"].data.data_points
    assert tpoc.count == 1 and tpoc.sum == pytest.approx(0.1)
    assert tuple(tpoc.explicit_bounds) == TIME_PER_CHUNK_BUCKETS_S
    [duration] = metrics["gen_ai.client.operation.duration"].data.data_points
    assert duration.sum == pytest.approx(1.25)


def test_a_stream_of_one_chunk_has_no_time_per_output_chunk():
    t = Telemetry()
    call = chat_call(stream=True)
    t.observer.call_started(call)
    t.observer.first_chunk(call, T0 + 0.25)
    t.observer.call_ended(call, ok_end(chunks=1, ended_at=T0 + 0.3))
    assert t.points("gen_ai.client.operation.time_to_first_chunk")
    assert not t.points("gen_ai.client.operation.time_per_output_chunk")


def test_spend_is_counted_by_the_answering_model_and_put_on_the_span():
    t = Telemetry()
    run_ok_call(t, end=ok_end(cost_usd=0.0125))  # CallEnd carries what the ledger settled
    run_ok_call(t, end=ok_end(cost_usd=0.0075))
    [point] = t.points("holysheep_lb.client.spend")
    assert t.metrics()["holysheep_lb.client.spend"].unit == "USD"
    assert dict(point.attributes) == {"gen_ai.response.model": "gpt-4.1-2025-04-14"}
    assert point.value == pytest.approx(0.02)
    assert t.spans()[-1].attributes["holysheep_lb.cost_usd"] == pytest.approx(0.0075)


def test_cached_tokens_take_the_conventions_names_and_an_estimate_is_flagged_on_span_and_tokens():
    t = Telemetry()
    run_ok_call(t, end=ok_end(input_tokens=1000, output_tokens=10, cached_input_tokens=800, cache_write_tokens=100,
                              cost_usd=0.001))
    reported = t.spans()[-1].attributes
    assert (reported["gen_ai.usage.cache_read.input_tokens"], reported["gen_ai.usage.cache_creation.input_tokens"]) \
        == (800, 100)
    assert "holysheep_lb.usage.estimated" not in reported
    run_ok_call(t, end=ok_end(input_tokens=7, output_tokens=256, cached_input_tokens=0, usage_estimated=True,
                              cost_usd=0.002))
    estimated = t.spans()[-1].attributes
    assert estimated["holysheep_lb.usage.estimated"] is True
    assert "gen_ai.usage.cache_read.input_tokens" not in estimated  # none read from a cache
    by_flag = {(p.attributes["gen_ai.token.type"], p.attributes.get("holysheep_lb.usage.estimated")): p.sum
               for p in t.points("gen_ai.client.token.usage")}
    assert by_flag == {("input", None): 1000, ("output", None): 10, ("input", True): 7, ("output", True): 256}
    [spend] = t.points("holysheep_lb.client.spend")
    assert spend.value == pytest.approx(0.003)


# -- content and secrets ---------------------------------------------------------------------------


def test_prompts_and_answers_are_not_recorded_by_default():
    t = Telemetry()
    run_ok_call(t)
    text = t.exported_text()
    assert PROMPT not in text and ANSWER not in text
    assert "gen_ai.input.messages" not in t.call_span().attributes


def test_with_record_content_prompts_and_answers_are_recorded_in_the_conventions_parts_format():
    t = Telemetry(record_content=True)
    call = chat_call()
    call.messages = [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                  {"type": "image_url", "image_url": {"url": "data:..."}}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    run_ok_call(t, call=call)
    attrs = t.call_span().attributes
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}, {"type": "image_url"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_1", "name": "f", "arguments": "{}"}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "42"}]}]
    assert json.loads(attrs["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": ANSWER}], "finish_reason": "stop"}]


def test_with_record_content_a_streams_text_is_the_output():
    class Stream:
        text = ANSWER
        finish_reason = "length"

    assert json.loads(otel.output_messages(Stream())) == [
        {"role": "assistant", "parts": [{"type": "text", "content": ANSWER}], "finish_reason": "length"}]
    assert otel.output_messages(object()) is None


def test_the_api_key_of_a_real_client_is_in_nothing_exported():
    from holysheep_lb import Client

    t = Telemetry(record_content=True)
    client = Client(api_key=KEY, nodes=[{"id": "a", "base_url": URL_A}], health_check_interval_s=None)
    try:
        call = chat_call()
        t.observer.call_started(call)
        t.observer.attempt_ended(call, attempt("a", URL_A, outcome="status_4xx", status_code=401,
                                               error_type="AuthenticationError", next_step="stop"))
        t.observer.call_ended(call, CallEnd(error=AllAttemptsFailedError(f"refused: {client!r}", attempts=[]),
                                            ended_at=T0 + 0.2))
    finally:
        client.close()
    text = t.exported_text()
    assert "AuthenticationError" in text and KEY not in text and KEY[-10:] not in text


# -- robustness ------------------------------------------------------------------------------------


def test_events_of_a_call_that_started_before_the_observer_was_added_are_ignored():
    t = Telemetry()
    call = chat_call()  # call_started never reached this observer
    t.observer.attempt_ended(call, attempt())
    t.observer.decided(call, Decision("fallback"))
    t.observer.first_chunk(call, T0 + 0.1)
    t.observer.call_ended(call, ok_end())
    assert t.spans() == [] and not t.metrics()


def test_the_span_ends_even_when_recording_the_metrics_fails(monkeypatch):
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)

    def broken(*args):
        raise RuntimeError("exporter bug")

    monkeypatch.setattr(t.observer, "_record_metrics", broken)
    with pytest.raises(RuntimeError, match="exporter bug"):  # ObserverSet logs and counts it
        t.observer.call_ended(call, ok_end())
    assert [s.name for s in t.spans()] == ["chat gpt-4.1"]
    monkeypatch.undo()
    t.observer.call_ended(call, ok_end())  # a call's span ends once
    assert [s.name for s in t.spans()] == ["chat gpt-4.1"]


def test_a_losing_hedge_that_reports_after_the_call_ended_is_still_a_child_span():
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.decided(call, Decision("hedge"))
    t.observer.attempt_ended(call, attempt("b", URL_B, hedge=True))
    t.observer.call_ended(call, ok_end())
    t.observer.attempt_ended(call, attempt("a", URL_A, outcome="cancelled", latency_s=0.75))
    t.observer.decided(call, Decision("rescue"))  # too late for the ended span: counted nowhere, no warning
    span = t.call_span()
    late = t.attempt_spans()[-1]
    assert (late.name, late.parent.span_id) == ("attempt a", span.context.span_id)
    assert late.attributes["holysheep_lb.attempt.outcome"] == "cancelled"
    assert late.status.status_code == StatusCode.UNSET  # cancelled, not failed
    assert span.attributes["holysheep_lb.attempts"] == 1  # as many as had ended when the call did
    assert [e.name for e in span.events] == ["holysheep_lb.hedge"]
    assert sum(p.value for p in t.points("holysheep_lb.client.attempts")) == 2


def test_two_observers_on_one_call_keep_separate_state():
    t1, t2 = Telemetry(), Telemetry()
    call = chat_call()
    for t in (t1, t2):
        t.observer.call_started(call)
    for t in (t1, t2):
        t.observer.call_ended(call, ok_end())
    assert len(t1.spans()) == len(t2.spans()) == 1


@pytest.mark.parametrize("kw, field", [({"record_content": "yes"}, "record_content"),
                                       ({"provider_name": ""}, "provider_name"),
                                       ({"provider_name": None}, "provider_name")])
def test_bad_options_raise_a_config_error_naming_the_field(kw, field):
    with pytest.raises(ConfigError) as info:
        OTelObserver(**kw)
    assert info.value.field == field


# -- instrument() and uninstrument() ---------------------------------------------------------------


class FakeClient:
    def __init__(self):
        self.observers = []

    def add_observer(self, observer):
        assert isinstance(observer, CallObserver)
        self.observers.append(observer)

    def remove_observer(self, observer):
        self.observers.remove(observer)


def test_instrument_adds_one_observer_and_uninstrument_removes_it():
    t = Telemetry()
    client = FakeClient()
    inst = instrument(client, t.tracer_provider, t.meter_provider, provider_name="openai")
    assert client.observers == [inst.observer] and inst.instrumented
    with pytest.raises(ValueError, match="already instrumented"):
        instrument(client)
    call = chat_call()
    inst.observer.call_started(call)
    inst.uninstrument()
    inst.uninstrument()  # idempotent
    assert client.observers == [] and not inst.instrumented
    inst.observer.call_ended(call, ok_end())  # a call in flight still ends its span
    assert t.call_span().attributes["gen_ai.provider.name"] == "openai"
    later = chat_call()
    inst.observer.call_started(later)
    assert later.state == {}
    again = instrument(client)  # allowed once uninstrumented
    again.uninstrument()


def test_uninstrument_without_remove_observer_turns_the_observer_off():
    class OldClient:
        def __init__(self):
            self.observers = []

        def add_observer(self, observer):
            self.observers.append(observer)

    client = OldClient()
    inst = instrument(client)
    inst.uninstrument()
    call = chat_call()
    client.observers[0].call_started(call)
    assert call.state == {}


def test_a_client_without_observers_cannot_be_instrumented():
    with pytest.raises(TypeError, match="add_observer"):
        instrument(object())


# -- the core does not need the extras -------------------------------------------------------------


def test_importing_the_library_imports_neither_opentelemetry_nor_prometheus_client():
    # redis is blocked as without the redis extra: pybreaker imports redis when it can, and
    # redis >= 8 imports the OpenTelemetry SDK when that is installed (its own telemetry).
    code = ("import sys; sys.modules['redis'] = None\n"
            "import holysheep_lb, holysheep_lb.cli, holysheep_lb.contrib, holysheep_lb.observe\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus_client')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_the_extra_the_library_works_and_contrib_otel_says_what_to_install():
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "import holysheep_lb\n"
            "holysheep_lb.Client(api_key='k', nodes=[{'id': 'a', 'base_url': 'https://a.example/v1'}],"
            " health_check_interval_s=None).close()\n"
            "try:\n"
            "    import holysheep_lb.contrib.otel\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    assert "pip install 'holysheep-lb[otel]'" in out.stdout


def test_an_attempt_reported_after_it_ended_keeps_its_place_in_time():
    # a failed attempt is reported once the retry policy decided; a hedged copy's, once the race did
    t = Telemetry()
    call = chat_call()
    t.observer.call_started(call)
    t.observer.attempt_ended(call, attempt("a", URL_A, outcome="status_5xx", latency_s=0.25, ended_at=T0 + 0.5))
    t.observer.call_ended(call, ok_end(ended_at=T0 + 2.0))
    span = t.call_span()
    [late] = t.attempt_spans()
    assert (late.start_time - span.start_time, late.end_time - span.start_time) == (250_000_000, 500_000_000)
