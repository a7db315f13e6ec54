"""``Client``: the blocking, thread-safe entry point. It orchestrates; it does not compute.

One call::

    validate arguments (nothing bad reaches the network)
    model chain (fallbacks.py): the model's breaker, rate limits, then its fallbacks
    attempt loop, one deadline for all attempts:
        node = selector.pick(exclude=tried)      lock held for microseconds
        result = node.transport.send(...)        no lock held
        success -> selector.release_success, return Response
        final error (400/401/403/404/422) -> raise it at once
        retryable -> selector.release_failure, back off (full jitter), next node
        a retry spends the retry budget; a slow attempt may be hedged (hedging.py)
    every attempt failed -> AllAttemptsFailedError listing each attempt

Share one Client between all threads of a process. It survives ``os.fork()``: the
child gets fresh sessions and locks, and starts its own health thread on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import __version__
from .affinity import AffinityRouter, call_affinity  # prompt-cache affinity (issue #14)
from .batch import BatchResult, run_batch
from .breakers import BreakerBoard, stream_outcome_hook
from .breakers import wall_clock as breaker_wall_clock
from .cache import cache_key, credentials_fingerprint, make_cache
from .cleanup import discard
from .config import (
    CLIENT_OPTIONS,
    ClientConfig,
    config_from_env,
    config_from_mapping,
    parse_nodes,
    API_KEY_ENV,
)
from .costs import CallCosts, StreamCosts, cost_info
from .errors import (
    APIError,
    APITimeoutError,
    AllAttemptsFailedError,
    Attempt,
    BudgetExceededError,
    CircuitOpenError,
    HolySheepError,
    InvalidRequestError,
    NoHealthyNodeError,
    RateLimitError,
)
from .fallbacks import ModelChain, ModelCosts
from .health import HealthChecker
from .hedging import Hedger
from .models import AUTO, ModelRouter
from .nodes import EjectionPolicy, NodeState
from .pricing import Reservation, SpendLedger
from .ratelimit import RateLimits
from .response import Response
from .retry import RETRY_BUDGET_EXHAUSTED, RetryBudget, RetryPolicy
from .selection import Selector, make_strategy
from .stats import LatencyHistogram, failure_kind
from .suggest import unknown_option
from .streaming import STREAM_HEADERS, CannedStream, ChatStream, OpenedStream, StreamOutcome, StreamReaper, StreamStats, open_stream
from .transport import Transport
from .validation import check_count, check_deadline_s, check_json_value

__all__ = ["Client"]

log = logging.getLogger(__name__)

_LIVE_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()

# A model name keys breakers, rate limits and spend rows, in Redis too: bounded and printable.
MAX_MODEL_NAME_CHARS = 256
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _after_fork_in_child() -> None:
    for client in list(_LIVE_CLIENTS):
        client._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Completions:
    def __init__(self, client: "Client") -> None:
        self._client = client

    def create(self, *, model: Optional[str] = None, messages: Sequence[Mapping[str, Any]],
               **params: Any) -> Any:
        """OpenAI-style alias of :meth:`Client.chat_completion`."""
        return self._client.chat_completion(messages, model=model, **params)


class _Chat:
    def __init__(self, client: "Client") -> None:
        self.completions = _Completions(client)


class Client:
    """Spreads OpenAI-compatible calls over several gateway nodes and fails over.

    Blocking and thread-safe: create one per process and share it. Use it as a context
    manager, or call :meth:`close` (idempotent) at shutdown.

    ``api_key`` defaults to ``$HOLYSHEEP_API_KEY``; ``nodes`` (``Node`` objects or dicts)
    defaults to the public endpoint ``https://api.holysheep.ai/v1``. Every other option
    is a keyword argument documented on :class:`~holysheep_lb.config.ClientConfig`
    (``strategy``, ``connect_timeout_s``, ``read_timeout_s``, ``deadline_s``,
    ``max_retries``, ``pool_maxsize``, ...). ``clock``, ``sleep``, ``rand`` and
    ``wall_clock`` (epoch seconds: which UTC day spend is counted on) exist for tests.
    """

    def __init__(
        self,
        api_key: Optional[str] = None,
        nodes: Optional[Sequence[Any]] = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Optional[Callable[[], float]] = None,
        wall_clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - CLIENT_OPTIONS - {"nodes", "api_key"})
        if unknown:  # by name only: the value of a misspelt api_key is the key
            raise unknown_option(None, unknown[0], CLIENT_OPTIONS, what="Client option",
                                 reference="see help(holysheep_lb.ClientConfig) for every option")
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        self.config = ClientConfig(nodes=parse_nodes(nodes), api_key=api_key, **options)
        cfg = self.config
        self._clock = clock
        self._sleep = sleep
        import random as _random
        self._rand = rand or _random.Random().random
        self._retry = RetryPolicy(cfg.max_retries, cfg.backoff_base_s, cfg.backoff_cap_s,
                                  cfg.retry_after_cap_s)
        self._timeouts = (cfg.connect_timeout_s, cfg.read_timeout_s)
        states = [
            NodeState(node, Transport(node, api_key=cfg.api_key, pool_maxsize=cfg.pool_maxsize,
                                      max_response_bytes=cfg.max_response_bytes, verify=cfg.verify,
                                      allow_insecure_http=cfg.allow_insecure_http))
            for node in cfg.nodes
        ]
        strategy = make_strategy(cfg.strategy)
        if getattr(strategy, "default_region", "missing") is None and cfg.default_region:
            strategy.default_region = cfg.default_region  # type: ignore[attr-defined]
        self._selector = Selector(
            states, strategy,
            ejection=EjectionPolicy(cfg.eject_after_failures, cfg.ejection_base_s,
                                    cfg.ejection_max_s, slow_start_s=cfg.slow_start_s),
            panic_threshold=cfg.panic_threshold, clock=clock, rand=self._rand,
            affinity=AffinityRouter([s.id for s in states], cfg.affinity),  # prompt-cache affinity (issue #14)
        )
        self._breakers = BreakerBoard(model_settings=cfg.breaker, per_model=cfg.model_breakers,
                                      node_settings=cfg.node_breakers, storage_factory=cfg.breaker_storage,
                                      clock=breaker_wall_clock(clock))
        limits = RateLimits(requests_per_minute=cfg.requests_per_minute, tokens_per_minute=cfg.tokens_per_minute,
                            per_model=cfg.model_rate_limits, factory=cfg.rate_limiter_factory, clock=clock)
        self._chain = ModelChain(breakers=self._breakers, limits=limits, fallbacks=cfg.fallbacks,
                                 fallback_reply=cfg.fallback_reply, clock=clock)
        self._retry_budget: Optional[RetryBudget] = None
        if cfg.retry_budget_ratio is not None:
            self._retry_budget = RetryBudget(cfg.retry_budget_ratio, min_per_s=cfg.retry_budget_min_per_s,
                                             ttl_s=cfg.retry_budget_ttl_s, clock=clock)
        self._hedger: Optional[Hedger] = None
        if cfg.hedge_delay_s is not None:
            self._hedger = Hedger(delay_s=cfg.hedge_delay_s, selector=self._selector,
                                  max_ratio=cfg.hedge_max_ratio, max_threads=cfg.hedge_max_threads,
                                  retry_budget=self._retry_budget, clock=clock)
        self._stats_lock = threading.Lock()
        self._calls = 0
        self._call_successes = 0
        self._call_failures: Dict[str, int] = {}
        self._call_latency = LatencyHistogram()
        self._stream_stats = StreamStats()
        self._stream_reaper = StreamReaper(clock)
        self._closed = False
        self._pid = os.getpid()
        self._health: Optional[HealthChecker] = None
        if cfg.health_check_interval_s is not None:
            self._health = HealthChecker(
                self._selector, interval_s=cfg.health_check_interval_s,
                timeout_s=cfg.health_check_timeout_s,
                unhealthy_threshold=cfg.unhealthy_threshold,
                healthy_threshold=cfg.healthy_threshold, clock=clock, rand=self._rand,
            )
            self._health.start()
            # A client dropped without close() must not leave its thread probing forever
            # (the thread holds the selector, never the client).
            weakref.finalize(self, self._health.stop, 0.0)
        self._router = cfg.router or ModelRouter(fallbacks=cfg.fallbacks)
        # Models whose breaker is open are skipped, unless the router brings its own
        # check. The router itself is never rewired: one may be shared by many clients.
        self._model_available: Callable[[str], bool] = (
            self.breaker_allows if self._router.uses_default_availability else self._router.is_available)
        self._ledger = SpendLedger(cfg.prices, store=cfg.spend_store, budget=cfg.budget, wall_clock=wall_clock)
        self._cache = make_cache(cfg.cache, timer=clock)
        # a cache shared by several clients answers only the ones sending the same credentials
        self._cache_scope = credentials_fingerprint(cfg.nodes, cfg.api_key)
        self.chat = _Chat(self)
        _LIVE_CLIENTS.add(self)

    # -- construction helpers ---------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Client":
        """Build from ``HOLYSHEEP_API_KEY`` and ``HOLYSHEEP_NODES`` (JSON) or ``HOLYSHEEP_BASE_URL``."""
        return cls(**config_from_env(environ, **overrides))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], **overrides: Any) -> "Client":
        """Build from a dict of Client options, e.g. Django's ``settings.HOLYSHEEP``."""
        kwargs = config_from_mapping(mapping)
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        nodes = ", ".join(n.id for n in self._selector.nodes)
        name = getattr(self._selector.strategy, "name", type(self._selector.strategy).__name__)
        return f"<holysheep_lb.Client {state} nodes=[{nodes}] strategy={name} version={__version__}>"

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the health thread and close every connection. Idempotent.

        Calls in flight finish the attempt they are making, start no other (they fail
        with a typed error saying the client was closed) and open no connection; their
        sockets close as they end.
        """
        if self._closed:
            return
        self._closed = True
        self._stream_reaper.reap()
        if self._health is not None:
            self._health.stop()
        for node in self._selector.nodes:
            node.transport.close()
        _LIVE_CLIENTS.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def _reset_after_fork(self) -> None:
        self._pid = os.getpid()
        self._stats_lock = threading.Lock()
        self._selector.reset_lock_after_fork()
        for node in self._selector.nodes:
            node.in_flight = 0  # the parent's calls do not exist in this process
            node.awaiting = 0
            node.awaiting_started_sum = 0.0
            node.end_trial()
            node.transport.reset_after_fork()
        self._chain.reset_after_fork()
        for part in (self._retry_budget, self._hedger):
            if part is not None:
                part.reset_after_fork()
        if self._health is not None:
            self._health.reset_after_fork()
        self._ledger.reset_after_fork()
        if self._cache is not None:
            self._cache.reset_after_fork()
        self._stream_stats.reset_after_fork()

    def _ensure_running(self) -> None:
        if self._closed:
            raise HolySheepError("this Client is closed")
        self._stream_reaper.reap()  # streams dropped without close() since the last call
        health = self._health
        if health is not None and not health.running:
            health.start()  # lazily, e.g. in a child after fork

    # -- public calls ---------------------------------------------------------------------

    def chat_completion(
        self,
        messages: Sequence[Mapping[str, Any]],
        model: Optional[str] = None,
        *,
        region: Optional[str] = None,
        deadline_s: Optional[float] = None,
        idempotency_key: Optional[str] = None,
        cache: Optional[bool] = None,
        affinity_key: Optional[str] = None,
        **params: Any,
    ) -> Union[Response, ChatStream, CannedStream]:
        """``POST /chat/completions``; returns the decoded JSON with routing metadata.

        Blocks until an answer or a typed error. ``params`` (temperature, max_tokens, ...)
        are sent as they are. ``region`` steers the geographic strategy.
        ``model="auto"`` lets the client's router choose (``resp.extra["routing"]``).
        ``cache`` overrides whether the response cache is used (default: only when
        ``temperature == 0``). ``affinity_key`` (e.g. a conversation id) names the calls
        that should share a node and its prompt cache; by default a long enough prompt
        prefix does (see :mod:`holysheep_lb.affinity`). Raises :class:`BudgetExceededError` before sending when
        a spend cap refuses the call. With ``stream=True`` it returns a
        :class:`~holysheep_lb.streaming.ChatStream` once the first chunk has arrived
        (failing over until then) and asks for ``stream_options={"include_usage": True}``
        unless told otherwise; its cost is settled from that usage when it ends.
        """
        if model is None and self.config.default_model is None and self.config.router is not None:
            model = AUTO
        model = self._resolve_model(model)
        _validate_messages(messages)
        _validate_params(params)
        stream = params.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequestError("stream", stream, "must be True or False")
        if cache is not None and not isinstance(cache, bool):
            raise InvalidRequestError("cache", cache, "must be True, False or None")
        # Checked here, not only when a request is built: a cache hit sends nothing.
        _validate_call_options(region=region, deadline_s=deadline_s, idempotency_key=idempotency_key)
        self._ensure_running()
        call_deadline = self._clock() + (deadline_s or self.config.deadline_s)
        decision = self._router.route(messages, params, is_available=self._model_available) if model == AUTO else None
        # prompt-cache affinity (issue #14): the node this call's prefix (or affinity_key) prefers
        affinity = self._selector.affinity.key_for(decision.model if decision else model, messages, params,
                                                   affinity_key) if self._selector.affinity else None
        if stream:
            options = params.get("stream_options")
            if options is not None and not isinstance(options, Mapping):
                raise InvalidRequestError("stream_options", options, "must be a dict or None")
            with call_affinity(affinity):  # prompt-cache affinity (issue #14)
                return self._stream_with_costs(decision.model if decision else model, messages, params,
                                               decision=decision, region=region, deadline_s=deadline_s,
                                               idempotency_key=idempotency_key)

        cached = self._cache is not None and self._cache.wanted(params, cache)

        def send(chosen: str, costs: CallCosts) -> Response:
            path, payload = "/chat/completions", {"model": chosen, "messages": list(messages), **params}
            # whatever this call spent waiting for an identical one counts against its deadline
            remaining_s = call_deadline - self._clock()
            if remaining_s <= 0:
                reason = "deadline exceeded before the request was sent"
                if cached:
                    reason += " (the call may have waited for an identical call in flight)"
                self._count_call(False, AllAttemptsFailedError.__name__, self._clock())
                raise AllAttemptsFailedError(reason, [])
            method, body, headers, deadline = self._build("POST", payload, deadline_s=remaining_s,
                                                          idempotency_key=idempotency_key)
            with call_affinity(affinity):  # prompt-cache affinity (issue #14)
                return self._run_chain(method, path, payload, body, headers, region=region, deadline=deadline,
                                       costs=costs)

        resp = self._chat_with_costs(decision.model if decision else model, messages, params, send,
                                     cache=cache, region=region, wait_s=max(0.0, call_deadline - self._clock()))
        if decision is not None:
            resp.extra["routing"] = decision
            resp.fallback = resp.fallback or decision.fallback
        if self._selector.affinity is not None and not resp.cached:  # per-node cached tokens (issue #14)
            self._selector.affinity.record_usage(resp.node_id, resp.get("usage"))
        return resp

    def _chat_with_costs(self, model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                         send: Callable[[str, CallCosts], Response], *, cache: Optional[bool],
                         region: Optional[str], wait_s: float) -> Response:
        """The cost steps around ``send``: cache lookup, budget reservation, actual cost.

        Each model of the chain is paid for as itself (see :mod:`holysheep_lb.costs`).
        """
        ledger = self._ledger

        def paid() -> Tuple[Response, bool]:
            first = self._admit(model, messages, params)
            costs = CallCosts(ledger, first, messages, params)
            try:
                resp = send(first.model, costs)
            finally:
                costs.close()
            if "cost" not in resp.extra:  # a canned fallback_reply: no model answered
                resp.extra["cost"] = cost_info(None, None)
            if first.model != model:
                resp.fallback = True
                resp.extra["cost"]["downgraded_from"] = model
            # only the requested model's own answer is cached (not a fallback's, a canned or downgraded one)
            return resp, not resp.fallback and first.model == model

        if self._cache is None or not self._cache.wanted(params, cache):
            return paid()[0]
        started = self._clock()
        key = cache_key(model, messages, params, region=region if region is not None else self.config.default_region,
                        scope=self._cache_scope)
        resp, hit = self._cache.get_or_call(key, paid, wait_s=wait_s)
        if hit:
            ledger.record_cache_hit(model)
            resp.cached = True
            resp.attempts = ()
            resp.latency_ms = (self._clock() - started) * 1000.0  # > 0 if it waited for an identical call
            resp.extra["cost"] = {**cost_info(None, None), "model": model}
        return resp

    def _admit(self, model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Reservation:
        """Reserve the call's estimate; a budget's refusal is a failed call in ``stats()``."""
        try:
            return self._ledger.admit(model, messages, params, is_available=self._model_available)
        except BudgetExceededError as exc:
            self._count_call(False, type(exc).__name__, self._clock())
            raise

    def _stream_with_costs(self, model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                           *, decision: Any, region: Optional[str], deadline_s: Optional[float],
                           idempotency_key: Optional[str]) -> ChatStream:
        """A stream's cost steps: reserve the estimate now, settle from its usage when it ends."""
        first = self._admit(model, messages, params)
        costs = StreamCosts(self._ledger, first, messages, params)
        payload = {"model": first.model, "messages": list(messages), **params}
        payload["stream_options"] = {"include_usage": True, **(params.get("stream_options") or {})}
        try:  # usage arrives at the end of a stream: costs.ended settles the model that streamed
            stream = self._stream_chat(payload, region=region, deadline_s=deadline_s,
                                       idempotency_key=idempotency_key, on_end=costs.ended, costs=costs)
        finally:
            costs.close()
        if decision is not None:
            stream.extra["routing"] = decision
            stream.fallback = stream.fallback or decision.fallback
        if first.model != model:
            stream.fallback = True
            stream.extra["downgraded_from"] = model
        return stream

    def embeddings(self, input: Any, model: Optional[str] = None, *, region: Optional[str] = None,
                   deadline_s: Optional[float] = None, **params: Any) -> Response:
        """``POST /embeddings`` for a string or a list of strings."""
        model = self._resolve_model(model)
        if isinstance(input, str):
            ok = bool(input)
        else:
            ok = isinstance(input, (list, tuple)) and bool(input) and all(isinstance(i, str) for i in input)
        if not ok:
            raise InvalidRequestError("input", input, "must be a non-empty string or list of strings")
        check_json_value("input", input)
        for name, value in params.items():
            check_json_value(name, value)
        payload = {"model": model, "input": input, **params}
        return self.request("POST", "/embeddings", json=payload, region=region, deadline_s=deadline_s)

    def models(self, *, region: Optional[str] = None, deadline_s: Optional[float] = None) -> Response:
        """``GET /models`` from one node (with failover)."""
        return self.request("GET", "/models", region=region, deadline_s=deadline_s)

    def request(
        self,
        method: str,
        path: str,
        json: Optional[Mapping[str, Any]] = None,
        *,
        region: Optional[str] = None,
        deadline_s: Optional[float] = None,
        idempotency_key: Optional[str] = None,
    ) -> Response:
        """Any JSON API call, with failover; ``path`` is relative to each node's base_url."""
        method, body, headers, deadline = self._prepare(method, path, json, region=region, deadline_s=deadline_s,
                                                        idempotency_key=idempotency_key)
        return self._run_chain(method, path, json, body, headers, region=region, deadline=deadline)

    def _prepare(
        self,
        method: str,
        path: str,
        json: Optional[Mapping[str, Any]],
        *,
        region: Optional[str],
        deadline_s: Optional[float],
        idempotency_key: Optional[str],
    ) -> Tuple[str, Optional[bytes], Dict[str, str], float]:
        """Validate a call and build (method, body, headers, deadline); nothing is sent."""
        if not isinstance(method, str) or method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise InvalidRequestError("method", method, "must be GET, POST, PUT, PATCH or DELETE")
        if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in "\r\n \t"):
            raise InvalidRequestError("path", path, "must start with '/' and contain no whitespace")
        _validate_call_options(region=region, deadline_s=deadline_s, idempotency_key=idempotency_key)
        if json is not None:
            check_json_value("json", json)
        self._ensure_running()
        return self._build(method.upper(), json, deadline_s=deadline_s, idempotency_key=idempotency_key)

    def _build(self, method: str, json: Optional[Mapping[str, Any]], *, deadline_s: Optional[float],
               idempotency_key: Optional[str]) -> Tuple[str, Optional[bytes], Dict[str, str], float]:
        """(method, body, headers, deadline) for arguments already validated."""
        body = None if json is None else _encode_json(json)
        headers: Dict[str, str] = {}
        if method != "GET":
            headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return method, body, headers, self._clock() + (deadline_s or self.config.deadline_s)

    def _run_chain(self, method: str, path: str, json: Optional[Mapping[str, Any]],
                   body: Optional[bytes], headers: Dict[str, str], *, region: Optional[str],
                   deadline: float, steps: Optional[Callable[..., Any]] = None,
                   costs: Optional[ModelCosts] = None) -> Any:
        """Run the call through the model chain (breakers, rate limits, fallbacks).

        ``steps(model, body, headers) -> (send, finish)`` customises the attempt loop
        (streams); each model of the chain gets its own body and Idempotency-Key.
        """
        requested = json.get("model") if json else None
        requested = requested if isinstance(requested, str) else None

        def execute(model: Optional[str]) -> Any:
            model_body, model_headers = body, headers
            if model != requested:
                # A fallback model: its own body, and its own Idempotency-Key so that a
                # node never replays the first model's answer for it.
                if headers:
                    tag = hashlib.sha256(str(model).encode("utf-8")).hexdigest()[:12]
                    model_headers = {**headers, "Idempotency-Key": f"{headers['Idempotency-Key']}-{tag}"}
                model_body = _encode_json({**json, "model": model})  # type: ignore[dict-item]
            send, finish = steps(model, model_body, model_headers) if steps else (None, None)
            return self._execute(method, path, model_body, model_headers, region=region,
                                 deadline=deadline, model=model, send=send, finish=finish,
                                 unanswered=costs.unanswered if costs is not None else None)

        started = self._clock()
        # once per call (not per model of a fallback chain): the budgets are ratios of calls
        if self._retry_budget is not None:
            self._retry_budget.deposit()
        if self._hedger is not None and steps is None:
            self._hedger.deposit()
        try:
            result = self._chain.run(requested, json, execute, deadline=deadline, costs=costs)
        except HolySheepError as exc:
            self._count_call(False, type(exc).__name__, started)
            raise
        if steps is not None and isinstance(result, Response):
            # every model failed and fallback_reply answered: a stream caller still gets a stream
            result = CannedStream(result, latency_ms=result.latency_ms, extra=result.extra)
            self._count_call(True, None, started)
        elif steps is None:  # a stream is counted when it ends (see _stream_ended)
            self._count_call(True, None, started)
        return result

    def _stream_chat(self, payload: Dict[str, Any], *, region: Optional[str], deadline_s: Optional[float],
                     idempotency_key: Optional[str],
                     on_end: Optional[Callable[[StreamOutcome], None]] = None,
                     costs: Optional[ModelCosts] = None) -> ChatStream:
        """Open a chat stream: the attempt loop runs until a first chunk, then a ChatStream owns the node."""
        path = "/chat/completions"
        # chat_completion validated the arguments and checked the client is open
        method, body, headers, deadline = self._build("POST", payload, deadline_s=deadline_s,
                                                      idempotency_key=idempotency_key)
        headers.update(STREAM_HEADERS)
        cfg = self.config
        clock = self._clock

        def ended(outcome: StreamOutcome) -> None:
            try:
                self._stream_ended(outcome)
            finally:  # the stream's cost is settled even if counting it was interrupted
                if on_end is not None:
                    on_end(outcome)

        def steps(model: str, model_body: bytes, model_headers: Dict[str, str]) -> Tuple[Any, Any]:
            def send(node: NodeState, timeout: Tuple[float, float]) -> OpenedStream:
                first_chunk_s = max(0.001, min(cfg.stream_first_chunk_timeout_s, deadline - clock()))
                return open_stream(node.transport, method, path, body=model_body, headers=model_headers,
                                   connect_timeout_s=timeout[0], first_chunk_timeout_s=first_chunk_s,
                                   clock=clock, max_bytes=cfg.max_response_bytes)

            def finish(node: NodeState, opened: OpenedStream, attempts: List[Attempt], started: float,
                       picked_at: float) -> ChatStream:
                return ChatStream(opened, selector=self._selector, node=node, attempts=attempts,
                                  model=model, started=started, picked_at=picked_at,
                                  stall_timeout_s=cfg.stream_stall_timeout_s, clock=clock,
                                  classify=failure_kind, reaper=self._stream_reaper, on_end=ended)
            return send, finish

        return self._run_chain(method, path, payload, body, headers, region=region, deadline=deadline,
                               steps=steps, costs=costs)

    def _stream_ended(self, outcome: StreamOutcome) -> None:
        """Called once per stream when it completes, breaks or is cancelled.

        The per-stream bookkeeping hook: stream stats and call counts here; cost
        accounting (``outcome.model``, ``outcome.usage``) and breaker outcomes
        (``outcome.status``, ``outcome.error``, ``outcome.node_id``) plug in here too.
        """
        self._stream_stats.record(outcome)
        if self._selector.affinity is not None:  # per-node cached tokens (issue #14)
            self._selector.affinity.record_usage(outcome.node_id, outcome.usage)
        self._count_call(outcome.ok, None if outcome.ok else "StreamInterruptedError", outcome.started)

    def map(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        max_workers: int = 8,
        return_exceptions: bool = True,
        on_progress: Optional[Callable[[int, int], None]] = None,
    ) -> List[BatchResult]:
        """Many ``chat_completion`` calls on a bounded thread pool; results in input order.

        Each request is a dict of ``chat_completion`` arguments (``messages``, ``model``,
        ...). Blocks until all end; see :func:`holysheep_lb.batch.run_batch` for
        failures, cancellation and Ctrl-C. Keep ``max_workers`` <= ``pool_maxsize``.
        """
        return run_batch(self, requests, max_workers=max_workers,
                         return_exceptions=return_exceptions, on_progress=on_progress)

    # -- the attempt loop -----------------------------------------------------------------

    def _execute(
        self,
        method: str,
        path: str,
        body: Optional[bytes],
        headers: Optional[Dict[str, str]],
        *,
        region: Optional[str],
        deadline: float,
        model: Optional[str],
        send: Optional[Callable[[NodeState, Tuple[float, float]], Any]] = None,
        finish: Optional[Callable[[NodeState, Any, List[Attempt], float, float], Any]] = None,
        unanswered: Optional[Callable[[], None]] = None,
    ) -> Any:
        """The attempt loop: pick, send, classify, back off, fail over, until ``deadline``.

        ``send(node, (connect_s, read_s))`` performs one attempt and returns its result or
        raises an :class:`APIError`; the default sends ``body`` and decodes JSON.
        ``finish(node, result, attempts, started, picked_at)`` turns a successful result
        into the return value and takes over the node's in-flight slot (a stream calls
        ``selector.answered(node, picked_at)`` at its first chunk and a ``release_*`` when
        it ends); by default the slot is released and a :class:`Response` is returned.
        ``unanswered()`` is told of each attempt that timed out after its request was sent.
        """
        clock = self._clock
        started = clock()
        attempts: List[Attempt] = []
        tried: List[str] = []
        picked: Dict[str, float] = {}  # node id -> when this call's attempt on it was picked
        stream_permits: Dict[str, Any] = {}  # node id -> node-breaker permit held by a stream
        last_error: Optional[APIError] = None
        reason = "all attempts failed"
        selector = self._selector
        breakers = self._breakers
        budget = self._retry_budget
        hedger = self._hedger if finish is None else None  # streams are never hedged
        if send is None:
            def send(node: NodeState, timeout: Tuple[float, float]) -> Any:
                return node.transport.send(method, path, body=body, headers=headers, timeout_s=timeout,
                                           deadline_s=max(0.001, deadline - clock()))

        def attempt(node: NodeState, timeout: Tuple[float, float]) -> Tuple[Any, float]:
            # One attempt; it owns the node's slot. On failure (or an interrupt) the node
            # and its breaker permit are released and the error raised; on success the
            # caller owns the slot.
            started_at = picked[node.id]
            permit = result = None
            try:
                permit = breakers.admit("node", node.id) if breakers.nodes_enabled else None
                t0 = clock()
                result = send(node, timeout)
                latency_ms = (clock() - t0) * 1000.0
            except APIError as exc:
                freed = False
                try:
                    latency_ms = (clock() - t0) * 1000.0
                    kind = failure_kind(exc)
                    retry_after_s = getattr(exc, "retry_after_s", None)
                    if retry_after_s is not None:  # a node's "Retry-After: 99999999" must not bench it for years
                        retry_after_s = min(retry_after_s, self._retry.retry_after_cap_s)
                    freed = True  # a release frees the slot before anything in it can raise
                    selector.release_failure(node, kind, latency_ms, started=started_at,
                                             retry_after_s=retry_after_s)
                    attempts.append(Attempt(node.id, latency_ms, getattr(exc, "status_code", None),
                                            f"{type(exc).__name__}: {exc.message}", kind))
                finally:
                    if not freed:
                        selector.release_cancelled(node, started=started_at)
                    if permit is not None:
                        permit.record(exc)
                    if unanswered is not None and isinstance(exc, APITimeoutError) and exc.request_sent:
                        unanswered()  # the node may still answer it, and the gateway bill it
                raise
            except BaseException:  # refused by the node's breaker, or interrupted: nothing to hold against it
                try:
                    if result is not None:
                        discard(result)  # it answered, but nobody will read it
                finally:
                    selector.release_cancelled(node, started=started_at)
                    if permit is not None:
                        permit.release()
                raise
            attempts.append(Attempt(node.id, latency_ms, getattr(result, "status_code", None)))
            if permit is not None:
                if finish is None:
                    permit.record(None)
                else:  # a stream: the node's breaker hears how it ends, not only that it began
                    stream_permits[node.id] = permit
            return result, latency_ms

        def avoid() -> List[str]:
            if not breakers.nodes_enabled:
                return tried
            return tried + [n.id for n in selector.nodes if not breakers.allows("node", n.id)]

        def pick_hedge() -> Optional[NodeState]:
            hedge_at = clock()
            try:
                other = selector.pick(exclude=avoid(), region=region, started=hedge_at, fresh_only=True)
            except NoHealthyNodeError:
                return None
            try:
                picked[other.id] = hedge_at
                throttled = other.throttled_until > clock()
            except BaseException:
                selector.release_cancelled(other, started=hedge_at)
                raise
            if throttled:
                selector.release_cancelled(other, started=hedge_at)
                return None
            tried.append(other.id)
            return other

        def release_unused(node: NodeState, latency_ms: Optional[float], result: Any) -> None:
            # a hedged copy that lost the race (latency given) or was never sent (None)
            if latency_ms is None:
                selector.release_cancelled(node, started=picked[node.id])
                return
            selector.release_success(node, latency_ms, started=picked[node.id])
            data = getattr(result, "data", None)
            if model is not None and isinstance(data, Mapping):  # billed all the same: record it
                self._ledger.record_unreserved(model, data.get("usage"))

        circuit_error: Optional[CircuitOpenError] = None
        for attempt_no in range(self._retry.max_retries + 1):
            if self._closed:  # close() ran during this call: no new attempt, no new connection
                reason = "the client was closed"
                break
            if attempt_no:
                if budget is not None and not budget.try_withdraw():
                    reason = RETRY_BUDGET_EXHAUSTED
                    log.debug("retry budget exhausted; returning the failure instead of retrying")
                    break
                wait_s = self._retry.backoff_s(attempt_no, self._rand)
                if clock() + wait_s >= deadline:
                    reason = "deadline exceeded"
                    break
                if wait_s > 0:
                    self._sleep(wait_s)
            picked_at = clock()
            node = selector.pick(exclude=avoid(), region=region, started=picked_at)
            # Until attempt() (or the hedger) takes the node, the finally below releases it
            # on every way out, an interrupt (KeyboardInterrupt, a soft time limit) included.
            held: Optional[NodeState] = node
            try:
                picked[node.id] = picked_at
                wait_s = node.throttled_until - clock()
                if wait_s > 0:
                    # every node is throttled: wait for the soonest Retry-After if it fits
                    if wait_s > self._retry.retry_after_cap_s or clock() + wait_s >= deadline:
                        reason = f"every node is throttled for at least {wait_s:.1f} s"
                        break
                    log.debug("all nodes throttled; waiting %.2f s for node %s", wait_s, node.id)
                    self._sleep(wait_s)
                remaining = deadline - clock()
                if remaining <= 0:
                    reason = "deadline exceeded"
                    break
                timeout = (min(self._timeouts[0], remaining), min(self._timeouts[1], remaining))
                tried.append(node.id)
                held = None  # from here attempt() or the hedger releases it
                if hedger is not None:
                    node, result, latency_ms = hedger.run(node, timeout, attempt=attempt,
                                                          pick_other=pick_hedge, release=release_unused,
                                                          deadline=deadline)
                else:
                    result, latency_ms = attempt(node, timeout)
            except CircuitOpenError as exc:
                # This node's breaker refused (another thread took its half-open trial
                # since avoid() looked): try another node while one is allowed.
                circuit_error = exc
                reason = str(exc)
                if len(set(avoid())) < len(selector.nodes):
                    continue
                break
            except APIError as exc:
                last_error = exc
                if not exc.retryable:
                    exc.attempts = tuple(attempts)  # type: ignore[attr-defined]
                    raise
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("attempt %d on node %s failed (%s); %s", attempt_no + 1, exc.node_id,
                              failure_kind(exc), "retrying on another node"
                              if attempt_no < self._retry.max_retries else "no retries left")
                continue
            finally:
                if held is not None:  # left before attempt() took it: a break, or an interrupt
                    selector.release_cancelled(held, started=picked_at)
            # Success: forget the failed attempts' errors. Their tracebacks hold this frame,
            # which holds the result: a cycle only the cyclic GC would break, keeping a
            # dropped stream's node, reservation and breaker trial until it runs.
            last_error = circuit_error = None
            if finish is not None:
                node_permit = stream_permits.pop(node.id, None)
                try:
                    # finish() either returns a stream that owns the node, or raises having released it
                    stream = finish(node, result, attempts, started, picked[node.id])
                    if node_permit is not None:
                        stream.defer_outcome(stream_outcome_hook(node_permit))
                except BaseException:
                    if node_permit is not None:
                        node_permit.release()  # nothing if the stream's hook already took it
                    raise
                return stream
            try:
                total_ms = (clock() - started) * 1000.0
            finally:
                selector.release_success(node, latency_ms, started=picked[node.id])
            data = result.data
            return Response(data, node_id=node.id, region=node.region, attempts=tuple(attempts),
                            latency_ms=total_ms, request_id=result.request_id,
                            model=data.get("model", model))
        else:
            reason = f"all {len(attempts)} attempts failed"
        error: HolySheepError
        if circuit_error is not None and not attempts:
            error = circuit_error
        else:
            error = AllAttemptsFailedError(reason, attempts, last_error)
            error.__cause__ = last_error
            if isinstance(last_error, RateLimitError):
                error.retry_after_s = last_error.retry_after_s  # type: ignore[attr-defined]
        try:
            raise error
        finally:  # the error's traceback holds this frame: no locals may hold the error back
            error = last_error = circuit_error = None  # type: ignore[assignment]

    def _count_call(self, ok: bool, error_name: Optional[str], started: float) -> float:
        total_ms = (self._clock() - started) * 1000.0
        with self._stats_lock:
            self._calls += 1
            if ok:
                self._call_successes += 1
                self._call_latency.record(total_ms)
            else:
                self._call_failures[error_name or "error"] = self._call_failures.get(error_name or "error", 0) + 1
        return total_ms

    def _resolve_model(self, model: Any) -> str:
        model = model if model is not None else self.config.default_model
        if model is None:
            raise InvalidRequestError("model", None, "is required: pass model=... or set Client(default_model=...)")
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequestError("model", model, "must be a non-empty string")
        if len(model) > MAX_MODEL_NAME_CHARS:
            raise InvalidRequestError("model", model, f"must be at most {MAX_MODEL_NAME_CHARS} characters long "
                                                      f"(got {len(model)})")
        if _CONTROL_CHARS.search(model):
            raise InvalidRequestError("model", model, "must not contain control characters")
        check_json_value("model", model)
        return model

    # -- introspection -------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """A consistent, thread-safe snapshot of counters and latency percentiles."""
        self._stream_reaper.reap()
        nodes = self._selector.node_stats()
        with self._stats_lock:
            failures = dict(self._call_failures)
            calls = self._calls
            successes = self._call_successes
            latency = self._call_latency.summary()
        failed = sum(failures.values())
        return {
            "calls": calls,
            "successes": successes,
            "failures": failed,
            "failures_by_error": failures,
            "success_rate": (successes / calls) if calls else None,
            "latency": latency,
            "in_flight": sum(n["in_flight"] for n in nodes.values()),
            "nodes": nodes,
            "breakers": self._breakers.stats(),
            "fallbacks": self._chain.stats(),
            "retry_budget": None if self._retry_budget is None else self._retry_budget.snapshot(),
            "hedges": None if self._hedger is None else self._hedger.stats(),
            "rate_limits": self._chain.limits.snapshot() if self._chain.limits is not None else {},
            "streams": self._stream_stats.snapshot(),
            "health": None if self._health is None else {
                "rounds": self._health.rounds, "probe_errors_raised": self._health.loop_errors},
            "cache": self._cache.stats() if self._cache is not None else None,
            "affinity": self._selector.affinity.summary() if self._selector.affinity else None,  # issue #14
        }

    def latency_histograms(self) -> Dict[str, Any]:
        """Copies of the fixed-size latency histograms behind ``stats()`` (for exporters).

        ``calls`` (successful calls), ``nodes`` (node id -> successful attempts),
        ``stream_first_chunk`` and ``stream_total`` (completed streams). Each is a
        :class:`~holysheep_lb.stats.LatencyHistogram` taken under its lock in
        microseconds; summarise it (``cumulative_counts``, ``percentile``) afterwards.
        """
        self._stream_reaper.reap()
        nodes = self._selector.latency_histograms()
        with self._stats_lock:
            calls = self._call_latency.copy()
        first_chunk, total = self._stream_stats.histograms()
        return {"calls": calls, "nodes": nodes, "stream_first_chunk": first_chunk, "stream_total": total}

    def breakers(self) -> List[Dict[str, Any]]:
        """Each circuit breaker: state, counters, and ``retry_after_s`` until an open one
        lets a trial call through (after which it may close)."""
        return self._breakers.snapshot()

    def breaker_allows(self, model: str) -> bool:
        """Whether ``model``'s breaker would let a call through now (for model routers)."""
        return self._breakers.allows("model", model)

    def cost_report(self, baseline_model: Optional[str] = None, *, since: Optional[str] = None,
                    until: Optional[str] = None) -> Dict[str, Any]:
        """Spend totals, per model and per UTC day, and savings against ``baseline_model``.

        See :meth:`holysheep_lb.pricing.SpendLedger.report`; ``since``/``until`` are
        inclusive days like ``"2026-11-26"``.
        """
        return self._ledger.report(baseline_model, since=since, until=until)

    def nodes(self) -> List[Dict[str, Any]]:
        """Each node's routing state: usable or not and why, in-flight, latency, ejections, probes."""
        self._stream_reaper.reap()
        return self._selector.snapshot()

    @property
    def selector(self) -> Selector:
        return self._selector

    @property
    def router(self) -> ModelRouter:
        return self._router

    @property
    def ledger(self) -> SpendLedger:
        return self._ledger

    @property
    def health_checker(self) -> Optional[HealthChecker]:
        return self._health


def _encode_json(payload: Mapping[str, Any]) -> bytes:
    if not isinstance(payload, Mapping):
        raise InvalidRequestError("json", payload, "must be a dict")
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError("json", type(payload).__name__, f"must be JSON-serialisable ({exc})") from None


def _validate_call_options(*, region: Any, deadline_s: Any, idempotency_key: Any) -> None:
    check_deadline_s(deadline_s)
    if region is not None and not isinstance(region, str):
        raise InvalidRequestError("region", region, "must be a string")
    check_json_value("region", region)
    key = idempotency_key
    if key is not None and (not isinstance(key, str) or not key or len(key) > 255 or not key.isascii()
                            or any(c in key for c in "\r\n\x00")):
        raise InvalidRequestError("idempotency_key", key, "must be 1-255 printable ASCII characters without CR/LF")


def _validate_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages", messages, "must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}]", m, "must be a dict with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role", role, "is required and must be a non-empty string")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"messages[{i}].content", content, "must be a string, a list of parts or None")
        for key, value in m.items():
            check_json_value(f"messages[{i}].{key}", value)


def _validate_params(params: Mapping[str, Any]) -> None:
    for name in ("max_tokens", "max_completion_tokens", "n"):
        check_count(name, params.get(name))
    if "temperature" in params and params["temperature"] is not None:
        v = params["temperature"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 2:
            raise InvalidRequestError("temperature", v, "must be a number from 0 to 2")
    for name, value in params.items():
        check_json_value(name, value)
