"""Breakers, rate limits and budgets shared by many processes, on Redis.

Django and Flask run many worker processes, often on several hosts, with cron jobs
beside them: a limit kept in one process's memory does not hold for the fleet. Give
every process's Client the same :class:`RedisSharedState`::

    from holysheep_lb import Client
    from holysheep_lb.contrib.redis import RedisSharedState

    shared = RedisSharedState("redis://cache:6379/0", prefix="myapp:")
    client = Client(nodes=[...], requests_per_minute=500, budget={"daily_usd": 50},
                    **shared.client_options())

What lives in Redis (every key starts with ``prefix``, and every key expires):

* **breakers** (``breaker_storage``): pybreaker's ``CircuitRedisStorage`` key layout,
  one namespace per breaker (``{prefix}breaker:model:gpt-4.1``,
  ``{prefix}breaker:node:eu-1``; a name over 300 characters is replaced by its
  SHA-256). A breaker tripped by one process is open in all of them. Reading a breaker
  writes nothing; its keys expire ``breaker_ttl_s`` (a day) after their last write.
* **rate limits** (``rate_limiter_factory``): one token bucket per limit
  (``{prefix}ratelimit:requests``, ``{prefix}ratelimit:tokens:gpt-4.1``), decided by one
  Lua script in one round trip, on the Redis server's clock (``TIME``). ``acquire``
  takes its place in line in that round trip and sleeps until its tokens are due: first
  come, first served across processes, no polling. A bucket expires once it would be
  full again.
* **spend and budgets** (``spend_store``): one hash per UTC day and one per month,
  expiring after ``retain_days``, naming at most 256 models a day. A reservation is
  checked against the caps and added by one Lua script, so budgets hold across processes.

When Redis cannot be used (refused, a server error, an answer that makes no sense, no
answer within ``op_timeout_s``, or three answers in a row slower than half of it) the
default (``fail_open=True``) is that each process goes on with its own in-memory
breakers, buckets and spend ledger (the same limits, held per process), logs one
warning per ``warn_interval_s`` (not one per call), tries Redis again every
``retry_interval_s`` and uses it as soon as it answers in time; spend recorded
meanwhile is then written to Redis. With ``fail_open=False`` calls are refused while
Redis is away: rate limits and budgets raise
:class:`~holysheep_lb.errors.SharedStateUnavailableError` and breakers read as open
(:class:`~holysheep_lb.errors.CircuitOpenError`). Recording what a call did never
raises, and no redis exception ever reaches a caller.

A password (or a redis-py ``credential_provider``) that would go in cleartext to a host
other than this machine (``redis://user:pw@cache``, or a client without ``ssl=True``), or
over TLS that verifies no certificate (``rediss://...?ssl_cert_reqs=none``), is refused
with a ConfigError, as the Client refuses to send the API key over ``http://``: use
``rediss://`` with certificate verification on, or pass ``allow_insecure_redis=True`` on
a network you trust.

Thread-safe and fork-safe: redis-py's pool opens new connections in a child process
(it checks the pid), and the locks here are renewed in the child.

Modules: ``link`` (the client, its health and each operation's budget), ``breakers``,
``buckets``, ``spend`` and ``state`` (:class:`RedisSharedState`).
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("redis") is None:  # pragma: no cover - depends on the installed extras
    raise ImportError("holysheep_lb.contrib.redis needs redis-py: pip install 'holysheep_lb[redis]'")

from .breakers import SharedBreakerStorage
from .buckets import RedisTokenBucket
from .spend import RedisSpendStore
from .state import RedisSharedState

__all__ = ["RedisSharedState", "RedisSpendStore", "RedisTokenBucket", "SharedBreakerStorage"]
