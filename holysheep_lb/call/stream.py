"""Stream sending: the attempt loop runs until a first chunk, then a ChatStream owns the node.

:class:`StreamSender` is the attempt loop's sender for streams (open up to the first
chunk; hand the node to a :class:`~holysheep_lb.streaming.ChatStream`).
:class:`StreamStage` is a stream's cost steps around the chain: reserve the estimate
now, settle from the usage that ends the stream.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..costs import StreamCosts
from ..ledger import SpendLedger
from ..nodes import NodeState
from ..policy.classify import failure_kind
from ..selection import Selector
from ..streaming import STREAM_HEADERS, ChatStream, OpenedStream, StreamOutcome, StreamReaper, open_stream
from .attempts import Timeout
from .chain import ChainStage, request_parts
from .context import CallContext
from .costs import admit
from .events import stream_end
from .tally import CallTally

__all__ = ["StreamSender", "StreamStage"]

log = logging.getLogger(__name__)


class StreamSender:
    """Opens a stream up to its first chunk; ``finish`` hands the node to a ChatStream."""

    streams = True

    def __init__(self, *, selector: Selector, reaper: StreamReaper, first_chunk_timeout_s: float,
                 stall_timeout_s: float, max_response_bytes: int) -> None:
        self.selector = selector
        self.reaper = reaper
        self.first_chunk_timeout_s = first_chunk_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.max_response_bytes = max_response_bytes

    def send(self, ctx: CallContext, node: NodeState, timeout: Timeout) -> OpenedStream:
        first_chunk_s = max(0.001, min(self.first_chunk_timeout_s, ctx.deadline - ctx.clock()))
        if ctx.timeout is not None:  # a call's own timeout= bounds the wait for the first chunk too
            first_chunk_s = min(first_chunk_s, timeout[1])
        return open_stream(node.transport, ctx.method, ctx.path, body=ctx.body, headers=ctx.headers,
                           connect_timeout_s=timeout[0], first_chunk_timeout_s=first_chunk_s,
                           clock=ctx.clock, max_bytes=self.max_response_bytes)

    def finish(self, ctx: CallContext, node: NodeState, opened: OpenedStream, latency_ms: float,
               permit: Any) -> ChatStream:
        stream = ChatStream(opened, selector=self.selector, node=node, attempts=ctx.attempts,
                            model=ctx.model or "", started=ctx.started, picked_at=ctx.picked[node.id],
                            stall_timeout_s=self.stall_timeout_s, clock=ctx.clock, classify=failure_kind,
                            reaper=self.reaper, on_end=ctx.on_end or _ignore)
        if ctx.observers:
            ctx.emit("first_chunk", ctx.clock())
        return stream


def _ignore(outcome: StreamOutcome) -> None:
    """No one to tell."""


class StreamStage:
    """A stream's cost steps: reserve the estimate now, settle from its usage when it ends."""

    def __init__(self, *, ledger: SpendLedger, is_available: Callable[[str], bool], tally: CallTally,
                 record_end: Callable[[StreamOutcome], None], next: ChainStage) -> None:
        self.ledger = ledger
        self.is_available = is_available
        self.tally = tally
        self.record_end = record_end  # stream stats and call counts
        self.next = next

    def run(self, ctx: CallContext) -> Any:
        model = ctx.model
        assert model is not None
        first = admit(ctx, self.ledger, self.tally, model, self.is_available)
        costs = StreamCosts(self.ledger, first, ctx.messages or [], ctx.params)
        payload = {"model": first.model, "messages": list(ctx.messages or []), **ctx.params}
        payload["stream_options"] = {"include_usage": True, **(ctx.params.get("stream_options") or {})}
        body, headers = request_parts(ctx.method, payload, ctx.idempotency_key)
        headers.update(STREAM_HEADERS)
        sent = ctx.for_model(first.model, body, headers)
        sent.payload, sent.costs, sent.stream = payload, costs, True

        def ended(outcome: StreamOutcome) -> None:
            try:
                self.record_end(outcome)
            finally:  # the stream's cost is settled even if counting it was interrupted
                costs.ended(outcome)
                if ctx.observers:
                    ctx.emit("call_ended", stream_end(outcome, ctx.clock()))

        sent.on_end = ended
        try:  # usage arrives at the end of a stream: costs.ended settles the model that streamed
            stream = self.next.run(sent)
        finally:
            costs.close()
        if first.model != model:
            stream.fallback = True
            stream.extra["downgraded_from"] = model
        return stream
