"""Observers see every call: started, each attempt, decisions, first chunk, ended."""

from __future__ import annotations

import json
from typing import Any, List

import pytest

from holysheep_lb import ConfigError, HolySheepError, StreamInterruptedError
from holysheep_lb.observe import CallObserver
from holysheep_lb.policy.retry import RETRY, STOP, RetryDecision, RetryPolicy

from .conftest import chat_body

A, B = "https://a.example/v1", "https://b.example/v1"
NODES = [{"id": "a", "base_url": A}, {"id": "b", "base_url": B}]
MSGS = [{"role": "user", "content": "hi"}]
PRICES = {"m": (1.0, 1.0), "m2": (1.0, 1.0)}


class Recording(CallObserver):
    def __init__(self) -> None:
        self.events: List[Any] = []
        self.ends: List[Any] = []
        self.attempts: List[Any] = []

    def call_started(self, call):
        self.events.append(("started", call.operation, call.model))

    def attempt_ended(self, call, attempt):
        self.events.append(("attempt", attempt.node_id, attempt.outcome))
        self.attempts.append(attempt)

    def decided(self, call, decision):
        self.events.append(("decided", decision.kind))

    def first_chunk(self, call, at):
        self.events.append(("first_chunk",))

    def call_ended(self, call, end):
        self.events.append(("ended", end.error is None))
        self.ends.append(end)


class Broken(CallObserver):
    def call_started(self, call):
        raise RuntimeError("telemetry bug")


def test_a_success_is_started_attempted_and_ended(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", json=chat_body("m", 5, 2))
    client = make_client(NODES[:1], observers=[rec], prices=PRICES)
    client.chat_completion(MSGS, model="m")
    assert rec.events == [("started", "chat", "m"), ("attempt", "a", "ok"), ("ended", True)]
    end = rec.ends[0]
    assert (end.node_id, end.response_model, end.response_id, end.input_tokens, end.output_tokens) == (
        "a", "m", "x", 5, 2)


def test_a_failover_shows_each_attempt(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", status=503, json={"error": {"message": "down"}})
    rsps.post(B + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES, observers=[rec], prices=PRICES, strategy="round_robin")
    client.chat_completion(MSGS, model="m")
    attempts = [e for e in rec.events if e[0] == "attempt"]
    assert attempts in ([("attempt", "a", "status_5xx"), ("attempt", "b", "ok")], [("attempt", "b", "ok")])
    assert rec.events[0][0] == "started" and rec.events[-1] == ("ended", True)


def test_a_fallback_is_a_decision(rsps, make_client):
    rec = Recording()

    def by_model(request):
        model = json.loads(request.body)["model"]
        if model == "m":
            return 503, {}, json.dumps({"error": {"message": "down"}})
        return 200, {}, json.dumps(chat_body("m2"))

    import responses
    rsps.add_callback(responses.POST, A + "/chat/completions", callback=by_model)
    client = make_client(NODES[:1], observers=[rec], prices=PRICES, fallbacks={"m": ["m2"]}, max_retries=0)
    resp = client.chat_completion(MSGS, model="m")
    assert resp.fallback
    assert rec.events == [("started", "chat", "m"), ("attempt", "a", "status_5xx"), ("decided", "fallback"),
                          ("attempt", "a", "ok"), ("ended", True)]


def test_a_cache_hit_is_a_decision_without_attempts(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES[:1], prices=PRICES, cache={"ttl_s": 60})
    client.chat_completion(MSGS, model="m", temperature=0)
    client.add_observer(rec)
    assert client.chat_completion(MSGS, model="m", temperature=0).cached
    assert rec.events == [("started", "chat", "m"), ("decided", "cache_hit"), ("ended", True)]
    assert rec.ends[0].cached


def test_a_streams_call_ends_when_the_stream_ends(rsps, make_client):
    rec = Recording()
    chunks = [{"object": "chat.completion.chunk", "model": "m", "choices": [
                  {"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]},
              {"object": "chat.completion.chunk", "model": "m", "choices": [],
               "usage": {"prompt_tokens": 4, "completion_tokens": 1}}]
    body = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    rsps.post(A + "/chat/completions", body=body, content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=PRICES)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert rec.events == [("started", "chat", "m"), ("attempt", "a", "ok"), ("first_chunk",)]
    assert stream.read_text() == "Hi"
    assert rec.events[-1] == ("ended", True)
    assert (rec.ends[0].input_tokens, rec.ends[0].output_tokens, rec.ends[0].node_id) == (4, 1, "a")


def test_an_observer_that_raises_never_breaks_a_call_and_is_counted(rsps, make_client):
    rsps.post(A + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES[:1], observers=[Broken()], prices=PRICES)
    assert client.chat_completion(MSGS, model="m")["model"] == "m"
    assert client.stats()["observer_errors"] == 1


def test_observers_are_validated(make_client):
    with pytest.raises(ConfigError, match="observers"):
        make_client(NODES[:1], observers=[object()])
    with pytest.raises(ConfigError, match="observer"):
        make_client(NODES[:1]).add_observer(print)  # type: ignore[arg-type]


# -- what call_ended says about the answer -------------------------------------------------------


def sse(*chunks: Any) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def test_a_json_calls_end_names_the_base_url_of_the_node_that_answered(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", status=503, json={"error": {"message": "down"}})
    rsps.post(B + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES, observers=[rec], prices=PRICES, strategy="round_robin", backoff_base_s=0.0)
    resp = client.chat_completion(MSGS, model="m")
    assert [a.node_id for a in resp.attempts] == ["a", "b"]  # round robin starts on a
    end = rec.ends[0]
    assert (end.node_id, end.base_url) == ("b", B)
    assert "@" not in end.base_url and "?" not in end.base_url  # node URLs carry no credentials


def test_a_cache_hits_end_names_no_node_url(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES[:1], observers=[rec], prices=PRICES, cache={"ttl_s": 60})
    client.chat_completion(MSGS, model="m", temperature=0)
    assert client.chat_completion(MSGS, model="m", temperature=0).cached
    assert [(e.cached, e.base_url) for e in rec.ends] == [(False, A), (True, None)]  # no node answered the hit


def test_a_streams_end_carries_its_response_id_finish_reasons_and_node_url(rsps, make_client):
    rec = Recording()
    chunks = [{"id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": "m", "choices": [
                  {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None},
                  {"index": 1, "delta": {"role": "assistant", "content": "Yo"}, "finish_reason": None}]},
              {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": "m", "choices": [
                  {"index": 1, "delta": {}, "finish_reason": "length"}]},
              {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": "m", "choices": [
                  {"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": "m", "choices": [],
               "usage": {"prompt_tokens": 4, "completion_tokens": 2}}]
    rsps.post(B + "/chat/completions", body=sse(*chunks), content_type="text/event-stream")
    client = make_client(NODES[1:], observers=[rec], prices=PRICES)
    with client.chat_completion(MSGS, model="m", stream=True, n=2) as stream:
        assert stream.read_text() == "Hi"
    [end] = rec.ends
    assert (end.response_id, end.finish_reasons) == ("chatcmpl-s1", ("stop", "length"))  # in choice order
    assert (end.node_id, end.base_url, end.chunks) == ("b", B, 4)


def test_a_stream_closed_early_ends_with_its_id_and_no_finish_reason(rsps, make_client):
    rec = Recording()
    chunks = [{"id": "chatcmpl-s2", "object": "chat.completion.chunk", "model": "m", "choices": [
                  {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
              {"id": "chatcmpl-s2", "object": "chat.completion.chunk", "model": "m", "choices": [
                  {"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]}]
    rsps.post(A + "/chat/completions", body=sse(*chunks), content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=PRICES)
    stream = client.chat_completion(MSGS, model="m", stream=True)
    stream.close()  # after the first chunk only
    [end] = rec.ends
    assert (end.response_id, end.finish_reasons, end.base_url) == ("chatcmpl-s2", (), A)


def test_a_streams_response_id_is_the_first_non_empty_chunk_id(rsps, make_client):
    rec = Recording()
    chunks = [{"id": "", "object": "", "model": "", "choices": [], "prompt_filter_results": []},  # Azure's first
              {"id": "chatcmpl-s3", "object": "chat.completion.chunk", "model": "m", "choices": [
                  {"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}]
    rsps.post(A + "/chat/completions", body=sse(*chunks), content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=PRICES)
    assert client.chat_completion(MSGS, model="m", stream=True).read_text() == "Hi"
    assert (rec.ends[0].response_id, rec.ends[0].finish_reasons) == ("chatcmpl-s3", ("stop",))


def test_a_rescued_streams_call_ends_with_the_rescuing_answers_id_and_finish_reason(rsps, make_client, clock):
    rec = Recording()

    def chunk(cid, content=None, reason=None):
        delta = {} if content is None else {"content": content}
        return {"id": cid, "object": "chat.completion.chunk", "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    cut = b"".join(f"data: {json.dumps(chunk('chatcmpl-a', t))}\n\n".encode() for t in ("Hel", "lo"))
    rsps.post(A + "/chat/completions", body=cut, content_type="text/event-stream")  # no [DONE], no finish
    rsps.post(B + "/chat/completions", body=sse(chunk("chatcmpl-b", "Bye"), chunk("chatcmpl-b", reason="length")),
              content_type="text/event-stream")
    client = make_client(NODES, observers=[rec], prices=PRICES, clock=clock, sleep=clock.sleep, rand=lambda: 0.5,
                         strategy="round_robin")  # "m" takes no prefill: the rescue restarts on b
    stream = client.chat_completion(MSGS, model="m", stream=True)
    assert stream.read_text() == "Bye" and [r["to_node"] for r in stream.rescues] == ["b"]
    [end] = rec.ends  # the broken stream on a does not end the call
    assert (end.node_id, end.base_url, end.response_id, end.finish_reasons) == ("b", B, "chatcmpl-b", ("length",))


# -- attempt_ended.next_step is the retry policy's decision ----------------------------------------


def _next_steps(rec: Recording) -> List[Any]:
    return [(a.node_id, a.outcome, a.next_step) for a in rec.attempts]


def test_next_step_is_retry_when_the_policy_retried_and_none_for_the_answer(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", status=503, json={"error": {"message": "down"}})
    rsps.post(B + "/chat/completions", json=chat_body("m"))
    client = make_client(NODES, observers=[rec], prices=PRICES, strategy="round_robin", backoff_base_s=0.0)
    client.chat_completion(MSGS, model="m")
    assert _next_steps(rec) == [("a", "status_5xx", "retry"), ("b", "ok", None)]  # round robin starts on a


def test_next_step_is_stop_when_the_policy_has_no_retry_left(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", status=503, json={"error": {"message": "down"}})
    client = make_client(NODES[:1], observers=[rec], prices=PRICES, max_retries=0)
    with pytest.raises(HolySheepError):
        client.chat_completion(MSGS, model="m")
    assert _next_steps(rec) == [("a", "status_5xx", "stop")]  # retryable, but the policy stopped


def test_next_step_is_stop_when_the_retry_budget_refused_the_retry(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", status=503, json={"error": {"message": "down"}})
    client = make_client(NODES[:1], observers=[rec], prices=PRICES, retry_budget_ratio=0.0,
                         retry_budget_min_per_s=0.0)
    with pytest.raises(HolySheepError):
        client.chat_completion(MSGS, model="m")
    assert _next_steps(rec) == [("a", "status_5xx", "stop")]
    assert ("decided", "retry_budget_exhausted") in rec.events


class Scripted(RetryPolicy):
    """A policy whose decisions are scripted: retry only a 400, stop on anything else."""

    def decide(self, outcome, ctx, *, scope="attempt"):
        if scope == "attempt":
            return RetryDecision(RETRY, reason="scripted") if outcome.status_code == 400 else RetryDecision(
                STOP, reason="scripted stop")
        return super().decide(outcome, ctx, scope=scope)


def test_next_step_follows_a_custom_policys_decide_not_the_failure_kind(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", status=400, json={"error": {"message": "bad"}})
    rsps.post(B + "/chat/completions", status=503, json={"error": {"message": "down"}})
    client = make_client(NODES, observers=[rec], prices=PRICES, retry=Scripted(), strategy="round_robin")
    with pytest.raises(HolySheepError):
        client.chat_completion(MSGS, model="m")
    # a 400 is final by its kind, yet this policy retried it; a 503 is retryable, yet it stopped
    assert _next_steps(rec) == [("a", "status_4xx", "retry"), ("b", "status_5xx", "stop")]


# -- call_ended carries the usage and cost the spend ledger settled, for streams as for answers ----

RATES = {"m": (2.0, 8.0, 0.5)}  # USD per 1M tokens: input, output, cached input
CACHED_USAGE = {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
                "prompt_tokens_details": {"cached_tokens": 800}}
CACHED_COST_USD = (200 * 2.0 + 800 * 0.5 + 10 * 8.0) / 1e6  # 0.00088


def text_chunk(text=None, reason=None, cid="chatcmpl-u"):
    delta = {} if text is None else {"content": text}
    return {"id": cid, "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}


def spent(end):
    return (end.input_tokens, end.output_tokens, end.cached_input_tokens, end.usage_estimated)


def test_a_streams_end_carries_the_usage_and_cost_the_ledger_settled(rsps, make_client):
    rec = Recording()
    usage_chunk = {"id": "chatcmpl-u", "object": "chat.completion.chunk", "model": "m", "choices": [],
                   "usage": CACHED_USAGE}
    rsps.post(A + "/chat/completions", body=sse(text_chunk("Hi", "stop"), usage_chunk),
              content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=RATES)
    with client.chat_completion(MSGS, model="m", stream=True) as stream:
        assert stream.read_text() == "Hi"
    [end] = rec.ends
    assert end.error is None and spent(end) == (1000, 10, 800, False)
    assert end.cost_usd == pytest.approx(CACHED_COST_USD)
    assert end.cost_usd == pytest.approx(client.cost_report()["totals"]["cost_usd"])  # what the ledger holds


def test_a_json_answers_end_carries_the_same_fields_from_the_same_reading(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", json={**chat_body("m"), "usage": CACHED_USAGE})
    client = make_client(NODES[:1], observers=[rec], prices=RATES)
    resp = client.chat_completion(MSGS, model="m")
    [end] = rec.ends
    assert spent(end) == (1000, 10, 800, False)
    assert end.cost_usd == pytest.approx(CACHED_COST_USD) == resp.extra["cost"]["cost_usd"]


def test_a_stream_without_usage_ends_with_the_estimate_it_was_charged_marked_estimated(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", body=sse(text_chunk("Hi"), text_chunk(reason="stop")),
              content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=RATES)
    estimate = client.ledger.estimate("m", MSGS, {"max_tokens": 10})
    assert client.chat_completion(MSGS, model="m", stream=True, max_tokens=10).read_text() == "Hi"
    [end] = rec.ends
    assert end.error is None and spent(end) == (estimate.input_tokens, 10, 0, True)
    assert end.cost_usd == pytest.approx(float(estimate.amount_usd))
    assert end.cost_usd == pytest.approx(client.cost_report()["totals"]["cost_usd"])


def test_a_stream_closed_early_ends_with_the_estimate_it_was_charged(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", body=sse(text_chunk("Hi"), text_chunk(" there", "stop")),
              content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=RATES)
    estimate = client.ledger.estimate("m", MSGS, {"max_tokens": 10})
    client.chat_completion(MSGS, model="m", stream=True, max_tokens=10).close()  # after the first chunk
    [end] = rec.ends
    assert end.finish_reasons == () and spent(end) == (estimate.input_tokens, 10, 0, True)
    assert end.cost_usd == pytest.approx(float(estimate.amount_usd))
    assert end.cost_usd == pytest.approx(client.cost_report()["totals"]["cost_usd"])


def test_a_stream_cut_without_a_rescue_ends_in_error_with_the_estimate_it_was_charged(rsps, make_client):
    rec = Recording()
    cut = f"data: {json.dumps(text_chunk('Hel'))}\n\n".encode()  # no finish_reason, no [DONE]
    rsps.post(A + "/chat/completions", body=cut, content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=RATES, stream_rescue="off")
    estimate = client.ledger.estimate("m", MSGS, {"max_tokens": 10})
    with pytest.raises(StreamInterruptedError) as raised:
        client.chat_completion(MSGS, model="m", stream=True, max_tokens=10).read_text()
    [end] = rec.ends
    # never a success, and the same kind of error the caller got, with its cause
    assert isinstance(end.error, StreamInterruptedError)
    assert end.error.reason == raised.value.reason == "truncated" and end.error.chunks == raised.value.chunks == 1
    assert type(end.error.__cause__) is type(raised.value.__cause__)
    assert end.error.partial_text == ""  # end events never carry the answer
    assert spent(end) == (estimate.input_tokens, 10, 0, True)
    assert end.cost_usd == pytest.approx(float(estimate.amount_usd))
    assert end.cost_usd == pytest.approx(client.cost_report()["totals"]["cost_usd"])


def test_an_empty_stream_ends_with_the_cost_settled_once_it_was_opened(rsps, make_client):
    rec = Recording()
    rsps.post(A + "/chat/completions", body=b"data: [DONE]\n\n", content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=RATES)
    estimate = client.ledger.estimate("m", MSGS, {"max_tokens": 10})
    stream = client.chat_completion(MSGS, model="m", stream=True, max_tokens=10)
    assert stream.state == "completed" and stream.read_text() == ""
    [end] = rec.ends  # told once the chain settled it, not before
    assert end.error is None and spent(end) == (estimate.input_tokens, 10, 0, True)
    assert end.cost_usd == pytest.approx(float(estimate.amount_usd))
    assert end.cost_usd == pytest.approx(client.cost_report()["totals"]["cost_usd"])


def test_a_rescued_streams_call_ends_with_what_both_of_its_streams_were_charged(rsps, make_client, clock):
    rec = Recording()
    cut = b"".join(f"data: {json.dumps(text_chunk(t, cid='chatcmpl-a'))}\n\n".encode() for t in ("Hel", "lo"))
    rsps.post(A + "/chat/completions", body=cut, content_type="text/event-stream")
    usage_chunk = {"id": "chatcmpl-b", "object": "chat.completion.chunk", "model": "m", "choices": [],
                   "usage": CACHED_USAGE}
    rsps.post(B + "/chat/completions", body=sse(text_chunk("Bye", "stop", cid="chatcmpl-b"), usage_chunk),
              content_type="text/event-stream")
    client = make_client(NODES, observers=[rec], prices=RATES, clock=clock, sleep=clock.sleep,
                         rand=lambda: 0.5, strategy="round_robin")  # "m" takes no prefill: restarted on b
    estimate = client.ledger.estimate("m", MSGS, {"max_tokens": 10})
    stream = client.chat_completion(MSGS, model="m", stream=True, max_tokens=10)
    assert stream.read_text() == "Bye" and [r["to_node"] for r in stream.rescues] == ["b"]
    [end] = rec.ends
    assert end.error is None and end.node_id == "b"
    # the cut stream on a was charged its estimate, the answer on b its usage: both are the call's
    assert spent(end) == (estimate.input_tokens + 1000, 10 + 10, 800, True)
    assert end.cost_usd == pytest.approx(float(estimate.amount_usd) + CACHED_COST_USD)
    assert end.cost_usd == pytest.approx(client.cost_report()["totals"]["cost_usd"])


class _StoreDown(Exception):
    pass


def test_a_stream_whose_spend_store_fails_still_ends_with_that_error_and_its_estimate(rsps, make_client):
    # The caller gets the store's error; the observers hear the call end with it (an
    # OpenTelemetry span must not stay open), priced at the estimate it reserved.
    from holysheep_lb.spend_store import InMemorySpendStore

    class FailingStore(InMemorySpendStore):
        def settle(self, reservation, **kw):
            raise _StoreDown("spend store unreachable")

    rec = Recording()
    usage_chunk = {"id": "chatcmpl-u", "object": "chat.completion.chunk", "model": "m", "choices": [],
                   "usage": CACHED_USAGE}
    rsps.post(A + "/chat/completions", body=sse(text_chunk("Hi", "stop"), usage_chunk),
              content_type="text/event-stream")
    client = make_client(NODES[:1], observers=[rec], prices=RATES, spend_store=FailingStore())
    estimate = client.ledger.estimate("m", MSGS, {})
    with pytest.raises(_StoreDown):
        with client.chat_completion(MSGS, model="m", stream=True) as stream:
            stream.read_text()
    [end] = rec.ends
    assert isinstance(end.error, _StoreDown)
    assert end.cost_usd == pytest.approx(float(estimate.amount_usd)) and end.usage_estimated is True
