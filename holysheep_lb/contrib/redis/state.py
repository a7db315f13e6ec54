"""RedisSharedState: the one object a user makes, and the Client options it hands out."""

from __future__ import annotations

import ssl
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union
from urllib.parse import urlsplit

import redis
import redis.connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...config import _check_number
from ...errors import ConfigError
from ...urls import is_loopback_host, redact_url
from .breakers import SharedBreakerStorage, breaker_namespace
from .buckets import BUCKET_LUA, RedisTokenBucket
from .link import CONNECTION_CLASSES, RedisLink
from .spend import RECORD_LUA, RESERVE_LUA, RedisSpendStore

__all__ = ["RedisSharedState"]


_FIELD = "redis_client_or_url"


def _make_client(value: Any, socket_timeout_s: float, allow_insecure_redis: bool) -> Tuple[Any, bool]:
    """(redis client, whether we made it) from a URL or a client."""
    if isinstance(value, str):
        scheme: Optional[str]
        try:
            scheme = urlsplit(value).scheme
        except ValueError:  # an unbalanced "[": redis-py could not read it either
            scheme = None
        if scheme is not None and scheme not in CONNECTION_CLASSES:
            raise ConfigError(_FIELD, redact_url(value, scheme_only=True),
                              "must be a redis://, rediss:// or unix:// URL, or a redis.Redis client")
        # Short timeouts and a single retry (for a pooled connection the server closed):
        # redis-py's default retries with backoff would stall calls while Redis is away.
        # The connections also give up when an operation's budget is spent (op_timeout_s).
        client: Any = None
        if scheme is not None:
            try:
                client = redis.Redis.from_url(
                    value, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                    connection_class=CONNECTION_CLASSES[scheme],
                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
            except ValueError:
                pass
        if client is None:  # raised out here: redis-py's error, even as __context__, may quote the password
            raise ConfigError(_FIELD, redact_url(value, scheme_only=True),
                              "redis-py cannot read this URL: check the scheme (lower case), host, port, "
                              "database and options, and percent-encode a password with / ? # @ or : in it")
        try:
            _refuse_exposed_password(client, made_from_url=True, allowed=allow_insecure_redis)
        except ConfigError:
            client.close()  # nothing was connected: redis-py connects on the first command
            raise
        return client, True
    if not isinstance(value, redis.Redis):
        raise ConfigError(_FIELD, type(value).__name__, "must be a redis:// URL or a redis.Redis client")
    if value.connection_pool.connection_kwargs.get("decode_responses"):
        raise ConfigError(_FIELD, "decode_responses=True",
                          "the client must return bytes: create it without decode_responses")
    _refuse_exposed_password(value, made_from_url=False, allowed=allow_insecure_redis)
    return value, False


def _refuse_exposed_password(client: Any, *, made_from_url: bool, allowed: bool) -> None:
    """Refuse a client that would hand a password (or a credential provider's) to whoever
    sits between it and a host that is not this machine, unless ``allowed``; the HTTP
    side's rule for the API key (:func:`holysheep_lb.urls.is_loopback_host` decides what
    is this machine). Two ways to hand it over:

    - plain TCP (``redis://``, a client without ``ssl=True``): anyone on the path reads it;
    - TLS that verifies no certificate (``ssl_cert_reqs=none`` in a ``rediss://`` URL,
      ``ssl_cert_reqs="none"``, None, False or ``ssl.CERT_NONE`` given to a client):
      whoever answers in the server's place completes the handshake with a certificate
      of their own and is sent the password (``AUTH``) inside it. Encryption without
      verification only defeats listeners, not a man in the middle, and a password is
      worth one.

    A certificate checked without its host name (``ssl_check_hostname=False``) is not
    refused: redis-py before 6.0 does not check it unless asked, so refusing it would
    refuse every plain ``rediss://`` URL there; it is weaker than a full check all the
    same (a certificate some trusted CA issued for any other name passes).

    Read from the connection pool redis-py will use, so a URL's ``?password=``,
    ``?host=`` and ``?ssl_cert_reqs=`` count as they will be used. Verified TLS and unix
    sockets pass. What cannot be read is accepted: no ``connection_kwargs``, a connection
    class that is none of redis-py's three, or no host (a Sentinel pool finds its host
    later; a plain pool then uses localhost).
    """
    if allowed:
        return
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    connection_class = getattr(pool, "connection_class", None)
    if not isinstance(kwargs, dict) or not isinstance(connection_class, type):
        return
    if (issubclass(connection_class, redis.connection.UnixDomainSocketConnection)
            or not issubclass(connection_class, redis.connection.Connection)):
        return
    tls = issubclass(connection_class, redis.connection.SSLConnection)
    if tls and not _verification_off(kwargs):
        return
    host = kwargs.get("host")
    if not isinstance(host, str) or is_loopback_host(host):
        return
    if not kwargs.get("password") and kwargs.get("credential_provider") is None:
        return
    where = f"{'[' + host + ']' if ':' in host else host}:{kwargs.get('port', 6379)}"
    if tls:
        shown = f"rediss://<credentials>@{where} (ssl_cert_reqs=none)" if made_from_url else (
            f"redis.Redis client of {where} with credentials and ssl_cert_reqs={kwargs['ssl_cert_reqs']!r}")
        raise ConfigError(_FIELD, shown,
                          "would send the Redis password over TLS that verifies no certificate to a host that is "
                          "not this machine: whoever answers in its place reads the password; verify the "
                          "certificate (leave ssl_cert_reqs at 'required', with ssl_ca_certs=<CA file> for a "
                          "private CA), use a Redis on this machine (127.0.0.1, ::1, localhost), "
                          "or pass allow_insecure_redis=True")
    if made_from_url:
        shown, fix = f"redis://<credentials>@{where}", "use rediss:// (TLS)"
    else:
        shown, fix = f"redis.Redis client of {where} with credentials", "make the client with ssl=True (TLS)"
    raise ConfigError(_FIELD, shown,
                      "would send the Redis password in cleartext to a host that is not this machine; "
                      f"{fix}, use a Redis on this machine (127.0.0.1, ::1, localhost), "
                      "or pass allow_insecure_redis=True")


def _verification_off(kwargs: Dict[str, Any]) -> bool:
    """Whether an SSLConnection made with ``kwargs`` checks no certificate, as redis-py
    reads ``ssl_cert_reqs``: None, "none", or a value equal to ``ssl.CERT_NONE`` (0,
    False); absent, it is "required"."""
    if "ssl_cert_reqs" not in kwargs:
        return False
    value = kwargs["ssl_cert_reqs"]
    return value is None or value == "none" or (isinstance(value, int) and value == ssl.CERT_NONE)


class RedisSharedState:
    """Breakers, rate limits and spend shared by every process given the same Redis and
    ``prefix``; see the package docstring. Pass :meth:`client_options` to each Client.

    ``redis_client_or_url``: a URL (``redis://host:6379/0``; the client made from it has
    ``socket_timeout_s`` timeouts, and gives up on an operation after ``op_timeout_s``)
    or a ``redis.Redis`` client made without ``decode_responses`` (its own timeouts
    apply). ``allow_insecure_redis`` (default False): like the Client's
    ``allow_insecure_http`` for the API key, a password (or a ``credential_provider``)
    that would go in cleartext (``redis://``, or a client without ``ssl=True``), or over
    TLS that verifies no certificate (``ssl_cert_reqs=none``: a man in the middle reads
    it just the same), to a host other than 127.0.0.0/8, ::1 or localhost is refused with
    a ConfigError unless this is True; verified ``rediss://``, ``unix://`` and no
    password pass. A client passed in is
    judged by its pool's ``connection_kwargs`` and ``connection_class``; one that cannot
    be read (no host there, as with Sentinel, or a connection class of its own) is
    accepted. The opt-in has its own name rather than reusing ``allow_insecure_http``:
    the Client never sees the Redis URL (this object is made first and hands the Client
    only its options), and opting into a cleartext gateway should not also opt into a
    cleartext Redis. ``fail_open`` (default True): what happens while Redis is unusable.
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
        allow_insecure_redis: bool = False,
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
        if not isinstance(allow_insecure_redis, bool):
            raise ConfigError("allow_insecure_redis", allow_insecure_redis, "must be True or False")
        client, self._owns_client = _make_client(redis_client_or_url, socket_timeout_s, allow_insecure_redis)
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
