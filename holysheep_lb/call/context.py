"""CallContext: everything one call carries through the pipeline, instead of long
parameter lists and closures. One per call (and a copy per model of its fallback chain);
used by the calling thread, and by hedged copies only for the thread-safe list appends
of ``attempts`` and ``tried``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from ..errors import Attempt
from ..observe import AttemptEvent, CallInfo, ObserverSet
from ..policy.retry import RetryBudget

__all__ = ["CallContext"]


def _never() -> bool:
    return False


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def _no_headers() -> Mapping[str, str]:
    return _NO_HEADERS


@dataclass
class CallContext:
    """One call's request, limits and progress.

    ``deadline`` is on ``clock``. ``attempts``/``tried``/``picked``/``retries`` belong to
    the model being sent to (:meth:`for_model` starts them afresh). ``info`` is the
    observers' view of the call (None when nobody observes). It implements
    :class:`~holysheep_lb.policy.retry.RetryContext` for the retry policy.
    """

    operation: str                                   # "chat", "embeddings", "models" or "request"
    method: str
    path: str
    deadline: float
    clock: Callable[[], float]
    rand: Callable[[], float]
    model: Optional[str] = None                      # the model being sent to (None: not a model call)
    payload: Optional[Mapping[str, Any]] = None      # the JSON body as a dict
    body: Optional[bytes] = None
    headers: Dict[str, str] = field(default_factory=dict, repr=False)  # the call's extra_headers are in it
    messages: Optional[Sequence[Mapping[str, Any]]] = None
    params: Mapping[str, Any] = field(default_factory=dict)
    region: Optional[str] = None
    idempotency_key: Optional[str] = None
    stream: bool = False
    timeout: Optional[Tuple[float, float]] = None    # the call's own (connect_s, read_s); None: the client's
    extra_headers: Mapping[str, str] = field(default_factory=_no_headers, repr=False)  # the call's own; may be secrets
    costs: Any = None                                # the chain's ModelCosts, if any
    retry_budget: Optional[RetryBudget] = None
    observers: Optional[ObserverSet] = None
    info: Optional[CallInfo] = None
    affinity_key: Optional[int] = None               # ring position of the node the call prefers (affinity.py)
    is_closed: Callable[[], bool] = _never
    on_end: Optional[Callable[[Any], None]] = None   # a stream's end hook (stats, costs, observers)
    first_token_timeout_s: Optional[float] = None    # a stream's time-to-first-token limit for this call
    rescue: Any = None                               # a stream's Rescuer (holysheep_lb.rescue), None: off
    exclude: FrozenSet[str] = frozenset()            # node ids this call must not send to (a rescue's)
    started: float = 0.0
    # the model being sent to: its attempts so far
    attempts: List[Attempt] = field(default_factory=list)
    tried: List[str] = field(default_factory=list)   # node ids tried for this model
    picked: Dict[str, float] = field(default_factory=dict)  # node id -> when its attempt was picked
    hedges: Set[str] = field(default_factory=set)   # node ids picked for a hedged copy
    permits: Dict[str, Any] = field(default_factory=dict)  # node id -> node-breaker permit a stream holds
    retries: int = 0
    silent: Set[str] = field(default_factory=set)   # node ids whose route went silent for this model
    trial: bool = False                              # the model's half-open breaker trial: one attempt
    next_model: Optional[str] = None                 # the chain's next model if this one fails (None: last)
    untried: Callable[[], bool] = _never             # whether a node this model has not tried may be used
    # id(error) -> the event of the failed attempt that raised it, until the policy decided what follows;
    # made with ``info`` (None without observers), shared by the copies for each model (an id is unique
    # while its error lives)
    undecided: Optional[Dict[int, AttemptEvent]] = None

    def for_model(self, model: Optional[str], body: Optional[bytes], headers: Dict[str, str]) -> "CallContext":
        """A copy for one model of the chain: its own body, headers (the call's
        ``extra_headers`` on top) and attempts."""
        if self.extra_headers:
            headers = {**headers, **self.extra_headers}
        # a shallow copy of the fields, then this model's own progress (dataclasses.replace
        # would run __init__ over all ~40 fields: the costliest step of a call's bookkeeping)
        new = object.__new__(CallContext)
        new.__dict__.update(self.__dict__)
        new.model, new.body, new.headers = model, body, headers
        new.attempts, new.tried, new.picked, new.hedges, new.permits = [], list(self.exclude), {}, set(), {}
        new.retries, new.silent, new.trial, new.next_model, new.untried = 0, set(), False, None, _never
        return new

    # -- RetryContext ---------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock()

    def random(self) -> float:
        return self.rand()

    def closed(self) -> bool:
        return self.is_closed()

    def nodes_left(self) -> bool:
        return self.untried()

    def went_silent(self) -> bool:
        return bool(self.silent)

    def attempt_failed(self, error: BaseException, event: AttemptEvent) -> None:
        """Hold the event of the failed attempt that raised ``error`` until
        :meth:`attempt_decided` says what the call did next."""
        undecided = self.undecided
        if undecided is None:  # a context made without the client's observer plumbing
            undecided = self.undecided = {}
        undecided[id(error)] = event

    def attempt_decided(self, error: BaseException, next_step: Optional[str]) -> None:
        """Tell the observers about the failed attempt that raised ``error``: ``next_step``
        is the retry policy's decision (None: the policy was not asked)."""
        event = self.undecided.pop(id(error), None) if self.undecided is not None else None
        if event is not None:
            self.emit("attempt_ended", replace(event, next_step=next_step))

    def emit(self, event: str, *args: Any) -> None:
        """Tell the observers (callers check ``ctx.observers`` first, to build nothing otherwise)."""
        if self.observers and self.info is not None:
            self.observers.emit(event, self.info, *args)
