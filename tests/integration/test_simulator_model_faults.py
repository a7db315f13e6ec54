"""Model faults of the simulated gateway: the Failover Bench catalogue, keyed on the model name."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from holysheep_lb.simulator import SimModel, SimNode, SimulatedGateway, reply_text

from ..conftest import FakeClock, wait_until
from .sim_helpers import (
    MESSAGES,
    TIMEOUT,
    body,
    chat_url,
    content_of,
    parse,
    read_stream,
)

PRIMARY = "fb-primary"
FALLBACK = "fb-ok"
TEXT = reply_text(PRIMARY, MESSAGES)  # "[fb-primary] Echo: one two ... eight": 10 content chunks
PIECES = ["[fb-primary] ", "Echo: ", "one ", "two ", "three ", "four ", "five ", "six ", "seven ", "eight"]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def gw(clock):
    gateway = SimulatedGateway([SimNode("a"), SimNode("b")], seed=7, clock=clock).start()
    try:
        yield gateway
    finally:
        t0 = time.monotonic()
        gateway.stop(timeout_s=3.0)
        assert time.monotonic() - t0 < 3.5


def post(gw, model, node="a", stream=False, timeout=TIMEOUT, **extra):
    return requests.post(chat_url(gw, node), json=body(model, stream, **extra), timeout=timeout, stream=stream)


def test_pieces_of_the_canonical_text():
    assert "".join(PIECES) == TEXT


# -- answers replaced by an error -----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_429_with_retry_after_on_the_first_k_attempts_then_success(gw, stream):
    gw.configure(model=PRIMARY, fault="rate_limit", fault_attempts=2, retry_after_s=2)
    for node in ("a", "b"):  # a gateway-wide fault counts attempts over every node
        resp = post(gw, PRIMARY, node, stream)
        assert resp.status_code == 429
        assert resp.headers["Retry-After"] == "2" and resp.headers["retry-after-ms"] == "2000"
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    assert post(gw, PRIMARY, "a", stream).status_code == 200
    assert post(gw, FALLBACK, "a", stream).status_code == 200  # other models are healthy


def test_429_persistent_without_retry_after(gw):
    gw.configure(model=PRIMARY, fault="rate_limit")
    for _ in range(4):
        resp = post(gw, PRIMARY)
        assert resp.status_code == 429 and "Retry-After" not in resp.headers and "retry-after-ms" not in resp.headers


def test_500_once_then_success_and_503_persistent(gw):
    gw.configure(model=PRIMARY, fault="server_error", fault_attempts=1)
    first = post(gw, PRIMARY, stream=True)
    assert first.status_code == 500 and first.json()["error"]["type"] == "server_error"
    assert post(gw, PRIMARY, stream=True).status_code == 200
    gw.configure(model="fb-503", fault="server_error", fault_status=503)
    statuses = [post(gw, "fb-503").status_code for _ in range(3)]
    assert statuses == [503, 503, 503]
    assert post(gw, "fb-503").json()["error"]["code"] == "overloaded"


@pytest.mark.parametrize("stream", [False, True])
def test_reset_before_headers_on_the_first_attempt_then_success(gw, stream):
    gw.configure(model=PRIMARY, fault="reset", fault_attempts=1)
    with pytest.raises(requests.exceptions.ConnectionError):
        post(gw, PRIMARY, "b", stream)
    resp = post(gw, PRIMARY, "b", stream)
    assert resp.status_code == 200
    if stream:
        payloads, error = read_stream(resp)
        assert error is None and content_of(parse(payloads)) == TEXT
    assert wait_until(lambda: gw.outcomes("b") == {"reset": 1, "ok": 1}), gw.outcomes("b")


def _post_in_thread(gw, model, stream=False, timeout=(2.0, 10.0)):
    box = {}
    done = threading.Event()

    def run():
        try:
            resp = post(gw, model, stream=stream, timeout=timeout)
            box["status"] = resp.status_code
            box["payloads"], box["error"] = read_stream(resp) if stream else (None, None)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            box["exc"] = exc
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return box, done


def test_no_response_is_released_by_configure(gw):
    gw.configure(model=PRIMARY, fault="hang", fault_duration_s=30)
    box, done = _post_in_thread(gw, PRIMARY, stream=True)
    assert wait_until(lambda: gw.in_flight("a") == 1, 3.0)
    assert not done.wait(0.2)  # accepted, not answered
    assert post(gw, FALLBACK).status_code == 200  # the node itself is fine
    t0 = time.monotonic()
    gw.configure(model=PRIMARY, fault=None)
    assert done.wait(3.0) and time.monotonic() - t0 < 2.0
    assert isinstance(box.get("exc"), requests.exceptions.ConnectionError)
    assert [r.outcome for r in gw.request_log(model=PRIMARY)] == ["hang"]


def test_no_response_is_bounded_by_its_duration_and_by_stop(clock):
    gw = SimulatedGateway([SimNode("a")], models={PRIMARY: SimModel(fault="hang", fault_duration_s=0.2)},
                          clock=clock).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(requests.exceptions.ConnectionError):
            post(gw, PRIMARY)
        assert 0.15 <= time.monotonic() - t0 < 3.0
        gw.configure(model=PRIMARY, fault_duration_s=60)
        box, done = _post_in_thread(gw, PRIMARY)
        assert wait_until(lambda: gw.in_flight("a") == 1, 3.0)
    finally:
        t0 = time.monotonic()
        gw.stop(timeout_s=2.0)
    assert time.monotonic() - t0 < 3.0 and done.wait(3.0)
    assert isinstance(box.get("exc"), requests.exceptions.ConnectionError)


def test_a_fault_on_one_node_leaves_the_model_healthy_elsewhere(gw):
    gw.configure("a", model=PRIMARY, fault="server_error", fault_status=503)
    assert post(gw, PRIMARY, "a").status_code == 503
    assert post(gw, PRIMARY, "b").status_code == 200
    assert gw.models == {} and gw.nodes[0].models == {PRIMARY: SimModel(fault="server_error", fault_status=503)}


def test_a_node_setting_starts_from_the_gateway_wide_one_and_wins(gw):
    gw.configure(model=PRIMARY, context_window_tokens=5)
    gw.configure("a", model=PRIMARY, fault="content_policy")
    assert gw.nodes[0].models[PRIMARY].context_window_tokens == 5
    assert post(gw, PRIMARY, "a").json()["error"]["code"] == "content_policy_violation"
    assert post(gw, PRIMARY, "b").json()["error"]["code"] == "context_length_exceeded"


def test_flap_is_down_for_its_duration_after_start_then_healthy(clock):
    with SimulatedGateway([SimNode("a")], models={"fb-flap": {"fault": "flap", "fault_duration_s": 60}},
                          clock=clock) as gw:
        assert post(gw, "fb-flap").status_code == 503
        clock.advance(59.5)
        assert post(gw, "fb-flap", stream=True).status_code == 503
        clock.advance(0.5)
        assert post(gw, "fb-flap").status_code == 200
        gw.configure(model="fb-flap", fault_start_s=10, fault_duration_s=5)  # a schedule set at runtime
        clock.advance(9)
        assert post(gw, "fb-flap").status_code == 200
        clock.advance(1)
        assert post(gw, "fb-flap").status_code == 503
        clock.advance(5)
        assert post(gw, "fb-flap").status_code == 200
        gw.reset_counts()  # re-arms: down again from now + 10 s
        clock.advance(10)
        assert post(gw, "fb-flap").status_code == 503


# -- limits of the model ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_exceeded_forced_and_natural(gw, stream):
    gw.configure(model=PRIMARY, fault="context_length")
    resp = post(gw, PRIMARY, stream=stream)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "context_length_exceeded", "invalid_request_error", "messages")
    assert "maximum context length is 8192 tokens" in error["message"]
    prompt_tokens = post(gw, FALLBACK).json()["usage"]["prompt_tokens"]  # 18
    gw.configure(model=FALLBACK, context_window_tokens=prompt_tokens)
    assert post(gw, FALLBACK, stream=stream).status_code == 200
    gw.configure(model=FALLBACK, context_window_tokens=prompt_tokens - 1)
    resp = post(gw, FALLBACK, stream=stream)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert f"However, your messages resulted in {prompt_tokens} tokens" in resp.json()["error"]["message"]
    assert wait_until(lambda: gw.outcomes("a").get("context_length_exceeded") == 2), gw.outcomes("a")


def test_content_policy_violation_is_a_400_with_azure_details(gw):
    gw.configure(model=PRIMARY, fault="content_policy")
    resp = post(gw, PRIMARY, stream=True)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "content_policy_violation" and error["type"] == "invalid_request_error"
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"


def test_content_filter_ends_a_200_answer_early(gw):
    gw.configure(model=PRIMARY, fault="content_filter", fault_after_chunks=3)
    plain = post(gw, PRIMARY).json()
    assert plain["choices"][0]["finish_reason"] == "content_filter"
    assert plain["choices"][0]["message"]["content"] == "".join(PIECES[:3])
    assert plain["usage"]["completion_tokens"] == 3
    resp = post(gw, PRIMARY, stream=True, stream_options={"include_usage": True})
    payloads, error = read_stream(resp)
    events = parse(payloads)
    assert error is None and events[-1] == "[DONE]"
    assert content_of(events) == "".join(PIECES[:3])
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "content_filter"
    assert events[-2]["usage"] == plain["usage"]


# -- faults inside the answer -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_slow_first_token_sends_headers_at_once_and_the_rest_after_the_delay(gw, stream):
    gw.configure(model=PRIMARY, fault="slow_first_token", fault_duration_s=0.4)
    t0 = time.monotonic()
    resp = requests.post(chat_url(gw), json=body(PRIMARY, stream), timeout=TIMEOUT, stream=True)
    assert resp.status_code == 200 and time.monotonic() - t0 < 0.3  # headers at once
    if stream:
        payloads, error = read_stream(resp)
        assert error is None and content_of(parse(payloads)) == TEXT
    else:
        assert resp.json()["choices"][0]["message"]["content"] == TEXT
    assert time.monotonic() - t0 >= 0.35
    assert wait_until(lambda: gw.outcomes("a") == {"ok": 1}), gw.outcomes("a")


def test_a_slow_first_token_is_released_by_configure(gw):
    gw.configure(model=PRIMARY, fault="slow_first_token", fault_duration_s=30)
    box, done = _post_in_thread(gw, PRIMARY, stream=True)
    assert wait_until(lambda: gw.in_flight("a") == 1, 3.0)
    assert not done.wait(0.2)
    gw.configure(model=PRIMARY, fault=None)
    assert done.wait(3.0)
    assert box["status"] == 200 and box["error"] is None and content_of(parse(box["payloads"])) == TEXT


def test_stream_cut_after_n_chunks_on_the_first_attempt_then_complete(gw):
    gw.configure(model=PRIMARY, fault="stream_cut", fault_after_chunks=4, fault_attempts=1)
    payloads, error = read_stream(post(gw, PRIMARY, stream=True))
    events = parse(payloads)
    assert isinstance(error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert content_of(events) == "".join(PIECES[:4])
    assert all(e["choices"][0]["finish_reason"] is None for e in events) and "[DONE]" not in events
    payloads, error = read_stream(post(gw, PRIMARY, stream=True))
    assert error is None and content_of(parse(payloads)) == TEXT
    assert wait_until(lambda: gw.outcomes("a") == {"stream_cut": 1, "ok": 1}), gw.outcomes("a")


def test_a_cut_plain_answer_closes_the_connection_mid_body(gw):
    gw.configure(model=PRIMARY, fault="stream_cut")
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        post(gw, PRIMARY)


def test_stream_stall_goes_silent_then_closes(gw):
    gw.configure(model=PRIMARY, fault="stream_stall", fault_after_chunks=2, fault_duration_s=0.4)
    resp = post(gw, PRIMARY, stream=True, timeout=(2.0, 0.2))
    payloads, error = read_stream(resp)
    assert "timed out" in str(error).lower()  # silent, connection open
    assert content_of(parse(payloads)) == "".join(PIECES[:2])
    resp.close()
    t0 = time.monotonic()
    payloads, error = read_stream(post(gw, PRIMARY, stream=True, timeout=(2.0, 5.0)))
    assert error is not None and "timed out" not in str(error).lower()  # closed by the node
    assert 0.3 <= time.monotonic() - t0 < 3.0
    assert wait_until(lambda: gw.in_flight("a") == 0, 3.0)


def test_one_malformed_event_in_an_otherwise_complete_stream(gw):
    gw.configure(model=PRIMARY, fault="malformed_event", fault_after_chunks=9)
    payloads, error = read_stream(post(gw, PRIMARY, stream=True))
    assert error is None and payloads[-1] == b"[DONE]"
    bad = []
    good = []
    for p in payloads:
        try:
            good.append(p.decode() if p == b"[DONE]" else json.loads(p))
        except ValueError:
            bad.append(payloads.index(p))
    assert bad == [10]  # the role chunk, 9 content chunks, then the invalid event
    assert content_of(good) == TEXT  # skipping it gives the whole answer
    plain = post(gw, PRIMARY)
    assert plain.status_code == 200
    with pytest.raises(ValueError):
        plain.json()


def test_a_complete_stream_without_done(gw):
    gw.configure(model=PRIMARY, fault="no_done")
    resp = post(gw, PRIMARY, stream=True, stream_options={"include_usage": True})
    payloads, error = read_stream(resp)
    events = parse(payloads)
    assert error is None  # the HTTP body ends properly
    assert "[DONE]" not in events and content_of(events) == TEXT
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1]["usage"]["total_tokens"] > 0
    assert post(gw, PRIMARY).json()["choices"][0]["message"]["content"] == TEXT  # plain answers are whole


def test_an_error_event_inside_a_200_stream(gw):
    gw.configure(model=PRIMARY, fault="error_event", fault_after_chunks=3)
    resp = post(gw, PRIMARY, stream=True)
    assert resp.status_code == 200
    payloads, error = read_stream(resp)
    events = parse(payloads)
    assert error is None and "[DONE]" not in events
    assert content_of(events[:-1]) == "".join(PIECES[:3])
    assert set(events[-1]) == {"error"} and events[-1]["error"]["type"] == "server_error"
    plain = post(gw, PRIMARY)
    assert plain.status_code == 200 and "error" in plain.json()
    assert wait_until(lambda: gw.outcomes("a") == {"error_event": 2}), gw.outcomes("a")


# -- prefill ------------------------------------------------------------------------------


def test_a_cut_stream_continued_by_prefill_elsewhere_gives_the_canonical_answer(gw):
    gw.configure("a", model=PRIMARY, fault="stream_cut", fault_after_chunks=4)
    gw.configure(model="fb-noprefill", prefill=False)
    payloads, error = read_stream(post(gw, PRIMARY, "a", stream=True))
    partial = content_of(parse(payloads))
    assert error is not None and partial == "".join(PIECES[:4])
    continued = MESSAGES + [{"role": "assistant", "content": partial}]
    rejected = post(gw, "fb-noprefill", "b", messages=continued)
    assert rejected.status_code == 400
    assert rejected.json()["error"]["type"] == "invalid_request_error"
    assert "does not support assistant message prefill" in rejected.json()["error"]["message"]
    assert post(gw, "fb-noprefill", "b").status_code == 200  # without a prefill it answers
    for model in (PRIMARY, FALLBACK):  # the same model on another node, or a model that accepts prefill
        payloads, error = read_stream(post(gw, model, "b", stream=True, messages=continued))
        assert error is None and partial + content_of(parse(payloads)) == TEXT
    plain = post(gw, PRIMARY, "b", messages=continued).json()
    assert partial + plain["choices"][0]["message"]["content"] == TEXT
    assert plain["usage"]["completion_tokens"] == len(TEXT[len(partial):].split())
    expected = [(True, "prefill_rejected", 400), (False, "ok", 200)]
    assert wait_until(lambda: [(r.prefill, r.outcome, r.status) for r in gw.request_log(model="fb-noprefill")]
                      == expected), gw.request_log(model="fb-noprefill")


# -- counters and the request log ---------------------------------------------------------------


def test_attempts_and_the_request_log_score_a_retry(gw, clock):
    gw.configure(model=PRIMARY, fault="rate_limit", fault_attempts=1, retry_after_s=2)
    assert post(gw, PRIMARY, "a", stream=True).status_code == 429
    clock.advance(2.5)
    assert post(gw, PRIMARY, "b", stream=True).status_code == 200
    assert post(gw, FALLBACK, "b").status_code == 200
    requests.get(gw.base_url("a") + "/models", timeout=TIMEOUT)
    assert wait_until(lambda: all(r.outcome != "pending" for r in gw.request_log()))
    assert gw.attempts(PRIMARY) == 2 and gw.attempts(PRIMARY, node_id="a") == 1
    assert gw.attempts(FALLBACK, node_id="a") == 0 and gw.attempts() == 3
    first, second = gw.request_log(model=PRIMARY)
    assert (first.node_id, first.attempt, first.stream, first.prefill, first.outcome, first.status) == (
        "a", 1, True, False, "rate_limited", 429)
    assert (second.node_id, second.attempt, second.outcome, second.status) == ("b", 2, "ok", 200)
    assert second.t_s - first.t_s == pytest.approx(2.5)  # the gap between attempt 1 and 2
    models_probe = gw.request_log(node_id="a")[-1]
    assert (models_probe.path, models_probe.model, models_probe.attempt) == ("/v1/models", None, 0)
    gw.reset_counts()
    assert gw.request_log() == [] and gw.attempts() == 0
    assert post(gw, PRIMARY).status_code == 429  # re-armed


def test_the_request_log_is_bounded(clock):
    with SimulatedGateway([SimNode("a")], clock=clock, request_log_size=3) as gw:
        for _ in range(5):
            post(gw, FALLBACK)
        assert wait_until(lambda: all(r.outcome == "ok" for r in gw.request_log()))
        assert [r.attempt for r in gw.request_log()] == [3, 4, 5] and gw.attempts(FALLBACK) == 5


def test_configuring_a_model_is_validated(gw):
    from holysheep_lb.errors import ConfigError

    with pytest.raises(ConfigError, match="bogus"):
        gw.configure(model=PRIMARY, bogus=1)
    with pytest.raises(ConfigError, match="SimModel.fault"):
        gw.configure(model=PRIMARY, fault="explode")
    with pytest.raises(ConfigError, match="model"):
        gw.configure(model="", fault="reset")
    with pytest.raises(ConfigError, match="node_id"):
        gw.configure(fault="reset")
    with pytest.raises(KeyError):
        gw.configure("zzz", model=PRIMARY, fault="reset")
    with pytest.raises(ConfigError, match="latency_ms"):  # node fields are not model fields
        gw.configure(model=PRIMARY, latency_ms=5)
    assert gw.models == {}


def test_replacing_a_nodes_models_arms_them_afresh(gw):
    gw.configure("a", models={PRIMARY: {"fault": "reset", "fault_attempts": 1}})
    with pytest.raises(requests.exceptions.ConnectionError):
        post(gw, PRIMARY)
    assert post(gw, PRIMARY).status_code == 200
    gw.configure("a", models={PRIMARY: SimModel(fault="reset", fault_attempts=1)})  # the same value, re-armed
    with pytest.raises(requests.exceptions.ConnectionError):
        post(gw, PRIMARY)
    gw.configure("a", models={})
    assert post(gw, PRIMARY).status_code == 200
