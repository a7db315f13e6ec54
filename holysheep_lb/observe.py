"""Call observers: the one hook through which telemetry sees a call as it happens.

A :class:`CallObserver` is told when a call starts, about every attempt (which node, how
it ended, how long it took), about the decisions between attempts (a fallback to the next
model, a hedged copy, a cache hit, a budget refusal), when a stream's first chunk arrives,
and when the call ends. ``contrib.otel`` turns these into OpenTelemetry spans and
metrics; anyone can write their own (subclass and override what you need: every method
is a no-op here).

Contract:

- Methods run synchronously on the thread that makes the call (or, for attempts of a
  hedged copy, on the copy's thread), never under a lock of the client's. Keep them cheap.
- A failed attempt is reported once the retry policy decided what follows it (its
  ``next_step``), so just before the next attempt or the call's end.
- An observer that raises is logged once per observer and exception type, counted in
  ``stats()["observer_errors"]``, and otherwise ignored: telemetry never breaks a call.
- ``CallInfo.state`` is a dict private to the observers of that call (one per call), where
  an observer keeps what it needs until ``call_ended`` (a span, a start time).
- Nothing here carries the API key. Prompts and answers are reachable through
  ``CallInfo.messages`` and ``CallEnd.result``; an observer records them only if its user
  opted in.
- For a stream, ``call_ended`` runs when the stream ends (completed, interrupted or
  closed early), not when ``chat_completion`` returns it; ``first_chunk`` runs before.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Tuple

from . import forksafe

__all__ = ["CallObserver", "CallInfo", "AttemptEvent", "Decision", "CallEnd", "ObserverSet"]

log = logging.getLogger(__name__)


@dataclass
class CallInfo:
    """What a call asked for; one per call, passed to every event of that call."""

    operation: str                      # "chat", "embeddings", "models" or "request"
    model: Optional[str]                # the model asked for (None for models/request)
    stream: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)   # max_tokens, temperature, top_p, ...
    messages: Optional[Sequence[Mapping[str, Any]]] = None      # record only if the user opted in
    region: Optional[str] = None
    started_at: float = 0.0             # the client's clock (monotonic seconds)
    state: Dict[str, Any] = field(default_factory=dict)         # observers' own, per call


@dataclass(frozen=True)
class AttemptEvent:
    """One attempt on one node, once it ended (answered or failed)."""

    node_id: str
    base_url: str                       # the node's URL (no credentials): server.address/port
    model: str                          # the model this attempt asked the node for
    outcome: str                        # "ok", or the failure kind (policy's kind names)
    latency_s: float
    status_code: Optional[int] = None
    error_type: Optional[str] = None    # the exception class name on failure
    hedge: bool = False                 # a hedged copy (not the call's first attempt at this step)
    # after a failure, the retry policy's decision (RetryDecision.action): "retry" (on another node)
    # or "stop" (this model's attempts end: a fallback model may follow, see ``decided``); None when
    # it answered, or when the policy was not asked (a hedged copy that failed while another went on)
    next_step: Optional[str] = None
    ended_at: float = 0.0               # the client's clock when it ended (0: unknown); it may be told later


@dataclass(frozen=True)
class Decision:
    """A decision between attempts: ``kind`` is "fallback", "hedge", "cache_hit",
    "budget_refused", "retry_budget_exhausted", "rate_limited" or "rescue"; ``detail``
    says more (from/to model, the reason)."""

    kind: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallEnd:
    """How a call ended. ``error`` is None on success.

    For a chat call (a JSON answer or a stream, alike) the tokens and ``cost_usd`` are what
    the spend ledger settled: the usage as :mod:`holysheep_lb.usage` reads it, or, when the
    server reported none (a stream without a usage chunk, one that was cut or closed
    early), the ledger's estimate, and then ``usage_estimated`` is True. A stream that
    broke and was rescued by another counts both. ``cost_usd`` is None when nothing was
    settled (a call that failed before an answer; embeddings and plain requests are not
    priced) and 0.0 for a cache hit or a canned reply; the tokens of those are the
    answer's own ``usage``.
    """

    result: Any = None                  # the Response (or a canned stream) on success; None for a ChatStream
    error: Optional[BaseException] = None
    node_id: Optional[str] = None       # the node that answered
    base_url: Optional[str] = None      # its configured URL (no credentials); None for a cache hit
    response_model: Optional[str] = None
    response_id: Optional[str] = None   # the answer's "id" (a stream: its chunks')
    finish_reasons: Tuple[str, ...] = ()  # each choice's, in choice order (a stream: as far as it got)
    input_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    cached: bool = False                # served from the response cache
    chunks: int = 0                     # streams: chunks delivered
    ended_at: float = 0.0               # the client's clock
    cost_usd: Optional[float] = None    # what the ledger settled for the call, USD (see above)
    cached_input_tokens: Optional[int] = None  # of input_tokens: read from the provider's prompt cache
    cache_write_tokens: Optional[int] = None   # of input_tokens: written to it
    usage_estimated: bool = False       # the tokens and cost are the ledger's estimate: no usage reported


class CallObserver:
    """Base class of observers: override the events you need."""

    def call_started(self, call: CallInfo) -> None:
        """A call passed validation and is about to run."""

    def attempt_ended(self, call: CallInfo, attempt: AttemptEvent) -> None:
        """One attempt ended."""

    def decided(self, call: CallInfo, decision: Decision) -> None:
        """The call made a decision between attempts."""

    def first_chunk(self, call: CallInfo, at: float) -> None:
        """A stream's first chunk arrived (``at`` on the client's clock)."""

    def call_ended(self, call: CallInfo, end: CallEnd) -> None:
        """The call ended (for a stream: the stream ended)."""


class ObserverSet:
    """The client's observers; calls each, isolating their failures. Thread-safe."""

    def __init__(self, observers: Sequence[CallObserver] = ()) -> None:
        self._observers: Tuple[CallObserver, ...] = tuple(observers)
        self._lock = threading.Lock()
        self._logged: Set[Tuple[int, type]] = set()
        self.errors = 0
        forksafe.register(self)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """A lock held by another thread at fork time would stay held in the child."""
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._observers)

    def add(self, observer: CallObserver) -> None:
        if not isinstance(observer, CallObserver):
            raise TypeError(f"an observer must be a CallObserver, got {type(observer).__name__}")
        with self._lock:
            self._observers = self._observers + (observer,)

    def remove(self, observer: CallObserver) -> None:
        with self._lock:
            self._observers = tuple(o for o in self._observers if o is not observer)

    def emit(self, event: str, *args: Any) -> None:
        """Call ``event`` on every observer; an observer's exception is logged and counted."""
        for observer in self._observers:  # a tuple: adding one meanwhile does not disturb this loop
            try:
                getattr(observer, event)(*args)
            except Exception as exc:  # noqa: BLE001 - telemetry never breaks a call; logged and counted
                with self._lock:
                    self.errors += 1
                    first = (id(observer), type(exc)) not in self._logged
                    if first and len(self._logged) < 1000:
                        self._logged.add((id(observer), type(exc)))
                if first:
                    log.warning("call observer %r failed in %s (logged once)", observer, event, exc_info=True)
