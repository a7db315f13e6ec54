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

from .errors import HolySheepError
from .policy.classify import classify

__all__ = ["ErrorResponse", "error_response"]


class ErrorResponse(NamedTuple):
    status: int
    body: Dict[str, Any]
    headers: Dict[str, str]


_WORDING = {
    429: ("rate_limited", "Too many requests to the AI service; retry later."),
    422: ("rejected", "The AI service rejected this request."),
    503: ("unavailable", "The AI service is unavailable; retry later."),
}


def _rate_limited(exc: HolySheepError) -> bool:
    """A node's 429, the client's own rate limit, or a spend cap: all say "later"."""
    return classify(exc).web_status == 429


def error_response(exc: HolySheepError) -> ErrorResponse:
    """429 for rate limits and spend budgets, 400 for a bad call argument, 422 when the AI
    service rejected the request itself (a final 400/404/422: retrying cannot help),
    503 otherwise (unavailable, or our own credentials refused: an operator's problem).
    The status is :func:`~holysheep_lb.policy.classify.classify`'s ``web_status``.

    A known wait becomes a ``Retry-After`` header (whole seconds, rounded up) and
    ``retry_after_s`` in the body.
    """
    outcome = classify(exc)
    status = outcome.web_status
    if status == 400:
        kind, message = "invalid_request", str(exc)
    else:
        status = status if status in _WORDING else 503
        kind, message = _WORDING[status]
    headers: Dict[str, str] = {}
    body: Dict[str, Any] = {"error": {"type": kind, "message": message}}
    retry_after_s = outcome.retry_after_s
    if (status not in (400, 422) and isinstance(retry_after_s, (int, float)) and math.isfinite(retry_after_s)
            and retry_after_s > 0):
        headers["Retry-After"] = str(math.ceil(retry_after_s))
        body["error"]["retry_after_s"] = round(float(retry_after_s), 3)
    return ErrorResponse(status, body, headers)
