"""The value a call returns: the decoded JSON as a dict, with routing metadata attached."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, cast

from .errors import Attempt
from .types import Choice, JSONObject, Usage

__all__ = ["Response"]


class Response(JSONObject):
    """The decoded JSON answer, read by key or by attribute, as in openai-python.

    ``resp["choices"][0]["message"]["content"]`` and ``resp.choices[0].message.content``
    both work (see :mod:`holysheep_lb.types`: a known field the server omitted reads as
    None, an unknown name raises AttributeError). ``resp.data[0].embedding`` and
    ``resp.data[0].id`` read embeddings and models lists. ``model_dump()`` returns the
    JSON as plain dicts.

    Routing metadata rides along as attributes, never as keys, so the dict is exactly
    what the API returned:

    ``node_id``/``region``  the node that answered
    ``attempts``            every attempt of the call, in order (:class:`Attempt`)
    ``latency_ms``          wall time of the whole call, retries and waits included
    ``request_id``          the server's ``x-request-id``, if it sent one
    ``model``               the model that answered (the JSON's ``"model"`` when it has one)
    ``fallback``            True when the answer is not from the model asked for
    ``cached``              True when it came from the response cache
    ``extra``               a dict for metadata added by optional features
    ``content_filtered``    True when a choice ended with ``finish_reason == "content_filter"``
    ``finish_reason``       the first choice's ``finish_reason``
    """

    __slots__ = ("node_id", "region", "attempts", "latency_ms", "request_id", "model",
                 "fallback", "cached", "extra")

    # The top-level fields of a chat completion, an embeddings answer and a models list
    # (``model`` is the metadata above). ``data`` holds Embedding or Model views, by their
    # ``object`` tag.
    id: str
    object: str
    created: int
    choices: List[Choice]
    usage: Optional[Usage]
    system_fingerprint: Optional[str]
    service_tier: Optional[str]
    data: List[Any]

    def __init__(self, data: Dict[str, Any], *, node_id: Optional[str] = None,
                 region: Optional[str] = None, attempts: Tuple[Attempt, ...] = (),
                 latency_ms: float = 0.0, request_id: Optional[str] = None,
                 model: Optional[str] = None, fallback: bool = False, cached: bool = False) -> None:
        super().__init__(data)
        self.node_id = node_id
        self.region = region
        self.attempts = attempts
        self.latency_ms = latency_ms
        self.request_id = request_id
        self.model = model
        self.fallback = fallback
        self.cached = cached
        self.extra: Dict[str, Any] = {}

    @property
    def finish_reason(self) -> Optional[str]:
        """The first choice's ``finish_reason`` ("stop", "length", "content_filter"...), or None."""
        try:
            reason = self["choices"][0]["finish_reason"]
        except (KeyError, IndexError, TypeError):
            return None
        return reason if isinstance(reason, str) else None

    @property
    def content_filtered(self) -> bool:
        """True when the provider's content filter cut or withheld an answer (a choice ended
        with ``finish_reason == "content_filter"``): the text is not the whole answer."""
        choices = self.get("choices")
        return isinstance(choices, list) and any(
            isinstance(c, dict) and c.get("finish_reason") == "content_filter" for c in choices)

    @property
    def text(self) -> Optional[str]:
        """The first choice's message content, or None when there is none."""
        try:
            return cast(Optional[str], self["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            return None

    def __repr__(self) -> str:
        return (f"Response(node_id={self.node_id!r}, model={self.model!r}, "
                f"attempts={len(self.attempts)}, latency_ms={self.latency_ms:.1f}, "
                f"data={dict.__repr__(self)[:200]})")

    def __reduce__(self) -> Tuple[Any, ...]:  # pickling keeps the metadata (batch results cross processes)
        state = {k: getattr(self, k) for k in self.__slots__}
        return (_rebuild, (dict(self), state))


def _rebuild(data: Dict[str, Any], state: Dict[str, Any]) -> Response:
    resp = Response(data)
    for k, v in state.items():
        setattr(resp, k, v)
    return resp
