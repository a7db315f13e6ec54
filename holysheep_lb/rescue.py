"""Mid-stream rescue: what to do when a stream breaks after its first chunk.

A stream that is cut, stalls, or brings a retryable error event after the caller has
started reading it can no longer be retried as a whole, but its answer can still be
saved while a route (a node and a model) is left within the call's deadline::

    for each model from the broken stream's model on along its fallback chain:
        nodes of that model that already failed in this call are excluded
        the model accepts an assistant prefill (models.CapabilityTable)
            -> CONTINUE: send the text so far as a trailing assistant message and
               stream the rest as if nothing happened
            -> a 400 (the prefill was rejected after all): RESTART on the same model
        else RESTART (unless rescue="continue"): the answer starts from scratch
        no route of the model answers -> the next model
    nothing answered, the deadline passed or max_rescues were used -> None: the caller
    gets StreamInterruptedError with its partial text

A restart is never silent for a caller that read chunks of the broken answer: its
iterator raises :class:`~holysheep_lb.errors.StreamRestartedError` once (see
:class:`~holysheep_lb.streaming.ChatStream`). Each stream a rescue opens is its own
attempt with its own cost reservation, so a continuation is billed as the model that
produced it. One :class:`Rescuer` serves one call, from one thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

from .errors import AllAttemptsFailedError, APIError, BadRequestError, ConfigError, HolySheepError
from .models import CapabilityTable

__all__ = ["RESCUE_MODES", "BrokenStream", "Rescue", "Rescuer", "Opener", "prefill_messages"]

log = logging.getLogger(__name__)

#: ``stream_rescue`` values: "auto" continues or restarts, "continue" only continues,
#: "off" never rescues.
RESCUE_MODES = ("auto", "continue", "off")
#: Interruption reasons no other route can help with.
_NOT_RESCUED = frozenset({"too_large"})

#: ``opener(model, messages, extra_params, exclude_node_ids)``: open a stream of
#: ``model`` alone (no fallback chain) on a node outside ``exclude_node_ids``, up to its
#: first chunk; raise a HolySheepError when no such route answers.
Opener = Callable[[str, List[Mapping[str, Any]], Mapping[str, Any], FrozenSet[str]], Any]


@dataclass(frozen=True)
class BrokenStream:
    """What a stream knew when it broke. ``continuable``: only choice 0's text so far
    (no tool calls, one choice), so a prefill can carry it."""

    model: str
    node_id: str
    reason: str
    error: APIError
    text: str
    chunks: int
    continuable: bool


class Rescue(NamedTuple):
    """A rescue that worked: the new stream (first chunk arrived), ``"continue"`` or ``"restart"``."""

    stream: Any
    mode: str
    model: str


def prefill_messages(messages: Sequence[Mapping[str, Any]], text: str,
                     extra: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """``messages`` with ``text`` appended as the assistant's unfinished answer."""
    return [*messages, {**extra, "role": "assistant", "content": text}]


class Rescuer:
    """Decides and performs the rescues of one streamed call (see the module doc).

    ``models`` is the call's model chain in order; ``opener`` opens one route (see
    :data:`Opener`). Not thread-safe: a stream is iterated from one thread.
    """

    def __init__(self, *, models: Sequence[str], messages: Sequence[Mapping[str, Any]], opener: Opener,
                 capabilities: CapabilityTable, mode: str = "auto", max_rescues: int = 2,
                 deadline: float, clock: Callable[[], float]) -> None:
        if mode not in RESCUE_MODES:
            raise ConfigError("stream_rescue", mode, f"must be one of {', '.join(RESCUE_MODES)}")
        self._models = tuple(models)
        self._messages = list(messages)
        self._opener = opener
        self._capabilities = capabilities
        self.mode = mode
        self.max_rescues = max_rescues
        self._deadline = deadline
        self._clock = clock
        self.rescues = 0
        self.failed: Set[Tuple[str, str]] = set()  # (node id, model) routes that failed in this call
        self.history: List[Dict[str, Any]] = []

    def __repr__(self) -> str:
        return f"<Rescuer mode={self.mode} rescues={self.rescues}/{self.max_rescues}>"

    def __call__(self, broken: BrokenStream) -> Optional[Rescue]:
        """A new stream that carries on ``broken``'s answer, or None when none can."""
        self.failed.add((broken.node_id, broken.model))
        why = self._refusal(broken)
        if why is not None:
            log.debug("stream from node %s (%s) broke (%s); not rescued: %s", broken.node_id, broken.model,
                      broken.reason, why)
            return None
        self.rescues += 1
        for model in self._candidates(broken.model):
            if self._clock() >= self._deadline:
                break
            rescue = self._try_model(model, broken)
            if rescue is not None:
                self.history.append({"mode": rescue.mode, "reason": broken.reason, "from_node": broken.node_id,
                                     "from_model": broken.model, "to_node": getattr(rescue.stream, "node_id", None),
                                     "to_model": model, "after_chunks": broken.chunks})
                log.debug("stream from node %s (%s) broke after %d chunks (%s); %s on model %s, node %s",
                          broken.node_id, broken.model, broken.chunks, broken.reason,
                          "continued" if rescue.mode == "continue" else "restarted", model,
                          getattr(rescue.stream, "node_id", None))
                return rescue
        log.debug("stream from node %s (%s) broke (%s); no route left to rescue it", broken.node_id,
                  broken.model, broken.reason)
        return None

    def _refusal(self, broken: BrokenStream) -> Optional[str]:
        if self.mode == "off":
            return "rescue is off"
        if self.rescues >= self.max_rescues:
            return f"max_rescues={self.max_rescues} used"
        if broken.reason in _NOT_RESCUED or not broken.error.retryable:
            return f"a {broken.reason} error is not one another route can fix"
        if self._clock() >= self._deadline:
            return "the call's deadline has passed"
        return None

    def _candidates(self, model: str) -> Tuple[str, ...]:
        """The broken model (other nodes), then the models after it in the chain."""
        if model in self._models:
            return self._models[self._models.index(model):]
        return (model,) + self._models

    def _excluded(self, model: str) -> FrozenSet[str]:
        return frozenset(node for node, m in self.failed if m == model)

    def _open(self, model: str, messages: List[Mapping[str, Any]], params: Mapping[str, Any]) -> Any:
        try:
            return self._opener(model, messages, params, self._excluded(model))
        except AllAttemptsFailedError as exc:
            self.failed.update((a.node_id, model) for a in exc.attempts)
            raise

    def _try_model(self, model: str, broken: BrokenStream) -> Optional[Rescue]:
        caps = self._capabilities.get(model)
        if broken.continuable and broken.text and caps.prefill is True:
            messages = prefill_messages(self._messages, broken.text, caps.prefill_message)
            try:
                return Rescue(self._open(model, messages, caps.prefill_params), "continue", model)
            except BadRequestError as exc:  # the prefill was refused after all: a restart may still work
                log.debug("model %s refused the continuation (%s); restarting instead", model, exc.message)
            except HolySheepError as exc:
                log.debug("continuation on model %s failed: %s", model, exc)
                return None
        if self.mode == "continue":
            return None
        try:
            return Rescue(self._open(model, list(self._messages), {}), "restart", model)
        except HolySheepError as exc:
            log.debug("restart on model %s failed: %s", model, exc)
            return None
