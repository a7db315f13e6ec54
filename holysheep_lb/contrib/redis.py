"""Breakers, rate limits and budgets shared by many processes, on Redis.

Django and Flask run many worker processes, often on several hosts, with cron jobs
beside them: a limit kept in one process's memory does not hold for the fleet. Give
every process's Client the same :class:`RedisSharedState`::

    from holysheep_lb import Client
    from holysheep_lb.contrib.redis import RedisSharedState

    shared = RedisSharedState("redis://cache:6379/0", prefix="myapp:")
    client = Client(nodes=[...], requests_per_minute=500, budget={"daily_usd": 50},
                    **shared.client_options())

What lives in Redis (every key starts with ``prefix``):

* **breakers** (``breaker_storage``): pybreaker's ``CircuitRedisStorage``, one namespace
  per breaker (``{prefix}breaker:model:gpt-4.1``, ``{prefix}breaker:node:eu-1``). A
  breaker tripped by one process is open in all of them.
* **rate limits** (``rate_limiter_factory``): one token bucket per limit
  (``{prefix}ratelimit:requests``, ``{prefix}ratelimit:tokens:gpt-4.1``), decided by one
  Lua script in one round trip, on the Redis server's clock (``TIME``). ``acquire``
  takes its place in line in that round trip and sleeps until its tokens are due: first
  come, first served across processes, no polling.
* **spend and budgets** (``spend_store``): one hash per UTC day and one per month,
  expiring after ``retain_days``. A reservation is checked against the caps and added
  by one Lua script, so budgets hold across processes.

When Redis cannot be reached (refused, timed out, or a server error) the default
(``fail_open=True``) is that each process goes on with its own in-memory breakers,
buckets and spend ledger (the same limits, held per process), logs one warning per
``warn_interval_s`` (not one per call), tries Redis again every ``retry_interval_s``
and uses it as soon as it answers; spend recorded meanwhile is then written to Redis.
With ``fail_open=False`` calls are refused while Redis is away: rate limits and budgets
raise :class:`~holysheep_lb.errors.SharedStateUnavailableError` and breakers read as
open (:class:`~holysheep_lb.errors.CircuitOpenError`). Recording what a call did never
raises, and no redis exception ever reaches a caller.

Thread-safe and fork-safe: redis-py's pool opens new connections in a child process
(it checks the pid), and the locks here are renewed in the child.
"""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import math
import os
import threading
import time
import weakref
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, TypeVar, Union
from urllib.parse import urlsplit

import pybreaker

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("holysheep_lb.contrib.redis needs redis-py: pip install 'holysheep_lb[redis]'") from exc

from ..config import _check_number
from ..errors import ConfigError, RateLimitExceeded, SharedStateUnavailableError
from ..pricing import InMemorySpendStore, Limit, Refusal, Reservation, SpendRow, SpendStore
from ..ratelimit import _EPSILON, TokenBucket

__all__ = ["RedisSharedState", "RedisTokenBucket", "RedisSpendStore", "SharedBreakerStorage"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Whatever redis-py raises when Redis cannot serve a command: refused, reset, timed out,
# read-only replica, out of memory... Python's own socket errors are OSErrors.
_REDIS_ERRORS = (redis.RedisError, OSError)
_NANO = Decimal(10) ** 9  # money is kept in Redis as integer nano-USD: exact, and HINCRBY-able
_MAX_PENDING = 10_000  # spend records kept for Redis while it is away (oldest dropped first)
_REPLAY_BATCH = 200


class _Unreachable(Exception):
    """Redis could not be used for one operation. Never leaves this module."""


# -- the connection and what we know about it ----------------------------------------------


class _RedisLink:
    """The Redis client, and whether it answers. Thread-safe.

    :meth:`call` runs ``fn(client)``. When Redis fails it counts the failure (one
    warning per ``warn_interval_s``) and raises :class:`_Unreachable`; for
    ``retry_interval_s`` afterwards it raises at once without trying, then lets one
    caller probe again.
    """

    def __init__(self, client: Any, *, fail_open: bool, warn_interval_s: float, retry_interval_s: float,
                 clock: Callable[[], float]) -> None:
        self.client = client
        self.fail_open = fail_open
        self._warn_interval_s = warn_interval_s
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._health_lock = threading.Lock()
        self._down_since: Optional[float] = None
        self._retry_at = 0.0
        self._warned_at: Optional[float] = None
        self._unwarned_failures = 0
        self._failures = 0
        self._outages = 0

    def reset_after_fork(self) -> None:
        self._health_lock = threading.Lock()

    @property
    def reachable(self) -> bool:
        """False from a failure until the next command that succeeds."""
        return self._down_since is None

    def call(self, fn: Callable[[Any], T]) -> T:
        if self._down_since is not None and not self._claim_probe():
            raise _Unreachable()
        try:
            result = fn(self.client)
        except _REDIS_ERRORS as exc:
            self._failed(exc)
            raise _Unreachable() from exc
        if self._down_since is not None:
            self._recovered()
        return result

    def unavailable(self, what: str, exc: _Unreachable) -> SharedStateUnavailableError:
        """The fail-closed error for ``what``, saying why."""
        cause = exc.__cause__
        detail = (f"{type(cause).__name__}: {cause}" if cause is not None
                  else f"Redis failed less than {self._retry_interval_s:g} s ago")
        return SharedStateUnavailableError(what, detail)

    def _claim_probe(self) -> bool:
        with self._health_lock:
            if self._down_since is None:
                return True
            now = self._clock()
            if now < self._retry_at:
                return False
            self._retry_at = now + self._retry_interval_s
            return True

    def _failed(self, exc: BaseException) -> None:
        with self._health_lock:
            now = self._clock()
            self._failures += 1
            self._unwarned_failures += 1
            if self._down_since is None:
                self._down_since = now
                self._outages += 1
            self._retry_at = now + self._retry_interval_s
            if self._warned_at is not None and now - self._warned_at < self._warn_interval_s:
                return
            self._warned_at = now
            failures, self._unwarned_failures = self._unwarned_failures, 0
        consequence = ("each process uses its own in-memory breakers, rate limits and budgets until it is back"
                       if self.fail_open else "calls are refused until it is back (fail_open=False)")
        log.warning("shared state: Redis is unreachable (%s: %s); %s. %d failure(s) since the last warning; "
                    "retrying every %g s; this warning repeats at most every %g s",
                    type(exc).__name__, exc, consequence, failures, self._retry_interval_s, self._warn_interval_s)

    def _recovered(self) -> None:
        with self._health_lock:
            if self._down_since is None:
                return
            down_s = self._clock() - self._down_since
            self._down_since = None
        log.info("shared state: Redis is reachable again after %.1f s", down_s)

    def status(self) -> Dict[str, Any]:
        with self._health_lock:
            down = self._down_since
            return {
                "reachable": down is None,
                "down_for_s": None if down is None else round(self._clock() - down, 3),
                "failures": self._failures,
                "outages": self._outages,
                "fail_open": self.fail_open,
            }


# -- breakers -------------------------------------------------------------------------------


class _GuardedRedis:
    """The Redis client that pybreaker's storage is given: every command goes through the
    link, so a failure raises :class:`_Unreachable`. (pybreaker would catch a RedisError,
    log it with a traceback on every call and answer with a made-up state.)"""

    def __init__(self, link: _RedisLink) -> None:
        self._link = link

    def __getattr__(self, name: str) -> Callable[..., Any]:
        command = getattr(self._link.client, name)
        return lambda *args, **kw: self._link.call(lambda _client: command(*args, **kw))


class _RedisBreakerStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's Redis storage with the open time kept to the microsecond: pybreaker
    keeps whole seconds, which lets a breaker half-open up to a second early."""

    @property
    def opened_at(self) -> Optional[_dt.datetime]:
        raw = self._redis.get(self._namespace("opened_at"))
        return _dt.datetime.fromtimestamp(float(raw), _dt.timezone.utc) if raw else None

    @opened_at.setter
    def opened_at(self, now: _dt.datetime) -> None:
        if now.tzinfo is None:
            now = now.replace(tzinfo=_dt.timezone.utc)
        self._redis.set(self._namespace("opened_at"), f"{now.timestamp():.6f}")


class _OpenWhileUnreachable(pybreaker.CircuitMemoryStorage):
    """Fail-closed stand-in: while Redis is unreachable, every breaker reads as just opened."""

    def __init__(self) -> None:
        super().__init__(pybreaker.STATE_OPEN)

    @property
    def state(self) -> str:
        return pybreaker.STATE_OPEN

    @state.setter
    def state(self, state: str) -> None:
        pass

    @property
    def opened_at(self) -> Optional[_dt.datetime]:
        return _dt.datetime.now(_dt.timezone.utc)

    @opened_at.setter
    def opened_at(self, now: _dt.datetime) -> None:
        pass


class SharedBreakerStorage(pybreaker.CircuitBreakerStorage):
    """One breaker's state in Redis (pybreaker's ``CircuitRedisStorage`` under
    ``namespace``), or in this process while Redis is unreachable.

    The breaker calls it under its own lock (see ``holysheep_lb.breakers``), one Redis
    round trip per read or write.
    """

    def __init__(self, link: _RedisLink, namespace: str) -> None:
        super().__init__("redis")
        self.namespace = namespace
        self._redis = _GuardedRedis(link)
        self._remote: Optional[_RedisBreakerStorage] = None
        self._local: pybreaker.CircuitBreakerStorage = (
            pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED) if link.fail_open else _OpenWhileUnreachable())

    def __repr__(self) -> str:
        return f"<SharedBreakerStorage {self.namespace}>"

    def _on(self, op: Callable[[pybreaker.CircuitBreakerStorage], T]) -> T:
        try:
            remote = self._remote
            if remote is None:
                # pybreaker's constructor creates the keys (SETNX); done once Redis answers
                remote = self._remote = _RedisBreakerStorage(pybreaker.STATE_CLOSED, self._redis,
                                                             namespace=self.namespace)
            return op(remote)
        except _Unreachable:
            return op(self._local)

    @property
    def state(self) -> str:
        return self._on(lambda s: s.state)

    @state.setter
    def state(self, state: str) -> None:
        self._on(lambda s: setattr(s, "state", state))

    def increment_counter(self) -> None:
        self._on(lambda s: s.increment_counter())

    def reset_counter(self) -> None:
        self._on(lambda s: s.reset_counter())

    def increment_success_counter(self) -> None:
        self._on(lambda s: s.increment_success_counter())

    def reset_success_counter(self) -> None:
        self._on(lambda s: s.reset_success_counter())

    @property
    def counter(self) -> int:
        return self._on(lambda s: s.counter)

    @property
    def success_counter(self) -> int:
        return self._on(lambda s: s.success_counter)

    @property
    def opened_at(self) -> Optional[_dt.datetime]:
        return self._on(lambda s: s.opened_at)

    @opened_at.setter
    def opened_at(self, now: _dt.datetime) -> None:
        self._on(lambda s: setattr(s, "opened_at", now))


# -- rate limits ----------------------------------------------------------------------------

# Numbers go back as strings: Redis truncates Lua numbers to integers.
_BUCKET_LUA = """
-- One decision of a token bucket shared by many processes (holysheep_lb).
-- KEYS[1]: the bucket, a hash {tokens, stamp}; a missing bucket is full.
-- ARGV: rate per second, capacity, n, max wait in seconds (< 0: no limit),
--       force ('1': take n even into debt, or give -n back; used to correct estimates),
--       now in seconds ('': the server's clock, TIME)
-- Returns {granted 1/0, seconds the caller must wait before going, tokens left}.
-- A granted caller's tokens are taken now, even before they are due, so callers are
-- served in the order they reach Redis; it sleeps the returned wait and goes.
if redis.replicate_commands then redis.replicate_commands() end
local rate, capacity, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local now = tonumber(ARGV[6])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens, stamp = capacity, now
end
if now > stamp then
  tokens = math.min(capacity, tokens + (now - stamp) * rate)
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
end
tokens = math.min(capacity, tokens - n)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return {1, string.format('%.17g', wait), string.format('%.17g', tokens)}
""".replace("EPSILON", repr(_EPSILON))


class RedisTokenBucket:
    """A token bucket held in Redis and shared by every process that uses its key.

    The same methods as :class:`~holysheep_lb.ratelimit.TokenBucket`, each one Lua
    script in one round trip. ``acquire(n, timeout)`` takes its tokens at once when they
    will be due within ``timeout`` (else raises
    :class:`~holysheep_lb.errors.RateLimitExceeded` at once, taking nothing) and then
    sleeps until they are due: one bounded sleep, no polling. While Redis is unreachable
    a bucket of the same size in this process decides (fail-open), or
    :class:`~holysheep_lb.errors.SharedStateUnavailableError` is raised (fail-closed).
    Thread-safe.
    """

    def __init__(self, link: _RedisLink, script: Any, *, key: str, name: str, rate_per_s: float,
                 capacity: float, sleep: Callable[[float], None], clock: Callable[[], float],
                 redis_time: Optional[Callable[[], float]] = None) -> None:
        self._local = TokenBucket(rate_per_s, capacity, clock=clock, name=name)  # validates both
        self.name = name
        self.key = key
        self.rate_per_s = self._local.rate_per_s
        self.capacity = self._local.capacity
        self._link = link
        self._script = script
        self._sleep = sleep
        self._redis_time = redis_time

    def __repr__(self) -> str:
        return f"<RedisTokenBucket {self.key} rate_per_s={self.rate_per_s:g} capacity={self.capacity:g}>"

    def reset_after_fork(self) -> None:
        self._local.reset_after_fork()

    def _decide(self, n: float, max_wait_s: float, *, force: bool) -> Tuple[bool, float, float]:
        now = "" if self._redis_time is None else repr(float(self._redis_time()))
        args = (repr(self.rate_per_s), repr(self.capacity), repr(float(n)), repr(float(max_wait_s)),
                "1" if force else "0", now)
        reply = self._link.call(lambda client: self._script(keys=(self.key,), args=args, client=client))
        return int(reply[0]) == 1, float(reply[1]), float(reply[2])

    def acquire(self, n: float = 1, timeout: Optional[float] = None) -> None:
        """Block until ``n`` tokens are taken; see the class docstring."""
        n = self._local._check(n)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):
            raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")
        try:
            granted, wait_s, _ = self._decide(n, -1.0 if timeout is None else timeout, force=False)
        except _Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable(f"rate limit {self.name!r}", exc) from exc.__cause__
            self._local.acquire(n, timeout)
            return
        if not granted:
            raise RateLimitExceeded(self.name, n, wait_s,
                                    f"its turn comes in {wait_s:.3g} s, after the timeout of {timeout:g} s")
        if wait_s > 0:
            self._sleep(wait_s)

    def try_acquire(self, n: float = 1) -> bool:
        """Take ``n`` tokens if they are there and nobody is waiting for them; never blocks."""
        n = self._local._check(n)
        try:
            return self._decide(n, 0.0, force=False)[0]
        except _Unreachable as exc:
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
        except _Unreachable:
            self._local.adjust(delta)

    def available(self) -> float:
        """Tokens in the shared bucket now (negative while callers wait for theirs)."""
        try:
            return self._decide(0.0, 0.0, force=True)[2]
        except _Unreachable:
            return self._local.available()

    def snapshot(self) -> Dict[str, Any]:
        try:
            shared, available = True, self._decide(0.0, 0.0, force=True)[2]
        except _Unreachable:
            shared, available = False, self._local.available()
        return {"rate_per_s": self.rate_per_s, "capacity": self.capacity, "available": round(available, 3),
                "shared": shared}


# -- spend and budgets ----------------------------------------------------------------------

_RESERVE_LUA = """
-- Hold a call's estimated cost unless it would pass a cap (holysheep_lb).
-- KEYS: the day's hash, the month's hash, the index of days (a sorted set)
-- ARGV: model, amount (nano-USD), day number, day, ttl_s, number of caps, then for
--       each cap: period ('day' or 'month'), scope ('' for the whole client, or a model),
--       cap (nano-USD)
-- Returns {1} when held, {0, index of the cap, spent, reserved} when refused.
local model, amount = ARGV[1], tonumber(ARGV[2])
for i = 1, tonumber(ARGV[6]) do
  local base = 6 + (i - 1) * 3
  local key = KEYS[1]
  if ARGV[base + 1] == 'month' then key = KEYS[2] end
  local who = 'client'
  if ARGV[base + 2] ~= '' then who = 'model:' .. ARGV[base + 2] end
  local spent = redis.call('HGET', key, who .. ':spent') or '0'
  local reserved = redis.call('HGET', key, who .. ':reserved') or '0'
  if tonumber(spent) + tonumber(reserved) + amount > tonumber(ARGV[base + 3]) then
    return {0, i, spent, reserved}
  end
end
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  redis.call('HINCRBY', key, 'client:reserved', ARGV[2])
  redis.call('HINCRBY', key, 'model:' .. model .. ':reserved', ARGV[2])
  redis.call('EXPIRE', key, ARGV[5])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {1}
"""

_RECORD_LUA = """
-- Record what a call did: release its reservation, add its cost and tokens (holysheep_lb).
-- KEYS: the day's hash, the month's hash, the index of days (a sorted set)
-- ARGV: model, release (nano-USD), cost (nano-USD), requests, cached requests,
--       input tokens, output tokens, day number, day, ttl_s, oldest day number kept,
--       then (optional) unconfirmed attempts and their part of the cost (nano-USD)
local model = ARGV[1]
local release = tonumber(ARGV[2])
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  for _, who in ipairs({'client', 'model:' .. model}) do
    if ARGV[3] ~= '0' then redis.call('HINCRBY', key, who .. ':spent', ARGV[3]) end
    -- below zero only if the keys were lost (a Redis restart) while the call was in flight
    if release ~= 0 and redis.call('HINCRBY', key, who .. ':reserved', -release) < 0 then
      redis.call('HSET', key, who .. ':reserved', 0)
    end
  end
end
for i, field in ipairs({'requests', 'cached', 'input', 'output'}) do
  if ARGV[3 + i] ~= '0' then redis.call('HINCRBY', KEYS[1], 'model:' .. model .. ':' .. field, ARGV[3 + i]) end
end
if ARGV[12] and ARGV[12] ~= '0' then
  redis.call('HINCRBY', KEYS[1], 'model:' .. model .. ':unconfirmed', ARGV[12])
  redis.call('HINCRBY', KEYS[1], 'model:' .. model .. ':unconfirmed_spent', ARGV[13])
end
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[11])
for _, key in ipairs(KEYS) do
  redis.call('EXPIRE', key, ARGV[10])  -- after the writes: EXPIRE on a missing key does nothing
end
return 1
"""

# hash field suffix -> SpendRow attribute
_ROW_FIELDS = {"requests": "requests", "cached": "cached_requests", "input": "input_tokens",
               "output": "output_tokens", "spent": "cost_usd", "unconfirmed": "unconfirmed_calls",
               "unconfirmed_spent": "unconfirmed_usd"}
_MONEY_FIELDS = ("cost_usd", "unconfirmed_usd")


def _nano(usd: Decimal, rounding: str) -> int:
    return int((usd * _NANO).to_integral_value(rounding=rounding))


def _usd(raw: Any) -> Decimal:
    return Decimal(int(raw)) / _NANO


def _day_number(day: str) -> int:
    return _dt.date.fromisoformat(day).toordinal()


class RedisSpendStore(SpendStore):
    """Spend and in-flight reservations in Redis, shared by every process with the same
    prefix: per UTC day and month, kept ``retain_days`` days. Thread-safe.

    Money is stored as integer nano-USD (reservations rounded up, costs to nearest).
    While Redis is unreachable the budgets are held in this process
    (:class:`~holysheep_lb.pricing.InMemorySpendStore`, which also mirrors this
    process's own spend all along) and what was spent is written to Redis once it is
    back (up to 10,000 records; older ones are dropped with a warning). Fail-closed:
    ``try_reserve`` raises :class:`~holysheep_lb.errors.SharedStateUnavailableError`;
    ``settle``, ``cancel`` and ``record_cache_hit`` never raise.
    """

    def __init__(self, link: _RedisLink, *, prefix: str, retain_days: int, reserve_script: Any,
                 record_script: Any) -> None:
        self._local = InMemorySpendStore(retain_days=retain_days)  # validates retain_days
        self.retain_days = retain_days
        self._ttl_s = str(retain_days * 86400)
        self._prefix = prefix
        self._days_key = f"{prefix}spend:days"
        self._link = link
        self._reserve = reserve_script
        self._record_script = record_script
        self._held_lock = threading.Lock()
        self._held_here: Dict[int, Reservation] = {}  # reservations held by the local store
        self._pending_lock = threading.Lock()
        self._pending: Deque[Tuple[str, Tuple[str, ...]]] = collections.deque()  # (day, record args)
        self._dropped = 0

    def __repr__(self) -> str:
        return f"<RedisSpendStore {self._prefix}spend:*>"

    def _keys(self, day: str) -> Tuple[str, str, str]:
        return f"{self._prefix}spend:day:{day}", f"{self._prefix}spend:month:{day[:7]}", self._days_key

    # -- SpendStore -------------------------------------------------------------------

    def try_reserve(self, reservation: Reservation, limits: Sequence[Limit]) -> Optional[Refusal]:
        self._replay_pending()
        day = reservation.day
        args: List[str] = [reservation.model, str(_nano(reservation.amount_usd, ROUND_CEILING)),
                           str(_day_number(day)), day, self._ttl_s, str(len(limits))]
        for limit in limits:
            args += [limit.period, limit.model or "", str(_nano(limit.cap_usd, ROUND_FLOOR))]
        try:
            reply = self._link.call(lambda c: self._reserve(keys=self._keys(day), args=args, client=c))
        except _Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable("budget", exc) from exc.__cause__
            refusal = self._local.try_reserve(reservation, limits)
            if refusal is None:
                with self._held_lock:
                    self._held_here[id(reservation)] = reservation
            return refusal
        if int(reply[0]) == 1:
            return None
        return Refusal(limits[int(reply[1]) - 1], _usd(reply[2]), _usd(reply[3]))

    def settle(self, reservation: Reservation, *, input_tokens: int, output_tokens: int, cost_usd: Decimal) -> None:
        held_here = self._take_held_here(reservation)
        # the local mirror drops only a reservation it holds (one held in Redis was never added to it)
        mirror = self._local.settle if held_here else self._local.record_spend
        mirror(reservation, input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost_usd)
        self._record(reservation.model, reservation.day,
                     release=0 if held_here else _nano(reservation.amount_usd, ROUND_CEILING),
                     cost=_nano(cost_usd, ROUND_HALF_EVEN), requests=1,
                     input_tokens=input_tokens, output_tokens=output_tokens)

    def cancel(self, reservation: Reservation) -> None:
        if self._take_held_here(reservation):
            self._local.cancel(reservation)
            return
        release = _nano(reservation.amount_usd, ROUND_CEILING)
        if release:
            self._record(reservation.model, reservation.day, release=release)

    def record_cache_hit(self, model: str, day: str) -> None:
        self._local.record_cache_hit(model, day)
        self._record(model, day, cached=1)

    def record_unconfirmed(self, reservation: Reservation) -> None:
        self._local.record_unconfirmed(reservation)  # the reservation itself stays where it is held
        cost = _nano(reservation.amount_usd, ROUND_HALF_EVEN)
        self._record(reservation.model, reservation.day, cost=cost, input_tokens=reservation.input_tokens,
                     output_tokens=reservation.output_tokens, unconfirmed=1, unconfirmed_cost=cost)

    def rows(self) -> List[SpendRow]:
        """Every process's spend, from Redis; this process's own while Redis is unreachable."""
        try:
            return self._link.call(self._remote_rows)
        except _Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable("spend report", exc) from exc.__cause__
            return self._local.rows()

    def reserved_usd(self) -> Decimal:
        """Every process's reservations in flight (today's and yesterday's)."""
        def read(client: Any) -> List[Any]:
            days = client.zrange(self._days_key, -2, -1)
            return [client.hget(self._keys(d.decode())[0], "client:reserved") for d in days]

        try:
            values = self._link.call(read)
        except _Unreachable as exc:
            if not self._link.fail_open:
                raise self._link.unavailable("spend report", exc) from exc.__cause__
            return self._local.reserved_usd()
        return sum((_usd(v) for v in values if v), Decimal(0))

    def reset_after_fork(self) -> None:
        """The parent's reservations and unsent records are the parent's to finish."""
        self._local.reset_after_fork()
        self._held_lock = threading.Lock()
        self._held_here = {}
        self._pending_lock = threading.Lock()
        self._pending = collections.deque()
        self._dropped = 0

    def pending(self) -> int:
        """Spend records waiting for Redis to come back."""
        with self._pending_lock:
            return len(self._pending)

    # -- Redis ------------------------------------------------------------------------

    def _take_held_here(self, reservation: Reservation) -> bool:
        with self._held_lock:
            return self._held_here.pop(id(reservation), None) is reservation

    def _record(self, model: str, day: str, *, release: int = 0, cost: int = 0, requests: int = 0,
                cached: int = 0, input_tokens: int = 0, output_tokens: int = 0, unconfirmed: int = 0,
                unconfirmed_cost: int = 0) -> None:
        number = _day_number(day)
        args = (model, str(release), str(cost), str(requests), str(cached), str(input_tokens), str(output_tokens),
                str(number), day, self._ttl_s, str(number - self.retain_days), str(unconfirmed),
                str(unconfirmed_cost))
        self._replay_pending()
        try:
            self._link.call(lambda c: self._record_script(keys=self._keys(day), args=args, client=c))
        except _Unreachable:
            with self._pending_lock:
                if len(self._pending) >= _MAX_PENDING:
                    self._pending.popleft()
                    self._dropped += 1
                self._pending.append((day, args))

    def _replay_pending(self) -> None:
        """Write the records made while Redis was away, once it answers again."""
        if not self._pending or not self._link.reachable:
            return
        while True:
            with self._pending_lock:
                batch = [self._pending.popleft() for _ in range(min(_REPLAY_BATCH, len(self._pending)))]
                dropped, self._dropped = self._dropped, 0
            if dropped:
                log.warning("shared state: %d spend record(s) made while Redis was unreachable were dropped "
                            "(at most %d are kept); Redis's totals miss them", dropped, _MAX_PENDING)
            if not batch:
                return

            def send(client: Any) -> None:
                pipe = client.pipeline(transaction=False)
                for day, args in batch:
                    self._record_script(keys=self._keys(day), args=args, client=pipe)
                pipe.execute()

            try:
                self._link.call(send)
            except _Unreachable:
                with self._pending_lock:
                    self._pending.extendleft(reversed(batch))
                return
            log.info("shared state: wrote %d spend record(s) made while Redis was unreachable", len(batch))

    def _remote_rows(self, client: Any) -> List[SpendRow]:
        days = [d.decode() for d in client.zrange(self._days_key, 0, -1)]
        pipe = client.pipeline(transaction=True)
        for day in days:
            pipe.hgetall(self._keys(day)[0])
        rows: List[SpendRow] = []
        for day, fields in zip(days, pipe.execute()):
            by_model: Dict[str, SpendRow] = {}
            for raw_field, raw_value in fields.items():
                field = raw_field.decode()
                if not field.startswith("model:"):
                    continue
                model, what = field[len("model:"):].rsplit(":", 1)
                attr = _ROW_FIELDS.get(what)
                if attr is None:  # reserved
                    continue
                row = by_model.setdefault(model, SpendRow(day, model))
                setattr(row, attr, _usd(raw_value) if attr in _MONEY_FIELDS else int(raw_value))
            rows.extend(r for r in by_model.values() if r.requests or r.cached_requests or r.cost_usd)
        return rows


# -- the one object a user makes ------------------------------------------------------------

_LIVE_STATES: "weakref.WeakSet[RedisSharedState]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for state in list(_LIVE_STATES):
        state._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _make_client(value: Any, socket_timeout_s: float) -> Tuple[Any, bool]:
    """(redis client, whether we made it) from a URL or a client."""
    if isinstance(value, str):
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("redis_client_or_url", _redacted(value), "must be a redis://, rediss:// or unix:// URL, "
                                                         "or a redis.Redis client")
        # Short timeouts and a single retry (for a pooled connection the server closed):
        # redis-py's default retries with backoff would stall calls while Redis is away.
        return redis.Redis.from_url(value, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))), True
    if not isinstance(value, redis.Redis):
        raise ConfigError("redis_client_or_url", type(value).__name__, "must be a redis:// URL or a redis.Redis client")
    if value.connection_pool.connection_kwargs.get("decode_responses"):
        raise ConfigError("redis_client_or_url", "decode_responses=True",
                          "the client must return bytes: create it without decode_responses "
                          "(pybreaker's CircuitRedisStorage needs bytes)")
    return value, False


class RedisSharedState:
    """Breakers, rate limits and spend shared by every process given the same Redis and
    ``prefix``; see the module docstring. Pass :meth:`client_options` to each Client.

    ``redis_client_or_url``: a URL (``redis://host:6379/0``; the client made from it has
    ``socket_timeout_s`` timeouts) or a ``redis.Redis`` client made without
    ``decode_responses``. ``fail_open`` (default True): what happens while Redis is
    unreachable. ``warn_interval_s``: at most one warning per interval about it;
    ``retry_interval_s``: how long a failure keeps this process off Redis.
    ``retain_days``: how long daily spend is kept. ``clock`` and ``sleep`` (monotonic)
    and ``redis_time`` (the rate limits' clock in seconds; None: the Redis server's
    ``TIME``) are for tests.
    """

    def __init__(
        self,
        redis_client_or_url: Union[str, Any],
        *,
        prefix: str = "holysheep:",
        fail_open: bool = True,
        warn_interval_s: float = 60.0,
        retry_interval_s: float = 1.0,
        socket_timeout_s: float = 1.0,
        retain_days: int = 62,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        redis_time: Optional[Callable[[], float]] = None,
    ) -> None:
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ConfigError("prefix", prefix, "must be a non-empty string without whitespace")
        if not isinstance(fail_open, bool):
            raise ConfigError("fail_open", fail_open, "must be True or False")
        for name, value in (("warn_interval_s", warn_interval_s), ("retry_interval_s", retry_interval_s),
                            ("socket_timeout_s", socket_timeout_s)):
            _check_number(name, value, strict=True)
        for name, fn in (("clock", clock), ("sleep", sleep)):
            if not callable(fn):
                raise ConfigError(name, fn, "must be callable")
        if redis_time is not None and not callable(redis_time):
            raise ConfigError("redis_time", redis_time, "must be None or a callable returning seconds")
        client, self._owns_client = _make_client(redis_client_or_url, socket_timeout_s)
        self.prefix = prefix
        self._link = _RedisLink(client, fail_open=fail_open, warn_interval_s=warn_interval_s,
                                retry_interval_s=retry_interval_s, clock=clock)
        self._clock = clock
        self._sleep = sleep
        self._redis_time = redis_time
        # register_script: EVALSHA, and SCRIPT LOAD when the server does not know the script
        self._bucket_script = client.register_script(_BUCKET_LUA)
        self._spend_store = RedisSpendStore(self._link, prefix=prefix, retain_days=retain_days,
                                            reserve_script=client.register_script(_RESERVE_LUA),
                                            record_script=client.register_script(_RECORD_LUA))
        self._limiters: "weakref.WeakSet[RedisTokenBucket]" = weakref.WeakSet()
        _LIVE_STATES.add(self)

    def __repr__(self) -> str:
        kw = self._link.client.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        return (f"<RedisSharedState {where}/{kw.get('db', 0)} prefix={self.prefix!r} "
                f"fail_open={self._link.fail_open}>")

    @property
    def redis(self) -> Any:
        """The redis-py client in use."""
        return self._link.client

    def breaker_storage(self, name: str) -> SharedBreakerStorage:
        """``Client(breaker_storage=...)``: the storage of breaker ``name`` ("model:gpt-4.1")."""
        if not isinstance(name, str) or not name:
            raise ConfigError("breaker name", name, "must be a non-empty string")
        return SharedBreakerStorage(self._link, f"{self.prefix}breaker:{name}")

    def rate_limiter_factory(self, name: str, rate_per_s: float, capacity: float) -> RedisTokenBucket:
        """``Client(rate_limiter_factory=...)``: the shared bucket of limit ``name``.

        Every process should give a limit the same rate and capacity.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError("rate limit name", name, "must be a non-empty string")
        limiter = RedisTokenBucket(self._link, self._bucket_script, key=f"{self.prefix}ratelimit:{name}",
                                   name=name, rate_per_s=rate_per_s, capacity=capacity, sleep=self._sleep,
                                   clock=self._clock, redis_time=self._redis_time)
        self._limiters.add(limiter)
        return limiter

    @property
    def spend_store(self) -> RedisSpendStore:
        """``Client(spend_store=...)``: the spend ledger and budgets."""
        return self._spend_store

    def client_options(self) -> Dict[str, Any]:
        """The Client options that put breakers, rate limits and spend on Redis."""
        return {"breaker_storage": self.breaker_storage, "rate_limiter_factory": self.rate_limiter_factory,
                "spend_store": self.spend_store}

    def status(self) -> Dict[str, Any]:
        """Whether Redis answered last time, failures so far, spend records waiting for it."""
        out = self._link.status()
        out["pending_spend_records"] = self._spend_store.pending()
        return out

    def close(self) -> None:
        """Close the connections of a client made from a URL (a client passed in is left alone)."""
        if self._owns_client:
            self._link.client.close()

    def _reset_after_fork(self) -> None:
        self._link.reset_after_fork()
        self._spend_store.reset_after_fork()
        for limiter in list(self._limiters):
            limiter.reset_after_fork()
