"""The response cache: hits, TTL, size bound, errors, concurrent identical calls, client wiring."""

from __future__ import annotations

import json
import threading
import time

import pytest
import responses

from holysheep_lb import AuthenticationError, BadRequestError, ConfigError, InvalidRequestError, ResponseCache
from holysheep_lb.cache import cache_key, credentials_fingerprint
from holysheep_lb.config import Node

from .conftest import FakeClock, chat_body

MSGS = [{"role": "user", "content": "hello"}]


class Calls:
    """A stand-in for the API call: counts calls, returns a fresh answer each time."""

    def __init__(self, fail=0, gate=None):
        self.count = 0
        self.fail = fail
        self.gate = gate
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.count += 1
            n = self.count
        if self.gate is not None:
            assert self.gate.wait(10)
        if n <= self.fail:
            raise BadRequestError("boom", status_code=400)
        return {"answer": n}, True


def test_key_is_canonical_json_of_model_messages_and_params():
    assert cache_key("m", MSGS, {"temperature": 0, "max_tokens": 5}) == \
        cache_key("m", [{"content": "hello", "role": "user"}], {"max_tokens": 5, "temperature": 0})
    base = cache_key("m", MSGS, {"temperature": 0})
    assert base != cache_key("n", MSGS, {"temperature": 0})
    assert base != cache_key("m", MSGS, {"temperature": 0, "max_tokens": 5})
    assert base != cache_key("m", [{"role": "user", "content": "hello!"}], {"temperature": 0})
    assert len(base) == 64


@pytest.mark.parametrize("params, cache, wanted", [
    ({"temperature": 0}, None, True),
    ({"temperature": 0.0}, None, True),
    ({"temperature": 0.7}, None, False),
    ({}, None, False),
    ({"temperature": 0.7}, True, True),
    ({"temperature": 0}, False, False),
])
def test_only_deterministic_calls_are_cached_by_default(params, cache, wanted):
    assert ResponseCache.wanted(params, cache) is wanted


def test_hit_and_miss():
    cache, call = ResponseCache(), Calls()
    assert cache.get_or_call("k", call, wait_s=1) == ({"answer": 1}, False)
    assert cache.get_or_call("k", call, wait_s=1) == ({"answer": 1}, True)
    assert cache.get_or_call("other", call, wait_s=1) == ({"answer": 2}, False)
    assert call.count == 2
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["stores"], stats["size"]) == (1, 2, 2, 2)


def test_values_are_copied_in_and_out():
    cache, call = ResponseCache(), Calls()
    first, _ = cache.get_or_call("k", call, wait_s=1)
    first["answer"] = "edited by caller"
    second, hit = cache.get_or_call("k", call, wait_s=1)
    second["answer"] = "edited again"
    assert hit and cache.get_or_call("k", call, wait_s=1)[0] == {"answer": 1}


def test_ttl_expiry_on_a_fake_timer():
    clock = FakeClock()
    cache, call = ResponseCache(ttl_s=60, timer=clock), Calls()
    cache.get_or_call("k", call, wait_s=1)
    clock.advance(59.9)
    assert cache.get_or_call("k", call, wait_s=1)[1] is True
    clock.advance(0.1)
    assert cache.get_or_call("k", call, wait_s=1) == ({"answer": 2}, False)
    assert call.count == 2


def test_size_bound_evicts_least_recently_used():
    cache, call = ResponseCache(maxsize=3), Calls()
    for key in "abc":
        cache.get_or_call(key, call, wait_s=1)
    cache.get_or_call("a", call, wait_s=1)  # a is now the most recently used
    cache.get_or_call("d", call, wait_s=1)
    assert cache.stats()["size"] == 3
    assert cache.get_or_call("a", call, wait_s=1)[1] is True
    assert cache.get_or_call("b", call, wait_s=1)[1] is False  # evicted


def test_errors_and_unstorable_values_are_not_cached():
    cache, call = ResponseCache(), Calls(fail=1)
    with pytest.raises(BadRequestError):
        cache.get_or_call("k", call, wait_s=1)
    assert cache.get_or_call("k", call, wait_s=1) == ({"answer": 2}, False)
    assert cache.get_or_call("x", lambda: ({"no": 1}, False), wait_s=1) == ({"no": 1}, False)
    assert cache.get_or_call("x", lambda: ({"no": 2}, False), wait_s=1) == ({"no": 2}, False)


class Uncopyable(dict):
    """An answer that cannot be deep-copied (as a JSON answer nested too deep to copy)."""

    def __deepcopy__(self, memo):
        raise RecursionError("maximum recursion depth exceeded")


class CopiesOnce(dict):
    """An answer whose stored copy can no longer be copied."""

    def __deepcopy__(self, memo):
        return Uncopyable(self)


def _nested(depth):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("answer", [Uncopyable(answer=1), {"deep": _nested(5000)}])  # too deep to copy
def test_an_answer_that_cannot_be_copied_is_returned_uncached_and_frees_its_key(answer):
    cache = ResponseCache()
    calls = []

    def call():
        calls.append(1)
        return answer, True

    value, hit = cache.get_or_call("k", call, wait_s=1)
    assert value is answer and hit is False
    assert cache._pending == {}
    value, hit = cache.get_or_call("k", call, wait_s=0.01)  # no wait for a stuck key
    assert value is answer and hit is False
    assert len(calls) == 2
    stats = cache.stats()
    assert (stats["stores"], stats["size"], stats["waits"]) == (0, 0, 0)


def test_a_stored_answer_that_cannot_be_copied_out_is_dropped_and_called_again():
    cache, answers = ResponseCache(), iter([CopiesOnce(answer=1), {"answer": 2}])
    assert cache.get_or_call("k", lambda: (next(answers), True), wait_s=1) == ({"answer": 1}, False)
    assert cache.get_or_call("k", lambda: (next(answers), True), wait_s=1) == ({"answer": 2}, False)
    assert cache.get_or_call("k", lambda: (next(answers), True), wait_s=1) == ({"answer": 2}, True)
    assert cache._pending == {}


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        if predicate():
            return True
        pause.wait(0.002)
    return predicate()


def _run_identical(cache, call, n):
    results, errors = [], []
    lock = threading.Lock()

    def worker():
        try:
            value = cache.get_or_call("same", call, wait_s=10)
            with lock:
                results.append(value)
        except BadRequestError as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def test_concurrent_identical_calls_make_one_api_call():
    gate = threading.Event()
    cache, call = ResponseCache(), Calls(gate=gate)
    threads, results, errors = _run_identical(cache, call, 16)
    assert wait_for(lambda: call.count == 1 and cache.stats()["waits"] == 15)
    gate.set()
    for t in threads:
        t.join(10)
    assert call.count == 1 and not errors
    assert sorted(hit for _, hit in results) == [False] + [True] * 15
    assert all(value == {"answer": 1} for value, _ in results)
    assert cache.stats()["hits"] == 15


def test_when_the_first_identical_call_fails_every_waiter_calls_at_once():
    gate = threading.Event()
    cache, call = ResponseCache(), Calls(fail=1, gate=gate)
    threads, results, errors = _run_identical(cache, call, 8)
    assert wait_for(lambda: cache.stats()["waits"] == 7)
    gate.set()
    for t in threads:
        t.join(10)
    assert call.count == 8  # the failure was not shared, and not cached; no second round of waiting
    assert len(errors) == 1 and len(results) == 7
    assert sorted(value["answer"] for value, _ in results) == [2, 3, 4, 5, 6, 7, 8]
    assert not any(hit for _, hit in results)
    assert cache.stats()["waits"] == 7 and cache.stats()["stores"] == 7 and cache._pending == {}


def test_an_answer_not_stored_wakes_every_waiter_to_call_in_parallel():
    """A downgraded or fallback answer is not kept: the waiters must not queue one behind another."""
    first_done, others = threading.Event(), threading.Event()
    in_flight, lock = [], threading.Lock()

    def call():
        with lock:
            in_flight.append(1)
            n = len(in_flight)
        assert (first_done if n == 1 else others).wait(10)
        return {"answer": n}, False  # e.g. downgraded: must not be stored

    cache = ResponseCache()
    threads, results, errors = _run_identical(cache, call, 8)
    assert wait_for(lambda: cache.stats()["waits"] == 7 and len(in_flight) == 1)
    first_done.set()
    # all 7 waiters are inside call() together, although none of them has returned yet
    assert wait_for(lambda: len(in_flight) == 8)
    others.set()
    for t in threads:
        t.join(10)
    assert not errors and sorted(value["answer"] for value, _ in results) == list(range(1, 9))
    stats = cache.stats()
    assert (stats["misses"], stats["waits"], stats["stores"], stats["size"]) == (1, 7, 0, 0)
    assert cache._pending == {}


def test_waiter_gives_up_at_its_deadline():
    from holysheep_lb import AllAttemptsFailedError

    gate = threading.Event()
    cache, call = ResponseCache(), Calls(gate=gate)
    leader = threading.Thread(target=cache.get_or_call, args=("k", call), kwargs={"wait_s": 10})
    leader.start()
    assert wait_for(lambda: call.count == 1)
    with pytest.raises(AllAttemptsFailedError, match="identical call in flight"):
        cache.get_or_call("k", call, wait_s=0.01)
    gate.set()
    leader.join(10)


@pytest.mark.parametrize("option, field", [
    ({"maxsize": 0}, "cache.maxsize"),
    ({"ttl_s": -1}, "cache.ttl_s"),
    ({"size": 5}, "cache"),
    ("yes", "cache"),
])
def test_bad_cache_options(option, field, make_client):
    with pytest.raises(ConfigError) as info:
        make_client(cache=option)
    assert info.value.field == field


# -- through the Client ---------------------------------------------------------------------

A = "https://a.example/v1"
OK = chat_body("gpt-4.1", 6, 1)


def test_client_cache_hit_is_marked_free_and_counted(rsps, make_client, clock):
    rsps.post(A + "/chat/completions", json=OK)
    client = make_client([{"id": "a", "base_url": A}], clock=clock, sleep=clock.sleep,
                         cache={"maxsize": 10, "ttl_s": 30})
    first = client.chat_completion(MSGS, model="gpt-4.1", temperature=0)
    second = client.chat_completion(MSGS, model="gpt-4.1", temperature=0)
    assert len(rsps.calls) == 1
    assert (first.cached, second.cached) == (False, True)
    assert dict(second) == dict(first) == OK
    assert second.attempts == () and second.extra["cost"]["cost_usd"] == 0.0
    assert first.extra["cost"]["cost_usd"] == 0.00002  # 6*2 + 1*8 micro-USD
    report = client.cost_report()
    assert report["totals"]["requests"] == 1 and report["totals"]["cached_requests"] == 1
    assert report["totals"]["cost_usd"] == 0.00002
    assert client.stats()["cache"]["hits"] == 1
    client.chat_completion(MSGS, model="gpt-4.1", temperature=0.5)  # not deterministic: not cached
    client.chat_completion(MSGS, model="gpt-4.1", temperature=0, cache=False)
    client.chat_completion(MSGS, model="gpt-4.1", temperature=0.5, cache=True)
    client.chat_completion(MSGS, model="gpt-4.1", temperature=0.5, cache=True)
    assert len(rsps.calls) == 4
    clock.advance(30)  # expired on the client's clock
    assert client.chat_completion(MSGS, model="gpt-4.1", temperature=0).cached is False
    assert "cache" not in json.loads(rsps.calls[-1].request.body)


def test_client_does_not_cache_errors(rsps, make_client):
    rsps.post(A + "/chat/completions", status=400, json={"error": {"message": "bad"}})
    client = make_client([{"id": "a", "base_url": A}], cache=True)
    with pytest.raises(BadRequestError):
        client.chat_completion(MSGS, model="gpt-4.1", temperature=0)
    rsps.replace(responses.POST, A + "/chat/completions", json=OK)
    assert client.chat_completion(MSGS, model="gpt-4.1", temperature=0).cached is False
    assert client.chat_completion(MSGS, model="gpt-4.1", temperature=0).cached is True
    assert client.stats()["cache"]["stores"] == 1


def test_auto_calls_share_the_cache_of_the_routed_model(rsps, make_client):
    rsps.post(A + "/chat/completions", json=OK)
    client = make_client([{"id": "a", "base_url": A}], cache=True)
    client.chat_completion(MSGS, model="deepseek-v3.2", temperature=0)
    resp = client.chat_completion(MSGS, model="auto", temperature=0)
    assert resp.cached and resp.extra["routing"].model == "deepseek-v3.2"
    assert len(rsps.calls) == 1


def test_cache_option_must_be_a_bool(make_client):
    client = make_client([{"id": "a", "base_url": A}], cache=True)
    with pytest.raises(InvalidRequestError):
        client.chat_completion(MSGS, model="gpt-4.1", cache="yes")


# -- what the key covers ----------------------------------------------------------------------

US = "https://us.example/v1"
EU = "https://eu.example/v1"
REGIONAL = [{"id": "us", "base_url": US, "region": "us"}, {"id": "eu", "base_url": EU, "region": "eu"}]


def test_a_call_for_another_region_is_not_answered_from_the_first_regions_cache(rsps, make_client):
    rsps.post(US + "/chat/completions", json=chat_body("gpt-4.1"))
    rsps.post(EU + "/chat/completions", json=chat_body("gpt-4.1"))
    client = make_client(REGIONAL, strategy="geographic", cache=True)
    assert client.chat_completion(MSGS, model="gpt-4.1", temperature=0, region="us").node_id == "us"
    eu = client.chat_completion(MSGS, model="gpt-4.1", temperature=0, region="eu")
    assert (eu.cached, eu.node_id) == (False, "eu")
    again = client.chat_completion(MSGS, model="gpt-4.1", temperature=0, region="eu")
    assert again.cached and [c.request.url.split("/")[2] for c in rsps.calls] == ["us.example", "eu.example"]


def test_a_shared_cache_serves_only_clients_with_the_same_key_and_nodes(rsps, make_client):
    def answer(request):
        if request.headers["Authorization"] != "Bearer sk-good-key-000000":
            return 401, {}, json.dumps({"error": {"message": "invalid api key"}})
        return 200, {}, json.dumps(chat_body("gpt-4.1"))

    rsps.add_callback(responses.POST, A + "/chat/completions", callback=answer)
    rsps.add_callback(responses.POST, US + "/chat/completions", callback=answer)
    shared = ResponseCache()
    nodes = [{"id": "a", "base_url": A}]
    good = make_client(nodes, api_key="sk-good-key-000000", cache=shared)
    assert good.chat_completion(MSGS, model="gpt-4.1", temperature=0).cached is False
    twin = make_client(nodes, api_key="sk-good-key-000000", cache=shared)
    assert twin.chat_completion(MSGS, model="gpt-4.1", temperature=0).cached is True  # same key, same nodes
    refused = make_client(nodes, api_key="sk-revoked-key-111111", cache=shared)
    with pytest.raises(AuthenticationError):
        refused.chat_completion(MSGS, model="gpt-4.1", temperature=0)
    per_node = make_client([{"id": "a", "base_url": A, "api_key": "sk-revoked-key-111111"}],
                           api_key="sk-good-key-000000", cache=shared)
    with pytest.raises(AuthenticationError):
        per_node.chat_completion(MSGS, model="gpt-4.1", temperature=0)
    elsewhere = make_client([{"id": "a", "base_url": US}], api_key="sk-good-key-000000", cache=shared)
    assert elsewhere.chat_completion(MSGS, model="gpt-4.1", temperature=0).cached is False
    assert len(rsps.calls) == 4


def test_the_key_holds_a_fingerprint_of_the_credentials_never_the_key():
    fingerprint = credentials_fingerprint([Node(id="a", base_url=A)], "sk-secret-abc-123456")
    assert "sk-secret" not in fingerprint and len(fingerprint) == 64
    assert fingerprint == credentials_fingerprint([Node(id="a", base_url=A)], "sk-secret-abc-123456")
    assert fingerprint != credentials_fingerprint([Node(id="a", base_url=A)], "sk-secret-abc-123457")
    assert fingerprint != credentials_fingerprint([Node(id="a", base_url=A, headers={"X-Tenant": "t2"})],
                                                  "sk-secret-abc-123456")
    base = cache_key("m", MSGS, {}, scope=fingerprint)
    assert base != cache_key("m", MSGS, {}, scope=fingerprint, region="eu")
    assert base != cache_key("m", MSGS, {}, scope="other")


@pytest.mark.parametrize("cache", [True, None])
@pytest.mark.parametrize("call, field", [
    ({"messages": [{"role": "user", "content": "caf\udce9"}]}, "messages[0].content"),
    ({"messages": [MSGS[0], {"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
     "messages[1].content[0].text"),
    ({"messages": MSGS, "user": "\udfff"}, "user"),
    ({"messages": MSGS, "stop": ["ok", "\ud800"]}, "stop[1]"),
    ({"messages": MSGS, "model": "gpt\ud800"}, "model"),
])
def test_a_lone_surrogate_is_a_clear_invalid_request_error_with_or_without_the_cache(
        rsps, make_client, call, field, cache):
    client = make_client([{"id": "a", "base_url": A}], cache=cache)
    call = {"model": "gpt-4.1", **call}
    with pytest.raises(InvalidRequestError, match="surrogate") as info:
        client.chat_completion(temperature=0, **call)
    assert info.value.field == field
    with pytest.raises(InvalidRequestError):
        cache_key(call["model"], call["messages"], {k: v for k, v in call.items() if k not in ("model", "messages")})
    assert len(rsps.calls) == 0
