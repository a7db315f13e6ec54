"""Per-call request options in openai-python's spelling: ``timeout=``, ``extra_headers=``,
``extra_query=`` and ``extra_body=``, checked once, before anything is sent.

openai-python lets a call carry its own timeout and extra headers, query parameters and
body fields; code written for it passes them as keyword arguments next to the API's own
parameters. Here each one is validated into a :class:`RequestOptions` that the call
pipeline carries on its :class:`~holysheep_lb.call.context.CallContext`:

- ``timeout``: seconds, or a ``(connect_s, read_s)`` pair, for each attempt (as in
  openai-python, where it bounds each request, retries included). The call's deadline
  still bounds the whole call: no attempt waits past it.
- ``extra_headers``: sent on every attempt of the call. They may not replace
  ``Authorization`` (each node is sent its own key) or the framing headers the HTTP
  library computes. Header *values* may be credentials: they are never shown in an
  error, a log line or a repr, nor in an error quoting what the node sent back
  (:mod:`holysheep_lb.redaction`; values from 8 characters on).
- ``extra_query``: appended to the request URL. The query string, and each of its
  values, is blanked like a header value in errors and in urllib3's log lines (which
  quote the URL).
- ``extra_body``: merged into the JSON body (its keys win over the call's parameters);
  the fields the client builds itself (``model``, ``messages``, ``input``, ``stream``)
  must be passed as arguments.

:func:`check_call_params` refuses openai-python *client* features passed per call that
this client does not implement (``max_retries=``, ``with_raw_response``...), and names
that look like a misspelt client-side argument (``extra_header=``), instead of sending
them to the server as body fields by accident. Any other name is an API parameter and
is sent as it is (``n``, ``logprobs``, ``top_k``, a gateway's own fields).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Collection, Dict, FrozenSet, Mapping, Optional, Tuple, Union
from urllib.parse import quote, urlencode

from .errors import REDACTED, InvalidRequestError
from .suggest import closest_name
from .validation import MAX_WAIT_S, check_json_value, latin1_size

__all__ = ["RequestOptions", "Timeout", "request_options", "check_call_params", "CLIENT_ONLY_ARGUMENTS",
           "RESERVED_HEADERS"]

#: ``timeout=``: seconds, or a (connect_s, read_s) pair.
Timeout = Union[float, Tuple[float, float]]

#: Headers a call may not set: credentials are per node, framing belongs to the HTTP library.
RESERVED_HEADERS: Mapping[str, str] = MappingProxyType({
    "authorization": "each node is sent its own API key (Client(api_key=...) or Node(api_key=...)); a per-call "
                     "Authorization header would send one credential to every node",
    "proxy-authorization": "proxy credentials belong to the proxy settings, not to one call",
    "host": "the HTTP library sets it from the node's base_url",
    "content-length": "the HTTP library computes it from the body",
    "transfer-encoding": "the HTTP library decides the framing",
    "connection": "connections are pooled per node",
})

#: openai-python client features passed per call that this client does not implement,
#: with what to do instead. Sent to the server they would be silently ignored (or a 400).
CLIENT_ONLY_ARGUMENTS: Mapping[str, str] = MappingProxyType({
    "max_retries": "retries are the client's: set Client(max_retries=...) or Client(retry=RetryPolicy(...)); "
                   "bound one call with deadline_s=",
    "with_raw_response": "not supported: the answer carries request_id, node_id and attempts",
    "with_streaming_response": "not supported: use stream=True",
    "with_options": "not supported: pass timeout=, extra_headers=... to the call",
    "raw_response": "not supported: the answer carries request_id, node_id and attempts",
    "stream_cls": "not supported: stream=True returns a ChatStream",
    "cast_to": "not supported: answers are Response objects (dicts that read by attribute)",
    "post_parser": "not supported: read the Response",
    "http_client": "transports are the client's (one pooled session per node)",
    "default_headers": "set Node(headers=...) for every call, or extra_headers= for this one",
    "default_query": "use extra_query=",
    "base_url": "set the nodes on the Client: Client(nodes=[...])",
    "api_key": "set Client(api_key=...) or Node(api_key=...)",
    "organization": "use extra_headers={'OpenAI-Organization': ...}",
    "project": "use extra_headers={'OpenAI-Project': ...}",
    "files": "not supported: file uploads are not part of this client",
})

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP header name (RFC 9110 token)
_MAX_HEADERS = 64
_MAX_HEADER_BYTES = 8 * 1024
_MAX_QUERY_BYTES = 8 * 1024
_NOT_SHOWN = "<not shown>"
_VERDICTS_MAX = 512  # names already judged: API parameters repeat, so each is judged once


@dataclass(frozen=True)
class RequestOptions:
    """One call's validated per-call options (see the module docstring)."""

    timeout: Optional[Tuple[float, float]] = None       # (connect_s, read_s)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # values may be secrets
    query: str = ""                                     # "?a=1&b=2", or ""
    body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def changes_request(self) -> bool:
        """Whether the request differs from a plain one in more than its body (so a cached
        answer to the plain request may not be the answer to this one)."""
        return bool(self.headers or self.query)


def request_options(*, timeout: Any = None, extra_headers: Any = None, extra_query: Any = None,
                    extra_body: Any = None, reserved_body: Collection[str] = ()) -> Optional[RequestOptions]:
    """The validated options, or None when none was given (the common case costs nothing).

    ``reserved_body`` names the body fields the call builds itself. Raises
    :class:`InvalidRequestError` naming the argument (and the header, key or field).
    """
    if timeout is None and extra_headers is None and extra_query is None and extra_body is None:
        return None
    return RequestOptions(
        timeout=None if timeout is None else _timeout(timeout),
        headers=MappingProxyType(_headers(extra_headers)) if extra_headers is not None else MappingProxyType({}),
        query=_query(extra_query) if extra_query is not None else "",
        body=MappingProxyType(_body(extra_body, reserved_body)) if extra_body is not None else MappingProxyType({}),
    )


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_WAIT_S:
        raise InvalidRequestError(name, value, f"must be a number of seconds > 0 and <= {MAX_WAIT_S:g} (24 h)")
    return float(value)


def _timeout(value: Any) -> Tuple[float, float]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InvalidRequestError("timeout", value, "must be seconds or a (connect_s, read_s) pair")
        return _seconds("timeout[0] (connect)", value[0]), _seconds("timeout[1] (read)", value[1])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = _seconds("timeout", value)
        return seconds, seconds
    raise InvalidRequestError("timeout", value, "must be seconds or a (connect_s, read_s) pair "
                                                "(httpx.Timeout objects are not supported)")


def _headers(value: Any) -> Dict[str, str]:
    if not isinstance(value, Mapping):  # not echoed: it may hold credentials
        raise InvalidRequestError("extra_headers", f"<{type(value).__name__}>", "must be a dict of str to str")
    if len(value) > _MAX_HEADERS:
        raise InvalidRequestError("extra_headers", f"<{len(value)} headers>", f"must hold at most {_MAX_HEADERS}")
    headers: Dict[str, str] = {}
    seen: Dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or not _TOKEN.match(name):
            shown = name if isinstance(name, str) and len(name) <= 64 and name.isprintable() else REDACTED
            raise InvalidRequestError("extra_headers", shown, "header names must be non-empty HTTP tokens "
                                                              "(letters, digits and !#$%&'*+-.^_`|~)")
        lower = name.lower()
        if lower in RESERVED_HEADERS:
            raise InvalidRequestError(f"extra_headers[{name!r}]", REDACTED,
                                      f"may not be set per call: {RESERVED_HEADERS[lower]}")
        if lower in seen:
            raise InvalidRequestError(f"extra_headers[{name!r}]", REDACTED,
                                      f"is given twice (also as {seen[lower]!r}; header names ignore case)")
        seen[lower] = name
        where = f"extra_headers[{name!r}]"  # the value is never shown: it may be a credential
        if not isinstance(text, str):
            raise InvalidRequestError(where, REDACTED, f"must be a string, not {type(text).__name__}")
        if any(c in text for c in "\r\n\x00"):
            raise InvalidRequestError(where, REDACTED, "must not contain CR, LF or NUL (header injection)")
        if text[:1] in (" ", "\t"):
            raise InvalidRequestError(where, REDACTED, "must not start with whitespace")
        size = latin1_size(text)
        if size is None:
            raise InvalidRequestError(where, REDACTED, "must be latin-1 text (HTTP headers cannot carry other "
                                                       "characters)")
        if size > _MAX_HEADER_BYTES:
            raise InvalidRequestError(where, REDACTED, f"must be at most {_MAX_HEADER_BYTES} bytes")
        headers[name] = text
    return headers


def _query_value(where: str, value: Any) -> str:
    if isinstance(value, bool):  # as httpx (openai-python) encodes them
        return "true" if value else "false"
    if isinstance(value, str) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return str(value)
    raise InvalidRequestError(where, REDACTED if isinstance(value, str) else f"<{type(value).__name__}>",
                              "must be a string, a number, a bool or a list of them")


def _query(value: Any) -> str:
    if not isinstance(value, Mapping):
        raise InvalidRequestError("extra_query", f"<{type(value).__name__}>", "must be a dict of str to values")
    pairs = []
    for key, item in value.items():
        if not isinstance(key, str) or not key or not key.isprintable():
            raise InvalidRequestError("extra_query", REDACTED, "keys must be non-empty printable strings")
        where = f"extra_query[{key!r}]"
        for one in (item if isinstance(item, (list, tuple)) else (item,)):
            pairs.append((key, _query_value(where, one)))
    try:
        query: Optional[str] = urlencode(pairs, quote_via=quote)
    except UnicodeEncodeError:  # a lone surrogate; raised after the except block: the error quotes the value
        query = None
    if query is None:
        raise InvalidRequestError("extra_query", REDACTED, "must be valid Unicode text")
    if len(query) > _MAX_QUERY_BYTES:
        raise InvalidRequestError("extra_query", f"<{len(query)} bytes>", f"must encode to at most "
                                                                          f"{_MAX_QUERY_BYTES} bytes")
    return "?" + query if query else ""


def _body(value: Any, reserved: Collection[str]) -> Dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequestError("extra_body", f"<{type(value).__name__}>", "must be a dict of JSON values")
    body: Dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise InvalidRequestError("extra_body", f"<{type(key).__name__} key>", "keys must be non-empty strings")
        if key in reserved:
            raise InvalidRequestError(f"extra_body[{key!r}]", REDACTED,
                                      f"is built by the client: pass {key}= as an argument of the call")
        check_json_value(f"extra_body.{key}", item)
        body[key] = item
    return body


# (param name, the call's client-side arguments) -> None (an API parameter) or the error's hint
_verdicts: Dict[Tuple[str, FrozenSet[str]], Optional[str]] = {}


def check_call_params(params: Mapping[str, Any], client_args: FrozenSet[str]) -> None:
    """Refuse a parameter that is an openai-python client feature this client lacks, or
    a near-miss of one of the call's own client-side arguments (``client_args``).

    Everything else is an API parameter, sent as it is. Verdicts are remembered (a
    bounded table), so a call's parameters are judged once per process.
    """
    for name in params:
        key = (name, client_args)
        hint = _verdicts.get(key, "")
        if hint == "":  # not judged yet
            hint = _judge(name, client_args)
            if len(_verdicts) < _VERDICTS_MAX:
                _verdicts[key] = hint
        if hint is not None:  # the value is not shown: a misspelt extra_headers= may hold credentials
            raise InvalidRequestError(name, _NOT_SHOWN, hint)


def _judge(name: str, client_args: FrozenSet[str]) -> Optional[str]:
    if name in CLIENT_ONLY_ARGUMENTS:
        return f"is an openai-python client option this client does not take per call: {CLIENT_ONLY_ARGUMENTS[name]}"
    best = closest_name(name, client_args)
    if best is not None and best != name and (_close(name, best) or name.startswith("extra_")):
        return f"unknown argument; did you mean `{best}`? (it would have been sent to the server as a body field)"
    if name.startswith("extra_"):  # openai-python's family of per-call options, never an API parameter
        known = ", ".join(f"`{a}`" for a in sorted(client_args) if a.startswith("extra_"))
        return f"unknown argument (this call takes {known})"
    return None


def _close(name: str, known: str) -> bool:
    """A near-miss, not merely a similar API parameter: the same name up to case, ``_``
    and ``-``, or one edit-ish away (``extra_header``, ``timeout_s``, ``deadline``)."""
    a, b = (s.lower().replace("_", "").replace("-", "") for s in (name, known))
    return a == b or difflib.SequenceMatcher(None, a, b).ratio() >= 0.85
