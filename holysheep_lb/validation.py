"""Limits on call arguments that every later step relies on, checked once before anything runs.

The JSON encoder, the token estimators, the cache key and the rate limiters all walk a
call's messages and parameters. Checked here, once, they never meet a value they
cannot handle, so a bad argument is an :class:`~holysheep_lb.errors.InvalidRequestError`
naming it instead of a ``RecursionError``, ``UnicodeEncodeError`` or ``OverflowError``
from deep inside the client:

- ``deadline_s`` (and every timeout setting) is finite, > 0 and at most
  :data:`MAX_WAIT_S` (24 hours): threads cannot wait for much longer, and no API
  call should;
- token counts (``max_tokens``, ``n``...) are at most :data:`MAX_COUNT`;
- JSON values nest at most :data:`MAX_JSON_DEPTH` levels and their text is valid
  Unicode (no lone surrogate, which UTF-8 cannot encode);
- a header value (a node's, a call's ``extra_headers``, the API key) is latin-1 text
  (:func:`latin1_size`).
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Tuple

from .errors import InvalidRequestError

__all__ = ["MAX_WAIT_S", "MAX_COUNT", "MAX_JSON_DEPTH", "check_deadline_s", "check_count", "check_json_value",
           "latin1_size"]

#: The longest deadline or timeout accepted, in seconds (24 hours).
MAX_WAIT_S = 86_400.0
#: The largest token count or choice count accepted (2**31 - 1).
MAX_COUNT = 2**31 - 1
#: How deeply a JSON argument may nest (objects and arrays); tool schemas need ~10.
MAX_JSON_DEPTH = 64


def check_deadline_s(value: Any) -> None:
    """A per-call ``deadline_s``: None, or a finite number of seconds in (0, 24 h]."""
    if value is None:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 < value <= MAX_WAIT_S):
        raise InvalidRequestError("deadline_s", value, f"must be a number of seconds > 0 and <= {MAX_WAIT_S:g} (24 h)")


def check_count(name: str, value: Any) -> None:
    """A positive integer count such as ``max_tokens`` (None: not given)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_COUNT:
        # repr() of a huge int is slow, and refused past 4300 digits
        huge = isinstance(value, int) and value.bit_length() >= 64
        shown = f"<an int of {value.bit_length()} bits>" if huge else value
        raise InvalidRequestError(name, shown, f"must be a positive integer <= {MAX_COUNT}")


def check_json_value(name: str, value: Any) -> None:
    """Raise InvalidRequestError for a value nested too deeply or holding a lone surrogate.

    The error names where: ``name`` followed by the path to the bad text, such as
    ``messages[1].content[0].text`` (or ``... key`` for a dict key). Iterative (a deep
    value cannot exhaust the stack here) and linear in the size of the value; a value
    that contains itself is reported as too deep. Other JSON problems (types, NaN) are
    left to the encoder, which names them too.
    """
    if isinstance(value, str):  # the common case, and the cheap one
        _check_text(name, value)
        return
    if not isinstance(value, (Mapping, list, tuple)):
        return
    stack: List[Tuple[Any, int, str]] = [(value, 1, name)]
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequestError(name, f"<nested more than {MAX_JSON_DEPTH} levels deep>",
                                      f"must nest at most {MAX_JSON_DEPTH} levels of objects and arrays")
        mapping = isinstance(item, Mapping)
        children = item.items() if mapping else enumerate(item)
        for key, child in children:
            if isinstance(key, str) and not key.isascii():
                _check_text(f"{path} key", key)
            if isinstance(child, str):
                if not child.isascii():
                    _check_text(f"{path}.{key}" if mapping else f"{path}[{key}]", child)
            elif isinstance(child, (Mapping, list, tuple)):
                stack.append((child, depth + 1, f"{path}.{key}" if mapping else f"{path}[{key}]"))


def _check_text(name: str, text: str) -> None:
    if text.isascii():  # O(1) in CPython: the string knows it
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            name, text[max(0, exc.start - 20): exc.start + 20],
            f"must be valid Unicode text: U+{ord(text[exc.start]):04X} at position {exc.start} is a lone "
            "surrogate, which UTF-8 cannot encode (was the text decoded with errors='surrogateescape'?)",
        ) from None


def latin1_size(text: str) -> Optional[int]:
    """The size in bytes of ``text`` as an HTTP header value, or None when latin-1 cannot
    encode it. Returns rather than raises: an error raised while the UnicodeEncodeError is
    being handled would keep it as its ``__context__``, and it quotes the whole text (a key)."""
    try:
        return len(text.encode("latin-1"))
    except UnicodeEncodeError:
        return None
