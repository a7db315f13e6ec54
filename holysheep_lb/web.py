"""The HTTP answer a web view should give when a call fails: 429, 400 or 503 with a JSON body.

    try:
        resp = client.chat_completion(...)
    except HolySheepError as exc:
        status, body, headers = error_response(exc)
        return jsonify(body), status, headers          # Flask; Django: JsonResponse(...)

The body never contains node addresses, attempt details or keys: log the exception for
those, and show callers only what they can act on.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple

from .errors import (
    AllAttemptsFailedError,
    BadRequestError,
    BudgetExceededError,
    HolySheepError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    RateLimitExceeded,
    UnprocessableEntityError,
)

__all__ = ["ErrorResponse", "error_response"]


class ErrorResponse(NamedTuple):
    status: int
    body: Dict[str, Any]
    headers: Dict[str, str]


def _rate_limited(exc: HolySheepError) -> bool:
    # a node's 429, the client's own rate limit, or a spend cap: all say "later"
    if isinstance(exc, (RateLimitError, RateLimitExceeded, BudgetExceededError)):
        return True
    # every attempt failed and the last one was throttled: the gateway is rate limiting us
    return isinstance(exc, AllAttemptsFailedError) and isinstance(exc.last_error, RateLimitError)


def error_response(exc: HolySheepError) -> ErrorResponse:
    """429 for rate limits and spend budgets, 400 for a bad call argument, 422 when the AI
    service rejected the request itself (a final 400/404/422: retrying cannot help),
    503 otherwise (unavailable, or our own credentials refused: an operator's problem).

    A known wait becomes a ``Retry-After`` header (whole seconds, rounded up) and
    ``retry_after_s`` in the body.
    """
    headers: Dict[str, str] = {}
    if _rate_limited(exc):
        status, kind, message = 429, "rate_limited", "Too many requests to the AI service; retry later."
    elif isinstance(exc, InvalidRequestError):
        status, kind, message = 400, "invalid_request", str(exc)
    elif isinstance(exc, (BadRequestError, NotFoundError, UnprocessableEntityError)):
        status, kind, message = 422, "rejected", "The AI service rejected this request."
    else:
        status, kind, message = 503, "unavailable", "The AI service is unavailable; retry later."
    body: Dict[str, Any] = {"error": {"type": kind, "message": message}}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if (status not in (400, 422) and isinstance(retry_after_s, (int, float)) and math.isfinite(retry_after_s)
            and retry_after_s > 0):
        headers["Retry-After"] = str(math.ceil(retry_after_s))
        body["error"]["retry_after_s"] = round(float(retry_after_s), 3)
    return ErrorResponse(status, body, headers)
