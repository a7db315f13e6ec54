"""Node configuration of the simulated gateway: :class:`SimNode` and its validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Tuple, Union

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



@dataclass
class SimNode:
    """Configuration of one simulated node.  All fields (except ``id``) may be
    changed at runtime with :meth:`SimulatedGateway.configure`.

    ``reset_rate`` and ``malformed_rate`` are the probabilities of the ``"reset"``
    and ``"malformed"`` faults per request (one roll decides both, reset first);
    they are drawn from a random stream of their own, so setting them leaves the
    latency/5xx/429 sequence of a seeded gateway unchanged."""

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

    def __post_init__(self) -> None:
        for f in fields(self):
            _validate_field(f.name, getattr(self, f.name))


_FIELD_NAMES = tuple(f.name for f in fields(SimNode))


def _validate_field(name: str, value: Any) -> None:
    if name == "id":
        if not isinstance(value, str) or not value:
            raise ValueError("SimNode.id must be a non-empty string")
    elif name == "region":
        if not isinstance(value, str):
            raise ValueError("SimNode.region must be a string")
    elif name == "fault":
        if value not in FAULTS:
            raise ValueError(f"SimNode.fault must be one of {FAULTS!r}, got {value!r}")
    elif name == "stream_fault":
        if value not in STREAM_FAULTS:
            raise ValueError(f"SimNode.stream_fault must be one of {STREAM_FAULTS!r}, got {value!r}")
    elif name == "capacity":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"SimNode.capacity must be None or an int >= 0, got {value!r}")
    elif name == "stream_fault_after_chunks":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"SimNode.stream_fault_after_chunks must be an int >= 0, got {value!r}")
    elif name == "p99_latency_ms":
        if value is not None and not _is_number(value):
            raise ValueError(f"SimNode.p99_latency_ms must be None or a number, got {value!r}")
    elif name in ("latency_ms", "retry_after_s", "hang_s", "chunk_delay_ms"):
        if not _is_number(value) or value < 0:
            raise ValueError(f"SimNode.{name} must be a number >= 0, got {value!r}")
    elif name in ("error_rate", "rate_limit_rate", "reset_rate", "malformed_rate"):
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"SimNode.{name} must be a number in [0, 1], got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_node(spec: Union[SimNode, Mapping[str, Any]]) -> SimNode:
    if isinstance(spec, SimNode):
        return spec
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown SimNode field(s): {', '.join(unknown)}")
        return SimNode(**dict(spec))
    raise TypeError(f"node spec must be a SimNode or a dict, got {type(spec).__name__}")
