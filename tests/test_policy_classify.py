"""policy/classify.py: the one place an outcome gets its meaning."""

import dataclasses
import pickle

import pytest

from holysheep_lb import (
    AllAttemptsFailedError,
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    Attempt,
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigError,
    FirstTokenTimeoutError,
    InternalServerError,
    InvalidRequestError,
    NoHealthyNodeError,
    NotFoundError,
    RateLimitError,
    RateLimitExceeded,
    ResponseTooLargeError,
    StreamStallError,
    UnprocessableEntityError,
)
from holysheep_lb.errors import status_error
from holysheep_lb.policy.classify import (
    FAILURE_KINDS,
    KIND_TRAITS,
    OK,
    RETRY_BUDGET_EXHAUSTED,
    SYSTEM_FAILURE_KINDS,
    Outcome,
    classify,
    classify_status,
    failure_kind,
    local_failure,
    stream_interrupt_reason,
    throttled,
)


def _status(code: int, **kw) -> APIStatusError:
    return status_error(code, {"error": {"message": "x"}}, node_id="a", request_id=None, headers={}, **kw)


def test_an_outcome_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        OK.kind = "timeout"  # type: ignore[misc]


def test_success_counts_for_the_breaker_and_against_nothing():
    out = classify(None)
    assert out.ok and out.kind == "ok" and out.breaker == "success"
    assert not (out.counts_against_node or out.counts_against_model_breaker or out.retryable)


@pytest.mark.parametrize("error, kind, retryable, node, breaker, web", [
    (APIConnectionError("refused", node_id="a"), "connect", True, True, "failure", 503),
    (APITimeoutError("slow", node_id="a", request_sent=True), "timeout", True, True, "failure", 503),
    (FirstTokenTimeoutError("no token", timeout_s=5.0, node_id="a"), "ttft_timeout", True, True, "failure", 503),
    (StreamStallError("stalled", timeout_s=5.0, node_id="a"), "stall", True, True, "failure", 503),
    (APIResponseValidationError("not json", node_id="a"), "invalid_response", True, True, "failure", 503),
    (ResponseTooLargeError("big", node_id="a"), "invalid_response", True, True, "failure", 503),
    (InternalServerError("down", status_code=502), "status_5xx", True, True, "failure", 503),
    (RateLimitError("slow", status_code=429, retry_after_s=3.0), "status_429", True, False, "none", 429),
    (BadRequestError("bad", status_code=400), "status_4xx", False, False, "success", 422),
    (NotFoundError("no", status_code=404), "status_4xx", False, False, "success", 422),
    (UnprocessableEntityError("no", status_code=422), "status_4xx", False, False, "success", 422),
    (AuthenticationError("key", status_code=401), "status_4xx", False, False, "success", 503),
])
def test_each_attempt_failure_gets_one_meaning(error, kind, retryable, node, breaker, web):
    out = classify(error)
    assert (out.kind, out.retryable, out.counts_against_node, out.breaker, out.web_status) == (
        kind, retryable, node, breaker, web)
    assert out.counts_against_model_breaker is (breaker == "failure")
    assert out.counts_against_retry_budget is retryable
    assert failure_kind(error) == kind and kind in FAILURE_KINDS


@pytest.mark.parametrize("code, retryable", [(400, False), (401, False), (404, False), (408, True),
                                             (409, True), (422, False), (429, True), (500, True), (503, True)])
def test_a_status_is_retryable_when_classify_status_says_so(code, retryable):
    assert classify_status(code).retryable is retryable
    assert _status(code).retryable is retryable  # errors.status_error reads the same answer
    assert classify(_status(code)).retryable is retryable


@pytest.mark.parametrize("code, hint", [(503, False), (400, True)])
def test_the_servers_x_should_retry_wins(code, hint):
    assert classify_status(code, should_retry=hint).retryable is hint
    assert classify(_status(code, should_retry=hint)).retryable is hint


def test_a_local_failure_is_final_and_held_against_nobody():
    error = local_failure("could not send", "a")
    out = classify(error)
    assert error.local and not error.retryable
    assert (out.kind, out.local, out.retryable, out.counts_against_node, out.breaker) == (
        "local", True, False, False, "none")
    copy = pickle.loads(pickle.dumps(error))
    assert classify(copy) == out


def test_retry_after_is_read_from_the_declared_attribute():
    assert classify(RateLimitError("slow", status_code=429, retry_after_s=2.5)).retry_after_s == 2.5
    assert classify(CircuitOpenError("model:m", 4.0)).retry_after_s == 4.0
    assert classify(APIConnectionError("x")).retry_after_s is None


@pytest.mark.parametrize("error, kind, web, breaker", [
    (CircuitOpenError("model:m", 1.0), "circuit_open", 503, "none"),
    (RateLimitExceeded("requests", 1, 2.0), "client_rate_limit", 429, "none"),
    (BudgetExceededError(model="m", scope="client", period="day", cap_usd=1, spent_usd=1, reserved_usd=0,
                         estimate_usd=0.1), "budget", 429, "none"),
    (NoHealthyNodeError("none"), "no_healthy_node", 503, "failure"),
    (InvalidRequestError("model", None, "is required"), "invalid_request", 400, "none"),
    (ConfigError("x", 1, "no"), "config", 503, "none"),
    (KeyError("bug"), "error", 503, "none"),
])
def test_call_level_errors_have_a_kind_and_a_web_status(error, kind, web, breaker):
    out = classify(error)
    assert (out.kind, out.web_status, out.breaker) == (kind, web, breaker)


def test_all_attempts_failed_counts_against_the_model_only_for_system_failures():
    five = Attempt("a", 1.0, 502, "InternalServerError: x", "status_5xx")
    slow = Attempt("a", 1.0, 429, "RateLimitError: x", "status_429")
    assert classify(AllAttemptsFailedError("all 1 attempts failed", [five])).counts_against_model_breaker
    assert not classify(AllAttemptsFailedError("all 1 attempts failed", [slow])).counts_against_model_breaker
    assert not classify(AllAttemptsFailedError(RETRY_BUDGET_EXHAUSTED, [five])).counts_against_model_breaker


def test_all_attempts_failed_after_a_429_says_later_with_its_wait():
    last = RateLimitError("slow", status_code=429, retry_after_s=7.0)
    error = AllAttemptsFailedError("x", [], last, retry_after_s=last.retry_after_s)
    out = classify(error)
    assert (out.web_status, out.retry_after_s) == (429, 7.0)
    assert classify(AllAttemptsFailedError("x", [], InternalServerError("d", status_code=500))).web_status == 503


@pytest.mark.parametrize("error, reason", [
    (APITimeoutError("x"), "stall"),
    (ResponseTooLargeError("x"), "too_large"),
    (APIResponseValidationError("x"), "malformed"),
    (InternalServerError("x", status_code=500), "server_error"),
    (APIConnectionError("x"), "reset"),
])
def test_a_stream_cut_by_an_error_is_described_by_its_kind(error, reason):
    assert stream_interrupt_reason(error) == reason
    assert classify(error).stream_reason == reason


def test_throttled_is_a_wait_not_a_failure():
    out = throttled(4.0)
    assert isinstance(out, Outcome) and out.kind == "throttled" and out.retry_after_s == 4.0
    assert out.retryable and not out.counts_against_node and out.breaker == "none"


def test_the_kind_table_defines_the_stats_buckets_and_the_system_kinds():
    assert FAILURE_KINDS == ("connect", "timeout", "ttft_timeout", "stall", "status_5xx", "status_429",
                             "status_4xx", "context_window", "content_filter", "invalid_response", "local")
    assert SYSTEM_FAILURE_KINDS == {"connect", "timeout", "ttft_timeout", "stall", "status_5xx",
                                    "invalid_response"}
    assert all(KIND_TRAITS[k].breaker == "failure" for k in SYSTEM_FAILURE_KINDS)
