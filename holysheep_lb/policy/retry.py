"""The one retry decision: after an outcome, retry on another node after W seconds, wait
for a throttled node, move to the next model, or stop (and why).

:meth:`RetryPolicy.decide` holds every rule: whether the outcome is retryable (from
:mod:`.classify`), the retry count, the retry budget, backoff with full jitter, the
call's deadline and the Retry-After cap. The attempt loop and the model chain obey
its answer and decide nothing themselves; :meth:`RetryPolicy.attempt_limit_s` likewise
says how much of the deadline one attempt may wait (leaving room for the next model).

The policy is an immutable value shared by every thread (like ``urllib3.Retry``);
each call passes its own state (a :class:`RetryContext`), so no state is shared. Pass
your own with ``Client(retry=MyPolicy(...))``: subclass :class:`RetryPolicy` and
override :meth:`~RetryPolicy.decide` (call ``super().decide`` for the defaults).
The :class:`RetryBudget` is the one shared, locked piece: it caps retries at a ratio
of calls so that a sick cluster does not receive triple load.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence

from .. import forksafe
from ..errors import ConfigError
from .classify import RETRY_BUDGET_EXHAUSTED, SILENT_EVERYWHERE, THROTTLED_EVERYWHERE, Outcome

__all__ = ["RetryPolicy", "RetryDecision", "RetryContext", "RetryBudget", "RETRY_BUDGET_EXHAUSTED",
           "RETRY", "WAIT", "NEXT_MODEL", "STOP", "parse_retry_after", "parse_should_retry"]

log = logging.getLogger(__name__)

#: :attr:`RetryDecision.action` values.
RETRY = "retry"            # send again, to another node, after ``wait_s``
WAIT = "wait"              # every usable node is throttled: wait ``wait_s`` for the soonest, then send
NEXT_MODEL = "next_model"  # this model failed: the chain moves to its next fallback
STOP = "stop"              # give up; ``reason`` says why


@dataclass(frozen=True)
class RetryDecision:
    """What to do after an outcome: ``action`` (RETRY, WAIT, NEXT_MODEL, STOP), how long
    to wait first (``wait_s``) and why (``reason``, the AllAttemptsFailedError reason on STOP)."""

    action: str
    wait_s: float = 0.0
    reason: str = ""
    via: Optional[str] = None  # NEXT_MODEL through a special chain: "context_window" or "content_filter"


class RetryContext(Protocol):
    """What :meth:`RetryPolicy.decide` reads about the call so far (a ``CallContext``)."""

    @property
    def deadline(self) -> float: ...     # the call's deadline on ``now()``'s clock

    @property
    def retries(self) -> int: ...        # retries made so far (0 after the first attempt)

    @property
    def attempts(self) -> Sequence[Any]: ...  # the attempts made so far

    @property
    def retry_budget(self) -> Optional["RetryBudget"]: ...

    def now(self) -> float: ...

    def random(self) -> float: ...

    def closed(self) -> bool: ...

    def nodes_left(self) -> bool: ...    # a node this model has not tried may be used

    def went_silent(self) -> bool: ...   # a route of this model went silent in this call

    @property
    def trial(self) -> bool: ...         # the model's breaker is half-open: this is its one trial attempt


@dataclass(frozen=True)
class RetryPolicy:
    """How many retries a call may make and how long to wait between them.

    Backoff is "full jitter" (``uniform(0, min(cap, base * 2**n))``): it halves the
    work of contending clients compared with plain exponential backoff. The defaults
    are smaller than openai-python's 0.5 s/8 s because each retry goes to a *different*
    node: the first failover should be almost immediate, while a cluster that keeps
    failing still sees the wait double.
    """

    max_retries: int = 3
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    retry_after_cap_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError("max_retries", self.max_retries, "must be an integer >= 0")
        for name in ("backoff_base_s", "backoff_cap_s", "retry_after_cap_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(name, value, "must be a finite number of seconds >= 0")

    def backoff_s(self, retry_number: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry ``retry_number`` (1 for the first retry)."""
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * (2 ** max(0, retry_number - 1)))
        return ceiling * rand()

    def throttle_s(self, outcome: Outcome) -> Optional[float]:
        """How long a node that answered ``outcome`` is left alone (its Retry-After, capped:
        a node's ``Retry-After: 99999999`` must not bench it for years)."""
        if outcome.retry_after_s is None:
            return None
        return min(outcome.retry_after_s, self.retry_after_cap_s)

    def attempt_limit_s(self, ctx: RetryContext, fallback_wait_s: Optional[float]) -> float:
        """The longest the next attempt may wait for its answer (its read timeout, a stream's
        first token), given what remains of the call's deadline.

        While the chain has a next model (``fallback_wait_s``: how long an attempt at that
        model waits for its own answer; None: this is the last model), the attempt leaves
        ``min(remaining / 2, fallback_wait_s)`` of the deadline to it: a primary that never
        answers cannot use up the time its fallback needs. The last model gets all of it.
        """
        remaining_s = ctx.deadline - ctx.now()
        if fallback_wait_s is None or remaining_s <= 0:
            return remaining_s
        return remaining_s - min(remaining_s / 2.0, max(0.0, fallback_wait_s))

    def decide(self, outcome: Outcome, ctx: Optional[RetryContext], *, scope: str = "attempt") -> RetryDecision:
        """What the call does after ``outcome``.

        ``scope="attempt"``: an attempt on a node failed (or, kind ``"throttled"``, every
        usable node asked us to wait): RETRY after backoff, WAIT for the throttled node,
        or STOP. ``scope="model"``: a model's attempt loop failed: NEXT_MODEL when the
        failure says the model is broken, else STOP (no fallback helps a caller's error,
        throttling or the deadline). A retry withdraws from ``ctx.retry_budget``.
        """
        if scope == "model":
            if outcome.counts_against_model_breaker:
                return RetryDecision(NEXT_MODEL, reason=f"the model failed ({outcome.kind})")
            if outcome.reroute in ("silent", "throttled"):
                return RetryDecision(NEXT_MODEL, reason=f"every route of the model is {outcome.reroute}")
            if outcome.reroute in ("context_window", "content_filter"):
                # only through its own fallbacks (context_window_fallbacks, content_policy_fallbacks)
                return RetryDecision(NEXT_MODEL, reason=f"the model refused the call ({outcome.reroute})",
                                     via=outcome.reroute)
            return RetryDecision(STOP, reason="final")
        if ctx is None:
            raise ValueError("decide(scope='attempt') needs the call's context")
        if outcome.kind == "throttled":
            wait_s = outcome.retry_after_s or 0.0
            if wait_s > self.retry_after_cap_s or ctx.now() + wait_s >= ctx.deadline:
                return RetryDecision(STOP, reason=f"{THROTTLED_EVERYWHERE} for at least {wait_s:.1f} s")
            return RetryDecision(WAIT, wait_s=wait_s, reason=THROTTLED_EVERYWHERE)
        if not outcome.retryable:
            return RetryDecision(STOP, reason="final")
        if outcome.kind == "circuit_open" and not ctx.nodes_left():
            return RetryDecision(STOP, reason=outcome.detail)
        if ctx.trial:  # a half-open breaker lets exactly one attempt through
            return RetryDecision(STOP, reason=f"the model's half-open trial failed ({outcome.kind})")
        if not ctx.nodes_left():
            # a route that went silent is not tried again: with no untried node, the next model
            if outcome.silent or ctx.went_silent():
                return RetryDecision(STOP, reason=f"{SILENT_EVERYWHERE} ({outcome.kind})")
            if outcome.kind == "status_429" and outcome.retry_after_s is None:
                return RetryDecision(STOP, reason=f"{THROTTLED_EVERYWHERE} (429 without Retry-After)")
        if ctx.retries >= self.max_retries:
            return RetryDecision(STOP, reason=f"all {len(ctx.attempts)} attempts failed")
        if ctx.closed():  # close() ran during this call: no new attempt, no new connection
            return RetryDecision(STOP, reason="the client was closed")
        budget = ctx.retry_budget
        if outcome.counts_against_retry_budget and budget is not None and not budget.try_withdraw():
            log.debug("retry budget exhausted; returning the failure instead of retrying")
            return RetryDecision(STOP, reason=RETRY_BUDGET_EXHAUSTED)
        wait_s = self.backoff_s(ctx.retries + 1, ctx.random)
        if ctx.now() + wait_s >= ctx.deadline:
            return RetryDecision(STOP, reason="deadline exceeded")
        return RetryDecision(RETRY, wait_s=wait_s, reason="retrying on another node")


def parse_retry_after(
    headers: Mapping[str, str], now: Optional[Callable[[], float]] = None
) -> Optional[float]:
    """Seconds the server asked us to wait, or None when it did not say (or said garbage).

    Reads ``retry-after-ms`` first, then ``retry-after`` as seconds or an HTTP date.
    Negative, non-finite and unparseable values are ignored rather than trusted.
    ``headers`` must be case-insensitive (requests' headers are).
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        value = _parse_float(raw_ms)
        if value is not None:
            return value / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    value = _parse_float(raw)
    if value is not None:
        return value
    if len(raw) > 64:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    try:
        target = parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    delta = target - (now or time.time)()
    return max(0.0, delta) if math.isfinite(delta) else None


def _parse_float(raw: str) -> Optional[float]:
    text = raw.strip()
    if not text or len(text) > 32:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


def parse_should_retry(headers: Mapping[str, str]) -> Optional[bool]:
    """The server's ``x-should-retry`` hint: True, False or None when absent or garbage."""
    raw = headers.get("x-should-retry")
    if raw is None:
        return None
    raw = raw.strip().lower()
    if raw == "true":
        return True
    if raw == "false":
        return False
    return None


class RetryBudget:
    """Caps retries at ``ratio`` of calls plus ``min_per_s`` per second (Finagle's budget).

    Every call deposits once; every retry (or hedge) withdraws once. Both expire after
    ``ttl_s``, so the budget follows recent traffic: with the defaults at most 20% of
    the calls of the last 10 s are retried, plus 1 retry per second so that a quiet
    client still retries. Thread-safe; fixed memory (ten time slices). Amounts are
    integers (a retry costs ``1000 / ratio``, a call deposits 1000), so counts are exact.
    """

    _SLICES = 10
    _UNIT = 1000

    def __init__(self, ratio: float = 0.2, *, min_per_s: float = 1.0, ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ratio >= 0 or not min_per_s >= 0 or not ttl_s > 0:
            raise ValueError("ratio and min_per_s must be >= 0 and ttl_s > 0")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.ttl_s = ttl_s
        self._clock = clock
        # with ratio 0 calls earn nothing and only the floor pays for retries
        self._earn = self._UNIT if ratio > 0 else 0
        self._cost = int(round(self._UNIT / ratio)) if ratio > 0 else self._UNIT
        self._reserve = int(round(min_per_s * ttl_s * self._cost))
        self._slice_s = ttl_s / self._SLICES
        self._budget_lock = threading.Lock()
        self._epochs: List[int] = [-1] * self._SLICES
        self._balance: List[int] = [0] * self._SLICES  # earned minus spent, per slice
        self.calls = 0
        self.retries = 0
        self.denied = 0
        forksafe.register(self)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        self._budget_lock = threading.Lock()

    def _slot(self, now: float) -> int:
        epoch = int(now // self._slice_s)
        index = epoch % self._SLICES
        if self._epochs[index] != epoch:  # an expired slice starts afresh
            self._epochs[index] = epoch
            self._balance[index] = 0
        return index

    def _available(self, now: float) -> int:
        oldest = int(now // self._slice_s) - self._SLICES + 1
        return self._reserve + sum(b for e, b in zip(self._epochs, self._balance) if e >= oldest)

    def deposit(self) -> None:
        """Count one call."""
        with self._budget_lock:
            self._balance[self._slot(self._clock())] += self._earn
            self.calls += 1

    def can_withdraw(self) -> bool:
        """Whether a withdrawal would succeed now (a hint; it takes nothing)."""
        with self._budget_lock:
            return self._available(self._clock()) >= self._cost

    def try_withdraw(self) -> bool:
        """Take one retry; False (counted as denied) when the budget is spent."""
        with self._budget_lock:
            now = self._clock()
            index = self._slot(now)
            if self._available(now) < self._cost:
                self.denied += 1
                return False
            self._balance[index] -= self._cost
            self.retries += 1
            return True

    def refund(self) -> None:
        """Give back one withdrawal that was not used."""
        with self._budget_lock:
            self._balance[self._slot(self._clock())] += self._cost
            self.retries -= 1

    def snapshot(self) -> Dict[str, Any]:
        with self._budget_lock:
            left = self._available(self._clock()) // self._cost
            return {"ratio": self.ratio, "min_per_s": self.min_per_s, "ttl_s": self.ttl_s,
                    "calls": self.calls, "retries": self.retries, "denied": self.denied,
                    "available": max(0, left)}
