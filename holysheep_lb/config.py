"""Frozen, validated settings: nodes and client options, from code, env or a mapping.

Every invalid setting raises :class:`ConfigError` (also a ``ValueError``) naming the
field, the bad value and what is allowed; a value that may be a secret (an API key, a
header, an unknown option, a URL's password, query or fragment) is never shown: a URL is
quoted as :func:`holysheep_lb.urls.redact_url` shows it. Validation happens once,
at construction, so nothing on the request path re-checks settings. Node URLs are
normalised here (lower-case scheme and host) and every later check reads that form.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import SplitResult, urlsplit, urlunsplit

from .affinity import AffinitySettings
from .cache import check_cache_option
from .errors import REDACTED, ConfigError
from .models import CapabilityTable, ModelRouter
from .pricing import Budget, PriceTable, SpendStore
from .rescue import RESCUE_MODES
from .suggest import unknown_option
from .urls import (check_cleartext, check_proxy, check_unverified_tls, is_cleartext_url, is_loopback_url, redact_url,
                   sends_credentials)
from .validation import MAX_WAIT_S, latin1_size

__all__ = ["Node", "ClientConfig", "BreakerSettings", "DEFAULT_BASE_URL", "is_loopback_url", "is_cleartext_url",
           "check_proxy", "parse_nodes"]

DEFAULT_BASE_URL = "https://api.holysheep.ai/v1"
API_KEY_ENV = "HOLYSHEEP_API_KEY"
NODES_ENV = "HOLYSHEEP_NODES"
BASE_URL_ENV = "HOLYSHEEP_BASE_URL"

_REDACTED = REDACTED


def _check_header_text(field_name: str, value: Any, *, secret: bool = False) -> None:
    """A header name or value must be a latin-1 string without CR, LF or NUL.

    ``secret`` values (API keys, header values) are never echoed in the error: a key
    with a stray newline from a secrets file would otherwise end up in logs.
    """
    shown = _REDACTED if secret else value
    if not isinstance(value, str):
        # a key in the wrong shape (api_key=[key], bytes) is still a key: name the type only
        raise ConfigError(field_name, _REDACTED if secret or isinstance(value, bytes) else value,
                          f"must be a string, not {type(value).__name__}")
    if any(c in value for c in "\r\n\x00"):
        # A CR/LF would let a value inject a second header into the request.
        raise ConfigError(field_name, shown, "must not contain CR, LF or NUL characters")
    if latin1_size(value) is None:
        raise ConfigError(field_name, shown, "must be latin-1 text (HTTP headers cannot carry other characters)")


def _check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
                  allow_none: bool = False, maximum: Optional[float] = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, value, "must be a finite number" + (" or None" if allow_none else ""))
    if strict and value <= minimum:
        raise ConfigError(name, value, f"must be > {minimum:g}")
    if not strict and value < minimum:
        raise ConfigError(name, value, f"must be >= {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, value, f"must be <= {maximum:g} seconds (24 h)")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "must be an integer")
    if value < minimum:
        raise ConfigError(name, value, f"must be >= {minimum}")


def _check_text(name: str, value: Any) -> None:
    """A node id or region: a non-empty printable string (it goes into logs and stats)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(name, value, "must be a non-empty string")
    if not value.isprintable():
        # a newline or escape sequence would let a config value forge log lines
        raise ConfigError(name, value, "must not contain control characters (or other non-printable ones)")


@dataclass(frozen=True)
class Node:
    """One regional endpoint of an OpenAI-compatible gateway.

    ``base_url`` is the API root (``https://host/v1``); paths like ``/chat/completions``
    are appended to it. ``api_key`` overrides the client's key for this node only and is
    never shown in ``repr``. ``headers`` are extra headers sent on every request; like the
    key, their values (from 8 characters on) are blanked in every error built from what
    the node sends back (:mod:`holysheep_lb.redaction`).
    """

    id: str
    base_url: str
    region: str = "default"
    weight: float = 1.0
    api_key: Optional[str] = field(default=None, repr=False, compare=False)
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)  # may carry credentials

    def __post_init__(self) -> None:
        _check_text("node.id", self.id)
        where = f"node[{self.id}]"
        _check_text(f"{where}.region", self.region)
        object.__setattr__(self, "base_url", _validate_base_url(f"{where}.base_url", self.base_url))
        _check_number(f"{where}.weight", self.weight, strict=True)
        if self.api_key is not None:
            _check_header_text(f"{where}.api_key", self.api_key, secret=True)
            if not self.api_key:
                raise ConfigError(f"{where}.api_key", "", "must be non-empty or None")
        if not isinstance(self.headers, Mapping):  # its items may hold credentials: not shown
            raise ConfigError(f"{where}.headers", type(self.headers).__name__, "must be a mapping of str to str")
        for k, v in self.headers.items():
            _check_header_text(f"{where}.headers key", k)
            _check_header_text(f"{where}.headers[{k}]", v, secret=True)
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))

    def __hash__(self) -> int:
        return hash((self.id, self.base_url))

    @classmethod
    def from_value(cls, value: Union["Node", Mapping[str, Any]], index: int = 0) -> "Node":
        """A Node from a Node or a dict (``{"id", "base_url", "region", "weight", ...}``)."""
        if isinstance(value, Node):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"nodes[{index}]", type(value).__name__, "must be a Node or a dict")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - allowed, key=repr)
        if unknown:
            raise unknown_option(f"nodes[{index}]", unknown[0], allowed, what="node key")
        data = dict(value)
        if "id" not in data or "base_url" not in data:
            missing = "id" if "id" not in data else "base_url"
            raise ConfigError(f"nodes[{index}].{missing}", None, "is required")
        return cls(**data)


def _validate_base_url(name: str, url: Any) -> str:
    """The URL in its one normalised form: scheme and host lower-case, no trailing slash."""
    if not isinstance(url, str):
        raise ConfigError(name, type(url).__name__, "must be an http:// or https:// URL string")
    shown = redact_url(url)  # every message below quotes this: no password, query or fragment
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    if "@" in authority:  # before any other check: whatever else is wrong, this is the news
        raise ConfigError(name, shown, "credentials in the URL are not allowed; use api_key or node headers")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(name, shown, "must not contain whitespace or control characters")
    # Each ValueError below is dealt with after its except block: raised inside it, the
    # ConfigError would keep it as __context__, and it quotes the URL (a port that is a password).
    try:
        parts: Optional[SplitResult] = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, shown, "must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(name, shown, "credentials in the URL are not allowed; use api_key or node headers")
    if parts.query or parts.fragment:
        raise ConfigError(name, shown, "must not have a query or fragment (a key belongs in api_key or node "
                                       "headers, where it is never shown)")
    try:
        port = parts.port  # raises on a non-numeric or out-of-range port
        bad_port = False
    except ValueError:
        port, bad_port = None, True
    if bad_port:
        raise ConfigError(name, shown, "has an invalid port")
    host = parts.hostname  # lower-case, brackets of an IPv6 address removed
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


@dataclass(frozen=True)
class BreakerSettings:
    """One circuit breaker's settings (pybreaker's ``fail_max``, ``reset_timeout``,
    ``success_threshold``): open after ``fail_max`` system failures in a row, then let one
    trial call through every ``trial_interval_s`` (None: ``min(reset_timeout_s, 10)``;
    never more than ``reset_timeout_s``); close after ``success_threshold`` successful
    trials, re-open for another interval on a failed one.

    A half-open trial is a single attempt (a cheap probe), so every open lasts one trial
    interval, the first one too: a model that recovers gets traffic back within that
    interval rounded up to the next call (within 20 s for calls up to 10 s apart, and
    within the gap between calls for calls up to 30 s apart with the defaults), however
    long it was down. For a longer rest set ``trial_interval_s`` (``reset_timeout_s``
    caps it)."""

    fail_max: int = 5
    reset_timeout_s: float = 30.0
    success_threshold: int = 1
    trial_interval_s: Optional[float] = None

    def __post_init__(self) -> None:
        _check_int("fail_max", self.fail_max, minimum=1)
        _check_number("reset_timeout_s", self.reset_timeout_s, strict=True)
        _check_int("success_threshold", self.success_threshold, minimum=1)
        _check_number("trial_interval_s", self.trial_interval_s, strict=True, allow_none=True)

    @property
    def open_s(self) -> float:
        """How long the breaker stays open each time it opens (or a failed trial re-opens it)."""
        if self.trial_interval_s is not None:
            return min(self.trial_interval_s, self.reset_timeout_s)
        return min(self.reset_timeout_s, 10.0)

    @property
    def retrial_s(self) -> float:
        """The older name of :attr:`open_s`."""
        return self.open_s

    @classmethod
    def from_value(cls, name: str, value: Any) -> Optional["BreakerSettings"]:
        """Settings from an instance, a dict of its fields, True (defaults) or None/False (off)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(name, value, "must be BreakerSettings, a dict of its fields, True, False or None")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - allowed, key=repr)
        if unknown:
            raise unknown_option(name, unknown[0], allowed, what="breaker setting")
        try:
            return cls(**value)
        except ConfigError as exc:
            raise ConfigError(f"{name}.{exc.field}", exc.value, exc.allowed) from None


def parse_nodes(nodes: Any) -> Tuple[Node, ...]:
    """Validate a sequence of Node/dict into a tuple of unique Nodes."""
    if nodes is None:
        return (Node(id="holysheep", base_url=DEFAULT_BASE_URL, region="global"),)
    if isinstance(nodes, (str, bytes, Mapping)) or not isinstance(nodes, Sequence):
        # not echoed: a lone node dict may hold its api_key
        raise ConfigError("nodes", type(nodes).__name__, "must be a list of Node objects or dicts")
    if not nodes:
        raise ConfigError("nodes", nodes, "must contain at least one node")
    parsed = tuple(Node.from_value(v, i) for i, v in enumerate(nodes))
    seen = set()
    for n in parsed:
        if n.id in seen:
            raise ConfigError("nodes", n.id, "node ids must be unique; this id appears twice")
        seen.add(n.id)
    return parsed


@dataclass(frozen=True)
class ClientConfig:
    """Every option of :class:`~holysheep_lb.Client`, validated.

    Times are seconds. ``deadline_s`` bounds a whole call, all attempts and waits
    included; ``connect_timeout_s``/``read_timeout_s`` bound each attempt (the read
    timeout is also cut to what remains of the deadline). A stream (``stream=True``)
    uses a time-to-first-token limit instead of the read timeout until its first chunk
    (headers included; the deadline still applies), then ``stream_stall_timeout_s``
    between chunks. The first-token limit is, first that is set: the call's
    ``first_token_timeout_s=``, the model's entry in ``model_capabilities`` (or the
    built-in table: reasoning models get 300 s, and a 120 s stall limit), the client's
    ``first_token_timeout_s``, then ``stream_first_chunk_timeout_s`` (30 s, its older
    name). Its expiry raises :class:`~holysheep_lb.errors.FirstTokenTimeoutError`
    (kind ``"ttft_timeout"``). The stall limit defaults to 20 s: chat models send a
    chunk every few tens of milliseconds, so 20 s of silence is a broken stream.

    Streams (see :mod:`holysheep_lb.rescue`): ``stream_rescue`` is ``"auto"`` (a stream
    that breaks after its first chunk is continued on another route where the model
    accepts an assistant prefill, else restarted), ``"continue"`` (never restarted) or
    ``"off"``; at most ``stream_max_rescues`` per call. ``model_capabilities`` maps a
    model name (or a prefix ending in ``*``) to a
    :class:`~holysheep_lb.models.ModelCapabilities` or a dict of its fields, extending
    the built-in table.

    Resilience: ``breaker`` (every model; None: off), ``model_breakers`` (per model),
    ``node_breakers`` (None: off) and ``breaker_storage(name) -> CircuitBreakerStorage``;
    ``fallbacks={"model": ["next", ...]}`` and ``fallback_reply(model, payload, error)``;
    ``context_window_fallbacks={"model": ["larger-context", ...]}`` where a call that does
    not fit a model's context window (ContextWindowExceededError) goes instead (without
    one, such a call is final); ``content_policy_fallbacks`` likewise for a content-filter
    refusal (ContentFilterError), which is otherwise final and never routed around;
    ``requests_per_minute``/``tokens_per_minute``, ``model_rate_limits={"model":
    {"requests_per_minute": ..., "tokens_per_minute": ...}}`` and
    ``rate_limiter_factory(name, rate_per_s, capacity)``; ``rate_limit_burst_s`` (each
    limit's burst in seconds of its rate: no limit admits more than its number in any 60 s
    window, see :mod:`holysheep_lb.ratelimit`); ``retry_budget_ratio`` (None:
    off), ``retry_budget_min_per_s``, ``retry_budget_ttl_s``; ``hedge_delay_s`` (seconds
    or ``"p95"``; None: off), ``hedge_max_ratio``, ``hedge_max_threads``;
    ``rescue_hung_calls`` (True: a call stuck on a node found hung has its connection cut
    and is retried elsewhere within the retry budget; False: it waits out its read timeout).
    """

    nodes: Tuple[Node, ...]
    api_key: Optional[str] = field(default=None, repr=False)
    strategy: Any = "adaptive"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    deadline_s: float = 120.0
    max_retries: int = 3
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    retry_after_cap_s: float = 60.0
    # Keep-alive connections kept per node. urllib3 opens a connection only when none is
    # idle, so a pool holds as many as the node had requests in flight at once (sockets
    # are bounded by the callers' concurrency), up to this cap; above it each extra
    # connection is closed after use ("Connection pool is full") and reopened next time.
    pool_maxsize: int = 256
    max_response_bytes: int = 16 * 1024 * 1024
    stream_first_chunk_timeout_s: float = 30.0
    stream_stall_timeout_s: float = 20.0
    first_token_timeout_s: Optional[float] = None
    stream_rescue: str = "auto"
    stream_max_rescues: int = 2
    model_capabilities: Any = None  # None, {model: ModelCapabilities or dict}, or a CapabilityTable
    default_model: Optional[str] = None
    default_region: Optional[str] = None
    verify: Union[bool, str] = True  # True, False or a CA bundle file/directory (a PathLike becomes a str)
    allow_insecure_http: bool = False
    panic_threshold: float = 0.5
    # passive ejection (see nodes.py)
    eject_after_failures: int = 5
    ejection_base_s: float = 30.0
    ejection_max_s: float = 300.0
    slow_start_s: float = 0.0
    # active health checks (see health.py)
    health_check_interval_s: Optional[float] = 10.0
    health_check_timeout_s: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    # circuit breakers (see breakers.py): one per model, optionally one per node
    breaker: Optional[BreakerSettings] = BreakerSettings()
    model_breakers: Mapping[str, BreakerSettings] = field(default_factory=dict)
    node_breakers: Optional[BreakerSettings] = None
    breaker_storage: Optional[Callable[[str], Any]] = None
    # model fallbacks (see fallbacks.py)
    fallbacks: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    context_window_fallbacks: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    content_policy_fallbacks: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    fallback_reply: Optional[Callable[..., Mapping[str, Any]]] = None
    # client-side rate limits (see ratelimit.py)
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    model_rate_limits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    rate_limiter_factory: Optional[Callable[[str, float, float], Any]] = None
    rate_limit_burst_s: float = 1.0  # each limit's burst, in seconds of its rate (see ratelimit.py)
    # retry budget (see retry.py); ratio None turns it off
    retry_budget_ratio: Optional[float] = 0.2
    retry_budget_min_per_s: float = 1.0
    retry_budget_ttl_s: float = 10.0
    # hedged requests (see hedging.py); off unless hedge_delay_s is set
    hedge_delay_s: Union[None, float, str] = None
    hedge_max_ratio: float = 0.05
    hedge_max_threads: int = 64
    rescue_hung_calls: bool = True  # cut the calls stuck on a node found hung, retry them elsewhere
    # cost control (see pricing.py, models.py, cache.py)
    prices: Any = None  # None (defaults), {model: {"input": x, "output": y}}, a JSON path, a PriceTable
    router: Optional[ModelRouter] = None  # chooses the model of model="auto" calls (and of calls without one)
    budget: Any = None  # None, a Budget or a dict of its fields
    spend_store: Optional[SpendStore] = None  # None: in this process only
    cache: Any = None  # None, True, {"maxsize": n, "ttl_s": s} or a ResponseCache
    # prompt-cache affinity (see affinity.py): True (default), False, a dict or an AffinitySettings
    affinity: Any = True

    def __post_init__(self) -> None:
        _check_cost_options(self)
        if self.api_key is not None:
            _check_header_text("api_key", self.api_key, secret=True)
        # Waits are capped at MAX_WAIT_S: a thread cannot wait much past 1e9 s (OverflowError).
        for name in ("connect_timeout_s", "read_timeout_s", "deadline_s",
                     "stream_first_chunk_timeout_s", "stream_stall_timeout_s"):
            _check_number(name, getattr(self, name), strict=True, maximum=MAX_WAIT_S)
        for name in ("backoff_base_s", "backoff_cap_s", "retry_after_cap_s"):
            _check_number(name, getattr(self, name), maximum=MAX_WAIT_S)
        for name in ("ejection_base_s", "ejection_max_s", "slow_start_s"):
            _check_number(name, getattr(self, name))
        _check_stream_options(self)
        _check_number("health_check_interval_s", self.health_check_interval_s, strict=True,
                      allow_none=True, maximum=MAX_WAIT_S)
        _check_number("health_check_timeout_s", self.health_check_timeout_s, strict=True, maximum=MAX_WAIT_S)
        _check_int("max_retries", self.max_retries, minimum=0)
        _check_int("pool_maxsize", self.pool_maxsize, minimum=1)
        _check_int("max_response_bytes", self.max_response_bytes, minimum=1024)
        _check_int("eject_after_failures", self.eject_after_failures, minimum=1)
        _check_int("unhealthy_threshold", self.unhealthy_threshold, minimum=1)
        _check_int("healthy_threshold", self.healthy_threshold, minimum=1)
        _check_number("panic_threshold", self.panic_threshold)
        if self.panic_threshold > 1:
            raise ConfigError("panic_threshold", self.panic_threshold, "must be between 0 and 1")
        for name in ("default_model", "default_region"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(name, value, "must be a non-empty string or None")
        _check_resilience(self)
        object.__setattr__(self, "verify", _check_verify(self.verify))
        if not isinstance(self.allow_insecure_http, bool):
            raise ConfigError("allow_insecure_http", self.allow_insecure_http, "must be True or False")
        for node in self.nodes:
            key = node.api_key or self.api_key
            loopback = is_loopback_url(node.base_url)
            if key is None and not loopback:
                raise ConfigError(
                    "api_key", None,
                    f"node {node.id} ({node.base_url}) needs an API key: pass api_key=... "
                    f"or set the {API_KEY_ENV} environment variable",
                )
            sends_key = sends_credentials(node, self.api_key)
            check_cleartext(node, sends_key=sends_key, allow_insecure_http=self.allow_insecure_http)
            check_unverified_tls(node, self.verify, sends_key=sends_key, allow_insecure_http=self.allow_insecure_http)


def _check_verify(verify: Any) -> Union[bool, str]:
    """True, False or an existing CA bundle file or directory (as a str).

    Anything else is refused: requests reads any false value, "" included, as "do not
    verify", which would hand the key to whoever answers.
    """
    if isinstance(verify, bool):
        return verify
    if isinstance(verify, (str, os.PathLike)) and not isinstance(os.fspath(verify), bytes):
        path = os.fspath(verify)
        if not path.strip():
            raise ConfigError("verify", path, "must be True, False or a CA bundle path; an empty path is not "
                                              "False (verify=False turns verification off, which is unsafe)")
        if os.path.exists(path):
            return path
        raise ConfigError("verify", path, "must be True, False or the path of an existing CA bundle "
                                          "file or directory (this path does not exist)")
    raise ConfigError("verify", verify, "must be True, False or the path of a CA bundle file or directory")


def _check_resilience(cfg: ClientConfig) -> None:
    """Validate and normalise the breaker, fallback, rate-limit, budget and hedging options."""
    def put(name: str, value: Any) -> None:
        object.__setattr__(cfg, name, value)

    def model_map(name: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
            raise ConfigError(name, value, "must be a dict keyed by model name")
        return value

    put("breaker", BreakerSettings.from_value("breaker", cfg.breaker))
    put("node_breakers", BreakerSettings.from_value("node_breakers", cfg.node_breakers))
    per_model = model_map("model_breakers", cfg.model_breakers)
    put("model_breakers", MappingProxyType({
        m: BreakerSettings.from_value(f"model_breakers[{m}]", v) or BreakerSettings() for m, v in per_model.items()
    }))
    for name in ("breaker_storage", "fallback_reply", "rate_limiter_factory"):
        if getattr(cfg, name) is not None and not callable(getattr(cfg, name)):
            raise ConfigError(name, getattr(cfg, name), "must be a callable or None")
    for option in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
        chains: Dict[str, Tuple[str, ...]] = {}
        for model, chain in model_map(option, getattr(cfg, option)).items():
            if isinstance(chain, str) or not isinstance(chain, (list, tuple)) or \
                    not all(isinstance(m, str) and m for m in chain):
                raise ConfigError(f"{option}[{model}]", chain, "must be a list of model names")
            if model in chain:
                raise ConfigError(f"{option}[{model}]", chain, "a model cannot fall back to itself")
            chains[model] = tuple(chain)
        put(option, MappingProxyType(chains))
    for name in ("requests_per_minute", "tokens_per_minute"):
        _check_number(name, getattr(cfg, name), strict=True, allow_none=True)
    burst_s = cfg.rate_limit_burst_s
    if isinstance(burst_s, bool) or not isinstance(burst_s, (int, float)) or not 0 < burst_s <= 30:
        raise ConfigError("rate_limit_burst_s", burst_s,
                          "must be a number of seconds in (0, 30]: the burst a limit lets through at once, "
                          "as seconds of its rate (a larger burst leaves less than half the minute's pace)")
    limits: Dict[str, Mapping[str, float]] = {}
    for model, spec in model_map("model_rate_limits", cfg.model_rate_limits).items():
        allowed = ("requests_per_minute", "tokens_per_minute")
        if isinstance(spec, Mapping) and set(spec) - set(allowed):
            raise unknown_option(f"model_rate_limits[{model}]", min(set(spec) - set(allowed), key=repr),
                                 allowed, what="rate limit")
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError(f"model_rate_limits[{model}]", spec, f"must be a dict with keys from {allowed}")
        for key, value in spec.items():
            _check_number(f"model_rate_limits[{model}].{key}", value, strict=True)
        limits[model] = MappingProxyType(dict(spec))
    put("model_rate_limits", MappingProxyType(limits))
    _check_number("retry_budget_ratio", cfg.retry_budget_ratio, allow_none=True)
    _check_number("retry_budget_min_per_s", cfg.retry_budget_min_per_s)
    _check_number("retry_budget_ttl_s", cfg.retry_budget_ttl_s, strict=True)
    delay = cfg.hedge_delay_s
    if delay != "p95" and delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))
                                                 or not math.isfinite(delay) or not 0 < delay <= MAX_WAIT_S):
        raise ConfigError("hedge_delay_s", delay, "must be None (off), a number of seconds in (0, 86400] or 'p95'")
    _check_number("hedge_max_ratio", cfg.hedge_max_ratio, strict=True)
    if cfg.hedge_max_ratio > 1:
        raise ConfigError("hedge_max_ratio", cfg.hedge_max_ratio, "must be > 0 and <= 1")
    _check_int("hedge_max_threads", cfg.hedge_max_threads, minimum=1)
    if not isinstance(cfg.rescue_hung_calls, bool):
        raise ConfigError("rescue_hung_calls", cfg.rescue_hung_calls, "must be True or False")


def _check_cost_options(cfg: "ClientConfig") -> None:
    # normalised in place (the dataclass is frozen): prices -> PriceTable, budget -> Budget
    object.__setattr__(cfg, "prices", PriceTable.coerce(cfg.prices))
    object.__setattr__(cfg, "budget", Budget.coerce(cfg.budget))
    object.__setattr__(cfg, "cache", check_cache_option(cfg.cache))
    object.__setattr__(cfg, "affinity", AffinitySettings.coerce(cfg.affinity))
    if cfg.router is not None and not isinstance(cfg.router, ModelRouter):
        raise ConfigError("router", cfg.router, "must be None or a ModelRouter")
    if cfg.spend_store is not None and not isinstance(cfg.spend_store, SpendStore):
        raise ConfigError("spend_store", cfg.spend_store, "must be None or a SpendStore")


CLIENT_OPTIONS = frozenset(f.name for f in fields(ClientConfig))


def _check_stream_options(cfg: "ClientConfig") -> None:
    """The stream options; ``model_capabilities`` becomes a CapabilityTable."""
    _check_number("first_token_timeout_s", cfg.first_token_timeout_s, strict=True, allow_none=True,
                  maximum=MAX_WAIT_S)
    if cfg.stream_rescue not in RESCUE_MODES:
        raise ConfigError("stream_rescue", cfg.stream_rescue, f"must be one of {', '.join(RESCUE_MODES)}")
    _check_int("stream_max_rescues", cfg.stream_max_rescues, minimum=0)
    table = cfg.model_capabilities
    if not isinstance(table, CapabilityTable):
        object.__setattr__(cfg, "model_capabilities", CapabilityTable(table))


def config_from_env(environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> Dict[str, Any]:
    """Client keyword arguments from ``HOLYSHEEP_API_KEY`` and ``HOLYSHEEP_NODES``/``HOLYSHEEP_BASE_URL``."""
    env = os.environ if environ is None else environ
    kwargs: Dict[str, Any] = {}
    if env.get(API_KEY_ENV):
        kwargs["api_key"] = env[API_KEY_ENV]
    raw_nodes = env.get(NODES_ENV)
    if raw_nodes:
        problem = None
        try:
            kwargs["nodes"] = json.loads(raw_nodes)
        except ValueError as exc:
            problem = str(exc)  # raised after the except block: the JSONDecodeError keeps the text (its doc)
        if problem is not None:  # the raw value is not shown: it may hold per-node keys
            raise ConfigError(NODES_ENV, _REDACTED, f"must be a JSON list of node objects ({problem})")
    elif env.get(BASE_URL_ENV):
        kwargs["nodes"] = [{"id": "default", "base_url": env[BASE_URL_ENV]}]
    kwargs.update(overrides)
    return kwargs


def config_from_mapping(mapping: Mapping[str, Any]) -> Dict[str, Any]:
    """Client keyword arguments from a dict such as Django's ``settings.HOLYSHEEP``.

    Keys are the Client's keyword arguments; unknown keys are an error, not ignored.
    """
    if not isinstance(mapping, Mapping):  # not echoed: it may hold the key
        raise ConfigError("mapping", type(mapping).__name__, "must be a dict of Client options")
    return dict(mapping)
