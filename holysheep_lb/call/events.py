"""The observers' ``call_ended`` event for an answer and for a stream that ended."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ..errors import StreamInterruptedError
from ..nodes import NodeState
from ..observe import CallEnd

__all__ = ["response_end", "stream_end", "node_url"]


def _tokens(usage: Any, name: str) -> Optional[int]:
    value = usage.get(name) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(cost: Mapping[str, Any], name: str) -> float:
    value = cost.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


# CallEnd's token fields <- cost_info's
_SETTLED_TOKENS = (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                   ("cached_input_tokens", "cached_tokens"), ("cache_write_tokens", "cache_write_tokens"))


def _spent(costs: Sequence[Mapping[str, Any]], usage: Any) -> Dict[str, Any]:
    """CallEnd's usage and cost fields. ``costs``: what the ledger settled for each model
    answer of the call (``costs.cost_info`` dicts: the usage as usage.py read it, or the
    estimate); without any (nothing paid for, or not priced), the tokens of ``usage``."""
    if not costs:
        return {"input_tokens": _tokens(usage, "prompt_tokens"), "output_tokens": _tokens(usage, "completion_tokens")}
    spent: Dict[str, Any] = {"cost_usd": 0.0, "usage_estimated": False}
    for field, _ in _SETTLED_TOKENS:
        spent[field] = 0
    for cost in costs:
        for field, key in _SETTLED_TOKENS:
            spent[field] += int(_number(cost, key))
        spent["cost_usd"] += _number(cost, "cost_usd")
        if cost.get("from_usage") is not True:
            spent["usage_estimated"] = True
    return spent


def node_url(nodes: Mapping[str, NodeState], node_id: Optional[str]) -> Optional[str]:
    """The base URL of node ``node_id`` (None: no node). It is the configured URL, which
    ``config.Node`` refuses with credentials, a query or a fragment: nothing secret."""
    node = nodes.get(node_id) if node_id is not None else None
    return node.node.base_url if node is not None else None


def response_end(result: Any, now: float, nodes: Mapping[str, NodeState]) -> CallEnd:
    """``call_ended`` for a call answered at once (a Response, or a canned stream);
    ``nodes`` by id, for the answering node's URL (none for a cache hit: no node answered)."""
    data: Mapping[str, Any] = result if isinstance(result, Mapping) else {}  # a Response is its JSON dict
    choices = data.get("choices")
    reasons: Tuple[str, ...] = ()
    if isinstance(choices, list):
        reasons = tuple(str(c["finish_reason"]) for c in choices
                        if isinstance(c, Mapping) and isinstance(c.get("finish_reason"), str))
    response_id = data.get("id")
    node_id = getattr(result, "node_id", None)
    cached = bool(getattr(result, "cached", False))
    extra = getattr(result, "extra", None)
    cost = extra.get("cost") if isinstance(extra, Mapping) else None  # a chat answer's (costs.cost_info)
    cost = cost if isinstance(cost, Mapping) else None
    paid = (cost,) if cost is not None and not cached and cost.get("model") is not None else ()  # not canned
    spent = _spent(paid, data.get("usage"))
    if cost is not None and not paid:
        spent["cost_usd"] = _number(cost, "cost_usd")  # nothing was paid: 0.0
    return CallEnd(result=result, node_id=node_id, base_url=None if cached else node_url(nodes, node_id),
                   response_model=getattr(result, "model", None),
                   response_id=response_id if isinstance(response_id, str) else None,
                   finish_reasons=reasons, cached=cached, ended_at=now, **spent)


def stream_end(outcome: Any, now: float, nodes: Mapping[str, NodeState],
               costs: Sequence[Mapping[str, Any]] = ()) -> CallEnd:
    """``call_ended`` for a stream that ended (a :class:`~holysheep_lb.streaming.StreamOutcome`):
    its response id and finish reasons as its chunks gave them; ``costs`` what the ledger
    settled for each stream of the call (the ones it rescued first), as ``costs.cost_info``."""
    return CallEnd(error=_caller_error(outcome), node_id=outcome.node_id, base_url=node_url(nodes, outcome.node_id),
                   response_model=outcome.model, response_id=outcome.response_id,
                   finish_reasons=outcome.finish_reasons, chunks=outcome.chunks, ended_at=now,
                   **_spent(costs, outcome.usage))


def _caller_error(outcome: Any) -> Optional[BaseException]:
    """The error its caller saw: a stream that broke after its first chunk raised
    StreamInterruptedError (reason and chunk count; the cause chained, as the caller's
    is), not the cause itself. It carries no partial text: end events never hold the
    answer."""
    error = outcome.error
    if error is None or outcome.status != "interrupted" or isinstance(error, StreamInterruptedError):
        return error
    return StreamInterruptedError.from_cause(error, reason=outcome.reason or "interrupted", partial_text="",
                                             chunks=outcome.chunks, node_id=outcome.node_id)
