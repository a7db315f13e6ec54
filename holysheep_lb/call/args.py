"""Call arguments checked before anything is sent: a typed error names what was wrong."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from ..errors import InvalidRequestError
from ..urls import redact_url
from ..validation import check_count, check_deadline_s, check_json_value

__all__ = ["validate_call_options", "validate_first_token_timeout", "validate_messages", "validate_params",
           "validate_model", "validate_request", "MAX_MODEL_NAME_CHARS"]

# A model name keys breakers, rate limits and spend rows, in Redis too: bounded and printable.
MAX_MODEL_NAME_CHARS = 256
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def validate_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("model", model, "must be a non-empty string")
    if len(model) > MAX_MODEL_NAME_CHARS:
        raise InvalidRequestError("model", model, f"must be at most {MAX_MODEL_NAME_CHARS} characters long "
                                                  f"(got {len(model)})")
    if _CONTROL_CHARS.search(model):
        raise InvalidRequestError("model", model, "must not contain control characters")
    check_json_value("model", model)
    return model


def validate_request(method: Any, path: Any) -> None:
    if not isinstance(method, str) or method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        raise InvalidRequestError("method", method, "must be GET, POST, PUT, PATCH or DELETE")
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in "\r\n \t"):
        shown = redact_url(path) if isinstance(path, str) else f"<{type(path).__name__}>"
        raise InvalidRequestError("path", shown, "must start with '/' and contain no whitespace")


def validate_call_options(*, region: Any, deadline_s: Any, idempotency_key: Any) -> None:
    check_deadline_s(deadline_s)
    if region is not None and not isinstance(region, str):
        raise InvalidRequestError("region", region, "must be a string")
    check_json_value("region", region)
    key = idempotency_key
    if key is not None and (not isinstance(key, str) or not key or len(key) > 255 or not key.isascii()
                            or any(c in key for c in "\r\n\x00")):
        raise InvalidRequestError("idempotency_key", key, "must be 1-255 printable ASCII characters without CR/LF")


def validate_messages(messages: Any) -> None:
    # ``type(x) is list/dict`` first: the common case, and far cheaper than the ABC checks
    if type(messages) is not list and (isinstance(messages, (str, bytes, Mapping))
                                       or not isinstance(messages, Sequence)) or not messages:
        raise InvalidRequestError("messages", messages, "must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if type(m) is not dict and not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}]", m, "must be a dict with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role", role, "is required and must be a non-empty string")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"messages[{i}].content", content, "must be a string, a list of parts or None")
        for key, value in m.items():
            if type(value) is not str or not value.isascii():  # ASCII text: nothing to check
                check_json_value(f"messages[{i}].{key}", value)


def validate_params(params: Mapping[str, Any]) -> None:
    for name in ("max_tokens", "max_completion_tokens", "n"):
        check_count(name, params.get(name))
    if "temperature" in params and params["temperature"] is not None:
        v = params["temperature"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 2:
            raise InvalidRequestError("temperature", v, "must be a number from 0 to 2")
    for name, value in params.items():
        check_json_value(name, value)


def validate_first_token_timeout(value: Any, stream: Any) -> None:
    """A call's ``first_token_timeout_s``: seconds, for a stream only."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise InvalidRequestError("first_token_timeout_s", value, "must be a number of seconds > 0 and <= 86400")
    if not stream:
        raise InvalidRequestError("first_token_timeout_s", value, "applies to stream=True only")
