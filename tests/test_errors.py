"""Every public exception survives pickling with its message and attributes.

``Client.map()`` results and errors raised in worker processes (multiprocessing,
concurrent.futures.ProcessPoolExecutor) travel between processes by pickle.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Dict

import pytest

from holysheep_lb import errors
from holysheep_lb.errors import (
    AllAttemptsFailedError,
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    Attempt,
    BudgetExceededError,
    CircuitOpenError,
    ConfigError,
    HolySheepError,
    InvalidRequestError,
    NoHealthyNodeError,
    RateLimitExceeded,
    ResponseTooLargeError,
    SharedStateUnavailableError,
    StreamInterruptedError,
    status_error,
)

HEADERS = {"x-request-id": "req-1", "retry-after": "2", "content-type": "application/json"}


def _status(code: int, **kw: Any) -> APIStatusError:
    body = {"error": {"message": f"status {code} from the gateway", "type": "server_error", "code": "x"}}
    return status_error(code, body, node_id="us-east", request_id="req-1", headers=HEADERS, **kw)


ATTEMPTS = (Attempt("us-east", 12.5, 503, "InternalServerError: overloaded", "status_5xx"),
            Attempt("eu-west", 30.0, None, "APITimeoutError: read timeout", "timeout"))

EXAMPLES: Dict[type, Callable[[], BaseException]] = {
    HolySheepError: lambda: HolySheepError("something failed"),
    APIError: lambda: APIError("connection broken", node_id="us-east"),
    APIStatusError: lambda: _status(418),
    errors.BadRequestError: lambda: _status(400),
    errors.ContextWindowExceededError: lambda: errors.status_error(
        400, {"error": {"message": "maximum context length is 8192 tokens", "code": "context_length_exceeded"}},
        node_id="us-east", request_id="req_1", headers={}),
    errors.ContentFilterError: lambda: errors.status_error(
        400, {"error": {"message": "filtered", "code": "content_filter"}}, node_id="us-east", request_id=None,
        headers={}),
    errors.AuthenticationError: lambda: _status(401),
    errors.PermissionDeniedError: lambda: _status(403),
    errors.NotFoundError: lambda: _status(404),
    errors.UnprocessableEntityError: lambda: _status(422),
    errors.RateLimitError: lambda: _status(429, retry_after_s=2.0, should_retry=True),
    errors.InternalServerError: lambda: _status(503),
    APIConnectionError: lambda: APIConnectionError("connection error: refused", node_id="eu-west"),
    APITimeoutError: lambda: APITimeoutError("read timeout: 5 s", node_id="eu-west"),
    APIResponseValidationError: lambda: APIResponseValidationError(
        "invalid JSON in a 200 response", node_id="us-east", status_code=200, request_id="req-2"),
    ResponseTooLargeError: lambda: ResponseTooLargeError(
        "response exceeds max_response_bytes=65536", node_id="us-east", status_code=200),
    StreamInterruptedError: lambda: StreamInterruptedError(
        "stream reset after 2 chunks", reason="reset", partial_text="Hel", chunks=2, node_id="us-east"),
    errors.StreamRestartedError: lambda: errors.StreamRestartedError(
        "restarted after 2 chunks", partial_text="Hel", chunks=2, cause_reason="reset", node_id="us-east"),
    errors.FirstTokenTimeoutError: lambda: errors.FirstTokenTimeoutError(
        "no first chunk within 10 s", timeout_s=10.0, node_id="us-east"),
    errors.StreamStallError: lambda: errors.StreamStallError("no chunk within 20 s", timeout_s=20.0, node_id="us-east"),
    NoHealthyNodeError: lambda: NoHealthyNodeError("no node can take the call: all ejected"),
    AllAttemptsFailedError: lambda: AllAttemptsFailedError("every node failed", ATTEMPTS, last_error=_status(503)),
    CircuitOpenError: lambda: CircuitOpenError("model:gpt-4.1", 12.5, "5 failures in a row"),
    errors.RateLimitExceeded: lambda: RateLimitExceeded("tokens:gpt-4.1", 1200.0, 3.5, "deadline too close"),
    BudgetExceededError: lambda: BudgetExceededError(
        model="gpt-4.1", scope="client", period="day", cap_usd=5.0, spent_usd=4.9, reserved_usd=0.05,
        estimate_usd=0.07, downgrade_tried=True),
    SharedStateUnavailableError: lambda: SharedStateUnavailableError("budget", "Connection refused"),
    ConfigError: lambda: ConfigError("read_timeout_s", -1, "must be > 0"),
    InvalidRequestError: lambda: InvalidRequestError("max_tokens", -5, "must be an integer >= 1"),
}


def _public_exception_classes():
    return {obj for obj in (getattr(errors, name) for name in errors.__all__)
            if isinstance(obj, type) and issubclass(obj, BaseException)}


def test_every_public_exception_class_has_an_example():
    assert set(EXAMPLES) == _public_exception_classes()


def _assert_same(original: Any, copy: Any) -> None:
    if isinstance(original, BaseException):
        assert type(copy) is type(original)
        assert str(copy) == str(original) and copy.args == original.args
        assert vars(copy).keys() == vars(original).keys()
        for name, value in vars(original).items():
            _assert_same(value, getattr(copy, name))
    else:
        assert copy == original


@pytest.mark.parametrize("cls", sorted(EXAMPLES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_exceptions_round_trip_through_pickle(cls, protocol):
    original = EXAMPLES[cls]()
    assert type(original) is cls
    copy = pickle.loads(pickle.dumps(original, protocol=protocol))
    _assert_same(original, copy)
    for attr in ("retryable", "status_code", "node_id", "retry_after_s", "attempts", "field", "allowed"):
        if hasattr(original, attr):
            _assert_same(getattr(original, attr), getattr(copy, attr))


def test_an_error_marked_local_after_the_fact_keeps_the_mark():
    from holysheep_lb.transport import translate_error

    original = translate_error(UnicodeEncodeError("latin-1", "é", 0, 1, "no"), "us-east")
    copy = pickle.loads(pickle.dumps(original))
    assert copy.local is True and copy.retryable is False and str(copy) == str(original)
