"""The :class:`SimulatedGateway` facade: lifecycle, addressing, configuration, statistics."""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from ..errors import ConfigError
from .config import (
    SimModel,
    SimNode,
    _as_model,
    _as_node,
    _check_names,
    _coerce_node_field,
)
from .content import _normalise_path
from .faults import ModelFaults
from .requestlog import RequestLog, SimRequest
from .runtime import _POLL_INTERVAL_S, _NodeRuntime

log = logging.getLogger(__name__)


class SimulatedGateway:
    """Several simulated OpenAI-compatible nodes, one HTTP server (port) each.

    Usage::

        with SimulatedGateway([SimNode("a", region="us"), {"id": "b", "latency_ms": 20}], seed=1) as gw:
            client = Client(nodes=gw.client_nodes())
            gw.configure("a", fault="refuse")
    """

    def __init__(
        self,
        nodes: Sequence[Union[SimNode, Mapping[str, Any]]],
        *,
        seed: Optional[int] = None,
        host: str = "127.0.0.1",
        models: Optional[Mapping[str, Union[SimModel, Mapping[str, Any]]]] = None,
        clock: Callable[[], float] = time.monotonic,
        request_log_size: int = 10_000,
    ) -> None:
        """``models`` are model settings on every node; ``clock`` (seconds) times
        the model fault windows, quotas, prompt-cache TTLs and the request log
        (waits and latencies use real time); ``request_log_size`` bounds the log."""
        if isinstance(request_log_size, bool) or not isinstance(request_log_size, int) or request_log_size < 0:
            raise ConfigError("request_log_size", request_log_size, "must be an int >= 0")
        if not callable(clock):
            raise ConfigError("clock", clock, "must be a callable returning seconds")
        self.host = host
        self.seed = seed
        self.clock = clock
        self._faults = ModelFaults({m: _as_model(m, spec) for m, spec in (models or {}).items()}, clock)
        self._requests = RequestLog(clock, request_log_size)
        self.nodes: List[SimNode] = [_as_node(n) for n in nodes]
        if not self.nodes:
            raise ValueError("SimulatedGateway needs at least one node")
        self._rts: Dict[str, _NodeRuntime] = {}
        for index, node in enumerate(self.nodes):
            if node.id in self._rts:
                raise ValueError(f"duplicate node id {node.id!r}")
            rng = random.Random() if seed is None else random.Random(f"holysheep-sim:{seed}:{index}:{node.id}")
            fault_seed = f"holysheep-sim-faults:{seed}:{index}:{node.id}"
            fault_rng = random.Random() if seed is None else random.Random(fault_seed)
            self._rts[node.id] = _NodeRuntime(self, node, rng, fault_rng)
        self._admin = threading.RLock()
        self._stop_event = threading.Event()
        self._started = False
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "SimulatedGateway":
        """Bind every node to an ephemeral port and start serving (nodes with
        ``fault="refuse"`` keep their port reserved but refuse connections)."""
        with self._admin:
            if self._stopped:
                raise RuntimeError("SimulatedGateway was stopped; create a new one")
            if self._started:
                return self
            self._faults.reset()
            self._requests.reset()
            try:
                for rt in self._rts.values():
                    rt.reserve(0)
                    if rt.cfg.fault != "refuse":
                        rt.listen()
            except BaseException:
                self._started = True
                self.stop(timeout_s=1.0)
                raise
            self._started = True
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop all nodes: release hanging/stalled/queued handlers, close the
        listening sockets and all client connections.  Bounded and idempotent."""
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        with self._admin:
            if self._stopped:
                return
            self._stopped = True
            self._stop_event.set()
            if not self._started:
                return
            for rt in self._rts.values():
                with rt.cond:
                    rt.cond.notify_all()
            for rt in self._rts.values():
                try:
                    rt.unlisten(rebind=False)
                except Exception:  # pragma: no cover - best effort
                    log.debug("sim node %s: error while stopping", rt.cfg.id, exc_info=True)
            for rt in self._rts.values():
                with rt.cond:
                    while rt.in_flight > 0:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        rt.cond.wait(min(remaining, _POLL_INTERVAL_S))
                rt.close_conns()
            leftover = {rt.cfg.id: rt.in_flight for rt in self._rts.values() if rt.in_flight}
            if leftover:
                log.debug("SimulatedGateway.stop(): requests still finishing: %s", leftover)

    def __enter__(self) -> "SimulatedGateway":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    # -- addressing -----------------------------------------------------------
    def _rt(self, node_id: str) -> _NodeRuntime:
        try:
            return self._rts[node_id]
        except KeyError:
            raise KeyError(f"unknown node id {node_id!r}") from None

    def port(self, node_id: str) -> int:
        rt = self._rt(node_id)
        if rt.port is None:
            raise RuntimeError("SimulatedGateway is not started")
        return rt.port

    def base_url(self, node_id: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port(node_id)}/v1"

    def client_nodes(self) -> List[Dict[str, str]]:
        return [{"id": n.id, "region": n.region, "base_url": self.base_url(n.id)} for n in self.nodes]

    # -- runtime configuration ----------------------------------------------
    @property
    def models(self) -> Dict[str, SimModel]:
        """The model settings on every node (a node's own ``models`` win)."""
        return dict(self._faults.models)

    def configure(self, node_id: Optional[str] = None, *, model: Optional[str] = None, **changes: Any) -> None:
        """Change a running (or not yet started) gateway.

        ``configure(node_id, **fields)`` changes SimNode fields.  ``fault="refuse"``
        closes the listening socket and all established connections (the port
        stays reserved, so new connections get ECONNREFUSED); setting it back
        re-listens on the same port.  Clearing ``fault="hang"`` /
        ``stream_fault="stall_midstream"`` / ``hang_after_requests`` releases
        requests currently blocked by them.

        ``configure(model=name, **fields)`` changes SimModel fields of a model on
        every node; ``configure(node_id, model=name, **fields)`` on that node only
        (starting from the model's gateway-wide setting).  Either re-arms the
        model's fault and releases requests held by its previous setting."""
        if model is not None:
            self._configure_model(node_id, model, changes)
            return
        if node_id is None:
            raise ConfigError("node_id", None, "name a node, or a model with model=...")
        rt = self._rt(node_id)
        _check_names("SimNode", changes)
        if "id" in changes and changes["id"] != rt.cfg.id:
            raise ConfigError("SimNode.id", changes["id"], "cannot be changed")
        values = {name: _coerce_node_field(name, value) for name, value in changes.items()}
        with self._admin:
            with rt.cond:
                for name, value in values.items():
                    setattr(rt.cfg, name, value)
                rt.follow_config(values)
                if "models" in values:
                    self._faults.rearm_node(rt.cfg.id, rt.cfg.models)
                rt.cond.notify_all()
            if self._started and not self._stopped:
                if rt.cfg.fault == "refuse" and rt.server is not None:
                    rt.unlisten(rebind=True)
                elif rt.cfg.fault != "refuse" and rt.server is None:
                    if rt.sock is None:
                        rt.reserve(rt.port or 0)
                    rt.listen()
        log.debug("sim node %s configured: %r", node_id, sorted(changes))

    def _configure_model(self, node_id: Optional[str], model: str, changes: Mapping[str, Any]) -> None:
        _as_model(model, {})  # validates the name
        _check_names("SimModel", changes)
        rts = list(self._rts.values()) if node_id is None else [self._rt(node_id)]
        with self._admin:
            if node_id is None:
                base = self._faults.models.get(model, SimModel())
            else:
                base = rts[0].cfg.models.get(model) or self._faults.models.get(model, SimModel())
            value = dataclasses.replace(base, **changes)
            if node_id is not None:
                rt = rts[0]
                with rt.cond:
                    rt.cfg.models = {**rt.cfg.models, model: value}  # replaced: readers hold no lock
            self._faults.set_model(node_id, model, value)
            for rt in rts:
                with rt.cond:
                    rt.cond.notify_all()
        log.debug("sim model %s configured on %s: %r", model, node_id or "every node", sorted(changes))

    # -- statistics -----------------------------------------------------------
    def request_count(self, node_id: str, path: Optional[str] = None) -> int:
        rt = self._rt(node_id)
        with rt.lock:
            if path is None:
                return rt.total
            return rt.by_path.get(_normalise_path(path), 0)

    def counts(self) -> Dict[str, int]:
        result = {}
        for node_id, rt in self._rts.items():
            with rt.lock:
                result[node_id] = rt.total
        return result

    def outcomes(self, node_id: str, path: Optional[str] = None) -> Dict[str, int]:
        """How the node's answers ended, by outcome: ``ok`` (2xx), ``error_4xx``,
        ``error_5xx``, ``rate_limited`` (any 429), ``malformed``, ``reset``, ``hang``
        (held, then dropped), ``stream_fault`` or ``dropped`` (the gateway stopped),
        and for model faults and model limits ``prefill_rejected``,
        ``context_length_exceeded``, ``content_policy_violation``, ``content_filter``,
        ``stream_cut``, ``stream_stall``, ``malformed_event``, ``no_done`` and
        ``error_event``; only answers written without a socket error count.  ``path`` (e.g. ``"/v1/models"``)
        restricts it to one endpoint."""
        rt = self._rt(node_id)
        with rt.lock:
            items = list(rt.outcomes.items())
        path = None if path is None else _normalise_path(path)
        result: Dict[str, int] = {}
        for (p, what), n in items:
            if path is None or p == path:
                result[what] = result.get(what, 0) + n
        return result

    def reset_counts(self) -> None:
        """Zero every counter (requests, outcomes, max_concurrency_seen, attempts,
        cache hits/misses, quota refusals), clear the request log and re-arm the
        faults: model fault windows and ``fault_attempts`` and the count towards
        ``hang_after_requests`` start again from now."""
        for rt in self._rts.values():
            with rt.lock:
                rt.total = 0
                rt.by_path = {}
                rt.outcomes = {}
                rt.max_seen = rt.in_service
                rt.hang_count = 0
            rt.cache.reset_counts()
            rt.quota.reset_counts()
        self._faults.reset()
        self._requests.reset()

    def attempts(self, model: Optional[str] = None, *, node_id: Optional[str] = None) -> int:
        """Requests that named ``model`` (any model when None) on ``node_id`` (any
        node when None) since start / the last reset_counts()."""
        if node_id is not None:
            self._rt(node_id)
        return self._requests.attempts(model, node_id)

    def request_log(self, *, model: Optional[str] = None, node_id: Optional[str] = None) -> List[SimRequest]:
        """The last ``request_log_size`` requests (oldest first), optionally of one
        model and/or node: arrival time, node, model, stream, prefill, outcome."""
        return self._requests.entries(model, node_id)

    def cache_stats(self, node_id: str) -> Dict[str, int]:
        """The node's prompt cache: ``hits``, ``misses`` (answered requests with a
        cacheable prefix) and ``entries`` (live now)."""
        return self._rt(node_id).cache.stats()

    def quota_stats(self, node_id: str) -> Dict[str, int]:
        """429s the node's quota sent: ``limited_requests`` (RPM) and ``limited_tokens`` (TPM)."""
        return self._rt(node_id).quota.stats()

    def in_flight(self, node_id: str) -> int:
        """Requests received by the node and not yet finished (incl. queued)."""
        rt = self._rt(node_id)
        with rt.lock:
            return rt.in_flight

    def max_concurrency_seen(self, node_id: str) -> int:
        """Max number of requests concurrently in service (holding a capacity
        slot) since start / the last reset_counts()."""
        rt = self._rt(node_id)
        with rt.lock:
            return rt.max_seen

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped else "new")
        return f"<SimulatedGateway {state} nodes={[n.id for n in self.nodes]}>"
