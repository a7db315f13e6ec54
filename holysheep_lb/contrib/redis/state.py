"""RedisSharedState: the one object a user makes, and the Client options it hands out."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple, Union
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...config import _check_number
from ...errors import ConfigError
from .breakers import SharedBreakerStorage, breaker_namespace
from .buckets import BUCKET_LUA, RedisTokenBucket
from .link import CONNECTION_CLASSES, RedisLink
from .spend import RECORD_LUA, RESERVE_LUA, RedisSpendStore

__all__ = ["RedisSharedState"]


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _make_client(value: Any, socket_timeout_s: float) -> Tuple[Any, bool]:
    """(redis client, whether we made it) from a URL or a client."""
    if isinstance(value, str):
        scheme = urlsplit(value).scheme
        if scheme not in CONNECTION_CLASSES:
            raise ConfigError("redis_client_or_url", _redacted(value),
                              "must be a redis://, rediss:// or unix:// URL, or a redis.Redis client")
        # Short timeouts and a single retry (for a pooled connection the server closed):
        # redis-py's default retries with backoff would stall calls while Redis is away.
        # The connections also give up when an operation's budget is spent (op_timeout_s).
        return redis.Redis.from_url(value, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                                    connection_class=CONNECTION_CLASSES[scheme],
                                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))), True
    if not isinstance(value, redis.Redis):
        raise ConfigError("redis_client_or_url", type(value).__name__, "must be a redis:// URL or a redis.Redis client")
    if value.connection_pool.connection_kwargs.get("decode_responses"):
        raise ConfigError("redis_client_or_url", "decode_responses=True",
                          "the client must return bytes: create it without decode_responses")
    return value, False


class RedisSharedState:
    """Breakers, rate limits and spend shared by every process given the same Redis and
    ``prefix``; see the package docstring. Pass :meth:`client_options` to each Client.

    ``redis_client_or_url``: a URL (``redis://host:6379/0``; the client made from it has
    ``socket_timeout_s`` timeouts, and gives up on an operation after ``op_timeout_s``)
    or a ``redis.Redis`` client made without ``decode_responses`` (its own timeouts
    apply). ``fail_open`` (default True): what happens while Redis is unusable.
    ``op_timeout_s``: the most one Redis operation of a call may take; an answer later
    than that, or three in a row slower than half of it, mark Redis as degraded like a
    failure. ``warn_interval_s``: at most one warning per interval about it;
    ``retry_interval_s``: how long a failure keeps this process off Redis.
    ``breaker_ttl_s``: how long a breaker's keys outlive their last write (keep it well
    above the breakers' ``reset_timeout_s``). ``retain_days``: how long daily spend is
    kept. ``clock`` and ``sleep`` (monotonic) and ``redis_time`` (the rate limits' clock
    in seconds; None: the Redis server's ``TIME``) are for tests.
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
        op_timeout_s: float = 0.25,
        breaker_ttl_s: float = 86_400.0,
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
                            ("socket_timeout_s", socket_timeout_s), ("op_timeout_s", op_timeout_s)):
            _check_number(name, value, strict=True)
        _check_number("breaker_ttl_s", breaker_ttl_s, minimum=1.0)
        for name, fn in (("clock", clock), ("sleep", sleep)):
            if not callable(fn):
                raise ConfigError(name, fn, "must be callable")
        if redis_time is not None and not callable(redis_time):
            raise ConfigError("redis_time", redis_time, "must be None or a callable returning seconds")
        client, self._owns_client = _make_client(redis_client_or_url, socket_timeout_s)
        self.prefix = prefix
        self.breaker_ttl_s = float(breaker_ttl_s)
        self._link = RedisLink(client, fail_open=fail_open, warn_interval_s=warn_interval_s,
                               retry_interval_s=retry_interval_s, op_timeout_s=op_timeout_s,
                               report_timeout_s=max(op_timeout_s, socket_timeout_s), clock=clock)
        self._clock = clock
        self._sleep = sleep
        self._redis_time = redis_time
        # register_script: EVALSHA, and SCRIPT LOAD when the server does not know the script
        self._bucket_script = client.register_script(BUCKET_LUA)
        self._spend_store = RedisSpendStore(self._link, prefix=prefix, retain_days=retain_days,
                                            reserve_script=client.register_script(RESERVE_LUA),
                                            record_script=client.register_script(RECORD_LUA))

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
        return SharedBreakerStorage(self._link, breaker_namespace(self.prefix, name), self.breaker_ttl_s)

    def rate_limiter_factory(self, name: str, rate_per_s: float, capacity: float) -> RedisTokenBucket:
        """``Client(rate_limiter_factory=...)``: the shared bucket of limit ``name``.

        Every process should give a limit the same rate and capacity. The Client's limits
        are per minute: the bucket admits at most ``capacity + 60 * rate_per_s`` in any
        60 s window (see :mod:`holysheep_lb.ratelimit`).
        """
        if not isinstance(name, str) or not name:
            raise ConfigError("rate limit name", name, "must be a non-empty string")
        limiter = RedisTokenBucket(self._link, self._bucket_script, key=f"{self.prefix}ratelimit:{name}",
                                   name=name, rate_per_s=rate_per_s, capacity=capacity, sleep=self._sleep,
                                   clock=self._clock, redis_time=self._redis_time,
                                   max_take=capacity + 60.0 * rate_per_s)  # ratelimit branch: the minute rule
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
        """Whether Redis answered (in time) last time, failures and slow answers so far,
        spend records waiting for it."""
        out = self._link.status()
        out["pending_spend_records"] = self._spend_store.pending()
        return out

    def close(self) -> None:
        """Close the connections of a client made from a URL (a client passed in is left alone)."""
        if self._owns_client:
            self._link.client.close()
