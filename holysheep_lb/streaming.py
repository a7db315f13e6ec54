"""The stream object ``chat_completion(..., stream=True)`` returns, and its canned twin.

Once the first chunk has reached the caller the call is committed (as in gRPC): a
broken stream raises :class:`~holysheep_lb.errors.StreamInterruptedError` with the
partial text and is never retried. Parsing and opening live in :mod:`holysheep_lb.sse`,
what a stream holds and how it ends in :mod:`holysheep_lb.stream_lease`; every name
they define is importable from here too.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence, Tuple

from .cleanup import call_each
from .errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    Attempt,
    StreamInterruptedError,
    StreamRestartedError,
)
from .rescue import BrokenStream
from .rescue import Rescue as RescueResult
from .nodes import NodeState
from .policy.classify import stream_interrupt_reason
from .selection import Selector
from .sse import (
    STREAM_HEADERS,
    EventReader,
    OpenedStream,
    SSEEvent,
    End,
    SSEParser,
    close_response,
    decode_event,
    open_stream,
)
from .types import ChatCompletionChunk
from .stream_lease import StreamLease, StreamOutcome, StreamReaper, StreamStats

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
    "CannedStream",
    "STREAM_HEADERS",
]

log = logging.getLogger(__name__)

_EventReader = EventReader  # its former name
_DRAIN_TIMEOUT_S = 1.0  # after [DONE], how long to wait for the end of the body
_DRAIN_MAX_BYTES = 64 * 1024


_interrupt_reason = stream_interrupt_reason  # its former name; policy/classify.py decides


#: How long to wait for the end of the body (or the usage chunk) once every choice
#: has its finish_reason: the answer is whole, only its [DONE] is missing.
_AFTER_FINISH_TIMEOUT_S = 5.0

Rescue = Callable[[BrokenStream], Optional[RescueResult]]


class ChatStream:
    """What ``chat_completion(..., stream=True)`` returns: iterate it for chunk dicts.

    Chunks are OpenAI's ``chat.completion.chunk`` objects, as sent (the last one may
    carry only ``usage``). :meth:`read_text` reads to the end and returns the text;
    ``text`` is the text so far. Use it as a context manager or call :meth:`close` to
    stop early: that closes the connection and releases the node. A stream dropped
    without either is released by the client's next call.

    A stream is complete at ``data: [DONE]``, or when its body ends after a chunk with
    a ``finish_reason``. An event whose data does not parse is skipped and counted in
    ``skipped_events`` (at most ``sse.MAX_SKIPPED_EVENTS``); an error event raises like
    the matching status.

    A stream that breaks after its first chunk is *rescued* when the client gave it a
    ``rescue`` (:mod:`holysheep_lb.rescue`): either continued on another route, which
    the caller does not notice, or restarted. A caller that already read chunks of the
    broken answer then gets :class:`StreamRestartedError` once: discard what it read
    and keep iterating for the new answer. ``read_text()`` and ``text`` always hold the
    answer being delivered. ``rescues`` lists what happened. A stream that cannot be
    rescued raises :class:`StreamInterruptedError` (``partial_text``, ``node_id``,
    ``reason``); it is never reported as complete.

    Metadata: ``node_id``, ``region``, ``attempts``, ``request_id``, ``model`` (of the
    stream delivering the answer now), ``ttft_ms`` (time to first chunk from the start
    of the call), ``latency_ms`` (total, once ended), ``usage``, ``finish_reason``.
    Not thread-safe: iterate and close it from one thread.
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
        rescue: Optional[Rescue] = None,
    ) -> None:
        try:
            self._lease = StreamLease(opened, selector=selector, node=node, model=model, started=started,
                                      picked_at=picked_at, clock=clock, classify=classify, on_end=on_end)
        except BaseException:  # nothing took the node or the connection: give both back
            call_each([lambda: close_response(opened.response),
                       lambda: selector.release_cancelled(node, started=picked_at)])
            raise
        try:
            self._start(opened, node=node, attempts=attempts, model=model, stall_timeout_s=stall_timeout_s,
                        clock=clock, reaper=reaper, rescue=rescue)
        except BaseException:  # e.g. interrupted while it read a stream that ends at once
            finalizer = getattr(self, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            self._lease.settle("cancelled")
            raise

    def _start(self, opened: OpenedStream, *, node: NodeState, attempts: Sequence[Attempt], model: str,
               stall_timeout_s: float, clock: Callable[[], float], reaper: StreamReaper,
               rescue: Optional[Rescue]) -> None:
        self._finalizer = weakref.finalize(self, reaper.adopt, self._lease)
        self._finalizer.atexit = False
        self._clock = clock
        self._stall_timeout_s = stall_timeout_s
        self._transport = node.transport
        self._rescue = rescue
        self._delegate: Optional[ChatStream] = None  # the stream that rescued this one
        self._handed_out = 0  # chunks the caller received by iterating
        self._quiet_restarts = False  # read_text(): a restart is nobody's business
        self._tool_calls = False
        self.rescues: List[Dict[str, Any]] = []
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
            self._lease.chunks += 1
            self._absorb(self._first)
            self._transport.set_read_timeout(opened.response, stall_timeout_s)

    # -- iteration ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        chunk = self._next_chunk()
        self._handed_out += 1
        return chunk

    def _next_chunk(self) -> Dict[str, Any]:
        if self._delegate is not None:
            return self._next_from_delegate(self._delegate)
        if self.state != "open":
            raise StopIteration
        chunk: Optional[Dict[str, Any]]
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        reader = self._lease.reader
        finished = self.finish_reason is not None
        # from now: time the caller spent is not a stall
        reader.expect("chunk", min(self._stall_timeout_s, _AFTER_FINISH_TIMEOUT_S) if finished
                      else self._stall_timeout_s)
        try:
            got = reader.next_chunk()
        except APIError as exc:
            if finished and not isinstance(exc, APIStatusError):
                # the answer is whole; only its end of body went wrong
                log.debug("node %s: stream ended after its finish_reason without [DONE] (%s)", self.node_id,
                          exc.message)
                self._lease.response.raw.close()  # never return a half-read connection to the pool
                self._end("completed")
                raise StopIteration from None
            return self._interrupt(exc, _interrupt_reason(exc))
        if got is End.EOF:
            if finished:  # a finish_reason, then the end of the body: complete without [DONE]
                self._end("completed")
                raise StopIteration
            return self._interrupt(APIConnectionError(
                f"the stream ended without [DONE] or a finish_reason after {self._lease.chunks} chunks",
                node_id=self.node_id), "truncated")
        if got is End.DONE:
            self._finish_body()
            raise StopIteration
        assert not isinstance(got, End)
        self._lease.chunks += 1
        self._absorb(got)
        return got

    def read_text(self) -> str:
        """Read the stream to its end and return the first choice's whole text."""
        self._quiet_restarts = True
        try:
            for _ in self:
                pass
        finally:
            self._quiet_restarts = False
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
        return self._lease.chunks if self._delegate is None else self._lease.chunks + self._delegate.chunks

    @property
    def content_filtered(self) -> bool:
        """True when the answer ended with ``finish_reason == "content_filter"`` (cut by the
        provider's content filter: complete as a stream, not as an answer)."""
        return self.finish_reason == "content_filter"

    @property
    def skipped_events(self) -> int:
        """Events that did not parse and were skipped (rescuing streams included)."""
        own = getattr(self._lease.reader, "skipped_events", 0)
        return own if self._delegate is None else own + self._delegate.skipped_events

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
        try:
            self._lease.settle("cancelled")
        finally:
            if self._delegate is not None:
                self._delegate.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<ChatStream {self.state} node={self.node_id} model={self.model} "
                f"chunks={self.chunks}{f' rescues={len(self.rescues)}' if self.rescues else ''}>")

    # -- internals -----------------------------------------------------------------------

    def _absorb(self, chunk: Dict[str, Any]) -> None:
        # this stream's own chunks also go to its lease, which reports how it ended (a
        # rescuing stream's chunks pass through here too, but its own lease has them)
        lease = self._lease if self._delegate is None else None
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if lease is not None:
                lease.usage = usage
        if lease is not None and lease.response_id is None:
            response_id = chunk.get("id")
            if isinstance(response_id, str) and response_id:  # Azure's prompt-filter chunk has id ""
                lease.response_id = response_id
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
            if isinstance(delta, dict) and delta.get("tool_calls") or index != 0:
                self._tool_calls = True  # a prefill cannot carry these: restart only
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                if index == 0:
                    self.finish_reason = reason
                if lease is not None and isinstance(index, int):
                    lease.finish_reasons[index] = reason

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

    def _end(self, status: str, error: Optional[APIError] = None, reason: Optional[str] = None, *,
             ends_call: bool = True) -> None:
        self.state = status
        self._finalizer.detach()
        self._lease.settle(status, error, reason, ends_call=ends_call)
        self.latency_ms = (self._clock() - self._lease.started) * 1000.0

    def _interrupt(self, exc: APIError, reason: str) -> Dict[str, Any]:
        """The stream broke: rescue it (and return the rescuer's next chunk) or raise."""
        chunks = self._lease.chunks
        rescued: Optional[RescueResult] = None
        try:
            if self._rescue is not None:
                close_response(self._lease.response)  # the node's socket is of no more use
                rescued = self._rescue(BrokenStream(self.model, self.node_id, reason, exc, self.text, chunks,
                                                    continuable=not self._tool_calls))
        finally:
            self._end("interrupted", exc, reason, ends_call=rescued is None)
        if rescued is None:
            self._raise_interrupted(exc, reason, chunks)
        log.debug("stream from node %s interrupted after %d chunks (%s): %s; %s on node %s", self.node_id,
                  chunks, reason, exc.message, rescued.mode, getattr(rescued.stream, "node_id", None))
        self.rescues.append({"mode": rescued.mode, "reason": reason, "from_node": self.node_id,
                             "from_model": self.model, "to_model": rescued.model,
                             "to_node": getattr(rescued.stream, "node_id", None), "after_chunks": chunks})
        return self._adopt(rescued.stream, restart=rescued.mode == "restart", reason=reason)

    def _adopt(self, stream: "ChatStream", *, restart: bool, reason: str) -> Dict[str, Any]:
        """Deliver the rest of the answer from ``stream`` (a restart: all of a new one)."""
        self._delegate = stream
        self.state = "open"
        self.node_id, self.region, self.request_id = stream.node_id, stream.region, stream.request_id
        self.attempts = self.attempts + tuple(stream.attempts)
        if restart:
            return self._restart(reason)
        return self._next_from_delegate(stream)

    def _restart(self, reason: str) -> Dict[str, Any]:
        partial, chunks = self.text, self._handed_out
        self._texts = {}
        self.finish_reason = None
        self._tool_calls = False
        if chunks and not self._quiet_restarts:
            raise StreamRestartedError(
                f"the stream broke after {chunks} chunks ({reason}) and was restarted on another route: "
                f"discard what you read and keep iterating for the new answer",
                partial_text=self._lease.reader.redact.text(partial), chunks=chunks, cause_reason=reason,
                node_id=self.node_id)
        return self._next_chunk()

    def _next_from_delegate(self, stream: "ChatStream") -> Dict[str, Any]:
        try:
            chunk = next(stream)  # counted as handed out there: its own restarts reach this stream
        except StopIteration:
            self._settle_from(stream)
            raise
        except StreamRestartedError as exc:
            self._settle_from(stream)
            return self._restart(exc.cause_reason)
        except StreamInterruptedError as exc:
            self._settle_from(stream)
            self._raise_interrupted(exc, exc.reason, self._lease.chunks + exc.chunks)
        self._absorb(chunk)
        self.model = stream.model
        return chunk

    def _settle_from(self, stream: "ChatStream") -> None:
        self.state = stream.state if stream.state != "open" else self.state
        self.node_id, self.request_id = stream.node_id, stream.request_id
        self.rescues.extend(r for r in stream.rescues if r not in self.rescues)
        if stream.latency_ms is not None:
            self.latency_ms = (self._clock() - self._lease.started) * 1000.0

    def _raise_interrupted(self, exc: APIError, reason: str, chunks: int) -> NoReturn:
        self.state = "interrupted"
        partial = self._lease.reader.redact.text(self.text)  # an error may be logged: never the key
        log.debug("stream from node %s interrupted after %d chunks (%s): %s", self.node_id, chunks,
                  reason, exc.message)
        cause = exc.__cause__ if isinstance(exc, StreamInterruptedError) and exc.__cause__ is not None else exc
        raise StreamInterruptedError.from_cause(cause, reason=reason, partial_text=partial, chunks=chunks,
                                                node_id=self.node_id)


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
        self._chunk = ChatCompletionChunk({"object": "chat.completion.chunk", "model": None, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": self._text}, "finish_reason": "stop"}]})
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
