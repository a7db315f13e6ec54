"""ChainStage: the call over its model chain (fallbacks, each model's breaker permit and
rate-limit reservation), around the attempt loop of each model.

The engine is :class:`holysheep_lb.fallbacks.ModelChain`; whether a failed model moves
the call to the next one is the retry policy's answer (``scope="model"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any, Mapping, Optional

from ..errors import HolySheepError, InvalidRequestError
from ..fallbacks import ModelChain
from ..hedging import Hedger
from ..observe import Decision
from ..policy.retry import RetryBudget
from ..response import Response
from ..streaming import CannedStream
from .attempts import AttemptStage
from .context import CallContext
from .tally import CallTally

__all__ = ["ChainStage", "encode_json", "request_parts"]

log = logging.getLogger(__name__)


# One encoder for every body: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode_json(payload: Mapping[str, Any]) -> bytes:
    """A request body; InvalidRequestError names what cannot be sent."""
    if type(payload) is not dict and not isinstance(payload, Mapping):
        raise InvalidRequestError("json", payload, "must be a dict")
    try:
        return _ENCODER.encode(payload).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError("json", type(payload).__name__, f"must be JSON-serialisable ({exc})") from None


class ChainStage:
    """Runs ``next`` (the attempt loop) for each model of the chain until one answers.

    ``part_of_call``: this chain runs a part of a call already counted (a stream's
    rescue): it deposits nothing in the budgets and counts no call.
    """

    def __init__(self, *, chain: ModelChain, next: AttemptStage, tally: CallTally,
                 retry_budget: Optional[RetryBudget], hedger: Optional[Hedger], part_of_call: bool = False) -> None:
        self.chain = chain
        self.next = next
        self.tally = tally
        self.retry_budget = retry_budget
        self.hedger = hedger
        self.part_of_call = part_of_call

    def run(self, ctx: CallContext) -> Any:
        payload = ctx.payload
        requested = payload.get("model") if payload else None
        requested = requested if isinstance(requested, str) else None
        sent_to = [requested]

        def execute(model: Optional[str], trial: bool = False) -> Any:
            body, headers = ctx.body, ctx.headers
            if model != requested:
                # A fallback model: its own body, and its own Idempotency-Key so that a
                # node never replays the first model's answer for it.
                if headers:
                    tag = hashlib.sha256(str(model).encode("utf-8")).hexdigest()[:12]
                    headers = {**headers, "Idempotency-Key": f"{headers['Idempotency-Key']}-{tag}"}
                body = encode_json({**payload, "model": model})  # type: ignore[dict-item]
                if ctx.observers:
                    ctx.emit("decided", Decision("fallback", {"from": sent_to[-1], "to": model}))
            sent_to.append(model)
            model_ctx = ctx.for_model(model, body, headers)
            model_ctx.trial = trial  # a half-open breaker's trial: one attempt, then the next model
            model_ctx.next_model = self._next_model(requested, model)  # its attempts leave it room
            return self.next.run(model_ctx)

        if self.part_of_call:
            return self.chain.run(requested, payload, execute, deadline=ctx.deadline, costs=ctx.costs)
        started = ctx.clock()
        # once per call (not per model of a fallback chain): the budgets are ratios of calls
        if self.retry_budget is not None:
            self.retry_budget.deposit()
        if self.hedger is not None and not ctx.stream:
            self.hedger.deposit()
        try:
            result = self.chain.run(requested, payload, execute, deadline=ctx.deadline, costs=ctx.costs)
        except HolySheepError as exc:
            self.tally.count(False, type(exc).__name__, started)
            raise
        if ctx.stream and isinstance(result, Response):
            # every model failed and fallback_reply answered: a stream caller still gets a stream
            result = CannedStream(result, latency_ms=result.latency_ms, extra=result.extra)
            self.tally.count(True, None, started)
        elif not ctx.stream:  # a stream is counted when it ends
            self.tally.count(True, None, started)
        return result

    def _next_model(self, requested: Optional[str], model: Optional[str]) -> Optional[str]:
        """The model the chain would send to if ``model`` fails: the first one after it
        whose breaker lets a call through (None: ``model`` is the last)."""
        if requested is None or model is None or self.part_of_call:
            return None
        order = self.chain.chain(requested)
        later = order[order.index(model) + 1:] if model in order else []
        breakers = self.chain.breakers
        return next((m for m in later if breakers is None or breakers.allows("model", m)), None)


def request_parts(method: str, payload: Optional[Mapping[str, Any]],
                  idempotency_key: Optional[str]) -> "tuple[Optional[bytes], dict[str, str]]":
    """(body, headers) of a request: a JSON body, and an Idempotency-Key unless it is a GET."""
    body = None if payload is None else encode_json(payload)
    headers: "dict[str, str]" = {}
    if method != "GET":
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    return body, headers
