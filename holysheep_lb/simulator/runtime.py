"""Runtime state of one simulated node (sockets, counters, waits) and its HTTP server."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Tuple

from .config import SimNode
from .content import sample_latency_ms
from .handler import _Handler
from .prompt_cache import PromptCache
from .quotas import NodeQuota

if TYPE_CHECKING:
    from .gateway import SimulatedGateway

log = logging.getLogger(__name__)

_ERROR_STATUSES = (500, 502, 503)
_POLL_INTERVAL_S = 0.05  # accept-loop poll interval (bounds configure()/stop())
_MAX_WAIT_SLICE_S = 0.5  # condition waits re-check their predicate at least this often


class _NodeRuntime:
    """Mutable runtime state of one node (sockets, counters, waits)."""

    def __init__(self, gateway: "SimulatedGateway", cfg: SimNode, rng: random.Random,
                 fault_rng: random.Random) -> None:
        self.gateway = gateway
        self.cfg = cfg
        self.rng = rng
        self.fault_rng = fault_rng
        self.rng_lock = threading.Lock()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.port: Optional[int] = None
        self.sock: Optional[socket.socket] = None  # bound; listening iff server is not None
        self.server: Optional[_NodeServer] = None
        self.thread: Optional[threading.Thread] = None
        self.conns: set = set()
        self.total = 0
        self.by_path: Dict[str, int] = {}
        self.outcomes: Dict[Tuple[str, str], int] = {}  # (path, outcome) -> count
        self.in_flight = 0
        self.in_service = 0
        self.max_seen = 0
        self.hang_count = 0  # requests since hang_after_requests was armed
        self.hang_generation = 0  # bumped when hang_after_requests is configured: releases held requests
        self.cache = PromptCache(gateway.clock)
        self.quota = NodeQuota(gateway.clock)
        self.follow_config()

    def follow_config(self, changed: Iterable[str] = ()) -> None:
        """Bring the cache, the quota and the hang-under-load counter in line with
        ``cfg`` after the fields ``changed`` were set (call under ``cond``)."""
        self.cache.configure(self.cfg)
        self.quota.configure(self.cfg)
        if "hang_after_requests" in changed:
            self.hang_count = 0
            self.hang_generation += 1

    def count_for_hang(self) -> Optional[int]:
        """Count an arriving request; the hang generation if the node now hangs under load."""
        with self.lock:
            limit = self.cfg.hang_after_requests
            if limit is None:
                return None
            self.hang_count += 1
            return self.hang_generation if self.hang_count > limit else None

    # -- counters -------------------------------------------------------------
    def begin(self, path: str) -> None:
        with self.lock:
            self.total += 1
            self.by_path[path] = self.by_path.get(path, 0) + 1
            self.in_flight += 1

    def outcome(self, path: str, what: str) -> None:
        with self.lock:
            key = (path, what)
            self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def end(self) -> None:
        with self.cond:
            self.in_flight -= 1
            if self.gateway._stop_event.is_set():
                self.cond.notify_all()

    def acquire_slot(self) -> bool:
        """Take a capacity slot; False if the gateway stops while queued."""
        stop = self.gateway._stop_event
        with self.cond:
            while True:
                if stop.is_set():
                    return False
                cap = self.cfg.capacity
                if cap is None or self.in_service < cap:
                    break
                self.cond.wait(_MAX_WAIT_SLICE_S)
            self.in_service += 1
            if self.in_service > self.max_seen:
                self.max_seen = self.in_service
            return True

    def release_slot(self) -> None:
        with self.cond:
            self.in_service -= 1
            if self.cfg.capacity is not None:
                self.cond.notify_all()

    # -- waits ----------------------------------------------------------------
    def wait_until(self, released: Callable[[], bool], timeout_s: float) -> bool:
        """Block until ``released()``, the gateway stops or ``timeout_s`` passes;
        False if the gateway stopped."""
        stop = self.gateway._stop_event
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        with self.cond:
            while not (stop.is_set() or released()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(min(remaining, _MAX_WAIT_SLICE_S))
        return not stop.is_set()

    def sleep(self, seconds: float) -> bool:
        """Sleep, interruptible by stop(); True if the full time elapsed."""
        stop = self.gateway._stop_event
        if seconds <= 0:
            return not stop.is_set()
        return not stop.wait(seconds)

    def draw(self) -> Tuple[float, float, int, float, float]:
        """(latency_s, error roll, error status, 429 roll, fault roll) - always the
        same draws (the fault roll from its own stream)."""
        cfg = self.cfg
        with self.rng_lock:
            latency_ms = sample_latency_ms(self.rng, cfg.latency_ms, cfg.p99_latency_ms)
            err_roll = self.rng.random()
            err_status = _ERROR_STATUSES[self.rng.randrange(len(_ERROR_STATUSES))]
            rl_roll = self.rng.random()
            fault_roll = self.fault_rng.random()
        return latency_ms / 1000.0, err_roll, err_status, rl_roll, fault_roll

    # -- sockets (called under the gateway admin lock) --------------------------
    def reserve(self, port: int) -> None:
        host = self.gateway.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.port = sock.getsockname()[1]

    def listen(self) -> None:
        assert self.sock is not None and self.server is None
        server = _NodeServer(self, self.sock)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"holysheep-sim-{self.cfg.id}",
            daemon=True,
        )
        thread.start()
        self.server, self.thread = server, thread
        log.debug("sim node %s listening on %s:%s", self.cfg.id, self.gateway.host, self.port)

    def unlisten(self, rebind: bool) -> None:
        """Stop accepting, close the listening socket (pending connections are
        refused/reset), then either re-reserve the same port (bound, not
        listening -> ECONNREFUSED) or release it; finally close all established
        connections of this node."""
        server, thread = self.server, self.thread
        self.server = self.thread = None
        if server is not None:
            server.shutdown()  # returns within ~_POLL_INTERVAL_S
            server.server_close()  # closes self.sock
            if thread is not None:
                thread.join(1.0)
        elif self.sock is not None:
            self.sock.close()
        self.sock = None
        if rebind and self.port is not None:
            self.reserve(self.port)
        self.close_conns()
        log.debug("sim node %s stopped listening (rebind=%s)", self.cfg.id, rebind)

    def track(self, conn: socket.socket) -> None:
        with self.lock:
            self.conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self.lock:
            self.conns.discard(conn)

    def close_conns(self) -> None:
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
            except OSError:
                pass


# --------------------------------------------------------------------- HTTP server


class _NodeServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # never join handler threads (some may hang)
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, rt: _NodeRuntime, sock: socket.socket) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # replace the unbound socket TCPServer created
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.rt = rt
        try:
            self.server_activate()
        except BaseException:
            self.socket = socket.socket(sock.family)  # don't let a later close hit the reserved socket
            self.socket.close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        self.rt.track(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.rt.untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("sim node %s: error while handling %s", self.rt.cfg.id, client_address, exc_info=True)
