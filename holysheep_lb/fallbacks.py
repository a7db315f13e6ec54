"""Model fallback chains: each model's breaker and rate limits around its attempt loop.

One call::

    for each model of the chain (the one asked for, then its fallbacks; each at most once):
        model breaker open       -> next model (its CircuitOpenError is kept)
        costs.reserve(model)     -> its budget estimate, or BudgetExceededError: next model
        rate limits              -> block within the call's deadline, or RateLimitExceeded
        execute(model)           -> the client's attempt loop for this model, same deadline
        system failure           -> recorded on the breaker; next model
        answer, or a caller's error (4xx), 429s only, deadline -> recorded; returned / raised
    no model answered -> the user's ``fallback_reply`` (flagged, costs nothing), else the error

A model that answers settles its own cost and rate-limit reservation (a stream's when
it ends, from its usage); one that does not gives both back.

Chains are expanded breadth first through the fallbacks' own fallbacks, skipping any
model already in the chain: a chain never loops and never restarts the retry cycle of
a model it already tried.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from . import forksafe
from .breakers import NO_PERMIT, BreakerBoard, Permit, stream_outcome_hook
from .cleanup import call_each, discard
from .errors import BudgetExceededError, CircuitOpenError, ConfigError, HolySheepError
from .policy.classify import classify
from .policy.retry import NEXT_MODEL, RetryPolicy
from .ratelimit import RateLimits, estimate_tokens, usage_tokens
from .response import Response

__all__ = ["ModelChain", "ModelCosts", "FallbackReply"]

log = logging.getLogger(__name__)

#: ``fallback_reply(model, payload, error) -> dict``: a canned answer when every model failed.
FallbackReply = Callable[[str, Optional[Mapping[str, Any]], HolySheepError], Mapping[str, Any]]


class ModelCosts(Protocol):
    """One call's cost steps around each model the chain sends it to."""

    def reserve(self, model: str) -> Any:
        """Hold ``model``'s estimated cost before it is sent; BudgetExceededError skips the model."""

    def cancel(self, held: Any) -> None:
        """The model gave no answer: give back what ``reserve`` held."""

    def answered(self, held: Any, result: Any, settle_tokens: Callable[[Optional[int]], None]) -> None:
        """The model answered: settle its cost and call ``settle_tokens(actual tokens or None)``
        for the rate limits, now or (a stream) when it ends."""

    def unanswered(self) -> None:
        """An attempt at the model being sent to timed out after its request was sent: the
        gateway may bill it, so its estimate counts as (unconfirmed) spend."""


def _no_tokens(actual_tokens: Optional[int]) -> None:
    """``settle_tokens`` when no rate limit applies."""


def _nothing() -> None:
    """A release step with nothing to release."""


class ModelChain:
    """Runs one call over its model chain. Thread-safe; holds no lock while a model runs."""

    def __init__(self, *, breakers: Optional[BreakerBoard] = None, limits: Optional[RateLimits] = None,
                 fallbacks: Optional[Mapping[str, Sequence[str]]] = None,
                 fallback_reply: Optional[FallbackReply] = None,
                 clock: Callable[[], float] = time.monotonic, policy: Optional[RetryPolicy] = None,
                 context_window_fallbacks: Optional[Mapping[str, Sequence[str]]] = None,
                 content_policy_fallbacks: Optional[Mapping[str, Sequence[str]]] = None,
                 tell_trials: bool = False) -> None:
        self.breakers = breakers
        self.policy = policy if policy is not None else RetryPolicy()
        self.limits = limits if limits is not None and limits.enabled else None
        self._fallbacks = {m: tuple(c) for m, c in (fallbacks or {}).items()}
        #: the chains a model's refusal goes through instead of its fallbacks (RetryDecision.via)
        self._via: Dict[str, Dict[str, Tuple[str, ...]]] = {
            "context_window": {m: tuple(c) for m, c in (context_window_fallbacks or {}).items()},
            "content_filter": {m: tuple(c) for m, c in (content_policy_fallbacks or {}).items()},
        }
        # execute(model, trial) is told whether the model's permit is a half-open breaker's trial
        self.tell_trials = tell_trials
        self._fallback_reply = fallback_reply
        self._clock = clock
        self._counts_lock = threading.Lock()
        self._counts = {"fallback_answers": 0, "canned_replies": 0, "circuit_open_skips": 0}
        forksafe.register(self)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        self._counts_lock = threading.Lock()
        if self.breakers is not None:
            self.breakers.reset_after_fork()
        if self.limits is not None:
            self.limits.reset_after_fork()

    def chain(self, model: str) -> List[str]:
        """``model`` and its fallbacks, breadth first, each model once."""
        order = [model]
        seen = {model}
        i = 0
        while i < len(order):
            for nxt in self._fallbacks.get(order[i], ()):
                if nxt not in seen:
                    seen.add(nxt)
                    order.append(nxt)
            i += 1
        return order

    def run(self, model: Optional[str], payload: Optional[Mapping[str, Any]],
            execute: Callable[..., Any], *, deadline: float,
            costs: Optional[ModelCosts] = None) -> Any:
        """``execute(model)`` for each model of the chain until one answers (see module doc);
        ``execute(model, trial)`` when ``tell_trials`` (trial: the model's breaker is half-open)."""
        if model is None:  # not a model call (GET /models): rate limits only
            return self._send(None, payload, execute, deadline, NO_PERMIT, None)
        started = self._clock()
        errors: List[Tuple[str, HolySheepError]] = []
        chain = self.chain(model)
        pending = deque(chain)
        while pending:
            candidate = pending.popleft()
            if errors and self._clock() >= deadline:
                break
            try:
                permit = (self.breakers.admit("model", candidate) if self.breakers is not None
                          else NO_PERMIT)
            except CircuitOpenError as exc:
                self._count("circuit_open_skips")
                log.debug("model %s skipped: %s", candidate, exc)
                errors.append((candidate, exc))
                continue
            try:
                result = self._send(candidate, payload, execute, deadline, permit, costs)
            except BudgetExceededError as exc:  # only ``costs.reserve`` raises it: nothing was sent
                log.debug("model %s skipped: %s", candidate, exc)
                errors.append((candidate, exc))
                continue
            except HolySheepError as exc:
                decision = self.policy.decide(classify(exc), None, scope="model")
                if decision.action != NEXT_MODEL:
                    raise  # the caller's error or the deadline: no fallback helps
                if decision.via is not None:
                    # a refusal another model may not share (a context window, a content filter):
                    # only the models configured for it, never the plain fallbacks
                    tried = {m for m, _ in errors} | {candidate}
                    special = [m for m in self._via[decision.via].get(candidate, ()) if m not in tried]
                    if not special:
                        raise
                    pending = deque(special)
                log.debug("model %s failed (%s); %s", candidate, type(exc).__name__,
                          "trying its fallback" if pending else "no fallback left")
                errors.append((candidate, exc))
                continue
            # the models that failed are of no more use; their errors' tracebacks hold this
            # frame, which holds the result (a stream): no cycle for the cyclic GC to break
            errors.clear()
            if candidate != model:
                self._count("fallback_answers")
                if isinstance(result, Response) or hasattr(result, "fallback"):  # a stream too
                    result.fallback = True
                    result.extra["requested_model"] = model
            return result
        return self._give_up(model, payload, errors, started)

    def _send(self, model: Optional[str], payload: Optional[Mapping[str, Any]],
              execute: Callable[..., Any], deadline: float, permit: Permit,
              costs: Optional[ModelCosts]) -> Any:
        held, holding = None, False
        try:
            if costs is not None:
                held, holding = costs.reserve(model), True  # type: ignore[arg-type]
            reservation = None
            if self.limits is not None:
                reservation = self.limits.reserve(model, estimate_tokens(payload),
                                                  timeout_s=deadline - self._clock())
        except BaseException:
            permit.release()
            if holding:
                costs.cancel(held)  # type: ignore[union-attr]
            raise
        try:
            result = execute(model, permit.trial) if self.tell_trials else execute(model)
        except BaseException as exc:
            call_each([
                functools.partial(permit.record, exc) if isinstance(exc, HolySheepError) else permit.release,
                (lambda: reservation.cancel()) if reservation is not None else _nothing,
                functools.partial(costs.cancel, held) if costs is not None else _nothing,
            ])
            raise
        try:
            # a JSON answer reads its fields by attribute: never take one of them for a method
            defer = None if isinstance(result, Response) else getattr(result, "defer_outcome", None)
            if defer is not None:  # a stream: its breaker outcome is known only when it ends
                defer(stream_outcome_hook(permit))
            else:
                permit.record(None)
            settle_tokens = reservation.settle if reservation is not None else _no_tokens
            if costs is not None:
                costs.answered(held, result, settle_tokens)
            else:
                settle_tokens(usage_tokens(result))
        except BaseException:
            # Interrupted (KeyboardInterrupt...) with the answer in hand: nobody will read
            # it. A stream is closed (its node and hooks released); the permit is given
            # back if nothing recorded it; a reservation still held is the costs' close().
            call_each([functools.partial(discard, result), permit.release])
            raise
        return result

    def _give_up(self, model: str, payload: Optional[Mapping[str, Any]],
                 errors: List[Tuple[str, HolySheepError]], started: float) -> Any:
        """Every model failed or was skipped: a flagged canned reply, or the most useful error."""
        failures = [e for _, e in errors if not isinstance(e, CircuitOpenError)]
        sent = [e for e in failures if not isinstance(e, BudgetExceededError)]
        if failures:  # a model that was sent to first, else a budget's refusal
            error = sent[-1] if sent else failures[-1]
        else:  # every model's breaker is open: say when the soonest one may let a call through
            error = min((e for _, e in errors), key=lambda e: e.retry_after_s or 0.0)
        if self._fallback_reply is not None:
            data = self._fallback_reply(model, payload, error)
            if not isinstance(data, Mapping):
                raise ConfigError("fallback_reply", type(data).__name__, "must return a dict")
            self._count("canned_replies")
            log.info("every model of %s's chain failed; returning the fallback_reply answer", model)
            resp = Response(dict(data), model=None, fallback=True,
                            latency_ms=(self._clock() - started) * 1000.0)
            resp.extra.update(canned=True, requested_model=model,  # JSON-safe: strings, not exceptions
                              model_errors={m: f"{type(e).__name__}: {e}" for m, e in errors})
            return resp
        error.model_errors = dict(errors)
        raise error

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self._counts[name] += 1

    def stats(self) -> Dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)
