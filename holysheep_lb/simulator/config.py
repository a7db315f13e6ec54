"""Configuration of the simulated gateway: :class:`SimNode`, :class:`SimModel`, validation.

A bad value raises :class:`holysheep_lb.errors.ConfigError` (also a ``ValueError``)
naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from ..errors import ConfigError

#: Model ids listed by ``GET /v1/models`` (chat accepts any model name).
MODELS: Tuple[str, ...] = (
    "deepseek-v3.2",
    "gemini-2.5-flash",
    "gpt-4.1",
    "claude-sonnet-4.5",
    "text-embedding-3-small",
)
#: Allowed values of :attr:`SimNode.fault`.
FAULTS: Tuple[Optional[str], ...] = (None, "refuse", "hang", "reset", "malformed")
#: Allowed values of :attr:`SimNode.stream_fault`.
STREAM_FAULTS: Tuple[Optional[str], ...] = (None, "reset_midstream", "stall_midstream")
#: Allowed values of :attr:`SimModel.fault` (see the package docstring for each).
MODEL_FAULTS: Tuple[Optional[str], ...] = (
    None,
    "rate_limit",
    "server_error",
    "reset",
    "hang",
    "slow_first_token",
    "stream_cut",
    "stream_stall",
    "malformed_event",
    "no_done",
    "error_event",
    "context_length",
    "content_policy",
    "content_filter",
    "flap",
)
#: Allowed values of :attr:`SimNode.prompt_cache_usage`: which usage fields report a cache hit.
CACHE_USAGE_FORMS: Tuple[str, ...] = ("openai", "deepseek", "anthropic")


@dataclass(frozen=True)
class SimModel:
    """How one model behaves, on every node or on one node (see
    :meth:`SimulatedGateway.configure`).  Immutable: configuring a model replaces
    its value, which also re-arms its fault (attempts are counted afresh and
    time-based windows start again).

    ``fault`` hits the first ``fault_attempts`` requests for the model (every
    request when None) that arrive from ``fault_start_s`` seconds after the
    fault was armed (gateway start, :meth:`SimulatedGateway.reset_counts` or the
    configure call).  ``fault_duration_s`` is the hang, the delay of the first
    chunk, the stall, or the length of a ``"flap"`` outage; ``fault_after_chunks``
    the number of content chunks sent before a stream fault."""

    fault: Optional[str] = None
    fault_attempts: Optional[int] = None
    fault_start_s: float = 0.0
    fault_duration_s: float = 30.0
    fault_after_chunks: int = 2
    fault_status: int = 500
    retry_after_s: Optional[float] = None
    context_window_tokens: Optional[int] = None
    prefill: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            _check("SimModel", f.name, getattr(self, f.name))


@dataclass
class SimNode:
    """Configuration of one simulated node.  All fields (except ``id``) may be
    changed at runtime with :meth:`SimulatedGateway.configure`.

    ``reset_rate`` and ``malformed_rate`` are the probabilities of the ``"reset"``
    and ``"malformed"`` faults per request (one roll decides both, reset first);
    they are drawn from a random stream of their own, so setting them leaves the
    latency/5xx/429 sequence of a seeded gateway unchanged.  The prompt cache
    (``prompt_cache_entries > 0``), the quotas (``requests_per_minute``,
    ``tokens_per_minute``), ``hang_after_requests`` and ``models`` draw no
    random numbers at all."""

    id: str
    region: str = "local"
    latency_ms: float = 0.0
    p99_latency_ms: Optional[float] = None
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    reset_rate: float = 0.0
    malformed_rate: float = 0.0
    retry_after_s: float = 1.0
    capacity: Optional[int] = None
    fault: Optional[str] = None
    stream_fault: Optional[str] = None
    stream_fault_after_chunks: int = 2
    hang_s: float = 30.0
    chunk_delay_ms: float = 0.0
    hang_after_requests: Optional[int] = None
    prompt_cache_entries: int = 0
    prompt_cache_ttl_s: float = 300.0
    prompt_cache_min_tokens: int = 1024
    prompt_cache_usage: str = "openai"
    prompt_cache_latency_factor: float = 0.5
    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    quota_retry_after: bool = True
    models: Dict[str, SimModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _coerce_node_field(f.name, getattr(self, f.name)))


# -- validation -------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(rule: Tuple[Callable[[Any], bool], str]) -> Tuple[Callable[[Any], bool], str]:
    test, allowed = rule
    return (lambda v: v is None or test(v)), f"None or {allowed}"


_STR = (lambda v: isinstance(v, str), "a string")
_NON_NEGATIVE = (lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
_POSITIVE = (lambda v: _is_number(v) and v > 0, "a finite number > 0")
_PROBABILITY = (lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]")
_COUNT = (lambda v: _is_int(v) and v >= 0, "an int >= 0")
_POSITIVE_INT = (lambda v: _is_int(v) and v >= 1, "an int >= 1")
_BOOL = (lambda v: isinstance(v, bool), "True or False")


def _one_of(options: Tuple[Any, ...]) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"one of {options!r}"


_RULES: Dict[str, Dict[str, Tuple[Callable[[Any], bool], str]]] = {
    "SimNode": {
        "id": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        "region": _STR,
        "latency_ms": _NON_NEGATIVE,
        "p99_latency_ms": _optional((_is_number, "a finite number")),
        "error_rate": _PROBABILITY,
        "rate_limit_rate": _PROBABILITY,
        "reset_rate": _PROBABILITY,
        "malformed_rate": _PROBABILITY,
        "retry_after_s": _NON_NEGATIVE,
        "capacity": _optional(_COUNT),
        "fault": _one_of(FAULTS),
        "stream_fault": _one_of(STREAM_FAULTS),
        "stream_fault_after_chunks": _COUNT,
        "hang_s": _NON_NEGATIVE,
        "chunk_delay_ms": _NON_NEGATIVE,
        "hang_after_requests": _optional(_COUNT),
        "prompt_cache_entries": _COUNT,
        "prompt_cache_ttl_s": _POSITIVE,
        "prompt_cache_min_tokens": _COUNT,
        "prompt_cache_usage": _one_of(CACHE_USAGE_FORMS),
        "prompt_cache_latency_factor": _NON_NEGATIVE,
        "requests_per_minute": _optional(_POSITIVE_INT),
        "tokens_per_minute": _optional(_POSITIVE_INT),
        "quota_retry_after": _BOOL,
        "models": (lambda v: isinstance(v, Mapping), "a dict of model name -> SimModel or dict"),
    },
    "SimModel": {
        "fault": _one_of(MODEL_FAULTS),
        "fault_attempts": _optional(_POSITIVE_INT),
        "fault_start_s": _NON_NEGATIVE,
        "fault_duration_s": _NON_NEGATIVE,
        "fault_after_chunks": _COUNT,
        "fault_status": (lambda v: _is_int(v) and 500 <= v <= 599, "an int in [500, 599]"),
        "retry_after_s": _optional(_NON_NEGATIVE),
        "context_window_tokens": _optional(_POSITIVE_INT),
        "prefill": _BOOL,
    },
}


def _check(owner: str, name: str, value: Any) -> None:
    rules = _RULES[owner]
    if name not in rules:
        raise ConfigError(f"{owner}.{name}", value, f"no such field; known: {', '.join(rules)}")
    test, allowed = rules[name]
    if not test(value):
        raise ConfigError(f"{owner}.{name}", value, f"must be {allowed}")


def _coerce_node_field(name: str, value: Any) -> Any:
    """The validated value of a SimNode field (``models`` values become SimModels)."""
    _check("SimNode", name, value)
    if name == "models":
        return {model: _as_model(model, spec) for model, spec in value.items()}
    return value


def _as_model(model: Any, spec: Union[SimModel, Mapping[str, Any]]) -> SimModel:
    if not isinstance(model, str) or not model:
        raise ConfigError("model", model, "must be a non-empty string")
    if isinstance(spec, SimModel):
        return spec
    if isinstance(spec, Mapping):
        _check_names("SimModel", spec)
        return SimModel(**dict(spec))
    raise ConfigError(f"models[{model!r}]", spec, "must be a SimModel or a dict of SimModel fields")


def _check_names(owner: str, changes: Mapping[str, Any]) -> None:
    """Reject unknown field names, naming them all."""
    unknown = sorted(k for k in changes if k not in _RULES[owner])
    if unknown:
        raise ConfigError(owner, unknown, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(_RULES[owner])}")


def _as_node(spec: Union[SimNode, Mapping[str, Any]]) -> SimNode:
    if isinstance(spec, SimNode):
        return spec
    if isinstance(spec, Mapping):
        _check_names("SimNode", spec)
        return SimNode(**dict(spec))
    raise TypeError(f"node spec must be a SimNode or a dict, got {type(spec).__name__}")
