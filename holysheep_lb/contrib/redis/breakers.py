"""One circuit breaker's state in Redis, shared by every process, bounded in size and time.

The keys keep pybreaker's ``CircuitRedisStorage`` layout (``{namespace}:pybreaker:state``,
``:fail_counter``, ``:success_counter``, ``:opened_at``), so processes of an earlier
version share the same breakers. Unlike pybreaker's storage, reading writes nothing (a
missing key reads as closed, no failures), every write renews the key's expiry
(``ttl_s``), and every answer is checked.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any, Callable, Optional, TypeVar

import pybreaker

from .link import (
    RedisLink,
    UnexpectedAnswer,
    Unreachable,
    answer_float,
    answer_int,
    answer_list,
    answer_text,
)

__all__ = ["SharedBreakerStorage", "breaker_namespace"]

T = TypeVar("T")

_STATES = frozenset({pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN})
# The client allows model names of up to 256 characters; a longer breaker name (from
# elsewhere) is stored under its digest, so a key's length never depends on a caller.
_MAX_NAME_CHARS = 300


def breaker_namespace(prefix: str, name: str) -> str:
    """``{prefix}breaker:{name}``, with a long or unprintable ``name`` replaced by its SHA-256."""
    if len(name) > _MAX_NAME_CHARS or not name.isprintable():
        name = "sha256:" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix}breaker:{name}"


class _RedisBreakerState(pybreaker.CircuitBreakerStorage):
    """The breaker's state in Redis; every method raises :class:`Unreachable` or answers."""

    def __init__(self, link: RedisLink, namespace: str, ttl_s: float) -> None:
        super().__init__("redis")
        self._link = link
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._state_key = f"{namespace}:pybreaker:state"
        self._fail_key = f"{namespace}:pybreaker:fail_counter"
        self._success_key = f"{namespace}:pybreaker:success_counter"
        self._opened_key = f"{namespace}:pybreaker:opened_at"

    def _get(self, key: str, parse: Callable[[Any], T]) -> T:
        return self._link.call(lambda client: parse(client.get(key)))

    def _set(self, key: str, value: str) -> None:
        def run(client: Any) -> None:
            reply = client.set(key, value, px=self._ttl_ms)
            if reply is not True:
                raise UnexpectedAnswer("SET", reply)

        self._link.call(run)

    def _increment(self, key: str) -> None:
        def run(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.pexpire(key, self._ttl_ms)
            count, _ = answer_list(pipe.execute(), 2, "INCR")
            answer_int(count, "INCR", minimum=1)

        self._link.call(run)

    @property
    def state(self) -> str:
        return self._get(self._state_key, _parse_state)

    @state.setter
    def state(self, state: str) -> None:
        self._set(self._state_key, str(state))

    def increment_counter(self) -> None:
        self._increment(self._fail_key)

    def reset_counter(self) -> None:
        self._set(self._fail_key, "0")

    def increment_success_counter(self) -> None:
        self._increment(self._success_key)

    def reset_success_counter(self) -> None:
        self._set(self._success_key, "0")

    @property
    def counter(self) -> int:
        return self._get(self._fail_key, _parse_count)

    @property
    def success_counter(self) -> int:
        return self._get(self._success_key, _parse_count)

    @property
    def opened_at(self) -> Optional[_dt.datetime]:
        return self._get(self._opened_key, _parse_time)

    @opened_at.setter
    def opened_at(self, now: _dt.datetime) -> None:
        # to the microsecond: pybreaker keeps whole seconds, which half-opens up to a second early
        if now.tzinfo is None:
            now = now.replace(tzinfo=_dt.timezone.utc)
        self._set(self._opened_key, f"{now.timestamp():.6f}")


def _parse_state(raw: Any) -> str:
    if raw is None:
        return pybreaker.STATE_CLOSED
    state = answer_text(raw, "GET state")
    if state not in _STATES:
        raise UnexpectedAnswer("GET state", raw)
    return state


def _parse_count(raw: Any) -> int:
    return 0 if raw is None else answer_int(raw, "GET counter", minimum=0)


def _parse_time(raw: Any) -> Optional[_dt.datetime]:
    if raw is None:
        return None
    seconds = answer_float(raw, "GET opened_at")
    if not 0 <= seconds < 1e11:  # before the year 5138: anything else is not a time we wrote
        raise UnexpectedAnswer("GET opened_at", raw)
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)


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
    """One breaker's state in Redis under ``namespace``, or in this process while Redis is
    unreachable (closed and counting when failing open; open when failing closed).

    The breaker calls it under its own lock (see ``holysheep_lb.breakers``), one Redis
    round trip per read or write. Its keys expire ``ttl_s`` after their last write.
    """

    def __init__(self, link: RedisLink, namespace: str, ttl_s: float) -> None:
        super().__init__("redis")
        self.namespace = namespace
        self._remote = _RedisBreakerState(link, namespace, ttl_s)
        self._local: pybreaker.CircuitBreakerStorage = (
            pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED) if link.fail_open else _OpenWhileUnreachable())

    def __repr__(self) -> str:
        return f"<SharedBreakerStorage {self.namespace}>"

    def _on(self, op: Callable[[pybreaker.CircuitBreakerStorage], T]) -> T:
        try:
            return op(self._remote)
        except Unreachable:
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
