"""Bad settings and bad call arguments: a typed error naming the field, and nothing sent.

Every case runs against a live simulated gateway; afterwards the gateway must have
received no request at all (the client's health checks are off).
"""

from __future__ import annotations

import pytest

from holysheep_lb import Client, ConfigError, InvalidRequestError
from holysheep_lb.simulator import SimulatedGateway

from ..conftest import API_KEY

MSGS = [{"role": "user", "content": "hi"}]
LONE_SURROGATE = "caf\udce9"  # a byte that failed to decode with errors="surrogateescape"


def nested(depth: int, leaf: object = "x") -> object:
    """``[[[...leaf...]]]``, ``depth`` lists deep (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value

REMOTE = {"id": "a", "base_url": "https://a.example/v1"}

def contains_itself() -> dict:
    value: dict = {"a": 1}
    value["self"] = value
    return value


# (Client keyword arguments, field the ConfigError must name)
BAD_SETTINGS = [
    ({"strategy": "fastest"}, "strategy"),
    ({"strategy": 42}, "strategy"),
    ({"nodes": [{**REMOTE, "base_url": "https://a .example/v1"}]}, "node[a].base_url"),
    ({"nodes": [{**REMOTE, "base_url": " https://a.example/v1"}]}, "node[a].base_url"),
    ({"nodes": [{**REMOTE, "base_url": "https://a.example/v1\r\nX-Evil: 1"}]}, "node[a].base_url"),
    ({"nodes": [{**REMOTE, "base_url": "ftp://a.example/v1"}]}, "node[a].base_url"),
    ({"nodes": [{**REMOTE, "base_url": "https:///v1"}]}, "node[a].base_url"),
    ({"nodes": [{**REMOTE, "base_url": "https://a.example:port/v1"}]}, "node[a].base_url"),
    ({"nodes": [{**REMOTE, "base_url": "https://a.example/v1?key=1"}]}, "node[a].base_url"),
    ({"nodes": [{**REMOTE, "base_url": 42}]}, "node[a].base_url"),
    ({"nodes": [{**REMOTE, "headers": {"X-Team": "a\r\nX-Evil: 1"}}]}, "node[a].headers"),
    ({"nodes": [{**REMOTE, "headers": {"X-Team\r\nX-Evil": "1"}}]}, "node[a].headers"),
    ({"nodes": [{**REMOTE, "headers": {"X-Team": "a\nb"}}]}, "node[a].headers"),
    ({"nodes": [{**REMOTE, "headers": {"X-Team": "nul\x00"}}]}, "node[a].headers"),
    ({"nodes": [{**REMOTE, "api_key": "sk-a\r\nX-Evil: 1"}]}, "node[a].api_key"),
    ({"nodes": [{**REMOTE, "api_key": ""}]}, "node[a].api_key"),
    ({"nodes": [{**REMOTE, "weight": float("nan")}]}, "node[a].weight"),
    ({"nodes": [{**REMOTE, "region": ""}]}, "node[a].region"),
    ({"nodes": [{**REMOTE, "id": ""}]}, "node.id"),
    ({"nodes": [{**REMOTE, "id": 7}]}, "node.id"),
    ({"nodes": [REMOTE, REMOTE]}, "nodes"),
    ({"nodes": []}, "nodes"),
    ({"nodes": {"id": "a"}}, "nodes"),
    ({"nodes": [["a", "https://a.example/v1"]]}, "nodes[0]"),
    ({"nodes": [{"base_url": "https://a.example/v1"}]}, "nodes[0].id"),
    ({"api_key": "sk-abc\r\nX-Evil: 1"}, "api_key"),
    ({"api_key": 12345}, "api_key"),
    ({"nodes": [{**REMOTE, "base_url": "http://a.example/v1"}]}, "node[a].base_url"),  # key over plain http
    ({"connect_timeout_s": 0}, "connect_timeout_s"),
    ({"read_timeout_s": float("inf")}, "read_timeout_s"),
    ({"deadline_s": "30"}, "deadline_s"),
    ({"max_retries": 1.5}, "max_retries"),
    ({"max_retries": True}, "max_retries"),
    ({"pool_maxsize": 0}, "pool_maxsize"),
    ({"max_response_bytes": 10}, "max_response_bytes"),
    ({"panic_threshold": 2}, "panic_threshold"),
    ({"verify": 1}, "verify"),
    ({"health_check_interval_s": 0}, "health_check_interval_s"),
    ({"default_model": ""}, "default_model"),
    ({"breaker": {"fail_max": 0}}, "breaker.fail_max"),
    ({"breaker": {"tripwire": 1}}, "breaker"),
    ({"fallbacks": {"gpt-4.1": "gpt-4.1-mini"}}, "fallbacks[gpt-4.1]"),
    ({"fallbacks": {"m": ["m"]}}, "fallbacks[m]"),
    ({"hedge_delay_s": -1}, "hedge_delay_s"),
    ({"model_rate_limits": {"m": {"rpm": 1}}}, "model_rate_limits[m]"),
    ({"cache": "yes"}, "cache"),
    ({"deadline_s": float("inf")}, "deadline_s"),
    ({"deadline_s": 1e10}, "deadline_s"),  # past what a thread can wait for
    ({"deadline_s": 86_401}, "deadline_s"),  # more than 24 h
    ({"read_timeout_s": 1e10}, "read_timeout_s"),
    ({"connect_timeout_s": 1e300}, "connect_timeout_s"),
    ({"stream_first_chunk_timeout_s": 1e10}, "stream_first_chunk_timeout_s"),
    ({"stream_stall_timeout_s": 1e10}, "stream_stall_timeout_s"),
    ({"health_check_timeout_s": 1e10}, "health_check_timeout_s"),
    ({"health_check_interval_s": 1e10}, "health_check_interval_s"),
    ({"backoff_cap_s": 1e10}, "backoff_cap_s"),
    ({"retry_after_cap_s": 1e10}, "retry_after_cap_s"),
    ({"hedge_delay_s": 1e10}, "hedge_delay_s"),
    ({"retries": 3}, "retries"),  # a misspelt option is an error, not silently ignored
]


@pytest.mark.parametrize("kwargs, field", BAD_SETTINGS, ids=[f for _, f in BAD_SETTINGS])
def test_a_bad_setting_is_a_config_error_naming_the_field(kwargs, field):
    kwargs = {"api_key": API_KEY, "nodes": [REMOTE], "health_check_interval_s": None, **kwargs}
    with pytest.raises(ConfigError) as info:
        Client(**kwargs).close()
    assert isinstance(info.value, ValueError)
    assert info.value.field.startswith(field), (info.value.field, str(info.value))
    assert str(info.value).startswith(info.value.field + ":")
    assert API_KEY not in str(info.value)


def test_plain_http_to_a_remote_host_needs_allow_insecure_http():
    remote_http = [{"id": "a", "base_url": "http://gw.example/v1"}]
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        Client(api_key=API_KEY, nodes=remote_http, health_check_interval_s=None)
    with pytest.raises(ConfigError, match="allow_insecure_http"):  # a node's own key counts too
        Client(nodes=[{**remote_http[0], "api_key": "sk-node"}], health_check_interval_s=None)
    Client(api_key=API_KEY, nodes=remote_http, health_check_interval_s=None, allow_insecure_http=True).close()
    for loopback in ("http://127.0.0.1:9/v1", "http://localhost:9/v1", "http://[::1]:9/v1", "http://127.8.9.10/v1"):
        Client(api_key=API_KEY, nodes=[{"id": "l", "base_url": loopback}], health_check_interval_s=None).close()


# (call on a client, field the InvalidRequestError must name)
BAD_CALLS = [
    (lambda c, s: c.chat_completion([], model="m", stream=s), "messages"),
    (lambda c, s: c.chat_completion("hello", model="m", stream=s), "messages"),
    (lambda c, s: c.chat_completion(None, model="m", stream=s), "messages"),
    (lambda c, s: c.chat_completion({"role": "user", "content": "hi"}, model="m", stream=s), "messages"),
    (lambda c, s: c.chat_completion(["hi"], model="m", stream=s), "messages[0]"),
    (lambda c, s: c.chat_completion([{"content": "hi"}], model="m", stream=s), "messages[0].role"),
    (lambda c, s: c.chat_completion(MSGS + [{"role": "", "content": "x"}], model="m", stream=s),
     "messages[1].role"),
    (lambda c, s: c.chat_completion([{"role": 1, "content": "x"}], model="m", stream=s), "messages[0].role"),
    (lambda c, s: c.chat_completion([{"role": "user", "content": 5}], model="m", stream=s),
     "messages[0].content"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, max_tokens=-1), "max_tokens"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, max_tokens=0), "max_tokens"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, max_tokens=1.5), "max_tokens"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, max_tokens=True), "max_tokens"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, max_completion_tokens=-5), "max_completion_tokens"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, n=0), "n"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, temperature=2.5), "temperature"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, temperature="0.5"), "temperature"),
    (lambda c, s: c.chat_completion(MSGS, model=42, stream=s), "model"),
    (lambda c, s: c.chat_completion(MSGS, model=["gpt-4.1"], stream=s), "model"),
    (lambda c, s: c.chat_completion(MSGS, model="   ", stream=s), "model"),
    (lambda c, s: c.chat_completion(MSGS, stream=s), "model"),
    (lambda c, s: c.chat_completion(MSGS, model="m" * 257, stream=s), "model"),
    (lambda c, s: c.chat_completion(MSGS, model="gpt-4.1\r\nX-Evil: 1", stream=s), "model"),
    (lambda c, s: c.chat_completion(MSGS, model="gpt\x00", stream=s), "model"),
    (lambda c, s: c.embeddings("hi", model="e" * 100_000), "model"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, deadline_s=0), "deadline_s"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, deadline_s=float("nan")), "deadline_s"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, deadline_s=float("inf")), "deadline_s"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, deadline_s=1e10), "deadline_s"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, deadline_s=86_401), "deadline_s"),
    (lambda c, s: c.models(deadline_s=float("inf")), "deadline_s"),
    (lambda c, s: c.embeddings("x", model="e", deadline_s=1e10), "deadline_s"),
    (lambda c, s: c.request("GET", "/models", deadline_s=1e300), "deadline_s"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, region=3), "region"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, idempotency_key="k\r\nX-Evil: 1"),
     "idempotency_key"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, idempotency_key="clé"), "idempotency_key"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, user=object()), "json"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, top_p=float("inf")), "json"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, max_tokens=10**400), "max_tokens"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, max_completion_tokens=2**63), "max_completion_tokens"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, n=10**30), "n"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, metadata=nested(1000)), "metadata"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, tools=[{"function": nested(200)}]), "tools"),
    (lambda c, s: c.chat_completion([{"role": "user", "content": nested(1000)}], model="m", stream=s),
     "messages[0].content"),
    (lambda c, s: c.chat_completion(MSGS + [{"role": "user", "content": [{"type": "text", "text": nested(5000)}]}],
                                    model="m", stream=s), "messages[1].content"),
    (lambda c, s: c.chat_completion([{"role": "user", "content": LONE_SURROGATE}], model="m", stream=s,
                                    temperature=0), "messages[0].content"),
    (lambda c, s: c.chat_completion([{"role": "user", "content": [{"type": "text", "text": LONE_SURROGATE}]}],
                                    model="m", stream=s, cache=True), "messages[0].content[0].text"),
    (lambda c, s: c.chat_completion([{"role": "user", "content": "hi", "name": LONE_SURROGATE}], model="m",
                                    stream=s, cache=True), "messages[0].name"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, user=LONE_SURROGATE, cache=True), "user"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, metadata={LONE_SURROGATE: "v"}), "metadata key"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, metadata=contains_itself()), "metadata"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, temperature=0, cache=True,
                                    logit_bias={"1": nested(999)}), "logit_bias"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream="yes" if s else 1), "stream"),
    (lambda c, s: c.chat_completion(MSGS, model="m", stream=s, cache="yes"), "cache"),
    (lambda c, s: c.embeddings([], model="e"), "input"),
    (lambda c, s: c.embeddings(["ok", 3], model="e"), "input"),
    (lambda c, s: c.embeddings("", model="e"), "input"),
    (lambda c, s: c.embeddings([LONE_SURROGATE], model="e"), "input[0]"),
    (lambda c, s: c.embeddings("x", model="e", dimensions=nested(1000)), "dimensions"),
    (lambda c, s: c.request("POST", "/chat/completions", json={"a": nested(1000)}), "json"),
    (lambda c, s: c.request("POST", "/chat/completions", json={"a": LONE_SURROGATE}), "json.a"),
    (lambda c, s: c.request("BREW", "/chat/completions"), "method"),
    (lambda c, s: c.request("POST", "chat/completions"), "path"),
    (lambda c, s: c.request("POST", "/chat completions"), "path"),
    (lambda c, s: c.request("GET", "/models\r\nX-Evil: 1"), "path"),
    (lambda c, s: c.request("POST", "/chat/completions", json=[1, 2]), "json"),
]


@pytest.fixture(scope="module")
def gateway():
    with SimulatedGateway([{"id": "a"}, {"id": "b"}], seed=3) as gw:
        yield gw


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("call, field", BAD_CALLS, ids=[f for _, f in BAD_CALLS])
def test_a_bad_call_argument_is_an_invalid_request_naming_the_field_and_sends_nothing(gateway, call, field,
                                                                                       stream):
    # the cache and a tokens-per-minute limit on: both read the arguments before anything is sent
    with Client(api_key=API_KEY, nodes=gateway.client_nodes(), health_check_interval_s=None,
                cache=True, tokens_per_minute=100_000) as client:
        with pytest.raises(InvalidRequestError) as info:
            call(client, stream)
        assert isinstance(info.value, ValueError)
        assert info.value.field == field, str(info.value)
        assert str(info.value).startswith(field + ":")
        stats = client.stats()
    assert gateway.counts() == {"a": 0, "b": 0}
    assert stats["calls"] == 0 and stats["in_flight"] == 0  # refused before it became a call
