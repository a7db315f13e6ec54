"""Keeping credentials out of errors built from what a node sent, and out of logs.

A node may echo the request's ``Authorization`` header (a debugging proxy, a gateway
that quotes the bad key it refused) in an error body, in an error event inside a
stream, in a line of garbage, or in a header such as ``x-request-id``; it may echo the
other headers and the query string too, and urllib3 quotes the request's URL, query
included, in its connection errors and debug log lines. Every error built from
server-sent bytes or from the HTTP library's exceptions passes through one
:class:`Redactor` first: plain HTTP error bodies (``Transport.decode``), every stream
decode path and every translated exception alike; urllib3's log records made while one
of this client's requests is sent pass through it too (:func:`install_log_filter`).

What counts as a secret: the API key (always), and values that may be credentials from
:data:`MIN_SECRET_CHARS` characters on: node header values, a call's ``extra_headers``
values, the request's query string and each of its values, a proxy's user information.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Any, Collection, Iterable, List, Optional, Tuple, Union
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["REDACTED", "Redactor", "NO_REDACTION", "MIN_SECRET_CHARS", "proxy_secrets", "install_log_filter",
           "set_current"]

REDACTED = "[redacted]"
_REDACTED_RAW = REDACTED.encode()

#: A value that *may* be a credential (a header value, a query value) is blanked from this
#: many characters on: a shorter one is no credential worth the name, and blanking every
#: "1", "true" or "gzip" would garble the errors. The API key is blanked whatever its length.
MIN_SECRET_CHARS = 8

# A body cut short by a read cap may end inside the key: its first characters are
# blanked too, from this many on (fewer say nothing about the key).
_MIN_TAIL_CHARS = 6
_MAX_DEPTH = 32  # in decoded error bodies, what lies deeper is replaced by _TOO_DEEP
_TOO_DEEP = "[nested too deep]"


def _maybe_secrets(values: Iterable[Any]) -> List[str]:
    return [v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_CHARS]


class Redactor:
    """Replaces secrets in bytes, text and decoded JSON. Immutable, so thread-safe.

    ``key`` (the API key) is always a secret; ``others`` (values that may be credentials)
    count from :data:`MIN_SECRET_CHARS` characters on. Its repr never shows a secret;
    ``bool(redactor)`` says whether it has one.
    """

    __slots__ = ("_texts", "_raws")

    def __init__(self, key: Optional[str] = None, others: Iterable[str] = ()) -> None:
        self._set(([key] if key else []) + _maybe_secrets(others))

    def _set(self, secrets: Iterable[str]) -> None:
        # longest first: a secret inside another is blanked with it, not leaving the rest
        self._texts: Tuple[str, ...] = tuple(sorted(set(secrets), key=len, reverse=True))
        self._raws: Tuple[bytes, ...] = tuple(t.encode("utf-8", "surrogatepass") for t in self._texts)

    def __repr__(self) -> str:
        return f"<Redactor {len(self._texts)} secret(s)>" if self._texts else "<Redactor empty>"

    def __bool__(self) -> bool:
        return bool(self._texts)

    def plus(self, others: Iterable[str]) -> "Redactor":
        """This redactor and ``others`` (values that may be credentials); itself when none is new."""
        extra = [v for v in _maybe_secrets(others) if v not in self._texts]
        if not extra:
            return self
        new = Redactor.__new__(Redactor)
        new._set(self._texts + tuple(extra))
        return new

    def for_request(self, path: str, header_values: Collection[str] = ()) -> "Redactor":
        """This redactor for one request: also its query string (whole, and each value,
        decoded and as sent) and ``header_values`` (a call's own headers). Itself (no
        allocation) for a request with neither."""
        if not header_values and "?" not in path:
            return self
        secrets = list(header_values)
        query = path.partition("?")[2].partition("#")[0]
        if query:
            secrets.append(query)
            for pair in query.split("&"):
                secrets.append(pair.partition("=")[2])
            secrets.extend(value for _, value in parse_qsl(query, keep_blank_values=True))
        return self.plus(secrets)

    def raw(self, data: bytes, *, cut: bool = False) -> bytes:
        """``data`` with every occurrence of a secret blanked; with ``cut`` (a body read
        only up to a cap) also a secret cut short at its end."""
        if not self._raws or not data:
            return data
        for secret in self._raws:
            if secret in data:
                data = data.replace(secret, _REDACTED_RAW)
        if cut:
            for secret in self._raws:
                for n in range(len(secret) - 1, _MIN_TAIL_CHARS - 1, -1):
                    if data.endswith(secret[:n]):
                        return data[:-n] + _REDACTED_RAW
        return data

    def text(self, text: str) -> str:
        """``text`` with every occurrence of a secret blanked."""
        for secret in self._texts:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def value(self, value: Any, _depth: int = 0) -> Any:
        """A decoded JSON value with the secrets blanked in every string, keys included.

        Works on the decoded value as well as on the bytes: a JSON-escaped key
        (``\\u0073k-...``) only shows once decoded. Containers nested deeper than 32
        levels are replaced by ``"[nested too deep]"``.
        """
        if not self._texts:
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
        """Whether a secret shows anywhere in ``exc``: its text, its text attributes (urllib3
        keeps the request's URL in ``url``), its chain, exceptions in its args or attributes."""
        if not self._texts:
            return False
        pending: List[Any] = [exc]
        seen = set()
        while pending:
            item = pending.pop()
            if not isinstance(item, BaseException) or id(item) in seen:
                continue
            seen.add(id(item))
            attributes = list(getattr(item, "__dict__", {}).values())
            try:
                text = " ".join([str(item), repr(item), *(repr(v) for v in attributes if isinstance(v, (str, bytes)))])
            except Exception:  # noqa: BLE001 - an exception that cannot describe itself: assume the worst
                return True
            if any(secret in text for secret in self._texts):
                return True
            pending.extend([item.__cause__, item.__context__, *item.args, *attributes])
        return False

    def header(self, value: Optional[str]) -> Optional[str]:
        """A header value kept in an error (a request id), redacted; None stays None."""
        return None if value is None else self.text(value)


NO_REDACTION = Redactor(None)


def proxy_secrets(proxy_urls: Iterable[str]) -> List[str]:
    """What may quote a proxy's credentials: the URL, its ``user:password`` and password
    as written and decoded, and the ``Proxy-Authorization`` value requests makes of them
    (a proxy may echo it in an error page)."""
    out: List[str] = []
    for url in proxy_urls:
        if not isinstance(url, str):
            continue
        try:
            parts = urlsplit(url if "://" in url else "http://" + url)
            user, password = parts.username, parts.password
        except ValueError:  # unreadable: the whole URL is the secret
            out.append(url)
            continue
        userinfo = parts.netloc.rpartition("@")[0]
        if userinfo:
            plain = f"{unquote(user or '')}:{unquote(password or '')}"
            out += [url, userinfo, userinfo.partition(":")[2], unquote(password or ""), plain,
                    base64.b64encode(plain.encode("latin-1", "replace")).decode("ascii")]
    return out


# -- urllib3's log records ----------------------------------------------------------------------

_current = threading.local()


def set_current(redactor: Optional[Redactor]) -> None:
    """The redactor of the request this thread is sending now (None: none)."""
    _current.redactor = redactor


class _RedactingFilter(logging.Filter):
    """Passes urllib3's records made while this thread sends one of our requests through
    that request's redactor (urllib3 logs the request's URL, query string included).
    Records of anyone else's requests are left as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact: Optional[Redactor] = getattr(_current, "redactor", None)
        if redact:
            try:
                message = redact.text(record.getMessage())
            except Exception:  # noqa: BLE001 - a record that cannot be formatted: not shown at all
                message = f"(a {record.name} record that could not be formatted)"
            record.msg, record.args = message, ()
            if record.exc_info and not record.exc_text:
                record.exc_text = redact.text(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = _RedactingFilter()
_URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "urllib3.response", "urllib3.util.retry",
                    "urllib3.poolmanager")


def install_log_filter() -> None:
    """Put the filter on urllib3's loggers (a logger's filters see only its own records).
    Idempotent; costs nothing while those loggers are below their level."""
    for name in _URLLIB3_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
