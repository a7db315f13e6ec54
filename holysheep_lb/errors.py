"""The exception tree of holysheep_lb.

Every failure a caller can see is one of these; nothing from requests, urllib3,
pybreaker or redis escapes the client::

    HolySheepError
    ├── APIError                         something went wrong talking to a node
    │   ├── APIStatusError               the node answered with an error status
    │   │   ├── BadRequestError          400
    │   │   ├── AuthenticationError      401
    │   │   ├── PermissionDeniedError    403
    │   │   ├── NotFoundError            404
    │   │   ├── UnprocessableEntityError 422
    │   │   ├── RateLimitError           429
    │   │   └── InternalServerError      5xx
    │   ├── APIConnectionError           no usable answer: refused, reset, TLS, proxy
    │   │   └── APITimeoutError          connect or read timeout
    │   │       ├── FirstTokenTimeoutError   a stream's first token did not come in time ("ttft_timeout")
    │   │       └── StreamStallError     no chunk within the stall limit mid-stream ("stall")
    │   ├── APIResponseValidationError   an answer that is not what the API promises
    │   │   └── ResponseTooLargeError    (invalid JSON, not an object, over the size cap)
    │   └── StreamInterruptedError       a stream broke after its first chunk (never retried);
    │       │                            carries the partial text and the node
    │       └── StreamRestartedError     a rescued stream starts its answer again: discard
    │                                    what you read, keep iterating
    ├── NoHealthyNodeError               no node can be used for this call
    ├── AllAttemptsFailedError           every attempt failed; lists each attempt
    ├── CircuitOpenError                 a circuit breaker is open; says when to retry
    ├── RateLimitExceeded                the client's own rate limit (not a 429) ran out of time
    ├── BudgetExceededError              a spend cap refused the call before sending
    ├── SharedStateUnavailableError      shared state (Redis) unreachable, fail-closed mode
    ├── ConfigError (also ValueError)    a bad setting, named with its value
    └── InvalidRequestError (also ValueError)  a bad call argument, caught before sending

Status errors carry ``status_code``, ``body``, ``request_id`` and ``node_id``, and what
the server said: ``message``, ``type``, ``param`` and ``code`` from its error body.
Every attribute an error carries is declared on its class with a default (``attempts``,
``retry_after_s``, ``model_errors``, ``local``, ``request_sent``...), never attached later.
What an error *means* (retryable, counts against the node...) is decided in
:mod:`holysheep_lb.policy.classify`.
Messages never contain the API key: nothing here is given one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "HolySheepError",
    "APIError",
    "APIStatusError",
    "BadRequestError",
    "ContextWindowExceededError",
    "ContentFilterError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "APIConnectionError",
    "APITimeoutError",
    "FirstTokenTimeoutError",
    "StreamStallError",
    "APIResponseValidationError",
    "ResponseTooLargeError",
    "StreamInterruptedError",
    "StreamRestartedError",
    "NoHealthyNodeError",
    "AllAttemptsFailedError",
    "CircuitOpenError",
    "RateLimitExceeded",
    "BudgetExceededError",
    "SharedStateUnavailableError",
    "ConfigError",
    "InvalidRequestError",
    "Attempt",
]


REDACTED = "<redacted>"  # shown instead of a value that may be a secret


def _rebuild(cls: type, args: Tuple[Any, ...], state: Dict[str, Any]) -> BaseException:
    error: BaseException = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class HolySheepError(Exception):
    """Base of every error raised by holysheep_lb.

    ``retry_after_s`` is how long to wait before trying again, when known (None
    otherwise); ``model_errors`` maps each model of a fallback chain that failed or was
    skipped to its error, on the error a chain raises (None elsewhere).
    """

    retry_after_s: Optional[float] = None
    model_errors: Optional[Dict[str, "HolySheepError"]] = None

    def __reduce__(self) -> Tuple[Any, ...]:
        # Unpickling calls cls(*args) by default, which fails for every subclass whose
        # __init__ takes other arguments than its message (results of Client.map() cross
        # processes): rebuild from the message and the attributes instead.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class APIError(HolySheepError):
    """A failure while talking to one node.

    ``retryable`` says whether another attempt (on another node) may succeed; ``local``
    that it failed in this process before any node was involved (final, held against
    neither the node nor the model); ``attempts`` lists the call's attempts when the
    error ended the call (a final error), else it is empty.
    """

    retryable: bool = True
    local: bool = False
    attempts: Tuple["Attempt", ...] = ()
    message: str
    node_id: Optional[str]

    def __init__(self, message: str, *, node_id: Optional[str] = None, retryable: Optional[bool] = None,
                 local: bool = False, attempts: Sequence["Attempt"] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.node_id = node_id
        if retryable is not None:
            self.retryable = retryable
        if local:
            self.local = True
        if attempts:
            self.attempts = tuple(attempts)

    def __str__(self) -> str:
        if self.node_id:
            return f"{self.message} (node {self.node_id})"
        return self.message


class APIStatusError(APIError):
    """The node answered with an HTTP error status.

    ``body`` is the error body (the decoded JSON, else its text). What the server said
    is read from it, in OpenAI's form ``{"error": {"message", "type", "param", "code"}}``,
    the flat form ``{"message", "type", "param", "code"}`` or a bare string: ``message``
    (else ``"status N"``), ``type`` and ``param`` (strings) and ``code`` (a string such
    as ``"context_length_exceeded"``, or a number some gateways send); each None when
    the server did not say.
    """

    message: str
    status_code: int
    body: Any
    request_id: Optional[str]
    headers: Dict[str, str]
    code: Union[str, int, None] = None
    type: Optional[str] = None
    param: Optional[str] = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        request_id: Optional[str] = None,
        node_id: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        retryable: Optional[bool] = None,
    ) -> None:
        super().__init__(message, node_id=node_id, retryable=retryable)
        self.status_code = status_code
        self.body = body
        self.request_id = request_id
        self.headers = dict(headers or {})
        # read from the body here, not passed in: every way of building the error agrees
        self.code, self.type, self.param = _error_fields(body)

    def __str__(self) -> str:
        parts = [f"HTTP {self.status_code}: {self.message}"]
        if self.node_id:
            parts.append(f"node {self.node_id}")
        if self.request_id:
            parts.append(f"request id {self.request_id}")
        return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


class BadRequestError(APIStatusError):
    retryable = False


class ContextWindowExceededError(BadRequestError):
    """The request does not fit the model's context window (OpenAI ``context_length_exceeded``,
    Anthropic-compatible "prompt is too long", vLLM/sglang "maximum context length", ...).

    Recognised by :mod:`holysheep_lb.policy.classify` (kind ``"context_window"``). Never
    retried on the same model; ``Client(context_window_fallbacks={model: [larger, ...]})``
    sends the call to a larger-context model instead. ``model`` is the model that refused.
    """

    kind = "context_window"
    model: Optional[str] = None


class ContentFilterError(BadRequestError):
    """The provider's content filter refused the request (``content_filter``,
    ``content_policy_violation``, Azure's ``ResponsibleAIPolicyViolation``...).

    Kind ``"content_filter"``: final, and not routed around unless
    ``Client(content_policy_fallbacks={model: [...]})`` says so. ``model`` is the model
    that refused.
    """

    kind = "content_filter"
    model: Optional[str] = None


class AuthenticationError(APIStatusError):
    retryable = False


class PermissionDeniedError(APIStatusError):
    retryable = False


class NotFoundError(APIStatusError):
    retryable = False


class UnprocessableEntityError(APIStatusError):
    retryable = False


class RateLimitError(APIStatusError):
    """429 from a node. ``retry_after_s`` is the node's Retry-After, if it sent one."""

    retryable = True
    retry_after_s: Optional[float] = None

    def __init__(self, message: str, *, retry_after_s: Optional[float] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class InternalServerError(APIStatusError):
    retryable = True


class APIConnectionError(APIError):
    """No usable answer: connection refused or reset, TLS or proxy failure, truncated body."""

    retryable = True


class APITimeoutError(APIConnectionError):
    """The node did not connect or answer within the attempt's timeout or the call's deadline.

    ``request_sent`` is True when the request had been sent in full before time ran out
    (a read timeout, not a connect timeout): the node may still answer it, and bill it.
    """

    request_sent: bool = False

    def __init__(self, message: str, *, node_id: Optional[str] = None, request_sent: bool = False,
                 retryable: Optional[bool] = None) -> None:
        super().__init__(message, node_id=node_id, retryable=retryable)
        self.request_sent = request_sent


class FirstTokenTimeoutError(APITimeoutError):
    """A stream's first token did not arrive within its time-to-first-token limit.

    ``kind`` is ``"ttft_timeout"``: a reason to fail over to another route, distinct
    from a read timeout. ``timeout_s`` is the limit that expired.
    """

    kind = "ttft_timeout"

    def __init__(self, message: str, *, timeout_s: float, node_id: Optional[str] = None,
                 request_sent: bool = True) -> None:
        super().__init__(message, node_id=node_id, request_sent=request_sent)
        self.timeout_s = timeout_s


class StreamStallError(APITimeoutError):
    """No chunk arrived within the stall limit after a stream started (``kind`` ``"stall"``)."""

    kind = "stall"

    def __init__(self, message: str, *, timeout_s: float, node_id: Optional[str] = None) -> None:
        super().__init__(message, node_id=node_id, request_sent=True)
        self.timeout_s = timeout_s


class APIResponseValidationError(APIError):
    """The node answered 2xx with something that is not a JSON object."""

    retryable = True
    status_code: Optional[int] = None
    request_id: Optional[str] = None

    def __init__(
        self,
        message: str,
        *,
        node_id: Optional[str] = None,
        status_code: Optional[int] = None,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(message, node_id=node_id)
        self.status_code = status_code
        self.request_id = request_id


class ResponseTooLargeError(APIResponseValidationError):
    """The response body exceeded ``max_response_bytes``."""


class StreamInterruptedError(APIError):
    """A stream broke after its first chunk reached the caller; it is never retried.

    ``reason`` is ``"reset"``, ``"stall"`` (no chunk within the stall timeout),
    ``"truncated"`` (ended without ``[DONE]``), ``"malformed"`` (bad SSE or JSON),
    ``"too_large"`` or ``"server_error"`` (an error event inside the stream).
    ``partial_text`` is the text received so far, ``chunks`` how many chunks the caller
    got; the underlying error is ``__cause__``.
    """

    retryable = False
    reason: str
    partial_text: str
    chunks: int

    def __init__(self, message: str, *, reason: str, partial_text: str, chunks: int,
                 node_id: Optional[str] = None) -> None:
        super().__init__(message, node_id=node_id)
        self.reason = reason
        self.partial_text = partial_text
        self.chunks = chunks

    @classmethod
    def from_cause(cls, cause: BaseException, *, reason: str, partial_text: str, chunks: int,
                   node_id: Optional[str] = None) -> "StreamInterruptedError":
        """The error for a stream that ``cause`` broke after ``chunks`` chunks, with
        ``cause`` as its ``__cause__``: what its caller gets, and what its call's end
        event reports."""
        detail = getattr(cause, "message", None) or str(cause)
        error = cls(f"stream interrupted after {chunks} chunks ({reason}): {detail}", reason=reason,
                    partial_text=partial_text, chunks=chunks, node_id=node_id)
        error.__cause__ = cause
        return error


class StreamRestartedError(StreamInterruptedError):
    """A broken stream was rescued by a fresh answer that starts from the beginning.

    Raised once, by the iterator, to a caller that already read chunks of the broken
    answer: discard them (``partial_text`` is what it had) and keep iterating the same
    stream for the new answer. ``read_text()`` never raises it. ``reason`` is
    ``"restarted"``; ``cause_reason`` is why the first answer broke.
    """

    def __init__(self, message: str, *, partial_text: str, chunks: int, cause_reason: str,
                 node_id: Optional[str] = None) -> None:
        super().__init__(message, reason="restarted", partial_text=partial_text, chunks=chunks, node_id=node_id)
        self.cause_reason = cause_reason


class NoHealthyNodeError(HolySheepError):
    """No node could be used for this call (for example: all throttled past the deadline)."""


@dataclass(frozen=True)
class Attempt:
    """One attempt of a call: where it went and how it ended."""

    node_id: str
    latency_ms: float
    status_code: Optional[int] = None
    error: Optional[str] = None  # exception class and message, or None on success
    kind: Optional[str] = None   # the failure kind (stats.FAILURE_KINDS), None on success

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        what = self.error if self.error else f"HTTP {self.status_code}"
        return f"{self.node_id}: {what} after {self.latency_ms:.0f} ms"


class AllAttemptsFailedError(HolySheepError):
    """Every attempt of a call failed. ``attempts`` lists each one; ``last_error`` is the last.

    ``retry_after_s`` is the last attempt's Retry-After when it was throttled (a 429).
    """

    reason: str
    attempts: Tuple[Attempt, ...] = ()
    last_error: Optional[BaseException] = None

    def __init__(
        self,
        reason: str,
        attempts: Sequence[Attempt],
        last_error: Optional[BaseException] = None,
        *,
        retry_after_s: Optional[float] = None,
    ) -> None:
        self.reason = reason
        self.attempts = tuple(attempts)
        self.last_error = last_error
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s
        listing = "; ".join(str(a) for a in self.attempts) or "no attempt was made"
        super().__init__(f"{reason}: {len(self.attempts)} attempt(s): {listing}")

    @property
    def status_code(self) -> Optional[int]:
        return getattr(self.last_error, "status_code", None)


class CircuitOpenError(HolySheepError):
    """A circuit breaker refused the call without sending anything.

    ``breaker`` names it (``"model:gpt-4.1"`` or ``"node:us-east-1"``); ``retry_after_s``
    is how long until it lets a trial call through (0 when trial calls are running now).
    """

    breaker: str
    retry_after_s: float = 0.0

    def __init__(self, breaker: str, retry_after_s: float, detail: str = "") -> None:
        self.breaker = breaker
        self.retry_after_s = max(0.0, retry_after_s)
        msg = f"circuit breaker {breaker} is open; retry in {self.retry_after_s:.1f} s"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class RateLimitExceeded(HolySheepError):
    """The client's own rate limit could not admit the call in time; nothing was sent.

    ``limiter`` names the limit (``"requests"``, ``"tokens:gpt-4.1"``...), ``requested``
    is what the call needed, ``retry_after_s`` an estimate of when it would fit (None
    when it never can: more than the limit's capacity).
    """

    def __init__(self, limiter: str, requested: float, retry_after_s: Optional[float],
                 detail: str = "") -> None:
        self.limiter = limiter
        self.requested = requested
        self.retry_after_s = retry_after_s
        msg = f"client-side rate limit {limiter!r} cannot admit {requested:g} now"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class BudgetExceededError(HolySheepError):
    """A call's estimated cost would pass a spend cap; nothing was sent.

    ``scope`` is ``"client"`` or the capped model, ``period`` ``"day"`` or ``"month"``
    (UTC); amounts are USD. ``downgrade_tried`` is True when no cheaper model fitted.
    """

    def __init__(self, *, model: str, scope: str, period: str, cap_usd: float, spent_usd: float,
                 reserved_usd: float, estimate_usd: float, downgrade_tried: bool = False) -> None:
        self.model = model
        self.scope = scope
        self.period = period
        self.cap_usd = cap_usd
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.estimate_usd = estimate_usd
        self.downgrade_tried = downgrade_tried
        whose = "this client" if scope == "client" else f"model {scope}"
        tail = "; no cheaper model fits" if downgrade_tried else ""
        super().__init__(
            f"the {'daily' if period == 'day' else 'monthly'} budget of ${cap_usd:.4f} for {whose} would be "
            f"passed by a call to {model} (estimate ${estimate_usd:.6f}; spent ${spent_usd:.6f}, "
            f"in flight ${reserved_usd:.6f}){tail}"
        )


class SharedStateUnavailableError(HolySheepError):
    """The state shared by many processes (Redis) cannot be reached and the client was
    set to fail closed; nothing was sent. ``what`` names the refused decision
    (``"rate limit 'requests'"``, ``"budget"``); the Redis error is ``__cause__``.
    """

    def __init__(self, what: str, detail: str = "") -> None:
        self.what = what
        msg = f"shared state for the {what} is unreachable and the client fails closed"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class ConfigError(HolySheepError, ValueError):
    """A setting is invalid. The message names the field, the bad value and what is allowed.

    A value that may be a secret is never shown nor kept: ``value`` is then ``"<redacted>"``
    or a description; ``message`` replaces the default wording.
    """

    def __init__(self, field: str, value: Any, allowed: str, *, message: Optional[str] = None) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(message or f"{field}: invalid value {_short(value)}; {allowed}")


class InvalidRequestError(HolySheepError, ValueError):
    """A call argument is invalid; raised before anything is sent."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: invalid value {_short(value)}; {allowed}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_object(body: Any) -> Optional[Mapping[str, Any]]:
    """The JSON object describing an error: ``body["error"]``, or the body in the flat form."""
    if not isinstance(body, Mapping):
        return None
    err = body.get("error")
    if isinstance(err, Mapping):
        return err
    if err is None and (isinstance(body.get("message"), str) or body.get("object") == "error"):
        return body
    return None


def _error_fields(body: Any) -> Tuple[Union[str, int, None], Optional[str], Optional[str]]:
    """``(code, type, param)`` of an error body; None where it does not say (or says oddly)."""
    err = _error_object(body)
    if err is None:
        return None, None, None
    code = err.get("code")
    if isinstance(code, bool) or not isinstance(code, (str, int)):
        code = None
    kind, param = err.get("type"), err.get("param")
    return code, kind if isinstance(kind, str) else None, param if isinstance(param, str) else None


def error_message(body: Any, status_code: int) -> str:
    """The human text of an error body (OpenAI's, flat, or FastAPI's form), else the status."""
    if isinstance(body, Mapping):
        err = body.get("error")
        # OpenAI's form, {"error": "..."}, the flat form, FastAPI-style {"detail": "..."}
        for text in (err.get("message") if isinstance(err, Mapping) else err, body.get("message"),
                     body.get("detail")):
            if isinstance(text, str):
                return text[:500]
    if isinstance(body, str) and body.strip():
        return body.strip()[:200]
    return f"status {status_code}"


def __getattr__(name: str) -> Any:
    """``status_error`` and ``RETRYABLE_STATUSES`` belong to the outcome classifier
    (:mod:`holysheep_lb.policy.classify`, which imports this module); still importable here."""
    if name in ("status_error", "RETRYABLE_STATUSES"):
        from .policy import classify

        return getattr(classify, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
