"""A simulated, OpenAI-compatible, multi-node gateway for demos, tests and benchmarks.

:class:`SimulatedGateway` runs one small HTTP/1.1 server per :class:`SimNode` on
``127.0.0.1`` (ephemeral ports).  Every node serves ``/v1/models``,
``/v1/chat/completions`` (incl. SSE streaming and tool calls) and
``/v1/embeddings`` (``encoding_format`` ``float`` or ``base64``) and can be
reconfigured at runtime through :meth:`SimulatedGateway.configure`.

Responses are deterministic functions of the request (not of the node), so a
request that is retried or failed over to another node produces the same text
(:func:`reply_text`), the same tool call and the same usage.  A chat request
whose last message is an assistant *prefill* is answered with the rest of the
canonical text (:func:`completion_text`), so a stream cut on one node and
continued elsewhere adds up to exactly :func:`reply_text`.

Node settings (:class:`SimNode`, per node, at start or at runtime):

* latency (constant or lognormal median/p99), ``capacity`` (max concurrent
  model requests, chat and embeddings; ``GET /models`` takes no slot, and a slot is
  given back before the answer is written; see ``max_concurrency_seen``),
  ``chunk_delay_ms`` between SSE chunks;
* seeded dice: ``error_rate`` (500/502/503), ``rate_limit_rate`` (429 with
  ``Retry-After``), ``reset_rate`` and ``malformed_rate`` (their own random
  stream: setting them leaves the seeded latency/5xx/429 sequence unchanged);
* ``fault``: ``refuse`` (ECONNREFUSED), ``hang`` (accept, never answer for
  ``hang_s``), ``reset`` (TCP RST), ``malformed`` (invalid JSON);
  ``stream_fault``: ``reset_midstream``/``stall_midstream`` after
  ``stream_fault_after_chunks``; ``hang_after_requests=N``: from the (N+1)-th
  request on, every request hangs for ``hang_s`` (holding its capacity slot);
* a provider-style prompt cache (``prompt_cache_entries`` > 0, ``_ttl_s``,
  ``_min_tokens``): the prefix is the tools and the messages before the last
  user message; a hit reports cached tokens in ``prompt_cache_usage`` form
  (OpenAI ``prompt_tokens_details.cached_tokens``, DeepSeek
  ``prompt_cache_hit_tokens``/``_miss_tokens``, Anthropic-style
  ``cache_read_input_tokens``/``cache_creation_input_tokens``) and is answered
  after ``prompt_cache_latency_factor`` x the latency;
* quotas: ``requests_per_minute`` and ``tokens_per_minute`` (prompt + answer),
  refilled continuously; every answer carries OpenAI's
  ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers and a spent
  quota answers 429 (with ``Retry-After`` unless ``quota_retry_after=False``).

Model settings (:class:`SimModel`), keyed on the model name, on every node
(``SimulatedGateway(models=...)``, ``configure(model=...)``) or on one node
(``SimNode.models``, ``configure(node_id, model=...)``), as the Failover Bench
catalogue needs them: ``context_window_tokens`` (a longer prompt gets 400
``context_length_exceeded``), ``prefill=False`` (a trailing assistant message
gets 400 "does not support assistant message prefill") and one ``fault`` that
hits the first ``fault_attempts`` requests (all when None) from
``fault_start_s`` after it was armed (start, reset_counts, configure):

=====================  ==========================================================
``rate_limit``         429, ``Retry-After: retry_after_s`` (no header when None)
``server_error``       ``fault_status`` (500 by default; 503 "overloaded")
``flap``               503 for ``fault_duration_s``, then healthy
``reset``              TCP reset before any response byte
``hang``               accepted, never answered for ``fault_duration_s``
``slow_first_token``   headers at once, the first chunk (plain: the body) after
                       ``fault_duration_s``
``stream_cut``         ``fault_after_chunks`` content chunks, then the connection
                       closes without a terminating chunk (plain: half the body)
``stream_stall``       as ``stream_cut`` but silent for ``fault_duration_s`` first
``malformed_event``    one invalid JSON event after ``fault_after_chunks`` content
                       chunks; the stream is otherwise complete (plain: invalid JSON)
``no_done``            a complete stream without ``data: [DONE]``
``error_event``        ``data: {"error": {...}}`` after ``fault_after_chunks``
                       chunks in a 200 stream (plain: a 200 error body)
``context_length``     400 ``context_length_exceeded`` (param ``messages``)
``content_policy``     400 ``content_policy_violation`` (Azure ``innererror``)
``content_filter``     200, ``finish_reason: "content_filter"`` after
                       ``fault_after_chunks`` chunks
=====================  ==========================================================

:func:`failover_bench_models` gives the catalogue's 16 scenarios as model settings.

Waits (hangs, stalls, slow first tokens) are bounded by their duration and
released by :meth:`~SimulatedGateway.configure` and :meth:`~SimulatedGateway.stop`.
Model fault windows, quotas, cache TTLs and the request log read the
gateway's ``clock`` (injectable, e.g. a fake clock in tests).

Counters: :meth:`~SimulatedGateway.counts`, ``outcomes`` (per outcome),
``attempts`` (per model and node), ``request_log`` (bounded; arrival time,
node, model, stream, prefill, outcome, status), ``cache_stats``,
``quota_stats``, ``max_concurrency_seen``; ``reset_counts`` zeroes them and
re-arms the faults.

Only the standard library and cachetools are used.  Nothing is printed and no
logging handlers are installed; diagnostics go to ``logging.getLogger(__name__)``
at DEBUG level.
"""

from __future__ import annotations

from .catalogue import failover_bench_models
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
    "failover_bench_models",
    "format_duration",
    "reply_text",
    "sample_latency_ms",
]
