"""LLM failure semantics of issue #13 in the classifier, the retry decision and the chain:
silent routes, 429 on every route, context-window and content-filter refusals, a 200
answer cut by a content filter, breaker recovery, and honest accounting.

Mocked HTTP (responses) and a fake clock; nothing sleeps.
"""

from __future__ import annotations

import json

import pytest
import requests
import responses

from holysheep_lb import (
    AllAttemptsFailedError,
    BadRequestError,
    CircuitOpenError,
    ConfigError,
    ContentFilterError,
    Attempt,
    ContextWindowExceededError,
    PriceTable,
)
from holysheep_lb.errors import FirstTokenTimeoutError, status_error
from holysheep_lb.policy.classify import classify
from holysheep_lb.policy.retry import NEXT_MODEL, STOP, RetryPolicy

A = "https://a.example/v1"
B = "https://b.example/v1"
MSGS = [{"role": "user", "content": "hello"}]
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

SILENT = "silent"  # a read timeout once the request was sent

CONTEXT_BODIES = [
    # OpenAI
    {"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages resulted "
                          "in 9000 tokens.", "type": "invalid_request_error", "param": "messages",
               "code": "context_length_exceeded"}},
    # Anthropic-compatible
    {"type": "error", "error": {"type": "invalid_request_error",
                                "message": "prompt is too long: 210000 tokens > 200000 maximum"}},
    # vLLM / sglang (flat form)
    {"object": "error", "message": "This model's maximum context length is 4096 tokens. However, you requested "
                                   "5000 tokens in the messages.", "type": "BadRequestError", "code": 400},
    {"detail": "Input length (9000) exceeds the model's maximum context length (8192)."},
]
FILTER_BODIES = [
    {"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
                          "management policy.", "type": None, "param": "prompt", "code": "content_filter",
               "innererror": {"code": "ResponsibleAIPolicyViolation"}}},
    {"error": {"message": "Your request was rejected as a result of our safety system.",
               "type": "invalid_request_error", "code": "content_policy_violation"}},
]


def _answer(model, finish_reason="stop"):
    return {"id": "x", "model": model, "usage": USAGE,
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": f"from {model}"}}]}


class Gateway:
    """Mocked nodes whose answer depends on (node, model): an HTTP status, a (status, body)
    pair, SILENT (a read timeout), or a list of those served in turn (the last repeats)."""

    def __init__(self, rsps, plan, clock=None, step_s=0.0):
        self.plan = plan      # (node base_url, model) or model -> outcome
        self.sent = []        # (node, model) per request
        self.clock = clock
        self.step_s = step_s  # fake seconds each request takes
        for url in (A, B):
            rsps.add_callback(responses.POST, url + "/chat/completions", callback=self._for(url))

    def _for(self, url):
        def callback(request):
            model = json.loads(request.body)["model"]
            self.sent.append((url, model))
            if self.clock is not None:
                self.clock.advance(self.step_s)
            what = self.plan.get((url, model), self.plan.get(model, 200))
            if isinstance(what, list):
                what = what.pop(0) if len(what) > 1 else what[0]
            if what == SILENT:
                return requests.ReadTimeout("read timed out")
            status, body = what if isinstance(what, tuple) else (what, None)
            if body is None:
                body = _answer(model) if status == 200 else {"error": {"message": f"{model} says {status}"}}
            return status, {"Content-Type": "application/json"}, json.dumps(body)
        return callback

    @property
    def models(self):
        return [m for _, m in self.sent]


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as r:
        yield r


def _client(make_client, clock, nodes=1, **kw):
    kw.setdefault("retry_budget_ratio", None)
    urls = [{"id": "a", "base_url": A}, {"id": "b", "base_url": B}][:nodes]
    return make_client(urls, clock=clock, sleep=clock.sleep, rand=lambda: 0.0, **kw)


# ------------------------------------------------------------------------ silent routes


def test_a_silent_route_is_not_retried_the_next_model_answers_at_once(rsps, make_client, clock):
    gw = Gateway(rsps, {"m": SILENT})
    client = _client(make_client, clock, max_retries=2, fallbacks={"m": ["f"]})
    resp = client.chat_completion(MSGS, model="m")
    assert gw.models == ["m", "f"]  # not m, m, m, f
    assert (resp.model, resp.fallback, resp.text) == ("f", True, "from f")


def test_a_silent_route_is_not_tried_again_while_another_node_exists(rsps, make_client, clock):
    gw = Gateway(rsps, {(A, "m"): SILENT, (B, "m"): [500, 500, 200]})
    client = _client(make_client, clock, nodes=2, strategy="round_robin", max_retries=3, fallbacks={"m": ["f"]})
    resp = client.chat_completion(MSGS, model="m")
    # a went silent: b's 500 leaves no untried node, so the call moves on instead of
    # going back to a (or hammering b)
    assert gw.sent[:2] == [(A, "m"), (B, "m")] or gw.sent[:2] == [(B, "m"), (A, "m")]
    assert gw.models.count("m") == 2 and resp.model == "f"


def test_without_a_fallback_a_silent_route_ends_the_call_with_a_typed_error(rsps, make_client, clock):
    gw = Gateway(rsps, {"m": SILENT})
    client = _client(make_client, clock, max_retries=2)
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="m")
    assert gw.models == ["m"] and "went silent" in info.value.reason
    assert info.value.attempts[0].kind == "timeout"


def test_a_connect_timeout_is_not_silence_it_is_retried():
    out = classify(status_error(503, None, node_id="a", request_id=None, headers={}))
    assert not out.silent
    from holysheep_lb.errors import APITimeoutError
    assert not classify(APITimeoutError("connect", node_id="a", request_sent=False)).silent
    assert classify(APITimeoutError("read", node_id="a", request_sent=True)).silent
    assert classify(FirstTokenTimeoutError("ttft", timeout_s=10.0, node_id="a")).silent


def test_a_first_token_timeout_fails_over_to_the_next_model_at_once(rsps, make_client, clock, monkeypatch):
    from holysheep_lb.transport import Transport
    from tests.test_rescue import finish, usage_chunk
    from tests.test_streaming import delta, sse

    sent = []

    def stream(model):
        return sse(delta(f"from {model}"), finish(model=model), usage_chunk(model=model))

    def callback(request):
        model = json.loads(request.body)["model"]
        sent.append(model)
        return 200, {"Content-Type": "text/event-stream"}, stream(model)

    rsps.add_callback(responses.POST, A + "/chat/completions", callback=callback)
    real = Transport.iter_bytes

    def iter_bytes(self, response):
        if json.loads(response.request.body)["model"] != "slow":
            return real(self, response)

        def slow():  # keep-alives only: no first token within the limit
            for _ in range(10):
                clock.advance(3.0)
                yield b": keepalive\n\n"
        return slow()

    monkeypatch.setattr(Transport, "iter_bytes", iter_bytes)
    client = _client(make_client, clock, max_retries=2, fallbacks={"slow": ["fast"]})
    started = clock()
    stream_ = client.chat_completion(MSGS, model="slow", stream=True, first_token_timeout_s=5.0)
    assert stream_.read_text() == "from fast"
    assert sent == ["slow", "fast"] and clock() - started < 10.0
    assert client.stats()["nodes"]["a"]["failures"]["ttft_timeout"] == 1


# ------------------------------------------------------------------------ room for the fallback


class SilentUntilTimeout:
    """Mocked node: ``silent`` models never answer (the fake clock moves by the read
    timeout the attempt was given, then it times out); the others answer at once."""

    def __init__(self, rsps, clock, silent):
        self.clock = clock
        self.silent = set(silent)
        self.read_timeouts = []  # (model, read timeout) per request
        rsps.add_callback(responses.POST, A + "/chat/completions", callback=self._callback)

    def _callback(self, request):
        model = json.loads(request.body)["model"]
        read_s = request.req_kwargs["timeout"][1]
        self.read_timeouts.append((model, read_s))
        if model in self.silent:
            self.clock.advance(read_s)
            return requests.ReadTimeout("read timed out")
        return 200, {"Content-Type": "application/json"}, json.dumps(_answer(model))


def test_a_silent_primary_leaves_the_fallback_room_before_the_deadline(rsps, make_client, clock):
    gw = SilentUntilTimeout(rsps, clock, {"m"})
    client = _client(make_client, clock, max_retries=2, read_timeout_s=30, deadline_s=20, fallbacks={"m": ["f"]})
    started = clock()
    resp = client.chat_completion(MSGS, model="m")
    assert (resp.model, resp.fallback) == ("f", True)
    # the read timeout (30 s) exceeds the deadline (20 s): the primary's attempt keeps
    # min(20 / 2, the fallback's own 30 s) in reserve, so it may wait 10 s only
    assert gw.read_timeouts == [("m", pytest.approx(10.0)), ("f", pytest.approx(10.0))]
    assert clock() - started == pytest.approx(10.0)


def test_the_last_model_of_the_chain_may_use_the_whole_deadline(rsps, make_client, clock):
    gw = SilentUntilTimeout(rsps, clock, {"m"})
    client = _client(make_client, clock, max_retries=2, read_timeout_s=30, deadline_s=20)
    with pytest.raises(AllAttemptsFailedError):
        client.chat_completion(MSGS, model="m")
    assert gw.read_timeouts == [("m", pytest.approx(20.0))]


def test_no_room_is_kept_for_a_fallback_whose_breaker_is_open(rsps, make_client, clock):
    gw = SilentUntilTimeout(rsps, clock, {"m"})
    client = _client(make_client, clock, max_retries=0, read_timeout_s=30, deadline_s=20, fallbacks={"m": ["f"]},
                     model_breakers={"f": {"fail_max": 1, "reset_timeout_s": 60}})
    client._parts.breakers.admit("model", "f").record(AllAttemptsFailedError(
        "all 1 attempts failed", [Attempt("a", 5.0, 503, "InternalServerError: down", "status_5xx")]))
    assert [b["state"] for b in client.breakers() if b["name"] == "model:f"] == ["open"]
    with pytest.raises(AllAttemptsFailedError):  # m went silent; f's breaker is open
        client.chat_completion(MSGS, model="m")
    assert gw.read_timeouts == [("m", pytest.approx(20.0))]


def test_a_stream_s_first_token_wait_leaves_the_fallback_room(rsps, make_client, clock, monkeypatch):
    from holysheep_lb.transport import Transport
    from tests.test_rescue import finish, usage_chunk
    from tests.test_streaming import delta, sse

    sent = []

    def callback(request):
        model = json.loads(request.body)["model"]
        sent.append((model, clock()))
        body = sse(delta(f"from {model}"), finish(model=model), usage_chunk(model=model))
        return 200, {"Content-Type": "text/event-stream"}, body

    rsps.add_callback(responses.POST, A + "/chat/completions", callback=callback)
    real = Transport.iter_bytes

    def iter_bytes(self, response):
        if json.loads(response.request.body)["model"] != "slow":
            return real(self, response)

        def slow():  # keep-alives only: the first token never comes
            for _ in range(20):
                clock.advance(1.0)
                yield b": keepalive\n\n"
        return slow()

    monkeypatch.setattr(Transport, "iter_bytes", iter_bytes)
    client = _client(make_client, clock, max_retries=2, deadline_s=20, first_token_timeout_s=30,
                     fallbacks={"slow": ["fast"]})
    started = clock()
    stream_ = client.chat_completion(MSGS, model="slow", stream=True)
    assert stream_.read_text() == "from fast"
    # the first-token limit (30 s) exceeds the deadline: the primary waits 10 s, not 20
    assert [m for m, _ in sent] == ["slow", "fast"] and sent[1][1] - started == pytest.approx(11.0, abs=1.01)


@pytest.mark.parametrize("remaining_s, fallback_wait_s, limit_s", [
    (20.0, 30.0, 10.0),    # half of what remains
    (20.0, 4.0, 16.0),     # the fallback's own wait, when shorter
    (20.0, None, 20.0),    # the last model: everything
    (-1.0, 30.0, -1.0),    # past the deadline: nothing
])
def test_the_policy_keeps_room_for_the_next_model(clock, remaining_s, fallback_wait_s, limit_s):
    ctx = type("Ctx", (), {"deadline": clock() + remaining_s, "now": clock})()
    assert RetryPolicy().attempt_limit_s(ctx, fallback_wait_s) == pytest.approx(limit_s)


# ------------------------------------------------------------------------ 429 everywhere


def test_429_without_retry_after_on_every_route_falls_back(rsps, make_client, clock):
    gw = Gateway(rsps, {"m": 429})
    client = _client(make_client, clock, nodes=2, max_retries=2, fallbacks={"m": ["f"]})
    resp = client.chat_completion(MSGS, model="m")
    assert sorted(gw.sent[:2]) == [(A, "m"), (B, "m")] and gw.models[2:] == ["f"]
    assert resp.model == "f" and resp.fallback


def test_429_without_a_fallback_is_still_a_clean_typed_error(rsps, make_client, clock):
    Gateway(rsps, {"m": 429})
    client = _client(make_client, clock, max_retries=2)
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="m")
    assert "throttled" in info.value.reason
    assert client.breakers()[0]["state"] == "closed"  # throttling never trips the breaker


# ------------------------------------------------------------------------ error taxonomy


@pytest.mark.parametrize("body", CONTEXT_BODIES)
def test_context_window_errors_of_common_servers_are_recognised(body):
    exc = status_error(400, body, node_id="a", request_id=None, headers={})
    assert isinstance(exc, ContextWindowExceededError) and isinstance(exc, BadRequestError)
    out = classify(exc)
    assert (out.kind, out.retryable, out.breaker) == ("context_window", False, "success")
    assert out.reroute == "context_window"


@pytest.mark.parametrize("body", FILTER_BODIES)
def test_content_filter_errors_are_recognised(body):
    exc = status_error(400, body, node_id="a", request_id=None, headers={})
    assert isinstance(exc, ContentFilterError) and isinstance(exc, BadRequestError)
    assert classify(exc).kind == "content_filter"


@pytest.mark.parametrize("body", [
    {"error": {"message": "max_tokens is too large: 100000. This model supports at most 4096 completion tokens",
               "type": "invalid_request_error", "param": "max_tokens"}},
    {"error": {"message": "temperature must be at most 2"}},
])
def test_other_400s_stay_plain_bad_requests(body):
    assert type(status_error(400, body, node_id="a", request_id=None, headers={})) is BadRequestError


def test_an_error_event_in_a_200_stream_is_recognised_too():
    from holysheep_lb.sse import SSEEvent, decode_event
    with pytest.raises(ContextWindowExceededError):
        decode_event(SSEEvent("message", json.dumps({"error": CONTEXT_BODIES[0]["error"]})), "a")


def test_a_context_window_error_is_not_retried_nor_sent_to_plain_fallbacks(rsps, make_client, clock):
    gw = Gateway(rsps, {"small": (400, CONTEXT_BODIES[0])})
    client = _client(make_client, clock, nodes=2, max_retries=3, fallbacks={"small": ["other"]})
    with pytest.raises(ContextWindowExceededError):
        client.chat_completion(MSGS, model="small")
    assert gw.models == ["small"]


def test_context_window_fallbacks_route_to_a_larger_model(rsps, make_client, clock):
    gw = Gateway(rsps, {"small": (400, CONTEXT_BODIES[1])})
    client = _client(make_client, clock, max_retries=3, fallbacks={"small": ["other"]},
                     context_window_fallbacks={"small": ["large-128k"]})
    resp = client.chat_completion(MSGS, model="small")
    assert gw.models == ["small", "large-128k"]  # never "other": it is no larger
    assert (resp.model, resp.fallback) == ("large-128k", True)
    assert client.breakers()[0]["state"] == "closed"


def test_a_content_filter_refusal_is_final_unless_content_policy_fallbacks_say_so(rsps, make_client, clock):
    gw = Gateway(rsps, {"m": (400, FILTER_BODIES[1])})
    client = _client(make_client, clock, max_retries=2, fallbacks={"m": ["f"]})
    with pytest.raises(ContentFilterError):
        client.chat_completion(MSGS, model="m")
    assert gw.models == ["m"]
    routed = _client(make_client, clock, max_retries=2, fallbacks={"m": ["f"]},
                     content_policy_fallbacks={"m": ["lenient"]})
    assert routed.chat_completion(MSGS, model="m").model == "lenient"
    assert gw.models == ["m", "m", "lenient"]


@pytest.mark.parametrize("option", ["context_window_fallbacks", "content_policy_fallbacks"])
@pytest.mark.parametrize("value, field", [({"m": "big"}, "[m]"), ({"m": ["m"]}, "[m]"), (["m"], "")])
def test_the_special_fallbacks_are_validated(make_client, option, value, field):
    with pytest.raises(ConfigError) as info:
        make_client([{"id": "a", "base_url": A}], **{option: value})
    assert info.value.field == option + field


def test_a_200_answer_cut_by_the_content_filter_is_visible(rsps, make_client, clock):
    rsps.add(responses.POST, A + "/chat/completions", json=_answer("m", finish_reason="content_filter"))
    resp = _client(make_client, clock).chat_completion(MSGS, model="m")
    assert resp.content_filtered and resp.finish_reason == "content_filter"
    rsps.replace(responses.POST, A + "/chat/completions", json=_answer("m"))
    resp = _client(make_client, clock).chat_completion(MSGS, model="m")
    assert not resp.content_filtered and resp.finish_reason == "stop"


# ------------------------------------------------------------------------ breaker recovery


def test_a_half_open_trial_is_exactly_one_attempt(rsps, make_client, clock):
    gw = Gateway(rsps, {"m": 503})
    client = _client(make_client, clock, max_retries=2, fallbacks={"m": ["f"]},
                     model_breakers={"m": {"fail_max": 1, "reset_timeout_s": 30}})
    assert client.chat_completion(MSGS, model="m").model == "f"
    assert gw.models == ["m", "m", "m", "f"]  # closed: the model's retries, then the fallback
    clock.advance(31)
    assert client.chat_completion(MSGS, model="m").model == "f"
    assert gw.models[4:] == ["m", "f"]  # half-open: one trial attempt, then the fallback


def test_a_failed_trial_reopens_for_the_trial_interval_only(rsps, make_client, clock):
    Gateway(rsps, {"m": 503})
    client = _client(make_client, clock, max_retries=0,
                     model_breakers={"m": {"fail_max": 1, "reset_timeout_s": 30, "trial_interval_s": 5}})
    for _ in range(2):
        with pytest.raises(AllAttemptsFailedError):
            client.chat_completion(MSGS, model="m")
        with pytest.raises(CircuitOpenError):
            client.chat_completion(MSGS, model="m")
        clock.advance(31)
    with pytest.raises(AllAttemptsFailedError):  # a trial, and it fails
        client.chat_completion(MSGS, model="m")
    snap = client.breakers()[0]  # open again, for 5 s (not reset_timeout_s)
    assert snap["state"] == "open" and snap["retry_after_s"] == pytest.approx(5.0, abs=0.01)
    clock.advance(5.1)
    with pytest.raises(AllAttemptsFailedError):  # the next trial already
        client.chat_completion(MSGS, model="m")


def test_trial_interval_is_validated(make_client):
    with pytest.raises(ConfigError) as info:
        make_client([{"id": "a", "base_url": A}], breaker={"trial_interval_s": 0})
    assert info.value.field == "breaker.trial_interval_s"


@pytest.mark.parametrize("every_s", [1.0, 4.0, 7.0])
def test_a_recovered_model_gets_traffic_back_within_30_s(rsps, make_client, clock, every_s):
    # S15 on a fake clock: the primary is down for 60 s, one call every ``every_s``
    start = clock()
    gw = Gateway(rsps, {})
    gw.plan = _Plan(lambda model: 503 if model == "m" and clock() - start < 60.0 else 200)
    client = _client(make_client, clock, max_retries=2, fallbacks={"m": ["f"]})
    served = []
    sent_in_outage = 0
    for i in range(int(100 / every_s)):
        clock.advance(every_s if i else 0.0)
        if clock() - start < 60.0:
            sent_in_outage = len(gw.sent)
        served.append((clock() - start, client.chat_completion(MSGS, model="m").model))
    back = [t for t, model in served if model == "m" and t >= 60.0]
    assert back and back[0] - 60.0 <= 30.0, served
    assert all(model == "m" for t, model in served if t >= back[0])
    assert all(model == "f" for t, model in served if t < 60.0)
    # five failed calls of three attempts trip the breaker (fail_max 5); after that each
    # half-open trial is a single attempt, one per trial interval (10 s) at most
    assert gw.models[:20] == ["m", "m", "m", "f"] * 5
    trials = gw.models[20:sent_in_outage].count("m")
    assert trials <= (60.0 - 5 * every_s) / 10.0 + 1, gw.models


@pytest.mark.parametrize("every_s", [1.0, 4.0, 7.0, 13.0, 20.0, 29.0])
def test_a_model_that_recovers_as_its_breaker_opens_gets_traffic_back_within_30_s(
        rsps, make_client, clock, every_s):
    # the worst case: the model recovers right after its breaker opens (default settings),
    # so the whole first open is wasted; one call every ``every_s``
    recovered_at = []
    gw = Gateway(rsps, {})
    gw.plan = _Plan(lambda model: 503 if model == "m" and not recovered_at else 200)
    client = _client(make_client, clock, max_retries=2, fallbacks={"m": ["f"]})
    served = []
    for i in range(40):
        clock.advance(every_s if i else 0.0)
        served.append((clock(), client.chat_completion(MSGS, model="m").model))
        if not recovered_at and [b["state"] for b in client.breakers() if b["name"] == "model:m"] == ["open"]:
            recovered_at.append(clock())
    assert recovered_at
    back = [t for t, model in served if model == "m" and t > recovered_at[0]]
    assert back and back[0] - recovered_at[0] <= 30.0, served
    # the first open lasts one trial interval (10 s), not reset_timeout_s (30 s)
    assert back[0] - recovered_at[0] == pytest.approx(max(every_s, 10.0 + (-10.0) % every_s))


def test_the_breaker_logs_how_long_each_open_lasts(rsps, make_client, clock, caplog):
    Gateway(rsps, {"m": 503})
    client = _client(make_client, clock, max_retries=0,
                     model_breakers={"m": {"fail_max": 1, "reset_timeout_s": 30, "trial_interval_s": 5}})
    with caplog.at_level("WARNING", logger="holysheep_lb.breakers"):
        for _ in range(2):
            with pytest.raises(AllAttemptsFailedError):  # it opens, then its trial fails
                client.chat_completion(MSGS, model="m")
            clock.advance(5.1)
    lines = [r.getMessage() for r in caplog.records if "opened" in r.getMessage()]
    assert lines == ["circuit breaker model:m opened (was closed) for 5.0 s",
                     "circuit breaker model:m opened (was half-open) for 5.0 s"]


class _Plan(dict):
    """A plan computed per request."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def get(self, key, default=None):
        return self.fn(key) if isinstance(key, str) else default


# ------------------------------------------------------------------------ accounting


def test_failed_attempts_are_not_billed_and_the_answer_is_billed_as_its_model(rsps, make_client, clock):
    Gateway(rsps, {"m": 503})
    prices = PriceTable({"m": {"input": 1000, "output": 1000},
                         "f": {"input": 1, "output": 1}})
    client = _client(make_client, clock, max_retries=2, fallbacks={"m": ["f"]}, prices=prices)
    resp = client.chat_completion(MSGS, model="m")
    assert (resp.model, resp["usage"]) == ("f", USAGE)
    by_model = client.cost_report()["by_model"]
    assert by_model["f"]["requests"] == 1 and by_model["f"]["cost_usd"] > 0
    assert by_model.get("m", {}).get("cost_usd", 0) == 0  # three failed attempts, nothing billed
    assert client.cost_report()["in_flight_reserved_usd"] == 0


def test_the_policy_sends_a_refusal_only_through_its_own_chain():
    policy = RetryPolicy()
    ctx_refused = classify(status_error(400, CONTEXT_BODIES[0], node_id="a", request_id=None, headers={}))
    decision = policy.decide(ctx_refused, None, scope="model")
    assert (decision.action, decision.via) == (NEXT_MODEL, "context_window")
    plain = classify(status_error(400, {"error": {"message": "bad"}}, node_id="a", request_id=None, headers={}))
    assert policy.decide(plain, None, scope="model").action == STOP
