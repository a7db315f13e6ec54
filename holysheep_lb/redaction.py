"""Keeping the API key out of errors built from what a node sent.

A node may echo the request's ``Authorization`` header (a debugging proxy, a gateway
that quotes the bad key it refused) in an error body, in an error event inside a
stream, in a line of garbage, or in a header such as ``x-request-id``. Every error
built from server-sent bytes passes them through one :class:`Redactor` first: plain
HTTP error bodies (``Transport.decode``) and every stream decode path alike.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional, Union

__all__ = ["REDACTED", "Redactor", "NO_REDACTION"]

REDACTED = "[redacted]"
_REDACTED_RAW = REDACTED.encode()

# A body cut short by a read cap may end inside the key: its first characters are
# blanked too, from this many on (fewer say nothing about the key).
_MIN_TAIL_CHARS = 6
_MAX_DEPTH = 32  # in decoded error bodies, what lies deeper is replaced by _TOO_DEEP
_TOO_DEEP = "[nested too deep]"


class Redactor:
    """Replaces one secret in bytes, text and decoded JSON. Immutable, so thread-safe.

    Its repr never shows the secret; ``bool(redactor)`` says whether it has one.
    """

    __slots__ = ("_text", "_raw")

    def __init__(self, secret: Optional[str]) -> None:
        self._text = secret or ""
        self._raw = self._text.encode("utf-8", "surrogatepass")

    def __repr__(self) -> str:
        return f"<Redactor {'armed' if self._text else 'empty'}>"

    def __bool__(self) -> bool:
        return bool(self._text)

    def raw(self, data: bytes, *, cut: bool = False) -> bytes:
        """``data`` with every occurrence of the secret blanked; with ``cut`` (a body
        read only up to a cap) also a key cut short at its end."""
        secret = self._raw
        if not secret or not data:
            return data
        data = data.replace(secret, _REDACTED_RAW)
        if cut:
            for n in range(len(secret) - 1, _MIN_TAIL_CHARS - 1, -1):
                if data.endswith(secret[:n]):
                    return data[:-n] + _REDACTED_RAW
        return data

    def text(self, text: str) -> str:
        """``text`` with every occurrence of the secret blanked."""
        secret = self._text
        if not secret or secret not in text:
            return text
        return text.replace(secret, REDACTED)

    def value(self, value: Any, _depth: int = 0) -> Any:
        """A decoded JSON value with the secret blanked in every string, keys included.

        Works on the decoded value as well as on the bytes: a JSON-escaped key
        (``\\u0073k-...``) only shows once decoded. Containers nested deeper than 32
        levels are replaced by ``"[nested too deep]"``.
        """
        if not self._text:
            return value
        if isinstance(value, str):
            return self.text(value)
        if _depth >= _MAX_DEPTH and isinstance(value, (dict, list)):
            return _TOO_DEEP  # not walked (nor encoded: that could exhaust the stack)
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.value(v, _depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, _depth + 1) for v in value]
        return value

    def body(self, data: Union[bytes, str], *, max_text_chars: int = 2000) -> Any:
        """An error body to keep: the decoded JSON, else the start of the text; redacted."""
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        raw = self.raw(raw, cut=True)
        try:
            decoded = json.loads(raw)
        except (ValueError, RecursionError):
            decoded = None
        if decoded is None:
            return self.text(raw.decode("utf-8", "replace"))[:max_text_chars]
        return self.value(decoded)

    def found_in(self, exc: BaseException) -> bool:
        """Whether the secret shows anywhere in ``exc``: its text, its chain, exceptions in its args."""
        if not self._text:
            return False
        pending: List[Any] = [exc]
        seen = set()
        while pending:
            item = pending.pop()
            if not isinstance(item, BaseException) or id(item) in seen:
                continue
            seen.add(id(item))
            try:
                text = f"{item!s} {item!r}"
            except Exception:  # noqa: BLE001 - an exception that cannot describe itself: assume the worst
                return True
            if self._text in text:
                return True
            pending.extend([item.__cause__, item.__context__, *item.args])
        return False

    def header(self, value: Optional[str]) -> Optional[str]:
        """A header value kept in an error (a request id), redacted; None stays None."""
        return None if value is None else self.text(value)


NO_REDACTION = Redactor(None)
