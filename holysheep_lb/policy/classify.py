"""The one place an outcome gets its meaning.

Every exception, HTTP status, error-body code and stream ending is turned into an
immutable :class:`Outcome` here: its ``kind``, whether another attempt may succeed
(``retryable``), whether it counts against the node (ejection), the model's breaker
and the retry budget, the status a web caller gets, the wait the server asked for and
whether it failed in this process (``local``). Stats, ejection, breakers, streaming,
the retry policy and :func:`holysheep_lb.web.error_response` all read this answer.

Adding a kind is one row in :data:`KIND_TRAITS` and one rule in :data:`_RULES`
(a function from the exception to a kind name, or None to let the next rule speak).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

from ..errors import (
    AllAttemptsFailedError,
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigError,
    FirstTokenTimeoutError,
    HolySheepError,
    InvalidRequestError,
    NoHealthyNodeError,
    NotFoundError,
    RateLimitError,
    RateLimitExceeded,
    ResponseTooLargeError,
    SharedStateUnavailableError,
    StreamStallError,
    UnprocessableEntityError,
)

__all__ = [
    "Outcome",
    "KindTraits",
    "KIND_TRAITS",
    "FAILURE_KINDS",
    "SYSTEM_FAILURE_KINDS",
    "RETRYABLE_STATUSES",
    "RETRY_BUDGET_EXHAUSTED",
    "OK",
    "classify",
    "classify_status",
    "failure_kind",
    "breaker_verdict",
    "stream_interrupt_reason",
    "throttled",
    "local_failure",
]

#: ``AllAttemptsFailedError.reason`` of a call whose retries the retry budget refused.
RETRY_BUDGET_EXHAUSTED = "retry budget exhausted"

# 408 and 409 are worth another attempt (openai-python does the same); every other
# 4xx is the caller's mistake and is final.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


@dataclass(frozen=True)
class KindTraits:
    """What a kind of outcome means wherever it occurs.

    ``breaker`` is how it counts for a circuit breaker: "success", "failure" or "none".
    ``system`` kinds say a node is broken (they eject it and trip breakers).
    """

    retryable: bool
    system: bool = False
    breaker: str = "none"
    web_status: int = 503
    attempt: bool = True   # an attempt on a node can end this way (a stats.FAILURE_KINDS bucket)


#: Every kind and its traits. Attempt kinds come first, in the order ``stats()`` lists them.
KIND_TRAITS: Dict[str, KindTraits] = {
    "connect": KindTraits(retryable=True, system=True, breaker="failure"),
    "timeout": KindTraits(retryable=True, system=True, breaker="failure"),
    # a stream's first token did not come in time (FirstTokenTimeoutError): fail over
    "ttft_timeout": KindTraits(retryable=True, system=True, breaker="failure"),
    # no chunk within the stall limit after a stream started (StreamStallError)
    "stall": KindTraits(retryable=True, system=True, breaker="failure"),
    "status_5xx": KindTraits(retryable=True, system=True, breaker="failure"),
    "status_429": KindTraits(retryable=True, web_status=429),
    # the caller's mistake: the model works, so it counts as a success for its breaker
    "status_4xx": KindTraits(retryable=False, breaker="success"),
    "invalid_response": KindTraits(retryable=True, system=True, breaker="failure"),
    # it failed in this process before the node was involved: final, held against nobody
    "local": KindTraits(retryable=False),
    # outcomes of a whole call (or of a step before any attempt)
    "ok": KindTraits(retryable=False, breaker="success", web_status=200, attempt=False),
    "throttled": KindTraits(retryable=True, web_status=429, attempt=False),
    "circuit_open": KindTraits(retryable=True, attempt=False),
    "client_rate_limit": KindTraits(retryable=False, web_status=429, attempt=False),
    "budget": KindTraits(retryable=False, web_status=429, attempt=False),
    "no_healthy_node": KindTraits(retryable=False, breaker="failure", attempt=False),
    "all_failed": KindTraits(retryable=False, attempt=False),
    "invalid_request": KindTraits(retryable=False, web_status=400, attempt=False),
    "config": KindTraits(retryable=False, attempt=False),
    "shared_state": KindTraits(retryable=False, attempt=False),
    "error": KindTraits(retryable=False, attempt=False),
}

#: The kinds an attempt can fail by; ``stats()`` reports a count for each.
FAILURE_KINDS: Tuple[str, ...] = tuple(k for k, t in KIND_TRAITS.items() if t.attempt)
#: The kinds that say a node or model is broken. A 429 is throttling and a 4xx is the
#: caller's fault: neither ejects a node or trips a breaker.
SYSTEM_FAILURE_KINDS: FrozenSet[str] = frozenset(k for k, t in KIND_TRAITS.items() if t.system)


@dataclass(frozen=True)
class Outcome:
    """The meaning of one outcome. Immutable; build it with :func:`classify`."""

    kind: str
    retryable: bool = False
    counts_against_node: bool = False
    counts_against_model_breaker: bool = False
    counts_against_retry_budget: bool = False
    web_status: int = 503
    retry_after_s: Optional[float] = None
    local: bool = False
    breaker: str = "none"                # "success", "failure" or "none" for a circuit breaker
    status_code: Optional[int] = None
    stream_reason: Optional[str] = None  # how a stream cut by this error is described
    detail: str = ""                     # what refused the call, for a circuit breaker's refusal

    @property
    def final(self) -> bool:
        return not self.retryable

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def _outcome(kind: str, *, retryable: Optional[bool] = None, breaker: Optional[str] = None,
             web_status: Optional[int] = None, **extra: Any) -> Outcome:
    traits = KIND_TRAITS[kind]
    retry = traits.retryable if retryable is None else retryable
    verdict = traits.breaker if breaker is None else breaker
    return Outcome(kind=kind, retryable=retry, counts_against_node=traits.system,
                   counts_against_model_breaker=verdict == "failure",
                   counts_against_retry_budget=retry, web_status=traits.web_status if web_status is None
                   else web_status, breaker=verdict, local=kind == "local", **extra)


OK = _outcome("ok")


# -- rules: exception -> kind -----------------------------------------------------------------

def _api_kind(exc: BaseException) -> Optional[str]:
    if not isinstance(exc, APIError):
        return None
    if exc.local:
        return "local"
    if isinstance(exc, APIStatusError):
        return status_kind(exc.status_code)
    for cls, kind in _TIMEOUT_KINDS:
        if isinstance(exc, cls):
            return kind
    if isinstance(exc, APIResponseValidationError):
        return "invalid_response"
    return "connect"


#: The timeouts, most specific first: a slow first token and a stall are their own kinds.
_TIMEOUT_KINDS: Tuple[Tuple[type, str], ...] = (
    (FirstTokenTimeoutError, "ttft_timeout"),
    (StreamStallError, "stall"),
    (APITimeoutError, "timeout"),
)


_CALL_KINDS: Tuple[Tuple[type, str], ...] = (
    (CircuitOpenError, "circuit_open"),
    (RateLimitExceeded, "client_rate_limit"),
    (BudgetExceededError, "budget"),
    (NoHealthyNodeError, "no_healthy_node"),
    (AllAttemptsFailedError, "all_failed"),
    (InvalidRequestError, "invalid_request"),
    (ConfigError, "config"),
    (SharedStateUnavailableError, "shared_state"),
)


def _call_kind(exc: BaseException) -> Optional[str]:
    for cls, kind in _CALL_KINDS:
        if isinstance(exc, cls):
            return kind
    return None


#: Tried in order; the first that names a kind wins. New kinds (a slow first token, a
#: context window or content filter 400 recognised by its code) go here.
_RULES: List[Callable[[BaseException], Optional[str]]] = [_api_kind, _call_kind]


def status_kind(status_code: int) -> str:
    """The kind of an HTTP error status."""
    if status_code == 429:
        return "status_429"
    return "status_5xx" if status_code >= 500 else "status_4xx"


def classify_status(status_code: int, body: Any = None, *, should_retry: Optional[bool] = None) -> Outcome:
    """What an HTTP error status means; the server's ``x-should-retry`` wins on retrying."""
    retryable = status_code >= 500 or status_code in RETRYABLE_STATUSES
    if should_retry is not None:
        retryable = should_retry
    return _outcome(status_kind(status_code), retryable=retryable, status_code=status_code)


def classify(error: Optional[BaseException]) -> Outcome:
    """The meaning of ``error`` (None: a success)."""
    if error is None:
        return OK
    kind = "error"
    for rule in _RULES:
        found = rule(error)
        if found is not None:
            kind = found
            break
    retryable: Optional[bool] = None
    breaker: Optional[str] = None
    if isinstance(error, APIError):
        retryable = error.retryable  # set from classify_status / local_failure when it was built
    elif isinstance(error, AllAttemptsFailedError):
        breaker = _all_failed_verdict(error)
    retry_after_s = error.retry_after_s if isinstance(error, HolySheepError) else None
    return _outcome(kind, retryable=retryable, breaker=breaker, web_status=_web_status(error, kind),
                    retry_after_s=retry_after_s, status_code=getattr(error, "status_code", None),
                    stream_reason=stream_interrupt_reason(error) if isinstance(error, APIError) else None,
                    detail=str(error) if kind == "circuit_open" else "")


def _all_failed_verdict(error: AllAttemptsFailedError) -> str:
    if error.reason == RETRY_BUDGET_EXHAUSTED:
        # The client's own retry budget stopped it before the other nodes were tried:
        # that says nothing about the model (else one bad node of several, under a
        # burst, opens the model's breaker for every caller).
        return "none"
    return "failure" if any(a.kind in SYSTEM_FAILURE_KINDS for a in error.attempts) else "none"


def _web_status(error: BaseException, kind: str) -> int:
    # a node's 429, the client's own rate limit, or a spend cap: all say "later"; so does a
    # call whose every attempt failed with the last one throttled
    if isinstance(error, RateLimitError) or (isinstance(error, AllAttemptsFailedError)
                                             and isinstance(error.last_error, RateLimitError)):
        return 429
    # the AI service rejected the request itself: retrying cannot help
    if isinstance(error, (BadRequestError, NotFoundError, UnprocessableEntityError)):
        return 422
    if isinstance(error, APIError):
        return 503  # unavailable, or our own credentials refused: an operator's problem
    return KIND_TRAITS[kind].web_status


def stream_interrupt_reason(exc: APIError) -> str:
    """How a stream cut by ``exc`` after its first chunk is described (StreamInterruptedError.reason)."""
    if isinstance(exc, APITimeoutError):
        return "stall"
    if isinstance(exc, ResponseTooLargeError):
        return "too_large"
    if isinstance(exc, APIResponseValidationError):
        return "malformed"
    if isinstance(exc, APIStatusError):
        return "server_error"
    return "reset"


def failure_kind(exc: BaseException) -> str:
    """The stats/ejection bucket of a failed attempt ("local": it failed in this process)."""
    kind = _api_kind(exc)
    return "connect" if kind is None else kind


def breaker_verdict(error: Optional[BaseException]) -> str:
    """How a call's outcome counts for a breaker: "success", "failure" or "none"."""
    return classify(error).breaker


def throttled(wait_s: float) -> Outcome:
    """Every usable node asked us to wait at least ``wait_s`` (Retry-After)."""
    return _outcome("throttled", retry_after_s=wait_s)


def local_failure(message: str, node_id: Optional[str]) -> APIConnectionError:
    """The error for a failure in this process before the node was involved (a value
    http.client cannot encode, a closed client): final, held against neither node nor model."""
    return APIConnectionError(message, node_id=node_id, local=True, retryable=KIND_TRAITS["local"].retryable)


def describe(outcome: Outcome) -> Mapping[str, Any]:
    """``outcome`` as a plain dict (for logs and telemetry)."""
    return {"kind": outcome.kind, "retryable": outcome.retryable, "web_status": outcome.web_status,
            "retry_after_s": outcome.retry_after_s, "local": outcome.local}
