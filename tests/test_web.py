"""Units for ``holysheep_lb.web.error_response``: which status a web view answers with."""

from __future__ import annotations

import pytest

from holysheep_lb.errors import (
    AllAttemptsFailedError,
    APIConnectionError,
    Attempt,
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    ConfigError,
    HolySheepError,
    InternalServerError,
    InvalidRequestError,
    NoHealthyNodeError,
    NotFoundError,
    RateLimitError,
    RateLimitExceeded,
    UnprocessableEntityError,
)
from holysheep_lb.web import error_response


def rate_limit(retry_after_s=None):
    return RateLimitError("slow down", status_code=429, node_id="a", retry_after_s=retry_after_s)


def all_failed(last_error, **attrs):
    exc = AllAttemptsFailedError("all 2 attempts failed",
                                 [Attempt("a", 3.0, 500, "x"), Attempt("b", 4.0, 429, "y")], last_error)
    for k, v in attrs.items():
        setattr(exc, k, v)
    return exc


def test_rate_limit_is_429_with_retry_after():
    status, body, headers = error_response(rate_limit(2.2))
    assert status == 429
    assert headers == {"Retry-After": "3"}
    assert body == {"error": {"type": "rate_limited", "retry_after_s": 2.2,
                              "message": "Too many requests to the AI service; retry later."}}


def test_all_attempts_throttled_is_429():
    status, body, headers = error_response(all_failed(rate_limit(5), retry_after_s=5))
    assert (status, headers, body["error"]["type"]) == (429, {"Retry-After": "5"}, "rate_limited")


@pytest.mark.parametrize("exc", [
    all_failed(InternalServerError("boom", status_code=502, node_id="b")),
    all_failed(None),
    APIConnectionError("refused", node_id="a"),
    NoHealthyNodeError("none"),
    AuthenticationError("bad key", status_code=401, node_id="a"),
    ConfigError("api_key", None, "needs a key"),
    HolySheepError("anything else"),
])
def test_everything_else_is_503_without_internals(exc):
    status, body, headers = error_response(exc)
    assert status == 503 and headers == {}
    assert body == {"error": {"type": "unavailable", "message": "The AI service is unavailable; retry later."}}


def test_a_bad_argument_is_400_with_its_message():
    status, body, headers = error_response(InvalidRequestError("temperature", 7, "must be from 0 to 2"))
    assert (status, headers) == (400, {})
    assert body["error"] == {"type": "invalid_request",
                             "message": "temperature: invalid value 7; must be from 0 to 2"}


@pytest.mark.parametrize("exc", [
    RateLimitExceeded("requests", 1, 2.5),
    BudgetExceededError(model="gpt-4.1", scope="client", period="day", cap_usd=1.0, spent_usd=1.0,
                        reserved_usd=0.0, estimate_usd=0.01),
])
def test_client_side_limits_are_429(exc):
    status, body, headers = error_response(exc)
    assert status == 429 and body["error"]["type"] == "rate_limited"
    if isinstance(exc, RateLimitExceeded):
        assert headers == {"Retry-After": "3"}


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), "3"])
def test_unusable_retry_after_values_add_no_header(value):
    status, body, headers = error_response(rate_limit(value))
    assert status == 429 and headers == {} and "retry_after_s" not in body["error"]


@pytest.mark.parametrize("cls, status", [(BadRequestError, 400), (NotFoundError, 404),
                                         (UnprocessableEntityError, 422)])
def test_a_request_the_service_rejected_is_422_not_retry_later(cls, status):
    exc = cls("context too long", status_code=status, body={"error": {"message": "context too long"}})
    got = error_response(exc)
    assert (got.status, got.headers) == (422, {})
    assert got.body["error"]["type"] == "rejected" and "context" not in got.body["error"]["message"]


def test_our_own_credentials_refused_is_503():
    assert error_response(AuthenticationError("bad key", status_code=401)).status == 503
