"""OpenTelemetry spans and metrics for a :class:`~holysheep_lb.Client`, after the GenAI conventions.

::

    from holysheep_lb.contrib.otel import instrument

    instrumentation = instrument(client)          # the global tracer and meter providers
    ...
    instrumentation.uninstrument()

It is a :class:`~holysheep_lb.observe.CallObserver` added with ``client.add_observer``: it
runs on the caller's thread, after each event, never under a client lock.

**Spans.** One span per call, kind CLIENT, named ``"chat {model}"`` / ``"embeddings
{model}"`` (other operations: ``"holysheep_lb {operation}"``), carrying the GenAI attributes
(``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.*``,
``gen_ai.response.model|id|finish_reasons``, ``gen_ai.usage.input_tokens|output_tokens``),
``server.address`` / ``server.port`` of the node that answered, and on failure status
ERROR with ``error.type`` (the holysheep_lb exception class name). The usage
(``gen_ai.usage.*``, with ``cache_read.input_tokens`` / ``cache_creation.input_tokens``)
and ``holysheep_lb.cost_usd`` are what the spend ledger settled, for a JSON answer and a
stream alike: when the server reported no usage (a stream without a usage chunk, or
cut), that is the ledger's estimate, flagged ``holysheep_lb.usage.estimated``.

Every attempt is a **child span** (kind INTERNAL, ``"attempt {node id}"``) spanning its
latency: node id, server address and port, model, outcome, status code, error type,
hedge flag and ``next_step`` (the retry policy's decision after a failed attempt: "retry" or
"stop"; ``holysheep_lb.client.retries`` counts the "retry" ones). Child spans rather than span events
because hedged copies overlap in time and only spans show that; because each attempt
has its own server, status and error, which backends index as span attributes; and
because a failover then reads as a waterfall, node by node. They are INTERNAL so the
call stays the one CLIENT span per operation that GenAI dashboards count.

Decisions between attempts (fallback, hedge, cache hit, budget refusal, retry budget
exhausted, rate limited, rescue) are **span events** ``holysheep_lb.{kind}`` on the call
span, with their details as ``holysheep_lb.*`` attributes.

**Metrics** (histograms with the conventions' explicit bucket boundaries):
``gen_ai.client.operation.duration`` (s), ``gen_ai.client.token.usage`` ({token},
``gen_ai.token.type`` input|output; not for answers from the response cache, which used
no tokens), and for streams ``gen_ai.client.operation.time_to_first_chunk`` (s) and
``gen_ai.client.operation.time_per_output_chunk`` (s: one sample per stream, the mean gap
between chunks after the first, as the client reports no single chunk). The client's own
counters: ``holysheep_lb.client.attempts``, ``.retries``, ``.fallbacks``, ``.hedges``,
``.cache_hits``, ``.budget_refusals`` and ``.spend`` (USD, as settled); token usage that is
the ledger's estimate carries ``holysheep_lb.usage.estimated``. Durations come from the
client's clock, so they equal what the client measured; so does an attempt span's place
in its call (a failed attempt is reported once the retry policy has decided what follows).

**Content.** Prompts and answers are recorded only with ``record_content=True``, as
``gen_ai.input.messages`` / ``gen_ai.output.messages`` (JSON, the conventions' parts
format), together with exception messages. The API key is never recorded: no event
carries it.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from functools import lru_cache
from time import time_ns
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

try:
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("holysheep_lb.contrib.otel needs opentelemetry-api (and opentelemetry-sdk to export): "
                      "pip install 'holysheep-lb[otel]'") from exc

from .._version import __version__
from ..errors import ConfigError
from ..observe import AttemptEvent, CallEnd, CallInfo, CallObserver, Decision

__all__ = ["instrument", "Instrumentation", "OTelObserver", "DURATION_BUCKETS_S", "TOKEN_BUCKETS",
           "TIME_PER_CHUNK_BUCKETS_S", "INSTRUMENTATION_NAME"]

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "holysheep_lb"

#: ``gen_ai.client.operation.duration`` and ``...time_to_first_chunk`` boundaries, seconds.
DURATION_BUCKETS_S: Tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
                                         10.24, 20.48, 40.96, 81.92)
#: ``gen_ai.client.token.usage`` boundaries, tokens (powers of 4).
TOKEN_BUCKETS: Tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                                  16777216, 67108864)
#: ``gen_ai.client.operation.time_per_output_chunk`` boundaries, seconds.
TIME_PER_CHUNK_BUCKETS_S: Tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                                               1.0, 2.5)

_GENAI_OPERATIONS = frozenset({"chat", "embeddings"})
_BUDGET_DECISIONS = frozenset({"budget_refused", "retry_budget_exhausted"})
_NOT_FAILURES = frozenset({"ok", "cancelled"})  # a losing hedge is cancelled, not failed
_MAX_DETAIL_CHARS = 256

# request parameter -> (attribute, accepted type)
_FLOAT_PARAMS = {"temperature": "gen_ai.request.temperature", "top_p": "gen_ai.request.top_p",
                 "frequency_penalty": "gen_ai.request.frequency_penalty",
                 "presence_penalty": "gen_ai.request.presence_penalty"}
_INT_PARAMS = {"max_tokens": "gen_ai.request.max_tokens", "max_completion_tokens": "gen_ai.request.max_tokens",
               "seed": "gen_ai.request.seed", "n": "gen_ai.request.choice.count",
               "dimensions": "gen_ai.embeddings.dimension.count"}

AttributeValue = Union[str, bool, int, float, Sequence[str]]


@lru_cache(maxsize=256)  # base URLs come from the client's configuration: a handful
def server_of(base_url: Optional[str]) -> Tuple[Tuple[str, AttributeValue], ...]:
    """``server.address`` and ``server.port`` of a node's base URL (the scheme's port when
    none is given); nothing for a URL without a host."""
    if not base_url:
        return ()
    try:
        parts = urlsplit(base_url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return ()
    if not host:
        return ()
    if port is None:
        port = {"https": 443, "http": 80}.get(parts.scheme)
    return (("server.address", host),) + ((("server.port", port),) if port is not None else ())


def request_attributes(params: Mapping[str, Any]) -> Dict[str, AttributeValue]:
    """The ``gen_ai.request.*`` attributes of a call's parameters (values of the wrong type are left out)."""
    attrs: Dict[str, AttributeValue] = {}
    for name, value in params.items():
        if isinstance(value, bool):
            continue
        if name in _FLOAT_PARAMS and isinstance(value, (int, float)):
            attrs[_FLOAT_PARAMS[name]] = float(value)
        elif name in _INT_PARAMS and isinstance(value, int):
            attrs[_INT_PARAMS[name]] = value
        elif name == "stop":
            stops = [value] if isinstance(value, str) else value
            if isinstance(stops, (list, tuple)) and all(isinstance(s, str) for s in stops):
                attrs["gen_ai.request.stop_sequences"] = list(stops)
        elif name == "encoding_format" and isinstance(value, str):
            attrs["gen_ai.request.encoding_formats"] = [value]
    if attrs.get("gen_ai.request.choice.count") == 1:
        del attrs["gen_ai.request.choice.count"]  # the conventions: set it only when not 1
    return attrs


def _detail_value(value: Any) -> AttributeValue:
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v[:_MAX_DETAIL_CHARS] for v in value]
    return str(value)[:_MAX_DETAIL_CHARS]


def _parts(content: Any) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: List[Dict[str, Any]] = []
    if isinstance(content, (list, tuple)):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append({"type": "text", "content": part["text"]})
            elif isinstance(part, Mapping):
                parts.append({"type": str(part.get("type", "unknown"))})  # no images or audio bytes
    return parts


def _message(message: Mapping[str, Any], finish_reason: Optional[str] = None) -> Dict[str, Any]:
    """One message in the conventions' parts format."""
    role = str(message.get("role", "user"))
    parts = _parts(message.get("content"))
    for call in message.get("tool_calls") or ():
        if isinstance(call, Mapping):
            function = call.get("function")
            if not isinstance(function, Mapping):
                function = {}
            parts.append({"type": "tool_call", "id": call.get("id"), "name": function.get("name"),
                          "arguments": function.get("arguments")})
    if role == "tool":
        parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"),
                  "response": message.get("content")}]
    out: Dict[str, Any] = {"role": role, "parts": parts}
    if finish_reason is not None:
        out["finish_reason"] = finish_reason
    return out


def input_messages(messages: Optional[Sequence[Mapping[str, Any]]]) -> Optional[str]:
    """``gen_ai.input.messages``: the prompt as JSON, or None when there is none."""
    if not messages:
        return None
    return json.dumps([_message(m) for m in messages if isinstance(m, Mapping)], ensure_ascii=False,
                      default=str)


def output_messages(result: Any) -> Optional[str]:
    """``gen_ai.output.messages``: a chat answer (or a stream's text) as JSON, or None."""
    choices = result.get("choices") if isinstance(result, Mapping) else None
    if isinstance(choices, list):
        out = [_message(c.get("message") or {}, c.get("finish_reason")) for c in choices if isinstance(c, Mapping)]
    elif isinstance(getattr(result, "text", None), str):  # a stream: its text so far
        out = [_message({"role": "assistant", "content": result.text}, getattr(result, "finish_reason", None))]
    else:
        return None
    return json.dumps(out, ensure_ascii=False, default=str)


def usage_attributes(end: CallEnd) -> Dict[str, AttributeValue]:
    """The span's usage and cost attributes, for a JSON answer and a stream alike: the tokens
    and cost the spend ledger settled (``holysheep_lb.usage.estimated`` when they are its
    estimate: the server reported no usage), cached tokens as the conventions name them."""
    attrs: Dict[str, AttributeValue] = {}
    if end.input_tokens is not None:
        attrs["gen_ai.usage.input_tokens"] = end.input_tokens
    if end.output_tokens is not None:
        attrs["gen_ai.usage.output_tokens"] = end.output_tokens
    if end.cached_input_tokens:
        attrs["gen_ai.usage.cache_read.input_tokens"] = end.cached_input_tokens
    if end.cache_write_tokens:
        attrs["gen_ai.usage.cache_creation.input_tokens"] = end.cache_write_tokens
    if end.usage_estimated:
        attrs["holysheep_lb.usage.estimated"] = True
    if end.cost_usd is not None:
        attrs["holysheep_lb.cost_usd"] = end.cost_usd
    return attrs


class _CallState:
    """What the observer keeps for one call between its events (in ``CallInfo.state``).

    It stays there after the call ended: a hedged copy that loses may report its attempt
    later, from its own thread, and still becomes a child span of the call."""

    __slots__ = ("span", "base", "started_ns", "attempts", "node_urls", "first_chunk_at", "ended", "lock")

    def __init__(self, span: Span, base: Dict[str, AttributeValue], started_ns: int) -> None:
        self.span = span
        self.base = base                 # the metric attributes known at the start
        self.started_ns = started_ns     # the span's start time (CallInfo.started_at on the client's clock)
        self.attempts = 0
        self.node_urls: Dict[str, str] = {}  # node id -> base URL, from the attempts (one per node tried)
        self.first_chunk_at: Optional[float] = None
        self.ended = False
        self.lock = threading.Lock()     # guards the above: hedged copies report from their threads

    def count_attempt(self, node_id: str, base_url: str) -> None:
        with self.lock:
            self.attempts += 1
            self.node_urls[node_id] = base_url

    def answering_url(self, end: CallEnd) -> Optional[str]:
        """The answering node's URL: the event's, else that of the attempt on its node."""
        if end.base_url or not end.node_id:
            return end.base_url
        with self.lock:
            return self.node_urls.get(end.node_id)

    def end(self) -> bool:
        """True the first time only: a call's span ends once."""
        with self.lock:
            first, self.ended = not self.ended, True
            return first


class OTelObserver(CallObserver):
    """Turns a client's call events into spans and metrics. Thread-safe; built by :func:`instrument`."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None, *, record_content: bool = False,
                 provider_name: str = "holysheep") -> None:
        if not isinstance(record_content, bool):
            raise ConfigError("record_content", record_content, "must be True or False")
        if not isinstance(provider_name, str) or not provider_name.strip():
            raise ConfigError("provider_name", provider_name, "must be a non-empty string (gen_ai.provider.name)")
        self.record_content = record_content
        self.provider_name = provider_name
        self.enabled = True              # False after uninstrument(): calls in flight still end their spans
        self._key = f"{__name__}:{id(self)}"  # this observer's entry in CallInfo.state
        self._tracer = _trace.get_tracer(INSTRUMENTATION_NAME, __version__, tracer_provider=tracer_provider)
        meter = _metrics.get_meter(INSTRUMENTATION_NAME, __version__, meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._ttfc = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time from the start of a streaming call to its first chunk.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self._tpoc = meter.create_histogram(
            "gen_ai.client.operation.time_per_output_chunk", unit="s",
            description="Mean time between the chunks of a stream after the first (one sample per stream).",
            explicit_bucket_boundaries_advisory=TIME_PER_CHUNK_BUCKETS_S)
        self._attempts = meter.create_counter(
            "holysheep_lb.client.attempts", unit="{attempt}", description="Attempts sent to a node, by outcome.")
        self._retries = meter.create_counter(
            "holysheep_lb.client.retries", unit="{retry}", description="Attempts after which the call retried.")
        self._fallbacks = meter.create_counter(
            "holysheep_lb.client.fallbacks", unit="{fallback}", description="Calls moved on to a fallback model.")
        self._hedges = meter.create_counter(
            "holysheep_lb.client.hedges", unit="{hedge}", description="Hedged copies sent.")
        self._cache_hits = meter.create_counter(
            "holysheep_lb.client.cache_hits", unit="{hit}", description="Calls answered from the response cache.")
        self._budget_refusals = meter.create_counter(
            "holysheep_lb.client.budget_refusals", unit="{refusal}",
            description="Spend budget or retry budget refusals, by kind.")
        self._spend = meter.create_counter(
            "holysheep_lb.client.spend", unit="USD", description="Spend of answered calls, by model.")

    def __repr__(self) -> str:
        return f"OTelObserver(provider_name={self.provider_name!r}, record_content={self.record_content})"

    # -- events ------------------------------------------------------------------------------------

    def call_started(self, call: CallInfo) -> None:
        if not self.enabled:
            return
        operation, model = call.operation, call.model
        genai = operation in _GENAI_OPERATIONS
        base: Dict[str, AttributeValue] = {}
        if genai:
            base["gen_ai.operation.name"] = operation
            base["gen_ai.provider.name"] = self.provider_name
            if model:
                base["gen_ai.request.model"] = model
        attrs: Dict[str, AttributeValue] = dict(base)
        if not genai:
            attrs["holysheep_lb.operation"] = operation
        attrs.update(request_attributes(call.params))
        if call.stream:
            attrs["holysheep_lb.stream"] = True
        if call.region:
            attrs["holysheep_lb.region"] = call.region
        if self.record_content:
            prompt = input_messages(call.messages)
            if prompt is not None:
                attrs["gen_ai.input.messages"] = prompt
        name = (f"{operation} {model}" if model else operation) if genai else f"holysheep_lb {operation}"
        started_ns = time_ns()
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs, start_time=started_ns)
        call.state[self._key] = _CallState(span, base, started_ns)

    def attempt_ended(self, call: CallInfo, attempt: AttemptEvent) -> None:
        state = call.state.get(self._key)
        if not isinstance(state, _CallState):
            return  # the call started before this observer was added
        state.count_attempt(attempt.node_id, attempt.base_url)
        attrs: Dict[str, AttributeValue] = {"holysheep_lb.node.id": attempt.node_id,
                                            "holysheep_lb.attempt.outcome": attempt.outcome,
                                            "holysheep_lb.attempt.latency_s": attempt.latency_s,
                                            "holysheep_lb.attempt.hedge": attempt.hedge,
                                            "gen_ai.request.model": attempt.model}
        attrs.update(server_of(attempt.base_url))
        if attempt.status_code is not None:
            attrs["http.response.status_code"] = attempt.status_code
        if attempt.error_type:
            attrs["error.type"] = attempt.error_type
        if attempt.next_step:
            attrs["holysheep_lb.attempt.next_step"] = attempt.next_step
        if attempt.ended_at and call.started_at:  # on the client's clock: a failure is told after the policy decided
            end_ns = state.started_ns + int(round((attempt.ended_at - call.started_at) * 1e9))
        else:
            end_ns = time_ns()
        span = self._tracer.start_span(f"attempt {attempt.node_id}", context=_trace.set_span_in_context(state.span),
                                       kind=SpanKind.INTERNAL, attributes=attrs,
                                       start_time=end_ns - int(max(0.0, attempt.latency_s) * 1e9))
        if attempt.outcome not in _NOT_FAILURES:
            span.set_status(Status(StatusCode.ERROR, attempt.error_type or attempt.outcome))
        span.end(end_time=end_ns)
        self._attempts.add(1, {"holysheep_lb.node.id": attempt.node_id,
                               "holysheep_lb.attempt.outcome": attempt.outcome, **state.base})
        if attempt.next_step == "retry":
            self._retries.add(1, {"holysheep_lb.node.id": attempt.node_id, **state.base})

    def decided(self, call: CallInfo, decision: Decision) -> None:
        state = call.state.get(self._key)
        if not isinstance(state, _CallState):
            return
        kind = decision.kind
        if not state.ended:  # an ended span takes no more events
            attrs = {f"holysheep_lb.{key}": _detail_value(value) for key, value in decision.detail.items()
                     if isinstance(key, str)}
            state.span.add_event(f"holysheep_lb.{kind}", attributes=attrs)
        if kind == "fallback":
            self._fallbacks.add(1, state.base)
        elif kind == "hedge":
            self._hedges.add(1, state.base)
        elif kind == "cache_hit":
            self._cache_hits.add(1, state.base)
        elif kind in _BUDGET_DECISIONS:
            self._budget_refusals.add(1, {"holysheep_lb.decision": kind, **state.base})

    def first_chunk(self, call: CallInfo, at: float) -> None:
        state = call.state.get(self._key)
        if isinstance(state, _CallState) and state.first_chunk_at is None:
            state.first_chunk_at = at

    def call_ended(self, call: CallInfo, end: CallEnd) -> None:
        state = call.state.get(self._key)
        if not isinstance(state, _CallState) or not state.end():
            return
        span, metric_attrs = state.span, dict(state.base)
        try:
            attrs = self._end_attributes(state, end)
            if "gen_ai.operation.name" in state.base:
                for key in ("gen_ai.response.model", "server.address", "server.port", "error.type"):
                    if key in attrs:
                        metric_attrs[key] = attrs[key]
            span.set_attributes(attrs)
            if end.error is not None:
                span.set_status(Status(StatusCode.ERROR, type(end.error).__name__))
                if self.record_content:  # an error's message may quote the prompt or the answer
                    span.record_exception(end.error)
            self._record_metrics(call, state, end, metric_attrs)
        finally:
            span.end()

    # -- helpers -----------------------------------------------------------------------------------

    def _end_attributes(self, state: _CallState, end: CallEnd) -> Dict[str, AttributeValue]:
        attrs: Dict[str, AttributeValue] = {"holysheep_lb.attempts": state.attempts}
        attrs.update(server_of(state.answering_url(end)))
        if end.node_id:
            attrs["holysheep_lb.node.id"] = end.node_id
        if end.response_model:
            attrs["gen_ai.response.model"] = end.response_model
        if end.response_id:
            attrs["gen_ai.response.id"] = end.response_id
        if end.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = list(end.finish_reasons)
        attrs.update(usage_attributes(end))
        if end.cached:
            attrs["holysheep_lb.cached"] = True
        if end.chunks:
            attrs["holysheep_lb.stream.chunks"] = end.chunks
        if end.error is not None:
            attrs["error.type"] = type(end.error).__name__
        elif self.record_content:
            answer = output_messages(end.result)
            if answer is not None:
                attrs["gen_ai.output.messages"] = answer
        return attrs

    def _record_metrics(self, call: CallInfo, state: _CallState, end: CallEnd,
                        attrs: Dict[str, AttributeValue]) -> None:
        if end.cost_usd:  # what the ledger settled, a stream that broke or was closed early included
            model = end.response_model or call.model
            self._spend.add(end.cost_usd, {"gen_ai.response.model": model} if model else {})
        if "gen_ai.operation.name" not in attrs:
            return  # GenAI metrics describe GenAI operations only (not GET /models)
        if end.ended_at and call.started_at:
            self._duration.record(max(0.0, end.ended_at - call.started_at), attrs)
        if not end.cached:  # an answer from the response cache used no tokens
            tokens = {**attrs, "holysheep_lb.usage.estimated": True} if end.usage_estimated else attrs
            if end.input_tokens is not None:
                self._tokens.record(end.input_tokens, {**tokens, "gen_ai.token.type": "input"})
            if end.output_tokens is not None:
                self._tokens.record(end.output_tokens, {**tokens, "gen_ai.token.type": "output"})
        first = state.first_chunk_at
        if call.stream and first is not None and call.started_at:
            self._ttfc.record(max(0.0, first - call.started_at), attrs)
            if end.chunks > 1 and end.ended_at:
                self._tpoc.record(max(0.0, end.ended_at - first) / (end.chunks - 1), attrs)


class Instrumentation:
    """What :func:`instrument` returns: the observer it added, and :meth:`uninstrument`."""

    def __init__(self, client: Any, observer: OTelObserver) -> None:
        self.client = client
        self.observer = observer
        self._lock = threading.Lock()

    @property
    def instrumented(self) -> bool:
        return self.observer.enabled

    def uninstrument(self) -> None:
        """Stop tracing new calls (idempotent); calls in flight still end their spans."""
        with self._lock:
            if not self.observer.enabled:
                return
            self.observer.enabled = False
        with _INSTRUMENTED_LOCK:
            _INSTRUMENTED.discard(self.client)
        remove = getattr(self.client, "remove_observer", None)
        if callable(remove):
            remove(self.observer)

    def __repr__(self) -> str:
        return f"Instrumentation(instrumented={self.instrumented}, observer={self.observer!r})"


_INSTRUMENTED: "weakref.WeakSet[Any]" = weakref.WeakSet()  # one instrumentation at a time per client
_INSTRUMENTED_LOCK = threading.Lock()


def instrument(client: Any, tracer_provider: Any = None, meter_provider: Any = None, *,
               record_content: bool = False, provider_name: str = "holysheep") -> Instrumentation:
    """Trace and measure every call of ``client`` with OpenTelemetry (global providers when None).

    ``record_content=True`` records prompts, answers and exception messages on the spans
    (off by default: they may hold personal data). ``provider_name`` is the
    ``gen_ai.provider.name`` value. Raises TypeError for a client that takes no observers,
    ConfigError for a bad option, and ValueError if ``client`` is already instrumented.
    """
    add = getattr(client, "add_observer", None)
    if not callable(add):
        raise TypeError(f"{type(client).__name__} takes no call observers (no add_observer method): "
                        "this holysheep_lb Client cannot be instrumented")
    observer = OTelObserver(tracer_provider, meter_provider, record_content=record_content,
                            provider_name=provider_name)
    with _INSTRUMENTED_LOCK:
        if client in _INSTRUMENTED:
            raise ValueError("this client is already instrumented: call uninstrument() on its "
                             "Instrumentation first")
        _INSTRUMENTED.add(client)
    try:
        add(observer)
    except BaseException:
        with _INSTRUMENTED_LOCK:
            _INSTRUMENTED.discard(client)
        raise
    return Instrumentation(client, observer)
