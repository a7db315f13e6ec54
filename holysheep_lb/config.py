"""Frozen, validated settings: nodes and client options, from code, env or a mapping.

Every invalid setting raises :class:`ConfigError` (also a ``ValueError``) naming the
field, the bad value and what is allowed. Validation happens once, at construction,
so nothing on the request path re-checks settings.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from .cache import check_cache_option
from .errors import ConfigError
from .models import ModelRouter
from .pricing import Budget, PriceTable, SpendStore
from .validation import MAX_WAIT_S

__all__ = ["Node", "ClientConfig", "BreakerSettings", "DEFAULT_BASE_URL", "is_loopback_url", "parse_nodes"]

DEFAULT_BASE_URL = "https://api.holysheep.ai/v1"
API_KEY_ENV = "HOLYSHEEP_API_KEY"
NODES_ENV = "HOLYSHEEP_NODES"
BASE_URL_ENV = "HOLYSHEEP_BASE_URL"


_REDACTED = "<redacted>"


def _check_header_text(field_name: str, value: Any, *, secret: bool = False) -> None:
    """A header name or value must be a latin-1 string without CR, LF or NUL.

    ``secret`` values (API keys, header values) are never echoed in the error: a key
    with a stray newline from a secrets file would otherwise end up in logs.
    """
    shown = _REDACTED if secret else value
    if not isinstance(value, str):
        raise ConfigError(field_name, shown if isinstance(value, (str, bytes)) else value,
                          "must be a string")
    if any(c in value for c in "\r\n\x00"):
        # A CR/LF would let a value inject a second header into the request.
        raise ConfigError(field_name, shown, "must not contain CR, LF or NUL characters")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(field_name, shown, "must be latin-1 text (HTTP headers cannot carry other characters)") \
            from None


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


def is_loopback_url(url: str) -> bool:
    """True when ``url`` points at this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Node:
    """One regional endpoint of an OpenAI-compatible gateway.

    ``base_url`` is the API root (``https://host/v1``); paths like ``/chat/completions``
    are appended to it. ``api_key`` overrides the client's key for this node only and is
    never shown in ``repr``. ``headers`` are extra headers sent on every request.
    """

    id: str
    base_url: str
    region: str = "default"
    weight: float = 1.0
    api_key: Optional[str] = field(default=None, repr=False, compare=False)
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)  # may carry credentials

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ConfigError("node.id", self.id, "must be a non-empty string")
        where = f"node[{self.id}]"
        if not isinstance(self.region, str) or not self.region.strip():
            raise ConfigError(f"{where}.region", self.region, "must be a non-empty string")
        object.__setattr__(self, "base_url", _validate_base_url(f"{where}.base_url", self.base_url))
        _check_number(f"{where}.weight", self.weight, strict=True)
        if self.api_key is not None:
            _check_header_text(f"{where}.api_key", self.api_key, secret=True)
            if not self.api_key:
                raise ConfigError(f"{where}.api_key", "", "must be non-empty or None")
        if not isinstance(self.headers, Mapping):
            raise ConfigError(f"{where}.headers", self.headers, "must be a mapping of str to str")
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
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(f"nodes[{index}]", unknown[0], f"unknown key; allowed keys: {sorted(allowed)}")
        data = dict(value)
        if "id" not in data or "base_url" not in data:
            missing = "id" if "id" not in data else "base_url"
            raise ConfigError(f"nodes[{index}].{missing}", None, "is required")
        return cls(**data)


def _validate_base_url(name: str, url: Any) -> str:
    if not isinstance(url, str):
        raise ConfigError(name, url, "must be an http:// or https:// URL string")
    if url != url.strip() or any(c.isspace() for c in url):
        raise ConfigError(name, url, "must not contain whitespace")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, url, "must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ConfigError(name, url, "must not have a query or fragment")
    try:
        parts.port  # raises on a non-numeric port
    except ValueError:
        raise ConfigError(name, url, "has an invalid port") from None
    return url.rstrip("/")


@dataclass(frozen=True)
class BreakerSettings:
    """One circuit breaker's settings (pybreaker's ``fail_max``, ``reset_timeout``,
    ``success_threshold``): open after ``fail_max`` system failures in a row, stay open
    ``reset_timeout_s``, close after ``success_threshold`` successful trial calls."""

    fail_max: int = 5
    reset_timeout_s: float = 30.0
    success_threshold: int = 1

    def __post_init__(self) -> None:
        _check_int("fail_max", self.fail_max, minimum=1)
        _check_number("reset_timeout_s", self.reset_timeout_s, strict=True)
        _check_int("success_threshold", self.success_threshold, minimum=1)

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
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(name, unknown[0], f"unknown key; allowed keys: {sorted(allowed)}")
        try:
            return cls(**value)
        except ConfigError as exc:
            raise ConfigError(f"{name}.{exc.field}", exc.value, exc.allowed) from None


def parse_nodes(nodes: Any) -> Tuple[Node, ...]:
    """Validate a sequence of Node/dict into a tuple of unique Nodes."""
    if nodes is None:
        return (Node(id="holysheep", base_url=DEFAULT_BASE_URL, region="global"),)
    if isinstance(nodes, (str, bytes, Mapping)) or not isinstance(nodes, Sequence):
        raise ConfigError("nodes", nodes, "must be a list of Node objects or dicts")
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
    uses ``stream_first_chunk_timeout_s`` instead of the read timeout until its first
    chunk (the deadline still applies), then ``stream_stall_timeout_s`` between chunks.

    Resilience: ``breaker`` (every model; None: off), ``model_breakers`` (per model),
    ``node_breakers`` (None: off) and ``breaker_storage(name) -> CircuitBreakerStorage``;
    ``fallbacks={"model": ["next", ...]}`` and ``fallback_reply(model, payload, error)``;
    ``requests_per_minute``/``tokens_per_minute``, ``model_rate_limits={"model":
    {"requests_per_minute": ..., "tokens_per_minute": ...}}`` and
    ``rate_limiter_factory(name, rate_per_s, capacity)``; ``retry_budget_ratio`` (None:
    off), ``retry_budget_min_per_s``, ``retry_budget_ttl_s``; ``hedge_delay_s`` (seconds
    or ``"p95"``; None: off), ``hedge_max_ratio``, ``hedge_max_threads``.
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
    pool_maxsize: int = 32
    max_response_bytes: int = 16 * 1024 * 1024
    stream_first_chunk_timeout_s: float = 30.0
    stream_stall_timeout_s: float = 60.0
    default_model: Optional[str] = None
    default_region: Optional[str] = None
    verify: Union[bool, str] = True
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
    fallback_reply: Optional[Callable[..., Mapping[str, Any]]] = None
    # client-side rate limits (see ratelimit.py)
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    model_rate_limits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    rate_limiter_factory: Optional[Callable[[str, float, float], Any]] = None
    # retry budget (see retry.py); ratio None turns it off
    retry_budget_ratio: Optional[float] = 0.2
    retry_budget_min_per_s: float = 1.0
    retry_budget_ttl_s: float = 10.0
    # hedged requests (see hedging.py); off unless hedge_delay_s is set
    hedge_delay_s: Union[None, float, str] = None
    hedge_max_ratio: float = 0.05
    hedge_max_threads: int = 64
    # cost control (see pricing.py, models.py, cache.py)
    prices: Any = None  # None (defaults), {model: {"input": x, "output": y}}, a JSON path, a PriceTable
    router: Optional[ModelRouter] = None  # chooses the model of model="auto" calls (and of calls without one)
    budget: Any = None  # None, a Budget or a dict of its fields
    spend_store: Optional[SpendStore] = None  # None: in this process only
    cache: Any = None  # None, True, {"maxsize": n, "ttl_s": s} or a ResponseCache

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
        if not isinstance(self.verify, (bool, str)):
            raise ConfigError("verify", self.verify, "must be True, False or a CA bundle path")
        for node in self.nodes:
            key = node.api_key or self.api_key
            loopback = is_loopback_url(node.base_url)
            if key is None and not loopback:
                raise ConfigError(
                    "api_key", None,
                    f"node {node.id} ({node.base_url}) needs an API key: pass api_key=... "
                    f"or set the {API_KEY_ENV} environment variable",
                )
            if (key is not None and node.base_url.startswith("http://") and not loopback
                    and not self.allow_insecure_http):
                raise ConfigError(
                    f"node[{node.id}].base_url", node.base_url,
                    "would send the API key over plain http:// to a non-loopback host; "
                    "use https:// or pass allow_insecure_http=True",
                )


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
    chains: Dict[str, Tuple[str, ...]] = {}
    for model, chain in model_map("fallbacks", cfg.fallbacks).items():
        if isinstance(chain, str) or not isinstance(chain, (list, tuple)) or \
                not all(isinstance(m, str) and m for m in chain):
            raise ConfigError(f"fallbacks[{model}]", chain, "must be a list of model names")
        if model in chain:
            raise ConfigError(f"fallbacks[{model}]", chain, "a model cannot fall back to itself")
        chains[model] = tuple(chain)
    put("fallbacks", MappingProxyType(chains))
    for name in ("requests_per_minute", "tokens_per_minute"):
        _check_number(name, getattr(cfg, name), strict=True, allow_none=True)
    limits: Dict[str, Mapping[str, float]] = {}
    for model, spec in model_map("model_rate_limits", cfg.model_rate_limits).items():
        allowed = ("requests_per_minute", "tokens_per_minute")
        if not isinstance(spec, Mapping) or not spec or set(spec) - set(allowed):
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
def _check_cost_options(cfg: "ClientConfig") -> None:
    # normalised in place (the dataclass is frozen): prices -> PriceTable, budget -> Budget
    object.__setattr__(cfg, "prices", PriceTable.coerce(cfg.prices))
    object.__setattr__(cfg, "budget", Budget.coerce(cfg.budget))
    object.__setattr__(cfg, "cache", check_cache_option(cfg.cache))
    if cfg.router is not None and not isinstance(cfg.router, ModelRouter):
        raise ConfigError("router", cfg.router, "must be None or a ModelRouter")
    if cfg.spend_store is not None and not isinstance(cfg.spend_store, SpendStore):
        raise ConfigError("spend_store", cfg.spend_store, "must be None or a SpendStore")


CLIENT_OPTIONS = frozenset(f.name for f in fields(ClientConfig))


def config_from_env(environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> Dict[str, Any]:
    """Client keyword arguments from ``HOLYSHEEP_API_KEY`` and ``HOLYSHEEP_NODES``/``HOLYSHEEP_BASE_URL``."""
    env = os.environ if environ is None else environ
    kwargs: Dict[str, Any] = {}
    if env.get(API_KEY_ENV):
        kwargs["api_key"] = env[API_KEY_ENV]
    raw_nodes = env.get(NODES_ENV)
    if raw_nodes:
        try:
            kwargs["nodes"] = json.loads(raw_nodes)
        except ValueError as exc:
            # the raw value is not shown: it may hold per-node keys
            raise ConfigError(NODES_ENV, _REDACTED, f"must be a JSON list of node objects ({exc})") from None
    elif env.get(BASE_URL_ENV):
        kwargs["nodes"] = [{"id": "default", "base_url": env[BASE_URL_ENV]}]
    kwargs.update(overrides)
    return kwargs


def config_from_mapping(mapping: Mapping[str, Any]) -> Dict[str, Any]:
    """Client keyword arguments from a dict such as Django's ``settings.HOLYSHEEP``.

    Keys are the Client's keyword arguments; unknown keys are an error, not ignored.
    """
    if not isinstance(mapping, Mapping):
        raise ConfigError("mapping", mapping, "must be a dict of Client options")
    return dict(mapping)
