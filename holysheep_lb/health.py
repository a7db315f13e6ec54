"""Active health checks: a daemon thread probing ``GET {base_url}/models`` on every node.

``/models`` costs no tokens, unlike health checks that send real completions. A node is
marked down after ``unhealthy_threshold`` failed probes in a row and up after
``healthy_threshold`` good ones (both required, as in Envoy). Probe latency feeds the
geographic and adaptive strategies.

A round probes every node at the same time, one short-lived thread per node, so a slow
node never delays the others' probes; each probe is bounded by ``timeout_s`` from
connect to its last byte (headers included, see :mod:`holysheep_lb.deadline`). There is
never more than one probe per node in flight: a node whose probe is somehow still
running is skipped by the next round.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Optional, Set

from . import forksafe
from .errors import HolySheepError
from .nodes import NodeState
from .selection import Selector

__all__ = ["HealthChecker"]

log = logging.getLogger(__name__)


class HealthChecker:
    """Probes every node every ``interval_s`` (±20% jitter) until ``stop()``."""

    def __init__(
        self,
        selector: Selector,
        *,
        interval_s: float,
        timeout_s: float,
        unhealthy_threshold: int,
        healthy_threshold: int,
        clock: Callable[[], float] = time.monotonic,
        rand: Optional[Callable[[], float]] = None,
    ) -> None:
        self.selector = selector
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.clock = clock
        self.rand = rand or random.Random().random
        self.rounds = 0
        self.loop_errors = 0
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._probing_lock = threading.Lock()  # guards _probing, loop_errors, _Round.left
        self._probing: Set[str] = set()  # ids of the nodes with a probe in flight
        self._round = _Round(0)
        forksafe.register(self, phase=forksafe.PHASE_THREADS)

    # -- one round, callable directly (tests drive it without a thread) -------------

    def probe_all(self) -> None:
        """Probe every node once, all at the same time; return when each probe has ended
        (at most about ``timeout_s``) or ``stop()`` was called. Never raises: errors are
        logged and counted."""
        with self._probing_lock:
            nodes = [n for n in self.selector.nodes if n.id not in self._probing]
            self._probing.update(n.id for n in nodes)
            self._round = this_round = _Round(len(nodes))
        here = nodes[-1:]  # the last node is probed on this thread: one thread fewer
        for node in nodes[:-1]:
            thread = threading.Thread(target=self._probe_in_round, args=(node, this_round),
                                      name=f"holysheep-lb-probe-{node.id}", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had now: probe it here, after the others
                here.append(node)
        for node in here:
            self._probe_in_round(node, this_round)
        # each probe's deadline cuts its connection; the margin covers a loaded machine
        this_round.done.wait(self.timeout_s + 1.0)
        self.rounds += 1

    def _probe_in_round(self, node: NodeState, this_round: "_Round") -> None:
        try:
            if not self._stop.is_set():
                self.probe(node)
        except Exception:  # noqa: BLE001 - the health thread must survive anything
            with self._probing_lock:
                self.loop_errors += 1
            log.exception("health probe of node %s raised; the checker keeps running", node.id)
        finally:
            with self._probing_lock:
                self._probing.discard(node.id)
                this_round.left -= 1
                if this_round.left <= 0:
                    this_round.done.set()

    def probe(self, node: NodeState) -> bool:
        """Probe one node and record the result; True when it answered 2xx JSON."""
        started = self.clock()
        try:
            node.transport.send("GET", "/models", timeout_s=(self.timeout_s, self.timeout_s),
                                deadline_s=self.timeout_s)
        except HolySheepError as exc:
            self.selector.record_probe(node, False, None, self.unhealthy_threshold,
                                       self.healthy_threshold, error=_short(exc))
            return False
        latency_ms = (self.clock() - started) * 1000.0
        self.selector.record_probe(node, True, latency_ms, self.unhealthy_threshold,
                                   self.healthy_threshold)
        return True

    # -- the thread -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._start_lock:  # two threads' first calls must not start two checkers
            if self.running or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="holysheep-lb-health", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        log.debug("health checker started: every %.1f s", self.interval_s)
        while not self._stop.is_set():
            self.probe_all()
            delay = self.interval_s * (0.8 + 0.4 * self.rand())
            if self._stop.wait(delay):
                break
        log.debug("health checker stopped")

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the thread; waits up to ``timeout_s`` (a probe in flight ends by its timeout)."""
        self._stop.set()
        self._round.done.set()  # a round waiting for its probes ends now
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """The parent's thread does not exist in a child: forget it (restarted lazily)."""
        self._thread = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self._probing_lock = threading.Lock()
        self._probing = set()  # the parent's probe threads do not exist here
        self._round = _Round(0)


class _Round:
    """One round of probes: ``left`` to end (under the checker's lock); ``done`` when none is."""

    __slots__ = ("left", "done")

    def __init__(self, probes: int) -> None:
        self.left = probes
        self.done = threading.Event()
        if probes == 0:
            self.done.set()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."
