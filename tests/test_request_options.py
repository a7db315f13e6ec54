"""Per-call timeout, extra_headers, extra_query and extra_body: validated, typed errors, secrets never shown."""

from __future__ import annotations

import pytest

from holysheep_lb import InvalidRequestError
from holysheep_lb.call.context import CallContext
from holysheep_lb.request_options import CLIENT_ONLY_ARGUMENTS, check_call_params, request_options

CHAT_ARGS = frozenset({"messages", "model", "stream", "region", "deadline_s", "idempotency_key", "cache",
                       "timeout", "extra_headers", "extra_query", "extra_body"})
SECRET = "sk-per-call-SECRET-0123456789"


def test_no_option_given_costs_nothing():
    assert request_options() is None


def test_a_timeout_is_seconds_or_a_connect_read_pair():
    assert request_options(timeout=2.5).timeout == (2.5, 2.5)
    assert request_options(timeout=(1, 30)).timeout == (1.0, 30.0)
    assert request_options(timeout=[0.5, 4]).timeout == (0.5, 4.0)


@pytest.mark.parametrize("bad, field", [
    (0, "timeout"), (-1, "timeout"), (float("nan"), "timeout"), (float("inf"), "timeout"), (1e9, "timeout"),
    (True, "timeout"), ("5", "timeout"), ((1, 2, 3), "timeout"), ((0, 5), "timeout[0] (connect)"),
    ((5, None), "timeout[1] (read)"),
])
def test_a_bad_timeout_names_what_is_wrong(bad, field):
    with pytest.raises(InvalidRequestError) as info:
        request_options(timeout=bad)
    assert info.value.field == field


def test_extra_headers_are_kept_as_given_and_hidden_from_the_repr():
    options = request_options(extra_headers={"X-Api-Key": SECRET, "OpenAI-Organization": "org-1"})
    assert dict(options.headers) == {"X-Api-Key": SECRET, "OpenAI-Organization": "org-1"}
    assert SECRET not in repr(options) and options.changes_request


@pytest.mark.parametrize("headers, field, hint", [
    ({"Authorization": SECRET}, "extra_headers['Authorization']", "its own API key"),
    ({"authorization": SECRET}, "extra_headers['authorization']", "its own API key"),
    ({"Proxy-Authorization": SECRET}, "extra_headers['Proxy-Authorization']", "proxy"),
    ({"Content-Length": "3"}, "extra_headers['Content-Length']", "computes it"),
    ({"Host": "evil.example"}, "extra_headers['Host']", "base_url"),
    ({"X-Key": SECRET + "\r\nX-Injected: 1"}, "extra_headers['X-Key']", "CR, LF or NUL"),
    ({"X-Key": SECRET + "\u20ac"}, "extra_headers['X-Key']", "latin-1"),
    ({"X-Key": 42}, "extra_headers['X-Key']", "must be a string"),
    ({"X-Key": None}, "extra_headers['X-Key']", "must be a string"),
    ({"X Key": SECRET}, "extra_headers", "HTTP tokens"),
    ({"X-Key": SECRET, "x-key": SECRET}, "extra_headers['x-key']", "given twice"),
])
def test_a_bad_or_reserved_header_is_refused_without_showing_its_value(headers, field, hint):
    with pytest.raises(InvalidRequestError) as info:
        request_options(extra_headers=headers)
    assert info.value.field == field and hint in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value.value)


def test_extra_headers_must_be_a_mapping_and_are_not_echoed():
    with pytest.raises(InvalidRequestError) as info:
        request_options(extra_headers=[("X-Key", SECRET)])
    assert info.value.field == "extra_headers" and SECRET not in str(info.value)


def test_extra_query_is_url_encoded_in_order_with_lists_and_bools():
    options = request_options(extra_query={"api-version": "2024-10-21", "tag": ["a b", "c&d"], "beta": True, "n": 2})
    assert options.query == "?api-version=2024-10-21&tag=a%20b&tag=c%26d&beta=true&n=2"
    assert request_options(extra_query={}).query == ""


@pytest.mark.parametrize("query, field", [
    ({"k": None}, "extra_query['k']"), ({"k": {"x": 1}}, "extra_query['k']"), ({"": "v"}, "extra_query"),
    ({"k": float("nan")}, "extra_query['k']"), ({"k": "x" * 10_000}, "extra_query"), ("k=v", "extra_query"),
])
def test_a_bad_extra_query_names_what_is_wrong(query, field):
    with pytest.raises(InvalidRequestError) as info:
        request_options(extra_query=query)
    assert info.value.field == field


def test_extra_body_refuses_the_fields_the_call_builds_and_checks_json_values():
    assert dict(request_options(extra_body={"metadata": {"a": 1}}).body) == {"metadata": {"a": 1}}
    with pytest.raises(InvalidRequestError) as info:
        request_options(extra_body={"messages": []}, reserved_body={"model", "messages"})
    assert info.value.field == "extra_body['messages']" and "pass messages= as an argument" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        request_options(extra_body={"text": "bad \udc80 surrogate"})
    assert info.value.field == "extra_body.text"
    with pytest.raises(InvalidRequestError):
        request_options(extra_body=["not", "a", "dict"])


@pytest.mark.parametrize("name", sorted(CLIENT_ONLY_ARGUMENTS))
def test_every_openai_client_feature_is_refused_with_what_to_do_instead(name):
    with pytest.raises(InvalidRequestError) as info:
        check_call_params({name: SECRET}, CHAT_ARGS)
    assert info.value.field == name and CLIENT_ONLY_ARGUMENTS[name] in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("name, meant", [
    ("extra_header", "extra_headers"), ("extraHeaders", "extra_headers"), ("extra_queries", "extra_query"),
    ("timeout_s", "timeout"), ("deadline", "deadline_s"), ("idempotencykey", "idempotency_key"),
])
def test_a_near_miss_of_a_client_argument_is_refused_with_did_you_mean(name, meant):
    with pytest.raises(InvalidRequestError, match=f"did you mean `{meant}`"):
        check_call_params({name: 1}, CHAT_ARGS)


@pytest.mark.parametrize("name", [
    "n", "logprobs", "top_logprobs", "temperature", "top_p", "stop", "seed", "user", "tools", "tool_choice",
    "response_format", "stream_options", "store", "metadata", "reasoning_effort", "max_completion_tokens",
    "top_k", "min_p", "repetition_penalty", "enable_thinking", "chat_template_kwargs", "cached_content",
    "region_name", "service_tier", "prediction", "parallel_tool_calls", "modalities", "safety_identifier",
])
def test_api_parameters_go_through(name):
    check_call_params({name: 1}, CHAT_ARGS)
    check_call_params({name: 1}, CHAT_ARGS)  # and again, from the remembered verdict


def test_a_model_copy_of_the_context_carries_the_call_headers_on_top_of_its_own():
    ctx = CallContext("chat", "POST", "/chat/completions", 10.0, lambda: 0.0, lambda: 0.5,
                      extra_headers={"X-Trace": "t", "Idempotency-Key": "mine"})
    sent = ctx.for_model("m", b"{}", {"Content-Type": "application/json", "Idempotency-Key": "generated"})
    assert sent.headers == {"Content-Type": "application/json", "Idempotency-Key": "mine", "X-Trace": "t"}
    assert "X-Trace" not in repr(ctx)
    plain = CallContext("chat", "POST", "/chat/completions", 10.0, lambda: 0.0, lambda: 0.5)
    own = {"Content-Type": "application/json"}
    assert plain.for_model("m", b"{}", own).headers is own  # nothing added: nothing copied
