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

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Type

from ..errors import (
    AllAttemptsFailedError,
    AuthenticationError,
    ContentFilterError,
    ContextWindowExceededError,
    InternalServerError,
    PermissionDeniedError,
    error_message,
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
    "SILENT_EVERYWHERE",
    "THROTTLED_EVERYWHERE",
    "OK",
    "classify",
    "classify_status",
    "status_error",
    "failure_kind",
    "breaker_verdict",
    "stream_interrupt_reason",
    "throttled",
    "local_failure",
]

#: ``AllAttemptsFailedError.reason`` of a call whose retries the retry budget refused.
RETRY_BUDGET_EXHAUSTED = "retry budget exhausted"
#: ``AllAttemptsFailedError.reason`` prefixes of a model that every route refused in a way
#: another model may not: all went silent, or all throttled it (429).
SILENT_EVERYWHERE = "every route of the model went silent"
THROTTLED_EVERYWHERE = "every node is throttled"

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
    # 4xx the error body names: the request does not fit this model's context window, or
    # its content filter refused it. Final on this model; the chain may route the first
    # to a larger-context model (context_window_fallbacks), the second only when told
    # (content_policy_fallbacks).
    "context_window": KindTraits(retryable=False, breaker="success"),
    "content_filter": KindTraits(retryable=False, breaker="success"),
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

#: Kinds that say a route went silent once its request was sent (a read timeout too,
#: when ``request_sent``): the route is not tried again in the same call.
_SILENT_KINDS = frozenset({"ttft_timeout", "stall"})

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
    silent: bool = False                 # the route went silent after the request was sent
    # why another model may answer although this one is not broken:
    # "silent", "throttled", "context_window" or "content_filter"
    reroute: Optional[str] = None
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
        named = getattr(type(exc), "kind", None)  # ContextWindowExceededError, ContentFilterError
        return named if isinstance(named, str) and named in KIND_TRAITS else status_kind(exc.status_code)
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


#: Error codes/types (lower case) and message patterns of common servers (OpenAI,
#: Azure, Anthropic-compatible, vLLM, sglang, TGI, Bedrock/Vertex gateways) that say a
#: 4xx is a context-window overflow or a content-filter refusal.
_CONTEXT_CODES = frozenset({"context_length_exceeded", "context_window_exceeded", "string_above_max_length",
                            "model_context_window_exceeded", "prompt_too_long", "input_too_long"})
_CONTEXT_TEXT = re.compile(
    r"context[ _]length|context[ _]window|maximum context|max(imum)?_?model_?len|prompt is too long"
    r"|input is too long|too many input tokens|reduce the length of the (messages|prompt|input)"
    r"|input length .{0,40}exceed|exceeds? the model'?s? (context|maximum context)",
    re.IGNORECASE)
_FILTER_CODES = frozenset({"content_filter", "content_policy_violation", "responsibleaipolicyviolation",
                           "content_filtered", "safety", "moderation_blocked", "prompt_blocked"})
_FILTER_TEXT = re.compile(
    r"content[ _]filter|content[ _]management[ _]policy|content[ _]policy|safety system|flagged by"
    r"|responsible ?ai ?policy|blocked (due to|by) (safety|moderation)", re.IGNORECASE)
_NAMED_4XX = frozenset({400, 403, 413, 422})


def _body_kind(status_code: int, body: Any) -> Optional[str]:
    """"context_window" or "content_filter" when the error body says so, else None."""
    if status_code not in _NAMED_4XX or body is None:
        return None
    words: List[str] = []
    texts: List[str] = []
    places = [body]
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping):
            places.append(err)
            inner = err.get("innererror")
            if isinstance(inner, Mapping):
                places.append(inner)
        elif isinstance(err, str):
            texts.append(err)
    for place in places:
        if not isinstance(place, Mapping):
            texts.append(str(place)[:2000])
            continue
        for key in ("code", "type"):
            value = place.get(key)
            if isinstance(value, str):
                words.append(value.lower())
        for key in ("message", "detail"):
            value = place.get(key)
            if isinstance(value, str):
                texts.append(value[:2000])
    if any(w in _FILTER_CODES for w in words):
        return "content_filter"
    if any(w in _CONTEXT_CODES for w in words):
        return "context_window"
    text = " ".join(texts)
    if _CONTEXT_TEXT.search(text):
        return "context_window"
    if _FILTER_TEXT.search(text):
        return "content_filter"
    return None


def classify_status(status_code: int, body: Any = None, *, should_retry: Optional[bool] = None) -> Outcome:
    """What an HTTP error status (and its error body) means; the server's ``x-should-retry``
    wins on retrying, except for a context-window or content-filter 4xx (never retried)."""
    kind = _body_kind(status_code, body)
    if kind is not None:
        return _outcome(kind, status_code=status_code)
    retryable = status_code >= 500 or status_code in RETRYABLE_STATUSES
    if should_retry is not None:
        retryable = should_retry
    return _outcome(status_kind(status_code), retryable=retryable, status_code=status_code)


_STATUS_CLASSES: Dict[int, Type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}

# 4xx the body names more precisely (see _body_kind)
_KIND_CLASSES: Dict[str, Type[APIStatusError]] = {
    "context_window": ContextWindowExceededError,
    "content_filter": ContentFilterError,
}


def status_error(
    status_code: int,
    body: Any,
    *,
    node_id: Optional[str],
    request_id: Optional[str],
    headers: Mapping[str, str],
    retry_after_s: Optional[float] = None,
    should_retry: Optional[bool] = None,
) -> APIStatusError:
    """Build the typed error for an HTTP error status: its class from the status and the
    body's kind, its ``retryable`` from :func:`classify_status` (the one place for both)."""
    outcome = classify_status(status_code, body, should_retry=should_retry)
    if status_code >= 500:
        cls: Type[APIStatusError] = InternalServerError
    else:
        cls = _KIND_CLASSES.get(outcome.kind) or _STATUS_CLASSES.get(status_code, APIStatusError)
    kw: Dict[str, Any] = dict(status_code=status_code, body=body, request_id=request_id, node_id=node_id,
                              headers=headers, retryable=outcome.retryable)
    if cls is RateLimitError:
        kw["retry_after_s"] = retry_after_s
    return cls(error_message(body, status_code), **kw)


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
    silent = kind in _SILENT_KINDS or (kind == "timeout" and isinstance(error, APITimeoutError)
                                       and error.request_sent)
    return _outcome(kind, retryable=retryable, breaker=breaker, web_status=_web_status(error, kind),
                    retry_after_s=retry_after_s, status_code=getattr(error, "status_code", None), silent=silent,
                    reroute=_reroute(error, kind),
                    stream_reason=stream_interrupt_reason(error) if isinstance(error, APIError) else None,
                    detail=str(error) if kind == "circuit_open" else "")


def _reroute(error: BaseException, kind: str) -> Optional[str]:
    if kind in ("context_window", "content_filter"):
        return kind
    if isinstance(error, AllAttemptsFailedError):
        if error.reason.startswith(SILENT_EVERYWHERE):
            return "silent"
        if error.reason.startswith(THROTTLED_EVERYWHERE):
            return "throttled"
    return None


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
