"""Stream sending: the attempt loop runs until a first chunk, then a ChatStream owns the node.

:class:`StreamSender` is the attempt loop's sender for streams (open up to the first
chunk within the model's time-to-first-token limit; hand the node to a
:class:`~holysheep_lb.streaming.ChatStream`). :class:`StreamStage` is a stream's cost
steps around the chain: reserve the estimate now, settle from the usage that ends the
stream; it also gives the stream its :class:`~holysheep_lb.rescue.Rescuer`, whose routes
open through ``rescue_next`` (one model, no fallbacks, nodes that failed excluded).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

from ..costs import OnSettled, StreamCosts
from ..errors import NoHealthyNodeError
from ..fallbacks import ModelChain
from ..ledger import SpendLedger
from ..models import CapabilityTable
from ..nodes import NodeState
from ..policy.classify import failure_kind
from ..rescue import Rescuer
from ..selection import Selector
from ..streaming import STREAM_HEADERS, ChatStream, OpenedStream, StreamOutcome, StreamReaper, open_stream
from .attempts import Timeout
from .chain import ChainStage, request_parts
from .context import CallContext
from .costs import admit
from .events import stream_end
from .tally import CallTally

__all__ = ["StreamSender", "StreamStage", "StreamLimits"]

log = logging.getLogger(__name__)


class StreamLimits:
    """A stream's (first-token, stall) limits: the call's, else the model's, else the client's."""

    def __init__(self, capabilities: CapabilityTable, *, first_token_timeout_s: float,
                 stall_timeout_s: float) -> None:
        self.capabilities = capabilities
        self.first_token_timeout_s = first_token_timeout_s
        self.stall_timeout_s = stall_timeout_s

    def of(self, ctx: CallContext, model: Optional[str] = None) -> Tuple[float, float]:
        """The limits of ``ctx``'s model (or of ``model``, e.g. the chain's next one)."""
        model = ctx.model if model is None else model
        return self.capabilities.stream_limits(model or "", call_first_token_s=ctx.first_token_timeout_s,
                                               client_first_token_s=self.first_token_timeout_s,
                                               client_stall_s=self.stall_timeout_s)


class StreamSender:
    """Opens a stream up to its first chunk; ``finish`` hands the node to a ChatStream."""

    streams = True

    def __init__(self, *, selector: Selector, reaper: StreamReaper, limits: StreamLimits,
                 max_response_bytes: int) -> None:
        self.selector = selector
        self.reaper = reaper
        self.limits = limits
        self.max_response_bytes = max_response_bytes

    def wait_s(self, ctx: CallContext, model: Optional[str], read_s: float) -> float:
        """A stream of ``model`` waits for its first chunk up to its first-token limit, and
        up to a call's own timeout= too."""
        first_token_s = self.limits.of(ctx, model)[0]
        return first_token_s if ctx.timeout is None else min(first_token_s, read_s)

    def send(self, ctx: CallContext, node: NodeState, timeout: Timeout) -> OpenedStream:
        # timeout[1] is wait_s() bounded by the deadline (and the room left for the next model)
        first_chunk_s = max(0.001, min(timeout[1], ctx.deadline - ctx.clock()))
        return open_stream(node.transport, ctx.method, ctx.path, body=ctx.body, headers=ctx.headers,
                           connect_timeout_s=timeout[0], first_chunk_timeout_s=first_chunk_s,
                           clock=ctx.clock, max_bytes=self.max_response_bytes, secrets=ctx.extra_headers.values())

    def finish(self, ctx: CallContext, node: NodeState, opened: OpenedStream, latency_ms: float,
               permit: Any) -> ChatStream:
        stream = ChatStream(opened, selector=self.selector, node=node, attempts=ctx.attempts,
                            model=ctx.model or "", started=ctx.started, picked_at=ctx.picked[node.id],
                            stall_timeout_s=self.limits.of(ctx)[1], clock=ctx.clock, classify=failure_kind,
                            reaper=self.reaper, on_end=ctx.on_end or _ignore, rescue=ctx.rescue)
        if ctx.observers:
            ctx.emit("first_chunk", ctx.clock())
        return stream


def _ignore(outcome: StreamOutcome) -> None:
    """No one to tell."""


class StreamStage:
    """A stream's cost steps: reserve the estimate now, settle from its usage when it ends.

    ``rescue_next`` opens a rescue's route (see :mod:`holysheep_lb.rescue`); ``chain``
    gives the models a rescue may walk; ``rescue_mode`` "off" gives streams no rescuer.
    """

    def __init__(self, *, ledger: SpendLedger, is_available: Callable[[str], bool], tally: CallTally,
                 record_end: Callable[[StreamOutcome], None], next: ChainStage,
                 rescue_next: Optional[ChainStage] = None, chain: Optional[ModelChain] = None,
                 selector: Optional[Selector] = None, capabilities: Optional[CapabilityTable] = None,
                 rescue_mode: str = "off", max_rescues: int = 0) -> None:
        self.ledger = ledger
        self.is_available = is_available
        self.tally = tally
        self.record_end = record_end  # stream stats and call counts
        self.next = next
        self.rescue_next = rescue_next
        self.chain = chain
        self.selector = selector
        self.capabilities = capabilities if capabilities is not None else CapabilityTable()
        self.rescue_mode = rescue_mode if rescue_next is not None else "off"
        self.max_rescues = max_rescues

    def _ended_hook(self, costs: StreamCosts) -> Callable[[StreamOutcome], None]:
        def ended(outcome: StreamOutcome) -> None:
            try:
                self.record_end(outcome)
            finally:  # the stream's cost is settled even if counting it was interrupted
                costs.ended(outcome)
        return ended

    def _call_end(self, ctx: CallContext) -> Optional[OnSettled]:
        """What tells the observers that a stream call ended, with what the ledger settled
        for it: for each stream of the call, once its cost is settled (None: no observers)."""
        if not ctx.observers:
            return None
        rescued: List[Dict[str, Any]] = []  # what the streams that broke and were rescued cost

        def settled(outcome: StreamOutcome, cost: Dict[str, Any]) -> None:
            if not outcome.ends_call:  # a rescued stream's call ends with its rescuer
                rescued.append(cost)
                return
            nodes = self.selector.by_id if self.selector is not None else {}
            ctx.emit("call_ended", stream_end(outcome, ctx.clock(), nodes, rescued + [cost]))
        return settled

    def run(self, ctx: CallContext) -> Any:
        model = ctx.model
        assert model is not None
        first = admit(ctx, self.ledger, self.tally, model, self.is_available)
        call_end = self._call_end(ctx)
        costs = StreamCosts(self.ledger, first, ctx.messages or [], ctx.params, call_end)
        payload = {"model": first.model, "messages": list(ctx.messages or []), **ctx.params}
        payload["stream_options"] = {"include_usage": True, **(ctx.params.get("stream_options") or {})}
        body, headers = request_parts(ctx.method, payload, ctx.idempotency_key)
        headers.update(STREAM_HEADERS)
        sent = ctx.for_model(first.model, body, headers)
        sent.payload, sent.costs, sent.stream = payload, costs, True
        sent.on_end = self._ended_hook(costs)
        try:  # usage arrives at the end of a stream: costs.ended settles the model that streamed
            sent.rescue = self._rescuer(ctx, first.model, payload, call_end) if self.rescue_mode != "off" else None
            stream = self.next.run(sent)
        finally:
            costs.close()
        if first.model != model:
            stream.fallback = True
            stream.extra["downgraded_from"] = model
        return stream

    def _rescuer(self, ctx: CallContext, model: str, payload: Mapping[str, Any],
                 call_end: Optional[OnSettled]) -> Rescuer:
        """The call's rescuer: each route it opens reserves and settles as its own model."""
        assert self.rescue_next is not None
        rescue_next = self.rescue_next
        nodes = frozenset(n.id for n in self.selector.nodes) if self.selector is not None else frozenset()

        def open_route(route_model: str, messages: List[Mapping[str, Any]], extra: Mapping[str, Any],
                       exclude: FrozenSet[str]) -> ChatStream:
            if nodes and nodes <= exclude:
                raise NoHealthyNodeError(f"every node already failed this call for model {route_model}")
            held = self.ledger.admit(route_model, messages, ctx.params, is_available=self.is_available)
            route_costs = StreamCosts(self.ledger, held, messages, ctx.params, call_end)
            route_payload = {**payload, **extra, "model": held.model, "messages": messages}
            body, headers = request_parts(ctx.method, route_payload, None)
            headers.update(STREAM_HEADERS)
            route = ctx.for_model(held.model, body, headers)
            route.exclude = exclude
            route.tried = list(exclude)
            route.payload, route.costs, route.stream, route.rescue = route_payload, route_costs, True, rescuer
            route.messages = messages
            route.on_end = self._ended_hook(route_costs)
            try:
                return rescue_next.run(route)
            finally:
                route_costs.close()

        models = self.chain.chain(model) if self.chain is not None else [model]
        rescuer = Rescuer(models=models, messages=ctx.messages or [], opener=open_route,
                          capabilities=self.capabilities, mode=self.rescue_mode, max_rescues=self.max_rescues,
                          deadline=ctx.deadline, clock=ctx.clock)
        return rescuer
