"""``Client``: the blocking, thread-safe entry point. It orchestrates; it does not compute.

One call::

    validate arguments (nothing bad reaches the network)
    attempt loop, one deadline for all attempts:
        node = selector.pick(exclude=tried)      lock held for microseconds
        result = node.transport.send(...)        no lock held
        success -> selector.release_success, return Response
        final error (400/401/403/404/422) -> raise it at once
        retryable -> selector.release_failure, back off (full jitter), next node
    every attempt failed -> AllAttemptsFailedError listing each attempt

Share one Client between all threads of a process. It survives ``os.fork()``: the
child gets fresh sessions and locks, and starts its own health thread on first use.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import __version__
from .batch import BatchResult, run_batch
from .config import (
    CLIENT_OPTIONS,
    ClientConfig,
    config_from_env,
    config_from_mapping,
    parse_nodes,
    API_KEY_ENV,
)
from .errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AllAttemptsFailedError,
    Attempt,
    ConfigError,
    HolySheepError,
    InvalidRequestError,
    RateLimitError,
)
from .health import HealthChecker
from .nodes import EjectionPolicy, NodeState
from .response import Response
from .retry import RetryPolicy
from .selection import Selector, make_strategy
from .stats import LatencyHistogram
from .transport import Transport

__all__ = ["Client"]

log = logging.getLogger(__name__)

_LIVE_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_LIVE_CLIENTS):
        client._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def failure_kind(exc: APIError) -> str:
    """The stats/ejection bucket of a failed attempt."""
    if isinstance(exc, APIStatusError):
        if exc.status_code == 429:
            return "status_429"
        return "status_5xx" if exc.status_code >= 500 else "status_4xx"
    if isinstance(exc, APITimeoutError):
        return "timeout"
    if isinstance(exc, APIResponseValidationError):
        return "invalid_response"
    return "connect"


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
    ``max_retries``, ``pool_maxsize``, ...). ``clock``, ``sleep`` and ``rand`` exist for
    tests.
    """

    def __init__(
        self,
        api_key: Optional[str] = None,
        nodes: Optional[Sequence[Any]] = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Optional[Callable[[], float]] = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - CLIENT_OPTIONS - {"nodes", "api_key"})
        if unknown:
            raise ConfigError(unknown[0], options[unknown[0]],
                              f"unknown Client option; known options: {sorted(CLIENT_OPTIONS - {'nodes'})}")
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
                                      max_response_bytes=cfg.max_response_bytes, verify=cfg.verify))
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
        )
        self._stats_lock = threading.Lock()
        self._calls = 0
        self._call_successes = 0
        self._call_failures: Dict[str, int] = {}
        self._call_latency = LatencyHistogram()
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
        """Stop the health thread and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
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
            node.trial_in_flight = False
            node.transport.reset_after_fork()
        if self._health is not None:
            self._health.reset_after_fork()

    def _ensure_running(self) -> None:
        if self._closed:
            raise HolySheepError("this Client is closed")
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
        **params: Any,
    ) -> Response:
        """``POST /chat/completions``; returns the decoded JSON with routing metadata.

        Blocks until an answer or a typed error. ``params`` (temperature, max_tokens, ...)
        are sent as they are. ``region`` steers the geographic strategy.
        """
        model = self._resolve_model(model)
        _validate_messages(messages)
        _validate_params(params)
        if params.get("stream"):
            raise InvalidRequestError("stream", params["stream"], "streaming is not available in this version")
        payload = {"model": model, "messages": list(messages), **params}
        return self.request("POST", "/chat/completions", json=payload, region=region,
                            deadline_s=deadline_s, idempotency_key=idempotency_key)

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
        if not isinstance(method, str) or method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise InvalidRequestError("method", method, "must be GET, POST, PUT, PATCH or DELETE")
        if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in "\r\n \t"):
            raise InvalidRequestError("path", path, "must start with '/' and contain no whitespace")
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                                       or not deadline_s > 0):
            raise InvalidRequestError("deadline_s", deadline_s, "must be a number > 0")
        if region is not None and not isinstance(region, str):
            raise InvalidRequestError("region", region, "must be a string")
        body = None if json is None else _encode_json(json)
        headers: Optional[Dict[str, str]] = None
        if method.upper() != "GET":
            key = idempotency_key or uuid.uuid4().hex
            if not isinstance(key, str) or any(c in key for c in "\r\n\x00"):
                raise InvalidRequestError("idempotency_key", key, "must be a string without CR/LF")
            headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        self._ensure_running()
        deadline = self._clock() + (deadline_s or self.config.deadline_s)
        return self._execute(method.upper(), path, body, headers, region=region, deadline=deadline,
                             model=json.get("model") if json else None)

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
        finish: Optional[Callable[[NodeState, Any, List[Attempt], float], Any]] = None,
    ) -> Any:
        """The attempt loop: pick, send, classify, back off, fail over, until ``deadline``.

        ``send(node, (connect_s, read_s))`` performs one attempt and returns its result or
        raises an :class:`APIError`; the default sends ``body`` and decodes JSON.
        ``finish(node, result, attempts, started)`` turns a successful result into the
        return value and takes over the node's in-flight slot (a stream releases it when
        it ends); by default the slot is released and a :class:`Response` is returned.
        """
        clock = self._clock
        started = clock()
        attempts: List[Attempt] = []
        tried: List[str] = []
        last_error: Optional[APIError] = None
        reason = "all attempts failed"
        selector = self._selector
        if send is None:
            def send(node: NodeState, timeout: Tuple[float, float]) -> Any:
                return node.transport.send(method, path, body=body, headers=headers, timeout_s=timeout)
        for attempt_no in range(self._retry.max_retries + 1):
            if attempt_no:
                wait_s = self._retry.backoff_s(attempt_no, self._rand)
                if clock() + wait_s >= deadline:
                    reason = "deadline exceeded"
                    break
                if wait_s > 0:
                    self._sleep(wait_s)
            node = selector.pick(exclude=tried, region=region)
            wait_s = node.throttled_until - clock()
            if wait_s > 0:
                # every node is throttled: wait for the soonest Retry-After if it fits
                if wait_s > self._retry.retry_after_cap_s or clock() + wait_s >= deadline:
                    selector.release_cancelled(node)
                    reason = f"every node is throttled for at least {wait_s:.1f} s"
                    break
                log.debug("all nodes throttled; waiting %.2f s for node %s", wait_s, node.id)
                self._sleep(wait_s)
            remaining = deadline - clock()
            if remaining <= 0:
                selector.release_cancelled(node)
                reason = "deadline exceeded"
                break
            timeout = (min(self._timeouts[0], remaining), min(self._timeouts[1], remaining))
            tried.append(node.id)
            t0 = clock()
            try:
                result = send(node, timeout)
            except APIError as exc:
                latency_ms = (clock() - t0) * 1000.0
                kind = failure_kind(exc)
                selector.release_failure(node, kind, latency_ms,
                                         getattr(exc, "retry_after_s", None))
                attempts.append(Attempt(node.id, latency_ms, getattr(exc, "status_code", None),
                                        f"{type(exc).__name__}: {exc.message}"))
                last_error = exc
                if not exc.retryable:
                    exc.attempts = tuple(attempts)  # type: ignore[attr-defined]
                    self._count_call(False, type(exc).__name__, started)
                    raise
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("attempt %d on node %s failed (%s); %s", attempt_no + 1, node.id, kind,
                              "retrying on another node" if attempt_no < self._retry.max_retries
                              else "no retries left")
                continue
            except BaseException:
                selector.release_cancelled(node)
                raise
            latency_ms = (clock() - t0) * 1000.0
            attempts.append(Attempt(node.id, latency_ms, getattr(result, "status_code", None)))
            if finish is not None:
                return finish(node, result, attempts, started)
            selector.release_success(node, latency_ms)
            total_ms = self._count_call(True, None, started)
            data = result.data
            return Response(data, node_id=node.id, region=node.region, attempts=tuple(attempts),
                            latency_ms=total_ms, request_id=result.request_id,
                            model=data.get("model", model))
        else:
            reason = f"all {len(attempts)} attempts failed"
        self._count_call(False, "AllAttemptsFailedError", started)
        error = AllAttemptsFailedError(reason, attempts, last_error)
        if isinstance(last_error, RateLimitError):
            error.retry_after_s = last_error.retry_after_s  # type: ignore[attr-defined]
        raise error from last_error

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
        return model

    # -- introspection -------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """A consistent, thread-safe snapshot of counters and latency percentiles."""
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
        }

    def nodes(self) -> List[Dict[str, Any]]:
        """Each node's routing state: usable or not and why, in-flight, latency, ejections, probes."""
        return self._selector.snapshot()

    @property
    def selector(self) -> Selector:
        return self._selector

    @property
    def health_checker(self) -> Optional[HealthChecker]:
        return self._health


def _encode_json(payload: Mapping[str, Any]) -> bytes:
    if not isinstance(payload, Mapping):
        raise InvalidRequestError("json", payload, "must be a dict")
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError("json", type(payload).__name__, f"must be JSON-serialisable ({exc})") from None


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


def _validate_params(params: Mapping[str, Any]) -> None:
    for name in ("max_tokens", "max_completion_tokens", "n"):
        if name in params and params[name] is not None:
            v = params[name]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidRequestError(name, v, "must be a positive integer")
    if "temperature" in params and params["temperature"] is not None:
        v = params["temperature"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 2:
            raise InvalidRequestError("temperature", v, "must be a number from 0 to 2")
