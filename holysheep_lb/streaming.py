"""Streaming chat completions: an SSE parser and the stream object ``stream=True`` returns.

Until its first chunk a stream is an ordinary attempt of the client's attempt loop
(failover, backoff, deadline): :func:`open_stream` is that attempt. Once the first
chunk has reached the caller the call is committed (as in gRPC): a broken stream raises
:class:`~holysheep_lb.errors.StreamInterruptedError` with the partial text and is never
retried.

Each stream holds one node pick and one pooled connection. :class:`StreamLease`
releases both exactly once, whether the stream completes, breaks, is closed, or is
garbage-collected; in the last case the release is handed to a :class:`StreamReaper`
and done by the client's next call, never inside the garbage collector (which may run
while any lock of that thread is held).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, NamedTuple, NoReturn, Optional, Sequence, Tuple

import requests

from .cleanup import call_each
from .errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    Attempt,
    ResponseTooLargeError,
    StreamInterruptedError,
    status_error,
)
from .nodes import NodeState
from .redaction import NO_REDACTION, Redactor
from .selection import Selector
from .stats import LatencyHistogram
from .transport import Transport

__all__ = [
    "SSEEvent",
    "SSEParser",
    "decode_event",
    "open_stream",
    "OpenedStream",
    "StreamLease",
    "StreamOutcome",
    "StreamReaper",
    "StreamStats",
    "ChatStream",
    "STREAM_HEADERS",
]

log = logging.getLogger(__name__)

#: Request headers of a streaming call. ``identity``: a compressing proxy may buffer
#: an event stream to fill its compression window, delaying every chunk.
STREAM_HEADERS = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}

_FIELDS_IGNORED = frozenset({"id", "retry"})
_BOM = b"\xef\xbb\xbf"
_DRAIN_TIMEOUT_S = 1.0  # after [DONE], how long to wait for the end of the body
_DRAIN_MAX_BYTES = 64 * 1024


# --------------------------------------------------------------------------- SSE


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
        err = obj.get("error")
        code = err.get("code") if isinstance(err, dict) else None
        status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 500
        raise status_error(status, obj, node_id=node_id, request_id=None, headers={})
    return obj


# ------------------------------------------------------------------ reading events


class _EventReader:
    """Events of one open response, with a clock-checked deadline for the next event.

    The socket timeout bounds each read; this deadline also catches a node that keeps
    the connection alive with comments but sends no event.
    """

    def __init__(self, chunks: Iterator[bytes], parser: SSEParser, clock: Callable[[], float]) -> None:
        self._chunks = chunks
        self._parser = parser
        self._clock = clock
        self._pending: Deque[SSEEvent] = deque()
        self._eof = False
        self.deadline = float("inf")
        self._waiting_for = "event"
        self._timeout_s = 0.0

    @property
    def redact(self) -> Redactor:
        return self._parser.redact

    def expect(self, what: str, timeout_s: float) -> None:
        """The next event must start arriving within ``timeout_s`` from now."""
        self._waiting_for = what
        self._timeout_s = timeout_s
        self.deadline = self._clock() + timeout_s

    def next_event(self) -> Optional[SSEEvent]:
        """The next event, or None at the end of the body. Raises typed APIErrors."""
        while not self._pending:
            if self._parser.error is not None:
                raise self._parser.error
            if self._eof:
                return None
            chunk = next(self._chunks, None)
            if chunk is None:
                self._eof = True
                return None
            self._pending.extend(self._parser.feed(chunk))
            if not self._pending and self._clock() > self.deadline:
                raise APITimeoutError(f"no {self._waiting_for} within {self._timeout_s:g} s",
                                      node_id=self._parser.node_id)
        return self._pending.popleft()

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
    reader: _EventReader
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
) -> OpenedStream:
    """One streaming attempt: send, check the status, read until the first chunk.

    Every failure is a typed, retryable-as-usual APIError (connection errors, 5xx, 429,
    malformed SSE, no first chunk within ``first_chunk_timeout_s``), and the response is
    closed before it propagates. Blocks; holds no lock.
    """
    started = clock()
    node_id = transport.node.id
    redact = transport.redactor
    response = transport.open(method, path, body=body, headers=headers,
                              timeout_s=(connect_timeout_s, first_chunk_timeout_s))
    try:
        transport.raise_for_error_status(response)
        request_id = redact.header(response.headers.get("x-request-id") or response.headers.get("request-id"))
        _check_event_stream(response, node_id, request_id)
        parser = SSEParser(node_id=node_id, max_bytes=max_bytes, redact=redact)
        reader = _EventReader(transport.iter_bytes(response), parser, clock)
        reader.expect("first chunk", first_chunk_timeout_s - (clock() - started))
        event = reader.next_event()
        if event is None:
            raise APIConnectionError("the stream ended before its first chunk", node_id=node_id)
        first = decode_event(event, node_id, redact=redact)
        now = clock()
    except BaseException:
        _close(response)
        raise
    return OpenedStream(response, reader, first, response.status_code, request_id, (now - started) * 1000.0, now)


def _check_event_stream(response: requests.Response, node_id: str, request_id: Optional[str]) -> None:
    """A JSON document is not an event stream (a node that ignored ``stream: true``)."""
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        raise APIResponseValidationError(
            f"expected text/event-stream, got a {media_type} document", node_id=node_id,
            status_code=response.status_code, request_id=request_id)


def _close(response: requests.Response) -> None:
    try:
        response.close()
    except Exception:  # noqa: BLE001 - closing a broken socket; the stream's outcome is already known
        log.debug("error while closing a stream's response", exc_info=True)


# ----------------------------------------------------------------- lease and outcome


@dataclass(frozen=True)
class StreamOutcome:
    """How a stream ended, passed once to the client's ``on_end`` hook.

    ``status`` is ``"completed"`` ([DONE] received), ``"interrupted"`` (broke after the
    first chunk; ``error`` is the cause, ``reason`` as in StreamInterruptedError) or
    ``"cancelled"`` (closed early, or dropped). ``model`` is the model asked for;
    ``usage`` is the server's token usage when it reported one. Times are from the start
    of the call, failed attempts and backoff included.
    """

    model: str
    node_id: str
    status: str
    usage: Optional[Dict[str, Any]]
    chunks: int
    ttft_ms: float
    total_ms: float
    started: float
    error: Optional[APIError] = None
    reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status != "interrupted"


class StreamLease:
    """What an open stream holds: a node pick and a connection. Settled exactly once.

    It does not reference its :class:`ChatStream`, so a dropped stream can be
    garbage-collected while its lease waits in the reaper.
    """

    def __init__(
        self,
        opened: OpenedStream,
        *,
        selector: Selector,
        node: NodeState,
        model: str,
        started: float,
        picked_at: float,
        clock: Callable[[], float],
        classify: Callable[[APIError], str],
        on_end: Callable[[StreamOutcome], None],
    ) -> None:
        # The first chunk is here: the node answered. It stays in flight until the
        # stream ends, but no longer counts as a request waiting for its answer.
        selector.answered(node, picked_at)
        self.response = opened.response
        self.reader = opened.reader
        self.node = node
        self.model = model
        self.started = started
        self.node_ttft_ms = opened.ttft_ms
        self.attempt_started = opened.first_chunk_at - opened.ttft_ms / 1000.0
        self.ttft_ms = (opened.first_chunk_at - started) * 1000.0
        self.usage: Optional[Dict[str, Any]] = None
        self.chunks = 0
        self.abandoned_at: Optional[float] = None
        self._selector = selector
        self._clock = clock
        self._classify = classify
        self._on_end = on_end
        self._pid = os.getpid()
        self._settle_lock = threading.Lock()
        self._settled = False
        self._final: Optional[Tuple[str, Optional[APIError]]] = None
        self._outcome_hooks: List[Callable[[str, Optional[APIError]], None]] = []

    @property
    def settled(self) -> bool:
        return self._settled

    def defer_outcome(self, hook: Callable[[str, Optional[APIError]], None]) -> None:
        """Call ``hook(status, error)`` once the stream has ended (at once if it has)."""
        with self._settle_lock:
            final = self._final
            if final is None:
                self._outcome_hooks.append(hook)
                return
        hook(*final)

    def settle(self, status: str, error: Optional[APIError] = None, reason: Optional[str] = None) -> bool:
        """Close the connection, release the pick, report the outcome; False if already done.

        Each step runs even if one before it raised (an interrupt, a failing hook), so the
        connection, the node, the cost (``on_end``) and the breaker permits (outcome
        hooks) are each released once; the first error is raised afterwards.
        """
        if os.getpid() != self._pid:
            return False  # inherited across fork(): the pick, socket and outcome are the parent's
        with self._settle_lock:
            if self._settled:
                return False
            self._settled = True
        ended = self.abandoned_at
        try:
            if ended is None:
                ended = self._clock()
        finally:
            if ended is None:  # the clock read was interrupted: the first chunk's time does for stats
                ended = self.attempt_started + self.node_ttft_ms / 1000.0
            end_s: float = ended
            outcome = StreamOutcome(self.model, self.node.id, status, self.usage, self.chunks, self.ttft_ms,
                                    (end_s - self.started) * 1000.0, self.started, error, reason)
            call_each([
                lambda: _close(self.response),  # fully read: back to the pool for reuse; else the socket closes
                self.reader.close,
                lambda: self._release_node(status, error, end_s),
                lambda: self._on_end(outcome),
                lambda: self._run_hooks(status, error),
            ])
        return True

    def _release_node(self, status: str, error: Optional[APIError], ended: float) -> None:
        if status == "completed":
            self._selector.release_success(self.node, self.node_ttft_ms, started=None)
        elif status == "interrupted" and error is not None:
            self._selector.release_failure(self.node, self._classify(error),
                                           (ended - self.attempt_started) * 1000.0, started=None)
        else:
            self._selector.release_cancelled(self.node, started=None)

    def _run_hooks(self, status: str, error: Optional[APIError]) -> None:
        with self._settle_lock:
            self._final = (status, error)
            hooks, self._outcome_hooks = self._outcome_hooks, []
        call_each([functools.partial(hook, status, error) for hook in hooks])


class StreamReaper:
    """Settles leases of streams that were garbage-collected without being closed.

    :meth:`adopt` runs inside the garbage collector, where taking any lock could
    deadlock: it only records the time and puts the lease on a lock-free queue.
    :meth:`reap` settles them; the client calls it at the start of every call and in
    ``stats()``/``close()``. Thread-safe.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._orphans: "queue.SimpleQueue[StreamLease]" = queue.SimpleQueue()

    def adopt(self, lease: StreamLease) -> None:
        lease.abandoned_at = self._clock()
        self._orphans.put(lease)

    def reap(self) -> int:
        """Settle every orphaned lease as cancelled; returns how many."""
        reaped = 0
        while True:
            try:
                lease = self._orphans.get_nowait()
            except queue.Empty:
                return reaped
            try:
                if lease.settle("cancelled"):
                    reaped += 1
            except Exception:  # noqa: BLE001 - one bad hook must not strand the other leases
                log.exception("error while releasing an abandoned stream on node %s", lease.node.id)


class StreamStats:
    """Counts of stream outcomes, time-to-first-chunk and total-time histograms, tokens.

    Thread-safe (its own lock); fixed memory.
    """

    def __init__(self) -> None:
        self._stats_lock = threading.Lock()
        self._by_status = {"completed": 0, "interrupted": 0, "cancelled": 0}
        self._interrupted_by_reason: Dict[str, int] = {}
        self._ttft = LatencyHistogram()
        self._total = LatencyHistogram()
        self._tokens = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self._with_usage = 0


    def reset_after_fork(self) -> None:
        """A lock held by another thread at fork time would stay held in the child."""
        self._stats_lock = threading.Lock()
    def record(self, outcome: StreamOutcome) -> None:
        usage = outcome.usage if isinstance(outcome.usage, dict) else None
        reason = outcome.reason or "other"
        with self._stats_lock:
            self._by_status[outcome.status] = self._by_status.get(outcome.status, 0) + 1
            if outcome.status == "interrupted" and len(self._interrupted_by_reason) < 16:
                self._interrupted_by_reason[reason] = self._interrupted_by_reason.get(reason, 0) + 1
            self._ttft.record(outcome.ttft_ms)
            if outcome.status == "completed":
                self._total.record(outcome.total_ms)
            if usage is not None:
                self._with_usage += 1
                for key in self._tokens:
                    value = usage.get(key)
                    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                        self._tokens[key] += value

    def snapshot(self) -> Dict[str, Any]:
        with self._stats_lock:
            return {
                **self._by_status,
                "interrupted_by_reason": dict(self._interrupted_by_reason),
                "time_to_first_chunk": self._ttft.summary(),
                "total_time": self._total.summary(),
                "streams_with_usage": self._with_usage,
                "usage": dict(self._tokens),
            }


# ------------------------------------------------------------------------- stream


def _interrupt_reason(exc: APIError) -> str:
    if isinstance(exc, APITimeoutError):
        return "stall"
    if isinstance(exc, ResponseTooLargeError):
        return "too_large"
    if isinstance(exc, APIResponseValidationError):
        return "malformed"
    if isinstance(exc, APIStatusError):
        return "server_error"
    return "reset"


class ChatStream:
    """What ``chat_completion(..., stream=True)`` returns: iterate it for chunk dicts.

    Chunks are OpenAI's ``chat.completion.chunk`` objects, as sent (the last one may
    carry only ``usage``). :meth:`read_text` reads to the end and returns the text;
    ``text`` is the text so far. Use it as a context manager or call :meth:`close` to
    stop early: that closes the connection and releases the node. A stream dropped
    without either is released by the client's next call.

    A broken stream raises :class:`StreamInterruptedError` (``partial_text``,
    ``node_id``, ``reason``), never retried. Metadata: ``node_id``, ``region``,
    ``attempts``, ``request_id``, ``model``, ``ttft_ms`` (time to first chunk from the
    start of the call), ``latency_ms`` (total, once ended), ``usage``,
    ``finish_reason``. Not thread-safe: iterate and close it from one thread.
    """

    def __init__(
        self,
        opened: OpenedStream,
        *,
        selector: Selector,
        node: NodeState,
        attempts: Sequence[Attempt],
        model: str,
        started: float,
        picked_at: float,
        stall_timeout_s: float,
        clock: Callable[[], float],
        classify: Callable[[APIError], str],
        on_end: Callable[[StreamOutcome], None],
        reaper: StreamReaper,
    ) -> None:
        try:
            self._lease = StreamLease(opened, selector=selector, node=node, model=model, started=started,
                                      picked_at=picked_at, clock=clock, classify=classify, on_end=on_end)
        except BaseException:  # nothing took the node or the connection: give both back
            call_each([lambda: _close(opened.response), lambda: selector.release_cancelled(node, started=picked_at)])
            raise
        try:
            self._start(opened, node=node, attempts=attempts, model=model, stall_timeout_s=stall_timeout_s,
                        clock=clock, reaper=reaper)
        except BaseException:  # e.g. interrupted while it read a stream that ends at once
            finalizer = getattr(self, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            self._lease.settle("cancelled")
            raise

    def _start(self, opened: OpenedStream, *, node: NodeState, attempts: Sequence[Attempt], model: str,
               stall_timeout_s: float, clock: Callable[[], float], reaper: StreamReaper) -> None:
        self._finalizer = weakref.finalize(self, reaper.adopt, self._lease)
        self._finalizer.atexit = False
        self._clock = clock
        self._stall_timeout_s = stall_timeout_s
        self._transport = node.transport
        self.node_id = node.id
        self.region = node.region
        self.attempts: Tuple[Attempt, ...] = tuple(attempts)
        self.request_id = opened.request_id
        self.model = model
        self.fallback = False  # True when a fallback model of the chain answered
        self.extra: Dict[str, Any] = {}
        self.ttft_ms = self._lease.ttft_ms
        self.latency_ms: Optional[float] = None
        self.usage: Optional[Dict[str, Any]] = None
        self.finish_reason: Optional[str] = None
        self.state = "open"
        self._texts: Dict[int, List[str]] = {}
        self._first = opened.first_chunk
        if self._first is None:
            self._finish_body()
        else:
            self._absorb(self._first)
            self._transport.set_read_timeout(opened.response, stall_timeout_s)

    # -- iteration ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        if self.state != "open":
            raise StopIteration
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        reader = self._lease.reader
        reader.expect("chunk", self._stall_timeout_s)  # from now: time the caller spent is not a stall
        try:
            event = reader.next_event()
            chunk = None if event is None else decode_event(event, self.node_id, redact=reader.redact)
        except APIError as exc:
            self._interrupt(exc, _interrupt_reason(exc))
        if event is None:
            self._interrupt(APIConnectionError(f"the stream ended without [DONE] after {self._lease.chunks} "
                                               f"chunks", node_id=self.node_id), "truncated")
        if chunk is None:
            self._finish_body()
            raise StopIteration
        self._absorb(chunk)
        return chunk

    def read_text(self) -> str:
        """Read the stream to its end and return the first choice's whole text."""
        for _ in self:
            pass
        return self.text

    @property
    def text(self) -> str:
        """The first choice's text received so far."""
        return "".join(self._texts.get(0, ()))

    def choice_text(self, index: int) -> str:
        """The text of choice ``index`` received so far (for ``n > 1``)."""
        return "".join(self._texts.get(index, ()))

    @property
    def chunks(self) -> int:
        return self._lease.chunks

    # -- lifecycle -----------------------------------------------------------------------

    def defer_outcome(self, hook: Callable[[str, Optional[APIError]], None]) -> None:
        """Call ``hook(status, error)`` once this stream has ended: "completed",
        "interrupted" (with its StreamInterruptedError) or "cancelled"."""
        self._lease.defer_outcome(hook)

    def close(self) -> None:
        """Stop reading: close the connection and release the node. Idempotent."""
        if self.state == "open":
            self.state = "closed"
        self._finalizer.detach()
        self._lease.settle("cancelled")

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<ChatStream {self.state} node={self.node_id} model={self.model} "
                f"chunks={self._lease.chunks}>")

    # -- internals -----------------------------------------------------------------------

    def _absorb(self, chunk: Dict[str, Any]) -> None:
        lease = self._lease
        lease.chunks += 1
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = lease.usage = usage
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self.model = model
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and isinstance(index, int):
                self._texts.setdefault(index, []).append(content)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and index == 0:
                self.finish_reason = reason

    def _finish_body(self) -> None:
        """After [DONE]: read the end of the body so the connection can be reused."""
        self._transport.set_read_timeout(self._lease.response, min(self._stall_timeout_s, _DRAIN_TIMEOUT_S))
        try:
            clean = self._lease.reader.drain(_DRAIN_MAX_BYTES)
        except APIError as exc:
            clean = False
            log.debug("node %s: error after [DONE] (%s); not reusing the connection", self.node_id, exc)
        if not clean:
            self._lease.response.raw.close()  # never return a half-read connection to the pool
        self._end("completed")

    def _end(self, status: str, error: Optional[APIError] = None, reason: Optional[str] = None) -> None:
        self.state = status
        self._finalizer.detach()
        self._lease.settle(status, error, reason)
        self.latency_ms = (self._clock() - self._lease.started) * 1000.0

    def _interrupt(self, exc: APIError, reason: str) -> NoReturn:
        partial = self._lease.reader.redact.text(self.text)  # an error may be logged: never the key
        chunks = self._lease.chunks
        self._end("interrupted", exc, reason)
        log.debug("stream from node %s interrupted after %d chunks (%s): %s", self.node_id, chunks,
                  reason, exc.message)
        raise StreamInterruptedError(
            f"stream interrupted after {chunks} chunks ({reason}): {exc.message}",
            reason=reason, partial_text=partial, chunks=chunks, node_id=self.node_id,
        ) from exc


class CannedStream:
    """A finished stream that replays a canned ``fallback_reply`` answer as one chunk.

    What a streaming caller gets when every model failed and the client has a
    ``fallback_reply``: the same surface as :class:`ChatStream` (iterate, ``text``,
    ``read_text()``, context manager), flagged ``fallback = True`` with ``model`` None
    and ``extra["canned"]``, so it is never taken for a model's answer.
    """

    def __init__(self, answer: Mapping[str, Any], *, latency_ms: float, extra: Mapping[str, Any]) -> None:
        try:
            text = answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            text = ""
        self._text = text if isinstance(text, str) else str(text)
        self._chunk = {"object": "chat.completion.chunk", "model": None, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": self._text}, "finish_reason": "stop"}]}
        self._pending = [self._chunk]
        self.node_id: Optional[str] = None
        self.region: Optional[str] = None
        self.attempts: Tuple[Attempt, ...] = ()
        self.request_id: Optional[str] = None
        self.model: Optional[str] = None
        self.fallback = True
        self.extra: Dict[str, Any] = dict(extra)
        self.ttft_ms = latency_ms
        self.latency_ms: Optional[float] = latency_ms
        self.usage: Optional[Dict[str, Any]] = None
        self.finish_reason = "stop"
        self.state = "completed"

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        if not self._pending:
            raise StopIteration
        return self._pending.pop()

    def read_text(self) -> str:
        self._pending.clear()
        return self._text

    @property
    def text(self) -> str:
        return self._text

    def choice_text(self, index: int) -> str:
        return self._text if index == 0 else ""

    @property
    def chunks(self) -> int:
        return 1

    def defer_outcome(self, hook: Callable[[str, Optional[APIError]], None]) -> None:
        hook("completed", None)

    def close(self) -> None:
        self._pending.clear()

    def __enter__(self) -> "CannedStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CannedStream fallback text={self._text[:40]!r}>"
