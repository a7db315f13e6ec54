"""RedisSharedState refuses to send a Redis password in cleartext to another machine.

The HTTP side's rule for the API key (``allow_insecure_http``), applied to Redis: a
password over plain ``redis://`` to a host that is not loopback is a ConfigError at
construction, before anything connects, unless ``allow_insecure_redis=True``. No Redis
server is needed: nothing here connects, and a test fails if anything even resolves a name.
"""

from __future__ import annotations

import socket
import ssl

import pytest

redis = pytest.importorskip("redis", reason="the redis extra is not installed: pip install -e '.[test]'")
import redis.sentinel  # noqa: E402

from holysheep_lb import ConfigError  # noqa: E402
from holysheep_lb.contrib.redis import RedisSharedState  # noqa: E402
from holysheep_lb.urls import is_loopback_host, is_loopback_url  # noqa: E402

SECRET = "hunter2"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every name lookup (redis-py's first step in connecting) fails the test's check."""
    lookups = []

    def refuse(*args, **kwargs):
        lookups.append(args[:2])
        raise OSError("the tests of the Redis URL guard never connect")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield lookups
    assert lookups == [], f"something tried to connect: {lookups}"


def assert_secret_never_shown(exc: ConfigError, *secrets: str) -> None:
    texts = [str(exc), repr(exc), repr(exc.value), str(exc.allowed), repr(exc.args)]
    for secret in secrets:
        for text in texts:
            assert secret not in text, text
    # nothing chained that could quote it in a traceback or an error tracker
    assert exc.__cause__ is None and exc.__context__ is None


def refused(target: object, *secrets: str) -> ConfigError:
    """The ConfigError ``RedisSharedState(target)`` raises, about the Redis URL or
    client, never showing the ``secrets`` (the password by default)."""
    with pytest.raises(ConfigError) as raised:
        RedisSharedState(target)
    exc = raised.value
    assert exc.field == "redis_client_or_url"
    assert_secret_never_shown(exc, *(secrets or (SECRET,)))
    return exc


# -- refused -----------------------------------------------------------------------------------

REFUSED_URLS = [
    pytest.param(f"redis://user:{SECRET}@cache.example.com:6379/0", "cache.example.com:6379", id="user:pass@"),
    pytest.param(f"redis://:{SECRET}@cache.example.com:6379/0", "cache.example.com:6379", id=":pass@"),
    pytest.param(f"redis://cache.example.com/0?password={SECRET}", "cache.example.com:6379", id="?password="),
    pytest.param(f"redis://default@cache.example.com:6380/2?password={SECRET}", "cache.example.com:6380",
                 id="user@ and ?password="),
    pytest.param(f"redis://?host=cache.example.com&password={SECRET}", "cache.example.com:6379",
                 id="?host= and ?password="),
    pytest.param(f"redis://:{SECRET}@10.0.0.5:6379/0", "10.0.0.5:6379", id="private IPv4"),
    pytest.param(f"redis://:{SECRET}@[2001:db8::1]:6380/0", "[2001:db8::1]:6380", id="IPv6"),
    pytest.param(f"redis://:{SECRET}@127.0.0.1.example.com/0", "127.0.0.1.example.com:6379",
                 id="a name that starts like loopback"),
    pytest.param(f"redis://:{SECRET}@localhost.example.com/0", "localhost.example.com:6379",
                 id="localhost as a subdomain"),
    pytest.param(f"redis://:{SECRET}@CACHE.example.com/0", "cache.example.com:6379", id="upper-case host"),
]


@pytest.mark.parametrize("url, where", REFUSED_URLS)
def test_a_cleartext_password_to_another_host_is_refused(url, where):
    exc = refused(url)
    assert exc.value == f"redis://<credentials>@{where}"
    message = str(exc)
    assert "cleartext" in message and "rediss://" in message and "allow_insecure_redis=True" in message


def test_a_percent_encoded_password_is_not_shown_either_way():
    refused("redis://:p%40ss%3Aw0rd@cache.example.com/0", "p%40ss%3Aw0rd", "p@ss:w0rd", "ss%3Aw0rd", "w0rd")


@pytest.mark.parametrize("make", [
    pytest.param(lambda: redis.Redis(host="cache.example.com", password=SECRET), id="password"),
    pytest.param(lambda: redis.Redis(host="cache.example.com", username="app", password=SECRET), id="user+password"),
    pytest.param(lambda: redis.Redis(host="10.1.2.3", port=6380, credential_provider=(
        redis.UsernamePasswordCredentialProvider("app", SECRET))), id="credential provider"),
    pytest.param(lambda: redis.Redis.from_url(f"redis://:{SECRET}@cache.example.com/0"), id="from_url"),
    pytest.param(lambda: redis.Redis(connection_pool=redis.BlockingConnectionPool(
        host="cache.example.com", password=SECRET)), id="blocking pool"),
])
def test_a_client_that_would_send_its_password_in_cleartext_is_refused(make):
    client = make()
    exc = refused(client)
    assert exc.value.startswith("redis.Redis client of ") and "with credentials" in exc.value
    assert "ssl=True" in str(exc) and "allow_insecure_redis=True" in str(exc)
    client.close()


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}/x@cache.example.com:6379/0",  # an unencoded "/": redis-py's error quotes "hunter2"
    f"redis://:{SECRET}#x@cache.example.com:6379/0",
    f"REDIS://:{SECRET}@cache.example.com/0",  # redis-py wants the scheme in lower case
    f"redis://:{SECRET}@cache.example.com/0?db=zero",
])
def test_a_url_redis_py_cannot_read_is_a_config_error_that_does_not_quote_it(url):
    assert "cannot read this URL" in str(refused(url))


def test_a_url_of_another_scheme_is_not_quoted():
    assert refused(f"http://cache.example.com/?password={SECRET}").value == "http://..."


# -- TLS that verifies no certificate: a man in the middle reads the password ----------------

UNVERIFIED_URLS = [
    pytest.param(f"rediss://:{SECRET}@cache.example.com:6380/0?ssl_cert_reqs=none", "cache.example.com:6380",
                 id=":pass@"),
    pytest.param(f"rediss://cache.example.com/0?ssl_cert_reqs=none&password={SECRET}", "cache.example.com:6379",
                 id="?password="),
    pytest.param(f"rediss://app:{SECRET}@[2001:db8::1]:6380/0?ssl_cert_reqs=none", "[2001:db8::1]:6380", id="IPv6"),
]


@pytest.mark.parametrize("url, where", UNVERIFIED_URLS)
def test_a_password_over_tls_without_certificate_verification_is_refused(url, where):
    exc = refused(url)
    assert exc.value == f"rediss://<credentials>@{where} (ssl_cert_reqs=none)"
    message = str(exc)
    assert "verifies no certificate" in message and "ssl_ca_certs" in message
    assert "allow_insecure_redis=True" in message


@pytest.mark.parametrize("cert_reqs", ["none", None, ssl.CERT_NONE, False])
def test_a_client_with_certificate_verification_off_is_refused(cert_reqs):
    client = redis.Redis(host="cache.example.com", port=6380, password=SECRET, ssl=True, ssl_cert_reqs=cert_reqs)
    exc = refused(client)
    assert exc.value.startswith("redis.Redis client of cache.example.com:6380 with credentials and ssl_cert_reqs=")
    assert "verifies no certificate" in str(exc) and "allow_insecure_redis=True" in str(exc)
    assert RedisSharedState(client, allow_insecure_redis=True).redis is client
    client.close()


@pytest.mark.parametrize("url", [
    f"rediss://:{SECRET}@cache.example.com:6380/0?ssl_cert_reqs=required",
    f"rediss://:{SECRET}@cache.example.com:6380/0?ssl_cert_reqs=optional",  # a client checks it all the same
    f"rediss://:{SECRET}@cache.example.com:6380/0?ssl_check_hostname=False",  # weaker, not refused (docstring)
    f"rediss://:{SECRET}@127.0.0.1:6380/0?ssl_cert_reqs=none",  # this machine
    f"rediss://:{SECRET}@localhost:6380/0?ssl_cert_reqs=none",
    "rediss://cache.example.com:6380/0?ssl_cert_reqs=none",  # no password to read
])
def test_verified_tls_loopback_or_no_password_pass_whatever_the_verification(url):
    RedisSharedState(url).close()


def test_the_opt_in_lets_a_password_over_unverified_tls_through():
    url = f"rediss://:{SECRET}@cache.example.com:6380/0?ssl_cert_reqs=none"
    state = RedisSharedState(url, allow_insecure_redis=True)
    kwargs = state.redis.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["password"], kwargs["ssl_cert_reqs"]) == ("cache.example.com", SECRET, "none")
    assert SECRET not in repr(state)
    state.close()


def test_the_opt_in_is_true_or_false():
    with pytest.raises(ConfigError) as bad:
        RedisSharedState("redis://127.0.0.1/0", allow_insecure_redis="yes")
    assert bad.value.field == "allow_insecure_redis"


# -- allowed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("url, host", [
    (f"rediss://:{SECRET}@cache.example.com:6380/0", "cache.example.com"),
    (f"rediss://cache.example.com/0?password={SECRET}", "cache.example.com"),
    (f"redis://:{SECRET}@127.0.0.1:6379/0", "127.0.0.1"),
    (f"redis://user:{SECRET}@127.8.9.10/0", "127.8.9.10"),
    (f"redis://:{SECRET}@[::1]:6379/0", "::1"),
    (f"redis://:{SECRET}@localhost/0", "localhost"),
    (f"redis://:{SECRET}@LOCALHOST/0", "localhost"),
    (f"redis://localhost/0?password={SECRET}", "localhost"),
    (f"unix://:{SECRET}@/run/redis/redis.sock?db=0", None),
    ("redis://cache.example.com:6379/0", "cache.example.com"),  # no password: nothing to read
    ("redis://app@cache.example.com:6379/0", "cache.example.com"),  # a user name alone is not a secret
])
def test_tls_loopback_a_unix_socket_or_no_password_are_allowed(url, host):
    state = RedisSharedState(url)
    kwargs = state.redis.connection_pool.connection_kwargs
    assert kwargs.get("host") == host
    state.close()


def test_the_opt_in_lets_a_cleartext_password_through():
    url = f"redis://app:{SECRET}@cache.example.com:6379/0"
    state = RedisSharedState(url, allow_insecure_redis=True)
    kwargs = state.redis.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["username"], kwargs["password"]) == ("cache.example.com", "app", SECRET)
    assert SECRET not in repr(state)
    state.close()
    client = redis.Redis(host="cache.example.com", password=SECRET)
    assert RedisSharedState(client, allow_insecure_redis=True).redis is client


@pytest.mark.parametrize("make", [
    pytest.param(lambda: redis.Redis(host="cache.example.com", password=SECRET, ssl=True), id="ssl=True"),
    pytest.param(lambda: redis.Redis(host="127.0.0.1", password=SECRET), id="loopback"),
    pytest.param(lambda: redis.Redis(host="::1", password=SECRET), id="IPv6 loopback"),
    pytest.param(lambda: redis.Redis(host="cache.example.com"), id="no password"),
    pytest.param(lambda: redis.Redis(unix_socket_path="/run/redis/redis.sock", password=SECRET), id="unix socket"),
    # Sentinel finds the master's host when it connects: nothing to read, accepted (documented)
    pytest.param(lambda: redis.sentinel.Sentinel([("127.0.0.1", 1)]).master_for("main", password=SECRET),
                 id="sentinel"),
])
def test_a_client_that_is_safe_or_cannot_be_read_is_accepted(make):
    client = make()
    assert RedisSharedState(client).redis is client


# -- one rule for what is this machine --------------------------------------------------------


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("localhost", True), ("LocalHost", True),
    ("", False), ("10.0.0.1", False), ("::2", False), ("127.0.0.1.example.com", False),
    ("localhost.example.com", False), ("cache", False),
])
def test_is_loopback_host_is_the_rule_is_loopback_url_applies(host, loopback):
    assert is_loopback_host(host) is loopback
    shown = f"[{host}]" if ":" in host else host
    assert is_loopback_url(f"https://{shown}:443/v1") is loopback
