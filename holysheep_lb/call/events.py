"""The observers' ``call_ended`` event for an answer and for a stream that ended."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from ..observe import CallEnd

__all__ = ["response_end", "stream_end"]


def _tokens(usage: Any, name: str) -> Optional[int]:
    value = usage.get(name) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def response_end(result: Any, now: float, node_url: Optional[str] = None) -> CallEnd:
    """``call_ended`` for a call answered at once (a Response, or a canned stream)."""
    data: Mapping[str, Any] = result if isinstance(result, Mapping) else {}  # a Response is its JSON dict
    choices = data.get("choices")
    reasons: Tuple[str, ...] = ()
    if isinstance(choices, list):
        reasons = tuple(str(c["finish_reason"]) for c in choices
                        if isinstance(c, Mapping) and isinstance(c.get("finish_reason"), str))
    usage = data.get("usage")
    response_id = data.get("id")
    return CallEnd(result=result, node_id=getattr(result, "node_id", None), base_url=node_url,
                   response_model=getattr(result, "model", None),
                   response_id=response_id if isinstance(response_id, str) else None,
                   finish_reasons=reasons, input_tokens=_tokens(usage, "prompt_tokens"),
                   output_tokens=_tokens(usage, "completion_tokens"),
                   cached=bool(getattr(result, "cached", False)), ended_at=now)


def stream_end(outcome: Any, now: float, node_url: Optional[str] = None) -> CallEnd:
    """``call_ended`` for a stream that ended (a :class:`~holysheep_lb.streaming.StreamOutcome`)."""
    return CallEnd(error=outcome.error, node_id=outcome.node_id, base_url=node_url, response_model=outcome.model,
                   input_tokens=_tokens(outcome.usage, "prompt_tokens"),
                   output_tokens=_tokens(outcome.usage, "completion_tokens"), chunks=outcome.chunks, ended_at=now)
