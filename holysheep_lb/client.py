"""``Client``: the blocking, thread-safe entry point. A facade: construction (its typed
signature in :mod:`holysheep_lb.client_options`), the public calls, lifecycle, and
introspection (:mod:`holysheep_lb.introspect`). One call runs through the pipeline in
:mod:`holysheep_lb.call` (costs and cache -> model chain -> attempts -> hedging -> send);
what an outcome means is :mod:`holysheep_lb.policy.classify`'s answer and what to do
next is :class:`~holysheep_lb.policy.retry.RetryPolicy`'s.

Share one Client between all threads of a process. It survives ``os.fork()``: every part
holding a lock, a thread or a socket joined the fork registry (:mod:`holysheep_lb.forksafe`),
so the child gets fresh sessions and locks, and starts its own health thread on first use.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Literal, Mapping, Optional, Sequence, Union, overload

from ._version import __version__
from .batch import BatchResult, run_batch
from .call.args import (validate_call_options, validate_first_token_timeout, validate_messages, validate_model,
                        validate_params, validate_request)
from .call.build import build_parts, build_pipelines, policy_from_config, reset_after_fork
from .call.chain import request_parts
from .call.context import CallContext
from .call.events import response_end
from .client_options import ClientOptions
from .introspect import ClientIntrospection
from .config import ClientConfig
from .errors import ConfigError, HolySheepError, InvalidRequestError
from .health import HealthChecker
from .models import AUTO
from .observe import CallEnd, CallInfo, CallObserver, ObserverSet
from .openai_api import Chat, ChatCompletionStream, Embeddings, Models
from .policy.retry import RetryPolicy
from .request_options import RequestOptions, Timeout, check_call_params, request_options
from .response import Response
from .streaming import ChatStream, StreamOutcome
from .validation import check_json_value

__all__ = ["Client"]

# chat_completion's own arguments (not sent as body fields), and the body fields it builds
_CHAT_ARGS = frozenset({"messages", "model", "stream", "region", "deadline_s", "idempotency_key", "cache",
                        "timeout", "extra_headers", "extra_query", "extra_body", "first_token_timeout_s"})
_CHAT_BUILT = frozenset({"model", "messages", "stream"})


class Client(ClientOptions, ClientIntrospection):
    """Spreads OpenAI-compatible calls over several gateway nodes and fails over.

    Blocking and thread-safe: create one per process and share it. Use it as a context
    manager, or call :meth:`close` (idempotent) at shutdown.

    ``api_key`` defaults to ``$HOLYSHEEP_API_KEY``; ``nodes`` (``Node`` objects or dicts)
    defaults to the public endpoint ``https://api.holysheep.ai/v1``. Every other option
    is a keyword argument documented on :class:`~holysheep_lb.config.ClientConfig`
    (``strategy``, ``connect_timeout_s``, ``read_timeout_s``, ``deadline_s``,
    ``max_retries``, ``pool_maxsize``, ...). ``retry`` is a
    :class:`~holysheep_lb.policy.retry.RetryPolicy` (or a subclass) deciding every retry;
    it replaces ``max_retries`` and the backoff options. ``observers`` are
    :class:`~holysheep_lb.observe.CallObserver` objects told about every call.
    ``clock``, ``sleep``, ``rand`` and ``wall_clock`` (epoch seconds: which UTC day
    spend is counted on) exist for tests.

    openai-python's surface is here too (:mod:`holysheep_lb.openai_api`):
    ``client.chat.completions.create(...)``, ``client.embeddings.create(...)`` and
    ``client.models.list()``, with per-call ``timeout``, ``extra_headers``,
    ``extra_query`` and ``extra_body``.
    """

    chat: Chat
    embeddings: Embeddings
    models: Models

    def _start(self, config: ClientConfig, *, retry: Optional[RetryPolicy], observers: Sequence[CallObserver],
               clock: Callable[[], float], sleep: Callable[[float], None], rand: Optional[Callable[[], float]],
               wall_clock: Callable[[], float]) -> None:
        self.config = cfg = config
        cfg = self.config
        self._clock = clock
        import random as _random
        self._rand = rand or _random.Random().random
        self._observers = ObserverSet(observers)
        parts = self._parts = build_parts(cfg, policy=retry or policy_from_config(cfg), clock=clock,
                                          rand=self._rand, wall_clock=wall_clock, owner=self)
        self._retry = parts.policy
        self._selector = parts.selector
        self._breakers = parts.breakers
        self._health: Optional[HealthChecker] = parts.health
        self._cache = parts.cache
        self._router = parts.router
        self._closed = False
        # Models whose breaker is open are skipped, unless the router brings its own
        # check. The router itself is never rewired: one may be shared by many clients.
        self._model_available: Callable[[str], bool] = (
            self.breaker_allows if self._router.uses_default_availability else self._router.is_available)
        self._pipes = build_pipelines(cfg, parts, sleep=sleep, is_available=self._model_available,
                                      stream_ended=lambda outcome: self._stream_ended(outcome))
        self.chat = Chat(self)
        self.embeddings = Embeddings(self)
        self.models = Models(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        nodes = ", ".join(n.id for n in self._selector.nodes)
        name = getattr(self._selector.strategy, "name", type(self._selector.strategy).__name__)
        return f"<holysheep_lb.Client {state} nodes=[{nodes}] strategy={name} version={__version__}>"

    def add_observer(self, observer: CallObserver) -> None:
        """Tell ``observer`` about every call from now on (see :mod:`holysheep_lb.observe`)."""
        if not isinstance(observer, CallObserver):
            raise ConfigError("observer", type(observer).__name__, "must be a CallObserver")
        self._observers.add(observer)

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
        self._parts.reaper.reap()
        if self._health is not None:
            self._health.stop()
        self._selector.close()  # its hang watcher thread
        for node in self._selector.nodes:
            node.transport.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _reset_after_fork(self) -> None:
        """What a forked child does to this client's parts (each joined the fork registry,
        :mod:`holysheep_lb.forksafe`, which runs it after ``fork()``); tests call it to
        play a child in-process."""
        reset_after_fork(self._parts)

    def _ensure_running(self) -> None:
        if self._closed:
            raise HolySheepError("this Client is closed")
        self._parts.reaper.reap()  # streams dropped without close() since the last call
        health = self._health
        if health is not None and not health.running:
            health.start()  # lazily, e.g. in a child after fork

    # -- public calls ---------------------------------------------------------------------

    @overload
    def chat_completion(self, messages: Sequence[Mapping[str, Any]], model: Optional[str] = None, *,
                        stream: Literal[True], region: Optional[str] = None, deadline_s: Optional[float] = None,
                        idempotency_key: Optional[str] = None, cache: Optional[bool] = None,
                        timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
                        extra_query: Optional[Mapping[str, Any]] = None,
                        extra_body: Optional[Mapping[str, Any]] = None, **params: Any) -> ChatCompletionStream: ...

    @overload
    def chat_completion(self, messages: Sequence[Mapping[str, Any]], model: Optional[str] = None, *,
                        stream: Optional[Literal[False]] = None, region: Optional[str] = None,
                        deadline_s: Optional[float] = None, idempotency_key: Optional[str] = None,
                        cache: Optional[bool] = None, timeout: Optional[Timeout] = None,
                        extra_headers: Optional[Mapping[str, str]] = None,
                        extra_query: Optional[Mapping[str, Any]] = None,
                        extra_body: Optional[Mapping[str, Any]] = None, **params: Any) -> Response: ...

    @overload
    def chat_completion(self, messages: Sequence[Mapping[str, Any]], model: Optional[str] = None, *,
                        stream: Optional[bool], region: Optional[str] = None, deadline_s: Optional[float] = None,
                        idempotency_key: Optional[str] = None, cache: Optional[bool] = None,
                        timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
                        extra_query: Optional[Mapping[str, Any]] = None,
                        extra_body: Optional[Mapping[str, Any]] = None,
                        **params: Any) -> Union[Response, ChatCompletionStream]: ...

    def chat_completion(
        self,
        messages: Sequence[Mapping[str, Any]],
        model: Optional[str] = None,
        *,
        stream: Optional[bool] = None,
        region: Optional[str] = None,
        deadline_s: Optional[float] = None,
        idempotency_key: Optional[str] = None,
        cache: Optional[bool] = None,
        timeout: Optional[Timeout] = None,
        extra_headers: Optional[Mapping[str, str]] = None,
        extra_query: Optional[Mapping[str, Any]] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
        first_token_timeout_s: Optional[float] = None,
        affinity_key: Optional[str] = None,
        **params: Any,
    ) -> Union[Response, ChatCompletionStream]:
        """``POST /chat/completions``; returns the decoded JSON with routing metadata.

        Blocks until an answer or a typed error. ``params`` (temperature, max_tokens, ...)
        are sent as they are. ``region`` steers the geographic strategy.
        ``model="auto"`` lets the client's router choose (``resp.extra["routing"]``).
        ``cache`` overrides whether the response cache is used (default: only when
        ``temperature == 0``, and not with ``extra_headers`` or ``extra_query``).
        ``affinity_key`` (e.g. a conversation id) names the calls that should share a node
        and its prompt cache; by default a long enough prompt prefix does (see
        :mod:`holysheep_lb.affinity`).
        Raises :class:`BudgetExceededError` before sending when a spend cap refuses the
        call. With ``stream=True`` it returns a :class:`~holysheep_lb.streaming.ChatStream`
        once the first chunk has arrived (failing over until then) and asks for
        ``stream_options={"include_usage": True}`` unless told otherwise; its cost is
        settled from that usage when it ends.

        As in openai-python, ``timeout`` (seconds or ``(connect_s, read_s)``) bounds each
        attempt (and a stream's wait for its first chunk) within the call's deadline, and
        ``extra_headers``, ``extra_query`` and ``extra_body`` reach every attempt's
        request (see :mod:`holysheep_lb.request_options`). openai-python client options
        this client does not take per call (``max_retries``, ``with_raw_response``...)
        raise :class:`InvalidRequestError` instead of being sent.
        ``first_token_timeout_s`` (streams only) overrides the time-to-first-token
        limit for this call; a stream that breaks later is rescued (``stream_rescue``).
        """
        if model is None and self.config.default_model is None and self.config.router is not None:
            model = AUTO
        model = self._resolve_model(model)
        validate_messages(messages)
        if params:
            check_call_params(params, _CHAT_ARGS)
        if stream is not None:
            if not isinstance(stream, bool):
                raise InvalidRequestError("stream", stream, "must be True or False")
            params["stream"] = stream
        options = request_options(timeout=timeout, extra_headers=extra_headers, extra_query=extra_query,
                                  extra_body=extra_body, reserved_body=_CHAT_BUILT)
        if options is not None:
            params.update(options.body)  # merged into the JSON body: its keys win
            if cache is None and options.changes_request:
                cache = False  # an answer cached for other headers or query may not be this one's
        validate_params(params)
        validate_first_token_timeout(first_token_timeout_s, stream)
        if cache is not None and not isinstance(cache, bool):
            raise InvalidRequestError("cache", cache, "must be True, False or None")
        # Checked here, not only when a request is built: a cache hit sends nothing.
        validate_call_options(region=region, deadline_s=deadline_s, idempotency_key=idempotency_key)
        self._ensure_running()
        deadline = self._clock() + (deadline_s or self.config.deadline_s)
        decision = self._router.route(messages, params, is_available=self._model_available) if model == AUTO else None
        model = decision.model if decision else model
        affinity = self._selector.affinity  # the node this call's prefix (or affinity_key) prefers
        position = affinity.key_for(model, messages, params, affinity_key) if affinity is not None else None
        if stream:
            stream_options = params.get("stream_options")
            if stream_options is not None and not isinstance(stream_options, Mapping):
                raise InvalidRequestError("stream_options", stream_options, "must be a dict or None")
        ctx = self._context("chat", "POST", "/chat/completions", deadline, options,
                            model=model, messages=messages, params=params,
                            region=region, idempotency_key=idempotency_key, stream=bool(stream),
                            first_token_timeout_s=first_token_timeout_s, affinity_key=position)
        result = self._run(ctx, (lambda: self._pipes.stream.run(ctx)) if stream else (
            lambda: self._pipes.chat.run(ctx, cache=cache)))
        if decision is not None:
            result.extra["routing"] = decision
            result.fallback = result.fallback or decision.fallback
        return result

    def request(self, method: str, path: str, json: Optional[Mapping[str, Any]] = None, *,
                region: Optional[str] = None, deadline_s: Optional[float] = None,
                idempotency_key: Optional[str] = None) -> Response:
        """Any JSON API call, with failover; ``path`` is relative to each node's base_url."""
        return self._request("request", method, path, json, region=region, deadline_s=deadline_s,
                             idempotency_key=idempotency_key)

    def _request(self, operation: str, method: str, path: str, json: Optional[Mapping[str, Any]] = None, *,
                 region: Optional[str], deadline_s: Optional[float], idempotency_key: Optional[str] = None,
                 options: Optional[RequestOptions] = None) -> Any:
        validate_request(method, path)
        validate_call_options(region=region, deadline_s=deadline_s, idempotency_key=idempotency_key)
        if options is not None and options.body:
            json = {**(json or {}), **options.body}  # merged into the JSON body: its keys win
        if json is not None:
            check_json_value("json", json)
        self._ensure_running()
        method = method.upper()
        body, headers = request_parts(method, json, idempotency_key)
        model = json.get("model") if json else None
        ctx = self._context(operation, method, path, self._clock() + (deadline_s or self.config.deadline_s), options,
                            model=model if isinstance(model, str) else None, region=region,
                            idempotency_key=idempotency_key, payload=json, body=body, headers=headers)
        return self._run(ctx, lambda: self._pipes.request.run(ctx))

    def _context(self, operation: str, method: str, path: str, deadline: float,
                 options: Optional[RequestOptions] = None, **fields: Any) -> CallContext:
        if options is not None:  # the call's own timeout, headers and query
            path += options.query
            fields.update(timeout=options.timeout, extra_headers=options.headers)
        ctx = CallContext(operation, method, path, deadline, self._clock, self._rand,
                          retry_budget=self._parts.retry_budget, is_closed=lambda: self._closed, **fields)
        if self._observers:  # zero cost without observers: no event is built
            ctx.observers = self._observers
            ctx.info = CallInfo(operation, ctx.model, stream=ctx.stream, params=ctx.params, messages=ctx.messages,
                                region=ctx.region, started_at=self._clock())
            ctx.undecided = {}
        return ctx

    def _run(self, ctx: CallContext, call: Callable[[], Any]) -> Any:
        """Run ``call``, telling the observers that the call started and how it ended."""
        if not ctx.observers:
            return call()
        ctx.emit("call_started")
        try:
            result = call()
        except BaseException as exc:
            ctx.emit("call_ended", CallEnd(error=exc, ended_at=self._clock()))
            raise
        if not isinstance(result, ChatStream):  # a stream's call ends with the stream
            ctx.emit("call_ended", response_end(result, self._clock(), self._selector.by_id))
        return result

    def _stream_ended(self, outcome: StreamOutcome) -> None:
        """Called once per stream when it completes, breaks or is cancelled: stream stats
        and call counts (cost and breaker outcomes have their own hooks)."""
        self._parts.stream_stats.record(outcome)
        if self._selector.affinity is not None:  # the node's provider-cached tokens
            self._selector.affinity.record_usage(outcome.node_id, outcome.usage)
        if outcome.ends_call:  # a rescued stream's call ends with the stream that rescued it
            self._parts.tally.count(outcome.ok, None if outcome.ok else "StreamInterruptedError", outcome.started)

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

    def _resolve_model(self, model: Any) -> str:
        model = model if model is not None else self.config.default_model
        if model is None:
            raise InvalidRequestError("model", None, "is required: pass model=... or set Client(default_model=...)")
        return validate_model(model)
