"""Server-sent events on the wire: parsing, decoding, and opening a stream up to its first chunk.

Until its first chunk a stream is an ordinary attempt of the client's attempt loop
(failover, backoff, deadline): :func:`open_stream` is that attempt, and every failure
in it is a typed, retryable-as-usual error. What an error keeps of the node's bytes
passes through the transport's :class:`~holysheep_lb.redaction.Redactor`.
"""

from __future__ import annotations

import enum
import json
import logging
from collections import deque
from typing import Any, Callable, Collection, Deque, Dict, Iterator, List, Mapping, NamedTuple, Optional, Union

import requests

from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    FirstTokenTimeoutError,
    ResponseTooLargeError,
    StreamStallError,
)
from .policy.classify import status_error
from .redaction import NO_REDACTION, Redactor
from .transport import Transport
from .types import ChatCompletionChunk

__all__ = ["SSEEvent", "SSEParser", "decode_event", "EventReader", "OpenedStream", "open_stream", "close_response",
           "STREAM_HEADERS", "End", "MAX_SKIPPED_EVENTS", "error_event_status"]

log = logging.getLogger(__name__)

#: Request headers of a streaming call. ``identity``: a compressing proxy may buffer
#: an event stream to fill its compression window, delaying every chunk.
STREAM_HEADERS = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}

#: How many events that do not parse a stream may skip; one more is a broken stream.
MAX_SKIPPED_EVENTS = 8

_FIELDS_IGNORED = frozenset({"id", "retry"})
_BOM = b"\xef\xbb\xbf"


class SSEEvent(NamedTuple):
    """One server-sent event: its ``event:`` type (None when absent) and joined ``data:``."""

    event: Optional[str]
    data: str


class SSEParser:
    """Incremental parser of a ``text/event-stream`` body; strict about garbage.

    Lines end in LF or CRLF. Comment lines (``:`` keepalives) and ``id``/``retry``
    fields are skipped; ``data`` lines are joined with newlines; a blank line ends an
    event. A line that is neither, or is not UTF-8, is an
    :class:`APIResponseValidationError`: the events completed before it are returned
    first, the error is kept in ``error`` and raised by the next ``feed`` (so it surfaces
    where it occurred, however the bytes were split). More than ``max_bytes`` in all
    raises :class:`ResponseTooLargeError`. ``redact`` blanks the API key in what an
    error quotes. Not thread-safe (one per stream).
    """

    def __init__(self, *, node_id: Optional[str] = None, max_bytes: int = 16 * 1024 * 1024,
                 redact: Redactor = NO_REDACTION) -> None:
        self.node_id = node_id
        self.max_bytes = max_bytes
        self.redact = redact
        self.bytes_seen = 0
        self._first_line = True
        self._buffer = bytearray()
        self._data: List[str] = []
        self._event: Optional[str] = None
        self.error: Optional[APIResponseValidationError] = None

    def feed(self, chunk: bytes) -> List[SSEEvent]:
        """Add bytes; return the events they completed (possibly none)."""
        if self.error is not None:
            raise self.error
        self.bytes_seen += len(chunk)
        if self.bytes_seen > self.max_bytes:
            raise ResponseTooLargeError(f"stream exceeds max_response_bytes={self.max_bytes}",
                                        node_id=self.node_id)
        buf = self._buffer
        buf += chunk
        events: List[SSEEvent] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end])
            if self._first_line:  # a BOM may come split over reads: strip it from the whole first line
                self._first_line = False
                if line.startswith(_BOM):
                    line = line[len(_BOM):]
            start = end + 1
            try:
                event = self._line(line[:-1] if line.endswith(b"\r") else line)
            except APIResponseValidationError as exc:
                self.error = exc
                buf.clear()
                if not events:
                    raise
                return events
            if event is not None:
                events.append(event)
        if start:
            del buf[:start]
        return events

    def _line(self, raw: bytes) -> Optional[SSEEvent]:
        if not raw:
            if not self._data:
                self._event = None
                return None
            event = SSEEvent(self._event, "\n".join(self._data))
            self._data = []
            self._event = None
            return event
        if raw.startswith(b":"):
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = None
        if line is None:  # raised outside the except: the decode error would carry the raw bytes
            raise self._garbage(raw, "not UTF-8")
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        elif name not in _FIELDS_IGNORED:
            raise self._garbage(raw, "not an SSE field")
        return None

    def _garbage(self, raw: bytes, why: str) -> APIResponseValidationError:
        quoted = self.redact.raw(raw)[:80]
        return APIResponseValidationError(f"malformed SSE line {quoted!r}: {why}", node_id=self.node_id)


def decode_event(event: SSEEvent, node_id: Optional[str] = None, *,
                 redact: Redactor = NO_REDACTION) -> Optional[Dict[str, Any]]:
    """The chunk dict an event carries; None for ``data: [DONE]``.

    Raises :class:`APIResponseValidationError` when the data is not a JSON object, and
    the typed status error (5xx unless the error names a 4xx/5xx code) for an error
    event, which some gateways send inside a stream instead of an HTTP status. What an
    error keeps of the node's bytes passes through ``redact`` (as HTTP error bodies do).
    """
    if event.data.strip() == "[DONE]":
        return None
    try:
        obj = json.loads(event.data)
        valid = True
    except (ValueError, RecursionError):
        valid = False
    if not valid:  # raised outside the except: a JSONDecodeError's ``doc`` is the unredacted data
        quoted = redact.text(event.data)[:80]
        raise APIResponseValidationError(f"malformed SSE data (not JSON): {quoted!r}", node_id=node_id)
    if not isinstance(obj, dict):
        raise APIResponseValidationError(f"malformed SSE data: expected a JSON object, got "
                                         f"{type(obj).__name__}", node_id=node_id)
    if event.event == "error" or (obj.get("error") is not None and "choices" not in obj):
        obj = redact.value(obj)
        raise status_error(error_event_status(obj), obj, node_id=node_id, request_id=None, headers={})
    return ChatCompletionChunk(obj)


#: What the ``code`` or ``type`` string of an error event means as an HTTP status
#: (OpenAI, Anthropic-compatible, vLLM and sglang servers name their errors so).
_ERROR_NAME_STATUS = {
    "invalid_request_error": 400, "context_length_exceeded": 400, "content_policy_violation": 400,
    "content_filter": 400, "invalid_prefill": 400, "bad_request": 400, "badrequesterror": 400,
    "authentication_error": 401, "invalid_api_key": 401, "permission_error": 403, "permission_denied": 403,
    "not_found_error": 404, "model_not_found": 404, "rate_limit_error": 429, "rate_limit_exceeded": 429,
    "insufficient_quota": 429, "overloaded_error": 529, "server_error": 500, "internal_error": 500,
    "api_error": 500, "timeout": 504,
}


def error_event_status(obj: Mapping[str, Any]) -> int:
    """The HTTP status an error event inside a 200 stream stands for (500 when it names none).

    Read from a numeric ``code``/``status``/``status_code`` (400-599) of the error or the
    event, else from its ``code`` or ``type`` name (``rate_limit_exceeded`` -> 429, ...).
    """
    err = obj.get("error")
    places = [err, obj] if isinstance(err, dict) else [obj]
    for place in places:
        for key in ("code", "status", "status_code"):
            value = place.get(key)
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
                return value
    for place in places:
        for key in ("code", "type"):
            value = place.get(key)
            if isinstance(value, str) and value.lower() in _ERROR_NAME_STATUS:
                return _ERROR_NAME_STATUS[value.lower()]
    return 500


class End(enum.Enum):
    """How a stream's body ended, when it did not bring a chunk."""

    DONE = "done"  # data: [DONE]
    EOF = "eof"    # the body ended


# ------------------------------------------------------------------ reading events


class EventReader:
    """Events of one open response, with a clock-checked deadline for the next event.

    The socket timeout bounds each read; this deadline also catches a node that keeps
    the connection alive with comments but sends no event. A timeout before the first
    chunk raises :class:`FirstTokenTimeoutError`, after it :class:`StreamStallError`.
    :meth:`next_chunk` skips (and counts in ``skipped_events``) events whose data does
    not parse, up to ``max_skipped_events``; it logs the first one of the stream.
    """

    def __init__(self, chunks: Iterator[bytes], parser: SSEParser, clock: Callable[[], float], *,
                 max_skipped_events: int = MAX_SKIPPED_EVENTS) -> None:
        self._chunks = chunks
        self._parser = parser
        self._clock = clock
        self._pending: Deque[SSEEvent] = deque()
        self._eof = False
        self.deadline = float("inf")
        self._waiting_for = "event"
        self._timeout_s = 0.0
        self._first_token = False
        self.max_skipped_events = max_skipped_events
        self.skipped_events = 0

    @property
    def redact(self) -> Redactor:
        return self._parser.redact

    def expect(self, what: str, timeout_s: float, *, first_token: bool = False) -> None:
        """The next event must start arriving within ``timeout_s`` from now."""
        self._waiting_for = what
        self._timeout_s = timeout_s
        self._first_token = first_token
        self.deadline = self._clock() + timeout_s

    def _timeout(self, cause: Optional[APITimeoutError] = None) -> APITimeoutError:
        node_id = self._parser.node_id
        message = f"no {self._waiting_for} within {self._timeout_s:g} s"
        if cause is not None and cause.message:
            message += f" ({cause.message})"
        if self._first_token:
            return FirstTokenTimeoutError(message, timeout_s=self._timeout_s, node_id=node_id)
        return StreamStallError(message, timeout_s=self._timeout_s, node_id=node_id)

    def next_event(self) -> Optional[SSEEvent]:
        """The next event, or None at the end of the body. Raises typed APIErrors."""
        while not self._pending:
            if self._parser.error is not None:
                raise self._parser.error
            if self._eof:
                return None
            try:
                chunk = next(self._chunks, None)
            except (FirstTokenTimeoutError, StreamStallError):
                raise
            except APITimeoutError as exc:  # the socket's read timeout: the same limit, typed
                raise self._timeout(exc) from exc
            if chunk is None:
                self._eof = True
                return None
            self._pending.extend(self._parser.feed(chunk))
            if not self._pending and self._clock() > self.deadline:
                raise self._timeout()
        return self._pending.popleft()

    def next_chunk(self) -> Union[Dict[str, Any], End]:
        """The next chunk dict, or how the body ended; skips events that do not parse.

        An error event raises its typed status error; more than ``max_skipped_events``
        bad events raise :class:`APIResponseValidationError`.
        """
        node_id = self._parser.node_id
        while True:
            event = self.next_event()
            if event is None:
                return End.EOF
            try:
                chunk = decode_event(event, node_id, redact=self.redact)
            except APIResponseValidationError as exc:
                self.skipped_events += 1
                if self.skipped_events > self.max_skipped_events:
                    raise APIResponseValidationError(
                        f"more than {self.max_skipped_events} events that do not parse; the last: {exc.message}",
                        node_id=node_id) from exc
                if self.skipped_events == 1:
                    log.warning("node %s: skipped an event that does not parse (%s); further ones in this "
                                "stream are counted, not logged", node_id, exc.message)
                continue
            return End.DONE if chunk is None else chunk

    def drain(self, max_bytes: int) -> bool:
        """Read what is left of the body (after [DONE]); True when it ended cleanly."""
        seen = 0
        for chunk in self._chunks:
            seen += len(chunk)
            if seen > max_bytes:
                return False
        self._eof = True
        return True

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class OpenedStream(NamedTuple):
    """A response whose first chunk has arrived: the result of one streaming attempt."""

    response: requests.Response
    reader: EventReader
    first_chunk: Optional[Dict[str, Any]]  # None: the stream was empty ([DONE] at once)
    status_code: int
    request_id: Optional[str]
    ttft_ms: float        # this attempt's time to first chunk: the node's latency sample
    first_chunk_at: float  # clock() when it arrived


def open_stream(
    transport: Transport,
    method: str,
    path: str,
    *,
    body: Optional[bytes],
    headers: Optional[Mapping[str, str]],
    connect_timeout_s: float,
    first_chunk_timeout_s: float,
    clock: Callable[[], float],
    max_bytes: int,
    secrets: Collection[str] = (),
) -> OpenedStream:
    """One streaming attempt: send, check the status, read until the first chunk.

    Every failure is a typed, retryable-as-usual APIError (connection errors, 5xx, 429,
    malformed SSE, an error event), and the response is closed before it propagates.
    No first chunk within ``first_chunk_timeout_s`` (headers included) raises
    :class:`FirstTokenTimeoutError` (kind ``"ttft_timeout"``). Blocks; holds no lock.
    ``secrets``: values of the request that may be credentials (see ``Transport.open``).
    """
    started = clock()
    node_id = transport.node.id
    try:
        response = transport.open(method, path, body=body, headers=headers,
                                  timeout_s=(connect_timeout_s, first_chunk_timeout_s),
                                  deadline_s=first_chunk_timeout_s, secrets=secrets)
    except FirstTokenTimeoutError:
        raise
    except APITimeoutError as exc:
        if not exc.request_sent:  # a connect timeout: not the first token's
            raise
        raise FirstTokenTimeoutError(f"no first chunk within {first_chunk_timeout_s:g} s ({exc.message})",
                                     timeout_s=first_chunk_timeout_s, node_id=node_id) from exc
    redact = transport.redactor_of(response)
    try:
        transport.raise_for_error_status(response)
        request_id = redact.header(response.headers.get("x-request-id") or response.headers.get("request-id"))
        _check_event_stream(response, node_id, request_id)
        parser = SSEParser(node_id=node_id, max_bytes=max_bytes, redact=redact)
        reader = EventReader(transport.iter_bytes(response), parser, clock)
        reader.expect("first chunk", first_chunk_timeout_s - (clock() - started), first_token=True)
        got = reader.next_chunk()
        if got is End.EOF:
            raise APIConnectionError("the stream ended before its first chunk", node_id=node_id)
        first = None if got is End.DONE else got
        transport.end_deadline(response)  # committed: the stall timeout governs from here
        now = clock()
    except BaseException:
        close_response(response)
        raise
    return OpenedStream(response, reader, first, response.status_code, request_id, (now - started) * 1000.0, now)


def _check_event_stream(response: requests.Response, node_id: str, request_id: Optional[str]) -> None:
    """A JSON document is not an event stream (a node that ignored ``stream: true``)."""
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        raise APIResponseValidationError(
            f"expected text/event-stream, got a {media_type} document", node_id=node_id,
            status_code=response.status_code, request_id=request_id)


def close_response(response: requests.Response) -> None:
    """Close a stream's response; a broken socket failing to close is only logged."""
    try:
        response.close()
    except Exception:  # noqa: BLE001 - closing a broken socket; the stream's outcome is already known
        log.debug("error while closing a stream's response", exc_info=True)
