"""Stream semantics of issue #13: completion rules, skipped events, error events, first-token
and stall limits, the model capability table, and mid-stream rescue (continue / restart).

Mocked HTTP (responses) and fake clocks; nothing sleeps.
"""

from __future__ import annotations

import json

import pytest

from holysheep_lb import (
    APIConnectionError,
    BadRequestError,
    ConfigError,
    FirstTokenTimeoutError,
    InvalidRequestError,
    ModelCapabilities,
    RateLimitError,
    StreamInterruptedError,
    StreamRestartedError,
    StreamStallError,
)
from holysheep_lb.models import DEFAULT_CAPABILITIES, CapabilityTable
from holysheep_lb.rescue import BrokenStream, Rescuer
from holysheep_lb.sse import MAX_SKIPPED_EVENTS, SSEEvent, decode_event, error_event_status
from holysheep_lb.transport import Transport
from tests.test_streaming import A, B, MSGS, USAGE, _client, _stream_post, delta, sse

ONE_NODE = [{"id": "a", "base_url": A}]


def finish(reason="stop", model="m"):
    return {"object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def usage_chunk(model="m"):
    return {"object": "chat.completion.chunk", "model": model, "choices": [], "usage": USAGE}


def contents(chunks):
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def sent_messages(call):
    return json.loads(call.request.body)["messages"]


CUT = sse(delta("Hel"), delta("lo"), done=False)  # ends without [DONE] nor finish_reason
PREFILL = {"m": {"prefill": True}}


# ------------------------------------------------------------------------ completion rules


def test_a_finish_reason_then_the_end_of_the_body_completes_a_stream_without_done(rsps, make_client, clock):
    _stream_post(rsps, A, body=sse(delta("Hel"), delta("lo"), finish(), usage_chunk(), done=False))
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Hello"
    assert (stream.state, stream.finish_reason, stream.usage) == ("completed", "stop", USAGE)
    stats = client.stats()
    assert (stats["successes"], stats["streams"]["completed"], stats["streams"]["interrupted"]) == (1, 1, 0)


def test_the_end_of_the_body_without_finish_reason_nor_done_is_a_cut_never_a_success(rsps, make_client, clock):
    _stream_post(rsps, A, body=CUT)
    client = _client(make_client, clock, stream_rescue="off")
    stream = client.chat_completion(MSGS, model="m", stream=True)
    with pytest.raises(StreamInterruptedError) as info:
        stream.read_text()
    assert (info.value.reason, info.value.partial_text) == ("truncated", "Hello")
    assert client.stats()["successes"] == 0


def test_events_that_do_not_parse_are_skipped_counted_and_logged_once(rsps, make_client, clock, caplog):
    _stream_post(rsps, A, body=sse(delta("Hel"), '{"choices": [', "[1, 2]", delta("lo"), '{"nope', finish()))
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Hello" and stream.state == "completed"
    assert stream.skipped_events == 3
    assert client.stats()["streams"]["skipped_events"] == 3
    assert len([r for r in caplog.records if "does not parse" in r.getMessage()]) == 1


def test_more_events_that_do_not_parse_than_the_bound_break_the_stream(rsps, make_client, clock):
    _stream_post(rsps, A, body=sse(delta("Hel"), *(["{bad"] * (MAX_SKIPPED_EVENTS + 1)), delta("lo")))
    client = _client(make_client, clock, stream_rescue="off")
    stream = client.chat_completion(MSGS, model="m", stream=True)
    with pytest.raises(StreamInterruptedError) as info:
        stream.read_text()
    assert info.value.reason == "malformed" and info.value.partial_text == "Hel"


@pytest.mark.parametrize("error,status", [
    ({"error": {"message": "x", "code": 429}}, 429),
    ({"error": {"message": "x", "code": "rate_limit_exceeded"}}, 429),
    ({"error": {"message": "x", "type": "overloaded_error"}}, 529),
    ({"error": {"message": "x", "code": "context_length_exceeded"}}, 400),
    ({"error": {"message": "x", "type": "invalid_request_error"}}, 400),
    ({"error": {"message": "x", "status": "503"}}, 503),
    ({"error": "upstream died"}, 500),
    ({"error": {"message": "x", "code": "internal_error"}}, 500),
])
def test_an_error_event_inside_a_200_stream_is_the_matching_status_error(error, status):
    assert error_event_status(error) == status
    with pytest.raises(Exception) as info:
        decode_event(SSEEvent(None, json.dumps(error)))
    assert info.value.status_code == status


def test_an_error_event_before_the_first_chunk_is_retried_like_its_status(rsps, make_client, clock):
    _stream_post(rsps, A, body=sse({"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, done=False))
    _stream_post(rsps, B)
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Hello" and stream.node_id == "b"
    assert stream.attempts[0].kind == "status_429"


def test_a_4xx_error_event_mid_stream_is_not_rescued(rsps, make_client, clock):
    _stream_post(rsps, A, body=sse(delta("Hel"), {"error": {"message": "filtered", "code": "content_filter"}},
                                   done=False))
    _stream_post(rsps, B)
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    with pytest.raises(StreamInterruptedError) as info:
        stream.read_text()
    assert isinstance(info.value.__cause__, BadRequestError) and info.value.reason == "server_error"
    assert len(rsps.calls) == 1


# ------------------------------------------------------------------------ first token and stall


def _slow_bytes(clock, pieces, step_s):
    def iter_bytes(self, response):
        for piece in pieces:
            clock.advance(step_s)
            yield piece
    return iter_bytes


def test_no_first_token_in_time_is_a_typed_ttft_timeout_distinct_from_a_read_timeout(
        rsps, make_client, clock, monkeypatch):
    _stream_post(rsps, A)
    monkeypatch.setattr(Transport, "iter_bytes", _slow_bytes(clock, [b": keepalive\n\n"] * 5, 3.0))
    client = _client(make_client, clock, max_retries=0, first_token_timeout_s=10.0)
    with pytest.raises(Exception) as info:
        client.chat_completion(MSGS, model="m", stream=True)
    cause = info.value.__cause__
    assert isinstance(cause, FirstTokenTimeoutError) and cause.kind == "ttft_timeout" and cause.timeout_s == 10.0
    assert "first chunk within 10 s" in cause.message


def test_the_first_token_limit_comes_from_the_call_then_the_model_then_the_client():
    table = CapabilityTable({"slow-*": {"first_token_timeout_s": 90}})
    kw = dict(client_first_token_s=30.0, client_stall_s=20.0)
    assert table.stream_limits("slow-1", call_first_token_s=5.0, **kw) == (5.0, 20.0)
    assert table.stream_limits("slow-1", call_first_token_s=None, **kw) == (90.0, 20.0)
    assert table.stream_limits("fast", call_first_token_s=None, **kw) == (30.0, 20.0)
    # reasoning models are not cut short by the chat defaults
    assert table.stream_limits("o3-mini", call_first_token_s=None, **kw) == (300.0, 120.0)
    assert table.stream_limits("openai/deepseek-r1", call_first_token_s=None, **kw) == (300.0, 120.0)


def test_a_per_call_first_token_limit_is_validated_and_for_streams_only(make_client, clock):
    client = _client(make_client, clock)
    with pytest.raises(InvalidRequestError, match="first_token_timeout_s"):
        client.chat_completion(MSGS, model="m", stream=True, first_token_timeout_s=0)
    with pytest.raises(InvalidRequestError, match="stream=True only"):
        client.chat_completion(MSGS, model="m", first_token_timeout_s=5)


def test_a_stall_mid_stream_is_a_typed_stall_and_the_default_fits_chat_streams(
        rsps, make_client, clock, monkeypatch):
    _stream_post(rsps, A)
    monkeypatch.setattr(Transport, "iter_bytes", _slow_bytes(
        clock, [sse(delta("Hel"), done=False)] + [b": keepalive\n\n"] * 5, 5.0))
    client = _client(make_client, clock, stream_rescue="off")
    assert client.config.stream_stall_timeout_s == 20.0
    stream = client.chat_completion(MSGS, model="m", stream=True)
    with pytest.raises(StreamInterruptedError) as info:
        stream.read_text()
    assert info.value.reason == "stall" and isinstance(info.value.__cause__, StreamStallError)
    assert info.value.__cause__.kind == "stall"


def test_a_stream_that_stalls_after_its_finish_reason_is_complete_not_cut(rsps, make_client, clock, monkeypatch):
    # every choice has its finish_reason: only the end of the body is missing (no rescue, no error)
    _stream_post(rsps, A)
    monkeypatch.setattr(Transport, "iter_bytes", _slow_bytes(
        clock, [sse(delta("Hel"), delta("lo"), finish(), done=False)] + [b": keepalive\n\n"] * 5, 3.0))
    client = _client(make_client, clock)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Hello"
    assert (stream.state, stream.finish_reason, stream.rescues) == ("completed", "stop", [])
    assert client.stats()["streams"]["completed"] == 1


# ------------------------------------------------------------------------ capability table


def test_the_capability_table_is_extended_and_overridden_by_the_user():
    table = CapabilityTable({"gpt-4.1": {"prefill": True}, "my-vllm-*": ModelCapabilities(
        prefill=True, prefill_params={"continue_final_message": True, "add_generation_prompt": False})})
    assert table.accepts_prefill("gpt-4.1") and not table.accepts_prefill("gpt-4o")
    assert table.get("my-vllm-llama").prefill_params["continue_final_message"] is True
    assert table.accepts_prefill("claude-sonnet-4-5") and not table.accepts_prefill("claude-sonnet-4-6")
    assert not table.accepts_prefill("some-unknown-model")  # unknown: never assumed
    assert "claude-opus-4-7*" in DEFAULT_CAPABILITIES


@pytest.mark.parametrize("value,field", [
    ({"m": {"prefil": True}}, "model_capabilities[m].prefil"),
    ({"m": {"prefill": "yes"}}, "model_capabilities[m].prefill"),
    ({"m": {"first_token_timeout_s": -1}}, "model_capabilities[m].first_token_timeout_s"),
    ({"m": 3}, "model_capabilities[m]"),
    ([1], "model_capabilities"),
])
def test_bad_capabilities_name_the_field(make_client, value, field):
    with pytest.raises(ConfigError) as info:
        make_client(ONE_NODE, model_capabilities=value)
    assert info.value.field == field


@pytest.mark.parametrize("name,value", [("stream_rescue", "sometimes"), ("stream_max_rescues", -1),
                                        ("first_token_timeout_s", 0)])
def test_bad_stream_options_name_the_field(make_client, name, value):
    with pytest.raises(ConfigError) as info:
        make_client(ONE_NODE, **{name: value})
    assert info.value.field == name


# ------------------------------------------------------------------------ rescue


def test_a_stream_cut_after_n_tokens_is_continued_on_another_node_unnoticed(rsps, make_client, clock):
    _stream_post(rsps, A, body=CUT)
    _stream_post(rsps, B, body=sse(delta(" world"), finish(), usage_chunk()))
    client = _client(make_client, clock, model_capabilities=PREFILL)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    chunks = list(stream)  # no exception: the caller never notices
    assert contents(chunks) == "Hello world" == stream.text
    assert stream.state == "completed" and stream.node_id == "b"
    assert sent_messages(rsps.calls[1]) == MSGS + [{"role": "assistant", "content": "Hello"}]
    assert [(r["mode"], r["reason"], r["from_node"], r["to_node"]) for r in stream.rescues] == [
        ("continue", "truncated", "a", "b")]
    stats = client.stats()
    assert (stats["calls"], stats["successes"], stats["failures"]) == (1, 1, 0)
    assert stats["streams"]["rescued"] == 1 and stats["streams"]["interrupted_by_reason"] == {"truncated": 1}
    assert stats["in_flight"] == 0


def test_a_continuation_on_the_fallback_model_is_billed_as_that_model(rsps, make_client, clock):
    _stream_post(rsps, A, body=CUT)
    _stream_post(rsps, A, body=sse(delta(" world", ), finish(model="f"), usage_chunk(model="f")))
    client = make_client(
        ONE_NODE, clock=clock, sleep=clock.sleep, rand=lambda: 0.5, fallbacks={"m": ["f"]},
        model_capabilities={"f": {"prefill": True}},
        prices={"m": {"input": 1.0, "output": 1.0}, "f": {"input": 2.0, "output": 2.0}})
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Hello world"
    body = json.loads(rsps.calls[1].request.body)
    assert body["model"] == "f" and body["messages"][-1] == {"role": "assistant", "content": "Hello"}
    by_model = client.cost_report()["by_model"]
    assert by_model["f"]["requests"] == 1 and by_model["f"]["output_tokens"] == USAGE["completion_tokens"]


def test_a_target_rejecting_the_prefill_triggers_a_restart_the_consuming_caller_sees(rsps, make_client, clock):
    _stream_post(rsps, A, body=CUT)
    rsps.post(B + "/chat/completions", status=400, json={"error": {
        "message": "This model does not support assistant message prefill.", "code": "invalid_prefill"}})
    _stream_post(rsps, B, body=sse(delta("Good"), delta("bye"), finish()))
    client = _client(make_client, clock, model_capabilities=PREFILL)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    seen = [next(stream), next(stream)]
    assert contents(seen) == "Hello"
    with pytest.raises(StreamRestartedError) as info:
        next(stream)  # impossible to miss: the answer starts again
    err = info.value
    assert (err.partial_text, err.chunks, err.cause_reason, err.reason) == ("Hello", 2, "truncated", "restarted")
    assert isinstance(err, StreamInterruptedError)  # an older caller handles it as an interruption
    assert contents(list(stream)) == "Goodbye" == stream.text  # the same stream goes on with the new answer
    assert stream.state == "completed"
    assert sent_messages(rsps.calls[2]) == MSGS  # the restart sends no prefill
    assert [r["mode"] for r in stream.rescues] == ["restart"]
    assert client.stats()["successes"] == 1


def test_a_restart_is_invisible_to_read_text(rsps, make_client, clock):
    _stream_post(rsps, A, body=CUT)
    _stream_post(rsps, B, body=sse(delta("Good"), delta("bye"), finish()))
    client = _client(make_client, clock)  # "m" is not known to accept a prefill: restart
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Goodbye"
    assert sent_messages(rsps.calls[1]) == MSGS


def test_with_no_route_left_the_caller_gets_the_interruption_with_the_whole_partial_text(rsps, make_client, clock):
    _stream_post(rsps, A, body=CUT)
    _stream_post(rsps, B, body=sse(delta(" wor"), done=False))
    client = _client(make_client, clock, model_capabilities=PREFILL)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    with pytest.raises(StreamInterruptedError) as info:
        stream.read_text()
    err = info.value
    assert not isinstance(err, StreamRestartedError)
    assert (err.reason, err.partial_text) == ("truncated", "Hello wor")
    assert len(rsps.calls) == 2  # neither node is asked twice
    stats = client.stats()
    assert (stats["calls"], stats["successes"], stats["failures"]) == (1, 0, 1)
    assert stats["in_flight"] == 0


def test_rescue_off_raises_the_interruption_and_sends_nothing_more(rsps, make_client, clock):
    _stream_post(rsps, A, body=CUT)
    _stream_post(rsps, B)
    client = _client(make_client, clock, stream_rescue="off", model_capabilities=PREFILL)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    with pytest.raises(StreamInterruptedError) as info:
        list(stream)
    assert info.value.partial_text == "Hello" and len(rsps.calls) == 1


def test_continue_mode_never_restarts(rsps, make_client, clock):
    _stream_post(rsps, A, body=CUT)
    _stream_post(rsps, B)
    client = _client(make_client, clock, stream_rescue="continue")  # "m" takes no prefill
    stream = client.chat_completion(MSGS, model="m", stream=True)
    with pytest.raises(StreamInterruptedError) as info:
        stream.read_text()
    assert info.value.reason == "truncated" and len(rsps.calls) == 1


def test_a_stalled_stream_is_rescued_on_the_fake_clock(rsps, make_client, clock, monkeypatch):
    _stream_post(rsps, A)
    _stream_post(rsps, B)
    real = Transport.iter_bytes
    stalled = _slow_bytes(clock, [sse(delta("Hel"), done=False)] + [b": keepalive\n\n"] * 5, 8.0)

    def iter_bytes(self, response):
        return stalled(self, response) if self.node.id == "a" else real(self, response)

    monkeypatch.setattr(Transport, "iter_bytes", iter_bytes)
    client = _client(make_client, clock, model_capabilities=PREFILL)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Hel" + "Hello"  # B continues with its whole (mocked) answer
    assert stream.rescues[0]["reason"] == "stall"


def test_rescues_are_bounded_per_call(make_client, clock):
    opened = []

    def opener(model, messages, extra, exclude):
        opened.append((model, frozenset(exclude)))
        raise RateLimitError("busy", status_code=429)

    rescuer = Rescuer(models=["m", "f"], messages=MSGS, opener=opener, capabilities=CapabilityTable(),
                      max_rescues=1, deadline=clock() + 100.0, clock=clock)
    broken = BrokenStream("m", "a", "reset", APIConnectionError("reset", node_id="a"), "Hel", 2, True)
    assert rescuer(broken) is None
    assert opened == [("m", frozenset({"a"})), ("f", frozenset())]
    assert rescuer(broken) is None and len(opened) == 2  # max_rescues=1 used: nothing opened
