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
    Attempt,
    StreamInterruptedError,
)
from .nodes import NodeState
from .policy.classify import stream_interrupt_reason
from .selection import Selector
from .sse import (
    STREAM_HEADERS,
    EventReader,
    OpenedStream,
    SSEEvent,
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
            call_each([lambda: close_response(opened.response),
                       lambda: selector.release_cancelled(node, started=picked_at)])
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
        chunk: Optional[Dict[str, Any]]
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
