"""Client behaviour against mocked HTTP (responses): retries, failover, errors, metadata."""

import json

import pytest
import responses

from holysheep_lb import (
    AllAttemptsFailedError,
    APIStatusError,
    BadRequestError,
    InternalServerError,
    InvalidRequestError,
    ResponseTooLargeError,
)
from holysheep_lb.transport import USER_AGENT

from .conftest import API_KEY

A = "https://a.example/v1"
B = "https://b.example/v1"
C = "https://c.example/v1"
NODES = [{"id": "a", "base_url": A, "region": "us"},
         {"id": "b", "base_url": B, "region": "eu"},
         {"id": "c", "base_url": C, "region": "ap"}]
MSGS = [{"role": "user", "content": "hello"}]
OK = {"id": "x", "object": "chat.completion", "model": "gpt-4.1",
      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
      "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def _client(make_client, clock, **kw):
    kw.setdefault("strategy", "round_robin")
    return make_client(NODES, clock=clock, sleep=clock.sleep, rand=lambda: 0.5, **kw)


def test_success_returns_dict_with_routing_metadata(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=OK, headers={"x-request-id": "req_1"})
    client = _client(make_client, clock)
    resp = client.chat_completion(MSGS, model="gpt-4.1", temperature=0)
    assert resp["choices"][0]["message"]["content"] == "hi"
    assert isinstance(resp, dict) and dict(resp) == OK
    assert (resp.node_id, resp.region, resp.request_id, resp.model) == ("a", "us", "req_1", "gpt-4.1")
    assert len(resp.attempts) == 1 and resp.attempts[0].ok
    sent = rsps.calls[0].request
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["User-Agent"] == USER_AGENT
    assert len(sent.headers["Idempotency-Key"]) == 32
    assert json.loads(sent.body) == {"model": "gpt-4.1", "messages": MSGS, "temperature": 0}


def test_openai_style_alias(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=OK)
    client = _client(make_client, clock)
    resp = client.chat.completions.create(model="gpt-4.1", messages=MSGS)
    assert resp.text == "hi"


def test_500_fails_over_to_another_node_and_records_attempts(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=500, json={"error": {"message": "boom"}})
    rsps.post(B + "/chat/completions", json=OK)
    client = _client(make_client, clock)
    resp = client.chat_completion(MSGS, model="m")
    assert resp.node_id == "b"
    assert [(a.node_id, a.status_code, a.ok) for a in resp.attempts] == [("a", 500, False), ("b", 200, True)]
    assert "InternalServerError" in resp.attempts[0].error
    keys = {c.request.headers["Idempotency-Key"] for c in rsps.calls}
    assert len(keys) == 1, "the Idempotency-Key must stay the same across attempts"
    stats = client.stats()
    assert stats["nodes"]["a"]["failures"]["status_5xx"] == 1
    assert stats["nodes"]["b"]["retries"] == 1
    assert (stats["calls"], stats["successes"], stats["failures"]) == (1, 1, 0)


@pytest.mark.parametrize("status, cls", [(400, BadRequestError), (401, None), (403, None), (404, None), (422, None)])
def test_final_4xx_raised_at_once_after_one_attempt(rsps, make_client, clock, status, cls):
    for url in (A, B, C):
        rsps.post(url + "/chat/completions", status=status, json={"error": {"message": "nope"}},
                  headers={"x-request-id": "req_9"})
    client = _client(make_client, clock)
    with pytest.raises(APIStatusError) as info:
        client.chat_completion(MSGS, model="m")
    err = info.value
    assert err.status_code == status and not err.retryable
    assert err.request_id == "req_9" and err.node_id == "a"
    assert err.body == {"error": {"message": "nope"}}
    if cls:
        assert isinstance(err, cls)
    assert len(rsps.calls) == 1
    assert len(err.attempts) == 1
    assert client.stats()["failures"] == 1


def test_x_should_retry_false_makes_a_5xx_final(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=503, headers={"x-should-retry": "false"})
    client = _client(make_client, clock)
    with pytest.raises(InternalServerError):
        client.chat_completion(MSGS, model="m")
    assert len(rsps.calls) == 1


def test_429_goes_elsewhere_and_throttles_the_node_until_retry_after(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=429, headers={"Retry-After": "2"})
    rsps.post(B + "/chat/completions", json=OK)
    rsps.post(C + "/chat/completions", json=OK)
    client = _client(make_client, clock)
    assert client.chat_completion(MSGS, model="m").node_id == "b"
    # for the next 2 s node a gets nothing while others are up
    hits = [client.chat_completion(MSGS, model="m").node_id for _ in range(6)]
    assert "a" not in hits
    assert [n for n in client.nodes() if n["id"] == "a"][0]["reason"] == "throttled"
    clock.advance(2.01)
    rsps.replace(responses.POST, A + "/chat/completions", json=OK)
    hits = [client.chat_completion(MSGS, model="m").node_id for _ in range(6)]
    assert "a" in hits
    a_stats = client.stats()["nodes"]["a"]
    assert a_stats["failures"]["status_429"] == 1
    assert [n for n in client.nodes() if n["id"] == "a"][0]["times_ejected"] == 0  # 429 never ejects


@pytest.mark.parametrize("after", ["99999999", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_an_absurd_retry_after_throttles_a_node_only_for_retry_after_cap_s(rsps, make_client, clock, after):
    rsps.post(A + "/chat/completions", status=429, headers={"Retry-After": after})
    client = make_client([NODES[0]], clock=clock, sleep=clock.sleep, max_retries=0, retry_after_cap_s=30)
    with pytest.raises(AllAttemptsFailedError):
        client.chat_completion(MSGS, model="m")
    assert client.nodes()[0]["throttled_for_s"] == pytest.approx(30)
    clock.advance(30)
    rsps.replace(responses.POST, A + "/chat/completions", json=OK)
    assert client.chat_completion(MSGS, model="m").node_id == "a"  # not benched until year 9999


def test_all_nodes_throttled_waits_for_the_soonest_retry_after(rsps, make_client, clock):
    for url, after in ((A, "3"), (B, "1"), (C, "5")):
        rsps.post(url + "/chat/completions", status=429, headers={"Retry-After": after})
    client = _client(make_client, clock, max_retries=3)
    with pytest.raises(AllAttemptsFailedError):
        client.chat_completion(MSGS, model="m")
    # attempt 4 had no untried, unthrottled node: it waited ~1 s for b instead of failing at once
    assert any(s == pytest.approx(1.0, abs=0.3) for s in clock.sleeps)
    assert len(rsps.calls) == 4


def test_all_down_lists_every_attempt(rsps, make_client, clock):
    for url in (A, B, C):
        rsps.post(url + "/chat/completions", status=502)
    client = _client(make_client, clock, max_retries=2)
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="m")
    err = info.value
    assert [a.node_id for a in err.attempts] == ["a", "b", "c"]
    assert all(a.status_code == 502 for a in err.attempts)
    assert isinstance(err.last_error, InternalServerError)
    assert "3 attempt(s)" in str(err)
    assert len(clock.sleeps) == 2  # backoff before each retry


def test_connection_errors_fail_over(rsps, make_client, clock):
    import requests
    rsps.post(A + "/chat/completions", body=requests.ConnectionError("refused"))
    rsps.post(B + "/chat/completions", body=requests.ReadTimeout("slow"))
    rsps.post(C + "/chat/completions", json=OK)
    client = _client(make_client, clock)
    resp = client.chat_completion(MSGS, model="m")
    assert [a.node_id for a in resp.attempts] == ["a", "b", "c"]
    assert "APIConnectionError" in resp.attempts[0].error
    assert "APITimeoutError" in resp.attempts[1].error
    stats = client.stats()["nodes"]
    assert stats["a"]["failures"]["connect"] == 1 and stats["b"]["failures"]["timeout"] == 1


@pytest.mark.parametrize("body, kind", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe\x00garbage", "invalid JSON"),
])
def test_bad_bodies_are_typed_errors_and_fail_over(rsps, make_client, clock, body, kind):
    rsps.post(A + "/chat/completions", body=body, content_type="application/json")
    rsps.post(B + "/chat/completions", json=OK)
    client = _client(make_client, clock)
    resp = client.chat_completion(MSGS, model="m")
    assert resp.node_id == "b"
    assert "APIResponseValidationError" in resp.attempts[0].error and kind in resp.attempts[0].error


def test_response_size_is_capped(rsps, make_client, clock):
    big = b'{"x": "' + b"a" * 5000 + b'"}'
    for url in (A, B, C):
        rsps.post(url + "/chat/completions", body=big, content_type="application/json")
    client = _client(make_client, clock, max_response_bytes=4096, max_retries=0)
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="m")
    assert isinstance(info.value.last_error, ResponseTooLargeError)


def test_redirects_are_not_followed(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", status=307, headers={"Location": "https://evil.example/steal"})
    rsps.post("https://evil.example/steal", json=OK)
    client = _client(make_client, clock, max_retries=0)
    with pytest.raises(APIStatusError) as info:
        client.chat_completion(MSGS, model="m")
    assert info.value.status_code == 307
    assert all("evil" not in c.request.url for c in rsps.calls)


def test_max_retries_bounds_attempts(rsps, make_client, clock):
    for url in (A, B, C):
        rsps.post(url + "/chat/completions", status=500)
    client = _client(make_client, clock, max_retries=1)
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion(MSGS, model="m")
    assert len(info.value.attempts) == 2


def test_deadline_stops_retrying(rsps, make_client, clock):
    for url in (A, B, C):
        rsps.post(url + "/chat/completions", status=500)
    client = _client(make_client, clock, max_retries=5, backoff_base_s=10, backoff_cap_s=10,
                     deadline_s=4)
    with pytest.raises(AllAttemptsFailedError, match="deadline"):
        client.chat_completion(MSGS, model="m")
    assert len(rsps.calls) < 3


@pytest.mark.parametrize("call, field", [
    (lambda c: c.chat_completion([], model="m"), "messages"),
    (lambda c: c.chat_completion("hi", model="m"), "messages"),
    (lambda c: c.chat_completion([{"content": "x"}], model="m"), "messages[0].role"),
    (lambda c: c.chat_completion(MSGS, model=42), "model"),
    (lambda c: c.chat_completion(MSGS), "model"),
    (lambda c: c.chat_completion(MSGS, model="m", max_tokens=-1), "max_tokens"),
    (lambda c: c.chat_completion(MSGS, model="m", temperature=float("nan")), "temperature"),
    (lambda c: c.chat_completion(MSGS, model="m", user=object()), "json"),
    (lambda c: c.chat_completion(MSGS, model="m", deadline_s=-1), "deadline_s"),
    (lambda c: c.embeddings([], model="e"), "input"),
    (lambda c: c.request("POST", "no-slash"), "path"),
    (lambda c: c.request("BREW", "/x"), "method"),
])
def test_bad_call_arguments_never_reach_the_network(rsps, make_client, clock, call, field):
    client = _client(make_client, clock)
    with pytest.raises(InvalidRequestError) as info:
        call(client)
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)
    assert len(rsps.calls) == 0


def test_models_and_embeddings_and_generic_request(rsps, make_client, clock):
    rsps.get(A + "/models", json={"object": "list", "data": [{"id": "gpt-4.1"}]})
    rsps.post(B + "/embeddings", json={"object": "list", "data": [{"embedding": [0.1]}]})
    rsps.post(C + "/custom/thing", json={"ok": True})
    client = _client(make_client, clock)
    assert client.models()["data"][0]["id"] == "gpt-4.1"
    assert "Idempotency-Key" not in rsps.calls[0].request.headers
    assert client.embeddings("text", model="e")["data"][0]["embedding"] == [0.1]
    assert client.request("POST", "/custom/thing", json={"a": 1}) == {"ok": True}


def test_per_node_key_and_headers(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=OK)
    nodes = [{"id": "a", "base_url": A, "api_key": "sk-node-a", "headers": {"X-Team": "search"}}]
    client = make_client(nodes, clock=clock, sleep=clock.sleep)
    client.chat_completion(MSGS, model="m")
    sent = rsps.calls[0].request.headers
    assert sent["Authorization"] == "Bearer sk-node-a" and sent["X-Team"] == "search"


def test_api_key_never_in_repr_logs_or_errors(rsps, make_client, clock, debug_logs):
    rsps.post(A + "/chat/completions", status=401, json={"error": {"message": "bad key"}})
    rsps.post(B + "/chat/completions", status=500)
    rsps.post(C + "/chat/completions", status=500)
    client = _client(make_client, clock)
    texts = [repr(client), repr(client.config), str(client.stats()), str(client.nodes())]
    for _ in range(2):
        try:
            client.chat_completion(MSGS, model="m")
        except Exception as exc:  # noqa: BLE001
            texts += [str(exc), repr(exc), str(getattr(exc, "attempts", ""))]
    texts.append(debug_logs.text)
    assert debug_logs.records, "DEBUG logging must have captured something"
    for text in texts:
        assert API_KEY not in text


def test_close_is_idempotent_and_closed_client_refuses(make_client, clock):
    client = _client(make_client, clock)
    client.close()
    client.close()
    with pytest.raises(Exception, match="closed"):
        client.chat_completion(MSGS, model="m")


def test_interrupted_retry_after_wait_releases_the_node(rsps, make_client, clock):
    for url, after in ((A, "3"), (B, "2"), (C, "5")):
        rsps.post(url + "/chat/completions", status=429, headers={"Retry-After": after})

    def interrupted_sleep(seconds):
        if seconds >= 1:  # the wait for the soonest Retry-After
            raise KeyboardInterrupt
        clock.sleep(seconds)

    client = make_client(NODES, clock=clock, sleep=interrupted_sleep, rand=lambda: 0.5,
                         strategy="round_robin", max_retries=3)
    with pytest.raises(KeyboardInterrupt):
        client.chat_completion(MSGS, model="m")
    assert client.stats()["in_flight"] == 0
    assert all(n.awaiting == 0 for n in client.selector.nodes)


@pytest.mark.parametrize("key", ["caf\u00e9-\u4e2d", "x" * 300, "a\r\nb", 42])
def test_an_unsendable_idempotency_key_is_the_callers_error(rsps, make_client, clock, key):
    client = _client(make_client, clock)
    with pytest.raises(InvalidRequestError, match="idempotency_key"):
        client.chat_completion(MSGS, model="m", idempotency_key=key)
    assert len(rsps.calls) == 0
    assert all(sum(s["failures"].values()) == 0 for s in client.stats()["nodes"].values())


def test_fork_reset_forgets_the_parents_waiting_requests(make_client, clock):
    client = _client(make_client, clock)
    node = client.selector.pick(started=clock())  # a call in flight in the parent
    client._reset_after_fork()                     # what the child runs after fork()
    assert (node.in_flight, node.awaiting, node.awaiting_started_sum) == (0, 0, 0.0)


def test_a_dropped_client_stops_its_health_thread():
    import gc
    import time

    from holysheep_lb import Client

    client = Client(nodes=[{"id": "a", "base_url": "http://127.0.0.1:9/v1"}], health_check_interval_s=30)
    thread = client.health_checker._thread
    assert thread.is_alive()
    del client
    gc.collect()
    deadline = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.05)
    assert not thread.is_alive()


def test_a_local_send_error_is_final_and_not_held_against_the_node(rsps, make_client, clock):
    from holysheep_lb import APIConnectionError
    rsps.post(A + "/chat/completions", body=UnicodeEncodeError("latin-1", "\u4e2d", 0, 1, "cannot encode"))
    client = _client(make_client, clock, eject_after_failures=1)
    with pytest.raises(APIConnectionError, match="could not send the request") as info:
        client.chat_completion(MSGS, model="m")
    assert not info.value.retryable and len(rsps.calls) == 1  # no other node tried
    a = client.stats()["nodes"]["a"]
    assert a["failures"]["local"] == 1 and a["failures"]["connect"] == 0
    assert [n for n in client.nodes() if n["id"] == "a"][0]["usable"]  # not ejected
    assert client.breakers()[0]["failures"] == 0


def test_a_shared_router_follows_each_clients_own_breakers(make_client, clock):
    import gc
    import weakref

    from holysheep_lb import Client, ModelRouter
    router = ModelRouter()  # e.g. one object in settings, used by several clients
    c1 = make_client(NODES, router=router, breaker={"fail_max": 1, "reset_timeout_s": 600})
    c2 = Client(api_key=API_KEY, nodes=NODES, router=router, health_check_interval_s=None)
    c1._breakers.get("model", "deepseek-v3.2")._trip()
    msgs = [{"role": "user", "content": "hi"}]
    assert not c1.breaker_allows("deepseek-v3.2")
    assert c1._router.route(msgs, {}, is_available=c1._model_available).model != "deepseek-v3.2"
    assert c2._router.route(msgs, {}, is_available=c2._model_available).model == "deepseek-v3.2"
    alive = weakref.ref(c2)
    c2.close()
    del c2
    gc.collect()
    assert alive() is None, "the router must not keep a client alive"


def test_a_cache_hit_still_checks_arguments_and_a_closed_client(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=OK)
    client = _client(make_client, clock, cache=True)
    assert client.chat_completion(MSGS, model="m", temperature=0).text == "hi"
    assert client.chat_completion(MSGS, model="m", temperature=0).cached
    for bad in ({"deadline_s": "5"}, {"region": 3}, {"idempotency_key": "k\n"}):
        with pytest.raises(InvalidRequestError):
            client.chat_completion(MSGS, model="m", temperature=0, **bad)
    client.close()
    with pytest.raises(Exception, match="closed"):
        client.chat_completion(MSGS, model="m", temperature=0)


def test_the_retry_budget_counts_calls_not_models_tried(rsps, make_client, clock):
    for url in (A, B, C):
        rsps.post(url + "/chat/completions", status=500)
    client = _client(make_client, clock, max_retries=0, breaker=None,
                     fallbacks={"gpt-4.1": ["gemini-2.5-flash", "deepseek-v3.2"]})
    for _ in range(5):
        with pytest.raises(AllAttemptsFailedError):
            client.chat_completion(MSGS, model="gpt-4.1")
    stats = client.stats()
    assert stats["calls"] == 5 and stats["retry_budget"]["calls"] == 5


@pytest.mark.parametrize("cache", [False, True])
def test_a_deadline_too_short_to_send_anything_says_so(rsps, make_client, cache):
    rsps.post(A + "/chat/completions", json={"choices": []})
    client = make_client([{"id": "a", "base_url": A}], cache=cache)
    with pytest.raises(AllAttemptsFailedError) as info:
        client.chat_completion([{"role": "user", "content": "hi"}], model="m", temperature=0, deadline_s=1e-9)
    message = str(info.value)
    assert message.startswith("deadline exceeded before the request was sent"), message
    assert ("identical call" in message) is cache  # only a cached call may have waited for one
    assert len(rsps.calls) == 0
    stats = client.stats()
    assert stats["calls"] == 1 and stats["failures_by_error"] == {"AllAttemptsFailedError": 1}
