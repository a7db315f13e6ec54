"""The observers' ``call_ended`` event for an answer and for a stream that ended."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from ..nodes import NodeState
from ..observe import CallEnd

__all__ = ["response_end", "stream_end", "node_url"]


def _tokens(usage: Any, name: str) -> Optional[int]:
    value = usage.get(name) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    usage = data.get("usage")
    response_id = data.get("id")
    node_id = getattr(result, "node_id", None)
    cached = bool(getattr(result, "cached", False))
    return CallEnd(result=result, node_id=node_id, base_url=None if cached else node_url(nodes, node_id),
                   response_model=getattr(result, "model", None),
                   response_id=response_id if isinstance(response_id, str) else None,
                   finish_reasons=reasons, input_tokens=_tokens(usage, "prompt_tokens"),
                   output_tokens=_tokens(usage, "completion_tokens"), cached=cached, ended_at=now)


def stream_end(outcome: Any, now: float, nodes: Mapping[str, NodeState]) -> CallEnd:
    """``call_ended`` for a stream that ended (a :class:`~holysheep_lb.streaming.StreamOutcome`):
    its response id and finish reasons as its chunks gave them."""
    return CallEnd(error=outcome.error, node_id=outcome.node_id, base_url=node_url(nodes, outcome.node_id),
                   response_model=outcome.model, response_id=outcome.response_id,
                   finish_reasons=outcome.finish_reasons, input_tokens=_tokens(outcome.usage, "prompt_tokens"),
                   output_tokens=_tokens(outcome.usage, "completion_tokens"), chunks=outcome.chunks, ended_at=now)
