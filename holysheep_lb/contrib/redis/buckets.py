"""Token buckets held in Redis: one Lua script per decision, on the Redis server's clock."""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from ... import forksafe
from ...errors import RateLimitExceeded
from ...ratelimit import _EPSILON, TokenBucket
from .link import (
    RedisLink,
    UnexpectedAnswer,
    Unreachable,
    answer_float,
    answer_int,
    answer_list,
)

__all__ = ["BUCKET_LUA", "RedisTokenBucket"]

# Numbers go back as strings: Redis truncates Lua numbers to integers.
BUCKET_LUA = """
-- One decision of a token bucket shared by many processes (holysheep_lb), with the rule of
-- holysheep_lb.ratelimit: the level refills uncapped (up to max_take) while nobody takes,
-- and each take first cuts it to the capacity (the burst), so a per-minute limit admits at
-- most capacity + 60 * rate (its number) in any 60 s window.
-- KEYS[1]: the bucket, a hash {tokens, stamp}; a missing bucket holds max_take.
-- ARGV: rate per second, capacity, n, max wait in seconds (< 0: no limit),
--       force ('1': take n even into debt, or give -n back up to the capacity; 0 reads),
--       now in seconds ('': the server's clock, TIME), max_take
-- Returns {granted 1/0, seconds the caller must wait before going, tokens left}.
-- A granted caller's tokens are taken now, even before they are due, so callers are
-- served in the order they reach Redis; it sleeps the returned wait and goes. The take
-- leaves the level it would leave when due, less the refill until then.
if redis.replicate_commands then redis.replicate_commands() end
local rate, capacity, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local now = tonumber(ARGV[6])
local max_take = tonumber(ARGV[7]) or capacity
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens, stamp = max_take, now
end
if now > stamp then
  tokens = math.min(max_take, tokens + (now - stamp) * rate)
  stamp = now
end
local wait = 0
if ARGV[5] ~= '1' then
  if tokens + EPSILON < n then
    wait = (n - tokens) / rate
  end
  if max_wait >= 0 and wait > max_wait then
    return {0, string.format('%.17g', wait), string.format('%.17g', tokens)}
  end
  tokens = math.min(capacity, math.max(tokens, n)) - n - wait * rate
elseif n > 0 then
  tokens = math.min(capacity, tokens) - n
elseif n < 0 then
  tokens = math.max(tokens, math.min(capacity, tokens - n))
else
  return {1, '0', string.format('%.17g', tokens)}
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil((max_take - tokens) / rate * 1000) + 1000)
return {1, string.format('%.17g', wait), string.format('%.17g', tokens)}
""".replace("EPSILON", repr(_EPSILON))


class RedisTokenBucket:
    """A token bucket held in Redis and shared by every process that uses its key.

    The same methods and rule as :class:`~holysheep_lb.ratelimit.TokenBucket` (``max_take``
    included: a per-minute limit admits at most its number in any 60 s window, across
    every process), each one Lua script in one round trip. ``acquire(n, timeout)`` takes its tokens at once when they
    will be due within ``timeout`` (else raises
    :class:`~holysheep_lb.errors.RateLimitExceeded` at once, taking nothing) and then
    sleeps until they are due: one bounded sleep, no polling. While Redis is unreachable
    a bucket of the same size in this process decides (fail-open), or
    :class:`~holysheep_lb.errors.SharedStateUnavailableError` is raised (fail-closed).
    Thread-safe.
    """

    def __init__(self, link: RedisLink, script: Any, *, key: str, name: str, rate_per_s: float,
                 capacity: float, sleep: Callable[[float], None], clock: Callable[[], float],
                 redis_time: Optional[Callable[[], float]] = None, max_take: Optional[float] = None) -> None:
        # validates all three
        self._local = TokenBucket(rate_per_s, capacity, max_take=max_take, clock=clock, name=name)
        self.name = name
        self.key = key
        self.rate_per_s = self._local.rate_per_s
        self.capacity = self._local.capacity
        self.max_take = self._local.max_take
        self._link = link
        self._script = script
        self._sleep = sleep
        self._redis_time = redis_time
        # This process's waits and refusals (the local bucket counts its own while Redis is away)
        self._counts_lock = threading.Lock()
        self._waits = 0
        self._waited_s = 0.0
        self._rejections = 0
        forksafe.register(self)

    def __repr__(self) -> str:
        return (f"<RedisTokenBucket {self.key} rate_per_s={self.rate_per_s:g} capacity={self.capacity:g}"
                + ("" if self.max_take == self.capacity else f" max_take={self.max_take:g}") + ">")

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        self._local.reset_after_fork()
        self._counts_lock = threading.Lock()

    def _count(self, *, waited_s: float = 0.0, rejected: bool = False) -> None:
        with self._counts_lock:
            if rejected:
                self._rejections += 1
            else:
                self._waits += 1
                self._waited_s += waited_s

    def _decide(self, n: float, max_wait_s: float, *, force: bool) -> Tuple[bool, float, float]:
        now = "" if self._redis_time is None else repr(float(self._redis_time()))
        args = (repr(self.rate_per_s), repr(self.capacity), repr(float(n)), repr(float(max_wait_s)),
                "1" if force else "0", now, repr(self.max_take))
        return self._link.call(lambda client: self._checked(
            self._script(keys=(self.key,), args=args, client=client), max_wait_s, force=force))

    def _checked(self, reply: Any, max_wait_s: float, *, force: bool) -> Tuple[bool, float, float]:
        """(granted, wait_s, tokens) from the script's answer, if it is one the script can give:
        a made-up wait would put the caller to sleep for it."""
        granted_raw, wait_raw, tokens_raw = answer_list(reply, 3, "the rate limit script")
        granted = answer_int(granted_raw, "the rate limit script")
        wait_s = answer_float(wait_raw, "the rate limit script")
        tokens = answer_float(tokens_raw, "the rate limit script")
        if (granted not in (0, 1) or wait_s < 0 or tokens > self.max_take + _EPSILON
                or (force and (not granted or wait_s != 0))
                or (granted and max_wait_s >= 0 and wait_s > max_wait_s + _EPSILON)):
            raise UnexpectedAnswer("the rate limit script", reply)
        return granted == 1, wait_s, tokens

    def acquire(self, n: float = 1, timeout: Optional[float] = None) -> None:
        """Block until ``n`` tokens are taken; see the class docstring."""
        try:
            n = self._local._check(n)
        except RateLimitExceeded:
            self._count(rejected=True)
            raise
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):
            raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")
        try:
            granted, wait_s, _ = self._decide(n, -1.0 if timeout is None else timeout, force=False)
        except Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable(f"rate limit {self.name!r}", exc) from exc.__cause__
            self._local.acquire(n, timeout)
            return
        if not granted:
            self._count(rejected=True)
            raise RateLimitExceeded(self.name, n, wait_s,
                                    f"its turn comes in {wait_s:.3g} s, after the timeout of {timeout:g} s")
        if wait_s > 0:
            self._count(waited_s=wait_s)
            self._sleep(wait_s)

    def try_acquire(self, n: float = 1) -> bool:
        """Take ``n`` tokens if they are there and nobody is waiting for them; never blocks."""
        n = self._local._check(n)
        try:
            return self._decide(n, 0.0, force=False)[0]
        except Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable(f"rate limit {self.name!r}", exc) from exc.__cause__
            return self._local.try_acquire(n)

    def adjust(self, delta: float) -> None:
        """Take ``delta`` more tokens (into debt if need be) or give ``-delta`` back. Never raises
        for Redis: when it is unreachable the local bucket is corrected instead."""
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
            raise ValueError(f"delta must be a finite number, got {delta!r}")
        try:
            self._decide(delta, 0.0, force=True)
        except Unreachable:
            self._local.adjust(delta)

    def available(self) -> float:
        """Tokens in the shared bucket now (negative while callers wait for theirs)."""
        try:
            return self._decide(0.0, 0.0, force=True)[2]
        except Unreachable:
            return self._local.available()

    def snapshot(self) -> Dict[str, Any]:
        try:
            shared, available = True, self._decide(0.0, 0.0, force=True)[2]
        except Unreachable:
            shared, available = False, self._local.available()
        local = self._local.snapshot()
        with self._counts_lock:
            waits, waited_s, rejections = self._waits, self._waited_s, self._rejections
        return {"rate_per_s": self.rate_per_s, "capacity": self.capacity, "max_take": self.max_take,
                "available": round(available, 3),
                "shared": shared, "waits": waits + local["waits"],
                "waited_s": round(waited_s + local["waited_s"], 6),
                "rejections": rejections + local["rejections"]}
