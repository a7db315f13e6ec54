"""Client-side rate limits: a fair, blocking token bucket, and per-client/per-model RPM and TPM.

These limits are the caller's own quota (a provider's requests or tokens per minute),
enforced before anything is sent; a 429 from a node is a different thing
(:class:`~holysheep_lb.errors.RateLimitError`).

The rule of a per-minute limit
------------------------------
``requests_per_minute=N`` (and ``tokens_per_minute=N``, and each model's limits) never
admit more than ``N`` in any 60 s window, wherever the window starts: the first minute
included, whatever the threads do. Each limit is a token bucket whose capacity is the
*burst* ``B`` (``rate_limit_burst_s`` seconds' worth of the limit, one second by default;
at least one request for a request limit) and whose refill is ``(N - B) / 60`` per second,
so any 60 s window holds at most what was in the bucket at its start (``<= B``) plus a
minute of refill (``N - B``): ``N``. The sustained pace is ``N - B`` a minute (98% of ``N``
with the default burst); a larger burst trades pace for headroom. Providers that enforce a
minute over shorter windows (Azure OpenAI: 1 to 10 s) see at most ``B`` at once.

A single call larger than the burst (a big token estimate) is not refused: while nobody
takes from it the bucket keeps filling past ``B`` (up to ``N``), the call goes once it
holds enough, and the bucket then starts from ``B`` minus the call, in debt, so the
callers after it wait for the refill. In symbols, with ``E`` the bucket's level (refill
uncapped since the last take), a take of ``n <= N`` waits for ``E >= n`` and leaves
``min(B, E) - n``; summing over the takes in any window of 60 s gives at most
``B + 60 * (N - B) / 60 = N``. Calls larger than the burst lower the pace (each needs
the bucket to have idled ``(n - B) / rate``): set the burst to cover your usual call. A
call above ``N`` can never be admitted and is refused at once. A new bucket (or process)
starts as if it had been idle for a minute.

Settling usage (``adjust``): a call that used more tokens than estimated takes the
difference afterwards (the bucket may go into debt, delaying the next callers); one
that used fewer gives the difference back, which refills the bucket up to ``B`` (never
past it): given-back tokens never add to a burst.

A limiter is any object with three methods, so a process-shared implementation
(Redis, with the same rule) can replace :class:`TokenBucket` through
``Client(rate_limiter_factory=...)``, called as ``factory(name, rate_per_s, capacity)``
with the refill rate and the burst above (``capacity + 60 * rate_per_s`` is the limit):

``acquire(n=1, timeout=None)``  block until ``n`` tokens are taken, or raise
                                 :class:`~holysheep_lb.errors.RateLimitExceeded`
``try_acquire(n=1) -> bool``     take ``n`` tokens now or return False; never blocks
``adjust(delta)``                take ``delta`` more tokens (may go into debt), or give
                                 ``-delta`` back; used to correct an estimate
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple

from . import forksafe
from .errors import RateLimitExceeded
from .tokens import estimate_call_tokens
from .usage import total_tokens

__all__ = ["Limiter", "TokenBucket", "RateLimits", "Reservation", "estimate_tokens", "usage_tokens",
           "minute_bucket_shape"]

log = logging.getLogger(__name__)

_EPSILON = 1e-9  # float slack, so that 0.1 * 10 tokens count as 1


class Limiter(Protocol):
    """What the client needs from a rate limiter (see the module docstring)."""

    def acquire(self, n: float = 1, timeout: Optional[float] = None) -> None: ...

    def try_acquire(self, n: float = 1) -> bool: ...

    def adjust(self, delta: float) -> None: ...


def _check_positive(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"TokenBucket {label} must be a finite number > 0, got {value!r}")
    return float(value)


def minute_bucket_shape(per_minute: float, burst_s: float, *, whole: bool) -> Tuple[float, float]:
    """(refill rate per second, burst) of a limit of ``per_minute`` (see the module docstring).

    The burst is ``burst_s`` seconds' worth; ``whole`` (a request limit) makes it at least
    one, so that single requests keep the full pace, yet below the limit (a refill of zero
    would never admit again).
    """
    per_minute = _check_positive("per_minute", per_minute)
    burst = per_minute * _check_positive("burst_s", burst_s) / 60.0
    if whole:
        burst = max(burst, 1.0)
    if burst >= per_minute:
        burst = per_minute / 2.0
    return (per_minute - burst) / 60.0, burst


class TokenBucket:
    """A thread-safe token bucket: ``rate_per_s`` tokens a second, at most ``capacity``
    at once.

    ``max_take`` (default: ``capacity``) is the largest single take. Above ``capacity``,
    the bucket fills past its capacity while nobody takes from it, and each take first
    cuts it back to ``capacity``: this is the per-minute rule of the module docstring,
    which bounds any 60 s window to ``capacity + 60 * rate_per_s`` when ``max_take`` is
    that sum. With the default it is a classic bucket. It starts holding ``max_take``.

    ``acquire`` blocks (no busy-waiting) and serves callers first come, first served:
    a large request is not starved by small ones, and ``try_acquire`` never overtakes a
    blocked caller. ``clock`` is injectable (tests pass a fake one with
    ``try_acquire``/``acquire(timeout=0)``).

    Interrupt-safe: a blocked caller sleeps on a C-level queue of its own, outside the
    bucket's plain lock, which is held for arithmetic only. (A ``threading.Condition``
    can be left holding its lock by a KeyboardInterrupt landing inside its Python-level
    ``__enter__`` or ``wait``, which would hang every caller of the bucket.)
    """

    def __init__(self, rate_per_s: float, capacity: float, *, max_take: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, name: str = "bucket") -> None:
        self.rate_per_s = _check_positive("rate_per_s", rate_per_s)
        self.capacity = _check_positive("capacity", capacity)
        self.max_take = self.capacity if max_take is None else _check_positive("max_take", max_take)
        if self.max_take < self.capacity:
            raise ValueError(f"TokenBucket max_take must be >= capacity ({self.capacity:g}), got {max_take!r}")
        self.name = name
        self._clock = clock
        self._tokens_lock = threading.Lock()
        # The level, refilled uncapped (up to max_take) since the last take; a take cuts
        # it to the capacity first (see _take).
        self._tokens = self.max_take
        self._stamp = clock()
        # blocked callers in arrival order, each sleeping on its own queue until woken
        self._queue: "collections.deque[queue.SimpleQueue[None]]" = collections.deque()
        self.consumed = 0.0
        # counted under the lock the bucket takes anyway: free on the path that does not wait
        self.waits = 0          # acquires that had to block
        self.waited_s = 0.0     # time they spent blocked
        self.rejections = 0     # acquires refused (timed out, or more than max_take)
        forksafe.register(self)

    def __repr__(self) -> str:
        return (f"<TokenBucket {self.name} rate_per_s={self.rate_per_s:g} capacity={self.capacity:g}"
                + ("" if self.max_take == self.capacity else f" max_take={self.max_take:g}") + ">")

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """The parent's blocked callers do not exist in a child; neither does their lock."""
        self._tokens_lock = threading.Lock()
        self._queue.clear()

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.max_take, self._tokens + (now - self._stamp) * self.rate_per_s)
            self._stamp = now

    def _take(self, n: float) -> None:
        """Take ``n`` (a grant, or debt): the level first drops to the capacity. Under the lock."""
        self._tokens = min(self.capacity, self._tokens) - n
        self.consumed += n

    def _check(self, n: float) -> float:
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise ValueError(f"token count must be a finite number > 0, got {n!r}")
        if n > self.max_take:
            raise RateLimitExceeded(self.name, n, None,
                                    f"more than the limit's maximum of {self.max_take:g} at once")
        return float(n)

    def try_acquire(self, n: float = 1) -> bool:
        """Take ``n`` tokens if they are there and nobody is waiting; never blocks."""
        n = self._check(n)
        now = self._clock()
        with self._tokens_lock:
            self._refill(now)
            if self._queue or self._tokens + _EPSILON < n:
                return False
            self._take(n)
            return True

    def acquire(self, n: float = 1, timeout: Optional[float] = None) -> None:
        """Block until ``n`` tokens are taken (in arrival order).

        Raises :class:`RateLimitExceeded` once ``timeout`` seconds have passed without
        them (``timeout=0`` never blocks), or at once if ``n`` exceeds ``max_take``.
        """
        try:
            n = self._check(n)
        except RateLimitExceeded:
            with self._tokens_lock:
                self.rejections += 1
            raise
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):
            raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")
        me: "queue.SimpleQueue[None]" = queue.SimpleQueue()
        now = started = self._clock()
        deadline = None if timeout is None else now + timeout
        with self._tokens_lock:
            self._queue.append(me)
        waited = False
        try:
            while True:
                with self._tokens_lock:
                    self._refill(now)
                    wait_s: Optional[float] = None  # not first in line: wait to be woken
                    if self._queue[0] is me:
                        if self._tokens + _EPSILON >= n:
                            self._take(n)
                            return
                        wait_s = (n - self._tokens) / self.rate_per_s
                    short = max(0.0, n - self._tokens)
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        with self._tokens_lock:
                            self.rejections += 1
                        raise RateLimitExceeded(self.name, n, short / self.rate_per_s,
                                                f"timed out after {timeout:g} s")
                    wait_s = left if wait_s is None else min(wait_s, left)
                waited = True
                try:
                    me.get(timeout=wait_s)  # no lock held while asleep
                except queue.Empty:
                    pass
                now = self._clock()
        finally:
            with self._tokens_lock:
                if waited:
                    self.waits += 1
                    self.waited_s += max(0.0, now - started)
                self._queue.remove(me)
                head = self._queue[0] if self._queue else None
            if head is not None:
                head.put(None)  # the next in line may go now

    def adjust(self, delta: float) -> None:
        """Take ``delta`` more tokens (the bucket may go into debt) or give ``-delta`` back
        (refilling up to the capacity, never past it)."""
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
            raise ValueError(f"delta must be a finite number, got {delta!r}")
        now = self._clock()
        with self._tokens_lock:
            self._refill(now)
            if delta >= 0:
                self._take(delta)
            else:
                self._tokens = max(self._tokens, min(self.capacity, self._tokens - delta))
                self.consumed += delta
            head = self._queue[0] if delta < 0 and self._queue else None
        if head is not None:
            head.put(None)  # tokens came back: the first in line may go now

    def available(self) -> float:
        """Tokens in the bucket now (negative while in debt)."""
        now = self._clock()
        with self._tokens_lock:
            self._refill(now)
            return self._tokens

    def waiting(self) -> int:
        """How many callers are blocked in :meth:`acquire`."""
        with self._tokens_lock:
            return len(self._queue)

    def snapshot(self) -> Dict[str, Any]:
        now = self._clock()
        with self._tokens_lock:
            self._refill(now)
            return {"rate_per_s": self.rate_per_s, "capacity": self.capacity, "max_take": self.max_take,
                    "available": round(self._tokens, 3), "waiting": len(self._queue),
                    "consumed": round(self.consumed, 3), "waits": self.waits,
                    "waited_s": round(self.waited_s, 6), "rejections": self.rejections}


# -- token estimates ---------------------------------------------------------------------


def estimate_tokens(payload: Optional[Mapping[str, Any]]) -> int:
    """Tokens a call may use, before sending (:func:`holysheep_lb.tokens.estimate_call_tokens`
    of its ``messages`` or ``input``, plus ``max_tokens`` × ``n``; nothing assumed without a cap).

    Only an estimate: the answer's ``usage`` corrects it afterwards.
    """
    if not payload:
        return 0
    return estimate_call_tokens(payload.get("messages"), payload)


def usage_tokens(result: Any) -> Optional[int]:
    """Tokens an answer says it used (``usage.total_tokens``), or None when it does not say."""
    return total_tokens(result.get("usage") if isinstance(result, Mapping) else None)  # the one usage reader


# -- the client's limits --------------------------------------------------------------------


LimiterFactory = Callable[[str, float, float], Limiter]


class Reservation:
    """What one call took from the limits; settle it with the real usage, or cancel it."""

    __slots__ = ("_taken", "estimate", "_open")

    def __init__(self, taken: List[Tuple[Limiter, float, bool]], estimate: int) -> None:
        self._taken = taken  # (limiter, amount, is_token_limit)
        self.estimate = estimate
        self._open = True

    def settle(self, actual_tokens: Optional[int]) -> None:
        """Correct the token limits from the answer's usage (no change when unknown)."""
        if not self._open:
            return
        self._open = False
        if actual_tokens is None or actual_tokens == self.estimate:
            return
        for limiter, amount, is_tokens in self._taken:
            if is_tokens:
                limiter.adjust(actual_tokens - amount)

    def cancel(self, *, requests_too: bool = False) -> None:
        """Give back the token estimate (the call produced no answer); requests too if
        nothing was sent."""
        if not self._open:
            return
        self._open = False
        for limiter, amount, is_tokens in self._taken:
            if is_tokens or requests_too:
                limiter.adjust(-amount)


class RateLimits:
    """Requests and tokens per minute, for the whole client and per model.

    Each model a call tries takes one request and its estimated tokens from the client's
    limits and from that model's limits (in that order, each blocking within the call's
    deadline). Each limit admits at most its number in any 60 s window, with bursts of
    ``burst_s`` seconds' worth (see the module docstring).
    """

    def __init__(self, *, requests_per_minute: Optional[float] = None,
                 tokens_per_minute: Optional[float] = None,
                 per_model: Optional[Mapping[str, Mapping[str, float]]] = None,
                 factory: Optional[LimiterFactory] = None, burst_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        def make(name: str, per_minute: Optional[float]) -> Optional[Limiter]:
            if per_minute is None:
                return None
            rate_per_s, burst = minute_bucket_shape(per_minute, burst_s, whole=name.startswith("requests"))
            if factory is not None:
                return factory(name, rate_per_s, burst)
            return TokenBucket(rate_per_s, burst, max_take=float(per_minute), clock=clock, name=name)

        self._client = (make("requests", requests_per_minute), make("tokens", tokens_per_minute))
        self._models: Dict[str, Tuple[Optional[Limiter], Optional[Limiter]]] = {
            model: (make(f"requests:{model}", spec.get("requests_per_minute")),
                    make(f"tokens:{model}", spec.get("tokens_per_minute")))
            for model, spec in (per_model or {}).items()
        }
        self._clock = clock
        forksafe.register(self)

    @property
    def enabled(self) -> bool:
        return any(self._client) or bool(self._models)

    def limiters(self, model: Optional[str]) -> List[Tuple[Limiter, bool]]:
        """The limits a call to ``model`` goes through, as (limiter, is_token_limit)."""
        pairs = [self._client]
        if model is not None and model in self._models:
            pairs.append(self._models[model])
        out: List[Tuple[Limiter, bool]] = []
        for requests, tokens in pairs:
            if requests is not None:
                out.append((requests, False))
            if tokens is not None:
                out.append((tokens, True))
        return out

    def reserve(self, model: Optional[str], tokens: int, *, timeout_s: float) -> Reservation:
        """Take one request and ``tokens`` from every limit that applies, blocking up to
        ``timeout_s`` in all; on failure give back what was taken and raise
        :class:`RateLimitExceeded`."""
        taken: List[Tuple[Limiter, float, bool]] = []
        deadline = self._clock() + max(0.0, timeout_s)
        try:
            for limiter, is_tokens in self.limiters(model):
                amount = float(tokens) if is_tokens else 1.0
                if amount <= 0:
                    continue
                limiter.acquire(amount, timeout=max(0.0, deadline - self._clock()))
                taken.append((limiter, amount, is_tokens))
        except BaseException:
            Reservation(taken, tokens).cancel(requests_too=True)
            raise
        return Reservation(taken, tokens)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        for pair in [self._client, *self._models.values()]:
            for limiter in pair:
                reset = getattr(limiter, "reset_after_fork", None)
                if reset is not None:
                    reset()

    def snapshot(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for pair in [self._client, *self._models.values()]:
            for limiter in pair:
                snap = getattr(limiter, "snapshot", None)
                if snap is not None:
                    out[getattr(limiter, "name", repr(limiter))] = snap()
        return out
