"""Status errors say what the server said: message, type, param and code from the error body."""

from __future__ import annotations

import json
import typing

import pytest
import responses

from holysheep_lb import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
)
from holysheep_lb.errors import status_error
from holysheep_lb.streaming import SSEEvent, decode_event

URL = "http://127.0.0.1:9/v1"


def build(status: int, body) -> APIStatusError:
    return status_error(status, body, node_id="n1", request_id="req-9", headers={})


def test_the_openai_error_form_fills_every_field():
    body = {"error": {"message": "This model's maximum context length is 8192 tokens.",
                      "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}
    exc = build(400, body)
    assert isinstance(exc, BadRequestError) and type(exc).__name__ == "ContextWindowExceededError"
    assert (exc.message, exc.type, exc.param, exc.code) == (
        "This model's maximum context length is 8192 tokens.", "invalid_request_error", "messages",
        "context_length_exceeded")
    assert (exc.status_code, exc.body, exc.request_id, exc.node_id) == (400, body, "req-9", "n1")


def test_the_flat_form_with_a_numeric_code():
    body = {"object": "error", "message": "model overloaded", "type": "ServiceUnavailableError",
            "param": None, "code": 503}
    exc = build(503, body)
    assert type(exc) is InternalServerError
    assert (exc.message, exc.type, exc.param, exc.code) == ("model overloaded", "ServiceUnavailableError", None, 503)


@pytest.mark.parametrize("body, message", [
    ({"error": "invalid api key"}, "invalid api key"),
    ("upstream connect error or disconnect/reset before headers", "upstream connect error or disconnect/reset "
                                                                  "before headers"),
    ({"detail": "Not authenticated"}, "Not authenticated"),
    (None, "status 401"),
    ({"error": {"code": "bad_key"}}, "status 401"),
])
def test_string_forms_give_the_message_and_no_other_field(body, message):
    exc = build(401, body)
    assert type(exc) is AuthenticationError and exc.message == message
    assert (exc.type, exc.param) == (None, None)
    assert exc.code == ("bad_key" if isinstance(body, dict) and isinstance(body.get("error"), dict) else None)


def test_values_of_the_wrong_type_read_as_none():
    exc = build(429, {"error": {"message": "slow down", "type": ["rate"], "param": {"x": 1}, "code": True}})
    assert type(exc) is RateLimitError and exc.message == "slow down"
    assert (exc.type, exc.param, exc.code) == (None, None, None)
    assert (build(404, {"error": {"code": {"n": 1}}}).code, build(404, [1, 2]).code) == (None, None)


def test_the_fields_are_declared_on_the_class_with_none_defaults():
    hints = typing.get_type_hints(APIStatusError)
    assert {"message", "code", "type", "param", "status_code", "body", "request_id", "headers"} <= set(hints)
    assert (APIStatusError.code, APIStatusError.type, APIStatusError.param) == (None, None, None)


def test_building_the_class_directly_reads_the_body_too():
    exc = NotFoundError("gone", status_code=404, body={"error": {"type": "invalid_request_error",
                                                                 "code": "model_not_found"}})
    assert (exc.code, exc.type, exc.param) == ("model_not_found", "invalid_request_error", None)
    assert (APIStatusError("x", status_code=418).code, APIStatusError("x", status_code=418).body) == (None, None)


def test_an_error_event_inside_a_stream_carries_the_fields():
    event = SSEEvent("error", json.dumps({"error": {"message": "overloaded", "type": "server_error",
                                                    "code": 529}}))
    with pytest.raises(APIStatusError) as info:
        decode_event(event, node_id="n2")
    assert (info.value.status_code, info.value.code, info.value.type, info.value.message) == (
        529, 529, "server_error", "overloaded")


def test_a_final_4xx_through_the_client_carries_the_fields(make_client, rsps):
    body = {"error": {"message": "Invalid value for 'temperature'.", "type": "invalid_request_error",
                      "param": "temperature", "code": "invalid_value"}}
    rsps.add(responses.POST, f"{URL}/chat/completions", json=body, status=400, headers={"x-request-id": "req-42"})
    client = make_client([{"id": "n1", "base_url": URL}])
    with pytest.raises(BadRequestError) as info:
        client.chat_completion([{"role": "user", "content": "hi"}], model="gpt-4.1")
    exc = info.value
    assert (exc.code, exc.type, exc.param, exc.message) == (
        "invalid_value", "invalid_request_error", "temperature", "Invalid value for 'temperature'.")
    assert (exc.status_code, exc.request_id, exc.node_id, exc.body) == (400, "req-42", "n1", body)
