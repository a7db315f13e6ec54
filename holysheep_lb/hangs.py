"""When a node counts as hung, the thread that watches for it while calls wait, and the
registry of exchanges under way on a node so that those stuck on a hung one can be cut.

A node *hangs* when it stops answering while requests wait on it: Finagle's peak-EWMA
assumes answers arrive, and a node that accepts connections and never answers gives it
no sample at all. So ``NodeState.check_hung`` looks at what has *not* come back: the
age of the oldest unanswered request, and the time since the node last answered
anything. Past the threshold of :class:`HangPolicy` the node gets no new request while
any of its requests waits (``selection.Selector``), and the calls stuck on it are cut
(:class:`Exchanges`, one per transport) so that they retry elsewhere.

Checks run at every pick and, while requests are in flight, on a small watcher thread
(:class:`HangWatcher`), so that a lone caller stuck on a hung node is rescued too.
:class:`HangWatcher` and :class:`Exchanges` join the fork registry (``forksafe``).
"""

from __future__ import annotations

import _thread
import logging
import math
import threading
import weakref
from typing import Any, Dict, List, Optional

from . import forksafe
from .deadline import Watch
from .errors import ConfigError

__all__ = ["HangPolicy", "DEFAULT_HANG_POLICY", "HangWatcher", "Exchanges", "WATCHER_IDLE_ROUNDS"]

log = logging.getLogger(__name__)

# watcher rounds without a request in flight before the watcher thread ends
WATCHER_IDLE_ROUNDS = 50
# ended exchanges are dropped when the registry doubles past this: memory follows the live ones
_EXCHANGES_PURGE_MIN = 64


class HangPolicy:
    """When a node counts as hung: its oldest unanswered request (and its last answer)
    older than ``factor`` × its usual latency, and than ``floor_s``.

    "Usual latency" is the larger of its latency EWMA and half its p99 (refreshed every
    ``refresh_every`` successes), so a node whose answers vary widely (LLM calls of 0.1
    to 60 s) needs a long silence; before ``min_samples`` successes it is the node's cold
    guess (1 s by default). Requiring silence as well means one long call on a node that
    keeps answering others never marks it hung.

    ``min_waiting`` (default 2): how many unanswered requests must be past the threshold.
    One lone request is left to its own limits (read timeout, first-token limit): on a
    quiet node, a single long answer (a reasoning model thinking for a minute among
    fast calls) looks exactly like a hang, and cutting it would cost the answer. Under
    load a hang strands several callers at once, which is the case worth rescuing.

    ``rescue``: when a node is found hung, the connections of the calls waiting on it
    are cut, so each fails at once (a timeout) and its attempt loop retries it on
    another node, within the retry budget, instead of sitting out the read timeout.
    Each cut request may still have been billed: it is counted as unconfirmed spend,
    like any timeout after sending.

    Hangs are checked at every pick, and by a watcher thread every ``watch_interval_s``
    while requests are in flight (so a lone caller stuck on a hung node is rescued too);
    it ends after a few idle seconds and starts again with the next pick. None: picks only.
    """

    __slots__ = ("factor", "floor_s", "min_samples", "refresh_every", "rescue", "watch_interval_s", "min_waiting")

    def __init__(self, factor: float = 4.0, floor_s: float = 0.25, min_samples: int = 20,
                 refresh_every: int = 64, rescue: bool = True, watch_interval_s: Optional[float] = 0.1,
                 min_waiting: int = 2) -> None:
        if isinstance(min_waiting, bool) or not isinstance(min_waiting, int) or min_waiting < 1:
            raise ConfigError("hang_min_waiting", min_waiting, "must be an integer >= 1")
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
            raise ConfigError("hang_factor", factor, "must be a finite number >= 1")
        if not (isinstance(floor_s, (int, float)) and math.isfinite(floor_s) and floor_s > 0):
            raise ConfigError("hang_floor_s", floor_s, "must be a finite number of seconds > 0")
        self.factor = float(factor)
        self.floor_s = float(floor_s)
        self.min_samples = min_samples
        self.refresh_every = refresh_every
        self.rescue = rescue
        self.watch_interval_s = watch_interval_s
        self.min_waiting = min_waiting


DEFAULT_HANG_POLICY: HangPolicy = HangPolicy()


class HangWatcher:
    """The watcher thread of one selector: every ``interval_s`` while requests are in
    flight it calls the selector's ``_watch_once()`` (which cuts what hangs and says
    whether to go on); it ends after :data:`WATCHER_IDLE_ROUNDS` idle rounds, or at
    :meth:`close`, and the next pick starts it again (:meth:`claim`, then :meth:`start`).

    ``running`` and the idle count are guarded by the selector's lock: a pick claims the
    thread and the thread gives up its claim under the same lock, so no request is left
    unwatched between an idle round and a pick. ``interval_s=None``: no thread (picks only).
    In a forked child the parent's thread does not exist: the next pick starts one.
    """

    __slots__ = ("interval_s", "running", "idle_rounds", "_stop", "__weakref__")

    def __init__(self, interval_s: Optional[float]) -> None:
        self.interval_s = interval_s
        self.running = False  # guarded by the owner's lock
        self.idle_rounds = 0  # guarded by the owner's lock
        self._stop = threading.Event()
        forksafe.register(self, phase=forksafe.PHASE_THREADS)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        closed = self._stop.is_set()
        self._stop = threading.Event()  # a fresh one: its lock may be held by a parent's thread
        if closed:
            self._stop.set()
        self.running = False
        self.idle_rounds = 0

    def claim(self) -> bool:
        """Under the owner's lock, at a pick: True when the caller must :meth:`start` the thread."""
        if self.running or self.interval_s is None or self._stop.is_set():
            return False
        self.running = True
        self.idle_rounds = 0
        return True

    def idle(self, busy: bool) -> bool:
        """Under the owner's lock, each round: False when the thread must end (idle too long)."""
        if busy:
            self.idle_rounds = 0
            return True
        self.idle_rounds += 1
        if self.idle_rounds >= WATCHER_IDLE_ROUNDS:
            self.running = False
            return False
        return True

    def start(self, owner: Any) -> bool:
        """Start the thread (outside the owner's lock) after a :meth:`claim`; False if no
        thread can be started now (the owner then gives up its claim: picks still check).
        The thread holds ``owner`` weakly: a dropped client's watcher ends."""
        try:
            # _thread, as the hedger does: Thread.start() waits on an Event an interrupt could leave locked
            _thread.start_new_thread(_watch, (weakref.ref(owner), self._stop, self.interval_s or 0.1))
        except RuntimeError:
            return False
        return True

    def close(self) -> None:
        """Stop the thread (at its next round) and start no other."""
        self._stop.set()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()


def _watch(owner_ref: Any, stop: threading.Event, interval_s: float) -> None:
    try:
        while not stop.wait(interval_s):
            owner = owner_ref()
            if owner is None or not owner._watch_once():
                return
            del owner
    except Exception:  # noqa: BLE001 - logged: a thread has no caller to raise to
        log.warning("hang watcher stopped by an error; picks still check for hangs", exc_info=True)
        owner = owner_ref()
        if owner is not None:
            owner._watcher_failed()


class Exchanges:
    """The exchanges under way on one node (their deadline :class:`~holysheep_lb.deadline.Watch`),
    so that those stuck on a hung node can be cut (:meth:`cut_all`). Thread-safe; memory
    follows the live exchanges (ended ones are dropped as the table doubles, O(1) amortised).
    In a forked child the parent's exchanges do not exist: it starts empty."""

    __slots__ = ("_lock", "_live", "_purge_at", "_cut_as_hung", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: Dict[Watch, None] = {}
        self._purge_at = _EXCHANGES_PURGE_MIN
        self._cut_as_hung: Dict[Watch, None] = {}
        forksafe.register(self)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._live, self._cut_as_hung = {}, {}
        self._purge_at = _EXCHANGES_PURGE_MIN

    def __len__(self) -> int:
        return len(self._live)

    def track(self, entry: Watch) -> None:
        with self._lock:
            live = self._live
            live[entry] = None
            if len(live) >= self._purge_at:
                for ended in [w for w in live if w.ended]:
                    del live[ended]
                    self._cut_as_hung.pop(ended, None)
                self._purge_at = max(_EXCHANGES_PURGE_MIN, 2 * len(live))

    def cut_all(self) -> int:
        """Cut every exchange under way (the node was found hung): each blocked call fails
        at once. Returns how many were cut. Streams past their first chunk are no longer
        watched, never cut."""
        with self._lock:
            live: List[Watch] = [w for w in self._live if not w.ended]
            for w in live:
                self._cut_as_hung[w] = None
        for w in live:  # outside the lock: a shutdown is a system call
            w._expire()
        return sum(1 for w in live if w.cut)

    def was_cut_as_hung(self, entry: Watch) -> bool:
        """Whether ``entry`` was cut by :meth:`cut_all` (asked once, when its call fails)."""
        with self._lock:
            return self._cut_as_hung.pop(entry, "no") is None
