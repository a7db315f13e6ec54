"""Prometheus metrics for a :class:`~holysheep_lb.Client`, read from its own state at scrape time.

::

    from prometheus_client import REGISTRY, start_http_server
    from holysheep_lb.contrib.prometheus import HolySheepCollector

    REGISTRY.register(HolySheepCollector(client))
    start_http_server(9464)

Nothing runs on the call path and no thread is started: each scrape reads
``client.stats()``, ``client.nodes()``, ``client.breakers()``, the spend ledger's rows
and copies of the fixed-size latency histograms (each lock held for microseconds, as
``stats()`` does), then turns them into metric families with no client lock held.

Every series carries a ``client`` label (``"default"`` unless ``client_name=`` says
otherwise). For several clients in one process, give **one** collector all of them,
``HolySheepCollector({"chat": chat_client, "batch": batch_client})``: a registry refuses
a second collector with the same metric names (``DuplicateTimeseries``), since two
families of one name would make the exposition invalid.

Label values are bounded: node ids and limit names come from configuration; a model
label is a model the client is configured with (price table, ``default_model``,
fallbacks, per-model limits and breakers, the router's tiers), any other model is
counted as ``"(other models)"``; error labels are holysheep_lb's exception class names.
No prompt, user, request id or API key appears anywhere.

Counters never go down between scrapes, even where the source may: the spend ledger
forgets days older than its ``retain_days`` (their totals are kept here), and a retry
refunded to the retry budget takes one back.

Latency histograms use the OpenTelemetry GenAI boundaries (0.01 s doubling to 81.92 s)
unless ``buckets_s=`` says otherwise; they are built from the client's log-bucketed
histograms, so a sample within about 4% below a boundary may be counted under the next
one up (see :meth:`~holysheep_lb.stats.LatencyHistogram.cumulative_counts`).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("holysheep_lb.contrib.prometheus needs prometheus_client: "
                      "pip install 'holysheep-lb[prometheus]'") from exc

from .._version import __version__
from .. import errors as _errors
from ..client import Client
from ..errors import ConfigError
from ..pricing import OTHER_MODELS
from ..stats import FAILURE_KINDS, LatencyHistogram

__all__ = ["HolySheepCollector", "DURATION_BUCKETS_S", "METRICS", "families_as_json"]

#: OpenTelemetry GenAI ``gen_ai.client.operation.duration`` boundaries, in seconds.
DURATION_BUCKETS_S: Tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
                                         10.24, 20.48, 40.96, 81.92)

_BREAKER_STATES = ("closed", "open", "half_open", "unknown")
_UNUSABLE_REASONS = {"down": "down", "ejected": "ejected", "half-open trial in flight": "half_open_trial",
                     "throttled": "throttled"}
_ERROR_NAMES = frozenset(name for name in _errors.__all__ if name[:1].isupper())


@dataclass(frozen=True)
class _Spec:
    kind: str  # counter, gauge or histogram
    name: str
    help: str
    labels: Tuple[str, ...]
    unit: str = ""


def _specs() -> Tuple[_Spec, ...]:
    c, g, h = "counter", "gauge", "histogram"
    node = ("client", "node")
    return (
        _Spec(g, "holysheep_lb_info", "Always 1: the library version and routing strategy of the client.",
              ("client", "version", "strategy")),
        # calls, as the caller saw them
        _Spec(c, "holysheep_lb_calls_total", "Calls made through the client (streams count when they end).",
              ("client",)),
        _Spec(c, "holysheep_lb_call_failures_total", "Calls that raised, by holysheep_lb exception class.",
              ("client", "error")),
        _Spec(h, "holysheep_lb_call_duration_seconds",
              "Duration of successful calls, retries, failover and backoff included (streams: to the end).",
              ("client",), "seconds"),
        # nodes
        _Spec(g, "holysheep_lb_node_info", "Always 1: the region of each configured node.",
              ("client", "node", "region")),
        _Spec(c, "holysheep_lb_node_requests_total",
              "Requests sent to a node that have ended, by outcome: success, a failure kind "
              "(connect, timeout, status_5xx, status_429, status_4xx, invalid_response, local) or cancelled.",
              ("client", "node", "outcome")),
        _Spec(c, "holysheep_lb_node_retries_total", "Requests to a node that were a retry or failover of a call.",
              node),
        _Spec(g, "holysheep_lb_node_in_flight", "Requests to a node that have not ended.", node),
        _Spec(g, "holysheep_lb_node_usable", "1 if the node may get a normal request now, else 0.", node),
        _Spec(g, "holysheep_lb_node_unusable_reason",
              "1 for the reason the node is not usable now (down, ejected, half_open_trial, throttled), else 0.",
              ("client", "node", "reason")),
        _Spec(g, "holysheep_lb_node_latency_estimate_seconds",
              "The node's peak-EWMA latency estimate that routing uses.", node, "seconds"),
        _Spec(c, "holysheep_lb_node_ejections_total", "Times the node was ejected after consecutive failures.",
              node),
        _Spec(h, "holysheep_lb_node_request_duration_seconds", "Duration of successful requests to a node.",
              node, "seconds"),
        _Spec(c, "holysheep_lb_node_probes_total", "Health probes (GET /models) of a node, by outcome ok|failure.",
              ("client", "node", "outcome")),
        _Spec(c, "holysheep_lb_health_check_rounds_total", "Rounds of the health-check thread.", ("client",)),
        _Spec(c, "holysheep_lb_health_check_errors_total", "Health-check rounds that raised unexpectedly.",
              ("client",)),
        # circuit breakers
        _Spec(g, "holysheep_lb_breaker_state",
              "1 for the breaker's current state (closed, open, half_open, unknown), else 0; breakers of "
              "configured models and nodes.", ("client", "kind", "name", "state")),
        _Spec(g, "holysheep_lb_breakers", "Breakers in each state, of every model and node.", ("client", "state")),
        _Spec(c, "holysheep_lb_breaker_transitions_total", "Breaker transitions, by the state entered.",
              ("client", "state")),
        _Spec(c, "holysheep_lb_breaker_storage_errors_total", "Errors of a breaker's (shared) storage.",
              ("client",)),
        # retries and hedges
        _Spec(c, "holysheep_lb_retry_budget_retries_total", "Retries the retry budget allowed.", ("client",)),
        _Spec(c, "holysheep_lb_retry_budget_denied_total", "Retries the retry budget refused.", ("client",)),
        _Spec(g, "holysheep_lb_retry_budget_available", "Retries the budget would allow now.", ("client",)),
        _Spec(c, "holysheep_lb_hedges_sent_total", "Hedged copies sent.", ("client",)),
        _Spec(c, "holysheep_lb_hedges_won_total", "Hedged copies that answered first.", ("client",)),
        _Spec(c, "holysheep_lb_hedges_denied_total", "Hedges not sent: over the hedge or retry budget.",
              ("client",)),
        _Spec(c, "holysheep_lb_fallback_answers_total", "Calls answered by a fallback model.", ("client",)),
        _Spec(c, "holysheep_lb_fallback_canned_replies_total", "Calls answered by fallback_reply.", ("client",)),
        _Spec(c, "holysheep_lb_fallback_circuit_open_skips_total",
              "Models of a chain skipped because their breaker was open.", ("client",)),
        # streams
        _Spec(c, "holysheep_lb_streams_total", "Streams that ended, by outcome (completed, interrupted, cancelled).",
              ("client", "outcome")),
        _Spec(c, "holysheep_lb_stream_interruptions_total", "Streams that broke after their first chunk, by reason.",
              ("client", "reason")),
        _Spec(h, "holysheep_lb_stream_time_to_first_chunk_seconds",
              "Time from the start of a stream call to its first chunk.", ("client",), "seconds"),
        _Spec(h, "holysheep_lb_stream_duration_seconds", "Duration of completed streams.", ("client",), "seconds"),
        # rate limits (the client's own quota)
        _Spec(c, "holysheep_lb_rate_limit_waits_total", "Calls that waited for a client-side rate limit.",
              ("client", "limit")),
        _Spec(c, "holysheep_lb_rate_limit_wait_seconds_total", "Time calls spent waiting for a rate limit.",
              ("client", "limit"), "seconds"),
        _Spec(c, "holysheep_lb_rate_limit_rejections_total", "Calls a rate limit refused (RateLimitExceeded).",
              ("client", "limit")),
        _Spec(g, "holysheep_lb_rate_limit_available", "Requests or tokens a rate limit has left now.",
              ("client", "limit")),
        # spend (from the ledger: shared by every process when it lives in Redis)
        _Spec(c, "holysheep_lb_model_requests_total", "Paid requests per model.", ("client", "model")),
        _Spec(c, "holysheep_lb_model_cached_requests_total", "Requests per model answered from the cache.",
              ("client", "model")),
        _Spec(c, "holysheep_lb_model_tokens_total", "Tokens per model, by type input|output.",
              ("client", "model", "type")),
        _Spec(c, "holysheep_lb_model_cost_usd_total", "Spend per model in USD.", ("client", "model")),
        _Spec(g, "holysheep_lb_spend_reserved_usd", "Estimated cost of calls in flight, held against budgets.",
              ("client",)),
        # response cache
        _Spec(c, "holysheep_lb_cache_hits_total", "Calls answered from the response cache.", ("client",)),
        _Spec(c, "holysheep_lb_cache_misses_total", "Cacheable calls not found in the cache.", ("client",)),
        _Spec(g, "holysheep_lb_cache_entries", "Entries in the response cache.", ("client",)),
    )


_SPECS: Dict[str, _Spec] = {s.name: s for s in _specs()}
#: Every metric family this collector exposes, by name: (type, HELP, label names).
METRICS: Mapping[str, Tuple[str, str, Tuple[str, ...]]] = {s.name: (s.kind, s.help, s.labels) for s in _SPECS.values()}


def _family(spec: _Spec) -> Metric:
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)
    return HistogramMetricFamily(spec.name, spec.help, labels=spec.labels, unit=spec.unit)


# -- reading a client (no lock of the collector held: a shared store may do I/O) ------------


@dataclass
class _Reading:
    name: str
    stats: Dict[str, Any]
    nodes: List[Dict[str, Any]]
    breakers: List[Dict[str, Any]]
    histograms: Dict[str, Any]
    spend: Dict[Tuple[str, str], Tuple[float, ...]]  # (day, model label) -> requests, cached, in, out, usd
    reserved_usd: float
    retain_days: int


def _known_models(client: Client) -> FrozenSet[str]:
    """The models a client is configured with: the only model label values besides OTHER_MODELS."""
    cfg = client.config
    models = set(cfg.prices.models())
    models.update(m for m in (cfg.default_model,) if m)
    for model, chain in list(cfg.fallbacks.items()) + list(client.router.fallbacks.items()):
        models.add(model)
        models.update(chain)
    models.update(cfg.model_rate_limits)
    models.update(cfg.model_breakers)
    models.update(client.router.tiers.values())
    return frozenset(models)


def _read(name: str, client: Client, known_models: FrozenSet[str]) -> _Reading:
    store = client.ledger.store
    spend: Dict[Tuple[str, str], List[float]] = {}
    for row in store.rows():
        key = (row.day, row.model if row.model in known_models else OTHER_MODELS)
        sums = spend.setdefault(key, [0.0] * 5)
        values: Tuple[Union[int, Decimal], ...] = (row.requests, row.cached_requests, row.input_tokens,
                                                   row.output_tokens, row.cost_usd)
        for i, value in enumerate(values):
            sums[i] += float(value)
    reserved = store.reserved_usd()
    return _Reading(
        name=name, stats=client.stats(), nodes=client.nodes(), breakers=client.breakers(),
        histograms=client.latency_histograms(),
        spend={k: tuple(v) for k, v in spend.items()},
        reserved_usd=float(reserved) if isinstance(reserved, (int, float, Decimal)) else 0.0,
        retain_days=int(getattr(store, "retain_days", 62)),
    )


# -- counters that never go down ------------------------------------------------------------


class _SpendTotals:
    """Per-model spend totals over every day ever seen, though the ledger keeps only recent days.

    A (day, model) row is followed (its largest value kept: a shared store that falls
    back to this process's rows must not make it drop) while the ledger may still hold
    it; once its day is older than the newest day minus ``retain_days`` (and a day of
    margin) its last value moves into a per-model sum. Memory: about retain_days x models.
    """

    def __init__(self) -> None:
        self._days: Dict[Tuple[str, str], Tuple[float, ...]] = {}
        self._retired: Dict[str, Tuple[float, ...]] = {}

    def update(self, spend: Mapping[Tuple[str, str], Tuple[float, ...]],
               retain_days: int) -> Dict[str, Tuple[float, ...]]:
        for key, values in spend.items():
            previous = self._days.get(key)
            self._days[key] = values if previous is None else tuple(map(max, previous, values))
        if self._days:
            newest = _dt.date.fromisoformat(max(day for day, _ in self._days))
            cutoff = (newest - _dt.timedelta(days=retain_days + 1)).isoformat()
            for key in [k for k in self._days if k[0] < cutoff]:
                self._retired[key[1]] = _add(self._retired.get(key[1]), self._days.pop(key))
        totals = dict(self._retired)
        for (_, model), values in self._days.items():
            totals[model] = _add(totals.get(model), values)
        return totals


def _add(a: Optional[Tuple[float, ...]], b: Tuple[float, ...]) -> Tuple[float, ...]:
    return b if a is None else tuple(x + y for x, y in zip(a, b))


# -- the collector ----------------------------------------------------------------------------


class HolySheepCollector(Collector):
    """A Prometheus collector over one client (``client_name`` labels it) or a mapping of
    names to clients. Register it once: ``registry.register(HolySheepCollector(client))``.

    Thread-safe (concurrent scrapes are fine) and fork-safe. ``buckets_s`` are the latency
    histograms' upper bounds in seconds (strictly ascending). See the module docstring for
    the rules the metrics follow.
    """

    def __init__(self, clients: Union[Client, Mapping[str, Client]], *, client_name: Optional[str] = None,
                 buckets_s: Sequence[float] = DURATION_BUCKETS_S) -> None:
        if isinstance(clients, Client):
            named: Dict[str, Client] = {"default" if client_name is None else client_name: clients}
        elif isinstance(clients, Mapping) and clients:
            if client_name is not None:
                raise ConfigError("client_name", client_name,
                                  "is only for a single client; a mapping already names its clients")
            named = dict(clients)
        else:
            raise ConfigError("clients", type(clients).__name__,
                              "must be a Client or a non-empty mapping of names to Clients")
        for name, client in named.items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError("client_name", name, "must be a non-empty string")
            if not isinstance(client, Client):
                raise ConfigError(f"clients[{name}]", type(client).__name__, "must be a holysheep_lb.Client")
        bounds = tuple(buckets_s) if isinstance(buckets_s, (list, tuple)) else ()
        if not bounds or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                                 and b > 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ConfigError("buckets_s", buckets_s, "must be a non-empty list of finite seconds > 0, ascending")
        self._clients = named
        self._known_models = {name: _known_models(client) for name, client in named.items()}
        self._buckets_s = tuple(float(b) for b in bounds)
        self._bucket_labels = [_le(b) for b in self._buckets_s] + ["+Inf"]
        self._pid = os.getpid()
        self._totals_lock = threading.Lock()  # guards the two dicts below: bookkeeping only
        self._counter_floor: Dict[Tuple[str, Tuple[str, ...]], float] = {}
        self._spend = {name: _SpendTotals() for name in named}

    def __repr__(self) -> str:
        return f"<HolySheepCollector clients={sorted(self._clients)}>"

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: lets a registry refuse a colliding collector."""
        return [_family(spec) for spec in _SPECS.values()]

    def collect(self) -> Iterable[Metric]:
        if self._pid != os.getpid():
            # a child after fork: a scrape running in another thread of the parent at fork
            # time left this lock held for good
            self._pid = os.getpid()
            self._totals_lock = threading.Lock()
        readings = [_read(name, client, self._known_models[name]) for name, client in self._clients.items()]
        with self._totals_lock:  # no I/O below: the readings are taken
            families = {name: _family(spec) for name, spec in _SPECS.items()}
            for reading in readings:
                _Emitter(self, families, reading).emit()
        return list(families.values())

    def _floor(self, name: str, labels: Tuple[str, ...], value: float) -> float:
        """The counter's value, never below what it showed before (called under _totals_lock)."""
        key = (name, labels)
        shown = max(value, self._counter_floor.get(key, 0.0))
        self._counter_floor[key] = shown
        return shown


def _le(bound_s: float) -> str:
    return repr(float(bound_s))


class _Emitter:
    """Adds one client's reading to the families (runs under the collector's lock)."""

    def __init__(self, collector: HolySheepCollector, families: Dict[str, Any], reading: _Reading) -> None:
        self.c = collector
        self.families = families
        self.r = reading
        self.client = reading.name

    def put(self, name: str, labels: Sequence[str], value: Optional[float]) -> None:
        if value is None:
            return
        values = (self.client, *labels)
        if _SPECS[name].kind == "counter":
            value = self.c._floor(name, values, float(value))
        self.families[name].add_metric(list(values), float(value))

    def histogram(self, name: str, labels: Sequence[str], hist: LatencyHistogram) -> None:
        counts = hist.cumulative_counts(self.c._buckets_s) + [hist.count]
        buckets = list(zip(self.c._bucket_labels, [float(n) for n in counts]))
        self.families[name].add_metric([self.client, *labels], buckets, sum_value=hist.total_ms / 1000.0)

    def emit(self) -> None:
        stats = self.r.stats
        strategy = self.c._clients[self.client].selector.strategy
        self.put("holysheep_lb_info", [__version__, str(getattr(strategy, "name", type(strategy).__name__))], 1)
        self._calls(stats)
        self._nodes(stats)
        self._breakers(stats)
        self._resilience(stats)
        self._streams(stats)
        self._rate_limits(stats)
        self._spend()
        cache = stats.get("cache")
        if cache:
            self.put("holysheep_lb_cache_hits_total", [], cache.get("hits"))
            self.put("holysheep_lb_cache_misses_total", [], cache.get("misses"))
            self.put("holysheep_lb_cache_entries", [], cache.get("size"))

    def _calls(self, stats: Dict[str, Any]) -> None:
        self.put("holysheep_lb_calls_total", [], stats["calls"])
        by_error: Dict[str, int] = {}
        for error, n in stats["failures_by_error"].items():
            label = error if error in _ERROR_NAMES else "other"
            by_error[label] = by_error.get(label, 0) + n
        for error, n in sorted(by_error.items()):
            self.put("holysheep_lb_call_failures_total", [error], n)
        self.histogram("holysheep_lb_call_duration_seconds", [], self.r.histograms["calls"])

    def _nodes(self, stats: Dict[str, Any]) -> None:
        counters = stats["nodes"]
        for snap in self.r.nodes:
            node = snap["id"]
            self.put("holysheep_lb_node_info", [node, str(snap["region"])], 1)
            self.put("holysheep_lb_node_usable", [node], 1 if snap["usable"] else 0)
            reason = _UNUSABLE_REASONS.get(snap["reason"], "other") if snap["reason"] else None
            for name in sorted(set(_UNUSABLE_REASONS.values()) | ({reason} if reason else set())):
                self.put("holysheep_lb_node_unusable_reason", [node, name], 1 if name == reason else 0)
            self.put("holysheep_lb_node_latency_estimate_seconds", [node], snap["latency_estimate_ms"] / 1000.0)
            self.put("holysheep_lb_node_ejections_total", [node], snap["times_ejected"])
            self.put("holysheep_lb_node_probes_total", [node, "ok"], snap["probes"] - snap["probe_failures"])
            self.put("holysheep_lb_node_probes_total", [node, "failure"], snap["probe_failures"])
            entry = counters.get(node)
            if entry is not None:
                failures = entry["failures"]
                ended = entry["successes"] + sum(failures.values())
                self.put("holysheep_lb_node_requests_total", [node, "success"], entry["successes"])
                for kind in sorted(set(FAILURE_KINDS) | set(failures)):
                    self.put("holysheep_lb_node_requests_total", [node, kind], failures.get(kind, 0))
                self.put("holysheep_lb_node_requests_total", [node, "cancelled"],
                         max(0, entry["requests"] - entry["in_flight"] - ended))
                self.put("holysheep_lb_node_retries_total", [node], entry["retries"])
                self.put("holysheep_lb_node_in_flight", [node], entry["in_flight"])
            hist = self.r.histograms["nodes"].get(node)
            if hist is not None:
                self.histogram("holysheep_lb_node_request_duration_seconds", [node], hist)
        health = stats.get("health")
        if health is not None:
            self.put("holysheep_lb_health_check_rounds_total", [], health["rounds"])
            self.put("holysheep_lb_health_check_errors_total", [], health["probe_errors_raised"])

    def _breakers(self, stats: Dict[str, Any]) -> None:
        node_ids = {snap["id"] for snap in self.r.nodes}
        known = self.c._known_models[self.client]
        in_state = dict.fromkeys(_BREAKER_STATES, 0)
        for snap in self.r.breakers:
            state = str(snap.get("state")).replace("-", "_")
            state = state if state in in_state else "unknown"
            in_state[state] += 1
            kind, _, key = str(snap.get("name")).partition(":")
            if (kind == "node" and key in node_ids) or (kind == "model" and key in known):
                for name in _BREAKER_STATES:
                    self.put("holysheep_lb_breaker_state", [kind, key, name], 1 if name == state else 0)
        for state, n in in_state.items():
            self.put("holysheep_lb_breakers", [state], n)
        counts = stats["breakers"]
        for state, key in (("open", "opened"), ("half_open", "half_opened"), ("closed", "closed")):
            self.put("holysheep_lb_breaker_transitions_total", [state], counts.get(key, 0))
        self.put("holysheep_lb_breaker_storage_errors_total", [], counts.get("storage_errors", 0))

    def _resilience(self, stats: Dict[str, Any]) -> None:
        budget = stats.get("retry_budget")
        if budget is not None:
            self.put("holysheep_lb_retry_budget_retries_total", [], budget["retries"])
            self.put("holysheep_lb_retry_budget_denied_total", [], budget["denied"])
            self.put("holysheep_lb_retry_budget_available", [], budget["available"])
        hedges = stats.get("hedges")
        if hedges is not None:
            for event in ("sent", "won", "denied"):
                self.put(f"holysheep_lb_hedges_{event}_total", [], hedges.get(event))
        fallbacks = stats.get("fallbacks") or {}
        self.put("holysheep_lb_fallback_answers_total", [], fallbacks.get("fallback_answers"))
        self.put("holysheep_lb_fallback_canned_replies_total", [], fallbacks.get("canned_replies"))
        self.put("holysheep_lb_fallback_circuit_open_skips_total", [], fallbacks.get("circuit_open_skips"))

    def _streams(self, stats: Dict[str, Any]) -> None:
        streams = stats["streams"]
        for outcome in ("completed", "interrupted", "cancelled"):
            self.put("holysheep_lb_streams_total", [outcome], streams.get(outcome, 0))
        for reason, n in sorted(streams.get("interrupted_by_reason", {}).items()):
            self.put("holysheep_lb_stream_interruptions_total", [str(reason)], n)  # at most 16 reasons
        self.histogram("holysheep_lb_stream_time_to_first_chunk_seconds", [],
                       self.r.histograms["stream_first_chunk"])
        self.histogram("holysheep_lb_stream_duration_seconds", [], self.r.histograms["stream_total"])

    def _rate_limits(self, stats: Dict[str, Any]) -> None:
        for limit, snap in sorted(stats["rate_limits"].items()):
            self.put("holysheep_lb_rate_limit_waits_total", [limit], snap.get("waits"))
            self.put("holysheep_lb_rate_limit_wait_seconds_total", [limit], snap.get("waited_s"))
            self.put("holysheep_lb_rate_limit_rejections_total", [limit], snap.get("rejections"))
            self.put("holysheep_lb_rate_limit_available", [limit], snap.get("available"))

    def _spend(self) -> None:
        totals = self.c._spend[self.client].update(self.r.spend, self.r.retain_days)
        for model, (requests, cached, input_tokens, output_tokens, cost_usd) in sorted(totals.items()):
            self.put("holysheep_lb_model_requests_total", [model], requests)
            self.put("holysheep_lb_model_cached_requests_total", [model], cached)
            self.put("holysheep_lb_model_tokens_total", [model, "input"], input_tokens)
            self.put("holysheep_lb_model_tokens_total", [model, "output"], output_tokens)
            self.put("holysheep_lb_model_cost_usd_total", [model], cost_usd)
        self.put("holysheep_lb_spend_reserved_usd", [], self.r.reserved_usd)


def families_as_json(families: Iterable[Metric]) -> List[Dict[str, Any]]:
    """Metric families as plain data: name, type, help, unit and samples (for ``--json``)."""
    return [{"name": f.name, "type": f.type, "help": f.documentation, "unit": f.unit,
             "samples": [{"name": s.name, "labels": dict(s.labels), "value": s.value} for s in f.samples]}
            for f in families]
