"""A simulated, OpenAI-compatible, multi-node gateway for demos, tests and benchmarks.

:class:`SimulatedGateway` runs one small HTTP/1.1 server per :class:`SimNode` on
``127.0.0.1`` (ephemeral ports).  Every node serves ``/v1/models``,
``/v1/chat/completions`` (incl. SSE streaming) and ``/v1/embeddings`` and can be
reconfigured at runtime (latency, error/429 rates, capacity, fault injection)
through :meth:`SimulatedGateway.configure`.

Responses are deterministic functions of the request (not of the node), so a
request that is retried or failed over to another node produces the same text.

Only the standard library is used.  Nothing is printed and no logging handlers
are installed; diagnostics go to ``logging.getLogger(__name__)`` at DEBUG level.
"""

from __future__ import annotations

from .config import (
    CACHE_USAGE_FORMS,
    FAULTS,
    MODEL_FAULTS,
    MODELS,
    STREAM_FAULTS,
    SimModel,
    SimNode,
)
from .content import completion_text, reply_text, sample_latency_ms
from .gateway import SimulatedGateway
from .quotas import format_duration
from .requestlog import SimRequest

__all__ = [
    "CACHE_USAGE_FORMS",
    "FAULTS",
    "MODELS",
    "MODEL_FAULTS",
    "STREAM_FAULTS",
    "SimModel",
    "SimNode",
    "SimRequest",
    "SimulatedGateway",
    "completion_text",
    "format_duration",
    "reply_text",
    "sample_latency_ms",
]
